"""Everything that touches disk: config loading, checkpoints, camera files and rigs, datasets and
the built-in toy datasets.

Run it to make the toy mouse data and look at it:
    python data.py toy_mice --out=data/toy_mice --n=200        # FaceLift-format samples + preview.png
    python data.py rig_from_cameras SAMPLE/opencv_cameras.json --name=my_rig --out=configs/rigs/my_rig.json
    python data.py toy_dance --out=data/toy_dance --n=100          # dance clips with music + preview.png
    python data.py rig_prompt_embeds --rig=my_rig --text_encoder=SD21/text_encoder --out=my_rig_clr_embeds.pt
"""
import contextlib
import dataclasses
import inspect
import io
import json
import math
import os
import pickle
import random
import re
import shutil
import sys
import types
import typing
import uuid
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from safetensors.torch import load_model, save_model

from models import SH_C0, intrinsics_matrix, look_at_c2w, render_gaussians

REPO = Path(__file__).resolve().parent
RIGS_DIR = REPO / "configs" / "rigs"

# ----------------------------------------------------------------------------------------------
# Config: dataclass defaults -> --cfg file.yaml -> --key=value


class ConfigError(ValueError):
    pass


def type_name(tp):
    return tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")


def coerce(value, tp, cli=False):
    """value (from yaml, or a command-line string when cli=True) -> type tp, else ValueError."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and (value is None or cli and str(value).lower() in ("none", "null")):
            return None
        for arm in (a for a in args if a is not type(None)):
            with contextlib.suppress(TypeError, ValueError):
                return coerce(value, arm, cli)
    elif tp is str:  # yaml reads `name: 007` as the int 7: refuse non-strings rather than str() them
        if isinstance(value, str):
            return value
        raise ValueError(f"{value!r} is not a string (quote it in the yaml)")
    elif tp is bool:
        if isinstance(value, (bool, int, str)) and str(value).strip().lower() in ("true", "1", "false", "0"):
            return str(value).strip().lower() in ("true", "1")
    elif tp in (int, float) and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        with contextlib.suppress(ValueError):  # strings too: yaml 1.1 reads `lr: 1e-4` as a string
            number = value if isinstance(value, int) else float(value)
            if tp is float:
                return float(number)
            if float(number).is_integer():  # '1e3' and 2.0 are ints, 1.5 is not
                return int(number)
    elif (origin or tp) in (list, tuple, dict):
        kind = origin or tp
        if isinstance(value, str):
            value = yaml.safe_load(value)  # '[1,2]' or '{a: 1}' from the command line
        if kind is dict and isinstance(value, dict):
            kt, vt = args or (object, object)
            return {coerce(k, kt): coerce(v, vt) for k, v in value.items()}
        if kind is not dict and isinstance(value, (list, tuple)):
            if not args or kind is list or args[1:] == (...,):
                return kind(coerce(v, args[0] if args else object) for v in value)
            if len(args) == len(value):
                return tuple(coerce(v, a) for v, a in zip(value, args))
    elif tp in (object, typing.Any):  # elements of a bare list/tuple/dict
        return value
    raise ValueError(f"{value!r} is not a {type_name(tp)}")


def load_config(cls, argv=None):
    """A new `cls` from its defaults, then every `--cfg file.yaml` (before any --key, wherever it
    stands), then `--key=value` / `--key value` in argv order. Bad keys or values raise ConfigError."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(f"usage: {Path(sys.argv[0]).name} [--cfg x.yaml] [--key=value ...]\n\n{inspect.getsource(cls)}")
        raise SystemExit(0)
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls) if f.init]

    def fail(where, msg):
        return ConfigError(f"{where}: {msg}\nvalid keys: {', '.join(valid)}")

    files, cli, args = [], [], iter(argv)  # cli: (key, value, where, from_cli)
    for arg in args:
        key, eq, value = arg.partition("=")
        if not key.startswith("--") or key == "--":
            raise fail(f"command line {arg!r}", "expected --key=value or --key value")
        if not eq:
            value = next(args, None)
            if value is None:
                raise fail(f"command line {arg!r}", "missing value")
            arg = f"{arg} {value}"
        if key == "--cfg":
            files.append(value)
        else:
            cli.append((key[2:], value, f"command line {arg!r}", True))

    overrides = []
    for file in files:
        try:
            data = yaml.safe_load(Path(file).read_text())
        except (OSError, yaml.YAMLError) as err:
            raise ConfigError(f"config file {file}: cannot read it ({err})") from None
        data = {} if data is None else data  # an empty file overrides nothing
        if not isinstance(data, dict):
            raise ConfigError(f"config file {file} must be a mapping (key: value), not a {type(data).__name__}")
        overrides += [(key, value, f"{file}: key {key!r}", False) for key, value in data.items()]

    values = {}
    for key, value, where, from_cli in overrides + cli:
        if key not in valid:
            raise fail(where, f"unknown key {key!r}")
        try:
            values[key] = coerce(value, hints[key], cli=from_cli)
        except (TypeError, ValueError, yaml.YAMLError) as err:
            raise fail(where, f"{key} expects {type_name(hints[key])}: {err}") from None
    return cls(**values)  # the fields not given get fresh defaults (default_factory runs per call)


def config_to_dict(cfg):
    def plain(v):
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return {k: plain(x) for k, x in v.items()} if isinstance(v, dict) else v
    return plain(dataclasses.asdict(cfg))


def save_config(cfg, path):
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


# ----------------------------------------------------------------------------------------------
# Checkpoints: <ckpt_dir>/checkpoint-<step>/{<module>.safetensors, state.pt, config.yaml}

CHECKPOINT_RE = re.compile(r"checkpoint-(\d+)")


@contextlib.contextmanager
def atomic_dir(final_path):
    """Yields a temporary sibling dir that becomes final_path only if the block finishes, so a crash
    mid-save never leaves a directory that looks like a checkpoint."""
    final = Path(final_path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()  # not tempfile.mkdtemp: its 0700 mode would stay on the renamed checkpoint
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():  # re-saving the same step
        shutil.rmtree(final)
    os.replace(tmp, final)


def get_rng_state():
    # numpy's and python's states as tensors/lists so that state.pt loads with weights_only=True
    kind, keys, *rest = np.random.get_state()  # rest: pos, has_gauss, cached_gaussian (python numbers)
    version, mt, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), *rest],
             "python": [version, list(mt), gauss_next]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    version, mt, gauss_next = state["python"]
    random.setstate((version, tuple(mt), gauss_next))


def save_checkpoint(ckpt_dir, step, modules, optimizers=None, cfg=None, extra=None):
    """Writes <ckpt_dir>/checkpoint-<step>/ atomically. Pass unwrapped modules (not DDP/compiled)."""
    buf = io.BytesIO()
    torch.save(extra or {}, buf)
    try:  # fail now, not at resume: weights_only loading refuses e.g. numpy scalars
        torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(f"extra={extra!r}: use only tensors, python numbers, strings, lists, dicts") from None
    final = Path(ckpt_dir) / f"checkpoint-{step}"
    with atomic_dir(final) as tmp:
        for name, module in modules.items():
            wrapped = [k for k in module.state_dict() if k.startswith(("module.", "_orig_mod."))]
            if wrapped:  # a DDP/compiled wrapper's key prefixes would make the file unloadable elsewhere
                raise ValueError(f"{name}: save the unwrapped model, got keys like {wrapped[0]!r}")
            save_model(module, str(tmp / f"{name}.safetensors"))  # save_model handles tied weights
        optim_states = {k: opt.state_dict() for k, opt in (optimizers or {}).items()}
        state = {"step": int(step), "optimizers": optim_states, "rng": get_rng_state(), "extra": extra or {}}
        torch.save(state, tmp / "state.pt")
        if cfg is not None:
            save_config(cfg, tmp / "config.yaml")
    return final


