"""Dance stage A: heatmaps and soft-argmax, beat alignment, music features at the video rate,
the clip loader's errors, the ArcFace IResNet loader, and train_dance.py (runs, freezes, resumes)."""
import json
import re
import shutil

import imageio.v2 as imageio
import numpy as np
import pytest
import soundfile
import torch
from conftest import DANCE_FPS, DANCE_SECONDS
from safetensors.torch import load_file

import train_dance
from data import DanceClipDataset, body_parts, read_clip
from losses import (
    assemble_dance,
    axis_soft_argmax,
    beat_alignment,
    draw_hypothesis,
    gaussian_heatmaps,
    heatmap_loss,
    hypothesis_losses,
    m2p_loss,
    motion_beats,
    pose_spread,
    soft_argmax,
    video_beats,
)
from models import IRESNET_CONFIGS, M2P_CONFIGS, IResNet, M2PEncoder
from plumbing import InputError, load_config
from toy import toy_dancer, toy_dancers_spread, toy_music, toy_poses
from weights import load_iresnet

SECONDS, FPS = DANCE_SECONDS, DANCE_FPS


def test_gt_heatmap_soft_argmax_returns_the_joint_and_invisible_joints_are_masked():
    g = torch.Generator().manual_seed(0)
    xy = 0.2 + 0.6 * torch.rand(2, 5, 7, 2, generator=g)  # (B, T, J, 2)
    poses = torch.cat([xy, torch.ones(2, 5, 7, 1)], -1)  # (B, T, J, 3)
    heat = gaussian_heatmaps(poses, 16, sigma=1.0)  # (B, T, J, 16, 16)
    assert torch.allclose(heat.sum((-2, -1)), torch.ones(2, 5, 7))
    assert torch.allclose(soft_argmax(heat.log()), poses[..., :2], atol=1e-4)
    poses[:, :, 3, 2] = 0.1  # joint 3 invisible
    logits = heat.log().clone()
    base, parts = heatmap_loss(logits, poses)
    assert parts["l1"] < 1e-3
    logits[:, :, 3] = torch.randn(2, 5, 16, 16, generator=g) * 5  # anything at an invisible joint
    assert torch.allclose(heatmap_loss(logits, poses)[0], base)
    logits[:, :, 4] = torch.randn(2, 5, 16, 16, generator=g) * 5  # a visible joint counts
    assert heatmap_loss(logits, poses)[0] > base + 0.1


def test_beat_alignment_on_beat_motion_scores_near_one_and_shifted_lower():
    fps, period = 30, 0.5  # 120 BPM
    t = np.arange(8 * fps) / fps
    beats = np.arange(0.25, 7.8, period)

    def dancer(shift):  # a limb swinging with zero speed at the beats (+ shift)
        x = 0.5 + 0.1 * np.cos(2 * np.pi * (t - beats[0] - shift) / (2 * period))  # (T,)
        return np.stack([np.stack([x, np.full_like(x, 0.5)], -1)] * 3, 1)  # (T, 3 joints, 2)

    on = beat_alignment(beats, motion_beats(dancer(0.0), fps))
    late = beat_alignment(beats, motion_beats(dancer(0.1), fps))
    assert on > 0.95 and late < 0.3
    # seconds, not frames: the same motion at 60 fps scores the same
    t = np.arange(8 * 60) / 60
    fps = 60
    assert beat_alignment(beats, motion_beats(dancer(0.0), fps)) > 0.95


def test_video_beats_read_the_beats_from_the_silhouette():
    fps, period = 30, 0.5
    t = np.arange(6 * fps) / fps
    beats = np.arange(0.25, 5.8, period)
    cells = np.arange(32) / 32

    def video(shift, torso_colour):  # (T, 3, 32, 32): an arm swinging left-right, at rest at the beats (+ shift)
        x = 0.5 + 0.2 * np.cos(2 * np.pi * (t - beats[0] - shift) / (2 * period))
        arm = np.exp(-((cells[None, :] - x[:, None]) ** 2) / (2 * 0.05**2))  # (T, 32)
        v = np.full((len(t), 3, 32, 32), 0.9)
        v[:, :, 8:16] = 0.9 - 0.6 * arm[:, None, None, :]
        v[:, :, 18:30, 8:24] = torso_colour[:, :, None, None]  # a still torso
        return v

    steady = np.full((len(t), 3), 0.5)
    assert beat_alignment(beats, video_beats(video(0.0, steady), fps)) > 0.9
    assert beat_alignment(beats, video_beats(video(0.12, steady), fps)) < 0.3
    # a torso whose colour drifts (a generated dancer's clothes across windows) is not motion; the mean
    # absolute pixel change of this video scores 0.70
    drift = 0.5 + 0.3 * np.sin(2 * np.pi * t / 0.7)[:, None] * np.array([1, -1, 0.5])
    assert beat_alignment(beats, video_beats(video(0.0, drift), fps)) > 0.9
    assert len(video_beats(np.ones((20, 3, 4, 4)), fps)) == 0  # a still video has no beats


