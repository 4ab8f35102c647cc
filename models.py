"""Every nn.Module of the project and the math they need.

Camera rays and ray encodings; the 3D Gaussian rasterizer (gsplat on CUDA, our own sparse
pure-PyTorch rasterizer everywhere else, and a dense all-pairs reference that tests use as the
oracle); GS-LRM as released with FaceLift; FaceLift's multi-view UNet and its sampler; the dance
modules (music-to-pose encoder, ArcFace's IResNet); loaders for released checkpoints.
Conventions are 3DGS/gsplat's: OpenCV cameras (x right, y down, z forward),
`w2c` world-to-camera matrices, intrinsics as 3x3 `K`, quaternions (w, x, y, z), RGB colours.
"""
import json
import math
import re
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0
from einops import rearrange, repeat
from safetensors.torch import load_file, save_file
from torch.utils.checkpoint import checkpoint

class UserError(Exception):
    """A problem with the user's files or flags, not a bug: the scripts print it as one line
    `error: ...` and exit with code 2 (a traceback with --debug or MOUSELIFT_DEBUG=1)."""


class InputError(UserError, ValueError):
    """A file's content or a flag's value is wrong (the message names which)."""


# ----------------------------------------------------------------------------------------------
# Cameras and rays


def look_at_c2w(eye, target=(0.0, 0.0, 0.0), up=(0.0, 0.0, 1.0)):
    """OpenCV camera-to-world matrix (4, 4) of a camera at `eye` looking at `target`, with world
    `up` pointing up in the image (camera y = down)."""
    eye, target, up = (torch.as_tensor(v, dtype=torch.float64) for v in (eye, target, up))
    z = F.normalize(target - eye, dim=0)  # forward
    x = F.normalize(torch.linalg.cross(z, up), dim=0)  # right = forward x up
    y = torch.linalg.cross(z, x)  # down, so that x, y, z is right-handed
    c2w = torch.eye(4, dtype=torch.float64)
    c2w[:3, :3] = torch.stack([x, y, z], dim=1)
    c2w[:3, 3] = eye
    return c2w


def intrinsics_matrix(fxfycxcy):
    """(..., 4) fx, fy, cx, cy -> (..., 3, 3) K."""
    fx, fy, cx, cy = fxfycxcy.unbind(-1)
    K = torch.zeros(fxfycxcy.shape[:-1] + (3, 3), dtype=fxfycxcy.dtype, device=fxfycxcy.device)
    K[..., 0, 0], K[..., 1, 1], K[..., 0, 2], K[..., 1, 2], K[..., 2, 2] = fx, fy, cx, cy, 1.0
    return K


def get_rays(c2w, fxfycxcy, H, W):
    """Rays through pixel centres (x + 0.5, y + 0.5).
    c2w (..., 4, 4), fxfycxcy (..., 4) -> origins, unit world directions, each (..., H, W, 3)."""
    dev, dt = c2w.device, c2w.dtype
    ys, xs = torch.meshgrid(torch.arange(H, device=dev, dtype=dt) + 0.5,
                            torch.arange(W, device=dev, dtype=dt) + 0.5, indexing="ij")  # (H, W)
    fx, fy, cx, cy = (t[..., None, None] for t in fxfycxcy.unbind(-1))  # (..., 1, 1)
    x_cam = (xs - cx) / fx  # (..., H, W)
    d_cam = torch.stack([x_cam, (ys - cy) / fy, torch.ones_like(xs).expand_as(x_cam)], -1)  # (..., H, W, 3)
    dirs = F.normalize(torch.einsum("...ij,...hwj->...hwi", c2w[..., :3, :3], d_cam), dim=-1)
    origins = c2w[..., None, None, :3, 3].expand_as(dirs)  # (..., H, W, 3)
    return origins, dirs


def ray_encoding_facelift(origins, dirs):
    """FaceLift's per-pixel ray channels (..., 6): the direction d, then the point on the ray
    closest to the world origin, o + (-o.d) d (a ray is then independent of where its origin sits)."""
    t = -(origins * dirs).sum(-1, keepdim=True)  # (..., 1)
    return torch.cat([dirs, origins + t * dirs], dim=-1)


def plucker(origins, dirs):
    """Standard Plücker coordinates (..., 6): (o x d, d)."""
    return torch.cat([torch.linalg.cross(origins, dirs, dim=-1), dirs], dim=-1)


# ----------------------------------------------------------------------------------------------
# Gaussian rasterizer
#
# Semantics shared by every back end (those of 3DGS / gsplat "classic"): EWA projection with a
# 0.3 px low-pass on the 2D covariance, Gaussians nearer than NEAR culled, a Gaussian touches
# only the pixels inside its footprint ellipse, alpha = opacity * exp(-maha^2 / 2) clamped at
# ALPHA_MAX and dropped below 1/255, front-to-back compositing that stops before the
# transmittance would fall to T_MIN.

NEAR, EPS2D, ALPHA_MIN, ALPHA_MAX, T_MIN = 0.01, 0.3, 1.0 / 255.0, 0.99, 1e-4
# Footprint radius in standard deviations. 3.33 (gsplat's) is where a fully opaque Gaussian's
# alpha reaches 1/255: a tighter cut would drop pixels that gsplat draws.
FOOTPRINT_SIGMAS = 3.33


def quat_to_rotmat(q):
    """(..., 4) quaternion (w, x, y, z), any norm -> (..., 3, 3) rotation."""
    w, x, y, z = F.normalize(q, dim=-1).unbind(-1)
    R = torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
                     2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
                     2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1)
    return R.unflatten(-1, (3, 3))  # (..., 3, 3)


def project_gaussians(means, quats, scales, opacities, w2c, K, H, W):
    """EWA projection of N Gaussians into C cameras (shared by every CPU back end).
    means (..., N, 3), quats (..., N, 4), scales (..., N, 3), opacities (..., N), w2c (..., C, 4, 4),
    K (..., C, 3, 3).
    Returns means2d (..., C, N, 2), conics (..., C, N, 3) = upper triangle of the inverse 2D
    covariance, depths (..., C, N), the footprint's pixel box (..., C, N, 4) = x0, x1, y0, y1
    (inclusive, clipped to the image) and valid (..., C, N)."""
    R, t = w2c[..., :3, :3], w2c[..., :3, 3]
    p = torch.einsum("...cij,...nj->...cni", R, means) + t[..., :, None, :]  # (..., C, N, 3)
    z = p[..., 2]
    in_front = z > NEAR
    z = torch.where(in_front, z, torch.ones_like(z))  # culled ones get a harmless depth: no NaN grads
    fx, fy, cx, cy = (K[..., i, j, None] for i, j in ((0, 0), (1, 1), (0, 2), (1, 2)))  # (..., C, 1)
    means2d = torch.stack([fx * p[..., 0] / z + cx, fy * p[..., 1] / z + cy], -1)  # (..., C, N, 2)

    M = quat_to_rotmat(quats) * scales[..., None, :]  # (..., N, 3, 3) = R_q diag(s)
    cov3 = M @ M.transpose(-1, -2)  # (..., N, 3, 3)
    cov_cam = torch.einsum("...cij,...njk,...clk->...cnil", R, cov3, R)  # (..., C, N, 3, 3)
    # The Jacobian is evaluated at a point clamped to a little beyond the view frustum (as 3DGS
    # does), so Gaussians far off-screen do not get absurd footprints.
    tx = z * torch.clamp(p[..., 0] / z, -(cx / fx + 0.15 * W / fx), (W - cx) / fx + 0.15 * W / fx)
    ty = z * torch.clamp(p[..., 1] / z, -(cy / fy + 0.15 * H / fy), (H - cy) / fy + 0.15 * H / fy)
    zero = torch.zeros_like(z)
    J = torch.stack([fx / z, zero, -fx * tx / z**2,
                     zero, fy / z, -fy * ty / z**2], -1).unflatten(-1, (2, 3))  # (..., C, N, 2, 3)
    low_pass = EPS2D * torch.eye(2, dtype=p.dtype, device=p.device)
    cov2 = J @ cov_cam @ J.transpose(-1, -2) + low_pass  # (..., C, N, 2, 2)
    a, b, c = cov2[..., 0, 0], cov2[..., 0, 1], cov2[..., 1, 1]
    det = (a * c - b * b).clamp(min=1e-12)
    conics = torch.stack([c / det, -b / det, a / det], -1)  # (..., C, N, 3)

    with torch.no_grad():  # the footprint: tight box around the ellipse where alpha can reach 1/255
        # opacity * exp(-maha^2 / 2) >= 1/255  <=>  maha <= sqrt(2 ln(255 opacity)): a faint Gaussian
        # gets a smaller box. The pairs this leaves out would all be dropped by the 1/255 test, so
        # the image is the same; there are just fewer pairs to build.
        o = opacities[..., None, :].expand_as(a)  # (..., C, N)
        sig = torch.sqrt(2 * torch.log((255 * o).clamp(min=1))).clamp(max=FOOTPRINT_SIGMAS)
        rx, ry = sig * a.sqrt(), sig * c.sqrt()
        u, v = means2d[..., 0], means2d[..., 1]
        # pixel i's centre is i + 0.5; keep the integer pixels whose centre is in the box
        box = torch.stack([torch.ceil(u - rx - 0.5).clamp(min=0), torch.floor(u + rx - 0.5).clamp(max=W - 1),
                           torch.ceil(v - ry - 0.5).clamp(min=0),
                           torch.floor(v + ry - 0.5).clamp(max=H - 1)], -1)  # (..., C, N, 4)
        valid = (in_front & (o >= ALPHA_MIN) & (box[..., 0] <= box[..., 1]) & (box[..., 2] <= box[..., 3])
                 & torch.isfinite(box).all(-1))
        box = torch.where(valid[..., None], box, torch.zeros_like(box)).long()  # (..., C, N, 4)
    return means2d, conics, p[..., 2], box, valid


def _pair_alpha(dx, dy, conic, opacity):
    """alpha of (Gaussian, pixel) pairs and the mask of pairs that count (footprint and 1/255)."""
    maha2 = conic[..., 0] * dx * dx + 2 * conic[..., 1] * dx * dy + conic[..., 2] * dy * dy
    alpha = (opacity * torch.exp(-0.5 * maha2)).clamp(max=ALPHA_MAX)
    keep = (maha2 <= FOOTPRINT_SIGMAS**2) & (alpha >= ALPHA_MIN)
    return alpha, keep


