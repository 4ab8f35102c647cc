"""Multi-view diffusion: attention semantics, the zero reference-view embedding, loading FaceLift's
unet layout, prompt embeddings, the sampler, and the training script (runs, reloads, resumes)."""
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from conftest import save_facelift_layout, tiny_facelift_unet, write_facelift_pipeline
from diffusers import DDIMScheduler
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from safetensors.torch import load_file, save_file

import data
import train_mvdiff
from cameras import clip_prompt_embeds, load_prompt_embeds, load_rig, rig_view_prompts, save_prompt_embeds
from losses import diffusion_target, min_snr_weight
from models import CrossAttnProcessor, MVAttnProcessor, attention, build_mv_unet, sample_views
from plumbing import load_config
from toy import toy_rig_prompt_embeds, write_toy_mice
from weights import load_mv_unet

V = 4


def attn_layer(seed=0):
    torch.manual_seed(seed)
    return Attention(query_dim=16, heads=2, dim_head=8)


@pytest.mark.parametrize("sparse", [True, False])
def test_which_views_each_view_sees(sparse):
    """Perturb view j of object 0 at a single attention layer: sparse changes view k only when j is the
    reference or k itself; dense changes every view of that object; the other object never changes."""
    attn = attn_layer()
    attn.set_processor(MVAttnProcessor(V, sparse))
    x = torch.randn(2 * V, 5, 16)  # (B*V, N, C): 2 objects
    ref_idx = torch.tensor([2, 0])
    base = attn(x, ref_idx=ref_idx)
    for j in range(V):
        x2 = x.clone()
        x2[j] += torch.randn(5, 16)
        changed = (attn(x2, ref_idx=ref_idx) - base).abs().amax(dim=(1, 2)) > 1e-6  # (B*V,)
        expect = [sparse is False or j == 2 or k == j for k in range(V)] + [False] * V
        assert changed.tolist() == expect, (j, changed.tolist())


def test_sparse_attention_is_facelifts_reference_plus_own():
    """Each view's output = plain attention of its queries over [reference tokens; own tokens] (the
    reference view too, which then sees its own tokens twice)."""
    attn = attn_layer(1)
    x = torch.randn(2 * V, 5, 16)
    ref_idx = torch.tensor([3, 1])
    attn.set_processor(MVAttnProcessor(V, sparse=True))
    out = attn(x, ref_idx=ref_idx)
    attn.set_processor(AttnProcessor2_0())
    for b in range(2):
        for k in range(V):
            kv = torch.cat([x[b * V + ref_idx[b]], x[b * V + k]])[None]  # (1, 2N, C)
            expect = attn(x[b * V + k][None], encoder_hidden_states=kv)[0]
            assert torch.allclose(out[b * V + k], expect, atol=1e-5)


def test_cross_attention_is_diffusers_sdpa_processor():
    """attn2 by hand = diffusers' AttnProcessor2_0, cross (prompt tokens) and self (no context)."""
    attn = Attention(query_dim=16, cross_attention_dim=12, heads=2, dim_head=8)
    x, ctx = torch.randn(3, 5, 16), torch.randn(3, 7, 12)
    attn.set_processor(CrossAttnProcessor())
    ours = attn(x, encoder_hidden_states=ctx)
    attn.set_processor(AttnProcessor2_0())
    assert torch.allclose(ours, attn(x, encoder_hidden_states=ctx), atol=1e-6)
    plain = attn_layer()
    expect = plain(x)
    plain.set_processor(CrossAttnProcessor())
    assert torch.allclose(plain(x), expect, atol=1e-6)