def test_music_features_have_one_row_per_video_frame_and_beats_at_the_beats(tiny_dance):
    T = int(SECONDS * FPS)
    for clip in sorted(tiny_dance.glob("clip_*")):
        feats = np.load(clip / "music_feats.npy")
        assert feats.shape == (T, 35) and np.isfinite(feats).all()
        assert len(list((clip / "frames").glob("*.png"))) == T
        assert np.load(clip / "poses.npy").shape == (T, 134, 3)
        meta = json.loads((clip / "meta.json").read_text())
        true = meta["first_beat_s"] + np.arange(-1, 8) * 60 / meta["bpm"]
        true = true[(true > 0.05) & (true < SECONDS - 0.05)]
        peaks = np.nonzero(feats[:, -2])[0] / FPS  # onset-peak one-hot column: frame k is at k / fps seconds
        # every beat (a kick with a click) is an onset peak within a frame of it: features are fps-aligned
        # (librosa's beat tracker itself is not checked here: on a 2 s clip its tempo estimate is unreliable)
        assert np.abs(true[:, None] - peaks[None]).min(1).max() <= 1.5 / FPS
        assert feats[:, -1].sum() >= 1  # the beat one-hot column is filled


def test_loader_items_and_joint_subsets(tiny_dance):
    ds = DanceClipDataset(tiny_dance / "data_train.txt", window=30, joints="body18")
    item = ds[0]
    assert item["music"].shape == (30, 35) and item["poses"].shape == (30, 18, 3)
    assert item["ref_pose"].shape == (18, 3) and item["face"].shape == (3, 112, 112)
    assert ds[0]["start"] == item["start"]  # deterministic per (seed, epoch, index)
    all134 = DanceClipDataset(tiny_dance / "data_train.txt", window=30, joints="all134")
    assert all134[1]["poses"].shape == (30, 134, 3)
    with pytest.raises(ValueError, match="joints='body17'"):
        DanceClipDataset(tiny_dance / "data_train.txt", window=30, joints="body17")


@pytest.mark.parametrize("breakage, match", [
    ("short_audio", r"audio.wav: .* shorter than the 60 frames"),
    ("pose_shape", r"poses.npy: shape \(60, 133, 3\), expected \(60, 134, 3\)"),
    ("no_faces", r"faces.json: missing"),
    ("feature_rows", r"music_feats.npy: shape \(59, 35\)"),
])
def test_bad_clips_stop_with_an_error_naming_the_file(tiny_dance, tmp_path, breakage, match):
    clip = shutil.copytree(tiny_dance / "clip_00000", tmp_path / "clip")
    if breakage == "short_audio":
        audio, sr = soundfile.read(clip / "audio.wav")
        soundfile.write(clip / "audio.wav", audio[: sr], sr)  # 1 s of audio for 2 s of frames
    elif breakage == "pose_shape":
        np.save(clip / "poses.npy", np.zeros((60, 133, 3), np.float32))
    elif breakage == "no_faces":
        (clip / "faces.json").unlink()
    else:
        np.save(clip / "music_feats.npy", np.load(clip / "music_feats.npy")[:59])
    (tmp_path / "list.txt").write_text("clip\n")
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        DanceClipDataset(tmp_path / "list.txt", window=30)
    with pytest.raises((ValueError, FileNotFoundError), match=re.escape(str(clip))):
        read_clip(clip)


