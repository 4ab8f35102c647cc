"""FaceLift's perceptual loss (gslrm/model/utils_losses.py): MatConvNet's VGG19 `.mat` with average
pooling and caffe-style input; torchvision's `.pth` with max pooling and its own normalisation.
Every `.mat` here is written by the test in MatConvNet's layout (scipy.io.savemat), random weights."""
import re

import numpy as np
import pytest
import scipy.io
import torch
import torch.nn.functional as F
from conftest import MAT_CONVS, write_mat

from losses import perceptual_loss
from weights import load_vgg

# FaceLift's loss, written out: 16 conv layers of imagenet-vgg-verydeep-19.mat, features after
# relu1_2, relu2_2, relu3_2, relu4_2, relu5_2 (convs 2, 4, 6, 10, 14), 2x2 average pools after
# convs 2, 4, 8, 12; input RGB x255 minus the mean pixel; weights [image, 5 features]; sum / 255
TAPS, POOLS = (2, 4, 6, 10, 14), (2, 4, 8, 12)
WEIGHTS = [1.0, 1 / 2.6, 1 / 4.8, 1 / 3.7, 1 / 5.6, 10 / 1.5]
MEAN_PIXEL = torch.tensor([123.68, 116.779, 103.939])[:, None, None]


def facelift_loss(convs, pred, target):
    """The oracle: FaceLift's loss from the raw MatConvNet arrays, plain F.conv2d / relu / avg_pool."""
    wb = [(torch.from_numpy(convs[i][0]).permute(3, 2, 0, 1).to(pred.dtype),
           torch.from_numpy(convs[i][1]).flatten().to(pred.dtype)) for i in MAT_CONVS]

    def features(x):
        out = []
        for k, (w, b) in enumerate(wb[:14], 1):
            x = F.relu(F.conv2d(x, w, b, padding=1))
            if k in TAPS:
                out.append(x)
            if k in POOLS:
                x = F.avg_pool2d(x, 2)
        return out

    x, y = pred * 255 - MEAN_PIXEL.to(pred), target * 255 - MEAN_PIXEL.to(pred)
    loss = WEIGHTS[0] * (x - y).abs().mean()
    for w, a, b in zip(WEIGHTS[1:], features(x), features(y)):
        loss = loss + w * (a - b).abs().mean()
    return loss / 255


def test_load_matconvnet_vgg19_gives_its_weights_exactly(vgg19_mat):
    path, convs = vgg19_mat
    raw = scipy.io.loadmat(path)["layers"][0]
    # FaceLift reads conv i as layers[i][0][0][2][0][0] (W) and [0][1] (b)
    w, b = raw[5][0][0][2][0][0], raw[5][0][0][2][0][1]
    assert np.array_equal(w, convs[5][0]) and np.array_equal(b, convs[5][1])
    vgg = load_vgg(path, "vgg19")
    assert vgg.preprocess == "caffe"
    sd = vgg.state_dict()
    assert sorted({int(k.split(".")[1]) for k in sd}) == MAT_CONVS[:14]  # up to conv5_2 (relu5_2)
    for i in MAT_CONVS[:14]:
        w, b = convs[i]
        assert torch.equal(sd[f"features.{i}.weight"], torch.from_numpy(w).permute(3, 2, 0, 1)), i
        assert torch.equal(sd[f"features.{i}.bias"], torch.from_numpy(b).flatten()), i
    pools = [m for m in vgg.features if "Pool" in type(m).__name__]
    assert len(pools) == 4 and all(isinstance(m, torch.nn.AvgPool2d) for m in pools)
    assert not any(p.requires_grad for p in vgg.parameters())


def test_perceptual_loss_with_mat_is_facelifts_loss(vgg19_mat):
    path, convs = vgg19_mat
    vgg = load_vgg(path, "vgg19")
    g = torch.Generator().manual_seed(0)
    pred = torch.rand(2, 3, 16, 16, generator=g, requires_grad=True)  # relu5_2 at 1x1
    target = torch.rand(2, 3, 16, 16, generator=g)
    loss = perceptual_loss(vgg, pred, target)
    ref = facelift_loss(convs, pred.detach(), target)
    assert torch.allclose(loss, ref, rtol=1e-6, atol=0), (loss.item(), ref.item())
    assert perceptual_loss(vgg, target, target).item() == 0.0
    loss.backward()
    assert pred.grad.abs().sum() > 0


@pytest.mark.parametrize("how, where", [
    ({"drop": (21,)}, "layer 21 of 43 is not a conv layer"),  # conv4_2 without weights
    ({"shapes": {10: (3, 3, 128, 255)}}, r"layer 10 has W \(3, 3, 128, 255\)"),  # conv3_1
    ({"n_layers": 20}, "layer 21 of 20 is not a conv layer"),  # cut before conv4_2
])
def test_mat_with_a_missing_or_wrong_layer_names_the_file(tmp_path, how, where):
    path = tmp_path / "broken-vgg19.mat"
    write_mat(path, **how)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*" + where):
        load_vgg(path, "vgg19")


def test_mat_without_layers_or_for_vgg16_is_refused(tmp_path, vgg19_mat):
    scipy.io.savemat(tmp_path / "other.mat", {"net": np.zeros(3)})
    with pytest.raises(KeyError, match=re.escape(str(tmp_path / "other.mat")) + ".*no `layers`"):
        load_vgg(tmp_path / "other.mat", "vgg19")
    with pytest.raises(ValueError, match="vgg19 only"):  # LPIPS needs torchvision's vgg16
        load_vgg(vgg19_mat[0], "vgg16")


def test_perceptual_loss_with_pth_uses_torchvision_normalisation(tmp_path, write_vgg):
    """torchvision's vgg19: max pools, (x - mean) / std on the input and on the image L1 term; 0 for
    identical images, a gradient for the prediction."""
    sd = write_vgg(tmp_path / "vgg19.pth", "vgg19", seed=3)
    vgg = load_vgg(tmp_path / "vgg19.pth", "vgg19")
    assert vgg.preprocess == "torchvision"
    assert all(isinstance(m, torch.nn.MaxPool2d) for m in vgg.features if "Pool" in type(m).__name__)
    g = torch.Generator().manual_seed(1)
    pred = torch.rand(2, 3, 16, 16, generator=g, requires_grad=True)
    target = torch.rand(2, 3, 16, 16, generator=g)
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]

    def features(x):  # torchvision indices: conv i, relu i + 1, pools at 4, 9, 18, 27
        out = []
        for k, i in enumerate(MAT_CONVS[:14], 1):
            x = F.relu(F.conv2d(x, sd[f"features.{i}.weight"], sd[f"features.{i}.bias"], padding=1))
            if k in TAPS:
                out.append(x)
            if k in POOLS:
                x = F.max_pool2d(x, 2)
        return out

    x, y = (pred.detach() - mean) / std, (target - mean) / std
    ref = WEIGHTS[0] * (x - y).abs().mean()
    for w, a, b in zip(WEIGHTS[1:], features(x), features(y)):
        ref = ref + w * (a - b).abs().mean()
    loss = perceptual_loss(vgg, pred, target)
    assert torch.allclose(loss, ref / 255, rtol=1e-6, atol=0)
    assert perceptual_loss(vgg, target, target).item() == 0.0
    loss.backward()
    assert pred.grad.abs().sum() > 0
