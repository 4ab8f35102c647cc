"""Shared test fixtures: tiny toy data sets (made once per session), tiny configs of the three
stage scripts, and VGG weights in torchvision's layout."""
import pytest
import torch

from data import load_config
from toy import write_toy_dance, write_toy_mice

DANCE_SECONDS, DANCE_FPS = 2.0, 30

# the per-script command-line overrides that make a run take seconds
TINY_ARGS = {
    "train_gslrm": ["--preset=tiny", "--image_size=16", "--batch_size=2", "--max_steps=6",
                    "--warmup_steps=2", "--val_every=100", "--val_samples=2", "--log_every=1",
                    "--ckpt_every=3"],
    "train_mvdiff": ["--preset=tiny", "--image_size=16", "--batch_size=2", "--max_steps=4",
                     "--warmup_steps=2", "--val_every=100", "--val_samples=2", "--val_steps=2",
                     "--log_every=1", "--ckpt_every=2"],
    "train_dance": ["--m2p_preset=tiny", "--window=30", "--batch_size=2", "--stage_a_steps=4",
                    "--warmup_steps=2", "--val_every=100", "--val_clips=2", "--log_every=1",
                    "--ckpt_every=2"],
}


def make_tiny_cfg(script, data, out, **kw):
    """script.Config for a seconds-long run on `data`, writing to `out`; kw override anything."""
    args = [f"--data_dir={data}", f"--out_dir={out}"] + TINY_ARGS[script.__name__]
    if script.__name__ == "train_mvdiff":
        args.append(f"--prompt_embeds={data}/pe.pt")
    return load_config(script.Config, args + [f"--{k}={v}" for k, v in kw.items()])


@pytest.fixture
def tiny_cfg():
    return make_tiny_cfg


@pytest.fixture(scope="session")
def tiny_mice(tmp_path_factory):
    """6 toy mice (4 train, 2 val) at 16 px: the rig's 6 views + 3 random extra views each."""
    return write_toy_mice(tmp_path_factory.mktemp("mice"), n=6, size=16, n_extra=3, n_val=2, progress=False)


@pytest.fixture(scope="session")
def tiny_dance(tmp_path_factory):
    # one generation for the whole session: it also pays librosa's numba warm-up (~6 s) once
    return write_toy_dance(tmp_path_factory.mktemp("dance"), n=4, n_dancers=2, seconds=DANCE_SECONDS, size=32,
                           n_val=2, progress=False)


def save_torchvision_vgg(path, arch, seed=0):
    """A random state dict with torchvision's vgg16/vgg19 keys (features.* + classifier.*)."""
    from models import VGG_LAYERS
    g, sd, i, c_in = torch.Generator().manual_seed(seed), {}, 0, 3
    for v in VGG_LAYERS[arch]:
        if v == "M":
            i += 1
            continue
        sd[f"features.{i}.weight"] = torch.randn(v, c_in, 3, 3, generator=g) * (2 / (9 * c_in)) ** 0.5
        sd[f"features.{i}.bias"] = torch.randn(v, generator=g) * 0.01
        i, c_in = i + 2, v
    sd["classifier.0.weight"], sd["classifier.0.bias"] = torch.zeros(4, 8), torch.zeros(4)
    torch.save(sd, path)
    return sd


@pytest.fixture
def write_vgg():
    return save_torchvision_vgg