def _flatten_batch(means, quats, scales, opacities, colors, w2c, K, bg):
    """Give every input one leading batch dim so back ends deal with (B, ...) only."""
    batch = means.shape[:-2]
    flat = lambda x, n: x.reshape((-1,) + x.shape[len(batch):]) if x.dim() > n else x[None]  # noqa: E731
    C, D = w2c.shape[-3], colors.shape[-1]
    bg = torch.as_tensor(bg, dtype=colors.dtype, device=colors.device).expand(batch + (C, D))  # (..., C, D)
    out = [flat(means, 2), flat(quats, 2), flat(scales, 2), flat(opacities, 1), flat(colors, 2),
           flat(w2c, 3), flat(K, 3), flat(bg, 2)]
    return batch, out


def render_gaussians(means, quats, scales, opacities, colors, w2c, K, H, W, bg, backend="auto"):
    """Render N Gaussians into C cameras, batched over any leading dims.
    means (..., N, 3), quats (..., N, 4) (w, x, y, z), scales (..., N, 3) (not log), opacities
    (..., N) in [0, 1], colors (..., N, D), w2c (..., C, 4, 4), K (..., C, 3, 3), bg: a float or
    (D,) or (..., C, D) background. Returns colour (..., C, H, W, D) and alpha (..., C, H, W, 1).
    Differentiable in every Gaussian parameter. Always fp32, also under autocast.
    backend: 'gsplat' (CUDA), 'sparse' (pure PyTorch), 'dense' (the all-pairs test oracle) or
    'auto' (gsplat on CUDA when it is installed, else sparse)."""
    if backend == "auto":
        backend = "gsplat" if means.is_cuda and _gsplat_available() else "sparse"
    fn = {"gsplat": _render_gsplat, "sparse": _render_sparse, "dense": _render_dense}[backend]
    dtype = torch.float64 if means.dtype == torch.float64 else torch.float32
    args = [x.to(dtype) for x in (means, quats, scales, opacities, colors, w2c, K)]
    with torch.autocast(means.device.type, enabled=False):
        batch, flat = _flatten_batch(*args, bg)
        rgb, alpha = fn(*flat, H, W)  # (B, C, H, W, D), (B, C, H, W, 1)
    return rgb.reshape(batch + rgb.shape[1:]), alpha.reshape(batch + alpha.shape[1:])


def _gsplat_available():
    try:
        import gsplat  # noqa: F401
        return True
    except ImportError:
        return False


def _render_gsplat(means, quats, scales, opacities, colors, w2c, K, bg, H, W):
    from gsplat import rasterization
    rgb, alpha, _ = rasterization(means, quats, scales, opacities, colors, w2c, K, W, H, near_plane=NEAR,
                                  eps2d=EPS2D, backgrounds=bg, packed=False, rasterize_mode="classic")
    return rgb, alpha


