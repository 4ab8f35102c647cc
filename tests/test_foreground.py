"""Small animals: the toy's mouse_scale / off_aim, the foreground-weighted losses of phases 1 and 3
(fg_weight) and phase 2's alpha from the source's masks."""
import hashlib
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import gen_synthetic
import train_gslrm
import train_mvdiff
from data import read_list_file
from losses import foreground_weight, perceptual_loss, weighted_mse
from plumbing import ConfigError, InputError, load_config
from toy import toy_mice, toy_mouse, write_toy_mice
from weights import load_vgg


def rig_alpha(out, V=6):
    """Every written mouse's rig views' alpha (N * V, H, W) in [0, 1]."""
    return np.stack([np.asarray(Image.open(d / f"images/cam_{v:03d}.png"))[..., 3] / 255.0
                     for d in read_list_file(out / "data_train.txt") + read_list_file(out / "data_val.txt")
                     for v in range(V)])


def test_default_toy_mice_unchanged():
    # the arrays of seeds (0, 0..2) as toy_mouse made them before mouse_scale / off_aim existed
    h = hashlib.sha256()
    for i in range(3):
        m = toy_mouse(np.random.default_rng((0, i)))
        for k in sorted(m):
            h.update(np.ascontiguousarray(m[k]).tobytes())
    assert h.hexdigest() == "bc98f432eeffbb4c99ac2f5742ad40da8bb002d8f0b6637772cdf0a39cea1baf"


def test_mouse_scale_is_the_same_mouse_smaller():
    big, small = (toy_mouse(np.random.default_rng((0, 3)), None, s) for s in (1.0, 0.7))
    assert np.allclose(small["means"], big["means"] * 0.7) and np.allclose(small["scales"], big["scales"] * 0.7)
    assert np.array_equal(small["colors"], big["colors"])  # no draw moved


def test_small_mice_cover_5_to_10_percent(tmp_path):
    # 0.7 covers 7.1 % of the rig's views (40 mice at 64 px); the default mouse 14 %
    out = write_toy_mice(tmp_path / "small", n=8, size=32, n_extra=0, n_val=1, mouse_scale=0.7, progress=False)
    assert 0.05 < rig_alpha(out).mean() < 0.10


def test_off_aim_moves_the_mouse_not_the_draws(tmp_path):
    a = write_toy_mice(tmp_path / "a", n=3, size=16, n_extra=2, n_val=1, progress=False)
    b = write_toy_mice(tmp_path / "b", n=3, size=16, n_extra=2, n_val=1, off_aim=1.2, progress=False)
    for i in range(3):
        fa, fb = (json.loads((d / f"mouse_{i:05d}/opencv_cameras.json").read_text())["frames"] for d in (a, b))
        assert [f["w2c"] for f in fa[:6]] == [f["w2c"] for f in fb[:6]]  # the rig stays
        # the extra views orbit the mouse: same draws, shifted by its horizontal offset
        ca, cb = (np.linalg.inv(np.array(f[6]["w2c"]))[:3, 3] for f in (fa, fb))
        shift = cb - ca
        assert abs(shift[2]) < 1e-5 and 0 < np.linalg.norm(shift[:2]) <= 1.2 + 1e-5
    # toy.json: the defaults are not written (older folders still match), others are
    assert "off_aim" not in json.loads((a / "toy.json").read_text())
    assert json.loads((b / "toy.json").read_text())["off_aim"] == 1.2
    toy_mice(a, n=3, size=16, n_extra=2, n_val=1, mouse_scale=1.0, off_aim=0.0)  # the same set
    with pytest.raises(InputError, match="holds another toy set"):
        toy_mice(a, n=3, size=16, n_extra=2, n_val=1, mouse_scale=0.7)


def blob_alpha(N=2, S=32):
    alpha = torch.zeros(N, 1, S, S)  # (N, 1, H, W)
    alpha[..., 12:20, 10:18] = 1.0
    return alpha


def test_foreground_weight_mean_one_and_dilated():
    w = foreground_weight(blob_alpha(), 10.0)
    assert torch.allclose(w.mean((-2, -1)), torch.ones(2, 1))
    assert w[0, 0, 11, 10] == w[0, 0, 12, 10] > w[0, 0, 10, 10] == w[0, 0, 0, 0]  # one pixel of ring


def errors_on(alpha, where, S=32):
    """A target, and a prediction wrong by 0.3 on a 3x3 patch inside (fg) or outside (bg) the blob."""
    target = torch.rand(alpha.shape[0], 3, S, S, generator=torch.Generator().manual_seed(0))
    pred = target.clone()
    y, x = (15, 13) if where == "fg" else (26, 26)
    pred[..., y:y + 3, x:x + 3] += 0.3
    return pred, target


