"""Phase 2: the phase-1 model turns every view of every real sample into a synthetic 6-view sample
with the rig's cameras: the data GS-LRM is fine-tuned on in phase 3 (it then learns from what the
diffusion model really outputs).

    python gen_synthetic.py                                      # toy: out/mvdiff_toy's latest checkpoint
    torchrun --nproc_per_node=8 gen_synthetic.py --mvdiff_checkpoint ckpt/checkpoint-20000 \\
        --input_data data_mouse/data_train.txt --out_dir data_mouse_synthetic --augment_all_views

Output (FaceLift's GS-LRM layout): <out_dir>/data_train.txt, data_val.txt and
sample_XXXXXX/{opencv_cameras.json, metadata.json, images/cam_000.png ...}. Sample k is source
sample k // 6 with reference view k % 6 (--augment_all_views) or source k. The split is by source
object. Each sample is written under a temporary name and renamed when complete, from noise seeded
by (seed, source, reference view): a rerun skips what exists, and a killed run rerun ends with the
same files as an uninterrupted one. Work is split over processes by batch (same files for any count).
"""
import hashlib
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from cameras import RigMismatch, camera_hash, file_sha256, load_prompt_embeds, read_cameras, rig_mismatch
from data import load_rgba, read_list_file, rig_sample_frames
from models import Conditioner, mv_schedulers, sample_views
from plumbing import InputError, atomic_dir, check_flags, cli, make_accelerator
from weights import load_mv_checkpoint


@dataclass
class Config:
    mvdiff_checkpoint: str = "out/mvdiff_toy"  # a train_mvdiff checkpoint-<step>/, or its run folder (latest)
    input_data: str = "data/toy_mice_mv/data_train.txt"  # list file of real multi-view samples
    out_dir: str = "data/toy_mice_synthetic"
    prompt_embeds: str = ""  # "" = the checkpoint's own (another file must name the same rig)
    camera_json: str = ""  # opencv_cameras.json of the 6 output cameras; "" = the checkpoint rig's
    augment_all_views: bool = True  # every view of every sample is the reference once: N x 6 samples
    reference_view: int = 0  # the reference when not augmenting
    max_sources: int = 0  # use the first N listed samples; 0 = all
    val_fraction: float = 0.05  # of source objects, all their samples to data_val.txt
    steps: int = 20  # DDIM steps (FaceLift: 50)
    guidance: float = 1.0  # classifier-free guidance (FaceLift: 3; the toy scores best at 1)
    eta: float = 1.0  # DDIM eta (FaceLift's)
    seed: int = 0
    batch_size: int = 8  # references per forward pass (x 6 views)
    image_size: int = 0  # written size (GS-LRM's training size); 0 = the diffusion model's
    alpha_from: str = "source"  # source: the source view's mask where it has one, else white | white
    alpha_threshold: float = 0.1  # alpha = distance from the white background / this, clipped to 1
    allow_rig_mismatch: bool = False  # go on with prompt embeddings / cameras of another rig (recorded)


