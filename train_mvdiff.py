"""Phase 1: fine-tune the multi-view diffusion model (1 reference view -> the rig's 6 views).

    python train_mvdiff.py                                       # toy mice, pixel space, 32 px, CPU, minutes
    torchrun --nproc_per_node=2 train_mvdiff.py                  # DDP (gloo on CPU, nccl on GPU)
    accelerate launch train_mvdiff.py --cfg configs/mouse_mvdiffusion_6x_aug.yaml
    python train_mvdiff.py --resume=auto                         # continue the latest checkpoint

Every view of an object is generated at once (the views sit consecutively in the UNet's batch and
see each other through multi-view attention), from one reference view: always view 0 (FaceLift),
or any of the rig's views at random with all six as targets (`reference_view: random`, a 6x
augmentation). The views are told apart by the rig's prompt embeddings (cross-attention) and the
reference by a per-view embedding added to the time embedding.
"""
import copy
import json
import math
import re
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from cameras import load_prompt_embeds, load_rig
from data import MultiViewDataset, StepSampler, read_list_file, rig_sample_frames, save_image_grid
from losses import diffusion_target, foreground_weight, lpips, masked_psnr, min_snr_weight, psnr, ssim, weighted_mse
from models import (
    MVDIFF_UNET_CONFIGS,
    Conditioner,
    build_mv_unet,
    mv_schedulers,
    sample_views,
)
from plumbing import (
    ConfigError,
    InputError,
    check_finite_weights,
    check_flags,
    check_resumable,
    cli,
    log_eval,
    log_step,
    make_accelerator,
    open_run,
    read_state,
    resume_run,
    seeded,
    start_run,
)
from toy import toy_mice, toy_prompt_embeds
from weights import (
    load_lpips_heads,
    load_mv_unet,
    load_mv_weights,
    load_vgg,
    save_mv_checkpoint,
)


