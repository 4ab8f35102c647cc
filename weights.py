"""Readers of weights: released and foreign formats (FaceLift's GS-LRM `.pt` and UNet folders, MatConvNet's
VGG `.mat`, torchvision VGG and LPIPS heads, arcface_torch IResNets, SD / AnimateDiff / CLIP folders), each
an explicit key map with asserted shapes; and our own checkpoints: the multi-view diffusion and GS-LRM
checkpoints, and the one definition of what each dance stage's final/ folder holds (writer and readers).
"""
import inspect
import json
import re
import shutil
from pathlib import Path

import torch
import torch.nn as nn
import yaml
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    MotionAdapter,
    UNet2DConditionModel,
    UNetMotionModel,
)
from safetensors.torch import load_file, load_model, save_file, save_model
from transformers import CLIPVisionModelWithProjection

from cameras import camera_hash, file_sha256, load_prompt_embeds, load_rig
from data import JOINT_SETS, MUSIC_DIM, body_parts
from models import (
    GSLRM,
    GSLRM_CONFIGS,
    IRESNET_CONFIGS,
    DanceNet,
    FaceTokens,
    IResNet,
    MVUNet,
    PoseGuider,
    VGGFeatures,
    m2p_encoder,
)
from plumbing import (
    InputError,
    atomic_dir,
    clean_overwrites,
    cli,
    latest_checkpoint,
    load_checkpoint,
    save_config,
    write_state,
)

# beside diffusers' files in our unet/ folders; FaceLift's has none
REF_EMBED_FILE = "ref_view_embed.safetensors"


def check_keys(where, ours, theirs, ignore=lambda k: False):
    """Stop with a KeyError naming up to 8 missing and 8 unexpected keys (not counting `ignore`d ones)
    unless the key sets `ours` (what we load into) and `theirs` (what the file holds) are equal."""
    missing = sorted(k for k in set(ours) - set(theirs) if not ignore(k))
    unexpected = sorted(k for k in set(theirs) - set(ours) if not ignore(k))
    if missing or unexpected:
        def first(keys):
            return f"{keys[:8]}" + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")
        raise KeyError(f"{where}: missing keys {first(missing)}, unexpected keys {first(unexpected)} "
                       f"({len(missing)} missing, {len(unexpected)} unexpected)")


def facelift_gslrm_key_map(layers):
    """FaceLift's GS-LRM state-dict keys -> ours."""
    kmap = {"patch_embedder.1.weight": "patch_embed.weight",
            "gaussian_position_embeddings": "extra_tokens",
            "input_layer_norm.weight": "input_norm.weight",
            "gaussian_upsampler.layernorm.weight": "extra_head.0.weight",
            "gaussian_upsampler.linear.weight": "extra_head.1.weight",
            "pixel_gaussian_decoder.0.weight": "pixel_head.0.weight",
            "pixel_gaussian_decoder.1.weight": "pixel_head.1.weight"}
    for i in range(layers):
        for theirs, ours in (("norm1", "norm1"), ("norm2", "norm2"), ("attn.to_qkv", "attn.to_qkv"),
                             ("attn.fc", "attn.fc"), ("mlp.mlp.0", "mlp.0"), ("mlp.mlp.2", "mlp.2")):
            kmap[f"transformer_layers.{i}.{theirs}.weight"] = f"blocks.{i}.{ours}.weight"
    return kmap


def load_facelift_gslrm(model, path):
    """Load FaceLift's `ckpt_XXXXXXXXXXXXXXXX.pt` ({'model': state dict, 'optimizer', ...}) into
    `model`: explicit key map, asserted shapes; only the frozen VGG of its loss (`loss_calculator.*`)
    is ignored. Anything else missing or unexpected is an error that lists the keys."""
    # weights_only=False: the file also pickles optimizer/scheduler state. Load only files you trust.
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise InputError(f"{path}: expected a dict with a 'model' state dict (FaceLift's GS-LRM checkpoint)")
    kmap, ours = facelift_gslrm_key_map(len(model.blocks)), model.state_dict()
    check_keys(f"{path}: not a FaceLift GS-LRM checkpoint for this preset ({len(model.blocks)} layers)",
               kmap, ckpt["model"], ignore=lambda k: k.startswith("loss_calculator."))
    theirs = {k: v for k, v in ckpt["model"].items() if k in kmap}
    for k, v in theirs.items():
        if v.shape != ours[kmap[k]].shape:
            raise InputError(f"{path}: {k} has shape {tuple(v.shape)}, "
                             f"our {kmap[k]} expects {tuple(ours[kmap[k]].shape)}")
    model.load_state_dict({kmap[k]: v for k, v in theirs.items()}, strict=True)
    return ckpt


