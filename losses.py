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
IMAGENET_MEAN = (0.485, 0.456, 0.406)
# FaceLift's weights for [the image itself, relu1_2, relu2_2, relu3_2, relu4_2, relu5_2]
PERCEPTUAL_WEIGHTS = (1.0, 1 / 2.6, 1 / 4.8, 1 / 3.7, 1 / 5.6, 10 / 1.5)


def perceptual_loss(vgg19, pred, target):
    """FaceLift's VGG19 perceptual loss: L1 between the images and between 5 ReLU activations,
    weighted by PERCEPTUAL_WEIGHTS, on inputs x255 minus the ImageNet means (the caffe-style
    preprocessing these weights were chosen for). The sum is divided by 255 (as FaceLift does)
    to bring it back to the scale of [0, 1] images. pred, target (N, 3, H, W) in [0, 1] -> scalar."""
    mean = torch.tensor(IMAGENET_MEAN, device=pred.device, dtype=pred.dtype)[:, None, None] * 255
    x, y = pred * 255 - mean, target * 255 - mean  # (N, 3, H, W)
    loss = PERCEPTUAL_WEIGHTS[0] * (x - y).abs().mean()
    with torch.no_grad():
        fy = vgg19(y)
    for w, a, b in zip(PERCEPTUAL_WEIGHTS[1:], vgg19(x), fy):
        loss = loss + w * (a - b).abs().mean()
    return loss / 255


LPIPS_SHIFT, LPIPS_SCALE = (-0.030, -0.088, -0.188), (0.458, 0.448, 0.450)


def lpips(vgg16, heads, pred, target):
    """LPIPS (v0.1, vgg): unit-normalise each VGG16 activation over channels, weight the squared
    difference per channel by the learned head, average over space, sum over the 5 layers.
    pred, target (..., 3, H, W) in [0, 1] -> (...)."""
    lead = pred.shape[:-3]
    shift = torch.tensor(LPIPS_SHIFT, device=pred.device)[:, None, None]
    scale = torch.tensor(LPIPS_SCALE, device=pred.device)[:, None, None]
    x, y = ((t.reshape(-1, *t.shape[-3:]) * 2 - 1 - shift) / scale for t in (pred, target))  # (N, 3, H, W)
    dist = 0
    for w, a, b in zip(heads, vgg16(x), vgg16(y)):
        a, b = a / (a.norm(dim=1, keepdim=True) + 1e-10), b / (b.norm(dim=1, keepdim=True) + 1e-10)
        dist = dist + ((a - b) ** 2 * w.to(a)[:, None, None]).sum(1).mean((-2, -1))  # (N,)
    return dist.reshape(lead)

# (end of section: Perceptual losses (GS-LRM))


# ----------------------------------------------------------------------------------------------
# Diffusion losses (multi-view diffusion)
# (train_mvdiff.py)

# (end of section: Diffusion losses (multi-view diffusion))


# ----------------------------------------------------------------------------------------------
# Dance losses and metrics
# (train_dance.py)

# (end of section: Dance losses and metrics)
