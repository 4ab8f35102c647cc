"""Cameras and rigs: FaceLift's camera files (opencv_cameras.json) and their checks (conventions, the
rig mismatch check), the rigs in configs/rigs/, and the prompt embeddings that belong to a rig. The
command line that writes rigs and prompt files is data.py's.
"""
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from models import look_at_c2w
from plumbing import InputError

RIGS_DIR = Path(__file__).resolve().parent / "configs" / "rigs"


# ----------------------------------------------------------------------------------------------
# Camera files (FaceLift's opencv_cameras.json) and rigs

FRAME_KEYS = ("w", "h", "fx", "fy", "cx", "cy", "w2c")


def read_cameras(path):
    """opencv_cameras.json -> the dict as stored (extra keys kept), after checking every frame."""
    path = Path(path)
    try:
        cams = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(f"{path}: cannot read camera file ({err})") from None
    if not isinstance(cams, dict) or not isinstance(cams.get("frames"), list) or not cams["frames"]:
        raise InputError(f"{path}: expected {{'id': ..., 'frames': [...]}} with at least one frame")
    check_frames(cams["frames"], path)
    return cams


def check_frames(frames, path):
    """Every camera frame: the keys, a finite rigid w2c, finite intrinsics with fx, fy > 0."""
    for i, fr in enumerate(frames):
        missing = [k for k in FRAME_KEYS if k not in fr]
        if missing:
            raise InputError(f"{path}: frame {i} lacks keys {missing} (needs {list(FRAME_KEYS)})")
        try:
            w2c = np.asarray(fr["w2c"], dtype=np.float64)
        except (TypeError, ValueError):  # ragged or not numbers
            w2c = np.zeros(0)
        if w2c.shape != (4, 4) or not np.isfinite(w2c).all():
            raise InputError(f"{path}: frame {i} w2c must be a finite 4x4 matrix, got {fr['w2c']}")
        R = w2c[:3, :3]
        if np.abs(R @ R.T - np.eye(3)).max() > 1e-3 or np.abs(w2c[3] - [0, 0, 0, 1]).max() > 1e-6:
            raise InputError(f"{path}: frame {i} w2c is not a rigid transform (rotation must be "
                             f"orthonormal, last row 0 0 0 1): {fr['w2c']}")
        if np.linalg.det(R) < 0:  # orthonormal with det -1: one axis flipped, a mirror image of the world
            raise InputError(f"{path}: frame {i} w2c rotation has det -1 (a mirrored camera: one axis "
                             "flipped); OpenCV cameras are right-handed (x right, y down, z forward)")
        intr = [fr[k] for k in ("fx", "fy", "cx", "cy")]
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in intr) or not min(intr[:2]) > 0:
            raise InputError(f"{path}: frame {i} needs finite intrinsics with fx, fy > 0, got {intr}")
    centres, dirs = centre_rays(frames)
    target = meeting_point(centres, dirs)
    if target is not None and (behind := (((target - centres) * dirs).sum(-1) <= 0).nonzero()[:, 0].tolist()):
        who = "every camera faces" if len(behind) == len(frames) else f"frames {behind} face"
        at = [round(v, 2) for v in target.tolist()]
        raise InputError(f"{path}: {who} away from the point the cameras look at {at}: an OpenGL file "
                         "(camera looking down -z)? convert it: c2w_cv = c2w_gl @ diag(1, -1, -1, 1)")


def write_cameras(path, cams):
    Path(path).write_text(json.dumps(cams, indent=1))


def frames_to_tensors(frames, size=None):
    """Frames -> w2c (V, 4, 4) and fxfycxcy (V, 4), intrinsics scaled to a `size` x `size` image."""
    w2c = torch.tensor([fr["w2c"] for fr in frames], dtype=torch.float32)  # (V, 4, 4)
    K = torch.tensor([[fr["fx"], fr["fy"], fr["cx"], fr["cy"]] for fr in frames],
                     dtype=torch.float32)  # (V, 4)
    if size is not None:
        wh = torch.tensor([[fr["w"], fr["h"], fr["w"], fr["h"]] for fr in frames], dtype=torch.float32)
        K = K * size / wh
    return w2c, K


