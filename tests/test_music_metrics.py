"""Music metrics as EDGE's and Bailando's code: motion beats from hand-made speed curves (one beat
per minimum, ties at the frame, none on a falling plateau or in a held pose), music beats cut to the
motion, audio at any rate resampled, and librosa's beat tracker started from the clip's tempo."""
import numpy as np
import pytest
import soundfile

from data import HOP, cache_music_features, music_beats, music_features
from losses import beat_alignment, beats_within, motion_beats
from plumbing import InputError

FPS = 30


def from_speed(s):
    """A 2-joint motion [T, J, 3] whose mean joint speed is s (speed k between frames k and k + 1)."""
    x = np.concatenate([[0.0], np.cumsum(s)])  # (T,)
    zero = np.zeros_like(x)
    joints = [np.stack([x, zero, zero + 1], -1), np.stack([zero, -x, zero + 1], -1)]  # along x, along -y
    return np.stack(joints, 1)  # (T, 2, 3), third channel = visibility, ignored


def swinger(t, first, period, hold=None):
    """A limb swinging to a turning point (zero speed) on every beat; hold = (t0, t1) stands still."""
    x = np.cos(np.pi * (t - first) / period)  # (T,)
    if hold is not None:
        x = np.where((t > hold[0]) & (t < hold[1]), np.cos(np.pi * (hold[0] - first) / period), x)
    return np.stack([0.5 + 0.1 * x, np.full_like(x, 0.5)], -1)[:, None].repeat(3, 1)  # (T, 3, 2)


def test_periodic_dancer_at_60fps_gives_each_beat_once_at_its_frame():
    fps, period = 60, 0.5  # beats on frames 15, 45, ..., 465; the last frame, 480, is a speed peak
    t = np.arange(481) / fps
    b = motion_beats(swinger(t, 0.25, period), fps).numpy()
    assert np.allclose(b * fps, np.arange(15, 480, 30), atol=1e-9)  # 16 beats, not 2 per tie
    assert beat_alignment(np.arange(0.25, 7.9, period), b) == pytest.approx(1.0)


@pytest.mark.parametrize("speed, beats_at", [
    ([3, 2, 1, 2, 3], [2.5]),  # a strict minimum: at its sample, between frames 2 and 3
    ([3, 2, 1, 1, 2, 3], [3.0]),  # a two-sample tie rising on both sides: once, at frame 3
    ([3, 2, 1, 1, 0.5, 0.2, 1, 2], [5.5]),  # the tie on a falling slope is no minimum
    ([3, 2, 1, 0, 0, 0, 0, 1, 2], []),  # a held pose (>= 3 equal samples): no beat, as Bailando
    ([3, 2, 0, 0, 0, 2, 1, 2], [6.5]),  # ... and the next minimum still counts
    ([1, 1, 2, 3, 2], []),  # runs at the ends are not minima (nothing before them)
])
def test_speed_curve_minima(speed, beats_at):
    assert motion_beats(from_speed(np.array(speed, float)), 1, smooth_s=0).tolist() == beats_at
    # the same curve scaled (ties are relative to the largest speed) and at 10 fps: seconds
    assert np.allclose(motion_beats(from_speed(np.array(speed) * 1e-3), 10, smooth_s=0).numpy(),
                       np.array(beats_at) / 10)


def test_held_pose_with_smoothing_gives_no_beat_inside_and_the_swings_keep_theirs():
    fps, period = 60, 0.5
    t = np.arange(481) / fps
    b = motion_beats(swinger(t, 0.25, period, hold=(2.25, 3.75)), fps).numpy()
    assert not ((b > 2.25 - 1e-6) & (b < 3.75 + 1e-6)).any()  # nothing in the 1.5 s hold, nor at its ends
    true = np.arange(0.25, 7.9, period)
    outside = true[(true < 1.8) | (true > 4.2)]  # beats out of the smoothing kernel's reach of the hold
    assert np.abs(outside[:, None] - b[None]).min(1).max() < 1e-9