def test_iresnet_loads_an_arcface_torch_state_dict(tmp_path):
    ref = IResNet(**IRESNET_CONFIGS["toy"])
    with torch.no_grad():  # non-trivial batch-norm statistics, as in a trained backbone
        for m in ref.modules():
            if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.BatchNorm1d)):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    # DDP-saved
    sd = {f"module.{k}": v for k, v in ref.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(sd, tmp_path / "backbone.pth")
    model = load_iresnet(tmp_path / "backbone.pth", "toy")
    x = torch.rand(2, 3, 112, 112) * 2 - 1
    assert torch.allclose(model(x), ref.eval()(x)) and model(x).shape == (2, 512)
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    # the arcface_torch key layout, e.g. iresnet18's
    keys = set(IResNet(**IRESNET_CONFIGS["iresnet18"]).state_dict())
    assert {"conv1.weight", "bn1.running_var", "prelu.weight", "layer1.0.bn1.weight", "layer1.0.conv1.weight",
            "layer1.0.prelu.weight", "layer1.0.bn3.bias", "layer1.0.downsample.0.weight",
            "layer4.1.conv2.weight", "bn2.weight", "fc.weight", "features.weight"} <= keys
    with pytest.raises(KeyError, match=r"backbone.pth: not an arcface_torch iresnet18 state dict"):
        load_iresnet(tmp_path / "backbone.pth", "iresnet18")
    # insightface's antelopev2 ships glintr100 as ONNX: refused, naming the format wanted
    (tmp_path / "glintr100.onnx").write_bytes(b"\x08\x07\x12\x07pytorch\x1a\x032.0" + bytes(64))
    with pytest.raises(InputError, match=r"glintr100.onnx: not a PyTorch state dict .*arcface_torch backbone.pth"):
        load_iresnet(tmp_path / "glintr100.onnx", "iresnet100")


def test_m2p_shapes_and_positions_for_150_frames():
    m = M2PEncoder(35, 24, **M2P_CONFIGS["tiny"], parts=body_parts(24))
    ref = torch.rand(2, 24, 3)
    logits, choice, emb = m(torch.randn(2, 150, 35), ref, torch.rand(2, 3, 112, 112))
    H, K = M2P_CONFIGS["tiny"]["heatmap"], M2P_CONFIGS["tiny"]["hypotheses"]
    assert logits.shape == (2, K, 150, 24, 2, H) and choice.shape == (2, 5, K)  # 5 body parts
    assert torch.allclose(emb.norm(dim=-1), torch.ones(2))
    # a new M2P starts near the reference pose, its hypotheses apart (winner-takes-all needs them unequal)
    xy = axis_soft_argmax(logits)  # (2, K, 150, 24, 2)
    assert (xy[:, 0] - xy[:, 1]).abs().max() > 1e-4
    assert (xy - ref[:, None, None, :, :2].clamp(0.5 / H, 1 - 0.5 / H)).abs().max() < 0.1
    # the dance does not see a dropped face; the face embedding still does
    face = torch.rand(2, 3, 112, 112)
    music, ref = torch.randn(2, 30, 35), torch.rand(2, 24, 3)
    a, _, emb_a = m(music, ref, face, drop_face=True)
    b, _, emb_b = m(music, ref, torch.rand(2, 3, 112, 112), drop_face=torch.tensor([True, True]))
    assert torch.allclose(a, b) and not torch.allclose(emb_a, emb_b)


def test_separable_m2p_loss_equals_the_2d_heatmap_loss_and_trains_the_nearest_hypothesis_per_part():
    g = torch.Generator().manual_seed(0)
    B, K, T, J, H = 2, 3, 5, 24, 16
    poses = torch.cat([0.2 + 0.6 * torch.rand(B, T, J, 2, generator=g), torch.ones(B, T, J, 1)], -1)
    poses[0, :, 2, 2] = 0.1  # joint 2 of sample 0 invisible
    logits = torch.randn(B, K, T, J, 2, H, generator=g)
    ce, l1, n = hypothesis_losses(logits, poses)  # (B, K, J) sums over time, (B, 1, J) counts
    for b in range(B):
        for k in range(K):  # the same as the 2-D loss on the heatmap y[i] + x[j], per sample and hypothesis
            full = logits[b, k, ..., 1, :, None] + logits[b, k, ..., 0, None, :]  # (T, J, H, W)
            _, parts = heatmap_loss(full, poses[b])
            assert torch.allclose(ce[b, k].sum() / n[b].sum(), parts["ce"], atol=1e-4)
            assert torch.allclose(l1[b, k].sum() / n[b].sum(), parts["l1"], atol=1e-4)
    # per body part the winner is the hypothesis nearest the dance: the truth of sample 1's left arm
    # (part 2: joints 5-7) in hypothesis 2, its right leg (part 3: joints 9, 10, 21-23) in hypothesis 1
    part, root = body_parts(J)
    truth = gaussian_heatmaps(poses[1], H, 1.0)  # (T, J, H, W)
    marginals = torch.stack([truth.sum(-2), truth.sum(-1)], -2).clamp(min=1e-9).log()  # (T, J, 2, H)
    for k, joints in ((2, [5, 6, 7]), (1, [9, 10, 21, 22, 23])):
        logits[1, k, :, joints] = marginals[:, joints]
    choice = torch.zeros(B, 5, K, requires_grad=True)
    loss, parts, best = m2p_loss(logits, choice, poses, part)
    assert best[1, 2] == 2 and best[1, 3] == 1
    loss.backward()
    assert choice.grad[1, 2, 2] < 0 < choice.grad[1, 2, 0]  # the choice learns to pick it
    # the assembled dance takes each part from its hypothesis and hangs the limbs from the torso's joints
    xy = axis_soft_argmax(logits)  # (B, K, T, J, 2)
    dance = assemble_dance(xy, best, part, root)  # (B, T, J, 2)
    torso = best[1, 0]
    assert torch.allclose(dance[1, :, 8], xy[1, torso, :, 8])  # the hip: the torso's
    knee = xy[1, 1, :, 9] - xy[1, 1, :, 8] + xy[1, torso, :, 8]  # the leg's knee, hung from the torso's hip
    assert torch.allclose(dance[1, :, 9], knee, atol=1e-6)
    assert torch.allclose(dance[1, :, 9] - dance[1, :, 8], poses[1, :, 9, :2] - xy[1, 1, :, 8], atol=0.02)
    drawn = draw_hypothesis(torch.tensor([[0.0, 30.0, 0.0], [30.0, 0.0, 0.0]]), torch.Generator().manual_seed(0))
    assert drawn.tolist() == [1, 0]


def test_toy_dancers_spread_measures_the_dancers_the_toy_set_draws():
    # write_toy_dance's dancers on their songs' tempo (the first draws of toy_music), against
    # toy_dancers_spread's own new dancers: one population, the means within their sampling error
    n, T = 300, 90
    mine = []
    for k in range(n):
        _, bpm, offset = toy_music(np.random.default_rng((0, k)), 1.0, 100)
        phase = (np.arange(T) / DANCE_FPS - offset) * bpm / 60
        mine.append(pose_spread(toy_poses(toy_dancer(np.random.default_rng((0, 1_000_000 + k))), phase)[0]))
    theirs = toy_dancers_spread(T, DANCE_FPS, n=n)
    assert abs(theirs - np.mean(mine)) < 4 * np.std(mine) * (2 / n) ** 0.5
    assert 0.5 * np.mean(mine) < toy_dancers_spread(T // 3, DANCE_FPS, n=n) < np.mean(mine)  # a 1-s window moves less


def test_m2p_activation_checkpointing_gives_the_same_gradients():
    grads, saved = [], []
    for ckpt in (False, True):
        torch.manual_seed(0)
        m = M2PEncoder(35, 24, **M2P_CONFIGS["tiny"], grad_checkpoint=ckpt)
        g = torch.Generator().manual_seed(1)
        count = []  # tensors the forward keeps for backward
        with torch.autograd.graph.saved_tensors_hooks(lambda t: count.append(1) or t, lambda t: t):
            logits, choice, emb = m(torch.randn(2, 30, 35, generator=g), torch.rand(2, 24, 3, generator=g),
                                    torch.rand(2, 3, 112, 112, generator=g), torch.tensor([True, False]))
        (logits.square().mean() + choice.sum() + emb.sum()).backward()
        grads.append([p.grad for p in m.parameters()])
        saved.append(len(count))
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))
    assert saved[1] < saved[0]  # the blocks' activations are recomputed, not kept