def make_frame(c2w, size, fx, fy=None, cx=None, cy=None, **extra):
    """One opencv_cameras.json frame from a camera-to-world matrix."""
    w2c = torch.linalg.inv(torch.as_tensor(c2w, dtype=torch.float64)).tolist()
    return {"w": size, "h": size, "fx": fx, "fy": fy or fx, "cx": size / 2 if cx is None else cx,
            "cy": size / 2 if cy is None else cy, "w2c": [[round(v, 8) for v in row] for row in w2c], **extra}


def orbit_c2w(azimuth_deg, elevation_deg, radius, target=(0.0, 0.0, 0.0)):
    """World z-up orbit camera at (r cos el cos az, r cos el sin az, r sin el) around `target`."""
    az, el = math.radians(azimuth_deg), math.radians(elevation_deg)
    eye = [radius * math.cos(el) * math.cos(az) + target[0], radius * math.cos(el) * math.sin(az) + target[1],
           radius * math.sin(el) + target[2]]
    return look_at_c2w(eye, target)


def make_rig(name, views, azimuths, elevations, distances, prompt_embeds, description,
             target=(0.0, 0.0, 0.0), size=512, focal=548.99, **extra):
    """A rig whose view i sits at azimuths[i], elevations[i] (deg), distances[i] from `target`, aimed at
    it; `focal` in px at `size`. Extra keys (e.g. prompt_embeds_sha256) go into the rig unchanged."""
    frames = [make_frame(orbit_c2w(az, el, r, target), size, focal)
              for az, el, r in zip(azimuths, elevations, distances, strict=True)]
    return {"name": name, "description": description, "prompt_embeds": prompt_embeds, **extra,
            "views": list(views), "frames": frames}


# The rigs in configs/rigs/ (docs/formats.md), written by `python data.py make_rigs`.
BUILTIN_RIGS = {
    "facelift_6view": dict(views=["front", "front_right", "right", "back", "left", "front_left"],
        azimuths=[-90, -135, 180, 90, 0, -45], elevations=[0] * 6, distances=[2.7] * 6,
        prompt_embeds="mvdiffusion/data/fixed_prompt_embeds_6view/clr_embeds.pt",
        # FaceLift's file is a bare tensor that records no rig: this rig names it by its content
        prompt_embeds_sha256="b9e51666588d0f075e031262744d371e12076160231aab19a531dbf7ab976e4d",
        description="FaceLift's 6 multi-view diffusion views: elevation 0, "
                    "azimuth offsets from the front 0, -45, -90, 180, +90, +45 deg"),
    # measured from the set-up's camera file (FaceLift's camera space); names: azimuths about the origin
    "mouse_6view": dict(
        views=["cam0_az-145", "cam1_az+32", "cam2_az+97", "cam3_az-24", "cam4_az+158", "cam5_az-79"],
        azimuths=[-144.0, 31.2, 94.6, -22.6, 156.7, -76.5], elevations=[0.7, 15.0, 2.2, 0.7, 15.3, 18.3],
        distances=[2.67, 2.92, 2.70, 2.66, 2.74, 2.71], target=(-0.11, -0.02, -0.42),
        prompt_embeds="mvdiffusion/data/mouse_prompt_embeds_6view/clr_embeds.pt",
        description="a published 6-camera mouse set-up's measured geometry, in the capture's camera order: "
                    "cameras aim at (-0.11, -0.02, -0.42); seen from there azimuths -144.0, 31.2, 94.6, -22.6, "
                    "156.7, -76.5 deg (about the origin -145, 32, 97, -24, 158, -79), elevations 0.7, 15.0, 2.2, "
                    "0.7, 15.3, 18.3 deg, distances 2.67, 2.92, 2.70, 2.66, 2.74, 2.71; fx/w 1.072"),
}


def rig_from_cameras(cams, name, views=None, prompt_embeds="", description=""):
    """A rig from a real sample's cameras (as read_cameras returns them); `views` picks and orders frames."""
    idx = list(range(len(cams["frames"]))) if views is None else list(views)
    frames = [{k: cams["frames"][i][k] for k in FRAME_KEYS} for i in idx]
    description = description or f"made from {cams.get('id', 'a sample')}, frames {idx}"
    return {"name": name, "description": description, "prompt_embeds": prompt_embeds,
            "views": [f"view{i}" for i in idx], "frames": frames}


