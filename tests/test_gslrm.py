"""GS-LRM: shapes and FaceLift's activations, the checkpoint converter, deferred rendering,
and the training script (runs, resumes exactly, DDP gradients)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import fabricate_facelift_ckpt
from safetensors.torch import load_file

import train_gslrm
from cameras import frames_to_tensors, load_rig
from data import load_ply
from models import GSLRM, GSLRM_CONFIGS, get_rays
from toy import write_toy_mice
from weights import facelift_gslrm_key_map, load_facelift_gslrm

TINY = GSLRM_CONFIGS["tiny"]


def rig_batch(B=2, S=16, seed=0):
    w2c, K = frames_to_tensors(load_rig("mouse_6view")["frames"], S)
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(B, 6, 3, S, S, generator=g)  # (B, V, 3, S, S)
    return images, torch.linalg.inv(w2c).expand(B, -1, -1, -1), K.expand(B, -1, -1)


def test_forward_shapes_and_pixel_alignment():
    torch.manual_seed(0)
    model = GSLRM(**TINY)
    img, c2w, K = rig_batch()
    g = model(img, c2w, K)
    N = 6 * 16 * 16 + 2
    assert g["means"].shape == (2, N, 3) and g["quats"].shape == (2, N, 4) and g["opacities"].shape == (2, N)
    o, d = get_rays(c2w, K, 16, 16)  # (B, V, H, W, 3)
    rel = g["means"][:, 2:] - o.flatten(1, 3)
    t = (rel * d.flatten(1, 3)).sum(-1)  # distance along each pixel's ray
    assert torch.allclose(rel, t[..., None] * d.flatten(1, 3), atol=1e-4)  # on its own pixel's ray
    t_mid = -(o * d).sum(-1).flatten(1)
    assert ((t - t_mid).abs() <= 1.8 + 1e-4).all()
    assert (g["scales"] <= torch.exp(torch.tensor(-1.2)) + 1e-6).all()
    assert torch.allclose(g["quats"].norm(dim=-1), torch.ones(2, N))


def test_facelift_converter(tmp_path):
    sd = fabricate_facelift_ckpt(tmp_path / "ckpt_0000000000021125.pt")
    model = GSLRM(**TINY)
    load_facelift_gslrm(model, tmp_path / "ckpt_0000000000021125.pt")
    ours = model.state_dict()
    kmap = facelift_gslrm_key_map(2)
    assert set(kmap.values()) == set(ours)  # the map covers every parameter of ours
    for k, v in kmap.items():
        assert torch.equal(ours[v], sd[k]), k


@pytest.mark.parametrize("kw, error, match", [
    (dict(drop="transformer_layers.1.attn.fc.weight"), KeyError,
     r"missing keys \['transformer_layers.1.attn.fc.weight'\]"),
    (dict(extra="view_type_embeddings"), KeyError, r"unexpected keys \['view_type_embeddings'\]"),
    (dict(layers=3), KeyError, r"unexpected keys \['transformer_layers.2"),
    (dict(bad_shape="input_layer_norm.weight"), ValueError, r"input_layer_norm.weight has shape \(3, 3\)"),
])
def test_facelift_converter_fails_clearly(tmp_path, kw, error, match):
    fabricate_facelift_ckpt(tmp_path / "c.pt", **kw)
    with pytest.raises(error, match=match):
        load_facelift_gslrm(GSLRM(**TINY), tmp_path / "c.pt")


def grads_of(model, deferred):
    torch.manual_seed(0)
    model.zero_grad()
    model.deferred_render = deferred
    img, c2w, K = rig_batch()
    out = model.render(model(img, c2w, K), c2w[:, :3], K[:, :3], 16, 16)  # (B, 3 views, RGB + alpha, H, W)
    (out * torch.linspace(0, 1, 16)).sum().backward()  # through both colour and alpha
    return out.detach(), [p.grad.clone() for p in model.parameters()]


def test_deferred_render_and_checkpointing_match_plain():
    torch.manual_seed(0)
    model = GSLRM(**TINY)
    out, ref = grads_of(model, deferred=False)
    out2, deferred = grads_of(model, deferred=True)
    model.grad_checkpoint = True
    _, ckpt = grads_of(model, deferred=False)
    assert torch.allclose(out, out2)
    for a, b, c in zip(ref, deferred, ckpt):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-3) and torch.allclose(a, c, atol=1e-4, rtol=1e-3)


def test_lr_schedule_is_a_function_of_the_step():
    cfg = train_gslrm.Config(lr=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert train_gslrm.lr_at(0, cfg) == pytest.approx(0.1) and train_gslrm.lr_at(9, cfg) == pytest.approx(1.0)
    assert train_gslrm.lr_at(60, cfg) == pytest.approx(0.55)
    assert train_gslrm.lr_at(110, cfg) == pytest.approx(0.1)


def test_train_runs_and_resume_continues_exactly(tiny_mice, tmp_path, tiny_cfg):
    train_gslrm.main(tiny_cfg(train_gslrm, tiny_mice, tmp_path / "a"))
    full = load_file(tmp_path / "a" / "checkpoint-6" / "model.safetensors")
    assert (tmp_path / "a" / "val_000006.png").exists() and (tmp_path / "a" / "checkpoint-3").exists()
    logged = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged] == [0, 6] and {"psnr", "psnr_mean_image", "ssim"} <= set(logged[-1])
    train_gslrm.main(tiny_cfg(train_gslrm, tiny_mice, tmp_path / "b", max_steps=3))
    train_gslrm.main(tiny_cfg(train_gslrm, tiny_mice, tmp_path / "b", resume="auto"))
    resumed = load_file(tmp_path / "b" / "checkpoint-6" / "model.safetensors")
    first = load_file(tmp_path / "b" / "checkpoint-3" / "model.safetensors")
    assert any(not torch.equal(first[k], resumed[k]) for k in full)  # it trained on after resuming
    for k in full:
        assert torch.allclose(full[k], resumed[k], atol=1e-6), k


def test_four_of_six_inputs_held_out_views_and_wandb_grids(tmp_path, tiny_cfg, monkeypatch):
    """6-view samples (the synthetic layout): 4 rig views drawn as inputs, the other 2 held out and
    scored, all 6 fed in and reconstructed; with wandb on (offline) the grid is logged as an image."""
    data = write_toy_mice(tmp_path / "six", n=4, size=16, n_extra=0, n_val=2, progress=False)
    ds = train_gslrm.MultiViewDataset(data / "data_train.txt", 16, range(6), 2, load_rig("mouse_6view"),
                                      num_inputs=4)
    picks = [ds[0, e]["views"].tolist() for e in range(4)]
    assert all(sorted(p) == list(range(6)) and p[:4] == sorted(p[:4]) for p in picks)  # 4 in, 2 out
    assert len({tuple(p[:4]) for p in picks}) > 1  # another draw per epoch
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = tiny_cfg(train_gslrm, data, tmp_path / "out", max_steps=2, num_input_views=4, num_novel_views=2,
                   num_input_views_supervised=4, wandb=True)
    train_gslrm.main(cfg)
    logged = json.loads((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"psnr", "psnr_mean_image", "recon_psnr"} <= set(logged)
    assert list((tmp_path / "out").glob("wandb/offline-run-*/files/media/images/val/grid_*.png"))


def test_init_from_facelift_checkpoint(tiny_mice, tmp_path, tiny_cfg):
    sd = fabricate_facelift_ckpt(tmp_path / "ckpt.pt")
    cfg = tiny_cfg(train_gslrm, tiny_mice, tmp_path / "c", max_steps=0, init_from=tmp_path / "ckpt.pt")
    model = train_gslrm.main(cfg)
    assert torch.equal(model.patch_embed.weight, sd["patch_embedder.1.weight"])


def test_ddp_gradients_equal_single_process_on_the_doubled_batch(tiny_mice, tmp_path, tiny_cfg):
    worker, repo = Path(__file__).parent / "ddp_grad_worker.py", Path(__file__).parent.parent
    env = dict(os.environ, PYTHONPATH=str(repo))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker),
           str(tiny_mice), str(tmp_path / "ddp.pt")]
    subprocess.run(cmd, check=True, timeout=300, env=env)
    cmd = [sys.executable, str(worker), str(tiny_mice), str(tmp_path / "single.pt")]
    subprocess.run(cmd, check=True, timeout=300, env=env)
    ddp, single = torch.load(tmp_path / "ddp.pt"), torch.load(tmp_path / "single.pt")
    assert ddp["world"] == 2 and single["world"] == 1
    rank0, rank1 = ddp["all_samples"]  # each rank's share of the global batch
    assert rank0 == ddp["samples"] and len(rank0) == len(rank1) == 2
    assert not set(rank0) & set(rank1)  # no sample drawn by both ranks
    assert sorted(rank0 + rank1) == sorted(single["samples"])  # together: the single process's batch
    for a, b in zip(ddp["grads"], single["grads"]):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)


def test_train_with_perceptual_loss_lpips_and_ply_export(tiny_mice, tmp_path, capsys, tiny_cfg, write_vgg):
    write_vgg(tmp_path / "vgg19.pth", "vgg19")
    write_vgg(tmp_path / "vgg16.pth", "vgg16")
    heads = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) for k, c in enumerate((64, 128, 256, 512, 512))}
    torch.save(heads, tmp_path / "heads.pth")
    cfg = tiny_cfg(train_gslrm, tiny_mice, tmp_path / "p", max_steps=3, l2_warmup_steps=1,
                   vgg19_path=tmp_path / "vgg19.pth", lpips_vgg16_path=tmp_path / "vgg16.pth",
                   lpips_heads_path=tmp_path / "heads.pth")
    train_gslrm.main(cfg)
    log = capsys.readouterr().out
    # MSE only during l2_warmup_steps
    assert "step 0 | loss" in log and " perc " not in log.split("step 1 |")[0]
    assert " perc " in log.split("step 1 |")[1] and "| lpips " in log
    g = load_ply(tmp_path / "p" / "val_000003.ply")
    assert g["means"].shape == (6 * 16 * 16 + 2, 3) and torch.all((g["opacities"] > 0) & (g["opacities"] < 1))