def test_the_seeds_command_line_names_are_aliases(tmp_path, capsys):
    seed = ("--training_stage A --max_steps_a 5000 --train_batch_size 1 "
            "--gradient_accumulation_steps 8").split()
    cfg = load_config(train_dance.Config, seed, train_dance.ALIASES)
    assert (cfg.max_steps_a, cfg.batch_size, cfg.grad_accum) == (5000, 1, 8)
    more = ["--lr_warmup_steps=7", "--gradient_clip_norm=0.5", f"--output_dir={tmp_path}",
            "--gradient_checkpointing=true", "--num_workers=3"]
    cfg = load_config(train_dance.Config, more, train_dance.ALIASES)
    assert (cfg.warmup_steps, cfg.grad_clip, cfg.out_dir, cfg.grad_checkpoint, cfg.num_workers) == (
        7, 0.5, str(tmp_path), True, 3)
    (tmp_path / "seed.yaml").write_text("train_batch_size: 4\n")  # in a config file too
    cfg = load_config(train_dance.Config, ["--cfg", str(tmp_path / "seed.yaml")], train_dance.ALIASES)
    assert cfg.batch_size == 4
    fields = set(train_dance.Config.__dataclass_fields__)
    assert set(train_dance.ALIASES.values()) <= fields  # every alias names a real knob
    with pytest.raises(SystemExit):
        load_config(train_dance.Config, ["--help"], train_dance.ALIASES)
    out = capsys.readouterr().out
    assert "class Config" in out and "--train_batch_size = --batch_size" in out


