"""Inference: one image -> the rig's 6 views (the phase-1 model) -> 3D Gaussians (the phase-3 GS-LRM).

    python sample.py --input_image mouse.png --out_dir out/sample          # the toy runs' checkpoints
    python sample.py --input_image x.png --mvdiff_checkpoint ckpt/mvdiff --gslrm_checkpoint ckpt/gslrm \\
        --out_dir out/x --reference_view 2                                  # the image shows rig view 2
    python sample.py --input_dir photos/ --reference_view 2 ...            # each image -> out_dir/<name>/
    python sample.py --views_dir data/mouse/s1_000120 --gslrm_checkpoint ckpt/gslrm   # 6 real posed views
    python sample.py --eval_list data/toy_mice_eval/data_val.txt --out_dir out/chain_eval
    python weights.py import_facelift_mvdiff --pipeline_dir=checkpoints/mvdiffusion/pipeckpts \\
        --prompt_embeds=clr_embeds.pt --out=ckpt/facelift_mvdiff           # FaceLift as released (phase 1)

Writes input.png, multiview.png (the input beside the generated views; views.png with --views_dir),
gaussians.ply (3DGS format; gaussians_mm.ply too, in the capture's millimetres, when the sample has
prepare_mouse.py's transform.json), renders.png (at the rig's cameras), turntable.mp4 (GIF without
ffmpeg) and chain.json. Gaussians are pruned before all of them as FaceLift's inference does (see
`prune`); --measure_floaters scores the turntable's speckles before and after. --reference_view is
required unless the phase-1 model is the toy's (trained from every view). The two checkpoints must
name the same rig: the views are generated for the diffusion model's rig and read by GS-LRM as seen
from its own; GS-LRM's rig.json also says which diffusion checkpoint made its training views, and a
pair that is not one chain is warned about. --views_dir reads no diffusion model: the sample's cameras
are checked against GS-LRM's rig. --eval_list runs the chain from view `reference_view` of each
held-out sample and scores the renders at all its other cameras: metrics.json and scores.csv (one row per
image); --eval_all_views makes every rig view the reference in turn, --eval_cache keeps the generated views
so that other GS-LRMs are scored on the same ones (chain_experiment.py).

Dance: music + a reference -> a dance video (train_dance.py's top-level final/):

    python sample.py --music song.wav --ref_image data/toy_dance/clip_00095 --out_dir out/dance_sample
    python sample.py --music song.mp3 --ref_image me.png --ref_pose me.json --dance_checkpoint out/dance/final
    python sample.py --music song.mp3 --ref_image me.png --pose_model dw-ll_ucoco_384.onnx   # pose found
    python sample.py --dance_eval_list data/toy_dance/data_val.txt --max_seconds 4 --out_dir out/dance_eval

--ref_image is a clip folder (its frame ref_frame, with that frame's pose and face box) or an image with
--ref_pose (JSON: "pose": J x [x, y, visibility] and "face_box": [x0, y0, x1, y1], normalised to [0, 1]), or
with --pose_model (a local RTMPose / DWPose whole-body ONNX: pose.py finds the pose and the face box).
Music at any sample rate -> M2P poses -> frames in overlapping context windows (averaged at every
step) -> dance.mp4 with the music (GIF without sound when ffmpeg is missing), poses.mp4 (the skeletons),
poses.npy and contact_sheet.png. --dance_eval_list scores videos made from held-out clips' music alone
(beat alignment read from the video's pixels and from M2P's poses, against shuffled music; identity).
"""
import csv
import dataclasses
import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image
from tqdm import tqdm

from cameras import RigMismatch, camera_geometry, frames_to_tensors, orbit_c2w, read_cameras, rig_mismatch
from dance_eval import motion_scores
from data import (
    JOINT_SETS,
    VISIBLE,
    draw_skeleton,
    face_crops,
    face_points5,
    load_rgba,
    music_beats,
    music_features,
    read_audio,
    read_clip,
    read_frame,
    read_list_file,
    resize_frames,
    save_image_grid,
    save_ply,
    write_video,
)
from losses import (
    assemble_dance,
    axis_soft_argmax,
    beat_alignment,
    beats_within,
    bobbing,
    draw_hypothesis,
    geometric_windows,
    kinetic_windows,
    limb_beats,
    masked_psnr,
    motion_beats,
    pose_error,
    pose_heatmaps,
    pose_spread,
    psnr,
    smooth_poses,
    ssim,
    video_beats,
)
from models import (
    Conditioner,
    clip_image_embeds,
    get_rays,
    mv_schedulers,
    sample_views,
    to_images,
    to_model_space,
)
from plumbing import InputError, cli
from pose import PoseModel, face_box
from toy import TOY_DANCE_DIR, eval_face_recognizer, frozen_encoders, pose_reader, toy_dancers_spread
from weights import load_dance_final, load_gslrm_checkpoint, load_mv_checkpoint, mv_identity


@dataclass
class Config:
    input_image: str = ""  # RGBA (composited on white) or RGB (used as is) square image of one rig view
    input_dir: str = ""  # every image in this folder, each to <out_dir>/<image name>/
    views_dir: str = ""  # a sample folder with the rig's real posed views: Gaussians directly, no diffusion
    mvdiff_checkpoint: str = "out/mvdiff_toy"  # train_mvdiff checkpoint-<step>/ or run folder (latest)
    gslrm_checkpoint: str = "out/gslrm_toy"  # train_gslrm checkpoint-<step>/, run folder, or FaceLift .pt
    out_dir: str = "out/sample"
    reference_view: int = -1  # the rig view the input image shows; required but for the toy's (pixel) model: 0
    steps: int = 20  # DDIM steps (FaceLift: 50)
    guidance: float = 1.0  # classifier-free guidance (FaceLift: 3; the toy scores best at 1)
    eta: float = 1.0
    seed: int = 0
    # pruning, as FaceLift's inference filters its Gaussians before writing and rendering them
    opacity_threshold: float = 0.04  # FaceLift's value: fainter Gaussians are dropped
    max_scale_px: float = 20.0  # larger axes (in input pixels at the rig's distance) dropped: FaceLift's 0.1 at 512 px
    crop_radius: float = 1.0  # farther from the aim point than this x the views' half-width there: floaters
    measure_floaters: bool = False  # also render the unpruned turntable and score both (chain.json)
    turntable_frames: int = 48
    fps: int = 24
    eval_list: str = ""  # held-out samples: run the chain on each and score it (no input_image then)
    eval_views: str = "generated"  # generated | ground_truth (the true rig views into GS-LRM: upper bound)
    eval_samples: int = 0  # 0 = all listed
    eval_all_views: bool = False  # every rig view the reference in turn (not only --reference_view)
    eval_cache: str = ""  # a folder keeping generated views, so other GS-LRMs are scored on the same ones
    allow_rig_mismatch: bool = False  # run checkpoints made for different rigs
    # dance
    music: str = ""  # audio file: a dance video instead of the mouse chain
    ref_image: str = ""  # a clip folder, or an image file with ref_pose
    ref_pose: str = ""  # JSON with "pose" and "face_box" for an image file
    pose_model: str = ""  # or a whole-body ONNX that finds them (RTMPose / DWPose, as prepare_dance.py)
    pose_detector: str = "full_frame"  # its person box: the whole image (one person), or a YOLOX ONNX
    ref_frame: int = 0  # the frame of a clip folder used as the reference
    dance_checkpoint: str = "out/dance/final"
    context_frames: int = 24  # frames per window (CHAMP: 24; at most the motion modules' table)
    context_overlap: int = 4
    m2p_smooth: int = 3  # M2P's poses averaged over this many frames (odd; 0 / 1: off): its frame-to-frame jitter
    max_seconds: float = 0.0  # 0: all of the music
    dance_eval_list: str = ""  # held-out clips: dance videos from their music alone, scored (see run_dance_eval)
    video_size: int = 256  # output frames are upscaled (nearest) to at least this


