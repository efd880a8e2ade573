"""Attention maps of the layout pass -> one binary mask per automatic concept (torch; OpenCV clean-up).

Concepts that watched different words compete: a cell goes to the concept whose normalised map
is strongest there, if that clears the threshold. Concepts that share one occurrence of a word
("two men" with one "men") split its area: by the faces found in the layout image when there
are enough (each cell goes to the nearest face), else by k-means on cell positions; a concept hinted
"left", "right" or "largest" takes that part, the others go left to right in list order. A
concept given a box (a rectangle drawn for an automatic region) is only looked for inside it:
its map is cut to the box, and concepts sharing a word, all boxed, split the word's area by box.
Holes are filled, specks dropped, and a mask is never empty (its strongest cells remain).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .postprocess import tidy

THRESHOLD = 0.5        # of each map's range (maps arrive stretched to [0, 1])
FALLBACK_TOP = 0.1     # an empty mask keeps this fraction of its strongest cells


HINTS = ("left", "right", "largest")


def stretch_within(maps: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    """`stretch` over each map's `inside` cells only (its box: the attention floor inside the box
    is subtracted too), 0 outside."""
    low = maps.masked_fill(~inside, float("inf")).flatten(-2).amin(-1)[..., None, None]
    high = maps.masked_fill(~inside, float("-inf")).flatten(-2).amax(-1)[..., None, None]
    return ((maps - low) / (high - low).clamp_min(1e-8)).clamp(0, 1) * inside


def stretch(maps: torch.Tensor) -> torch.Tensor:
    """Each (h, w) map (the last two dims) to [0, 1]: attention has a floor everywhere; the
    subject is the excess."""
    return stretch_within(maps, torch.ones_like(maps, dtype=torch.bool))


def masks_from_maps(maps: torch.Tensor, groups: Sequence[int], threshold: float = THRESHOLD,
                    hints: Sequence[str] | None = None, faces: Sequence | None = None,
                    boxes: Sequence | None = None, image_boxes: Sequence | None = None) -> torch.Tensor:
    """maps: (B, n, h, w) attention per concept; groups[i]: concepts with the same group id
    watched the same tokens; hints[i]: "", "left", "right" or "largest". Returns (B, n, h, w)
    float masks in {0, 1}, disjoint per image. faces[b]: (k, 4) face boxes of image b in map cells;
    boxes[i]: None or (x, y, w, h) image fractions the concept must lie in; image_boxes[b]: image
    b's own such boxes (Grounding DINO's), in place of `boxes` there."""
    out = torch.zeros_like(maps, dtype=torch.float32)
    n, h, w = maps.shape[1:]
    hints = list(hints) if hints is not None else [""] * n
    for b in range(maps.shape[0]):
        these = image_boxes[b] if image_boxes is not None else boxes
        inside, boxed = _insides(list(these) if these is not None else [None] * n, groups, (h, w))
        image_faces = faces[b] if faces is not None and b < len(faces) else None
        out[b] = _one_image(maps[b].float(), list(groups), threshold, hints, image_faces, inside, boxed)
    return out


def _insides(boxes: list, groups: Sequence[int], grid_hw: tuple[int, int]) -> tuple[torch.Tensor, list[bool]]:
    """(n, h, w) where each concept is looked for, and which concepts are boxed."""
    n = len(boxes)
    inside = torch.stack([box_cells(box, grid_hw) for box in boxes])
    _share_overlaps(inside, boxes, groups)
    for i, box in enumerate(boxes):   # a free concept leaves a boxed one sharing its word its box
        if box is None:
            siblings = [j for j in range(n) if groups[j] == groups[i] and boxes[j] is not None]
            outside = ~inside[siblings].any(0) if siblings else inside[i]
            inside[i] = outside if outside.any() else inside[i]
    return inside, [box is not None for box in boxes]


def _share_overlaps(inside: torch.Tensor, boxes: list, groups: Sequence[int]) -> None:
    """Boxed concepts sharing a word split where their boxes overlap: each such cell goes to the
    box whose centre is nearest (in box sizes), so two people boxed side by side stay two."""
    h, w = inside.shape[-2:]
    cy, cx = torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij")
    for gid in dict.fromkeys(groups):
        members = [i for i, g in enumerate(groups) if g == gid and boxes[i] is not None]
        if len(members) < 2:
            continue
        distance = torch.stack([((cx - (x + bw / 2)) / bw) ** 2 + ((cy - (y + bh / 2)) / bh) ** 2
                                for x, y, bw, bh in (boxes[m] for m in members)])
        claims = inside[members]
        nearest = distance.masked_fill(~claims, float("inf")).argmin(0)
        contested = claims.sum(0) > 1
        for k, member in enumerate(members):
            inside[member] &= ~contested | (nearest == k)


def boxes_as_masks(image_boxes: Sequence, grid_hw: tuple[int, int]) -> torch.Tensor:
    """image_boxes[b][i] -> (B, n, h, w) float: each box's cells (a concept without one: none)."""
    return torch.stack([torch.stack([box_cells(box, grid_hw).float() if box is not None else torch.zeros(grid_hw)
                                     for box in boxes]) for boxes in image_boxes])


