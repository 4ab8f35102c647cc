"""Camera files, rigs and the rig-mismatch check (the failure chain of the mouse pipeline)."""
import copy
import json
import math
import re

import pytest
import torch

from cameras import (
    BUILTIN_RIGS,
    camera_geometry,
    frames_to_tensors,
    load_rig,
    make_frame,
    make_rig,
    orbit_c2w,
    read_cameras,
    rig_from_cameras,
    rig_mismatch,
    write_cameras,
)
from data import MultiViewDataset, rig_sample_frames
from models import look_at_c2w
from plumbing import InputError
from toy import write_toy_mice

MOUSE = BUILTIN_RIGS["mouse_6view"]


def mouse_capture(d_el=0.0, seed=0):
    """One real capture's cameras in the mouse rig's geometry: each camera's direction up to 2 deg and
    its distance up to 4 % off, aimed within 0.03 of one point, the animal within 0.1 of the rig's aim point."""
    g = torch.Generator().manual_seed(seed)
    u = lambda *shape: 2 * torch.rand(*shape, generator=g, dtype=torch.float64) - 1  # noqa: E731
    centre = torch.tensor(MOUSE["target"], dtype=torch.float64) + 0.1 * u(3)
    frames = []
    for az, el, r, (da, de, dr) in zip(MOUSE["azimuths"], MOUSE["elevations"], MOUSE["distances"],
                                       u(6, 3).tolist()):
        eye = orbit_c2w(az + 2 * da, el + d_el + 2 * de, r * (1 + 0.04 * dr), centre.tolist())[:3, 3]
        frames.append(make_frame(look_at_c2w(eye, centre + 0.03 * u(3)), 512, 548.99))
    return frames


def test_rig_files_load_and_are_up_to_date():
    for name, spec in BUILTIN_RIGS.items():
        rig = load_rig(name)
        want = json.loads(json.dumps(make_rig(name, **spec)))
        assert rig == want, f"run `python data.py make_rigs` ({name})"
        assert len(rig["frames"]) == len(rig["views"]) == 6 and rig["prompt_embeds"].endswith("clr_embeds.pt")
    with pytest.raises(FileNotFoundError, match="mouse_6view"):
        load_rig("no_such_rig")
    assert make_rig("x", **dict(BUILTIN_RIGS["facelift_6view"], note="kept"))["note"] == "kept"


def test_mouse_rig_geometry():
    """The rig file reproduces the set-up's measured geometry, seen from the point its cameras aim at."""
    g = camera_geometry(load_rig("mouse_6view")["frames"])
    f64 = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    assert torch.allclose(g["target"], f64([-0.11, -0.02, -0.42]), atol=0.005)
    assert torch.allclose(g["az"], f64([-144.0, 31.2, 94.6, -22.6, 156.7, -76.5]), atol=0.05)
    centres = torch.linalg.inv(frames_to_tensors(load_rig("mouse_6view")["frames"])[0].double())[:, :3, 3]
    world_az = torch.rad2deg(torch.atan2(centres[:, 1], centres[:, 0]))  # about the origin, as the file says
    assert torch.allclose(world_az, f64([-145, 32, 97, -24, 158, -79]), atol=0.1)
    assert abs(centres.norm(dim=1).mean() - 2.7) < 0.002  # the conversion's mean camera distance
    assert torch.allclose(g["el"], f64([0.7, 15.0, 2.2, 0.7, 15.3, 18.3]), atol=0.05)
    assert torch.allclose(g["dist"], f64([2.67, 2.92, 2.70, 2.66, 2.74, 2.71]), atol=0.005)
    assert torch.allclose(g["intr"], torch.tensor([1.072, 1.072, 0.5, 0.5]).expand(6, 4), atol=5e-4)


