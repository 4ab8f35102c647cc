"""prepare_dance.py and pose.py: real dance videos -> clip folders. The pose models are tiny ONNX files built
here with the released models' input and output names and shapes (RTMPose-wholebody: input (1, 3, 256, 192),
simcc_x (1, 133, 384), simcc_y (1, 133, 512); YOLOX: images (1, 3, 640, 640) -> output (1, 8400, 85)); the
videos are toy dancers rendered to mp4 with their music."""
import json
import os
import pickle
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from conftest import TINY_ARGS
from PIL import Image

import prepare_dance
import sample
from data import HOP, read_clip, read_list_file, write_video
from plumbing import InputError, cli, load_config
from pose import BODY18_FROM_COCO, PoseModel, face_box, to_layout134
from toy import render_dancer, toy_dancer, toy_music, toy_poses

ROOT = Path(__file__).resolve().parent.parent
FPS, SECONDS, SIZE = 30, 2.0, 64  # the toy videos: 2 s at 30 fps, 64 x 64 dancers padded to 96 x 64
PAD = 32  # background columns left of the dancer: the frames are not square


def export(module, x, path, inputs, outputs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice
        torch.onnx.export(module, (x,), str(path), input_names=inputs, output_names=outputs, dynamo=False,
                          opset_version=17)
    return path


class DotPose(torch.nn.Module):
    """Every keypoint at the brightest pixel of the input's first channel: simcc_x is the column maximum,
    simcc_y the row maximum, each repeated twice (split ratio 2). Tests the crop and its inverse."""

    def forward(self, x):  # (1, 3, H, W): 256 x 192 (RTMPose-m/l) or 384 x 288 (DWPose-l)
        c = x[:, :1]
        sx = torch.repeat_interleave(torch.amax(c, dim=2), 2, dim=-1)  # (1, 1, 2 W)
        sy = torch.repeat_interleave(torch.amax(c, dim=3), 2, dim=-1)  # (1, 1, 2 H)
        return sx.expand(1, 133, sx.shape[-1]), sy.expand(1, 133, sy.shape[-1])


class NmsYolox(torch.nn.Module):
    """YOLOX exported with NMS: (1, N, 5) boxes x0 y0 x1 y1 (input pixels) and score."""

    def forward(self, x):
        box = torch.tensor([[[10.0, 10.0, 30.0, 30.0, 0.4], [192.0, 40.0, 448.0, 360.0, 0.9]]])  # (1, 2, 5)
        return box + 0.0 * x.mean()


class ConstPose(torch.nn.Module):
    """133 keypoints at fixed input pixels uv (133, 2), score 1 (the input only adds 0)."""

    def __init__(self, uv):
        super().__init__()
        k = torch.arange(133)
        self.register_buffer("sx", torch.full((1, 133, 384), -1.0))
        self.register_buffer("sy", torch.full((1, 133, 512), -1.0))
        self.sx[0, k, (2 * uv[:, 0]).long()] = 1.0
        self.sy[0, k, (2 * uv[:, 1]).long()] = 1.0

    def forward(self, x):
        zero = 0.0 * x.mean()
        return self.sx + zero, self.sy + zero


class ConstYolox(torch.nn.Module):
    """One person at box (cx, cy, w, h) in 640 x 640 input pixels with score `score`, on anchor (10, 5) of
    stride 8; every other anchor scores 0 (the released model's outputs are already sigmoids)."""

    def __init__(self, cx, cy, w, h, score):
        super().__init__()
        out = torch.zeros(1, 8400, 85)
        out[0, 5 * 80 + 10, :6] = torch.tensor([cx / 8 - 10, cy / 8 - 5, np.log(w / 8), np.log(h / 8),
                                                score ** 0.5, score ** 0.5])
        self.register_buffer("out", out)

    def forward(self, x):
        return self.out + 0.0 * x.mean()


def coco133_from_ours(pose):
    """Our 134 layout (normalised) -> COCO-WholeBody 133 with made-up face points (a circle around the nose)
    and hands at the wrists: a plausible whole-body pose for the constant model."""
    coco = np.zeros((133, 2), np.float32)
    for ours, c in enumerate(BODY18_FROM_COCO):
        if c >= 0:
            coco[c] = pose[ours, :2]
    coco[17:23] = pose[18:24, :2]
    r = abs(pose[16, 0] - pose[17, 0]) / 2  # half the ear-to-ear distance
    a = np.linspace(0, 2 * np.pi, 68, endpoint=False)
    coco[23:91] = pose[0, :2] + 0.8 * r * np.stack([np.cos(a), np.sin(a)], 1)
    coco[91:112], coco[112:133] = pose[7, :2], pose[4, :2]  # left hand, right hand
    return coco


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("onnx")
    x = torch.zeros(1, 3, 256, 192)
    standing = toy_poses(toy_dancer(np.random.default_rng(0)), np.array([0.25]))[0][0]  # (134, 3)
    # placed on the toy frame (the dancer's square at PAD) as seen through the pose model's crop of the whole
    # 96 x 64 frame: centre (48, 32), 0.625 image pixels per input pixel (the box 1.25 x 96 wide over 192)
    xy = coco133_from_ours(standing) * SIZE + [PAD, 0]  # (133, 2) image pixels
    uv = torch.from_numpy((xy - [48, 32]) / 0.625 + [96, 128]).float()  # (133, 2) input pixels
    return dict(
        dot=export(DotPose(), x, d / "dot.onnx", ["input"], ["simcc_x", "simcc_y"]),
        dot384=export(DotPose(), torch.zeros(1, 3, 384, 288), d / "dot384.onnx", ["input"], ["simcc_x", "simcc_y"]),
        yolox_nms=export(NmsYolox(), torch.zeros(1, 3, 640, 640), d / "nms.onnx", ["images"], ["dets"]),
        const=export(ConstPose(uv.clamp(0, 191)), x, d / "const.onnx", ["input"], ["simcc_x", "simcc_y"]),
        const_uv=uv.clamp(0, 191).numpy(),
        yolox=export(ConstYolox(320, 200, 256, 320, 0.81), torch.zeros(1, 3, 640, 640), d / "yolox.onnx",
                     ["images"], ["output"]),
        yolox_none=export(ConstYolox(320, 200, 256, 320, 0.1), torch.zeros(1, 3, 640, 640), d / "none.onnx",
                          ["images"], ["output"]))


def toy_video(seed, fps=FPS, seconds=SECONDS):
    """A toy dancer's frames (T, 64, 96, 3) (padded on the left), its poses (T, 134, 3) normalised to the
    64 x 64 dancer square, and its music (audio, sr)."""
    rng = np.random.default_rng(seed)
    sr, T = FPS * HOP, int(seconds * fps)
    audio, bpm, offset = toy_music(rng, seconds + 0.1, sr)
    dancer = toy_dancer(rng)
    poses, head = toy_poses(dancer, (np.arange(T) / fps - offset) * bpm / 60)
    frames = render_dancer(dancer, poses, head, SIZE, np.full(3, 0.9))
    frames = np.concatenate([np.full((T, SIZE, PAD, 3), 230, np.uint8), frames], 2)  # (T, 64, 96, 3)
    return frames, poses, (audio, sr)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """Two dancers x two videos; dancerB_001's music is a WAV beside a silent video."""
    d = tmp_path_factory.mktemp("videos")
    for i, name in enumerate(["dancerA_000", "dancerA_001", "dancerB_000", "dancerB_001"]):
        frames, _, (audio, sr) = toy_video(i)
        wav = d / f"{name}.wav"
        soundfile.write(str(wav), audio, sr, subtype="PCM_16")
        if name == "dancerB_001":
            write_video(d / f"{name}.mp4", frames, FPS)
        else:
            write_video(d / f"{name}.mp4", frames, FPS, wav)
            wav.unlink()
    return d


def prepare(*args):
    return prepare_dance.main(load_config(prepare_dance.Config, list(args)))


def test_layout_mapping_and_face_boxes():
    xy = np.stack([np.arange(133), 1000 + np.arange(133)], 1).astype(np.float32)  # point k at (k, 1000 + k)
    score = np.linspace(0.1, 1.0, 133).astype(np.float32)
    ours = to_layout134(xy, score)
    assert ours[2, 0] == 6 and ours[4, 0] == 10 and ours[14, 0] == 2 and ours[17, 0] == 3  # RSho RWri REye LEar
    assert ours[1, 0] == 5.5 and ours[1, 2] == score[5]  # the neck: between the shoulders, the weaker score
    assert ours[18, 0] == 17 and ours[24, 0] == 23 and ours[92, 0] == 91 and ours[133, 0] == 132
    coco17 = to_layout134(xy[:17], score[:17])
    assert (coco17[18:] == 0).all() and coco17[10, 0] == 16  # no feet, face, hands: score 0 = invisible
    pose = np.zeros((134, 3), np.float32)
    assert face_box(pose) is None
    pose[[0, 16, 17], :] = [[0.5, 0.3, 1], [0.45, 0.28, 1], [0.55, 0.28, 1]]  # nose and ears only (COCO-17)
    box = face_box(pose)
    assert box[0] < 0.45 and box[2] > 0.55 and box[1] < 0.28 < 0.3 < box[3]
    with pytest.raises(InputError, match="expected 133"):
        to_layout134(xy[:20], score[:20])


@pytest.mark.parametrize("pose_model, detector", [("dot", "full_frame"), ("dot", "yolox"), ("dot384", "yolox_nms")])
def test_pose_model_finds_a_dot_through_the_crop(models, pose_model, detector):
    image = np.zeros((80, 120, 3), np.uint8)
    image[29:32, 69:72] = 255  # a 3 x 3 white dot centred at pixel (70, 30)
    model = PoseModel(models[pose_model], models.get(detector, detector))
    if detector != "full_frame":  # the letterbox: 640 / 120 = 5.33, the box (192, 40, 448, 360) / 5.33
        assert np.allclose(model.person_box(image), [36, 7.5, 84, 67.5], atol=1e-3)
    pose = model(image)
    assert pose.shape == (134, 3)
    assert np.abs(pose[:, :2] - [70, 30]).max() < 1.5  # every point at the dot (one input pixel <= 0.8 px)
    assert (pose[:, 2] > 2).all()  # the dot's normalised brightness, (255 - 123.7) / 58.4
    assert (PoseModel(models["dot"], models["yolox_none"])(image) == 0).all()  # no person: all invisible


def test_pose_model_refuses_bad_files(models, tmp_path):
    with pytest.raises(InputError, match="no person detector"):
        PoseModel(models["dot"], "")
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        PoseModel(tmp_path / "missing.onnx", "full_frame")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(InputError, match="junk.onnx: cannot load it as an ONNX pose model"):
        PoseModel(tmp_path / "junk.onnx", "full_frame")


@pytest.fixture(scope="module")
def prepared(models, videos, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / "clips"
    prepare(f"--videos={videos}", f"--out_dir={out}", f"--pose_model={models['const']}", "--detector=full_frame",
            "--size=32", "--val_fraction=0.5")
    return out


def test_videos_to_clips(models, prepared):
    out = prepared
    train, val = (read_list_file(out / f) for f in ("data_train.txt", "data_val.txt"))
    assert len(train) == 2 and len(val) == 2
    who = {p.name: json.loads((p / "meta.json").read_text())["dancer"] for p in train + val}
    assert {who[p.name] for p in train}.isdisjoint({who[p.name] for p in val})  # split by dancer
    for d in train + val:
        clip = read_clip(d, FPS)  # the loader's own checks: shapes, boxes, audio length, features
        assert clip["T"] == int(SECONDS * FPS) and all(b is not None for b in clip["boxes"])
        poses = np.load(d / "poses.npy")
        assert poses.shape == (60, 134, 3) and poses[..., :2].min() >= 0 and poses[..., :2].max() <= 1
        assert np.load(d / "music_feats.npy").shape == (60, 35)
        x0, y0, side = json.loads((d / "meta.json").read_text())["crop"]
        assert side == 64 and y0 == 0 and 0 <= x0 <= 32
    # the frames are the video's, cropped where meta.json says, in order (frame 37 is not frame 36)
    d = out / "dancerB_001"
    x0 = json.loads((d / "meta.json").read_text())["crop"][0]
    src = toy_video(3)[0][:, :, x0: x0 + 64]  # (T, 64, 64, 3)
    got = np.asarray(Image.open(d / "frames" / "000037.png"), np.float32)

    def small(f):
        return np.asarray(Image.fromarray(f).resize((32, 32), Image.BICUBIC), np.float32)
    assert np.abs(got - small(src[37])).mean() < np.abs(got - small(src[36])).mean()
    assert np.abs(got - small(src[37])).mean() < 6  # H.264 and resampling, in 0..255
    # the constant model's points, mapped back through the full-frame crop (centre (48, 32), 0.625 px per
    # input pixel), then into the square crop and normalised
    nose = (models["const_uv"][0] - [96, 128]) * 0.625 + [48, 32]
    assert np.allclose(np.load(d / "poses.npy")[0, 0, :2], (nose - [x0, 0]) / 64, atol=1 / 64)



def test_resume_skips_finished_clips(models, videos, prepared, tmp_path):
    # finished clips are skipped, a killed clip's temporary is removed, a missing clip is remade
    out = shutil.copytree(prepared, tmp_path / "clips")
    train = read_list_file(out / "data_train.txt")
    (out / ".tmp-dancerA_000-deadbeef").mkdir()
    shutil.rmtree(out / "dancerA_001")
    kept = (out / "dancerB_000" / "poses.npy").stat().st_mtime_ns
    prepare(f"--videos={videos}", f"--out_dir={out}", f"--pose_model={models['const']}", "--detector=full_frame",
            "--size=32", "--val_fraction=0.5")
    assert not (out / ".tmp-dancerA_000-deadbeef").exists() and (out / "dancerA_001" / "COMPLETE").is_file()
    assert (out / "dancerB_000" / "poses.npy").stat().st_mtime_ns == kept
    assert read_list_file(out / "data_train.txt") == train  # the same split



@pytest.mark.slow
def test_train_dance_trains_on_prepared_clips(prepared, tmp_path):
    # stages A and B, run as a user runs them (stage B's arguments: test_dance_b.py's)
    def train(*args):
        run = subprocess.run([sys.executable, "train_dance.py", f"--data_dir={prepared}",
                              f"--out_dir={tmp_path / 'run'}",
                              *args], cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                             text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        return run.stdout
    assert "step 1 |" in train(*TINY_ARGS["train_dance"], "--max_steps_a=2", "--training_stage=A")
    assert (tmp_path / "run" / "stage_A" / "final" / "m2p.safetensors").is_file()
    log = train("--training_stage=B", "--m2p_preset=tiny", "--window=30", "--unet_preset=tiny", "--image_size=16",
                "--toy_pretrain_steps=2", "--max_steps_b=2", "--batch_size=2", "--val_every=100", "--val_samples=2",
                "--val_steps=2", "--warmup_steps=1", "--log_every=1")
    assert "step 1 | loss " in log and "val step 2 | psnr " in log
    assert (tmp_path / "run" / "stage_B" / "final" / "pose_guider.safetensors").is_file()


def test_bad_videos_are_named_in_one_line(videos, models, tmp_path, capsys):
    d = tmp_path / "videos"
    d.mkdir()
    shutil.copy(videos / "dancerA_000.mp4", d / "good_000.mp4")
    (d / "broken_000.mp4").write_bytes(b"\x00" * 1000)
    write_video(d / "mute_000.mp4", toy_video(5)[0], FPS)  # no audio track, no audio file beside it
    argv = [f"--videos={d}", f"--out_dir={tmp_path / 'clips'}", f"--pose_model={models['const']}",
            "--detector=full_frame", "--size=16"]
    with pytest.raises(SystemExit) as stop:
        cli(prepare_dance.main, prepare_dance.Config, argv=argv)
    assert stop.value.code == 2
    lines = capsys.readouterr().err.splitlines()  # tqdm's bar, then the error
    err = [line for line in lines if line.startswith("error")]
    assert len(err) == 1 and err[0] == lines[-1] and err[0].startswith("error: 2 of 3 videos not prepared"), err
    assert "broken_000.mp4 (cannot read it as a video" in err[0]
    assert "mute_000.mp4 (no usable audio" in err[0] and "good_000" not in err[0]
    assert (tmp_path / "clips" / "good_000" / "COMPLETE").is_file()  # the good one is kept
    assert not list((tmp_path / "clips").glob(".tmp-*"))  # no half-written clip left


def test_aistpp_keypoints2d_import(tmp_path):
    videos, kps, music = (tmp_path / n for n in ("videos", "keypoints2d", "wav"))
    for d in (videos, kps, music):
        d.mkdir()
    truth = {}
    for seed, name in enumerate(["gBR_sBM_cAll_d04_mBR0_ch01", "gPO_sBM_cAll_d05_mPO1_ch02"]):
        frames, poses, (audio, sr) = toy_video(10 + seed, fps=60)  # AIST++ videos run at 60 fps
        write_video(videos / (name.replace("cAll", "c02") + ".mp4"), frames, 60)  # silent: music apart
        soundfile.write(str(music / f"{name.split('_')[4]}.wav"), audio, sr, subtype="PCM_16")
        coco = np.full((9, len(poses), 17, 3), np.nan, np.float32)  # other cameras: missing
        for ours, c in enumerate(BODY18_FROM_COCO):
            if c >= 0:
                coco[1, :, c, :2] = poses[:, ours, :2] * SIZE + [PAD, 0]  # camera c02, in pixels
                coco[1, :, c, 2] = 0.9
        coco[1, 10] = np.nan  # a missed frame (frame 5 at 30 fps)
        with open(kps / f"{name}.pkl", "wb") as f:
            pickle.dump({"keypoints2d": coco, "det_scores": np.ones((9, len(poses)))}, f)
        truth[name.replace("cAll", "c02")] = poses[::2]  # at 30 fps
    prepare("--source=aistpp", f"--videos={videos}", f"--keypoints={kps}", f"--music={music}", "--camera=c02",
            f"--out_dir={tmp_path / 'clips'}", "--size=32", "--val_fraction=0.5")
    lists = [read_list_file(tmp_path / "clips" / f) for f in ("data_train.txt", "data_val.txt")]
    assert sorted(len(x) for x in lists) == [1, 1]
    for d in lists[0] + lists[1]:
        clip = read_clip(d, FPS)
        poses = np.load(d / "poses.npy")
        x0, y0, side = json.loads((d / "meta.json").read_text())["crop"]
        assert clip["T"] == 60 and (y0, side) == (0, 64) and abs(x0 - PAD) <= 2  # centred on the dancer
        want = truth[d.name][: clip["T"]] + np.array([(PAD - x0) / 64, 0, 0], np.float32)  # in the crop
        ok = np.arange(60) != 5
        want[:, 1] = (want[:, 2] + want[:, 5]) / 2  # COCO has no neck: DWPose's is between the shoulders
        assert np.allclose(poses[ok, :18, :2], want[ok, :18, :2], atol=1e-4)  # the body in OpenPose order
        assert (poses[ok, :18, 2] == np.float32(0.9)).all() and (poses[5, :, 2] == 0).all()  # missed: invisible
        assert (poses[:, 18:, 2] == 0).all()  # COCO-17 has no feet, face or hands: invisible
        assert clip["boxes"][5] is None and clip["boxes"][0] is not None  # face boxes from nose, eyes, ears
        assert clip["boxes"][0][0] < want[0, 16, 0] < want[0, 17, 0] < clip["boxes"][0][2]  # ear to ear inside


def test_stableanimator_layout_import(tmp_path):
    clip = tmp_path / "rec" / "00001"
    (clip / "images").mkdir(parents=True)
    frames, poses, (audio, sr) = toy_video(20)
    for t, f in enumerate(frames):
        Image.fromarray(f).save(clip / "images" / f"frame_{t}.png")
    kp = poses.copy()
    kp[..., 0] = (kp[..., 0] * SIZE + PAD) / (SIZE + PAD)  # normalised by the 96 x 64 frame
    np.save(clip / "poses.npy", kp)
    soundfile.write(str(tmp_path / "rec" / "00001.wav"), audio, sr, subtype="PCM_16")
    shutil.copytree(clip, tmp_path / "rec" / "00002")
    shutil.copy(tmp_path / "rec" / "00001.wav", tmp_path / "rec" / "00002.wav")
    prepare("--source=stableanimator", f"--videos={tmp_path / 'rec'}", f"--out_dir={tmp_path / 'clips'}",
            "--size=32", "--dancer_pattern=(\\d+)")
    got = np.load(tmp_path / "clips" / "00001" / "poses.npy")
    assert read_clip(tmp_path / "clips" / "00001", FPS)["T"] == 60
    x0 = json.loads((tmp_path / "clips" / "00001" / "meta.json").read_text())["crop"][0]
    want = poses[:, :24, :2] + np.array([(PAD - x0) / 64, 0], np.float32)  # the dancer's square, shifted
    assert np.allclose(got[:, :24, :2], want, atol=1e-4) and (got[:, :24, 2] == 1).all()


def test_sample_finds_the_reference_pose(models, tmp_path):
    path = tmp_path / "me.png"
    Image.fromarray(toy_video(0)[0][0]).save(path)  # 96 x 64
    cfg = sample.Config(ref_image=str(path), pose_model=str(models["const"]))
    image, pose, box, points = sample.read_dance_reference(cfg, 24, FPS)
    assert image.shape == (3, 64, 96) and pose.shape == (24, 3) and box.shape == (4,) and points.shape == (5, 2)
    want = ((models["const_uv"][0] - [96, 128]) * 0.625 + [48, 32]) / [96, 64]  # the nose, normalised by W, H
    assert np.allclose(pose[0, :2].numpy(), want, atol=0.01)
    assert box[0] < pose[0, 0] < box[2] and box[1] < pose[0, 1] < box[3]  # the face points circle the nose
    with pytest.raises(InputError, match="--pose_model"):
        sample.read_dance_reference(sample.Config(ref_image=str(path)), 24, FPS)
