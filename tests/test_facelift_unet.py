"""FaceLift's unet/config.json extra keys: the view count and attention it describes are built, a
feature MVUNet lacks is refused by name, and our own unet/ folders (no FaceLift keys) still load."""
import copy
import json

import pytest
import torch
from conftest import save_facelift_layout, tiny_facelift_unet

from models import MVAttnProcessor, MVUNet
from weights import load_mv_unet, save_mv_unet


def run(model, seed=0):
    c = model.unet.config
    g = torch.Generator().manual_seed(seed)
    V, S = model.num_views, c.sample_size
    noisy = torch.randn(2, V, c.out_channels, S, S, generator=g)  # (B, V, C, H, W)
    pe = torch.randn(V, 8, c.cross_attention_dim, generator=g)  # (V, T, D)
    ref = torch.randn(2, c.in_channels - c.out_channels, S, S, generator=g)  # (B, Cr, H, W)
    labels = torch.randn(2, 12, generator=g)
    with torch.no_grad():
        return model(noisy, torch.tensor([500, 20]), pe, torch.tensor([0, 0]), ref, class_labels=labels)


def mv_processors(model):
    procs = [p for name, p in model.unet.attn_processors.items() if ".attn1." in name]
    assert procs and all(isinstance(p, MVAttnProcessor) for p in procs)
    return procs


def test_default_config_loads_as_released(tmp_path):
    """6 views, sparse: the same model (weights and outputs) as MVUNet(unet, 6, sparse=True)."""
    unet = tiny_facelift_unet()
    path = save_facelift_layout(unet, tmp_path / "unet")
    for args in ((), (6,), (6, True)):
        model = load_mv_unet(path, *args).eval()
        assert model.num_views == 6 and model.sparse
        assert all(p.num_views == 6 and p.sparse for p in mv_processors(model))
        assert torch.equal(run(model), run(MVUNet(copy.deepcopy(unet), 6, True).eval()))


def test_num_views_is_built_and_must_match_the_rig(tmp_path):
    path = save_facelift_layout(tiny_facelift_unet(), tmp_path / "unet", num_views=4)
    model = load_mv_unet(path, 4).eval()
    assert model.num_views == 4 and model.ref_view_embed.num_embeddings == 4
    assert all(p.num_views == 4 for p in mv_processors(model))
    assert run(model).shape[1] == 4
    assert load_mv_unet(path).num_views == 4  # None: the folder's
    with pytest.raises(ValueError, match=r"unet/config.json: num_views=4, but the rig has 6 views"):
        load_mv_unet(path, 6)


def test_dense_attention_is_built(tmp_path):
    unet = tiny_facelift_unet()
    dense = load_mv_unet(save_facelift_layout(unet, tmp_path / "d", sparse_mv_attention=False), 6, False)
    sparse = load_mv_unet(save_facelift_layout(unet, tmp_path / "s"), 6, True)
    assert not dense.sparse and all(not p.sparse for p in mv_processors(dense))
    assert all(p.sparse for p in mv_processors(sparse))
    assert not load_mv_unet(tmp_path / "d").sparse  # None: the folder's
    assert not torch.allclose(run(dense.eval()), run(sparse.eval()), atol=1e-4)
    # an explicit request that contradicts the folder is refused, naming the key
    with pytest.raises(ValueError, match=r"sparse_mv_attention=False, but sparse=True.*"
                                         r"--sparse_attention=false"):
        load_mv_unet(tmp_path / "d", 6, True)
    with pytest.raises(ValueError, match=r"sparse_mv_attention=True, but sparse=False"):
        load_mv_unet(tmp_path / "s", 6, False)


@pytest.mark.parametrize("key, value", [("cd_attention_mid", True), ("cd_attention_last", True),
                                        ("addition_downsample", True), ("selfattn_block", "self_rowwise"),
                                        ("multiview_attention", False)])
def test_unsupported_feature_is_refused_by_name(tmp_path, key, value):
    path = save_facelift_layout(tiny_facelift_unet(), tmp_path / "unet", **{key: value})
    with pytest.raises(ValueError, match=rf"{key}={value!r} asks for .* MVUNet does not implement"):
        load_mv_unet(path, 6)


def test_facelift_config_without_view_count_is_refused(tmp_path):
    path = save_facelift_layout(tiny_facelift_unet(), tmp_path / "unet")
    cfg = json.loads((path / "config.json").read_text())
    del cfg["num_views"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"no \['num_views'\]"):
        load_mv_unet(path)


def test_our_folders_load_without_facelift_keys(tmp_path):
    """Ours: the view count from the reference-view embedding, the attention from the caller."""
    torch.manual_seed(0)
    model = MVUNet(tiny_facelift_unet(), 4, sparse=False)
    torch.nn.init.normal_(model.ref_view_embed.weight)
    save_mv_unet(model, tmp_path / "unet")
    assert "num_views" not in json.loads((tmp_path / "unet" / "config.json").read_text())
    for args, sparse in (((), True), ((4, False), False)):
        loaded = load_mv_unet(tmp_path / "unet", *args)
        assert loaded.num_views == 4 and loaded.sparse == sparse
        pairs = zip(loaded.state_dict().values(), model.state_dict().values())
        assert all(torch.equal(a, b) for a, b in pairs)
    with pytest.raises(ValueError, match=r"shape \(4, .*\(6 views\)"):
        load_mv_unet(tmp_path / "unet", 6)
    # FaceLift's keys in a plain diffusers config would be ignored by diffusers: refused
    cfg = {**json.loads((tmp_path / "unet" / "config.json").read_text()), "num_views": 4}
    (tmp_path / "unet" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"FaceLift's keys \['num_views'\] in a UNet2DConditionModel"):
        load_mv_unet(tmp_path / "unet")