def test_foreground_error_costs_more_mse_and_perceptual(write_vgg, tmp_path):
    alpha = blob_alpha()
    w = foreground_weight(alpha, 10.0)
    fg, bg = errors_on(alpha, "fg"), errors_on(alpha, "bg")
    ones = torch.ones(2)
    assert weighted_mse(*fg, ones) == weighted_mse(*bg, ones)  # unweighted: the same cost
    assert weighted_mse(*fg, ones, w) > 5 * weighted_mse(*bg, ones, w)
    write_vgg(tmp_path / "vgg19.pth", "vgg19")
    vgg = load_vgg(tmp_path / "vgg19.pth", "vgg19")
    plain = perceptual_loss(vgg, *fg) / perceptual_loss(vgg, *bg)
    weighted = perceptual_loss(vgg, *fg, w) / perceptual_loss(vgg, *bg, w)
    assert weighted > 1.3 * plain  # deep features see the whole 32 px image: less than the MSE
    # all-ones weights: the unweighted loss
    assert torch.allclose(perceptual_loss(vgg, *fg, torch.ones_like(alpha)), perceptual_loss(vgg, *fg),
                          rtol=1e-6, atol=0)


@pytest.mark.parametrize("script", [train_gslrm, train_mvdiff])
def test_fg_weight_trains_and_negative_is_refused(script, tiny_cfg, tiny_mice, tmp_path):
    with pytest.raises(ConfigError, match="fg_weight"):
        script.main(tiny_cfg(script, tiny_mice, tmp_path / "neg", fg_weight=-1))
    out = script.main(tiny_cfg(script, tiny_mice, tmp_path / "fg", fg_weight=5, max_steps=2))
    model = out[0] if isinstance(out, tuple) else out
    assert all(torch.isfinite(p).all() for p in model.parameters())


def gen_cfg(ckpt, list_file, out, **kw):
    args = [f"--mvdiff_checkpoint={ckpt}", f"--input_data={list_file}", f"--output_dir={out}", "--steps=2",
            "--max_sources=1", "--augment_all_views=false"]
    return load_config(gen_synthetic.Config, args + [f"--{k}={v}" for k, v in kw.items()])


def test_gen_synthetic_alpha_from_the_source_mask(tiny_mv_ckpt, tiny_mice, tmp_path):
    src = read_list_file(tiny_mice / "data_train.txt")[0]
    masked = gen_synthetic.main(gen_cfg(tiny_mv_ckpt, tiny_mice / "data_train.txt", tmp_path / "src"))
    white = gen_synthetic.main(gen_cfg(tiny_mv_ckpt, tiny_mice / "data_train.txt", tmp_path / "white",
                                       alpha_from="white"))
    assert json.loads((masked / "sample_000000/metadata.json").read_text())["alpha_from"] == "source"
    assert json.loads((white / "sample_000000/metadata.json").read_text())["alpha_from"] == "white"
    for v in range(6):  # the same size (16 px): the source's alpha exactly
        a = np.asarray(Image.open(masked / f"sample_000000/images/cam_{v:03d}.png"))  # (S, S, 4)
        b = np.asarray(Image.open(white / f"sample_000000/images/cam_{v:03d}.png"))
        assert np.array_equal(a[..., 3], np.asarray(Image.open(src / f"images/cam_{v:03d}.png"))[..., 3])
        both = (a[..., 3] == 255) & (b[..., 3] == 255)  # opaque in both: the same generated colour
        assert both.any() and np.array_equal(a[both, :3], b[both, :3])
    # a source without masks (RGB files): alpha from whiteness, and recorded so
    rgb = tmp_path / "rgb" / src.name
    shutil.copytree(src, rgb)
    for png in (rgb / "images").glob("*.png"):
        im = Image.open(png)
        Image.alpha_composite(Image.new("RGBA", im.size, "white"), im).convert("RGB").save(png)
    (tmp_path / "rgb" / "list.txt").write_text(f"{src.name}\n")
    out = gen_synthetic.main(gen_cfg(tiny_mv_ckpt, tmp_path / "rgb" / "list.txt", tmp_path / "from_rgb"))
    assert json.loads((out / "sample_000000/metadata.json").read_text())["alpha_from"] == "white"
    with pytest.raises(ConfigError, match="alpha_from"):
        gen_synthetic.main(gen_cfg(tiny_mv_ckpt, tiny_mice / "data_train.txt", tmp_path / "x", alpha_from="mask"))
