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
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # torchvision weights
CAFFE_MEAN = (123.68, 116.779, 103.939)  # MatConvNet VGG19: RGB x255 minus this mean pixel
# FaceLift's weights for [the image itself, relu1_2, relu2_2, relu3_2, relu4_2, relu5_2]
PERCEPTUAL_WEIGHTS = (1.0, 1 / 2.6, 1 / 4.8, 1 / 3.7, 1 / 5.6, 10 / 1.5)


def perceptual_loss(vgg19, pred, target, weight=None):
    """FaceLift's VGG19 perceptual loss: L1 between the normalised images and between 5 ReLU
    activations, weighted by PERCEPTUAL_WEIGHTS, summed and divided by 255. The normalisation is the
    one `vgg19.preprocess` names: "caffe" (MatConvNet `.mat`, exactly FaceLift's loss) x255 minus
    CAFFE_MEAN; "torchvision" (`.pth`) (x - IMAGENET_MEAN) / IMAGENET_STD, which the image L1 term
    then also uses (inputs span ~4.5, not 255: a far smaller loss; perceptual_weight won't carry over).
    pred, target (N, 3, H, W) in [0, 1] -> scalar. weight (N, 1, H, W), mean 1 per image (foreground_weight):
    each pixel's share of every term, area-pooled to each activation's size."""
    if vgg19.preprocess == "caffe":
        mean = torch.tensor(CAFFE_MEAN, device=pred.device, dtype=pred.dtype)[:, None, None]
        x, y = pred * 255 - mean, target * 255 - mean  # (N, 3, H, W)
    else:
        mean = torch.tensor(IMAGENET_MEAN, device=pred.device, dtype=pred.dtype)[:, None, None]
        std = torch.tensor(IMAGENET_STD, device=pred.device, dtype=pred.dtype)[:, None, None]
        x, y = (pred - mean) / std, (target - mean) / std  # (N, 3, H, W)
    def l1(a, b):  # weighted: the weight map area-pooled to this term's size (its mean stays 1)
        if weight is None:
            return (a - b).abs().mean()
        return ((a - b).abs() * F.adaptive_avg_pool2d(weight, a.shape[-2:])).mean()

    loss = PERCEPTUAL_WEIGHTS[0] * l1(x, y)
    with torch.no_grad():
        fy = vgg19(y)
    for w, a, b in zip(PERCEPTUAL_WEIGHTS[1:], vgg19(x), fy):
        loss = loss + w * l1(a, b)
    return loss / 255


def foreground_weight(alpha, fg_weight):
    """Per-pixel loss weights (N, 1, H, W) from the targets' alpha (N, 1, H, W): 1 + fg_weight x the mask,
    divided by its mean per image (so the loss keeps its scale and the lr its meaning). The mask is the
    alpha dilated by ~1.5 % of the width (1 px at 32-64 px, 8 px at 512): the soft silhouette edge and
    floaters just outside it count as foreground, so a small animal's halo is not the cheap place to err."""
    r = max(1, round(alpha.shape[-1] / 64))
    w = 1 + fg_weight * F.max_pool2d(alpha, 2 * r + 1, stride=1, padding=r)  # (N, 1, H, W)
    return w / w.mean((-2, -1), keepdim=True)


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


# ----------------------------------------------------------------------------------------------
# Diffusion losses (multi-view diffusion)
# (train_mvdiff.py)


def min_snr_weight(alphas_cumprod_t, gamma=5.0, prediction_type="v_prediction"):
    """Min-SNR-gamma loss weights (Hang et al. 2023) for the timesteps' alpha-bar values, shape kept.
    Each parameterisation's weight caps the x0-space weight at gamma: eps gets min(SNR, gamma) / SNR,
    v gets min(SNR + 1, gamma) / (SNR + 1) (the v error is (SNR + 1) x the x0 error), x0 ("sample")
    gets min(SNR + 1, gamma), so v and x0 prediction optimise one objective.
    Not Hang et al.'s min(SNR, gamma) / (SNR + 1) for v: it is 0 at pure noise, where a single-view
    model decides the layout of the unseen views."""
    snr = alphas_cumprod_t / (1 - alphas_cumprod_t)
    if prediction_type == "epsilon":
        return snr.clamp(max=gamma) / snr
    if prediction_type == "v_prediction":
        return (snr + 1).clamp(max=gamma) / (snr + 1)
    if prediction_type == "sample":
        return (snr + 1).clamp(max=gamma)
    raise ValueError(f"prediction_type {prediction_type!r}: expected epsilon, v_prediction or sample")


