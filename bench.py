"""The performance table: `python bench.py` prints a markdown row per measurement (CPU here).

    python bench.py                     # everything
    python bench.py --only=render       # the rasterizer back ends
    python bench.py --only=toy_mice     # toy data generation
    python bench.py --only=mvattn       # multi-view attention vs plain self-attention in the same UNet
    python bench.py --only=gen_synthetic  # phase 2: views/s batched vs one reference at a time
    python bench.py --only=stage_b      # dance stage B's step at the toy size, split by part
    python bench.py --only=stage_c      # dance stage C's step against the clip length; sampling frames/s
    python bench.py --only=train_gslrm,train_mvdiff  # the default toy steps, split by part
    python bench.py --only=attention    # the toy networks in fp32 and bf16 (SDPA / models.attention)
Timings are medians of a few repeats after a warm-up; compare figures from one run as ratios.
"""
import argparse
import statistics
import tempfile
import time

import torch

from losses import pose_heatmaps
from models import (
    DANCE_UNET_CONFIGS,
    CrossAttnProcessor,
    DanceNet,
    FaceTokens,
    PoseGuider,
    build_mv_unet,
    install_mv_attention,
    intrinsics_matrix,
    look_at_c2w,
    referencenet_unused,
    sample_views,
)
from plumbing import make_accelerator
from render import render_gaussians
from toy import toy_face_recognizer, write_toy_mice