def _render_sparse(means, quats, scales, opacities, colors, w2c, K, bg, H, W):
    """Sparse rasterizer: only (Gaussian, pixel) pairs inside each footprint exist, so time and
    memory scale with the number of pairs, not Gaussians x pixels."""
    B, C, N, D = w2c.shape[0], w2c.shape[1], means.shape[1], colors.shape[-1]
    means2d, conics, depths, box, valid = project_gaussians(means, quats, scales, opacities, w2c, K, H, W)
    cam, gid = valid.flatten(0, 1).nonzero(as_tuple=True)  # (E,) visible entries: camera b*C+c, Gaussian n
    entry, g = cam * N + gid, (cam // C) * N + gid  # index into (B*C*N) projections / (B*N) Gaussians
    # everything a pair needs from its entry, in one tensor so that one gather (and one
    # index_add in backward) serves all of it: u, v | conic 3 | opacity | colour D
    ent = torch.cat([means2d.flatten(0, 2)[entry], conics.flatten(0, 2)[entry],
                     opacities.flatten()[g, None], colors.flatten(0, 1)[g]], -1)  # (E, 6 + D)
    with torch.no_grad():
        x0, x1, y0, y1 = box.flatten(0, 2)[entry].unbind(-1)  # (E,) each
        bw, count = x1 - x0 + 1, (x1 - x0 + 1) * (y1 - y0 + 1)
        entries = torch.arange(len(cam), device=cam.device)  # (E,)
        e = torch.repeat_interleave(entries, count)  # (P,) entry of each pair
        local = torch.arange(len(e), device=e.device) - (count.cumsum(0) - count)[e]
        px, py = x0[e] + local % bw[e], y0[e] + local // bw[e]
        pe = ent.detach().index_select(0, e)
        _, keep = _pair_alpha(px + 0.5 - pe[:, 0], py + 0.5 - pe[:, 1], pe[:, 2:5], pe[:, 5])
        keep = keep.nonzero().squeeze(1)
        e, px, py = e[keep], px[keep], py[keep]
        pix = cam[e] * (H * W) + py * W + px  # (P,) flat output pixel
        # sort pairs by (pixel, depth): the depth rank among all entries orders each pixel's list
        depth_rank = torch.empty_like(cam)
        depth_rank[depths.flatten()[entry].argsort()] = torch.arange(len(cam), device=cam.device)
        order = (pix * max(len(cam), 1) + depth_rank[e]).argsort()
        e, px, py, pix = e[order], px[order], py[order], pix[order]

    # split (not slicing) so that backward concatenates the pieces' grads instead of
    # scattering each into its own zero-filled (P, 6 + D) buffer
    u, v, conic, opac, col = ent.index_select(0, e).split([1, 1, 3, 1, D], dim=1)  # (P, .) each
    alpha, _ = _pair_alpha(px + 0.5 - u[:, 0], py + 0.5 - v[:, 0], conic, opac[:, 0])  # (P,)
    # Exclusive transmittance per pixel = exp(segmented cumsum of log(1 - alpha)). The running
    # sum spans all pixels, so it is taken in float64 to keep the per-pixel differences exact.
    la = torch.log1p(-alpha.double())
    cs = la.cumsum(0)
    first = torch.ones_like(pix, dtype=torch.bool)
    first[1:] = pix[1:] != pix[:-1]
    seg = first.cumsum(0) - 1  # (P,) segment (= pixel list) of each pair
    before = (cs - la)[first][seg]  # sum of log(1 - alpha) of all earlier pixels' pairs
    T_excl, T_incl = torch.exp(cs - la - before), torch.exp(cs - before)
    w = (alpha * T_excl * (T_incl > T_MIN)).to(alpha.dtype)  # (P,) compositing weight

    rgb = torch.zeros(B * C * H * W, D, dtype=colors.dtype, device=colors.device)
    rgb = rgb.index_add(0, pix, w[:, None] * col)  # (B*C*H*W, D)
    acc = torch.zeros(B * C * H * W, dtype=w.dtype, device=w.device).index_add(0, pix, w)
    rgb = rgb.view(B, C, H, W, D) + (1 - acc.view(B, C, H, W, 1)) * bg[:, :, None, None, :]
    return rgb, acc.view(B, C, H, W, 1)


def _render_dense(means, quats, scales, opacities, colors, w2c, K, bg, H, W):
    """Dense all-pairs reference rasterizer: every Gaussian against every pixel, composited with
    cumprod. O(N x H x W) memory; only for tests and benchmarks."""
    means2d, conics, depths, box, valid = project_gaussians(means, quats, scales, opacities, w2c, K, H, W)
    ys, xs = torch.meshgrid(torch.arange(H, device=means.device), torch.arange(W, device=means.device),
                            indexing="ij")  # (H, W)
    xs, ys = xs.flatten(), ys.flatten()  # (HW,)
    dx = xs + 0.5 - means2d[..., 0, None]  # (B, C, N, HW)
    dy = ys + 0.5 - means2d[..., 1, None]
    alpha, keep = _pair_alpha(dx, dy, conics[..., None, :], opacities[:, None, :, None])
    x0, x1, y0, y1 = box[..., None].unbind(-2)  # (B, C, N, 1) each
    keep = keep & valid[..., None] & (xs >= x0) & (xs <= x1) & (ys >= y0) & (ys <= y1)
    alpha = torch.where(keep, alpha, torch.zeros_like(alpha))
    order = depths.masked_fill(~valid, math.inf).argsort(-1)  # (B, C, N) front to back
    alpha = alpha.gather(2, order[..., None].expand_as(alpha))
    T_incl = torch.cumprod(1 - alpha, dim=2)
    T_excl = torch.cat([torch.ones_like(T_incl[:, :, :1]), T_incl[:, :, :-1]], dim=2)
    w = alpha * T_excl * (T_incl > T_MIN)  # (B, C, N, HW)
    by_depth = order[..., None].expand(-1, -1, -1, colors.shape[-1])  # (B, C, N, D)
    col = colors[:, None].expand(-1, w.shape[1], -1, -1).gather(2, by_depth)  # (B, C, N, D)
    rgb = torch.einsum("bcnp,bcnd->bcpd", w, col)  # (B, C, HW, D)
    acc = w.sum(2)[..., None]  # (B, C, HW, 1)
    rgb = rgb + (1 - acc) * bg[:, :, None, :]
    return rgb.unflatten(2, (H, W)), acc.unflatten(2, (H, W))  # (B, C, H, W, D), (B, C, H, W, 1)


# ----------------------------------------------------------------------------------------------
# GS-LRM, exactly as released with FaceLift: posed views -> one pixel-aligned Gaussian per pixel
# (+ 2 free Gaussians from 2 learned tokens). A plain pre-LN transformer over all views' patches.

GSLRM_CONFIGS = {
    "tiny": dict(d=32, layers=2, heads=2, patch=8),  # tests
    "toy": dict(d=192, layers=6, heads=3, patch=4),  # the CPU toy run (32 px views)
    "facelift": dict(d=1024, layers=24, heads=16, patch=8),  # FaceLift's released model (512 px views)
}
SH_C0 = 0.28209479177387814  # degree-0 spherical harmonic: rgb = 0.5 + SH_C0 * sh_dc


class SelfAttention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.to_qkv = nn.Linear(d, 3 * d, bias=False)
        self.fc = nn.Linear(d, d, bias=False)

    def forward(self, x):
        qkv = self.to_qkv(x).chunk(3, dim=-1)
        q, k, v = (rearrange(t, "b l (h e) -> b h l e", h=self.heads) for t in qkv)  # (B, heads, L, d_head)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, heads, L, d_head)
        return self.fc(rearrange(x, "b h l e -> b l (h e)"))


class Block(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d, bias=False), nn.LayerNorm(d, bias=False)
        self.attn = SelfAttention(d, heads)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d, bias=False), nn.GELU(), nn.Linear(4 * d, d, bias=False))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class GSLRM(nn.Module):
    def __init__(self, d, layers, heads, patch, grad_checkpoint=False, deferred_render=False):
        super().__init__()
        self.patch, self.grad_checkpoint, self.deferred_render = patch, grad_checkpoint, deferred_render
        self.patch_embed = nn.Linear(9 * patch * patch, d, bias=False)
        self.extra_tokens = nn.Parameter(torch.zeros(2, d))
        self.input_norm = nn.LayerNorm(d, bias=False)
        self.blocks = nn.ModuleList([Block(d, heads) for _ in range(layers)])
        self.extra_head = nn.Sequential(nn.LayerNorm(d, bias=False), nn.Linear(d, 14, bias=False))
        self.pixel_head = nn.Sequential(nn.LayerNorm(d, bias=False),
                                        nn.Linear(d, patch * patch * 14, bias=False))
        self.initialize_weights()

    def initialize_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        nn.init.trunc_normal_(self.extra_tokens, std=0.02)

    def forward(self, images, c2w, fxfycxcy):
        """images (B, V, 3, H, W) in [0, 1], c2w (B, V, 4, 4), fxfycxcy (B, V, 4) ->
        Gaussians {means, scales, quats, opacities, rgb}, each (B, 2 + V*H*W, ...)."""
        B, V, _, H, W = images.shape
        p = self.patch
        o, d = get_rays(c2w, fxfycxcy, H, W)  # (B, V, H, W, 3) each
        rays = rearrange(ray_encoding_facelift(o, d), "b v h w c -> b v c h w")  # (B, V, 6, H, W)
        x = torch.cat([images * 2 - 1, rays.to(images.dtype)], dim=2)  # (B, V, 9, H, W)
        x = rearrange(x, "b v c (h ph) (w pw) -> b (v h w) (ph pw c)", ph=p, pw=p)  # (B, V*h*w, 9*p*p)
        x = torch.cat([self.extra_tokens.expand(B, -1, -1), self.patch_embed(x)], dim=1)  # (B, 2 + V*h*w, d)
        x = self.input_norm(x)
        ckpt = self.grad_checkpoint and self.training
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if ckpt else block(x)
        extra = self.extra_head(x[:, :2])  # (B, 2, 14)
        pix = rearrange(self.pixel_head(x[:, 2:]), "b (v h w) (ph pw c) -> b v (h ph) (w pw) c",
                        v=V, h=H // p, ph=p, pw=p)  # (B, V, H, W, 14)
        # Pixel-aligned: each Gaussian sits on its pixel's ray, within +-1.8 of the ray's point
        # closest to the origin (so the depth range does not depend on the camera distance).
        t_mid = -(o * d).sum(-1, keepdim=True)  # (B, V, H, W, 1)
        depth = (2 * torch.sigmoid(pix[..., :3].float().mean(-1, keepdim=True)) - 1) * 1.8 + t_mid
        xyz = o + depth * d  # (B, V, H, W, 3)
        pix = torch.cat([xyz.to(pix.dtype), pix[..., 3:]], -1).flatten(1, 3)  # (B, V*H*W, 14)
        # Order: the 2 extra Gaussians, then one per pixel by view, image row, image column. FaceLift's
        # list goes by view, patch row, patch column, row in patch, column in patch (same set, other order).
        raw = torch.cat([extra, pix], dim=1).float()  # (B, 2 + V*H*W, 14)
        xyz, sh, scale, rot, opac = raw.split([3, 3, 3, 4, 1], dim=-1)
        return {"means": xyz, "rgb": 0.5 + SH_C0 * sh, "scales": torch.exp((scale - 2.3).clamp(max=-1.2)),
                "quats": F.normalize(rot, dim=-1), "opacities": torch.sigmoid(opac[..., 0] - 2.0)}

    def render(self, gaussians, c2w, fxfycxcy, H, W, bg=1.0):
        """Gaussians (B, N, ...) -> images (B, V, 4, H, W) seen by cameras c2w (B, V, 4, 4):
        RGB composited on `bg`, then the accumulated opacity (alpha)."""
        g = gaussians
        args = (g["means"], g["quats"], g["scales"], g["opacities"], g["rgb"].clamp(min=0),
                torch.linalg.inv(c2w.float()), intrinsics_matrix(fxfycxcy.float()))
        render = DeferredRender.apply if self.deferred_render and torch.is_grad_enabled() else _render_views
        return render(H, W, bg, *args)


def _render_views(H, W, bg, means, quats, scales, opacities, colors, w2c, K):
    # rgb (B, V, H, W, 3), alpha (B, V, H, W, 1)
    rgb, alpha = render_gaussians(means, quats, scales, opacities, colors, w2c, K, H, W, bg)
    return rearrange(torch.cat([rgb, alpha], -1), "b v h w c -> b v c h w")  # (B, V, 4, H, W)


class DeferredRender(torch.autograd.Function):
    """Render all views without a graph; in backward re-render one view at a time with a graph.
    Peak memory is then one view's rasterizer state instead of all V views' (FaceLift's
    deferred rendering), at the cost of rendering twice."""

    @staticmethod
    def forward(ctx, H, W, bg, *tensors):
        ctx.H, ctx.W, ctx.bg = H, W, bg
        ctx.save_for_backward(*tensors)
        with torch.no_grad():
            return _render_views(H, W, bg, *tensors)

    @staticmethod
    def backward(ctx, grad_out):  # grad_out (B, V, 4, H, W)
        tensors = ctx.saved_tensors
        gaussians, cams = [t.detach().requires_grad_() for t in tensors[:5]], tensors[5:]
        for v in range(grad_out.shape[1]):
            with torch.enable_grad():
                out = _render_views(ctx.H, ctx.W, ctx.bg, *gaussians, *(c[:, v:v + 1] for c in cams))
                out.backward(grad_out[:, v:v + 1])
        return (None, None, None, *(t.grad for t in gaussians), None, None)


def check_keys(where, ours, theirs, ignore=lambda k: False):
    """Stop with a KeyError naming up to 8 missing and 8 unexpected keys (not counting `ignore`d ones)
    unless the key sets `ours` (what we load into) and `theirs` (what the file holds) are equal."""
    missing = sorted(k for k in set(ours) - set(theirs) if not ignore(k))
    unexpected = sorted(k for k in set(theirs) - set(ours) if not ignore(k))
    if missing or unexpected:
        def first(keys):
            return f"{keys[:8]}" + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")
        raise KeyError(f"{where}: missing keys {first(missing)}, unexpected keys {first(unexpected)} "
                       f"({len(missing)} missing, {len(unexpected)} unexpected)")


def facelift_gslrm_key_map(layers):
    """FaceLift's GS-LRM state-dict keys -> ours."""
    kmap = {"patch_embedder.1.weight": "patch_embed.weight",
            "gaussian_position_embeddings": "extra_tokens",
            "input_layer_norm.weight": "input_norm.weight",
            "gaussian_upsampler.layernorm.weight": "extra_head.0.weight",
            "gaussian_upsampler.linear.weight": "extra_head.1.weight",
            "pixel_gaussian_decoder.0.weight": "pixel_head.0.weight",
            "pixel_gaussian_decoder.1.weight": "pixel_head.1.weight"}
    for i in range(layers):
        for theirs, ours in (("norm1", "norm1"), ("norm2", "norm2"), ("attn.to_qkv", "attn.to_qkv"),
                             ("attn.fc", "attn.fc"), ("mlp.mlp.0", "mlp.0"), ("mlp.mlp.2", "mlp.2")):
            kmap[f"transformer_layers.{i}.{theirs}.weight"] = f"blocks.{i}.{ours}.weight"
    return kmap


def load_facelift_gslrm(model, path):
    """Load FaceLift's `ckpt_XXXXXXXXXXXXXXXX.pt` ({'model': state dict, 'optimizer', ...}) into
    `model`: explicit key map, asserted shapes; only the frozen VGG of its loss (`loss_calculator.*`)
    is ignored. Anything else missing or unexpected is an error that lists the keys."""
    # weights_only=False: the file also pickles optimizer/scheduler state. Load only files you trust.
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise InputError(f"{path}: expected a dict with a 'model' state dict (FaceLift's GS-LRM checkpoint)")
    kmap, ours = facelift_gslrm_key_map(len(model.blocks)), model.state_dict()
    check_keys(f"{path}: not a FaceLift GS-LRM checkpoint for this preset ({len(model.blocks)} layers)",
               kmap, ckpt["model"], ignore=lambda k: k.startswith("loss_calculator."))
    theirs = {k: v for k, v in ckpt["model"].items() if k in kmap}
    for k, v in theirs.items():
        if v.shape != ours[kmap[k]].shape:
            raise InputError(f"{path}: {k} has shape {tuple(v.shape)}, "
                             f"our {kmap[k]} expects {tuple(ours[kmap[k]].shape)}")
    model.load_state_dict({kmap[k]: v for k, v in theirs.items()}, strict=True)
    return ckpt


# ----------------------------------------------------------------------------------------------
# Perceptual networks: VGG feature extractors for the perceptual loss and LPIPS
# (GS-LRM losses)
# torchvision's `vgg16().features` / `vgg19().features` layouts, so that their state dicts load
# unchanged (keys `features.{i}.weight`); only the layers up to the deepest tap are built.
# MatConvNet's `imagenet-vgg-verydeep-19.mat` (FaceLift's loss) lists its layers in the same order,
# so its conv `layers[i]` is our `features[i]`.
VGG_LAYERS = {
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
              512, 512, 512, 512],
}
# indices into `features` of the ReLUs whose outputs are compared
VGG_TAPS = {
    "vgg19": (3, 8, 13, 22, 31),  # relu1_2, relu2_2, relu3_2, relu4_2, relu5_2 (FaceLift's perceptual loss)
    "vgg16": (3, 8, 15, 22, 29),  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (LPIPS)
}


class VGGFeatures(nn.Module):
    """A frozen VGG trunk that returns the activations at `VGG_TAPS[arch]`. `pool`: "max"
    (torchvision) or "avg" (FaceLift's VGG19); `preprocess` names the input normalisation that its
    weights expect (the loader sets it; perceptual_loss reads it)."""

    def __init__(self, arch, pool="max"):
        super().__init__()
        self.taps, self.preprocess = VGG_TAPS[arch], "torchvision"
        layers, c_in = [], 3
        for v in VGG_LAYERS[arch]:
            if v == "M":
                layers.append({"max": nn.MaxPool2d, "avg": nn.AvgPool2d}[pool](2, 2))
            else:
                layers += [nn.Conv2d(c_in, v, 3, padding=1), nn.ReLU(inplace=False)]
                c_in = v
            if len(layers) > self.taps[-1]:
                break
        self.features = nn.Sequential(*layers[: self.taps[-1] + 1])
        self.requires_grad_(False).eval()

    def forward(self, x):
        feats = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.taps:
                feats.append(x)
        return feats


