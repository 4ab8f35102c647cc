"""Dance stage B: reference attention (pairing, masking, the ReferenceNet's dead tail), the pose
guider, schedules, the freeze matrix, the SD-layout loaders, the sampler, and train_dance.py's stage B
(runs after stage A, starts from its M2P, resumes exactly)."""
import copy
import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0
from safetensors.torch import load_file
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

import train_dance
from losses import pose_heatmaps
from models import (
    DANCE_UNET_CONFIGS,
    DanceNet,
    FaceTokens,
    PoseGuider,
    ReferenceAttnProcessor,
    clip_image_embeds,
    referencenet_unused,
    sample_frames,
    to_images,
    to_model_space,
)
from plumbing import InputError, load_config
from weights import check_sd_scheduler, load_clip_image_encoder, load_unet, load_vae

J, D = 24, DANCE_UNET_CONFIGS["tiny"]["cross_attention_dim"]


def build_net(preset="tiny", seed=0, refnet_cfg=None):
    torch.manual_seed(seed)
    cfg = DANCE_UNET_CONFIGS[preset]
    unet = UNet2DConditionModel(**cfg)
    refnet = UNet2DConditionModel(**{**cfg, **refnet_cfg}) if refnet_cfg else copy.deepcopy(unet)
    guider = PoseGuider(J, cfg["block_out_channels"][0], (16,))
    return DanceNet(unet, refnet, guider, FaceTokens(cfg["cross_attention_dim"]))


def inputs(B, size=16, dim=D, seed=1):
    """x, t, heatmaps, ref, clip_emb, face_emb of B random samples."""
    g = torch.Generator().manual_seed(seed)
    poses = torch.cat([torch.rand(B, J, 2, generator=g), torch.ones(B, J, 1)], -1)  # (B, J, 3)
    return dict(x=torch.randn(B, 3, size, size, generator=g), t=torch.randint(0, 1000, (B,), generator=g),
                heat=pose_heatmaps(poses, size, 1.0), ref=torch.rand(B, 3, size, size, generator=g) * 2 - 1,
                clip=torch.randn(B, dim, generator=g), face=torch.randn(B, 512, generator=g))


@pytest.fixture(scope="module")
def net():
    return build_net()


def test_processors_pair_by_layer_name(net):
    read = net.install()
    blocks = [n for n, _ in net.unet.named_modules() if n.endswith(".transformer_blocks.0")]
    assert len(read) == len(blocks) == 7  # 2 down, 1 mid, 4 up attentions
    assert read == sorted(f"{b}.attn1.processor" for b in blocks)
    for unet, mode in ((net.unet, "read"), (net.referencenet, "write")):
        procs = unet.attn_processors
        assert sorted(n for n, p in procs.items() if isinstance(p, ReferenceAttnProcessor)) == read
        assert all(procs[n].mode == mode and procs[n].store is net.store and procs[n].name == n for n in read)
        assert all(type(p) is AttnProcessor2_0 for n, p in procs.items() if ".attn2." in n)
    x = inputs(2)
    net.reference(x["ref"], net.context(x["clip"], x["face"], torch.ones(2, dtype=torch.bool)), None)
    assert sorted(net.store.feats) == read  # the write side fills exactly what the read side reads
    net.store.clear()
    with pytest.raises(InputError, match="do not pair by layer name"):
        build_net(refnet_cfg={"layers_per_block": 2})


@torch.no_grad()
def test_the_reference_changes_the_output(net):
    x, keep = inputs(2), torch.ones(2, dtype=torch.bool)
    a = net(x["x"], x["t"], x["heat"], 1.0, x["ref"], x["clip"], x["face"], keep)
    b = net(x["x"], x["t"], x["heat"], 1.0, x["ref"].flip(0), x["clip"], x["face"], keep)
    net.store.clear()
    assert (a - b).abs().amax(dim=(1, 2, 3)).min() > 1e-3  # both samples


