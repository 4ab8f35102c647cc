"""Dance stage C's model: the stage-B UNet with AnimateDiff motion modules starts as the stage-B model
frame by frame (reference attention, pose guider and context included); only the motion modules then
change the frames' dependence on each other; AnimateDiff weights load with another position-table length."""
import copy
import json
import math
import shutil

import numpy as np
import pytest
import torch
from diffusers import MotionAdapter, UNet2DConditionModel
from safetensors.torch import load_file

import dance_eval
import sample
import train_dance
from losses import pose_heatmaps
from models import DANCE_UNET_CONFIGS, DanceNet, FaceTokens, PoseGuider, motion_unet
from plumbing import InputError, load_config
from weights import load_motion_adapter

J, C = 24, DANCE_UNET_CONFIGS["tiny"]


def stage_b_net(seed=0):
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**C)
    guider = PoseGuider(J, C["block_out_channels"][0], (16,))
    for p in guider.parameters():  # trained guider: not zero, so the pose reaches the output
        torch.nn.init.normal_(p, std=0.1)
    return DanceNet(unet, copy.deepcopy(unet), guider, FaceTokens(C["cross_attention_dim"]))


def video_inputs(B=2, F=5, size=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    poses = torch.cat([torch.rand(B, F, J, 2, generator=g), torch.ones(B, F, J, 1)], -1)  # (B, F, J, 3)
    return dict(x=torch.randn(B, 3, F, size, size, generator=g), t=torch.tensor([10, 700][:B]),
                heat=pose_heatmaps(poses, size, 1.0), ref=torch.rand(B, 3, size, size, generator=g) * 2 - 1,
                clip=torch.randn(B, C["cross_attention_dim"], generator=g), face=torch.randn(B, 512, generator=g))


def run(net, a, keep=None):
    keep = torch.ones(len(a["ref"]), dtype=torch.bool) if keep is None else keep
    with torch.no_grad():
        out = net(a["x"], a["t"], a["heat"], 1.0, a["ref"], a["clip"], a["face"], keep)
    net.store.clear()
    return out


def frame_by_frame(net, a, keep=None):
    return torch.stack([run(net, dict(a, x=a["x"][:, :, f], heat=a["heat"][:, f]), keep)
                        for f in range(a["x"].shape[2])], 2)  # (B, C, F, h, w)


def test_stage_c_starts_as_the_stage_b_model_frame_by_frame():
    b = stage_b_net()
    a = video_inputs()
    expected = frame_by_frame(b, a)
    c = copy.deepcopy(b)
    c.unet = motion_unet(c.unet, None, max_frames=8, heads=2)
    c.install()  # from_unet2d reset the reference processors
    got = run(c, a)
    assert got.shape == a["x"].shape
    assert (got - expected).abs().max() < 1e-4
    # the reference still reaches every frame (it is read, not ignored), and a masked sample equals
    # the stage-B model's unconditional frames
    assert (run(c, dict(a, ref=a["ref"].flip(0))) - got).abs().max() > 1e-3
    keep = torch.tensor([True, False])
    assert (run(c, a, keep) - frame_by_frame(b, a, keep)).abs().max() < 1e-4


def test_only_the_motion_modules_make_frames_depend_on_each_other():
    c = stage_b_net()
    c.unet = motion_unet(c.unet, None, max_frames=8, heads=2)
    c.install()
    a = video_inputs()
    moved = dict(a, x=a["x"].clone())
    moved["x"][:, :, 0] += 1.0  # change frame 0 only
    delta = lambda: (run(c, moved) - run(c, a))[:, :, 1:].abs().max()  # noqa: E731
    assert delta() < 1e-5  # zero-initialised motion modules: frames are independent
    for name, p in c.unet.named_parameters():
        if "motion_modules" in name and "proj_out" in name:
            torch.nn.init.normal_(p, std=0.1)
    assert delta() > 1e-3


def test_animatediff_weights_load_with_another_position_table(tmp_path, capsys):
    torch.manual_seed(0)
    saved = MotionAdapter(block_out_channels=C["block_out_channels"], motion_layers_per_block=1,
                          motion_num_attention_heads=2, motion_norm_num_groups=8, motion_max_seq_length=24,
                          use_motion_mid_block=False)
    saved.save_pretrained(tmp_path / "motion")
    loaded = load_motion_adapter(tmp_path / "motion", 40)
    assert "24 -> 40 frames" in capsys.readouterr().out
    a, b = saved.state_dict(), loaded.state_dict()
    for k in a:
        if k.endswith("pos_embed.pe"):  # sinusoidal: the first 24 positions are the same values
            assert b[k].shape[1] == 40 and torch.allclose(b[k][:, :24], a[k])
        else:
            assert torch.equal(a[k], b[k]), k
    unet = UNet2DConditionModel(**C)
    assert motion_unet(unet, loaded).config.motion_max_seq_length == 40
    # another layout's weights stop with the tensors' names
    other = MotionAdapter(block_out_channels=(16, 48), motion_layers_per_block=1, motion_num_attention_heads=2,
                          motion_norm_num_groups=8, motion_max_seq_length=24, use_motion_mid_block=False)
    torch.save(other.state_dict(), tmp_path / "x.bin")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text((tmp_path / "motion" / "config.json").read_text())
    (tmp_path / "x.bin").rename(tmp_path / "bad" / "diffusion_pytorch_model.bin")
    with pytest.raises(InputError, match="wrong shape"):
        load_motion_adapter(tmp_path / "bad", 24)


def test_loaded_motion_modules_keep_their_weights_and_new_ones_start_at_zero(tmp_path):
    torch.manual_seed(0)
    saved = MotionAdapter(block_out_channels=C["block_out_channels"], motion_layers_per_block=1,
                          motion_num_attention_heads=2, motion_norm_num_groups=8, motion_max_seq_length=24,
                          use_motion_mid_block=False)
    with torch.no_grad():  # trained weights: nothing zero, proj_out included
        for p in saved.parameters():
            p.normal_(0, 0.1)
    saved.save_pretrained(tmp_path / "motion")  # the layout --motion_adapter_path reads
    model = motion_unet(UNet2DConditionModel(**C), load_motion_adapter(tmp_path / "motion", 24)).state_dict()
    weights = saved.state_dict()
    assert any(".proj_out." in k for k in weights)
    for k, v in weights.items():
        assert torch.equal(model[k], v), k
    new = motion_unet(UNet2DConditionModel(**C), None, max_frames=24, heads=2).state_dict()
    out = [k for k in new if "motion_modules" in k and ".proj_out." in k]
    assert out and all(not new[k].any() for k in out)


ALL_ARGS = ["--m2p_preset=tiny", "--window=30", "--max_steps_a=2", "--batch_size=2", "--val_samples=2",
            "--val_every=2", "--ckpt_every=2", "--warmup_steps=2", "--unet_preset=tiny", "--image_size=16",
            "--max_steps_b=2", "--val_steps=2", "--id_loss_max_t=900", "--log_every=1", "--max_steps_c=4",
            "--seq_len_start=2", "--seq_len_end=4", "--seq_len_ramp_steps=2", "--val_samples_c=2",
            "--motion_heads=2", "--toy_pretrain_steps=2", "--pose_model=toy"]


def train(data, out, *args):
    return train_dance.main(load_config(train_dance.Config, [f"--data_dir={data}", f"--out_dir={out}", *args]))


def test_each_stage_runs_with_its_section_of_one_yaml(tmp_path, monkeypatch):
    seen = {}
    for s in "ABC":  # the stages record the config they are given
        monkeypatch.setattr(train_dance, f"stage_{s.lower()}", lambda cfg: seen.setdefault(cfg.training_stage, cfg))
    one = tmp_path / "all.yaml"
    one.write_text("training_stage: all\nbatch_size: 16\nlr_b: 1.0e-3\nstage_b:\n  batch_size: 4\n  lr_b: 1.0e-4\n"
                   "stage_c:\n  batch_size: 2\n  training_stage: A\n")
    train_dance.main(load_config(train_dance.Config, ["--cfg", str(one)]))
    assert [(seen[s].batch_size, seen[s].lr_b) for s in "ABC"] == [(16, 1e-3), (4, 1e-4), (2, 1e-3)]
    assert seen["C"].training_stage == "C"  # a section cannot move its stage
    seen.clear()  # one stage runs with its own section; the command line wins over it
    train_dance.main(load_config(train_dance.Config, ["--cfg", str(one), "--training_stage=B", "--lr_b=5e-4"]))
    assert list(seen) == ["B"] and (seen["B"].batch_size, seen["B"].lr_b) == (4, 5e-4)


def per_sample_draws(kind, real):
    """torch.<kind> that draws the same values for every sample when given a generator (the training step's
    draws): t = 500 (no identity loss), no condition dropped, no M2P pose, noise a fixed pattern."""
    def draw(*args, generator=None, **kwargs):
        if generator is None:
            return real(*args, **kwargs)
        size = torch.Size(args[2] if kind == "randint" else args[0] if not isinstance(args[0], int) else args)
        if kind != "randn":
            return torch.full(size, 500) if kind == "randint" else torch.ones(size)
        return torch.linspace(-2, 2, size[1:].numel()).reshape(size[1:]).expand(size).clone()  # (B, ...)
    return draw


def first_step_grads(monkeypatch, data, out, *args):
    """The gradient that a run's first optimizer step applies, one tensor (or None) per grouped parameter."""
    grads, step = [], torch.optim.AdamW.step

    def recording(self, *a, **k):
        if not grads:
            grads.append([None if p.grad is None else p.grad.clone() for g in self.param_groups for p in g["params"]])
        return step(self, *a, **k)

    with monkeypatch.context() as m:
        m.setattr(torch.optim.AdamW, "step", recording)
        for kind in ("randint", "rand", "randn"):
            m.setattr(torch, kind, per_sample_draws(kind, getattr(torch, kind)))
        train(data, out, *args)
    return grads[0]


@pytest.mark.slow
def test_gradient_accumulation_in_stages_b_and_c_equals_the_larger_batch(tiny_dance, tmp_path, monkeypatch):
    # 2 micro-batches of 1 against 1 batch of 2: the same samples (StepSampler: one sampler step per micro-batch,
    # items k = step * batch + i either way), the same per-sample draws (the real ones come from one generator
    # per micro-batch, so they differ: per_sample_draws controls them), one optimizer step; the loss is a mean
    # over samples of equal size, so the accumulated gradient is the batch's
    tiny = ["--m2p_preset=tiny", "--window=30", "--unet_preset=tiny", "--image_size=16", "--toy_pretrain_steps=0",
            "--val_every=100", "--ckpt_every=100", "--val_samples=1", "--val_frames=1", "--val_steps=1",
            "--val_samples_c=1", "--warmup_steps=1", "--seq_len_start=3", "--seq_len_end=3", "--motion_heads=2",
            "--grad_clip=1e9"]  # clipping to a norm would hide a gradient's scale
    train(tiny_dance, tmp_path / "x", *tiny, "--training_stage=A", "--max_steps_a=1", "--batch_size=2")
    b_final = tmp_path / "x" / "stage_B" / "final"
    for stage, batch, more in (("B", "batch_size", [f"--m2p_path={tmp_path / 'x' / 'stage_A' / 'final'}"]),
                               ("C", "batch_size_c", [f"--stage_b_path={b_final}"])):
        run = [*tiny, f"--training_stage={stage}", f"--max_steps_{stage.lower()}=1", *more]
        whole = first_step_grads(monkeypatch, tiny_dance, tmp_path / "x", *run, f"--{batch}=2")
        accum = first_step_grads(monkeypatch, tiny_dance, tmp_path / f"g{stage}", *run, f"--{batch}=1",
                                 "--grad_accum=2")
        assert len(whole) == len(accum) and sum(g is not None for g in whole) > 10, stage
        for a, b in zip(whole, accum):
            assert (a is None) == (b is None), stage
            if a is not None:
                err = ((a - b).abs().max() / a.abs().max().clamp(min=1e-12)).item()
                assert err < 1e-4, stage


def test_sequence_length_curriculum_at_its_boundaries():
    cfg = load_config(train_dance.Config, ["--seq_len_start=8", "--seq_len_end=32", "--seq_len_ramp_steps=100"])
    assert [train_dance.seq_len_at(s, cfg) for s in (0, 50, 100, 101, 10_000)] == [8, 20, 32, 32, 32]


@pytest.mark.slow
def test_all_chains_the_stages_and_stage_c_resumes_exactly(tiny_dance, tmp_path, capsys):
    with pytest.raises(InputError, match="stage_B/final"):
        train(tiny_dance, tmp_path / "none", *ALL_ARGS, "--training_stage=C")
    train(tiny_dance, tmp_path / "x", *ALL_ARGS, "--training_stage=all")
    out = capsys.readouterr().out
    assert "freeze | temporal_modules" in out and " temp " in out and "| frames 4 |" in out
    x = tmp_path / "x"
    for stage in "ABC":
        assert (x / f"stage_{stage}" / "final" / "COMPLETE").is_file(), stage
    final = x / "final"  # everything sample.py needs
    for name in ("unet", "referencenet", "scheduler"):
        assert (final / name).is_dir(), name
    for name in ("pose_guider", "face_tokens", "m2p"):
        assert (final / f"{name}.safetensors").is_file(), name
    m2p_c, m2p_b = (load_file(d / "m2p.safetensors") for d in (final, x / "stage_B" / "final"))
    assert m2p_c.keys() == m2p_b.keys() and all(torch.equal(m2p_c[k], m2p_b[k]) for k in m2p_b)
    val = [json.loads(line) for line in (x / "stage_C" / "metrics.jsonl").read_text().splitlines()]
    assert [v["step"] for v in val] == [0, 2, 4] and all(math.isfinite(v["temporal_err"]) for v in val)
    for v in val:  # every score beside copying the reference; identity beside a flat-colour face
        for key in ("psnr", "ssim", "temporal_err", "temporal_err_dancer", "temporal_err_bg"):
            assert math.isfinite(v[key]) and math.isfinite(v[f"{key}_copy_ref"]), key
        assert v["temporal_err_bg_copy_ref"] < 1e-3 and v["bg_flicker"] == v["temporal_err_bg"]  # a still background
        assert {"id_cos", "id_cos_other", "id_cos_gt", "id_cos_flat_face"} <= v.keys()
        assert all(math.isfinite(v[f"pose_err_gen{k}"]) for k in ("", "_copy_ref", "_wrong_pose"))
    # stage C changed only the motion modules: everything else is stage B's
    b = load_file(x / "stage_B" / "checkpoint-2" / "dance.safetensors")
    c0, c4 = (load_file(x / "stage_C" / f"checkpoint-{s}" / "dance.safetensors") for s in (2, 4))
    moved = [k for k in c4 if not torch.equal(c0[k], c4[k])]
    assert moved and all("motion_modules" in k for k in moved)
    spatial = [k for k in c4 if "motion_modules" not in k]
    assert all(torch.equal(c4[k], b[k]) for k in spatial)
    # the pose condition: ground truth (m2p_poses_c 0) or M2P's poses from the music (1), as sampling has it
    first = {}
    for share in ("0", "1"):
        capsys.readouterr()
        train(tiny_dance, tmp_path / share, *ALL_ARGS, "--training_stage=C", f"--m2p_poses_c={share}",
              f"--stage_b_path={x / 'stage_B' / 'final'}", "--max_steps_c=1", "--val_every=100")
        first[share] = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("step 0 |"))
    assert first["0"].split("|")[1] != first["1"].split("|")[1]  # the loss parts of step 0 differ

    # an option: M2P trains in stage C too (its own group), beside the motion modules only
    train(tiny_dance, tmp_path / "z", *ALL_ARGS, "--training_stage=C", f"--stage_b_path={x / 'stage_B' / 'final'}",
          "--m2p_lr_c=1e-3")
    assert "freeze | m2p              | train  | train  | option" in capsys.readouterr().out
    m2p_z = load_file(tmp_path / "z" / "final" / "m2p.safetensors")
    moved = {k.split(".")[0] for k in m2p_z if not torch.equal(m2p_z[k], m2p_b[k])}
    assert moved and "face_head" not in moved
    z = load_file(tmp_path / "z" / "stage_C" / "checkpoint-4" / "dance.safetensors")
    assert all(torch.equal(z[k], b[k]) for k in spatial)

    # sample.py: the tiny final/ -> every file; music, poses and frames have the clip's length
    clip_dir = sorted(p for p in tiny_dance.iterdir() if p.name.startswith("clip_"))[-1]
    video = dance_sample(final, clip_dir, tmp_path / "s")
    assert video.is_file() and video.stat().st_size > 0
    for name in ("poses.npy", "contact_sheet.png"):
        assert (tmp_path / "s" / name).is_file(), name
    assert (tmp_path / "s" / "poses.mp4").is_file() or (tmp_path / "s" / "poses.gif").is_file()
    poses = np.load(tmp_path / "s" / "poses.npy")
    assert poses.shape[1:] == (24, 3) and np.isfinite(poses).all() and len(poses) >= 30
    half = dance_sample(final, clip_dir, tmp_path / "h", max_seconds=0.5)
    assert len(np.load(tmp_path / "h" / "poses.npy")) == 15 and half.is_file()
    # the end-to-end metrics from music alone on listed clips
    m = sample.main(load_config(sample.Config, [
        f"--dance_checkpoint={final}", f"--dance_eval_list={tiny_dance / 'data_train.txt'}",
        f"--output_dir={tmp_path / 'e'}", "--steps=2", "--context_frames=3", "--context_overlap=1"]))
    assert m["clips"] >= 2 and all(math.isfinite(m[k]) for k in (
        "beat_align_video", "beat_align_video_shuffled", "beat_align_video_bobbing", "beat_align_pose",
        "beat_align_pose_limbs", "id_cos", "id_cos_other", "id_cos_flat_face", "colour_err", "colour_err_other",
        "pose_spread", "pose_spread_gt", "pose_spread_train", "psnr_copy_ref"))
    assert m["pose_spread_still"] == 0 < m["pose_spread_gt"]  # standing still does not move; a dance does
    # the real video wears its own reference's clothes and not the next dancer's (the toy: exactly)
    assert m["colour_err_gt"] < 0.05 < m["colour_err_gt_other"] and m["beat_align_video_bobbing"] > 0.5
    assert all(math.isfinite(m[k]) for k in ("beat_align_read", "beat_align_read_bobbing", "pose_err_gen",
                                              "pose_err_gen_copy_ref"))  # the run's toy pose detector
    for name in ("metrics.json", "dance_eval.png"):
        assert (tmp_path / "e" / name).is_file(), name

    # --resume=auto: the finished stages are skipped, C continues from its checkpoint-2 bitwise
    y = tmp_path / "y"
    shutil.copytree(x, y)
    shutil.rmtree(y / "stage_C" / "checkpoint-4")
    shutil.rmtree(y / "stage_C" / "final")
    shutil.rmtree(y / "final")
    train(tiny_dance, y, *ALL_ARGS, "--training_stage=all", "--resume=auto")
    out = capsys.readouterr().out
    assert "stage A: " in out and "is complete, skipped" in out and "at step 2" in out
    full, resumed = (load_file(d / "stage_C" / "checkpoint-4" / "dance.safetensors") for d in (x, y))
    assert full.keys() == resumed.keys() and all(torch.equal(full[k], resumed[k]) for k in full)