@dataclass
class Config:
    # data
    data_dir: str = "data/toy_mice_mv"  # FaceLift-format samples; the toy mice are generated here if missing
    train_list: str = "data_train.txt"  # relative to data_dir, or absolute
    rgb_ok: bool = False  # accept RGB samples (alpha 1): only if every background is already clean white
    val_list: str = "data_val.txt"
    rig: str = "mouse_6view"  # the samples' cameras must match this rig (configs/rigs/<rig>.json)
    prompt_embeds: str = "data/toy_mice_mv/toy_prompt_embeds.pt"  # [V, T, D]; "" = the file the rig names
    make_toy_prompt_embeds: bool = True  # a missing prompt file is made from the rig's cameras (toy runs only)
    allow_rig_mismatch: bool = False  # use prompt embeddings made for another rig (recorded in rig.json)
    toy_samples: int = 400  # size of the generated toy set (only used when data_dir has no train list)
    toy_yaw_deg: float = 30.0  # toy mice face +x +- this (180: any way; docs/experiments.md says why)
    image_size: int = 32  # views are resized to this (latent mode: 8x smaller latents)
    reference_view: str = "random"  # "0" (FaceLift) | "random": any view is the input, all are targets
    # model
    preset: str = "toy"  # MVDIFF_UNET_CONFIGS, when not initialised from a unet/ folder
    init_from: str = ""  # FaceLift pipeline dir or one of our checkpoints (its unet/); fresh optimizer
    pipeline_dir: str = ""  # FaceLift pipeline dir (vae/, image_encoder/): latents; "" = pixels (toy)
    sparse_attention: bool = True  # each view attends to [reference; own] (FaceLift); False: all views
    grad_checkpoint: bool = False
    # diffusion
    prediction_type: str = "sample"  # sample (x0, the toy's) | v_prediction (FaceLift's weights) | epsilon
    beta_schedule: str = "squaredcos_cap_v2"  # FaceLift: scaled_linear 0.00085-0.012 (for latents)
    beta_start: float = 0.00085
    beta_end: float = 0.012
    clip_sample: bool = True  # clip predicted x0 to [-1, 1] when sampling: pixels yes, latents no
    min_snr_gamma: float = 5.0  # min-SNR weighting; 0 = off
    cond_drop_prob: float = 0.05  # FaceLift's drop_as_a_whole: u < r: CLIP, < 2r: both, < 3r: reference
    train_bg: str = "white"  # white | three_choices (white, black or grey per object: FaceLift's training)
    fg_weight: float = 0.0  # the target's (dilated) mask counts 1 + this x in the loss (mean weight 1)
    # optimisation
    batch_size: int = 4  # objects per process per micro-step (x 6 views)
    grad_accum: int = 1
    lr: float = 2e-3
    min_lr_ratio: float = 0.05  # cosine decays to lr * this (1.0 = constant after warmup)
    warmup_steps: int = 50
    max_steps: int = 1000  # ~9 min on 2 CPU cores
    weight_decay: float = 0.0  # on >= 2-D parameters only
    grad_clip: float = 1.0
    ema_decay: float = 0.99  # 0 = no EMA; validation uses the EMA weights when there are any
    mixed_precision: str = "bf16"  # bf16 | no: autocast on a GPU or a CPU with native bf16 (else fp32)
    # validation
    val_every: int = 1000  # and at the last step (one toy validation costs ~40 s on 2 CPU cores)
    val_samples: int = 16  # held-out objects; reference view i % 6 for the i-th when random
    val_steps: int = 20  # DDIM steps (FaceLift: 50)
    val_eta: float = 1.0  # DDIM eta (FaceLift's)
    val_guidance: tuple[float, ...] = (1.0, 3.0)
    lpips_vgg16_path: str = ""  # torchvision-format vgg16 state dict: LPIPS as a validation metric, with...
    lpips_heads_path: str = ""  # ...the lpips package's linear heads (lpips/weights/v0.1/vgg.pth)
    # run
    out_dir: str = "out/mvdiff_toy"
    resume: str = ""  # "" | auto | path to a checkpoint-<step> dir
    overwrite: bool = False  # a fresh run may delete an earlier run's checkpoints in out_dir
    max_bad_steps: int = 10  # a non-finite loss / gradient skips the step; this many in a row stop the run
    log_every: int = 25
    ckpt_every: int = 500
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


@torch.no_grad()
def update_ema(ema, model, decay):  # DiT's
    for ema_p, p in zip(ema.parameters(), model.parameters()):
        ema_p.mul_(decay).add_(p.detach(), alpha=1 - decay)


def check_prediction_type(init_from, prediction_type):
    """Weights trained to output x0, v or the noise are read wrongly under another type, and training
    then starts from nonsense: stop if FaceLift's scheduler/ or our config.yaml says otherwise."""
    files = ((Path(init_from) / "scheduler" / "scheduler_config.json", json.loads),
             (Path(init_from) / "config.yaml", yaml.safe_load))
    for file, read in files:
        trained = read(file.read_text()).get("prediction_type") if file.is_file() else None
        if trained and trained != prediction_type:
            raise InputError(f"{file}: the weights in {init_from} predict {trained!r}, this run trains "
                             f"{prediction_type!r}; set --prediction_type={trained}")


def check_cameras(list_file, rig):
    """Every sample's cameras against the rig, before training starts (the dataset checks again per item)."""
    for d in read_list_file(list_file):
        rig_sample_frames(d, rig)


def wrong_views(others):
    """(n, V) mask of the generated views -> (n, V) view index: each generated view's next generated
    view of the same object (a cyclic shift among them), the reference its own."""
    views = torch.arange(others.shape[1], device=others.device)
    return torch.stack([views.masked_scatter(o, views[o].roll(1)) for o in others])