def load_vgg(path, arch):
    """VGGFeatures from a MatConvNet `.mat` (load_matconvnet_vgg) or from a torchvision-format state
    dict (`vgg19-dcbb9e9d.pth`): the `features.*` keys we build must all be there; the classifier and
    deeper layers are the only keys ignored. Max pooling, torchvision input normalisation."""
    if str(path).endswith(".mat"):
        return load_matconvnet_vgg(path, arch)
    vgg = VGGFeatures(arch)
    sd = torch.load(path, map_location="cpu", weights_only=True)
    ours = vgg.state_dict()

    def unused(k):  # torchvision's classifier and the layers past our deepest tap
        deeper = re.fullmatch(r"features\.(\d+)\.(weight|bias)", k) and int(k.split(".")[1]) > vgg.taps[-1]
        return k.startswith("classifier.") or deeper

    check_keys(f"{path}: not a torchvision {arch} state dict", ours, sd, ignore=unused)
    vgg.load_state_dict({k: sd[k] for k in ours}, strict=True)
    return vgg


def load_matconvnet_vgg(path, arch):
    """FaceLift's perceptual VGG19 from MatConvNet's `imagenet-vgg-verydeep-19.mat`: `layers` is a
    1xN cell of structs; conv `layers[i]` holds `weights` = {W (3, 3, in, out), b (out)}. Average
    pooling and caffe-style input (RGB x255 minus the mean pixel), as FaceLift uses it."""
    import scipy.io  # only this loader reads .mat files
    if arch != "vgg19":  # LPIPS's vgg16 needs torchvision's weights and normalisation
        raise InputError(f"{path}: MatConvNet weights are read for vgg19 only, not {arch}")
    vgg = VGGFeatures(arch, pool="avg")
    vgg.preprocess = "caffe"
    mat = scipy.io.loadmat(path, variable_names=["layers"])
    if "layers" not in mat:
        raise KeyError(f"{path}: no `layers` cell: not a MatConvNet (imagenet-vgg-verydeep-19) file")
    layers = mat["layers"].ravel()  # (N,) of (1, 1) structs
    sd = {}
    for i, conv in enumerate(vgg.features):
        if not isinstance(conv, nn.Conv2d):
            continue
        want = (3, 3, conv.in_channels, conv.out_channels)
        try:  # W (H, W, in, out), b (out, 1) or (1, out)
            w, b = layers[i].ravel()[0]["weights"].ravel()
        except (IndexError, KeyError, ValueError):  # no such layer, no weights field, not {W, b}
            raise InputError(f"{path}: layer {i} of {len(layers)} is not a conv layer with "
                             f"weights {{W {want}, b ({want[3]},)}}") from None
        if w.shape != want or b.size != want[3]:
            raise InputError(f"{path}: layer {i} has W {w.shape}, b {b.shape}; "
                             f"expected W {want}, b ({want[3]},)")
        sd[f"features.{i}.weight"] = torch.from_numpy(w).permute(3, 2, 0, 1).float()  # (out, in, 3, 3)
        sd[f"features.{i}.bias"] = torch.from_numpy(b).reshape(-1).float()  # (out,)
    vgg.load_state_dict(sd, strict=True)
    return vgg


def load_lpips_heads(path):
    """The LPIPS linear heads (`lpips/weights/v0.1/vgg.pth`: `lin{k}.model.1.weight` of shape
    (1, C_k, 1, 1)) -> a list of 5 tensors (C_k,)."""
    sd = torch.load(path, map_location="cpu", weights_only=True)
    want = [f"lin{k}.model.1.weight" for k in range(5)]
    if sorted(sd) != sorted(want):
        raise KeyError(f"{path}: expected the LPIPS vgg heads {want}, found {sorted(sd)}")
    return [sd[k].flatten() for k in want]


# ----------------------------------------------------------------------------------------------
# Multi-view diffusion: FaceLift's UNet with multi-view attention, the sampler
# (train_mvdiff.py, gen_synthetic.py)
#
# FaceLift's multi-view diffusion model is Stable Diffusion 2.1-unclip's UNet (diffusers key names)
# whose self-attention (`attn1`) lets the views of one object look at each other. The views of an
# object sit consecutively in the batch: (B objects * V views, ...). We keep diffusers'
# UNet2DConditionModel as is and only swap the attention processors, so FaceLift's weights load
# into it unchanged and our checkpoints stay plain diffusers `unet/` folders.

MVDIFF_UNET_CONFIGS = {
    # tests: a few seconds per step on a CPU
    "tiny": dict(sample_size=16, in_channels=6, out_channels=3, layers_per_block=1,
                 block_out_channels=(16, 32),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                 cross_attention_dim=16, attention_head_dim=8, norm_num_groups=8),
    # the toy: pixel-space diffusion at 32 px (3 noisy + 3 reference channels); attention only at 8x8
    # (multi-view and cross), as attention at 16x16 costs more CPU time than the rest of the UNet
    "toy": dict(sample_size=32, in_channels=6, out_channels=3, layers_per_block=1,
                block_out_channels=(32, 64, 96),
                down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
                cross_attention_dim=32, attention_head_dim=16, norm_num_groups=16),
    # FaceLift = SD 2.1-unclip: 4 latent + 4 reference-latent channels, CLIP-H image embedding +
    # noise-level embedding (2 x 1024) through a projection class embedding, OpenCLIP-H text width 1024
    "facelift": dict(sample_size=32, in_channels=8, out_channels=4, layers_per_block=2,
                     block_out_channels=(320, 640, 1280, 1280),
                     down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                     up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                     cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
                     class_embed_type="projection", projection_class_embeddings_input_dim=2048),
}


class MVAttnProcessor:
    """Self-attention across the V views of each object (hidden states (B*V, N, C), views consecutive).
    sparse: each view's queries attend to [reference view's keys/values; its own] concatenated along
    the tokens, the reference view included (it sees its own tokens twice): FaceLift's pattern, which
    its weights were trained with. dense: every view attends to all V*N tokens of its object."""

    def __init__(self, num_views, sparse=True):
        self.num_views, self.sparse = num_views, sparse

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 ref_idx=None):
        # the SD UNet's attn1 uses none of these; refuse rather than silently ignore them
        assert encoder_hidden_states is None and attention_mask is None, (
            "multi-view attention is self-attention only")
        assert attn.group_norm is None and attn.spatial_norm is None and not attn.residual_connection
        assert attn.norm_q is None and attn.norm_k is None and attn.rescale_output_factor == 1.0
        V = self.num_views
        B = hidden_states.shape[0] // V
        if ref_idx is None:
            ref_idx = torch.zeros(B, dtype=torch.long, device=hidden_states.device)  # FaceLift: always view 0
        q, k, v = (rearrange(f(hidden_states), "(b v) n (h d) -> b v h n d", v=V, h=attn.heads)
                   for f in (attn.to_q, attn.to_k, attn.to_v))  # (B, V, heads, N, d) each
        if self.sparse:
            b = torch.arange(B, device=q.device)
            # keys and values: [reference view's; own] along the tokens
            k = torch.cat([k[b, ref_idx][:, None].expand_as(k), k], dim=3)  # (B, V, heads, 2N, d)
            v = torch.cat([v[b, ref_idx][:, None].expand_as(v), v], dim=3)
            # 4-D inputs: with 5-D ones SDPA falls back to its slow math path
            q, k, v = (rearrange(t, "b v h n d -> (b v) h n d") for t in (q, k, v))
            out = F.scaled_dot_product_attention(q, k, v)  # (B*V, heads, N, d)
            out = rearrange(out, "bv h n d -> bv n (h d)")
        else:
            q, k, v = (rearrange(t, "b v h n d -> b h (v n) d") for t in (q, k, v))  # (B, heads, V*N, d)
            out = F.scaled_dot_product_attention(q, k, v)
            out = rearrange(out, "b h (v n) d -> (b v) n (h d)", v=V)
        return attn.to_out[1](attn.to_out[0](out))  # linear, dropout


class CrossAttnProcessor(AttnProcessor2_0):
    """diffusers' SDPA processor for attn2 (cross-attention to the prompt embeddings), taking and
    ignoring the reference index that the UNet passes to every processor via cross_attention_kwargs."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 ref_idx=None):
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def install_mv_attention(unet, num_views, sparse=True):
    """Every attn1 -> MVAttnProcessor, every attn2 -> CrossAttnProcessor. Returns the attn1 count."""
    mv = MVAttnProcessor(num_views, sparse)
    procs = {name: mv if ".attn1." in name else CrossAttnProcessor() for name in unet.attn_processors}
    n_mv = sum(p is mv for p in procs.values())
    unet.set_attn_processor(procs)  # (empties the dict)
    return n_mv


class MVUNet(nn.Module):
    """A diffusers UNet2DConditionModel run on the V views of B objects at once, with multi-view
    attention and a per-rig-view embedding of the reference view added to the time embedding.
    That embedding starts at zero, so loaded FaceLift weights behave exactly as released (where the
    reference is always view 0) until training teaches the model to read it."""

    def __init__(self, unet, num_views=6, sparse=True):
        super().__init__()
        self.unet, self.num_views, self.sparse = unet, num_views, sparse
        self.n_mv_layers = install_mv_attention(unet, num_views, sparse)
        self.ref_view_embed = nn.Embedding(num_views, unet.time_embedding.linear_2.out_features)
        nn.init.zeros_(self.ref_view_embed.weight)
        # diffusers' forward has no argument for an extra time-embedding term: add it at the output of
        # `time_embedding` (SD has no time_embed_act after it, so this is the embedding every resnet gets)
        self._ref_emb = None
        # a bound method: deepcopy rebinds it to the copy
        self.unet.time_embedding.register_forward_hook(self._add_ref_emb)

    def _add_ref_emb(self, module, inputs, out):
        return out if self._ref_emb is None else out + self._ref_emb

    def forward(self, noisy, t, prompt_embeds, ref_idx, ref_cond, class_labels=None):
        """noisy (B, V, C, H, W); t (B,) one timestep per object; prompt_embeds (V, T, D) or (B, V, T, D);
        ref_idx (B,) long; ref_cond (B, Cr, H, W) concatenated to every view's input (FaceLift: the
        reference's VAE latent; the toy: its pixels); class_labels (B, E) or None -> (B, V, C_out, H, W)."""
        B, V = noisy.shape[:2]
        assert V == self.num_views, f"{V} views, the model was built for {self.num_views}"
        x = torch.cat([noisy, ref_cond[:, None].expand(-1, V, -1, -1, -1)], dim=2)  # (B, V, C + Cr, H, W)
        one_set = prompt_embeds.dim() == 3  # (V, T, D): the same for every object
        ctx = prompt_embeds.expand(B, -1, -1, -1) if one_set else prompt_embeds  # (B, V, T, D)

        def rep(a):  # per object -> per view
            return None if a is None else repeat(a, "b ... -> (b v) ...", v=V)

        self._ref_emb = rep(self.ref_view_embed(ref_idx))  # (B*V, D_t)
        try:
            out = self.unet(rearrange(x, "b v c h w -> (b v) c h w"), rep(t),
                            rearrange(ctx, "b v t d -> (b v) t d"), class_labels=rep(class_labels),
                            cross_attention_kwargs={"ref_idx": ref_idx}).sample  # (B*V, C_out, H, W)
        finally:
            self._ref_emb = None
        return rearrange(out, "(b v) c h w -> b v c h w", v=V)


