"""Phase 3: fine-tune GS-LRM (6 posed views -> pixel-aligned 3D Gaussians) on multi-view data.

    python train_gslrm.py                                        # toy mice on a CPU, minutes
    torchrun --nproc_per_node=2 train_gslrm.py                   # DDP (gloo on CPU, nccl on GPU)
    accelerate launch train_gslrm.py --cfg configs/mouse_gslrm_synthetic.yaml
    python train_gslrm.py --resume=auto                          # continue the latest checkpoint
"""
import json
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from cameras import load_rig
from data import MultiViewDataset, StepSampler, read_list_file, save_image_grid, save_ply
from losses import foreground_weight, lpips, masked_psnr, perceptual_loss, psnr, ssim
from models import GSLRM, GSLRM_CONFIGS
from plumbing import (
    ConfigError,
    InputError,
    check_flags,
    cli,
    load_checkpoint,
    log_eval,
    log_step,
    make_accelerator,
    open_run,
    resume_run,
    save_checkpoint,
    seeded,
    start_run,
)
from toy import toy_mice
from weights import load_facelift_gslrm, load_lpips_heads, load_vgg


@dataclass
class Config:
    # data
    data_dir: str = "data/toy_mice"  # FaceLift-format samples; the toy mice are generated here if missing
    train_list: str = "data_train.txt"  # relative to data_dir, or absolute
    rgb_ok: bool = False  # accept RGB samples (alpha 1): only if every background is already clean white
    allow_mixed_provenance: bool = False  # train on synthetic sets made with and without an allowed rig mismatch
    val_list: str = "data_val.txt"
    rig: str = "mouse_6view"  # inputs come from this rig's views (a sample's first frames, checked
    # against configs/rigs/<rig>.json); "": from any frame, no rig check (FaceLift's 32-view data)
    toy_samples: int = 200  # size of the generated toy set (only used when data_dir has no train list)
    image_size: int = 32  # views are resized to this (FaceLift: 512)
    num_input_views: int = 6  # drawn at random from the rig's views (FaceLift trains with 4, infers with 6)
    num_novel_views: int = 2  # other views per sample rendered and supervised (not seen by the model)
    num_input_views_supervised: int = 2  # input views also rendered and supervised (FaceLift: all)
    # model
    preset: str = "toy"  # GSLRM_CONFIGS: tiny | toy | facelift
    init_from: str = ""  # FaceLift ckpt_*.pt, or one of our checkpoint dirs: weights only, fresh optimizer
    grad_checkpoint: bool = False  # per-layer activation checkpointing
    deferred_render: bool = False  # render without a graph, re-render view by view in backward (saves memory)
    # optimisation
    batch_size: int = 2  # per process
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * this
    warmup_steps: int = 50
    max_steps: int = 2000
    weight_decay: float = 0.05  # on >= 2-D parameters only
    grad_clip: float = 1.0
    skip_grad_norm_factor: float = 20.0  # a step whose grad norm exceeds this x grad_clip is skipped
    perceptual_weight: float = 0.5  # VGG19 perceptual loss, only when vgg19_path is set
    vgg19_path: str = ""  # FaceLift's exact loss: imagenet-vgg-verydeep-19.mat; or a torchvision .pth
    lpips_vgg16_path: str = ""  # torchvision-format vgg16 state dict: LPIPS as a validation metric, with...
    lpips_heads_path: str = ""  # ...the lpips package's linear heads (lpips/weights/v0.1/vgg.pth)
    l2_warmup_steps: int = 0  # MSE only for the first steps (FaceLift: 500)
    ssim_weight: float = 0.0
    alpha_weight: float = 1.0  # MSE on rendered alpha: a from-scratch toy stays opaque (FaceLift: 0)
    fg_weight: float = 0.0  # MSE and perceptual loss: the target's (dilated) mask counts 1 + this x (mean 1)
    mixed_precision: str = "bf16"  # bf16 | no: autocast on a GPU or a CPU with native bf16 (else fp32)
    compile: bool = False
    # run
    out_dir: str = "out/gslrm_toy"
    resume: str = ""  # "" | auto | path to a checkpoint-<step> dir
    overwrite: bool = False  # a fresh run may delete an earlier run's checkpoints in out_dir
    max_bad_steps: int = 10  # stop (without saving) after this many skipped steps in a row
    log_every: int = 10
    val_every: int = 500
    val_samples: int = 20  # held-out samples evaluated (all their novel views)
    ckpt_every: int = 1000
    num_workers: int = 0
    seed: int = 0
    wandb: bool = False
    wandb_project: str = "mouselift"


