"""Dance: music + a reference image -> a dance video, in stages (CHAMP's recipe, StableAnimator's identity).
A: the music-to-pose (M2P) encoder: a music window + the reference pose + the reference face crop ->
   per-frame joint heatmaps and a face embedding that matches a frozen face recognizer (ArcFace IResNet).
B: single frames: pose guider + denoising UNet + ReferenceNet + face tokens: the reference dancer in a pose.
C: clips: AnimateDiff motion modules join B's UNet and only they train (sequence-length curriculum).

The file reads in chapters: the Config (one group of fields per stage), what the stages share (learning
rate, freeze matrix, scheduler, model builders), then stage A, stage B, stage C, and `all`.

    python train_dance.py --training_stage A                      # toy dancers on a CPU, minutes
    python train_dance.py --training_stage B                      # after A: its final/ M2P
    python train_dance.py --training_stage C                      # after B: its final/
    python train_dance.py --training_stage all                    # A -> B -> C; --resume=auto continues
    torchrun --nproc_per_node=2 train_dance.py --training_stage A # DDP (gloo on CPU, nccl on GPU)
    accelerate launch train_dance.py --cfg configs/dance_stage_b.yaml
    python train_dance.py --training_stage B --resume=auto        # continue the stage's latest checkpoint
"""
import contextlib
import copy
import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, UNet2DConditionModel
from einops import rearrange

from dance_eval import evaluate_a, evaluate_b, evaluate_c, spread_starts
from data import (
    JOINT_SETS,
    VISIBLE,
    DanceClipDataset,
    StepSampler,
    body_parts,
    box_mask,
    face_crops,
    music_beats,
    read_audio,
    read_list_file,
)
from losses import (
    assemble_dance,
    axis_soft_argmax,
    diffusion_target,
    face_loss,
    geometric_windows,
    kinetic_windows,
    m2p_loss,
    min_snr_weight,
    pose_heatmaps,
    pose_spread,
    predicted_x0,
    smooth_poses,
    weighted_mse,
)
from models import (
    DANCE_UNET_CONFIGS,
    M2P_CONFIGS,
    DanceNet,
    FaceTokens,
    PoseGuider,
    clip_image_embeds,
    m2p_encoder,
    motion_unet,
    referencenet_unused,
    to_images,
    to_model_space,
)
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
from toy import (
    TOY_DANCE_DIR,
    eval_face_recognizer,
    face_recognizer,
    frozen_encoders,
    pose_reader,
    toy_clip,
    toy_dance,
    toy_dancers_spread,
    toy_unet,
)
from weights import (
    check_sd_scheduler,
    load_dance_net,
    load_m2p,
    load_motion_adapter,
    load_unet,
    read_dance_final,
    save_dance_final,
)


@dataclass
class Config:
    training_stage: str = "A"  # A: M2P pretraining | B: single frames | C: temporal modules | all: A -> B -> C
    # a yaml's stage_a: / stage_b: / stage_c: mappings: values for that stage only (docs/operations.md)
    sections: dict = dataclasses.field(default_factory=lambda: {"stage_a": {}, "stage_b": {}, "stage_c": {}})
    # ---- data (every stage)
    data_dir: str = TOY_DANCE_DIR  # clip dirs + list files; the toy dancers are made here if missing
    train_list: str = "data_train.txt"  # relative to data_dir, or absolute
    val_list: str = "data_val.txt"  # the toy's: dancers never trained on
    val_seen_list: str = "data_val_seen.txt"  # stage A also scores these (toy: new clips of training dancers)
    toy_clips: int = 100  # size of the generated toy set (only when data_dir has no train list)
    toy_seconds: float = 8.0  # length of each toy clip
    toy_image_size: int = 64  # toy frame size
    fps: int = 30  # video frame rate; music features use SR = fps x 512
    joints: str = "body_feet24"  # body18 | body_feet24 | all134 (first n points of the DWPose 134 layout)
    window: int = 90  # frames per training window (EDGE: 150 = 5 s at 30 fps)
    # ---- optimisation (every stage)
    batch_size: int = 8  # per process, per micro-step (stages A and B)
    grad_accum: int = 1  # micro-batches per optimizer step (stage C: of batch_size_c clips)
    mixed_precision: str = "no"  # no | bf16 | fp16: on a GPU (bf16 also on a CPU with native bf16)
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1  # cosine decays to lr * this
    weight_decay: float = 0.01  # on >= 2-D parameters only (stage A); all parameters (B, C)
    grad_clip: float = 1.0
    num_workers: int = 0
    grad_checkpoint: bool = False  # per-layer activation checkpointing (M2P's transformer, the UNets)
    # ---- stage A: the M2P encoder
    max_steps_a: int = 1500
    lr_a: float = 2e-3  # the toy's; the real config uses 1e-4
    m2p_preset: str = "toy"  # M2P_CONFIGS: tiny | toy | base
    heatmap_sigma: float = 1.0  # ground-truth Gaussian, in heatmap cells
    face_recognizer_path: str = ""  # arcface_torch backbone.pth; "": a frozen random toy IResNet
    face_recognizer_arch: str = "iresnet100"  # IRESNET_CONFIGS key of that file (glintr100 = iresnet100)
    eval_face_recognizer_path: str = ""  # scores identity, never trained against; "": the toy's, seeded apart
    pose_model: str = ""  # reads poses back from generated frames: a DWPose / RTMPose ONNX; "toy": the toy's
    # detector trained on data_dir's clips (the default on the toy data); "" on real data: no pose metrics
    pose_detector: str = "full_frame"  # its person box: the whole frame, or a YOLOX ONNX file
    pose_loss_weight: float = 0.5  # M2P's heatmap loss, also when M2P trains in stages B and C
    face_loss_weight: float = 0.1
    m2p_face_drop: float = 0.5  # share of stage-A samples whose dance does not see the face (sampling's case)
    m2p_smooth: int = 3  # M2P's poses averaged over this many frames (odd; 0 / 1: off) at validation, as sample.py
    # ---- stage B: pose guider + denoising UNet + ReferenceNet + face tokens on single frames
    max_steps_b: int = 1500
    lr_b: float = 1e-3  # the toy's; configs/dance_stage_b.yaml: 1e-4
    referencenet_lr: float = 1e-4  # at the toy's 1e-3 the ReferenceNet's tokens collapse to constants
    m2p_lr_b: float = 1e-5  # M2P's group, from m2p_unfreeze_step on
    m2p_unfreeze_step: int = 1200  # M2P trains (with its pose loss) from here; before, frozen and detached
    m2p_path: str = ""  # stage A's final/ folder; "": <out_dir>/stage_A/final
    scheduled_sampling_start: float = 0.8  # fraction of stage-B steps after which M2P poses replace the truth
    image_size: int = 32  # frames resized to this; the toy denoises pixels, SD latents are 1/8 of it
    unet_preset: str = "toy"  # DANCE_UNET_CONFIGS key, used when unet_path is ""
    toy_pretrain_steps: int = 1000  # unet_path "": the preset UNet pretrained this long (toy.toy_unet); 0: random
    unet_path: str = ""  # SD-1.5 `unet/` folder: denoiser and ReferenceNet both start from it
    vae_path: str = ""  # SD `vae/` folder (frozen); "": pixel space (the toy)
    clip_path: str = ""  # CLIPVisionModelWithProjection folder (frozen); "": the toy CLIP (toy.toy_clip; random
    # when toy_pretrain_steps is 0)
    guider_channels: tuple[int, ...] = (16,)  # pose guider widths: len - 1 stride-2 steps (SD: 16, 32, 96, 256)
    pose_sigma: float = 1.0  # pose-condition heatmap Gaussian, in image pixels
    face_tokens: int = 4  # cross-attention tokens from the face embedding
    # ---- diffusion (stages B and C)
    diffusion_loss_weight: float = 1.0
    id_loss_weight: float = 0.1
    id_loss_max_t: int = 300  # the identity loss only at timesteps below this (low noise)
    face_loss_scale: float = 3.0  # the diffusion loss inside the face box weighs this much (StableAnimator: 2)
    cond_drop_prob: float = 0.1  # per sample: reference masked out, CLIP and face tokens zeroed
    noise_offset: float = 0.05
    min_snr_gamma: float = 5.0
    # one scheduler config for training and sampling; the toy's is the multi-view toy's (x0 in pixel
    # space learns fast on a CPU); the real config: v_prediction, scaled_linear 0.00085-0.012, zero SNR
    prediction_type: str = "sample"  # epsilon | v_prediction | sample
    beta_schedule: str = "squaredcos_cap_v2"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    zero_snr: bool = False  # rescale betas to zero terminal SNR (with v-prediction)
    timestep_spacing: str = "trailing"
    # ---- stage C: only the temporal modules train (AnimateDiff motion modules on the stage-B UNet), on clips
    max_steps_c: int = 300
    lr_c: float = 1e-3  # the toy's; configs/dance_stage_c.yaml: 5e-5
    batch_size_c: int = 2  # clips per process and step, each seq_len_at(step) frames long
    temporal_loss_weight: float = 0.1
    seq_len_start: int = 8  # the sequence-length curriculum: frames per clip at step 0, rising linearly
    seq_len_end: int = 16  # to this at seq_len_ramp_steps (CHAMP-style 24 -> 150 on real data); also the
    seq_len_ramp_steps: int = 150  # validation length
    motion_adapter_path: str = ""  # AnimateDiff MotionAdapter folder (diffusers); "": new motion modules
    motion_heads: int = 4  # attention heads of new motion modules
    stage_b_path: str = ""  # stage B's final/ folder; "": <out_dir>/stage_B/final
    m2p_lr_c: float = 0.0  # > 0: M2P trains in stage C too, with its pose loss on the clips' music; 0: frozen
    m2p_poses_c: float = 0.5  # share of stage-C clips posed by M2P (from their music), as sampling poses them
    # ---- validation and run
    val_samples: int = 10  # held-out clips evaluated in stages A and B (A: whole clips in `window` windows)
    val_samples_c: int = 4  # whole held-out clips of seq_len_end frames, generated at steps 0 and last
    val_frames: int = 4  # generated frames per held-out clip (stage B)
    val_steps: int = 25  # DDIM steps at validation
    val_guidance: float = 1.0  # the toy scores best unguided (docs/experiments.md); the real configs: 3.5
    out_dir: str = "out/dance"  # stage X writes to <out_dir>/stage_X/
    resume: str = ""  # "" | auto | path to a checkpoint-<step> dir
    overwrite: bool = False  # a fresh run may delete an earlier run's checkpoints in out_dir
    max_bad_steps: int = 10  # a non-finite loss / gradient skips the step; this many in a row stop the run
    log_every: int = 50
    val_every: int = 500
    ckpt_every: int = 500
    seed: int = 0
    wandb: bool = False
    wandb_project: str = "mouselift"


