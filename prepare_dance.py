"""Phase 0 of the dance pipeline (like nanoGPT's data/*/prepare.py): your dance videos -> clip folders in the
clip format (docs/formats.md) that train_dance.py reads, one clip per video, and list files split by dancer.

    python prepare_dance.py --videos=my_videos --pose_model=models/dw-ll_ucoco_384.onnx \\
        --detector=models/yolox_l.onnx --out_dir=data/my_dance       # or --detector=full_frame
    python prepare_dance.py --source=aistpp --videos=aist/videos --keypoints=aist/keypoints2d \\
        --music=aist/wav --camera=c01 --out_dir=data/aist            # AIST++'s COCO-17 keypoints2d
    python prepare_dance.py --source=stableanimator --videos=animation_data/rec --keypoints=poses.npy \\
        --source_fps=30 --out_dir=data/sa                             # <clip>/images/frame_0.png ... + keypoints

Each clip: frames at `fps`, a square crop (the frame's short side, centred on the dancer) resized to `size`,
audio.wav (mono; from an audio file beside the video with the same stem, else the video's own track), poses.npy
in the 134-point layout, faces.json (boxes from the face points), meta.json and music_feats.npy. A clip is
written under a temporary name and renamed when complete, so a rerun skips finished clips and redoes
half-written ones. Videos that fail are all named in one error line at the end; the others are kept.
"""
import csv
import json
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile
from PIL import Image
from tqdm import tqdm

from data import VISIBLE, cache_music_features, frame_source, read_audio
from plumbing import InputError, atomic_dir, check_flags, clean_stale, cli
from pose import PoseModel, face_box, to_layout134

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v")
AUDIO_SUFFIXES = (".wav", ".mp3", ".flac", ".m4a", ".aac", ".ogg")
# the dancer id in a file name (group 1), per source: "alice_01.mp4" -> alice; AIST++ "gBR_sBM_c01_d04_..." -> d04
DANCER_PATTERNS = {"videos": r"^([^_]+)", "aistpp": r"_(d\d+)_", "stableanimator": r"^([^_]+)"}


@dataclass
class Config:
    source: str = "videos"  # videos | aistpp (its keypoints2d) | stableanimator (images/ + a keypoint file)
    videos: str = ""  # videos: a folder of videos; aistpp: its video folder; stableanimator: a folder of clips
    out_dir: str = "data/dance"  # clip folders + data_train.txt, data_val.txt
    pose_model: str = ""  # local RTMPose / DWPose whole-body ONNX (133 points); unused when keypoints are given
    detector: str = ""  # local YOLOX ONNX, or full_frame (the frame is the person's box: one dancer, filling it)
    keypoints: str = ""  # aistpp: the keypoints2d folder; stableanimator: the keypoint file's name in each clip
    music: str = ""  # aistpp: the folder of its music (mBR0.wav ...); else the video's own audio track
    camera: str = "c01"  # aistpp: the camera whose video and keypoints are taken (c01 ... c09)
    source_fps: float = 0.0  # stableanimator: the frames' rate (0: taken to be `fps` already)
    fps: int = 30  # the clips' frame rate (train_dance's fps)
    size: int = 512  # frames are square crops resized to size x size
    dancers: str = ""  # csv with columns video,dancer (video: the file or folder name); else dancer_pattern
    dancer_pattern: str = ""  # regex on the name, group 1 = the dancer ("": the source's, see DANCER_PATTERNS)
    val_fraction: float = 0.1  # of the dancers (at least one): their clips go to data_val.txt only
    seed: int = 0  # which dancers are held out


# ----------------------------------------------------------------------------------------------
# Reading the sources: each gives frames (an iterator of (H, W, 3) uint8), its frame rate, an audio file and,
# where the source has them, keypoints (T, 134, 3) in the frames' pixels

def ffmpeg():
    import imageio_ffmpeg
    return imageio_ffmpeg.get_ffmpeg_exe()


