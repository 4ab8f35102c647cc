"""Everything that touches disk: config loading, checkpoints, camera files and rigs, datasets and
the built-in toy datasets.

Run it to make the toy mouse data and look at it:
    python data.py toy_mice --out=data/toy_mice --n=200        # FaceLift-format samples + preview.png
    python data.py rig_from_cameras SAMPLE/opencv_cameras.json --name=my_rig --out=configs/rigs/my_rig.json
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

from models import intrinsics_matrix, look_at_c2w, render_gaussians

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


def toy_mouse(rng):
    """A random mouse as Gaussian parameters (numpy): means (N, 3), scales (N, 3), quats (N, 4),
    opacities (N,), colors (N, 3). Built facing +x, then turned by a random yaw."""
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
    yaw = rng.uniform(0, 2 * np.pi)
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


def write_toy_mice(out, n=200, rig="mouse_6view", size=64, n_extra=4, n_val=None, seed=0, progress=True):
    """Write n toy mice in the FaceLift GS-LRM sample format under `out`: each sample has the
    rig's views first (cam_000..), then n_extra random views; plus data_train.txt / data_val.txt."""
    from tqdm import tqdm
    rig = load_rig(rig) if isinstance(rig, str) else rig
    out = Path(out)
    n_val = max(1, n // 10) if n_val is None else n_val
    names = []
    for i in tqdm(range(n), desc=f"toy mice -> {out}", disable=not progress):
        rng = np.random.default_rng((seed, i))
        m = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in toy_mouse(rng).items()}
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
    return out


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
    sub.add_parser("make_rigs", help=f"(re)write the built-in rigs {list(BUILTIN_RIGS)} into {RIGS_DIR}")
    r = sub.add_parser("rig_from_cameras", help="make a rig file from a sample's opencv_cameras.json")
    r.add_argument("cameras")
    r.add_argument("--name", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--views", default=None, help="comma-separated frame indices, in rig order (default: all)")
    r.add_argument("--prompt_embeds", default="")
    e = sub.add_parser("rig_prompt_embeds", help="per-view prompt embeddings [V, 77, D] for a rig, from a local CLIP text encoder")
    e.add_argument("--rig", required=True)
    e.add_argument("--text_encoder", required=True, help="a CLIPTextModel folder (e.g. an SD 2.1 pipeline's text_encoder/)")
    e.add_argument("--tokenizer", default=None, help="CLIPTokenizer folder (default: tokenizer/ beside the text encoder)")
    e.add_argument("--prompts", default=None, help="'|'-separated view words in rig order (default: the rig's view names)")
    e.add_argument("--out", required=True)
    a = p.parse_args(argv)
    if a.cmd == "toy_mice":
        out = write_toy_mice(a.out, a.n, a.rig, a.size, a.n_extra, seed=a.seed)
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