@torch.no_grad()
def test_an_empty_or_masked_store_is_plain_self_attention(net):
    x = inputs(2)
    ctx = net.context(x["clip"], x["face"], torch.ones(2, dtype=torch.bool))
    net.store.clear()
    empty = net.denoise(x["x"], x["t"], x["heat"], 1.0, ctx)
    plain = copy.deepcopy(net.unet)
    plain.set_attn_processor(AttnProcessor2_0())
    assert torch.allclose(empty, plain(x["x"], x["t"], encoder_hidden_states=ctx).sample, atol=1e-5)
    net.reference(x["ref"], ctx, torch.tensor([True, False]))
    try:
        mixed = net.denoise(x["x"], x["t"], x["heat"], 1.0, ctx)
    finally:
        net.store.clear()
    assert torch.allclose(mixed[1], empty[1], atol=1e-5)  # keep=False: the reference is masked out
    assert (mixed[0] - empty[0]).abs().max() > 1e-3


def grads_of(refnet):
    return {n: p.grad for n, p in refnet.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("preset", ["tiny", "toy"])
def test_only_the_referencenets_unused_tail_gets_no_gradient(preset):
    net = build_net(preset)
    unused = referencenet_unused(net.referencenet)
    if preset == "tiny":  # SD's layout: attention in the last up block, the tail after its last attn1 input
        last = "up_blocks.1.attentions.1"
        for part in ("conv_norm_out.", "conv_out.", f"{last}.proj_out.",
                     *(f"{last}.transformer_blocks.0.{m}." for m in ("attn1", "norm2", "attn2", "norm3", "ff"))):
            assert any(n.startswith(part) for n in unused), part
        assert not any(n.startswith(f"{last}.transformer_blocks.0.norm1.") for n in unused)
        # build_stage_b freezes exactly these
        cfg = load_config(train_dance.Config, ["--unet_preset=tiny", "--image_size=16", "--toy_pretrain_steps=0"])
        stage_b_net = train_dance.build_stage_b(cfg, J, "cpu")[0]
        frozen = [n for n, p in stage_b_net.referencenet.named_parameters() if not p.requires_grad]
        assert frozen == [n for n, _ in stage_b_net.referencenet.named_parameters() if n in set(unused)]
    else:  # the last up block has no attention: all of it is dead, and the upsampler of the one before
        assert any(n.startswith("up_blocks.2.resnets.") for n in unused)
        assert any(n.startswith("up_blocks.1.upsamplers.") for n in unused)
    size = DANCE_UNET_CONFIGS[preset]["sample_size"]
    x = inputs(1, size, DANCE_UNET_CONFIGS[preset]["cross_attention_dim"])

    def backward():
        net.zero_grad(set_to_none=True)
        out = net(x["x"], x["t"], x["heat"], 1.0, x["ref"], x["clip"], x["face"], torch.ones(1, dtype=torch.bool))
        out.pow(2).mean().backward()
        net.store.clear()
        return grads_of(net.referencenet)

    for n, p in net.referencenet.named_parameters():
        p.requires_grad_(n not in set(unused))
    grads = backward()
    assert len(grads) == len(list(net.referencenet.parameters())) - len(unused)
    no_grad = [n for n, g in grads.items() if g is None or not g.abs().max() > 0]
    assert not no_grad, no_grad
    net.referencenet.requires_grad_(True)
    grads = backward()
    assert sorted(n for n, g in grads.items() if g is None or not g.abs().max() > 0) == unused


def test_gradient_checkpointing_gives_the_same_gradients():
    x, grads = inputs(2), []
    for ckpt in (False, True):
        net = build_net()
        if ckpt:
            net.unet.enable_gradient_checkpointing()
            net.referencenet.enable_gradient_checkpointing()
        out = net(x["x"], x["t"], x["heat"], 1.0, x["ref"], x["clip"], x["face"], torch.tensor([True, False]))
        out.pow(2).mean().backward()  # checkpointed blocks re-read the store here
        net.store.clear()
        grads.append({n: p.grad for n, p in net.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n, g in grads[0].items():
        assert torch.allclose(g, grads[1][n], atol=1e-6, rtol=1e-4), n


@torch.no_grad()
def test_the_zero_initialised_guider_hides_the_pose_until_trained(net):
    x = inputs(2)
    ctx = net.context(x["clip"], x["face"], torch.ones(2, dtype=torch.bool))
    other = x["heat"].roll(5, dims=-1)  # the joints moved
    assert not torch.equal(other, x["heat"])
    guider = copy.deepcopy(net.guider)
    a = net.denoise(x["x"], x["t"], x["heat"], 1.5, ctx)
    assert torch.equal(a, net.denoise(x["x"], x["t"], other, 1.5, ctx))
    try:
        torch.nn.init.normal_(net.guider.embed.conv_out.weight, std=0.1)
        b = net.denoise(x["x"], x["t"], x["heat"], 1.5, ctx)
        c = net.denoise(x["x"], x["t"], other, 1.5, ctx)
    finally:
        net.guider.load_state_dict(guider.state_dict())  # the module-scoped net stays at its initialisation
    assert (b - c).abs().amax(dim=(1, 2, 3)).min() > 1e-3


def test_condition_scale_and_m2p_pose_schedules():
    T = 1000
    assert train_dance.cond_scale_at(0, T) == pytest.approx(0.5)
    assert train_dance.cond_scale_at(int(0.15 * T), T) == pytest.approx(1.0)  # linear in between
    assert train_dance.cond_scale_at(int(0.3 * T), T) == pytest.approx(1.5)
    assert train_dance.cond_scale_at(int(0.6 * T), T) == pytest.approx(1.5)
    assert train_dance.cond_scale_at(T, T) == pytest.approx(1.5)
    p = train_dance.m2p_pose_prob
    assert p(0, T) == 0 and p(int(0.5 * T), T) == 0 and p(int(0.8 * T), T) == 0
    assert p(int(0.9 * T), T) == pytest.approx(0.5)
    assert p(T, T) == pytest.approx(1.0)
    assert p(int(0.7 * T), T, start=0.6) == pytest.approx(0.25)


def test_freeze_matrix_is_the_seeds_table_and_is_asserted():
    assert train_dance.TRAINS == {"A": {"m2p"},
                                  "B": {"m2p", "pose_guider", "face_tokens", "spatial_unet", "referencenet"},
                                  "C": {"temporal_modules"}}
    assert set().union(*train_dance.TRAINS.values()) <= set(train_dance.MODULES)
    mods = {k: torch.nn.Linear(2, 2) for k in ("m2p", "pose_guider", "face_tokens", "spatial_unet",
                                                "referencenet", "vae", "clip")}
    rows = {k: list(m.parameters()) for k, m in mods.items()}
    for k in ("vae", "clip"):
        mods[k].requires_grad_(False)

    def opt(*names):
        return torch.optim.AdamW([{"params": [p for k in names for p in rows[k]]}])

    trains = ("m2p", "pose_guider", "face_tokens", "spatial_unet", "referencenet")
    train_dance.check_freeze("B", rows, opt(*trains))  # as the table says: passes
    mods["vae"].requires_grad_(True)
    with pytest.raises(AssertionError, match="vae is frozen in stage B"):
        train_dance.check_freeze("B", rows, opt(*trains, "vae"))
    train_dance.check_freeze("B", rows, opt(*trains))  # requires_grad but in no group: not trained
    mods["vae"].requires_grad_(False)
    with pytest.raises(AssertionError, match="pose_guider trains in stage B"):
        train_dance.check_freeze("B", rows, opt("m2p", "face_tokens", "spatial_unet", "referencenet"))
    mods["face_tokens"].bias.requires_grad_(False)  # grouped but not trainable
    with pytest.raises(AssertionError, match="face_tokens trains in stage B: 1 tensors do not, 0 expected"):
        train_dance.check_freeze("B", rows, opt(*trains))
    train_dance.check_freeze("B", rows, opt(*trains), {"face_tokens": (1, "bias frozen")})  # explained: passes
    with pytest.raises(AssertionError, match="face_tokens trains in stage B: 1 tensors do not, 2 expected"):
        train_dance.check_freeze("B", rows, opt(*trains), {"face_tokens": (2, "both frozen")})
    with pytest.raises(AssertionError, match="m2p is frozen in stage C"):
        train_dance.check_freeze("C", rows, opt("m2p"))


def test_loaders_read_the_sd_layouts(tmp_path):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**DANCE_UNET_CONFIGS["tiny"])
    unet.save_pretrained(tmp_path / "unet")
    loaded = load_unet(tmp_path / "unet")
    x = inputs(2)
    with torch.no_grad():
        ctx = torch.randn(2, 3, D)
        assert torch.equal(unet(x["x"], x["t"], ctx).sample, loaded(x["x"], x["t"], ctx).sample)

    AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                  block_out_channels=(8,) * 4, layers_per_block=1, norm_num_groups=8,
                  latent_channels=4).save_pretrained(tmp_path / "vae")
    vae = load_vae(tmp_path / "vae")
    assert not any(p.requires_grad for p in vae.parameters()) and not vae.training
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        z = to_model_space(vae, images, torch.Generator().manual_seed(0))
        back = to_images(vae, z)
    assert z.shape == (2, 4, 4, 4) and back.shape == images.shape
    # decoded pixels mapped from [-1, 1], not clamped: without that map about half would sit at 0
    assert ((back > 0) & (back < 1)).float().mean() > 0.9 and not torch.equal(back[0], back[1])
    assert torch.equal(to_images(None, to_model_space(None, images)), images.clamp(0, 1))  # pixel space

    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=6)
    CLIPVisionModelWithProjection(vision).save_pretrained(tmp_path / "image_encoder")
    clip = load_clip_image_encoder(tmp_path / "image_encoder")
    assert not any(p.requires_grad for p in clip.parameters())
    with torch.no_grad():
        emb = clip_image_embeds(clip, torch.rand(3, 3, 48, 48))
    assert emb.shape == (3, 6) and torch.isfinite(emb).all()

    for load in (load_unet, load_vae, load_clip_image_encoder):
        with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
            load(tmp_path / "nowhere")