def load_vgg(path, arch):
    """VGGFeatures from a MatConvNet `.mat` (load_matconvnet_vgg) or from a torchvision-format state
    dict (`vgg19-dcbb9e9d.pth`): the `features.*` keys we build must all be there; the classifier and
    deeper layers are the only keys ignored. Max pooling, torchvision input normalisation."""
    if str(path).endswith(".mat"):
        return load_matconvnet_vgg(path, arch)
    vgg = VGGFeatures(arch)
    sd = torch.load(path, map_location="cpu", weights_only=True)
    ours = vgg.state_dict()

    def unused(k):  # torchvision's classifier and the layers past our deepest tap
        deeper = re.fullmatch(r"features\.(\d+)\.(weight|bias)", k) and int(k.split(".")[1]) > vgg.taps[-1]
        return k.startswith("classifier.") or deeper

    check_keys(f"{path}: not a torchvision {arch} state dict", ours, sd, ignore=unused)
    vgg.load_state_dict({k: sd[k] for k in ours}, strict=True)
    return vgg


def load_matconvnet_vgg(path, arch):
    """FaceLift's perceptual VGG19 from MatConvNet's `imagenet-vgg-verydeep-19.mat`: `layers` is a
    1xN cell of structs; conv `layers[i]` holds `weights` = {W (3, 3, in, out), b (out)}. Average
    pooling and caffe-style input (RGB x255 minus the mean pixel), as FaceLift uses it."""
    import scipy.io  # only this loader reads .mat files
    if arch != "vgg19":  # LPIPS's vgg16 needs torchvision's weights and normalisation
        raise InputError(f"{path}: MatConvNet weights are read for vgg19 only, not {arch}")
    vgg = VGGFeatures(arch, pool="avg")
    vgg.preprocess = "caffe"
    mat = scipy.io.loadmat(path, variable_names=["layers"])
    if "layers" not in mat:
        raise KeyError(f"{path}: no `layers` cell: not a MatConvNet (imagenet-vgg-verydeep-19) file")
    layers = mat["layers"].ravel()  # (N,) of (1, 1) structs
    sd = {}
    for i, conv in enumerate(vgg.features):
        if not isinstance(conv, nn.Conv2d):
            continue
        want = (3, 3, conv.in_channels, conv.out_channels)
        try:  # W (H, W, in, out), b (out, 1) or (1, out)
            w, b = layers[i].ravel()[0]["weights"].ravel()
        except (IndexError, KeyError, ValueError):  # no such layer, no weights field, not {W, b}
            raise InputError(f"{path}: layer {i} of {len(layers)} is not a conv layer with "
                             f"weights {{W {want}, b ({want[3]},)}}") from None
        if w.shape != want or b.size != want[3]:
            raise InputError(f"{path}: layer {i} has W {w.shape}, b {b.shape}; "
                             f"expected W {want}, b ({want[3]},)")
        sd[f"features.{i}.weight"] = torch.from_numpy(w).permute(3, 2, 0, 1).float()  # (out, in, 3, 3)
        sd[f"features.{i}.bias"] = torch.from_numpy(b).reshape(-1).float()  # (out,)
    vgg.load_state_dict(sd, strict=True)
    return vgg


def load_lpips_heads(path):
    """The LPIPS linear heads (`lpips/weights/v0.1/vgg.pth`: `lin{k}.model.1.weight` of shape
    (1, C_k, 1, 1)) -> a list of 5 tensors (C_k,)."""
    sd = torch.load(path, map_location="cpu", weights_only=True)
    want = [f"lin{k}.model.1.weight" for k in range(5)]
    if sorted(sd) != sorted(want):
        raise KeyError(f"{path}: expected the LPIPS vgg heads {want}, found {sorted(sd)}")
    return [sd[k].flatten() for k in want]