class Chain:
    """The phase-1 model (none with --views_dir) and GS-LRM, checked to belong together."""

    def __init__(self, cfg, device, diffusion=True):
        self.gs = load_gslrm_checkpoint(cfg.gslrm_checkpoint, device)
        self.ck = load_mv_checkpoint(cfg.mvdiff_checkpoint, device) if diffusion else None
        self.mismatches, rig = [], self.gs["rig"]
        if self.ck is not None:
            rig = self.ck["rig"]
            self.mismatches += [rig["allowed_mismatch"]] if rig.get("allowed_mismatch") else []
            if self.gs["rig"] is None:
                print(f"WARNING: {self.gs['path']} records no rig: its cameras are not checked")
            elif msg := rig_mismatch(self.gs["rig"], rig["frames"]):
                msg = (f"{self.ck['path']} generates views for rig {rig['name']!r}, {self.gs['path']} was "
                       f"trained on {self.gs['rig']['name']!r}: {msg}")
                if not cfg.allow_rig_mismatch:
                    raise RigMismatch(f"{msg} (--allow_rig_mismatch to run them anyway)")
                print(f"WARNING (allow_rig_mismatch): {msg}")
                self.mismatches.append(msg)
            mcfg = self.ck["config"]
            self.gen_size = mcfg["image_size"]
            self.sampler = mv_schedulers(mcfg["prediction_type"], mcfg["beta_schedule"], mcfg["beta_start"],
                                         mcfg["beta_end"], mcfg["clip_sample"], mcfg.get("pipeline_dir", ""))[1]
            self.cond = Conditioner(mcfg.get("pipeline_dir", ""), device)
        self.provenance = gslrm_provenance(self.gs, self.ck)
        # GS-LRM reads the views as seen from the cameras it was trained on
        self.frames = (self.gs["rig"] or rig or {}).get("frames")
        self.V, self.S = (len(rig["frames"]) if rig else 6), self.gs["image_size"]
        self.cfg, self.device = cfg, device

    @torch.no_grad()
    def generate(self, refs, ref_views, keys=None):
        """References RGB (b, 3, H, W) in [0, 1] on white, their rig views (b,) -> the rig's views (b, V, 3, h, w)
        in [0, 1]. Each object's noise comes from its own generator seeded --seed, so a view does not depend on
        what it was batched with. keys (b,): names under which --eval_cache keeps the views."""
        cfg = self.cfg
        cache = [Path(cfg.eval_cache) / f"{k}.pt" for k in keys] if cfg.eval_cache and keys else None
        if cache and all(c.is_file() for c in cache):
            return torch.stack([torch.load(c) for c in cache])
        refs = F.interpolate(refs, size=(self.gen_size,) * 2, mode="bilinear", antialias=True,
                             align_corners=False).to(self.device)  # (b, 3, H, W)
        ref_cond, labels = self.cond.reference(refs * 2 - 1)
        gens = [torch.Generator(self.device).manual_seed(cfg.seed) for _ in range(len(refs))]
        ref_idx = torch.tensor(ref_views, device=self.device)
        x = sample_views(self.ck["model"], self.sampler, ref_cond, ref_idx, self.ck["prompt_embeds"],
                         ref_cond.shape[1:], labels, cfg.steps, cfg.guidance, cfg.eta, gens)  # (b, V, C, h, w)
        views = self.cond.decode(x).float().cpu()  # (b, V, 3, h, w)
        for c, v in zip(cache or [], views):
            c.parent.mkdir(parents=True, exist_ok=True)
            torch.save(v.clone(), c.with_suffix(".tmp"))
            c.with_suffix(".tmp").replace(c)  # whole files only: a killed run leaves no half view
        return views

    def cache_key(self, sample, ref_view):
        """What names one generated set of views: the phase-1 weights and prompts, the sample, the
        reference view and the sampler's settings."""
        if not hasattr(self, "_identity"):
            self._identity = mv_identity(self.ck)
        c = self.cfg
        what = [self._identity["unet_sha256"], self._identity["prompt_embeds_sha256"], str(Path(sample).resolve()),
                ref_view, c.steps, c.guidance, c.eta, c.seed, self.gen_size]
        return hashlib.sha256(json.dumps(what).encode()).hexdigest()[:24]

    @torch.no_grad()
    def reconstruct(self, views, frames=None):
        """Views (V, 3, H, W) in [0, 1] seen from `frames` (default: GS-LRM's rig) -> Gaussians (N, ...)."""
        views = F.interpolate(views, size=(self.S, self.S), mode="bilinear", antialias=True,
                              align_corners=False)  # (V, 3, S, S)
        w2c, K = frames_to_tensors(frames or self.frames, self.S)  # (V, 4, 4), (V, 4)
        g = self.gs["model"](views[None].to(self.device), torch.linalg.inv(w2c)[None].to(self.device),
                             K[None].to(self.device))
        return {k: v[0] for k, v in g.items()}

    @torch.no_grad()
    def render(self, gaussians, frames):
        """Gaussians -> RGBA renders (V, 4, S, S) at camera `frames` (intrinsics scaled to S)."""
        w2c, K = frames_to_tensors(frames, self.S)
        g = {k: v[None] for k, v in gaussians.items()}
        c2w = torch.linalg.inv(w2c)[None].to(self.device)  # (1, V, 4, 4)
        return self.gs["model"].render(g, c2w, K[None].to(self.device), self.S, self.S)[0].cpu()


def gslrm_provenance(gs, ck):
    """What GS-LRM's rig.json says it was trained on, printed; a WARNING when that is not this phase-1
    checkpoint's views (the two checkpoints are not one chain). -> the lines, for chain.json."""
    prov = (gs["rig"] or {}).get("provenance")
    if prov is None:
        lines = [f"{gs['path']} records no training data (trained before provenance was recorded, or FaceLift's)"]
    else:
        init = f" (initialised from {prov['init_from']})" if prov.get("init_from") else ""
        lines = [f"{gs['path']} was trained on {prov['real_samples']} real samples{init}"]
        for s in prov["synthetic"]:
            allowed = s["allowed_rig_mismatch"]
            lines.append(f"... and {s['samples']} synthetic samples of {s['mvdiff_checkpoint']} (rig {s['rig']}, "
                         f"UNet sha256 {str(s['unet_sha256'])[:12]})"
                         + (f", made with an allowed rig mismatch: {allowed[0]}" if allowed else ""))
    made_by = {(s["unet_sha256"], s["prompt_embeds_sha256"]) for s in (prov or {}).get("synthetic", [])}
    if ck is not None:  # hashed only when there is something to compare with (a real UNet is GBs)
        me = mv_identity(ck) if made_by else None
        if not made_by or (me["unet_sha256"], me["prompt_embeds_sha256"]) not in made_by:
            lines.append(f"WARNING: not one chain: {gs['path']} was not fine-tuned on views of {ck['path']} "
                         "(its UNet and prompt embeddings): it reads views of a model it has not seen")
    for line in lines:
        print(line)
    return lines


def turntable_frames(rig_frames, n):
    """n cameras circling the point the rig aims at, at the rig's mean elevation and distance."""
    g = camera_geometry(rig_frames)
    el, dist = g["el"].mean().item(), g["dist"].mean().item()
    fr = rig_frames[0]
    out = []
    for i in range(n):
        c2w = orbit_c2w(360 * i / n, el, dist, g["target"].tolist())
        out.append(dict(fr, w2c=torch.linalg.inv(c2w).tolist()))
    return out


