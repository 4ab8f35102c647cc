"""The 3D Gaussian rasterizer: EWA projection, our sparse pure-PyTorch rasterizer (each Gaussian touches
only its footprint's pixels: CPU training), a dense all-pairs reference that tests use as the oracle,
gsplat's CUDA rasterizer when CUDA and gsplat are present, and deferred rendering (backprop one view at
a time). Conventions are 3DGS/gsplat's: OpenCV cameras, `w2c` matrices, 3x3 `K`, quaternions (w, x, y, z).
"""
import math

import torch
import torch.nn.functional as F
from einops import rearrange

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

    M = quat_to_rotmat(quats) * scales[..., None, :]  # (..., N, 3, 3) = R_q diag(s): cov3 = M M^T
    # The Jacobian is evaluated at a point clamped to a little beyond the view frustum (as 3DGS
    # does), so Gaussians far off-screen do not get absurd footprints.
    tx = z * torch.clamp(p[..., 0] / z, -(cx / fx + 0.15 * W / fx), (W - cx) / fx + 0.15 * W / fx)
    ty = z * torch.clamp(p[..., 1] / z, -(cy / fy + 0.15 * H / fy), (H - cy) / fy + 0.15 * H / fy)
    zero = torch.zeros_like(z)
    J = torch.stack([fx / z, zero, -fx * tx / z**2,
                     zero, fy / z, -fy * ty / z**2], -1).unflatten(-1, (2, 3))  # (..., C, N, 2, 3)
    # cov2 = J R cov3 R^T J^T + low-pass = T T^T + EPS2D I with T = J R M, as two einsums that
    # batch over cameras and over Gaussians (not over both: a CPU is slow at millions of tiny matmuls)
    T = torch.einsum("...cnkl,...nlm->...cnkm", torch.einsum("...cnij,...cjk->...cnik", J, R), M)  # (..., C, N, 2, 3)
    t0, t1 = T.unbind(-2)  # (..., C, N, 3) each: the rows
    a, b, c = (t0 * t0).sum(-1) + EPS2D, (t0 * t1).sum(-1), (t1 * t1).sum(-1) + EPS2D  # cov2's entries
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
    with torch.no_grad():
        cam, gid = valid.flatten(0, 1).nonzero(as_tuple=True)  # (E,) visible entries: camera b*C+c, Gaussian n
        # entries in (camera, depth) order: the pairs are made in this order, so a stable sort by
        # pixel puts them in (pixel, depth) order, the compositing order
        by_depth = depths.flatten()[cam * N + gid].argsort()
        by_depth = by_depth[cam[by_depth].argsort(stable=True)]
        cam, gid = cam[by_depth], gid[by_depth]
    entry, g = cam * N + gid, (cam // C) * N + gid  # index into (B*C*N) projections / (B*N) Gaussians
    # everything a pair needs from its entry, in one tensor so that one gather (and one
    # index_add in backward) serves all of it: u, v | conic 3 | opacity | colour D
    ent = torch.cat([means2d.flatten(0, 2)[entry], conics.flatten(0, 2)[entry],
                     opacities.flatten()[g, None], colors.flatten(0, 1)[g]], -1)  # (E, 6 + D)
    with torch.no_grad():
        x0, x1, y0, y1 = box.flatten(0, 2)[entry].int().unbind(-1)  # (E,) each
        bw, count = x1 - x0 + 1, (x1 - x0 + 1) * (y1 - y0 + 1)
        # the pixels of every box, row by row, in int32 (faster than int64 in index_select and sort
        # on a CPU); per-pair values by repeat_interleave (a fill) or index_select, never by []
        # with a (P,) index (several times slower)
        P = int(count.sum())
        per_pair = lambda x: torch.repeat_interleave(x, count, output_size=P)  # noqa: E731  (E,) -> (P,)
        e = per_pair(torch.arange(len(cam), dtype=torch.int32, device=cam.device))  # (P,) entry of each pair
        start = count.cumsum(0, dtype=torch.int32) - count  # (E,) first pair of each entry
        local = torch.arange(P, dtype=torch.int32, device=e.device) - per_pair(start)  # (P,) index in the box
        # row and column in the box, dividing in float32 (exact: a box has far fewer than 2^24 pixels;
        # a CPU divides floats several times faster than ints)
        row = torch.floor((local + 0.5) / per_pair(bw))  # (P,) float
        col = local - row * per_pair(bw)
        pix = per_pair(cam.int() * (H * W) + y0 * W + x0) + (row * W + col).int()  # (P,) output pixel
        u, v, c0, c1, c2, o = ent.detach()[:, :6].t().contiguous().index_select(1, e)  # (P,) each
        dx, dy = per_pair(x0).to(u.dtype) + col + 0.5 - u, per_pair(y0).to(u.dtype) + row + 0.5 - v
        maha2 = c0 * dx * dx + 2 * c1 * dx * dy + c2 * dy * dy
        raw = o * torch.exp(-0.5 * maha2)  # (P,) alpha before the clamp
        # the pairs that count (as _pair_alpha's keep): inside the footprint ellipse, alpha >= 1/255
        keep = ((maha2 <= FOOTPRINT_SIGMAS**2) & (raw >= ALPHA_MIN)).nonzero().squeeze(1)
        pix, by_pixel = pix.index_select(0, keep).sort(stable=True)
        kept = keep.index_select(0, by_pixel)  # (P',) in (pixel, depth) order
        e, raw = e.index_select(0, kept), raw.index_select(0, kept)

    rgba = _Composite.apply(ent, e, pix, raw, B * C * H * W, H, W)  # (D + 1, B*C*H*W)
    rgb, acc = rgba.t().reshape(B, C, H, W, D + 1).split([D, 1], -1)
    return rgb + (1 - acc) * bg[:, :, None, None, :], acc


class _Composite(torch.autograd.Function):
    """Front-to-back compositing of the (pixel, depth)-sorted pairs -> per pixel colour and alpha
    (D + 1, n_pix), with the gradient written out: autograd's graph of the same ops keeps more
    (P,) tensors and runs slower on a CPU. ent (E, 6 + D): u, v | conic 3 | opacity | colour D of
    each entry; e, pix (P,) int32: each pair's entry and output pixel; raw (P,) its alpha before the
    clamp, as the pair pass computed it (the same formula as below: the same numbers). Per-pair values
    are rows (6 + D, L), not columns: contiguous for the elementwise ops, and index_add along dim 1 is
    the fast one (int64 indices there: int32 ones take a slow path)."""

    @staticmethod
    def forward(ctx, ent, e, pix, raw, n_pix, H, W):
        alpha = raw.clamp(max=ALPHA_MAX)
        # Exclusive transmittance per pixel = exp(segmented cumsum of log(1 - alpha)). The running
        # sum spans all pixels, so it is taken in float64 to keep the per-pixel differences exact.
        la = torch.log1p(-alpha.double())
        cs = la.cumsum(0)
        first = torch.ones_like(pix, dtype=torch.bool)
        first[1:] = pix[1:] != pix[:-1]
        seg = first.cumsum(0) - 1  # (P,) segment (= pixel list) of each pair
        before = cs.sub(la)[first].index_select(0, seg)  # sum of log(1 - alpha) of all earlier pixels' pairs
        incl = cs - before  # (P,) log transmittance after the pair: it lives while that stays above T_MIN
        # Only the live pairs (each pixel's first ones, before its transmittance runs out) have a weight
        # or a gradient; where many Gaussians overlap most pairs are not, so the rest are dropped here.
        # A pixel's first pair is always live (alpha <= ALPHA_MAX), so its segment start stays.
        live = (incl > math.log(T_MIN)).nonzero().squeeze(1)  # (L,)
        alpha, e, first = alpha.index_select(0, live), e.index_select(0, live), first.index_select(0, live)
        pix = pix.index_select(0, live)
        pe = ent.t().contiguous().index_select(1, e)  # (6 + D, L)
        u, v, c0, c1, c2, col = pe[0], pe[1], pe[2], pe[3], pe[4], pe[6:]
        dx, dy = _pixel_offsets(pix, H, W, u, v)
        fall = torch.exp(-0.5 * (c0 * dx * dx + 2 * c1 * dx * dy + c2 * dy * dy))  # (L,)
        T_live = torch.exp((incl - la).index_select(0, live)).to(alpha.dtype)  # (L,)
        seg = first.cumsum(0) - 1  # (L,)
        w = alpha * T_live  # (L,) compositing weight
        pix64 = pix.long()
        wc = torch.empty(len(col) + 1, len(w), dtype=w.dtype, device=w.device)  # (D + 1, L): w colour, w
        torch.mul(w, col, out=wc[:-1])
        wc[-1] = w
        out = torch.zeros(len(col) + 1, n_pix, dtype=ent.dtype, device=ent.device)
        out.index_add_(1, pix64, wc)  # (D + 1, n_pix): colour, alpha
        ctx.save_for_backward(pe, dx, dy, fall, alpha, T_live, w, e, pix64, first, seg)
        ctx.n_ent = len(ent)
        return out

    @staticmethod
    def backward(ctx, grad_out):  # grad_out (D + 1, n_pix)
        pe, dx, dy, fall, alpha, T_live, w, e, pix64, first, seg = ctx.saved_tensors
        c0, c1, c2, o, col = pe[2], pe[3], pe[4], pe[5], pe[6:]
        raw = o * fall  # alpha before the clamp
        g = grad_out.index_select(1, pix64)  # (D + 1, P)
        dw = (col * g[:-1]).sum(0) + g[-1]  # (P,) dL/dw
        # w_i = alpha_i T_i, T_i = prod of (1 - alpha_j) over the pixel's earlier pairs j, so
        # dL/dalpha_k = dw_k T_k - (sum over the pixel's later pairs i of dw_i w_i) / (1 - alpha_k)
        cs = (dw * w).double().cumsum(0)
        last = torch.ones_like(first)
        last[:-1] = first[1:]
        later = cs[last].index_select(0, seg) - cs  # (P,)
        d_alpha = dw * T_live - (later / (1 - alpha.double())).to(alpha.dtype)
        d_raw = d_alpha * (raw <= ALPHA_MAX)  # the clamp
        d_m = -0.5 * d_raw * raw  # dL/d maha^2
        # the rows of dL/d(u, v, conic, opacity, colour) (6 + D, P), written in place (no stack / cat copies)
        grad_pe, m2 = torch.empty_like(pe), -2 * d_m
        torch.mul(m2, c0 * dx + c1 * dy, out=grad_pe[0])  # u: -dL/ddx
        torch.mul(m2, c1 * dx + c2 * dy, out=grad_pe[1])  # v: -dL/ddy
        dmx = d_m * dx
        torch.mul(dmx, dx, out=grad_pe[2])
        torch.mul(2 * dmx, dy, out=grad_pe[3])
        torch.mul(d_m * dy, dy, out=grad_pe[4])
        torch.mul(d_raw, fall, out=grad_pe[5])
        torch.mul(w, g[:-1], out=grad_pe[6:])
        grad_ent = torch.zeros(len(pe), ctx.n_ent, dtype=pe.dtype, device=pe.device)
        return grad_ent.index_add_(1, e.long(), grad_pe).t(), None, None, None, None, None, None


def _pixel_offsets(pix, H, W, u, v):
    """(P,) flat output pixels and Gaussian centres -> offsets of the pixel centres from them. Divides
    in float64, exact below 2^53 and several times faster than integer division on a CPU."""
    p = pix.double()
    rows = torch.floor(p / W)  # (P,) row over all images
    x, y = p - rows * W, rows - torch.floor(rows / H) * H
    return x.to(u.dtype) + 0.5 - u, y.to(u.dtype) + 0.5 - v


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
