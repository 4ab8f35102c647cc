"""Pure loss and metric functions of every stage (tensors in, tensors out; no state, no I/O).
Images are (..., C, H, W) in [0, 1]; per-image metrics come back with shape (...)."""
import torch
import torch.nn.functional as F


def psnr(pred, target, max_val=1.0):
    mse = (pred - target).pow(2).mean(dim=(-3, -2, -1)).clamp(min=1e-10)
    return 10 * torch.log10(max_val**2 / mse)


def masked_psnr(pred, target, mask, max_val=1.0):
    """PSNR over the foreground only: mask (..., 1, H, W) in [0, 1], e.g. the target's alpha."""
    err = ((pred - target).pow(2) * mask).sum(dim=(-3, -2, -1))
    mse = (err / (mask.sum(dim=(-3, -2, -1)) * pred.shape[-3]).clamp(min=1e-8)).clamp(min=1e-10)
    return 10 * torch.log10(max_val**2 / mse)


def ssim(pred, target, max_val=1.0, window_size=11, sigma=1.5):
    """SSIM with a Gaussian window, per channel, 'valid' convolution (as pytorch-msssim)."""
    lead, (C, H, W) = pred.shape[:-3], pred.shape[-3:]
    x, y = pred.reshape(-1, C, H, W), target.reshape(-1, C, H, W)  # (N, C, H, W)
    g = torch.arange(window_size, dtype=x.dtype, device=x.device) - (window_size - 1) / 2
    g = torch.exp(-g**2 / (2 * sigma**2))
    g = (g / g.sum()).expand(C, 1, 1, window_size)  # (C, 1, 1, k): one separable filter per channel

    def blur(t):  # separable: along W, then along H
        return F.conv2d(F.conv2d(t, g, groups=C), g.transpose(-1, -2), groups=C)

    mu_x, mu_y = blur(x), blur(y)
    var_x, var_y, cov = blur(x * x) - mu_x**2, blur(y * y) - mu_y**2, blur(x * y) - mu_x * mu_y
    c1, c2 = (0.01 * max_val) ** 2, (0.03 * max_val) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s.mean(dim=(-3, -2, -1)).reshape(lead)


# ----------------------------------------------------------------------------------------------
# Perceptual losses (GS-LRM)
# (train_gslrm.py)

# (end of section: Perceptual losses (GS-LRM))


# ----------------------------------------------------------------------------------------------
# Diffusion losses (multi-view diffusion)
# (train_mvdiff.py)

# (end of section: Diffusion losses (multi-view diffusion))


# ----------------------------------------------------------------------------------------------
# Dance losses and metrics
# (train_dance.py)

# (end of section: Dance losses and metrics)
