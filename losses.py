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


def min_snr_weight(alphas_cumprod_t, gamma=5.0, prediction_type="v_prediction"):
    """Min-SNR-gamma loss weights (Hang et al. 2023) for the timesteps' alpha-bar values, shape kept.
    Min-SNR means weighting the x0 error by min(SNR, gamma). The eps error equals SNR x the x0 error,
    so the eps loss gets min(SNR, gamma) / SNR; the v error equals (SNR + 1) x the x0 error, so the v loss
    gets min(SNR, gamma) / (SNR + 1) -- which also stays finite at SNR = 0 (zero-terminal-SNR schedules),
    where the eps form would divide by zero."""
    snr = alphas_cumprod_t / (1 - alphas_cumprod_t)
    clipped = snr.clamp(max=gamma)
    if prediction_type == "epsilon":
        return clipped / snr
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    raise ValueError(f"prediction_type {prediction_type!r}: expected epsilon or v_prediction")


def weighted_mse(pred, target, weight):
    """Per-sample MSE (mean over every dim but the first) times weight (B,), averaged over the batch."""
    per_sample = (pred.float() - target.float()).pow(2).flatten(1).mean(1)  # (B,)
    return (per_sample * weight).mean()


# (end of section: Diffusion losses (multi-view diffusion))


# ----------------------------------------------------------------------------------------------
# Dance losses and metrics
# (train_dance.py)

# (end of section: Dance losses and metrics)