@torch.no_grad()
def evaluate(model, cond, scheduler, val_set, prompt_embeds, cfg, step, device, out_dir, lpips_net=None):
    """DDIM samples of every view from one reference view for held-out objects, at each guidance:
    PSNR / masked PSNR (the target's alpha) / SSIM (/ LPIPS) of the non-reference views against the ground
    truth, and FaceLift's way (`_all`: the reference view included), the same for copying the reference
    image into every view (the baseline), PSNR against the ground truth of another non-reference view of
    the same object (a model that ignores which camera it renders scores the same on both), and a PNG grid
    (reference | ground truth | generated)."""
    model.eval()
    n, V = min(cfg.val_samples, len(val_set)), model.num_views
    gt, alpha = torch.stack([val_set[i]["images"] for i in range(n)]).to(device).split([3, 1], 2)  # (n, V, 3|1, H, W)
    ref_idx = torch.arange(n, device=device) % V  # reference view i % V for the i-th object...
    if cfg.reference_view == "0":
        ref_idx = torch.zeros_like(ref_idx)  # ...or always view 0
    _, ref_cond, labels = cond(gt * 2 - 1, ref_idx)
    others = torch.arange(V, device=device)[None] != ref_idx[:, None]  # (n, V): the views to generate
    ref_img = gt[torch.arange(n), ref_idx]  # (n, 3, H, W)
    wrong = gt[torch.arange(n)[:, None], wrong_views(others)]  # (n, V, 3, H, W): another view's ground truth
    copied = ref_img[:, None].expand_as(gt)  # the baseline: the reference in every view
    score = lambda metric, x, y, views=others: metric(x, y)[views].mean().item()  # noqa: E731
    masked = lambda x, y: masked_psnr(x, y, alpha)  # noqa: E731  the animal only: small ones drown in white
    metrics, grids = {"psnr_copy_ref": score(psnr, copied, gt), "masked_psnr_copy_ref": score(masked, copied, gt),
                      "ssim_copy_ref": score(ssim, copied, gt)}, []
    scored = {"psnr": psnr, "masked_psnr": masked, "ssim": ssim}
    if lpips_net is not None:
        scored["lpips"] = lambda x, y: lpips(*lpips_net, x, y)  # (n, V)
    for g in cfg.val_guidance:
        gen = torch.Generator(device).manual_seed(cfg.seed)  # the same noise at every validation
        x = sample_views(model, scheduler, ref_cond, ref_idx, prompt_embeds, ref_cond.shape[1:], labels,
                         cfg.val_steps, g, cfg.val_eta, gen)  # (n, V, C, h, w)
        pred = cond.decode(x)  # (n, V, 3, H, W)
        for name, metric in scored.items():
            metrics[f"{name}_g{g:g}"] = score(metric, pred, gt)
            metrics[f"{name}_g{g:g}_all"] = score(metric, pred, gt, torch.ones_like(others))
        metrics[f"psnr_g{g:g}_wrong_view"] = score(psnr, pred, wrong)
        rows = [torch.cat([ref_img[i:i + 1], gt[i], pred[i]]).cpu() for i in range(min(n, 6))]  # (1+2V, 3, H, W)
        groups = [("reference", 1), ("ground truth", V), (f"generated, g={g:g}, step {step}", V)]
        grids.append(save_image_grid(rows, Path(out_dir) / f"val_{step:06d}_g{g:g}.png", groups))
    model.train()
    return metrics, grids