def test_attention_under_cpu_autocast_is_sdpa_in_bf16():
    """Without autocast `attention` is SDPA; under CPU bf16 autocast (matmuls, fp32 softmax) its output
    and gradients stay within bf16's rounding of fp32 SDPA's, and a wrong scale would not."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 40, 16, generator=g, requires_grad=True) for _ in range(3))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert torch.equal(attention(q, k, v), ref)
    grads_ref = torch.autograd.grad(ref.square().sum(), (q, k, v))
    with torch.autocast("cpu", torch.bfloat16):
        out = attention(q, k, v)
    assert out.dtype == torch.bfloat16
    err = (out.float() - ref).abs().max().item()
    assert err < 0.05, err
    unscaled = torch.softmax(q @ k.transpose(-1, -2), -1) @ v  # the mistake the tolerance must catch
    assert (unscaled - ref).abs().max().item() > 10 * err
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    for a, b in zip(grads, grads_ref):
        assert (a - b).norm() / b.norm() < 0.03


def mv_inputs(model, B=2, seed=0):
    c = model.unet.config
    g = torch.Generator().manual_seed(seed)
    S, C = c.sample_size, c.out_channels
    return (torch.randn(B, model.num_views, C, S, S, generator=g), torch.tensor([500, 20][:B]),
            torch.randn(model.num_views, 8, c.cross_attention_dim, generator=g),
            torch.randn(B, c.in_channels - C, S, S, generator=g))


def test_zero_reference_embedding_at_init():
    """At init the reference-view embedding adds nothing: with dense attention (where the index only
    reaches the embedding) every reference index gives the outputs of index 0, and with sparse attention
    the outputs are those of the bare UNet with the same attention (FaceLift's model). Training the
    embedding breaks the equality (so the test can fail)."""
    torch.manual_seed(0)
    dense = build_mv_unet("tiny", num_views=6, sparse=False).eval()
    noisy, t, pe, ref = mv_inputs(dense)
    out0 = dense(noisy, t, pe, torch.tensor([0, 0]), ref)
    for k in range(1, 6):
        assert torch.equal(dense(noisy, t, pe, torch.tensor([k, k]), ref), out0)
    torch.manual_seed(0)
    sparse = build_mv_unet("tiny", num_views=6, sparse=True).eval()
    idx = torch.tensor([4, 1])
    x = torch.cat([noisy, ref[:, None].expand(-1, 6, -1, -1, -1)], 2).flatten(0, 1)  # (B*V, C + Cr, H, W)
    bare = sparse.unet(x, t.repeat_interleave(6), pe.repeat(2, 1, 1),
                       cross_attention_kwargs={"ref_idx": idx}).sample
    assert torch.equal(sparse(noisy, t, pe, idx, ref).flatten(0, 1), bare)
    torch.nn.init.normal_(dense.ref_view_embed.weight)
    assert not torch.allclose(dense(noisy, t, pe, torch.tensor([3, 3]), ref), out0, atol=1e-4)


def test_facelift_layout_loads_exactly(tmp_path):
    unet = tiny_facelift_unet()
    save_facelift_layout(unet, tmp_path / "unet")
    model = load_mv_unet(tmp_path / "unet")  # no ref_view_embed file: starts at zero
    sd = unet.state_dict()
    assert set(model.unet.state_dict()) == set(sd)
    assert all(torch.equal(model.unet.state_dict()[k], v) for k, v in sd.items())
    assert model.n_mv_layers > 0 and not model.ref_view_embed.weight.any()
    noisy, t, pe, ref = mv_inputs(model, B=1)
    out = model(noisy, t[:1], pe, torch.tensor([0]), ref, class_labels=torch.randn(1, 12))
    assert out.shape == noisy.shape


def test_facelift_layout_errors_name_the_problem(tmp_path):
    save_facelift_layout(tiny_facelift_unet(), tmp_path / "unet")
    weights = tmp_path / "unet" / "diffusion_pytorch_model.safetensors"
    sd = load_file(weights)
    sd.pop("conv_in.weight")
    sd["view_embedding.weight"] = torch.zeros(3)
    save_file(sd, weights)
    with pytest.raises(KeyError, match=r"missing keys \['conv_in.weight'\].*"
                                       r"unexpected keys \['view_embedding.weight'\]"):
        load_mv_unet(tmp_path / "unet")
    config = tmp_path / "unet" / "config.json"
    cfg = {**json.loads(config.read_text()), "camera_embedding_type": "e_de_da_sincos"}
    config.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="camera_embedding_type"):
        load_mv_unet(tmp_path / "unet")


def test_min_snr_weights():
    a = torch.tensor([0.999, 0.5, 0.01, 0.0], dtype=torch.float64)  # SNR 999, 1, ~0.0101, 0
    snr = a / (1 - a)
    v = min_snr_weight(a, 5.0, "v_prediction")
    # the plain v loss (weight 1) up to SNR = 4, then 5 / (SNR + 1); weight 1 at pure noise, not 0
    assert torch.isfinite(v).all() and v.tolist() == pytest.approx([5 / 1000, 1.0, 1.0, 1.0])
    eps = min_snr_weight(a[:3], 5.0, "epsilon")
    assert eps.tolist() == pytest.approx([5 / 999, 1.0, 1.0])
    # x0 prediction: the same weight on the x0 error as the v loss puts there
    assert torch.allclose(min_snr_weight(a, 5.0, "sample"), v * (snr + 1))
    with pytest.raises(ValueError, match="prediction_type 'x0'"):
        min_snr_weight(a, 5.0, "x0")


@pytest.mark.parametrize("kind", ["sample", "v_prediction", "epsilon"])
def test_training_target_is_what_the_sampler_reads(kind):
    """The target the loop trains on, fed to the DDIM step as the model output, recovers x0 exactly."""
    torch.manual_seed(0)
    sched = DDIMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type=kind, clip_sample=False,
                          timestep_spacing="trailing")
    sched.set_timesteps(10)
    x0, noise = torch.rand(2, 3, 8, 8) * 2 - 1, torch.randn(2, 3, 8, 8)
    # pure noise (not for eps: x0 = (x - sqrt(1 - a) eps) / sqrt(a) divides by ~0), middle, nearly clean
    for t in sched.timesteps[[5, 9] if kind == "epsilon" else [0, 5, 9]]:
        noisy = sched.add_noise(x0, noise, t.expand(2))
        out = sched.step(diffusion_target(sched, x0, noise, t.expand(2)), t, noisy).pred_original_sample
        assert torch.allclose(out, x0, atol=1e-3), (kind, int(t))


def test_toy_prompt_embeds_and_checks(tmp_path):
    rig = load_rig("mouse_6view")
    pe = toy_rig_prompt_embeds(rig, 32)
    assert pe.shape == (6, 8, 32) and torch.equal(pe, toy_rig_prompt_embeds(rig, 32))
    assert min((pe[i] - pe[j]).abs().mean() for i in range(6) for j in range(i)) > 0.1  # views told apart
    other_rig = toy_rig_prompt_embeds(load_rig("facelift_6view"), 32)
    assert not torch.allclose(pe, other_rig)  # another rig, other embeddings
    save_prompt_embeds(tmp_path / "vitl.pt", torch.zeros(6, 77, 768), rig, rig["views"])
    with pytest.raises(ValueError, match="width 768.*cross-attention width is 1024"):
        load_prompt_embeds(tmp_path / "vitl.pt", rig, 1024)
    save_prompt_embeds(tmp_path / "four.pt", torch.zeros(4, 77, 1024), rig, rig["views"][:4])
    with pytest.raises(ValueError, match="embeddings for 4 views, rig 'mouse_6view' has 6"):
        load_prompt_embeds(tmp_path / "four.pt", rig, 1024)
    nan = torch.zeros(6, 77, 1024)
    nan[2, 5, 7] = float("nan")
    save_prompt_embeds(tmp_path / "nan.pt", nan, rig, rig["views"])
    with pytest.raises(ValueError, match=r"nan.pt: non-finite value at index \[2, 5, 7\]"):
        load_prompt_embeds(tmp_path / "nan.pt", rig, 1024)


def tiny_clip_text(tmp_path, dim=24):
    """A tiny CLIP text encoder and a character-level CLIP tokenizer, saved in the layout of an SD
    pipeline."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    chars = sorted(set("abcdefghijklmnopqrstuvwxyz0123456789+-,.3"))
    tokens = ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars]
    vocab = {t: i for i, t in enumerate(tokens)}
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "tokenizer" / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(tmp_path / "tokenizer" / "vocab.json"),
                        str(tmp_path / "tokenizer" / "merges.txt"), model_max_length=77)
    tok.save_pretrained(tmp_path / "tokenizer")
    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=dim, intermediate_size=48, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1)
    enc = CLIPTextModel(config)
    enc.save_pretrained(tmp_path / "text_encoder")
    return tok, enc


