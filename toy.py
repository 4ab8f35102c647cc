"""The built-in toy datasets and stand-ins: procedural data in the real formats, so that every stage runs
on a CPU in minutes with nothing downloaded (like nanoGPT's data/*/prepare.py); the frozen encoders'
seeded random face recognizer, and the toy's pretrained "SD" and "CLIP" (toy_unet: a UNet pretrained on the
toy frames, as the dance stages start from SD-1.5; toy_clip: an image encoder of the dancers' look).

    python toy.py mice --out=data/toy_mice --n=200          # FaceLift-format mice + preview.png
    python toy.py mice --out=data/toy_mice_mv --yaw_deg=30  # mice facing +x +- 30 deg
    python toy.py mice --out=data/toy_mice_small --mouse_scale=0.7 --off_aim=1.2  # ~7 % of a view, off-centre
    python toy.py dance --out=data/toy_dance --n=100        # stick dancers with music + preview.png

The training scripts call `toy_mice(...)` / `toy_dance(...)` when they run on their default folder:
the set is written once, and a folder holding another set (its toy.json differs) is refused.
"""
import argparse
import inspect
import json
import math
import time
from pathlib import Path

import numpy as np
import soundfile
import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from PIL import Image, ImageDraw
from safetensors.torch import load_file, save_file
from tqdm import tqdm
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from cameras import (
    camera_geometry,
    camera_hash,
    frames_to_tensors,
    load_rig,
    make_frame,
    orbit_c2w,
    save_prompt_embeds,
    write_cameras,
)
from data import (
    DANCE_FPS,
    HOP,
    JOINT_SETS,
    music_beats,
    music_features,
    preview_samples,
    read_audio,
    read_clip,
    read_frame,
    read_list_file,
    resize_frames,
    save_image_grid,
)
from losses import (
    beat_alignment,
    beats_within,
    diffusion_target,
    heatmap_loss,
    limb_beats,
    min_snr_weight,
    pose_error,
    pose_spread,
    soft_argmax,
    weighted_mse,
)
from models import (
    DANCE_UNET_CONFIGS,
    IRESNET_CONFIGS,
    IResNet,
    clip_image_embeds,
    intrinsics_matrix,
    to_model_space,
)
from plumbing import InputError, atomic_dir, cli, seeded
from pose import PoseModel
from render import render_gaussians
from weights import load_clip_image_encoder, load_iresnet, load_vae


