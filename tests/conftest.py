"""Shared test fixtures: tiny toy data sets (made once per session), tiny configs of the three
stage scripts, and VGG weights in torchvision's layout."""
import json
import struct
import zlib

import numpy as np
import pytest
import scipy.io
import torch
from diffusers import UNet2DConditionModel

from models import MVDIFF_UNET_CONFIGS
from plumbing import load_config
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
    "train_dance": ["--m2p_preset=tiny", "--window=30", "--batch_size=2", "--max_steps_a=4",
                    "--warmup_steps=2", "--val_every=100", "--val_samples=2", "--log_every=1",
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


# ---- MatConvNet's imagenet-vgg-verydeep-19.mat (FaceLift's perceptual loss), random weights
WIDTHS = [64, 64, 128, 128, 256, 256, 256, 256, 512, 512, 512, 512, 512, 512, 512, 512]
MAT_CONVS = [0, 2, 5, 7, 10, 12, 14, 16, 19, 21, 23, 25, 28, 30, 32, 34]


def cell(*items):
    c = np.empty((1, len(items)), dtype=object)  # a MATLAB 1xN cell
    c[0, :] = items
    return c


def write_mat(path, seed=0, drop=(), shapes=None, n_layers=43):
    """imagenet-vgg-verydeep-19.mat's layout: `layers` = 1x43 cell of structs (name, type[, weights]):
    conv/relu pairs, a pool after each block, then fc6..fc8 (tiny stand-ins here) and prob.
    `drop`: conv indices written without weights; `shapes`: {index: W shape} overrides.
    Returns the conv weights {index: (W (3, 3, in, out), b)}."""
    rng, layers, convs, c_in = np.random.default_rng(seed), [], {}, 3
    for blk, n in enumerate([2, 2, 4, 4, 4], 1):
        for k in range(1, n + 1):
            i, c_out = len(layers), WIDTHS[len(convs)]
            shape = (shapes or {}).get(i, (3, 3, c_in, c_out))
            w = (rng.standard_normal(shape) * (2 / (9 * c_in)) ** 0.5).astype(np.float32)
            b = (rng.standard_normal((c_out, 1) if k % 2 else (1, c_out)) * 0.1).astype(np.float32)
            convs[i], c_in = (w, b), c_out
            layer = {"name": f"conv{blk}_{k}", "type": "conv", "weights": cell(w, b)}
            layers += [{"name": f"conv{blk}_{k}", "type": "conv"} if i in drop else layer,
                       {"name": f"relu{blk}_{k}", "type": "relu"}]
        layers.append({"name": f"pool{blk}", "type": "pool"})
    for name, c in [("fc6", 4), ("fc7", 4), ("fc8", 2)]:
        small = cell(np.zeros((1, 1, 2, c), np.float32), np.zeros((c, 1), np.float32))
        layers += [{"name": name, "type": "conv", "weights": small}]
        layers += [{"name": f"relu{name[2]}", "type": "relu"}] if name != "fc8" else []
    layers.append({"name": "prob", "type": "softmax"})
    assert len(layers) == 43 and sorted(convs)[:16] == MAT_CONVS
    scipy.io.savemat(path, {"layers": cell(*layers[:n_layers])})
    return convs


@pytest.fixture(scope="session")
def vgg19_mat(tmp_path_factory):
    """(path, conv weights) of one random full-width .mat, written once per session."""
    path = tmp_path_factory.mktemp("vgg") / "imagenet-vgg-verydeep-19.mat"
    return path, write_mat(path)


def write_png16(path, rgba):
    """A 16-bit RGBA PNG (Pillow cannot write one): (H, W, 4) uint16."""
    h, w, _ = rgba.shape
    raw = b"".join(b"\x00" + rgba[y].astype(">u2").tobytes() for y in range(h))

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 6, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


# ---- FaceLift's multi-view diffusion pipeline folder, tiny random weights in its layout
# FaceLift's released config (configs/mvdiffusion.yaml -> from_pretrained_2d writes these keys)
FACELIFT_KEYS = dict(num_views=6, multiview_attention=True, sparse_mv_attention=True, selfattn_block="custom",
                     cd_attention_last=False, cd_attention_mid=False, addition_downsample=False,
                     addition_channels=[1280, 1280, 1280])


def tiny_facelift_unet():
    torch.manual_seed(0)  # FaceLift's conditioning: 4 + 4 latent channels, a projection class embedding
    cfg = {**MVDIFF_UNET_CONFIGS["tiny"], "in_channels": 8, "out_channels": 4,
           "class_embed_type": "projection", "projection_class_embeddings_input_dim": 12}
    return UNet2DConditionModel(**cfg)


def save_facelift_layout(unet, path, **keys):
    """`unet` saved as FaceLift's unet/ folder looks: its class and block names, its extra keys."""
    unet.save_pretrained(path)
    cfg = json.loads((path / "config.json").read_text())
    names = {"CrossAttnDownBlock2D": "CrossAttnDownBlockMV2D", "CrossAttnUpBlock2D": "CrossAttnUpBlockMV2D"}
    cfg.update(_class_name="UNetMV2DConditionModel", mid_block_type="UNetMidBlockMV2DCrossAttn",
               down_block_types=[names.get(b, b) for b in cfg["down_block_types"]],
               up_block_types=[names.get(b, b) for b in cfg["up_block_types"]], **{**FACELIFT_KEYS, **keys})
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def write_facelift_pipeline(pipe):
    """A FaceLift pipeline folder: unet/ in FaceLift's layout (8 input channels, projection class
    embedding of 6 CLIP + 6 noise-level dims), vae/, image_encoder/ and SD 2.1-unclip's DDIM scheduler/."""
    from diffusers import AutoencoderKL
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
    torch.manual_seed(0)
    AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                  block_out_channels=(8,) * 4, layers_per_block=1, norm_num_groups=8,
                  latent_channels=4).save_pretrained(pipe / "vae")
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                              num_attention_heads=2, image_size=224, patch_size=32, projection_dim=6)
    CLIPVisionModelWithProjection(vision).save_pretrained(pipe / "image_encoder")
    save_facelift_layout(tiny_facelift_unet(), pipe / "unet")
    scheduler = {"_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                 "beta_schedule": "scaled_linear", "clip_sample": False, "num_train_timesteps": 1000,
                 "prediction_type": "v_prediction", "set_alpha_to_one": False, "steps_offset": 1}
    (pipe / "scheduler").mkdir()
    (pipe / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    return pipe


# ---- FaceLift's GS-LRM checkpoint layout, tiny random weights
def fabricate_facelift_ckpt(path, layers=2, d=32, patch=8, drop=None, extra=None, bad_shape=None):
    """A checkpoint in FaceLift's exact key layout (tiny sizes), with the VGG loss keys it carries."""
    shapes = {"patch_embedder.1.weight": (d, 9 * patch * patch), "gaussian_position_embeddings": (2, d),
              "input_layer_norm.weight": (d,), "gaussian_upsampler.layernorm.weight": (d,),
              "gaussian_upsampler.linear.weight": (14, d), "pixel_gaussian_decoder.0.weight": (d,),
              "pixel_gaussian_decoder.1.weight": (patch * patch * 14, d)}
    for i in range(layers):
        p = f"transformer_layers.{i}"
        shapes.update({f"{p}.norm1.weight": (d,), f"{p}.norm2.weight": (d,),
                       f"{p}.attn.to_qkv.weight": (3 * d, d), f"{p}.attn.fc.weight": (d, d),
                       f"{p}.mlp.mlp.0.weight": (4 * d, d), f"{p}.mlp.mlp.2.weight": (d, 4 * d)})
    sd = {k: torch.randn(s) for k, s in shapes.items()}
    sd["loss_calculator.perceptual_loss_module.vgg.0.weight"] = torch.randn(64, 3, 3, 3)
    if drop:
        sd.pop(drop)
    if extra:
        sd[extra] = torch.zeros(1)
    if bad_shape:
        sd[bad_shape] = torch.zeros(3, 3)
    torch.save({"model": sd, "optimizer": {}, "lr_scheduler": {}, "fwdbwd_pass_step": 21125,
                "param_update_step": 21125}, path)
    return sd


@pytest.fixture(scope="session")
def tiny_mv_ckpt(tmp_path_factory):
    """An (untrained) tiny phase-1 checkpoint for the mouse rig, as train_mvdiff saves it."""
    import train_mvdiff
    from cameras import load_rig
    from models import build_mv_unet
    from toy import toy_prompt_embeds
    from weights import save_mv_checkpoint
    root, rig = tmp_path_factory.mktemp("mv_ckpt"), load_rig("mouse_6view")
    torch.manual_seed(0)
    model = build_mv_unet("tiny", 6)
    for p in model.parameters():  # a random model, not a zero-output one (diffusers zeroes conv_out)
        p.data.add_(torch.randn_like(p) * 0.05)
    cfg = load_config(train_mvdiff.Config, ["--preset=tiny", "--image_size=16"])
    pe = toy_prompt_embeds(root / "pe.pt", rig, model.unet.config.cross_attention_dim)
    opt = torch.optim.AdamW(model.parameters())
    return save_mv_checkpoint(root / "run", 1, model, None, opt, cfg, rig, pe)


@pytest.fixture(scope="session")
def tiny_gslrm_ckpt(tmp_path_factory):
    """An (untrained) tiny GS-LRM checkpoint trained 'on' the mouse rig, as train_gslrm saves it."""
    import train_gslrm
    from cameras import load_rig
    from models import GSLRM, GSLRM_CONFIGS
    from plumbing import save_checkpoint
    torch.manual_seed(0)
    model = GSLRM(**GSLRM_CONFIGS["tiny"])
    cfg = load_config(train_gslrm.Config, ["--preset=tiny", "--image_size=16"])
    opt = torch.optim.AdamW(model.parameters())
    run = tmp_path_factory.mktemp("gs_ckpt") / "run"
    rig = load_rig("mouse_6view")
    return save_checkpoint(run, 1, {"model": model}, {"optimizer": opt}, cfg, {"skipped": 0}, rig)