def test_clip_prompt_embeds_from_local_text_encoder(tmp_path):
    tok, enc = tiny_clip_text(tmp_path)
    prompts = rig_view_prompts(load_rig("mouse_6view"))
    pe = clip_prompt_embeds(prompts, tmp_path / "text_encoder")  # tokenizer/ beside text_encoder/
    assert pe.shape == (6, 77, 24)
    ids = tok(prompts[2], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(pe[2], enc(ids).last_hidden_state[0], atol=1e-6)
    assert not torch.allclose(pe[0], pe[1])  # the view names differ
    out = tmp_path / "clr_embeds.pt"
    data._main(["rig_prompt_embeds", "--rig=mouse_6view", f"--text_encoder={tmp_path / 'text_encoder'}",
                f"--out={out}"])
    saved, mismatch = load_prompt_embeds(out, load_rig("mouse_6view"), 24)
    assert torch.allclose(saved, pe) and mismatch is None
    assert torch.load(out, weights_only=True)["prompts"] == prompts  # the file records what it encodes


def test_sample_views_is_reproducible():
    torch.manual_seed(0)
    model = build_mv_unet("tiny").eval()
    _, _, pe, ref = mv_inputs(model, B=2)
    sched = DDIMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
                          timestep_spacing="trailing")

    def run(seed, g):
        return sample_views(model, sched, ref, torch.tensor([0, 5]), pe, (3, 16, 16), num_steps=3, guidance=g,
                            generator=torch.Generator().manual_seed(seed))

    a = run(0, 3.0)
    assert a.shape == (2, 6, 3, 16, 16) and torch.equal(a, run(0, 3.0))
    assert not torch.equal(a, run(1, 3.0)) and not torch.equal(a, run(0, 1.0))