def timeit(fn, repeat=3, warmup=1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def pixel_sized_gaussians(V=6, S=64, seed=0):
    """V x S x S Gaussians about one pixel wide, filling a ball of radius 0.9 (a GS-LRM output's
    count and footprint for V input views at S px)."""
    g = torch.Generator().manual_seed(seed)
    N = V * S * S
    dirs = torch.nn.functional.normalize(torch.randn(N, 3, generator=g), dim=-1)  # (N, 3)
    means = dirs * torch.rand(N, 1, generator=g) ** (1 / 3) * 0.9
    pixel = 2.7 / (548.99 * S / 512)  # world size of a pixel at the origin
    scales = pixel * (0.25 + 0.5 * torch.rand(N, 3, generator=g))
    return [means, torch.randn(N, 4, generator=g), scales, 0.05 + 0.9 * torch.rand(N, generator=g),
            torch.rand(N, 3, generator=g)]


def bench_render(S=64):
    params = [p.requires_grad_() for p in pixel_sized_gaussians(S=S)]
    w2c = torch.linalg.inv(look_at_c2w((0.0, -2.7, 1.0))).float()[None]  # (1, 4, 4)
    K = intrinsics_matrix(torch.tensor([548.99 * S / 512, 548.99 * S / 512, S / 2, S / 2]))[None]  # (1, 3, 3)

    def step(backend):
        rgb, alpha = render_gaussians(*params, w2c, K, S, S, 1.0, backend=backend)
        (rgb.mean() + alpha.mean()).backward()

    # the sparse step is short and its time noisy here: the median of 15 (the dense one: 20 s, once)
    t = {b: timeit(lambda: step(b), repeat=15 if b == "sparse" else 1, warmup=3 if b == "sparse" else 0)
         for b in ("sparse", "dense")}
    n = len(params[0])
    print(f"| render fwd+bwd, {n} pixel-sized Gaussians -> one {S}x{S} view, sparse "
          f"| {t['sparse'] * 1e3:.0f} ms |")
    print(f"| same, dense all-pairs reference | {t['dense'] * 1e3:.0f} ms |")
    print(f"| sparse speed-up over dense | {t['dense'] / t['sparse']:.0f}x |")


def bench_toy_mice(n=200, S=64):
    with tempfile.TemporaryDirectory() as d:
        t = timeit(lambda: write_toy_mice(d, n=n, size=S, progress=False), repeat=1, warmup=0)
    print(f"| toy mice: {n} samples x 10 views at {S} px | {t:.1f} s |")


def bench_mvattn(B=4, V=6):
    """UNet fwd+bwd on B objects x V views with multi-view attention (sparse: [reference; own] keys,
    dense: all views) against the same UNet with plain per-view self-attention (diffusers' SDPA)."""
    layouts = {"toy preset (attention at 8x8)": {},
               "toy widths, attention at 32, 16, 8 px (SD's layout)": dict(
                   down_block_types=("CrossAttnDownBlock2D",) * 2 + ("DownBlock2D",),
                   up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 2)}
    for name, kw in layouts.items():
        torch.manual_seed(0)
        model = build_mv_unet("toy", V, **kw)
        g = torch.Generator().manual_seed(0)
        args = (torch.randn(B, V, 3, 32, 32, generator=g), torch.randint(0, 1000, (B,), generator=g),
                torch.randn(V, 8, 32, generator=g), torch.randint(0, V, (B,), generator=g),
                torch.randn(B, 3, 32, 32, generator=g))

        def step():
            model.zero_grad(set_to_none=True)
            model(*args).square().mean().backward()

        t = {}
        # no dense at 32 px: all-pairs attention over 6 x 32x32 tokens takes minutes on a CPU
        modes = ("plain", "sparse", "dense") if not kw else ("plain", "sparse")
        for mode in modes:
            if mode == "plain":  # every processor the plain SDPA one (it ignores the reference index)
                model.unet.set_attn_processor(CrossAttnProcessor())
            else:
                install_mv_attention(model.unet, V, sparse=mode == "sparse")
            t[mode] = timeit(step, repeat=3, warmup=1)
        print(f"| UNet fwd+bwd, {B} objects x {V} views at 32 px, {name}: plain self-attention "
              f"| {t['plain'] * 1e3:.0f} ms |")
        for mode in modes[1:]:
            change = 100 * (t[mode] / t["plain"] - 1)
            print(f"| same, {mode} multi-view attention | {t[mode] * 1e3:.0f} ms ({change:+.0f}%) |")


def bench_gen_synthetic(n=None, V=6, steps=5):
    """gen_synthetic.py's cost: DDIM sampling of the 6 views of n references with the toy UNet (32 px),
    batched as gen_synthetic does, against one reference at a time."""
    from diffusers import DDIMScheduler
    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    n = n or (32 if dev == "cuda" else 8)
    model = build_mv_unet("toy", V).eval().to(dev)
    sched = DDIMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="sample",
                          timestep_spacing="trailing")
    ref, pe = (torch.rand(n, 3, 32, 32) * 2 - 1).to(dev), torch.randn(V, 8, 32).to(dev)
    gens = lambda k: [torch.Generator(dev).manual_seed(i) for i in range(k)]  # noqa: E731

    def run(b):
        for s in range(0, n, b):
            sample_views(model, sched, ref[s:s + b], torch.arange(s, s + b, device=dev) % V, pe, (3, 32, 32),
                         None, steps, 1.0, 1.0, gens(b))
        if dev == "cuda":
            torch.cuda.synchronize()

    t = {b: timeit(lambda: run(b), repeat=1, warmup=1) for b in (n, 1)}
    print(f"| gen_synthetic ({dev}), toy UNet, {steps} DDIM steps, one reference at a time "
          f"| {n * V / t[1]:.1f} views/s |")
    print(f"| same, batches of {n} references | {n * V / t[n]:.1f} views/s ({t[1] / t[n]:.2f}x) |")


