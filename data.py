"""Data on disk: multi-view samples, dance clips and music features, and outputs (grids, PLY, videos).
Cameras, rigs and prompt embeddings are in cameras.py (their command line is here), run machinery in
plumbing.py, checkpoint readers in weights.py, the built-in toy datasets in toy.py.

    python data.py rig_from_cameras SAMPLE/opencv_cameras.json --name=my_rig --out=configs/rigs/my_rig.json
    python data.py rig_prompt_embeds --rig=my_rig --text_encoder=SD21/text_encoder --out=my_rig_clr_embeds.pt
    python data.py make_rigs      # (re)write the built-in rigs into configs/rigs/
"""
import itertools
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from cameras import (
    BUILTIN_RIGS,
    RIGS_DIR,
    clip_prompt_embeds,
    frames_to_tensors,
    load_rig,
    make_rig,
    read_cameras,
    rig_from_cameras,
    rig_mismatch,
    rig_view_prompts,
    save_prompt_embeds,
)
from models import SH_C0
from plumbing import InputError, cli

# ----------------------------------------------------------------------------------------------
# Multi-view samples (FaceLift format)

def rig_sample_frames(d, rig):
    """A sample's camera frames, checked against the rig (its first V frames), or the rig's own for a
    camera-less sample (cam_000.png ...)."""
    cam_file = Path(d) / "opencv_cameras.json"
    if not cam_file.exists():
        return [dict(fr, file_path=f"cam_{i:03d}.png") for i, fr in enumerate(rig["frames"])]
    frames = read_cameras(cam_file)["frames"]
    msg = rig_mismatch(rig, frames[: len(rig["frames"])])
    if msg:
        raise InputError(f"{cam_file}: {msg}")
    return frames