def latest_checkpoint(ckpt_dir):
    """The complete checkpoint-<step> dir with the highest step, or None."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return None
    found = [(int(m[1]), p) for p in ckpt_dir.iterdir()
             if (m := CHECKPOINT_RE.fullmatch(p.name)) and (p / "state.pt").is_file()]
    return max(found)[1] if found else None


def load_checkpoint(path, modules, optimizers=None, restore_rng=True):
    """Loads weights (strict), optimizer states and RNG; returns the state dict (step, extra, ...)."""
    path = Path(path)
    if not (path / "state.pt").is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no state.pt)")
    for name, module in modules.items():
        file = path / f"{name}.safetensors"
        if not file.is_file():
            have = sorted(p.stem for p in path.glob("*.safetensors"))
            raise FileNotFoundError(f"{file} not found (the checkpoint holds modules {have})")
        load_model(module, file, strict=True)  # RuntimeError naming missing/unexpected keys
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    for name, opt in (optimizers or {}).items():
        if name not in state["optimizers"]:
            raise KeyError(f"{path}: no optimizer state {name!r}, checkpoint has {list(state['optimizers'])}")
        opt.load_state_dict(state["optimizers"][name])
    if restore_rng:
        set_rng_state(state["rng"])
    return state

# ----------------------------------------------------------------------------------------------
# Camera files (FaceLift's opencv_cameras.json) and rigs

FRAME_KEYS = ("w", "h", "fx", "fy", "cx", "cy", "w2c")


def read_cameras(path):
    """opencv_cameras.json -> the dict as stored (extra keys kept), after checking every frame."""
    path = Path(path)
    try:
        cams = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: cannot read camera file ({err})") from None
    if not isinstance(cams, dict) or not isinstance(cams.get("frames"), list) or not cams["frames"]:
        raise ValueError(f"{path}: expected {{'id': ..., 'frames': [...]}} with at least one frame")
    for i, fr in enumerate(cams["frames"]):
        missing = [k for k in FRAME_KEYS if k not in fr]
        if missing:
            raise ValueError(f"{path}: frame {i} lacks keys {missing} (needs {list(FRAME_KEYS)})")
        w2c = np.asarray(fr["w2c"], dtype=np.float64)
        if w2c.shape != (4, 4) or not np.isfinite(w2c).all():
            raise ValueError(f"{path}: frame {i} w2c must be a finite 4x4 matrix, got {fr['w2c']}")
    return cams


def write_cameras(path, cams):
    Path(path).write_text(json.dumps(cams, indent=1))


def frames_to_tensors(frames, size=None):
    """Frames -> w2c (V, 4, 4) and fxfycxcy (V, 4), intrinsics scaled to a `size` x `size` image."""
    w2c = torch.tensor([fr["w2c"] for fr in frames], dtype=torch.float32)  # (V, 4, 4)
    K = torch.tensor([[fr["fx"], fr["fy"], fr["cx"], fr["cy"]] for fr in frames], dtype=torch.float32)  # (V, 4)
    if size is not None:
        wh = torch.tensor([[fr["w"], fr["h"], fr["w"], fr["h"]] for fr in frames], dtype=torch.float32)
        K = K * size / wh
    return w2c, K


def make_frame(c2w, size, fx, fy=None, cx=None, cy=None, **extra):
    """One opencv_cameras.json frame from a camera-to-world matrix."""
    w2c = torch.linalg.inv(torch.as_tensor(c2w, dtype=torch.float64))
    return {"w": size, "h": size, "fx": fx, "fy": fy or fx, "cx": size / 2 if cx is None else cx,
            "cy": size / 2 if cy is None else cy, "w2c": [[round(v, 8) for v in row] for row in w2c.tolist()], **extra}


def orbit_c2w(azimuth_deg, elevation_deg, radius, target=(0.0, 0.0, 0.0)):
    """World z-up orbit camera at (r cos el cos az, r cos el sin az, r sin el) around `target`."""
    az, el = math.radians(azimuth_deg), math.radians(elevation_deg)
    eye = [radius * math.cos(el) * math.cos(az) + target[0], radius * math.cos(el) * math.sin(az) + target[1],
           radius * math.sin(el) + target[2]]
    return look_at_c2w(eye, target)


def make_ring_rig(name, views, azimuths, elevation, prompt_embeds, description, radius=2.7, size=512, focal=548.99):
    frames = [make_frame(orbit_c2w(az, elevation, radius), size, focal) for az in azimuths]
    return {"name": name, "description": description, "prompt_embeds": prompt_embeds, "views": list(views), "frames": frames}


# The rigs in configs/rigs/, written by `python data.py make_rigs`. Both: radius 2.7 around the
# origin, fx = fy = 548.99, cx = cy = 256 at 512 px (FaceLift's 50 deg FOV), world z-up.
BUILTIN_RIGS = {
    # FaceLift's six diffusion views, in FaceLift's order: front camera at (0, -2.7, 0), subject facing -y
    "facelift_6view": dict(
        views=["front", "front_right", "right", "back", "left", "front_left"],
        azimuths=[-90, -135, 180, 90, 0, -45], elevation=0,
        prompt_embeds="mvdiffusion/data/fixed_prompt_embeds_6view/clr_embeds.pt",
        description="FaceLift's 6 multi-view diffusion views: elevation 0, azimuth offsets from the front 0, -45, -90, 180, +90, +45 deg"),
    # The directions of a published 6-camera mouse set-up (not evenly spaced, not in angular
    # order), kept in that set-up's camera order so real captures map 1:1; elevation 20 deg.
    "mouse_6view": dict(
        views=["cam0_az-145", "cam1_az+32", "cam2_az+97", "cam3_az-24", "cam4_az+158", "cam5_az-79"],
        azimuths=[-145, 32, 97, -24, 158, -79], elevation=20,
        prompt_embeds="mvdiffusion/data/mouse_prompt_embeds_6view/clr_embeds.pt",
        description="mouse rig: elevation 20 deg, world azimuths -145, 32, 97, -24, 158, -79 deg in the capture's camera order"),
}


def rig_from_cameras(cams, name, views=None, prompt_embeds="", description=""):
    """A rig made from a real sample's cameras (a dict as read by read_cameras), e.g. a lab's
    6-camera set-up: `views` picks and orders the frames (default: all)."""
    idx = list(range(len(cams["frames"]))) if views is None else list(views)
    frames = [{k: cams["frames"][i][k] for k in FRAME_KEYS} for i in idx]
    return {"name": name, "description": description or f"made from {cams.get('id', 'a sample')}, frames {idx}",
            "prompt_embeds": prompt_embeds, "views": [f"view{i}" for i in idx], "frames": frames}


def load_rig(name_or_path):
    """A rig by name (configs/rigs/<name>.json) or path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = RIGS_DIR / f"{name_or_path}.json"
    if not path.exists():
        known = sorted(p.stem for p in RIGS_DIR.glob("*.json"))
        raise FileNotFoundError(f"rig {name_or_path!r} not found ({path}); rigs in {RIGS_DIR}: {known}")
    rig = json.loads(path.read_text())
    for key in ("name", "frames", "views", "prompt_embeds"):
        if key not in rig:
            raise ValueError(f"{path}: rig lacks key {key!r}")
    for i, fr in enumerate(rig["frames"]):
        if any(k not in fr for k in FRAME_KEYS):
            raise ValueError(f"{path}: rig frame {i} lacks one of {FRAME_KEYS}")
    return rig


def camera_geometry(frames):
    """Per-view viewing geometry relative to the point the cameras look at (the least-squares
    meeting point of their optical axes; real rigs aim below the origin): azimuth and elevation
    in degrees of each camera seen from that point, its distance, and size-normalised intrinsics."""
    c2w = torch.linalg.inv(torch.tensor([fr["w2c"] for fr in frames], dtype=torch.float64))  # (V, 4, 4)
    centres, axes = c2w[:, :3, 3], c2w[:, :3, 2]  # (V, 3) each
    P = torch.eye(3, dtype=torch.float64) - axes[:, :, None] * axes[:, None, :]  # (V, 3, 3) projectors off each axis
    target = torch.linalg.lstsq(P.sum(0), (P @ centres[:, :, None]).sum(0)).solution[:, 0]  # (3,)
    if len(frames) < 2 or torch.linalg.matrix_rank(P.sum(0)) < 3:
        target = torch.zeros(3, dtype=torch.float64)  # parallel axes meet nowhere: use the origin
    rel = centres - target
    dist = rel.norm(dim=-1)
    d = rel / dist[:, None]
    intr = torch.tensor([[fr["fx"] / fr["w"], fr["fy"] / fr["h"], fr["cx"] / fr["w"], fr["cy"] / fr["h"]] for fr in frames])
    return {"dirs": d, "az": torch.rad2deg(torch.atan2(d[:, 1], d[:, 0])), "el": torch.rad2deg(torch.asin(d[:, 2].clamp(-1, 1))),
            "dist": dist, "intr": intr, "target": target}