# Command-line names of the diffusers example trainers (and the dance code bases built on them), accepted as is
ALIASES = {"train_batch_size": "batch_size", "gradient_accumulation_steps": "grad_accum",
           "lr_warmup_steps": "warmup_steps", "gradient_clip_norm": "grad_clip", "output_dir": "out_dir",
           "gradient_checkpointing": "grad_checkpoint"}


# ==============================================================================================
# What the stages share: learning rate, freeze matrix, scheduler, the models' builders


def lr_at(step, lr, total, cfg):
    """Linear warmup, then cosine from lr to lr * min_lr_ratio at `total` steps (min_lr_ratio 1: constant)."""
    if step < cfg.warmup_steps:
        return lr * (step + 1) / cfg.warmup_steps
    t = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    return lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


# ----------------------------------------------------------------------------------------------
# The freeze matrix: which modules train in which stage. Printed at the start of every stage
# and asserted against the parameters that have requires_grad and sit in an optimizer group.
MODULES = ("m2p", "face_recognizer", "pose_guider", "face_tokens", "spatial_unet", "temporal_modules",
           "referencenet", "vae", "clip")
TRAINS = {"A": {"m2p"},
          "B": {"m2p", "pose_guider", "face_tokens", "spatial_unet", "referencenet"},  # m2p from m2p_unfreeze_step
          "C": {"temporal_modules"}}  # + m2p with m2p_lr_c > 0 (an option)


def check_freeze(stage, modules, optimizer, notes=None, options=()):
    """modules: {matrix row: [parameters]} of this stage's model. Prints the matrix and asserts it:
    a row that trains has all its parameters trainable and grouped, but for the number of frozen
    tensors that `notes` ({row: (count, why)}) explains; a frozen row has none; no parameter sits in two groups.
    options: rows the matrix freezes in this stage that this run trains by choice (printed 'option')."""
    trains = {s: TRAINS[s] | (set(options) if s == stage else set()) for s in "ABC"}
    grouped = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert len(grouped) == len(set(grouped)), "a parameter sits in two optimizer groups"
    grouped, notes = set(grouped), notes or {}
    print(f"freeze | {'module':<16} | {'A':<6} | {'B':<6} | {'C':<6} | {'tensors':>7} | {'params':>11} | now")
    for name in MODULES:
        cell = lambda s: "option" if name in options and s == stage else "train" if name in trains[s] else "frozen"  # noqa: E731
        cells = " | ".join(f"{cell(s):<6}" for s in "ABC")
        ps = modules.get(name)
        if ps is None:
            print(f"freeze | {name:<16} | {cells} | {'-':>7} | {'-':>11} | not in stage {stage}'s model")
            continue
        live = [p for p in ps if p.requires_grad and id(p) in grouped]
        print(f"freeze | {name:<16} | {cells} | {len(ps):>7} | {sum(p.numel() for p in ps):>11,} | "
              f"{sum(p.numel() for p in live):,} trainable" + (f" ({notes[name][1]})" if name in notes else ""))
        if name in trains[stage]:
            frozen = notes.get(name, (0, ""))[0]
            assert len(ps) - len(live) == frozen, (f"{name} trains in stage {stage}: {len(ps) - len(live)} "
                                                   f"tensors do not, {frozen} expected")
        else:
            assert not live, f"{name} is frozen in stage {stage}, {len(live)} tensors train"
    stray = grouped - {id(p) for ps in modules.values() for p in ps}
    assert not stray, f"{len(stray)} grouped parameters belong to no module of the matrix"


