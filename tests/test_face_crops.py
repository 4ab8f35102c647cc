"""Face crops for identity: aligned by 5 face points to ArcFace's template (insightface's norm_crop) where a
pose has face points, the face box where it has not."""
import math

import numpy as np
import pytest
import torch

from data import ARCFACE_112, FACE, aligned_face_crop, crop_box, face_crops, face_points5, similarity_transform

POINTS = 0.3 + (torch.tensor(ARCFACE_112, dtype=torch.float64) + 0.5) / 112 * 0.4  # (5, 2): a face in the middle


def face_image(size=256, blobs=POINTS, to_upright=lambda p: p):
    """A smooth synthetic face (3, size, size): colour waves and a bright spot at each of the 5 points, drawn
    at every pixel's position mapped by to_upright (a moved face = the upright one seen through the inverse)."""
    c = (torch.arange(size, dtype=torch.float64) + 0.5) / size
    y, x = torch.meshgrid(c, c, indexing="ij")
    p = to_upright(torch.stack([x, y], -1))  # (H, W, 2)
    x, y = p[..., 0], p[..., 1]
    img = torch.stack([0.4 + 0.2 * torch.sin(20 * x + 6 * y), 0.4 + 0.2 * torch.cos(15 * y - 8 * x),
                       0.4 + 0.2 * torch.sin(25 * x * y)])  # (3, H, W)
    for k, (px, py) in enumerate(blobs.tolist()):
        img[k % 3] += 0.5 * torch.exp(-((x - px) ** 2 + (y - py) ** 2) / (2 * 0.012**2))
    return img.float()


def test_similarity_transform_recovers_scale_rotation_shift_and_never_reflects():
    src = torch.rand(3, 5, 2, dtype=torch.float64)
    a = torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64)
    R = torch.stack([torch.stack([a.cos(), -a.sin()], -1), torch.stack([a.sin(), a.cos()], -1)], -2)  # (3, 2, 2)
    A0 = torch.tensor([0.5, 1.0, 3.0], dtype=torch.float64)[:, None, None] * R
    t0 = torch.tensor([[1.0, 2.0], [-3.0, 0.5], [0.0, 0.0]], dtype=torch.float64)
    A, t = similarity_transform(src, src @ A0.transpose(1, 2) + t0[:, None])
    assert torch.allclose(A, A0, atol=1e-9) and torch.allclose(t, t0, atol=1e-9)
    mirrored = src * torch.tensor([-1.0, 1.0], dtype=torch.float64)
    assert (torch.linalg.det(similarity_transform(src, mirrored)[0]) > 0).all()


def test_upright_face_lands_on_the_arcface_template():
    """A bright spot only at the image-left eye ends up at ARCFACE_112's first point (pixel indices)."""
    img = face_image(blobs=POINTS[:1]) - face_image(blobs=POINTS[:0])  # (3, H, W): the spot alone
    crop = aligned_face_crop(img[None], POINTS[None].float())[0, 0]  # (112, 112)
    iy, ix = divmod(int(crop.argmax()), 112)
    assert abs(ix - ARCFACE_112[0][0]) <= 1 and abs(iy - ARCFACE_112[0][1]) <= 1


def test_a_rotated_and_scaled_face_crops_as_the_upright_one_and_a_box_crop_does_not():
    angle, scale, centre, shift = math.radians(30), 0.7, torch.tensor([0.5, 0.5]), torch.tensor([0.05, -0.03])
    R = torch.tensor([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]], dtype=torch.float64)
    moved = centre + scale * (POINTS - centre) @ R.T + shift  # (5, 2): the face rotated 30 deg, scaled
    rotated = face_image(to_upright=lambda p: centre + (p - centre - shift) @ R / scale)
    upright = face_image()
    a_up = aligned_face_crop(upright[None], POINTS[None].float())
    a_rot = aligned_face_crop(rotated[None], moved[None].float())
    aligned_err = (a_up - a_rot).abs().mean().item()

    def box(p):  # the square around the 5 points, twice their extent (face_box's kind of crop)
        lo, hi = p.min(0).values, p.max(0).values
        mid, half = (lo + hi) / 2, (hi - lo).max()
        return torch.cat([mid - half, mid + half]).float()

    box_err = (crop_box(upright, box(POINTS), 112) - crop_box(rotated, box(moved), 112)).abs().mean().item()
    assert aligned_err < 0.002 and box_err > 0.05, (aligned_err, box_err)  # measured 0.00014, 0.109


