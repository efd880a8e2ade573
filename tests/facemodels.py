"""insightface's antelopev2 pack as the tests write it: real ONNX files, exported here with
torch.onnx, in the official layouts (SCRFD with keypoints: 9 outputs; ArcFace: 1x3x112x112 -> 512).

The detector is not random: a face is a bright square (mean value above ~180) with a dark ring
around it, of side 32, 64 or 128 on the detector's 640x640 input at stride 8, 16 or 32 (each
level finds one size); its box is the square and its 5 keypoints sit at FACE_KPS of the box,
which are the ArcFace template's points, so an aligned crop is the square scaled to 112x112.
The recogniser is a small random conv net with a fixed seed.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

# insightface's arcface_dst / 112, written out here (not imported from the code under test)
FACE_KPS = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                     [41.5493, 92.3655], [70.7299, 92.2041]]) / 112.0
LEVELS = ((8, 32), (16, 64), (32, 128))   # stride, face side on the 640 input


class FaceSquares(nn.Module):
    def __init__(self):
        super().__init__()
        for stride, side in LEVELS:   # per level: box and keypoint distances from the anchor, in strides
            self.register_buffer(f"box{stride}", torch.tensor([0.0, 0.0, side / stride, side / stride]))
            self.register_buffer(f"kps{stride}", torch.tensor(FACE_KPS.reshape(-1) * side / stride,
                                                               dtype=torch.float32))

    def forward(self, x):
        bright = (x.mean(1, keepdim=True) + 1) / 2     # input (v - 127.5) / 128 -> about [0, 1]
        scores, boxes, kps = [], [], []
        for stride, side in LEVELS:
            ring = side // 4
            inner = nn.functional.avg_pool2d(bright, side, stride=stride)
            outer = nn.functional.avg_pool2d(bright, side + 2 * ring, stride=stride, padding=ring)
            big = (side + 2 * ring) ** 2
            around = (outer * big - inner * side ** 2) / (big - side ** 2)
            score = torch.sigmoid(30 * (inner - 0.7)) * torch.sigmoid(30 * (0.2 - around))
            cells = 640 // stride
            score = nn.functional.pad(score, (0, cells - score.shape[-1], 0, cells - score.shape[-2]))
            score = score.flatten(2).transpose(1, 2)[0].repeat_interleave(2, dim=0)   # (n, 1), 2 anchors
            n = score.shape[0]
            # SCRFD anchors sit at cell corners: the box starts there
            scores.append(score)
            boxes.append(getattr(self, f"box{stride}").expand(n, 4) + 0 * score)
            kps.append(getattr(self, f"kps{stride}").expand(n, 10) + 0 * score)
        return tuple(scores + boxes + kps)


class TinyArcFace(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1234)
        # the instance norm takes out what all bright squares share, so different faces differ
        self.body = nn.Sequential(nn.Conv2d(3, 16, 4, stride=2, padding=1), nn.ReLU(),     # 56 x 56
                                  nn.Conv2d(16, 32, 4, stride=2, padding=1), nn.ReLU(),    # 28 x 28
                                  nn.InstanceNorm2d(32), nn.AvgPool2d(7), nn.Flatten(), nn.Linear(512, 512))

    def forward(self, x):
        return self.body(x)


def write_antelopev2(folder) -> tuple[str, str]:
    """(detector, recogniser) paths in `folder`, named as in the antelopev2 pack."""
    os.makedirs(folder, exist_ok=True)
    detector = os.path.join(folder, "scrfd_10g_bnkps.onnx")
    recogniser = os.path.join(folder, "glintr100.onnx")
    with torch.no_grad():
        torch.onnx.export(FaceSquares(), torch.zeros(1, 3, 640, 640), detector, opset_version=13,
                          input_names=["input.1"])
        torch.onnx.export(TinyArcFace().eval(), torch.zeros(1, 3, 112, 112), recogniser, opset_version=13,
                          input_names=["input.1"], output_names=["embedding"])
    return detector, recogniser


def face(seed: int, side: int, low: int = 180) -> np.ndarray:
    """A (side, side, 3) uint8 'face': bright, with a texture of its own (values low..255; the
    darker, the lower its detection score)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(low, 256, size=(8, 8, 3)).astype(np.uint8)
    return np.kron(coarse, np.ones((side // 8 + 1, side // 8 + 1, 1), dtype=np.uint8))[:side, :side]


def picture(size_hw, faces=()) -> np.ndarray:
    """A black (H, W, 3) picture with each (face pixels, top, left) pasted."""
    image = np.zeros(tuple(size_hw) + (3,), dtype=np.uint8)
    for pixels, top, left in faces:
        image[top:top + pixels.shape[0], left:left + pixels.shape[1]] = pixels
    return image