def toy_face_recognizer(seed):
    """The toy's face recognizer: a frozen random IResNet, the same function of the face in every run
    and stage that uses the seed (its own RNG stream)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed + 12345)
        return IResNet(**IRESNET_CONFIGS["toy"]).eval().requires_grad_(False)


def toy_clip_image_encoder(seed, dim, image_size):
    """The toy's CLIP image encoder: a tiny frozen random CLIPVisionModelWithProjection (projection = dim)."""
    config = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                              image_size=image_size, patch_size=max(1, image_size // 4), projection_dim=dim)
    with torch.random.fork_rng():
        torch.manual_seed(seed + 23456)
        return CLIPVisionModelWithProjection(config).eval().requires_grad_(False)


def frozen_encoders(c, dim, device):
    """The dance stages' frozen encoders from a run's config `c` (a dict): the SD VAE (None: pixel space),
    the CLIP image encoder (projection `dim`) and the face recognizer, from their local paths, or the
    toy's stand-ins where a path is empty: the pretrained toy CLIP (toy_clip) beside the toy SD, the
    random one without it (toy_pretrain_steps 0), the seeded random recognizer."""
    vae = load_vae(c["vae_path"]).to(device) if c["vae_path"] else None
    if c["clip_path"]:
        clip = load_clip_image_encoder(c["clip_path"])
    elif c.get("toy_pretrain_steps"):
        folder = toy_clip_dir(c, dim)
        if not (folder / "spec.json").is_file():
            raise InputError(f"{folder}: the toy CLIP is missing (stage B makes it with the toy SD; "
                             "or set --clip_path)")
        clip = load_clip_image_encoder(folder)
    else:
        clip = toy_clip_image_encoder(c["seed"], dim, c["image_size"])
    if clip.config.projection_dim != dim:
        raise InputError(f"--clip_path={c['clip_path']}: image embeddings of width {clip.config.projection_dim}, "
                         f"the UNet's cross-attention takes {dim}")
    return vae, clip.to(device), face_recognizer(c, device)


def face_recognizer(c, device):
    """The frozen face recognizer of a run's config `c`: an arcface_torch file, or the toy's seeded one."""
    if c["face_recognizer_path"]:
        return load_iresnet(c["face_recognizer_path"], c["face_recognizer_arch"]).to(device)
    return toy_face_recognizer(c["seed"]).to(device)


def eval_face_recognizer(c, device):
    """The recognizer that scores identity, one the identity loss never saw: eval_face_recognizer_path (an
    arcface_torch file of face_recognizer_arch), or the toy's recognizer seeded apart. A real run without
    one scores with its training recognizer, and says so."""
    if c.get("eval_face_recognizer_path"):
        return load_iresnet(c["eval_face_recognizer_path"], c["face_recognizer_arch"]).to(device)
    if c["face_recognizer_path"]:
        print("identity scored by the training face recognizer: set eval_face_recognizer_path to one the "
              "identity loss never saw")
        return face_recognizer(c, device)
    return toy_face_recognizer(c["seed"] + 1).to(device)


def training_frames(cfg, frames_per_clip):
    """frames_per_clip frames spread over every training clip, as stage B sees them: (N, k, 3, S, S)."""
    clips = [read_clip(d, cfg.fps) for d in read_list_file(Path(cfg.data_dir) / cfg.train_list)]
    frames = torch.stack([read_frame(c["source"], int(t)) for c in clips
                          for t in np.linspace(0, c["T"] - 1, frames_per_clip)])  # (N k, 3, H, W)
    return resize_frames(frames, cfg.image_size).unflatten(0, (len(clips), frames_per_clip))  # (N, k, 3, S, S)


def made_once(out, spec, accelerator, what, make):
    """`make(tmp)` writes a toy stand-in into `out` unless its spec.json is `spec` (main process, atomic);
    every process waits for it."""
    if accelerator.is_main_process and not ((out / "spec.json").is_file()
                                            and json.loads((out / "spec.json").read_text()) == spec):
        print(f"{what}, once -> {out}")
        with atomic_dir(out) as tmp:
            make(tmp)
            (tmp / "spec.json").write_text(json.dumps(spec, indent=1))
    accelerator.wait_for_everyone()


def toy_unet(cfg, accelerator, scheduler, lr_at, batch_size=16, lr=1e-3, frames_per_clip=24):
    """The toy's stand-in for SD-1.5's UNet: the unet_preset UNet trained as an unconditional denoiser
    (context zero, stage B's scheduler) on frames of the training clips, toy_pretrain_steps at batch
    16. CHAMP's denoiser and ReferenceNet both start from SD; from random weights the toy's reference
    attention is barely taken up in stage B's budget (docs/experiments.md). Like SD, it is made once
    and then only read: <data_dir>/toy_unet/<preset>_<size>px_<steps>/unet (diffusers layout), made
    with the toy data (start_stage) or by the first stage B on other data. Returns that folder."""
    out = Path(cfg.data_dir) / "toy_unet" / f"{cfg.unet_preset}_{cfg.image_size}px_{cfg.toy_pretrain_steps}"
    spec = {"unet_preset": cfg.unet_preset, "image_size": cfg.image_size, "steps": cfg.toy_pretrain_steps,
            "seed": cfg.seed, "train_list": str(cfg.train_list), "prediction_type": cfg.prediction_type,
            "beta_schedule": cfg.beta_schedule, "zero_snr": cfg.zero_snr}

    def make(tmp):
        gen, device = seeded(cfg.seed, 7), accelerator.device
        with torch.random.fork_rng():  # the same weights whatever ran before
            torch.manual_seed(cfg.seed)
            unet = UNet2DConditionModel(**DANCE_UNET_CONFIGS[cfg.unet_preset]).to(device)
        x_all = to_model_space(None, training_frames(cfg, frames_per_clip).flatten(0, 1))  # (N k, 3, S, S)
        opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=cfg.weight_decay)
        ctx = torch.zeros(batch_size, 1, unet.config.cross_attention_dim, device=device)
        alphas = scheduler.alphas_cumprod.to(device)
        for step in tqdm(range(cfg.toy_pretrain_steps), desc="toy SD", mininterval=10):
            for g in opt.param_groups:
                g["lr"] = lr_at(step, lr, cfg.toy_pretrain_steps, cfg)
            x0 = x_all[torch.randint(len(x_all), (batch_size,), generator=gen)]  # (b, 3, S, S)
            noise, t = torch.randn(x0.shape, generator=gen), torch.randint(0, 1000, (batch_size,), generator=gen)
            x0, noise, t = x0.to(device), noise.to(device), t.to(device)
            pred = unet(scheduler.add_noise(x0, noise, t), t, encoder_hidden_states=ctx).sample
            loss = weighted_mse(pred, diffusion_target(scheduler, x0, noise, t),
                                min_snr_weight(alphas[t], cfg.min_snr_gamma, cfg.prediction_type))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), cfg.grad_clip)
            opt.step()
        print(f"the toy's SD: {cfg.toy_pretrain_steps} steps, last loss {loss.item():.4f}")
        unet.save_pretrained(tmp / "unet")

    made_once(out, spec, accelerator, f"the toy's SD: the {cfg.unet_preset} UNet learns the training frames "
              "unconditionally", make)
    return out / "unet"


def toy_clip_dir(c, dim):
    """Where the toy CLIP of a run's config `c` (a dict) and UNet width `dim` is kept: one per seed, so
    that a run with another seed on the same data never replaces the encoder an earlier run samples with."""
    return Path(c["data_dir"]) / "toy_clip" / f"{dim}_{c['image_size']}px_seed{c['seed']}"


def new_background(x, gen, p=0.5):
    """Toy frames x (B, 3, S, S), each with probability p on a new random flat background: the
    background is what differs from the frame's median border colour by < 0.1."""
    border = torch.cat([x[..., 0, :], x[..., -1, :], x[..., :, 0], x[..., :, -1]], -1)  # (B, 3, 4S)
    bg = ((x - border.median(-1).values[..., None, None]).abs().amax(1, keepdim=True) < 0.1).float()  # (B, 1, S, S)
    swap = bg * (torch.rand(len(x), 1, 1, 1, generator=gen) < p).float()
    return x * (1 - swap) + torch.rand(len(x), 3, 1, 1, generator=gen) * swap


