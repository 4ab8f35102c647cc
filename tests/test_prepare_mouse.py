"""prepare_mouse.py on a synthetic capture made here: toy mice walking off the rig's aim point over a textured
arena, rendered through the published mouse rig's calibration in millimetres with lens distortion, written as
videos. The samples must pass the rig's check, the triangulated centres and the masks must match the truth,
and phases 1 and 3 must train on them.

    PYTHONPATH=. python tests/test_prepare_mouse.py OUT     # writes the capture: OUT/calibration.json, OUT/videos/...
"""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import prepare_mouse
from cameras import camera_geometry, load_rig, read_cameras, rig_mismatch
from data import MultiViewDataset, read_list_file
from models import intrinsics_matrix
from plumbing import load_config
from render import render_gaussians
from toy import toy_mouse

REPO = Path(__file__).parent.parent
MM = 307.785 / 2.7  # mm per unit of the published conversion (mean camera distance 307.785 mm -> 2.7)
CENTROID_MM = np.array([59.672, 51.517, 107.099])  # the cameras' centroid in that calibration's world
W, H, FOCAL = 112, 80, 1.072 * 64  # a small full frame, wider than the 50 deg crop (64 px of it)
DIST = [-0.12, 0.03, 0.001, -0.001, 0.0]  # barrel distortion, k1 k2 p1 p2 k3
SCALE = 0.85  # toy mice are drawn for a 50 deg view filled by the animal; a real mouse covers ~5 %
# per session: the mouse's offsets from the aim point (normalised units) per frame, None = an empty arena.
# Mice hug the wall: 24 frames on a circle 1.2 away (seen from other directions than the rig's: skipped;
# they also keep each camera's median background clean), then 6 frames near the aim point.
FAR = [(1.2 * np.cos(a), 1.2 * np.sin(a)) for a in np.linspace(0, 2 * np.pi, 24, endpoint=False)]
WALKS = {"m1_day1": FAR + [(0.1, -0.04), (0.12, 0.0), (0.11, 0.05), (0.08, 0.09), (0.03, 0.11), None],
         "m2_day1": FAR[::-1] + [(-0.08, 0.07), (-0.11, 0.02), (-0.11, -0.04), (-0.08, -0.08), (-0.02, -0.11),
                                 (0.04, -0.1)]}
NEAR = 23  # frames after this one are near the aim point


def mm_cameras():
    """The rig's cameras in the calibration's millimetres: K (OpenCV: integer = a pixel's centre), R, t."""
    cams = []
    for i, fr in enumerate(load_rig("mouse_6view")["frames"]):
        w2c = np.array(fr["w2c"])
        R = w2c[:3, :3]
        t = MM * w2c[:3, 3] - R @ CENTROID_MM  # x_cam = MM (R x_n + t_n), x_mm = MM x_n + centroid
        K = np.array([[FOCAL, 0, W / 2 - 0.5 + 1.3], [0, FOCAL, H / 2 - 0.5 - 0.8], [0, 0, 1]])
        cams.append({"name": f"cam{i}", "K": K, "dist": DIST, "R": R, "t": t, "size": [W, H]})
    return cams


def undistort(xd, yd, k, iters=30):
    x, y = xd, yd
    for _ in range(iters):
        r2 = x * x + y * y
        rad = 1 + r2 * (k[0] + r2 * (k[1] + r2 * k[4]))
        dx = x * rad + 2 * k[2] * x * y + k[3] * (r2 + 2 * x * x) - xd
        dy = y * rad + k[2] * (r2 + 2 * y * y) + 2 * k[3] * x * y - yd
        x, y = x - dx, y - dy
    return x, y


def floor_colour(p, arena_z):
    """Textured arena: a floor (checks + waves) at arena_z within radius 180 mm, striped walls beyond."""
    x, y = p[..., 0], p[..., 1]
    check = ((np.floor(x / 15) + np.floor(y / 15)) % 2)[..., None]
    floor = np.array([0.16, 0.46, 0.28]) + 0.1 * check + 0.05 * np.sin(x / 7)[..., None] * [1, -1, 0.5]
    az = np.arctan2(y, x)[..., None]
    wall = np.array([0.55, 0.5, 0.6]) + 0.12 * np.sign(np.sin(12 * az)) * [1, 0.5, -0.5]
    return np.where((np.hypot(x, y) < 180)[..., None], floor, wall)