def test_facelift_rig_geometry():
    rig = load_rig("facelift_6view")
    c2w = torch.linalg.inv(frames_to_tensors(rig["frames"])[0].double())
    centres = dict(zip(rig["views"], c2w[:, :3, 3]))
    assert torch.allclose(centres["front"], torch.tensor([0.0, -2.7, 0.0], dtype=torch.float64), atol=1e-6)
    assert torch.allclose(centres["right"], torch.tensor([-2.7, 0.0, 0.0], dtype=torch.float64), atol=1e-6)
    y_dot_z = c2w[:, :3, 1] @ torch.tensor([0.0, 0, 1], dtype=torch.float64)  # image y = down = -z
    assert torch.allclose(y_dot_z, -torch.ones(6, dtype=torch.float64))
    fr = rig["frames"][0]
    assert (fr["fx"], fr["cx"], fr["w"]) == (548.99, 256.0, 512)


def test_intrinsics_scale_with_size():
    rig = load_rig("mouse_6view")
    _, K = frames_to_tensors(rig["frames"], size=64)
    assert torch.allclose(K[0], torch.tensor([548.99 / 8, 548.99 / 8, 32.0, 32.0]))


def test_camera_file_keeps_extra_keys(tmp_path):
    frame = make_frame(look_at_c2w((0, -2.7, 0)), 512, 549.0, file_path="images/cam_000.png",
                       blender_camera_name="Cam0")
    cams = {"id": "x", "frames": [frame], "note": "extra"}
    write_cameras(tmp_path / "c.json", cams)
    back = read_cameras(tmp_path / "c.json")
    assert back == cams
    write_cameras(tmp_path / "d.json", back)
    assert read_cameras(tmp_path / "d.json")["frames"][0]["blender_camera_name"] == "Cam0"


def test_rig_mismatch_accepts_the_rig_and_real_captures():
    rig = load_rig("mouse_6view")
    assert rig_mismatch(rig, rig["frames"]) is None
    for seed in range(3):
        assert rig_mismatch(rig, mouse_capture(seed=seed)) is None


def test_rig_mismatch_refuses_bad_mouse_captures():
    rig = load_rig("mouse_6view")
    swapped = mouse_capture()
    swapped[1], swapped[4] = swapped[4], swapped[1]
    msg = rig_mismatch(rig, swapped)
    assert msg and "order" in msg and "camera 1 looks like rig view 4 (cam4_az+158)" in msg
    assert "camera 4 looks like rig view 1 (cam1_az+32)" in msg
    msg = rig_mismatch(rig, mouse_capture(d_el=20))
    assert msg and "elevation" in msg and "rig 'mouse_6view' at [1, 15, 2, 1, 15, 18] deg" in msg
    longer = mouse_capture()
    longer[2]["fx"] = longer[2]["fy"] = 1.1 * 548.99
    msg = rig_mismatch(rig, longer)
    assert msg and "view 2 (cam2_az+97) intrinsics" in msg and re.findall(r"view \d", msg) == ["view 2"]


def test_rig_mismatch_catches_elevation_swap():
    facelift = load_rig("facelift_6view")
    at_20 = make_rig("x", **dict(BUILTIN_RIGS["facelift_6view"], elevations=[20] * 6))["frames"]
    msg = rig_mismatch(facelift, at_20)
    assert msg and "elevation" in msg and "facelift_6view" in msg and "20" in msg


def test_rig_mismatch_catches_permutation():
    rig = load_rig("mouse_6view")
    perm = [1, 0, 2, 3, 5, 4]
    msg = rig_mismatch(rig, [rig["frames"][i] for i in perm])
    assert msg and "order" in msg and "camera 0 looks like rig view 1" in msg


