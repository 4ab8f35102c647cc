"""Inference: one image -> the rig's 6 views (the phase-1 model) -> 3D Gaussians (the phase-3 GS-LRM).

    python sample.py --input_image mouse.png --output_dir out/sample          # the toy runs' checkpoints
    python sample.py --input_image x.png --mvdiff_checkpoint ckpt/mvdiff --gslrm_checkpoint ckpt/gslrm \\
        --output_dir out/x --reference_view 2                                  # the image shows rig view 2
    python sample.py --eval_list data/toy_mice_eval/data_val.txt --output_dir out/chain_eval

Writes input.png, multiview.png (the generated views), gaussians.ply (3DGS format, Gaussians fainter
than `opacity_threshold` dropped as FaceLift's inference does), renders.png (the Gaussians at the rig's
cameras) and turntable.mp4 (GIF without ffmpeg). The two checkpoints must name the same rig: the
views are generated for the diffusion model's rig and read by GS-LRM as seen from its own.
--eval_list runs the chain from view `reference_view` of each held-out sample and scores the renders
at all its other cameras against the ground truth (the README's chain experiment).
"""
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from data import (InputError, RigMismatch, camera_geometry, cli, frames_to_tensors, load_gslrm_checkpoint,
                  load_mv_checkpoint, load_rgba, orbit_c2w, read_cameras, read_list_file, rig_mismatch,
                  save_image_grid, save_ply, write_video)
from losses import masked_psnr, psnr, ssim
from models import Conditioner, mv_schedulers, sample_views


@dataclass
class Config:
    input_image: str = ""  # RGBA (composited on white) or RGB (used as is) square image of one rig view
    mvdiff_checkpoint: str = "out/mvdiff_toy"  # train_mvdiff checkpoint-<step>/ or run folder (latest)
    gslrm_checkpoint: str = "out/gslrm_toy"  # train_gslrm checkpoint-<step>/, run folder, or FaceLift .pt
    output_dir: str = "out/sample"
    reference_view: int = 0  # the rig view the input image shows
    steps: int = 20  # DDIM steps (FaceLift: 50)
    guidance: float = 1.0  # classifier-free guidance (FaceLift: 3; the toy scores best at 1)
    eta: float = 1.0
    seed: int = 0
    opacity_threshold: float = 0.04  # FaceLift's inference value
    turntable_frames: int = 48
    fps: int = 24
    eval_list: str = ""  # held-out samples: run the chain on each and score it (no input_image then)
    eval_views: str = "generated"  # generated | ground_truth (the true rig views into GS-LRM: upper bound)
    eval_samples: int = 0  # 0 = all listed
    allow_rig_mismatch: bool = False  # run checkpoints trained for different rigs (the seed's failure)


class Chain:
    """The phase-1 model and GS-LRM, checked to belong together."""

    def __init__(self, cfg, device):
        self.ck = load_mv_checkpoint(cfg.mvdiff_checkpoint, device)
        self.gs = load_gslrm_checkpoint(cfg.gslrm_checkpoint, device)
        mcfg, rig = self.ck["config"], self.ck["rig"]
        self.mismatches = [rig["allowed_mismatch"]] if rig.get("allowed_mismatch") else []
        if self.gs["rig"] is None:
            print(f"WARNING: {self.gs['path']} records no rig: its cameras are not checked")
        elif msg := rig_mismatch(self.gs["rig"], rig["frames"]):
            msg = (f"{self.ck['path']} generates views for rig {rig['name']!r}, {self.gs['path']} was "
                   f"trained on {self.gs['rig']['name']!r}: {msg}")
            if not cfg.allow_rig_mismatch:
                raise RigMismatch(f"{msg} (--allow_rig_mismatch to run them anyway)")
            print(f"WARNING (allow_rig_mismatch): {msg}")
            self.mismatches.append(msg)
        # GS-LRM reads the views as seen from the cameras it was trained on
        self.frames = (self.gs["rig"] or rig)["frames"]
        self.V, self.gen_size, self.S = len(rig["frames"]), mcfg["image_size"], self.gs["image_size"]
        self.sampler = mv_schedulers(mcfg["prediction_type"], mcfg["beta_schedule"], mcfg["beta_start"],
                                     mcfg["beta_end"], mcfg["clip_sample"], mcfg.get("pipeline_dir", ""))[1]
        self.cond = Conditioner(mcfg.get("pipeline_dir", ""), device)
        self.cfg, self.device = cfg, device

    @torch.no_grad()
    def generate(self, ref, ref_view):
        """Reference RGB (3, H, W) in [0, 1] on white -> the rig's views (V, 3, H, W) in [0, 1]."""
        cfg = self.cfg
        ref = F.interpolate(ref[None], size=(self.gen_size,) * 2, mode="bilinear", antialias=True,
                            align_corners=False).to(self.device)  # (1, 3, H, W)
        ref_cond, labels = self.cond.reference(ref * 2 - 1)
        gen = torch.Generator(self.device).manual_seed(cfg.seed)
        ref_idx = torch.tensor([ref_view], device=self.device)
        x = sample_views(self.ck["model"], self.sampler, ref_cond, ref_idx, self.ck["prompt_embeds"],
                         ref_cond.shape[1:], labels, cfg.steps, cfg.guidance, cfg.eta, gen)  # (1, V, C, h, w)
        return self.cond.decode(x)[0].float()

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


def read_input(path):
    """The input image as RGB on white (3, H, W); an RGB image is used as is, with a warning."""
    with Image.open(path) as im:
        mode = im.mode
    if mode != "RGBA":
        print(f"WARNING: {path} is {mode}, not RGBA: used as is (the models expect the object on white; "
              "cut it out first for best results)")
    return load_rgba(path)[:3]


