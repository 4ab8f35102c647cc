"""Phase 3: fine-tune GS-LRM (6 posed views -> pixel-aligned 3D Gaussians) on multi-view data.

    python train_gslrm.py                                        # toy mice on a CPU, minutes
    torchrun --nproc_per_node=2 train_gslrm.py                   # DDP (gloo on CPU, nccl on GPU)
    accelerate launch train_gslrm.py --cfg configs/mouse_gslrm_synthetic.yaml
    python train_gslrm.py --resume=auto                          # continue the latest checkpoint
"""
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from data import (MultiViewDataset, StepSampler, latest_checkpoint, load_checkpoint, load_config, load_rig,
                  save_checkpoint, save_config, save_image_grid, save_ply, write_toy_mice)
from losses import lpips, masked_psnr, perceptual_loss, psnr, ssim
from models import GSLRM, GSLRM_CONFIGS, load_facelift_gslrm, load_lpips_heads, load_vgg


@dataclass
class Config:
    # data
    data_dir: str = "data/toy_mice"  # FaceLift-format samples; the toy mice are generated here if missing
    train_list: str = "data_train.txt"  # relative to data_dir, or absolute
    val_list: str = "data_val.txt"
    rig: str = "mouse_6view"  # the input views' cameras must match this rig (configs/rigs/<rig>.json)
    toy_samples: int = 200  # size of the generated toy set (only used when data_dir has no train list)
    image_size: int = 32  # views are resized to this (FaceLift: 512)
    num_novel_views: int = 2  # extra views per sample rendered and supervised (not seen by the model)
    num_input_views_supervised: int = 2  # input views also rendered and supervised (FaceLift: all 6)
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
    vgg19_path: str = ""  # torchvision-format vgg19 state dict (.pth)
    lpips_vgg16_path: str = ""  # torchvision-format vgg16 state dict: LPIPS as a validation metric, with...
    lpips_heads_path: str = ""  # ...the lpips package's linear heads (lpips/weights/v0.1/vgg.pth)
    l2_warmup_steps: int = 0  # MSE only for the first steps (FaceLift: 500)
    ssim_weight: float = 0.0
    # MSE between rendered and target alpha. FaceLift: 0 (it starts from pretrained weights). From
    # scratch on the toy, colour alone often first turns every Gaussian transparent and stays there
    # for hundreds of steps (3 of 5 runs at step 200); the mask pulls the foreground out of that at once.
    alpha_weight: float = 1.0
    mixed_precision: str = "bf16"  # bf16 | no; bf16 autocast is used on GPU only
    compile: bool = False
    # run
    out_dir: str = "out/gslrm_toy"
    resume: str = ""  # "" | auto | path to a checkpoint-<step> dir
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


def split_views(batch, n_in=6):
    """Batch from MultiViewDataset -> inputs (first n_in views) and targets (the rest)."""
    img = batch["images"]  # (B, V, 4, H, W): RGB on white + alpha
    return (img[:, :n_in, :3], batch["c2w"][:, :n_in], batch["fxfycxcy"][:, :n_in]), \
        (img[:, n_in:], batch["c2w"][:, n_in:], batch["fxfycxcy"][:, n_in:])


@torch.no_grad()
def evaluate(model, val_set, cfg, step, mean_image, device, out_dir, lpips_net=None, ply_path=None):
    """Novel-view PSNR / masked PSNR / SSIM (/ LPIPS) on held-out samples (all their non-input
    views), the same PSNR for the mean training image, a PNG grid (inputs | ground truth |
    renders); optionally the first sample's Gaussians as a 3DGS PLY (390 MB at FaceLift's size)."""
    model.eval()
    scores, rows = {"psnr": [], "masked_psnr": [], "ssim": [], "baseline_psnr": []}, []
    if lpips_net is not None:
        scores["lpips"] = []
    for i in range(min(cfg.val_samples, len(val_set))):
        item = val_set[i]
        batch = {k: v[None].to(device) for k, v in item.items() if torch.is_tensor(v)}
        (img, c2w, K), (tgt, tc2w, tK) = split_views(batch)
        gaussians = model(img, c2w, K)
        pred = model.render(gaussians, tc2w, tK, cfg.image_size, cfg.image_size)[0, :, :3]  # (Vt, 3, H, W)
        gt, alpha = tgt[0, :, :3], tgt[0, :, 3:]
        scores["psnr"].append(psnr(pred, gt))
        scores["masked_psnr"].append(masked_psnr(pred, gt, alpha))
        scores["ssim"].append(ssim(pred, gt))
        scores["baseline_psnr"].append(psnr(mean_image.expand_as(gt), gt))
        if lpips_net is not None:
            scores["lpips"].append(lpips(*lpips_net, pred, gt))
        if i == 0 and ply_path:
            save_ply({k: v[0] for k, v in gaussians.items()}, ply_path)
        if i < 4:
            rows.append(torch.cat([img[0], gt, pred]).cpu())
    model.train()
    metrics = {k: torch.cat(v).mean().item() for k, v in scores.items()}
    grid = save_image_grid(rows, Path(out_dir) / f"val_{step:06d}.png")
    return metrics, grid