def prune(gaussians, frames, S, cfg):
    """FaceLift's inference filters, for any rig -> a bool mask of the Gaussians kept: opacity above
    opacity_threshold; largest axis under max_scale_px of GS-LRM's S-pixel input at the rig's mean distance
    (FaceLift's 0.1 world units at 512 px, 50 deg; it spares the top half of a head, a mouse has no such
    half); within crop_radius of the point the cameras aim at (FaceLift crops heads to a box around the
    origin and cuts its lower corners: floaters that no view pins down, the speckles of a turntable); the
    radius is crop_radius x the half-width that the views frame there (FaceLift's box: 0.72 of it in x, y)."""
    geo, fr = camera_geometry(frames), frames[0]
    pixel = geo["dist"].mean().item() * fr["w"] / (fr["fx"] * S)  # world units per input pixel there
    far = (gaussians["means"] - geo["target"].to(gaussians["means"])).norm(dim=-1)  # (N,)
    return ((gaussians["opacities"] > cfg.opacity_threshold)
            & (gaussians["scales"].amax(-1) < cfg.max_scale_px * pixel) & (far < cfg.crop_radius * pixel * S / 2))


def hull_silhouettes(masks, frames, cams, S, n=96):
    """The object's silhouette seen from cameras `cams` (T, S, S) bool: the pixels whose ray crosses the
    visual hull of the views' masks (V, H, W) seen from `frames` (points inside every mask), sampled at
    n depths within the rig's distance of the point the cameras aim at."""
    geo = {k: v.float() for k, v in camera_geometry(frames).items()}
    w2c, K = frames_to_tensors(frames, masks.shape[-1])  # (V, 4, 4), (V, 4)
    cw2c, cK = frames_to_tensors(cams, S)
    o, d = get_rays(torch.linalg.inv(cw2c), cK, S, S)  # (T, S, S, 3) each
    reach = geo["dist"].mean().item() * 0.5  # the object is within this of the aim point
    t_mid = ((geo["target"] - o) * d).sum(-1, keepdim=True)  # (T, S, S, 1): depth of the aim point
    out = []
    for i in range(len(cams)):
        t = t_mid[i] + torch.linspace(-reach, reach, n)  # (S, S, n)
        pts = o[i, :, :, None] + t[..., None] * d[i, :, :, None]  # (S, S, n, 3)
        inside = torch.ones(pts.shape[:-1], dtype=torch.bool)
        for v in range(len(frames)):
            cam = pts @ w2c[v, :3, :3].T + w2c[v, :3, 3]  # (S, S, n, 3) in camera v
            z = cam[..., 2].clamp(min=1e-6)
            u = (cam[..., 0] / z * K[v, 0] + K[v, 2]).floor().long()
            w = (cam[..., 1] / z * K[v, 1] + K[v, 3]).floor().long()
            ok = (cam[..., 2] > 0) & (u >= 0) & (u < masks.shape[-1]) & (w >= 0) & (w < masks.shape[-2])
            inside &= ok & masks[v][w.clamp(0, masks.shape[-2] - 1), u.clamp(0, masks.shape[-1] - 1)]
        out.append(inside.any(-1))
    return torch.stack(out)  # (T, S, S)


def off_silhouette_share(rgb, silhouette, threshold=0.05):
    """Share of the pixels off the object's silhouette (one pixel of slack) that are not background:
    rendered RGB (T, 3, S, S) on white farther than `threshold` from white in some channel."""
    near = F.max_pool2d(silhouette[:, None].float(), 3, stride=1, padding=1)[:, 0] > 0  # (T, S, S)
    seen = (1 - rgb).amax(1) > threshold  # (T, S, S)
    return (seen & ~near).sum().item() / max(1, (~near).sum().item())


def quat_of(R):
    """Rotation matrix (3, 3) -> unit quaternion (w, x, y, z) (the Gaussians' convention)."""
    w = torch.sqrt((1 + R.trace()).clamp(min=1e-12)) / 2
    if w > 1e-3:
        q = torch.cat([w[None], torch.stack([R[2, 1] - R[1, 2], R[0, 2] - R[2, 0], R[1, 0] - R[0, 1]]) / (4 * w)])
    else:  # a half turn: from the axis (the eigenvector of eigenvalue 1)
        vals, vecs = torch.linalg.eigh((R + R.T) / 2)
        q = torch.cat([torch.zeros(1), vecs[:, vals.argmax()]])
    return F.normalize(q, dim=0)


def quat_mul(a, b):
    """Hamilton products a * b of quaternions (w, x, y, z): (4,) x (N, 4) -> (N, 4)."""
    aw, ax, ay, az = a
    bw, bx, by, bz = b.unbind(-1)
    return torch.stack([aw * bw - ax * bx - ay * by - az * bz, aw * bx + ax * bw + ay * bz - az * by,
                        aw * by - ax * bz + ay * bw + az * bx, aw * bz + ax * by - ay * bx + az * bw], -1)


def to_millimetres(gaussians, transform_file):
    """Gaussians in the normalised world -> in the capture's millimetres: transform.json's `to_mm`
    (prepare_mouse.py: a similarity, scale s times a rotation, plus a shift) moves the means, scales the
    axes by s and turns the rotations."""
    A = torch.tensor(json.loads(Path(transform_file).read_text())["to_mm"], dtype=torch.float32)  # (4, 4)
    s = torch.linalg.det(A[:3, :3]).abs() ** (1 / 3)
    g = {k: v.cpu().float() for k, v in gaussians.items()}
    return dict(g, means=g["means"] @ A[:3, :3].T + A[:3, 3], scales=g["scales"] * s,
                quats=quat_mul(quat_of(A[:3, :3] / s), g["quats"]))


def read_input(path):
    """The input image as RGB on white (3, H, W); an RGB image is used as is, with a warning."""
    with Image.open(path) as im:
        mode = im.mode
    if mode != "RGBA":
        print(f"WARNING: {path} is {mode}, not RGBA: used as is (the models expect the object on white; "
              "cut it out first for best results)")
    return load_rgba(path)[:3]


def read_views(chain, cfg):
    """--views_dir: the sample's rig views (V, 4, H, W), RGBA, and their camera frames, checked against the
    rig GS-LRM was trained on (a camera-less sample, cam_000.png ..., is taken to be that rig's views)."""
    d, rig = Path(cfg.views_dir), chain.gs["rig"]
    if not (d / "opencv_cameras.json").is_file():
        if rig is None:
            raise InputError(f"{d}: no opencv_cameras.json, and {chain.gs['path']} records no rig to take "
                             "the cameras from")
        print(f"{d}: no opencv_cameras.json: the views are taken to be rig {rig['name']!r}'s, in its order")
        frames = [dict(fr, file_path=f"cam_{i:03d}.png") for i, fr in enumerate(rig["frames"])]
    else:
        frames = read_cameras(d / "opencv_cameras.json")["frames"][: chain.V]
        if len(frames) < chain.V:
            raise InputError(f"{d / 'opencv_cameras.json'}: {len(frames)} cameras, GS-LRM reads {chain.V}")
        if rig is None:
            print(f"WARNING: {chain.gs['path']} records no rig: the cameras of {d} are not checked")
        elif msg := rig_mismatch(rig, frames):
            msg = f"{d / 'opencv_cameras.json'}: {msg} (the rig of {chain.gs['path']})"
            if not cfg.allow_rig_mismatch:
                raise RigMismatch(f"{msg} (--allow_rig_mismatch to run anyway)")
            print(f"WARNING (allow_rig_mismatch): {msg}")
            chain.mismatches.append(msg)
    views = torch.stack([load_rgba(d / fr["file_path"], wh=(fr["w"], fr["h"])) for fr in frames])  # (V, 4, H, W)
    return views, frames