def last_line(err):
    """ffmpeg's reason: the last line of its message (the first ones are its banner)."""
    return (str(err).strip().splitlines() or ["unknown error"])[-1].strip()[-160:]


def video_frames(path, fps):
    """Frames of a video resampled to fps by ffmpeg (its fps filter drops or repeats frames by time)."""
    import imageio_ffmpeg
    try:
        gen = imageio_ffmpeg.read_frames(str(path), output_params=["-vf", f"fps={fps}"])
        meta = next(gen)
    except (OSError, RuntimeError, StopIteration) as err:
        raise InputError(f"cannot read it as a video ({last_line(err)})") from None
    W, H = meta["size"]
    for raw in gen:
        yield np.frombuffer(raw, np.uint8).reshape(H, W, 3)  # (H, W, 3)


def video_fps(path):
    import imageio_ffmpeg
    try:
        gen = imageio_ffmpeg.read_frames(str(path))
        meta = next(gen)
        gen.close()
    except (OSError, RuntimeError, StopIteration) as err:
        raise InputError(f"cannot read it as a video ({last_line(err)})") from None
    return float(meta["fps"])


def image_frames(paths, src_fps, fps):
    """Frames of an image sequence at src_fps, resampled to fps by taking the nearest earlier frame."""
    n = len(paths) if src_fps in (0, fps) else int(len(paths) * fps / src_fps)
    for k in range(n):
        i = k if src_fps in (0, fps) else int(k * src_fps / fps)
        with Image.open(paths[i]) as im:
            yield np.asarray(im.convert("RGB"))


def write_audio(src, dst):
    """src (any audio or video file ffmpeg reads) -> a mono 16-bit WAV at its own rate; returns seconds."""
    run = subprocess.run([ffmpeg(), "-nostdin", "-v", "error", "-y", "-i", str(src), "-vn", "-ac", "1",
                          "-c:a", "pcm_s16le", str(dst)], capture_output=True, text=True)
    if run.returncode != 0 or not Path(dst).is_file():
        why = (run.stderr.strip().splitlines() or ["no audio stream"])[-1].replace(str(dst), "audio.wav")
        raise InputError(f"no usable audio in {Path(src).name} (ffmpeg: {why.strip()[-160:]}); give it an audio "
                         "track or an audio file of the same name beside it")
    audio, sr = read_audio(dst)
    return len(audio) / sr


def find_audio(folder, stem):
    return next((p for p in (Path(folder) / (stem + s) for s in AUDIO_SUFFIXES) if p.is_file()), None)


def read_keypoints(path, frame_hw):
    """A keypoint file of an image folder: .npy (T, 134, 3) in our layout, (T, 133, 3) COCO-WholeBody or
    (T, 17, 3) COCO; x, y normalised to [0, 1] (all within [-0.5, 1.5]) or else taken as pixels."""
    try:
        kp = np.load(path).astype(np.float32)
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: cannot read keypoints ({err})") from None
    if kp.ndim != 3 or kp.shape[1:] not in ((134, 3), (133, 3), (17, 3)):
        raise InputError(f"{path}: shape {kp.shape}, expected (T, 134 | 133 | 17, 3)")
    kp = np.nan_to_num(kp, nan=0.0)  # a missed point: score 0
    if np.abs(kp[..., :2] - 0.5).max() <= 1.0:  # normalised: into the frames' pixels, as the other sources
        kp[..., :2] *= np.array(frame_hw[::-1], np.float32)
    if kp.shape[1] != 134:
        kp = np.stack([to_layout134(k[:, :2], k[:, 2]) for k in kp])  # (T, 134, 3)
    return kp