def main(cfg):
    accelerator = Accelerator(cpu=not torch.cuda.is_available(),  # on CPU: still real DDP over gloo under torchrun
                              mixed_precision=cfg.mixed_precision if torch.cuda.is_available() else "no",
                              log_with="wandb" if cfg.wandb else None)
    main_proc, device = accelerator.is_main_process, accelerator.device
    set_seed(cfg.seed + accelerator.process_index)
    out_dir = Path(cfg.out_dir)
    if main_proc:
        print(f"config: {cfg}\nprocesses: {accelerator.num_processes}, device: {device}")
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
        if cfg.wandb:
            accelerator.init_trackers(cfg.wandb_project, config=vars(cfg))

    # data: generate the toy mice once (main process), everyone waits
    data_dir = Path(cfg.data_dir)
    train_list, val_list = data_dir / cfg.train_list, data_dir / cfg.val_list
    if main_proc and not train_list.exists() and data_dir == Path(Config.data_dir):
        write_toy_mice(data_dir, n=cfg.toy_samples, rig=cfg.rig, size=64, seed=cfg.seed)
    accelerator.wait_for_everyone()
    rig = load_rig(cfg.rig)
    train_set = MultiViewDataset(train_list, cfg.image_size, range(6), cfg.num_novel_views, rig=rig, seed=cfg.seed)
    val_set = MultiViewDataset(val_list, cfg.image_size, range(6), -1, rig=rig)  # every extra view is a novel view
    # the baseline that knows nothing about the input: the mean training image
    mean_image = torch.stack([train_set[i]["images"][:, :3].mean(0) for i in range(min(100, len(train_set)))]).mean(0).to(device)

    # model
    model = GSLRM(**GSLRM_CONFIGS[cfg.preset], grad_checkpoint=cfg.grad_checkpoint, deferred_render=cfg.deferred_render)
    if cfg.init_from:
        if cfg.init_from.endswith(".pt"):
            load_facelift_gslrm(model, cfg.init_from)
        else:
            load_checkpoint(cfg.init_from, {"model": model}, restore_rng=False)
        print(f"initialised weights from {cfg.init_from}") if main_proc else None

    # parameter groups, by hand: weight decay on matrices only (nanoGPT)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    groups = [{"name": "decay", "params": [p for p in params.values() if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"name": "no_decay", "params": [p for p in params.values() if p.dim() < 2], "weight_decay": 0.0}]
    assert sum(len(g["params"]) for g in groups) == len(params)  # every trainable tensor in exactly one group
    if main_proc:
        for g in groups:
            print(f"group {g['name']}: {len(g['params'])} tensors, {sum(p.numel() for p in g['params']):,} params, lr {cfg.lr}")
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=torch.cuda.is_available())
    for g in optimizer.param_groups:
        g["initial_lr"] = cfg.lr

    start_step, skipped = 0, 0
    resume = latest_checkpoint(out_dir) if cfg.resume == "auto" else (cfg.resume or None)
    if resume:
        # per-rank randomness is re-seeded from (seed, rank, step) rather than restored (only rank 0's was saved)
        state = load_checkpoint(resume, {"model": model}, {"optimizer": optimizer}, restore_rng=False)
        start_step, skipped = state["step"], state["extra"]["skipped"]
        set_seed(cfg.seed + accelerator.process_index + 1000 * start_step)
        print(f"resumed from {resume} at step {start_step}") if main_proc else None
    if cfg.compile:
        model = torch.compile(model)
    model, optimizer = accelerator.prepare(model, optimizer)
    raw_model = accelerator.unwrap_model(model)

    global_batch = cfg.batch_size * accelerator.num_processes
    sampler = StepSampler(len(train_set), global_batch, accelerator.process_index, accelerator.num_processes,
                          cfg.seed, start_step)
    loader = iter(torch.utils.data.DataLoader(train_set, batch_sampler=sampler, num_workers=cfg.num_workers))

    # frozen loss/metric networks, from local files only
    vgg = load_vgg(cfg.vgg19_path, "vgg19").to(device) if cfg.vgg19_path and cfg.perceptual_weight > 0 else None
    lpips_net = None
    if cfg.lpips_vgg16_path and cfg.lpips_heads_path:
        lpips_net = (load_vgg(cfg.lpips_vgg16_path, "vgg16").to(device), load_lpips_heads(cfg.lpips_heads_path))
    if main_proc and vgg is None and cfg.perceptual_weight > 0:
        print("perceptual loss off: no vgg19_path configured (MSE only)")
    if main_proc and lpips_net is None:
        print("LPIPS off: set lpips_vgg16_path and lpips_heads_path to report it")

    H = cfg.image_size
    t_last = time.perf_counter()
    for step in range(start_step, cfg.max_steps + 1):
        if step % cfg.val_every == 0 or step == cfg.max_steps:
            if main_proc:
                ply = out_dir / f"val_{step:06d}.ply" if step == cfg.max_steps else None
                m, grid = evaluate(raw_model, val_set, cfg, step, mean_image, device, out_dir, lpips_net, ply)
                print(f"val step {step}: novel-view psnr {m['psnr']:.2f} dB (mean-image baseline {m['baseline_psnr']:.2f} dB) | "
                      f"masked psnr {m['masked_psnr']:.2f} | ssim {m['ssim']:.3f}"
                      + (f" | lpips {m['lpips']:.3f}" if "lpips" in m else "") + f" | grid {grid}" + (f" | {ply}" if ply else ""))
                accelerator.log({f"val/{k}": v for k, v in m.items()}, step=step)
            accelerator.wait_for_everyone()
        if step > start_step and (step % cfg.ckpt_every == 0 or step == cfg.max_steps):
            if main_proc:
                path = save_checkpoint(out_dir, step, {"model": raw_model}, {"optimizer": optimizer}, cfg, {"skipped": skipped})
                print(f"saved {path}")
            accelerator.wait_for_everyone()
        if step == cfg.max_steps:
            break

        lr = lr_at(step, cfg)
        for g in optimizer.param_groups:
            g["lr"] = g["initial_lr"] * lr / cfg.lr
        batch = {k: v.to(device) for k, v in next(loader).items() if torch.is_tensor(v)}
        (img, c2w, K), (tgt, tc2w, tK) = split_views(batch)
        # supervise the novel views plus a random subset of the input views (a function of the step: resumable)
        pick = torch.randperm(6, generator=torch.Generator().manual_seed(cfg.seed * 100_003 + step))[: cfg.num_input_views_supervised]
        tgt = torch.cat([batch["images"][:, pick], tgt], 1)  # (B, Vt, 4, H, W)
        tc2w, tK = torch.cat([c2w[:, pick], tc2w], 1), torch.cat([K[:, pick], tK], 1)
        with accelerator.autocast():
            gaussians = model(img, c2w, K)
        pred, pred_alpha = raw_model.render(gaussians, tc2w, tK, H, H).split([3, 1], dim=2)  # (B, Vt, 3|1, H, W), fp32
        gt = tgt[:, :, :3]
        mse = torch.nn.functional.mse_loss(pred, gt)
        loss, parts = mse, {"mse": mse.item()}
        if cfg.alpha_weight > 0:
            a = torch.nn.functional.mse_loss(pred_alpha, tgt[:, :, 3:])
            loss, parts["alpha"] = loss + cfg.alpha_weight * a, a.item()
        if vgg is not None and step >= cfg.l2_warmup_steps:
            perc = perceptual_loss(vgg, pred.flatten(0, 1), gt.flatten(0, 1))
            loss, parts["perc"] = loss + cfg.perceptual_weight * perc, perc.item()
        if cfg.ssim_weight > 0:
            s = ssim(pred, gt).mean()
            loss, parts["ssim"] = loss + cfg.ssim_weight * (1 - s), s.item()
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip).item()
        # the clipped norm is the all-reduced one, so every rank takes the same decision
        if math.isfinite(grad_norm) and grad_norm <= cfg.skip_grad_norm_factor * cfg.grad_clip:
            optimizer.step()
        else:
            skipped += 1
            print(f"step {step}: skipped (loss {loss.item():.4g}, grad norm {grad_norm:.4g}), {skipped} so far") if main_proc else None

        if main_proc and step % cfg.log_every == 0:
            dt = (time.perf_counter() - t_last) / (cfg.log_every if step > start_step else 1)
            t_last = time.perf_counter()
            print(f"step {step} | loss {loss.item():.4f} " + " ".join(f"{k} {v:.4f}" for k, v in parts.items())
                  + f" | psnr {-10 * math.log10(max(parts['mse'], 1e-10)):.2f} | lr {lr:.2e} | grad norm {grad_norm:.3f}"
                  + f" | {dt * 1000:.0f} ms/step | {global_batch / dt:.1f} samples/s")
            accelerator.log({"train/loss": loss.item(), "train/lr": lr, "train/grad_norm": grad_norm,
                             **{f"train/{k}": v for k, v in parts.items()}}, step=step)
    accelerator.wait_for_everyone()  # leave the process group together (gloo can abort at exit otherwise)
    accelerator.end_training()
    return raw_model


if __name__ == "__main__":
    main(load_config(Config, sys.argv[1:]))