def bench_stage_b(B=8, S=32, J=24):
    """Dance stage B's training step at the toy size (train_dance.py defaults: B 8, 32 px, pixel space):
    the whole fwd+bwd, and its parts timed alone: ReferenceNet forward, denoiser forward, the
    backward of both, and the identity loss (face crops of 3 low-noise samples through the recognizer)."""
    from diffusers import UNet2DConditionModel
    torch.manual_seed(0)
    c = DANCE_UNET_CONFIGS["toy"]
    unet = UNet2DConditionModel(**c)
    ref_net = UNet2DConditionModel(**c)
    net = DanceNet(unet, ref_net, PoseGuider(J, c["block_out_channels"][0], (16,)),
                   FaceTokens(c["cross_attention_dim"]))
    for name, prm in ref_net.named_parameters():
        prm.requires_grad_(name not in set(referencenet_unused(ref_net)))
    recognizer = toy_face_recognizer(0)
    g = torch.Generator().manual_seed(0)
    x, ref = torch.randn(B, 3, S, S, generator=g), torch.randn(B, 3, S, S, generator=g)
    t = torch.randint(0, 1000, (B,), generator=g)
    heat = pose_heatmaps(torch.rand(B, J, 3, generator=g), S, 1.0)
    clip_emb, face_emb = torch.randn(B, c["cross_attention_dim"], generator=g), torch.randn(B, 512, generator=g)
    keep = torch.ones(B, dtype=torch.bool)

    def full():
        net.zero_grad(set_to_none=True)
        net(x, t, heat, 1.0, ref, clip_emb, face_emb, keep).square().mean().backward()
        net.store.clear()

    def reference():
        with torch.no_grad():
            net.reference(ref, net.context(clip_emb, face_emb, keep), keep)

    def denoise():
        reference()
        with torch.no_grad():
            net.denoise(x, t, heat, 1.0, net.context(clip_emb, face_emb, keep))

    def identity():
        crops = torch.nn.functional.interpolate(x[:3], size=112, mode="bilinear").requires_grad_()
        (1 - torch.nn.functional.cosine_similarity(recognizer(crops), face_emb[:3])).mean().backward()

    tf, tr, td, ti = (timeit(f, repeat=5) for f in (full, reference, denoise, identity))
    td -= tr  # denoise() also ran the reference
    print(f"| dance stage B fwd+bwd, toy UNet + ReferenceNet, batch {B} at {S} px | {tf * 1e3:.0f} ms |")
    print(f"| of which ReferenceNet forward | {tr * 1e3:.0f} ms ({100 * tr / tf:.0f}%) |")
    print(f"| of which denoiser forward (pose guider, reference attention) "
          f"| {td * 1e3:.0f} ms ({100 * td / tf:.0f}%) |")
    print(f"| of which backward of both | {(tf - tr - td) * 1e3:.0f} ms ({100 * (tf - tr - td) / tf:.0f}%) |")
    print(f"| identity loss, 3 face crops 112 px through the toy recognizer, fwd+bwd (beside the step) "
          f"| {ti * 1e3:.0f} ms ({100 * ti / tf:.0f}% of the step) |")


