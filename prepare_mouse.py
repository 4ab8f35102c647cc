"""Phase 0: a calibrated rig's synchronized videos -> FaceLift-layout samples that every mouse phase reads.

    python prepare_mouse.py --calibration=capture/new_cam.pkl --videos=capture/videos_undist \\
        --masks=capture/simpleclick_undist --out_dir=data/mouse          # MAMMAL's layout, the lab's masks
    python prepare_mouse.py --calibration=calibration.toml --videos=sessions --out_dir=data/mouse \\
        --cameras=A,B,C,D,E,F --split_by=animal                          # Anipose, background-model masks

Calibration: a plain json ({"units": "mm", "cameras": [{"name", "K", "dist", "R", "t", "size": [w, h]}]},
R and t world -> camera as OpenCV's, R a 3x3 matrix or a Rodrigues vector), Anipose's calibration.toml or
MAMMAL's new_cam.pkl (per camera K, R, T in mm). `videos`: one video (`<camera>.mp4`) or frame folder
(`<camera>/`) per calibration camera, or sub-folders of those, one per session (`<animal>_<rest>`);
`masks` (optional) mirrors it. Per frame: a mask per view (the lab's, or |frame - per-camera median
background| > bg_threshold, opened, closed, largest blob), the mouse's 3D centre triangulated from the mask
centroids, then per view a square crop centred on that point's projection, undistorted and resampled in one
remap, with the principal point moved with the crop. The world: the cameras' centroid at the origin, scaled
so that the mean camera distance is 2.7, z up, OpenCV axes (FaceLift's space), then shifted so that the mouse
stands where the rig's cameras aim; transform.json maps it to and from the calibration's millimetres.
Output: <out_dir>/<session>_<frame>/{opencv_cameras.json, transform.json, images/cam_000.png ...} (RGBA,
alpha = the mask), data_train.txt / data_val.txt split by animal, session or time block, rig.json, and
prepare.json (the counts, with the frames skipped and why). A rerun skips the samples that exist.
"""
import json
import math
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tomllib
import torch
from PIL import Image
from scipy import ndimage
from tqdm import tqdm

from cameras import camera_geometry, load_rig, meeting_point, rig_from_cameras, rig_mismatch, write_cameras
from plumbing import InputError, atomic_dir, cli

VIDEO_EXTS = (".mp4", ".avi", ".mov", ".mkv", ".webm")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
TO_MM = {"mm": 1.0, "cm": 10.0, "m": 1000.0}


@dataclass
class Config:
    calibration: str = ""  # plain .json, Anipose calibration.toml or MAMMAL new_cam.pkl
    units: str = "mm"  # of the calibration's translations when the file does not say (mm | cm | m)
    videos: str = ""  # one video or frame folder per camera (or session sub-folders of those)
    masks: str = ""  # the lab's masks, laid out as `videos`; "" = a per-camera background model
    cameras: str = ""  # calibration camera names in rig order, comma-separated; "" = the file's order
    out_dir: str = "data/mouse"
    rig: str = "mouse_6view"  # the samples must match it (order, aim point, focal); "" = no rig
    image_size: int = 512  # square crops of this size
    crop_focal: float = 0.0  # crop fx / image_size; 0 = the rig's fx / w
    up: str = "+z"  # the calibration world's up axis: +x -x +y -y +z -z | auto (the cameras' mean image-up)
    frame_step: int = 1  # every n-th frame
    max_frames: int = 0  # per session, 0 = all
    bg_frames: int = 50  # frames (evenly spread) in each camera's median background
    bg_threshold: float = 0.12  # foreground: differs from the background by more (max over RGB, 0..1)
    morph_px: int = 2  # radius of the mask's opening and closing, in source pixels
    min_area: float = 0.001  # a clean mask covers this share of the frame or more...
    max_area: float = 0.3  # ...and this or less, one blob holds 80 % of it, away from the frame's edge
    min_views: int = 0  # frames with clean masks in fewer views are skipped; 0 = all views
    max_reproj: float = 0.5  # ...also when a mask centroid is off the triangulated centre by more (x blob size)
    split_by: str = "session"  # animal | session | time (blocks of block_frames within each session)
    block_frames: int = 300
    val_fraction: float = 0.1  # of the animals / sessions / blocks, drawn with seed
    seed: int = 0