def toy_clip(cfg, dim, accelerator, steps=300, batch_size=64, frames_per_clip=24, temperature=0.1, lr=1e-3):
    """The toy's stand-in for CLIP's image encoder, made once beside the toy SD (toy_clip_dir). Real
    CLIP embeds a person's look (clothes, colours) whatever the pose; a random encoder barely does, and
    stage B then paints the clothes of its training dancers (docs/experiments.md). So the toy CLIP
    learns that invariance contrastively (InfoNCE, CLIP's loss): two frames of one training clip are a
    pair, the other clips of the batch its negatives (clothes are drawn per clip). Each frame gets a new
    flat background with a probability rising to 1/2: the background alone tells the clips apart, and
    without that the encoder learns nothing else (dancer-only retrieval 3.5 %, docs/experiments.md)."""
    out = toy_clip_dir(vars(cfg), dim)
    spec = {"dim": dim, "image_size": cfg.image_size, "steps": steps, "seed": cfg.seed,
            "train_list": str(cfg.train_list)}

    def make(tmp):
        gen = seeded(cfg.seed, 8)
        clip = toy_clip_image_encoder(cfg.seed, dim, cfg.image_size).train().requires_grad_(True)
        frames = training_frames(cfg, frames_per_clip)  # (N, k, 3, S, S)
        opt = torch.optim.AdamW(clip.parameters(), lr=lr, weight_decay=cfg.weight_decay)
        b = min(batch_size, len(frames))
        for step in tqdm(range(steps), desc="toy CLIP", mininterval=10):
            which = torch.randperm(len(frames), generator=gen)[:b]  # b clips
            pick = torch.randint(frames_per_clip, (b, 2), generator=gen)  # two frames of each
            x = torch.cat([frames[which, pick[:, 0]], frames[which, pick[:, 1]]])  # (2b, 3, S, S)
            x = new_background(x, gen, p=0.5 * min(1.0, 2 * step / steps))  # at 0.5 from the start it collapses
            z = F.normalize(clip_image_embeds(clip, x), dim=-1)  # (2b, dim)
            logits = z[:b] @ z[b:].T / temperature  # (b, b): the diagonal pairs frames of one clip
            labels = torch.arange(b)
            loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        print(f"the toy CLIP: {steps} steps, last loss {loss.item():.4f} (chance {math.log(b):.2f})")
        if loss.item() > 0.5 * math.log(b):  # seen on tiny sets: every embedding alike
            print("the toy CLIP learnt little: stage B will read little of the reference's look from it")
        clip.eval().save_pretrained(tmp)

    made_once(out, spec, accelerator, "the toy CLIP learns the clips' look whatever the pose", make)
    return out


def check_toy_set(out, spec):
    """Stops unless the folder `out` holds the toy set `spec` (its toy.json)."""
    file = Path(out) / "toy.json"
    found = json.loads(file.read_text()) if file.exists() else None
    if found != spec:
        raise InputError(f"{out} holds another toy set ({found}) than this run asks for ({spec}): "
                         "delete it to regenerate")