def rig_mismatch(rig, frames, tol_deg=8.0, radius_rtol=0.1, intr_rtol=0.05):
    """How the cameras `frames` (list of opencv frames, in view order) differ from `rig`, as a
    readable text, or None if they agree. Directions are compared as seen from the point each
    camera set looks at, so per-sample re-centring and a few degrees of jitter pass."""
    name = rig.get("name", "rig")
    if len(frames) != len(rig["frames"]):
        return f"{len(frames)} cameras, but rig {name!r} has {len(rig['frames'])} views ({rig['views']})"
    a, b = camera_geometry(frames), camera_geometry(rig["frames"])
    angle = torch.rad2deg(torch.acos((a["dirs"][:, None] * b["dirs"][None]).sum(-1).clamp(-1, 1)))  # (V, V_rig)
    fmt = lambda g, i: f"az {g['az'][i]:+.0f} el {g['el'][i]:+.0f}"  # noqa: E731
    problems = []
    if (angle.diagonal() > tol_deg).any():
        best = angle.argmin(1)
        if sorted(best.tolist()) == list(range(len(frames))) and (angle.min(1).values <= tol_deg).all():
            problems.append("views are in another order than the rig's: " + ", ".join(
                f"camera {i} looks like rig view {j} ({rig['views'][j]})" for i, j in enumerate(best.tolist()) if i != j))
        elif (a["el"] - b["el"]).abs().mean() > tol_deg:
            problems.append(f"elevation: cameras at {[round(v) for v in a['el'].tolist()]} deg, "
                            f"rig {name!r} at {[round(v) for v in b['el'].tolist()]} deg")
        else:
            problems.append("viewing directions differ by more than {:.0f} deg: ".format(tol_deg) + "; ".join(
                f"view {i} ({rig['views'][i]}): cameras {fmt(a, i)}, rig {fmt(b, i)}"
                for i in range(len(frames)) if angle[i, i] > tol_deg))
    rel = (a["dist"] - b["dist"]).abs() / b["dist"]
    if (rel > radius_rtol).any():
        problems.append(f"camera distance {[round(v, 2) for v in a['dist'].tolist()]} vs rig {[round(v, 2) for v in b['dist'].tolist()]}")
    if ((a["intr"] - b["intr"]).abs() / b["intr"].abs().clamp(min=1e-6) > intr_rtol).any():
        problems.append(f"intrinsics (fx/w, fy/h, cx/w, cy/h) {a['intr'][0].tolist()} vs rig {b['intr'][0].tolist()}")
    return None if not problems else f"cameras do not match rig {name!r}: " + "; ".join(problems)


# ----------------------------------------------------------------------------------------------
# Multi-view samples (FaceLift format)