def list_sources(cfg):
    """[{name, path, frames: () -> iterator, audio, keypoints: () -> array or None}] for cfg.source."""
    root = Path(cfg.videos)
    if not root.is_dir():
        raise FileNotFoundError(f"--videos={root}: folder missing")
    items = []
    if cfg.source == "videos":
        for p in sorted(q for q in root.iterdir() if q.suffix.lower() in VIDEO_SUFFIXES):
            items.append(dict(name=p.stem, path=p, audio=find_audio(root, p.stem) or p,
                              frames=lambda p=p: video_frames(p, cfg.fps), keypoints=None))
    elif cfg.source == "aistpp":
        kp_dir = Path(cfg.keypoints)
        if not kp_dir.is_dir():
            raise FileNotFoundError(f"--keypoints={kp_dir}: AIST++'s keypoints2d folder missing")
        for pkl in sorted(kp_dir.glob("*.pkl")):
            name = pkl.stem.replace("_cAll_", f"_{cfg.camera}_")  # AIST++: one pkl for all 9 cameras
            video = next((root / (name + s) for s in VIDEO_SUFFIXES if (root / (name + s)).is_file()), root / name)
            m = re.search(r"_(m[A-Z]{2}\d)_", name)  # the music id, e.g. mBR0
            audio = video  # without --music: the video's own track
            if cfg.music:  # a missing music file is an error for this video, not a silent fall-back
                audio = find_audio(cfg.music, m[1]) if m else None
                audio = audio or Path(cfg.music) / f"{m[1] if m else name}.wav"
            items.append(dict(name=name, path=video, audio=audio,
                              frames=lambda v=video: video_frames(v, cfg.fps),
                              keypoints=lambda pkl=pkl, v=video: aistpp_keypoints(pkl, cfg.camera, v, cfg.fps)))
    else:
        for d in sorted(q for q in root.iterdir() if (q / "images").is_dir()):
            kp = d / (cfg.keypoints or "poses.npy")
            audio = find_audio(d, "audio") or find_audio(root, d.name) or root / f"{d.name}.wav"  # else: named
            items.append(dict(name=d.name, path=d, audio=audio,  # frame_source: images/frame_0.png, ...
                              frames=lambda d=d: image_frames(frame_source(d)[1], cfg.source_fps, cfg.fps),
                              keypoints=(lambda kp=kp, d=d: stableanimator_keypoints(kp, frame_source(d)[1], cfg))
                              if kp.is_file() or not cfg.pose_model else None))
    return items


def aistpp_keypoints(pkl, camera, video, fps):
    """AIST++ keypoints2d (9 cameras, T, 17, 3: COCO, pixels, confidence; NaN where missed) of one camera,
    resampled from the video's rate to fps by time -> (T', 134, 3)."""
    import pickle
    try:
        with open(pkl, "rb") as f:
            kp = np.asarray(pickle.load(f)["keypoints2d"], np.float32)
    except (OSError, pickle.UnpicklingError, KeyError, EOFError, TypeError) as err:
        raise InputError(f"{pkl.name}: cannot read AIST++ keypoints2d ({err!r})") from None
    cam = int(camera.lstrip("c")) - 1  # c01 -> 0
    if kp.ndim != 4 or kp.shape[2:] != (17, 3) or not 0 <= cam < kp.shape[0]:
        raise InputError(f"{pkl.name}: keypoints2d of shape {kp.shape}, expected (9, T, 17, 3) with camera {camera}")
    kp = np.nan_to_num(kp[cam], nan=0.0)  # (T, 17, 3): a missed detection is a point of score 0
    src_fps = video_fps(video)
    idx = np.round(np.arange(int(len(kp) * fps / src_fps)) * src_fps / fps).astype(int)  # frame k at k / fps s
    return np.stack([to_layout134(k[:, :2], k[:, 2]) for k in kp[np.minimum(idx, len(kp) - 1)]])  # (T', 134, 3)


def stableanimator_keypoints(path, paths, cfg):
    with Image.open(paths[0]) as im:
        hw = im.size[::-1]
    kp = read_keypoints(path, hw)
    if len(kp) != len(paths):
        raise InputError(f"{path}: {len(kp)} keypoint frames for {len(paths)} images")
    if cfg.source_fps in (0, cfg.fps):
        return kp
    return kp[(np.arange(int(len(kp) * cfg.fps / cfg.source_fps)) * cfg.source_fps / cfg.fps).astype(int)]