def bench_stage_c(B=2, S=32, J=24, lengths=(8, 16, 32, 64)):
    """Dance stage C's training step (motion modules only train; batch B clips of T frames at the toy
    size) against T, and sampling frames/s (one 16-frame window, one denoising step with guidance)."""
    import copy

    from diffusers import UNet2DConditionModel

    from models import motion_unet
    torch.manual_seed(0)
    c = DANCE_UNET_CONFIGS["toy"]
    unet = UNet2DConditionModel(**c)
    net = DanceNet(unet, copy.deepcopy(unet), PoseGuider(J, c["block_out_channels"][0], (16,)),
                   FaceTokens(c["cross_attention_dim"]))
    net.unet = motion_unet(net.unet, None, max_frames=max(lengths), heads=4)
    net.install()
    net.requires_grad_(False)
    for name, prm in net.unet.named_parameters():
        prm.requires_grad_("motion_modules" in name)
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(B, 3, S, S, generator=g)
    clip_emb, face_emb = torch.randn(B, c["cross_attention_dim"], generator=g), torch.randn(B, 512, generator=g)
    keep = torch.ones(B, dtype=torch.bool)
    base = None
    for T in lengths:
        x = torch.randn(B, 3, T, S, S, generator=g)
        heat = pose_heatmaps(torch.rand(B, T, J, 3, generator=g), S, 1.0)

        def step():
            net.zero_grad(set_to_none=True)
            net(x, torch.tensor([100, 800][:B]), heat, 1.5, ref, clip_emb, face_emb, keep).square().mean().backward()
            net.store.clear()
        ts = timeit(step, repeat=3)
        base = base or ts / T
        print(f"| dance stage C fwd+bwd, batch {B} clips x T = {T} frames at {S} px | {ts * 1e3:.0f} ms "
              f"({ts / T / base:.2f}x the per-frame cost at T = {lengths[0]}) |")
    x, heat = torch.randn(2, 3, 16, S, S, generator=g), pose_heatmaps(torch.rand(2, 16, J, 3, generator=g), S, 1.0)
    ctx = net.context(clip_emb[:1].repeat(2, 1), face_emb[:1].repeat(2, 1), torch.tensor([True, False]))

    def sample_step():
        with torch.no_grad():
            net.denoise(x, torch.tensor([500, 500]), heat, 1.5, ctx)
    with torch.no_grad():
        net.reference(ref[:1].repeat(2, 1, 1, 1), ctx, torch.tensor([True, False]))
    ts = timeit(sample_step, repeat=3)
    net.store.clear()
    print(f"| dance sampling, one denoising step of a 16-frame window with guidance at {S} px | "
          f"{ts * 1e3:.0f} ms ({16 / ts:.0f} frame-steps/s; 25 steps: {16 / ts / 25:.1f} frames/s) |")


def bench_attention(repeat=5):
    """The toy networks' fwd+bwd in fp32, under CPU bf16 autocast with SDPA, and under it with
    models.attention (plain bf16 matmuls, fp32 softmax): GS-LRM's transformer (batch 2, 6 views of
    32 px in 4 px patches) and the multi-view UNet (4 objects x 6 views at 32 px)."""
    import models
    from models import GSLRM_CONFIGS, Block
    torch.manual_seed(0)
    c = GSLRM_CONFIGS["toy"]
    blocks = torch.nn.Sequential(*[Block(c["d"], c["heads"]) for _ in range(c["layers"])])
    x = torch.randn(2, 2 + 6 * (32 // c["patch"]) ** 2, c["d"])  # (B, tokens, d)
    unet = build_mv_unet("toy", 6)
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(4, 6, 3, 32, 32, generator=g), torch.randint(0, 1000, (4,), generator=g),
            torch.randn(6, 8, 32, generator=g), torch.randint(0, 6, (4,), generator=g),
            torch.randn(4, 3, 32, 32, generator=g))
    nets = {f"GS-LRM toy transformer, batch 2, {x.shape[1]} tokens": lambda: blocks(x),
            "multi-view UNet (toy), 4 objects x 6 views at 32 px": lambda: unet(*args)}
    ours, sdpa = models.attention, lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v)
    for name, net in nets.items():
        t = {}
        for mode in ("fp32", "bf16, SDPA", "bf16, models.attention"):
            models.attention = sdpa if "SDPA" in mode else ours

            def step():
                with torch.autocast("cpu", torch.bfloat16, enabled=mode != "fp32"):
                    out = net()
                out.float().square().mean().backward()
            t[mode] = timeit(step, repeat=repeat, warmup=1)
        models.attention = ours
        print(f"| {name}, fwd+bwd, fp32 | {t['fp32'] * 1e3:.0f} ms |")
        for mode in ("bf16, SDPA", "bf16, models.attention"):
            print(f"| same, {mode} | {t[mode] * 1e3:.0f} ms ({t['fp32'] / t[mode]:.2f}x) |")


