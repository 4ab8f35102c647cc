"""The dance stages' validations, each score beside the trivial videos that could win it: stage A's poses
against standing still, the mean pose and a reference bobbing on the beats (beat alignment, limb beats,
FID_k / Div_k, FID_g / Div_g, foot contact); stages B and C's frames against copying the reference and a
wrong pose (PSNR / SSIM, poses read back from the frames, temporal error on the dancer and the
background), identity by a recognizer the loss never saw beside a flat-colour face (faces aligned by
their 5 points where the poses have face points). train_dance.py calls them at val_every.
"""

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image

from data import (
    face_crops,
    face_points5,
    read_frame,
    save_image_grid,
    write_skeleton_video,
    write_video,
)
from losses import (
    assemble_dance,
    axis_soft_argmax,
    beat_alignment,
    beats_within,
    bobbing,
    diversity,
    draw_hypothesis,
    foot_contact_score,
    frechet_distance,
    geometric_windows,
    identity_scores,
    kinetic_windows,
    limb_beats,
    motion_beats,
    pose_error,
    pose_heatmaps,
    pose_spread,
    predicted_x0,
    psnr,
    smooth_poses,
    ssim,
    visible,
)
from models import (
    clip_image_embeds,
    sample_frames,
    to_images,
    to_model_space,
)
from plumbing import (
    InputError,
    seeded,
)