# ----------------------------------------------------------------------------------------------
# One clip

def square_crop(poses, hw):
    """(x0, y0, side) in pixels: the short side of the frame, centred on the dancer's median body point
    (visible points of the first 24) along the long side, inside the frame; one crop for the whole clip."""
    H, W = hw
    side = min(H, W)
    body = poses[:, :24].reshape(-1, 3)  # (T * 24, 3)
    body = body[body[:, 2] >= VISIBLE]
    centre = np.median(body[:, :2], 0) if len(body) else np.array([W / 2, H / 2])
    x0 = int(np.clip(round(centre[0] - side / 2), 0, W - side))
    y0 = int(np.clip(round(centre[1] - side / 2), 0, H - side))
    return x0, y0, side


def prepare_clip(item, cfg, model, dst, dancer):
    """Writes item's clip into folder dst (a temporary folder: atomic_dir renames it when complete)."""
    if not item["path"].is_dir():
        video_fps(item["path"])  # unreadable: say so before anything else fails on it
    seconds = write_audio(item["audio"], dst / "audio.wav")
    poses = item["keypoints"]() if item["keypoints"] is not None else None
    if poses is None:  # first pass: the pose model on every frame, in the source's pixels
        poses = np.stack([model(frame) for frame in item["frames"]()] or [np.zeros((134, 3), np.float32)])
    T = len(poses)
    if T / cfg.fps - 0.1 <= seconds < T / cfg.fps:  # AAC encoders cut a few ms off the end: pad with silence
        audio, sr = read_audio(dst / "audio.wav")
        soundfile.write(str(dst / "audio.wav"), np.pad(audio, (0, int(np.ceil(T / cfg.fps * sr)) - len(audio))),
                        sr, subtype="PCM_16")
        seconds = T / cfg.fps
    T = min(T, int(seconds * cfg.fps + 1e-6))  # else the shorter of video and audio
    frames, n = dst / "frames", 0
    frames.mkdir()
    for t, frame in enumerate(item["frames"]()):  # second pass: crop and resize
        if t == 0:
            x0, y0, side = square_crop(poses[:T], frame.shape[:2])
        if t >= T:
            break
        im = Image.fromarray(frame[y0: y0 + side, x0: x0 + side]).resize((cfg.size, cfg.size), Image.BICUBIC)
        im.save(frames / f"{t:06d}.png", compress_level=1)
        n = t + 1
    T = min(T, n)
    if T < 2:
        raise InputError(f"{T} frames (of video and audio together)")
    for p in sorted(frames.glob("*.png"))[T:]:
        p.unlink()
    poses = poses[:T].copy()
    poses[..., :2] = (poses[..., :2] - np.array([x0, y0], np.float32)) / side  # crop pixels -> [0, 1]
    outside = ((poses[..., :2] < 0) | (poses[..., :2] > 1)).any(-1)  # (T, 134): cut off by the crop
    poses[outside, 2] = 0.0
    poses[..., :2] = poses[..., :2].clip(0, 1)
    boxes = [face_box(p) for p in poses]
    if all(b is None for b in boxes):
        raise InputError(f"no frame shows a face (no face points or nose/eyes/ears scored >= {VISIBLE})")
    np.save(dst / "poses.npy", poses.astype(np.float32))
    (dst / "faces.json").write_text(json.dumps({"boxes": [None if b is None else np.round(b, 5).tolist()
                                                          for b in boxes]}))
    meta = {"fps": cfg.fps, "size": [cfg.size, cfg.size], "source": str(item["path"]), "dancer": dancer,
            "crop": [x0, y0, side], "keypoints": "given" if item["keypoints"] is not None else str(cfg.pose_model)}
    (dst / "meta.json").write_text(json.dumps(meta))
    cache_music_features(dst, cfg.fps, T)
    return T


# ----------------------------------------------------------------------------------------------
# Dancers and the split

