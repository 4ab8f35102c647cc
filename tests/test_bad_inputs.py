"""A user's broken files and flags, through the scripts' entry points (`cli(main, Config)`, what
`python x.py` runs): each ends in one line `error: <file or flag>: <problem>` with exit code 2, no
traceback, and every file that existed before the failing run is byte-identical after it."""
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_ARGS
from PIL import Image

import gen_synthetic
import sample
import train_dance
import train_gslrm
import train_mvdiff
from cameras import load_rig, read_cameras, save_prompt_embeds, write_cameras
from models import GSLRM, GSLRM_CONFIGS
from plumbing import cli, load_checkpoint
from toy import toy_rig_prompt_embeds

REPO = Path(__file__).parent.parent


def mice(tiny_mice, tmp):
    """A copy of the tiny mice that a case may break."""
    return Path(shutil.copytree(tiny_mice, tmp / "mice"))


def edit_camera(d, view, **changes):
    cams = read_cameras(d / "opencv_cameras.json")
    cams["frames"][view].update(changes)
    write_cameras(d / "opencv_cameras.json", cams)


def args(script, data_dir, out, *extra):
    return [f"--data_dir={data_dir}", f"--out_dir={out}", *TINY_ARGS[script.__name__], *extra]


def mv_args(data_dir, out, *extra):
    return args(train_mvdiff, data_dir, out, f"--prompt_embeds={data_dir}/pe.pt", *extra)


def trained_gslrm(m, out):
    """A finished tiny run: its checkpoints are what a later failing run must not touch."""
    cli(train_gslrm.main, train_gslrm.Config, argv=args(train_gslrm, m, out, "--max_steps=3"))
    return out / "checkpoint-3"


# Each case: (tiny_mice, tiny_dance, tmp) -> (script, argv, substrings the one line must hold).
def gslrm_truncated_weights(tm, td, tmp):
    ck = trained_gslrm(m := mice(tm, tmp), tmp / "out")
    (ck / "model.safetensors").write_bytes((ck / "model.safetensors").read_bytes()[:200])
    return train_gslrm, args(train_gslrm, m, tmp / "out", f"--resume={ck}"), ["model.safetensors", "cannot"]


def gslrm_truncated_state_auto(tm, td, tmp):
    ck = trained_gslrm(m := mice(tm, tmp), tmp / "out")
    (ck / "state.pt").write_bytes((ck / "state.pt").read_bytes()[:50])
    return train_gslrm, args(train_gslrm, m, tmp / "out", "--resume=auto"), ["state.pt", "cannot read"]


def gslrm_fresh_run_into_old_run(tm, td, tmp):
    trained_gslrm(m := mice(tm, tmp), tmp / "out")
    return train_gslrm, args(train_gslrm, m, tmp / "out", "--lr=0.01"), ["holds checkpoints", "--resume=auto"]


def overwrite_would_delete_init_from(tm, td, tmp):
    ck = trained_gslrm(m := mice(tm, tmp), tmp / "out")  # fine-tuning from a checkpoint of the run it replaces
    return train_gslrm, args(train_gslrm, m, tmp / "out", "--overwrite", f"--init_from={ck}"), [
        f"--overwrite would delete init_from={ck}", "copy it elsewhere"]


def gslrm_diverges(tm, td, tmp):
    return (train_gslrm, args(train_gslrm, mice(tm, tmp), tmp / "out", "--lr=1e6", "--max_bad_steps=2",
                              "--warmup_steps=1"), ["steps in a row skipped", "nothing saved"])


def broken_rig_json(tm, td, tmp):
    (tmp / "rig.json").write_text('{"name": "r", "frames": [')
    return train_gslrm, args(train_gslrm, mice(tm, tmp), tmp / "out", f"--rig={tmp / 'rig.json'}"), [
        "rig.json", "cannot read rig file"]


def broken_camera_json(tm, td, tmp):
    m = mice(tm, tmp)
    (m / "mouse_00000" / "opencv_cameras.json").write_text('{"frames": [{"w": 16,')
    return train_gslrm, args(train_gslrm, m, tmp / "out"), ["mouse_00000/opencv_cameras.json", "cannot read"]


