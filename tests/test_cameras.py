"""Camera files, rigs and the rig-mismatch check (the failure chain of the mouse pipeline)."""
import copy
import json
import re

import pytest
import torch

from data import (
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
from models import look_at_c2w

MOUSE = BUILTIN_RIGS["mouse_6view"]


def mouse_capture(d_el=0.0, seed=0):
    """One real capture's cameras in the mouse rig's geometry: each camera's direction up to 2 deg and
    its distance up to 4 % off, aimed within 0.03 of one point, the world re-centred on the animal."""
    g = torch.Generator().manual_seed(seed)
    u = lambda *shape: 2 * torch.rand(*shape, generator=g, dtype=torch.float64) - 1  # noqa: E731
    centre = 0.1 * u(3)  # the new origin is near the animal, not at the rig's aim point
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
    assert torch.allclose(g["az"], f64([-145, 32, 97, -24, 158, -79]), atol=0.05)
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