def build_mv_unet(preset, num_views=6, sparse=True, **overrides):
    from diffusers import UNet2DConditionModel
    return MVUNet(UNet2DConditionModel(**{**MVDIFF_UNET_CONFIGS[preset], **overrides}), num_views, sparse)


# FaceLift's unet/config.json names its own classes; the weights are those of the plain diffusers blocks
FACELIFT_BLOCK_MAP = {"CrossAttnDownBlockMV2D": "CrossAttnDownBlock2D",
                      "UNetMidBlockMV2DCrossAttn": "UNetMidBlock2DCrossAttn",
                      "CrossAttnUpBlockMV2D": "CrossAttnUpBlock2D"}
# FaceLift's extra keys that MVUNet implements at one value only (its released config's, also the
# default of its UNetMV2DConditionModel): any other value asks for a module we lack
FACELIFT_FIXED_KEYS = {
    "multiview_attention": (True, "self-attention within each view only"),
    "selfattn_block": ("custom", "another self-attention block (FaceLift's code builds only 'custom')"),
    "cd_attention_last": (False, "cross-domain attention after each transformer block"),
    "cd_attention_mid": (False, "cross-domain attention inside each transformer block"),
    "addition_downsample": (False, "an extra downsampling conv branch after the mid block")}
# read by facelift_mv_settings; addition_channels only sizes the addition_downsample branch
FACELIFT_EXTRA_KEYS = ("num_views", "sparse_mv_attention", "addition_channels", *FACELIFT_FIXED_KEYS)
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def unet_config_from_facelift(config, where="config.json"):
    """FaceLift's (or a plain diffusers) UNet config dict -> kwargs of a plain UNet2DConditionModel.
    A FaceLift key asking for a module that MVUNet lacks is a ValueError naming key and value."""
    import inspect as _inspect
    from diffusers import UNet2DConditionModel
    if config.get("_class_name") not in ("UNetMV2DConditionModel", "UNet2DConditionModel"):
        raise InputError(f"{where}: _class_name {config.get('_class_name')!r}, "
                         "expected UNetMV2DConditionModel (FaceLift) or UNet2DConditionModel")
    extra = sorted(k for k in FACELIFT_EXTRA_KEYS if k in config)
    if extra and config["_class_name"] != "UNetMV2DConditionModel":
        raise InputError(f"{where}: FaceLift's keys {extra} in a UNet2DConditionModel config")
    for key, (ours, feature) in FACELIFT_FIXED_KEYS.items():
        if config.get(key, ours) != ours:
            raise InputError(f"{where}: {key}={config[key]!r} asks for {feature}, which MVUNet "
                             f"does not implement (FaceLift's released weights: {key}={ours!r})")
    cfg = {k: v for k, v in config.items() if not k.startswith("_") and k not in FACELIFT_EXTRA_KEYS}
    for key in ("down_block_types", "up_block_types"):
        cfg[key] = [FACELIFT_BLOCK_MAP.get(b, b) for b in cfg[key]]
    if "mid_block_type" in cfg:
        cfg["mid_block_type"] = FACELIFT_BLOCK_MAP.get(cfg["mid_block_type"], cfg["mid_block_type"])
    unknown = sorted(set(cfg) - set(_inspect.signature(UNet2DConditionModel.__init__).parameters))
    if unknown:
        raise InputError(f"{where}: keys {unknown} are neither UNet2DConditionModel arguments "
                         f"nor FaceLift's known extras {FACELIFT_EXTRA_KEYS}")
    return cfg


def facelift_mv_settings(config, where="config.json"):
    """(num_views, sparse) that FaceLift's unet config describes; None for a plain diffusers config
    (ours). FaceLift writes both keys; its defaults (1 view, dense) are not what it trained."""
    if config.get("_class_name") != "UNetMV2DConditionModel":
        return None
    missing = [k for k in ("num_views", "sparse_mv_attention") if k not in config]
    if missing:
        raise InputError(f"{where}: no {missing} in a UNetMV2DConditionModel config")
    V, sparse = config["num_views"], config["sparse_mv_attention"]
    if type(V) is not int or V < 1 or type(sparse) is not bool:
        raise InputError(f"{where}: num_views={V!r}, sparse_mv_attention={sparse!r}: "
                         "expected a positive int and a bool")
    return V, sparse


def load_unet(path):
    """A plain diffusers UNet2DConditionModel from a `unet/` folder in FaceLift's layout (its
    config names UNetMV2DConditionModel and MV block types) or ours (save_pretrained). Weights must
    match exactly: missing or unexpected keys and wrong shapes stop with their names."""
    from diffusers import UNet2DConditionModel
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file} not found (expected a diffusers/FaceLift unet folder)")
    unet = UNet2DConditionModel(**unet_config_from_facelift(json.loads(cfg_file.read_text()), cfg_file))
    files = [path / f for f in WEIGHT_FILES if (path / f).is_file()]
    if not files:
        raise FileNotFoundError(f"{path}: no weights ({' or '.join(WEIGHT_FILES)})")
    try:
        sd = load_file(files[0]) if files[0].suffix == ".safetensors" else torch.load(
            files[0], map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file: safetensors and torch raise many kinds
        raise InputError(f"{files[0]}: cannot read it ({type(err).__name__}: {err})") from None
    ours = unet.state_dict()
    check_keys(f"{files[0]}: not the weights of the UNet that {cfg_file.name} describes", ours, sd)
    for k, v in sd.items():
        if v.shape != ours[k].shape:
            raise InputError(f"{files[0]}: {k} has shape {tuple(v.shape)}, "
                             f"the config gives {tuple(ours[k].shape)}")
    unet.load_state_dict(sd)  # strict
    return unet


# beside diffusers' files in our unet/ folders; FaceLift's has none
REF_EMBED_FILE = "ref_view_embed.safetensors"


def load_mv_unet(path, num_views=None, sparse=None):
    """MVUNet from a unet/ folder, FaceLift's or ours. The folder decides what it can: FaceLift's
    config.json gives the view count (num_views) and the attention (sparse_mv_attention), ours the
    view count (the rows of its reference-view embedding). An argument given (not None) must agree
    with the folder, else a ValueError names both; None takes the folder's value. Ours records no
    attention: `sparse` decides (None: True). FaceLift's reference-view embedding starts at zero."""
    path = Path(path)
    cfg_file, emb_file = path / "config.json", path / REF_EMBED_FILE
    mv = facelift_mv_settings(json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}, cfg_file)
    if mv is not None:  # checked before reading the weights
        if num_views is not None and num_views != mv[0]:
            raise InputError(f"{cfg_file}: num_views={mv[0]}, but the rig has {num_views} views")
        if sparse is not None and sparse != mv[1]:
            raise InputError(f"{cfg_file}: sparse_mv_attention={mv[1]}, but sparse={sparse} was asked "
                             f"for (train_mvdiff: set --sparse_attention={str(mv[1]).lower()})")
        num_views, sparse = mv
    unet = load_unet(path)
    w = load_file(emb_file)["weight"] if emb_file.is_file() else None
    if num_views is None:
        num_views = len(w) if w is not None else 6
    model = MVUNet(unet, num_views, True if sparse is None else sparse)
    if w is not None:
        if w.shape != model.ref_view_embed.weight.shape:
            raise InputError(f"{emb_file}: shape {tuple(w.shape)}, "
                             f"expected {tuple(model.ref_view_embed.weight.shape)} ({num_views} views)")
        model.ref_view_embed.weight.data.copy_(w)
    return model


def save_mv_unet(model, path):
    """diffusers save_pretrained of the UNet (loadable by any diffusers pipeline) + the
    reference-view embedding."""
    model.unet.save_pretrained(path)
    weight = model.ref_view_embed.weight.detach().cpu().contiguous()
    save_file({"weight": weight}, str(Path(path) / REF_EMBED_FILE))


class Conditioner:
    """The reference conditions. Pixel space (toy): the reference image itself, no class labels.
    Latent space (FaceLift): VAE latents x 0.18215 (the targets sampled from the posterior, the
    reference its mode, as FaceLift), and the CLIP image embedding of the reference + the embedding
    of noise level 0 as class labels (SD 2.1-unclip; the unCLIP noising at level 0 is left out)."""

    def __init__(self, pipeline_dir, device):
        self.latent = bool(pipeline_dir)
        if self.latent:
            from diffusers import AutoencoderKL
            from transformers import CLIPVisionModelWithProjection
            root = Path(pipeline_dir)
            self.vae = AutoencoderKL.from_pretrained(root / "vae", local_files_only=True).to(device).eval()
            self.clip = CLIPVisionModelWithProjection.from_pretrained(root / "image_encoder",
                                                                      local_files_only=True).to(device).eval()
            self.vae.requires_grad_(False)
            self.clip.requires_grad_(False)

    @torch.no_grad()
    def __call__(self, images, ref_idx, gen=None):
        """images (B, V, 3, H, W) in [-1, 1] -> x0 (B, V, C, h, w), ref (B, C, h, w), labels (B, E) | None.
        `gen` draws the targets' posterior samples (a step-seeded generator: resumable)."""
        ref_cond, labels = self.reference(images[torch.arange(len(images)), ref_idx])
        if not self.latent:
            return images, ref_cond, None
        x0 = self.vae.encode(images.flatten(0, 1)).latent_dist.sample(gen) * 0.18215  # (B*V, 4, h, w)
        return x0.unflatten(0, images.shape[:2]), ref_cond, labels  # x0 (B, V, 4, h, w)

    @torch.no_grad()
    def reference(self, ref):
        """Reference images (B, 3, H, W) in [-1, 1] -> the condition (B, C, h, w), labels (B, E) | None."""
        if not self.latent:
            return ref, None
        from diffusers.models.embeddings import get_timestep_embedding
        ref_latent = self.vae.encode(ref).latent_dist.mode() * 0.18215  # (B, 4, h, w)
        # bicubic with antialiasing, as torchvision's resize (FaceLift's CLIP preprocessing)
        px = F.interpolate((ref + 1) / 2, size=224, mode="bicubic", align_corners=False, antialias=True)
        mean = torch.tensor([0.4815, 0.4578, 0.4082], device=px.device)[:, None, None]
        std = torch.tensor([0.2686, 0.2613, 0.2758], device=px.device)[:, None, None]
        emb = self.clip((px - mean) / std).image_embeds  # (B, 1024)
        level = get_timestep_embedding(torch.zeros(len(emb), device=emb.device), emb.shape[-1],
                                       flip_sin_to_cos=True, downscale_freq_shift=0)  # (B, 1024)
        return ref_latent, torch.cat([emb, level.to(emb)], -1)  # labels (B, 2048)

    @torch.no_grad()
    def decode(self, x):
        """(B, V, C, h, w) model space -> images (B, V, 3, H, W) in [0, 1]."""
        if self.latent:
            x = self.vae.decode(x.flatten(0, 1) / 0.18215).sample.unflatten(0, x.shape[:2])
        return ((x + 1) / 2).clamp(0, 1)