def load_rig(name_or_path):
    """A rig by name (configs/rigs/<name>.json) or path."""
    path = Path(name_or_path) if Path(name_or_path).suffix else RIGS_DIR / f"{name_or_path}.json"
    if not path.exists():
        known = sorted(p.stem for p in RIGS_DIR.glob("*.json"))
        raise FileNotFoundError(f"rig {name_or_path!r} not found ({path}); rigs in {RIGS_DIR}: {known}")
    try:
        rig = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(f"{path}: cannot read rig file ({err})") from None
    for key in ("name", "frames", "views", "prompt_embeds"):
        if not isinstance(rig, dict) or key not in rig:
            raise InputError(f"{path}: rig lacks key {key!r}")
    check_frames(rig["frames"], path)
    return rig


def centre_rays(frames):
    """Camera centres (V, 3) and unit rays through the image centres (V, 3): what each view looks at.
    A crop moves the principal point, not the view, so the ray is through (w/2, h/2), not the optical axis."""
    c2w = torch.linalg.inv(torch.tensor([fr["w2c"] for fr in frames], dtype=torch.float64))  # (V, 4, 4)
    d_cam = torch.tensor([[(fr["w"] / 2 - fr["cx"]) / fr["fx"], (fr["h"] / 2 - fr["cy"]) / fr["fy"], 1.0]
                          for fr in frames], dtype=torch.float64)  # (V, 3)
    d = F.normalize((c2w[:, :3, :3] @ d_cam[:, :, None])[:, :, 0], dim=-1)  # (V, 3)
    return c2w[:, :3, 3], d


def meeting_point(centres, dirs):
    """The least-squares meeting point (3,) of rays (centres, unit dirs), or None when they are parallel."""
    P = torch.eye(3, dtype=torch.float64) - dirs[:, :, None] * dirs[:, None, :]  # (V, 3, 3) projectors
    if len(dirs) < 2 or torch.linalg.matrix_rank(P.sum(0)) < 3:
        return None
    return torch.linalg.lstsq(P.sum(0), (P @ centres[:, :, None]).sum(0)).solution[:, 0]  # (3,)


def camera_geometry(frames):
    """Per view: azimuth, elevation (deg) and distance seen from the point the cameras look at (the least-
    squares meeting point of their image-centre rays; real rigs aim below the origin), normalised intrinsics."""
    centres, axes = centre_rays(frames)
    target = meeting_point(centres, axes)
    if target is None:
        target = torch.zeros(3, dtype=torch.float64)  # parallel axes meet nowhere: use the origin
    dist = (centres - target).norm(dim=-1)  # (V,)
    d = (centres - target) / dist[:, None]  # (V, 3) unit directions
    intr = torch.tensor([[fr["fx"] / fr["w"], fr["fy"] / fr["h"], fr["cx"] / fr["w"], fr["cy"] / fr["h"]]
                         for fr in frames])  # (V, 4)
    az, el = torch.rad2deg(torch.atan2(d[:, 1], d[:, 0])), torch.rad2deg(torch.asin(d[:, 2].clamp(-1, 1)))
    aim = torch.rad2deg(torch.acos((-d * axes).sum(-1).clamp(-1, 1)))  # (V,) image centre to target, deg
    return {"dirs": d, "az": az, "el": el, "dist": dist, "intr": intr, "target": target, "aim": aim}