def dance_scheduler(cfg):
    """One DDIM scheduler for training's noising and for sampling (CHAMP trains with scaled_linear betas
    and samples with linear ones: one config here)."""
    return DDIMScheduler(num_train_timesteps=1000, beta_start=cfg.beta_start, beta_end=cfg.beta_end,
                         beta_schedule=cfg.beta_schedule, prediction_type=cfg.prediction_type,
                         rescale_betas_zero_snr=cfg.zero_snr, timestep_spacing=cfg.timestep_spacing,
                         clip_sample=False, set_alpha_to_one=True)


def later_stages(cfg, stage):
    """The folders of the stages made from `stage`'s output: an --overwrite of it replaces them too."""
    return [Path(cfg.out_dir) / f"stage_{s}" for s in "ABC" if s > stage]


def start_stage(cfg, accelerator, stage):
    """A stage's start (plumbing.start_run) in <out_dir>/stage_<X>/, and the toy dancers and their
    pretrained UNet (toy_unet) when data_dir is the default. Returns (out_dir, data_dir)."""
    out_dir = Path(cfg.out_dir) / f"stage_{stage}"
    start_run(cfg, accelerator)
    data_dir = Path(cfg.data_dir)
    if data_dir == Path(Config.data_dir):
        toy_dance(data_dir, accelerator, n=cfg.toy_clips, seconds=cfg.toy_seconds, size=cfg.toy_image_size,
                  fps=cfg.fps, seed=cfg.seed)
        if stage in "AB" and cfg.toy_pretrain_steps:  # the toy set's "SD" and "CLIP", made with it
            toy_encoders(cfg, accelerator)
    return out_dir, data_dir


def toy_encoders(cfg, accelerator):
    """The toy's pretrained stand-ins where no path is given: the toy SD (returns its unet/ folder, or
    "" when unet_path is set) and the toy CLIP (read back by frozen_encoders)."""
    if not cfg.clip_path:  # its embeddings are as wide as the UNet's cross-attention
        unet = UNet2DConditionModel.load_config(cfg.unet_path) if cfg.unet_path else DANCE_UNET_CONFIGS[cfg.unet_preset]
        toy_clip(cfg, unet["cross_attention_dim"], accelerator)
    return "" if cfg.unet_path else str(toy_unet(cfg, accelerator, dance_scheduler(cfg), lr_at))


def load_stage_a(cfg, music_dim, device):
    """Stage A's M2P from <out_dir>/stage_A/final/ (or cfg.m2p_path), checked against this run's data."""
    final = Path(cfg.m2p_path) if cfg.m2p_path else Path(cfg.out_dir) / "stage_A" / "final"
    a = read_dance_final(final, "A", f"run `train_dance.py --training_stage A --out_dir {cfg.out_dir}` first "
                                     "or set --m2p_path")
    for key in ("joints", "fps", "m2p_preset"):  # one preset through the stages: final/ rebuilds M2P from it
        if a.get(key) != getattr(cfg, key):
            raise InputError(f"{final / 'config.yaml'}: stage A ran with {key}={a.get(key)!r}, "
                             f"this run has {getattr(cfg, key)!r}")
    return load_m2p(final, a, music_dim, cfg.grad_checkpoint).to(device), a


def build_stage_b(cfg, J, device):
    """A new stage-B model (DanceNet: denoiser, ReferenceNet, pose guider, face tokens), the UNets from
    cfg.unet_path or the preset, and the frozen VAE (None: pixel space), CLIP and face recognizer."""
    if cfg.unet_path:  # SD-1.5 `unet/`: the denoiser and the ReferenceNet both start from it (CHAMP)
        unet, referencenet = load_unet(cfg.unet_path), load_unet(cfg.unet_path)
    else:
        unet = UNet2DConditionModel(**DANCE_UNET_CONFIGS[cfg.unet_preset])
        referencenet = copy.deepcopy(unet)
    vae, clip, recognizer = frozen_encoders(vars(cfg), unet.config.cross_attention_dim, device)
    guider = PoseGuider(J, unet.config.block_out_channels[0], cfg.guider_channels)
    net = DanceNet(unet, referencenet, guider, FaceTokens(unet.config.cross_attention_dim, cfg.face_tokens))
    unused = set(referencenet_unused(referencenet))  # its output is never read: the tail gets no gradient
    for name, p in referencenet.named_parameters():
        p.requires_grad_(name not in unused)
    if cfg.grad_checkpoint:
        unet.enable_gradient_checkpointing()
        referencenet.enable_gradient_checkpointing()
    return net.to(device), vae, clip, recognizer


def no_sync(accelerator, skip, *models):
    """DDP's all-reduce off for `models` when skip (all but the last micro-batch); the forward decides it."""
    stack = contextlib.ExitStack()
    for m in models if skip else ():
        stack.enter_context(accelerator.no_sync(m))
    return stack


def matrix_rows(net, m2p, recognizer, clip, vae, temporal=()):
    """{freeze-matrix row: [parameters]} of a stage-B or C model; `temporal`: the motion modules' (stage C)."""
    ids = {id(p) for p in temporal}
    rows = {"spatial_unet": [p for p in net.unet.parameters() if id(p) not in ids], "temporal_modules": list(temporal),
            "referencenet": list(net.referencenet.parameters()), "pose_guider": list(net.guider.parameters()),
            "face_tokens": list(net.face_tokens.parameters()), "m2p": list(m2p.parameters()),
            "face_recognizer": list(recognizer.parameters()), "clip": list(clip.parameters())}
    if vae is not None:
        rows["vae"] = list(vae.parameters())
    return {k: v for k, v in rows.items() if v or k != "temporal_modules"}  # stage B has no motion modules


def backward_and_step(accelerator, net, optimizer, loss, guard, step, grad_clip, micro=0, G=1):
    """Stages B and C: backward of micro-batch `micro`'s loss / G, clear the reference store (only after
    backward: gradient checkpointing re-reads it there); after the last of G, clip and step unless the
    gradient is not finite (counted by guard) and return the grad norm."""
    accelerator.backward(loss / G)
    net.store.clear()
    if micro < G - 1:
        return None
    params = [p for g in optimizer.param_groups for p in g["params"]]
    grad_norm = accelerator.clip_grad_norm_(params, grad_clip).item()
    if guard.should_step(math.isfinite(grad_norm), step, f"loss {loss.item():.4g}, grad norm {grad_norm:.4g}",
                         accelerator.is_main_process):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


# ==============================================================================================
# Stage A: music + reference pose + reference face -> per-frame joint heatmaps and a face embedding