def test_rig_mismatch_other_problems():
    rig = load_rig("mouse_6view")
    assert "5 cameras" in rig_mismatch(rig, rig["frames"][:5])
    wider = copy.deepcopy(rig["frames"])
    for fr in wider:
        fr["fx"] = fr["fy"] = 400.0
    assert "intrinsics" in rig_mismatch(rig, wider)
    one = copy.deepcopy(rig["frames"])
    one[3]["fx"] = 600.0  # only view 3 differs: the message names it with its own numbers
    msg = rig_mismatch(rig, one)
    assert "view 3 (cam3_az-24) intrinsics" in msg and "[1.1719, 1.0722, 0.5, 0.5] vs rig [1.0722" in msg
    assert "view 0" not in msg
    far = make_rig("x", **dict(MOUSE, distances=[1.5 * r for r in MOUSE["distances"]]))["frames"]
    assert "distance" in rig_mismatch(rig, far) and "direction" not in rig_mismatch(rig, far)
    shifted = make_rig("x", **dict(MOUSE, azimuths=[az + 30 for az in MOUSE["azimuths"]]))["frames"]
    assert "directions" in rig_mismatch(rig, shifted)


def test_rig_from_cameras_round_trip():
    cams = {"id": "s", "frames": [dict(fr, file_path=f"images/cam_{i:03d}.png") for i, fr in
                                  enumerate(load_rig("facelift_6view")["frames"])]}
    rig = rig_from_cameras(cams, "lab", views=[3, 1, 0])
    assert rig_mismatch(rig, [cams["frames"][i] for i in (3, 1, 0)]) is None
    assert rig_mismatch(rig, [cams["frames"][i] for i in (0, 1, 3)]) is not None


# ---- conventions: a camera file in another convention, a mirrored rig, a translated world

def write_frames(path, c2ws, like):
    """A camera file with frames `like` (intrinsics) but the camera-to-world matrices `c2ws`."""
    frames = [dict(fr, w2c=torch.linalg.inv(c2w).tolist()) for fr, c2w in zip(like, c2ws, strict=True)]
    write_cameras(path, {"id": "s", "frames": frames})
    return path


def rig_c2w(name="mouse_6view"):
    return torch.linalg.inv(frames_to_tensors(load_rig(name)["frames"])[0].double())  # (V, 4, 4)


def refused(path, *words):
    with pytest.raises(InputError) as err:
        read_cameras(path)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(str(path)) and all(w in msg for w in words), msg
    return msg


def test_opengl_camera_file_is_refused(tmp_path):
    rig = load_rig("mouse_6view")
    gl = rig_c2w() @ torch.diag(torch.tensor([1.0, -1, -1, 1], dtype=torch.float64))  # (V, 4, 4)
    refused(write_frames(tmp_path / "gl.json", gl, rig["frames"]), "every camera faces away",
            "OpenGL", "c2w_cv = c2w_gl @ diag(1, -1, -1, 1)")
    one = rig_c2w()
    one[3] = gl[3]  # one camera in the other convention: named
    refused(write_frames(tmp_path / "one.json", one, rig["frames"]), "frames [3] face away", "OpenGL")
    assert read_cameras(write_frames(tmp_path / "cv.json", rig_c2w(), rig["frames"]))  # the rig itself passes


def test_mirrored_rig_is_refused(tmp_path):
    rig = load_rig("mouse_6view")
    flip = torch.diag(torch.tensor([-1.0, 1, 1, 1], dtype=torch.float64))
    refused(write_frames(tmp_path / "mirror.json", flip @ rig_c2w(), rig["frames"]), "frame 0", "det -1",
            "mirrored")  # the world mirrored in x: every rotation has det -1
    flipped_axis = rig_c2w()
    flipped_axis[2] = flipped_axis[2] @ flip  # one camera's x axis flipped
    refused(write_frames(tmp_path / "axis.json", flipped_axis, rig["frames"]), "frame 2", "det -1")


def test_translated_world_is_refused(tmp_path):
    rig = load_rig("mouse_6view")
    moved = rig_c2w()
    moved[:, :3, 3] += torch.tensor([1.5, -2.0, 0.7], dtype=torch.float64)
    path = write_frames(tmp_path / "moved.json", moved, rig["frames"])
    msg = rig_mismatch(rig, read_cameras(path)["frames"])  # directions and distances alone would pass
    assert msg and "translated by [1.5, -2.0, 0.7]" in msg and "direction" not in msg and "\n" not in msg
    sample = tmp_path / "sample"
    sample.mkdir()
    (sample / "opencv_cameras.json").write_text(path.read_text())
    with pytest.raises(InputError, match=r"sample/opencv_cameras.json: .*translated by \[1.5, -2.0, 0.7\]"):
        rig_sample_frames(sample, rig)
    small = rig_c2w()
    small[:, :3, 3] += torch.tensor([0.1, 0.0, -0.1], dtype=torch.float64)  # an animal a little off the aim point
    assert rig_mismatch(rig, read_cameras(write_frames(tmp_path / "s.json", small, rig["frames"]))["frames"]) is None