# ----------------------------------------------------------------------------------------------
# Calibrations -> per camera {name, K (3, 3), dist (5,), R (3, 3), t (3,) mm, size (w, h) or None}

def rodrigues(r):
    """Rotation vector (3,) -> matrix (3, 3)."""
    r = np.asarray(r, dtype=np.float64).reshape(3)  # (3,)
    th = np.linalg.norm(r)
    if th < 1e-12:
        return np.eye(3)
    k = r / th
    Kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + math.sin(th) * Kx + (1 - math.cos(th)) * Kx @ Kx


def camera(path, name, K, dist, R, t, size, to_mm):
    """One checked camera: K with fx, fy > 0, a proper rotation (det +1), dist k1 k2 p1 p2 [k3]."""
    where = f"{path}: camera {name!r}"
    try:
        K, t = np.asarray(K, dtype=np.float64), np.asarray(t, dtype=np.float64).reshape(-1)  # (3, 3), (3,)
        R = np.asarray(R, dtype=np.float64)
        R = rodrigues(R) if R.size == 3 else R.reshape(3, 3)  # (3, 3)
        dist = np.asarray([] if dist is None else dist, dtype=np.float64).reshape(-1)  # (D,)
    except (TypeError, ValueError) as err:
        raise InputError(f"{where}: K, R, t must be numbers ({err})") from None
    if K.shape != (3, 3) or t.shape != (3,) or not (np.isfinite(K).all() and np.isfinite(R).all()):
        raise InputError(f"{where}: expected K 3x3, R 3x3 (or a Rodrigues 3-vector), t 3, got K {K.shape}, "
                         f"t {t.shape}")
    if not (K[0, 0] > 0 and K[1, 1] > 0):
        raise InputError(f"{where}: K needs fx, fy > 0, got {K.tolist()}")
    if np.abs(R @ R.T - np.eye(3)).max() > 1e-3 or np.linalg.det(R) < 0:
        raise InputError(f"{where}: R is not a rotation (orthonormal, det +1; det {np.linalg.det(R):+.3f}: "
                         "a mirrored or non-OpenCV camera)")
    if len(dist) > 5 and np.abs(dist[5:]).max() > 0:
        raise InputError(f"{where}: distortion {dist.tolist()}: only k1 k2 p1 p2 k3 are supported")
    dist = np.pad(dist[:5], (0, 5 - min(len(dist), 5)))  # (5,)
    return {"name": str(name), "K": K, "dist": dist, "R": R, "t": t * to_mm,
            "size": None if size is None else tuple(int(v) for v in size)}


def read_calibration(path, units="mm"):
    """The cameras of a plain json, Anipose calibration.toml or MAMMAL new_cam.pkl, in the file's order."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"calibration {path} not found")
    if units not in TO_MM:
        raise InputError(f"--units={units}: expected one of {list(TO_MM)}")
    try:
        if path.suffix == ".toml":  # Anipose: [cam_0] name, size, matrix, distortions, rotation (Rodrigues)
            doc = tomllib.loads(path.read_text())
            secs = [(k, v) for k, v in doc.items() if isinstance(v, dict) and "matrix" in v]
            return [camera(path, v.get("name", k), v["matrix"], v.get("distortions"), v["rotation"],
                           v["translation"], v.get("size"), TO_MM[units]) for k, v in secs]
        if path.suffix == ".pkl":  # MAMMAL: {0: {K, R, T (3, 1) mm}, ...} (or a list), undistorted videos
            with open(path, "rb") as f:
                doc = pickle.load(f)  # a file the lab trusts: pickle can run code
            items = doc.items() if isinstance(doc, dict) else enumerate(doc)
            return [camera(path, k, v["K"], v.get("dist", v.get("D")), v["R"], v["T"], v.get("size"), 1.0)
                    for k, v in items]
        doc = json.loads(path.read_text())
        cams = doc["cameras"] if isinstance(doc, dict) else doc
        return [camera(path, c.get("name", i), c["K"], c.get("dist"), c["R"], c["t"], c.get("size"),
                       TO_MM[c.get("units", doc.get("units", units) if isinstance(doc, dict) else units)])
                for i, c in enumerate(cams)]
    except (KeyError, TypeError, AttributeError) as err:
        raise InputError(f"{path}: not a calibration this script reads (missing or bad {err}); see the "
                         "module docstring for the three formats") from None
    except (OSError, ValueError, tomllib.TOMLDecodeError, pickle.UnpicklingError, EOFError) as err:
        raise InputError(f"{path}: cannot read calibration ({err})") from None


def pick_cameras(cams, names, path):
    """The calibration's cameras in rig order (`names`: comma-separated names or indices)."""
    if not names:
        return cams
    by_name = {c["name"]: c for c in cams}
    out = []
    for n in names.split(","):
        n = n.strip()
        if n not in by_name and not (n.isdigit() and int(n) < len(cams)):
            raise InputError(f"--cameras={names}: {path} has no camera {n!r} (it has {list(by_name)})")
        out.append(by_name.get(n) or cams[int(n)])
    return out


