"""Grounding DINO's detections in one layout image -> one box per automatic concept.

Concepts are matched by their class word (the phrase Grounding DINO was prompted with): the k
concepts named by one word take that word's k best boxes, ordered left to right and handed out
as a shared word's area is (hints "left", "right", "largest" first, then list order). A box
drawn by the user wins: that concept keeps it, and detections centred in it are left to it.
One person found under two words ("man", "person") goes to the word that scored it higher.
"""

from __future__ import annotations

from typing import Sequence

from .masks import assign_parts

SAME_SUBJECT_IOU = 0.6   # two words' boxes overlapping this much are one subject


def iou(a, b) -> float:
    """Intersection over union of two (x, y, w, h) boxes."""
    ix = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


def _centre_in(box, area) -> bool:
    cx, cy = box[0] + box[2] / 2, box[1] + box[3] / 2
    return area[0] <= cx < area[0] + area[2] and area[1] <= cy < area[1] + area[3]


def assign_boxes(detections: dict, words: Sequence[str], hints: Sequence[str], drawn: Sequence,
                 names: Sequence[str]) -> tuple[list, list[str]]:
    """detections[word]: that word's detections (`.box` (x, y, w, h) fractions, `.score`), best
    first; words[i], hints[i], drawn[i], names[i]: automatic concept i's class word, hint, drawn
    box and name.
    Returns (per concept its box or None, notes on concepts no box was found for)."""
    boxes = [tuple(box) if box is not None else None for box in drawn]
    # words whose best detection scores higher choose first
    order = sorted(dict.fromkeys(words), key=lambda w: -max((d.score for d in detections.get(w, ())), default=0.0))
    taken: list = [box for box in boxes if box is not None]
    notes = []
    for word in order:
        members = [i for i, w in enumerate(words) if w == word]
        free = [i for i in members if boxes[i] is None]
        if not free:
            continue
        candidates = [d for d in detections.get(word, ())
                      if not any(_centre_in(d.box, boxes[i]) for i in members if boxes[i] is not None)
                      and not any(iou(d.box, t) >= SAME_SUBJECT_IOU for t in taken)]
        chosen = sorted((d.box for d in candidates[:len(free)]), key=lambda b: b[0] + b[2] / 2)
        for member, box in assign_parts(chosen, free, list(hints), size=lambda b: b[2] * b[3]).items():
            boxes[member] = box
            taken.append(box)
        missing = [i for i in free if boxes[i] is None]
        if missing:
            notes.append(f"Grounding DINO found {len(chosen)} '{word}' for {len(free)} concept(s): "
                         f"{', '.join(repr(names[i]) for i in missing)} searched the whole image")
    return boxes, notes
