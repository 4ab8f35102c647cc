"""Toy mice and the FaceLift-format multi-view loader, including every bad-sample error."""
import hashlib
import json
import shutil

import numpy as np
import pytest
import torch
from conftest import write_png16
from PIL import Image

from cameras import camera_hash, load_rig
from data import MultiViewDataset, load_rgba, preview_samples, save_image_grid
from toy import toy_mouse, write_toy_mice


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return write_toy_mice(tmp_path_factory.mktemp("toy"), n=4, size=32, n_extra=3, seed=1, progress=False)


def digest(root):
    return hashlib.md5(b"".join(p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file())).hexdigest()


def test_toy_mice_deterministic_and_both_rigs(toy, tmp_path):
    again = write_toy_mice(tmp_path / "again", n=4, size=32, n_extra=3, seed=1, progress=False)
    assert digest(toy) == digest(again)
    other = write_toy_mice(tmp_path / "other", n=4, size=32, n_extra=3, seed=2, progress=False)
    assert digest(toy) != digest(other)
    face = write_toy_mice(tmp_path / "face", n=2, rig="facelift_6view", size=32, n_extra=1, progress=False)
    cams = json.loads((face / "mouse_00000" / "opencv_cameras.json").read_text())
    assert cams["rig"] == "facelift_6view" and len(cams["frames"]) == 7
    assert (toy / "data_train.txt").read_text().split() == ["mouse_00000", "mouse_00001", "mouse_00002"]
    assert (toy / "data_val.txt").read_text().split() == ["mouse_00003"]
    cameras = camera_hash(load_rig("mouse_6view")["frames"])
    spec = {"n": 4, "rig": "mouse_6view", "cameras": cameras, "size": 32, "n_extra": 3, "n_val": 1, "seed": 1,
            "yaw_deg": None}  # the rig's cameras: a stale set is refused
    assert json.loads((toy / "toy.json").read_text()) == spec


def test_toy_mouse_heading():
    """yaw_deg None: any heading; yaw_deg 30: +x +- 30 deg (the yaw is in the shared quaternion
    (w, 0, 0, z))."""
    def yaws(yaw_deg):
        q = np.stack([toy_mouse(np.random.default_rng((0, i)), yaw_deg)["quats"][0] for i in range(200)])
        return np.degrees(2 * np.arctan2(q[:, 3], q[:, 0]))  # in (-360, 360]
    narrow, any_way = (yaws(30.0) + 180) % 360 - 180, (yaws(None) + 180) % 360 - 180
    assert np.abs(narrow).max() <= 30 and np.abs(narrow).max() > 25
    assert np.abs(any_way).max() > 170 and np.abs(any_way).min() < 10


def test_toy_mouse_images_have_a_mouse(toy):
    im = np.asarray(Image.open(toy / "mouse_00000" / "images" / "cam_000.png"))
    assert im.shape == (32, 32, 4)
    fg = im[..., 3] > 128
    assert 0.03 < fg.mean() < 0.6 and not fg[0].any() and not fg[-1].any()  # inside the frame, not empty


def test_loader_shapes_and_conventions(toy):
    rig = load_rig("mouse_6view")
    ds = MultiViewDataset(toy / "data_train.txt", image_size=16, num_target_views=2, rig=rig, seed=0)
    item = ds[0]
    assert item["images"].shape == (8, 4, 16, 16) and item["c2w"].shape == (8, 4, 4)
    assert item["fxfycxcy"].shape == (8, 4)
    assert item["views"][:6].tolist() == [0, 1, 2, 3, 4, 5] and set(item["views"][6:].tolist()) <= {6, 7, 8}
    assert torch.allclose(item["fxfycxcy"][0], torch.tensor([548.99 / 32, 548.99 / 32, 8.0, 8.0]))
    bg = item["images"][:, 3] == 0
    assert torch.allclose(item["images"][:, :3].permute(1, 0, 2, 3)[:, bg], torch.ones(1))  # white background
    assert torch.equal(ds[0]["views"], item["views"])  # deterministic per (seed, epoch, index)
    assert any(not torch.equal(ds[i, 1]["views"], ds[i]["views"]) for i in range(3))  # epoch 1 vs 0


def test_sample_without_camera_file_uses_rig(toy, tmp_path):
    d = tmp_path / "mv" / "s0"
    d.mkdir(parents=True)
    for i in range(6):
        shutil.copy(toy / "mouse_00000" / "images" / f"cam_{i:03d}.png", d / f"cam_{i:03d}.png")
    (tmp_path / "mv" / "list.txt").write_text("s0\n")
    rig = load_rig("mouse_6view")
    item = MultiViewDataset(tmp_path / "mv" / "list.txt", 32, rig=rig)[0]
    assert torch.allclose(item["images"], MultiViewDataset(toy / "data_train.txt", 32)[0]["images"][:6])
    with pytest.raises(FileNotFoundError, match="needs a rig"):
        MultiViewDataset(tmp_path / "mv" / "list.txt", 32)[0]