def box_cells(box, grid_hw: tuple[int, int]) -> torch.Tensor:
    """(h, w) bool: the cells whose centres lie in the (x, y, w, h) box (all for None; at least
    the cell under the box's centre)."""
    h, w = grid_hw
    if box is None:
        return torch.ones(h, w, dtype=torch.bool)
    x, y, bw, bh = box
    cy, cx = (torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w
    rows, cols = (cy >= y) & (cy < y + bh), (cx >= x) & (cx < x + bw)   # half-open: side by side boxes share no cell
    cells = rows[:, None] & cols[None, :]
    if not cells.any():
        cells[min(h - 1, int((y + bh / 2) * h)), min(w - 1, int((x + bw / 2) * w))] = True
    return cells


def assign_parts(parts: list, members: list[int], hints: list[str], size=lambda part: float(part.sum())) -> dict:
    """Parts come left to right; hinted members choose first, the rest take what is left in order
    (a member without a part left gets none). size(part): what "largest" compares."""
    free = list(range(len(parts)))
    chosen: dict = {}
    for member in members:
        hint = hints[member]
        if hint in HINTS and free:
            pick = {"left": free[0], "right": free[-1]}.get(hint) if hint != "largest" else \
                max(free, key=lambda j: size(parts[j]))
            free.remove(pick)
            chosen[member] = parts[pick]
    for member in members:
        if member not in chosen and free:
            chosen[member] = parts[free.pop(0)]
    return chosen


def _one_image(maps: torch.Tensor, groups: list[int], threshold: float, hints: list[str], faces,
               inside: torch.Tensor, boxed: list[bool]) -> torch.Tensor:
    n, h, w = maps.shape
    norm = stretch_within(maps, inside)   # a flat map (no subject) becomes all 0
    owner = norm.argmax(0)
    strongest = norm.amax(0)
    masks = torch.zeros(n, h, w)
    for gid in dict.fromkeys(groups):
        members = [i for i, g in enumerate(groups) if g == gid]
        # a boxed member's map is cut to its box, so it wins its own cells; the free members
        # share one map (the first of them owns its cells) and split that area
        free = [m for m in members if not boxed[m]]
        for member in [m for m in members if boxed[m]] + free[:1]:
            masks[member] = ((strongest > threshold) & (owner == member)).float()
        if len(free) > 1:
            area = masks[free[0]] > 0
            parts = _split_by_faces(area, faces, len(free))
            if parts is None:
                parts = _split(area, norm[free[0]], len(free))
            for member, part in assign_parts(parts, free, hints).items():
                masks[member] = part
    for i in range(n):
        masks[i] = _tidy(masks[i]) * inside[i]
    # tidying may have grown masks into each other: the stronger map keeps a contested cell
    taken = torch.zeros(h, w, dtype=torch.bool)
    for i in sorted(range(n), key=lambda i: -float((norm[i] * masks[i]).sum() / masks[i].sum().clamp_min(1))):
        masks[i] = masks[i] * (~taken).float()
        taken |= masks[i] > 0
    for i in range(n):   # nothing found: the strongest cells nobody else holds
        if masks[i].sum() == 0:
            masks[i] = _strongest_cells(norm[i].masked_fill(taken | ~inside[i], -1.0)) * (~taken & inside[i]).float()
            if masks[i].sum() == 0:   # everything is held: its strongest cell of a holder that keeps others
                cells = masks.flatten(1)
                spare = cells[cells.sum(1) > 1].sum(0) > 0   # held by a concept with more than this one
                cell = int(norm[i].flatten().masked_fill(~spare, -1.0).argmax() if spare.any() else norm[i].argmax())
                masks.view(n, -1)[:, cell] = 0
                masks[i].view(-1)[cell] = 1
            taken |= masks[i] > 0
    return masks


def _split(area: torch.Tensor, weight: torch.Tensor, k: int, iterations: int = 20) -> list[torch.Tensor]:
    """k-means on the area's cell positions (weighted by attention), clusters left to right."""
    ys, xs = torch.nonzero(area, as_tuple=True)
    h, w = area.shape
    if len(xs) < k:   # too little to split: vertical strips of the image
        return [_strip(h, w, j, k) for j in range(k)]
    points = torch.stack([xs.float(), ys.float()], 1)
    wts = weight[ys, xs].clamp_min(1e-6)
    order = points[:, 0].argsort()
    centres = torch.stack([points[order[int((j + 0.5) * len(order) / k)]] for j in range(k)])
    for _ in range(iterations):
        label = torch.cdist(points, centres).argmin(1)
        for j in range(k):
            chosen = label == j
            if chosen.any():
                centres[j] = (points[chosen] * wts[chosen, None]).sum(0) / wts[chosen].sum()
    label = torch.cdist(points, centres).argmin(1)
    parts = []
    for j in centres[:, 0].argsort().tolist():
        part = torch.zeros(h, w)
        part[ys[label == j], xs[label == j]] = 1
        parts.append(part)
    return parts


def _split_by_faces(area: torch.Tensor, faces, k: int) -> list[torch.Tensor] | None:
    """The k largest faces seed the parts; each area cell joins the nearest face. None when
    there are fewer faces than people to place."""
    if faces is None or len(faces) < k:
        return None
    faces = torch.as_tensor(np.asarray(faces, dtype=np.float32)[:, :4])
    sizes = (faces[:, 2] - faces[:, 0]) * (faces[:, 3] - faces[:, 1])
    chosen = faces[sizes.argsort(descending=True)[:k]]
    centres = torch.stack([(chosen[:, 0] + chosen[:, 2]) / 2, (chosen[:, 1] + chosen[:, 3]) / 2], 1)
    centres = centres[centres[:, 0].argsort()]   # left to right
    h, w = area.shape
    ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    cells = torch.stack([xs.flatten(), ys.flatten()], 1)
    nearest = torch.cdist(cells, centres).argmin(1).view(h, w)
    return [(area & (nearest == j)).float() for j in range(k)]


def _strip(h: int, w: int, j: int, k: int) -> torch.Tensor:
    part = torch.zeros(h, w)
    part[:, round(j * w / k):round((j + 1) * w / k)] = 1
    return part


def _tidy(mask: torch.Tensor) -> torch.Tensor:
    """Close small gaps, fill holes, drop specks."""
    return torch.from_numpy(tidy(mask.numpy() > 0.5).astype(np.float32))


def _strongest_cells(norm: torch.Tensor) -> torch.Tensor:
    flat = norm.flatten()
    keep = max(1, int(FALLBACK_TOP * flat.numel()))
    mask = torch.zeros_like(flat)
    mask[flat.topk(keep).indices] = 1
    return mask.view_as(norm)