def scaled_rotation_on_a_target_view(tm, td, tmp):
    m = mice(tm, tmp)
    w2c = np.array(read_cameras(m / "mouse_00001" / "opencv_cameras.json")["frames"][7]["w2c"])
    w2c[:3, :3] *= 1.5
    edit_camera(m / "mouse_00001", 7, w2c=w2c.tolist())
    return train_gslrm, args(train_gslrm, m, tmp / "out"), ["mouse_00001/opencv_cameras.json", "frame 7",
                                                            "not a rigid transform"]


def singular_w2c(tm, td, tmp):
    m = mice(tm, tmp)
    edit_camera(m / "mouse_00002", 2, w2c=[[0.0] * 4] * 4)
    return train_gslrm, args(train_gslrm, m, tmp / "out"), ["mouse_00002/opencv_cameras.json", "frame 2"]


def zero_focal_on_a_target_view(tm, td, tmp):
    m = mice(tm, tmp)
    edit_camera(m / "mouse_00003", 8, fx=0.0)
    return train_gslrm, args(train_gslrm, m, tmp / "out"), ["mouse_00003/opencv_cameras.json", "frame 8",
                                                            "fx, fy > 0"]


def missing_sample_folder(tm, td, tmp):
    m = mice(tm, tmp)
    listed = (m / "data_train.txt").read_text()
    (m / "data_train.txt").write_text("/home/author/facelift/sample_000\n" + listed)  # another machine's path
    return train_gslrm, args(train_gslrm, m, tmp / "out"), ["sample_000 does not exist", "listed in"]


def missing_image(tm, td, tmp):
    m = mice(tm, tmp)
    (m / "mouse_00000" / "images" / "cam_003.png").unlink()
    return train_gslrm, args(train_gslrm, m, tmp / "out"), ["cam_003.png", "image missing"]


def more_novel_views_than_a_sample_has(tm, td, tmp):
    return train_gslrm, args(train_gslrm, tm, tmp / "out", "--num_novel_views=4"), [
        "mouse_00000: has 9 views", "6 input views + 4 novel views (10)", "--num_novel_views to at most 3"]


def no_view_left_to_validate(tm, td, tmp):
    m = mice(tm, tmp)
    for name in (m / "data_val.txt").read_text().split():  # the rig's 6 views only: all of them inputs
        cams = read_cameras(m / name / "opencv_cameras.json")
        write_cameras(m / name / "opencv_cameras.json", {**cams, "frames": cams["frames"][:6]})
    return train_gslrm, args(train_gslrm, m, tmp / "out"), ["mouse_00004: has 6 views", "held out for validation",
                                                            "--num_input_views to at most 5"]


def out_dir_below_a_file(tm, td, tmp):
    (tmp / "file.txt").write_text("not a folder")
    return train_gslrm, args(train_gslrm, tm, tmp / "file.txt" / "run"), [
        f"{tmp / 'file.txt' / 'run'}: Not a directory: {tmp / 'file.txt'} is a file, not a folder"]


def out_dir_is_a_file(tm, td, tmp):
    (tmp / "file.txt").write_text("not a folder")
    return train_gslrm, args(train_gslrm, tm, tmp / "file.txt"), [f"{tmp / 'file.txt'}: File exists: it is a file"]


def unknown_preset(tm, td, tmp):
    return train_gslrm, args(train_gslrm, tm, tmp / "out", "--preset=small"), ["--preset='small'", "tiny"]


def image_size_not_a_patch_multiple(tm, td, tmp):
    return train_gslrm, args(train_gslrm, tm, tmp / "out", "--image_size=20"), ["--image_size=20", "patch"]


def zero_batch(tm, td, tmp):
    return train_gslrm, args(train_gslrm, tm, tmp / "out", "--batch_size=0"), ["--batch_size=0", "at least 1"]


def unknown_key(tm, td, tmp):
    argv = args(train_gslrm, tm, tmp / "out", "--learning_rate=1")
    return train_gslrm, argv, ["unknown key 'learning_rate'", "valid keys"]


def bad_value(tm, td, tmp):
    return train_gslrm, args(train_gslrm, tm, tmp / "out", "--max_steps=many"), ["max_steps expects int"]


def missing_config_file(tm, td, tmp):
    return train_gslrm, ["--cfg", str(tmp / "nope.yaml")], ["nope.yaml", "cannot read"]