@torch.no_grad()
def evaluate_a(m2p, recognizer, val_set, mean_pose, beats, real, cfg, step, out_dir, device, tag="val"):
    """On whole held-out clips (reference = frame 0, windows of the training length): pose error and
    PCK@0.05 against the mean-pose and reference-pose baselines; beat alignment against the music
    shuffled across clips, the real dance and the reference bobbing on the beats, also from the limbs
    only (joints relative to the torso: bobbing has none); FID_k / Div_k and FID_g / Div_g (Bailando's
    2-D kinetic and geometric features of 1-s windows against the training clips' `real` = (kinetic
    [N, 54], geometric [N, 25], their mean pose spread); the kinetic ones normalised by the training
    windows'), EDGE's foot contact score (PFC) and pose spread against the real dance, standing still in
    the reference and in the mean pose and shuffled music; face-embedding cosine; the skeleton video.
    M2P's poses are smoothed over cfg.m2p_smooth frames (losses.smooth_poses), as sampling smooths them;
    its hypotheses are drawn once per clip, as sampling draws them (pose_err_best: the nearest of its dances)."""
    m2p.eval()
    n = min(cfg.val_samples, len(val_set))
    s = {k: [] for k in ("pose_err", "pose_err_mean_pose", "pose_err_ref_pose", "pose_err_best", "pck",
                         "pck_mean_pose", "pck_ref_pose", "face_cos")}

    def dance(music, ref_pose, face, i):  # (T, D) music -> the K hypotheses (1, K, T, J, 2), the drawn (1, P), (1, E)
        pred, k = [], None
        for t0 in range(0, len(music), cfg.window):  # non-overlapping windows, as long as in training
            logits, choice, emb = m2p(music[None, t0: t0 + cfg.window], ref_pose, face, drop_face=True)
            if k is None:  # as sampling: one hypothesis per body part and clip (seeded by the clip)
                k = draw_hypothesis(choice[0], torch.Generator().manual_seed(cfg.seed + i))[None].to(device)
            pred.append(axis_soft_argmax(logits.float()))  # (1, K, w, J, 2)
        xy = torch.cat(pred, 2)
        return torch.stack([smooth_poses(p, cfg.m2p_smooth) for p in xy[0]])[None], k, emb

    def nearest(xy, gt):  # (1, K, T, J, 2) -> per body part the hypothesis nearest the dance gt (T, J, 3): (1, P)
        err = torch.where(visible(gt) > 0, (xy[0] - gt[..., :2]).norm(dim=-1), 0).sum(1)  # (K, J)
        return (err @ F.one_hot(m2p.part, m2p.P).float()).argmin(0)[None]  # (1, P)

    preds, gts, shuffled_preds, refs = [], [], [], []
    for i in range(n):
        item = val_set[i]  # start 0, reference frame 0
        music = torch.from_numpy(val_set.feats[i]).to(device)  # (T, D)
        gt = torch.from_numpy(val_set.poses[i]).to(device)  # (T, J, 3)
        ref_pose, face = item["ref_pose"][None].to(device), item["face"][None].to(device)
        dances, k, emb = dance(music, ref_pose, face, i)  # (1, K, T, J, 2)
        pred = assemble_dance(dances, k, m2p.part, m2p.root)[0]  # (T, J, 2)
        other = torch.from_numpy(val_set.feats[(i + 1) % n]).to(device)  # the next clip's music
        others, k_other, _ = dance(other, ref_pose, face, i)
        shuffled_preds.append(assemble_dance(others, k_other, m2p.part, m2p.root)[0].cpu())
        guesses = {"": pred, "_mean_pose": mean_pose.expand_as(pred), "_ref_pose": ref_pose[:, :, :2].expand_as(pred)}
        for name, guess in guesses.items():
            err, pck = pose_error(guess, gt)
            s["pose_err" + name].append(err.item())
            s["pck" + name].append(pck.item())
        # the nearest of M2P's dances: whether the true one is among them (sampling cannot pick it)
        s["pose_err_best"].append(pose_error(assemble_dance(dances, nearest(dances, gt), m2p.part, m2p.root)[0],
                                             gt)[0].item())
        s["face_cos"].append(F.cosine_similarity(emb.float(), recognizer(face * 2 - 1), dim=-1).item())
        preds.append(pred.cpu().numpy())
        gts.append(gt.cpu().numpy())
        refs.append(ref_pose[0, :, :2].cpu())
    m = {k: float(np.mean(v)) for k, v in s.items()}
    # beat alignment: the predicted motion against its own music's beats, and against the next clip's
    # music (a derangement: the same motion statistics, music that did not drive it); as Bailando,
    # only the music beats before the motion's last frame count
    mb = [motion_beats(p, cfg.fps) for p in preds]
    own = [beats_within(beats[i], len(preds[i]), cfg.fps) for i in range(n)]
    m["beat_align"] = float(np.mean([beat_alignment(own[i], mb[i]) for i in range(n)]))
    shuffled = [beat_alignment(beats_within(beats[(i + 1) % n], len(preds[i]), cfg.fps), mb[i])
                for i in range(n)] if n > 1 else [float("nan")]
    m["beat_align_shuffled"] = float(np.mean(shuffled))
    m["beat_align_gt"] = float(np.mean([beat_alignment(own[i], motion_beats(g, cfg.fps))
                                        for i, g in enumerate(gts)]))
    bobs = [bobbing(refs[i], own[i], len(preds[i]), cfg.fps) for i in range(n)]  # (T, J, 2) each
    m["beat_align_bobbing"] = float(np.mean([beat_alignment(own[i], motion_beats(b, cfg.fps))
                                             for i, b in enumerate(bobs)]))
    for name, motions in {"": preds, "_gt": gts, "_bobbing": bobs, "_shuffled": shuffled_preds}.items():
        beats_of = (lambda i: own[i]) if name != "_shuffled" else (lambda i: beats_within(  # noqa: E731
            beats[(i + 1) % n], len(motions[i]), cfg.fps))
        m["beat_align_limbs" + name] = float(np.mean([beat_alignment(beats_of(i), limb_beats(x, cfg.fps))
                                                      for i, x in enumerate(motions)]))
    still = [refs[i][None].expand(len(p), -1, -1) for i, p in enumerate(preds)]  # (T, J, 2): standing still
    mean_still = [mean_pose.cpu()[None].expand(len(p), -1, -1) for p in preds]
    motions = {"": preds, "_gt": gts, "_still": still, "_mean_pose": mean_still, "_shuffled": shuffled_preds}
    m.update(motion_scores(motions, *real, cfg.fps))
    video = out_dir / f"{tag}_{step:06d}.mp4"
    video, frame = write_skeleton_video(video, val_set.clips[0], gts[0], preds[0], cfg.fps)
    Image.fromarray(frame).save(out_dir / f"{tag}_{step:06d}.png")
    m2p.train()
    return m, video


