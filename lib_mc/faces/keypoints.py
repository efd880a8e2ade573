"""The IdentityNet's condition: the face's 5 keypoints drawn as InstantID's draw_kps draws them,
and where a face goes in a region when the layout has none."""

from __future__ import annotations

import math

import numpy as np

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255)]   # RGB, one a point
LIMBS = [(0, 2), (1, 2), (3, 2), (4, 2)]   # eyes and mouth corners to the nose
STICK_WIDTH = 4
POINT_RADIUS = 10


def draw_kps(size_hw: tuple[int, int], kps: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8: limbs as filled ellipses at 0.6 intensity, then the points as filled
    circles, on black; the same integer geometry as InstantID (cv2)."""
    import cv2
    kps = np.asarray(kps, dtype=np.float64).reshape(5, 2)
    out = np.zeros((int(size_hw[0]), int(size_hw[1]), 3), dtype=np.float64)
    for a, b in LIMBS:
        x, y = kps[[a, b], 0], kps[[a, b], 1]
        length = math.hypot(x[0] - x[1], y[0] - y[1])
        angle = math.degrees(math.atan2(y[0] - y[1], x[0] - x[1]))
        polygon = cv2.ellipse2Poly((int(np.mean(x)), int(np.mean(y))), (int(length / 2), STICK_WIDTH),
                                   int(angle), 0, 360, 1)
        out = cv2.fillConvexPoly(out, polygon, COLOURS[a])
    out = np.ascontiguousarray((out * 0.6).astype(np.uint8))
    for (x, y), colour in zip(kps, COLOURS):
        out = cv2.circle(out, (int(x), int(y)), POINT_RADIUS, colour, -1)
    return out


def place(kps_in_box: np.ndarray, box: np.ndarray) -> np.ndarray:
    """(5, 2) keypoints as fractions of a face box -> pixels in `box` (x0, y0, x1, y1)."""
    box = np.asarray(box, dtype=np.float64)
    return box[:2] + np.asarray(kps_in_box, dtype=np.float64).reshape(5, 2) * (box[2:4] - box[:2])


def default_face_box(region: np.ndarray) -> np.ndarray:
    """A square face box at the top of the region, a head's size (a third of the region's height,
    at most half its width near the top), centred on the region's columns there. An empty region
    stands for the whole picture."""
    region = np.asarray(region, dtype=np.float64) > 0.5
    if not region.any():
        region = np.ones_like(region)
    rows = np.nonzero(region.any(1))[0]
    top, height = rows[0], rows[-1] + 1 - rows[0]
    band = np.nonzero(region[top:top + max(1, int(height / 6))].any(0))[0]   # the head's upper half
    side = max(1.0, min(height / 3, (band[-1] + 1 - band[0]) / 2))
    centre = (band[0] + band[-1] + 1) / 2
    x0 = float(np.clip(centre - side / 2, 0, max(0.0, region.shape[1] - side)))
    y0 = float(min(top + 0.1 * side, max(0.0, region.shape[0] - side)))
    return np.array([x0, y0, x0 + side, y0 + side])