def render_capture(cams, mice, arena_z):
    """Per camera the distorted frames (T, H, W, 3) uint8 and the true masks (T, H, W) of the mice (mm)."""
    videos, masks = [], []
    for c in cams:
        K, R, t = c["K"], c["R"], c["t"]
        j, i = np.meshgrid(np.arange(W), np.arange(H))
        xu, yu = undistort((j - K[0, 2]) / K[0, 0], (i - K[1, 2]) / K[1, 1], c["dist"])  # (H, W) each
        d = np.stack([xu, yu, np.ones_like(xu)], -1) @ R  # (H, W, 3) world ray directions (R^T d_cam)
        o = -R.T @ t
        s = (arena_z - o[2]) / np.where(d[..., 2] < -1e-9, d[..., 2], -1e-9)  # along the ray to the floor
        hit = o + np.where((s > 0)[..., None], s[..., None] * d, 1e4 * d)  # (H, W, 3); no hit: far away
        bg = floor_colour(hit, arena_z)
        # the mice through a pinhole canvas wide enough for the undistorted rays, sampled at them
        pad = int(np.ceil(max(np.abs(xu).max() * K[0, 0] - W / 2, np.abs(yu).max() * K[1, 1] - H / 2, 0))) + 2
        Kp = torch.tensor([K[0, 0], K[1, 1], K[0, 2] + 0.5 + pad, K[1, 2] + 0.5 + pad])  # ours: centres at +0.5
        w2c = torch.eye(4, dtype=torch.float64)
        w2c[:3, :3], w2c[:3, 3] = torch.tensor(R), torch.tensor(t)
        frames, alphas = [], []
        for m in mice:
            if m is None:
                rgb, a = np.zeros((H, W, 3)), np.zeros((H, W, 1))
            else:
                out = render_gaussians(*[torch.as_tensor(m[k], dtype=torch.float32) for k in
                                         ("means", "quats", "scales", "opacities", "colors")],
                                       w2c[None].float(), intrinsics_matrix(Kp)[None], H + 2 * pad, W + 2 * pad,
                                       0.0)
                canvas = torch.cat(out, -1)[0].double().numpy()  # (H + 2 pad, W + 2 pad, 4) premultiplied
                u, v = xu * K[0, 0] + K[0, 2] + pad, yu * K[1, 1] + K[1, 2] + pad
                u0, v0 = np.floor(u).astype(int), np.floor(v).astype(int)
                a_, b_ = (u - u0)[..., None], (v - v0)[..., None]
                px = (canvas[v0, u0] * (1 - a_) * (1 - b_) + canvas[v0, u0 + 1] * a_ * (1 - b_)
                      + canvas[v0 + 1, u0] * (1 - a_) * b_ + canvas[v0 + 1, u0 + 1] * a_ * b_)  # (H, W, 4)
                rgb, a = px[..., :3], px[..., 3:]
            frames.append(np.clip(rgb + (1 - a) * bg, 0, 1) * 255 + 0.5)
            alphas.append(a[..., 0] > 0.5)
        videos.append(np.stack(frames).astype(np.uint8))  # (T, H, W, 3)
        masks.append(np.stack(alphas))  # (T, H, W)
    return videos, masks


def toy_mice_mm(walk, seed, aim_mm):
    """Toy mice (Gaussians in mm) at the walk's offsets from the aim point, or None for an empty frame."""
    rng = np.random.default_rng(seed)
    base = toy_mouse(rng, None)
    out = []
    for k, off in enumerate(walk):
        if off is None:
            out.append(None)
            continue
        yaw = 0.6 * k  # the mouse turns as it walks
        Rz = np.array([[np.cos(yaw), -np.sin(yaw), 0], [np.sin(yaw), np.cos(yaw), 0], [0, 0, 1]])
        q = np.tile([np.cos(yaw / 2), 0, 0, np.sin(yaw / 2)], (len(base["means"]), 1))
        quats = np.stack([q[:, 0] * base["quats"][:, 0] - q[:, 3] * base["quats"][:, 3], np.zeros(len(q)),
                          np.zeros(len(q)), q[:, 0] * base["quats"][:, 3] + q[:, 3] * base["quats"][:, 0]], 1)
        means = aim_mm + MM * SCALE * base["means"] @ Rz.T + MM * np.array([off[0], off[1], 0.0])
        out.append(dict(base, means=means, scales=MM * SCALE * base["scales"], quats=quats))
    return out