def motion_scores(motions, real_k, real_g, real_spread, fps):
    """FID_k / Div_k, FID_g / Div_g (1-s windows) and PFC (whole motions, averaged) of each named set of
    motions {name: [[T, J, 2+], ...]} against the training windows' kinetic [N, 54] and geometric [N, 25]
    features; their pose spread beside the training clips' (real_spread). Kinetic features are z-scored by
    the training windows' (their units differ by orders of magnitude); geometric ones are fractions of
    frames, on one scale already, and are not: 11 of the 25 relations are never true in the toy's training
    windows, and dividing by their ~0 spread would let a stray frame decide FID_g."""
    mu, sd = real_k.mean(0), real_k.std(0).clamp(min=1e-8)
    m = {"pose_spread_train": real_spread}
    for name, ms in motions.items():
        k = (kinetic_windows(ms, fps) - mu) / sd  # (N, 54)
        g = geometric_windows(ms, fps)  # (N, 25)
        m["fid_k" + name], m["div_k" + name] = frechet_distance((real_k - mu) / sd, k), diversity(k)
        m["fid_g" + name], m["div_g" + name] = frechet_distance(real_g, g), diversity(g)
        m["pfc" + name] = float(np.mean([foot_contact_score(x, fps) for x in ms]))
        m["pose_spread" + name] = float(np.mean([pose_spread(x) for x in ms]))
    return m


def clip_face_points(clip, frames):
    """The 5 face points [len(frames), 5, 2] of a clip's frames, from all 134 points of its poses.npy (the
    run may model fewer joints)."""
    return face_points5(np.load(clip["dir"] / "poses.npy", mmap_mode="r")[np.asarray(frames)])


def pose_scores(found, found_ref, pose, wrong):
    """Pose accuracy of generated frames: the poses read back from them (found, (N, J, 2)) against the
    poses they were generated at (pose, (N, J, 3)), beside the reference image's pose read the same way
    (copy the reference) and against another time's pose (wrong pose): error and PCK@0.05."""
    m = {}
    for name, xy, target in (("", found, pose), ("_copy_ref", found_ref, pose), ("_wrong_pose", found, wrong)):
        err, pck = pose_error(xy, target)
        m[f"pose_err_gen{name}"], m[f"pck_gen{name}"] = err.item(), pck.item()
    return m


