"""A concept's identity from its face photos, and how close a generated face is to it (the
ArcFace cosine similarity the papers report)."""

from __future__ import annotations

import numpy as np

from ..job import JobError
from .analysis import cosine


def reference_embedding(analysis, pictures: list[np.ndarray], field: str = "faces") -> tuple[np.ndarray, np.ndarray]:
    """(mean raw embedding of each photo's largest face, (5, 2) keypoints of the first photo's face
    as fractions of its box). InstantID's pipeline feeds the raw embedding; averaging photos keeps
    that scale."""
    embeddings, kps_in_box = [], None
    for k, picture in enumerate(pictures):
        found = analysis.faces(picture, embed=False)
        if not found:
            raise JobError(f"{field}[{k}]", "no face found in this photo; use a photo where the face is clearly "
                                            "visible, frontal and not too small")
        face = found[0]
        embeddings.append(np.asarray(analysis.embed(picture, face.kps), dtype=np.float64))
        if kps_in_box is None:
            size = np.maximum(face.box[2:4] - face.box[:2], 1e-6)
            kps_in_box = (np.asarray(face.kps, dtype=np.float64) - face.box[:2]) / size
    if not embeddings:
        raise JobError(field, "no face photos given")
    return np.mean(embeddings, axis=0), kps_in_box


def score_in_region(analysis, image: np.ndarray, region: np.ndarray, reference: np.ndarray) -> float | None:
    """Cosine similarity between the reference and the largest face whose box centre lies in the
    region ((H, W) at the image's size); None when no face is there."""
    for face in analysis.faces(image, embed=False):   # largest first
        if in_region(face.box, region):
            return cosine(analysis.embed(image, face.kps), reference)
    return None


def in_region(box, region: np.ndarray) -> bool:
    """A face belongs to a region when its box centre lies in it ((H, W), > 0.5 = inside)."""
    x0, y0, x1, y1 = (float(v) for v in box[:4])
    cx, cy = int((x0 + x1) / 2), int((y0 + y1) / 2)
    h, w = np.shape(region)
    return 0 <= cy < h and 0 <= cx < w and float(region[cy][cx]) > 0.5