def test_a_noise_schedule_that_contradicts_the_sd_folders_is_refused(tmp_path):
    sd = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    PNDMScheduler(**sd, skip_prk_steps=True, steps_offset=1).save_pretrained(tmp_path / "scheduler")
    unet = tmp_path / "unet"
    shipped = Path(train_dance.__file__).parent / "configs" / "dance_stage_b.yaml"
    real = load_config(train_dance.Config, ["--cfg", str(shipped)])
    check_sd_scheduler(unet, train_dance.dance_scheduler(real).config)  # the shipped config agrees
    check_sd_scheduler("", train_dance.dance_scheduler(train_dance.Config()).config)  # no SD folder: the toy's
    check_sd_scheduler(tmp_path / "elsewhere" / "unet", train_dance.dance_scheduler(train_dance.Config()).config)
    for key, value in (("beta_schedule", "squaredcos_cap_v2"), ("beta_end", 0.02)):
        wrong = train_dance.dance_scheduler(dataclasses.replace(real, **{key: value})).config
        with pytest.raises(InputError, match=rf"scheduler_config.json: .* {key}={sd[key]!r}, .* {key}={value!r}"):
            check_sd_scheduler(unet, wrong)


def test_sample_frames_are_finite_and_batch_independent(net):
    cfg = load_config(train_dance.Config, ["--unet_preset=tiny", "--image_size=16"])
    x = inputs(2)

    def sample(B):
        gens = [torch.Generator().manual_seed(100 + i) for i in range(B)]
        return sample_frames(net, train_dance.dance_scheduler(cfg), x["ref"][:B], x["clip"][:B], x["face"][:B],
                             x["heat"][:B], 1.5, (3, 16, 16), num_steps=2, guidance=2.0, generator=gens)

    two, one = sample(2), sample(1)
    assert two.shape == (2, 3, 16, 16) and torch.isfinite(two).all()
    assert not net.store.feats
    assert torch.allclose(one[0], two[0], atol=1e-5)
    assert (two[0] - two[1]).abs().max() > 1e-3