def nan_prompt_embeds(tm, td, tmp):
    m, rig = mice(tm, tmp), load_rig("mouse_6view")
    pe = toy_rig_prompt_embeds(rig, 16)
    pe[3, 2, 1] = float("nan")
    save_prompt_embeds(m / "pe.pt", pe, rig, rig["views"])
    return train_mvdiff, mv_args(m, tmp / "out"), ["pe.pt", "non-finite value at index [3, 2, 1]"]


def truncated_prompt_embeds(tm, td, tmp):
    m, rig = mice(tm, tmp), load_rig("mouse_6view")
    save_prompt_embeds(m / "pe.pt", toy_rig_prompt_embeds(rig, 16), rig, rig["views"])
    (m / "pe.pt").write_bytes((m / "pe.pt").read_bytes()[:100])
    return train_mvdiff, mv_args(m, tmp / "out"), ["pe.pt", "cannot read prompt embeddings"]


def facelift_embeds_for_the_mouse_rig(tm, td, tmp):
    m = mice(tm, tmp)
    torch.save(torch.randn(6, 8, 16), m / "pe.pt")  # a bare tensor, as FaceLift's clr_embeds.pt
    return train_mvdiff, mv_args(m, tmp / "out"), ["pe.pt", "bare tensor", "mouse_6view"]


def rgb_only_samples(tm, td, tmp):
    m = mice(tm, tmp)
    for png in (m / "mouse_00001" / "images").glob("*.png"):  # a camera's frames with the arena, no mask
        Image.open(png).convert("RGB").save(png)
    return train_gslrm, args(train_gslrm, m, tmp / "out"), ["mouse_00001/images/cam_0", "RGB without alpha",
                                                             "--rgb_ok=true"]


def toy_embeds_in_a_real_run(tm, td, tmp):
    return train_mvdiff, args(train_mvdiff, tm, tmp / "out", f"--prompt_embeds={tmp / 'missing.pt'}",
                              f"--pipeline_dir={tmp / 'sd'}"), ["missing.pt: not found", "only for toy runs"]


def reference_view_flag(tm, td, tmp):
    return train_mvdiff, mv_args(tm, tmp / "out", "--reference_view=3"), ["--reference_view='3'"]


def mvdiff_image_size(tm, td, tmp):
    return train_mvdiff, mv_args(tm, tmp / "out", "--image_size=17"), ["--image_size=17", "multiple of 2"]


def dance_copy(td, tmp):
    return Path(shutil.copytree(td, tmp / "dance"))


def nan_music_features(tm, td, tmp):
    d = dance_copy(td, tmp)
    feats = np.load(d / "clip_00001" / "music_feats.npy")
    feats[10, 4] = np.nan
    np.save(d / "clip_00001" / "music_feats.npy", feats)
    return train_dance, args(train_dance, d, tmp / "out"), ["clip_00001/music_feats.npy", "non-finite",
                                                            "[10, 4]"]


def nan_visible_joint(tm, td, tmp):
    d = dance_copy(td, tmp)
    poses = np.load(d / "clip_00000" / "poses.npy")
    poses[5, 3, 0] = np.nan
    np.save(d / "clip_00000" / "poses.npy", poses)
    return train_dance, args(train_dance, d, tmp / "out"), ["clip_00000/poses.npy", "non-finite", "[5, 3, 0]"]


def missing_frame_png(tm, td, tmp):
    d = dance_copy(td, tmp)
    (d / "clip_00000" / "frames" / "000012.png").unlink()
    return train_dance, args(train_dance, d, tmp / "out"), ["clip_00000/frames", "frame 12 is missing"]


def odd_feature_width(tm, td, tmp):
    d = dance_copy(td, tmp)
    feats = np.load(d / "clip_00001" / "music_feats.npy")
    np.save(d / "clip_00001" / "music_feats.npy", feats[:, :20])
    clips = (d / "data_train.txt").read_text() + (d / "data_val.txt").read_text()
    (d / "data_train.txt").write_text(clips)  # 3 clips of width 35, the odd one named
    return train_dance, args(train_dance, d, tmp / "out"), ["clip_00001/music_feats.npy", "width 20"]


