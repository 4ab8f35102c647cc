"""Camera files, rigs and the rig-mismatch check (the failure chain of the mouse pipeline)."""
import copy
import json

import pytest
import torch

from data import (BUILTIN_RIGS, frames_to_tensors, load_rig, make_frame, make_ring_rig, orbit_c2w,
                  read_cameras, rig_from_cameras, rig_mismatch, write_cameras)
from models import look_at_c2w


def test_rig_files_load_and_are_up_to_date():
    for name, spec in BUILTIN_RIGS.items():
        rig = load_rig(name)
        want = json.loads(json.dumps(make_ring_rig(name, **spec)))
        assert rig == want, f"run `python data.py make_rigs` ({name})"
        assert len(rig["frames"]) == len(rig["views"]) == 6 and rig["prompt_embeds"].endswith("clr_embeds.pt")
    with pytest.raises(FileNotFoundError, match="mouse_6view"):
        load_rig("no_such_rig")


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


def test_rig_mismatch_accepts_the_rig_and_jitter():
    rig = load_rig("mouse_6view")
    assert rig_mismatch(rig, rig["frames"]) is None
    # per-sample jitter: a few degrees off, cameras re-aimed 0.4 below the origin, distances +-4 %
    target = (0.0, 0.0, -0.4)
    jittered = [make_frame(orbit_c2w(az + d, 20 - d, r, target), 512, 549.5) for az, d, r in
                zip([-145, 32, 97, -24, 158, -79], [2, -3, 1, 3, -2, 0], [2.6, 2.8, 2.7, 2.65, 2.75, 2.7])]
    assert rig_mismatch(rig, jittered) is None


def test_rig_mismatch_catches_elevation_swap():
    facelift = load_rig("facelift_6view")
    at_20 = make_ring_rig("x", **dict(BUILTIN_RIGS["facelift_6view"], elevation=20))["frames"]
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
    far = [make_frame(orbit_c2w(az, 20, 4.0), 512, 548.99) for az in [-145, 32, 97, -24, 158, -79]]
    assert "distance" in rig_mismatch(rig, far)
    shifted = [make_frame(orbit_c2w(az + 30, 20, 2.7), 512, 548.99) for az in [-145, 32, 97, -24, 158, -79]]
    assert "directions" in rig_mismatch(rig, shifted)


def test_rig_from_cameras_round_trip():
    cams = {"id": "s", "frames": [dict(fr, file_path=f"images/cam_{i:03d}.png") for i, fr in
                                  enumerate(load_rig("facelift_6view")["frames"])]}
    rig = rig_from_cameras(cams, "lab", views=[3, 1, 0])
    assert rig_mismatch(rig, [cams["frames"][i] for i in (3, 1, 0)]) is None
    assert rig_mismatch(rig, [cams["frames"][i] for i in (0, 1, 3)]) is not None