# FaceLift's unet/config.json names its own classes; the weights are those of the plain diffusers blocks
FACELIFT_BLOCK_MAP = {"CrossAttnDownBlockMV2D": "CrossAttnDownBlock2D",
                      "UNetMidBlockMV2DCrossAttn": "UNetMidBlock2DCrossAttn",
                      "CrossAttnUpBlockMV2D": "CrossAttnUpBlock2D"}


# FaceLift's extra keys that MVUNet implements at one value only (its released config's, also the
# default of its UNetMV2DConditionModel): any other value asks for a module we lack
FACELIFT_FIXED_KEYS = {
    "multiview_attention": (True, "self-attention within each view only"),
    "selfattn_block": ("custom", "another self-attention block (FaceLift's code builds only 'custom')"),
    "cd_attention_last": (False, "cross-domain attention after each transformer block"),
    "cd_attention_mid": (False, "cross-domain attention inside each transformer block"),
    "addition_downsample": (False, "an extra downsampling conv branch after the mid block")}


# read by facelift_mv_settings; addition_channels only sizes the addition_downsample branch
FACELIFT_EXTRA_KEYS = ("num_views", "sparse_mv_attention", "addition_channels", *FACELIFT_FIXED_KEYS)


WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def unet_config_from_facelift(config, where="config.json"):
    """FaceLift's (or a plain diffusers) UNet config dict -> kwargs of a plain UNet2DConditionModel.
    A FaceLift key asking for a module that MVUNet lacks is a ValueError naming key and value."""

    if config.get("_class_name") not in ("UNetMV2DConditionModel", "UNet2DConditionModel"):
        raise InputError(f"{where}: _class_name {config.get('_class_name')!r}, "
                         "expected UNetMV2DConditionModel (FaceLift) or UNet2DConditionModel")
    extra = sorted(k for k in FACELIFT_EXTRA_KEYS if k in config)
    if extra and config["_class_name"] != "UNetMV2DConditionModel":
        raise InputError(f"{where}: FaceLift's keys {extra} in a UNet2DConditionModel config")
    for key, (ours, feature) in FACELIFT_FIXED_KEYS.items():
        if config.get(key, ours) != ours:
            raise InputError(f"{where}: {key}={config[key]!r} asks for {feature}, which MVUNet "
                             f"does not implement (FaceLift's released weights: {key}={ours!r})")
    cfg = {k: v for k, v in config.items() if not k.startswith("_") and k not in FACELIFT_EXTRA_KEYS}
    for key in ("down_block_types", "up_block_types"):
        cfg[key] = [FACELIFT_BLOCK_MAP.get(b, b) for b in cfg[key]]
    if "mid_block_type" in cfg:
        cfg["mid_block_type"] = FACELIFT_BLOCK_MAP.get(cfg["mid_block_type"], cfg["mid_block_type"])
    unknown = sorted(set(cfg) - set(inspect.signature(UNet2DConditionModel.__init__).parameters))
    if unknown:
        raise InputError(f"{where}: keys {unknown} are neither UNet2DConditionModel arguments "
                         f"nor FaceLift's known extras {FACELIFT_EXTRA_KEYS}")
    return cfg


def facelift_mv_settings(config, where="config.json"):
    """(num_views, sparse) that FaceLift's unet config describes; None for a plain diffusers config
    (ours). FaceLift writes both keys; its defaults (1 view, dense) are not what it trained."""
    if config.get("_class_name") != "UNetMV2DConditionModel":
        return None
    missing = [k for k in ("num_views", "sparse_mv_attention") if k not in config]
    if missing:
        raise InputError(f"{where}: no {missing} in a UNetMV2DConditionModel config")
    V, sparse = config["num_views"], config["sparse_mv_attention"]
    if type(V) is not int or V < 1 or type(sparse) is not bool:
        raise InputError(f"{where}: num_views={V!r}, sparse_mv_attention={sparse!r}: "
                         "expected a positive int and a bool")
    return V, sparse