def test_face_points_from_the_134_layout_and_the_box_crop_where_there_are_none():
    pose = np.zeros((134, 3), np.float32)
    face = np.random.default_rng(0).random((68, 2)).astype(np.float32)
    pose[FACE, :2], pose[FACE, 2] = face, 1.0
    p5 = face_points5(pose)
    assert torch.allclose(p5[0], torch.from_numpy(face[36:42].mean(0))) and torch.allclose(
        p5[2:], torch.from_numpy(face[[30, 48, 54]]))
    pose[24 + 54, 2] = 0.1  # a mouth corner unseen: no alignment
    assert face_points5(pose).isnan().all()
    assert face_points5(np.zeros((2, 134, 3))).isnan().all()  # COCO-17 and the toy: no face points
    images = torch.stack([face_image(64), face_image(64).flip(-1)])
    boxes = torch.tensor([[0.25, 0.3, 0.65, 0.7], [0.2, 0.25, 0.6, 0.65]])
    points = torch.stack([POINTS.float(), torch.full((5, 2), torch.nan)])
    out = face_crops(images, boxes, points)
    assert torch.equal(out[1], crop_box(images[1], boxes[1], 112))
    assert torch.allclose(out[0], aligned_face_crop(images[:1], POINTS[None].float())[0])
    assert not torch.allclose(out[0], crop_box(images[0], boxes[0], 112), atol=0.05)


@pytest.mark.parametrize("size", [64, 112])
def test_aligned_crop_is_differentiable_in_the_image(size):
    img = face_image(64)[None].requires_grad_()
    aligned_face_crop(img, POINTS[None].float(), size).mean().backward()
    assert img.grad is not None and img.grad.abs().sum() > 0


def test_the_dataset_aligns_faces_where_the_poses_have_face_points(tiny_dance, tmp_path):
    """The recognizer's crops in training (the reference's, and the points of the target frames for the
    identity loss) are the aligned ones where poses.npy has face points, as the scores' are."""
    import shutil

    from data import DanceClipDataset, read_clip, read_frame, read_list_file
    clip = tmp_path / "clip"
    shutil.copytree(read_list_file(tiny_dance / "data_train.txt")[0], clip)
    poses = np.load(clip / "poses.npy")  # (T, 134, 3): the toy's have no face points
    face = POINTS.numpy()[[0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 2, 3, 4]]  # eyes x 6, nose, mouth corners
    for i, k in enumerate([36, 37, 38, 39, 40, 41, 42, 43, 44, 45, 46, 47, 30, 48, 54]):
        poses[:, 24 + k, :2], poses[:, 24 + k, 2] = face[i], 1.0
    np.save(clip / "poses.npy", poses)
    (tmp_path / "list.txt").write_text(f"{clip}\n")
    item = DanceClipDataset(tmp_path / "list.txt", 30, ref_frame=0, frames=2, image_size=16)[0]
    image, box = read_frame(read_clip(clip)["source"], 0), read_clip(clip)["boxes"][0]
    assert torch.allclose(item["face"], aligned_face_crop(image[None], POINTS[None].float())[0], atol=1e-5)
    assert not torch.allclose(item["face"], crop_box(image, box, 112), atol=0.05)
    assert item["face_points"].shape == (2, 5, 2) and torch.allclose(item["face_points"][0], POINTS.float())