def rig_mismatch(rig, frames, tol_deg=8.0, radius_rtol=0.1, intr_rtol=0.05):
    """How cameras `frames` (opencv frames in view order) differ from `rig`, as text, or None. Directions
    are seen from the point each camera set looks at, so a few degrees of jitter pass; that point must be
    the rig's (GS-LRM reads rays relative to the world origin). The principal point may move (a crop)."""
    name = rig.get("name", "rig")
    if len(frames) != len(rig["frames"]):
        return f"{len(frames)} cameras, but rig {name!r} has {len(rig['frames'])} views ({rig['views']})"
    a, b = camera_geometry(frames), camera_geometry(rig["frames"])
    angle = torch.rad2deg(torch.acos((a["dirs"][:, None] * b["dirs"][None]).sum(-1).clamp(-1, 1)))  # (V, V)
    fmt = lambda g, i: f"az {g['az'][i]:+.0f} el {g['el'][i]:+.0f}"  # noqa: E731
    problems = []
    if (angle.diagonal() > tol_deg).any():
        best = angle.argmin(1)
        if sorted(best.tolist()) == list(range(len(frames))) and (angle.min(1).values <= tol_deg).all():
            swaps = [f"camera {i} looks like rig view {j} ({rig['views'][j]})"
                     for i, j in enumerate(best.tolist()) if i != j]
            problems.append("views are in another order than the rig's: " + ", ".join(swaps))
        elif (a["el"] - b["el"]).abs().mean() > tol_deg:
            problems.append(f"elevation: cameras at {[round(v) for v in a['el'].tolist()]} deg, "
                            f"rig {name!r} at {[round(v) for v in b['el'].tolist()]} deg")
        else:
            problems.append("viewing directions differ by more than {:.0f} deg: ".format(tol_deg) + "; ".join(
                f"view {i} ({rig['views'][i]}): cameras {fmt(a, i)}, rig {fmt(b, i)}"
                for i in range(len(frames)) if angle[i, i] > tol_deg))
    if ((a["dist"] - b["dist"]).abs() / b["dist"] > radius_rtol).any():
        problems.append(f"camera distance {[round(v, 2) for v in a['dist'].tolist()]} "
                        f"vs rig {[round(v, 2) for v in b['dist'].tolist()]}")
    if (bad := ((a["aim"] - b["aim"]).abs() > tol_deg).nonzero()[:, 0].tolist()):
        problems.append(f"views {bad} are centred {[round(a['aim'][i].item()) for i in bad]} deg away from the "
                        "point the cameras look at (cx, cy set to the image centre after a crop?)")
    shift = a["target"] - b["target"]
    if shift.norm() > radius_rtol * b["dist"].mean():
        problems.append(f"the cameras look at {[round(v, 2) for v in a['target'].tolist()]}, rig {name!r} at "
                        f"{[round(v, 2) for v in b['target'].tolist()]}: the world is translated by "
                        f"{[round(v, 2) for v in shift.tolist()]} (move it back)")
    off = ((a["intr"] - b["intr"])[:, :2].abs() / b["intr"][:, :2] > intr_rtol).any(1)  # (V,) focal only
    for i in off.nonzero()[:, 0].tolist():
        problems.append(f"view {i} ({rig['views'][i]}) intrinsics (fx/w, fy/h, cx/w, cy/h) "
                        f"{[round(v, 4) for v in a['intr'][i].tolist()]} vs rig "
                        f"{[round(v, 4) for v in b['intr'][i].tolist()]}")
    return None if not problems else f"cameras do not match rig {name!r}: " + "; ".join(problems)


# ----------------------------------------------------------------------------------------------
# Prompt embeddings: one file per rig, its views in rig order (docs/formats.md)

class RigMismatch(InputError):
    """Cameras or prompt embeddings made for another rig than the one a run uses."""


def camera_hash(frames):
    """A short hash of cameras' geometry (w2c, intrinsics relative to the image size): the name of a
    rig's cameras in the files made for it (prompt embeddings, checkpoints, synthetic samples)."""
    rel = (("fx", "w"), ("fy", "h"), ("cx", "w"), ("cy", "h"))
    vals = [[round(float(x), 4) + 0.0 for row in fr["w2c"] for x in row]  # + 0.0: -0.0 hashes as 0.0
            + [round(fr[k] / fr[s], 4) + 0.0 for k, s in rel] for fr in frames]
    return hashlib.sha256(json.dumps(vals).encode()).hexdigest()[:16]