# ----------------------------------------------------------------------------------------------
# Lens and world geometry

def distort(x, y, k):
    """Normalised pinhole coordinates -> distorted ones (OpenCV's k1 k2 p1 p2 k3)."""
    k1, k2, p1, p2, k3 = k
    r2 = x * x + y * y
    radial = 1 + r2 * (k1 + r2 * (k2 + r2 * k3))
    return x * radial + 2 * p1 * x * y + p2 * (r2 + 2 * x * x), y * radial + p1 * (r2 + 2 * y * y) + 2 * p2 * x * y


def undistort(xd, yd, k, iters=20):
    """The inverse of distort, by fixed-point iteration (OpenCV's undistortPoints does the same)."""
    x, y = xd, yd
    for _ in range(iters):
        dx, dy = distort(x, y, k)
        x, y = x + (xd - dx), y + (yd - dy)
    return x, y


def up_rotation(up, cams):
    """The rotation (3, 3) that turns the calibration world's up axis into +z (the least rotation)."""
    axes = {f"{s}{a}": np.eye(3)[i] * (1 if s == "+" else -1) for i, a in enumerate("xyz") for s in "+-"}
    if up == "auto":  # a camera's image-up is -y; around a ring their horizontal parts cancel
        u = -np.mean([c["R"][1] for c in cams], 0)
    elif up in axes:
        u = axes[up]
    else:
        raise InputError(f"--up={up}: expected one of {list(axes)} or auto")
    u = u / np.linalg.norm(u)
    v, c = np.cross(u, [0, 0, 1.0]), u[2]
    if np.linalg.norm(v) < 1e-9:
        return np.eye(3) if c > 0 else np.diag([1.0, -1, -1])
    vx = np.array([[0, -v[2], v[1]], [v[2], 0, -v[0]], [-v[1], v[0], 0]])
    return np.eye(3) + vx + vx @ vx / (1 + c)


def normalisation(cams, up, aim):
    """mm -> FaceLift's space (x_n = s U (x - centroid)): s, U, the centroid, and the aim point (the rig's,
    or None: the calibration's own meeting point of the optical axes in that space)."""
    U = up_rotation(up, cams)
    C = np.stack([-c["R"].T @ c["t"] for c in cams])  # (V, 3) camera centres, mm
    centroid = C.mean(0)
    s = 2.7 / np.linalg.norm(C - centroid, axis=1).mean()
    if aim is None:
        axes = np.stack([U @ c["R"][2] for c in cams])  # (V, 3)
        m = meeting_point(torch.tensor(s * (C - centroid) @ U.T), torch.tensor(axes))
        aim = np.zeros(3) if m is None else m.numpy()
    return s, U, centroid, np.asarray(aim, dtype=np.float64)


def to_normalised(norm, p_mm):
    """The frame's similarity (4, 4) mm -> normalised: the world normalised, then shifted so that the
    mouse's centre p_mm stands at the aim point."""
    s, U, _, aim = norm
    A = np.eye(4)
    A[:3, :3] = s * U
    A[:3, 3] = aim - s * U @ p_mm
    return A


def w2c_normalised(cam, A):
    """A camera's w2c (4, 4) in the world x_n = A x_mm (distances scale by s, so does t)."""
    s, SU = np.cbrt(np.linalg.det(A[:3, :3])), A[:3, :3]
    RUt = cam["R"] @ (SU / s).T  # (3, 3)
    w2c = np.eye(4)
    w2c[:3, :3], w2c[:3, 3] = RUt, s * cam["t"] - RUt @ A[:3, 3]
    return w2c