def mv_schedulers(prediction_type, beta_schedule, beta_start, beta_end, clip_sample, pipeline_dir=""):
    """DDPM (training's noising) and DDIM with the same betas (sampling); FaceLift's pipeline samples
    with its own scheduler/, which must agree with what the run trains."""
    from diffusers import DDIMScheduler, DDPMScheduler
    noise = DDPMScheduler(num_train_timesteps=1000, beta_schedule=beta_schedule, beta_start=beta_start,
                          beta_end=beta_end, prediction_type=prediction_type, clip_sample=clip_sample)
    # trailing spacing: a few sampling steps still start at t = 999
    sampler = DDIMScheduler.from_config(noise.config, timestep_spacing="trailing")
    if pipeline_dir and (Path(pipeline_dir) / "scheduler").is_dir():
        sampler = DDIMScheduler.from_pretrained(pipeline_dir, subfolder="scheduler")
        for key in ("prediction_type", "beta_schedule", "beta_start", "beta_end"):
            if sampler.config[key] != noise.config[key]:
                raise InputError(f"{pipeline_dir}/scheduler: {key} {sampler.config[key]!r}, "
                                 f"this run trains with {noise.config[key]!r}")
    return noise, sampler


@torch.no_grad()
def sample_views(model, scheduler, ref_cond, ref_idx, prompt_embeds, shape, class_labels=None,
                 num_steps=50, guidance=3.0, eta=1.0, generator=None):
    """DDIM with classifier-free guidance: all V views of B objects from their reference conditions.
    ref_cond (B, Cr, H, W), ref_idx (B,), prompt_embeds (V, T, D), shape = (C, H, W) of one view,
    class_labels (B, E) or None; generator: one, or a list of B (one per object). The unconditional
    branch zeroes the reference conditions (what training's dropout does) and keeps the prompt
    embeddings (they say which view is which). Returns the denoised views (B, V, C, H, W) in the
    model's space (latents, or pixels in [-1, 1])."""
    from diffusers.utils.torch_utils import randn_tensor
    B, V = ref_cond.shape[0], model.num_views
    # a list of B generators draws each object's noise from its own: results do not depend on the batch
    x = randn_tensor((B, V, *shape), generator=generator, device=ref_cond.device, dtype=ref_cond.dtype)
    x = x * scheduler.init_noise_sigma
    scheduler.set_timesteps(num_steps, device=ref_cond.device)
    cfg = guidance != 1.0
    if cfg:  # one batch of 2B objects: conditional, then unconditional
        ref_cond2 = torch.cat([ref_cond, torch.zeros_like(ref_cond)])
        labels2 = None if class_labels is None else torch.cat([class_labels, torch.zeros_like(class_labels)])
        ref_idx2 = torch.cat([ref_idx, ref_idx])
    for t in scheduler.timesteps:
        tt = t.to(ref_cond.device).expand(B * (2 if cfg else 1))
        if cfg:
            out_c, out_u = model(torch.cat([x, x]), tt, prompt_embeds, ref_idx2, ref_cond2, labels2).chunk(2)
            out = out_u + guidance * (out_c - out_u)
        else:
            out = model(x, tt, prompt_embeds, ref_idx, ref_cond, class_labels)
        x = scheduler.step(out, t, x, eta=eta, generator=generator).prev_sample
    return x


# ----------------------------------------------------------------------------------------------
# Dance: music-to-pose encoder, face recognizer (IResNet)
# (train_dance.py)

M2P_CONFIGS = {
    "tiny": dict(d=32, layers=1, heads=2, heatmap=8),  # tests
    "toy": dict(d=128, layers=3, heads=4, heatmap=12),  # the CPU toy run (64 px frames)
    "base": dict(d=512, layers=8, heads=8, heatmap=64),  # real data
}


class M2PEncoder(nn.Module):
    """Music window [B, T, D] + reference pose [B, J, 3] + reference face crop [B, 3, h, w] ->
    per-frame per-joint heatmap logits [B, T, J, H, H] and a 512-d L2-normalised face embedding.

    A depthwise temporal convolution (~1 s: turns beat impulses into smooth phase signals) and a
    pre-LN transformer over time (bidirectional: the whole window of music is known) on tokens
    music_proj(music) + pos[t] + pose_proj(ref pose) + face_proj(face features). The heatmap of a
    joint is a Gaussian (of learned per-joint width) around the reference joint moved by a
    predicted offset, plus a zero-initialised separable residual (x logits + y logits): training
    starts from the reference pose instead of from noise."""

    def __init__(self, music_dim, joints, d, layers, heads, heatmap, max_frames=300, face_size=32,
                 embed_dim=512, conv_kernel=31, grad_checkpoint=False):
        super().__init__()
        self.J, self.H, self.face_size, self.grad_checkpoint = joints, heatmap, face_size, grad_checkpoint
        # music features come in wildly different scales (MFCC ~100s, one-hots 0/1): normalised with
        # training-set statistics that the training script sets once and the checkpoint keeps
        self.register_buffer("music_mean", torch.zeros(music_dim))
        self.register_buffer("music_std", torch.ones(music_dim))
        self.music_proj = nn.Linear(music_dim, d)
        self.music_conv = nn.Conv1d(d, d, conv_kernel, padding=conv_kernel // 2, groups=d)
        self.pos = nn.Parameter(torch.zeros(max_frames, d))  # learned positions for up to max_frames
        self.pose_proj = nn.Linear(joints * 3, d)
        self.face_cnn = nn.Sequential(  # 32 -> 16 -> 8 -> 4 -> pooled
            nn.Conv2d(3, 32, 3, 2, 1), nn.GELU(), nn.Conv2d(32, 64, 3, 2, 1), nn.GELU(),
            nn.Conv2d(64, d, 3, 2, 1), nn.GELU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.face_proj = nn.Linear(d, d)
        self.face_head = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, embed_dim))
        self.blocks = nn.ModuleList([Block(d, heads) for _ in range(layers)])
        self.norm = nn.LayerNorm(d)
        self.offset_head = nn.Linear(d, joints * 2)  # offsets from the reference joints (normalised coords)
        self.residual_head = nn.Linear(d, joints * 2 * heatmap)  # x logits, then y logits
        self.log_width = nn.Parameter(torch.zeros(joints))  # Gaussian width per joint, in heatmap cells (exp)
        # dance is smooth: the offsets are low-passed in time (a fixed Gaussian of 2 frames), so
        # that per-frame feature spikes (onset/beat one-hots) cannot make the joints jitter
        k = torch.exp(-torch.arange(-4, 5.0) ** 2 / (2 * 2.0**2))
        self.register_buffer("smooth", (k / k.sum()).expand(joints * 2, 1, 9).clone(), persistent=False)
        self.initialize_weights()

    def initialize_weights(self):
        nn.init.normal_(self.pos, std=0.02)
        for head in (self.offset_head, self.residual_head):  # start exactly at the reference pose
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    def forward(self, music, ref_pose, face):
        B, T, _ = music.shape
        assert T <= self.pos.shape[0], f"window of {T} frames, positions only for {self.pos.shape[0]}"
        face = F.interpolate(face, size=(self.face_size, self.face_size), mode="bilinear", antialias=True,
                             align_corners=False)  # (B, 3, face_size, face_size)
        f = self.face_cnn(face * 2 - 1)  # (B, d)
        pose_in = torch.cat([ref_pose[..., :2] - 0.5, ref_pose[..., 2:]], -1).flatten(1)  # (B, J * 3)
        cond = self.pose_proj(pose_in) + self.face_proj(f)  # (B, d)
        x = self.music_proj((music - self.music_mean) / self.music_std)  # (B, T, d)
        x = x + F.gelu(rearrange(self.music_conv(rearrange(x, "b t d -> b d t")), "b d t -> b t d"))
        x = x + self.pos[:T] + cond[:, None]  # (B, T, d)
        ckpt = self.grad_checkpoint and self.training
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if ckpt else block(x)
        x = self.norm(x)
        offset = rearrange(self.offset_head(x), "b t jc -> b jc t")  # (B, J * 2, T)
        offset = F.conv1d(F.pad(offset, (4, 4), mode="replicate"), self.smooth, groups=offset.shape[1])
        offset = rearrange(offset, "b (j c) t -> b t j c", c=2)  # (B, T, J, 2)
        mu = (ref_pose[:, None, :, :2] + offset) * self.H - 0.5  # (B, T, J, 2) in cells (centres at i)
        cells = torch.arange(self.H, device=x.device, dtype=x.dtype)
        width = self.log_width.exp()[:, None]  # (J, 1)
        gx = -((cells - mu[..., :1]) / width) ** 2 / 2  # (B, T, J, W): x along columns
        gy = -((cells - mu[..., 1:]) / width) ** 2 / 2  # (B, T, J, H)
        res = self.residual_head(x)  # (B, T, J * 2 * H)
        rx, ry = rearrange(res, "b t (j c h) -> c b t j h", j=self.J, c=2)  # (B, T, J, H) each
        logits = (gy + ry)[..., :, None] + (gx + rx)[..., None, :]  # (B, T, J, H, W)
        embedding = F.normalize(self.face_head(f), dim=-1)  # (B, 512)
        return logits, embedding


# The face recognizer, in the layout of insightface's arcface_torch `iresnet.py` so that its
# `backbone.pth` files (iresnet18/34/50/100, glintr100 = iresnet100) load key for key.
IRESNET_CONFIGS = {
    "toy": dict(layers=(1, 1, 1, 1), widths=(8, 16, 32, 64)),  # the toy's ArcFace (frozen, random)
    "iresnet18": dict(layers=(2, 2, 2, 2)),
    "iresnet34": dict(layers=(3, 4, 6, 3)),
    "iresnet50": dict(layers=(3, 4, 14, 3)),
    "iresnet100": dict(layers=(3, 13, 30, 3)),
}