def stage_a(cfg):
    """Stage A: the M2P encoder trains at lr_a, the face recognizer is frozen."""
    accelerator = make_accelerator(cfg.mixed_precision, cfg.wandb)
    main_proc, device = accelerator.is_main_process, accelerator.device
    check_flags(cfg, {"m2p_preset": M2P_CONFIGS, "joints": JOINT_SETS},
                ("batch_size", "grad_accum", "window", "val_every", "ckpt_every", "log_every", "max_bad_steps"))
    out_dir, data_dir = start_stage(cfg, accelerator, "A")
    train_list, val_list = data_dir / cfg.train_list, data_dir / cfg.val_list
    train_set = DanceClipDataset(train_list, cfg.window, cfg.joints, cfg.fps, seed=cfg.seed)
    val_sets = {"val": DanceClipDataset(val_list, cfg.window, cfg.joints, cfg.fps, start=0, ref_frame=0)}
    seen = data_dir / cfg.val_seen_list
    if cfg.val_seen_list and seen.is_file() and read_list_file(seen):
        val_sets["val_seen"] = DanceClipDataset(seen, cfg.window, cfg.joints, cfg.fps, start=0, ref_frame=0)
    for name, vs in val_sets.items():
        if vs.music_dim != train_set.music_dim:
            raise InputError(f"{name} clips: music features of width {vs.music_dim}, {train_list}: "
                             f"{train_set.music_dim}")
    # the baseline that ignores music and reference: each joint's mean position over the training clips
    P = torch.from_numpy(np.concatenate(train_set.poses))  # (N, J, 3)
    vis = (P[..., 2:] >= VISIBLE).float()
    mean_pose = ((P[..., :2] * vis).sum(0) / vis.sum(0).clamp(min=1)).to(device)  # (J, 2)
    # the real motion FID_k and FID_g compare with: (N, 54) kinetic, (N, 25) geometric features; and how much
    # a training dance moves (pose spread): the held-out dancers are a handful, their spread one draw
    real = (kinetic_windows(train_set.poses, cfg.fps), geometric_windows(train_set.poses, cfg.fps),
            float(np.mean([pose_spread(p) for p in train_set.poses])))
    # on the toy also how much its dancers move at large (toy_dancers_spread): a new dancer's dance can match no more
    toy_spread = (toy_dancers_spread(round(cfg.toy_seconds * cfg.fps), cfg.fps)
                  if data_dir == Path(Config.data_dir) else None)

    # models: the M2P encoder (trained) and the face recognizer (frozen)
    m2p = m2p_encoder(train_set.music_dim, body_parts(train_set.J), cfg.m2p_preset, cfg.window, cfg.grad_checkpoint)
    feats = torch.from_numpy(np.concatenate(train_set.feats))  # (N, D)
    m2p.music_mean.copy_(feats.mean(0))
    m2p.music_std.copy_(feats.std(0).clamp(min=1e-3))  # constant features (e.g. silent one-hots) stay finite
    recognizer = face_recognizer(vars(cfg), device)  # frozen

    # freeze and parameter groups, by hand: M2P trains (weight decay on matrices only), the recognizer is frozen
    params = list(m2p.parameters())
    groups = [{"name": "m2p_decay", "params": [p for p in params if p.dim() >= 2],
               "weight_decay": cfg.weight_decay},
              {"name": "m2p_no_decay", "params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr_a, betas=(0.9, 0.95))
    for g in optimizer.param_groups:
        g["initial_lr"] = cfg.lr_a
    if main_proc:
        check_freeze("A", {"m2p": params, "face_recognizer": list(recognizer.parameters())}, optimizer)
        for g in groups:
            n = sum(p.numel() for p in g["params"])
            print(f"group {g['name']}: {len(g['params'])} tensors, {n:,} params, lr {cfg.lr_a:g}, "
                  f"weight decay {g['weight_decay']}")

    start_step, guard = resume_run(cfg, out_dir, accelerator,
                                   lambda path: load_checkpoint(path, {"m2p": m2p}, {"optimizer": optimizer}))
    model, optimizer = accelerator.prepare(m2p, optimizer)
    raw = accelerator.unwrap_model(model)
    guard.check_weights(raw, start_step)  # the reference for the checks before each save
    G, total = cfg.grad_accum, cfg.max_steps_a
    global_batch = cfg.batch_size * accelerator.num_processes
    sampler = StepSampler(len(train_set), global_batch, accelerator.process_index, accelerator.num_processes,
                          cfg.seed, start_step * G)  # one sampler step per micro-batch
    loader = iter(torch.utils.data.DataLoader(train_set, batch_sampler=sampler, num_workers=cfg.num_workers))
    loader = open_run(cfg, out_dir, accelerator, loader, start_step,
                      later_stages(cfg, "A"))
    beats = {}  # music beats (s) of the validation clips, from librosa's beat tracker, computed once

    t_last = time.perf_counter()
    for step in range(start_step, total + 1):
        if (step > start_step or step == 0) and (step % cfg.val_every == 0 or step == total):
            if main_proc:  # baselines: the mean pose, the reference pose; control: music shuffled
                for tag, val_set in val_sets.items():
                    if tag not in beats:
                        clips = val_set.clips[: cfg.val_samples]
                        beats[tag] = [music_beats(*read_audio(c["dir"] / "audio.wav"), cfg.fps) for c in clips]
                    m, video = evaluate_a(raw, recognizer, val_set, mean_pose, beats[tag], real, cfg, step, out_dir,
                                          device, tag)
                    if toy_spread is not None:
                        m["pose_spread_toy_dancers"] = toy_spread
                    m, frame = ({k if tag == "val" else f"seen_{k}": v for k, v in m.items()},
                                "frame" if tag == "val" else "seen_frame")
                    log_eval(accelerator, m, step, out_dir, {frame: video.with_suffix(".png")})
                    print(f"video {video}")
            accelerator.wait_for_everyone()
        if step > start_step and (step % cfg.ckpt_every == 0 or step == total):
            guard.check_weights(raw, step)
            if main_proc:
                path = save_checkpoint(out_dir, step, {"m2p": raw}, {"optimizer": optimizer}, cfg,
                                       {"skipped": guard.skipped})
                print(f"saved {path}")
            accelerator.wait_for_everyone()
        if step == total:
            break

        lr = lr_at(step, cfg.lr_a, total, cfg)
        for g in optimizer.param_groups:
            g["lr"] = g["initial_lr"] * lr / cfg.lr_a
        parts = {"loss": 0.0, "pose": 0.0, "ce": 0.0, "l1": 0.0, "choice": 0.0, "face": 0.0}
        for micro in range(G):
            batch = {k: v.to(device) for k, v in next(loader).items() if torch.is_tensor(v)}
            # only the last micro-batch all-reduces the gradients
            sync = contextlib.nullcontext() if micro == G - 1 else accelerator.no_sync(model)
            # the dance does not see these samples' faces: without it one song fits many dances, which the
            # hypotheses learn apart. Drawn for the global batch (every rank with rank 0's key) and strided
            # over ranks as StepSampler strides the samples: the same on any number of processes
            drop = torch.rand(global_batch, generator=seeded(cfg.seed, 0, step, micro)) < cfg.m2p_face_drop
            drop = drop[accelerator.process_index::accelerator.num_processes].to(device)
            with sync:
                with accelerator.autocast():
                    # (B, K, W, J, 2, h), (B, P, K), (B, 512)
                    logits, choice, emb = model(batch["music"], batch["ref_pose"], batch["face"], drop)
                with torch.no_grad():
                    target = recognizer(batch["face"] * 2 - 1)  # (B, 512), 112x112 crops in [-1, 1]
                pose, hm, _ = m2p_loss(logits, choice, batch["poses"], raw.part, cfg.heatmap_sigma)
                face = face_loss(emb.float(), target)
                loss = cfg.pose_loss_weight * pose + cfg.face_loss_weight * face
                accelerator.backward(loss / G)
            for k, v in {"loss": loss, **hm, "face": face}.items():
                parts[k] += v.item() / G
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip).item()
        # a non-finite loss makes the gradient non-finite
        if guard.should_step(math.isfinite(grad_norm), step, f"loss {parts['loss']:.4g}, grad norm {grad_norm:.4g}",
                             main_proc):
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        if main_proc and step % cfg.log_every == 0:
            dt = (time.perf_counter() - t_last) / (cfg.log_every if step > start_step else 1)
            t_last = time.perf_counter()
            log_step(accelerator, step, parts, lr, grad_norm, guard.skipped, dt, global_batch * G)

    if main_proc:  # the weights for stage B: <out_dir>/stage_A/final/
        save_dance_final(out_dir / "final", cfg, raw)
    accelerator.wait_for_everyone()  # leave the process group together (gloo can abort at exit otherwise)
    accelerator.end_training()
    return raw


# ==============================================================================================
# Stage B: the reference dancer in a pose, one frame at a time


def cond_scale_at(step, total):
    """The pose condition's scale: 0.5 at step 0, 1.5 from 30% of the steps on."""
    return min(1.5, 0.5 + step / (0.3 * total))


def m2p_pose_prob(step, total, start=0.8):
    """Scheduled sampling: the probability that a sample's pose condition comes from M2P instead of the
    ground truth, 0 until `start` x total, then ramping linearly to 1 at the last step. Blending
    the two heatmaps instead draws ghost limbs, so whole samples switch with this probability."""
    return min(1.0, max(0.0, (step - start * total) / ((1 - start) * total)))


def stage_b(cfg):
    """Stage B: pose guider, denoising UNet, ReferenceNet and face tokens train at lr_b on single
    frames; VAE, CLIP and face recognizer are frozen; M2P (from stage A) joins at m2p_unfreeze_step."""
    accelerator = make_accelerator(cfg.mixed_precision, cfg.wandb)
    main_proc, device, rank = accelerator.is_main_process, accelerator.device, accelerator.process_index
    check_flags(cfg, {"joints": JOINT_SETS, "unet_preset": DANCE_UNET_CONFIGS,
                      "prediction_type": ("epsilon", "v_prediction", "sample")},
                ("batch_size", "grad_accum", "window", "val_every", "ckpt_every", "log_every", "max_bad_steps",
                 "max_steps_b", "image_size", "val_frames", "val_steps"))
    out_dir, data_dir = start_stage(cfg, accelerator, "B")
    # one random target frame per sample, inside a music window (M2P's input for that frame)
    train_set = DanceClipDataset(data_dir / cfg.train_list, cfg.window, cfg.joints, cfg.fps, seed=cfg.seed,
                                 image_size=cfg.image_size, frames=1)
    val_set = DanceClipDataset(data_dir / cfg.val_list, cfg.window, cfg.joints, cfg.fps, start=0, ref_frame=0,
                               image_size=cfg.image_size)
    m2p, a_cfg = load_stage_a(cfg, train_set.music_dim, device)
    unet_path = cfg.unet_path or (toy_encoders(cfg, accelerator) if cfg.toy_pretrain_steps else "")
    net, vae, clip, recognizer = build_stage_b(dataclasses.replace(cfg, unet_path=unet_path), train_set.J, device)
    eval_rec = eval_face_recognizer(vars(cfg), device)  # scores identity; the loss never sees it
    read_poses = pose_reader(vars(cfg), data_dir == Path(Config.data_dir), device, accelerator)  # or None
    scheduler = dance_scheduler(cfg)
    check_sd_scheduler(cfg.unet_path, scheduler.config)  # SD's own betas: fine-tuning keeps its noise levels
    factor = 8 if vae is not None else 1  # image px per UNet input px
    if net.guider.down != factor:  # heatmaps come at the image size, the guider brings them to the UNet's
        raise InputError(f"--guider_channels={list(cfg.guider_channels)}: {len(cfg.guider_channels) - 1} stride-2 "
                         f"steps, the UNet's inputs are 1/{factor} of the image (pixel space: 1 entry, SD latents: 4)")
    if main_proc:
        print(f"M2P from stage A ({a_cfg['m2p_preset']}, window {a_cfg['window']})")

    # parameter groups, by hand: the stage-B modules at lr_b; M2P in its own group at lr 0 until
    # m2p_unfreeze_step (its outputs detached), then m2p_lr_b. M2P's face head stays frozen: the
    # identity comes from the recognizer of the reference face.
    m2p.face_head.requires_grad_(False)
    rows = matrix_rows(net, m2p, recognizer, clip, vae)
    trainable = [p for k in ("spatial_unet", "pose_guider", "face_tokens") for p in rows[k] if p.requires_grad]
    groups = [{"name": "stage_b", "params": trainable, "initial_lr": cfg.lr_b},
              {"name": "referencenet", "params": [p for p in rows["referencenet"] if p.requires_grad],
               "initial_lr": cfg.referencenet_lr},
              {"name": "m2p", "params": [p for p in m2p.parameters() if p.requires_grad],
               "initial_lr": cfg.m2p_lr_b}]
    for g in groups:
        g["lr"] = 0.0  # set every step from lr_at
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999), weight_decay=cfg.weight_decay)
    if main_proc:
        dead, head = len(referencenet_unused(net.referencenet)), len(list(m2p.face_head.parameters()))
        check_freeze("B", rows, optimizer, {
            "referencenet": (dead, f"minus {dead} tensors that never get a gradient"),
            "m2p": (head, f"lr 0 until step {cfg.m2p_unfreeze_step}, then {cfg.m2p_lr_b:g}; face head frozen")})
        for g in groups:
            print(f"group {g['name']}: {len(g['params'])} tensors, {sum(p.numel() for p in g['params']):,} params, "
                  f"lr {g['initial_lr']:g}" + (f" from step {cfg.m2p_unfreeze_step}" if g["name"] == "m2p" else ""))

    start_step, guard = resume_run(cfg, out_dir, accelerator, lambda path: load_checkpoint(
        path, {"dance": net, "m2p": m2p}, {"optimizer": optimizer}))
    model, m2p_model, optimizer = accelerator.prepare(net, m2p, optimizer)
    raw = accelerator.unwrap_model(model)
    guard.check_weights(raw, start_step)  # the reference for the checks before each save
    G, global_batch, total = cfg.grad_accum, cfg.batch_size * accelerator.num_processes, cfg.max_steps_b
    sampler = StepSampler(len(train_set), global_batch, rank, accelerator.num_processes, cfg.seed,
                          start_step * G)  # one sampler step per micro-batch
    loader = iter(torch.utils.data.DataLoader(train_set, batch_sampler=sampler, num_workers=cfg.num_workers))
    loader = open_run(cfg, out_dir, accelerator, loader, start_step,
                      later_stages(cfg, "B"))

    t_last = time.perf_counter()
    for step in range(start_step, total + 1):
        if (step > start_step or step == 0) and (step % cfg.val_every == 0 or step == total):
            if main_proc:
                m, grid = evaluate_b(raw, vae, clip, recognizer, eval_rec, read_poses, scheduler, val_set, cfg, step,
                                     out_dir, device)
                log_eval(accelerator, m, step, out_dir, {"grid": grid})
                print(f"grid {grid}")
            accelerator.wait_for_everyone()
        if step > start_step and (step % cfg.ckpt_every == 0 or step == total):
            guard.check_weights(raw, step)
            if main_proc:
                path = save_checkpoint(out_dir, step, {"dance": raw, "m2p": accelerator.unwrap_model(m2p_model)},
                                       {"optimizer": optimizer}, cfg, {"skipped": guard.skipped})
                print(f"saved {path}")
            accelerator.wait_for_everyone()
        if step == total:
            break

        m2p_on = step >= cfg.m2p_unfreeze_step
        for g in optimizer.param_groups:  # one warmup + cosine shape; M2P's group at 0 until it unfreezes
            g["lr"] = lr_at(step, g["initial_lr"], total, cfg) if g["name"] != "m2p" or m2p_on else 0.0
        lr = optimizer.param_groups[0]["lr"]
        scale, p_m2p = cond_scale_at(step, total), m2p_pose_prob(step, total, cfg.scheduled_sampling_start)
        logged = {}
        for micro in range(G):  # G micro-batches, each its own sampler step and generator (G = 1: the step's)
            batch = {k: v.to(device) for k, v in next(loader).items() if torch.is_tensor(v)}
            B, gen = len(batch["frames"]), seeded(cfg.seed, rank, step, *([micro] if G > 1 else []))
            target_pose = batch["poses"][torch.arange(B, device=device), batch["offsets"][:, 0]]  # (B, J, 3)
            # randomness of this micro-batch, all from its own generator: noise, timesteps, dropout, pose source
            t = torch.randint(0, 1000, (B,), generator=gen).to(device)
            keep = (torch.rand(B, generator=gen) >= cfg.cond_drop_prob).to(device)
            use_m2p = (torch.rand(B, generator=gen) < p_m2p).to(device)
            with no_sync(accelerator, micro < G - 1, model, m2p_model), accelerator.autocast():
                parts = {}
                pose = target_pose
                if m2p_on or use_m2p.any():  # M2P's pose for the target frame, from the music window
                    with contextlib.nullcontext() if m2p_on else torch.no_grad():
                        # (B, K, W, J, 2, h), (B, P, K): the hypotheses nearest the true dance pose the frame
                        logits, choice, _ = m2p_model(batch["music"], batch["ref_pose"], batch["face"])
                        m2p_l, _, best = m2p_loss(logits, choice, batch["poses"], m2p.part, cfg.heatmap_sigma)
                        xy = assemble_dance(axis_soft_argmax(logits.float()), best, m2p.part, m2p.root)
                        xy = xy[torch.arange(B, device=device), batch["offsets"][:, 0]]  # (B, J, 2)
                    m2p_pose = torch.cat([xy, batch["ref_pose"][..., 2:]], -1)  # visibility: the reference's
                    pose = torch.where(use_m2p[:, None, None], m2p_pose, target_pose)
                    if m2p_on:
                        parts["pose"] = m2p_l
                with torch.no_grad():
                    x0 = to_model_space(vae, batch["frames"][:, 0], gen)  # (B, C, h, w)
                    ref_x = to_model_space(vae, batch["ref_image"], gen)
                    face_emb = recognizer(batch["face"] * 2 - 1)  # (B, 512): the reference's identity
                    clip_emb = clip_image_embeds(clip, batch["ref_image"])  # (B, D)
                noise = torch.randn(x0.shape, generator=gen).to(device)
                noise = noise + cfg.noise_offset * torch.randn(B, x0.shape[1], 1, 1, generator=gen).to(device)
                x_t = scheduler.add_noise(x0, noise, t)
                heat = pose_heatmaps(pose, cfg.image_size, cfg.pose_sigma)  # (B, J, H, W)
                out = model(x_t, t, heat, scale, ref_x, clip_emb, face_emb, keep)
                # the face region weighs face_loss_scale, min-SNR per sample
                box = batch["boxes"][:, 0]  # (B, 4), NaN: no face
                face = box_mask(box.nan_to_num(0.0), x0.shape[-1])  # (B, 1, h, w)
                weight = min_snr_weight(scheduler.alphas_cumprod.to(device)[t], cfg.min_snr_gamma, cfg.prediction_type)
                parts["diff"] = weighted_mse(out, diffusion_target(scheduler, x0, noise, t), weight,
                                             1 + (cfg.face_loss_scale - 1) * face)
                # identity: the recognizer on the face crop of the predicted x0, at low noise only (t <
                # id_loss_max_t: the prediction is sharp enough there to have a face)
                low = (t < cfg.id_loss_max_t) & ~box.isnan().any(1) & keep
                if low.any():
                    pred = to_images(vae, predicted_x0(scheduler, x_t[low], out[low].float(), t[low]))
                    crop = face_crops(pred, box[low], batch["face_points"][low, 0])  # as the reference's
                    parts["id"] = face_loss(recognizer(crop * 2 - 1), face_emb[low])
                else:
                    parts["id"] = out.sum() * 0.0  # every trainable tensor still in the graph (DDP)
                loss = cfg.diffusion_loss_weight * parts["diff"] + cfg.id_loss_weight * parts["id"]
                if "pose" in parts:
                    loss = loss + cfg.pose_loss_weight * parts["pose"]
            grad_norm = backward_and_step(accelerator, raw, optimizer, loss, guard, step, cfg.grad_clip, micro, G)
            logged = {k: logged.get(k, 0.0) + v.item() / G for k, v in {"loss": loss, **parts}.items()}

        if main_proc and step % cfg.log_every == 0:
            dt = (time.perf_counter() - t_last) / (cfg.log_every if step > start_step else 1)
            t_last = time.perf_counter()
            log_step(accelerator, step, logged, lr, grad_norm, guard.skipped, dt, global_batch * G, cond_scale=scale,
                     m2p_poses=p_m2p)

    if main_proc:  # the weights for stage C: <out_dir>/stage_B/final/
        save_dance_final(out_dir / "final", cfg, accelerator.unwrap_model(m2p_model), raw, scheduler)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return raw