def triangulate(cams, uv, views):
    """DLT over `views`: the mm point whose projections best fit the distorted pixel points uv (V, 2)."""
    rows = []
    for v in views:
        c = cams[v]
        K = c["K"]
        yn = (uv[v, 1] - K[1, 2]) / K[1, 1]
        xn = (uv[v, 0] - K[0, 2] - K[0, 1] * yn) / K[0, 0]
        x, y = undistort(xn, yn, c["dist"])
        P = np.concatenate([c["R"], c["t"][:, None]], 1)  # (3, 4)
        rows += [x * P[2] - P[0], y * P[2] - P[1]]
    A = np.stack(rows)  # (2V, 4)
    A = A / np.linalg.norm(A, axis=1, keepdims=True)  # equal weight per equation
    X = np.linalg.svd(A)[2][-1]  # (4,) homogeneous
    return X[:3] / X[3]


def project(cam, p_mm):
    """A mm point -> distorted pixel coordinates (2,) (OpenCV's: integer = a pixel's centre) and depth."""
    pc = cam["R"] @ p_mm + cam["t"]
    x, y = distort(pc[0] / pc[2], pc[1] / pc[2], cam["dist"])
    K = cam["K"]
    return np.array([K[0, 0] * x + K[0, 1] * y + K[0, 2], K[1, 1] * y + K[1, 2]]), pc[2]


# ----------------------------------------------------------------------------------------------
# Frames, masks and crops

def sources(folder, cams, what):
    """Per camera: ('video', path) or ('images', sorted paths), named after the camera."""
    out = []
    for c in cams:
        found = [folder / f"{c['name']}{e}" for e in VIDEO_EXTS if (folder / f"{c['name']}{e}").is_file()]
        if found:
            out.append(("video", found[0]))
        elif (folder / c["name"]).is_dir():
            paths = [p for p in (folder / c["name"]).iterdir() if p.suffix.lower() in IMAGE_EXTS]
            num = lambda p: int("".join(ch for ch in p.stem if ch.isdigit()) or -1)  # noqa: E731
            out.append(("images", sorted(paths, key=lambda p: (num(p), p.name))))
        else:
            raise FileNotFoundError(f"{folder}: no {what} for camera {c['name']!r} ({c['name']}.mp4 or a "
                                    f"folder {c['name']}/ of images)")
    return out


def frames(src):
    """The frames of a source as (H, W, 3) uint8, in order."""
    kind, p = src
    if kind == "images":
        for f in p:
            try:
                with Image.open(f) as im:
                    yield np.asarray(im.convert("RGB"))
            except (OSError, SyntaxError) as err:
                raise InputError(f"{f}: cannot read image ({err})") from None
        return
    import imageio.v2 as imageio
    try:
        with imageio.get_reader(p, "ffmpeg") as reader:
            for im in reader:
                yield np.asarray(im)[..., :3]
    except (OSError, RuntimeError) as err:
        raise InputError(f"{p}: cannot read video ({err})") from None


def where(src):
    """A source's name in messages: the video, or the frame folder."""
    return src[1] if src[0] == "video" else src[1][0].parent if src[1] else "(empty folder)"


def count(src):
    kind, p = src
    if kind == "images":
        return len(p)
    import imageio.v2 as imageio
    try:
        with imageio.get_reader(p, "ffmpeg") as reader:
            return reader.count_frames()
    except (OSError, RuntimeError) as err:
        raise InputError(f"{p}: cannot read video ({err})") from None


def background(src, n, k):
    """The per-pixel median (H, W, 3) float of k frames spread over the n frames of a camera."""
    pick = set(np.linspace(0, n - 1, min(k, n)).round().astype(int).tolist())
    return np.median(np.stack([f for i, f in enumerate(frames(src)) if i in pick]), 0) / 255.0  # (k, H, W, 3)