class IBasicBlock(nn.Module):
    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-05)
        self.conv1 = nn.Conv2d(inplanes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-05)
        self.prelu = nn.PReLU(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-05)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        return self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x)))))) + identity


class IResNet(nn.Module):
    """ArcFace's IResNet: 112x112 RGB crops in [-1, 1] -> 512-d embeddings (not normalised; the
    face loss compares directions). 4 stride-2 stages take 112 to 7x7 for the fc layer."""

    def __init__(self, layers, widths=(64, 128, 256, 512), num_features=512, dropout=0.0):
        super().__init__()
        self.inplanes = widths[0]
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0], eps=1e-05)
        self.prelu = nn.PReLU(widths[0])
        self.layer1 = self._make_layer(widths[0], layers[0])
        self.layer2 = self._make_layer(widths[1], layers[1])
        self.layer3 = self._make_layer(widths[2], layers[2])
        self.layer4 = self._make_layer(widths[3], layers[3])
        self.bn2 = nn.BatchNorm2d(widths[3], eps=1e-05)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(widths[3] * 7 * 7, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=1e-05)
        for m in self.modules():  # arcface_torch's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0, 0.1)
        nn.init.constant_(self.features.weight, 1.0)

    def _make_layer(self, planes, blocks):
        downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, 2, bias=False),
                                   nn.BatchNorm2d(planes, eps=1e-05))
        layers = [IBasicBlock(self.inplanes, planes, 2, downsample)]
        layers += [IBasicBlock(planes, planes) for _ in range(1, blocks)]
        self.inplanes = planes
        return nn.Sequential(*layers)

    def forward(self, x):
        assert x.shape[-2:] == (112, 112), f"IResNet takes 112x112 face crops, got {tuple(x.shape[-2:])}"
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.dropout(torch.flatten(self.bn2(x), 1))  # (B, C * 7 * 7)
        return self.features(self.fc(x))


def load_iresnet(path, arch):
    """An IResNet(arch) with the weights of an arcface_torch `backbone.pth` (a plain state dict,
    or one under 'state_dict'; a DDP 'module.' prefix is removed), in eval mode and frozen."""
    model = IResNet(**IRESNET_CONFIGS[arch])
    sd = torch.load(path, map_location="cpu", weights_only=True)
    sd = sd.get("state_dict", sd)
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    ours = model.state_dict()
    # a file may lack BatchNorm's num_batches_tracked (load_state_dict then fills it in)
    check_keys(f"{path}: not an arcface_torch {arch} state dict", ours, sd,
               ignore=lambda k: k in ours and k.endswith("num_batches_tracked"))
    bad = [f"{k} {tuple(v.shape)} vs {tuple(ours[k].shape)}"
           for k, v in sd.items() if v.shape != ours[k].shape]
    if bad:
        raise InputError(f"{path}: shapes differ from {arch}: {bad[:5]}")
    model.load_state_dict(sd, strict=True)
    return model.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------
# Dance, stages B and C: denoising UNet + ReferenceNet (reference attention), pose guidance,
# identity tokens (CHAMP's recipe with StableAnimator's face tokens), on diffusers building blocks

DANCE_UNET_CONFIGS = {
    # tests: attention in every block, as SD-1.5 (so the ReferenceNet's unused tail is SD's)
    "tiny": dict(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1,
                 block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D",) * 2,
                 up_block_types=("CrossAttnUpBlock2D",) * 2, cross_attention_dim=16, attention_head_dim=8,
                 norm_num_groups=8),
    # the toy: pixel space at 32 px; attention (reference + cross) at 8x8 only: at 16x16 too it
    # doubles the CPU step time (bench.py --only=stage_b)
    "toy": dict(sample_size=32, in_channels=3, out_channels=3, layers_per_block=1,
                block_out_channels=(32, 64, 96),
                down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
                cross_attention_dim=64, attention_head_dim=16, norm_num_groups=16),
}


class ReferenceStore:
    """What the ReferenceNet's self-attention layers hand to the denoiser's, by layer name.
    keep (B,) bool or None: per-sample reference dropout (a dropped sample attends as if empty)."""

    def __init__(self):
        self.feats, self.keep = {}, None

    def clear(self):
        self.feats, self.keep = {}, None


class ReferenceAttnProcessor:
    """Self-attention (attn1) with reference injection (Animate Anyone / CHAMP). 'write' (ReferenceNet):
    stores its input, the normalised hidden states, under the layer's name and attends as usual.
    'read' (denoiser): keys/values are [own tokens; the stored tokens of the same-named ReferenceNet
    layer]; an empty store is plain self-attention (the unconditional pass). The store's batch may be
    a divisor of the denoiser's: frames (b f) of one sample share its reference (stage C)."""

    def __init__(self, name, store, mode):
        assert mode in ("read", "write")
        self.name, self.store, self.mode = name, store, mode

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        assert encoder_hidden_states is None and attention_mask is None, "reference attention is self-attention"
        x, mask = hidden_states, None  # (B, N, C)
        kv = x
        if self.mode == "write":
            self.store.feats[self.name] = x
        elif self.store.feats:
            ref = self.store.feats[self.name]  # (Br, M, C)
            reps = len(x) // len(ref)
            kv = torch.cat([x, ref.repeat_interleave(reps, 0)], 1)  # (B, N + M, C)
            if self.store.keep is not None:  # masked reference keys = an empty store, per sample
                keep = self.store.keep.repeat_interleave(reps, 0)  # (B,)
                own = torch.ones(len(x), x.shape[1], dtype=torch.bool, device=x.device)
                mask = torch.cat([own, keep[:, None].expand(-1, ref.shape[1])], 1)[:, None, None]  # (B,1,1,N+M)
        q = rearrange(attn.to_q(x), "b n (h d) -> b h n d", h=attn.heads)
        k, v = (rearrange(f(kv), "b n (h d) -> b h n d", h=attn.heads) for f in (attn.to_k, attn.to_v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, heads, N, d)
        return attn.to_out[1](attn.to_out[0](rearrange(out, "b h n d -> b n (h d)")))


def install_reference_attention(unet, store, mode):
    """Spatial self-attention (attn1, not a motion module's) -> ReferenceAttnProcessor; every other
    processor -> SDPA. Returns the sorted names of the reference layers (the pairing key)."""
    procs, names = {}, []
    for name in unet.attn_processors:
        if ".attn1." in name and "motion_modules" not in name:
            procs[name] = ReferenceAttnProcessor(name, store, mode)
            names.append(name)
        else:
            procs[name] = AttnProcessor2_0()
    unet.set_attn_processor(procs)
    return sorted(names)


def referencenet_unused(refnet):
    """Names of the ReferenceNet parameters that never receive a gradient. Only its attn1 inputs are
    read, so everything after the input of the last one is dead: in the last attention of the last up
    block with attention, the last transformer block after norm1 and proj_out; then that block's
    upsampler, every later up block, conv_norm_out and conv_out. (CHAMP freezes all of up_blocks.3,
    which also freezes resnets that do feed the bank.)"""
    i = max(i for i, b in enumerate(refnet.up_blocks) if getattr(b, "attentions", None))
    attn = refnet.up_blocks[i].attentions
    last, tb = f"up_blocks.{i}.attentions.{len(attn) - 1}", len(attn[-1].transformer_blocks) - 1
    dead = [f"{last}.transformer_blocks.{tb}.{m}." for m in ("attn1", "norm2", "attn2", "norm3", "ff")]
    dead += [f"{last}.proj_out.", f"up_blocks.{i}.upsamplers."]
    dead += [f"up_blocks.{j}." for j in range(i + 1, len(refnet.up_blocks))] + ["conv_norm_out.", "conv_out."]
    return sorted(n for n, _ in refnet.named_parameters() if n.startswith(tuple(dead)))


class PoseGuider(nn.Module):
    """Pose heatmaps (B, J, H, W) -> features for the UNet's conv_in output (CHAMP's guidance encoder:
    diffusers' ControlNetConditioningEmbedding, len(channels) - 1 stride-2 steps, zero-initialised
    output: at initialisation the UNet does not see the pose)."""

    def __init__(self, joints, out_channels, channels=(16, 32, 96, 256)):
        super().__init__()
        from diffusers.models.controlnets.controlnet import ControlNetConditioningEmbedding
        self.embed = ControlNetConditioningEmbedding(out_channels, joints, tuple(channels))
        self.down = 2 ** (len(channels) - 1)  # heatmaps come at this many x the UNet's resolution

    def forward(self, heatmaps):
        return self.embed(heatmaps)


class FaceTokens(nn.Module):
    """StableAnimator's face encoder, reduced to its input and output: the 512-d face embedding -> n
    cross-attention tokens appended to the CLIP image token."""

    def __init__(self, dim, n=4, embed_dim=512, hidden=1024):
        super().__init__()
        self.n = n
        self.mlp = nn.Sequential(nn.Linear(embed_dim, hidden), nn.GELU(), nn.Linear(hidden, n * dim))
        self.norm = nn.LayerNorm(dim)

    def forward(self, emb):
        return self.norm(rearrange(self.mlp(emb), "b (n d) -> b n d", n=self.n))  # (B, n, dim)


def pose_heatmaps(poses, size, sigma):
    """The pose condition: J heatmaps [..., J, size, size] with peak 1 (a Gaussian of `sigma` cells
    around each visible joint, zero for invisible ones). Ground-truth and M2P poses go through the same
    rendering, so switching between them changes only the joints; differentiable in the coordinates."""
    cells = torch.arange(size, device=poses.device, dtype=poses.dtype)
    mu = poses[..., :2] * size - 0.5  # (..., J, 2) in cells
    gx = torch.exp(-((cells - mu[..., :1]) ** 2) / (2 * sigma**2))  # (..., J, W)
    gy = torch.exp(-((cells - mu[..., 1:]) ** 2) / (2 * sigma**2))  # (..., J, H)
    vis = (poses[..., 2] >= 0.3).to(poses.dtype)[..., None, None]
    return gy[..., :, None] * gx[..., None, :] * vis  # (..., J, H, W)


class DanceNet(nn.Module):
    """Stage B's trainable modules as one module (one DDP wrapper): the denoising UNet, the ReferenceNet
    (paired with it by layer name through a shared store), the pose guider and the face tokens.
    `reference` runs the ReferenceNet once per sample (t = 0, clean reference); `denoise` is one
    denoiser call; forward = both (training)."""

    def __init__(self, unet, referencenet, guider, face_tokens):
        super().__init__()
        self.unet, self.referencenet, self.guider, self.face_tokens = unet, referencenet, guider, face_tokens
        self.store = ReferenceStore()
        self.install()

    def install(self):
        """(Re)installs the reference processors (after anything that resets them, e.g. from_unet2d)."""
        read = install_reference_attention(self.unet, self.store, "read")
        write = install_reference_attention(self.referencenet, self.store, "write")
        if read != write:
            raise InputError(f"the UNet and the ReferenceNet do not pair by layer name: "
                             f"{sorted(set(read) ^ set(write))[:4]}")
        return read

    def context(self, clip_emb, face_emb, keep):
        """CLIP image embedding (B, D) + face embedding (B, 512) -> cross-attention context (B, 1 + n, D),
        zero where keep is False (the null condition of training's dropout and of sampling)."""
        ctx = torch.cat([clip_emb[:, None], self.face_tokens(face_emb)], 1)  # (B, 1 + n, D)
        return ctx * keep[:, None, None].to(ctx.dtype)

    def reference(self, ref, context, keep):
        self.store.clear()
        t0 = torch.zeros(len(ref), device=ref.device, dtype=torch.long)
        self.referencenet(ref, t0, encoder_hidden_states=context)  # fills the store; its output is unused
        self.store.keep = keep

    def denoise(self, x, t, heatmaps, cond_scale, context):
        """x (B, C, h, w) and heatmaps (B, J, H, W); with stage C's motion UNet x (B, C, F, h, w) and
        heatmaps (B, F, J, H, W): the F frames of a sample share its reference and context."""
        if x.dim() == 5:
            heatmaps = rearrange(heatmaps, "b f j h w -> (b f) j h w")
            context = context.repeat_interleave(x.shape[2], 0)  # (B F, L, D): UNetMotionModel wants it per frame
        feats = self.guider(heatmaps) * cond_scale  # (B [F], C0, h, w): added to conv_in's output
        hook = self.unet.conv_in.register_forward_hook(lambda mod, inp, out: out + feats.to(out.dtype))
        try:
            return self.unet(x, t, encoder_hidden_states=context).sample
        finally:
            hook.remove()

    def forward(self, x, t, heatmaps, cond_scale, ref, clip_emb, face_emb, keep):
        """Training: the store keeps the reference until the caller clears it after backward, where
        gradient checkpointing recomputes the denoiser's blocks and reads it again."""
        context = self.context(clip_emb, face_emb, keep)
        self.reference(ref, context, keep)
        return self.denoise(x, t, heatmaps, cond_scale, context)



def motion_unet(unet, adapter=None, max_frames=32, heads=4):
    """Stage C's denoiser: the stage-B UNet with AnimateDiff motion modules (diffusers MotionAdapter ->
    UNetMotionModel.from_unet2d). adapter: AnimateDiff weights (load_motion_adapter) or None (a new one
    shaped like the UNet, position table of max_frames). Every motion module's proj_out is zeroed, so
    the model starts as the stage-B UNet applied frame by frame. Its input is (B, C, F, H, W).
    from_unet2d resets the attention processors: reinstall the reference ones (DanceNet.install)."""
    from diffusers import MotionAdapter, UNetMotionModel
    c = unet.config
    if adapter is None:
        adapter = MotionAdapter(block_out_channels=tuple(c.block_out_channels),
                                motion_layers_per_block=c.layers_per_block, motion_num_attention_heads=heads,
                                motion_norm_num_groups=c.norm_num_groups, motion_max_seq_length=max_frames,
                                use_motion_mid_block=False)
    model = UNetMotionModel.from_unet2d(unet, adapter)
    for name, mod in model.named_modules():
        if re.search(r"motion_modules\.\d+$", name):
            nn.init.zeros_(mod.proj_out.weight)
            nn.init.zeros_(mod.proj_out.bias)
    return model


def load_motion_adapter(path, max_frames):
    """AnimateDiff motion-module weights from a diffusers MotionAdapter folder, with a position table of
    max_frames. The table is sinusoidal (a buffer, not learnt): a different length is rebuilt, not loaded,
    and the same positions get the same values; every other tensor must match exactly."""
    from diffusers import MotionAdapter
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}/config.json not found (expected a diffusers MotionAdapter folder)")
    conf = json.loads((path / "config.json").read_text())
    old = conf.get("motion_max_seq_length", 32)
    conf = {k: v for k, v in conf.items() if not k.startswith("_")}
    adapter = MotionAdapter(**dict(conf, motion_max_seq_length=max(max_frames, 1)))
    files = [path / f for f in WEIGHT_FILES if (path / f).is_file()]
    if not files:
        raise FileNotFoundError(f"{path}: no weights ({' or '.join(WEIGHT_FILES)})")
    state = load_file(files[0]) if files[0].suffix == ".safetensors" else torch.load(files[0], map_location="cpu")
    table = {k for k in state if k.endswith("pos_embed.pe")}
    if old != max_frames:
        print(f"{path}: position table {old} -> {max_frames} frames (sinusoidal: rebuilt, not loaded)")
        state = {k: v for k, v in state.items() if k not in table}
    own = adapter.state_dict()
    missing = sorted(set(own) - set(state) - (table if old != max_frames else set()))
    extra = sorted(set(state) - set(own))
    shape = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or extra or shape:
        raise InputError(f"{path}: not a MotionAdapter of this config: missing {missing[:4]}, "
                         f"unexpected {extra[:4]}, wrong shape {shape[:4]}")
    own.update(state)
    adapter.load_state_dict(own)
    return adapter