def run_one(chain, cfg):
    """One input (an image through the chain, or --views_dir's views straight into GS-LRM) -> the outputs."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.views_dir:
        views, frames = read_views(chain, cfg)
        masks, views, ref = views[:, 3] > 0.5, views[:, :3], None  # the real masks (V, H, W)
        transform = Path(cfg.views_dir) / "transform.json"
    else:
        ref, frames = read_input(cfg.input_image), chain.frames
        views = chain.generate(ref[None], [cfg.reference_view])[0]  # (V, 3, H, W)
        masks = (1 - views).amax(1) > 0.1  # generated views have no alpha: off-white, as phase 2 reads them
        transform = Path(cfg.input_image).parent.parent / "transform.json"  # a prepared sample's images/
    gaussians = chain.reconstruct(views, frames)
    keep = prune(gaussians, frames, chain.S, cfg)
    kept = {k: v[keep] for k, v in gaussians.items()}
    ply = save_ply(kept, out / "gaussians.ply")
    written = [ply.name]
    if transform.is_file():  # prepare_mouse.py's map back to the capture's millimetres
        written.append(save_ply(to_millimetres(kept, transform), out / "gaussians_mm.ply").name)
    renders = chain.render(kept, frames)  # (V, 4, S, S)
    if ref is not None:
        Image.fromarray((ref.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)).save(out / "input.png")
        ref_cell = F.interpolate(ref[None], size=views.shape[-2:], mode="area")  # (1, 3, h, w)
        save_image_grid([torch.cat([ref_cell, views])], out / "multiview.png",
                        [(f"input (view {cfg.reference_view})", 1), ("generated views", len(views))])
    else:
        save_image_grid([views], out / "views.png", [("input views", len(views))])
    save_image_grid([renders], out / "renders.png", [("Gaussians at the rig's cameras", len(renders))])
    cams = turntable_frames(frames, cfg.turntable_frames)
    spin = chain.render(kept, cams)[:, :3]  # (T, 3, S, S)
    info = {}
    if cfg.measure_floaters:  # the speckles around the animal, before and after pruning
        hull = hull_silhouettes(masks, frames, cams, chain.S)
        share = {"unpruned": off_silhouette_share(chain.render(gaussians, cams)[:, :3], hull),
                 "pruned": off_silhouette_share(spin, hull)}
        info["turntable_off_silhouette"] = share
        print(f"turntable pixels off the silhouette that are not background: {share['unpruned']:.4f} unpruned, "
              f"{share['pruned']:.4f} pruned")
    size = max(128, chain.S)  # small toy renders are upscaled so that players show them
    spin = F.interpolate(spin, size=(size, size), mode="nearest")  # (T, 3, size, size)
    video = write_video(out / "turntable.mp4", (spin.permute(0, 2, 3, 1).numpy() * 255 + 0.5).astype(np.uint8),
                        cfg.fps)  # (T, size, size, 3) frames
    rig = (chain.ck or chain.gs)["rig"]
    (out / "chain.json").write_text(json.dumps({
        "input_image": cfg.input_image, "views_dir": cfg.views_dir, "reference_view": cfg.reference_view,
        "mvdiff_checkpoint": str(chain.ck["path"]) if chain.ck else None, "gslrm_checkpoint": str(chain.gs["path"]),
        "rig": rig["name"] if rig else None, "gaussians_kept": int(keep.sum()), "gaussians": len(keep),
        "gslrm_provenance": chain.provenance, "allowed_rig_mismatch": chain.mismatches, **info}, indent=1))
    print(f"wrote {out}/{', '.join(written)} ({int(keep.sum())} of {len(keep)} Gaussians), "
          f"{'multiview.png' if ref is not None else 'views.png'}, renders.png, {video.name}")
    return out


def alpha_iou(pred_alpha, alpha):
    """Silhouette IoU of rendered and true alpha (N, 1, H, W), each above 0.5 -> (N,); 1 where both are empty.
    Unlike masked PSNR it counts what is drawn outside the animal (floaters, a too-fat body)."""
    p, g = pred_alpha > 0.5, alpha > 0.5
    inter, union = (p & g).sum((-3, -2, -1)).float(), (p | g).sum((-3, -2, -1)).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


SCORES = ("psnr", "masked_psnr", "ssim", "alpha_iou")


def run_eval(chain, cfg):
    """The chain from view `reference_view` (every rig view with --eval_all_views) of every listed sample,
    scored at all its other cameras -> metrics.json (means), scores.csv (one row per scored image), eval.png."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    samples = read_list_file(cfg.eval_list)[: cfg.eval_samples or None]
    S, V = chain.S, chain.V
    refs = list(range(V)) if cfg.eval_all_views else [max(cfg.reference_view, 0)]
    generated = cfg.eval_views != "ground_truth"
    scores, rows, gts, records = {k: [] for k in (*SCORES, "views_psnr")}, [], [], []
    for n, d in enumerate(tqdm(samples, desc=f"chain from {len(refs)} view(s) of each sample", unit="sample")):
        frames = read_cameras(d / "opencv_cameras.json")["frames"]
        # generated views are reconstructed at the rig's cameras and scored at the sample's: the two must agree
        rig = chain.gs["rig"] or (chain.ck or {}).get("rig")
        if rig and (msg := rig_mismatch(rig, frames[:V])):
            if not cfg.allow_rig_mismatch:
                raise RigMismatch(f"{d / 'opencv_cameras.json'}: {msg} (--allow_rig_mismatch to score it anyway)")
            print(f"WARNING (allow_rig_mismatch): {d}: {msg}")
        images = torch.stack([load_rgba(d / fr["file_path"], S) for fr in frames])  # (F, 4, S, S)
        if generated:  # every reference of the sample in one batch
            src = torch.stack([load_rgba(d / frames[k]["file_path"])[:3] for k in refs])  # (b, 3, H, W)
            gen = chain.generate(src, refs, [chain.cache_key(d, k) for k in refs])  # (b, V, 3, h, w)
            gt_views = torch.stack([load_rgba(d / fr["file_path"], gen.shape[-1])[:3] for fr in frames[:V]])
        else:  # the true rig views, at their true cameras: one reconstruction whatever the reference
            true_gaussians = chain.reconstruct(images[:V, :3], frames[:V])
        name = os.path.relpath(d, Path(cfg.eval_list).parent)
        for j, k in enumerate(refs):
            if generated:
                views, gaussians = gen[j], chain.reconstruct(gen[j])
                others = [v for v in range(V) if v != k]
                scores["views_psnr"].append(psnr(views[others], gt_views[others]))
            else:
                views, gaussians = images[:V, :3], true_gaussians
            held = [i for i in range(len(frames)) if i != k]  # every camera but the input's
            pred, pred_alpha = chain.render(gaussians, [frames[i] for i in held]).split([3, 1], 1)  # (F - 1, 3|1, S, S)
            gt, alpha = images[held, :3], images[held, 3:]
            for key, v in zip(SCORES, (psnr(pred, gt), masked_psnr(pred, gt, alpha), ssim(pred, gt),
                                       alpha_iou(pred_alpha, alpha))):
                scores[key].append(v)
            records += [(name, k, i) for i in held]
            gts.append(gt)
            if cfg.measure_floaters:  # turntable speckles against the true silhouettes (the rig views' masks)
                cams = turntable_frames(frames[:V], cfg.turntable_frames)
                hull = hull_silhouettes(images[:V, 3] > 0.5, frames[:V], cams, S)
                keep = prune(gaussians, chain.frames or frames[:V], S, cfg)
                pruned = {key: v[keep] for key, v in gaussians.items()}
                for key, g in (("off_silhouette_unpruned", gaussians), ("off_silhouette_pruned", pruned)):
                    scores.setdefault(key, []).append(
                        torch.tensor([off_silhouette_share(chain.render(g, cams)[:, :3], hull)]))
                # what pruning costs on the animal: the pruned Gaussians scored as `psnr` scores the unpruned
                scores.setdefault("psnr_pruned", []).append(
                    psnr(chain.render(pruned, [frames[i] for i in held])[:, :3], gt))
            if n < 4 and j == 0:
                rows.append(torch.cat([images[k:k + 1, :3], F.interpolate(views, size=(S, S)), gt, pred]))
    mean_image = torch.cat(gts).mean(0, keepdim=True)  # (1, 3, S, S): the baseline that sees no input
    mean_scores = torch.cat([psnr(mean_image.expand_as(g), g) for g in gts])
    metrics = {key: torch.cat(v).mean().item() for key, v in scores.items() if v}
    metrics["psnr_mean_image"] = mean_scores.mean().item()
    metrics.update(samples=len(samples), views=cfg.eval_views, reference_views=refs,
                   mvdiff_checkpoint=str(chain.ck["path"]) if chain.ck else None,
                   gslrm_checkpoint=str(chain.gs["path"]),
                   allowed_rig_mismatch=chain.mismatches)
    per_image = torch.stack([torch.cat(scores[key]) for key in SCORES] + [mean_scores], 1)  # (images, 5)
    with open(out / "scores.csv", "w", newline="") as f:  # one row per scored image: intervals need them
        w = csv.writer(f)
        w.writerow(["sample", "reference_view", "camera", *SCORES, "psnr_mean_image"])
        w.writerows([*r, *(f"{x:.4f}" for x in v)] for r, v in zip(records, per_image.tolist()))
    groups = [("input", 1), (f"{cfg.eval_views} views", V), ("held-out ground truth", len(held)),
              ("rendered", len(held))]
    save_image_grid(rows, out / "eval.png", groups)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    print(" | ".join(f"{key} {v:.2f}" if isinstance(v, float) else f"{key} {v}" for key, v in metrics.items()
                     if key not in ("mvdiff_checkpoint", "gslrm_checkpoint")))
    print(f"wrote {out}/metrics.json, scores.csv ({len(records)} images), eval.png")
    return metrics