def read_list_file(list_file):
    """One sample directory per line; relative paths resolve against the list file's folder."""
    list_file = Path(list_file)
    if not list_file.exists():
        raise FileNotFoundError(f"list file {list_file} does not exist")
    lines = [ln.strip() for ln in list_file.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    return [Path(ln) if Path(ln).is_absolute() else list_file.parent / ln for ln in lines]


def load_rgba(path, size=None, bg=1.0):
    """RGBA PNG (8-bit, or 16-bit read at 8-bit precision by Pillow) -> (4, S, S) float in [0, 1]:
    RGB composited on `bg`, alpha kept as channel 4. Resized (antialiased) to `size` if given."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: image missing")
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode not in ("RGBA", "RGB"):
                raise ValueError(f"mode {im.mode}, expected RGBA or RGB")
            x = torch.from_numpy(np.asarray(im.convert("RGBA"), dtype=np.float32) / 255.0)  # (H, W, 4)
    except (OSError, ValueError, SyntaxError) as err:
        raise ValueError(f"{path}: cannot read image ({err})") from None
    if x.shape[0] != x.shape[1]:
        raise ValueError(f"{path}: image is {x.shape[1]}x{x.shape[0]}, expected a square image")
    x = x.permute(2, 0, 1)  # (4, H, W)
    x = torch.cat([x[:3] * x[3:] + bg * (1 - x[3:]), x[3:]])
    if size is not None and size != x.shape[-1]:
        x = F.interpolate(x[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
    return x


class MultiViewDataset(torch.utils.data.Dataset):
    """FaceLift-format multi-view samples: `<dir>/opencv_cameras.json` + `images/cam_XXX.png`, or
    (diffusion layout) `<dir>/cam_XXX.png` with no camera file, whose views are then the rig's.
    Each item: the `input_views` (indices into the sample's frames) followed by
    `num_target_views` others drawn at random per (seed, epoch, index) (-1: all the others). With a `rig`, the input
    views' cameras must match it (else the rig-mismatch message)."""

    def __init__(self, list_file, image_size, input_views=(0, 1, 2, 3, 4, 5), num_target_views=0, rig=None, seed=0):
        self.samples = read_list_file(list_file)
        if not self.samples:
            raise ValueError(f"{list_file}: no samples listed")
        self.size, self.input_views, self.num_target = image_size, list(input_views), num_target_views
        self.rig, self.seed, self.epoch = rig, seed, 0

    def __len__(self):
        return len(self.samples)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def read_frames(self, d):
        cam_file = d / "opencv_cameras.json"
        if cam_file.exists():
            frames = read_cameras(cam_file)["frames"]
            missing = [i for i, fr in enumerate(frames) if "file_path" not in fr]
            if missing:
                raise ValueError(f"{cam_file}: frames {missing} lack 'file_path'")
            return frames, cam_file
        if self.rig is None:
            raise FileNotFoundError(f"{cam_file} missing (a sample without cameras needs a rig)")
        return [dict(fr, file_path=f"cam_{i:03d}.png") for i, fr in enumerate(self.rig["frames"])], None

    def __getitem__(self, key):
        idx, epoch = key if isinstance(key, tuple) else (key, self.epoch)  # StepSampler passes (index, epoch)
        d = self.samples[idx]
        frames, cam_file = self.read_frames(d)
        n_target = len(frames) - len(self.input_views) if self.num_target < 0 else self.num_target  # -1: all others
        need = len(self.input_views) + n_target
        if len(frames) < need or max(self.input_views) >= len(frames):
            raise ValueError(f"{d}: has {len(frames)} views, needs input views {self.input_views} + {n_target} targets")
        if self.rig is not None and cam_file is not None:
            msg = rig_mismatch(self.rig, [frames[i] for i in self.input_views])
            if msg:
                raise ValueError(f"{cam_file}: {msg}")
        rest = [i for i in range(len(frames)) if i not in self.input_views]
        rng = np.random.default_rng((self.seed, epoch, idx))
        views = self.input_views + [rest[i] for i in rng.choice(len(rest), n_target, replace=False)]
        sel = [frames[i] for i in views]
        images = torch.stack([load_rgba(d / fr["file_path"], self.size) for fr in sel])  # (V, 4, S, S)
        w2c, K = frames_to_tensors(sel, self.size)
        return {"images": images, "w2c": w2c, "c2w": torch.linalg.inv(w2c), "fxfycxcy": K,
                "views": torch.tensor(views), "path": str(d)}


class StepSampler:
    """Batches of (index, epoch) as a pure function of the step: global batch `step` holds items
    step*B .. step*B + B - 1 of an endless sequence of seeded per-epoch permutations, and each
    rank takes its own stride of it. Resuming at step s therefore continues with the very batch
    an uninterrupted run would have drawn, for any number of processes that divides B."""

    def __init__(self, n, global_batch, rank=0, world=1, seed=0, start_step=0):
        assert global_batch % world == 0, f"global batch {global_batch} must divide by {world} processes"
        self.n, self.B, self.rank, self.world, self.seed, self.step = n, global_batch, rank, world, seed, start_step

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
# Toy mice: procedural animals made of 3D Gaussians, rendered into FaceLift-format samples


def _ellipsoid_blobs(rng, n, centre, axes, colour, belly, jitter, scale):
    """n Gaussians spread over the surface of an axis-aligned ellipsoid, belly side lighter."""
    v = rng.normal(size=(n, 3))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    pts = centre + v * axes * rng.uniform(0.75, 0.95, size=(n, 1))
    col = np.where(v[:, 2:] < -0.3, belly, colour) + rng.normal(0, jitter, size=(n, 3))
    return pts, np.full((n, 3), scale) * rng.uniform(0.8, 1.2, size=(n, 3)), col


def toy_mouse(rng, yaw_deg=None):
    """A random mouse as Gaussian parameters (numpy): means (N, 3), scales (N, 3), quats (N, 4),
    opacities (N,), colors (N, 3). Built facing +x, then turned by a random yaw: any direction
    (yaw_deg None) or within +-yaw_deg of +x."""
    s = rng.uniform(1.1, 1.35)  # overall size (the 50 deg view is 2.5 units wide at the origin)
    fur = rng.choice([[0.55, 0.42, 0.3], [0.5, 0.5, 0.52], [0.85, 0.83, 0.8], [0.25, 0.22, 0.2], [0.7, 0.55, 0.35]])
    fur = np.clip(fur + rng.normal(0, 0.03, 3), 0, 1)
    belly = np.clip(fur + 0.25, 0, 1)
    pink = np.array([0.93, 0.62, 0.65])
    body_axes = s * np.array([rng.uniform(0.34, 0.44), rng.uniform(0.19, 0.25), rng.uniform(0.17, 0.22)])
    parts = [_ellipsoid_blobs(rng, 160, np.zeros(3), body_axes, fur, belly, 0.04, 0.07 * s)]

    # head: its own ellipsoid in front of the body, turned by the head yaw around the neck
    turn = np.radians(rng.uniform(-35, 35))
    rot = np.array([[np.cos(turn), -np.sin(turn), 0], [np.sin(turn), np.cos(turn), 0], [0, 0, 1]])
    neck = np.array([body_axes[0] * 0.8, 0, body_axes[2] * 0.25])
    hl = s * rng.uniform(0.2, 0.26)  # head half-length
    head_axes = np.array([hl, hl * 0.68, hl * 0.62])
    head_parts = [_ellipsoid_blobs(rng, 70, np.array([hl * 0.9, 0, 0]), head_axes, fur, belly, 0.04, 0.05 * s)]
    ear_r = s * rng.uniform(0.07, 0.1)
    for side in (-1, 1):
        head_parts.append((np.array([[hl * 0.45, side * hl * 0.55, hl * 0.75]]), np.array([[0.012, ear_r, ear_r]]), pink[None]))
        head_parts.append((np.array([[hl * 0.5, side * hl * 0.52, hl * 0.28]]), np.full((1, 3), 0.028 * s), np.full((1, 3), 0.03)))  # eye
    head_parts.append((np.array([[hl * 1.9, 0, 0]]), np.full((1, 3), 0.03 * s), pink[None]))  # nose
    head_pts = np.concatenate([p for p, _, _ in head_parts]) @ rot.T + neck
    parts.append((head_pts, np.concatenate([sc for _, sc, _ in head_parts]), np.concatenate([c for _, _, c in head_parts])))

    # tail: a chain of shrinking Gaussians along a random smooth 3D curve from the rump
    n_tail, length = 28, s * rng.uniform(0.6, 0.9)
    t = np.linspace(0, 1, n_tail)[:, None]
    bend, lift = rng.uniform(-2.5, 2.5), rng.uniform(-0.6, 0.8)
    heading = np.pi + bend * t[:, 0]  # leaves backwards, curls sideways
    steps = np.stack([np.cos(heading), np.sin(heading), lift * (1 - 2 * t[:, 0])], 1) * length / n_tail
    tail = np.array([-body_axes[0] * 0.9, 0, -body_axes[2] * 0.2]) + np.cumsum(steps, 0)
    tail_col = np.clip(pink * 0.8 + fur * 0.2, 0, 1) + rng.normal(0, 0.02, (n_tail, 3))
    parts.append((tail, np.repeat(s * (0.028 - 0.015 * t), 3, 1), tail_col))

    means = np.concatenate([p for p, _, _ in parts])
    scales = np.concatenate([sc for _, sc, _ in parts])
    colors = np.clip(np.concatenate([c for _, _, c in parts]), 0, 1)
    yaw = rng.uniform(0, 2 * np.pi) if yaw_deg is None else np.radians(rng.uniform(-yaw_deg, yaw_deg))
    R = np.array([[np.cos(yaw), -np.sin(yaw), 0], [np.sin(yaw), np.cos(yaw), 0], [0, 0, 1]])
    # one quaternion for the whole animal's yaw (w, x, y, z) so flattened ears turn with it
    quats = np.tile([np.cos(yaw / 2), 0, 0, np.sin(yaw / 2)], (len(means), 1))
    opac = np.full(len(means), 0.95)
    return {"means": (means - means.mean(0) * [1, 1, 0]) @ R.T, "scales": scales, "quats": quats,
            "opacities": opac, "colors": colors}


def random_view_frames(rng, n, size, focal, radius=2.7, elevations=(-10.0, 50.0)):
    """Extra cameras at random azimuth/elevation around the origin (novel-view supervision, as
    FaceLift's 32-view GS-LRM samples give)."""
    return [make_frame(orbit_c2w(rng.uniform(-180, 180), rng.uniform(*elevations), radius), size, focal) for _ in range(n)]


def write_toy_mice(out, n=200, rig="mouse_6view", size=64, n_extra=4, n_val=None, seed=0, yaw_deg=None, progress=True):
    """Write n toy mice in the FaceLift GS-LRM sample format under `out`: each sample has the
    rig's views first (cam_000..), then n_extra random views; plus data_train.txt / data_val.txt and
    toy.json (the arguments, so a later run can tell whether the folder is the set it asks for).
    yaw_deg: mice face any way (None) or +x +- yaw_deg (see toy_mouse)."""
    from tqdm import tqdm
    rig = load_rig(rig) if isinstance(rig, str) else rig
    out = Path(out)
    n_val = max(1, n // 10) if n_val is None else n_val
    names = []
    for i in tqdm(range(n), desc=f"toy mice -> {out}", disable=not progress):
        rng = np.random.default_rng((seed, i))
        m = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in toy_mouse(rng, yaw_deg).items()}
        focal = rig["frames"][0]["fx"] * size / rig["frames"][0]["w"]
        frames = [make_frame(torch.linalg.inv(torch.tensor(fr["w2c"], dtype=torch.float64)), size, fr["fx"] * size / fr["w"])
                  for fr in rig["frames"]] + random_view_frames(rng, n_extra, size, focal)
        w2c, K = frames_to_tensors(frames)
        # black background: the colour is then premultiplied by alpha; stored straight in RGBA
        rgb, alpha = render_gaussians(m["means"], m["quats"], m["scales"], m["opacities"], m["colors"], w2c,
                                      intrinsics_matrix(K), size, size, 0.0)  # (V, S, S, 3), (V, S, S, 1)
        rgba = torch.cat([rgb / alpha.clamp(min=1e-6), alpha], -1).clamp(0, 1)
        d = out / f"mouse_{i:05d}"
        (d / "images").mkdir(parents=True, exist_ok=True)
        for v, fr in enumerate(frames):
            fr["file_path"] = f"images/cam_{v:03d}.png"
            Image.fromarray((rgba[v].numpy() * 255 + 0.5).astype(np.uint8), "RGBA").save(d / fr["file_path"])
        write_cameras(d / "opencv_cameras.json", {"id": d.name, "rig": rig["name"], "frames": frames})
        names.append(d.name)
    (out / "data_train.txt").write_text("\n".join(names[: n - n_val]) + "\n")
    (out / "data_val.txt").write_text("\n".join(names[n - n_val:]) + "\n")
    (out / "toy.json").write_text(json.dumps(toy_spec(n, rig, size, n_extra, n_val, seed, yaw_deg)))
    return out


def toy_spec(n, rig, size, n_extra, n_val, seed, yaw_deg):
    """What write_toy_mice was asked for, as toy.json records it."""
    return {"n": n, "rig": rig["name"], "size": size, "n_extra": n_extra, "n_val": n_val, "seed": seed, "yaw_deg": yaw_deg}


def save_image_grid(rows, path, pad=2):
    """rows: list of (N, C, H, W) tensors in [0, 1] (C = 3, or 4 = RGB + alpha; alpha dropped) ->
    one PNG with a row per entry (all rows the same H, W)."""
    cols = max(r.shape[0] for r in rows)
    H, W = rows[0].shape[-2:]
    grid = torch.ones(3, len(rows) * (H + pad) + pad, cols * (W + pad) + pad)
    for i, r in enumerate(rows):
        for j, im in enumerate(r):
            grid[:, pad + i * (H + pad): pad + i * (H + pad) + H, pad + j * (W + pad): pad + j * (W + pad) + W] = im[:3]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((grid.clamp(0, 1).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)).save(path)
    return path


# 3DGS's PLY vertex layout, which its viewers (SIBR, SuperSplat, ...) read: position, normal
# (unused, zero), SH coefficients (DC then 45 higher-order, zero here), opacity as a logit,
# scale as a log, rotation (w, x, y, z).
PLY_FIELDS = (["x", "y", "z", "nx", "ny", "nz"] + [f"f_dc_{i}" for i in range(3)] + [f"f_rest_{i}" for i in range(45)]
              + ["opacity"] + [f"scale_{i}" for i in range(3)] + [f"rot_{i}" for i in range(4)])


def save_ply(gaussians, path):
    """One object's Gaussians {means (N, 3), rgb (N, 3), scales (N, 3), quats (N, 4), opacities (N,)}
    (GSLRM's output for one sample) -> a binary little-endian PLY in the standard 3DGS layout."""
    g = {k: v.detach().float().cpu() for k, v in gaussians.items()}
    N = len(g["means"])
    opac = g["opacities"].clamp(1e-6, 1 - 1e-6)
    cols = torch.cat([g["means"], torch.zeros(N, 3), (g["rgb"] - 0.5) / SH_C0, torch.zeros(N, 45),
                      torch.log(opac / (1 - opac))[:, None], torch.log(g["scales"]), g["quats"]], 1)  # (N, 62)
    header = "".join(["ply\nformat binary_little_endian 1.0\n", f"element vertex {N}\n"]
                     + [f"property float {f}\n" for f in PLY_FIELDS] + ["end_header\n"])
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(header.encode("ascii"))
        f.write(cols.numpy().astype("<f4").tobytes())
    return path


def load_ply(path):
    """Read a 3DGS PLY written by save_ply (or by 3DGS itself) back into the same dict."""
    raw = Path(path).read_bytes()
    end = raw.index(b"end_header\n") + len(b"end_header\n")
    lines = raw[:end].decode("ascii").splitlines()
    if lines[:2] != ["ply", "format binary_little_endian 1.0"]:
        raise ValueError(f"{path}: not a binary little-endian PLY")
    n = int(next(ln.split()[2] for ln in lines if ln.startswith("element vertex")))
    names = [ln.split()[2] for ln in lines if ln.startswith("property float")]
    v = torch.from_numpy(np.frombuffer(raw[end:], dtype="<f4", count=n * len(names)).reshape(n, len(names)).copy())
    col = lambda *fs: v[:, [names.index(f) for f in fs]]  # noqa: E731
    return {"means": col("x", "y", "z"), "rgb": 0.5 + SH_C0 * col("f_dc_0", "f_dc_1", "f_dc_2"),
            "scales": col("scale_0", "scale_1", "scale_2").exp(), "quats": col("rot_0", "rot_1", "rot_2", "rot_3"),
            "opacities": torch.sigmoid(col("opacity")[:, 0])}


def preview_samples(list_file, path, n=6, size=None):
    """PNG grid: one row per sample, all its views (composited on white)."""
    rows = []
    for d in read_list_file(list_file)[:n]:
        frames = read_cameras(d / "opencv_cameras.json")["frames"]
        rows.append(torch.stack([load_rgba(d / fr["file_path"], size) for fr in frames]))
    return save_image_grid(rows, path)


# ----------------------------------------------------------------------------------------------
# Multi-view diffusion data: rig prompt embeddings, toy rig embeddings
# (train_mvdiff.py)
#
# The diffusion model knows which view to generate only from each view's prompt embedding
# (cross-attention context), so a prompt file belongs to one rig: FaceLift's `clr_embeds.pt` is a
# tensor [6, 77, 1024] naming its 6 views in rig order; the rig JSON names it under "prompt_embeds".


def load_prompt_embeds(path, rig, dim):
    """[V, T, D] prompt embeddings for `rig`'s V views, checked against the UNet's cross-attention width D."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt embeddings {path} not found (rig {rig['name']!r} names {rig['prompt_embeds']!r}); "
                                f"make them with `python data.py rig_prompt_embeds` (README, phase 1)")
    pe = torch.load(path, map_location="cpu", weights_only=True)
    if not torch.is_tensor(pe) or pe.dim() != 3:
        raise ValueError(f"{path}: expected a tensor [views, tokens, dim], got {type(pe).__name__} {getattr(pe, 'shape', '')}")
    V = len(rig["frames"])
    if pe.shape[0] != V:
        raise ValueError(f"{path}: embeddings for {pe.shape[0]} views, rig {rig['name']!r} has {V} ({rig['views']})")
    if pe.shape[2] != dim:
        raise ValueError(f"{path}: embedding width {pe.shape[2]}, the UNet's cross-attention width is {dim} "
                         f"(SD 2.1 / FaceLift: 1024, OpenCLIP ViT-H/14; 768 means CLIP ViT-L/14 embeddings, which this UNet cannot read)")
    return pe.float()


def toy_rig_prompt_embeds(rig, dim, tokens=8, seed=0):
    """Deterministic stand-in for text prompt embeddings of a rig's views: a fixed random projection
    of each camera's geometry (viewing direction from the point the cameras aim at, azimuth and
    elevation as sin/cos, distance, intrinsics) to [V, tokens, dim]. Same rig -> same embeddings."""
    g = camera_geometry(rig["frames"])
    az, el = torch.deg2rad(g["az"]), torch.deg2rad(g["el"])
    feats = torch.cat([g["dirs"], torch.stack([az.sin(), az.cos(), el.sin(), el.cos(), g["dist"] / 2.7], 1),
                       g["intr"].double()], 1).float()  # (V, 12)
    W = torch.randn(tokens, feats.shape[1], dim, generator=torch.Generator().manual_seed(seed))  # (T, F, D)
    pe = torch.einsum("vf,tfd->vtd", feats, W)  # (V, T, D)
    return (pe - pe.mean(-1, keepdim=True)) / pe.std(-1, keepdim=True)  # unit scale per token, like a LayerNorm'd text encoder


def rig_view_prompts(rig, template="a rendering image of 3D models, {view} view, color map."):
    """One text prompt per rig view (Era3D/FaceLift's wording), from the rig's view names."""
    return [template.format(view=v.replace("_", " ")) for v in rig["views"]]


@torch.no_grad()
def clip_prompt_embeds(prompts, text_encoder_dir, tokenizer_dir=None):
    """Per-view prompt embeddings [V, 77, D] from a local CLIP text encoder (transformers
    CLIPTextModel + CLIPTokenizer folders, e.g. an SD 2.1 pipeline's text_encoder/ and tokenizer/),
    the way FaceLift made clr_embeds.pt: the encoder's last hidden state of each padded prompt,
    as diffusers' Stable Diffusion pipelines use it."""
    from transformers import CLIPTextModel, CLIPTokenizer
    tok = CLIPTokenizer.from_pretrained(str(tokenizer_dir or Path(text_encoder_dir).parent / "tokenizer"), local_files_only=True)
    enc = CLIPTextModel.from_pretrained(str(text_encoder_dir), local_files_only=True).eval()
    n = enc.config.max_position_embeddings  # 77 for every CLIP text encoder
    ids = tok(list(prompts), padding="max_length", max_length=n, truncation=True, return_tensors="pt").input_ids  # (V, 77)
    return enc(ids).last_hidden_state.float()  # (V, 77, D)


def save_mv_checkpoint(ckpt_dir, step, model, ema, optimizer, cfg, rig, prompt_file, extra=None):
    """checkpoint-<step>/{unet/, unet_ema/ (diffusers save_pretrained + the reference-view embedding),
    rig.json, prompt_embeds.pt, state.pt, config.yaml}, written atomically. The rig and its prompt
    file travel with the weights: the next stages check their cameras against them."""
    from models import save_mv_unet
    final = Path(ckpt_dir) / f"checkpoint-{step}"
    with atomic_dir(final) as tmp:
        save_mv_unet(model, tmp / "unet")
        if ema is not None:
            save_mv_unet(ema, tmp / "unet_ema")
        (tmp / "rig.json").write_text(json.dumps(rig, indent=1))
        shutil.copyfile(prompt_file, tmp / "prompt_embeds.pt")
        torch.save({"step": int(step), "optimizers": {"optimizer": optimizer.state_dict()}, "rng": get_rng_state(),
                    "extra": extra or {}}, tmp / "state.pt")
        save_config(cfg, tmp / "config.yaml")
    return final


def load_mv_weights(model, unet_dir):
    """Copies the weights of a unet/ folder (ours or FaceLift's) into `model` (an MVUNet), strictly."""
    from models import load_mv_unet
    src = load_mv_unet(unet_dir, model.num_views, model.sparse)
    model.load_state_dict(src.state_dict())  # strict: same architecture or an error naming the keys
    return model

# (end of section: Multi-view diffusion data: rig prompt embeddings, toy rig embeddings)


# ----------------------------------------------------------------------------------------------
# Dance data: clip format, toy dancers with music, music features
# (train_dance.py)
#
# A clip is a directory:
#   frames/000000.png ...      RGB frames (or images/frame_0.png ... (StableAnimator), or video.mp4)
#   audio.wav                  the music, at least as long as the frames
#   poses.npy                  [T, 134, 3] DWPose whole-body (x, y in [0, 1], score; < 0.3 = invisible)
#   faces.json                 {"boxes": [[x0, y0, x1, y1] or null, ... T entries]}, normalised like poses
#   meta.json                  {"fps": 30, "size": [W, H], "source": "..."}
#   music_feats.npy            optional [T, D]: precomputed features of any width; if missing, the
#                              EDGE 35-d librosa features are computed from audio.wav and cached here

DANCE_FPS = 30
HOP = 512  # one audio hop per video frame: SR = fps x HOP (EDGE / FACT)
VISIBLE = 0.3  # DWPose: score below this = invisible
JOINT_SETS = {"body18": 18, "body_feet24": 24, "all134": 134}  # the first n points of the 134 layout
# OpenPose-18 body (0 nose, 1 neck, 2-4 right arm, 5-7 left arm, 8-10 right leg, 11-13 left leg,
# 14/15 eyes, 16/17 ears), then feet 18-23 (left big toe, small toe, heel; right big toe, small toe, heel)
LIMBS = [(1, 2), (2, 3), (3, 4), (1, 5), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11), (11, 12), (12, 13),
         (1, 0), (0, 14), (14, 16), (0, 15), (15, 17), (13, 18), (18, 19), (13, 20), (10, 21), (21, 22), (10, 23)]


def music_features(audio, sr, fps, n_frames):
    """EDGE's 35-d features at the video rate [n_frames, 35]: onset envelope 1, MFCC 20, chroma_cens 12,
    onset-peak one-hot 1, beat one-hot 1. Needs sr == fps * HOP so that one hop is one frame."""
    import librosa
    assert sr == fps * HOP, f"audio at {sr} Hz, features need fps x {HOP} = {fps * HOP} Hz"
    env = librosa.onset.onset_strength(y=audio, sr=sr, hop_length=HOP)  # (F,), F = 1 + len // HOP (centred STFT)
    mfcc = librosa.feature.mfcc(y=audio, sr=sr, n_mfcc=20, hop_length=HOP).T  # (F, 20)
    chroma = librosa.feature.chroma_cens(y=audio, sr=sr, hop_length=HOP, n_chroma=12).T  # (F, 12)
    peaks = np.zeros_like(env)
    peaks[librosa.onset.onset_detect(onset_envelope=env, sr=sr, hop_length=HOP)] = 1.0
    beats = np.zeros_like(env)
    beats[librosa.beat.beat_track(onset_envelope=env, sr=sr, hop_length=HOP, tightness=100)[1]] = 1.0
    n = min(len(env), len(mfcc), len(chroma))
    if n < n_frames:
        raise ValueError(f"audio gives {n} feature frames, the video has {n_frames}")
    feats = np.concatenate([env[:, None][:n], mfcc[:n], chroma[:n], peaks[:n, None], beats[:n, None]], 1)
    return feats[:n_frames].astype(np.float32)  # the centred STFT gives one extra frame: trim to T


def music_beats(audio, sr):
    """Music beat times in seconds from librosa's beat tracker (Bailando's beat alignment score)."""
    import librosa
    env = librosa.onset.onset_strength(y=audio, sr=sr, hop_length=HOP)
    return librosa.frames_to_time(librosa.beat.beat_track(onset_envelope=env, sr=sr, hop_length=HOP, tightness=100)[1],
                                  sr=sr, hop_length=HOP)


def read_audio(path):
    import soundfile
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: audio missing")
    try:
        audio, sr = soundfile.read(str(path), dtype="float32", always_2d=True)
    except RuntimeError as err:
        raise ValueError(f"{path}: cannot read audio ({err})") from None
    return audio.mean(1), sr  # mono


def frame_source(d):
    """The clip's frames: ('png', [paths]) for frames/000000.png... or images/frame_0.png...
    (StableAnimator's layout), else ('video', path) for a video.mp4 read with imageio."""
    for folder, pattern, key in (("frames", "*.png", lambda p: p.stem), ("images", "frame_*.png", lambda p: p.stem[6:])):
        paths = list((d / folder).glob(pattern)) if (d / folder).is_dir() else []
        if paths:
            return "png", sorted(paths, key=lambda p: int(key(p)))
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
            raise ValueError(f"{src[i]}: cannot read image ({err})") from None
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


def check_clip(d, fps=None):
    """Reads and checks a clip's metadata (not its frames' pixels); returns a dict with T, fps,
    poses, face boxes. Every problem is an error naming the file."""
    d = Path(d)
    if not d.is_dir():
        raise FileNotFoundError(f"{d}: clip directory missing")
    for name in ("poses.npy", "faces.json", "meta.json", "audio.wav"):
        if not (d / name).is_file():
            raise FileNotFoundError(f"{d / name}: missing (a clip needs frames, audio.wav, poses.npy, faces.json, meta.json)")
    try:
        meta = json.loads((d / "meta.json").read_text())
        clip_fps = float(meta["fps"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{d / 'meta.json'}: needs {{'fps', 'size', 'source'}} ({err!r})") from None
    if fps is not None and clip_fps != fps:
        raise ValueError(f"{d / 'meta.json'}: fps {clip_fps}, the run expects {fps}")
    source = frame_source(d)
    T = count_frames(source)
    poses = np.load(d / "poses.npy", mmap_mode="r")
    if poses.shape != (T, 134, 3):
        raise ValueError(f"{d / 'poses.npy'}: shape {poses.shape}, expected ({T}, 134, 3) for {T} frames (DWPose 134 layout)")
    try:
        boxes = json.loads((d / "faces.json").read_text())["boxes"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{d / 'faces.json'}: expected {{'boxes': [[x0, y0, x1, y1] or null, ...]}} ({err!r})") from None
    if len(boxes) != T or any(b is not None and len(b) != 4 for b in boxes):
        raise ValueError(f"{d / 'faces.json'}: {len(boxes)} boxes for {T} frames (one [x0, y0, x1, y1] or null per frame)")
    if all(b is None for b in boxes):
        raise ValueError(f"{d / 'faces.json'}: no frame has a face box (the reference frame needs one)")
    import soundfile
    try:
        info = soundfile.info(str(d / "audio.wav"))
    except RuntimeError as err:
        raise ValueError(f"{d / 'audio.wav'}: cannot read audio ({err})") from None
    if info.duration < T / clip_fps - 1e-3:
        raise ValueError(f"{d / 'audio.wav'}: {info.duration:.3f} s of audio is shorter than the {T} frames ({T / clip_fps:.3f} s at {clip_fps:g} fps)")
    feats = d / "music_feats.npy"
    if feats.is_file():
        shape = np.load(feats, mmap_mode="r").shape
        if len(shape) != 2 or shape[0] != T:
            raise ValueError(f"{feats}: shape {shape}, expected ({T}, D) for {T} frames")
    return {"dir": d, "T": T, "fps": clip_fps, "source": source, "boxes": boxes, "sr": info.samplerate}


def cache_music_features(d, fps, T):
    """music_feats.npy of a clip of T frames, computed from audio.wav (EDGE 35-d) and cached if missing."""
    d = Path(d)
    path = d / "music_feats.npy"
    if not path.is_file():
        audio, sr = read_audio(d / "audio.wav")
        try:
            feats = music_features(audio, sr, fps, T)
        except (ValueError, AssertionError) as err:
            raise ValueError(f"{d / 'audio.wav'}: {err}") from None
        np.save(path, feats)
    return np.load(path)


def crop_box(image, box, size):
    """Square crop around a normalised [x0, y0, x1, y1] box (its larger side), bilinear, -> (3, size, size)."""
    x0, y0, x1, y1 = box
    cx, cy, half = (x0 + x1) / 2, (y0 + y1) / 2, max(x1 - x0, y1 - y0) / 2
    # affine_grid works in [-1, 1] image coordinates: x_n = 2 x - 1
    theta = torch.tensor([[2 * half, 0, 2 * cx - 1], [0, 2 * half, 2 * cy - 1]], dtype=image.dtype)[None]  # (1, 2, 3)
    grid = F.affine_grid(theta, (1, 3, size, size), align_corners=False)  # (1, size, size, 2)
    return F.grid_sample(image[None], grid, mode="bilinear", padding_mode="border", align_corners=False)[0]


class DanceClipDataset(torch.utils.data.Dataset):
    """Windows of dance clips. Each item: music [W, D], poses [W, J, 3] (the first J points of the
    134 layout), a reference frame (a random frame with a face box, or `ref_frame` when >= 0) with
    its pose [J, 3] and its face crop [3, 112, 112] in [0, 1]. Windows start at random per (seed,
    epoch, index), or at `start` when >= 0. Every clip is checked when the dataset is built."""

    def __init__(self, list_file, window, joints="body_feet24", fps=DANCE_FPS, seed=0, start=-1, ref_frame=-1, face_size=112):
        if joints not in JOINT_SETS:
            raise ValueError(f"joints={joints!r}: expected one of {list(JOINT_SETS)}")
        self.clips = [check_clip(d, fps) for d in read_list_file(list_file)]
        if not self.clips:
            raise ValueError(f"{list_file}: no clips listed")
        short = [str(c["dir"]) for c in self.clips if c["T"] < window]
        if short:
            raise ValueError(f"clips shorter than the window of {window} frames: {short}")
        self.feats = [cache_music_features(c["dir"], fps, c["T"]) for c in self.clips]  # [T, D] each
        widths = {f.shape[1] for f in self.feats}
        if len(widths) != 1:
            raise ValueError(f"{list_file}: clips have music features of different widths {sorted(widths)}")
        self.music_dim, self.J, self.window, self.fps = widths.pop(), JOINT_SETS[joints], window, fps
        self.poses = [np.load(c["dir"] / "poses.npy")[:, : self.J].astype(np.float32) for c in self.clips]
        self.seed, self.start, self.ref_frame, self.face_size, self.epoch = seed, start, ref_frame, face_size, 0

    def __len__(self):
        return len(self.clips)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __getitem__(self, key):
        idx, epoch = key if isinstance(key, tuple) else (key, self.epoch)  # StepSampler passes (index, epoch)
        clip = self.clips[idx]
        rng = np.random.default_rng((self.seed, epoch, idx))
        start = self.start if self.start >= 0 else int(rng.integers(0, clip["T"] - self.window + 1))
        with_face = [i for i, b in enumerate(clip["boxes"]) if b is not None]
        ref = self.ref_frame if self.ref_frame >= 0 else int(with_face[rng.integers(len(with_face))])
        if clip["boxes"][ref] is None:
            raise ValueError(f"{clip['dir'] / 'faces.json'}: reference frame {ref} has no face box")
        image = read_frame(clip["source"], ref)  # (3, H, W)
        return {"music": torch.from_numpy(self.feats[idx][start: start + self.window]),  # (W, D)
                "poses": torch.from_numpy(self.poses[idx][start: start + self.window]),  # (W, J, 3)
                "ref_pose": torch.from_numpy(self.poses[idx][ref]),  # (J, 3)
                "face": crop_box(image, clip["boxes"][ref], self.face_size),  # (3, 112, 112)
                "ref_image": image, "start": start, "index": idx}


# --- toy dancers: stick figures whose motion is locked to procedurally generated music


def toy_dancer(rng):
    """A dancer's identity and style (fixed over all its clips): body proportions, clothing, a
    textured face, and which limbs move on the beats / off the beats / not at all."""
    modes = rng.choice(["on", "off", "still"], size=4, p=[0.4, 0.4, 0.2])  # right arm, left arm, right leg, left leg
    modes[rng.integers(2)] = rng.choice(["on", "off"])  # at least one arm dances
    return dict(
        scale=rng.uniform(0.85, 1.0), shoulder=rng.uniform(0.075, 0.1), hip=rng.uniform(0.04, 0.055),
        torso=rng.uniform(0.22, 0.27), upper_arm=rng.uniform(0.11, 0.14), fore_arm=rng.uniform(0.1, 0.13),
        thigh=rng.uniform(0.14, 0.17), shin=rng.uniform(0.14, 0.17), head=rng.uniform(0.065, 0.08),
        modes=list(modes), arm_base=rng.uniform(0.1, 0.5, 2), arm_amp=rng.uniform(0.6, 1.4, 2) * rng.choice([-1, 1], 2),
        elbow=rng.uniform(0.2, 1.2, 2), leg_amp=rng.uniform(0.15, 0.45, 2), sway=rng.uniform(0.0, 0.04),
        bounce=rng.uniform(0.005, 0.025), bounce_mode=rng.choice(["on", "off"]),
        shirt=rng.uniform(0.1, 0.9, 3), trousers=rng.uniform(0.05, 0.6, 3), skin=rng.uniform(0.45, 0.95) * np.array([1.0, 0.8, 0.65]),
        face_base=rng.uniform(0.2, 1.0, 3), face_stripe=rng.uniform(0.0, 0.8, 3), face_freq=rng.uniform(0.6, 1.6),
        face_angle=rng.uniform(0, np.pi), face_spot=rng.uniform(-0.5, 0.5, 2))


def toy_music(rng, seconds, sr):
    """Kick on every beat (louder on the bar's first beat), hi-hat on the off-beats and one melody
    note per beat, at a random tempo of 90-140 BPM. Returns audio [N] and the beat phase function."""
    bpm = rng.uniform(90, 140)
    period, offset = 60 / bpm, rng.uniform(0, 60 / bpm)  # first beat of a bar at t = offset (+ k bars)
    t = np.arange(int(seconds * sr)) / sr
    phase = (t - offset) / period  # in beats
    k = np.floor(phase).astype(int)  # the beat each sample belongs to (negative before the offset)
    tau = (phase - k) * period  # seconds since that beat
    accent = np.where(k % 4 == 0, 1.0, 0.6)
    noise = rng.standard_normal(len(t))
    # the kick carries a broadband click so that onset detection (mel spectral flux) hears the beat
    kick = accent * (np.exp(-tau / 0.06) * np.sin(2 * np.pi * 60 * tau * (1 + 2 * np.exp(-tau / 0.02)))
                     + 0.6 * np.exp(-tau / 0.01) * noise)
    tau_half = ((phase + 0.5) % 1) * period  # seconds since the last off-beat
    hihat = 0.03 * np.exp(-tau_half / 0.008) * noise  # quiet, or the beat tracker locks onto the off-beats
    scale = 220 * 2 ** (np.array([0, 2, 4, 7, 9, 12, 14, 16]) / 12)  # pentatonic
    notes = scale[rng.integers(0, len(scale), size=k.max() - k.min() + 1)][k - k.min()]
    melody = 0.25 * accent * np.exp(-tau / 0.25) * (np.sin(2 * np.pi * notes * tau) + 0.3 * np.sin(4 * np.pi * notes * tau))
    audio = (kick + hihat + melody) * 0.5
    return audio.astype(np.float32), bpm, offset


def pulse(phase, mode):
    """A 1-beat move: 0 on the beats and 1 halfway between them ('on'), or the other way round
    ('off'). Either way its speed is zero on the beats (a dancer hits the pose on the beat), so the
    music beats are motion beats (so are the half-beats, which the beat alignment score allows)."""
    if mode == "still":
        return np.zeros_like(phase)
    return (1 - np.cos(2 * np.pi * (phase + (0.5 if mode == "off" else 0.0)))) / 2


def toy_poses(dancer, phase):
    """Forward kinematics of the stick dancer over time -> poses [T, 134, 3] (body 18 + feet 6
    visible, face and hands invisible) and the head circle [T, 3] (cx, cy, r), all normalised."""
    s, T = dancer["scale"], len(phase)
    P = np.zeros((T, 134, 3))

    def limb(start, angle, length, side):  # angle from straight down, positive = away from the body
        return start + length * s * np.stack([side * np.sin(angle), np.cos(angle)], -1)

    sway = dancer["sway"] * np.cos(np.pi * phase)  # 2-beat side-to-side, turning on the beats
    bounce = dancer["bounce"] * pulse(phase, dancer["bounce_mode"])
    legs = dancer["thigh"] + dancer["shin"]
    hip_c = np.stack([0.5 + sway, 0.9 - legs * s - 0.02 + bounce], -1)  # (T, 2)
    neck = hip_c + np.stack([0.4 * sway, -dancer["torso"] * s * np.ones(T)], -1)
    P[:, 1, :2] = neck
    for j, side, (sh, el, wr), (hp, kn, an) in ((0, -1, (2, 3, 4), (8, 9, 10)), (1, 1, (5, 6, 7), (11, 12, 13))):
        P[:, sh, :2] = neck + np.stack([side * dancer["shoulder"] * s * np.ones(T), 0.01 * np.ones(T)], -1)
        g = pulse(phase, dancer["modes"][j])
        up = dancer["arm_base"][j] + dancer["arm_amp"][j] * g
        P[:, el, :2] = limb(P[:, sh, :2], up, dancer["upper_arm"], side)
        P[:, wr, :2] = limb(P[:, el, :2], up + dancer["elbow"][j] * (0.5 + g), dancer["fore_arm"], side)
        P[:, hp, :2] = hip_c + np.stack([side * dancer["hip"] * s * np.ones(T), np.zeros(T)], -1)
        gl = pulse(phase, dancer["modes"][2 + j])
        thigh = 0.06 + dancer["leg_amp"][j] * gl
        P[:, kn, :2] = limb(P[:, hp, :2], thigh, dancer["thigh"], side)
        P[:, an, :2] = limb(P[:, kn, :2], thigh - 1.5 * dancer["leg_amp"][j] * gl, dancer["shin"], side)
    r = dancer["head"] * s
    head = neck + np.stack([0.3 * sway, -np.full(T, 1.25 * r)], -1)
    for i, (dx, dy) in zip((0, 14, 15, 16, 17), ((0, 0.15), (-0.35, -0.1), (0.35, -0.1), (-0.95, 0), (0.95, 0))):
        P[:, i, :2] = head + r * np.array([dx, dy])
    for i, ank, side in ((18, 13, 1), (21, 10, -1)):  # big toe, small toe, heel of each foot
        P[:, i, :2] = P[:, ank, :2] + s * np.array([side * 0.035, 0.02])
        P[:, i + 1, :2] = P[:, ank, :2] + s * np.array([side * 0.02, 0.025])
        P[:, i + 2, :2] = P[:, ank, :2] + s * np.array([-side * 0.012, 0.015])
    P[:, :24, 2] = 1.0
    return P.astype(np.float32), np.concatenate([head, np.full((T, 1), r)], -1).astype(np.float32)


def face_texture(dancer, radius_px):
    """The dancer's face as an RGBA patch (a disk of radius_px pixels): stripes at the dancer's
    angle and frequency between two colours, and a dark spot; this is the identity a recognizer sees."""
    n = 2 * int(np.ceil(radius_px)) + 2
    c = (np.arange(n) + 0.5 - n / 2) / radius_px  # in head radii
    v, u = np.meshgrid(c, c, indexing="ij")  # (n, n): rows are y, columns x
    ang = dancer["face_angle"]
    stripes = (0.5 + 0.5 * np.sin(2 * np.pi * dancer["face_freq"] * (u * np.cos(ang) + v * np.sin(ang))))[..., None]
    rgb = dancer["face_base"] * (1 - stripes) + dancer["face_stripe"] * stripes  # (n, n, 3)
    rgb = rgb * (((u - dancer["face_spot"][0]) ** 2 + (v - dancer["face_spot"][1]) ** 2) >= 0.12)[..., None]
    alpha = np.clip((1 - np.sqrt(u * u + v * v)) * radius_px + 0.5, 0, 1)[..., None]  # anti-aliased rim
    return Image.fromarray((np.concatenate([rgb, alpha], -1) * 255 + 0.5).astype(np.uint8), "RGBA")


def render_dancer(dancer, poses, head, size, bg, supersample=4):
    """Frames [T, size, size, 3] uint8: trousers, shirt, skin-coloured forearms and the textured
    face, drawn with PIL at `supersample` x the size and box-filtered down (anti-aliasing)."""
    from PIL import ImageDraw
    S = size * supersample
    w = max(1.5, size / 18) * supersample  # limb thickness in supersampled pixels
    rgb = lambda c: tuple(int(255 * x + 0.5) for x in c)  # noqa: E731
    parts = [([(8, 9), (9, 10), (11, 12), (12, 13), (10, 21), (13, 18), (8, 11)], w, rgb(dancer["trousers"])),
             ([(1, 8), (1, 11), (8, 11), (1, 2), (1, 5), (2, 3), (5, 6)], w * 1.3, rgb(dancer["shirt"])),
             ([(3, 4), (6, 7)], w * 0.8, rgb(dancer["skin"]))]
    face = face_texture(dancer, head[0, 2] * S)  # the head radius is constant per dancer
    P = poses[:, :, :2] * S  # (T, 134, 2) in supersampled pixels (pixel centres at i + 0.5 on both grids)
    frames = np.empty((len(P), size, size, 3), np.uint8)
    for t in range(len(P)):
        im = Image.new("RGB", (S, S), rgb(bg))
        draw = ImageDraw.Draw(im)
        for pairs, width, colour in parts:
            for i, j in pairs:
                draw.line([tuple(P[t, i]), tuple(P[t, j])], fill=colour, width=int(round(width)))
                for k in (i, j):  # round joints
                    draw.ellipse([*(P[t, k] - width / 2), *(P[t, k] + width / 2)], fill=colour)
        corner = np.round(head[t, :2] * S - face.size[0] / 2).astype(int)
        im.paste(face, tuple(corner.tolist()), face)
        frames[t] = np.asarray(im.resize((size, size), Image.BOX))
    return frames


def write_toy_dance(out, n=100, n_dancers=20, seconds=8.0, size=64, fps=DANCE_FPS, n_val=None, seed=0, progress=True):
    """n toy clips (dancer i % n_dancers, each clip with its own music) in the clip format, with
    music features cached, data_train.txt / data_val.txt (the last n_val clips) and preview.png."""
    import soundfile
    from tqdm import tqdm
    out, sr, T = Path(out), fps * HOP, int(round(seconds * fps))
    n_val = max(1, n // 10) if n_val is None else n_val
    dancers = [toy_dancer(np.random.default_rng((seed, 1_000_000 + k))) for k in range(n_dancers)]
    names = []
    for i in tqdm(range(n), desc=f"toy dance -> {out}", disable=not progress):
        rng = np.random.default_rng((seed, i))
        audio, bpm, offset = toy_music(rng, seconds + 0.1, sr)  # a little longer than the frames
        phase = (np.arange(T) / fps - offset) * bpm / 60  # beats at each frame
        dancer = dancers[i % n_dancers]
        poses, head = toy_poses(dancer, phase)
        frames = render_dancer(dancer, poses, head, size, rng.uniform(0.8, 1.0, 3))
        d = out / f"clip_{i:05d}"
        (d / "frames").mkdir(parents=True, exist_ok=True)
        for t in range(T):
            Image.fromarray(frames[t]).save(d / "frames" / f"{t:06d}.png", compress_level=1)
        soundfile.write(str(d / "audio.wav"), audio, sr, subtype="PCM_16")
        np.save(d / "poses.npy", poses)
        boxes = np.concatenate([head[:, :2] - head[:, 2:], head[:, :2] + head[:, 2:]], 1)  # (T, 4) x0 y0 x1 y1
        (d / "faces.json").write_text(json.dumps({"boxes": np.round(boxes, 5).tolist()}))
        (d / "meta.json").write_text(json.dumps({"fps": fps, "size": [size, size], "source": "toy", "dancer": i % n_dancers,
                                                  "bpm": round(bpm, 3), "first_beat_s": round(offset, 4)}))
        np.save(d / "music_feats.npy", music_features(read_audio(d / "audio.wav")[0], sr, fps, T))  # from the 16-bit WAV, as a re-computation would
        names.append(d.name)
    (out / "data_train.txt").write_text("\n".join(names[: n - n_val]) + "\n")
    (out / "data_val.txt").write_text("\n".join(names[n - n_val:]) + "\n")
    rows = [torch.stack([read_frame(("png", sorted((out / nm / "frames").glob("*.png"))), t) for t in range(0, T, T // 8)][:8])
            for nm in names[:6]]
    save_image_grid(rows, out / "preview.png")
    return out

# (end of section: Dance data: clip format, toy dancers with music, music features)


def _main(argv):
    import argparse
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("toy_mice", help="write the toy mouse dataset and preview.png")
    t.add_argument("--out", default="data/toy_mice")
    t.add_argument("--n", type=int, default=200)
    t.add_argument("--rig", default="mouse_6view")
    t.add_argument("--size", type=int, default=64)
    t.add_argument("--n_extra", type=int, default=4, help="random extra views per sample")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--yaw_deg", type=float, default=None, help="mice face +x +- this many degrees (default: any way)")
    sub.add_parser("make_rigs", help=f"(re)write the built-in rigs {list(BUILTIN_RIGS)} into {RIGS_DIR}")
    r = sub.add_parser("rig_from_cameras", help="make a rig file from a sample's opencv_cameras.json")
    r.add_argument("cameras")
    r.add_argument("--name", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--views", default=None, help="comma-separated frame indices, in rig order (default: all)")
    r.add_argument("--prompt_embeds", default="")
    dn = sub.add_parser("toy_dance", help="write the toy dance clips (stick dancers with music) and preview.png")
    dn.add_argument("--out", default="data/toy_dance")
    dn.add_argument("--n", type=int, default=100)
    dn.add_argument("--seconds", type=float, default=8.0)
    dn.add_argument("--size", type=int, default=64)
    dn.add_argument("--seed", type=int, default=0)
    e = sub.add_parser("rig_prompt_embeds", help="per-view prompt embeddings [V, 77, D] for a rig, from a local CLIP text encoder")
    e.add_argument("--rig", required=True)
    e.add_argument("--text_encoder", required=True, help="a CLIPTextModel folder (e.g. an SD 2.1 pipeline's text_encoder/)")
    e.add_argument("--tokenizer", default=None, help="CLIPTokenizer folder (default: tokenizer/ beside the text encoder)")
    e.add_argument("--prompts", default=None, help="'|'-separated view words in rig order (default: the rig's view names)")
    e.add_argument("--out", required=True)
    a = p.parse_args(argv)
    if a.cmd == "toy_dance":
        out = write_toy_dance(a.out, a.n, seconds=a.seconds, size=a.size, seed=a.seed)
        print(f"wrote {a.n} clips to {out}; preview: {out / 'preview.png'}")
    elif a.cmd == "toy_mice":
        out = write_toy_mice(a.out, a.n, a.rig, a.size, a.n_extra, seed=a.seed, yaw_deg=a.yaw_deg)
        print(f"wrote {a.n} samples to {out}; preview: {preview_samples(out / 'data_train.txt', out / 'preview.png')}")
    elif a.cmd == "make_rigs":
        for name, spec in BUILTIN_RIGS.items():
            (RIGS_DIR / f"{name}.json").write_text(json.dumps(make_ring_rig(name, **spec), indent=1))
            print(f"wrote {RIGS_DIR / name}.json")
    elif a.cmd == "rig_prompt_embeds":
        rig = load_rig(a.rig)
        names = rig["views"] if a.prompts is None else a.prompts.split("|")
        if len(names) != len(rig["frames"]):
            raise SystemExit(f"--prompts gives {len(names)} views, rig {rig['name']!r} has {len(rig['frames'])}")
        pe = clip_prompt_embeds(rig_view_prompts(dict(rig, views=names)), a.text_encoder, a.tokenizer)
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        torch.save(pe, a.out)
        print(f"wrote prompt embeddings {tuple(pe.shape)} for rig {rig['name']!r} to {a.out}")
    else:
        views = None if a.views is None else [int(v) for v in a.views.split(",")]
        rig = rig_from_cameras(read_cameras(a.cameras), a.name, views, a.prompt_embeds)
        Path(a.out).write_text(json.dumps(rig, indent=1))
        print(f"wrote rig {a.name!r} with {len(rig['frames'])} views to {a.out}")


if __name__ == "__main__":
    _main(sys.argv[1:])
