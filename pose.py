"""Whole-body 2D poses from local ONNX files, for real dance videos and reference photos: RTMPose-wholebody /
DWPose (133 COCO-WholeBody points) on a person box from a YOLOX detector or the whole frame, mapped to the
134-point layout of the dance clips (docs/formats.md, poses.npy), and a face box from the face points.

onnxruntime is called directly, not through rtmlib: rtmlib downloads a model when its path does not exist
(we promise nothing is fetched at run time) and needs two OpenCV wheels that both install `cv2`; the part of
it we need (an affine crop, mean/std, the SimCC argmax and the YOLOX decode) is the short code below, kept
numerically as rtmlib and DWPose's annotator have it (BGR input, padding 1.25, split ratio 2).
"""
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from data import FACE, VISIBLE
from plumbing import InputError

# our 134 points from COCO-WholeBody's 133: the body in OpenPose-18 order with the neck (-1: the mean of the
# shoulders) inserted at 1, then feet, face and hands in their order (DWPose's conversion; docs/formats.md)
BODY18_FROM_COCO = [0, -1, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3]
HEAD = [0, 14, 15, 16, 17]  # nose, eyes, ears: the face box of a COCO-17 pose (no face points)
MEAN, STD = np.array([123.675, 116.28, 103.53]), np.array([58.395, 57.12, 57.375])  # RTMPose, BGR order
PERSON_SCORE = 0.5  # YOLOX objectness x person probability below this: no person in the frame


def to_layout134(xy, score):
    """COCO-WholeBody (K = 133) or COCO-17 (K = 17) points xy (K, 2) and scores (K,) -> (134, 3) in our
    layout; points COCO-17 lacks (feet, face, hands) get score 0, i.e. invisible (below VISIBLE)."""
    K = len(xy)
    if K not in (17, 133):
        raise InputError(f"{K} keypoints: expected 133 (COCO-WholeBody) or 17 (COCO)")
    src = np.concatenate([xy, score[:, None]], 1).astype(np.float32)  # (K, 3)
    out = np.zeros((134, 3), np.float32)
    for ours, coco in enumerate(BODY18_FROM_COCO):
        out[ours] = src[coco] if coco >= 0 else 0.0
    out[1, :2] = (src[5, :2] + src[6, :2]) / 2  # the neck, scored as the weaker shoulder (rtmlib)
    out[1, 2] = min(src[5, 2], src[6, 2])
    if K == 133:
        out[18:] = src[17:]  # feet 6, face 68, left hand 21, right hand 21: same order
    return out


def face_box(pose, margin=1.2):
    """A square face box [x0, y0, x1, y1] from a pose (134, 3) (normalised or in pixels), or None: around the
    visible face points (widened by `margin`: they run from the brows to the chin), else around the visible
    nose, eyes and ears (two at least; COCO-17 poses have no face points)."""
    vis = pose[FACE, 2] >= VISIBLE
    if vis.sum() >= 5:
        pts, half_scale = pose[FACE][vis, :2], margin / 2
    else:
        head = pose[HEAD]
        if (head[:, 2] >= VISIBLE).sum() < 2:
            return None
        pts, half_scale = head[head[:, 2] >= VISIBLE, :2], 0.55  # ear to ear is about the face's width
    lo, hi = pts.min(0), pts.max(0)
    centre, half = (lo + hi) / 2, float((hi - lo).max()) * half_scale
    if half <= 0:
        return None
    return [float(centre[0] - half), float(centre[1] - half), float(centre[0] + half), float(centre[1] + half)]