def timed_parts(step, n=12, warmup=3):
    """step() -> {part: seconds} (its own perf_counter marks); median of each part over n steps."""
    for _ in range(warmup):
        step()
    runs = [step() for _ in range(n)]
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def warm_up(dataset, epochs=4):
    """A few epochs' items, so that the step sees the data path of a run past its first epoch."""
    for e in range(epochs):
        for i in range(len(dataset)):
            dataset[i, e]


def print_parts(what, parts):
    total = sum(parts.values())
    print(f"| {what} | {total * 1e3:.0f} ms |")
    for k, t in parts.items():
        print(f"| of which {k} | {t * 1e3:.0f} ms ({100 * t / total:.0f}%) |")


def bench_train_gslrm(data_dir="data/toy_mice", init_from=""):
    """train_gslrm.py's default step (toy preset, 32 px, batch 2, 6 views in, 4 rendered), split by part,
    and one default validation (20 held-out mice). init_from: a checkpoint to start from (trained
    Gaussians are small; a fresh model's cover many pixels and make the renderer dominate)."""
    from cameras import load_rig
    from data import MultiViewDataset, StepSampler
    from models import GSLRM, GSLRM_CONFIGS
    from plumbing import load_checkpoint, seeded
    from train_gslrm import Config, evaluate, split_views
    cfg, perf = Config(data_dir=data_dir), time.perf_counter
    accelerator = make_accelerator(cfg.mixed_precision)  # its autocast: bf16 where the trainer uses it
    torch.manual_seed(0)
    rig, S, n_in = load_rig(cfg.rig), cfg.image_size, cfg.num_input_views
    train_set = MultiViewDataset(f"{data_dir}/data_train.txt", S, range(6), cfg.num_novel_views, rig, 0, n_in)
    val_set = MultiViewDataset(f"{data_dir}/data_val.txt", S, range(6), -1, rig, num_inputs=n_in)
    model = GSLRM(**GSLRM_CONFIGS[cfg.preset])
    if init_from:
        load_checkpoint(init_from, {"model": model})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    warm_up(train_set)
    loader = iter(torch.utils.data.DataLoader(train_set, batch_sampler=StepSampler(len(train_set), 2)))
    mse = torch.nn.functional.mse_loss

    def step(i=[0]):  # noqa: B006  (the step counter)
        t0 = perf()
        batch = {k: v for k, v in next(loader).items() if torch.is_tensor(v)}
        (img, c2w, K), (tgt, tc2w, tK) = split_views(batch, n_in)
        pick = torch.randperm(n_in, generator=seeded(0, i[0]))[:2]
        i[0] += 1
        tgt = torch.cat([batch["images"][:, pick], tgt], 1)  # (B, Vt, 4, H, W)
        tc2w, tK = torch.cat([c2w[:, pick], tc2w], 1), torch.cat([K[:, pick], tK], 1)
        t1 = perf()
        with accelerator.autocast():
            gaussians = model(img, c2w, K)
        t2 = perf()
        pred, pred_alpha = model.render(gaussians, tc2w, tK, S, S).split([3, 1], dim=2)
        loss = mse(pred, tgt[:, :, :3]) + cfg.alpha_weight * mse(pred_alpha, tgt[:, :, 3:])
        t3 = perf()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        t4 = perf()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip).item()
        optimizer.step()
        return {"data": t1 - t0, "GS-LRM forward": t2 - t1, "render forward": t3 - t2, "backward": t4 - t3,
                "clip + AdamW": perf() - t4}

    print_parts(f"train_gslrm step ({accelerator.mixed_precision}), toy preset, batch 2, 6 views in, 4 rendered at "
                f"{S} px" + (f", from {init_from}" if init_from else ", fresh weights"), timed_parts(step))
    mean_image = torch.full((3, S, S), 0.9)
    with tempfile.TemporaryDirectory() as d:
        t = timeit(lambda: evaluate(model, val_set, None, cfg, 0, mean_image, "cpu", d), repeat=1)
    print(f"| train_gslrm validation, {min(cfg.val_samples, len(val_set))} held-out mice | {t:.1f} s |")