@torch.no_grad()
def evaluate_b(net, vae, clip, recognizer, eval_rec, read_poses, scheduler, val_set, cfg, step, out_dir,
               device):
    """Held-out clips (dancers never trained on), reference = frame 0, frames generated at the ground-
    truth poses of val_frames times: PSNR / SSIM against the ground truth, against the copy-the-reference
    baseline, and against the ground truth of another time of the same clip (the wrong-pose control: a
    model that ignores the pose scores the same on both); identity: recognizer cosine of the generated
    face crop with the reference face, against another dancer's face. Writes a PNG grid."""
    net.eval()
    n, K, S = min(cfg.val_samples, len(val_set)), cfg.val_frames, cfg.image_size
    items = []
    for i in range(n):
        clip_i, T = val_set.clips[i], val_set.clips[i]["T"]
        for k, t in enumerate(np.linspace(0, T - 1, K + 2)[1:-1].round().astype(int)):
            items.append(dict(clip=i, t=t, frame=val_set.resize(read_frame(clip_i["source"], t)),
                              box=val_set.box(clip_i, t), pose=torch.from_numpy(val_set.poses[i][t]),
                              points=clip_face_points(clip_i, [t])[0]))
    ref_images = torch.stack([val_set.resize(read_frame(c["source"], 0)) for c in val_set.clips[:n]]).to(device)
    if any(c["boxes"][0] is None for c in val_set.clips[:n]):
        raise InputError(f"{cfg.val_list}: validation clips need a face box in frame 0 (the reference)")
    ref_faces = torch.cat([face_crops(read_frame(c["source"], 0)[None], torch.tensor([c["boxes"][0]]),
                                      clip_face_points(c, [0])) for c in val_set.clips[:n]]).to(device)
    face_emb = recognizer(ref_faces * 2 - 1)  # (n, 512)
    clip_emb = clip_image_embeds(clip, ref_images)  # (n, D)
    idx = torch.tensor([it["clip"] for it in items], device=device)
    gt = torch.stack([it["frame"] for it in items]).to(device)  # (n K, 3, S, S)
    heat = pose_heatmaps(torch.stack([it["pose"] for it in items]).to(device), cfg.image_size, cfg.pose_sigma)
    ref_x = to_model_space(vae, ref_images[idx], seeded(cfg.seed, 0))
    gens = [seeded(cfg.seed, 1, j) for j in range(len(items))]  # one per frame: batch-independent noise
    x = sample_frames(net, scheduler, ref_x, clip_emb[idx], face_emb[idx], heat, 1.5, ref_x.shape[1:],
                      cfg.val_steps, cfg.val_guidance, gens)
    gen = to_images(vae, x).float()
    wrong = torch.tensor([(j // K) * K + (j % K + 1) % K for j in range(len(items))], device=device)  # same clip
    score = lambda f, a, b: f(a, b).mean().item()  # noqa: E731
    m = {"psnr": score(psnr, gen, gt), "ssim": score(ssim, gen, gt),
         "psnr_copy_ref": score(psnr, ref_images[idx], gt), "ssim_copy_ref": score(ssim, ref_images[idx], gt),
         "psnr_wrong_pose": score(psnr, gen, gt[wrong]), "ssim_wrong_pose": score(ssim, gen, gt[wrong])}
    if read_poses is not None:  # the pose read back from each generated frame against the pose it was given
        pose = torch.stack([it["pose"] for it in items]).to(device)  # (n K, J, 3)
        m.update(pose_scores(read_poses(gen), read_poses(ref_images[idx]), pose, pose[wrong]))
    # does the reference's content reach the output? The x0 prediction at t = 900 from the same noisy
    # frames with each clip's own reference and with the next clip's (context kept): 0 = ignored
    t_hi = torch.full((len(items),), 900, device=device)
    x_hi = scheduler.add_noise(to_model_space(vae, gt, seeded(cfg.seed, 2)),
                               torch.randn(ref_x.shape, generator=seeded(cfg.seed, 3)).to(device), t_hi)
    keep = torch.ones(len(items), dtype=torch.bool, device=device)
    context = net.context(clip_emb[idx], face_emb[idx], keep)
    x0 = []
    for r in (ref_x, to_model_space(vae, ref_images[(idx + 1) % n], seeded(cfg.seed, 0))):
        net.reference(r, context, keep)
        x0.append(predicted_x0(scheduler, x_hi, net.denoise(x_hi, t_hi, heat, 1.5, context), t_hi))
        net.store.clear()
    m["ref_swap"] = (x0[0] - x0[1]).abs().mean().item()
    boxes = torch.stack([it["box"] for it in items]).to(device)
    has = ~boxes.isnan().any(1)
    if has.any():  # another held-out dancer: the next clip (toy: its dancer differs)
        points = torch.stack([it["points"] for it in items])[has.cpu()]  # (N, 5, 2)
        m.update(identity_scores(eval_rec, face_crops(gen[has], boxes[has], points),
                                 face_crops(gt[has], boxes[has], points),
                                 ref_faces[idx[has]], ref_faces[(idx[has] + 1) % n]))
    pose_img = heat.amax(1, keepdim=True).expand(-1, 3, -1, -1)  # (n K, 3, H, W): the joints
    pose_img = 1 - F.interpolate(pose_img, size=(S, S), mode="area").clamp(0, 1)
    rows = [torch.stack([ref_images[i], pose_img[j], gt[j], gen[j]]).cpu() for j, i in enumerate(idx.tolist())][:16]
    grid = save_image_grid(rows, out_dir / f"val_{step:06d}.png",
                           [("reference", 1), ("pose", 1), ("ground truth", 1), ("generated", 1)])
    net.train()
    return m, grid


def spread_starts(clips, L):
    """Validation windows of L frames spread over each clip (golden-ratio strides of its length), not at
    the reference frame 0, where copying the reference would win every pixel and temporal score."""
    return [int((c["T"] - L) * ((i + 1) * 0.618034 % 1)) for i, c in enumerate(clips)]


@torch.no_grad()
def evaluate_c(net, vae, clip, recognizer, eval_rec, read_poses, scheduler, val_set, cfg, step, out_dir,
               device):
    """Held-out clips (dancers never trained on; reference = frame 0, windows of seq_len_end frames spread
    over the clip, ground-truth poses): PSNR / SSIM, identity cosine, and temporal consistency: the mean
    error of the frame-to-frame differences against the ground truth's, over the frame, on the dancer (the
    pixels that change in the ground truth) and on the background (there all change is flicker), each
    beside copying the reference frame. At step 0 the model is stage B applied frame by frame (the motion
    modules start at zero), so step 0 is the other baseline. Writes mp4s + a grid."""
    net.eval()
    n, T, S = min(cfg.val_samples_c, len(val_set)), cfg.seq_len_end, cfg.image_size
    items = [val_set[i] for i in range(n)]
    gt = torch.stack([it["frames"][:T] for it in items]).to(device)  # (n, T, 3, S, S)
    refs = torch.stack([it["ref_image"] for it in items]).to(device)
    face_emb = recognizer(torch.stack([it["face"] for it in items]).to(device) * 2 - 1)  # (n, 512)
    heat = pose_heatmaps(torch.stack([it["poses"][:T] for it in items]).to(device), S, cfg.pose_sigma)
    ref_x = to_model_space(vae, refs, seeded(cfg.seed, 0))
    C, h = ref_x.shape[1], ref_x.shape[-1]
    gens = [seeded(cfg.seed, 1, j) for j in range(n)]  # the same noise at every validation
    x = sample_frames(net, scheduler, ref_x, clip_image_embeds(clip, refs), face_emb, heat, 1.5, (C, T, h, h),
                      cfg.val_steps, cfg.val_guidance, gens)  # (n, C, T, h, w)
    gen = to_images(vae, rearrange(x, "b c f h w -> (b f) c h w")).float()  # (n T, 3, S, S)
    gen = rearrange(gen, "(b f) c h w -> b f c h w", b=n)
    flat = lambda v: v.flatten(0, 1)  # noqa: E731
    static = ((gt - gt[:, :1]).abs().amax((1, 2)) < 1e-3)[:, None, None]  # (n, 1, 1, S, S): background
    copy = refs[:, None].expand_as(gt)  # (n, T, 3, S, S): the trivial video, the reference held still
    m = {}
    for name, video in (("", gen), ("_copy_ref", copy)):
        d, d_gt = video[:, 1:] - video[:, :-1], gt[:, 1:] - gt[:, :-1]  # (n, T-1, 3, S, S)
        err = (d - d_gt).abs()
        region = lambda mask: ((err * mask).sum() / (mask.sum() * 3 * (T - 1)).clamp(min=1)).item()  # noqa: E731
        m.update({f"psnr{name}": psnr(flat(video), flat(gt)).mean().item(),
                  f"ssim{name}": ssim(flat(video), flat(gt)).mean().item(),
                  f"temporal_err{name}": err.mean().item(),  # the whole frame, the dancer, the background
                  f"temporal_err_dancer{name}": region(~static), f"temporal_err_bg{name}": region(static)})
    m["bg_flicker"] = m["temporal_err_bg"]  # the ground truth's background does not change: all is flicker
    if read_poses is not None:  # as stage B; wrong pose: the pose half a window away
        pose = flat(torch.stack([it["poses"][:T] for it in items]).to(device))  # (n T, J, 3)
        wrong = pose.unflatten(0, (n, T)).roll(T // 2, 1).flatten(0, 1)
        m.update(pose_scores(read_poses(flat(gen)), read_poses(refs).repeat_interleave(T, 0), pose, wrong))
    boxes = torch.stack([it["boxes"][:T] for it in items]).to(device)  # (n, T, 4)
    has = ~flat(boxes).isnan().any(1)
    if has.any():  # the references' faces (frame 0), cropped as the frames' are
        clips = val_set.clips[:n]
        faces = torch.cat([face_crops(read_frame(c["source"], 0)[None], torch.tensor([c["boxes"][0]]),
                                      clip_face_points(c, [0])) for c in clips]).to(device)  # (n, 3, 112, 112)
        points = torch.cat([clip_face_points(c, it["start"] + np.arange(T)) for c, it in zip(clips, items)])
        own = faces.repeat_interleave(T, 0)[has]
        m.update(identity_scores(eval_rec, face_crops(flat(gen)[has], flat(boxes)[has], points[has.cpu()]),
                                 face_crops(flat(gt)[has], flat(boxes)[has], points[has.cpu()]), own,
                                 faces.roll(-1, 0).repeat_interleave(T, 0)[has]))
    up = lambda v: F.interpolate(v, scale_factor=max(1, 128 // S), mode="nearest")  # noqa: E731
    for i in range(min(2, n)):  # ground truth | generated, with the clip's music
        frames = (torch.cat([up(gt[i]), up(gen[i])], -1).permute(0, 2, 3, 1).cpu().numpy() * 255).astype(np.uint8)
        write_video(out_dir / f"val_{step:06d}_clip{i}.mp4", frames, cfg.fps, val_set.clips[i]["dir"] / "audio.wav")
    k = np.linspace(0, T - 1, min(8, T)).round().astype(int)
    rows = [torch.cat([refs[i:i + 1], gt[i, k]]).cpu() for i in range(min(2, n))]
    rows += [torch.cat([refs[i:i + 1], gen[i, k]]).cpu() for i in range(min(2, n))]
    groups = [("reference", 1), (f"rows 1-{min(2, n)}: ground truth, then generated", len(k))]
    grid = save_image_grid(rows, out_dir / f"val_{step:06d}.png", groups)
    net.train()
    return m, grid