def test_music_beats_after_the_motion_are_cut_and_no_longer_lower_a_perfect_score():
    fps, period, T = FPS, 0.5, 121  # the motion's last frame at 4.0 s
    t = np.arange(T) / fps
    mb = motion_beats(swinger(t, 0.5, period), fps)
    music = np.append(np.arange(0.5, 3.9, period), 4.0 + 0.07)  # one beat 0.07 s after the motion
    assert beat_alignment(music, mb) < 0.9  # uncut, the beat with no motion lowers the score
    assert beat_alignment(beats_within(music, T, fps), mb) == pytest.approx(1.0)
    # Bailando's music beat frames [:T - 1]: a beat on the last frame goes too, one before it stays
    assert beats_within([0.5, (T - 2) / fps, (T - 1) / fps, 5.0], T, fps).tolist() == [0.5, (T - 2) / fps]


def click_track(bpm, seconds, sr, first=0.5):
    """Band-limited clicks (< 7.68 kHz, so the same signal at 15360 Hz) on every beat from `first`."""
    t = np.arange(int(seconds * sr)) / sr
    tau = np.where(t >= first, (t - first) % (60 / bpm), 1.0)[:, None]  # seconds since the last click
    freqs = np.array([400, 1100, 2300, 3700, 5300])
    return (0.2 * np.exp(-tau / 0.01) * np.sin(2 * np.pi * freqs * tau)).sum(1).astype(np.float32)


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    """A 4 s 120 BPM click track's features from 15360 Hz audio and, via the cache, from a 44.1 kHz WAV."""
    T = 4 * FPS
    ref = music_features(click_track(120, 4, FPS * HOP), FPS * HOP, FPS, T)
    d = tmp_path_factory.mktemp("clip44k")
    soundfile.write(str(d / "audio.wav"), click_track(120, 4, 44100), 44100, subtype="FLOAT")
    return ref, cache_music_features(d, FPS, T), d


@pytest.mark.filterwarnings("ignore:n_fft=512 is too large")  # the 1 s audio below
def test_audio_at_another_rate_is_resampled_not_refused(features):
    ref, f44, d = features
    assert f44.shape == ref.shape == (4 * FPS, 35) and np.isfinite(f44).all()
    b_ref, b44 = np.nonzero(ref[:, -1])[0], np.nonzero(f44[:, -1])[0]
    assert len(b_ref) >= 6 and len(b44) == len(b_ref)
    assert np.abs(b44 - b_ref).max() <= 1  # the beat column agrees within a frame
    clicks = np.arange(0.5, 4.0, 0.5) * FPS
    assert np.abs(b44[:, None] - clicks[None]).min(1).max() <= 1.5  # and sits on the clicks
    assert (d / "music_feats.npy").is_file()
    # what cannot work still stops: audio shorter than the frames, named by the error
    with pytest.raises(InputError, match="feature frames"):
        music_features(click_track(120, 1, 44100), 44100, FPS, 4 * FPS)


@pytest.mark.parametrize("bpm, period", [
    (60, 1.0),
    (170, 60 / 170),  # from 120 BPM (librosa's default) the tracker finds every other click: 0.70 s
    (240, 0.5),  # the tempo estimate (prior at 120 BPM) halves it to 117.5: EDGE's start keeps that
])
def test_beat_tracker_starts_from_the_clip_tempo_as_edge(bpm, period):
    b = music_beats(click_track(bpm, 6, FPS * HOP), FPS * HOP, FPS)
    assert len(b) >= 4 and abs(np.diff(b).mean() - period) < 0.5 / FPS
    clicks = np.arange(0.5, 6.0, 60 / bpm)
    assert np.abs(b[:, None] - clicks[None]).min(1).max() <= 1.5 / FPS  # on the clicks