def read_dance_reference(cfg, J, fps):
    """The reference image (3, H, W) in [0, 1], its pose (J, 3), face box (4,) and 5 face-alignment points
    (5, 2; NaN: none), normalised."""
    path = Path(cfg.ref_image)
    if path.is_dir():
        clip = read_clip(path, fps)
        if not 0 <= cfg.ref_frame < clip["T"] or clip["boxes"][cfg.ref_frame] is None:
            raise InputError(f"{path}: frame {cfg.ref_frame} is not a frame with a face box")
        pose = np.load(path / "poses.npy")[cfg.ref_frame]  # (134, 3)
        return read_frame(clip["source"], cfg.ref_frame), torch.tensor(pose[:J], dtype=torch.float32), \
            torch.tensor(clip["boxes"][cfg.ref_frame], dtype=torch.float32), face_points5(pose)
    if cfg.pose_model and not cfg.ref_pose:
        return pose_reference(path, cfg, J)
    if not cfg.ref_pose:
        raise InputError(f"--ref_image={path}: an image needs --ref_pose (JSON: pose, face_box) or --pose_model "
                         "(a whole-body ONNX); a clip folder does not")
    meta = json.loads(Path(cfg.ref_pose).read_text())
    pose, box = torch.tensor(meta["pose"], dtype=torch.float32), torch.tensor(meta["face_box"], dtype=torch.float32)
    if pose.shape != (J, 3) or box.shape != (4,):
        raise InputError(f"{cfg.ref_pose}: pose {tuple(pose.shape)} and face_box {tuple(box.shape)}, expected "
                         f"({J}, 3) and (4,)")
    image = torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), np.float32) / 255).permute(2, 0, 1)
    return image, pose, box, torch.full((5, 2), torch.nan)  # J points: no face points to align by


def pose_reference(path, cfg, J):
    """An image's pose (J, 3), face box (4,) and 5 face points (5, 2), normalised by its width and height,
    from --pose_model."""
    rgb = np.asarray(Image.open(path).convert("RGB"))  # (H, W, 3)
    pose = PoseModel(cfg.pose_model, cfg.pose_detector)(rgb)  # (134, 3) in pixels
    pose[:, :2] /= np.array([rgb.shape[1], rgb.shape[0]], np.float32)
    box = face_box(pose)
    if box is None:
        raise InputError(f"{path}: {cfg.pose_model} finds no face (no face points or nose/eyes/ears scored "
                         f">= {VISIBLE}); give --ref_pose instead")
    image = torch.from_numpy(rgb.astype(np.float32) / 255).permute(2, 0, 1)  # (3, H, W)
    return image, torch.from_numpy(pose[:J]), torch.tensor(box, dtype=torch.float32), face_points5(pose)


def dance_length(audio, sr, fps, max_seconds, where):
    """Frames of the video for this music: its length at fps, at most max_seconds (0: all of it)."""
    T = int(len(audio) / sr * fps)
    T = min(T, int(max_seconds * fps)) if max_seconds else T
    if T < 2:
        raise InputError(f"{where}: {len(audio) / sr:.2f} s of audio (--max_seconds {max_seconds}), "
                         "too short for a video")
    return T


def context_windows(T, size, overlap):
    """[start, end) windows of `size` frames, consecutive ones sharing `overlap`, covering frames 0..T-1
    (the last window ends at T; CHAMP samples long videos in 24-frame windows overlapping by 4 and
    averages the overlapping predictions at every denoising step)."""
    if T <= size:
        return [(0, T)]
    if not 0 <= overlap < size:
        raise InputError(f"window overlap {overlap}: expected 0 <= overlap < window size {size}")
    starts = list(range(0, T - size + 1, size - overlap))
    if starts[-1] + size < T:
        starts.append(T - size)
    return [(s, s + size) for s in starts]


