"""The toy pose detector (toy.toy_pose_detector, detect_poses): a tiny one, trained for a few steps on the
tiny toy dancers, reads their poses back better than the mean pose does; it is made once and then only
read, and the same seed makes the same weights whatever ran before."""
import shutil

import pytest
import torch
from safetensors.torch import load_file

from losses import pose_error
from toy import detect_poses, pose_frames, toy_pose_detector

# 16 px from the fixture's 32-px frames: detect_poses resizes, as it will for generated frames
TINY = dict(joints="body_feet24", image_size=16, steps=150, width=16, lr=5e-3, batch_size=16, progress=False)


@pytest.fixture(scope="module")
def data(tiny_dance, tmp_path_factory):
    """A copy of the session's tiny dance set: the detectors written here stay out of the other tests' set."""
    return shutil.copytree(tiny_dance, tmp_path_factory.mktemp("pose") / "dance")


@pytest.fixture(scope="module")
def made(data):
    """The tiny detector, trained once for the module, and its weight file's mtime after training."""
    det = toy_pose_detector(data, **TINY)
    file = data / "toy_pose_detector" / "body_feet24_16px_150" / "detector.safetensors"
    return det, file, file.stat().st_mtime_ns


def test_reads_training_poses_better_than_the_mean_pose(data, made):
    det = made[0]
    frames, poses = pose_frames(data, "data_train.txt", 24, 32, 30, frames_per_clip=0)  # every frame
    pred = detect_poses(det, frames)
    assert pred.shape == (len(frames), 24, 2) and pred.dtype == torch.float32
    assert ((pred > 0) & (pred < 1)).all()  # soft-argmax over the frame: normalised coordinates
    err, pck = pose_error(pred, poses)
    mean = poses[..., :2].mean(0).expand_as(pred)  # (N, 24, 2): the best constant pose for these frames
    err_mean, pck_mean = pose_error(mean, poses)
    assert err < 0.7 * err_mean and pck > pck_mean, (err, err_mean, pck, pck_mean)
    # the wrong-pose control: the detection of frame t against the pose half a clip away
    wrong = torch.cat([p.roll(len(p) // 2, 0) for p in poses.split(len(poses) // 2)])  # (N, 24, 3), 2 clips
    assert err < 0.7 * pose_error(pred, wrong)[0]
    # batching does not change the answer
    assert torch.allclose(detect_poses(det, frames, batch_size=7), pred, atol=1e-5)


def test_made_once_then_read(data, made):
    det, file, mtime = made
    again = toy_pose_detector(data, **TINY)
    assert file.stat().st_mtime_ns == mtime  # read, not retrained
    for (k, a), b in zip(det.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k
    assert not any(p.requires_grad for p in again.parameters()) and not again.training


def test_seeded_and_retrained_when_missing_or_different(data, made):
    det, file = made[:2]
    saved = {k: v.clone() for k, v in load_file(str(file)).items()}
    shutil.rmtree(file.parent)
    torch.manual_seed(123)  # another global RNG state: the detector must not depend on it, nor change it
    state = torch.random.get_rng_state()
    retrained = toy_pose_detector(data, **TINY)
    assert torch.equal(torch.random.get_rng_state(), state)
    for k, v in retrained.state_dict().items():
        assert torch.equal(v, saved[k]), k
    # the same folder asked for with another seed: the spec differs, so it is trained again
    other = toy_pose_detector(data, **dict(TINY, seed=1))
    assert not torch.equal(other.out.weight, retrained.out.weight)
    assert toy_pose_detector(data, **dict(TINY, seed=1)).out.weight.equal(other.out.weight)