def test_bobbing_wins_beat_alignment_but_not_its_limb_version():
    """The trivial beat dancer (a still pose dipping on every beat) beats a real swing on Bailando's score;
    from the limbs (joints relative to the torso) it has no beats at all, and the swing keeps its score."""
    from losses import bobbing, limb_beats
    beats = np.arange(0.3, 8, 0.5)  # 120 bpm
    pose = np.random.default_rng(0).random((18, 2))
    bob = bobbing(pose, beats, 240, FPS)  # (T, J, 2)
    assert float((bob - bob[0]).abs().max()) == pytest.approx(0.02, rel=0.01)  # 2 px of 100
    music = beats_within(beats, 240, FPS)
    assert beat_alignment(music, motion_beats(bob, FPS)) > 0.9
    assert len(limb_beats(bob, FPS)) == 0 and beat_alignment(music, limb_beats(bob, FPS)) == 0.0
    # a pose reader's errors that follow the bob (limbs wobbling 0.002 on the beats) are no limb motion either
    wobble = bob.clone()
    wobble[:, 4, 0] += bobbing(np.zeros((1, 2)), beats, 240, FPS, amplitude=0.002)[:, 0, 1]
    assert beat_alignment(music, motion_beats(wobble[:, [4, 1, 8, 11]] - wobble[:, [1]], FPS)) > 0.8
    assert len(limb_beats(wobble, FPS)) == 0
    t = np.arange(240) / FPS
    swing = np.repeat(pose[None], 240, 0)  # (T, J, 2): wrists and ankles swing, turning on every beat
    swing[:, [4, 7, 10, 13], 0] += 0.1 * np.cos(np.pi * (t - 0.3) / 0.5)[:, None]
    assert beat_alignment(music, limb_beats(swing, FPS)) == pytest.approx(
        beat_alignment(music, motion_beats(swing, FPS))) and beat_alignment(music, limb_beats(swing, FPS)) > 0.9


def test_frechet_distance_and_diversity():
    """FID as scipy's sqrtm computes it (Bailando's formula), 0 for one set against itself; Div_k is the
    mean pairwise distance (0 for a still dancer's identical windows)."""
    import scipy.linalg
    import torch

    from losses import diversity, frechet_distance, kinetic_features
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(300, 6)), rng.normal(size=(200, 6)) * 1.5 + 0.3
    c1, c2 = np.cov(a.T), np.cov(b.T)
    ref = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(c1 + c2 - 2 * scipy.linalg.sqrtm(c1 @ c2).real)
    assert frechet_distance(torch.tensor(a), torch.tensor(b)) == pytest.approx(ref, rel=1e-6)
    assert abs(frechet_distance(torch.tensor(a), torch.tensor(a))) < 1e-6
    p = rng.random((4, 3))
    assert diversity(torch.tensor(p)) == pytest.approx(np.mean([np.linalg.norm(p[i] - p[j])
                                                                for i in range(4) for j in range(4) if i != j]))
    still = kinetic_features(np.repeat(rng.random((1, 18, 2)), 30, 0), FPS)  # (54,)
    assert still.shape == (54,) and float(still.abs().max()) == 0.0


def standing(T=60, J=24):
    """A dancer standing upright, arms and legs straight down, in image coordinates (y down): [T, J, 2]."""
    body = [(0.5, 0.22), (0.5, 0.3), (0.42, 0.31), (0.40, 0.42), (0.39, 0.52), (0.58, 0.31), (0.60, 0.42),
            (0.61, 0.52), (0.45, 0.55), (0.45, 0.7), (0.45, 0.85), (0.55, 0.55), (0.55, 0.7), (0.55, 0.85),
            (0.48, 0.2), (0.52, 0.2), (0.46, 0.21), (0.54, 0.21)]
    feet = [(0.57, 0.87), (0.56, 0.87), (0.54, 0.86), (0.43, 0.87), (0.44, 0.87), (0.46, 0.86)]
    return np.repeat(np.array(body + feet)[None, :J], T, 0)