def clean_mask(fg, cfg):
    """A foreground (H, W) bool -> (mask, clean): opened, closed, its largest blob; clean when that blob
    holds 80 % of the foreground, covers min_area..max_area of the frame and stays off the frame's edge."""
    if cfg.morph_px > 0:
        disk = np.hypot(*np.mgrid[-cfg.morph_px:cfg.morph_px + 1, -cfg.morph_px:cfg.morph_px + 1]) <= cfg.morph_px
        fg = ndimage.binary_closing(ndimage.binary_opening(fg, disk), disk)
    lab, n = ndimage.label(fg)
    if n == 0:
        return fg, False
    sizes = np.bincount(lab.ravel())[1:]  # (n,)
    mask = lab == 1 + sizes.argmax()
    area = sizes.max() / fg.size
    edge = mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any()
    return mask, bool(sizes.max() >= 0.8 * sizes.sum() and cfg.min_area <= area <= cfg.max_area and not edge)


def bilinear(img, u, v):
    """img (H, W, C) sampled at pixel coordinates u, v (OpenCV's: integer = a pixel's centre) -> (..., C),
    and where the sample lies inside the image."""
    H, W = img.shape[:2]
    inside = (u >= -0.5) & (u <= W - 0.5) & (v >= -0.5) & (v <= H - 0.5)
    u, v = np.clip(u, 0, W - 1), np.clip(v, 0, H - 1)
    u0, v0 = np.minimum(u.astype(int), W - 2), np.minimum(v.astype(int), H - 2)
    a, b = (u - u0)[..., None], (v - v0)[..., None]
    out = (img[v0, u0] * (1 - a) * (1 - b) + img[v0, u0 + 1] * a * (1 - b)
           + img[v0 + 1, u0] * (1 - a) * b + img[v0 + 1, u0 + 1] * a * b)
    return out, inside


def crop(image, mask, cam, p_mm, S, focal):
    """A square S x S crop whose centre shows the point p_mm, undistorted and resampled in one remap
    (supersampled, then averaged): RGBA (S, S, 4) in [0, 1] (outside the frame: white, alpha 0) and its
    pinhole intrinsics fx, fy, cx, cy (our convention: rays through pixel centres x + 0.5)."""
    K = cam["K"]
    pc = cam["R"] @ p_mm + cam["t"]
    fx = focal * S
    fy = fx * K[1, 1] / K[0, 0]
    cx, cy = S / 2 - fx * pc[0] / pc[2], S / 2 - fy * pc[1] / pc[2]  # the principal point moves with the crop
    ss = int(np.clip(round(K[0, 0] / fx), 1, 4))  # source pixels per output pixel, to average over
    g = (np.arange(S * ss) + 0.5) / ss  # (S ss,) sample positions in output pixels
    xd, yd = distort(((g - cx) / fx)[None, :], ((g - cy) / fy)[:, None], cam["dist"])  # (S ss, S ss) each
    u, v = K[0, 0] * xd + K[0, 1] * yd + K[0, 2], K[1, 1] * yd + K[1, 2]
    both = np.concatenate([image.astype(np.float32) / 255.0, mask[..., None].astype(np.float32)], -1)  # (H, W, 4)
    rgba, inside = bilinear(both, u, v)  # (S ss, S ss, 4)
    rgba = np.where(inside[..., None], rgba, [1.0, 1.0, 1.0, 0.0])
    rgba = rgba.reshape(S, ss, S, ss, 4).mean((1, 3))  # (S, S, 4)
    return rgba, (fx, fy, cx, cy)


# ----------------------------------------------------------------------------------------------
# Sessions and splits

def sessions(videos, masks, cams):
    """[(name, video sources, mask sources or None)]: `videos` itself, or each of its sub-folders."""
    videos = Path(videos)
    if not videos.is_dir():
        raise FileNotFoundError(f"--videos={videos}: not a folder")
    direct = any((videos / f"{cams[0]['name']}{e}").is_file() for e in VIDEO_EXTS) or (
        videos / cams[0]["name"]).is_dir()
    folders = [videos] if direct else sorted(p for p in videos.iterdir() if p.is_dir())
    if not folders:
        raise FileNotFoundError(f"--videos={videos}: no camera videos or session folders")
    out = []
    for f in folders:
        m = None if not masks else (Path(masks) if direct else Path(masks) / f.name)
        out.append((f.name, sources(f, cams, "video"), m and sources(m, cams, "masks")))
    return out


def split_unit(split_by, session, frame, block_frames):
    if split_by == "animal":
        return session.split("_")[0]
    if split_by == "session":
        return session
    if split_by == "time":
        return f"{session}/{frame // block_frames}"
    raise InputError(f"--split_by={split_by}: expected animal | session | time")