@torch.no_grad()
def m2p_poses(m2p, feats, ref_pose, face, W, smooth=0, seed=0):
    """M2P's poses for music features (T, D): one of its dances (a hypothesis per body part), drawn with
    `seed` from the first window's choice and kept for the whole clip; windows of its training length W overlapping by
    W / 4, cross-faded linearly in the overlaps, since separate windows jump at their boundaries; then a
    centred moving average over `smooth` frames (losses.smooth_poses), since M2P's poses jitter from
    frame to frame. Prints the largest joint jump at a window boundary beside the typical frame-to-frame
    jump. -> (T, J, 3), visibility the reference's."""
    T, J, ov = len(feats), len(ref_pose), W // 4
    acc, total = torch.zeros(T, J, 2, device=feats.device), torch.zeros(T, device=feats.device)
    windows, pick = context_windows(T, W, ov), None
    for s, e in windows:
        logits, choice, _ = m2p(feats[s:e][None], ref_pose[None], face, drop_face=True)  # (1, K, e - s, J, 2, h)
        if pick is None:  # (1, P): one hypothesis per body part
            pick = draw_hypothesis(choice[0], torch.Generator().manual_seed(seed))[None].to(feats.device)
        i = torch.arange(e - s, device=feats.device)
        w = torch.minimum((i + 1) / (ov + 1), (e - s - i) / (ov + 1)).clamp(max=1)  # (e - s,): the fade
        acc[s:e] += w[:, None, None] * assemble_dance(axis_soft_argmax(logits.float()), pick, m2p.part, m2p.root)[0]
        total[s:e] += w
    xy = smooth_poses(acc / total[:, None, None], smooth)  # (T, J, 2)
    jump = (xy[1:] - xy[:-1]).norm(dim=-1).mean(-1)  # (T - 1,): mean joint move from frame t to t + 1
    # the moves into and through each overlap: where separate windows would jump
    edges = [t for (_, end), (s, _) in zip(windows, windows[1:]) for t in range(max(s - 1, 0), min(end, T - 1))]
    if edges:
        print(f"M2P: {len(windows)} windows of {W} frames, cross-faded over {ov}; largest joint jump at a window "
              f"boundary {jump[edges].max():.4f}, median frame-to-frame {jump.median():.4f}")
    print(f"M2P: dance {pick[0].tolist()} (a hypothesis per body part: torso, right arm, left arm, right leg, "
          f"left leg; --seed draws others)")
    return torch.cat([xy, ref_pose[None, :, 2:].expand(T, -1, -1)], -1)


def generate_dance(d, cfg, image, ref_pose, box, points, audio, sr, T, device):
    """Music (audio at sr) + a reference (image, its pose, face box and points) -> (x, poses, ref_img): T frames
    of video in model space (1, C, T, h, w), M2P's poses (T, J, 3) and the reference at the model's size."""
    c, net, vae, sched = d["cfg"], d["net"], d["vae"], d["scheduler"]
    fps, S = c["fps"], c["image_size"]
    feats = torch.from_numpy(music_features(audio, sr, fps, T)).to(device)  # (T, 35)
    face = face_crops(image[None], box[None], points[None]).to(device)  # (1, 3, 112, 112), as in training
    poses = m2p_poses(d["m2p"], feats, ref_pose.to(device), face, c["window"], cfg.m2p_smooth, cfg.seed)  # (T, J, 3)
    ref_img = resize_frames(image[None], S).to(device)  # (1, 3, S, S), as in training
    gen = torch.Generator(device).manual_seed(cfg.seed)
    ref_x = to_model_space(vae, ref_img, gen)  # (1, C, h, w)
    C, h = ref_x.shape[1], ref_x.shape[-1]
    size = min(cfg.context_frames, net.unet.config.motion_max_seq_length)
    windows = context_windows(T, size, min(cfg.context_overlap, size - 1))
    n = 2 if cfg.guidance != 1.0 else 1  # conditional, then training's null condition
    keep = torch.tensor([True, False][:n], device=device)
    context = net.context(clip_image_embeds(d["clip"], ref_img).repeat(n, 1),
                          d["recognizer"](face * 2 - 1).repeat(n, 1), keep)
    net.reference(ref_x.repeat(n, 1, 1, 1), context, keep)
    x = torch.randn((1, C, T, h, h), generator=gen, device=device) * sched.init_noise_sigma
    sched.set_timesteps(cfg.steps, device=device)
    bar = tqdm(total=cfg.steps * len(windows), desc=f"{T} frames, {len(windows)} windows x {cfg.steps} steps")
    for t in sched.timesteps:
        acc, count = torch.zeros_like(x), torch.zeros(T, device=device)
        for s, e in windows:
            heat = pose_heatmaps(poses[None, s:e], S, c["pose_sigma"])  # (1, F, J, S, S)
            out = net.denoise(x[:, :, s:e].repeat(n, 1, 1, 1, 1), t.expand(n), heat.repeat(n, 1, 1, 1, 1), 1.5,
                              context)
            if n == 2:
                out = out[1:] + cfg.guidance * (out[:1] - out[1:])
            acc[:, :, s:e] += out
            count[s:e] += 1
            bar.update()
        x = sched.step(acc / count[None, None, :, None, None], t, x).prev_sample  # overlaps: averaged
    bar.close()
    net.store.clear()
    return x, poses, ref_img


def decoded(vae, x, chunk=16):
    """Model-space video (1, C, T, h, w) -> (f, 3, H, W) images in [0, 1], chunk frames at a time: a long
    video never sits in memory decoded."""
    for s in range(0, x.shape[2], chunk):
        yield to_images(vae, rearrange(x[:, :, s:s + chunk], "b c f h w -> (b f) c h w")).float()


def load_dance(path, device):
    """The dance final/ for sampling: dict(net, m2p, scheduler, cfg, vae, clip, recognizer)."""
    d = load_dance_final(path, device)
    dim = d["net"].unet.config.cross_attention_dim
    d["vae"], d["clip"], recognizer = frozen_encoders(d["cfg"], dim, device)
    d["recognizer"] = recognizer.eval()
    return d