def lr_at(step, cfg):
    """Linear warmup, then cosine from lr to lr * min_lr_ratio at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


# what names the diffusion checkpoint that made a synthetic sample (gen_synthetic.py's metadata.json)
MADE_BY = ("mvdiff_checkpoint", "unet_sha256", "prompt_embeds_sha256", "rig", "camera_hash")


def read_provenance(list_files, allow_mixed, verbose=True):
    """Every listed sample's metadata.json (phase 2 writes one; real samples have none) -> the record that
    rig.json keeps: one entry per diffusion checkpoint whose views are trained on (its identity, sample
    count, any rig mismatch it was allowed) and the number of real samples. Views made across a rig
    mismatch teach GS-LRM other cameras than its inputs' rig: mixed with clean ones they are refused
    unless allow_mixed; alone they train with a warning."""
    sets, real = {}, 0
    for list_file in list_files:
        for d in read_list_file(list_file):
            if not (d / "metadata.json").is_file():
                real += 1
                continue
            try:
                meta = json.loads((d / "metadata.json").read_text())
            except json.JSONDecodeError as err:
                raise InputError(f"{d / 'metadata.json'}: not JSON ({err})") from None
            entry = {k: meta.get(k) for k in MADE_BY} | {"allowed_rig_mismatch": meta.get("allowed_rig_mismatch", [])}
            key = json.dumps(entry, sort_keys=True)
            sets.setdefault(key, dict(entry, samples=0, example=str(d)))["samples"] += 1
    synthetic = list(sets.values())
    mismatched = [s for s in synthetic if s["allowed_rig_mismatch"]]
    clean = len(synthetic) - len(mismatched) + (real > 0)
    for s in mismatched if verbose else []:
        print(f"WARNING: {s['samples']} samples (e.g. {s['example']}) were made by {s['mvdiff_checkpoint']} "
              f"with an allowed rig mismatch: {s['allowed_rig_mismatch'][0]}")
    if mismatched and clean and not allow_mixed:
        raise InputError(f"{list_files[0]}: lists {sum(s['samples'] for s in mismatched)} synthetic samples made "
                         f"with an allowed rig mismatch (e.g. {mismatched[0]['example']}) beside "
                         f"{sum(s['samples'] for s in synthetic if not s['allowed_rig_mismatch']) + real} clean "
                         "ones: train on one kind, or --allow_mixed_provenance=true (recorded in rig.json)")
    return {"synthetic": synthetic, "real_samples": real}


def split_views(batch, n_in):
    """Batch from MultiViewDataset -> inputs (first n_in views) and targets (the rest)."""
    img, c2w, K = batch["images"], batch["c2w"], batch["fxfycxcy"]  # (B, V, 4, H, W): RGB on white, alpha
    inputs = (img[:, :n_in, :3], c2w[:, :n_in], K[:, :n_in])
    return inputs, (img[:, n_in:], c2w[:, n_in:], K[:, n_in:])


@torch.no_grad()
def evaluate(model, val_set, recon_set, cfg, step, mean_image, device, out_dir, lpips_net=None,
             ply_path=None):
    """On held-out samples: PSNR / masked PSNR / SSIM (/ LPIPS) of the views the model did not see,
    the same PSNR for the mean training image (the baseline), and `recon_psnr`: the rig's views fed
    in and rendered back (recon_set; None: this item's inputs). A PNG grid (inputs | held-out ground
    truth | rendered | reconstruction); optionally the first sample's Gaussians as a 3DGS PLY."""
    model.eval()
    S, n_in = cfg.image_size, cfg.num_input_views
    scores, rows = {"psnr": [], "psnr_mean_image": [], "masked_psnr": [], "ssim": [], "recon_psnr": []}, []
    if lpips_net is not None:
        scores["lpips"] = []
    for i in range(min(cfg.val_samples, len(val_set))):
        batch = {k: v[None].to(device) for k, v in val_set[i].items() if torch.is_tensor(v)}
        (img, c2w, K), (tgt, tc2w, tK) = split_views(batch, n_in)
        gaussians = model(img, c2w, K)
        pred = model.render(gaussians, tc2w, tK, S, S)[0, :, :3]  # (Vt, 3, H, W)
        gt, alpha = tgt[0, :, :3], tgt[0, :, 3:]
        if len(gt):  # views the model did not see
            scores["psnr"].append(psnr(pred, gt))
            scores["masked_psnr"].append(masked_psnr(pred, gt, alpha))
            scores["ssim"].append(ssim(pred, gt))
            scores["psnr_mean_image"].append(psnr(mean_image.expand_as(gt), gt))
            if lpips_net is not None:
                scores["lpips"].append(lpips(*lpips_net, pred, gt))
        if recon_set is not None:  # every rig view in, rendered back
            full = {k: v[None].to(device) for k, v in recon_set[i].items() if torch.is_tensor(v)}
            (img, c2w, K), _ = split_views(full, full["images"].shape[1])
            gaussians = model(img, c2w, K)
        recon = model.render(gaussians, c2w, K, S, S)[0, :, :3]  # (V_in, 3, H, W)
        scores["recon_psnr"].append(psnr(recon, img[0]))
        if i == 0 and ply_path:
            save_ply({k: v[0] for k, v in gaussians.items()}, ply_path)
        if i < 4:
            rows.append(torch.cat([batch["images"][0, :n_in, :3], gt[:4], pred[:4], recon]).cpu())
    model.train()
    metrics = {k: torch.cat(v).mean().item() for k, v in scores.items() if v}
    n_tgt = min(4, len(gt))
    groups = [("input views", n_in), ("held-out views", n_tgt), (f"rendered, step {step}", n_tgt),
              ("reconstruction", len(recon))]
    grid = save_image_grid(rows, Path(out_dir) / f"val_{step:06d}.png", [g for g in groups if g[1]])
    return metrics, grid