def feature_width_tie(tm, td, tmp):
    d = dance_copy(td, tmp)
    feats = np.load(d / "clip_00001" / "music_feats.npy")
    np.save(d / "clip_00001" / "music_feats.npy", feats[:, :20])
    first, second = (d / "data_train.txt").read_text().splitlines()[:2]
    (d / "data_train.txt").write_text(f"{first}\n{second}\n")  # one clip of each width: both named
    return train_dance, args(train_dance, d, tmp / "out"), ["music_feats.npy: music features of width",
                                                            "clip_00000/music_feats.npy", "clip_00001/music_feats.npy"]


def unknown_stage(tm, td, tmp):
    return train_dance, args(train_dance, td, tmp / "out", "--training_stage=D"), ["--training_stage='D'",
                                                                                   "stages A"]


def stage_b_without_stage_a(tm, td, tmp):
    return train_dance, args(train_dance, td, tmp / "out", "--training_stage=B"), [
        "stage_A/final: not a stage-A final/ folder", "--training_stage A"]


def unknown_m2p_preset(tm, td, tmp):
    return train_dance, args(train_dance, td, tmp / "out", "--m2p_preset=huge"), ["--m2p_preset='huge'"]


def gen_synthetic_not_a_checkpoint(tm, td, tmp):
    (tmp / "ckpt").mkdir()
    return gen_synthetic, [f"--mvdiff_checkpoint={tmp / 'ckpt'}", f"--input_data={tm}/data_train.txt",
                           f"--output_dir={tmp / 'syn'}"], ["ckpt", "neither a train_mvdiff checkpoint"]


def sample_without_input(tm, td, tmp):
    return sample, [f"--output_dir={tmp / 's'}"], ["--input_image", "--eval_list"]


CASES = [gslrm_truncated_weights, gslrm_truncated_state_auto, gslrm_fresh_run_into_old_run, gslrm_diverges,
         overwrite_would_delete_init_from, toy_embeds_in_a_real_run,
         rgb_only_samples,
         broken_rig_json, broken_camera_json, scaled_rotation_on_a_target_view, singular_w2c,
         zero_focal_on_a_target_view, missing_sample_folder, missing_image, more_novel_views_than_a_sample_has,
         no_view_left_to_validate, out_dir_below_a_file, out_dir_is_a_file, unknown_preset,
         image_size_not_a_patch_multiple, zero_batch, unknown_key, bad_value, missing_config_file,
         nan_prompt_embeds, truncated_prompt_embeds, facelift_embeds_for_the_mouse_rig, reference_view_flag,
         mvdiff_image_size, nan_music_features, nan_visible_joint, missing_frame_png, odd_feature_width,
         feature_width_tie,
         unknown_stage, stage_b_without_stage_a, unknown_m2p_preset, gen_synthetic_not_a_checkpoint,
         sample_without_input]


def snapshot(root):
    return {p: p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_one_line_per_user_error(case, tiny_mice, tiny_dance, tmp_path, capsys):
    script, argv, expected = case(tiny_mice, tiny_dance, tmp_path)
    before = snapshot(tmp_path)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        cli(script.main, script.Config, getattr(script, "ALIASES", None), argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and err and err[-1].startswith("error: "), err
    assert "Traceback" not in "\n".join(err)
    for text in expected:
        assert text in err[-1], (text, err[-1])
    after = snapshot(tmp_path)
    assert {p: after.get(p) for p in before} == before  # nothing that existed was changed or deleted


def one_error_line(err):
    lines = err.strip().splitlines()
    assert lines and [x for x in lines if x.startswith("error: ")] == [lines[-1]], err
    assert "Traceback" not in err
    return lines[-1]


def step_of(ck):
    """The step of checkpoint `ck`, loaded (weights and state.pt) as a resumed run loads it."""
    return load_checkpoint(ck, {"model": GSLRM(**GSLRM_CONFIGS["tiny"])})["step"]


def test_disk_full_while_saving_state_keeps_earlier_checkpoints(tiny_mice, tmp_path, capsys):
    ck = trained_gslrm(m := mice(tiny_mice, tmp_path), out := tmp_path / "out")
    before = snapshot(ck)
    weights, state = (ck / "model.safetensors").stat().st_size, (ck / "state.pt").stat().st_size
    limit = (weights + state) // 2  # the weights fit, state.pt (AdamW's moments: twice their size) does not
    assert weights < limit < state
    capsys.readouterr()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))  # `ulimit -f`: a write past it fails with EFBIG
    try:
        with pytest.raises(SystemExit) as exit_:
            cli(train_gslrm.main, train_gslrm.Config, argv=args(train_gslrm, m, out, "--resume=auto", "--max_steps=9"))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert exit_.value.code == 2
    assert one_error_line(capsys.readouterr().err) == (
        f"error: {out / 'checkpoint-6' / 'state.pt'}: cannot write it (File too large): free disk space or raise "
        "the file-size limit (ulimit -f); checkpoint-6 was not saved, earlier checkpoints are intact")
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["checkpoint-3"]  # the temporary is gone
    assert snapshot(ck) == before and step_of(ck) == 3