def test_rig_mismatch_stops_with_the_message(tmp_path, tiny_cfg):
    data = write_toy_mice(tmp_path / "facelift_rig_mice", n=3, rig="facelift_6view", size=16, n_extra=0,
                          n_val=1, progress=False)
    with pytest.raises(ValueError, match=r"opencv_cameras.json: cameras do not match rig 'mouse_6view'"):
        train_mvdiff.main(tiny_cfg(train_mvdiff, data, tmp_path / "out"))


def test_default_toy_folder_must_hold_the_set_asked_for(tmp_path, monkeypatch):
    """An old toy set (other heading spread, size, ...) in the default folder is refused, not trained on."""
    monkeypatch.chdir(tmp_path)
    write_toy_mice("data/toy_mice_mv", n=3, size=16, n_extra=0, n_val=1, progress=False)  # any heading
    cfg = load_config(train_mvdiff.Config, ["--preset=tiny", "--image_size=16", "--max_steps=0"])
    with pytest.raises(ValueError, match=r"data/toy_mice_mv holds another toy set .*'yaw_deg': None.* "
                                         r"than this run asks for .*'yaw_deg': 30.0.*delete it"):
        train_mvdiff.main(cfg)


def test_wrong_views_is_a_derangement_of_the_generated_views():
    ref = torch.tensor([0, 3, 5, 1])
    others = torch.arange(6)[None] != ref[:, None]  # (4, 6)
    wrong = train_mvdiff.wrong_views(others)
    for r, o, w in zip(ref, others, wrong):
        # a permutation of the generated views ...
        assert w[r] == r and sorted(w[o].tolist()) == torch.arange(6)[o].tolist()
        assert (w[o] != torch.arange(6)[o]).all()  # ... that moves every one of them