def file_sha256(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def save_prompt_embeds(path, embeds, rig, prompts):
    """[V, T, D] embeddings with the rig they name (name and camera hash) and their prompts."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"embeds": embeds.contiguous(), "rig": rig["name"], "camera_hash": camera_hash(rig["frames"]),
                "prompts": list(prompts)}, path)


def load_prompt_embeds(path, rig, dim, allow_mismatch=False):
    """[V, T, D] prompt embeddings for `rig`'s V views, checked against the UNet's cross-attention width D,
    and the text why they do not belong to `rig` (None when they do). They belong when their file records
    the rig's cameras (save_prompt_embeds), or, for a bare tensor (FaceLift's clr_embeds.pt), when the rig
    JSON names the file by its sha256. Otherwise RigMismatch, unless allow_mismatch (then a warning)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt embeddings {path} not found (rig {rig['name']!r} names "
                                f"{rig['prompt_embeds']!r}); make them with "
                                "`python data.py rig_prompt_embeds` (README, phase 1)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated or not a torch file: torch raises many kinds
        raise InputError(f"{path}: cannot read prompt embeddings ({type(err).__name__}: {err})") from None
    problem = None
    if isinstance(obj, dict) and {"embeds", "rig", "camera_hash"} <= set(obj):
        pe, h = obj["embeds"], camera_hash(rig["frames"])
        if obj["camera_hash"] != h:
            problem = (f"{path} names rig {obj['rig']!r} (cameras {obj['camera_hash']}), this run's rig is "
                       f"{rig['name']!r} (cameras {h})")
    elif torch.is_tensor(obj):
        pe, sha = obj, file_sha256(path)
        if sha != rig.get("prompt_embeds_sha256"):
            owners = [p.stem for p in sorted(RIGS_DIR.glob("*.json"))
                      if json.loads(p.read_text()).get("prompt_embeds_sha256") == sha]
            hint = (f"it is rig {owners[0]!r}'s file" if owners
                    else "make them with `data.py rig_prompt_embeds`")
            problem = (f"{path} is a bare tensor that records no rig (sha256 {sha[:12]}...), and rig "
                       f"{rig['name']!r} does not name it; {hint}")
    else:
        raise InputError(f"{path}: expected prompt embeddings (a tensor [views, tokens, dim], or the dict "
                         f"save_prompt_embeds writes), got {type(obj).__name__}")
    if problem and not allow_mismatch:
        raise RigMismatch(f"{problem}: views would be named for other cameras than they show "
                          "(--allow_rig_mismatch to go on anyway; it is recorded)")
    if problem:
        print(f"WARNING (allow_rig_mismatch): {problem}")
    if not torch.is_tensor(pe) or pe.dim() != 3:
        raise InputError(f"{path}: expected a tensor [views, tokens, dim], "
                         f"got {type(pe).__name__} {getattr(pe, 'shape', '')}")
    V = len(rig["frames"])
    if pe.shape[0] != V:
        raise InputError(f"{path}: embeddings for {pe.shape[0]} views, "
                         f"rig {rig['name']!r} has {V} ({rig['views']})")
    if pe.shape[2] != dim:
        raise InputError(f"{path}: embedding width {pe.shape[2]}, the UNet's cross-attention width is {dim} "
                         "(SD 2.1 / FaceLift: 1024, OpenCLIP ViT-H/14; 768 means CLIP ViT-L/14 embeddings, "
                         "which this UNet cannot read)")
    if not torch.isfinite(pe).all():
        raise InputError(f"{path}: non-finite value at index {(~torch.isfinite(pe)).nonzero()[0].tolist()}")
    return pe.float(), problem


def rig_view_prompts(rig, template="a rendering image of 3D models, {view} view, color map."):
    """One text prompt per rig view (Era3D/FaceLift's wording), from the rig's view names."""
    return [template.format(view=v.replace("_", " ")) for v in rig["views"]]


@torch.no_grad()
def clip_prompt_embeds(prompts, text_encoder_dir, tokenizer_dir=None):
    """Per-view prompt embeddings [V, 77, D] from local CLIPTextModel + CLIPTokenizer folders (SD 2.1's
    text_encoder/, tokenizer/) as FaceLift made clr_embeds.pt: the last hidden state per padded prompt."""
    from transformers import CLIPTextModel, CLIPTokenizer
    tok_dir = tokenizer_dir or Path(text_encoder_dir).parent / "tokenizer"
    tok = CLIPTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    enc = CLIPTextModel.from_pretrained(str(text_encoder_dir), local_files_only=True).eval()
    n = enc.config.max_position_embeddings  # 77 for every CLIP text encoder
    ids = tok(list(prompts), padding="max_length", max_length=n, truncation=True,
              return_tensors="pt").input_ids  # (V, 77)
    return enc(ids).last_hidden_state.float()  # (V, 77, D)