# ==============================================================================================
# Stage C: clips; only the temporal (motion) modules train


def seq_len_at(step, cfg):
    """Stage C's sequence-length curriculum, a pure function of the step: seq_len_start frames at step 0,
    linear to seq_len_end at seq_len_ramp_steps, then constant."""
    frac = min(1.0, step / max(1, cfg.seq_len_ramp_steps))
    return int(round(cfg.seq_len_start + frac * (cfg.seq_len_end - cfg.seq_len_start)))


def load_stage_b(cfg, J, device):
    """Stage B's final/ (or cfg.stage_b_path) as a DanceNet + the frozen VAE, CLIP and recognizer; the
    model-shaping settings must be this run's (one config for B and C)."""
    final = Path(cfg.stage_b_path) if cfg.stage_b_path else Path(cfg.out_dir) / "stage_B" / "final"
    b = read_dance_final(final, "B", f"run `train_dance.py --training_stage B --out_dir {cfg.out_dir}` first "
                                     "or set --stage_b_path")
    for key in ("joints", "fps", "image_size", "guider_channels", "face_tokens", "pose_sigma", "vae_path",
                "clip_path", "toy_pretrain_steps", "face_recognizer_path", "prediction_type", "beta_schedule",
                "beta_start", "beta_end", "zero_snr"):
        mine = list(getattr(cfg, key)) if isinstance(getattr(cfg, key), tuple) else getattr(cfg, key)
        if b.get(key) != mine:
            raise InputError(f"{final / 'config.yaml'}: stage B ran with {key}={b.get(key)!r}, this run has {mine!r}")
    net = load_dance_net(final, b).to(device)
    vae, clip, recognizer = frozen_encoders(vars(cfg), net.unet.config.cross_attention_dim, device)
    return net, vae, clip, recognizer, final