@torch.no_grad()
def run_dance(cfg, device):
    d = load_dance(cfg.dance_checkpoint, device)
    J, fps, S = JOINT_SETS[d["cfg"]["joints"]], d["cfg"]["fps"], d["cfg"]["image_size"]
    image, ref_pose, box, points = read_dance_reference(cfg, J, fps)
    audio, sr = read_audio(cfg.music)
    T, vae = dance_length(audio, sr, fps, cfg.max_seconds, cfg.music), d["vae"]
    x, poses, ref_img = generate_dance(d, cfg, image, ref_pose, box, points, audio, sr, T, device)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    k = max(1, -(-cfg.video_size // S))  # integer upscale

    def frames():
        for im in decoded(vae, x):
            im = F.interpolate(im, scale_factor=k, mode="nearest")
            yield from (im.permute(0, 2, 3, 1).cpu().numpy() * 255 + 0.5).astype(np.uint8)

    video = write_video(out / "dance.mp4", frames(), fps, cfg.music)
    np.save(out / "poses.npy", poses.cpu().numpy())
    size_px = S * k

    def skeleton(p):  # (size_px, size_px, 3) uint8: M2P's pose on white
        im = Image.new("RGB", (size_px, size_px), (255, 255, 255))
        draw_skeleton(im, p, (220, 0, 0), size_px)
        return np.asarray(im)

    pose_np = poses.cpu().numpy()
    pose_video = write_video(out / "poses.mp4", (skeleton(p) for p in pose_np), fps, cfg.music)
    idx = np.linspace(0, T - 1, min(8, T)).round().astype(int)
    sheet = to_images(vae, rearrange(x[:, :, idx], "b c f h w -> (b f) c h w")).float().cpu()
    skel = torch.stack([torch.from_numpy(skeleton(pose_np[i]).copy()).permute(2, 0, 1).float() / 255 for i in idx])
    skel = F.interpolate(skel, size=(S, S), mode="area")  # (8, 3, S, S)
    save_image_grid([torch.cat([ref_img.cpu(), sheet]), torch.cat([ref_img.cpu(), skel])], out / "contact_sheet.png",
                    [("reference", 1), (f"frames {', '.join(map(str, idx))}", len(idx))])
    print(f"wrote {video}, {pose_video}, {out / 'poses.npy'}, {out / 'contact_sheet.png'} "
          f"({T} frames, {T / fps:.1f} s)")
    return video


def limb_colours(images, poses):
    """Clothes colours of a dancer: the mean colour of 3x3 pixels at the torso's middle (neck to mid-hip)
    and the middles of both thighs and shins (OpenPose-18 joints). images (N, 3, S, S), poses (N, J, 2+)
    normalised -> (N, 5, 3)."""
    p = torch.as_tensor(poses, dtype=torch.float32)[..., :2]
    hip = (p[:, 8] + p[:, 11]) / 2
    points = torch.stack([(p[:, 1] + hip) / 2, (p[:, 8] + p[:, 9]) / 2, (p[:, 9] + p[:, 10]) / 2,
                          (p[:, 11] + p[:, 12]) / 2, (p[:, 12] + p[:, 13]) / 2], 1)  # (N, 5, 2)
    blurred = F.avg_pool2d(images.float(), 3, 1, 1, count_include_pad=False)
    grid = (points * 2 - 1)[:, :, None]  # (N, 5, 1, 2) in grid_sample's [-1, 1]
    return F.grid_sample(blurred, grid, align_corners=False)[..., 0].transpose(1, 2)  # (N, 5, 3)


def bobbing_video(image, beats, T, fps):
    """The trivial beat video: the reference image dipping 2 % of its height on every music beat
    (losses.bobbing's motion). image (3, S, S) -> (T, 3, S, S)."""
    dy = bobbing(torch.zeros(1, 2), beats, T, fps)[:, 0, 1].float()  # (T,) normalised
    theta = torch.zeros(T, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    theta[:, 1, 2] = -2 * dy  # grid_sample's y spans 2 units: content moves down by dy
    grid = F.affine_grid(theta, (T, 3, *image.shape[-2:]), align_corners=False)
    return F.grid_sample(image[None].expand(T, -1, -1, -1), grid, padding_mode="border", align_corners=False)


@torch.no_grad()
def run_dance_eval(cfg, device):
    """The end-to-end dance metrics from music alone, on held-out clips: each clip's music and its frame
    ref_frame -> a video (cfg.max_seconds long). Beat alignment of the generated video's motion, read
    from its pixels (video_beats: no pose model), and of the M2P poses that drove it (also from the
    limbs only), against the clip's music beats and against the next clip's (shuffled music), beside the
    reference image bobbing on the beats and the real video. Identity: the evaluation recognizer's cosine
    of the generated face (the reference's face box, or its 5 face points aligned as ArcFace's faces when
    the pose has them, moved with M2P's nose joint) with the reference face, against the next clip's
    dancer and a flat-colour face. Clothes colours of torso and legs against the reference's (and the
    next dancer's); pose spread over time against the real dance's; PSNR against copying the reference.
    M2P's poses: FID_k / FID_g / Div / PFC (dance_eval.motion_scores) against the trivial motions."""
    d = load_dance(cfg.dance_checkpoint, device)
    c = d["cfg"]
    J, fps, S = JOINT_SETS[c["joints"]], c["fps"], c["image_size"]
    eval_rec = eval_face_recognizer(c, device)  # identity by a recognizer the identity loss never saw
    clips = read_list_file(cfg.dance_eval_list)[: cfg.eval_samples or None]
    if len(clips) < 2:
        raise InputError(f"{cfg.dance_eval_list}: the shuffled-music control needs at least 2 clips")
    embed = lambda faces: F.normalize(eval_rec((faces * 2 - 1).to(device)), dim=-1).cpu()  # noqa: E731
    # poses read back from the generated video: the run's reader (toy: its detector), or this --pose_model
    read_poses = pose_reader({**c, "pose_model": cfg.pose_model or c.get("pose_model", "")},
                             Path(c["data_dir"]) == Path(TOY_DANCE_DIR), device)
    runs = []
    for i, path in enumerate(clips):
        clip = read_clip(path, fps)
        image, ref_pose, box, points = read_dance_reference(dataclasses.replace(cfg, ref_image=str(path)), J, fps)
        audio, sr = read_audio(path / "audio.wav")
        T = min(clip["T"], dance_length(audio, sr, fps, cfg.max_seconds, path / "audio.wav"))  # the clip's frames
        beats = beats_within(music_beats(audio, sr, fps), T, fps)
        if len(beats) == 0:
            raise InputError(f"{path / 'audio.wav'}: no music beat in the first {T / fps:.1f} s: raise --max_seconds")
        run_cfg = dataclasses.replace(cfg, seed=cfg.seed + i)  # each clip its own dance and noise, as separate runs
        x, poses, _ = generate_dance(d, run_cfg, image, ref_pose, box, points, audio, sr, T, device)
        gen = torch.cat([im.cpu() for im in decoded(d["vae"], x)])  # (T, 3, S, S)
        gt = torch.stack([read_frame(clip["source"], t) for t in range(T)])
        gt = resize_frames(gt, S)
        gt_poses = torch.from_numpy(np.load(path / "poses.npy")[:T, :J].copy())  # (T, J, 3)
        shift = (poses[:, 0, :2].cpu() - ref_pose[0, :2]).repeat(1, 2)  # (T, 4): the nose's move
        points = points[None]  # (1, 5, 2); NaN: none
        faces = face_crops(gen, box[None] + shift, points + shift[:, None, :2])  # (T, 3, 112, 112)
        ref_img = resize_frames(image[None], S)[0]
        runs.append(dict(gen=gen, gt=gt, poses=poses.cpu(), gt_poses=gt_poses, beats=beats, ref_img=ref_img,
                         ref_pose=ref_pose, face_in=face_crops(image[None], box[None], points).to(device),
                         feats=torch.from_numpy(music_features(audio, sr, fps, T)).to(device),
                         bob=bobbing_video(ref_img, beats, T, fps), face=embed(faces),
                         flat_face=embed(faces.mean((2, 3), keepdim=True).expand_as(faces)),
                         ref_face=embed(face_crops(image[None], box[None], points)),
                         colours=limb_colours(gen, poses.cpu()), gt_colours=limb_colours(gt, gt_poses),
                         read={k: read_poses(v).cpu() for k, v in (("gen", gen), ("gt", gt), ("ref", ref_img[None]))}
                         if read_poses else None,
                         ref_colours=limb_colours(ref_img[None], ref_pose[None])[0]))
    n = len(runs)
    # motion quality of M2P's poses (those that drove the videos): FID_k, FID_g, Div, PFC beside the real
    # dance, standing still (in the reference pose, in the training clips' mean pose), M2P on the next
    # clip's music and, with a pose reader, the poses read back from the generated and the real videos
    train = [np.load(p / "poses.npy")[:, :J] for p in read_list_file(Path(c["data_dir"]) / c["train_list"])]
    P = torch.from_numpy(np.concatenate(train))  # (N, J, 3)
    vis = (P[..., 2:] >= VISIBLE).float()
    mean_pose = (P[..., :2] * vis).sum(0) / vis.sum(0).clamp(min=1)  # (J, 2)
    motions = {"": [r["poses"] for r in runs], "_gt": [r["gt_poses"] for r in runs],
               "_still": [r["ref_pose"][None].expand(len(r["poses"]), -1, -1) for r in runs],
               "_mean_pose": [mean_pose[None].expand(len(r["poses"]), -1, -1) for r in runs], "_shuffled": [
                   m2p_poses(d["m2p"], runs[(i + 1) % n]["feats"][:len(r["poses"])], r["ref_pose"].to(device),
                             r["face_in"], c["window"], cfg.m2p_smooth, cfg.seed + i).cpu()
                   for i, r in enumerate(runs)]}
    if read_poses is not None:
        motions["_read"] = [r["read"]["gen"] for r in runs]
        motions["_read_gt"] = [r["read"]["gt"] for r in runs]  # the reader's own jitter on real frames
    T = len(runs[0]["poses"])  # the training dances' spread over as many frames (it grows with the length)
    motion = motion_scores(motions, kinetic_windows(train, fps), geometric_windows(train, fps),
                           float(np.mean([pose_spread(p[:T]) for p in train])), fps)
    score = lambda f, k: float(np.mean([beat_alignment(runs[(i + k) % n]["beats"], f(runs[i])) for i in range(n)]))  # noqa: E731
    video, pose = (lambda r: video_beats(r["gen"], fps)), (lambda r: motion_beats(r["poses"], fps))
    limbs = lambda r: limb_beats(r["poses"], fps)  # noqa: E731
    mean = lambda f: float(np.mean([f(i, r) for i, r in enumerate(runs)]))  # noqa: E731
    # clothes colours: the generated torso and legs against the reference's, and against the next dancer's
    colour = lambda key, k: mean(lambda i, r: (r[key] - runs[(i + k) % n]["ref_colours"]).norm(dim=-1).mean())  # noqa: E731
    m = {"beat_align_video": score(video, 0), "beat_align_video_shuffled": score(video, 1),
         "beat_align_video_bobbing": score(lambda r: video_beats(r["bob"], fps), 0),
         "beat_align_video_gt": score(lambda r: video_beats(r["gt"], fps), 0),
         "beat_align_pose": score(pose, 0), "beat_align_pose_shuffled": score(pose, 1),
         "beat_align_pose_limbs": score(limbs, 0), "beat_align_pose_limbs_shuffled": score(limbs, 1),
         "beat_align_pose_limbs_gt": score(lambda r: limb_beats(r["gt_poses"], fps), 0),
         "id_cos": mean(lambda i, r: (r["face"] @ r["ref_face"].T).mean()),
         "id_cos_other": mean(lambda i, r: (r["face"] @ runs[(i + 1) % n]["ref_face"].T).mean()),
         "id_cos_flat_face": mean(lambda i, r: (r["flat_face"] @ r["ref_face"].T).mean()),
         "colour_err": colour("colours", 0), "colour_err_other": colour("colours", 1),
         "colour_err_gt": colour("gt_colours", 0), "colour_err_gt_other": colour("gt_colours", 1),
         "psnr_vs_gt": mean(lambda i, r: psnr(r["gen"], r["gt"]).mean().item()),
         "psnr_copy_ref": mean(lambda i, r: psnr(r["ref_img"][None].expand_as(r["gt"]), r["gt"]).mean().item()),
         **motion, "m2p_smooth": cfg.m2p_smooth,
         "clips": n, "seconds": runs[0]["gen"].shape[0] / fps, "dance_checkpoint": str(cfg.dance_checkpoint)}
    if Path(c["data_dir"]) == Path(TOY_DANCE_DIR):  # how much the toy's dancers move at large
        m["pose_spread_toy_dancers"] = toy_dancers_spread(T, fps)
    if read_poses is not None:  # the generated video's poses read back: do they follow M2P's, and the music?
        for r in runs:
            r["read"]["bob"] = read_poses(r["bob"]).cpu()
        read_limbs = lambda key: lambda r: limb_beats(r["read"][key], fps)  # noqa: E731
        m.update({"beat_align_read": score(read_limbs("gen"), 0),
                  "beat_align_read_shuffled": score(read_limbs("gen"), 1),
                  "beat_align_read_bobbing": score(read_limbs("bob"), 0),
                  "beat_align_read_gt": score(read_limbs("gt"), 0)})
        for name, key in (("", "gen"), ("_copy_ref", "ref")):
            errs = [pose_error(r["read"][key].expand(len(r["poses"]), -1, -1), r["poses"]) for r in runs]
            m[f"pose_err_gen{name}"] = float(np.mean([e.item() for e, _ in errs]))
            m[f"pck_gen{name}"] = float(np.mean([p.item() for _, p in errs]))
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    idx = np.linspace(0, len(runs[0]["gen"]) - 1, 8).round().astype(int)
    rows = [torch.cat([r["gt"][idx[:4]], r["gen"][idx]]) for r in runs[:6]]
    save_image_grid(rows, out / "dance_eval.png", [("ground truth", 4), ("generated from music", 8)])
    write_video(out / "dance_eval.mp4", (np.concatenate([a, b], 1) for a, b in zip(
        *((im.permute(0, 2, 3, 1).numpy() * 255 + 0.5).astype(np.uint8) for im in (runs[0]["gt"], runs[0]["gen"])))),
        fps, clips[0] / "audio.wav")
    (out / "metrics.json").write_text(json.dumps(m, indent=1))
    print(" | ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in m.items()))
    print(f"wrote {out}/metrics.json, dance_eval.png, dance_eval.mp4")
    return m


def main(cfg):
    if cfg.dance_eval_list:
        return run_dance_eval(cfg, "cuda" if torch.cuda.is_available() else "cpu")
    if cfg.music:
        return run_dance(cfg, "cuda" if torch.cuda.is_available() else "cpu")
    given = [k for k in ("input_image", "input_dir", "views_dir", "eval_list") if getattr(cfg, k)]
    if len(given) != 1:
        raise InputError(f"give one of --input_image (one image), --input_dir (a folder of images), --views_dir "
                         f"(a sample's real views) or --eval_list (held-out samples); got {given or 'none'}")
    if cfg.eval_views not in ("generated", "ground_truth"):
        raise InputError(f"eval_views {cfg.eval_views!r}: expected generated or ground_truth")
    # the true views in (--views_dir, --eval_views ground_truth) need no diffusion model
    chain = Chain(cfg, "cuda" if torch.cuda.is_available() else "cpu",
                  diffusion=not (cfg.views_dir or cfg.eval_list and cfg.eval_views == "ground_truth"))
    if chain.ck is not None:
        cfg = dataclasses.replace(cfg, reference_view=reference_view(chain, cfg))
    if cfg.eval_list:
        return run_eval(chain, cfg)
    if not cfg.input_dir:
        return run_one(chain, cfg)
    images = sorted(p for p in Path(cfg.input_dir).glob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not images:
        raise InputError(f"--input_dir={cfg.input_dir}: no .png / .jpg images there")
    if len({p.stem for p in images}) < len(images):
        raise InputError(f"--input_dir={cfg.input_dir}: two images share a name ({[p.name for p in images][:4]}...): "
                         "each names its output folder")
    for path in tqdm(images, desc=f"{len(images)} images -> {cfg.out_dir}", unit="image"):
        run_one(chain, dataclasses.replace(cfg, input_image=str(path), out_dir=str(Path(cfg.out_dir) / path.stem)))
    return Path(cfg.out_dir)


def reference_view(chain, cfg):
    """The rig view the input shows: --reference_view, which only the toy's pixel-space model may leave out
    (it was trained from every view; 0 then). A model trained from one view only (FaceLift's: the front) is
    warned about any other."""
    mcfg, V = chain.ck["config"], chain.V
    k = cfg.reference_view
    if k < 0 and mcfg.get("pipeline_dir"):
        views = ", ".join(f"{i} {name}" for i, name in enumerate(chain.ck["rig"]["views"]))
        raise InputError(f"--reference_view: which rig view does the input show? {chain.ck['path']} is not the "
                         f"toy's model, so say it ({views})")
    k = max(k, 0)
    if not 0 <= k < V:
        raise InputError(f"reference_view {k}: the rig has views 0..{V - 1}")
    if mcfg.get("reference_view", "random") not in ("random", str(k)):
        print(f"WARNING: {chain.ck['path']} was trained from view {mcfg['reference_view']} only; "
              f"--reference_view={k} is another view")
    return k


if __name__ == "__main__":
    # the original code base's --config is our --cfg
    cli(main, Config, None, [re.sub(r"^--config(?=$|=)", "--cfg", a) for a in sys.argv[1:]])