def write_capture(root):
    """The capture on disk: calibration.json (mm), videos/<session>/cam<i>.mp4; returns the truth."""
    import imageio.v2 as imageio
    root = Path(root)
    cams = mm_cameras()
    aim_mm = MM * camera_geometry(load_rig("mouse_6view")["frames"])["target"].numpy() + CENTROID_MM
    arena_z = aim_mm[2] - MM * SCALE * 0.3  # the floor under the toy mouse's feet
    (root / "calibration.json").parent.mkdir(parents=True, exist_ok=True)
    (root / "calibration.json").write_text(json.dumps({"units": "mm", "cameras": [
        dict(c, K=c["K"].tolist(), R=c["R"].tolist(), t=c["t"].tolist()) for c in cams]}))
    truth = {}
    for s, (name, walk) in enumerate(WALKS.items()):
        mice = toy_mice_mm(walk, s, aim_mm)
        videos, masks = render_capture(cams, mice, arena_z)
        (root / "videos" / name).mkdir(parents=True, exist_ok=True)
        for c, frames in zip(cams, videos):
            imageio.mimwrite(root / "videos" / name / f"{c['name']}.mp4", list(frames), fps=10, codec="libx264",
                             quality=10, macro_block_size=16)
        # the centre: the Gaussians' volume-weighted mean (the thin tail weighs little, as in a silhouette)
        centres = [None if m is None else np.average(m["means"], 0, np.prod(m["scales"], 1)) for m in mice]
        truth[name] = {"centres": centres, "masks": masks, "mice": mice, "cams": cams}
    return truth


@pytest.fixture(scope="module")
def capture(tmp_path_factory):
    root = tmp_path_factory.mktemp("capture")
    return root, write_capture(root)


@pytest.fixture(scope="module")
def prepared(capture):
    root, _ = capture
    out = root / "prepared"
    cfg = load_config(prepare_mouse.Config, [f"--calibration={root / 'calibration.json'}",
                                             f"--videos={root / 'videos'}", f"--out_dir={out}",
                                             "--image_size=32", "--morph_px=1", "--split_by=animal"])
    return out, prepare_mouse.main(cfg)


def test_capture_is_like_a_real_one(capture):
    _, truth = capture
    cover = np.mean([m[k].mean() for t in truth.values() for m in t["masks"]
                     for k, c in enumerate(t["centres"]) if c is not None])
    assert 0.04 < cover < 0.1, cover  # a real mouse covers ~5 % of a full view


def test_samples_pass_the_rig_and_count_skips(prepared):
    out, counts = prepared
    rig = load_rig("mouse_6view")
    # every frame near the aim point is written; the empty arena has no clean mask; the wide walk is skipped
    # (seen from other directions than the rig's, or with the mouse at the frame's edge)
    assert counts["frames"] == 60 and counts["written"] >= 9, counts  # of the 11 near the aim point
    assert counts["skipped_few_clean_masks"] >= 1 and counts["skipped_off_rig"] >= 40, counts
    assert sum(counts[k] for k in counts if k.startswith("skipped")) == 60 - counts["written"]
    names = read_list_file(out / "data_train.txt") + read_list_file(out / "data_val.txt")
    assert len(names) == counts["written"] and all(int(d.name.split("_")[-1]) > NEAR for d in names)
    animals = [{p.name.split("_")[0] for p in read_list_file(out / f"data_{s}.txt")} for s in ("train", "val")]
    assert animals[0] and animals[1] and not animals[0] & animals[1]  # split by animal
    worst = 0.0
    for d in names:
        frames = read_cameras(d / "opencv_cameras.json")["frames"]
        assert rig_mismatch(rig, frames) is None
        worst = max(worst, max(abs(fr["cx"] / fr["w"] - 0.5) for fr in frames))
    assert worst > 0.05  # the crops moved the principal point (the old 5 % check would have refused them)
    made = json.loads((out / "rig.json").read_text())
    assert made["views"] == rig["views"] and rig_mismatch(made, rig["frames"]) is None
    ds = MultiViewDataset(out / "data_train.txt", 32, rig=rig)
    item = ds[0]
    assert item["images"].shape == (6, 4, 32, 32) and 0.02 < item["images"][:, 3].mean() < 0.5
    again = prepare_mouse.main(load_config(prepare_mouse.Config, [
        f"--calibration={out.parent / 'calibration.json'}", f"--videos={out.parent / 'videos'}",
        f"--out_dir={out}", "--image_size=32", "--morph_px=1", "--split_by=animal"]))
    assert again["existing"] == counts["written"] and again["written"] == 0  # resumable: finished samples are skipped