def test_absolute_paths_in_list_file(toy, tmp_path):
    (tmp_path / "abs.txt").write_text(f"{(toy / 'mouse_00001').resolve()}\n")
    assert MultiViewDataset(tmp_path / "abs.txt", 16)[0]["path"].endswith("mouse_00001")
    # FaceLift's own list files hold its author's absolute paths: said as such, not as a layout problem
    theirs = f"{(toy / 'mouse_00001').resolve()}\n/home/someone/data/sample_000\n"
    (tmp_path / "theirs.txt").write_text(theirs)
    with pytest.raises(FileNotFoundError, match=r"sample folder /home/someone/data/sample_000 does not exist "
                                                r"\(listed in .*theirs.txt; 1 of 2 listed folders are "
                                                r"missing\)"):
        MultiViewDataset(tmp_path / "theirs.txt", 16)


def test_16bit_png_loads(tmp_path):
    x = (np.random.default_rng(0).random((8, 8, 4)) * 65535).astype(np.uint16)
    x[..., 3] = 65535
    write_png16(tmp_path / "a.png", x)
    im = load_rgba(tmp_path / "a.png")
    assert im.shape == (4, 8, 8)
    assert (im - torch.from_numpy(x / 65535.0).permute(2, 0, 1).float()).abs().max() < 1.5 / 255


def broken_copy(toy, tmp_path, fn):
    """A one-sample list whose sample is a copy of a toy mouse that `fn` breaks."""
    d = tmp_path / "bad" / "s"
    shutil.copytree(toy / "mouse_00000", d)
    fn(d)
    (tmp_path / "bad" / "list.txt").write_text("s\n")
    return tmp_path / "bad" / "list.txt"


def edit_cameras(fn):
    def edit(d):
        cams = json.loads((d / "opencv_cameras.json").read_text())
        fn(cams)
        (d / "opencv_cameras.json").write_text(json.dumps(cams))
    return edit


@pytest.mark.parametrize("name, breaker, error, message", [
    ("missing image", lambda d: (d / "images" / "cam_002.png").unlink(),
     FileNotFoundError, r"cam_002.png: image missing"),
    ("corrupt png", lambda d: (d / "images" / "cam_001.png").write_bytes(b"\x89PNG garbage"),
     ValueError, r"cam_001.png: cannot read"),
    ("non-square", lambda d: Image.new("RGBA", (32, 24)).save(d / "images" / "cam_003.png"),
     ValueError, r"cam_003.png: image is 32x24"),
    ("missing keys", edit_cameras(lambda c: c["frames"][1].pop("fx")),
     ValueError, r"opencv_cameras.json: frame 1 lacks keys \['fx'\]"),
    ("nan w2c", edit_cameras(lambda c: c["frames"][4]["w2c"][0].__setitem__(0, float("nan"))),
     ValueError, r"opencv_cameras.json: frame 4 w2c"),
    ("too few views", edit_cameras(lambda c: c.__setitem__("frames", c["frames"][:7])),
     ValueError, r"s: has 7 views, needs"),
])
def test_bad_samples_raise_naming_the_file(toy, tmp_path, name, breaker, error, message):
    ds = MultiViewDataset(broken_copy(toy, tmp_path, breaker), 16, num_target_views=2)
    with pytest.raises(error, match=message):
        ds[0]


def test_rig_mismatch_stops_the_loader(toy):
    message = "opencv_cameras.json: cameras do not match rig 'facelift_6view': elevation"
    with pytest.raises(ValueError, match=message):
        MultiViewDataset(toy / "data_train.txt", 16, rig=load_rig("facelift_6view"))[0]


def test_preview_grid(toy, tmp_path):
    im = Image.open(preview_samples(toy / "data_train.txt", tmp_path / "p.png", n=2))
    assert im.size == (9 * 98 + 2, 2 * 98 + 2)  # 32-px views upscaled x3 to 96-px cells, 2 px gaps


def test_grid_cells_are_nearest_upscaled_under_a_header_row(tmp_path):
    rows = [torch.rand(3, 3, 32, 32), torch.rand(3, 3, 32, 32)]
    plain = np.asarray(Image.open(save_image_grid(rows, tmp_path / "a.png")))
    named = np.asarray(Image.open(save_image_grid(rows, tmp_path / "b.png", [("input", 1), ("output", 2)])))
    assert named.shape == (plain.shape[0] + 16, plain.shape[1], 3)
    rule = 1 * (96 + 2)  # the gap before the second group's first column
    assert (named[:, rule: rule + 2] == 150).all()  # a grey rule between the groups
    named = np.delete(named, [rule, rule + 1], axis=1)
    assert np.array_equal(named[16:], np.delete(plain, [rule, rule + 1], axis=1))  # cells untouched
    assert (named[:16] < 128).any() and (named[:16] < 128).sum() < 0.3 * named[:16].size  # dark text on white
    cell = plain[2:98, 2:98]  # (96, 96, 3): the first cell, each source pixel a 3x3 block
    assert np.array_equal(cell, np.repeat(np.repeat(cell[::3, ::3], 3, 0), 3, 1))
    expect = (rows[0][0].permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    assert np.array_equal(cell[::3, ::3], expect)
