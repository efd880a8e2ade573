"""Face alignment as insightface's utils/face_align.py (arcface mode), in numpy: the similarity
transform (Umeyama, as skimage's SimilarityTransform.estimate) that takes the 5 keypoints onto
ArcFace's template, and the crop warped with it (bilinear, black outside, as cv2.warpAffine)."""

from __future__ import annotations

import numpy as np

# insightface's arcface_dst: eyes, nose tip, mouth corners of a 112x112 aligned face
ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                             [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float32)


def estimate_norm(kps: np.ndarray, size: int = 112) -> np.ndarray:
    """(5, 2) keypoints -> (2, 3) similarity transform onto the template at `size` (insightface
    scales it for multiples of 112, and shifts it by 8 px a 128 for multiples of 128)."""
    kps = np.asarray(kps, dtype=np.float64)
    if kps.shape != (5, 2) or not np.isfinite(kps).all():
        raise ValueError(f"face keypoints must be 5 finite (x, y) points, got shape {kps.shape}")
    if size % 112 == 0:
        dst = ARCFACE_TEMPLATE.astype(np.float64) * (size / 112)
    elif size % 128 == 0:
        dst = ARCFACE_TEMPLATE.astype(np.float64) * (size / 128) + [8.0 * size / 128, 0.0]
    else:
        raise ValueError(f"aligned face size must be a multiple of 112 or 128, got {size}")
    return _umeyama(kps, dst)


def _umeyama(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares rotation, uniform scale and shift taking src onto dst (Umeyama 1991)."""
    src_mean, dst_mean = src.mean(0), dst.mean(0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    cov = dst_c.T @ src_c / len(src)
    u, s, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(cov) < 0:   # no reflections
        d[1] = -1
    variance = src_c.var(0).sum()
    if variance == 0:
        raise ValueError("face keypoints all coincide; no alignment exists")
    rotation = u @ np.diag(d) @ vt
    scale = (s @ d) / variance
    shift = dst_mean - scale * rotation @ src_mean
    return np.column_stack([scale * rotation, shift])


def norm_crop(image: np.ndarray, kps: np.ndarray, size: int = 112) -> np.ndarray:
    """(H, W, 3) uint8 -> (size, size, 3) uint8: the face at kps aligned as ArcFace expects."""
    return warp_affine(image, estimate_norm(kps, size), size)


def warp_affine(image: np.ndarray, matrix: np.ndarray, size: int) -> np.ndarray:
    """cv2.warpAffine(image, matrix, (size, size)) with bilinear sampling and black borders."""
    image = np.asarray(image)
    inverse = np.linalg.inv(np.vstack([matrix, [0, 0, 1]]))[:2]
    ys, xs = np.mgrid[:size, :size].astype(np.float64)
    sx = inverse[0, 0] * xs + inverse[0, 1] * ys + inverse[0, 2]
    sy = inverse[1, 0] * xs + inverse[1, 1] * ys + inverse[1, 2]
    x0, y0 = np.floor(sx).astype(int), np.floor(sy).astype(int)
    fx, fy = (sx - x0)[..., None], (sy - y0)[..., None]
    h, w = image.shape[:2]

    def at(y, x):   # pixels outside the image are black (borderValue 0)
        inside = ((y >= 0) & (y < h) & (x >= 0) & (x < w))[..., None]
        return np.where(inside, image[np.clip(y, 0, h - 1), np.clip(x, 0, w - 1)], 0).astype(np.float64)
    top = at(y0, x0) * (1 - fx) + at(y0, x0 + 1) * fx
    bottom = at(y0 + 1, x0) * (1 - fx) + at(y0 + 1, x0 + 1) * fx
    return np.clip(np.rint(top * (1 - fy) + bottom * fy), 0, 255).astype(np.uint8)