def dlt(cams, uv):
    """The point whose projections best fit distorted pixel points uv (V, 2), by DLT on undistorted rays."""
    rows = []
    for c, (u, v) in zip(cams, uv):
        x, y = undistort((u - c["K"][0, 2]) / c["K"][0, 0], (v - c["K"][1, 2]) / c["K"][1, 1], c["dist"])
        P = np.concatenate([c["R"], c["t"][:, None]], 1)  # (3, 4)
        rows += [x * P[2] - P[0], y * P[2] - P[1]]
    X = np.linalg.svd(np.stack(rows) / np.linalg.norm(np.stack(rows), axis=1, keepdims=True))[2][-1]  # (4,)
    return X[:3] / X[3]


def test_centres_and_masks_match_the_truth(capture, prepared):
    """Centres: within 15 mm (mean 8) of the point the true masks' centroids triangulate to (a pixel of the
    112 x 80 frames is 4.5 mm at the mouse, and background-model masks move a centroid by ~1 px), within 25 mm
    of the mouse's volume-weighted centre (a silhouette centroid is not a 3D centre; the mouse is ~110 mm
    long), and at the rig's aim point. Masks: IoU >= 0.75 (mean >= 0.85) against the truth rendered through
    each sample's own cameras (this checks cameras, undistortion and crops together)."""
    _, truth = capture
    out, _ = prepared
    errs, errs_vol, ious, shifts = [], [], [], []
    for d in read_list_file(out / "data_train.txt") + read_list_file(out / "data_val.txt"):
        tr = json.loads((d / "transform.json").read_text())
        t = truth[tr["session"]]
        centroids = np.stack([np.argwhere(m[tr["frame"]]).mean(0)[::-1] for m in t["masks"]])  # (V, 2) x, y
        got = np.array(tr["centre_mm"])
        errs.append(np.linalg.norm(got - dlt(t["cams"], centroids)))
        errs_vol.append(np.linalg.norm(got - t["centres"][tr["frame"]]))
        A = np.array(tr["to_normalised"])
        assert np.allclose(np.array(tr["to_mm"]) @ A, np.eye(4), atol=1e-6)
        assert np.allclose(A[:3, :3] @ got + A[:3, 3], [-0.11, -0.02, -0.42], atol=1e-6)  # at the aim point
        m = t["mice"][tr["frame"]]
        frames = read_cameras(d / "opencv_cameras.json")["frames"]
        w2c = torch.tensor([fr["w2c"] for fr in frames], dtype=torch.float32)  # (V, 4, 4)
        K = intrinsics_matrix(torch.tensor([[fr["fx"], fr["fy"], fr["cx"], fr["cy"]] for fr in frames]))
        means = torch.tensor(m["means"] @ A[:3, :3].T + A[:3, 3], dtype=torch.float32)
        _, alpha = render_gaussians(means, torch.tensor(m["quats"], dtype=torch.float32),
                                    torch.tensor(m["scales"] * tr["scale"], dtype=torch.float32),
                                    torch.tensor(m["opacities"], dtype=torch.float32),
                                    torch.tensor(m["colors"], dtype=torch.float32), w2c, K, 32, 32, 0.0)
        for v, fr in enumerate(frames):
            got = np.asarray(Image.open(d / fr["file_path"]))[..., 3] > 127
            want = alpha[v, ..., 0].numpy() > 0.5
            ious.append((got & want).sum() / (got | want).sum())
            shifts.append(np.argwhere(got).mean(0) - np.argwhere(want).mean(0))  # (y, x) px
    print(f"centre vs true masks' triangulation mm: mean {np.mean(errs):.2f} max {np.max(errs):.2f}; vs volume "
          f"centre: mean {np.mean(errs_vol):.1f} max {np.max(errs_vol):.1f}; mask IoU: mean {np.mean(ious):.3f} "
          f"min {np.min(ious):.3f}; mask centroid shift px (y, x) {np.mean(shifts, 0).round(2)}")
    assert np.abs(np.mean(shifts, 0)).max() < 0.3  # no half-pixel or lens-model error: no systematic shift
    assert np.max(errs) < 15.0 and np.mean(errs) < 8.0 and np.max(errs_vol) < 25.0
    assert np.mean(ious) > 0.85 and np.min(ious) > 0.75


