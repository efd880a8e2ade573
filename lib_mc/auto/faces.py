"""Faces on the layout image, to tell people apart: insightface's SCRFD detector (`det_10g.onnx`
of the buffalo_l pack, in models/insightface) run with onnxruntime. Only the detector is used;
the insightface package itself is not needed. Decoding follows insightface's retinaface.py.
"""

from __future__ import annotations

import os

import numpy as np

from .sam import ModelFileError

DETECTOR_FILES = ("det_10g.onnx", "det_2.5g.onnx", "det_500m.onnx")
SIZE = 640


def find_detector(folder: str) -> str | None:
    """The first known detector file anywhere under the folder (packs unpack into subfolders)."""
    if not os.path.isdir(folder):
        return None
    for name in DETECTOR_FILES:
        for root, _, files in sorted(os.walk(folder)):
            if name in files:
                return os.path.join(root, name)
    return None


class FaceDetector:
    def __init__(self, path: str):
        try:
            import onnxruntime
        except ImportError as exc:
            raise ModelFileError(f"onnxruntime is not installed ({exc}); install.py installs it") from exc
        try:
            self.session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise ModelFileError(f"face detector {path} could not be loaded: {exc}") from exc
        self.input = self.session.get_inputs()[0].name
        outputs = len(self.session.get_outputs())
        layouts = {6: (3, 2), 9: (3, 2), 10: (5, 1), 15: (5, 1)}   # outputs -> (strides, anchors per cell)
        if outputs not in layouts:
            raise ModelFileError(f"face detector {path} has {outputs} outputs; an SCRFD model has 6, 9, 10 or 15")
        self.levels, self.anchors = layouts[outputs]
        self.strides = [8, 16, 32, 64, 128][:self.levels]
        self.has_kps = outputs in (9, 15)   # the *_bnkps models also give 5 keypoints a face

    def detect(self, image: np.ndarray, threshold: float = 0.5, overlap: float = 0.4) -> np.ndarray:
        """(H, W, 3) uint8 RGB -> (k, 5) boxes x0, y0, x1, y1, score in image pixels, best first."""
        return self.detect_kps(image, threshold, overlap)[0]

    def detect_kps(self, image: np.ndarray, threshold: float = 0.5,
                   overlap: float = 0.4) -> tuple[np.ndarray, np.ndarray | None]:
        """As detect, with the (k, 5, 2) keypoints in image pixels (None for a model without them)."""
        from PIL import Image
        h, w = image.shape[:2]
        scale = SIZE / max(h, w)
        new_w, new_h = max(1, int(w * scale)), max(1, int(h * scale))
        canvas = np.zeros((SIZE, SIZE, 3), dtype=np.float32)
        canvas[:new_h, :new_w] = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR))
        blob = ((canvas - 127.5) / 128.0).transpose(2, 0, 1)[None].astype(np.float32)
        outs = self.session.run(None, {self.input: blob})
        boxes, kps = [], []
        for level, stride in enumerate(self.strides):
            scores = outs[level].reshape(-1)
            distances = outs[level + self.levels].reshape(-1, 4) * stride
            side = SIZE // stride
            ys, xs = np.mgrid[:side, :side]
            centres = np.repeat(np.stack([xs, ys], -1).reshape(-1, 2) * stride, self.anchors, axis=0)
            keep = scores >= threshold
            c, d = centres[keep], distances[keep]
            boxes.append(np.column_stack([c[:, 0] - d[:, 0], c[:, 1] - d[:, 1], c[:, 0] + d[:, 2],
                                          c[:, 1] + d[:, 3], scores[keep]]))
            if self.has_kps:   # offsets from the anchor, in strides (insightface's distance2kps)
                offsets = outs[level + 2 * self.levels].reshape(-1, 5, 2)[keep] * stride
                kps.append(c[:, None, :] + offsets)
        found = np.concatenate(boxes) if boxes else np.zeros((0, 5))
        chosen = _nms(found, overlap)
        found = found[chosen]
        found[:, :4] /= scale
        points = np.concatenate(kps)[chosen] / scale if self.has_kps else None
        return found, points


def _nms(boxes: np.ndarray, overlap: float) -> list[int]:
    order = list(np.argsort(-boxes[:, 4]))
    keep = []
    while order:
        best = order.pop(0)
        keep.append(best)
        rest = np.array(order, dtype=int)
        if not len(rest):
            break
        x0 = np.maximum(boxes[best, 0], boxes[rest, 0])
        y0 = np.maximum(boxes[best, 1], boxes[rest, 1])
        x1 = np.minimum(boxes[best, 2], boxes[rest, 2])
        y1 = np.minimum(boxes[best, 3], boxes[rest, 3])
        inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
        area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])   # noqa: E731
        iou = inter / (area(boxes[best]) + area(boxes[rest]) - inter)
        order = [int(i) for i, v in zip(rest, iou) if v <= overlap]
    return keep


def to_cells(faces: np.ndarray, image_hw: tuple[int, int], grid_hw: tuple[int, int]) -> np.ndarray:
    """Face boxes in image pixels -> in cells of a (h, w) grid (the attention maps')."""
    sy, sx = grid_hw[0] / image_hw[0], grid_hw[1] / image_hw[1]
    return faces[:, :4] * np.array([sx, sy, sx, sy])