def run_one(chain, cfg):
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    ref = read_input(cfg.input_image)
    views = chain.generate(ref, cfg.reference_view).cpu()  # (V, 3, H, W)
    gaussians = chain.reconstruct(views)
    keep = gaussians["opacities"] > cfg.opacity_threshold
    ply = save_ply({k: v[keep] for k, v in gaussians.items()}, out / "gaussians.ply")
    renders = chain.render(gaussians, chain.frames)  # (V, 4, S, S)
    Image.fromarray((ref.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)).save(out / "input.png")
    save_image_grid([views], out / "multiview.png", [("generated views", len(views))])
    save_image_grid([renders], out / "renders.png", [("Gaussians at the rig's cameras", len(renders))])
    spin = chain.render(gaussians, turntable_frames(chain.frames, cfg.turntable_frames))[:, :3]
    size = max(128, chain.S)  # small toy renders are upscaled so that players show them
    spin = F.interpolate(spin, size=(size, size), mode="nearest")  # (T, 3, size, size)
    frames = (spin.permute(0, 2, 3, 1).numpy() * 255 + 0.5).astype(np.uint8)  # (T, size, size, 3)
    video = write_video(out / "turntable.mp4", frames, cfg.fps)
    (out / "chain.json").write_text(json.dumps({
        "input_image": cfg.input_image, "reference_view": cfg.reference_view,
        "mvdiff_checkpoint": str(chain.ck["path"]), "gslrm_checkpoint": str(chain.gs["path"]),
        "rig": chain.ck["rig"]["name"], "gaussians_kept": int(keep.sum()), "gaussians": len(keep),
        "allowed_rig_mismatch": chain.mismatches}, indent=1))
    print(f"wrote {out}/input.png, multiview.png, {ply.name} ({int(keep.sum())} of {len(keep)} Gaussians), "
          f"renders.png, {video.name}")


def run_eval(chain, cfg):
    """The chain from view `reference_view` of every listed sample, scored at all its other cameras."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    samples = read_list_file(cfg.eval_list)[: cfg.eval_samples or None]
    k, S, V = cfg.reference_view, chain.S, chain.V
    scores, rows, gts = {"psnr": [], "masked_psnr": [], "ssim": [], "views_psnr": []}, [], []
    for n, d in enumerate(samples):
        frames = read_cameras(d / "opencv_cameras.json")["frames"]
        images = torch.stack([load_rgba(d / fr["file_path"], S) for fr in frames])  # (F, 4, S, S)
        if cfg.eval_views == "ground_truth":  # the true rig views, at their true cameras
            views, gaussians = images[:V, :3], chain.reconstruct(images[:V, :3], frames[:V])
        else:
            views = chain.generate(load_rgba(d / frames[k]["file_path"])[:3], k).cpu()  # (V, 3, h, w)
            gaussians = chain.reconstruct(views)
            gt_views = torch.stack([load_rgba(d / fr["file_path"], views.shape[-1])[:3] for fr in frames[:V]])
            others = [v for v in range(V) if v != k]
            scores["views_psnr"].append(psnr(views[others], gt_views[others]))
        held = [i for i in range(len(frames)) if i != k]  # every camera but the input's
        pred = chain.render(gaussians, [frames[i] for i in held])[:, :3]  # (F - 1, 3, S, S)
        gt, alpha = images[held, :3], images[held, 3:]
        scores["psnr"].append(psnr(pred, gt))
        scores["masked_psnr"].append(masked_psnr(pred, gt, alpha))
        scores["ssim"].append(ssim(pred, gt))
        gts.append(gt)
        if n < 4:
            rows.append(torch.cat([images[k:k + 1, :3], F.interpolate(views, size=(S, S)), gt, pred]))
    mean_image = torch.cat(gts).mean(0, keepdim=True)  # (1, 3, S, S): the baseline that sees no input
    metrics = {key: torch.cat(v).mean().item() for key, v in scores.items() if v}
    metrics["mean_image_psnr"] = torch.cat([psnr(mean_image.expand_as(g), g) for g in gts]).mean().item()
    metrics.update(samples=len(samples), views=cfg.eval_views, reference_view=k,
                   mvdiff_checkpoint=str(chain.ck["path"]), gslrm_checkpoint=str(chain.gs["path"]),
                   allowed_rig_mismatch=chain.mismatches)
    groups = [("input", 1), (f"{cfg.eval_views} views", V), ("held-out ground truth", len(held)),
              ("rendered", len(held))]
    save_image_grid(rows, out / "eval.png", groups)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    print(" | ".join(f"{key} {v:.2f}" if isinstance(v, float) else f"{key} {v}" for key, v in metrics.items()
                     if key not in ("mvdiff_checkpoint", "gslrm_checkpoint")))
    print(f"wrote {out}/metrics.json, eval.png")
    return metrics


def main(cfg):
    if bool(cfg.input_image) == bool(cfg.eval_list):
        raise InputError("give --input_image (one image) or --eval_list (held-out samples), "
                         "not both or neither")
    if cfg.eval_views not in ("generated", "ground_truth"):
        raise InputError(f"eval_views {cfg.eval_views!r}: expected generated or ground_truth")
    chain = Chain(cfg, "cuda" if torch.cuda.is_available() else "cpu")
    if not 0 <= cfg.reference_view < chain.V:
        raise InputError(f"reference_view {cfg.reference_view}: the rig has views 0..{chain.V - 1}")
    return run_eval(chain, cfg) if cfg.eval_list else run_one(chain, cfg)


if __name__ == "__main__":
    cli(main, Config)