def clip_image_embeds(clip, images):
    """Frozen CLIP image encoder: images (B, 3, H, W) in [0, 1] -> projected embeddings (B, D),
    resized to the encoder's input size and normalised with CLIP's statistics."""
    size = clip.config.vision_config.image_size if hasattr(clip.config, "vision_config") else clip.config.image_size
    px = F.interpolate(images, size=size, mode="bicubic", align_corners=False, antialias=True)
    mean = torch.tensor([0.4815, 0.4578, 0.4082], device=px.device)[:, None, None]
    std = torch.tensor([0.2686, 0.2613, 0.2758], device=px.device)[:, None, None]
    return clip((px - mean) / std).image_embeds


def load_clip_image_encoder(path):
    """A CLIPVisionModelWithProjection folder (config.json + model.safetensors), frozen, eval."""
    from transformers import CLIPVisionModelWithProjection
    if not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"{path}/config.json not found (expected a CLIPVisionModelWithProjection folder)")
    return CLIPVisionModelWithProjection.from_pretrained(path, local_files_only=True).eval().requires_grad_(False)


def load_vae(path):
    """SD's AutoencoderKL from a local `vae/` folder, frozen, eval."""
    from diffusers import AutoencoderKL
    if not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"{path}/config.json not found (expected an SD `vae/` folder)")
    return AutoencoderKL.from_pretrained(path, local_files_only=True).eval().requires_grad_(False)


def toy_face_recognizer(seed):
    """The toy's face recognizer: a frozen random IResNet, the same function of the face in every run
    and stage that uses the seed (its own RNG stream)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed + 12345)
        return IResNet(**IRESNET_CONFIGS["toy"]).eval().requires_grad_(False)


def toy_clip_image_encoder(seed, dim, image_size):
    """The toy's CLIP image encoder: a tiny frozen random CLIPVisionModelWithProjection (projection = dim)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
    config = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                              image_size=image_size, patch_size=max(1, image_size // 4), projection_dim=dim)
    with torch.random.fork_rng():
        torch.manual_seed(seed + 23456)
        return CLIPVisionModelWithProjection(config).eval().requires_grad_(False)


def to_model_space(vae, images, generator=None):
    """Images (B, 3, H, W) in [0, 1] -> what the UNet denoises: pixels in [-1, 1] (vae None, the toy) or
    SD latents (posterior samples x the VAE's scaling factor)."""
    x = images * 2 - 1
    if vae is None:
        return x
    return vae.encode(x).latent_dist.sample(generator) * vae.config.scaling_factor


def to_images(vae, x):
    """The inverse of to_model_space -> images in [0, 1] (differentiable: the identity loss goes through it)."""
    if vae is not None:
        x = vae.decode(x / vae.config.scaling_factor).sample
    return ((x + 1) / 2).clamp(0, 1)


def context_windows(T, size, overlap):
    """[start, end) windows of `size` frames, consecutive ones sharing `overlap`, covering frames 0..T-1
    (the last window ends at T; CHAMP samples long videos in 24-frame windows overlapping by 4 and
    averages the overlapping predictions at every denoising step)."""
    if T <= size:
        return [(0, T)]
    if not 0 <= overlap < size:
        raise InputError(f"window overlap {overlap}: expected 0 <= overlap < window size {size}")
    starts = list(range(0, T - size + 1, size - overlap))
    if starts[-1] + size < T:
        starts.append(T - size)
    return [(s, s + size) for s in starts]

@torch.no_grad()
def sample_frames(net, scheduler, ref, clip_emb, face_emb, heatmaps, cond_scale, shape, num_steps=25,
                  guidance=2.0, generator=None):
    """DDIM with classifier-free guidance: one frame per reference (shape (C, h, w), heatmaps (B, J, H, W)),
    or with stage C's motion UNet one clip (shape (C, F, h, w), heatmaps (B, F, J, H, W)). ref (B, C, h, w)
    in model space, clip_emb (B, D), face_emb (B, 512). The unconditional half gets exactly
    training's null condition: reference masked out of the attention, CLIP and face tokens zeroed; the
    pose stays. The ReferenceNet runs once. Returns (B, *shape) in model space."""
    from diffusers.utils.torch_utils import randn_tensor
    B, dev = len(ref), ref.device
    x = randn_tensor((B, *shape), generator=generator, device=dev, dtype=ref.dtype) * scheduler.init_noise_sigma
    cfg = guidance != 1.0
    keep = torch.cat([torch.ones(B, dtype=torch.bool, device=dev)] + ([torch.zeros(B, dtype=torch.bool, device=dev)]
                                                                      if cfg else []))
    n = len(keep)  # B or 2B: conditional, then unconditional
    context = net.context(clip_emb.repeat(n // B, 1), face_emb.repeat(n // B, 1), keep)
    net.reference(ref.repeat(n // B, 1, 1, 1), context, keep)
    heat = heatmaps.repeat(n // B, *[1] * (heatmaps.dim() - 1))
    scheduler.set_timesteps(num_steps, device=dev)
    try:
        for t in scheduler.timesteps:
            out = net.denoise(x.repeat(n // B, *[1] * len(shape)), t.expand(n), heat, cond_scale, context)
            if cfg:
                out_c, out_u = out.chunk(2)
                out = out_u + guidance * (out_c - out_u)
            x = scheduler.step(out, t, x, generator=generator).prev_sample
    finally:
        net.store.clear()
    return x