def dancer_ids(items, cfg):
    """{name: dancer} from the csv (video,dancer) or the pattern; names without one are returned apart."""
    if cfg.dancers:
        try:
            with open(cfg.dancers, newline="") as f:
                rows = {Path(r["video"]).stem if r["video"].lower().endswith(VIDEO_SUFFIXES) else r["video"]:
                        r["dancer"] for r in csv.DictReader(f)}
        except (OSError, KeyError, csv.Error) as err:
            raise InputError(f"--dancers={cfg.dancers}: expected a csv with columns video,dancer ({err!r})") from None
        return {it["name"]: rows.get(it["name"]) for it in items}
    pattern = re.compile(cfg.dancer_pattern or DANCER_PATTERNS[cfg.source])
    return {it["name"]: (m[1] if (m := pattern.search(it["name"])) else None) for it in items}


def split_dancers(dancers, val_fraction, seed):
    """Held-out dancers: val_fraction of them (at least one, and at least one left to train on)."""
    names = sorted(set(dancers))
    if len(names) < 2:
        raise InputError(f"{len(names)} dancer(s) ({names}): a split by dancer needs two at least "
                         "(name them with --dancers or --dancer_pattern)")
    n_val = min(len(names) - 1, max(1, round(val_fraction * len(names))))
    order = np.random.default_rng(seed).permutation(len(names))
    return {names[i] for i in order[:n_val]}


def main(cfg):
    check_flags(cfg, choices={"source": {"videos", "aistpp", "stableanimator"}}, positive=("fps", "size"))
    if not cfg.videos:
        raise InputError("give --videos (a folder of dance videos; see the top of prepare_dance.py)")
    if cfg.source == "aistpp" and not re.fullmatch(r"c0[1-9]", cfg.camera):
        raise InputError(f"--camera={cfg.camera!r}: AIST++ cameras are c01 ... c09")
    out = Path(cfg.out_dir)
    for line in clean_stale(out):  # clips half-written by a killed run
        print(line)
    items = list_sources(cfg)
    if not items:
        raise InputError(f"--videos={cfg.videos}: nothing to prepare for source {cfg.source}")
    dancers = dancer_ids(items, cfg)
    bad = [f"{it['path'].name} (no dancer id: not in --dancers or no match for the pattern)"
           for it in items if dancers[it["name"]] is None]
    items = [it for it in items if dancers[it["name"]] is not None]
    val = split_dancers([dancers[it["name"]] for it in items], cfg.val_fraction, cfg.seed)
    need_model = any(it["keypoints"] is None and not (out / it["name"] / "COMPLETE").is_file() for it in items)
    if need_model and not cfg.pose_model:
        raise InputError("--pose_model: give a local whole-body ONNX file (RTMPose / DWPose); nothing is downloaded")
    model = PoseModel(cfg.pose_model, cfg.detector) if need_model else None
    done, skipped = [], 0
    for it in tqdm(items, desc=f"{cfg.source} -> {out}"):
        if (out / it["name"] / "COMPLETE").is_file():  # finished by an earlier run
            done.append(it)
            skipped += 1
            continue
        try:
            with atomic_dir(out / it["name"]) as tmp:
                prepare_clip(it, cfg, model, tmp, dancers[it["name"]])
            done.append(it)
        except (InputError, FileNotFoundError) as err:
            bad.append(f"{it['path'].name} ({' '.join(str(err).split())})")
    lists = {"data_train.txt": [it["name"] for it in done if dancers[it["name"]] not in val],
             "data_val.txt": [it["name"] for it in done if dancers[it["name"]] in val]}
    for name, clips in lists.items():
        (out / name).write_text("".join(c + "\n" for c in clips))
    print(f"{len(done)} clips in {out} ({skipped} already done): {len(lists['data_train.txt'])} train, "
          f"{len(lists['data_val.txt'])} val (held-out dancers: {', '.join(sorted(val))})")
    if bad:
        raise InputError(f"{len(bad)} of {len(bad) + len(done)} videos not prepared (fix or remove them and rerun: "
                         f"finished clips are skipped): " + "; ".join(bad))
    return out


if __name__ == "__main__":
    cli(main, Config)
