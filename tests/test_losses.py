import pytest
import torch

from losses import masked_psnr, psnr, ssim


def test_psnr_known_value_and_shape():
    x = torch.rand(2, 3, 3, 8, 8) * 0.8
    assert torch.allclose(psnr(x + 0.1, x), torch.full((2, 3), 20.0), atol=1e-3)  # MSE 0.01 -> 20 dB
    assert psnr(x, x).isfinite().all()


def test_masked_psnr_ignores_background():
    x = torch.rand(2, 3, 8, 8)
    mask = torch.zeros(2, 1, 8, 8)
    mask[..., 2:6, 2:6] = 1
    y = x + (1 - mask) * 0.5  # errors only in the background
    assert (masked_psnr(y, x, mask) > 60).all() and (psnr(y, x) < 10).all()
    assert masked_psnr(y, x, torch.zeros_like(mask)).isfinite().all()


def test_ssim_basic():
    x = torch.rand(4, 3, 32, 32)
    assert torch.allclose(ssim(x, x), torch.ones(4), atol=1e-5)
    noisy = [ssim((x + s * torch.randn_like(x)).clamp(0, 1), x).mean() for s in (0.05, 0.2)]
    assert 1 > noisy[0] > noisy[1]
    assert ssim(x[None], x[None]).shape == (1, 4)
    y = x.clone().requires_grad_()
    ssim(y, x.flip(-1)).sum().backward()
    assert y.grad.isfinite().all() and y.grad.abs().sum() > 0


def test_ssim_matches_pytorch_msssim():
    import pytorch_msssim as pm  # installed by requirements-test.txt: this oracle must run, not skip
    x, y = torch.rand(3, 3, 32, 32), torch.rand(3, 3, 32, 32)
    y = 0.5 * x + 0.5 * y
    assert torch.allclose(ssim(x, y), pm.ssim(x, y, data_range=1.0, size_average=False), atol=1e-5)


# ---- VGG loading and LPIPS: random VGG weights saved in torchvision's layout by the test
# (the perceptual loss itself: test_perceptual.py)


def test_load_vgg_takes_torchvision_keys_and_rejects_others(tmp_path, write_vgg):
    from weights import load_vgg
    sd = write_vgg(tmp_path / "vgg19.pth", "vgg19")
    vgg = load_vgg(tmp_path / "vgg19.pth", "vgg19")
    for k, v in vgg.state_dict().items():
        assert torch.equal(v, sd[k]), k
    assert not any(p.requires_grad for p in vgg.parameters())
    sd.pop("features.30.weight")
    sd["features.foo"] = torch.zeros(1)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(KeyError, match=r"missing keys \['features.30.weight'\], "
                                       r"unexpected keys \['features.foo'\]"):
        load_vgg(tmp_path / "bad.pth", "vgg19")


def test_lpips_is_a_distance_that_grows_with_the_error(tmp_path, write_vgg):
    from losses import lpips
    from weights import load_lpips_heads, load_vgg
    write_vgg(tmp_path / "vgg16.pth", "vgg16")
    heads = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) for k, c in enumerate((64, 128, 256, 512, 512))}
    torch.save(heads, tmp_path / "vgg.pth")  # the lpips package's head file layout
    vgg, heads = load_vgg(tmp_path / "vgg16.pth", "vgg16"), load_lpips_heads(tmp_path / "vgg.pth")
    x = torch.rand(4, 3, 32, 32)
    d = [lpips(vgg, heads, (x + s * torch.randn_like(x)).clamp(0, 1), x) for s in (0.0, 0.05, 0.2)]
    assert d[0].shape == (4,) and torch.all(d[0] == 0)
    assert torch.all(d[1] > 0) and torch.all(d[2] > d[1])
    y = torch.rand(4, 3, 32, 32)
    assert torch.allclose(lpips(vgg, heads, x, y), lpips(vgg, heads, y, x))
    torch.save({"lin0.model.1.weight": torch.zeros(1, 64, 1, 1)}, tmp_path / "short.pth")
    with pytest.raises(KeyError, match="LPIPS vgg heads"):
        load_lpips_heads(tmp_path / "short.pth")