def load_unet(path):
    """A plain diffusers UNet2DConditionModel from a `unet/` folder in FaceLift's layout (its
    config names UNetMV2DConditionModel and MV block types) or ours (save_pretrained). Weights must
    match exactly: missing or unexpected keys and wrong shapes stop with their names."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file} not found (expected a diffusers/FaceLift unet folder)")
    unet = UNet2DConditionModel(**unet_config_from_facelift(json.loads(cfg_file.read_text()), cfg_file))
    files = [path / f for f in WEIGHT_FILES if (path / f).is_file()]
    if not files:
        raise FileNotFoundError(f"{path}: no weights ({' or '.join(WEIGHT_FILES)})")
    try:
        sd = load_file(files[0]) if files[0].suffix == ".safetensors" else torch.load(
            files[0], map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file: safetensors and torch raise many kinds
        raise InputError(f"{files[0]}: cannot read it ({type(err).__name__}: {err})") from None
    ours = unet.state_dict()
    check_keys(f"{files[0]}: not the weights of the UNet that {cfg_file.name} describes", ours, sd)
    for k, v in sd.items():
        if v.shape != ours[k].shape:
            raise InputError(f"{files[0]}: {k} has shape {tuple(v.shape)}, "
                             f"the config gives {tuple(ours[k].shape)}")
    unet.load_state_dict(sd)  # strict
    return unet


def load_mv_unet(path, num_views=None, sparse=None):
    """MVUNet from a unet/ folder, FaceLift's or ours. The folder decides what it can: FaceLift's
    config.json gives the view count (num_views) and the attention (sparse_mv_attention), ours the
    view count (the rows of its reference-view embedding). An argument given (not None) must agree
    with the folder, else a ValueError names both; None takes the folder's value. Ours records no
    attention: `sparse` decides (None: True). FaceLift's reference-view embedding starts at zero."""
    path = Path(path)
    cfg_file, emb_file = path / "config.json", path / REF_EMBED_FILE
    mv = facelift_mv_settings(json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}, cfg_file)
    if mv is not None:  # checked before reading the weights
        if num_views is not None and num_views != mv[0]:
            raise InputError(f"{cfg_file}: num_views={mv[0]}, but the rig has {num_views} views")
        if sparse is not None and sparse != mv[1]:
            raise InputError(f"{cfg_file}: sparse_mv_attention={mv[1]}, but sparse={sparse} was asked "
                             f"for (train_mvdiff: set --sparse_attention={str(mv[1]).lower()})")
        num_views, sparse = mv
    unet = load_unet(path)
    w = load_file(emb_file)["weight"] if emb_file.is_file() else None
    if num_views is None:
        num_views = len(w) if w is not None else 6
    model = MVUNet(unet, num_views, True if sparse is None else sparse)
    if w is not None:
        if w.shape != model.ref_view_embed.weight.shape:
            raise InputError(f"{emb_file}: shape {tuple(w.shape)}, "
                             f"expected {tuple(model.ref_view_embed.weight.shape)} ({num_views} views)")
        model.ref_view_embed.weight.data.copy_(w)
    return model


def save_mv_unet(model, path):
    """diffusers save_pretrained of the UNet (loadable by any diffusers pipeline) + the
    reference-view embedding."""
    model.unet.save_pretrained(path)
    weight = model.ref_view_embed.weight.detach().cpu().contiguous()
    save_file({"weight": weight}, str(Path(path) / REF_EMBED_FILE))


def load_iresnet(path, arch):
    """An IResNet(arch) with the weights of an arcface_torch `backbone.pth` (a plain state dict,
    or one under 'state_dict'; a DDP 'module.' prefix is removed), in eval mode and frozen."""
    model = IResNet(**IRESNET_CONFIGS[arch])
    want = f"expected an arcface_torch backbone.pth (torch.save of an {arch} state dict), not ONNX (insightface's)"
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as err:  # an .onnx model, a pickled module, a truncated file: torch raises many kinds
        raise InputError(f"{path}: not a PyTorch state dict ({type(err).__name__}): {want}") from None
    if not isinstance(sd, dict):
        raise InputError(f"{path}: holds a {type(sd).__name__}, not a state dict: {want}")
    sd = sd.get("state_dict", sd)
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    ours = model.state_dict()
    # a file may lack BatchNorm's num_batches_tracked (load_state_dict then fills it in)
    check_keys(f"{path}: not an arcface_torch {arch} state dict", ours, sd,
               ignore=lambda k: k in ours and k.endswith("num_batches_tracked"))
    bad = [f"{k} {tuple(v.shape)} vs {tuple(ours[k].shape)}"
           for k, v in sd.items() if v.shape != ours[k].shape]
    if bad:
        raise InputError(f"{path}: shapes differ from {arch}: {bad[:5]}")
    model.load_state_dict(sd, strict=True)
    return model.eval().requires_grad_(False)