def noise_seed(seed, source, view):
    """The seed of one sample's noise: a function of what it is, never of the order of work."""
    digest = hashlib.sha256(f"{seed}|{source}|{view}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def to_rgba(rgb, threshold, alpha=None):
    """Generated views on white (V, 3, H, W) in [0, 1] -> RGBA uint8 (V, H, W, 4). Alpha: the given one
    (V, 1, H, W), else distance from white (max over channels) / threshold, clipped; the colour is stored
    un-composited, so that the loaders' compositing on white (rgb * a + 1 - a) gives back the generated
    image (where a given alpha is 0 it gives white, and where it is too small for a dark pixel, lighter)."""
    a = ((1 - rgb).amax(1, keepdim=True) / threshold).clamp(0, 1) if alpha is None else alpha  # (V, 1, H, W)
    straight = torch.where(a > 0, 1 - (1 - rgb) / a.clamp(min=1e-6), torch.ones_like(rgb)).clamp(0, 1)
    rgba = torch.cat([straight, a], 1).permute(0, 2, 3, 1)  # (V, H, W, 4)
    return (rgba * 255 + 0.5).to(torch.uint8).numpy()


def source_alpha(sample, frames, size):
    """The source sample's masks (V, 1, size, size), resized as the loaders resize, or None when it has
    none (RGB files, or alpha 255 everywhere)."""
    alphas = [load_rgba(sample / fr["file_path"])[3:] for fr in frames]  # (1, H, W) each, full size
    if all(bool((a == 1).all()) for a in alphas):
        return None
    return torch.stack([F.interpolate(a[None], size=(size, size), mode="bilinear", antialias=True,
                                      align_corners=False)[0] for a in alphas])  # (V, 1, S, S)


def scaled_frames(frames, size):
    """Camera frames with intrinsics for a size x size image, and the written file names."""
    return [{"w": size, "h": size, "fx": fr["fx"] * size / fr["w"], "fy": fr["fy"] * size / fr["h"],
             "cx": fr["cx"] * size / fr["w"], "cy": fr["cy"] * size / fr["h"], "w2c": fr["w2c"],
             "file_path": f"images/cam_{v:03d}.png"} for v, fr in enumerate(frames)]


def main(cfg):
    check_flags(cfg, {"alpha_from": ("source", "white")})
    accelerator = make_accelerator()
    main_proc, device, rank, world = (accelerator.is_main_process, accelerator.device,
                                      accelerator.process_index, accelerator.num_processes)
    ck = load_mv_checkpoint(cfg.mvdiff_checkpoint, device)
    model, rig, mcfg = ck["model"], ck["rig"], ck["config"]
    V, dim = len(rig["frames"]), model.unet.config.cross_attention_dim
    mismatches = [rig["allowed_mismatch"]] if rig.get("allowed_mismatch") else []

    def refuse_unless_allowed(msg):
        if not cfg.allow_rig_mismatch:
            raise RigMismatch(f"{msg} (--allow_rig_mismatch to go on anyway; it is recorded)")
        if main_proc:
            print(f"WARNING (allow_rig_mismatch): {msg}")
        mismatches.append(msg)

    # the guard: prompt embeddings and cameras must be those the checkpoint was trained with
    prompt_embeds, prompt_file = ck["prompt_embeds"], ck["prompt_file"]
    if cfg.prompt_embeds:
        prompt_file = Path(cfg.prompt_embeds)
        prompt_embeds, msg = load_prompt_embeds(prompt_file, rig, dim, cfg.allow_rig_mismatch)
        prompt_embeds = prompt_embeds.to(device)
        if msg:
            mismatches.append(msg)
        if not torch.equal(prompt_embeds, ck["prompt_embeds"]):
            refuse_unless_allowed(f"{prompt_file}: not the prompt embeddings {ck['path']} was trained with")
    frames = rig["frames"]
    if cfg.camera_json:
        frames = read_cameras(cfg.camera_json)["frames"][:V]
        msg = rig_mismatch(rig, frames)
        if msg:
            refuse_unless_allowed(f"{cfg.camera_json}: {msg} (the rig of {ck['path']})")

    gen_size = mcfg["image_size"]  # the diffusion model's image size
    S = cfg.image_size or gen_size
    out_frames = scaled_frames(frames, S)
    list_file = Path(cfg.input_data)
    sources = read_list_file(list_file)
    sources = sources[: cfg.max_sources] if cfg.max_sources else sources
    if missing := [d for d in sources if not d.is_dir()]:
        raise FileNotFoundError(f"sample folder {missing[0]} does not exist (listed in {list_file}; "
                                f"{len(missing)} of {len(sources)} listed folders are missing)")
    if not 0 <= cfg.reference_view < V:
        raise InputError(f"reference_view {cfg.reference_view}: the rig has views 0..{V - 1}")
    names = [os.path.relpath(d, list_file.parent) for d in sources]  # as listed: seeds the noise
    frames_of = [rig_sample_frames(d, rig) for d in sources]  # every camera file checked before any writing
    views = list(range(V)) if cfg.augment_all_views else [cfg.reference_view]
    items = [(i, v) for i in range(len(sources)) for v in views]  # sample k = items[k]
    n_val = round(cfg.val_fraction * len(sources)) if len(sources) > 1 else 0
    val_sources = set(np.random.default_rng(cfg.seed).permutation(len(sources))[:n_val].tolist())
    out = Path(cfg.out_dir)
    sample_dir = lambda k: out / f"sample_{k:06d}"  # noqa: E731
    todo = [k for k in range(len(items)) if not sample_dir(k).is_dir()]

    if main_proc:
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob(".tmp-sample_*"):  # killed writes of an earlier run
            shutil.rmtree(stale, ignore_errors=True)
        per_sample = V * S * S * 4 * 0.6 + 8e3  # PNG bytes, about (RGBA compresses to ~60% here)
        need, free = len(todo) * per_sample, shutil.disk_usage(out).free
        print(f"{len(items)} samples ({len(sources)} sources x {len(views)} references, {n_val} sources "
              f"for validation), {len(items) - len(todo)} already written; {S} px views, "
              f"~{need / 1e9:.2f} GB to write, {free / 1e9:.1f} GB free; {world} processes")
        for m in mismatches:
            print(f"WARNING: recorded rig mismatch: {m}")
        if need > free:
            raise OSError(f"{out}: ~{need / 1e9:.1f} GB needed, {free / 1e9:.1f} GB free")
    accelerator.wait_for_everyone()

    sampler = mv_schedulers(mcfg["prediction_type"], mcfg["beta_schedule"], mcfg["beta_start"],
                            mcfg["beta_end"], mcfg["clip_sample"], mcfg.get("pipeline_dir", ""))[1]
    cond = Conditioner(mcfg.get("pipeline_dir", ""), device)
    # what phase 3 records in its checkpoint and sample.py compares: which weights made these views
    meta_common = {"mvdiff_checkpoint": str(Path(ck["path"]).resolve()),
                   "unet_sha256": file_sha256(ck["weights_file"]), "rig": rig["name"],
                   "camera_hash": camera_hash(frames), "prompt_embeds_sha256": file_sha256(prompt_file),
                   "steps": cfg.steps, "guidance": cfg.guidance, "eta": cfg.eta, "seed": cfg.seed,
                   "image_size": S, **({"allowed_rig_mismatch": mismatches} if mismatches else {})}
    # fixed batches of consecutive samples, batch b on rank b % world: the same arithmetic for any
    # number of processes and any rerun, so the same bits
    B = cfg.batch_size
    batches = [list(range(s, min(s + B, len(items)))) for s in range(0, len(items), B)][rank::world]
    batches = [b for b in batches if any(not sample_dir(k).is_dir() for k in b)]
    bar = tqdm(total=sum(len(b) for b in batches), unit="sample", disable=not main_proc,
               desc=f"synthetic views -> {out}")
    t0 = time.perf_counter()
    for batch in batches:
        refs, ref_idx, gens = [], [], []
        for k in batch:
            i, v = items[k]
            fr = frames_of[i][v]
            refs.append(load_rgba(sources[i] / fr["file_path"], gen_size)[:3])  # RGB on white
            ref_idx.append(v)
            gens.append(torch.Generator(device).manual_seed(noise_seed(cfg.seed, names[i], v)))
        ref_cond, labels = cond.reference(torch.stack(refs).to(device) * 2 - 1)  # (b, C, h, w)
        x = sample_views(model, sampler, ref_cond, torch.tensor(ref_idx, device=device), prompt_embeds,
                         ref_cond.shape[1:], labels, cfg.steps, cfg.guidance, cfg.eta,
                         gens)  # (b, V, C, h, w)
        views_px = cond.decode(x).float().cpu()  # (b, V, 3, H, W) in [0, 1]
        if S != views_px.shape[-1]:
            views_px = F.interpolate(views_px.flatten(0, 1), size=(S, S), mode="bilinear", antialias=True,
                                     align_corners=False).unflatten(0, views_px.shape[:2])  # (b, V, 3, S, S)
        for k, rgb in zip(batch, views_px):
            if sample_dir(k).is_dir():  # written before a kill
                continue
            i, v = items[k]
            # The generated view v is taken to show the animal in the pose and place of the source's real
            # view v (phase 1 learns exactly that: its targets are the real views of the same moment), so the
            # real mask is a cleaner silhouette than whiteness, which loses pale fur and keeps grey haze.
            # Limit: where the model's view departs from the real one (a tail or head placed elsewhere), the
            # generated pixels outside the mask turn white and mask pixels it left white stay opaque white.
            alpha = source_alpha(sources[i], frames_of[i][:V], S) if cfg.alpha_from == "source" else None
            with atomic_dir(sample_dir(k), marker=False) as tmp:
                (tmp / "images").mkdir()
                for fr, px in zip(out_frames, to_rgba(rgb, cfg.alpha_threshold, alpha)):
                    Image.fromarray(px, "RGBA").save(tmp / fr["file_path"])
                (tmp / "opencv_cameras.json").write_text(json.dumps(
                    {"id": sample_dir(k).name, "rig": rig["name"], "frames": out_frames}, indent=1))
                meta = {"source": names[i], "source_index": i, "reference_view": v,
                        "reference_view_name": rig["views"][v],
                        "split": "val" if i in val_sources else "train",
                        "noise_seed": noise_seed(cfg.seed, names[i], v),
                        "alpha_from": "white" if alpha is None else "source", **meta_common}
                (tmp / "metadata.json").write_text(json.dumps(meta, indent=1))
            bar.update(1)
    bar.close()
    accelerator.wait_for_everyone()
    if main_proc:
        dt = time.perf_counter() - t0
        split = {"train": [], "val": []}
        for k, (i, _) in enumerate(items):
            split["val" if i in val_sources else "train"].append(sample_dir(k).name)
        for name, lines in split.items():
            tmp = out / f".data_{name}.txt.tmp"
            tmp.write_text("".join(f"{line}\n" for line in lines))
            os.replace(tmp, out / f"data_{name}.txt")
        print(f"wrote {bar.n} samples in {dt:.0f} s ({bar.n / max(dt, 1e-9):.2f} samples/s on rank 0); "
              f"{out}/data_train.txt: {len(split['train'])}, data_val.txt: {len(split['val'])}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return out


# the original code base's flag names (its output_dir is plumbing.RENAMED's), accepted as is
ALIASES = {"prompt_embed_path": "prompt_embeds"}


if __name__ == "__main__":
    # and its --config is our --cfg
    cli(main, Config, ALIASES, [re.sub(r"^--config(?=$|=)", "--cfg", a) for a in sys.argv[1:]])
