"""Dance, stage A: pretrain the music-to-pose (M2P) encoder: a music window + the reference pose +
the reference face crop -> per-frame joint heatmaps and a face embedding that matches a frozen
face recognizer (ArcFace IResNet). Stages B (single-frame denoiser) and C (temporal modules) land later.

    python train_dance.py --training_stage A                      # toy dancers on a CPU, minutes
    torchrun --nproc_per_node=2 train_dance.py --training_stage A # DDP (gloo on CPU, nccl on GPU)
    accelerate launch train_dance.py --cfg configs/dance_stage_a.yaml
    python train_dance.py --training_stage A --resume=auto        # continue the latest checkpoint
"""
import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from PIL import Image
from safetensors.torch import save_model

from data import (JOINT_SETS, VISIBLE, DanceClipDataset, InputError, SkipGuard, StepSampler,
                  atomic_dir, check_flags, cli, load_checkpoint, log_metrics, make_accelerator, music_beats,
                  prepare_run, read_audio, save_checkpoint, save_config, write_skeleton_video)
from losses import beat_alignment, face_loss, heatmap_loss, motion_beats, pose_error, soft_argmax
from models import IRESNET_CONFIGS, M2P_CONFIGS, IResNet, M2PEncoder, load_iresnet
from toy import toy_dance


@dataclass
class Config:
    training_stage: str = "A"  # A: M2P pretraining | B | C | all (B and C land later)
    # data
    data_dir: str = "data/toy_dance"  # clip dirs + list files; the toy dancers are made here if missing
    train_list: str = "data_train.txt"  # relative to data_dir, or absolute
    val_list: str = "data_val.txt"
    toy_clips: int = 100  # size of the generated toy set (only when data_dir has no train list)
    toy_seconds: float = 8.0  # length of each toy clip
    toy_image_size: int = 64  # toy frame size
    fps: int = 30  # video frame rate; music features use SR = fps x 512
    joints: str = "body_feet24"  # body18 | body_feet24 | all134 (first n points of the DWPose 134 layout)
    window: int = 90  # frames per training window (EDGE: 150 = 5 s at 30 fps)
    # model
    m2p_preset: str = "toy"  # M2P_CONFIGS: tiny | toy | base
    heatmap_sigma: float = 1.0  # ground-truth Gaussian, in heatmap cells
    face_recognizer_path: str = ""  # arcface_torch backbone.pth; "": a frozen random toy IResNet
    face_recognizer_arch: str = "iresnet100"  # IRESNET_CONFIGS key of that file (glintr100 = iresnet100)
    grad_checkpoint: bool = False  # per-layer activation checkpointing in M2P's transformer
    # optimisation (stage A)
    stage_a_steps: int = 1500
    stage_a_lr: float = 2e-3  # the toy's; the real config uses 1e-4
    pose_loss_weight: float = 0.5
    face_loss_weight: float = 0.1
    batch_size: int = 8  # per process, per micro-step
    grad_accum: int = 1
    mixed_precision: str = "no"  # no | bf16 | fp16, used on GPU only
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1  # cosine decays to lr * this
    weight_decay: float = 0.01  # on >= 2-D parameters only
    grad_clip: float = 1.0
    num_workers: int = 0
    # run
    out_dir: str = "out/dance"  # stage A writes to <out_dir>/stage_A/
    resume: str = ""  # "" | auto | path to a checkpoint-<step> dir
    overwrite: bool = False  # a fresh run may delete an earlier run's checkpoints in out_dir
    max_bad_steps: int = 10  # a non-finite loss / gradient skips the step; this many in a row stop the run
    log_every: int = 50
    val_every: int = 500
    val_clips: int = 10  # held-out clips evaluated (whole clips, in windows of `window` frames)
    ckpt_every: int = 500
    seed: int = 0
    wandb: bool = False
    wandb_project: str = "mouselift"


# The seed's generic command-line names, accepted as they are written (and in yaml files)
ALIASES = {"train_batch_size": "batch_size", "gradient_accumulation_steps": "grad_accum",
           "lr_warmup_steps": "warmup_steps", "gradient_clip_norm": "grad_clip", "output_dir": "out_dir",
           "gradient_checkpointing": "grad_checkpoint"}  # --num_workers is already the seed's name


def lr_at(step, cfg):
    """Linear warmup, then cosine from stage_a_lr to stage_a_lr * min_lr_ratio at stage_a_steps."""
    lr = cfg.stage_a_lr
    if step < cfg.warmup_steps:
        return lr * (step + 1) / cfg.warmup_steps
    t = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.stage_a_steps - cfg.warmup_steps))
    return lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


