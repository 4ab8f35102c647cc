"""The performance table: `python bench.py` prints a markdown row per measurement (CPU here).

    python bench.py                     # everything
    python bench.py --only=render       # the rasterizer back ends
    python bench.py --only=toy_mice     # toy data generation
Timings are medians of a few repeats after a warm-up; compare figures from one run as ratios.
"""
import argparse
import statistics
import tempfile
import time

import torch

from data import write_toy_mice
from models import intrinsics_matrix, look_at_c2w, render_gaussians


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
    means = torch.nn.functional.normalize(torch.randn(N, 3, generator=g), dim=-1) * torch.rand(N, 1, generator=g) ** (1 / 3) * 0.9
    pixel = 2.7 / (548.99 * S / 512)  # world size of a pixel at the origin
    scales = pixel * (0.25 + 0.5 * torch.rand(N, 3, generator=g))
    return [means, torch.randn(N, 4, generator=g), scales, 0.05 + 0.9 * torch.rand(N, generator=g), torch.rand(N, 3, generator=g)]


def bench_render(S=64):
    params = [p.requires_grad_() for p in pixel_sized_gaussians(S=S)]
    w2c = torch.linalg.inv(look_at_c2w((0.0, -2.7, 1.0))).float()[None]  # (1, 4, 4)
    K = intrinsics_matrix(torch.tensor([548.99 * S / 512, 548.99 * S / 512, S / 2, S / 2]))[None]  # (1, 3, 3)

    def step(backend):
        rgb, alpha = render_gaussians(*params, w2c, K, S, S, 1.0, backend=backend)
        (rgb.mean() + alpha.mean()).backward()

    t = {b: timeit(lambda: step(b), repeat=3 if b == "sparse" else 1, warmup=1 if b == "sparse" else 0) for b in ("sparse", "dense")}
    n = len(params[0])
    print(f"| render fwd+bwd, {n} pixel-sized Gaussians -> one {S}x{S} view, sparse | {t['sparse'] * 1e3:.0f} ms |")
    print(f"| same, dense all-pairs reference | {t['dense'] * 1e3:.0f} ms |")
    print(f"| sparse speed-up over dense | {t['dense'] / t['sparse']:.0f}x |")


def bench_toy_mice(n=200, S=64):
    with tempfile.TemporaryDirectory() as d:
        t = timeit(lambda: write_toy_mice(d, n=n, size=S, progress=False), repeat=1, warmup=0)
    print(f"| toy mice: {n} samples x 10 views at {S} px | {t:.1f} s |")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="render,toy_mice")
    only = p.parse_args().only.split(",")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n\n| what | figure |\n|---|---|")
    for name in only:
        globals()[f"bench_{name}"]()