def rotation_vector(R):
    """Matrix -> Rodrigues vector (angles below 180 deg), as Anipose stores rotations."""
    th = np.arccos(np.clip((np.trace(R) - 1) / 2, -1, 1))
    w = np.array([R[2, 1] - R[1, 2], R[0, 2] - R[2, 0], R[1, 0] - R[0, 1]])
    return w * th / (2 * np.sin(th)) if th > 1e-9 else np.zeros(3)


def test_anipose_and_mammal_calibrations_read_as_the_json(tmp_path):
    cams = mm_cameras()
    toml = "".join(f"[cam_{i}]\nname = \"{c['name']}\"\nsize = [{W}, {H}]\nmatrix = {c['K'].tolist()}\n"
                   f"distortions = {list(c['dist'])}\nrotation = {rotation_vector(c['R']).tolist()}\n"
                   f"translation = {c['t'].tolist()}\n\n" for i, c in enumerate(cams)) + "[metadata]\nadjusted = true\n"
    (tmp_path / "calibration.toml").write_text(toml)
    import pickle
    with open(tmp_path / "new_cam.pkl", "wb") as f:  # MAMMAL: {index: {K, R, T (3, 1) in mm}}, no distortion
        pickle.dump({i: {"K": c["K"], "R": c["R"], "T": c["t"][:, None]} for i, c in enumerate(cams)}, f)
    (tmp_path / "m.json").write_text(json.dumps({"units": "m", "cameras": [
        dict(c, K=c["K"].tolist(), R=c["R"].tolist(), t=(c["t"] / 1000).tolist()) for c in cams]}))
    anipose = prepare_mouse.read_calibration(tmp_path / "calibration.toml")
    mammal = prepare_mouse.read_calibration(tmp_path / "new_cam.pkl")
    metres = prepare_mouse.read_calibration(tmp_path / "m.json")
    for c, a, m, j in zip(cams, anipose, mammal, metres, strict=True):
        assert a["name"] == c["name"] and m["name"] == str(cams.index(c)) and a["size"] == (W, H)
        for got in (a, m, j):
            assert np.allclose(got["R"], c["R"], atol=1e-5) and np.allclose(got["t"], c["t"], atol=1e-6)
            assert np.allclose(got["K"], c["K"])
        assert np.allclose(a["dist"], DIST) and not m["dist"].any() and m["size"] is None
    auto = prepare_mouse.up_rotation("auto", anipose)  # the cameras' mean image-up: within 1 deg of z here
    assert np.degrees(np.arccos(auto[2, 2])) < 1.0 and np.isclose(np.linalg.det(auto), 1.0)
    for axis, vec in (("-y", [0, -1, 0]), ("-z", [0, 0, -1]), ("+x", [1, 0, 0])):
        U = prepare_mouse.up_rotation(axis, anipose)
        assert np.allclose(U @ vec, [0, 0, 1]) and np.isclose(np.linalg.det(U), 1.0)
    (tmp_path / "bad.toml").write_text("[cam_0]\nname = 'a'\nmatrix = [[1, 0, 0], [0, 1, 0], [0, 0, 1]]\n")
    with pytest.raises(prepare_mouse.InputError, match=r"bad.toml: not a calibration .*'rotation'"):
        prepare_mouse.read_calibration(tmp_path / "bad.toml")