def test_read_only_out_dir_is_left_as_it_was(tiny_mice, tmp_path):
    ck = trained_gslrm(m := mice(tiny_mice, tmp_path), out := tmp_path / "out")
    drop = []  # root writes through file modes: as root the run goes without the capability that allows it
    if os.geteuid() == 0:
        drop = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
        if not shutil.which("setpriv") or subprocess.run([*drop, "true"]).returncode:
            pytest.skip("running as root, and setpriv cannot drop CAP_DAC_OVERRIDE here")
    before = snapshot(tmp_path)
    out.chmod(0o555)
    try:  # --overwrite: the run that would delete the checkpoints before its first write
        run = subprocess.run([*drop, sys.executable, str(REPO / "train_gslrm.py"),
                              *args(train_gslrm, m, out, "--overwrite")], capture_output=True, text=True)
    finally:
        out.chmod(0o755)
    assert run.returncode == 2 and one_error_line(run.stderr) == (
        f"error: {out}: cannot write into this output folder (Permission denied): get write permission there "
        "or choose another path; nothing in it was changed")
    assert snapshot(tmp_path) == before and step_of(ck) == 3


def test_python_entry_point_prints_one_line(tmp_path):
    (tmp_path / "rig.json").write_text("{")
    run = subprocess.run([sys.executable, str(REPO / "train_gslrm.py"), f"--rig={tmp_path / 'rig.json'}",
                          f"--data_dir={tmp_path}", f"--out_dir={tmp_path / 'out'}"],
                         capture_output=True, text=True)
    assert run.returncode == 2 and run.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "Traceback" not in run.stderr and "rig.json" in run.stderr
    debug = subprocess.run([sys.executable, str(REPO / "data.py"), "rig_from_cameras",
                            str(tmp_path / "x.json"), "--name=x", f"--out={tmp_path / 'r.json'}", "--debug"],
                           capture_output=True, text=True)
    assert debug.returncode != 0 and "Traceback" in debug.stderr  # --debug: the traceback, for a bug report
    assert not (tmp_path / "out" / "config.yaml").exists()  # written only once a run is set up


@pytest.mark.parametrize("when", ["first batch", "second batch", "diverged"])
def test_failed_overwrite_leaves_the_earlier_run(when, tiny_mice, tmp_path, capsys):
    """--overwrite sets the earlier run aside only once the new run's data and first batch are read, and puts
    it back when the new run fails before its own first checkpoint."""
    from data import StepSampler, read_list_file
    ck = trained_gslrm(m := mice(tiny_mice, tmp_path), out := tmp_path / "out")
    before = snapshot(out)
    extra = ["--lr=1e6", "--max_bad_steps=2", "--warmup_steps=1"] if when == "diverged" else []
    if when != "diverged":
        samples = read_list_file(m / train_gslrm.Config.train_list)
        first = {i for i, _ in StepSampler(len(samples), 2, seed=train_gslrm.Config.seed).batch(0)}
        second = {i for i, _ in StepSampler(len(samples), 2, seed=train_gslrm.Config.seed).batch(1)}
        bad = samples[min(first) if when == "first batch" else min(second - first)]
        for png in (bad / "images").glob("*.png"):
            png.write_bytes(b"not a png")
    with pytest.raises(SystemExit) as exit_:
        cli(train_gslrm.main, train_gslrm.Config, argv=args(train_gslrm, m, out, "--overwrite", *extra))
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    # a broken image stops the run before anything moved (GS-LRM reads up to 100 training samples for its
    # mean-image baseline, and the first batch); a run failing later puts the earlier run back
    assert ("is back" in err) == (when == "diverged")
    assert one_error_line(err).startswith("error: " + (f"{bad}" if when != "diverged" else ""))
    assert snapshot(out) == before and step_of(ck) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mice", "out"]  # no trash left beside it