def test_context_windows_cover_every_frame_and_overlap_as_asked():
    for T, size, overlap in [(5, 24, 4), (24, 24, 4), (25, 24, 4), (100, 24, 4), (61, 16, 0), (300, 24, 23)]:
        w = sample.context_windows(T, size, overlap)
        count = torch.zeros(T)
        for s, e in w:
            assert 0 <= s < e <= T and e - s == min(size, T)
            count[s:e] += 1
        assert (count >= 1).all() and w[0][0] == 0 and w[-1][1] == T
        assert all(b[0] - a[0] <= size - overlap for a, b in zip(w, w[1:]))  # no gap, overlap >= asked
    with pytest.raises(InputError, match="overlap"):
        sample.context_windows(100, 24, 24)


def dance_sample(final, clip_dir, out, **kw):
    args = [f"--dance_checkpoint={final}", f"--music={clip_dir / 'audio.wav'}", f"--ref_image={clip_dir}",
            f"--output_dir={out}", "--steps=2", "--context_frames=3", "--context_overlap=1", "--video_size=32",
            *[f"--{k}={v}" for k, v in kw.items()]]
    return sample.main(load_config(sample.Config, args))


def test_stage_c_validates_windows_spread_over_the_clip_and_identity_with_another_recognizer(tiny_dance):
    """Stage C's validation windows do not start at the reference frame (where copying it wins), and the
    toy's evaluation recognizer is not the one the identity loss trains against."""
    from data import DanceClipDataset
    from toy import eval_face_recognizer, face_recognizer
    cfg = vars(load_config(train_dance.Config, [f"--data_dir={tiny_dance}"]))
    a, b = face_recognizer(cfg, "cpu"), eval_face_recognizer(cfg, "cpu")
    assert not torch.equal(next(a.parameters()), next(b.parameters()))
    vs = DanceClipDataset(tiny_dance / "data_val.txt", 8, "body18", start=0, ref_frame=0)
    vs.start = dance_eval.spread_starts(vs.clips, 8)
    starts = [vs[i]["start"] for i in range(len(vs))]
    assert all(s > 0 for s in starts) and len(set(starts)) == len(starts) and vs[0]["ref_pose"] is not None