def read_list_file(list_file):
    """One sample directory per line; relative paths resolve against the list file's folder."""
    list_file = Path(list_file)
    if not list_file.exists():
        raise FileNotFoundError(f"list file {list_file} does not exist")
    lines = [ln.strip() for ln in list_file.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    return [list_file.parent / ln for ln in lines]  # an absolute ln stays itself


def load_rgba(path, size=None, bg=1.0, wh=None, rgb_ok=True):
    """RGBA (or RGB, alpha = 1) PNG -> (4, S, S) in [0, 1]: RGB composited on `bg`, alpha kept; resized to
    `size`. wh: the (w, h) its camera frame's intrinsics are in pixels of, which the image must have.
    rgb_ok=False refuses RGB: training composites samples on random backgrounds by their alpha, and
    without one it would learn the arena."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: image missing")
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode not in ("RGBA", "RGB"):
                raise InputError(f"mode {im.mode}, expected RGBA or RGB")
            if im.mode == "RGB" and not rgb_ok:
                raise InputError("RGB without alpha: write RGBA with the animal's mask (prepare_mouse.py does), "
                                 "or set --rgb_ok=true if every background is already clean white")
            x = torch.from_numpy(np.asarray(im.convert("RGBA"), dtype=np.float32) / 255.0)  # (H, W, 4)
    except (OSError, ValueError, SyntaxError) as err:
        raise InputError(f"{path}: cannot read image ({err})") from None
    if x.shape[0] != x.shape[1]:
        raise InputError(f"{path}: image is {x.shape[1]}x{x.shape[0]}, expected a square image")
    if wh is not None and tuple(wh) != (x.shape[1], x.shape[0]):
        raise InputError(f"{path}: image is {x.shape[1]}x{x.shape[0]}, its camera frame says {wh[0]}x{wh[1]} "
                         "(intrinsics are in pixels of w x h): resize the image or scale the frame")
    x = x.permute(2, 0, 1)  # (4, H, W)
    x = torch.cat([x[:3] * x[3:] + bg * (1 - x[3:]), x[3:]])
    if size is not None and size != x.shape[-1]:
        x = F.interpolate(x[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
    return x


# decoded views kept in memory, up to this many bytes per dataset: a toy set fits whole (decoding
# and resizing its PNGs cost more than the rest of its data path), a real one at 512 px does not
CACHE_BYTES = 2**30


class MultiViewDataset(torch.utils.data.Dataset):
    """FaceLift's two sample layouts (docs/formats.md): inputs from the pool `input_views` (None: all
    frames; `num_inputs` of them drawn per (seed, epoch, index), None: all, in order), then
    `num_target_views` others drawn likewise (-1: all, at least one). With a `rig`, the pool must match it.
    RGB images without alpha are refused unless rgb_ok (load_rgba)."""

    def __init__(self, list_file, image_size, input_views=(0, 1, 2, 3, 4, 5), num_target_views=0,
                 rig=None, seed=0, num_inputs=None, rgb_ok=False):
        self.samples = read_list_file(list_file)
        if not self.samples:
            raise InputError(f"{list_file}: no samples listed")
        if missing := [d for d in self.samples if not d.is_dir()]:  # e.g. another machine's absolute paths
            raise FileNotFoundError(f"sample folder {missing[0]} does not exist (listed in {list_file}; "
                                    f"{len(missing)} of {len(self.samples)} listed folders are missing)")
        self.size, self.num_target, self.num_inputs = image_size, num_target_views, num_inputs
        self.pool = None if input_views is None else list(input_views)
        self.rig, self.seed, self.rgb_ok = rig, seed, rgb_ok
        self.frames, self.views, self.cached_bytes = {}, {}, 0  # per sample dir / image path

    def __len__(self):
        return len(self.samples)

    def read_frames(self, d):
        cam_file = d / "opencv_cameras.json"
        if cam_file.exists():
            frames = read_cameras(cam_file)["frames"]
            missing = [i for i, fr in enumerate(frames) if "file_path" not in fr]
            if missing:
                raise InputError(f"{cam_file}: frames {missing} lack 'file_path'")
            return frames, cam_file
        if self.rig is None:
            raise FileNotFoundError(f"{cam_file} missing (a sample without cameras needs a rig)")
        return [dict(fr, file_path=f"cam_{i:03d}.png") for i, fr in enumerate(self.rig["frames"])], None

    def check_view_count(self, d, n, pool, k, n_target):
        """Sample `d` has n views: enough for k inputs from `pool` and n_target others (all the others,
        at least one, for num_target_views=-1: a validation with no held-out view would render nothing)."""
        has = f"{d}: has {n} views, needs"
        if k > len(pool):
            raise InputError(f"{has} {k} input views from {len(pool)} allowed ({pool}): "
                             f"lower --num_input_views to at most {len(pool)}")
        if max(pool) >= n:
            raise InputError(f"{has} the input views {pool}: use samples with all of them (or another rig)")
        if self.num_target < 0 and n_target < 1:
            raise InputError(f"{has} {k} input views + at least 1 held out for validation ({k + 1}): lower "
                             f"--num_input_views to at most {n - 1}, or use samples with more views")
        if n < k + n_target:
            raise InputError(f"{has} {k} input views + {n_target} novel views ({k + n_target}): lower "
                             f"--num_novel_views to at most {max(0, n - k)} (or --num_input_views), "
                             "or use samples with more views")

    def load_view(self, path, wh):
        x = self.views.get(path)
        if x is None:
            x = load_rgba(path, self.size, wh=wh, rgb_ok=self.rgb_ok)
            if self.cached_bytes + x.nbytes <= CACHE_BYTES:
                self.views[path], self.cached_bytes = x, self.cached_bytes + x.nbytes
        return x

    def __getitem__(self, key):
        idx, epoch = key if isinstance(key, tuple) else (key, 0)  # StepSampler passes (index, epoch)
        d = self.samples[idx]
        frames, cam_file = self.frames.get(d) or self.read_frames(d)
        pool = list(range(len(frames))) if self.pool is None else self.pool
        k = len(pool) if self.num_inputs is None else self.num_inputs
        n_target = len(frames) - k if self.num_target < 0 else self.num_target
        if d not in self.frames:  # read and checked once per sample
            self.check_view_count(d, len(frames), pool, k, n_target)
            if self.rig is not None and cam_file is not None:
                msg = rig_mismatch(self.rig, [frames[i] for i in pool])
                if msg:
                    raise InputError(f"{cam_file}: {msg}")
            self.frames[d] = frames, cam_file
        rng = np.random.default_rng((self.seed, epoch, idx))
        inputs = pool if k == len(pool) else [pool[i] for i in sorted(rng.choice(len(pool), k, False))]
        rest = [i for i in range(len(frames)) if i not in inputs]
        views = inputs + [rest[i] for i in rng.choice(len(rest), n_target, replace=False)]
        sel = [frames[i] for i in views]
        wh = [(fr["w"], fr["h"]) if cam_file else None for fr in sel]  # a rig's frames: any size, square
        images = torch.stack([self.load_view(d / fr["file_path"], s) for fr, s in zip(sel, wh)])  # (V, 4, S, S)
        w2c, K = frames_to_tensors(sel, self.size)
        return {"images": images, "w2c": w2c, "c2w": torch.linalg.inv(w2c), "fxfycxcy": K,
                "views": torch.tensor(views), "path": str(d)}


class StepSampler:
    """Batches of (index, epoch), a pure function of the step: global batch `step` is items step*B ..
    (step+1)*B - 1 of endless seeded per-epoch permutations, strided over ranks. Resuming at step s
    draws what an uninterrupted run would have drawn, for any number of processes that divides B."""

    def __init__(self, n, global_batch, rank=0, world=1, seed=0, start_step=0):
        assert global_batch % world == 0, f"global batch {global_batch} must divide by {world} processes"
        self.n, self.B, self.rank, self.world = n, global_batch, rank, world
        self.seed, self.step = seed, start_step

    def batch(self, step):
        items = [divmod(k, self.n) for k in range(step * self.B, (step + 1) * self.B)]  # (epoch, position)
        perms = {e: torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + e))
                 for e in {e for e, _ in items}}
        return [(int(perms[e][i]), e) for e, i in items][self.rank::self.world]

    def __iter__(self):
        while True:
            yield self.batch(self.step)
            self.step += 1



# ----------------------------------------------------------------------------------------------
# Dance clips (layout: docs/formats.md) and music features

DANCE_FPS = 30


HOP = 512  # one audio hop per video frame: SR = fps x HOP (EDGE / FACT)


MUSIC_DIM = 35  # music_features' channels (EDGE's)


VISIBLE = 0.3  # DWPose: score below this = invisible


JOINT_SETS = {"body18": 18, "body_feet24": 24, "all134": 134}  # the first n points of the 134 layout
# the 134 layout's body parts: 0 torso and head (face included), 1 right arm and hand, 2 left arm and hand,
# 3 right leg and foot, 4 left leg and foot; each limb hangs from a torso joint (the neck, a hip)
LIMB_PARTS = {1: ((2, 3, 4, *range(113, 134)), 1), 2: ((5, 6, 7, *range(92, 113)), 1),
              3: ((9, 10, 21, 22, 23), 8), 4: ((12, 13, 18, 19, 20), 11)}


def body_parts(J):
    """The first J joints' body part [J] and the torso joint each hangs from [J] (-1: the torso's own)."""
    part, root = torch.zeros(J, dtype=torch.long), torch.full((J,), -1, dtype=torch.long)
    for p, (joints, r) in LIMB_PARTS.items():
        for j in (j for j in joints if j < J):
            part[j], root[j] = p, r
    return part, root



# OpenPose-18 body, then feet 18-23 (the 134 layout's joints: docs/formats.md, poses.npy)
LIMBS = [(1, 2), (2, 3), (3, 4), (1, 5), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11), (11, 12),
         (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17), (13, 18), (18, 19), (13, 20), (10, 21),
         (21, 22), (10, 23)]


def music_features(audio, sr, fps, n_frames):
    """EDGE's 35-d features at the video rate [n_frames, 35] (docs/formats.md): audio at any rate is
    resampled to SR = fps x HOP (EDGE: librosa.load(path, sr=SR)), so one hop is one frame."""
    import librosa
    y, SR = to_feature_rate(audio, sr, fps), fps * HOP
    env = librosa.onset.onset_strength(y=y, sr=SR, hop_length=HOP)  # (F,), F = 1 + len // HOP
    mfcc = librosa.feature.mfcc(y=y, sr=SR, n_mfcc=20, hop_length=HOP).T  # (F, 20)
    chroma = librosa.feature.chroma_cens(y=y, sr=SR, hop_length=HOP, n_chroma=12).T  # (F, 12)
    peaks = np.zeros_like(env)
    peaks[librosa.onset.onset_detect(onset_envelope=env, sr=SR, hop_length=HOP)] = 1.0
    beats = np.zeros_like(env)
    beats[music_beats(audio, sr, fps, frames=True)] = 1.0
    n = min(len(env), len(mfcc), len(chroma))
    if n < n_frames:
        raise InputError(f"audio gives {n} feature frames, the video has {n_frames}")
    feats = np.concatenate([env[:, None][:n], mfcc[:n], chroma[:n], peaks[:n, None], beats[:n, None]], 1)
    return feats[:n_frames].astype(np.float32)  # the centred STFT gives one extra frame: trim to T


def to_feature_rate(audio, sr, fps):
    """Mono audio resampled (librosa's default, soxr) to SR = fps x HOP: one hop per video frame."""
    import librosa
    if not (np.isfinite(sr) and sr > 0):
        raise InputError(f"sample rate {sr} Hz")
    return librosa.resample(np.asarray(audio, np.float32), orig_sr=sr, target_sr=fps * HOP)


def music_beats(audio, sr, fps, frames=False):
    """Beat times in seconds (frames=True: frame indices at fps) from librosa's beat tracker at
    SR = fps x HOP, started as EDGE does from the clip's tempo estimated on 22050 Hz audio (EDGE's
    lr.beat.tempo(y=lr.load(fpath)[0])[0]; its AIST++ clips take the BPM in their file name)."""
    import librosa
    env = librosa.onset.onset_strength(y=to_feature_rate(audio, sr, fps), sr=fps * HOP, hop_length=HOP)
    start_bpm = librosa.feature.tempo(y=librosa.resample(audio, orig_sr=sr, target_sr=22050), sr=22050)[0]
    beats = librosa.beat.beat_track(onset_envelope=env, sr=fps * HOP, hop_length=HOP, start_bpm=start_bpm,
                                    tightness=100)[1]
    return beats if frames else beats / fps  # frame k is at k x HOP / SR = k / fps seconds


def read_audio(path):
    import soundfile
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: audio missing")
    try:
        audio, sr = soundfile.read(str(path), dtype="float32", always_2d=True)
    except RuntimeError as err:
        raise InputError(f"{path}: cannot read audio ({err})") from None
    return audio.mean(1), sr  # mono


def frame_source(d):
    """('png', paths) for frames/*.png or images/frame_*.png (StableAnimator), else ('video', path)."""
    layouts = (("frames", "*.png", lambda p: p.stem), ("images", "frame_*.png", lambda p: p.stem[6:]))
    for folder, pattern, key in layouts:
        if (d / folder).is_dir() and (paths := list((d / folder).glob(pattern))):
            paths = sorted(paths, key=lambda p: int(key(p)))
            for i, p in enumerate(paths):  # numbered 0, 1, ...: a gap is a missing frame, not fewer frames
                if int(key(p)) != i:
                    raise FileNotFoundError(f"{p.parent}: frame {i} is missing (the frames jump to {p.name})")
            return "png", paths
    for name in ("video.mp4", "video.webm", "video.avi"):
        if (d / name).is_file():
            return "video", d / name
    raise FileNotFoundError(f"{d}: no frames (frames/000000.png..., images/frame_0.png... or video.mp4)")


def read_frame(source, i):
    """Frame i of a clip as (3, H, W) in [0, 1]."""
    kind, src = source
    if kind == "png":
        try:
            with Image.open(src[i]) as im:
                x = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0  # (H, W, 3)
        except (OSError, SyntaxError) as err:
            raise InputError(f"{src[i]}: cannot read image ({err})") from None
    else:
        import imageio.v2 as imageio
        with imageio.get_reader(src, "ffmpeg") as reader:
            x = reader.get_data(i).astype(np.float32) / 255.0
    return torch.from_numpy(x).permute(2, 0, 1)  # (3, H, W)


def count_frames(source):
    kind, src = source
    if kind == "png":
        return len(src)
    import imageio.v2 as imageio
    with imageio.get_reader(src, "ffmpeg") as reader:
        return reader.count_frames()


def read_clip(d, fps=None):
    """A clip folder's metadata, checked, not its pixels: {dir, T, fps, source, boxes, sr}; errors name the file."""
    d = Path(d)
    if not d.is_dir():
        raise FileNotFoundError(f"{d}: clip directory missing")
    for name in ("poses.npy", "faces.json", "meta.json", "audio.wav"):
        if not (d / name).is_file():
            raise FileNotFoundError(f"{d / name}: missing "
                                    "(a clip needs frames, audio.wav, poses.npy, faces.json, meta.json)")
    try:
        clip_fps = float(json.loads((d / "meta.json").read_text())["fps"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise InputError(f"{d / 'meta.json'}: needs {{'fps', 'size', 'source'}} ({err!r})") from None
    if fps is not None and clip_fps != fps:
        raise InputError(f"{d / 'meta.json'}: fps {clip_fps}, the run expects {fps}")
    source = frame_source(d)
    T = count_frames(source)
    poses = np.load(d / "poses.npy", mmap_mode="r")
    if poses.shape != (T, 134, 3):
        raise InputError(f"{d / 'poses.npy'}: shape {poses.shape}, "
                         f"expected ({T}, 134, 3) for {T} frames (DWPose 134 layout)")
    check_finite(poses, d / "poses.npy", "(frame, joint, x/y/score)")
    try:
        boxes = json.loads((d / "faces.json").read_text())["boxes"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise InputError(f"{d / 'faces.json'}: "
                         f"expected {{'boxes': [[x0, y0, x1, y1] or null, ...]}} ({err!r})") from None
    if len(boxes) != T or any(b is not None and len(b) != 4 for b in boxes):
        raise InputError(f"{d / 'faces.json'}: {len(boxes)} boxes for {T} frames "
                         "(one [x0, y0, x1, y1] or null per frame)")
    if all(b is None for b in boxes):
        raise InputError(f"{d / 'faces.json'}: no frame has a face box (the reference frame needs one)")
    import soundfile
    try:
        info = soundfile.info(str(d / "audio.wav"))
    except RuntimeError as err:
        raise InputError(f"{d / 'audio.wav'}: cannot read audio ({err})") from None
    if info.duration < T / clip_fps - 1e-3:
        raise InputError(f"{d / 'audio.wav'}: {info.duration:.3f} s of audio is shorter than the {T} frames "
                         f"({T / clip_fps:.3f} s at {clip_fps:g} fps)")
    feats = d / "music_feats.npy"
    if feats.is_file():
        shape = np.load(feats, mmap_mode="r").shape
        if len(shape) != 2 or shape[0] != T:
            raise InputError(f"{feats}: shape {shape}, expected ({T}, D) for {T} frames")
        check_finite(np.load(feats, mmap_mode="r"), feats, "(frame, channel)")
    return {"dir": d, "T": T, "fps": clip_fps, "source": source, "boxes": boxes, "sr": info.samplerate}


def check_finite(x, file, index_names=""):
    """Stops naming the file and the first NaN / inf (loaders read nothing non-finite)."""
    bad = ~np.isfinite(np.asarray(x))
    if bad.any():
        raise InputError(f"{file}: non-finite value {np.asarray(x)[tuple(np.argwhere(bad)[0])]} at index "
                         f"{np.argwhere(bad)[0].tolist()} {index_names} ({int(bad.sum())} in all)")


def cache_music_features(d, fps, T):
    """music_feats.npy of a clip of T frames, computed from audio.wav (EDGE 35-d) and cached if missing."""
    d = Path(d)
    path = d / "music_feats.npy"
    if not path.is_file():
        import librosa
        audio, sr = read_audio(d / "audio.wav")
        try:
            feats = music_features(audio, sr, fps, T)
        except (ValueError, librosa.ParameterError) as err:  # too short, empty, non-finite
            raise InputError(f"{d / 'audio.wav'}: {err}") from None
        np.save(path, feats)
    return np.load(path)


def crop_box(image, box, size):
    """Bilinear square crops around normalised [x0, y0, x1, y1] boxes (their larger side), differentiable
    in the image: image (3, H, W) and box (4,) -> (3, size, size), or (B, 3, H, W) and (B, 4) -> (B, 3, size, size)."""
    one = image.dim() == 3
    images, boxes = (image[None], torch.as_tensor(box, dtype=image.dtype)[None]) if one else (image, box)
    boxes = torch.as_tensor(boxes, dtype=images.dtype, device=images.device)
    x0, y0, x1, y1 = boxes.unbind(-1)  # (B,) each
    cx, cy, half = (x0 + x1) / 2, (y0 + y1) / 2, torch.maximum(x1 - x0, y1 - y0) / 2
    zero = torch.zeros_like(cx)
    # affine_grid works in [-1, 1] image coordinates: x_n = 2 x - 1
    theta = torch.stack([torch.stack([2 * half, zero, 2 * cx - 1], -1),
                         torch.stack([zero, 2 * half, 2 * cy - 1], -1)], 1)  # (B, 2, 3)
    grid = F.affine_grid(theta, (len(images), 3, size, size), align_corners=False)  # (B, size, size, 2)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out[0] if one else out


FACE = slice(24, 92)  # the 68 face points in the 134 layout
# the 5 points insightface aligns a face by (ARCFACE_112's order), from the 68 face points (iBUG order):
# the eye on the image's left (the person's right; the mean of its 6 points), the other eye, the nose tip,
# the mouth corner on the image's left, the other corner
FACE5 = ((36, 37, 38, 39, 40, 41), (42, 43, 44, 45, 46, 47), (30,), (48,), (54,))


def face_points5(pose):
    """The 5 face-alignment points [..., 5, 2] of poses [..., 134, 3] (normalised or in pixels), NaN where a
    point they are made of is invisible (COCO-17 poses and the toy's have no face points: all NaN)."""
    p = torch.as_tensor(np.asarray(pose), dtype=torch.float32)
    face = p[..., FACE, :]  # (..., 68, 3)
    pts = torch.stack([face[..., list(i), :2].mean(-2) for i in FACE5], -2)  # (..., 5, 2)
    seen = torch.stack([(face[..., list(i), 2] >= VISIBLE).all(-1) for i in FACE5], -1).all(-1)  # (...,)
    return torch.where(seen[..., None, None], pts, torch.nan)


# insightface's arcface_dst: eye centres, nose tip, mouth corners (the image's left one first) in the
# 112 x 112 crop that ArcFace reads, in pixel indices (pixel i's centre at i)
ARCFACE_112 = ((38.2946, 51.6963), (73.5318, 51.5014), (56.0252, 71.7366), (41.5493, 92.3655), (70.7299, 92.2041))


def similarity_transform(src, dst):
    """Umeyama's (1991) least-squares similarity (scale, rotation, shift; no reflection) taking points src to
    dst [B, N, 2] each: A = s R [B, 2, 2] and t [B, 2], dst ~ A src + t (skimage's SimilarityTransform,
    which insightface's norm_crop uses)."""
    mu_s, mu_d = src.mean(1, keepdim=True), dst.mean(1, keepdim=True)  # (B, 1, 2)
    s0, d0 = src - mu_s, dst - mu_d
    U, S, Vh = torch.linalg.svd(d0.transpose(1, 2) @ s0 / src.shape[1])  # of the (B, 2, 2) covariance
    d = torch.sign(torch.linalg.det(U) * torch.linalg.det(Vh))  # -1: the fit would reflect: flip the weak axis
    D = torch.stack([torch.ones_like(d), d], -1)  # (B, 2)
    scale = (S * D).sum(-1) / s0.pow(2).sum((1, 2)).div(src.shape[1])  # (B,)
    A = scale[:, None, None] * (U @ torch.diag_embed(D) @ Vh)
    return A, mu_d[:, 0] - (A @ mu_s.transpose(1, 2))[..., 0]


def aligned_face_crop(images, points, size=112):
    """Face crops aligned as insightface does for ArcFace: the similarity taking the 5 face points to
    ARCFACE_112 (scaled to size), applied by bilinear sampling, differentiable in the image. images
    [B, 3, H, W]; points [B, 5, 2] normalised (x, y) in [0, 1], ARCFACE_112's order -> [B, 3, size, size]."""
    B, _, H, W = images.shape
    wh = images.new_tensor([W, H])
    dst = (images.new_tensor(ARCFACE_112) + 0.5) * size / 112  # pixel indices -> continuous (pixel i: [i, i + 1])
    A, t = similarity_transform(points.to(images.dtype) * wh, dst.expand(B, -1, -1))  # image px -> crop px
    Ai = torch.linalg.inv(A)  # crop px q -> image px p = Ai (q - t)
    # affine_grid maps the crop's u in [-1, 1] (q = (u + 1) size / 2) to the image's 2 p / wh - 1
    theta = torch.cat([(2 / wh)[:, None] * Ai * size / 2,
                       ((2 / wh) * (Ai @ (size / 2 - t)[..., None])[..., 0] - 1)[..., None]], -1)  # (B, 2, 3)
    grid = F.affine_grid(theta, (B, 3, size, size), align_corners=False)  # (B, size, size, 2)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def face_crops(images, boxes, points, size=112):
    """Face crops for the recognizer (conditioning, identity loss and scores): aligned as ArcFace's training
    faces (aligned_face_crop) where the 5 face points are known, box crops (crop_box) where not (COCO-17
    poses, the toy's).
    images [N, 3, H, W], boxes [N, 4], points [N, 5, 2] (NaN: unknown) -> [N, 3, size, size]."""
    crops = crop_box(images, boxes, size)
    ok = points.isfinite().flatten(1).all(1).to(images.device)  # (N,)
    if ok.any():
        crops = crops.index_put((ok,), aligned_face_crop(images[ok], points.to(images.device)[ok], size))
    return crops


def box_mask(boxes, size):
    """Rectangles [x0, y0, x1, y1] (B, 4), normalised -> masks (B, 1, size, size) (1 inside, pixel centres)."""
    c = (torch.arange(size, dtype=boxes.dtype, device=boxes.device) + 0.5) / size
    inx = (c >= boxes[:, :1]) & (c <= boxes[:, 2:3])  # (B, W)
    iny = (c >= boxes[:, 1:2]) & (c <= boxes[:, 3:])  # (B, H)
    return (iny[:, :, None] & inx[:, None, :]).to(boxes.dtype)[:, None]


def resize_frames(images, size):
    """(N, 3, H, W) -> (N, 3, size, size), antialiased: how stages B and C see a clip's frames."""
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


class DanceClipDataset(torch.utils.data.Dataset):
    """Windows of dance clips (all checked here), starting at random per (seed, epoch, index) or at `start`
    >= 0 (or start[index]); the reference frame is random among those with a face box, or `ref_frame` >= 0."""

    def __init__(self, list_file, window, joints="body_feet24", fps=DANCE_FPS, seed=0, start=-1, ref_frame=-1,
                 face_size=112, image_size=0, frames=0):
        if joints not in JOINT_SETS:
            raise InputError(f"joints={joints!r}: expected one of {list(JOINT_SETS)}")
        self.clips = [read_clip(d, fps) for d in read_list_file(list_file)]
        if not self.clips:
            raise InputError(f"{list_file}: no clips listed")
        short = [str(c["dir"]) for c in self.clips if c["T"] < window]
        if short:
            raise InputError(f"clips shorter than the window of {window} frames: {short}")
        self.feats = [cache_music_features(c["dir"], fps, c["T"]) for c in self.clips]  # [T, D] each
        widths = [f.shape[1] for f in self.feats]
        if len(set(widths)) != 1:  # name the odd one: the clip whose width most clips do not share
            odd = min(range(len(widths)), key=lambda i: widths.count(widths[i]))
            other = next(i for i in range(len(widths)) if widths[i] != widths[odd])
            tie = widths.count(widths[odd]) == widths.count(widths[other])  # no majority: name both
            raise InputError(f"{self.clips[odd]['dir'] / 'music_feats.npy'}: music features of width "
                             f"{widths[odd]}, " + (f"{self.clips[other]['dir'] / 'music_feats.npy'}: {widths[other]}"
                                                   if tie else f"other clips of {list_file} have {widths[other]}"))
        self.music_dim, self.J, self.window, self.fps = widths[0], JOINT_SETS[joints], window, fps
        full = [np.load(c["dir"] / "poses.npy") for c in self.clips]  # (T, 134, 3) each
        self.poses = [p[:, : self.J].astype(np.float32) for p in full]
        self.face5 = [face_points5(p) for p in full]  # (T, 5, 2) each, NaN: no face points (the toy's)
        self.seed, self.start, self.ref_frame, self.face_size = seed, start, ref_frame, face_size
        # frames > 0: also that many target frames of the window (1: one at random, the window's
        # length: all), resized to image_size (stages B and C)
        self.image_size, self.frames = image_size, frames

    def __len__(self):
        return len(self.clips)

    def __getitem__(self, key):
        idx, epoch = key if isinstance(key, tuple) else (key, 0)  # StepSampler passes (index, epoch)
        clip = self.clips[idx]
        rng = np.random.default_rng((self.seed, epoch, idx))
        start = self.start[idx] if isinstance(self.start, list) else self.start  # a list: one per clip
        start = start if start >= 0 else int(rng.integers(0, clip["T"] - self.window + 1))
        with_face = [i for i, b in enumerate(clip["boxes"]) if b is not None]
        ref = self.ref_frame if self.ref_frame >= 0 else int(with_face[rng.integers(len(with_face))])
        if clip["boxes"][ref] is None:
            raise InputError(f"{clip['dir'] / 'faces.json'}: reference frame {ref} has no face box")
        image = read_frame(clip["source"], ref)  # (3, H, W)
        item = {"music": torch.from_numpy(self.feats[idx][start: start + self.window]),  # (W, D)
                "poses": torch.from_numpy(self.poses[idx][start: start + self.window]),  # (W, J, 3)
                "ref_pose": torch.from_numpy(self.poses[idx][ref]),  # (J, 3)
                "face": face_crops(image[None], torch.tensor([clip["boxes"][ref]]), self.face5[idx][ref][None],
                                   self.face_size)[0],  # (3, 112, 112)
                "ref_image": self.resize(image), "ref_box": self.box(clip, ref), "start": start, "index": idx}
        if self.frames:
            offsets = (torch.arange(self.window) if self.frames >= self.window
                       else torch.from_numpy(np.sort(rng.choice(self.window, self.frames, replace=False))))
            item["offsets"] = offsets  # (n,) frame indices within the window
            item["frames"] = torch.stack([self.resize(read_frame(clip["source"], start + int(k))) for k in offsets])
            item["boxes"] = torch.stack([self.box(clip, start + int(k)) for k in offsets])  # (n, 4), NaN: no face
            item["face_points"] = self.face5[idx][start + offsets]  # (n, 5, 2), NaN: unknown
        return item

    def resize(self, image):
        """(3, H, W) -> (3, S, S) at image_size (the poses are normalised, so they still fit)."""
        return resize_frames(image[None], self.image_size)[0] if self.image_size else image

    @staticmethod
    def box(clip, t):
        b = clip["boxes"][t]
        return torch.tensor(b if b is not None else [float("nan")] * 4, dtype=torch.float32)  # (4,)


# ----------------------------------------------------------------------------------------------
# Outputs: image grids, 3DGS PLY files, skeleton videos, metrics

def save_image_grid(rows, path, groups=(), pad=2, min_cell=96):
    """rows: (N, 3 or 4, H, W) tensors in [0, 1] (alpha dropped) -> a PNG, one row each, cells upscaled to
    >= min_cell px. groups: (label, columns) header pairs, e.g. [("input", 1), ("ground truth", 6)]."""
    k = max(1, -(-min_cell // rows[0].shape[-1]))  # integer upscale factor
    cols, (H, W) = max(r.shape[0] for r in rows), (k * n for n in rows[0].shape[-2:])
    top = 16 if groups else 0
    grid = torch.ones(3, top + len(rows) * (H + pad) + pad, cols * (W + pad) + pad)
    for i, r in enumerate(rows):
        r = F.interpolate(r[:, :3].float(), scale_factor=k, mode="nearest")  # (N, 3, H, W)
        for j, im in enumerate(r):
            y, x = top + pad + i * (H + pad), pad + j * (W + pad)
            grid[:, y: y + H, x: x + W] = im
    im = Image.fromarray((grid.clamp(0, 1).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8))
    col, draw = 0, ImageDraw.Draw(im)
    for label, n in groups:  # the label, and a grey rule in the gap before the group
        draw.text((pad + col * (W + pad) + 2, 2), label, fill=(0, 0, 0))
        if col:
            x = col * (W + pad)
            draw.rectangle([x, 0, x + pad - 1, im.height - 1], fill=(150, 150, 150))
        col += n
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    im.save(path)
    return path


# 3DGS's PLY vertex layout (SIBR, SuperSplat, ...): position, normal (zero), SH DC then 45 higher-order
# (zero here), opacity as a logit, scale as a log, rotation (w, x, y, z).
PLY_FIELDS = ("x y z nx ny nz f_dc_0 f_dc_1 f_dc_2".split() + [f"f_rest_{i}" for i in range(45)]
              + "opacity scale_0 scale_1 scale_2 rot_0 rot_1 rot_2 rot_3".split())


def save_ply(gaussians, path):
    """One sample's Gaussians {means, rgb, scales (N, 3), quats (N, 4), opacities (N,)} -> a 3DGS PLY."""
    g = {k: v.detach().float().cpu() for k, v in gaussians.items()}
    N = len(g["means"])
    opac = g["opacities"].clamp(1e-6, 1 - 1e-6)
    logit = torch.log(opac / (1 - opac))[:, None]  # (N, 1)
    cols = torch.cat([g["means"], torch.zeros(N, 3), (g["rgb"] - 0.5) / SH_C0, torch.zeros(N, 45),
                      logit, torch.log(g["scales"]), g["quats"]], 1)  # (N, 62)
    header = "".join(["ply\nformat binary_little_endian 1.0\n", f"element vertex {N}\n"]
                     + [f"property float {f}\n" for f in PLY_FIELDS] + ["end_header\n"])
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(header.encode("ascii") + cols.numpy().astype("<f4").tobytes())
    return path


def load_ply(path):
    """Read a 3DGS PLY written by save_ply (or by 3DGS itself) back into the same dict."""
    raw = Path(path).read_bytes()
    end = raw.index(b"end_header\n") + len(b"end_header\n")
    lines = raw[:end].decode("ascii").splitlines()
    if lines[:2] != ["ply", "format binary_little_endian 1.0"]:
        raise InputError(f"{path}: not a binary little-endian PLY")
    n = int(next(ln.split()[2] for ln in lines if ln.startswith("element vertex")))
    names = [ln.split()[2] for ln in lines if ln.startswith("property float")]
    rows = np.frombuffer(raw[end:], dtype="<f4", count=n * len(names)).reshape(n, len(names))  # (N, fields)
    v = torch.from_numpy(rows.copy())
    col = lambda *fs: v[:, [names.index(f) for f in fs]]  # noqa: E731
    return {"means": col("x", "y", "z"), "rgb": 0.5 + SH_C0 * col("f_dc_0", "f_dc_1", "f_dc_2"),
            "scales": col("scale_0", "scale_1", "scale_2").exp(),
            "quats": col("rot_0", "rot_1", "rot_2", "rot_3"),
            "opacities": torch.sigmoid(col("opacity")[:, 0])}


def preview_samples(list_file, path, n=6, size=None):
    """PNG grid: one row per sample, all its views (composited on white)."""
    rows = []
    for d in read_list_file(list_file)[:n]:
        frames = read_cameras(d / "opencv_cameras.json")["frames"]
        rows.append(torch.stack([load_rgba(d / fr["file_path"], size) for fr in frames]))
    return save_image_grid(rows, path)


def draw_skeleton(im, pose, colour, scale, width=2):
    """Draws the visible limbs of pose [J, 3] (normalised) onto a PIL image of size `scale`."""
    draw = ImageDraw.Draw(im)
    for i, j in LIMBS:
        if max(i, j) < len(pose) and pose[i, 2] >= VISIBLE and pose[j, 2] >= VISIBLE:
            draw.line([tuple(pose[i, :2] * scale), tuple(pose[j, :2] * scale)], fill=colour, width=width)


def write_skeleton_video(path, clip, gt, pred, fps, size=128):
    """mp4 at the clip's fps with its music: left the frame with the ground-truth skeleton (green),
    right the prediction (red) over the ground truth (grey). Returns the path and the middle frame."""
    frames = []
    for t in range(len(gt)):
        frame = (read_frame(clip["source"], t).permute(1, 2, 0).numpy() * 255).astype(np.uint8)  # (H, W, 3)
        left = Image.fromarray(frame).resize((size, size))
        draw_skeleton(left, gt[t], (0, 160, 0), size)
        right = Image.new("RGB", (size, size), (255, 255, 255))
        draw_skeleton(right, gt[t], (190, 190, 190), size, 3)
        draw_skeleton(right, np.concatenate([pred[t], gt[t, :, 2:]], -1), (220, 0, 0), size)
        frames.append(np.concatenate([np.asarray(left), np.asarray(right)], 1))  # (size, 2 size, 3)
    return write_video(path, frames, fps, clip["dir"] / "audio.wav"), frames[len(frames) // 2]


def write_video(path, frames, fps, audio=None):
    """uint8 frames (T, H, W, 3), or an iterator of (H, W, 3) frames (streamed: long videos in bounded
    memory) -> an H.264 mp4 (with `audio` muxed in), or a GIF without sound beside it when no ffmpeg
    binary is found. Returns the path written."""
    frames = iter(frames)
    first = np.asarray(next(frames))
    frames = itertools.chain([first], frames)
    try:
        import imageio_ffmpeg
        imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError):  # no imageio-ffmpeg, or no ffmpeg binary
        path = Path(path).with_suffix(".gif")
        ims = [Image.fromarray(np.asarray(f)) for f in frames]
        ims[0].save(path, save_all=True, append_images=ims[1:], duration=round(1000 / fps), loop=0)
        return path
    H, W = first.shape[:2]
    sound = {} if audio is None else {"audio_path": str(audio), "audio_codec": "aac",
                                      "output_params": ["-shortest"]}
    writer = imageio_ffmpeg.write_frames(str(path), (W, H), fps=fps, ffmpeg_log_level="error",
                                         macro_block_size=2, **sound)  # yuv420p: even sizes
    writer.send(None)  # start the generator
    for f in frames:
        writer.send(np.ascontiguousarray(f))
    writer.close()
    return Path(path)


def _main(argv):
    import argparse
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("make_rigs", help=f"(re)write the built-in rigs {list(BUILTIN_RIGS)} into {RIGS_DIR}")
    r = sub.add_parser("rig_from_cameras", help="make a rig file from a sample's opencv_cameras.json")
    r.add_argument("cameras")
    r.add_argument("--name", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--views", default=None, help="comma-separated frame indices, in rig order (default: all)")
    r.add_argument("--prompt_embeds", default="")
    e = sub.add_parser("rig_prompt_embeds",
                       help="per-view prompt embeddings [V, 77, D] from a local CLIP text encoder")
    e.add_argument("--rig", required=True)
    e.add_argument("--text_encoder", required=True,
                   help="a CLIPTextModel folder (an SD 2.1 pipeline's text_encoder/)")
    e.add_argument("--tokenizer", help="CLIPTokenizer folder (default: tokenizer/ beside the encoder)")
    e.add_argument("--prompts", help="'|'-separated view words in rig order (default: the rig's names)")
    e.add_argument("--out", required=True)
    a = p.parse_args(argv)
    if a.cmd == "make_rigs":
        for name, spec in BUILTIN_RIGS.items():
            (RIGS_DIR / f"{name}.json").write_text(json.dumps(make_rig(name, **spec), indent=1))
            print(f"wrote {RIGS_DIR / name}.json")
    elif a.cmd == "rig_prompt_embeds":
        rig = load_rig(a.rig)
        names = rig["views"] if a.prompts is None else a.prompts.split("|")
        if len(names) != len(rig["frames"]):
            raise SystemExit(f"--prompts gives {len(names)} views, "
                             f"rig {rig['name']!r} has {len(rig['frames'])}")
        prompts = rig_view_prompts(dict(rig, views=names))
        pe = clip_prompt_embeds(prompts, a.text_encoder, a.tokenizer)
        save_prompt_embeds(a.out, pe, rig, prompts)
        print(f"wrote prompt embeddings {tuple(pe.shape)} for rig {rig['name']!r} to {a.out}")
    else:
        cams = read_cameras(a.cameras)
        views = None
        if a.views is not None:
            try:
                views = [int(v) for v in a.views.split(",")]
            except ValueError:
                raise InputError(f"--views={a.views}: expected comma-separated frame indices, "
                                 "e.g. 0,1,2") from None
            if bad := [v for v in views if not 0 <= v < len(cams["frames"])]:
                raise InputError(f"--views={a.views}: {a.cameras} has frames 0..{len(cams['frames']) - 1}, "
                                 f"not {bad}")
        rig = rig_from_cameras(cams, a.name, views, a.prompt_embeds)
        Path(a.out).write_text(json.dumps(rig, indent=1))
        print(f"wrote rig {a.name!r} with {len(rig['frames'])} views to {a.out}")


if __name__ == "__main__":
    cli(_main)