@torch.no_grad()
def evaluate(m2p, recognizer, val_set, mean_pose, beats, cfg, step, out_dir, device):
    """On whole held-out clips (reference = frame 0, windows of the training length): pose error and
    PCK@0.05 against the mean-pose and reference-pose baselines, beat alignment against the same
    score with the music shuffled across clips, face-embedding cosine, and the skeleton video."""
    m2p.eval()
    n = min(cfg.val_clips, len(val_set))
    s = {k: [] for k in ("err", "mean_err", "ref_err", "pck", "mean_pck", "ref_pck", "cos")}
    preds, gts = [], []
    for i in range(n):
        item = val_set[i]  # start 0, reference frame 0
        music = torch.from_numpy(val_set.feats[i]).to(device)  # (T, D)
        gt = torch.from_numpy(val_set.poses[i]).to(device)  # (T, J, 3)
        ref_pose, face = item["ref_pose"][None].to(device), item["face"][None].to(device)
        pred = []
        for t0 in range(0, len(music), cfg.window):  # non-overlapping windows, as long as in training
            logits, emb = m2p(music[None, t0: t0 + cfg.window], ref_pose, face)
            pred.append(soft_argmax(logits.float())[0])  # (w, J, 2)
        pred = torch.cat(pred)  # (T, J, 2)
        guesses = {"": pred, "mean_": mean_pose.expand_as(pred), "ref_": ref_pose[:, :, :2].expand_as(pred)}
        for name, guess in guesses.items():
            err, pck = pose_error(guess, gt)
            s[name + "err"].append(err.item())
            s[name + "pck"].append(pck.item())
        s["cos"].append(F.cosine_similarity(emb.float(), recognizer(face * 2 - 1), dim=-1).item())
        preds.append(pred.cpu().numpy())
        gts.append(gt.cpu().numpy())
    m = {k: float(np.mean(v)) for k, v in s.items()}
    # beat alignment: the predicted motion against its own music's beats, and against the next clip's
    # music (a derangement: the same motion statistics, music that did not drive it)
    mb = [motion_beats(p, cfg.fps) for p in preds]
    m["beat_align"] = float(np.mean([beat_alignment(beats[i], mb[i]) for i in range(n)]))
    shuffled = [beat_alignment(beats[(i + 1) % n], mb[i]) for i in range(n)] if n > 1 else [float("nan")]
    m["beat_align_shuffled"] = float(np.mean(shuffled))
    m["beat_align_gt"] = float(np.mean([beat_alignment(beats[i], motion_beats(g, cfg.fps))
                                        for i, g in enumerate(gts)]))
    video = out_dir / f"val_{step:06d}.mp4"
    video, frame = write_skeleton_video(video, val_set.clips[0], gts[0], preds[0], cfg.fps)
    Image.fromarray(frame).save(out_dir / f"val_{step:06d}.png")
    m2p.train()
    return m, video