def load_motion_adapter(path, max_frames):
    """AnimateDiff motion-module weights from a diffusers MotionAdapter folder, with a position table of
    max_frames. The table is sinusoidal (a buffer, not learnt): a different length is rebuilt, not loaded,
    and the same positions get the same values; every other tensor must match exactly."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}/config.json not found (expected a diffusers MotionAdapter folder)")
    conf = json.loads((path / "config.json").read_text())
    old = conf.get("motion_max_seq_length", 32)
    conf = {k: v for k, v in conf.items() if not k.startswith("_")}
    adapter = MotionAdapter(**dict(conf, motion_max_seq_length=max(max_frames, 1)))
    files = [path / f for f in WEIGHT_FILES if (path / f).is_file()]
    if not files:
        raise FileNotFoundError(f"{path}: no weights ({' or '.join(WEIGHT_FILES)})")
    state = load_file(files[0]) if files[0].suffix == ".safetensors" else torch.load(files[0], map_location="cpu")
    table = {k for k in state if k.endswith("pos_embed.pe")}
    if old != max_frames:
        print(f"{path}: position table {old} -> {max_frames} frames (sinusoidal: rebuilt, not loaded)")
        state = {k: v for k, v in state.items() if k not in table}
    own = adapter.state_dict()
    missing = sorted(set(own) - set(state) - (table if old != max_frames else set()))
    extra = sorted(set(state) - set(own))
    shape = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or extra or shape:
        raise InputError(f"{path}: not a MotionAdapter of this config: missing {missing[:4]}, "
                         f"unexpected {extra[:4]}, wrong shape {shape[:4]}")
    own.update(state)
    adapter.load_state_dict(own)
    return adapter


def load_clip_image_encoder(path):
    """A CLIPVisionModelWithProjection folder (config.json + model.safetensors), frozen, eval."""
    if not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"{path}/config.json not found (expected a CLIPVisionModelWithProjection folder)")
    return CLIPVisionModelWithProjection.from_pretrained(path, local_files_only=True).eval().requires_grad_(False)


def check_sd_scheduler(unet_path, config):
    """The noise schedule of a run's scheduler `config` against the one that the SD folder of `unet_path` was
    trained with (its sibling scheduler/scheduler_config.json, when there is one): betas and timesteps."""
    file = Path(unet_path).parent / "scheduler" / "scheduler_config.json"
    if not unet_path or not file.is_file():
        return
    sd = json.loads(file.read_text())
    for key in ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps"):
        mine, theirs = config[key], sd.get(key, config[key])
        if mine != theirs and not (isinstance(mine, float) and abs(mine - theirs) <= 1e-9):
            raise InputError(f"{file}: the UNet in {unet_path} was trained with {key}={theirs!r}, this run's "
                             f"config has {key}={mine!r}")


def load_vae(path):
    """SD's AutoencoderKL from a local `vae/` folder, frozen, eval."""
    if not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"{path}/config.json not found (expected an SD `vae/` folder)")
    return AutoencoderKL.from_pretrained(path, local_files_only=True).eval().requires_grad_(False)


def save_mv_checkpoint(ckpt_dir, step, model, ema, optimizer, cfg, rig, prompt_file, extra=None):
    """checkpoint-<step>/{unet/, unet_ema/, rig.json, prompt_embeds.pt, state.pt, config.yaml}, written
    atomically. The rig and its prompt file travel with the weights for the next stages' camera checks."""
    final = Path(ckpt_dir) / f"checkpoint-{step}"
    with atomic_dir(final) as tmp:
        save_mv_unet(model, tmp / "unet")
        if ema is not None:
            save_mv_unet(ema, tmp / "unet_ema")
        (tmp / "rig.json").write_text(json.dumps(rig, indent=1))
        shutil.copyfile(prompt_file, tmp / "prompt_embeds.pt")
        write_state(tmp, step, {"optimizer": optimizer}, extra)
        save_config(cfg, tmp / "config.yaml")
    clean_overwrites(ckpt_dir)  # a run this one --overwrote is deleted now that this one has a checkpoint
    return final