def diffusion_target(scheduler, x0, noise, t):
    """What the network learns to output under the (diffusers) scheduler's prediction_type; its
    `step` reads the output the same way when sampling."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(x0, noise, t)
    if kind == "sample":
        return x0
    raise ValueError(f"prediction_type {kind!r}: expected epsilon, v_prediction or sample")


def weighted_mse(pred, target, weight, pixel_weight=None):
    """Per-sample MSE (mean over every dim but the first; each element times pixel_weight, broadcast,
    when given) times weight (B,), averaged over the batch."""
    err = (pred.float() - target.float()).pow(2)
    if pixel_weight is not None:
        err = err * pixel_weight
    return (err.flatten(1).mean(1) * weight).mean()


def predicted_x0(scheduler, x_t, out, t):
    """The clean sample that the network's output implies at timesteps t (B,), for any prediction_type
    (at t with alpha-bar 0, i.e. zero-terminal-SNR's last step, eps-prediction implies nothing: keep t lower)."""
    ab = scheduler.alphas_cumprod.to(x_t.device, torch.float32)[t].view(-1, *[1] * (x_t.dim() - 1))
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return (x_t - (1 - ab).sqrt() * out) / ab.sqrt()
    if kind == "v_prediction":
        return ab.sqrt() * x_t - (1 - ab).sqrt() * out
    if kind == "sample":
        return out
    raise ValueError(f"prediction_type {kind!r}: expected epsilon, v_prediction or sample")


# ----------------------------------------------------------------------------------------------
# Dance losses and metrics
# (train_dance.py)
#
# Poses are [..., J, 3]: x, y normalised to [0, 1] (x along image columns) and a score; a joint
# with score < 0.3 is invisible (DWPose). A heatmap has H x H cells, cell i centred at (i + 0.5) / H.


def gaussian_heatmaps(poses, size, sigma, normalise=True):
    """A Gaussian of `sigma` cells around each joint [..., J, size, size], invisible joints included:
    normalised to sum 1 (the loss target; the losses mask invisible joints) or, normalise=False, with
    peak 1 (models.pose_heatmaps, the pose condition)."""
    cells = torch.arange(size, device=poses.device, dtype=poses.dtype)
    mu = poses[..., :2] * size - 0.5  # (..., J, 2) in cells
    gx = torch.exp(-((cells - mu[..., :1]) ** 2) / (2 * sigma**2))  # (..., J, W)
    gy = torch.exp(-((cells - mu[..., 1:]) ** 2) / (2 * sigma**2))  # (..., J, H)
    heat = gy[..., :, None] * gx[..., None, :]  # (..., J, H, W)
    return heat / heat.sum((-2, -1), keepdim=True).clamp(min=1e-12) if normalise else heat


def pose_heatmaps(poses, size, sigma):
    """The pose condition: J heatmaps [..., J, size, size] with peak 1 (a Gaussian of `sigma` cells
    around each visible joint, zero for invisible ones). Ground-truth and M2P poses go through the same
    rendering, so switching between them changes only the joints; differentiable in the coordinates."""
    vis = visible(poses)[..., None, None]
    return gaussian_heatmaps(poses, size, sigma, normalise=False) * vis  # (..., J, H, W)


def soft_argmax(logits):
    """Heatmap logits [..., H, W] -> expected (x, y) [..., 2] in normalised coordinates."""
    H, W = logits.shape[-2:]
    p = logits.flatten(-2).softmax(-1).unflatten(-1, (H, W))  # (..., H, W)
    xs = (torch.arange(W, device=p.device, dtype=p.dtype) + 0.5) / W
    ys = (torch.arange(H, device=p.device, dtype=p.dtype) + 0.5) / H
    return torch.stack([(p.sum(-2) * xs).sum(-1), (p.sum(-1) * ys).sum(-1)], -1)


def visible(poses, threshold=0.3):
    return (poses[..., 2] >= threshold).to(poses.dtype)


def masked_mean(x, mask):
    # where, not x * mask: whatever sits at a masked entry (inf, nan) must not leak into the mean
    return torch.where(mask > 0, x, 0).sum() / mask.sum().clamp(min=1)


def heatmap_loss(logits, poses, sigma=1.0):
    """Cross-entropy of the logits [..., J, H, W] against the ground-truth Gaussian heatmaps of
    poses [..., J, 3], plus L1 between the soft-argmax coordinates and the joints, in heatmap
    cells (so that both terms are O(1)); invisible joints masked. Returns (loss, {ce, l1})."""
    H = logits.shape[-1]
    target = gaussian_heatmaps(poses.float(), H, sigma)
    logp = logits.float().flatten(-2).log_softmax(-1)  # (..., J, H * W)
    vis = visible(poses)
    target = target.flatten(-2)
    ce = masked_mean(-torch.where(target > 0, target * logp, 0).sum(-1), vis)  # 0 log 0 = 0
    l1 = masked_mean((soft_argmax(logits.float()) - poses[..., :2]).abs().sum(-1) * H, vis)
    return ce + l1, {"ce": ce, "l1": l1}


def axis_soft_argmax(logits):
    """Separable heatmap logits [..., 2, H] (x logits, then y logits) -> expected (x, y) [..., 2] in
    normalised coordinates; the same as soft_argmax of the 2-D logits y[i] + x[j]."""
    cells = (torch.arange(logits.shape[-1], device=logits.device, dtype=logits.dtype) + 0.5) / logits.shape[-1]
    return (logits.softmax(-1) * cells).sum(-1)


def hypothesis_losses(logits, poses, sigma=1.0):
    """M2P's heatmap loss per sample, hypothesis and joint: logits [B, K, T, J, 2, H], poses [B, T, J, 3]
    -> the cross-entropy against the ground-truth Gaussian and the L1 of the soft-argmax (in heatmap
    cells), each summed over the window's frames where the joint is visible [B, K, J], and that count
    [B, 1, J]. The 2-D Gaussian target is a product of two 1-D ones and the logits are separable, so this
    is heatmap_loss on the 2-D heatmaps at 2H instead of H^2 cells per joint (M2P affords K hypotheses)."""
    H = logits.shape[-1]
    cells = torch.arange(H, device=logits.device, dtype=torch.float32)
    mu = poses[:, None, ..., :2].float() * H - 0.5  # (B, 1, T, J, 2) in cells
    target = torch.exp(-((cells - mu[..., None]) ** 2) / (2 * sigma**2))  # (B, 1, T, J, 2, H)
    target = target / target.sum(-1, keepdim=True).clamp(min=1e-12)
    # the softmax by hand: torch's (log_)softmax over a last dim of ~12 cells is slow on a CPU
    shifted = logits.float() - logits.detach().float().amax(-1, keepdim=True)
    e = shifted.exp()
    z = e.sum(-1)  # (B, K, T, J, 2)
    ce = (z.log() * target.sum(-1) - (target * shifted).sum(-1)).sum(-1)  # (B, K, T, J): -sum target * log p
    xy = (e * (cells + 0.5) / H).sum(-1) / z  # (B, K, T, J, 2): axis_soft_argmax
    l1 = (xy - poses[:, None, ..., :2]).abs().sum(-1) * H  # (B, K, T, J)
    vis = visible(poses)[:, None]  # (B, 1, T, J)
    return torch.where(vis > 0, ce, 0).sum(2), torch.where(vis > 0, l1, 0).sum(2), vis.sum(2)


def m2p_loss(logits, choice, poses, part, sigma=1.0, relax=0.05):
    """Winner-takes-all per body part over M2P's K hypotheses (multiple-hypothesis learning, relaxed as
    Rupprecht et al. 2017: the others get `relax` of the mean loss, so none is left behind): each part of
    each sample trains the hypothesis nearest its dance, and the choice logits [B, P, K] learn which one
    that is. part [J]: each joint's body part. Returns (loss, {pose, ce, l1, choice}, best [B, P])."""
    ce, l1, n = hypothesis_losses(logits, poses, sigma)  # (B, K, J), (B, K, J), (B, 1, J)
    parts = F.one_hot(part, choice.shape[1]).float()  # (J, P)
    ce, l1, n = ce @ parts, l1 @ parts, n @ parts  # (B, K, P), (B, K, P), (B, 1, P): sums over each part
    best = ((ce + l1) / n.clamp(min=1)).detach().argmin(1)  # (B, P)
    total = n.sum((1, 2)).clamp(min=1)  # (B,): visible joint-frames
    win = lambda x: (x.gather(1, best[:, None]).sum((1, 2)) / total).mean()  # noqa: E731  the winners' mean
    pose = win(ce + l1)
    if logits.shape[1] > 1:
        pose = (1 - relax) * pose + relax * ((ce + l1).sum(2) / total[:, None]).mean()
    pick = F.cross_entropy(choice.flatten(0, 1).float(), best.flatten())
    return pose + pick, {"pose": pose, "ce": win(ce), "l1": win(l1), "choice": pick}, best


def assemble_dance(xy, k, part, root):
    """All hypotheses' joints xy [B, K, T, J, 2] and one hypothesis per body part k [B, P] -> the dance
    [B, T, J, 2]: each part from its own hypothesis, each limb moved to hang from the torso hypothesis's
    joint (the neck, a hip), since two hypotheses need not agree where the torso is."""
    def pick(x, idx):  # x (B, K, T, J, 2), idx (B, J) -> (B, T, J, 2): joint j from hypothesis idx[:, j]
        return x.gather(1, idx[:, None, None, :, None].expand(-1, 1, x.shape[2], -1, x.shape[-1])).squeeze(1)

    idx, at_root = k[:, part], xy[:, :, :, root.clamp(min=0)]  # (B, J), (B, K, T, J, 2): each joint's root
    hang = pick(at_root, k[:, :1].expand_as(idx)) - pick(at_root, idx)  # the torso's root minus the limb's own
    return pick(xy, idx) + torch.where((root >= 0)[:, None], hang, 0)


def draw_hypothesis(choice, generator):
    """M2P's hypothesis for each body part of a clip [P], drawn from its choice logits [P, K] (sampling:
    once per clip, from the first window, so that the whole clip dances one dance)."""
    return torch.multinomial(choice.detach().float().cpu().softmax(-1), 1, generator=generator)[:, 0]


def pose_spread(poses):
    """How much a motion [T, J, 2+] moves: each body joint's standard deviation over time (its L2 norm
    over x, y), averaged over the 18 body joints."""
    return torch.as_tensor(poses)[:, :18, :2].float().std(0).norm(dim=-1).mean().item()


def face_loss(pred, target):
    """1 - cos(pred, target) per row, averaged (the recognizer's embedding is the target)."""
    return (1 - F.cosine_similarity(pred, target.detach(), dim=-1)).mean()


def pose_error(pred_xy, poses, pck_threshold=0.05):
    """Mean L2 distance (normalised coordinates) and PCK@threshold over visible joints."""
    vis = visible(poses)
    dist = (pred_xy - poses[..., :2]).norm(dim=-1)
    return masked_mean(dist, vis), masked_mean((dist < pck_threshold).to(dist.dtype), vis)


def gaussian_smooth(x, sigma):
    """1-D Gaussian smoothing (sigma in samples, kernel to 4 sigma) of a 1-D tensor, padded as scipy's
    gaussian_filter (Bailando's G): mode 'reflect' repeats the edge sample (d c b a | a b c d)."""
    r = min(int(4 * sigma + 0.5), len(x)) if sigma > 0 else 0
    if r == 0:
        return x
    k = torch.exp(-(torch.arange(-r, r + 1, dtype=x.dtype) ** 2) / (2 * sigma**2))
    xp = torch.cat([x[:r].flip(0), x, x[-r:].flip(0)])  # (T + 2r,)
    return F.conv1d(xp[None, None], (k / k.sum())[None, None])[0, 0]


def motion_beats(motion, fps, smooth_s=5 / 60):
    """Motion beats in seconds: local minima of the Gaussian-smoothed mean joint speed (Bailando).
    motion [T, J, 2+] (visibility ignored); speed k lies between frames k and k + 1, so at (k + 0.5) / fps."""
    motion = torch.as_tensor(motion, dtype=torch.float64)[..., :2]
    return speed_minima((motion[1:] - motion[:-1]).norm(dim=-1).mean(-1), fps, smooth_s)  # speed (T - 1,)


def video_beats(frames, fps, smooth_s=5 / 60, threshold=0.1):
    """Motion beats of a video read from its pixels, no pose model: minima of the speed of the dancer's
    silhouette. frames [T, 3, H, W] in [0, 1]; the background colour is each frame's median border
    pixel, and a pixel is foreground in proportion to its colour's distance from it (max over RGB,
    saturating at threshold). A generated dancer's clothes that change colour from one context window
    to the next are then not read as motion."""
    x = torch.as_tensor(frames, dtype=torch.float64)
    border = torch.cat([x[:, :, 0], x[:, :, -1], x[:, :, :, 0], x[:, :, :, -1]], -1)  # (T, 3, 4W)
    bg = border.median(-1).values[..., None, None]  # (T, 3, 1, 1)
    fg = ((x - bg).abs().amax(1) / threshold).clamp(max=1).flatten(1)  # (T, H W) silhouette
    return speed_minima((fg[1:] - fg[:-1]).abs().mean(1), fps, smooth_s)


def speed_minima(speed, fps, smooth_s=5 / 60):
    """The beats (s) of a speed curve (T - 1,), sample k at (k + 0.5) / fps: local minima after Gaussian
    smoothing. Speeds equal to 1e-9 of the largest form flat runs; a run is a minimum only if the speed
    falls into it and rises out of it. One sample: a beat there. Two (a minimum exactly on a frame,
    which Bailando's strict argrelextrema(np.less) misses): one beat at that frame. Three or more (a
    held pose): no beat, as in Bailando; a hold has no one turning instant, and the run's ends are set
    by the smoothing kernel's reach, not by the dance."""
    v = gaussian_smooth(speed, smooth_s * fps)
    d = v[1:] - v[:-1]  # (T - 2,)
    step = torch.where(d.abs() <= 1e-9 * v.abs().max(), 0.0, d.sign())  # -1 falls, 0 flat, +1 rises
    moves = torch.nonzero(step)[:, 0]
    i, j = moves[:-1], moves[1:]  # consecutive non-flat steps enclose the flat run v[i + 1: j + 1]
    keep = (step[i] < 0) & (step[j] > 0) & (j - i <= 2)
    return ((i[keep] + j[keep] + 1).to(torch.float64) / 2 + 0.5) / fps  # the run's middle


def beats_within(beats_s, n_frames, fps):
    """The music beats (s) before a motion's last frame, (n_frames - 1) / fps: Bailando scores only
    those (its beat frames [:len(speed)] = [:T - 1]); a beat after the motion has nothing to match."""
    b = torch.as_tensor(beats_s, dtype=torch.float64)
    return b[b * fps < n_frames - 1 - 1e-6]  # a beat on the last frame is cut too


def beat_alignment(music_beats_s, motion_beats_s, sigma_s=3 / 60):
    """Bailando's beat alignment score: mean over music beats of exp(-d^2 / (2 sigma^2)), d = the
    distance to the nearest motion beat (all in seconds; Bailando: sigma 3 frames at 60 fps)."""
    music = torch.as_tensor(music_beats_s, dtype=torch.float64)
    motion = torch.as_tensor(motion_beats_s, dtype=torch.float64)
    if len(music) == 0:
        raise ValueError("no music beats")
    if len(motion) == 0:
        return 0.0
    d = (music[:, None] - motion[None, :]).abs().min(1).values
    return torch.exp(-d**2 / (2 * sigma_s**2)).mean().item()


TORSO = (1, 8, 11)  # neck and hips in the OpenPose-18 order that starts every joint set (data.JOINT_SETS)


def limb_beats(motion, fps, smooth_s=5 / 60, floor=0.06, reach_s=0.25):
    """motion_beats of the joints relative to the torso's centre, kept only where the limbs really move:
    the fastest limb speed within reach_s of the beat must pass `floor` (normalised units per second; a
    real toy dance moves ~0.17). Moving the whole picture (a reference image bobbing on the beats) is no
    limb motion, and neither are a pose reader's small errors that follow such a bob."""
    x = torch.as_tensor(motion, dtype=torch.float64)[..., :2]
    rel = x - x[:, list(TORSO)].mean(1, keepdim=True)  # (T, J, 2)
    speed = (rel[1:] - rel[:-1]).norm(dim=-1).mean(-1)  # (T - 1,) per frame
    speed = torch.where(speed < 1e-9, 0.0, speed)  # rounding noise of a rigid shift is no motion
    beats = speed_minima(speed, fps, smooth_s)
    r = max(1, round(reach_s * fps))
    k = (beats * fps - 0.5).round().long()  # the speed sample of each beat
    moving = [speed[max(0, i - r): i + r + 1].max() * fps >= floor for i in k.tolist()]
    return beats[torch.tensor(moving, dtype=torch.bool)] if len(beats) else beats


def bobbing(pose_xy, beats_s, n_frames, fps, amplitude=0.02, half_width_s=0.25):
    """The trivial beat dancer: a still pose dipping by `amplitude` (normalised units: 2 px of 100) on every
    music beat, a cos^2 bump `half_width_s` wide each side, so it stops at the bottom on the beat (a
    motion beat there); bumps overlap at tempos above 120 bpm, so it never holds still (a hold has no
    beat). pose_xy [J, 2] -> [T, J, 2]."""
    t = torch.arange(n_frames, dtype=torch.float64)[:, None] / fps  # (T, 1)
    u = (t - torch.as_tensor(beats_s, dtype=torch.float64)[None]) / half_width_s  # (T, nb)
    dy = (torch.cos(u.clamp(-1, 1) * torch.pi / 2) ** 2).sum(1) * amplitude  # (T,)
    out = torch.as_tensor(pose_xy, dtype=torch.float64)[None].repeat(n_frames, 1, 1)  # (T, J, 2)
    out[..., 1] += dy[:, None]
    return out


def kinetic_features(motion, fps):
    """Bailando's kinetic features in 2-D: per joint the mean horizontal and vertical kinetic energy (v^2)
    and the mean acceleration magnitude (its 'energy expenditure'). motion [T, J, 2+] -> [3J]."""
    x = torch.as_tensor(motion, dtype=torch.float64)[..., :2]
    v = (x[1:] - x[:-1]) * fps  # (T - 1, J, 2)
    a = (v[1:] - v[:-1]) * fps  # (T - 2, J, 2)
    return torch.cat([v[..., 0].pow(2).mean(0), v[..., 1].pow(2).mean(0), a.norm(dim=-1).mean(0)])


def frechet_distance(real, fake):
    """FID between feature sets real [N, D] and fake [M, D] (both already normalised): |mu_r - mu_f|^2 +
    tr(C_r + C_f - 2 (C_r C_f)^1/2), the trace of the root from the eigenvalues of C_r^1/2 C_f C_r^1/2."""
    real, fake = torch.as_tensor(real, dtype=torch.float64), torch.as_tensor(fake, dtype=torch.float64)
    cr, cf = torch.cov(real.T), torch.cov(fake.T)
    w, q = torch.linalg.eigh(cr)
    root = q @ torch.diag(w.clamp(min=0).sqrt()) @ q.T  # C_r^1/2
    cross = torch.linalg.eigvalsh(root @ cf @ root).clamp(min=0).sqrt().sum()
    return ((real.mean(0) - fake.mean(0)).pow(2).sum() + cr.trace() + cf.trace() - 2 * cross).item()


def diversity(features):
    """Bailando's Div_k: the mean Euclidean distance between the feature vectors [N, D] of all pairs."""
    f = torch.as_tensor(features, dtype=torch.float64)
    d = torch.cdist(f, f)  # (N, N)
    return (d.sum() / (len(f) * (len(f) - 1))).item()


def kinetic_windows(motions, fps):
    """Kinetic features (losses.kinetic_features) of every 1-s window of each motion's 18 body joints, the
    samples of FID_k and Div_k: [N, 54]."""
    return torch.stack([kinetic_features(torch.as_tensor(m)[t: t + fps, :18], fps)
                        for m in motions for t in range(0, len(m) - fps + 1, fps)])


def smooth_poses(xy, window):
    """A centred moving average of `window` frames (odd; 0 or 1: unchanged) along time of poses [T, J, C],
    padded by reflection as gaussian_smooth (the edge frame repeated). Averaging the positions averages the
    velocities over the window: jitter from frame to frame falls as 1 / window, while a move lasting longer
    than the window keeps its speed and its stops (the motion beats)."""
    if window <= 1:
        return xy
    if window % 2 == 0:
        raise ValueError(f"smoothing window {window}: expected an odd number of frames (centred) or 0 / 1 (off)")
    r = min(window // 2, len(xy))
    xp = torch.cat([xy[:r].flip(0), xy, xy[-r:].flip(0)])  # (T + 2r, J, C)
    return xp.unfold(0, 2 * r + 1, 1).mean(-1)  # (T, J, C, 2r + 1) -> (T, J, C)


def geometric_features(motion, fps):
    """Bailando's geometric features (utils/features/manual*.py: Mueller et al.'s boolean relations between
    joints, per frame) in 2-D image coordinates, y down. motion [T, J >= 18, 2+] (OpenPose-18 order) ->
    [T - 1, 25], one row per frame from the second (velocities from the frame before), 1.0 = true.
    Kept, 25 of Bailando's 32: hand above the neck (along the torso), elbow and knee bent (< 110 deg),
    hands and ankles far apart along the shoulder / hip line, hands moving apart or along wrist-to-root,
    wrists, ankles and root fast, ankle lifted above the lowest joint, hand near the lowest joint, upper
    arm and thigh raised off the torso axis, torso horizontal. Dropped, they need depth: the hands'
    velocities out of the body plane (2), the feet's distance from the leg planes (2) and the root's from
    the ankles-neck plane (1); and Bailando's belly-chest velocity along the torso (2: its f_move scores
    its third joint, the chest, against the belly, ~0 on a rigid torso; our torso has no spine joints).
    Changed: angles are of the projected limbs (foreshortening bends them); lengths are in units of this
    motion's median 2-D torso (neck to mid-hip; half of it stands for Bailando's humerus length `hl`,
    the median shoulder and hip widths for its `sw`, `hw`), not a fixed 3-D skeleton's metres;
    velocities are per second at the true fps (Bailando divides by 1/120 s at 60 fps). Visibility is
    ignored, as in kinetic_features."""
    x = torch.as_tensor(motion, dtype=torch.float64)[:, :18, :2]
    up = x.new_tensor([0.0, -1.0])  # image y points down
    neck, root = x[:, 1], (x[:, 8] + x[:, 11]) / 2  # (T, 2); Bailando's root is the pelvis
    rsho, relb, rwri, lsho, lelb, lwri = (x[:, i] for i in (2, 3, 4, 5, 6, 7))
    rhip, rkne, rank, lhip, lkne, lank = (x[:, i] for i in (8, 9, 10, 11, 12, 13))
    hl = 0.5 * (neck - root).norm(dim=-1).median()  # the humerus is about half the torso
    sw, hw = (rsho - lsho).norm(dim=-1).median(), (rhip - lhip).norm(dim=-1).median()
    unit = lambda v: v / v.norm(dim=-1, keepdim=True).clamp(min=1e-12)  # noqa: E731
    dot = lambda a, b: (a * b).sum(-1)  # noqa: E731
    lowest = x[..., 1].amax(1)  # (T,): the lowest joint's y (Bailando's y_min, y up there)

    def angle(a, b, c, d, lo, hi):  # the angle between a -> b and c -> d strictly within (lo, hi) degrees
        cos = dot(unit(b - a), unit(d - c)).clamp(-1, 1)
        deg = torch.rad2deg(torch.arccos(cos))
        return (deg > lo) & (deg < hi)

    def move(a, b, p, k):  # p's velocity relative to a, along a -> b, above k hl / s (Bailando's f_move)
        v = ((p - a)[1:] - (p - a)[:-1]) * fps  # (T - 1, 2)
        return dot(v, unit(b - a)[1:]) > k * hl

    def fast(p, k):
        return (p[1:] - p[:-1]).norm(dim=-1) * fps > k * hl

    static = [  # (T,) each, the frame's own relations; torso direction root -> neck for chest -> neck
        dot(rwri - neck, unit(neck - root)) > 0.2 * hl, dot(lwri - neck, unit(neck - root)) > 0.2 * hl,
        angle(relb, rsho, relb, rwri, 0, 110), angle(lelb, lsho, lelb, lwri, 0, 110),
        dot(rwri - lwri, unit(rsho - lsho)) > 2.5 * sw,
        lowest - rank[:, 1] > 1.2 * hl, lowest - lank[:, 1] > 1.2 * hl,  # ankle height above the lowest joint
        dot(rank - lank, unit(rhip - lhip)) > 2.1 * hw,
        angle(rkne, rhip, rkne, rank, 0, 110), angle(lkne, lhip, lkne, lank, 0, 110),
        angle(neck, root, rsho, relb, 25, 180), angle(neck, root, lsho, lelb, 25, 180),
        angle(neck, root, rhip, rkne, 50, 180), angle(neck, root, lhip, lkne, 50, 180),
        angle(neck, root, torch.zeros_like(up), up.expand_as(neck), 70, 110),
        lowest - rwri[:, 1] < 1.2 * hl, lowest - lwri[:, 1] < 1.2 * hl,  # hand within 1.2 hl of the lowest joint
    ]
    moving = [  # (T - 1,) each: from the frame before
        move(lwri, rwri, rwri, 1.4), move(rwri, root, lwri, 1.4), move(lwri, root, rwri, 1.4),
        fast(rwri, 2.5), fast(lwri, 2.5), fast(rank, 2.5), fast(lank, 2.5), fast(root, 2.3),
    ]
    return torch.stack([f[1:] for f in static] + moving, -1).to(torch.float64)  # (T - 1, 25)


def geometric_windows(motions, fps):
    """Geometric features (losses.geometric_features) averaged over every 1-s window of each motion, the
    windows of kinetic_windows: the samples of FID_g and Div_g [N, 25] (Bailando averages whole clips)."""
    return torch.stack([geometric_features(torch.as_tensor(m)[t: t + fps], fps).mean(0)
                        for m in motions for t in range(0, len(m) - fps + 1, fps)])


def foot_contact_score(motion, fps):
    """EDGE's Physical Foot Contact score (eval/eval_pfc.py; lower is better), in 2-D image coordinates: the
    mean over frames of (the root's acceleration, normalised by its largest over the motion) x (the slower
    of each foot's joints' horizontal speed, per frame) for the left foot x the right foot, times 10^4.
    The body may only accelerate while a foot is planted. motion [T, J >= 14, 2+] -> float.
    Changed for 2-D: y points down, so the upward acceleration kept is -y (EDGE keeps +z and drops
    falling, which gravity explains); "horizontal" is image x only (sliding in depth is unseen); a foot is
    the ankle and the big toe when the motion has the feet (J >= 24), else the ankle alone; units are
    normalised image widths, so values are not on EDGE's (metres) scale. A motion whose root never
    accelerates (beyond rounding) scores 0 (EDGE would divide by zero, or by rounding noise)."""
    x = torch.as_tensor(motion, dtype=torch.float64)[..., :2]
    root = (x[:, 8] + x[:, 11]) / 2  # (T, 2) mid-hip: SMPL's pelvis
    a = (root[2:] - 2 * root[1:-1] + root[:-2]) * fps**2  # (T - 2, 2)
    a = torch.stack([a[:, 0], a[:, 1].clamp(max=0)], -1).norm(dim=-1)  # only rising (-y) counts upward
    a = torch.where(a < 1e-6, 0.0, a)  # rounding noise (widths / s^2): normalised by its max it would count fully
    if a.max() <= 0:
        return 0.0
    a = a / a.max()
    feet = ((10, 21), (13, 18)) if x.shape[1] >= 24 else ((10,), (13,))  # right, left: ankle, big toe
    v = (x[2:, :, 0] - x[1:-1, :, 0]).abs()  # (T - 2, J): horizontal speed per frame, EDGE's frames
    right, left = (v[:, list(f)].amin(1) for f in feet)
    return ((right * left * a).mean() * 1e4).item()


def identity_scores(rec, gen_faces, gt_faces, ref_faces, other_faces):
    """Identity by the evaluation recognizer `rec` (toy.eval_face_recognizer): cosine of the generated face
    crops [N, 3, 112, 112] with their reference faces, beside another dancer's face, the ground-truth crop
    and that crop painted flat in its mean colour (what colour alone scores)."""
    emb = lambda x: F.normalize(rec(x * 2 - 1), dim=-1)  # noqa: E731
    own, other = emb(ref_faces), emb(other_faces)
    cos = lambda faces, ref: (emb(faces) * ref).sum(-1).mean().item()  # noqa: E731
    flat = gt_faces.mean((2, 3), keepdim=True).expand_as(gt_faces)  # (N, 3, 112, 112)
    return {"id_cos": cos(gen_faces, own), "id_cos_other": cos(gen_faces, other), "id_cos_gt": cos(gt_faces, own),
            "id_cos_flat_face": cos(flat, own)}