def test_geometric_features_read_relations_not_place_or_size():
    """Bailando's geometric features in 2-D: a raised hand, a bent elbow, a lifted leg switch their
    relations on; moving or scaling the whole dancer in the image changes none (units of its torso)."""
    import torch

    from losses import frechet_distance, geometric_features, geometric_windows
    still = standing()
    f = geometric_features(still, FPS)
    assert f.shape == (59, 25) and float(f.sum()) == 0  # upright and still: no relation holds
    up = still.copy()
    up[:, 3:5] = (0.41, 0.2), (0.40, 0.1)  # the right arm straight up: hand above the neck, upper arm raised
    g = geometric_features(up, FPS)[0]
    assert g[0] == 1 and g[1] == 0 and g[10] == 1 and g[11] == 0  # right hand above the neck, right arm raised
    lifted = still.copy()
    lifted[:, 10] = (0.35, 0.6)  # right ankle kicked up: knee bent, above the lowest joint
    h = geometric_features(lifted, FPS)[0]
    assert h[5] == 1 and h[8] == 1 and h[6] == 0
    rng = np.random.default_rng(0)
    t = np.arange(60) / FPS
    motions = []
    for k in range(6):  # arms swinging up and down at different speeds and heights
        m = standing()
        m[:, [4, 7], 1] -= (0.2 + 0.1 * rng.random()) * (1 + np.sin(2 * np.pi * (1 + k) * t))[:, None] / 2
        motions.append(m)
    a = geometric_windows(motions, FPS)  # (12, 25)
    moved = geometric_windows([0.5 * m + np.array([0.3, 0.1]) for m in motions], FPS)
    assert torch.allclose(a, moved)
    assert abs(frechet_distance(a, moved)) < 1e-6
    assert frechet_distance(a, geometric_windows([standing() for _ in range(6)], FPS)) > 0.1  # still vs swinging


def test_foot_contact_score_planted_feet_pay_nothing_sliding_feet_pay():
    """EDGE's PFC in 2-D: zero for a still dancer; the hips swaying over planted feet cost nothing, the
    same sway with the feet sliding along costs, more the more they slide; falling (down) is free."""
    from losses import foot_contact_score
    assert foot_contact_score(standing(), FPS) == 0.0
    t = np.arange(90) / FPS
    sway = 0.03 * np.sin(2 * np.pi * t)[:, None]  # (T, 1)
    planted = standing(90)
    planted[:, :18, 0] += sway  # the upper body and the legs' tops sway, ankles and toes stay
    planted[:, [10, 13], 0] -= sway
    assert foot_contact_score(planted, FPS) == 0.0
    sliding = standing(90)
    sliding[..., 0] += sway  # everything moves together: the feet skate
    slid = foot_contact_score(sliding, FPS)
    assert slid > 0.05
    wider = standing(90)
    wider[..., 0] += 2 * sway
    assert foot_contact_score(wider, FPS) == pytest.approx(4 * slid)  # root term normalised: each foot 2x
    falling = standing(90)
    falling[:, :18, 1] += 0.1 * t[:, None] ** 2  # the body accelerating down (y grows) over sliding feet
    falling[..., 0] += 0.01 * t[:, None]
    assert foot_contact_score(falling, FPS) == 0.0


def test_smoothing_removes_jitter_and_keeps_slow_motion():
    import torch

    from losses import kinetic_features, motion_beats, smooth_poses
    t = torch.arange(120, dtype=torch.float64) / FPS
    slow = 0.1 * torch.cos(torch.pi * (t - 0.25) / 0.5)  # turning on every beat (0.5 s)
    x = torch.stack([0.5 + slow, torch.full_like(t, 0.5)], -1)[:, None].repeat(1, 3, 1)  # (T, 3, 2)
    jitter = x.clone()
    jitter[:, :, 0] += 0.004 * (-1) ** torch.arange(120)[:, None]
    assert smooth_poses(x, 1) is x and smooth_poses(x, 0) is x
    s = smooth_poses(jitter, 3)
    assert (s - x)[1:-1, :, 0].abs().max() < 0.004 / 3 + 2e-3  # jitter / 3, plus the curve's own flattening
    acc = lambda m: float(kinetic_features(m, FPS)[-3:].mean())  # noqa: E731  mean |a| of the joints
    assert acc(jitter) > 5 * acc(x) and acc(s) < 2 * acc(x)
    b0, b1 = motion_beats(x, FPS), motion_beats(s, FPS)
    assert len(b0) == len(b1) and (b0 - b1).abs().max() < 1.01 / FPS  # the stops stay where they were
    with pytest.raises(ValueError, match="odd"):
        smooth_poses(x, 4)