# ---- train_dance.py stage B, end to end on the toy dancers

A_ARGS = ["--m2p_preset=tiny", "--window=30", "--max_steps_a=2", "--batch_size=2", "--val_samples=2",
          "--val_every=2", "--ckpt_every=2", "--warmup_steps=2"]
B_ARGS = ["--training_stage=B", "--m2p_preset=tiny", "--window=30", "--unet_preset=tiny", "--image_size=16",
          "--toy_pretrain_steps=2",
          "--max_steps_b=4", "--batch_size=2", "--val_every=4", "--ckpt_every=2", "--val_samples=2",
          "--val_steps=2", "--id_loss_max_t=900", "--warmup_steps=2", "--log_every=1"]


def run(data, out, *args):
    return train_dance.main(load_config(train_dance.Config, [f"--data_dir={data}", f"--out_dir={out}", *args]))


@pytest.mark.slow
def test_stage_b_runs_after_stage_a_starts_from_its_m2p_and_resumes_exactly(tiny_dance, tmp_path, capsys):
    with pytest.raises(InputError, match="stage_A/final"):
        run(tiny_dance, tmp_path / "none", *B_ARGS)
    run(tiny_dance, tmp_path / "a", *A_ARGS)
    a_final = tmp_path / "a" / "stage_A" / "final"
    m2p_a = load_file(a_final / "m2p.safetensors")
    # M2P frozen (lr 0, detached) for steps 0 and 1, trained from step 2 on
    b_args = [*B_ARGS, f"--m2p_path={a_final}", "--m2p_unfreeze_step=2"]
    with pytest.raises(InputError, match="m2p_preset='tiny', this run has 'toy'"):  # final/ rebuilds M2P from it
        run(tiny_dance, tmp_path / "x", *b_args, "--m2p_preset=toy")
    run(tiny_dance, tmp_path / "x", *b_args)
    out = capsys.readouterr().out
    assert "freeze | referencenet" in out and "step 3 | loss " in out and " pose " in out
    assert "group referencenet: " in out and "lr 0.0001" in out.split("group referencenet: ")[1].splitlines()[0]
    x = tmp_path / "x" / "stage_B"
    val = [json.loads(line) for line in (x / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(v["ref_swap"]) for v in val)  # the reference-use diagnostic is logged
    assert (tiny_dance / "toy_unet" / "tiny_16px_2" / "unet" / "config.json").is_file()  # the toy's SD, made once
    final = x / "final"
    for name in ("unet", "referencenet", "scheduler"):
        assert (final / name).is_dir(), name
    for name in ("pose_guider", "face_tokens", "m2p"):
        assert (final / f"{name}.safetensors").is_file(), name
    assert (x / "val_000000.png").is_file() and (x / "val_000004.png").is_file()
    at_2 = load_file(x / "checkpoint-2" / "m2p.safetensors")
    assert at_2.keys() == m2p_a.keys() and all(torch.equal(at_2[k], m2p_a[k]) for k in m2p_a)
    m2p_b = load_file(final / "m2p.safetensors")
    assert any(not torch.equal(m2p_b[k], m2p_a[k]) for k in m2p_a)  # unfrozen at step 2: it trained
    face_head = [k for k in m2p_a if k.startswith("face_head.")]
    assert face_head and all(torch.equal(m2p_b[k], m2p_a[k]) for k in face_head)  # frozen in stage B
    assert load_unet(final / "unet").state_dict().keys() == load_unet(final / "referencenet").state_dict().keys()

    # the same run, killed after checkpoint-2 and resumed
    y = tmp_path / "y" / "stage_B"
    shutil.copytree(x, y)
    shutil.rmtree(y / "checkpoint-4")
    shutil.rmtree(y / "final")
    run(tiny_dance, tmp_path / "y", *b_args, "--resume=auto")
    assert "at step 2" in capsys.readouterr().out
    for name in ("dance", "m2p"):
        full, resumed = (load_file(d / "checkpoint-4" / f"{name}.safetensors") for d in (x, y))
        assert full.keys() == resumed.keys()
        assert all(torch.equal(full[k], resumed[k]) for k in full), name
    before, after = (load_file(x / f"checkpoint-{s}" / "dance.safetensors") for s in (2, 4))
    assert any(not torch.equal(before[k], after[k]) for k in after)  # steps 2-3 changed the weights


def test_face_tokens_are_stableanimators_face_encoder():
    """StableAnimator's FusionFaceId, names and shapes (cross-attention 128: 2 heads of 64), so its weights
    load as they are; the tokens start at zero (its zeroed proj_out), then read the CLIP embedding."""
    f = FaceTokens(128)
    sd = f.state_dict()
    assert len(sd) == 12 + 4 * 11  # proj, norm, perceiver in/out/norm; 4 x (attention 7, feed-forward 4)
    assert sd["proj.2.weight"].shape == (4 * 128, 1024)
    assert sd["fusion_model.layers.3.0.to_kv.weight"].shape == (2 * 2 * 64, 128)
    assert sd["fusion_model.layers.0.1.3.weight"].shape == (128, 4 * 128)
    emb, clip = torch.randn(2, 512), torch.randn(2, 128)
    assert f(emb, clip).abs().max() == 0
    torch.nn.init.normal_(f.fusion_model.proj_out.weight)
    out = f(emb, clip)  # (2, 4, 128)
    assert out.shape == (2, 4, 128)
    assert (out - f(emb, clip.flip(0))).abs().mean() > 0.1  # the face tokens read the image embedding


def test_the_toy_clip_embeds_a_clips_look_whatever_the_pose(tmp_path):
    """The toy CLIP (stage B's stand-in, made once): a frame of a training clip finds its clip among the
    others from another frame, which the random encoder it starts from does far less; stage B and
    frozen_encoders read that folder back."""
    import types

    from toy import (
        frozen_encoders,
        new_background,
        toy_clip,
        toy_clip_image_encoder,
        training_frames,
        write_toy_dance,
    )
    data = write_toy_dance(tmp_path / "d", n=34, n_dancers=4, seconds=0.5, size=32, n_val=2, progress=False)
    cfg = load_config(train_dance.Config, [f"--data_dir={data}", "--image_size=32"])
    solo = types.SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None)
    folder = toy_clip(cfg, 64, solo, steps=150)  # the toy UNet's width (a narrower one collapses more often)
    frames, g = training_frames(cfg, 8), torch.Generator().manual_seed(0)  # (32 clips, 8, 3, 32, 32)

    def gap(clip, p=0.0):  # cosine of frames 0 and 6 of one clip, minus that of different clips
        with torch.no_grad():
            a, b = (torch.nn.functional.normalize(clip_image_embeds(clip, new_background(frames[:, i], g, p)), dim=-1)
                    for i in (0, 6))
        cos = a @ b.T  # (32, 32)
        return cos.diag().mean().item() - cos[~torch.eye(len(cos), dtype=bool)].mean().item()

    _, clip, _ = frozen_encoders(vars(cfg), 64, "cpu")
    trained, random = gap(clip), gap(toy_clip_image_encoder(cfg.seed, 64, cfg.image_size))
    assert trained > 0.5 and trained > 3 * random, (trained, random)
    assert gap(clip, p=1.0) > 0.5  # the dancer's look, not only the background's colour
    assert (folder / "spec.json").is_file()
    with pytest.raises(InputError, match="toy CLIP is missing"):
        frozen_encoders(vars(dataclasses.replace(cfg, image_size=16)), 64, "cpu")