def test_train_checkpoint_reload_and_resume(tiny_mice, tmp_path, tiny_cfg, monkeypatch):
    model, ema = train_mvdiff.main(tiny_cfg(train_mvdiff, tiny_mice, tmp_path / "a"))
    ckpt = tmp_path / "a" / "checkpoint-4"
    assert (ckpt / "unet_ema").is_dir() and (ckpt / "prompt_embeds.pt").is_file()
    assert json.loads((ckpt / "rig.json").read_text())["name"] == "mouse_6view"
    assert (tmp_path / "a" / "val_000004_g3.png").is_file()
    logged = json.loads((tmp_path / "a" / "metrics.jsonl").read_text())  # one validation: one line
    assert logged["step"] == 4
    assert {"psnr_g1", "psnr_g1_wrong_view", "psnr_copy_ref", "ssim_g3"} <= set(logged)
    assert model.ref_view_embed.weight.abs().sum() > 0  # random reference views: the embedding trains
    for saved, live in ((ckpt / "unet", model), (ckpt / "unet_ema", ema)):
        reloaded = load_mv_unet(saved)
        pairs = zip(reloaded.state_dict().values(), live.state_dict().values())
        assert all(torch.equal(a, b) for a, b in pairs)
    # stop at 2, resume to 4: the same weights as the uninterrupted run
    train_mvdiff.main(tiny_cfg(train_mvdiff, tiny_mice, tmp_path / "b", max_steps=2))
    resumed, _ = train_mvdiff.main(tiny_cfg(train_mvdiff, tiny_mice, tmp_path / "b", resume="auto"))
    first = load_mv_unet(tmp_path / "b" / "checkpoint-2" / "unet").state_dict()
    # it trained on after resuming
    assert any(not torch.equal(first[k], v) for k, v in resumed.state_dict().items())
    for (k, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), k
    # init_from one of our checkpoints loads its unet/ (and with wandb on, the grids go there as pictures)
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = tiny_cfg(train_mvdiff, tiny_mice, tmp_path / "c", max_steps=0, init_from=ckpt, ema_decay=0,
                   wandb=True)
    init, _ = train_mvdiff.main(cfg)
    assert len(list((tmp_path / "c").glob("wandb/offline-run-*/files/media/images/val/grid_g*.png"))) == 2
    assert all(torch.equal(a, b) for a, b in zip(init.state_dict().values(), model.state_dict().values()))


def test_latent_mode_from_a_facelift_pipeline_folder(tiny_mice, tmp_path, tiny_cfg, write_vgg):
    """The real path on small weights: a pipeline folder with FaceLift's unet/ layout (8 input channels,
    projection class embedding), a VAE, a CLIP image encoder and SD 2.1-unclip's DDIM scheduler config;
    train with FaceLift's backgrounds, validate with LPIPS, checkpoint, and resume exactly."""
    pipe = write_facelift_pipeline(tmp_path / "pipeckpts")
    write_vgg(tmp_path / "vgg16.pth", "vgg16")
    heads = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) for k, c in enumerate((64, 128, 256, 512, 512))}
    torch.save(heads, tmp_path / "heads.pth")
    cfg = dict(image_size=32, init_from=pipe, pipeline_dir=pipe, max_steps=2, clip_sample=False,
               beta_schedule="scaled_linear", train_bg="three_choices", ema_decay=0,
               lpips_vgg16_path=tmp_path / "vgg16.pth", lpips_heads_path=tmp_path / "heads.pth")
    with pytest.raises(ValueError, match=r"predict 'v_prediction', this run trains 'sample'; "
                                         r"set --prediction_type=v_prediction"):
        train_mvdiff.main(tiny_cfg(train_mvdiff, tiny_mice, tmp_path / "wrong", **cfg))
    cfg = tiny_cfg(train_mvdiff, tiny_mice, tmp_path / "out", prediction_type="v_prediction", **cfg)
    model, _ = train_mvdiff.main(cfg)
    assert model.unet.config.in_channels == 8 and (tmp_path / "out" / "val_000002_g1.png").is_file()
    saved = json.loads((tmp_path / "out" / "checkpoint-2" / "unet" / "config.json").read_text())
    assert saved["_class_name"] == "UNet2DConditionModel"
    logged = json.loads((tmp_path / "out" / "metrics.jsonl").read_text())
    assert {"psnr_g1", "psnr_g1_all", "ssim_g3_all", "lpips_g1", "lpips_g1_all"} <= set(logged)
    # every draw (the VAE posterior samples included) is seeded by the step: 1 + 1 steps == 2 steps
    train_mvdiff.main(cfg_with(cfg, out_dir=tmp_path / "r", max_steps=1))
    resumed, _ = train_mvdiff.main(cfg_with(cfg, out_dir=tmp_path / "r", resume="auto"))
    for (k, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), k


def cfg_with(cfg, **kw):
    return dataclasses.replace(cfg, **{k: str(v) if isinstance(v, Path) else v for k, v in kw.items()})
