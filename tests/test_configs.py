"""Every shipped config runs: each configs/*.yaml is loaded as written, given tiny weights and tiny
data in the real layouts it names (a FaceLift pipeline folder, FaceLift's GS-LRM `.pt`, MatConvNet's
`.mat`, an arcface_torch `.pth`, FaceLift's 32-view 16-bit samples, ...), and run for 2 steps with
one validation and one checkpoint. Only sizes, steps and paths are overridden."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import fabricate_facelift_ckpt, write_facelift_pipeline, write_png16
from PIL import Image

import gen_synthetic
import train_dance
import train_gslrm
import train_mvdiff
from cameras import load_rig, read_cameras, rig_view_prompts, save_prompt_embeds
from data import read_list_file
from models import DANCE_UNET_CONFIGS, IRESNET_CONFIGS, IResNet
from plumbing import load_config
from toy import write_toy_mice

CONFIGS = Path(__file__).parent.parent / "configs"
SHORT = dict(max_steps=2, warmup_steps=1, val_every=2, ckpt_every=2, num_workers=0, log_every=1)


def run(script, config, **overrides):
    args = [f"--{k}={v}" for k, v in overrides.items()]
    cfg = load_config(script.Config, ["--cfg", str(CONFIGS / config)] + args)
    return cfg, script.main(cfg)


def lpips_files(tmp_path, write_vgg):
    write_vgg(tmp_path / "vgg16.pth", "vgg16")
    heads = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) for k, c in enumerate((64, 128, 256, 512, 512))}
    torch.save(heads, tmp_path / "heads.pth")
    return dict(lpips_vgg16_path=tmp_path / "vgg16.pth", lpips_heads_path=tmp_path / "heads.pth")


def mouse_mvdiffusion_6x_aug(tmp_path, tiny_mice, write_vgg, **_):
    pipe = write_facelift_pipeline(tmp_path / "pipeckpts")
    dim = json.loads((pipe / "unet" / "config.json").read_text())["cross_attention_dim"]
    rig = load_rig("mouse_6view")  # made as `data.py rig_prompt_embeds` makes them: the rig recorded
    save_prompt_embeds(tmp_path / "clr_embeds.pt", torch.randn(6, 77, dim), rig, rig_view_prompts(rig))
    cfg, (model, ema) = run(train_mvdiff, "mouse_mvdiffusion_6x_aug.yaml", data_dir=tiny_mice,
                            prompt_embeds=tmp_path / "clr_embeds.pt", init_from=pipe, pipeline_dir=pipe,
                            image_size=32, batch_size=1, val_samples=2, val_steps=2, out_dir=tmp_path / "out",
                            **lpips_files(tmp_path, write_vgg), **SHORT)
    assert cfg.prediction_type == "v_prediction" and cfg.train_bg == "three_choices" and ema is not None
    return "psnr_g1_all", "lpips_g3"


def mouse_gslrm_synthetic(tmp_path, vgg19_mat, tiny_mice, tiny_mv_ckpt, write_vgg, **_):
    # phase 2's output, as gen_synthetic.py writes it from a (tiny) phase-1 checkpoint
    data = gen_synthetic.main(load_config(gen_synthetic.Config, [
        f"--mvdiff_checkpoint={tiny_mv_ckpt}", f"--input_data={tiny_mice}/data_train.txt", "--steps=1",
        f"--output_dir={tmp_path / 'synthetic'}", "--max_sources=2", "--val_fraction=0.5"]))
    fabricate_facelift_ckpt(tmp_path / "ckpt.pt")  # the tiny preset's sizes
    cfg, model = run(train_gslrm, "mouse_gslrm_synthetic.yaml", data_dir=data, preset="tiny",
                     init_from=tmp_path / "ckpt.pt", vgg19_path=vgg19_mat[0], image_size=16,
                     l2_warmup_steps=1, val_samples=2, out_dir=tmp_path / "out", **lpips_files(tmp_path, write_vgg),
                     **SHORT)
    assert (cfg.num_input_views, cfg.num_novel_views, cfg.num_input_views_supervised) == (4, 2, 4)
    assert json.loads((tmp_path / "out" / "checkpoint-2" / "rig.json").read_text())["name"] == "mouse_6view"
    return "psnr", "recon_psnr", "lpips"  # the 2 held-out rig views, and all 6 in -> 6 out


def toy_gslrm_synthetic(tmp_path, tiny_mice, tiny_mv_ckpt, tiny_gslrm_ckpt, **_):
    data = gen_synthetic.main(load_config(gen_synthetic.Config, [
        f"--mvdiff_checkpoint={tiny_mv_ckpt}", f"--input_data={tiny_mice}/data_train.txt", "--steps=1",
        f"--output_dir={tmp_path / 'synthetic'}", "--max_sources=2", "--val_fraction=0.5"]))
    cfg, model = run(train_gslrm, "toy_gslrm_synthetic.yaml", data_dir=data, preset="tiny",
                     init_from=tiny_gslrm_ckpt, image_size=16, val_samples=2, out_dir=tmp_path / "out",
                     **SHORT)
    assert cfg.rig == "mouse_6view" and cfg.alpha_weight == 0
    return "psnr", "recon_psnr"


def toy_mvdiff_horizontal(tmp_path, **_):
    data = write_toy_mice(tmp_path / "horizontal", n=4, rig="facelift_6view", size=16, n_extra=0, n_val=2,
                          progress=False)
    cfg, (model, ema) = run(train_mvdiff, "toy_mvdiff_horizontal.yaml", data_dir=data, preset="tiny",
                            prompt_embeds=data / "pe.pt", image_size=16, batch_size=2, val_samples=2,
                            val_steps=2, out_dir=tmp_path / "out", **SHORT)
    rig = json.loads((tmp_path / "out" / "checkpoint-2" / "rig.json").read_text())
    assert rig["name"] == "facelift_6view"
    return "psnr_g1", "psnr_copy_ref"


def facelift_gslrm(tmp_path, vgg19_mat, **_):
    # FaceLift's GS-LRM samples: 32 views, 16-bit RGBA, extra frame keys, a list file of absolute paths
    data = write_toy_mice(tmp_path / "facelift", n=3, rig="facelift_6view", size=16, n_extra=26, n_val=1,
                          progress=False)
    for split in ("data_train.txt", "data_val.txt"):
        dirs = read_list_file(data / split)
        for d in dirs:
            cams = read_cameras(d / "opencv_cameras.json")
            for i, fr in enumerate(cams["frames"]):
                rgba = np.asarray(Image.open(d / fr["file_path"]), dtype=np.uint16) * 257  # (H, W, 4)
                write_png16(d / fr["file_path"], rgba)
                fr.update(blender_camera_name=f"Camera_{i}", blender_camera_location=[0.0, 0.0, 0.0])
            (d / "opencv_cameras.json").write_text(json.dumps(cams))
        (data / split).write_text("".join(f"{d.resolve()}\n" for d in dirs))
    fabricate_facelift_ckpt(tmp_path / "ckpt.pt")
    cfg, model = run(train_gslrm, "facelift_gslrm.yaml", data_dir=data, preset="tiny",
                     init_from=tmp_path / "ckpt.pt", vgg19_path=vgg19_mat[0], image_size=16,
                     l2_warmup_steps=1, val_samples=1, batch_size=1, out_dir=tmp_path / "out", **SHORT)
    assert cfg.rig == "" and cfg.num_input_views + cfg.num_novel_views == 8  # FaceLift's 8 views
    return "psnr", "recon_psnr"


# The dance configs chain A -> B -> C as shipped: M2P preset, joints, fps and the noise schedule are never
# overridden (stage B rebuilds stage A's M2P from its preset, stage C checks stage B's schedule), so the test
# catches a config that disagrees with the one before it. Overridden: sizes (the 5 s window -> 1 s, the
# iresnet100 recognizer -> the toy IResNet, 512 px -> 32 px), steps and paths, the same in every stage.
DANCE = dict(window=30, face_recognizer_arch="toy", num_workers=0, log_every=1, warmup_steps=1)


def arcface_file(tmp_path):
    torch.manual_seed(0)
    torch.save(IResNet(**IRESNET_CONFIGS["toy"]).state_dict(), tmp_path / "backbone.pth")  # arcface_torch
    return tmp_path / "backbone.pth"


def dance_stage_a(tmp_path, tiny_dance, **_):
    cfg, m2p = run(train_dance, "dance_stage_a.yaml", data_dir=tiny_dance, face_recognizer_path=arcface_file(tmp_path),
                   batch_size=2, val_samples=2, out_dir=tmp_path / "out", max_steps_a=2, val_every=2, ckpt_every=2,
                   **DANCE)
    assert cfg.fps == 30 and cfg.lr_a == 1e-4 and cfg.m2p_preset == "base"
    return "pose_err", "beat_align_shuffled"


def dance_stage_b(tmp_path, tiny_dance, **_):
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
    recognizer = arcface_file(tmp_path)
    sd = tmp_path / "stable-diffusion-v1-5"  # SD-1.5's unet/, vae/ and scheduler/ layouts (latents at 1/8)
    PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                  skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False).save_pretrained(sd / "scheduler")
    UNet2DConditionModel(**{**DANCE_UNET_CONFIGS["tiny"], "in_channels": 4, "out_channels": 4}).save_pretrained(
        sd / "unet")
    AutoencoderKL(block_out_channels=(8,) * 4, down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=8).save_pretrained(
        sd / "vae")
    CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
        patch_size=8, projection_dim=16)).save_pretrained(tmp_path / "clip")
    common = dict(data_dir=tiny_dance, face_recognizer_path=recognizer, batch_size=2, val_samples=2,
                  out_dir=tmp_path / "out", **DANCE)
    run(train_dance, "dance_stage_a.yaml", max_steps_a=1, val_every=1, ckpt_every=1,
        **common)  # stage B starts from stage A's final/
    cfg, net = run(train_dance, "dance_stage_b.yaml", unet_path=sd / "unet", vae_path=sd / "vae",
                   clip_path=tmp_path / "clip", image_size=32, max_steps_b=2, m2p_unfreeze_step=1, val_every=2,
                   ckpt_every=2, val_steps=2, val_frames=2, **common)
    assert cfg.lr_b == 1e-4 and cfg.m2p_lr_b == 1e-5 and cfg.id_loss_weight == 0.1 and cfg.m2p_preset == "base"
    assert (cfg.beta_schedule, cfg.prediction_type, cfg.zero_snr) == ("scaled_linear", "v_prediction", True)
    assert (tmp_path / "out" / "stage_B" / "final" / "unet" / "config.json").is_file()
    return "psnr", "psnr_copy_ref", "psnr_wrong_pose", "id_cos", "id_cos_other"


def dance_stage_c(tmp_path, tiny_dance, **_):
    from diffusers import MotionAdapter
    dance_stage_b(tmp_path, tiny_dance)  # stage C starts from stage B's final/ (written with the same paths)
    sd = tmp_path / "stable-diffusion-v1-5"
    MotionAdapter(block_out_channels=DANCE_UNET_CONFIGS["tiny"]["block_out_channels"], motion_layers_per_block=1,
                  motion_num_attention_heads=2, motion_norm_num_groups=8, use_motion_mid_block=False).save_pretrained(
        tmp_path / "motion")  # AnimateDiff's layout (position table 32: rebuilt for 4 frames)
    cfg, net = run(train_dance, "dance_stage_c.yaml", vae_path=sd / "vae", clip_path=tmp_path / "clip",
                   face_recognizer_path=tmp_path / "backbone.pth", motion_adapter_path=tmp_path / "motion",
                   data_dir=tiny_dance, out_dir=tmp_path / "out", image_size=32, max_steps_c=2, val_every=2,
                   ckpt_every=2, val_steps=2, val_samples_c=2, seq_len_start=2, seq_len_end=4, seq_len_ramp_steps=2,
                   **DANCE)
    assert cfg.lr_c == 5e-5 and cfg.temporal_loss_weight == 0.1
    assert (tmp_path / "out" / "final" / "unet" / "config.json").is_file()
    return "psnr", "temporal_err", "bg_flicker", "id_cos"


RUNS = {f.__name__: f for f in (mouse_mvdiffusion_6x_aug, mouse_gslrm_synthetic, facelift_gslrm,
                                 dance_stage_a, dance_stage_b, dance_stage_c, toy_gslrm_synthetic,
                                 toy_mvdiff_horizontal)}


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIGS.glob("*.yaml")))
def test_shipped_config_runs(name, tmp_path, tiny_mice, tiny_dance, vgg19_mat, write_vgg, tiny_mv_ckpt,
                             tiny_gslrm_ckpt):
    assert name in RUNS, f"configs/{name}.yaml has no smoke test: add one to {Path(__file__).name}"
    keys = RUNS[name](tmp_path=tmp_path, tiny_mice=tiny_mice, tiny_dance=tiny_dance, vgg19_mat=vgg19_mat,
                      write_vgg=write_vgg, tiny_mv_ckpt=tiny_mv_ckpt, tiny_gslrm_ckpt=tiny_gslrm_ckpt)
    out = tmp_path / "out" / {"dance_stage_a": "stage_A", "dance_stage_b": "stage_B",
                                 "dance_stage_c": "stage_C"}.get(name, "")
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["step"] == 2 and set(keys) <= set(logged[-1]), logged[-1]
    assert all(np.isfinite(v) for v in logged[-1].values()), logged[-1]
    assert (out / "checkpoint-2" / "state.pt").is_file() and (out / "checkpoint-2" / "config.yaml").is_file()