def test_off_centre_crop_passes_and_forced_principal_point_is_caught():
    """A crop moves the principal point and keeps the view: a camera turned 10 deg with cx shifted so that
    its image centre still shows the aim point passes; the same camera with cx forced to w/2 is caught."""
    rig = load_rig("mouse_6view")
    th = math.radians(15.0)
    turn = torch.tensor([[math.cos(th), 0, math.sin(th), 0], [0, 1, 0, 0], [-math.sin(th), 0, math.cos(th), 0],
                         [0, 0, 0, 1]], dtype=torch.float64)  # about the camera's y axis
    crop = copy.deepcopy(rig["frames"])
    crop[1] = dict(crop[1], w2c=torch.linalg.inv(rig_c2w()[1] @ turn).tolist(),
                   cx=256 + 548.99 * math.tan(th))
    assert crop[1]["cx"] / 512 > 0.7 and rig_mismatch(rig, crop) is None
    forced = copy.deepcopy(crop)
    forced[1]["cx"] = 256.0
    msg = rig_mismatch(rig, forced)
    assert msg and "views [1] are centred" in msg and "intrinsics" not in msg, msg


def test_image_size_must_match_its_frame(tmp_path):
    toy = write_toy_mice(tmp_path / "toy", n=2, size=16, n_extra=0, n_val=1, progress=False)
    cam_file = toy / "mouse_00000" / "opencv_cameras.json"
    cams = json.loads(cam_file.read_text())
    for fr in cams["frames"]:  # the same cameras in pixels of 512: consistent, but not the 16 px images
        fr.update({k: fr[k] * 32 for k in ("fx", "fy", "cx", "cy", "w", "h")})
    cam_file.write_text(json.dumps(cams))
    ds = MultiViewDataset(toy / "data_train.txt", 16, rig=load_rig("mouse_6view"))
    with pytest.raises(InputError, match=r"cam_000.png: image is 16x16, its camera frame says 512x512"):
        ds[0]


def test_gen_synthetic_checks_the_cameras_it_is_given(tiny_mv_ckpt, tiny_mice, tmp_path):
    """--camera_json: an OpenGL file and a translated world are refused in one line before anything is written."""
    import gen_synthetic
    from cameras import RigMismatch
    from plumbing import load_config
    rig = load_rig("mouse_6view")
    gl = rig_c2w() @ torch.diag(torch.tensor([1.0, -1, -1, 1], dtype=torch.float64))  # (V, 4, 4)
    moved = rig_c2w()
    moved[:, :3, 3] += torch.tensor([1.5, -2.0, 0.7], dtype=torch.float64)
    for name, c2w, err, words in [("gl.json", gl, InputError, "c2w_cv = c2w_gl @ diag(1, -1, -1, 1)"),
                                  ("moved.json", moved, RigMismatch, "translated by [1.5, -2.0, 0.7]")]:
        path = write_frames(tmp_path / name, c2w, rig["frames"])
        cfg = load_config(gen_synthetic.Config, [f"--mvdiff_checkpoint={tiny_mv_ckpt}", f"--camera_json={path}",
                                                 f"--input_data={tiny_mice}/data_train.txt", "--steps=1",
                                                 f"--out_dir={tmp_path / 'out'}", "--max_sources=1"])
        with pytest.raises(err) as e:
            gen_synthetic.main(cfg)
        assert str(path) in str(e.value) and words in str(e.value) and "\n" not in str(e.value)
        assert not (tmp_path / "out" / "data_train.txt").exists()