def bench_train_mvdiff(data_dir="data/toy_mice_mv"):
    """train_mvdiff.py's default step (toy UNet, pixel space, 32 px, batch 4 objects x 6 views, EMA),
    split by part."""
    import copy

    from cameras import load_prompt_embeds, load_rig
    from data import MultiViewDataset, StepSampler
    from losses import diffusion_target, min_snr_weight, weighted_mse
    from models import Conditioner, mv_schedulers
    from plumbing import seeded
    from train_mvdiff import Config, update_ema
    cfg, perf = Config(data_dir=data_dir), time.perf_counter
    accelerator = make_accelerator(cfg.mixed_precision)  # its autocast: bf16 where the trainer uses it
    torch.manual_seed(0)
    rig = load_rig(cfg.rig)
    train_set = MultiViewDataset(f"{data_dir}/data_train.txt", cfg.image_size, range(6), 0, rig, 0)
    model = build_mv_unet(cfg.preset, 6, cfg.sparse_attention)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    prompt_embeds, _ = load_prompt_embeds(f"{data_dir}/toy_prompt_embeds.pt", rig, 32, False)  # (V, T, D)
    cond, (noise_scheduler, _) = Conditioner("", "cpu"), mv_schedulers(cfg.prediction_type, cfg.beta_schedule,
                                                                        cfg.beta_start, cfg.beta_end, True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), fused=True)
    warm_up(train_set)
    loader = iter(torch.utils.data.DataLoader(train_set, batch_sampler=StepSampler(len(train_set), cfg.batch_size)))

    def step(i=[0]):  # noqa: B006  (the step counter)
        t0 = perf()
        images = next(loader)["images"][:, :, :3] * 2 - 1  # (B, V, 3, H, W)
        gen = seeded(0, 0, i[0], 0)
        i[0] += 1
        B = len(images)
        x0, ref_cond, _ = cond(images, torch.randint(0, 6, (B,), generator=gen), gen)
        noise, t = torch.randn(x0.shape, generator=gen), torch.randint(0, 1000, (B,), generator=gen)
        noisy, target = noise_scheduler.add_noise(x0, noise, t), diffusion_target(noise_scheduler, x0, noise, t)
        weight = min_snr_weight(noise_scheduler.alphas_cumprod[t], cfg.min_snr_gamma, cfg.prediction_type)
        t1 = perf()
        with accelerator.autocast():
            loss = weighted_mse(model(noisy, t, prompt_embeds, torch.zeros(B, dtype=torch.long), ref_cond),
                                target, weight)
        t2 = perf()
        loss.backward()
        loss.item()
        t3 = perf()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip).item()
        optimizer.step()
        update_ema(ema, model, cfg.ema_decay)
        optimizer.zero_grad(set_to_none=True)
        return {"data": t1 - t0, "UNet forward": t2 - t1, "backward": t3 - t2, "clip + AdamW + EMA": perf() - t3}

    print_parts(f"train_mvdiff step ({accelerator.mixed_precision}), toy UNet, {cfg.batch_size} objects x 6 views at "
                f"{cfg.image_size} px",
                timed_parts(step))

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="render,toy_mice")
    p.add_argument("--gslrm_data", default="data/toy_mice", help="train_gslrm's toy set (its default)")
    p.add_argument("--gslrm_init", default="", help="train_gslrm checkpoint for its step's weights")
    p.add_argument("--mvdiff_data", default="data/toy_mice_mv", help="train_mvdiff's toy set (its default)")
    args = p.parse_args()
    kwargs = {"train_gslrm": dict(data_dir=args.gslrm_data, init_from=args.gslrm_init),
              "train_mvdiff": dict(data_dir=args.mvdiff_data)}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n\n| what | figure |\n|---|---|")
    for name in args.only.split(","):
        globals()[f"bench_{name}"](**kwargs.get(name, {}))