def session(path, what):
    import onnxruntime as ort
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: {what} missing (a local ONNX file; nothing is downloaded)")
    try:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3  # no warnings on stdout about unused initialisers
        gpu = [p for p in ("CUDAExecutionProvider",) if p in ort.get_available_providers()]  # onnxruntime-gpu
        return ort.InferenceSession(str(path), opts, providers=gpu + ["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own classes for a file that is not a model
        raise InputError(f"{path}: cannot load it as an ONNX {what} ({' '.join(str(err).split())[:200]})") from None


def input_hw(sess, path, what):
    shape = sess.get_inputs()[0].shape
    if len(shape) != 4 or not all(isinstance(s, int) for s in shape[2:]) or shape[1] not in (3, "3"):
        raise InputError(f"{path}: {what} input {sess.get_inputs()[0].name!r} has shape {shape}, "
                         "expected (1, 3, H, W) with a fixed H, W")
    return shape[2], shape[3]


class PoseModel:
    """pose(image) -> (134, 3): x, y in the image's pixels and a score, for the most confident person. The
    pose model is an RTMPose / DWPose whole-body ONNX (input (1, 3, H, W), e.g. 256 x 192 or 384 x 288;
    outputs simcc_x (1, 133, W x 2) and simcc_y (1, 133, H x 2)); `detector` is a YOLOX ONNX (input
    (1, 3, 640, 640), output (1, N, 85) raw or (1, N, 5) after NMS) or "full_frame" (the image is the box)."""

    def __init__(self, path, detector):
        if not detector:
            raise InputError("no person detector: give a YOLOX ONNX file, or 'full_frame' to take the whole "
                             "frame as the person's box (one dancer filling most of the frame)")
        self.path, self.sess = path, session(path, "pose model")
        self.h, self.w = input_hw(self.sess, path, "pose model")
        outs = [o.name for o in self.sess.get_outputs()]
        if len(outs) != 2:
            raise InputError(f"{path}: outputs {outs}, expected two (simcc_x, simcc_y) of an RTMPose model")
        self.det = None if detector == "full_frame" else session(detector, "person detector (YOLOX)")
        if self.det is not None:
            self.det_path, self.det_hw = detector, input_hw(self.det, detector, "person detector")

    def __call__(self, image):
        """image: (H, W, 3) uint8 RGB -> (134, 3) float32 in pixels; all scores 0 when no person is found."""
        box = self.person_box(image)
        if box is None:
            return np.zeros((134, 3), np.float32)
        crop, centre, scale = self.crop(image, box)
        simcc_x, simcc_y = self.sess.run(None, {self.sess.get_inputs()[0].name: crop})
        if simcc_x.ndim != 3 or simcc_x.shape[:2] != simcc_y.shape[:2] or simcc_x.shape[0] != 1:
            raise InputError(f"{self.path}: outputs {simcc_x.shape} and {simcc_y.shape}, expected "
                             "(1, K, W x ratio) and (1, K, H x ratio)")
        split = simcc_x.shape[2] / self.w  # SimCC bins per input pixel (2 for every released RTMPose)
        xy = np.stack([simcc_x[0].argmax(1), simcc_y[0].argmax(1)], 1) / split  # (K, 2) in crop pixels
        score = (simcc_x[0].max(1) + simcc_y[0].max(1)) / 2  # (K,): rtmlib's (mean of the two maxima)
        xy = (xy - np.array([self.w, self.h]) / 2) * scale / self.w + centre  # crop -> image pixels
        return to_layout134(xy, score)

    def crop(self, image, box):
        """rtmlib's top_down_affine: the box padded by 1.25 and widened to the model's aspect ratio, mapped to
        (h, w) by a scale and a shift (in pixel-index coordinates, as cv2.warpAffine; zeros outside), BGR,
        mean/std normalised. Returns the input (1, 3, h, w), the box centre (2,) and its width in pixels."""
        x0, y0, x1, y1 = box
        centre = np.array([x0 + x1, y0 + y1]) / 2
        bw, bh = (x1 - x0) * 1.25, (y1 - y0) * 1.25
        width = max(bw, bh * self.w / self.h)  # the box's width once it has the model's aspect ratio
        step = width / self.w  # image pixels per input pixel
        xs = centre[0] + (np.arange(self.w) - self.w / 2) * step  # (w,) source x of each input column
        ys = centre[1] + (np.arange(self.h) - self.h / 2) * step  # (h,)
        H, W = image.shape[:2]
        gx = torch.from_numpy(xs / max(W - 1, 1) * 2 - 1).float()  # align_corners=True: -1, 1 = end pixels
        gy = torch.from_numpy(ys / max(H - 1, 1) * 2 - 1).float()
        grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), -1)[None]  # (1, h, w, 2)
        bgr = torch.from_numpy(np.ascontiguousarray(image[:, :, ::-1])).float().permute(2, 0, 1)[None]  # (1, 3, H, W)
        x = F.grid_sample(bgr, grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0]  # (3, h, w)
        x = (x.permute(1, 2, 0).numpy() - MEAN) / STD  # (h, w, 3)
        return np.ascontiguousarray(x.transpose(2, 0, 1)[None], np.float32), centre, width  # (1, 3, h, w)

    def person_box(self, image):
        """[x0, y0, x1, y1] in pixels of the most confident person, or None (none above PERSON_SCORE)."""
        H, W = image.shape[:2]
        if self.det is None:
            return [0.0, 0.0, float(W), float(H)]
        h, w = self.det_hw
        ratio = min(h / H, w / W)  # YOLOX's letterbox: resized into the top-left corner, padded with 114
        nh, nw = max(1, int(H * ratio)), max(1, int(W * ratio))
        small = F.interpolate(torch.tensor(image).float().permute(2, 0, 1)[None], size=(nh, nw),
                              mode="bilinear", align_corners=False)[0].permute(1, 2, 0)  # (nh, nw, 3)
        padded = np.full((h, w, 3), 114.0, np.float32)
        padded[:nh, :nw] = small.round().clamp(0, 255).numpy()[:, :, ::-1]  # BGR, as rtmlib feeds it
        out = self.det.run(None, {self.det.get_inputs()[0].name: padded.transpose(2, 0, 1)[None].copy()})[0]
        out = np.asarray(out, np.float32).reshape(-1, out.shape[-1])  # (N, 85) or (N, 5)
        if out.shape[1] == 5:  # exported with NMS: boxes x0 y0 x1 y1 in input pixels, score
            boxes, scores = out[:, :4], out[:, 4]
        elif out.shape[1] > 5:  # raw: per anchor cx, cy, w, h (grid units), objectness, class probabilities
            grids, strides = [], []
            for s in (8, 16, 32):
                gy, gx = np.mgrid[: h // s, : w // s]
                grids.append(np.stack([gx.ravel(), gy.ravel()], 1))  # (h/s * w/s, 2)
                strides.append(np.full((gx.size, 1), s))
            grid, stride = np.concatenate(grids), np.concatenate(strides)  # (N, 2), (N, 1)
            if len(grid) != len(out):
                raise InputError(f"{self.det_path}: {len(out)} anchors, expected {len(grid)} for a {h} x {w} "
                                 "YOLOX (strides 8, 16, 32)")
            cxy, wh = (out[:, :2] + grid) * stride, np.exp(out[:, 2:4]) * stride
            boxes, scores = np.concatenate([cxy - wh / 2, cxy + wh / 2], 1), out[:, 4] * out[:, 5]  # class 0: person
        else:
            raise InputError(f"{self.det_path}: output of shape {out.shape}, expected (1, N, 85) or (1, N, 5)")
        if not len(scores) or scores.max() < PERSON_SCORE:
            return None
        return (boxes[scores.argmax()] / ratio).tolist()