def val_units(units, fraction, seed):
    """The units (animals, sessions or blocks) whose samples go to data_val.txt (at least one of two)."""
    units = sorted(set(units))
    k = min(len(units) - 1, max(1 if len(units) > 1 else 0, round(fraction * len(units))))
    return set(np.random.default_rng(seed).permutation(units)[:k].tolist())


# ----------------------------------------------------------------------------------------------

def main(cfg):
    if not cfg.calibration or not cfg.videos:
        raise InputError("give --calibration=FILE and --videos=FOLDER (see `python prepare_mouse.py --help`)")
    cams = pick_cameras(read_calibration(cfg.calibration, cfg.units), cfg.cameras, cfg.calibration)
    rig = load_rig(cfg.rig) if cfg.rig else None
    if rig and len(rig["frames"]) != len(cams):
        raise InputError(f"{cfg.calibration}: {len(cams)} cameras, rig {rig['name']!r} has "
                         f"{len(rig['frames'])} views ({rig['views']}): pick them with --cameras")
    focal = cfg.crop_focal or (rig["frames"][0]["fx"] / rig["frames"][0]["w"] if rig else 0)
    if not focal > 0:
        raise InputError("--crop_focal must be > 0 without a rig (FaceLift's: 1.072 = 548.99 / 512)")
    aim = None
    if rig:
        aim = camera_geometry(rig["frames"])["target"].numpy()
    norm = normalisation(cams, cfg.up, aim)
    V, S = len(cams), cfg.image_size
    min_views = cfg.min_views or V
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    todo = sessions(cfg.videos, cfg.masks, cams)

    def sample_frames(p_mm, crops):
        A = to_normalised(norm, p_mm)
        return A, [{"w": S, "h": S, "fx": fx, "fy": fy, "cx": cx, "cy": cy,
                    "w2c": [[round(float(x), 8) for x in row] for row in w2c_normalised(c, A)],
                    "file_path": f"images/cam_{v:03d}.png"} for v, (c, (fx, fy, cx, cy)) in
                   enumerate(zip(cams, crops))]

    # the calibration's own rig: crops centred on its aim point (a mouse standing there); checked against
    # the rig first, so a wrong camera order, up axis or scale stops here with the rig check's message
    p0 = np.linalg.solve(norm[0] * norm[1], norm[3]) + norm[2]  # the aim point in mm
    intr = []
    for c in cams:
        pc = c["R"] @ p0 + c["t"]
        fx = focal * S
        fy = fx * c["K"][1, 1] / c["K"][0, 0]
        intr.append((fx, fy, S / 2 - fx * pc[0] / pc[2], S / 2 - fy * pc[1] / pc[2]))
    own = {"id": f"{Path(cfg.calibration).name}, a mouse at the aim point", "frames": sample_frames(p0, intr)[1]}
    if rig and (msg := rig_mismatch(rig, own["frames"])):
        raise InputError(f"{cfg.calibration} (cameras in the order {[c['name'] for c in cams]}, "
                         f"--up={cfg.up}): {msg}")

    counts = {"frames": 0, "written": 0, "existing": 0, "skipped_few_clean_masks": 0,
              "skipped_masks_disagree": 0, "skipped_off_rig": 0}
    listed = {}  # sample name -> split unit
    for name, vids, msks in todo:
        n = [count(s) for s in vids] + ([count(s) for s in msks] if msks else [])
        if len(set(n)) != 1:
            files = [str(where(s)) for s in vids + (msks or [])]
            raise InputError(f"session {name}: the cameras' frame counts differ: {dict(zip(files, n))}")
        n = n[0] if not cfg.max_frames else min(n[0], cfg.max_frames * cfg.frame_step)
        bgs = None
        streams = [frames(s) for s in vids]
        mstreams = [frames(s) for s in msks] if msks else None
        for i in tqdm(range(n), desc=f"{name} -> {out}"):
            ims = [next(s) for s in streams]
            mks = [next(s) for s in mstreams] if mstreams else None
            if i % cfg.frame_step:
                continue
            counts["frames"] += 1
            sample = f"{name}_{i:06d}"
            unit = split_unit(cfg.split_by, name, i, cfg.block_frames)
            if (out / sample / "opencv_cameras.json").exists():  # written whole (renamed in): done
                counts["existing"] += 1
                listed[sample] = unit
                continue
            for v, (c, im) in enumerate(zip(cams, ims)):
                if c["size"] is not None and (im.shape[1], im.shape[0]) != c["size"]:
                    raise InputError(f"{where(vids[v])}: frames are {im.shape[1]}x{im.shape[0]}, {cfg.calibration} "
                                     f"says {c['size'][0]}x{c['size'][1]} for camera {c['name']!r}")
                if mks is not None and mks[v].shape[:2] != im.shape[:2]:
                    raise InputError(f"{where(msks[v])}: masks are {mks[v].shape[1]}x{mks[v].shape[0]}, the frames "
                                     f"{im.shape[1]}x{im.shape[0]}")
            if mks is None and bgs is None:
                bgs = [background(s, count(s), cfg.bg_frames) for s in vids]
            fgs = ([m.max(-1) > 127 for m in mks] if mks is not None else
                   [np.abs(im / 255.0 - bg).max(-1) > cfg.bg_threshold for im, bg in zip(ims, bgs)])
            masks, clean = zip(*[clean_mask(fg, cfg) for fg in fgs])
            good = [v for v in range(V) if clean[v]]
            if len(good) < max(2, min_views):
                counts["skipped_few_clean_masks"] += 1
                continue
            uv = np.zeros((V, 2))  # mask centroids (x, y) of the clean views
            uv[good] = [np.argwhere(masks[v]).mean(0)[::-1] for v in good]
            p = triangulate(cams, uv, good)
            reproj = [np.linalg.norm(project(cams[v], p)[0] - uv[v]) / math.sqrt(masks[v].sum()) for v in good]
            if max(reproj) > cfg.max_reproj or min(project(c, p)[1] for c in cams) <= 0:
                counts["skipped_masks_disagree"] += 1
                continue
            rgbas, intr = zip(*[crop(im, m, c, p, S, focal) for im, m, c in zip(ims, masks, cams)])
            A, frs = sample_frames(p, intr)
            if rig and rig_mismatch(rig, frs):  # the mouse so far from the aim point that views differ
                counts["skipped_off_rig"] += 1
                continue
            with atomic_dir(out / sample, marker=False) as tmp:
                (tmp / "images").mkdir()
                for fr, rgba in zip(frs, rgbas):
                    Image.fromarray((rgba * 255 + 0.5).astype(np.uint8), "RGBA").save(tmp / fr["file_path"])
                (tmp / "transform.json").write_text(json.dumps({
                    "to_normalised": A.round(10).tolist(), "to_mm": np.linalg.inv(A).round(10).tolist(),
                    "centre_mm": p.round(4).tolist(), "scale": float(np.cbrt(np.linalg.det(A[:3, :3]))),
                    "calibration": str(cfg.calibration), "session": name, "frame": i}, indent=1))
                write_cameras(tmp / "opencv_cameras.json", {"id": sample, "rig": rig["name"] if rig else "",
                                                            "frames": frs})
            counts["written"] += 1
            listed[sample] = unit
    if not listed:
        raise InputError(f"no frame of {cfg.videos} gave a sample: {counts} (see --bg_threshold, --min_views, "
                         "--masks)")
    val = val_units(listed.values(), cfg.val_fraction, cfg.seed)
    for split, keep in (("train", False), ("val", True)):
        (out / f"data_{split}.txt").write_text("".join(f"{s}\n" for s, u in sorted(listed.items())
                                                       if (u in val) == keep))
    made = rig_from_cameras(own, out.name, prompt_embeds=rig["prompt_embeds"] if rig else "",
                            description=f"made by prepare_mouse.py from {own['id']}")
    made["views"] = rig["views"] if rig else [c["name"] for c in cams]
    (out / "rig.json").write_text(json.dumps(made, indent=1))
    counts.update(train=sum(u not in val for u in listed.values()), val=sum(u in val for u in listed.values()),
                  val_units=sorted(val), split_by=cfg.split_by)
    (out / "prepare.json").write_text(json.dumps(counts, indent=1))
    print(f"{out}: {counts}")
    return counts


if __name__ == "__main__":
    cli(main, Config)
