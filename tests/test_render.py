"""The Gaussian rasterizer: sparse back end == dense oracle, gradients, projection, gsplat parity."""
import math

import pytest
import torch

from models import get_rays, intrinsics_matrix, look_at_c2w, ray_encoding_facelift
from render import quat_to_rotmat, render_gaussians


def cameras(C, size, dtype, focal=1.1):
    """C cameras on a ring at radius 2.7 looking at the origin; K for a size x size image."""
    angles = torch.linspace(0, 4, C).tolist()
    c2w = torch.stack([look_at_c2w((2.7 * math.cos(a), 2.7 * math.sin(a), 0.8)) for a in angles])  # (C, 4, 4)
    K = intrinsics_matrix(torch.tensor([focal * size, focal * size, size / 2, size / 2], dtype=torch.float64))
    return torch.linalg.inv(c2w).to(dtype), K.expand(C, 3, 3).to(dtype)


def hard_scene(N=300, seed=0, dtype=torch.float32):
    """Random Gaussians including ones behind/at the camera, off-screen, very large and tiny."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.rand(*s, generator=g, dtype=dtype)  # noqa: E731
    means = (r(N, 3) - 0.5) * 2.0
    camera0 = torch.tensor([2.7 * math.cos(0.0), 0.0, 0.8], dtype=dtype)
    means[:10] = camera0 * (1.0 + r(10, 1))  # behind camera 0
    means[10:20] = (r(10, 3) - 0.5) * 40.0  # far off-screen
    scales = r(N, 3) * 0.15 + 0.01
    scales[20:25] = 1.5 + r(5, 3)  # very large: cover the whole image
    scales[25:40] = 1e-4  # tiny: sub-pixel, the 0.3 px low-pass dominates
    quats = torch.randn(N, 4, generator=g, dtype=dtype)
    return means, quats, scales, r(N) * 0.95, r(N, 3)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sparse_equals_dense(seed):
    w2c, K = cameras(3, 24, torch.float32)
    scene = hard_scene(seed=seed)
    bg = torch.tensor([1.0, 0.5, 0.0])
    rgb_s, a_s = render_gaussians(*scene, w2c, K, 24, 24, bg, backend="sparse")
    rgb_d, a_d = render_gaussians(*scene, w2c, K, 24, 24, bg, backend="dense")
    assert rgb_s.shape == (3, 24, 24, 3) and a_s.shape == (3, 24, 24, 1)
    assert 0.05 < a_s.mean() < 0.999  # a scene that is neither empty nor saturated
    assert (rgb_s - rgb_d).abs().max() < 1e-4 and (a_s - a_d).abs().max() < 1e-4


def test_opacity_aware_footprint_changes_nothing_but_the_pair_count(monkeypatch):
    """Faint Gaussians get smaller boxes; the pairs left out are ones the 1/255 cut drops anyway."""
    import render
    w2c, K = cameras(3, 24, torch.float32)
    means, quats, scales, opac, colors = hard_scene(seed=3)
    opac = opac * 0.1  # mostly faint: their boxes shrink a lot
    shrunk = render_gaussians(means, quats, scales, opac, colors, w2c, K, 24, 24, 1.0, backend="dense")
    project = render.project_gaussians
    boxes = {}

    def full_box(means, quats, scales, opacities, *rest):  # every Gaussian gets the 3.33-sigma box
        out = project(means, quats, scales, torch.ones_like(opacities), *rest)
        boxes["full"], boxes["shrunk"] = out[3], project(means, quats, scales, opacities, *rest)[3]
        return out
    monkeypatch.setattr(render, "project_gaussians", full_box)
    full = render_gaussians(means, quats, scales, opac, colors, w2c, K, 24, 24, 1.0, backend="dense")
    area = lambda b: ((b[..., 1] - b[..., 0] + 1) * (b[..., 3] - b[..., 2] + 1)).sum()  # noqa: E731
    assert area(boxes["shrunk"]) < 0.6 * area(boxes["full"])
    for a, b in zip(shrunk, full):
        assert (a - b).abs().max() < 1e-6


def test_gradients_agree_with_dense():
    w2c, K = cameras(2, 16, torch.float64)
    params = [t.requires_grad_() for t in hard_scene(N=120, seed=3, dtype=torch.float64)]
    w = torch.rand(2, 16, 16, 3, dtype=torch.float64)
    grads = {}
    for backend in ("sparse", "dense"):
        rgb, alpha = render_gaussians(*params, w2c, K, 16, 16, 1.0, backend=backend)
        grads[backend] = torch.autograd.grad((rgb * w).sum() + alpha.sum(), params)
    for gs, gd in zip(grads["sparse"], grads["dense"]):
        assert torch.allclose(gs, gd, atol=1e-8, rtol=1e-6)
    assert all(g.abs().sum() > 0 for g in grads["sparse"])  # every parameter gets a gradient


def test_gradients_agree_with_dense_when_opaque():
    """Opacity 1 (alpha clamped at ALPHA_MAX) and stacks deep enough to stop at T_MIN: the branches
    of the sparse back end's hand-written compositing gradient that the scene above rarely reaches."""
    w2c, K = cameras(2, 12, torch.float64)
    means, quats, scales, opac, colors = hard_scene(N=150, seed=6, dtype=torch.float64)
    opac[::2] = 1.0
    params = [t.requires_grad_() for t in (means, quats, scales * 2, opac, colors)]
    w = torch.rand(2, 12, 12, 3, dtype=torch.float64)
    grads = {}
    for backend in ("sparse", "dense"):
        rgb, alpha = render_gaussians(*params, w2c, K, 12, 12, 0.5, backend=backend)
        grads[backend] = torch.autograd.grad((rgb * w).sum() + alpha.sum(), params)
    assert alpha.max() > 0.98  # opaque pixels: the clamp, and lists cut off at T_MIN behind them
    for gs, gd in zip(grads["sparse"], grads["dense"]):
        assert torch.allclose(gs, gd, atol=1e-8, rtol=1e-6)