def main(cfg):
    accelerator = make_accelerator(cfg.mixed_precision, cfg.wandb)
    main_proc, device = accelerator.is_main_process, accelerator.device
    check_flags(cfg, {"preset": GSLRM_CONFIGS}, ("batch_size", "image_size", "num_input_views",
                                                 "val_every", "ckpt_every", "log_every", "max_bad_steps"))
    if cfg.fg_weight < 0:
        raise ConfigError(f"--fg_weight={cfg.fg_weight}: must be >= 0 (0: every pixel counts the same)")
    if cfg.image_size % GSLRM_CONFIGS[cfg.preset]["patch"]:
        raise InputError(f"--image_size={cfg.image_size}: must be a multiple of the {cfg.preset} preset's "
                         f"patch size {GSLRM_CONFIGS[cfg.preset]['patch']}")
    out_dir = Path(cfg.out_dir)
    start_run(cfg, accelerator)

    # data: generate the toy mice once (main process), everyone waits
    data_dir = Path(cfg.data_dir)
    train_list, val_list = data_dir / cfg.train_list, data_dir / cfg.val_list
    if data_dir == Path(Config.data_dir):
        toy_mice(data_dir, accelerator, n=cfg.toy_samples, rig=cfg.rig, size=64, seed=cfg.seed)
    rig = load_rig(cfg.rig) if cfg.rig else None
    provenance = read_provenance([train_list, val_list], cfg.allow_mixed_provenance, main_proc)
    if rig is not None:  # rig.json says which diffusion checkpoint made the views (sample.py checks it)
        rig = dict(rig, provenance=dict(provenance, init_from=cfg.init_from))
    if main_proc and provenance["synthetic"]:
        print("synthetic data: " + "; ".join(f"{s['samples']} samples by {s['mvdiff_checkpoint']}"
                                              for s in provenance["synthetic"]))
    pool = range(len(rig["frames"])) if rig else None  # None: any frame may be an input
    S, n_in = cfg.image_size, cfg.num_input_views
    train_set = MultiViewDataset(train_list, S, pool, cfg.num_novel_views, rig, cfg.seed, n_in,
                                 rgb_ok=cfg.rgb_ok)
    # every other view is held out
    val_set = MultiViewDataset(val_list, S, pool, -1, rig, num_inputs=n_in, rgb_ok=cfg.rgb_ok)
    recon_set = MultiViewDataset(val_list, S, pool, 0, rig, rgb_ok=cfg.rgb_ok) if rig and n_in < len(pool) else None
    # the baseline that knows nothing about the input: the mean training image
    first = [train_set[i]["images"][:, :3].mean(0) for i in range(min(100, len(train_set)))]  # (3, H, W) each
    mean_image = torch.stack(first).mean(0).to(device)

    # model
    model = GSLRM(**GSLRM_CONFIGS[cfg.preset], grad_checkpoint=cfg.grad_checkpoint,
                  deferred_render=cfg.deferred_render)
    if cfg.init_from:
        if cfg.init_from.endswith(".pt"):
            load_facelift_gslrm(model, cfg.init_from)
        else:
            load_checkpoint(cfg.init_from, {"model": model})
        if main_proc:
            print(f"initialised weights from {cfg.init_from}")

    # parameter groups, by hand: weight decay on matrices only (nanoGPT)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    groups = [{"name": "decay", "params": [p for p in params.values() if p.dim() >= 2],
               "weight_decay": cfg.weight_decay},
              {"name": "no_decay", "params": [p for p in params.values() if p.dim() < 2],
               "weight_decay": 0.0}]
    # every trainable parameter in exactly one group, no frozen one in any
    grouped = sorted(id(p) for g in groups for p in g["params"])
    assert grouped == sorted(id(p) for p in model.parameters() if p.requires_grad), "groups != trainable"
    if main_proc:
        for g in groups:
            n = sum(p.numel() for p in g["params"])
            print(f"group {g['name']}: {len(g['params'])} tensors, {n:,} params, lr {cfg.lr:g}")
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=True)
    for g in optimizer.param_groups:
        g["initial_lr"] = cfg.lr

    start_step, guard = resume_run(cfg, out_dir, accelerator,
                                   lambda path: load_checkpoint(path, {"model": model}, {"optimizer": optimizer}))
    if cfg.compile:
        model = torch.compile(model)
    model, optimizer = accelerator.prepare(model, optimizer)
    raw_model = accelerator.unwrap_model(model)
    guard.check_weights(raw_model, start_step)  # the reference for the checks before each save

    global_batch = cfg.batch_size * accelerator.num_processes
    sampler = StepSampler(len(train_set), global_batch, accelerator.process_index, accelerator.num_processes,
                          cfg.seed, start_step)
    loader = iter(torch.utils.data.DataLoader(train_set, batch_sampler=sampler, num_workers=cfg.num_workers))
    loader = open_run(cfg, out_dir, accelerator, loader, start_step)

    # frozen loss/metric networks, from local files only
    vgg, lpips_net = None, None
    if cfg.vgg19_path and cfg.perceptual_weight > 0:
        vgg = load_vgg(cfg.vgg19_path, "vgg19").to(device)
    if cfg.lpips_vgg16_path and cfg.lpips_heads_path:
        lpips_net = (load_vgg(cfg.lpips_vgg16_path, "vgg16").to(device), load_lpips_heads(cfg.lpips_heads_path))
    if main_proc and vgg is None and cfg.perceptual_weight > 0:
        print("perceptual loss off: no vgg19_path configured (MSE only)")
    if main_proc and lpips_net is None:
        print("LPIPS off: set lpips_vgg16_path and lpips_heads_path to report it")

    H = cfg.image_size
    t_last = time.perf_counter()
    for step in range(start_step, cfg.max_steps + 1):
        if (step > start_step or step == 0) and (step % cfg.val_every == 0 or step == cfg.max_steps):
            if main_proc:
                ply = out_dir / f"val_{step:06d}.ply" if step == cfg.max_steps else None
                m, grid = evaluate(raw_model, val_set, recon_set, cfg, step, mean_image, device, out_dir,
                                   lpips_net, ply)
                log_eval(accelerator, m, step, out_dir, {"grid": grid})  # novel views; baseline: the mean image
                print(f"grid {grid}" + (f" | gaussians {ply}" if ply else ""))
            accelerator.wait_for_everyone()
        if step > start_step and (step % cfg.ckpt_every == 0 or step == cfg.max_steps):
            guard.check_weights(raw_model, step)
            if main_proc:
                path = save_checkpoint(out_dir, step, {"model": raw_model}, {"optimizer": optimizer}, cfg,
                                       {"skipped": guard.skipped}, rig)
                print(f"saved {path}")
            accelerator.wait_for_everyone()
        if step == cfg.max_steps:
            break

        lr = lr_at(step, cfg)
        for g in optimizer.param_groups:
            g["lr"] = g["initial_lr"] * lr / cfg.lr
        batch = {k: v.to(device) for k, v in next(loader).items() if torch.is_tensor(v)}
        (img, c2w, K), (tgt, tc2w, tK) = split_views(batch, n_in)
        # supervise the novel views + a random subset of the input views (a function of the step)
        gen = seeded(cfg.seed, step)  # the same views on every rank
        pick = torch.randperm(n_in, generator=gen)[: cfg.num_input_views_supervised]
        tgt = torch.cat([batch["images"][:, pick], tgt], 1)  # (B, Vt, 4, H, W)
        tc2w, tK = torch.cat([c2w[:, pick], tc2w], 1), torch.cat([K[:, pick], tK], 1)
        with accelerator.autocast():
            gaussians = model(img, c2w, K)
        render = raw_model.render(gaussians, tc2w, tK, H, H)  # (B, Vt, 4, H, W), fp32
        pred, pred_alpha = render.split([3, 1], dim=2)
        gt = tgt[:, :, :3]
        mse = torch.nn.functional.mse_loss(pred, gt)
        loss, parts, w = mse, {"mse": mse.item()}, None
        if cfg.fg_weight > 0:  # a small animal's pixels must not be outvoted by the easy white background
            w = foreground_weight(tgt[:, :, 3:].flatten(0, 1), cfg.fg_weight)  # (B * Vt, 1, H, W)
            loss = ((pred - gt).flatten(0, 1).pow(2) * w).mean()
            parts["mse_fg"] = loss.item()
        if cfg.alpha_weight > 0:
            a = torch.nn.functional.mse_loss(pred_alpha, tgt[:, :, 3:])
            loss, parts["alpha"] = loss + cfg.alpha_weight * a, a.item()
        if vgg is not None and step >= cfg.l2_warmup_steps:
            perc = perceptual_loss(vgg, pred.flatten(0, 1), gt.flatten(0, 1), w)
            loss, parts["perc"] = loss + cfg.perceptual_weight * perc, perc.item()
        if cfg.ssim_weight > 0:
            s = ssim(pred, gt).mean()
            loss, parts["ssim"] = loss + cfg.ssim_weight * (1 - s), s.item()
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip).item()
        # also a spike: a grad norm over skip_grad_norm_factor x the clip
        good = math.isfinite(grad_norm) and grad_norm <= cfg.skip_grad_norm_factor * cfg.grad_clip
        if guard.should_step(good, step, f"loss {loss.item():.4g}, grad norm {grad_norm:.4g}", main_proc):
            optimizer.step()

        if main_proc and step % cfg.log_every == 0:
            dt = (time.perf_counter() - t_last) / (cfg.log_every if step > start_step else 1)
            t_last = time.perf_counter()
            log_step(accelerator, step, {"loss": loss.item(), **parts}, lr, grad_norm, guard.skipped, dt, global_batch,
                     psnr=-10 * math.log10(max(parts["mse"], 1e-10)))
    accelerator.wait_for_everyone()  # leave the process group together (gloo can abort at exit otherwise)
    accelerator.end_training()
    return raw_model


# the original code base's flag names (its output_dir is plumbing.RENAMED's), accepted as is
ALIASES = {"max_train_steps": "max_steps"}


if __name__ == "__main__":
    # and its --config is our --cfg
    cli(main, Config, ALIASES, [re.sub(r"^--config(?=$|=)", "--cfg", a) for a in sys.argv[1:]])