def load_mv_checkpoint(path, device="cpu"):
    """A train_mvdiff checkpoint (checkpoint-<step>/, or a run folder: its latest) for generating views:
    {model (EMA weights when saved, eval), rig, prompt_embeds (V, T, D), prompt_file, config, path}. The
    prompt embeddings are checked against the checkpoint's rig (a mismatch it was trained with is printed)."""
    path = Path(path)
    if not (path / "state.pt").is_file() and latest_checkpoint(path):
        path = latest_checkpoint(path)
    missing = [f for f in ("unet", "rig.json", "prompt_embeds.pt", "config.yaml") if not (path / f).exists()]
    if missing:
        raise FileNotFoundError(f"{path}: neither a train_mvdiff checkpoint-<step> folder (no "
                                f"{', '.join(missing)}) nor a run folder holding a complete one")
    cfg = yaml.safe_load((path / "config.yaml").read_text())
    rig = json.loads((path / "rig.json").read_text())
    unet_dir = path / "unet_ema" if (path / "unet_ema").is_dir() else path / "unet"
    model = load_mv_unet(unet_dir, len(rig["frames"]), cfg.get("sparse_attention", True)).to(device).eval()
    pe, _ = load_prompt_embeds(path / "prompt_embeds.pt", rig, model.unet.config.cross_attention_dim,
                               allow_mismatch=bool(rig.get("allowed_mismatch")))
    weights = next(unet_dir / f for f in WEIGHT_FILES if (unet_dir / f).is_file())
    return {"model": model, "rig": rig, "prompt_embeds": pe.to(device),
            "prompt_file": path / "prompt_embeds.pt", "config": cfg, "path": path, "weights_file": weights}


def mv_identity(ck):
    """What names a loaded phase-1 checkpoint wherever it is copied: the sha256 of the UNet weights it
    samples with and of its prompt embeddings, its rig and folder. Phase 2 writes it into every synthetic
    sample, phase 3 into its rig.json, and sample.py compares the two checkpoints by it."""
    return {"mvdiff_checkpoint": str(Path(ck["path"]).resolve()), "unet_sha256": file_sha256(ck["weights_file"]),
            "prompt_embeds_sha256": file_sha256(ck["prompt_file"]), "rig": ck["rig"]["name"],
            "camera_hash": camera_hash(ck["rig"]["frames"])}