def test_train_freezes_runs_and_resume_continues_exactly(tiny_dance, tmp_path, capsys, tiny_cfg):
    train_dance.main(tiny_cfg(train_dance, tiny_dance, tmp_path / "a"))
    out = capsys.readouterr().out
    assert "freeze | face_recognizer  | frozen | frozen | frozen |" in out and "0 trainable" in out  # the matrix
    assert "freeze | m2p              | train  | train  | frozen |" in out
    assert "val step 4 | pose_err " in out and "| pose_err_mean_pose " in out and "| beat_align_shuffled " in out
    stage = tmp_path / "a" / "stage_A"
    logged = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged] == [0, 4]
    metrics = {"pose_err", "pose_err_mean_pose", "pose_err_ref_pose", "pck", "beat_align", "beat_align_shuffled",
               "face_cos"}
    assert metrics <= set(logged[-1])
    full = load_file(stage / "checkpoint-4" / "m2p.safetensors")
    assert (stage / "final" / "m2p.safetensors").exists() and (stage / "checkpoint-2").exists()
    video = imageio.mimread(stage / "val_000004.mp4", memtest=False)  # the skeleton video reads back
    assert len(video) == int(SECONDS * FPS) and video[0].shape == (128, 256, 3)
    train_dance.main(tiny_cfg(train_dance, tiny_dance, tmp_path / "b", max_steps_a=2))
    train_dance.main(tiny_cfg(train_dance, tiny_dance, tmp_path / "b", resume="auto"))
    first = load_file(tmp_path / "b" / "stage_A" / "checkpoint-2" / "m2p.safetensors")
    resumed = load_file(tmp_path / "b" / "stage_A" / "checkpoint-4" / "m2p.safetensors")
    assert any(not torch.equal(first[k], resumed[k]) for k in full)  # it trained on after resuming
    for k in full:
        assert torch.allclose(full[k], resumed[k], atol=1e-6), k


def test_gradient_accumulation_and_missing_features_are_computed(tiny_dance, tmp_path, tiny_cfg, monkeypatch):
    data = shutil.copytree(tiny_dance, tmp_path / "data")
    (data / "clip_00000" / "music_feats.npy").unlink()  # computed from audio.wav and cached
    monkeypatch.setenv("WANDB_MODE", "offline")
    graded, init = set(), M2PEncoder.__init__  # graded: the M2P parameters that got a nonzero gradient

    def init_recording_gradients(self, *args, **kwargs):
        init(self, *args, **kwargs)
        for name, p in self.named_parameters():
            p.register_hook(lambda g, name=name: graded.add(name) if g.abs().sum() > 0 else None)

    monkeypatch.setattr(M2PEncoder, "__init__", init_recording_gradients)
    # 2 steps: the zero-initialised heads pass no gradient to the body on the first
    cfg = tiny_cfg(train_dance, data, tmp_path / "out", max_steps_a=2, grad_accum=2, wandb=True)
    m2p = train_dance.main(cfg)
    pictures = (tmp_path / "out" / "stage_A").glob("wandb/offline-run-*/files/media/images/val/frame_*.png")
    assert list(pictures)
    cached, made = (np.load(d / "clip_00000" / "music_feats.npy") for d in (data, tiny_dance))
    assert np.allclose(cached, made, atol=1e-4)
    assert graded == {name for name, _ in m2p.named_parameters()}  # stage A trains every M2P parameter


def test_stage_b_needs_stage_a_and_stage_c_needs_stage_b(tiny_dance, tmp_path, tiny_cfg):
    with pytest.raises(InputError, match="stage_A/final: not a stage-A final/ folder"):
        train_dance.main(tiny_cfg(train_dance, tiny_dance, tmp_path, training_stage="B"))
    with pytest.raises(InputError, match="stage_B/final: not a stage-B final/ folder"):
        train_dance.main(tiny_cfg(train_dance, tiny_dance, tmp_path, training_stage="C"))