def test_gradcheck_tiny_scene():
    w2c, K = cameras(1, 8, torch.float64, focal=1.0)
    means = torch.tensor([[0.05, 0.1, 0.02], [-0.1, 0.0, 0.1], [0.1, -0.1, -0.1]], dtype=torch.float64)
    quats = torch.tensor([[1.0, 0.1, 0.2, 0.0], [0.9, 0.0, 0.3, 0.1], [1.0, 0.0, 0.0, 0.0]],
                         dtype=torch.float64)
    scales = torch.tensor([[0.3, 0.2, 0.25], [0.2, 0.3, 0.2], [0.25, 0.25, 0.3]], dtype=torch.float64)
    opac, col = torch.tensor([0.6, 0.5, 0.7], dtype=torch.float64), torch.rand(3, 3, dtype=torch.float64)

    def fn(m, q, s, o, c):
        return render_gaussians(m, q, s, o, c, w2c, K, 8, 8, 1.0, backend="sparse")[0]

    inputs = [t.requires_grad_() for t in (means, quats, scales, opac, col)]
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5)


def test_batched_equals_per_sample():
    w2c, K = cameras(2, 16, torch.float32)
    a, b = hard_scene(N=80, seed=4), hard_scene(N=80, seed=5)
    batched = render_gaussians(*[torch.stack([x, y]) for x, y in zip(a, b)], torch.stack([w2c, w2c.flip(0)]),
                               K.expand(2, 2, 3, 3), 16, 16, 1.0)[0]  # (2, 2, 16, 16, 3)
    assert torch.allclose(batched[0], render_gaussians(*a, w2c, K, 16, 16, 1.0)[0], atol=1e-6)
    assert torch.allclose(batched[1], render_gaussians(*b, w2c.flip(0), K, 16, 16, 1.0)[0], atol=1e-6)


def test_point_lands_where_pinhole_says():
    c2w = look_at_c2w((0.0, -2.7, 0.0))  # FaceLift's front camera
    w2c, fx, cx = torch.linalg.inv(c2w).float(), 60.0, 32.0
    K = torch.tensor([[fx, 0, cx], [0, fx, cx], [0, 0, 1.0]])
    X = torch.tensor([0.3, 0.2, 0.4])  # world point: right of the centre (+x) and up (+z)
    depth = 2.7 + 0.2  # camera looks along +y from y = -2.7
    u, v = fx * 0.3 / depth + cx, fx * -0.4 / depth + cx  # image y points down, world z up
    rgb, alpha = render_gaussians(X[None], torch.tensor([[1.0, 0, 0, 0]]), torch.full((1, 3), 0.005),
                                  torch.tensor([0.9]), torch.ones(1, 3), w2c[None], K[None], 64, 64, 0.0)
    peak = alpha[0, :, :, 0].argmax()
    assert (peak // 64, peak % 64) == (int(v), int(u))  # pixel i covers [i, i + 1)


def test_rays_of_centre_pixel_follow_optical_axis():
    c2w = look_at_c2w((1.0, -2.0, 1.5)).float()
    o, d = get_rays(c2w, torch.tensor([4.0, 4.0, 2.5, 2.5]), 5, 5)  # pixel 2's centre is 2.5 = cx
    assert torch.allclose(d[2, 2], c2w[:3, 2], atol=1e-6) and torch.allclose(o[2, 2], c2w[:3, 3])
    assert torch.allclose(d.norm(dim=-1), torch.ones(5, 5), atol=1e-6)
    assert d[2, 4] @ c2w[:3, 0] > 0 and d[4, 2] @ c2w[:3, 1] > 0  # +x right, +y down


def test_ray_encodings():
    o = torch.randn(10, 3)
    d = torch.nn.functional.normalize(torch.randn(10, 3), dim=-1)
    enc = ray_encoding_facelift(o, d)
    assert torch.allclose(enc[:, :3], d)
    assert torch.allclose((enc[:, 3:] * d).sum(-1), torch.zeros(10), atol=1e-5)
    assert torch.allclose(enc, ray_encoding_facelift(o + 0.7 * d, d), atol=1e-5)  # same ray, same code


def test_quaternion_is_wxyz():
    R = quat_to_rotmat(torch.tensor([math.cos(math.pi / 4), 0, 0, math.sin(math.pi / 4)]))  # 90 deg about z
    assert torch.allclose(R @ torch.tensor([1.0, 0, 0]), torch.tensor([0.0, 1, 0]), atol=1e-6)


def test_fp32_under_autocast():
    w2c, K = cameras(1, 8, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rgb, _ = render_gaussians(*[x.bfloat16() for x in hard_scene(N=60)], w2c, K, 8, 8, 1.0)
    assert rgb.dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="gsplat's rasterizer needs CUDA")
def test_gsplat_parity():
    pytest.importorskip("gsplat")
    w2c, K = cameras(3, 64, torch.float32)
    means, quats, scales, opac, col = hard_scene(N=2000, seed=6)
    opac = opac.clamp(max=0.9)  # gsplat clamps alpha at 0.999, 3DGS (and we) at 0.99
    args = [t.cuda() for t in (means, quats, scales, opac, col, w2c, K)]
    rgb_g, a_g = render_gaussians(*args, 64, 64, 1.0, backend="gsplat")
    rgb_s, a_s = render_gaussians(*args, 64, 64, 1.0, backend="sparse")
    assert (rgb_g - rgb_s).abs().mean() < 2e-3 and (rgb_g - rgb_s).abs().max() < 0.05