def stage_c(cfg):
    """Stage C: AnimateDiff motion modules join the stage-B UNet and only they train, at lr_c, on
    clips whose length follows seq_len_at(step); everything else is frozen, M2P too unless m2p_lr_c > 0."""
    accelerator = make_accelerator(cfg.mixed_precision, cfg.wandb)
    main_proc, device, rank = accelerator.is_main_process, accelerator.device, accelerator.process_index
    check_flags(cfg, {"joints": JOINT_SETS}, ("batch_size_c", "grad_accum", "max_steps_c", "seq_len_start",
                                              "seq_len_end", "val_every", "ckpt_every", "log_every", "max_bad_steps",
                                              "val_steps", "val_samples_c"))
    if cfg.seq_len_start > cfg.seq_len_end:
        raise ConfigError(f"--seq_len_start={cfg.seq_len_start} is above --seq_len_end={cfg.seq_len_end}")
    out_dir, data_dir = start_stage(cfg, accelerator, "C")
    # every sample is a window of seq_len_end frames; a step uses its first seq_len_at(step): the batch is
    # (batch_size_c, T) with one T per step, so every process of a step agrees on the shape
    L = cfg.seq_len_end
    train_set = DanceClipDataset(data_dir / cfg.train_list, L, cfg.joints, cfg.fps, seed=cfg.seed,
                                 image_size=cfg.image_size, frames=L)
    val_set = DanceClipDataset(data_dir / cfg.val_list, L, cfg.joints, cfg.fps, start=0, ref_frame=0,
                               image_size=cfg.image_size, frames=L)
    val_set.start = spread_starts(val_set.clips, L)
    net, vae, clip, recognizer, b_final = load_stage_b(cfg, train_set.J, device)
    eval_rec = eval_face_recognizer(vars(cfg), device)  # scores identity; the loss never sees it
    read_poses = pose_reader(vars(cfg), data_dir == Path(Config.data_dir), device, accelerator)  # or None
    m2p = load_stage_a(dataclasses.replace(cfg, m2p_path=str(b_final)), train_set.music_dim, device)[0]
    m2p.requires_grad_(cfg.m2p_lr_c > 0)
    m2p.face_head.requires_grad_(False)  # as in stage B: the identity comes from the recognizer
    adapter = load_motion_adapter(cfg.motion_adapter_path, L) if cfg.motion_adapter_path else None
    with torch.random.fork_rng():  # new motion modules: the same weights whatever was built before
        torch.manual_seed(cfg.seed)
        net.unet = motion_unet(net.unet, adapter, max_frames=L, heads=cfg.motion_heads).to(device)
    net.install()  # from_unet2d dropped the reference processors
    if cfg.grad_checkpoint:
        net.unet.enable_gradient_checkpointing()
    scheduler = DDIMScheduler.from_pretrained(b_final / "scheduler")  # stage B's, unchanged
    net.requires_grad_(False)
    temporal = [p for n, p in net.unet.named_parameters() if "motion_modules" in n]
    for p in temporal:
        p.requires_grad_(True)
    groups = [{"name": "temporal", "params": temporal, "initial_lr": cfg.lr_c}]
    if cfg.m2p_lr_c > 0:
        groups.append({"name": "m2p", "params": [p for p in m2p.parameters() if p.requires_grad],
                       "initial_lr": cfg.m2p_lr_c})
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr_c, betas=(0.9, 0.999), weight_decay=cfg.weight_decay)
    if main_proc:
        rows = matrix_rows(net, m2p, recognizer, clip, vae, temporal)
        head = len(list(m2p.face_head.parameters()))
        check_freeze("C", rows, optimizer, {"m2p": (head, f"lr {cfg.m2p_lr_c:g}; face head frozen")},
                     ["m2p"] if cfg.m2p_lr_c > 0 else [])
        print(f"stage B from {b_final}; motion modules: {cfg.motion_adapter_path or 'new, proj_out zeroed'}; "
              f"group temporal: {len(temporal)} tensors, {sum(p.numel() for p in temporal):,} params, "
              f"lr {cfg.lr_c:g}; clips of {cfg.seq_len_start} -> {L} frames by step {cfg.seq_len_ramp_steps}, "
              f"{cfg.m2p_poses_c:.0%} of them posed by M2P")

    start_step, guard = resume_run(cfg, out_dir, accelerator, lambda path: load_checkpoint(
        path, {"dance": net, "m2p": m2p}, {"optimizer": optimizer}))
    model, optimizer = accelerator.prepare(net, optimizer)
    m2p_model = accelerator.prepare(m2p) if cfg.m2p_lr_c > 0 else m2p  # DDP only when it trains
    raw = accelerator.unwrap_model(model)
    guard.check_weights(raw, start_step)  # the reference for the checks before each save
    B, G, total = cfg.batch_size_c, cfg.grad_accum, cfg.max_steps_c
    sampler = StepSampler(len(train_set), B * accelerator.num_processes, rank, accelerator.num_processes,
                          cfg.seed, start_step * G)  # one sampler step per micro-batch
    loader = iter(torch.utils.data.DataLoader(train_set, batch_sampler=sampler, num_workers=cfg.num_workers))
    loader = open_run(cfg, out_dir, accelerator, loader, start_step)

    t_last = time.perf_counter()
    for step in range(start_step, total + 1):
        if (step > start_step or step == 0) and (step % cfg.val_every == 0 or step == total):
            if main_proc:
                m, grid = evaluate_c(raw, vae, clip, recognizer, eval_rec, read_poses, scheduler, val_set, cfg, step,
                                     out_dir, device)
                log_eval(accelerator, m, step, out_dir, {"grid": grid})
                print(f"grid {grid}" + (" (step 0: stage B applied frame by frame)" if step == 0 else ""))
            accelerator.wait_for_everyone()
        if step > start_step and (step % cfg.ckpt_every == 0 or step == total):
            guard.check_weights(raw, step)
            if main_proc:
                path = save_checkpoint(out_dir, step, {"dance": raw, "m2p": m2p}, {"optimizer": optimizer}, cfg,
                                       {"skipped": guard.skipped})
                print(f"saved {path}")
            accelerator.wait_for_everyone()
        if step == total:
            break

        for g in optimizer.param_groups:
            g["lr"] = lr_at(step, g["initial_lr"], total, cfg)
        lr = optimizer.param_groups[0]["lr"]
        T = seq_len_at(step, cfg)
        logged = {}
        for micro in range(G):  # G micro-batches, each its own sampler step and generator (G = 1: the step's)
            batch = {k: v.to(device) for k, v in next(loader).items() if torch.is_tensor(v)}
            gen = seeded(cfg.seed, rank, step, *([micro] if G > 1 else []))
            t = torch.randint(0, 1000, (B,), generator=gen).to(device)  # one timestep per clip
            keep = (torch.rand(B, generator=gen) >= cfg.cond_drop_prob).to(device)
            use_m2p = (torch.rand(B, generator=gen) < cfg.m2p_poses_c).to(device)
            with no_sync(accelerator, micro < G - 1, model, m2p_model), accelerator.autocast():
                # the pose condition: the ground truth, or for a share of the clips M2P's poses from the clip's
                # music, which is what drives the motion modules at sampling (whole clips switch, as in B)
                pose, m2p_l = batch["poses"][:, :T], None  # (B, T, J, 3)
                if cfg.m2p_lr_c > 0 or use_m2p.any():
                    with contextlib.nullcontext() if cfg.m2p_lr_c > 0 else torch.no_grad():
                        # (B, K, L, J, 2, h), (B, P, K): the hypotheses nearest the clip's dance pose it
                        logits, choice, _ = m2p_model(batch["music"], batch["ref_pose"], batch["face"])
                        m2p_l, _, best = m2p_loss(logits, choice, batch["poses"], m2p.part, cfg.heatmap_sigma)
                    xy = assemble_dance(axis_soft_argmax(logits.float()), best, m2p.part, m2p.root)  # (B, L, J, 2)
                    # smoothed as sampling smooths it
                    xy = torch.stack([smooth_poses(p, cfg.m2p_smooth) for p in xy])[:, :T]  # (B, T, J, 2)
                    vis = batch["ref_pose"][:, None, :, 2:].expand(-1, T, -1, -1)  # (B, T, J, 1): the reference's
                    pose = torch.where(use_m2p[:, None, None, None], torch.cat([xy, vis], -1), pose)
                with torch.no_grad():
                    frames = batch["frames"][:, :T]  # (B, T, 3, S, S)
                    x0 = rearrange(to_model_space(vae, frames.flatten(0, 1), gen), "(b f) c h w -> b c f h w", b=B)
                    ref_x = to_model_space(vae, batch["ref_image"], gen)
                    face_emb = recognizer(batch["face"] * 2 - 1)
                    clip_emb = clip_image_embeds(clip, batch["ref_image"])
                noise = torch.randn(x0.shape, generator=gen).to(device)
                noise = noise + cfg.noise_offset * torch.randn(B, x0.shape[1], 1, 1, 1, generator=gen).to(device)
                x_t = scheduler.add_noise(x0, noise, t)
                heat = pose_heatmaps(pose, cfg.image_size, cfg.pose_sigma)  # (B, T, J, S, S)
                out = model(x_t, t, heat, 1.5, ref_x, clip_emb, face_emb, keep)  # (B, C, T, h, w)
                boxes = batch["boxes"][:, :T].flatten(0, 1)  # (B T, 4)
                face = rearrange(box_mask(boxes.nan_to_num(0.0), x0.shape[-1]), "(b f) c h w -> b c f h w", b=B)
                weight = min_snr_weight(scheduler.alphas_cumprod.to(device)[t], cfg.min_snr_gamma, cfg.prediction_type)
                parts = {"diff": weighted_mse(out, diffusion_target(scheduler, x0, noise, t), weight,
                                              1 + (cfg.face_loss_scale - 1) * face)}
                # temporal: the predicted clip's frame-to-frame differences match the ground truth's (in model
                # space: pixels for the toy, latents with a VAE)
                pred = predicted_x0(scheduler, x_t, out.float(), t)  # (B, C, T, h, w)
                parts["temp"] = F.mse_loss(pred.diff(dim=2), x0.float().diff(dim=2))
                # identity on the middle frame of low-noise clips (as stage B)
                low = (t < cfg.id_loss_max_t) & keep & ~batch["boxes"][:, T // 2].isnan().any(1)
                if low.any():
                    crop = face_crops(to_images(vae, pred[low][:, :, T // 2]), batch["boxes"][low, T // 2],
                                      batch["face_points"][low, T // 2])
                    parts["id"] = face_loss(recognizer(crop * 2 - 1), face_emb[low])
                else:
                    parts["id"] = out.sum() * 0.0
                loss = (cfg.diffusion_loss_weight * parts["diff"] + cfg.temporal_loss_weight * parts["temp"]
                        + cfg.id_loss_weight * parts["id"])
                if cfg.m2p_lr_c > 0:  # M2P's pose loss on the clip's music window
                    parts["pose"] = m2p_l
                    loss = loss + cfg.pose_loss_weight * parts["pose"]
            grad_norm = backward_and_step(accelerator, raw, optimizer, loss, guard, step, cfg.grad_clip, micro, G)
            logged = {k: logged.get(k, 0.0) + v.item() / G for k, v in {"loss": loss, **parts}.items()}
        if main_proc and step % cfg.log_every == 0:
            dt = (time.perf_counter() - t_last) / (cfg.log_every if step > start_step else 1)
            t_last = time.perf_counter()
            log_step(accelerator, step, logged, lr, grad_norm, guard.skipped, dt, B * accelerator.num_processes * G,
                     frames=T)

    if main_proc:  # stage_C/final/ and the top-level final/: everything sample.py needs
        for final in (out_dir / "final", Path(cfg.out_dir) / "final"):
            save_dance_final(final, cfg, m2p, raw, scheduler)  # M2P: B's, unless m2p_lr_c > 0
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return raw


# ==============================================================================================
# all: A -> B -> C, each stage from the previous one's final/

def main(cfg):
    stages = {"A": stage_a, "B": stage_b, "C": stage_c}

    def at(s):  # a stage's own run: its section's values over the top-level ones
        return dataclasses.replace(cfg, **{**cfg.sections.get(f"stage_{s.lower()}", {}), "training_stage": s})

    if cfg.training_stage == "all":
        for stage in "ABC":
            done = (Path(cfg.out_dir) / f"stage_{stage}" / "final" / "COMPLETE").is_file()
            if done and cfg.resume:  # --resume=auto: finished stages are skipped, the next one continues
                print(f"stage {stage}: {Path(cfg.out_dir) / f'stage_{stage}' / 'final'} is complete, skipped")
                continue
            stages[stage](at(stage))
        return None
    if cfg.training_stage not in stages:
        raise InputError(f"--training_stage={cfg.training_stage!r}: expected one of the stages A, B, C or all")
    return stages[cfg.training_stage](at(cfg.training_stage))


if __name__ == "__main__":
    cli(main, Config, ALIASES)
