"""Clean-up of found masks with OpenCV (both WebUIs ship opencv-python): close small gaps, fill
holes, drop specks, grow or shrink. Works the same on attention-grid cells and on SAM's
image-resolution masks; `finish` also keeps the concepts of one image apart after growing.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch

MIN_SHARE = 0.15   # a blob smaller than this share of the mask's largest blob is a speck


def _disc(radius: int, shape=cv2.MORPH_ELLIPSE) -> np.ndarray:
    return cv2.getStructuringElement(shape, (2 * radius + 1, 2 * radius + 1))


def close_gaps(mask: np.ndarray, radius: int = 1) -> np.ndarray:
    """Bridges gaps up to 2*radius cells wide (dilate, then erode; a square, so that a crack
    closes to its very ends)."""
    if radius <= 0:
        return mask
    # pad so the closing does not stick to the border (OpenCV's erode treats outside as set)
    padded = cv2.copyMakeBorder(mask.astype(np.uint8), radius, radius, radius, radius, cv2.BORDER_CONSTANT, value=0)
    closed = cv2.morphologyEx(padded, cv2.MORPH_CLOSE, _disc(radius, cv2.MORPH_RECT))
    return closed[radius:-radius, radius:-radius] > 0


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Every outer contour drawn filled: enclosed background becomes mask."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    filled = np.zeros(mask.shape, np.uint8)
    cv2.drawContours(filled, contours, -1, 1, thickness=cv2.FILLED)
    return (filled > 0) | mask


def drop_specks(mask: np.ndarray, min_share: float = MIN_SHARE) -> np.ndarray:
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if count <= 2:   # background + at most one blob
        return mask
    areas = stats[1:, cv2.CC_STAT_AREA]
    keep = 1 + np.flatnonzero(areas >= min_share * areas.max())
    return np.isin(labels, keep)


def grow(mask: np.ndarray, cells: int) -> np.ndarray:
    """Dilate by `cells` (> 0) or erode by -cells; an erosion that would empty the mask is skipped."""
    if cells == 0 or not mask.any():
        return mask
    if cells > 0:
        return cv2.dilate(mask.astype(np.uint8), _disc(cells)) > 0
    shrunk = cv2.erode(mask.astype(np.uint8), _disc(-cells), borderValue=1) > 0
    return shrunk if shrunk.any() else mask


def tidy(mask: np.ndarray, close_radius: int = 1) -> np.ndarray:
    """Close small gaps, fill holes, drop specks (a bool mask in, a bool mask out)."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return mask
    return drop_specks(fill_holes(close_gaps(mask, close_radius)))


def finish(masks: torch.Tensor, grow_px: float = 0.0, px_per_cell: float = 1.0, close_radius: int = 1) -> torch.Tensor:
    """(B, n, h, w) found masks of each image -> tidied and grown by `grow_px` image pixels.
    Growth only takes cells no other concept of the image holds, and cells two growths reach
    stay background, so the masks stay disjoint."""
    cells = int(round(grow_px / px_per_cell))
    out = torch.zeros(masks.shape, dtype=torch.float32)
    for b in range(masks.shape[0]):
        given = [m.numpy() > 0.5 for m in masks[b].float().cpu()]
        any_given = np.any(given, axis=0)
        tidied = [tidy(m, close_radius) for m in given]
        claims = np.sum(tidied, axis=0)
        # what tidying added is kept where no other concept holds or claims it
        held = [t & (g | ((claims == 1) & ~any_given)) for g, t in zip(given, tidied)]
        if cells > 0:
            taken = np.any(held, axis=0)
            grown = [grow(m, cells) for m in held]
            reached = np.sum(grown, axis=0)
            held = [m | (g & ~taken & (reached == 1)) for m, g in zip(held, grown)]
        elif cells < 0:
            held = [grow(m, cells) for m in held]
        for i, mask in enumerate(held):
            out[b, i] = torch.from_numpy(mask.astype(np.float32))
    return out