def resolved(writer, **kw):
    """The arguments a call writer(out, **kw) works with: its defaults filled in, n_val None -> n // 10
    (n_val_seen None -> n // 20)."""
    bound = inspect.signature(writer).bind_partial(**kw)
    bound.apply_defaults()
    args = {k: v for k, v in bound.arguments.items() if k not in ("out", "progress")}
    args = dict(args, n_val=max(1, args["n"] // 10) if args["n_val"] is None else args["n_val"])
    if "n_val_seen" in args and args["n_val_seen"] is None:  # toy dancers: n // 20
        args["n_val_seen"] = args["n"] // 20
    return args


def with_barrier(accelerator, make, out, spec):
    """The main process writes the set unless its train list exists; then every process checks it."""
    if (accelerator is None or accelerator.is_main_process) and not (Path(out) / "data_train.txt").exists():
        make()
    if accelerator is not None:
        accelerator.wait_for_everyone()
    check_toy_set(out, spec)
    return Path(out)


# ----------------------------------------------------------------------------------------------
# Toy mice: procedural animals made of 3D Gaussians, rendered into FaceLift-format samples

def _ellipsoid_blobs(rng, n, centre, axes, colour, belly, jitter, scale):
    """n Gaussians spread over the surface of an axis-aligned ellipsoid, belly side lighter."""
    v = rng.normal(size=(n, 3))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    pts = centre + v * axes * rng.uniform(0.75, 0.95, size=(n, 1))
    col = np.where(v[:, 2:] < -0.3, belly, colour) + rng.normal(0, jitter, size=(n, 3))
    return pts, np.full((n, 3), scale) * rng.uniform(0.8, 1.2, size=(n, 3)), col


def toy_mouse(rng, yaw_deg=None, mouse_scale=1.0):
    """A random mouse as Gaussian parameters (numpy): means (N, 3), scales (N, 3), quats (N, 4),
    opacities (N,), colors (N, 3). Built facing +x, then turned by a random yaw: any direction
    (yaw_deg None) or within +-yaw_deg of +x. mouse_scale multiplies its size (offsets from its centre
    and the Gaussians' scales) after every draw, so the same rng gives the same mouse, smaller."""
    s = rng.uniform(1.1, 1.35)  # overall size (the 50 deg view is 2.5 units wide at the origin)
    fur = rng.choice([[0.55, 0.42, 0.3], [0.5, 0.5, 0.52], [0.85, 0.83, 0.8], [0.25, 0.22, 0.2],
                      [0.7, 0.55, 0.35]])
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
    head_centre = np.array([hl * 0.9, 0, 0])
    head_parts = [_ellipsoid_blobs(rng, 70, head_centre, head_axes, fur, belly, 0.04, 0.05 * s)]
    ear_r = s * rng.uniform(0.07, 0.1)
    for side in (-1, 1):
        ear = np.array([[hl * 0.45, side * hl * 0.55, hl * 0.75]])
        head_parts.append((ear, np.array([[0.012, ear_r, ear_r]]), pink[None]))
        eye = np.array([[hl * 0.5, side * hl * 0.52, hl * 0.28]])
        head_parts.append((eye, np.full((1, 3), 0.028 * s), np.full((1, 3), 0.03)))
    head_parts.append((np.array([[hl * 1.9, 0, 0]]), np.full((1, 3), 0.03 * s), pink[None]))  # nose
    head_pts = np.concatenate([p for p, _, _ in head_parts]) @ rot.T + neck
    parts.append((head_pts, np.concatenate([sc for _, sc, _ in head_parts]),
                  np.concatenate([c for _, _, c in head_parts])))

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
    return {"means": (means - means.mean(0) * [1, 1, 0]) @ R.T * mouse_scale, "scales": scales * mouse_scale,
            "quats": quats, "opacities": opac, "colors": colors}


def random_view_frames(rng, n, size, focal, radius=2.7, elevations=(-10.0, 50.0), target=(0.0, 0.0, 0.0)):
    """Extra cameras at random azimuth/elevation around `target` (novel-view supervision, as
    FaceLift's 32-view GS-LRM samples give)."""
    return [make_frame(orbit_c2w(rng.uniform(-180, 180), rng.uniform(*elevations), radius, target), size,
                       focal) for _ in range(n)]


def off_aim_offset(seed, i, off_aim):
    """Mouse i's horizontal offset (3,) from the rig's aim point: uniform in a disc of radius off_aim.
    Its own rng stream (seed, i, 1), so that the mouse's and the views' draws stay those of off_aim 0."""
    rng = np.random.default_rng((seed, i, 1))
    r, phi = off_aim * np.sqrt(rng.uniform()), rng.uniform(0, 2 * np.pi)  # sqrt: uniform over the area
    return np.array([r * np.cos(phi), r * np.sin(phi), 0.0])


def write_toy_mice(out, n=200, rig="mouse_6view", size=64, n_extra=4, n_val=None, seed=0, yaw_deg=None,
                   mouse_scale=1.0, off_aim=0.0, progress=True):
    """Write n toy mice in the FaceLift GS-LRM sample format under `out`: each sample has the
    rig's views first (cam_000..), then n_extra random views; plus data_train.txt / data_val.txt and
    toy.json (the arguments, so a later run can tell whether the folder is the set it asks for).
    yaw_deg: mice face any way (None) or +x +- yaw_deg (see toy_mouse). mouse_scale: their size (0.6-0.8
    covers ~5-10 % of the rig's views, as real mice do). off_aim: each mouse stands up to this far
    (horizontally, uniform in a disc) from where the rig aims, as real mice walk about the arena."""
    rig = load_rig(rig) if isinstance(rig, str) else rig
    out = Path(out)
    n_val = max(1, n // 10) if n_val is None else n_val
    # the mice stand where the rig's cameras aim (a real rig aims below the origin); extra views orbit there
    g = camera_geometry(rig["frames"])
    # rounded: the fit's float noise must not move a rig aimed at the origin (facelift_6view) at all
    target, radius = g["target"].numpy().round(6) + 0.0, round(g["dist"].mean().item(), 6)
    names = []
    for i in tqdm(range(n), desc=f"toy mice -> {out}", disable=not progress):
        rng = np.random.default_rng((seed, i))
        centre = target + off_aim_offset(seed, i, off_aim)  # == target when off_aim is 0
        m = {k: torch.as_tensor(v + centre if k == "means" else v, dtype=torch.float32)
             for k, v in toy_mouse(rng, yaw_deg, mouse_scale).items()}
        focal = rig["frames"][0]["fx"] * size / rig["frames"][0]["w"]
        frames = [make_frame(torch.linalg.inv(torch.tensor(fr["w2c"], dtype=torch.float64)), size,
                             fr["fx"] * size / fr["w"]) for fr in rig["frames"]]
        frames += random_view_frames(rng, n_extra, size, focal, radius, target=centre.tolist())  # around the mouse
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
    spec = toy_spec(n, rig, size, n_extra, n_val, seed, yaw_deg, mouse_scale, off_aim)
    (out / "toy.json").write_text(json.dumps(spec))
    return out


def toy_spec(n, rig, size, n_extra, n_val, seed, yaw_deg, mouse_scale=1.0, off_aim=0.0):
    """What write_toy_mice was asked for, as toy.json records it. mouse_scale and off_aim only when
    not the defaults: a folder written before they existed is the same set, and still matches."""
    spec = {"n": n, "rig": rig["name"], "cameras": camera_hash(rig["frames"]), "size": size,
            "n_extra": n_extra, "n_val": n_val, "seed": seed, "yaw_deg": yaw_deg}
    given, defaults = {"mouse_scale": mouse_scale, "off_aim": off_aim}, {"mouse_scale": 1.0, "off_aim": 0.0}
    return spec | {k: v for k, v in given.items() if v != defaults[k]}


def toy_mice(out, accelerator=None, progress=True, **spec):
    """The toy mouse set write_toy_mice(out, **spec) describes, in `out` (see with_barrier)."""
    args = resolved(write_toy_mice, **spec)
    args["rig"] = load_rig(args["rig"]) if isinstance(args["rig"], str) else args["rig"]
    return with_barrier(accelerator, lambda: write_toy_mice(out, **args, progress=progress), out,
                        toy_spec(**args))


# ----------------------------------------------------------------------------------------------
# Toy prompt embeddings: the rig's views named by their camera geometry instead of text

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
    # unit scale per token, like a LayerNorm'd text encoder
    return (pe - pe.mean(-1, keepdim=True)) / pe.std(-1, keepdim=True)


def toy_prompt_embeds(path, rig, dim, accelerator=None):
    """Writes toy_rig_prompt_embeds(rig, dim) to `path` if it is missing (main process)."""
    path = Path(path)
    if (accelerator is None or accelerator.is_main_process) and not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        save_prompt_embeds(path, toy_rig_prompt_embeds(rig, dim), rig, ["toy: each view's camera geometry"])
        print(f"wrote toy prompt embeddings for rig {rig['name']!r} to {path}")
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return path


# ----------------------------------------------------------------------------------------------
# Toy dancers: stick figures whose motion is locked to procedurally generated music


def toy_dancer(rng):
    """A dancer's identity and style (fixed over all its clips): body proportions, a textured face,
    and which limbs move on the beats / off the beats / not at all (clothing: per clip, see write_toy_dance)."""
    # right arm, left arm, right leg, left leg
    modes = rng.choice(["on", "off", "still"], size=4, p=[0.4, 0.4, 0.2])
    modes[rng.integers(2)] = rng.choice(["on", "off"])  # at least one arm dances
    return dict(
        scale=rng.uniform(0.85, 1.0), shoulder=rng.uniform(0.075, 0.1), hip=rng.uniform(0.04, 0.055),
        torso=rng.uniform(0.22, 0.27), upper_arm=rng.uniform(0.11, 0.14), fore_arm=rng.uniform(0.1, 0.13),
        thigh=rng.uniform(0.14, 0.17), shin=rng.uniform(0.14, 0.17), head=rng.uniform(0.065, 0.08),
        modes=list(modes), arm_base=rng.uniform(0.1, 0.5, 2),
        arm_amp=rng.uniform(0.6, 1.4, 2) * rng.choice([-1, 1], 2),
        elbow=rng.uniform(0.2, 1.2, 2), leg_amp=rng.uniform(0.15, 0.45, 2), sway=rng.uniform(0.0, 0.04),
        bounce=rng.uniform(0.005, 0.025), bounce_mode=rng.choice(["on", "off"]),
        shirt=rng.uniform(0.1, 0.9, 3), trousers=rng.uniform(0.05, 0.6, 3),
        skin=rng.uniform(0.45, 0.95) * np.array([1.0, 0.8, 0.65]),
        face_base=rng.uniform(0.2, 1.0, 3), face_stripe=rng.uniform(0.0, 0.8, 3),
        face_freq=rng.uniform(0.6, 1.6), face_angle=rng.uniform(0, np.pi),
        face_spot=rng.uniform(-0.5, 0.5, 2))


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
    tone = np.sin(2 * np.pi * notes * tau) + 0.3 * np.sin(4 * np.pi * notes * tau)  # the note and its octave
    melody = 0.25 * accent * np.exp(-tau / 0.25) * tone
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
    sides = ((0, -1, (2, 3, 4), (8, 9, 10)), (1, 1, (5, 6, 7), (11, 12, 13)))  # right, then left
    for j, side, (sh, el, wr), (hp, kn, an) in sides:
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
    offsets = ((0, 0.15), (-0.35, -0.1), (0.35, -0.1), (-0.95, 0), (0.95, 0))  # in head radii
    for i, (dx, dy) in zip((0, 14, 15, 16, 17), offsets):  # nose, eyes, ears
        P[:, i, :2] = head + r * np.array([dx, dy])
    for i, ank, side in ((18, 13, 1), (21, 10, -1)):  # big toe, small toe, heel of each foot
        P[:, i, :2] = P[:, ank, :2] + s * np.array([side * 0.035, 0.02])
        P[:, i + 1, :2] = P[:, ank, :2] + s * np.array([side * 0.02, 0.025])
        P[:, i + 2, :2] = P[:, ank, :2] + s * np.array([-side * 0.012, 0.015])
    P[:, :24, 2] = 1.0
    return P.astype(np.float32), np.concatenate([head, np.full((T, 1), r)], -1).astype(np.float32)


def toy_dancers_spread(frames, fps=DANCE_FPS, n=1000, seed=1):
    """How much the toy's dancers move at large: the mean pose spread (losses.pose_spread) over `frames`
    frames of n new dancers, each on its own song (poses only, nothing rendered). A model that cannot
    see a new dancer's style can at best match this; a handful of held-out dancers is one draw of it."""
    spreads = []
    for k in range(n):
        rng = np.random.default_rng((seed, 2_000_000 + k))  # apart from write_toy_dance's dancers and songs
        _, bpm, offset = toy_music(rng, 1.0, 100)  # its tempo and first beat (the audio: a token second)
        dancer = toy_dancer(rng)
        spreads.append(pose_spread(toy_poses(dancer, (np.arange(frames) / fps - offset) * bpm / 60)[0]))
    return float(np.mean(spreads))


def face_texture(dancer, radius_px):
    """The dancer's face as an RGBA patch (a disk of radius_px pixels): stripes at the dancer's
    angle and frequency between two colours, and a dark spot; this is the identity a recognizer sees."""
    n = 2 * int(np.ceil(radius_px)) + 2
    c = (np.arange(n) + 0.5 - n / 2) / radius_px  # in head radii
    v, u = np.meshgrid(c, c, indexing="ij")  # (n, n): rows are y, columns x
    ang = dancer["face_angle"]
    along = u * np.cos(ang) + v * np.sin(ang)  # (n, n): position across the stripes
    stripes = (0.5 + 0.5 * np.sin(2 * np.pi * dancer["face_freq"] * along))[..., None]
    rgb = dancer["face_base"] * (1 - stripes) + dancer["face_stripe"] * stripes  # (n, n, 3)
    rgb = rgb * (((u - dancer["face_spot"][0]) ** 2 + (v - dancer["face_spot"][1]) ** 2) >= 0.12)[..., None]
    alpha = np.clip((1 - np.sqrt(u * u + v * v)) * radius_px + 0.5, 0, 1)[..., None]  # anti-aliased rim
    return Image.fromarray((np.concatenate([rgb, alpha], -1) * 255 + 0.5).astype(np.uint8), "RGBA")


def render_dancer(dancer, poses, head, size, bg, supersample=4):
    """Frames [T, size, size, 3] uint8: trousers, shirt, skin-coloured forearms and the textured
    face, drawn with PIL at `supersample` x the size and box-filtered down (anti-aliasing)."""
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


def write_toy_dance(out, n=100, n_dancers=20, seconds=8.0, size=64, fps=DANCE_FPS, n_val=None, seed=0,
                    n_val_dancers=5, n_val_seen=None, progress=True):
    """n toy clips in the clip format (each with its own music), with music features cached, list files
    and preview.png. Clip i shows dancer i % n_dancers, except the last n_val clips (data_val.txt), which
    show n_val_dancers other dancers, never trained on (identity is measured on new people). The
    n_val_seen clips before them (data_val_seen.txt) are held-out clips of the training dancers: a
    toy dancer's style is its own, so motion is predictable from the music only for dancers seen before."""
    out, sr, T = Path(out), fps * HOP, int(round(seconds * fps))
    n_val = max(1, n // 10) if n_val is None else n_val
    n_val_seen = n // 20 if n_val_seen is None else n_val_seen
    n_train = n - n_val - n_val_seen
    if n_train < 1:
        raise InputError(f"n={n}: no training clips left after n_val={n_val} and n_val_seen={n_val_seen}")
    dancers = [toy_dancer(np.random.default_rng((seed, 1_000_000 + k))) for k in range(n_dancers + n_val_dancers)]
    who = [i % n_dancers if i < n - n_val else n_dancers + i % n_val_dancers for i in range(n)]
    names = []
    for i in tqdm(range(n), desc=f"toy dance -> {out}", disable=not progress):
        rng = np.random.default_rng((seed, i))
        audio, bpm, offset = toy_music(rng, seconds + 0.1, sr)  # a little longer than the frames
        phase = (np.arange(T) / fps - offset) * bpm / 60  # beats at each frame
        bg = rng.uniform(0.8, 1.0, 3)
        # clothes change from clip to clip (face, body and style are the dancer's): an image model must
        # copy them from the reference frame, it cannot recall them from who the dancer is
        dancer = dict(dancers[who[i]], shirt=rng.uniform(0.1, 0.9, 3), trousers=rng.uniform(0.05, 0.6, 3))
        poses, head = toy_poses(dancer, phase)
        frames = render_dancer(dancer, poses, head, size, bg)
        d = out / f"clip_{i:05d}"
        (d / "frames").mkdir(parents=True, exist_ok=True)
        for t in range(T):
            Image.fromarray(frames[t]).save(d / "frames" / f"{t:06d}.png", compress_level=1)
        soundfile.write(str(d / "audio.wav"), audio, sr, subtype="PCM_16")
        np.save(d / "poses.npy", poses)
        centre, r = head[:, :2], head[:, 2:]
        boxes = np.concatenate([centre - r, centre + r], 1)  # (T, 4) x0 y0 x1 y1
        (d / "faces.json").write_text(json.dumps({"boxes": np.round(boxes, 5).tolist()}))
        meta = {"fps": fps, "size": [size, size], "source": "toy", "dancer": who[i],
                "bpm": round(bpm, 3), "first_beat_s": round(offset, 4)}
        (d / "meta.json").write_text(json.dumps(meta))
        wav = read_audio(d / "audio.wav")[0]  # the 16-bit WAV, as a re-computation would read it
        np.save(d / "music_feats.npy", music_features(wav, sr, fps, T))
        names.append(d.name)
    (out / "data_train.txt").write_text("\n".join(names[:n_train]) + "\n")
    (out / "data_val_seen.txt").write_text("\n".join(names[n_train: n - n_val]) + "\n")
    (out / "data_val.txt").write_text("\n".join(names[n - n_val:]) + "\n")
    spec = dict(n=n, n_dancers=n_dancers, seconds=seconds, size=size, fps=fps, n_val=n_val, seed=seed,
                n_val_dancers=n_val_dancers, n_val_seen=n_val_seen)
    (out / "toy.json").write_text(json.dumps(spec))
    sources = [("png", sorted((out / nm / "frames").glob("*.png"))) for nm in names[:6]]
    rows = [torch.stack([read_frame(src, t) for t in range(0, T, T // 8)][:8]) for src in sources]
    save_image_grid(rows, out / "preview.png")
    return out


def toy_dance(out, accelerator=None, progress=True, **spec):
    """The toy dance set write_toy_dance(out, **spec) describes, in `out` (see with_barrier)."""
    args = resolved(write_toy_dance, **spec)
    return with_barrier(accelerator, lambda: write_toy_dance(out, **args, progress=progress), out, args)


# ----------------------------------------------------------------------------------------------
# The toy's pose detector: reads the joints back from frames (generated ones at validation), so that
# pose accuracy and the beats of re-detected poses can be scored on what a model drew


def _conv(c_in, c_out, stride=1):
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1), nn.GroupNorm(8, c_out), nn.SiLU())


class PoseDetector(nn.Module):
    """A small UNet (full, 1/2 and 1/4 resolution): frames (B, 3, S, S) in [0, 1] -> joint heatmap logits
    (B, J, S, S), read out by soft_argmax. Two coordinate channels join the RGB: the toy dancers face the
    camera, so the side of the frame a limb is on tells its left from its right."""

    def __init__(self, J, image_size, width=32):
        super().__init__()
        w, self.J, self.image_size = width, J, image_size
        self.inp = nn.Sequential(_conv(5, w), _conv(w, w))
        self.down1 = nn.Sequential(_conv(w, 2 * w, 2), _conv(2 * w, 2 * w))
        self.down2 = nn.Sequential(_conv(2 * w, 2 * w, 2), _conv(2 * w, 2 * w), _conv(2 * w, 2 * w))
        self.up1, self.up2 = _conv(4 * w, 2 * w), _conv(3 * w, w)
        self.out = nn.Conv2d(w, J, 1)

    def forward(self, x):
        B, _, H, W = x.shape
        ys = (torch.arange(H, device=x.device, dtype=x.dtype) + 0.5) / H
        xs = (torch.arange(W, device=x.device, dtype=x.dtype) + 0.5) / W
        coords = torch.stack(torch.meshgrid(ys, xs, indexing="ij")).expand(B, -1, -1, -1)  # (B, 2, H, W)
        h0 = self.inp(torch.cat([x * 2 - 1, coords * 2 - 1], 1))  # (B, w, H, W)
        h1 = self.down1(h0)  # (B, 2w, H/2, W/2)
        h2 = self.down2(h1)  # (B, 2w, H/4, W/4)
        u1 = self.up1(torch.cat([F.interpolate(h2, scale_factor=2.0), h1], 1))  # (B, 2w, H/2, W/2)
        return self.out(self.up2(torch.cat([F.interpolate(u1, scale_factor=2.0), h0], 1)))  # (B, J, H, W)


def pose_frames(data_dir, list_file, J, image_size, fps, frames_per_clip=0):
    """Frames of the listed clips resized to image_size as stages B and C see them, (N, 3, S, S), and
    their poses (N, J, 3): frames_per_clip evenly spread over each clip, or all (0)."""
    clips = [read_clip(d, fps) for d in read_list_file(Path(data_dir) / list_file)]
    frames, poses = [], []
    for c in clips:
        P = np.load(c["dir"] / "poses.npy")[:, :J].astype(np.float32)  # (T, J, 3)
        ts = np.linspace(0, c["T"] - 1, frames_per_clip).round().astype(int) if frames_per_clip else range(c["T"])
        frames.append(resize_frames(torch.stack([read_frame(c["source"], int(t)) for t in ts]), image_size))
        poses.append(torch.from_numpy(P[list(ts)]))  # (n, J, 3)
    return torch.cat(frames), torch.cat(poses)


def degrade(x, gen, noise=0.1):
    """What a generator gets wrong that says nothing of the pose, as training augmentation: colours
    (RGB channels shuffled: clothes and background are per clip anyway), sharpness (a random blend with
    a 3 x 3 blur) and pixel noise (random strength up to `noise`)."""
    B = len(x)
    perm = torch.argsort(torch.rand(B, 3, generator=gen), 1)  # (B, 3): a channel order per frame
    x = torch.gather(x, 1, perm[:, :, None, None].expand_as(x))
    blur = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, 1)
    a = torch.rand(B, 1, 1, 1, generator=gen)
    x = a * blur + (1 - a) * x
    return x + torch.randn(x.shape, generator=gen) * noise * torch.rand(B, 1, 1, 1, generator=gen)


def toy_pose_detector(data_dir, joints="body_feet24", image_size=32, fps=DANCE_FPS, steps=250, seed=0,
                      train_list="data_train.txt", width=32, batch_size=32, lr=2e-3, frames_per_clip=48,
                      accelerator=None, progress=True):
    """The toy's pose detector (PoseDetector), trained on frames of the training clips against their
    poses (heatmap_loss, invisible joints masked) at image_size, the size stages B and C generate.
    Like toy_unet it is made once and then only read: <data_dir>/toy_pose_detector/<joints>_<size>px_
    <steps>/ (detector.safetensors + spec.json); the main process trains it. Returns it frozen, eval, on CPU."""
    if joints not in JOINT_SETS:
        raise InputError(f"joints={joints!r}: expected one of {list(JOINT_SETS)}")
    out = Path(data_dir) / "toy_pose_detector" / f"{joints}_{image_size}px_{steps}"
    spec = {"joints": joints, "image_size": image_size, "fps": fps, "steps": steps, "seed": seed,
            "train_list": str(train_list), "width": width, "batch_size": batch_size, "lr": lr,
            "frames_per_clip": frames_per_clip}
    J = JOINT_SETS[joints]
    done = lambda: (out / "spec.json").is_file() and json.loads((out / "spec.json").read_text()) == spec  # noqa: E731
    if (accelerator is None or accelerator.is_main_process) and not done():
        print(f"the toy's pose detector learns the training frames' poses, once -> {out}")
        frames, poses = pose_frames(data_dir, train_list, J, image_size, fps, frames_per_clip)
        with torch.random.fork_rng():  # the same weights whatever ran before
            torch.manual_seed(seed)
            net = PoseDetector(J, image_size, width)
        gen = seeded(seed, 11)  # batches and augmentation: its own stream
        opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
        t0 = time.time()
        for step in tqdm(range(steps), desc="toy pose detector", mininterval=10, disable=not progress):
            warm, t = min(1.0, (step + 1) / 20), step / steps  # 20 warmup steps, then cosine to lr / 20
            for g in opt.param_groups:
                g["lr"] = lr * warm * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))
            i = torch.randint(len(frames), (batch_size,), generator=gen)
            loss, _ = heatmap_loss(net(degrade(frames[i], gen)), poses[i])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        print(f"the toy's pose detector: {steps} steps in {time.time() - t0:.0f} s, last loss {loss.item():.3f}")
        with atomic_dir(out) as tmp:
            save_file(net.state_dict(), str(tmp / "detector.safetensors"))
            (tmp / "spec.json").write_text(json.dumps(spec, indent=1))
    if accelerator is not None:
        accelerator.wait_for_everyone()
    with torch.random.fork_rng():  # weights about to be overwritten: no draws from the caller's RNG
        net = PoseDetector(J, image_size, width)
    net.load_state_dict(load_file(str(out / "detector.safetensors")))
    return net.eval().requires_grad_(False)


@torch.no_grad()
def detect_poses(detector, frames, batch_size=256):
    """Joints read from frames (N, 3, H, W) in [0, 1] (resized to the detector's size) -> (N, J, 2)
    normalised (x, y), as poses.npy; on the frames' device, computed on the detector's."""
    device = next(detector.parameters()).device
    out = []
    for x in frames.split(batch_size):
        x = resize_frames(x.to(device, torch.float32), detector.image_size)  # (b, 3, S, S)
        out.append(soft_argmax(detector(x)).to(frames.device))  # (b, J, 2)
    return torch.cat(out) if out else frames.new_zeros(0, detector.J, 2)


TOY_DANCE_DIR = "data/toy_dance"  # train_dance.py's default data_dir: the toy dancers are made there


def pose_reader(c, toy, device, accelerator=None):
    """What reads poses back from generated frames for the pose-accuracy metrics, from a run's config `c`:
    its pose_model ONNX file (pose.py, real data), else on the toy data (toy, or pose_model "toy") the
    toy's detector trained on the run's clips, else None. Returns frames (N, 3, H, W) in [0, 1] ->
    (N, J, 2) normalised. Call it on every process: the toy's detector is trained once, by the main one."""
    J = JOINT_SETS[c["joints"]]
    if c.get("pose_model") and c["pose_model"] != "toy":
        model = PoseModel(c["pose_model"], c.get("pose_detector") or "full_frame")

        def read(frames):
            out = []
            for f in frames:
                rgb = (f.permute(1, 2, 0).clamp(0, 1).cpu().numpy() * 255 + 0.5).astype(np.uint8)  # (H, W, 3)
                out.append(torch.from_numpy(model(rgb)[:J, :2]) / torch.tensor([f.shape[-1], f.shape[-2]]))
            return torch.stack(out).to(frames.device)  # (N, J, 2)
        return read
    if not toy and c.get("pose_model") != "toy":
        return None
    det = toy_pose_detector(c["data_dir"], c["joints"], c["image_size"], c["fps"], seed=c["seed"],
                            train_list=c["train_list"], accelerator=accelerator).to(device)
    return lambda frames: detect_poses(det, frames)


LIMB_ENDS = [3, 4, 6, 7, 9, 10, 12, 13]  # elbows, wrists, knees, ankles: where a standing pose is wrong


def pose_detector_scores(detector, data_dir, val_list="data_val.txt", train_list="data_train.txt",
                         fps=DANCE_FPS):
    """The detector on every frame of the val_list clips (real frames): pose error and PCK@0.05 against
    their poses (all joints, and elbows / wrists / knees / ankles), beside the mean training pose, the
    clip's frame-0 pose (copy the reference) and the detection against the pose half a clip away (wrong
    pose); and beat alignment of the limb beats of detected and true poses with the music's beats."""
    J, S = detector.J, detector.image_size
    frames, poses = pose_frames(data_dir, val_list, J, S, fps)
    clips = [read_clip(d, fps) for d in read_list_file(Path(data_dir) / val_list)]
    T = [c["T"] for c in clips]
    pred = detect_poses(detector, frames)  # (N, J, 2)
    mean = pose_frames(data_dir, train_list, J, S, fps, 48)[1][..., :2].mean(0)  # (J, 2)
    per_clip = lambda x: x.split(T)  # noqa: E731
    ref = torch.cat([p[:1, :, :2].expand(len(p), -1, -1) for p in per_clip(poses)])  # (N, J, 2)
    wrong = torch.cat([p.roll(len(p) // 2, 0) for p in per_clip(poses)])  # (N, J, 3)
    m = {}
    for name, xy, target in (("", pred, poses), ("_mean_pose", mean.expand_as(pred), poses),
                             ("_copy_ref", ref, poses), ("_wrong_pose", pred, wrong)):
        err, pck = pose_error(xy, target)
        err_l, pck_l = pose_error(xy[:, LIMB_ENDS], target[:, LIMB_ENDS])
        m.update({f"pose_err{name}": err.item(), f"pck{name}": pck.item(),
                  f"pose_err_limbs{name}": err_l.item(), f"pck_limbs{name}": pck_l.item()})
    beats = [beats_within(music_beats(*read_audio(c["dir"] / "audio.wav"), fps), c["T"], fps) for c in clips]
    for name, motion in (("detected", pred), ("gt", poses)):
        m[f"beat_align_limbs_{name}"] = float(np.mean([beat_alignment(b, limb_beats(x, fps))
                                                       for b, x in zip(beats, per_clip(motion))]))
    return m


def _main(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("mice", help="write the toy mouse dataset and preview.png")
    t.add_argument("--out", default="data/toy_mice")
    t.add_argument("--n", type=int, default=200)
    t.add_argument("--rig", default="mouse_6view")
    t.add_argument("--size", type=int, default=64)
    t.add_argument("--n_extra", type=int, default=4, help="random extra views per sample")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--yaw_deg", type=float, default=None, help="mice face +x +- this (default: any way)")
    t.add_argument("--n_val", type=int, default=None, help="held-out mice, the last ones (default: n // 10)")
    t.add_argument("--mouse_scale", type=float, default=1.0, help="mouse size (0.6-0.8: ~5-10 %% of a view)")
    t.add_argument("--off_aim", type=float, default=0.0, help="mice stand up to this far from the rig's aim")
    dn = sub.add_parser("dance", help="write the toy dance clips (stick dancers with music) and preview.png")
    dn.add_argument("--out", default="data/toy_dance")
    dn.add_argument("--n", type=int, default=100)
    dn.add_argument("--seconds", type=float, default=8.0)
    dn.add_argument("--size", type=int, default=64)
    dn.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.cmd == "mice":
        out = write_toy_mice(a.out, a.n, a.rig, a.size, a.n_extra, a.n_val, a.seed, a.yaw_deg, a.mouse_scale,
                             a.off_aim)
        listed = "data_val.txt" if a.n_val == a.n else "data_train.txt"
        preview = preview_samples(out / listed, out / "preview.png")
    else:
        out = write_toy_dance(a.out, a.n, seconds=a.seconds, size=a.size, seed=a.seed)
        preview = out / "preview.png"
    print(f"wrote {a.n} samples to {out}; preview: {preview}")


if __name__ == "__main__":
    cli(_main)