def main(cfg):
    accelerator = make_accelerator(cfg.mixed_precision, cfg.wandb)
    main_proc, device, rank = accelerator.is_main_process, accelerator.device, accelerator.process_index
    check_flags(cfg, {"reference_view": ("0", "random"), "train_bg": ("white", "three_choices"),
                      "prediction_type": ("sample", "v_prediction", "epsilon"),
                      "preset": MVDIFF_UNET_CONFIGS},
                ("batch_size", "grad_accum", "image_size", "val_every", "ckpt_every",
                 "log_every", "max_bad_steps"))
    if cfg.fg_weight < 0:
        raise ConfigError(f"--fg_weight={cfg.fg_weight}: must be >= 0 (0: every pixel counts the same)")
    # the UNet halves the size at each block but the last (x8 more through the VAE)
    blocks = len(MVDIFF_UNET_CONFIGS[cfg.preset]["block_out_channels"])
    down = 2 ** (blocks - 1) * (8 if cfg.pipeline_dir else 1)
    if cfg.image_size % down and not cfg.init_from:
        raise InputError(f"--image_size={cfg.image_size}: must be a multiple of {down} for the {cfg.preset} "
                         "preset")
    out_dir = Path(cfg.out_dir)
    start_run(cfg, accelerator)

    # data: the toy mice on the default folder; every sample's cameras must match the rig
    data_dir = Path(cfg.data_dir)
    train_list, val_list = data_dir / cfg.train_list, data_dir / cfg.val_list
    rig = load_rig(cfg.rig)
    if data_dir == Path(Config.data_dir):
        toy_mice(data_dir, accelerator, n=cfg.toy_samples, rig=rig, size=64, n_extra=0, n_val=16,
                 seed=cfg.seed, yaw_deg=cfg.toy_yaw_deg)
    check_cameras(train_list, rig)
    check_cameras(val_list, rig)
    V = len(rig["frames"])
    train_set = MultiViewDataset(train_list, cfg.image_size, range(V), 0, rig, cfg.seed, rgb_ok=cfg.rgb_ok)
    val_set = MultiViewDataset(val_list, cfg.image_size, range(V), 0, rig, rgb_ok=cfg.rgb_ok)

    # model: FaceLift's / our unet/ folder, or a preset; the rig's prompt embeddings
    if cfg.init_from:
        check_prediction_type(cfg.init_from, cfg.prediction_type)
        model = load_mv_unet(Path(cfg.init_from) / "unet", V, cfg.sparse_attention)
        if main_proc:
            print(f"initialised weights from {cfg.init_from}/unet")
    else:
        model = build_mv_unet(cfg.preset, V, cfg.sparse_attention)
    if cfg.grad_checkpoint:
        model.unet.enable_gradient_checkpointing()
    model.to(device).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False) if cfg.ema_decay > 0 else None  # DiT's EMA
    dim = model.unet.config.cross_attention_dim
    prompt_file = Path(cfg.prompt_embeds or rig["prompt_embeds"])
    if cfg.make_toy_prompt_embeds and not prompt_file.exists() and (cfg.pipeline_dir or cfg.init_from):
        # a real UNet with toy embeddings would train and pass every later hash check
        raise InputError(f"{prompt_file}: not found; toy prompt embeddings are made only for toy runs (this one "
                         "sets pipeline_dir or init_from): make the rig's with `python data.py rig_prompt_embeds`")
    if cfg.make_toy_prompt_embeds:
        toy_prompt_embeds(prompt_file, rig, dim, accelerator)
    prompt_embeds, mismatch = load_prompt_embeds(prompt_file, rig, dim, cfg.allow_rig_mismatch)  # (V, T, D)
    prompt_embeds = prompt_embeds.to(device)
    if mismatch:  # the checkpoints carry it to every later stage
        rig = dict(rig, allowed_mismatch=mismatch)
    cond = Conditioner(cfg.pipeline_dir, device)
    lpips_net = None  # frozen metric networks, from local files only
    if cfg.lpips_vgg16_path and cfg.lpips_heads_path:
        lpips_net = (load_vgg(cfg.lpips_vgg16_path, "vgg16").to(device), load_lpips_heads(cfg.lpips_heads_path))
    elif main_proc:
        print("LPIPS off: set lpips_vgg16_path and lpips_heads_path to report it")

    # parameter groups, by hand: everything trains; weight decay on matrices only (nanoGPT)
    unet = [(n, p) for n, p in model.named_parameters() if n.startswith("unet.")]
    groups = [{"name": "unet_decay", "params": [p for n, p in unet if p.dim() >= 2],
               "weight_decay": cfg.weight_decay},
              {"name": "unet_no_decay", "params": [p for n, p in unet if p.dim() < 2], "weight_decay": 0.0},
              {"name": "ref_view_embed", "params": [model.ref_view_embed.weight], "weight_decay": 0.0}]
    # every trainable parameter in exactly one group, no frozen one in any
    grouped = sorted(id(p) for g in groups for p in g["params"])
    assert grouped == sorted(id(p) for p in model.parameters() if p.requires_grad), "groups != trainable"
    if main_proc:
        for g in groups:
            n = sum(p.numel() for p in g["params"])
            print(f"group {g['name']}: {len(g['params'])} tensors, {n:,} params, lr {cfg.lr:g}")
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), fused=True)
    for g in optimizer.param_groups:
        g["initial_lr"] = cfg.lr

    def load(path):  # unet/ folders (diffusers layout), not one safetensors file per module
        check_resumable(path)
        load_mv_weights(model, Path(path) / "unet")
        check_finite_weights(Path(path) / "unet", model)
        if ema is not None:
            ema_dir = Path(path) / "unet_ema"
            load_mv_weights(ema, ema_dir if ema_dir.exists() else Path(path) / "unet")
            check_finite_weights(ema_dir, ema)
        state = read_state(path)
        optimizer.load_state_dict(state["optimizers"]["optimizer"])
        return state
    start_step, guard = resume_run(cfg, out_dir, accelerator, load)
    model, optimizer = accelerator.prepare(model, optimizer)
    raw_model = accelerator.unwrap_model(model)
    guard.check_weights(raw_model, start_step)  # the reference for the checks before each save

    # diffusion: DDPM noising for training, DDIM (same betas) for sampling
    noise_scheduler, sampler_scheduler = mv_schedulers(cfg.prediction_type, cfg.beta_schedule, cfg.beta_start,
                                                       cfg.beta_end, cfg.clip_sample, cfg.pipeline_dir)
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(device)

    G = cfg.grad_accum
    global_batch = cfg.batch_size * accelerator.num_processes
    sampler = StepSampler(len(train_set), global_batch, rank, accelerator.num_processes, cfg.seed,
                          start_step * G)  # one sampler step per micro-batch
    loader = iter(torch.utils.data.DataLoader(train_set, batch_sampler=sampler, num_workers=cfg.num_workers))
    loader = open_run(cfg, out_dir, accelerator, loader, start_step)

    t_last = time.perf_counter()
    for step in range(start_step, cfg.max_steps + 1):
        if (step > start_step and step % cfg.val_every == 0) or step == cfg.max_steps:
            if main_proc:  # novel views; baseline: copy the reference; control: another view's ground truth
                m, grids = evaluate(ema or raw_model, cond, sampler_scheduler, val_set, prompt_embeds, cfg,
                                    step, device, out_dir, lpips_net)
                log_eval(accelerator, m, step, out_dir, {f"grid_g{g:g}": p for g, p in zip(cfg.val_guidance, grids)})
                print(f"{'ema ' if ema is not None else ''}grids {', '.join(map(str, grids))}")
            accelerator.wait_for_everyone()
        if step > start_step and (step % cfg.ckpt_every == 0 or step == cfg.max_steps):
            guard.check_weights(raw_model, step)
            if main_proc:
                path = save_mv_checkpoint(out_dir, step, raw_model, ema, optimizer, cfg, rig, prompt_file,
                                          {"skipped": guard.skipped})
                print(f"saved {path}")
            accelerator.wait_for_everyone()
        if step == cfg.max_steps:
            break

        lr = lr_at(step, cfg)
        for g in optimizer.param_groups:
            g["lr"] = g["initial_lr"] * lr / cfg.lr
        loss_sum = 0.0
        for micro in range(G):
            batch = next(loader)
            # every random draw is a function of (seed, step, micro-step, rank): resume continues the run
            gen = seeded(cfg.seed, rank, step, micro)
            rgb, alpha = batch["images"].to(device).split([3, 1], dim=2)  # (B, V, 3|1, H, W), RGB on white
            B = rgb.shape[0]
            if cfg.train_bg == "three_choices":  # one background per object: white, black or grey
                bg = torch.tensor([1.0, 0.0, 0.5])[torch.randint(0, 3, (B,), generator=gen)].to(device)
                rgb = rgb + (1 - alpha) * (bg[:, None, None, None, None] - 1)
            images = rgb * 2 - 1  # (B, V, 3, H, W) in [-1, 1]
            ref_idx = (torch.randint(0, V, (B,), generator=gen) if cfg.reference_view == "random"
                       else torch.zeros(B, dtype=torch.long)).to(device)
            x0, ref_cond, labels = cond(images, ref_idx, gen)  # (B, V, C, h, w), (B, C, h, w), (B, E) | None
            # classifier-free dropout, FaceLift's drop_as_a_whole: one draw per object picks what to drop
            u, r = torch.rand(B, generator=gen).to(device), cfg.cond_drop_prob
            ref_cond = ref_cond * ~((u >= r) & (u < 3 * r))[:, None, None, None]
            labels = None if labels is None else labels * (u >= 2 * r)[:, None]
            noise = torch.randn(x0.shape, generator=gen).to(device)
            T = noise_scheduler.config.num_train_timesteps
            t = torch.randint(0, T, (B,), generator=gen).to(device)  # one timestep per object
            noisy = noise_scheduler.add_noise(x0, noise, t)  # (B, V, C, h, w)
            target = diffusion_target(noise_scheduler, x0, noise, t)  # x0, v or the noise
            weight = torch.ones(B, device=device)
            if cfg.min_snr_gamma > 0:  # min-SNR, with pure noise kept at weight 1 (losses.min_snr_weight)
                weight = min_snr_weight(alphas_cumprod[t], cfg.min_snr_gamma, cfg.prediction_type)
            pixel_weight = None
            if cfg.fg_weight > 0:  # weights at the image's size, area-pooled to the model's (latents: 1/8)
                pixel_weight = foreground_weight(alpha.flatten(0, 1), cfg.fg_weight)  # (B * V, 1, H, W)
                pixel_weight = torch.nn.functional.adaptive_avg_pool2d(pixel_weight, x0.shape[-2:])
                pixel_weight = pixel_weight.unflatten(0, (B, V))  # (B, V, 1, h, w)
            # only the last micro-batch all-reduces the gradients
            sync = accelerator.no_sync(model) if micro < G - 1 else nullcontext()
            with sync, accelerator.autocast():
                pred = model(noisy, t, prompt_embeds, ref_idx, ref_cond, labels)
                loss = weighted_mse(pred, target, weight, pixel_weight) / G
                accelerator.backward(loss)
            loss_sum += loss.item()
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip).item()
        # a non-finite loss makes the gradient non-finite
        why = f"loss {loss_sum:.4g}, grad norm {grad_norm:.4g}"
        if guard.should_step(math.isfinite(grad_norm), step, why, main_proc):
            optimizer.step()
            if ema is not None:  # warm-up: the average forgets the random initialisation early on
                update_ema(ema, raw_model, min(cfg.ema_decay, (1 + step) / (10 + step)))
        optimizer.zero_grad(set_to_none=True)

        if main_proc and step % cfg.log_every == 0:
            dt = (time.perf_counter() - t_last) / (cfg.log_every if step > start_step else 1)
            t_last = time.perf_counter()
            log_step(accelerator, step, {"loss": loss_sum}, lr, grad_norm, guard.skipped, dt, global_batch * G)
    accelerator.wait_for_everyone()  # leave the process group together (gloo can abort at exit otherwise)
    accelerator.end_training()
    return raw_model, ema


# the original code base's flag names (its output_dir is plumbing.RENAMED's), accepted as is
ALIASES = {"max_train_steps": "max_steps", "prompt_embed_path": "prompt_embeds"}


if __name__ == "__main__":
    # and its --config is our --cfg
    cli(main, Config, ALIASES, [re.sub(r"^--config(?=$|=)", "--cfg", a) for a in sys.argv[1:]])