def stage_a(cfg):
    """Stage A: the M2P encoder trains at stage_a_lr, the face recognizer is frozen."""
    accelerator = make_accelerator(cfg.mixed_precision, cfg.wandb)
    main_proc, device = accelerator.is_main_process, accelerator.device
    check_flags(cfg, {"m2p_preset": M2P_CONFIGS, "joints": JOINT_SETS},
                ("batch_size", "grad_accum", "window", "val_every", "ckpt_every",
                 "log_every", "max_bad_steps"))
    set_seed(cfg.seed + accelerator.process_index)
    out_dir = Path(cfg.out_dir) / "stage_A"
    if main_proc:
        print(f"config: {cfg}\nprocesses: {accelerator.num_processes}, device: {device}")
        out_dir.mkdir(parents=True, exist_ok=True)
        if cfg.wandb:
            # the run's wandb files beside its outputs: <out_dir>/wandb/
            accelerator.init_trackers(cfg.wandb_project, config=vars(cfg),
                                      init_kwargs={"wandb": {"dir": str(out_dir)}})

    # data: the toy dancers on the default folder
    data_dir = Path(cfg.data_dir)
    train_list, val_list = data_dir / cfg.train_list, data_dir / cfg.val_list
    if data_dir == Path(Config.data_dir):
        toy_dance(data_dir, accelerator, n=cfg.toy_clips, seconds=cfg.toy_seconds, size=cfg.toy_image_size,
                  fps=cfg.fps, seed=cfg.seed)
    train_set = DanceClipDataset(train_list, cfg.window, cfg.joints, cfg.fps, seed=cfg.seed)
    val_set = DanceClipDataset(val_list, cfg.window, cfg.joints, cfg.fps, start=0, ref_frame=0)
    if val_set.music_dim != train_set.music_dim:
        raise InputError(f"{val_list}: music features of width {val_set.music_dim}, "
                         f"{train_list}: {train_set.music_dim}")
    # the baseline that ignores music and reference: each joint's mean position over the training clips
    P = torch.from_numpy(np.concatenate(train_set.poses))  # (N, J, 3)
    vis = (P[..., 2:] >= VISIBLE).float()
    mean_pose = ((P[..., :2] * vis).sum(0) / vis.sum(0).clamp(min=1)).to(device)  # (J, 2)

    # models: the M2P encoder (trained) and the face recognizer (frozen)
    m2p = M2PEncoder(train_set.music_dim, train_set.J, **M2P_CONFIGS[cfg.m2p_preset],
                     max_frames=max(300, cfg.window), grad_checkpoint=cfg.grad_checkpoint)
    feats = torch.from_numpy(np.concatenate(train_set.feats))  # (N, D)
    m2p.music_mean.copy_(feats.mean(0))
    m2p.music_std.copy_(feats.std(0).clamp(min=1e-3))  # constant features (e.g. silent one-hots) stay finite
    if cfg.face_recognizer_path:
        recognizer = load_iresnet(cfg.face_recognizer_path, cfg.face_recognizer_arch)
    else:  # a fixed function of the face, the same in every run and after resuming: its own seed
        with torch.random.fork_rng():
            torch.manual_seed(cfg.seed + 12345)
            recognizer = IResNet(**IRESNET_CONFIGS["toy"]).eval()
    recognizer.requires_grad_(False).to(device)

    # freeze and parameter groups, by hand: M2P trains (weight decay on matrices only), the recognizer is frozen
    params = list(m2p.parameters())
    groups = [{"name": "m2p_decay", "params": [p for p in params if p.dim() >= 2],
               "weight_decay": cfg.weight_decay},
              {"name": "m2p_no_decay", "params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    # every trainable parameter in exactly one group, no frozen one in any
    grouped = sorted(id(p) for g in groups for p in g["params"])
    trainable = sorted(id(p) for m in (m2p, recognizer) for p in m.parameters() if p.requires_grad)
    assert grouped == trainable, "groups != trainable"
    assert not any(p.requires_grad for p in recognizer.parameters())  # the recognizer stays frozen
    if main_proc:
        print(f"stage A | {'module':<12} | {'trainable':<9} | {'tensors':>7} | {'params':>11} | lr")
        for name, module, lr in (("m2p", m2p, cfg.stage_a_lr), ("recognizer", recognizer, 0.0)):
            ps = list(module.parameters())
            print(f"stage A | {name:<12} | {str(ps[0].requires_grad):<9} | {len(ps):>7} | "
                  f"{sum(p.numel() for p in ps):>11,} | " + (f"{lr:g}" if ps[0].requires_grad else "frozen"))
        for g in groups:
            n = sum(p.numel() for p in g["params"])
            print(f"group {g['name']}: {len(g['params'])} tensors, {n:,} params, lr {cfg.stage_a_lr:g}, "
                  f"weight decay {g['weight_decay']}")
    optimizer = torch.optim.AdamW(groups, lr=cfg.stage_a_lr, betas=(0.9, 0.95))
    for g in optimizer.param_groups:
        g["initial_lr"] = cfg.stage_a_lr

    start_step, guard = 0, SkipGuard(cfg.max_bad_steps)
    resume = prepare_run(out_dir, cfg.resume, cfg.overwrite, accelerator)
    if resume:
        # per-rank randomness is re-seeded from (seed, rank, step); the data is a function of the step
        state = load_checkpoint(resume, {"m2p": m2p}, {"optimizer": optimizer})
        start_step, guard.skipped = state["step"], state["extra"].get("skipped", 0)
        set_seed(cfg.seed + accelerator.process_index + 1000 * start_step)
        if main_proc:
            print(f"resumed from {resume} at step {start_step}")
    model, optimizer = accelerator.prepare(m2p, optimizer)
    raw = accelerator.unwrap_model(model)

    if main_proc:  # the run is set up: its config replaces an earlier one only now
        save_config(cfg, out_dir / "config.yaml")
    G = cfg.grad_accum
    global_batch = cfg.batch_size * accelerator.num_processes
    sampler = StepSampler(len(train_set), global_batch, accelerator.process_index, accelerator.num_processes,
                          cfg.seed, start_step * G)  # one sampler step per micro-batch
    loader = iter(torch.utils.data.DataLoader(train_set, batch_sampler=sampler, num_workers=cfg.num_workers))
    beats = None  # music beats (s) of the validation clips, from librosa's beat tracker, computed once

    t_last = time.perf_counter()
    for step in range(start_step, cfg.stage_a_steps + 1):
        if step % cfg.val_every == 0 or step == cfg.stage_a_steps:
            if main_proc:  # baselines: the mean pose, the reference pose; control: music shuffled
                if beats is None:
                    clips = val_set.clips[: cfg.val_clips]
                    beats = [music_beats(*read_audio(c["dir"] / "audio.wav")) for c in clips]
                m, video = evaluate(raw, recognizer, val_set, mean_pose, beats, cfg, step, out_dir, device)
                log_metrics(m, step, out_dir)
                print(f"video {video}")
                accelerator.log({f"val/{k}": v for k, v in m.items()}, step=step)
                if cfg.wandb:  # the video's middle frame as a picture beside the scalars
                    import wandb
                    accelerator.log({"val/frame": wandb.Image(str(video.with_suffix(".png")))}, step=step)
            accelerator.wait_for_everyone()
        if step > start_step and (step % cfg.ckpt_every == 0 or step == cfg.stage_a_steps):
            if main_proc:
                path = save_checkpoint(out_dir, step, {"m2p": raw}, {"optimizer": optimizer}, cfg,
                                       {"skipped": guard.skipped})
                print(f"saved {path}")
            accelerator.wait_for_everyone()
        if step == cfg.stage_a_steps:
            break

        lr = lr_at(step, cfg)
        for g in optimizer.param_groups:
            g["lr"] = g["initial_lr"] * lr / cfg.stage_a_lr
        parts = {"loss": 0.0, "pose": 0.0, "ce": 0.0, "l1": 0.0, "face": 0.0}
        for micro in range(G):
            batch = {k: v.to(device) for k, v in next(loader).items() if torch.is_tensor(v)}
            # only the last micro-batch all-reduces the gradients
            sync = contextlib.nullcontext() if micro == G - 1 else accelerator.no_sync(model)
            with sync:
                with accelerator.autocast():
                    # (B, W, J, h, h), (B, 512)
                    logits, emb = model(batch["music"], batch["ref_pose"], batch["face"])
                with torch.no_grad():
                    target = recognizer(batch["face"] * 2 - 1)  # (B, 512), 112x112 crops in [-1, 1]
                pose, hm = heatmap_loss(logits, batch["poses"], cfg.heatmap_sigma)
                face = face_loss(emb.float(), target)
                loss = cfg.pose_loss_weight * pose + cfg.face_loss_weight * face
                accelerator.backward(loss / G)
            for k, v in (("loss", loss), ("pose", pose), ("ce", hm["ce"]), ("l1", hm["l1"]), ("face", face)):
                parts[k] += v.item() / G
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip).item()
        # a non-finite loss makes the gradient non-finite
        if guard.ok(math.isfinite(grad_norm), step, f"loss {parts['loss']:.4g}, grad norm {grad_norm:.4g}",
                    main_proc):
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        if main_proc and step % cfg.log_every == 0:
            dt = (time.perf_counter() - t_last) / (cfg.log_every if step > start_step else 1)
            t_last = time.perf_counter()
            print(f"step {step} | " + " ".join(f"{k} {v:.4f}" for k, v in parts.items())
                  + f" | lr {lr:.2e} | grad norm {grad_norm:.3f} | skipped {guard.skipped}"
                  + f" | {dt * 1000:.0f} ms/step"
                  + f" | {global_batch * G / dt:.1f} samples/s")
            accelerator.log({"train/lr": lr, "train/grad_norm": grad_norm,
                             **{f"train/{k}": v for k, v in parts.items()}}, step=step)

    if main_proc:  # the weights for stage B: <out_dir>/stage_A/final/m2p.safetensors + config.yaml
        with atomic_dir(out_dir / "final") as tmp:
            save_model(raw, str(tmp / "m2p.safetensors"))
            save_config(cfg, tmp / "config.yaml")
        print(f"saved {out_dir / 'final'}")
    accelerator.wait_for_everyone()  # leave the process group together (gloo can abort at exit otherwise)
    accelerator.end_training()
    return raw


def main(cfg):
    if cfg.training_stage != "A":
        raise InputError(f"--training_stage={cfg.training_stage!r}: only stage A (M2P pretraining) "
                                  "is implemented so far; stages B, C and all land with the denoiser and "
                                  "the temporal modules")
    return stage_a(cfg)


if __name__ == "__main__":
    cli(main, Config, ALIASES)