def test_the_labs_masks_are_used(capture, tmp_path):
    """Masks from a folder (the truth, as PNG frame folders) instead of the background model: the centre is
    then the true masks' triangulation (to 1.5 mm) and the crops' alpha follows them (IoU >= 0.85)."""
    root, truth = capture
    for name, t in truth.items():
        for c, m in zip(mm_cameras(), t["masks"]):
            (tmp_path / "masks" / name / c["name"]).mkdir(parents=True)
            for i, frame in enumerate(m):
                Image.fromarray(frame.astype(np.uint8) * 255).save(tmp_path / "masks" / name / c["name"] / f"{i}.png")
    out = tmp_path / "prepared"
    counts = prepare_mouse.main(load_config(prepare_mouse.Config, [
        f"--calibration={root / 'calibration.json'}", f"--videos={root / 'videos'}", f"--masks={tmp_path / 'masks'}",
        f"--out_dir={out}", "--image_size=32", "--morph_px=0", "--split_by=time", "--block_frames=3",
        "--val_fraction=0.5"]))
    assert counts["written"] >= 9 and counts["skipped_few_clean_masks"] >= 1
    blocks = [{(p.name[:7], int(p.name[-6:]) // 3) for p in read_list_file(out / f"data_{s}.txt")}
              for s in ("train", "val")]
    assert blocks[0] and blocks[1] and not blocks[0] & blocks[1]  # split by time block
    for d in read_list_file(out / "data_train.txt") + read_list_file(out / "data_val.txt"):
        tr = json.loads((d / "transform.json").read_text())
        t = truth[tr["session"]]
        centroids = np.stack([np.argwhere(m[tr["frame"]]).mean(0)[::-1] for m in t["masks"]])  # (V, 2)
        assert np.linalg.norm(np.array(tr["centre_mm"]) - dlt(t["cams"], centroids)) < 1.5


def test_bad_calibrations_are_refused_in_one_line(capture, tmp_path):
    root, _ = capture
    cal = json.loads((root / "calibration.json").read_text())
    cal["cameras"][2]["R"] = (np.array(cal["cameras"][2]["R"]) @ np.diag([1.0, 1, -1])).tolist()  # mirrored
    (tmp_path / "mirror.json").write_text(json.dumps(cal))
    res = subprocess.run([sys.executable, str(REPO / "prepare_mouse.py"), f"--calibration={tmp_path / 'mirror.json'}",
                          f"--videos={root / 'videos'}", f"--out_dir={tmp_path / 'o'}", "--image_size=32"],
                         capture_output=True, text=True, timeout=120)
    line = res.stderr.strip()
    assert res.returncode == 2 and "\n" not in line and "mirror.json: camera 'cam2': R is not a rotation" in line
    cfg = [f"--calibration={root / 'calibration.json'}", f"--videos={root / 'videos'}",
           f"--out_dir={tmp_path / 'o'}", "--image_size=32"]
    with pytest.raises(prepare_mouse.InputError, match=r"calibration.json \(cameras in the order .*camera 1 "
                                                       r"looks like rig view 4"):
        prepare_mouse.main(load_config(prepare_mouse.Config, cfg + ["--cameras=cam0,cam4,cam2,cam3,cam1,cam5"]))
    with pytest.raises(prepare_mouse.InputError, match="elevation|direction"):
        prepare_mouse.main(load_config(prepare_mouse.Config, cfg + ["--up=+x"]))
    import shutil

    import imageio.v2 as imageio
    shutil.copytree(root / "videos" / "m1_day1", tmp_path / "short")
    frames = list(imageio.get_reader(root / "videos" / "m1_day1" / "cam5.mp4", "ffmpeg").iter_data())[:3]
    imageio.mimwrite(tmp_path / "short" / "cam5.mp4", frames, fps=10, codec="libx264", macro_block_size=16)
    with pytest.raises(prepare_mouse.InputError, match=r"session short: the cameras' frame counts differ: .*"
                                                       r"cam5.mp4': 3"):
        prepare_mouse.main(load_config(prepare_mouse.Config, cfg[:1] + [f"--videos={tmp_path / 'short'}"] + cfg[2:]))


def test_phases_1_and_3_train_on_the_samples(prepared, tiny_cfg, tmp_path):
    import train_gslrm
    import train_mvdiff
    out, _ = prepared
    train_mvdiff.main(tiny_cfg(train_mvdiff, out, tmp_path / "mv", val_samples=1))
    assert (tmp_path / "mv" / "checkpoint-4" / "unet").is_dir()
    train_gslrm.main(tiny_cfg(train_gslrm, out, tmp_path / "gs", num_input_views=4, num_novel_views=2,
                              val_samples=1))
    assert (tmp_path / "gs" / "checkpoint-6" / "model.safetensors").is_file()


if __name__ == "__main__":
    write_capture(Path(sys.argv[1]))
    print(f"wrote a synthetic capture to {sys.argv[1]}: calibration.json, videos/<session>/cam<i>.mp4")
