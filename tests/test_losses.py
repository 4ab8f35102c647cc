import pytest
import torch

from losses import masked_psnr, psnr, ssim


def test_psnr_known_value_and_shape():
    x = torch.rand(2, 3, 3, 8, 8) * 0.8
    assert torch.allclose(psnr(x + 0.1, x), torch.full((2, 3), 20.0), atol=1e-3)  # MSE 0.01 -> 20 dB
    assert psnr(x, x).isfinite().all()


def test_masked_psnr_ignores_background():
    x = torch.rand(2, 3, 8, 8)
    mask = torch.zeros(2, 1, 8, 8)
    mask[..., 2:6, 2:6] = 1
    y = x + (1 - mask) * 0.5  # errors only in the background
    assert (masked_psnr(y, x, mask) > 60).all() and (psnr(y, x) < 10).all()
    assert masked_psnr(y, x, torch.zeros_like(mask)).isfinite().all()


def test_ssim_basic():
    x = torch.rand(4, 3, 32, 32)
    assert torch.allclose(ssim(x, x), torch.ones(4), atol=1e-5)
    noisy = [ssim((x + s * torch.randn_like(x)).clamp(0, 1), x).mean() for s in (0.05, 0.2)]
    assert 1 > noisy[0] > noisy[1]
    assert ssim(x[None], x[None]).shape == (1, 4)
    y = x.clone().requires_grad_()
    ssim(y, x.flip(-1)).sum().backward()
    assert y.grad.isfinite().all() and y.grad.abs().sum() > 0


def test_ssim_matches_pytorch_msssim():
    pm = pytest.importorskip("pytorch_msssim")
    x, y = torch.rand(3, 3, 32, 32), torch.rand(3, 3, 32, 32)
    y = 0.5 * x + 0.5 * y
    assert torch.allclose(ssim(x, y), pm.ssim(x, y, data_range=1.0, size_average=False), atol=1e-5)