def import_facelift_mvdiff(pipeline_dir, prompt_embeds, out, rig="facelift_6view", image_size=512):
    """FaceLift's released multi-view diffusion (its pipeline folder: unet/ in FaceLift's layout, vae/,
    image_encoder/, scheduler/) and its prompt embeddings (`clr_embeds.pt`) -> a phase-1 checkpoint
    `<out>/checkpoint-0/` in train_mvdiff's layout, so that gen_synthetic.py and sample.py run "FaceLift as
    released". The prompt file must be the one `rig` names (facelift_6view names FaceLift's by sha256);
    the noise schedule comes from the folder's scheduler/; the VAE and CLIP stay in the folder
    (`pipeline_dir` in config.yaml: move it and the checkpoint must be imported again)."""
    pipe, rig = Path(pipeline_dir).resolve(), load_rig(rig)
    sched_file = pipe / "scheduler" / "scheduler_config.json"
    missing = [d for d in ("unet", "vae", "image_encoder") if not (pipe / d).is_dir()]
    if missing or not sched_file.is_file():
        raise InputError(f"{pipe}: not FaceLift's pipeline folder (no {', '.join(missing) or sched_file.name}); "
                         "expected unet/, vae/, image_encoder/, scheduler/ (checkpoints/mvdiffusion/pipeckpts)")
    model = load_mv_unet(pipe / "unet", len(rig["frames"]))
    # refused unless it is the file the rig names (FaceLift's clr_embeds.pt for facelift_6view)
    load_prompt_embeds(prompt_embeds, rig, model.unet.config.cross_attention_dim)
    sched = json.loads(sched_file.read_text())
    cfg = {"source": "FaceLift as released, imported by weights.py import_facelift_mvdiff",
           "pipeline_dir": str(pipe), "prompt_embeds": str(Path(prompt_embeds).resolve()),
           "rig": rig["name"], "image_size": image_size, "reference_view": "0",  # FaceLift: always the front
           "sparse_attention": model.sparse, "prediction_type": sched.get("prediction_type", "epsilon"),
           "beta_schedule": sched.get("beta_schedule", "linear"), "beta_start": sched.get("beta_start", 0.0001),
           "beta_end": sched.get("beta_end", 0.02), "clip_sample": sched.get("clip_sample", True)}
    final = Path(out) / "checkpoint-0"
    with atomic_dir(final) as tmp:
        save_mv_unet(model, tmp / "unet")
        (tmp / "rig.json").write_text(json.dumps(rig, indent=1))
        shutil.copyfile(prompt_embeds, tmp / "prompt_embeds.pt")
        write_state(tmp, 0, {}, {"imported_from": str(pipe)})
        (tmp / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    print(f"wrote {final}: FaceLift's multi-view diffusion for rig {rig['name']!r} ({model.num_views} views, "
          f"{'sparse' if model.sparse else 'dense'} attention, {cfg['prediction_type']}, {image_size} px)")
    return final


def load_gslrm_checkpoint(path, device="cpu"):
    """GS-LRM for inference: our checkpoint-<step>/ (or a run folder: its latest; config.yaml gives preset
    and image size, rig.json the cameras it was trained on) or FaceLift's ckpt_*.pt (preset facelift,
    512 px, no rig recorded) -> {model (eval), rig | None, image_size, path}."""
    path = Path(path)
    if path.suffix == ".pt":
        model = GSLRM(**GSLRM_CONFIGS["facelift"])
        load_facelift_gslrm(model, path)
        return {"model": model.to(device).eval(), "rig": None, "image_size": 512, "path": path}
    if not (path / "state.pt").is_file() and latest_checkpoint(path):
        path = latest_checkpoint(path)
    if not (path / "state.pt").is_file() or not (path / "config.yaml").is_file():
        raise FileNotFoundError(f"{path}: neither a train_gslrm checkpoint (state.pt, config.yaml), a run "
                                "folder holding one, nor FaceLift's ckpt_*.pt")
    cfg = yaml.safe_load((path / "config.yaml").read_text())
    model = GSLRM(**GSLRM_CONFIGS[cfg["preset"]])
    load_checkpoint(path, {"model": model})
    rig = json.loads((path / "rig.json").read_text()) if (path / "rig.json").is_file() else None
    return {"model": model.to(device).eval(), "rig": rig, "image_size": cfg["image_size"], "path": path}


def load_mv_weights(model, unet_dir):
    """Copies the weights of a unet/ folder (ours or FaceLift's) into `model` (an MVUNet), strictly."""
    src = load_mv_unet(unet_dir, model.num_views, model.sparse)
    model.load_state_dict(src.state_dict())  # strict: same architecture or an error naming the keys
    return model


# ----------------------------------------------------------------------------------------------
# Dance final/ folders: what each stage of train_dance.py hands to the next (stage C's to sample.py).
# Only the trained parts: the frozen VAE, CLIP and face recognizer are rebuilt from config.yaml.

DANCE_FINAL = {"A": ("m2p.safetensors", "config.yaml"),
               "B": ("unet/config.json", "referencenet/config.json", "pose_guider.safetensors",
                     "face_tokens.safetensors", "m2p.safetensors", "scheduler/scheduler_config.json", "config.yaml")}
DANCE_FINAL["C"] = DANCE_FINAL["B"]  # the same files; the unet/ is a UNetMotionModel


def save_dance_final(path, cfg, m2p, net=None, scheduler=None):
    """Writes a stage's final/ atomically: M2P and config.yaml, plus (stages B, C) the DanceNet's parts as
    diffusers folders (UNets, scheduler) and safetensors (pose guider, face tokens)."""
    with atomic_dir(path) as tmp:
        if net is not None:
            net.unet.save_pretrained(tmp / "unet")
            net.referencenet.save_pretrained(tmp / "referencenet")
            save_model(net.guider, str(tmp / "pose_guider.safetensors"))
            save_model(net.face_tokens, str(tmp / "face_tokens.safetensors"))
            scheduler.save_pretrained(tmp / "scheduler")
        save_model(m2p, str(tmp / "m2p.safetensors"))
        save_config(cfg, tmp / "config.yaml")
    print(f"saved {path}")


def read_dance_final(path, stage, fix):
    """The config.yaml (a dict) of stage `stage`'s final/ folder `path`; a folder missing any file of
    DANCE_FINAL[stage] is refused, naming the files and `fix` (the command that makes it)."""
    missing = [f for f in DANCE_FINAL[stage] if not (Path(path) / f).is_file()]
    if missing:
        raise InputError(f"{path}: not a stage-{stage} final/ folder (no {', '.join(missing)}): {fix}")
    return yaml.safe_load((Path(path) / "config.yaml").read_text())


def load_m2p(path, c, music_dim, grad_checkpoint=False):
    """M2P from a final/ folder, rebuilt from that folder's config `c` (preset, joints, window)."""
    m2p = m2p_encoder(music_dim, body_parts(JOINT_SETS[c["joints"]]), c["m2p_preset"], c["window"], grad_checkpoint)
    weights = Path(path) / "m2p.safetensors"
    try:
        load_model(m2p, str(weights), strict=True)
    except RuntimeError as err:
        raise InputError(f"{weights}: cannot load it into M2P ({' '.join(str(err).split())[:300]})") from None
    return m2p


def load_dance_net(path, c):
    """The DanceNet of a stage-B or stage-C final/ folder (config `c`), strictly loaded."""
    path = Path(path)
    motion = json.loads((path / "unet/config.json").read_text()).get("_class_name") == "UNetMotionModel"
    unet = UNetMotionModel.from_pretrained(path / "unet") if motion else load_unet(path / "unet")
    guider = PoseGuider(JOINT_SETS[c["joints"]], unet.config.block_out_channels[0], tuple(c["guider_channels"]))
    face_tokens = FaceTokens(unet.config.cross_attention_dim, c["face_tokens"])
    load_model(guider, str(path / "pose_guider.safetensors"))
    try:
        load_model(face_tokens, str(path / "face_tokens.safetensors"))
    except RuntimeError as err:  # e.g. a final/ from before the face tokens were StableAnimator's face encoder
        raise InputError(f"{path / 'face_tokens.safetensors'}: not this code's face encoder (StableAnimator's "
                         f"FusionFaceId): {' '.join(str(err).split())[:200]}; train stage B again") from None
    return DanceNet(unet, load_unet(path / "referencenet"), guider, face_tokens)


def load_dance_final(path, device):
    """train_dance.py's top-level final/ (stage C's) for sampling -> dict(net, m2p, scheduler, cfg); the
    frozen encoders come from toy.frozen_encoders(cfg)."""
    cfg = read_dance_final(path, "C", "run `train_dance.py --training_stage all` (or C) first")
    return dict(net=load_dance_net(path, cfg).to(device).eval(), cfg=cfg,
                m2p=load_m2p(path, cfg, MUSIC_DIM).to(device).eval(),
                scheduler=DDIMScheduler.from_pretrained(Path(path) / "scheduler"))


def _main(argv):
    """python weights.py import_facelift_mvdiff --pipeline_dir=DIR --prompt_embeds=FILE --out=DIR
    [--rig=facelift_6view --image_size=512]"""
    if not argv or argv[0] != "import_facelift_mvdiff":
        raise InputError(f"usage: python weights.py import_facelift_mvdiff --pipeline_dir=DIR "
                         f"--prompt_embeds=clr_embeds.pt --out=DIR (got {argv[:1]})")
    args = dict(a.removeprefix("--").split("=", 1) for a in argv[1:] if "=" in a)
    unknown = sorted(set(args) - {"pipeline_dir", "prompt_embeds", "out", "rig", "image_size"})
    if unknown or not {"pipeline_dir", "prompt_embeds", "out"} <= set(args) or len(args) != len(argv) - 1:
        raise InputError(f"{argv[1:]}: expected --pipeline_dir=DIR --prompt_embeds=FILE --out=DIR "
                         "[--rig=NAME] [--image_size=N] (each as --key=value)")
    if "image_size" in args:
        if not args["image_size"].isdigit():
            raise InputError(f"--image_size={args['image_size']}: expected a whole number of pixels")
        args["image_size"] = int(args["image_size"])
    return import_facelift_mvdiff(**args)


if __name__ == "__main__":
    cli(_main)
