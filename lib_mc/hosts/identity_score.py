"""The identity score of face concepts: per generated image and concept with face photos, the
ArcFace cosine similarity between the photos and the face found in the concept's region (the
metric the papers report), written to the infotext as `Multi-Concept identity: alice 0.61, bob
no face`. The WebUI calls `postprocess_image` for each image before it writes its infotext."""

from __future__ import annotations

import numpy as np

from ..methods.faces.placement import region_mask
from . import webui_models

KEY = "Multi-Concept identity"


class IdentityInfotext:
    """The value the WebUI calls with each image's `index`: that image's scores (None: none)."""

    def __init__(self, state):
        self.state = state

    def __call__(self, index=None, **kwargs) -> str | None:
        return self.state.identity.get(index or 0)


def wants_score(job) -> bool:
    return any(getattr(c, "faces", None) for c in getattr(job, "concepts", None) or [])


def score_image(p, state, image) -> None:
    """Scores for this image (p.batch_index of the current batch) into state.identity."""
    prepared = state.prepared
    if prepared is None or state.error is not None:
        return
    plan = prepared.plan
    scored = [(i, c) for i, c in enumerate(plan.concepts) if c.face is not None]
    if not scored:
        return
    try:
        analysis = webui_models.face_analysis()
    except Exception as exc:   # the photos were embedded with it; a later failure only costs the score
        print(f"[Multi-Concept] identity score: {exc}")
        return
    b = int(getattr(p, "batch_index", 0) or 0)
    index = int(getattr(p, "iteration", 0) or 0) * int(getattr(p, "batch_size", 1) or 1) + b
    per_image = plan.image_regions or [plan.regions]
    regions = per_image[min(b, len(per_image) - 1)]
    pixels = np.asarray(image.convert("RGB"))
    state.identity[index] = identity_text(analysis, pixels, regions, scored)


def identity_text(analysis, pixels: np.ndarray, regions, scored: list) -> str:
    """'alice 0.61, bob no face': each scored concept's similarity in its region."""
    from ..faces.identity import score_in_region
    parts = []
    for index, concept in scored:
        region = region_mask(regions, index, pixels.shape[:2])
        score = score_in_region(analysis, pixels, region, concept.face.embedding)
        parts.append(f"{concept.name} {score:.2f}" if score is not None else f"{concept.name} no face")
    return ", ".join(parts)
