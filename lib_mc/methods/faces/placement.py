"""Where each face concept's face goes, per image: the face found in the layout (the layout
pass's image in blend mode, the x0 prediction at the start step in conductor mode) inside the
concept's region, else the photo's face shape placed in the upper part of the region. The
keypoints are kept as fractions of the image, so the hires pass draws them at its own size."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def region_mask(regions, index: int, image_hw: tuple[int, int]) -> np.ndarray:
    """Concept `index`'s region (front-to-back composited weights > 0.5) at image pixels."""
    weights = regions.latent[index + 1].float()
    up = F.interpolate(weights[None, None], size=image_hw, mode="nearest")[0, 0]
    return (up > 0.5).cpu().numpy()


def place_faces(plan, layout_faces: list | None = None) -> dict[int, list[np.ndarray]]:
    """concept -> per image (5, 2) keypoints in image fractions (x / W, y / H).
    layout_faces[b]: the faces found in image b's layout (largest first), or None."""
    from ...faces.identity import in_region
    from ...faces.keypoints import default_face_box, place
    hw = tuple(plan.image_size)
    per_image = plan.image_regions or [plan.regions]
    images = max(len(per_image), len(layout_faces) if layout_faces else 1)
    scale = np.array([hw[1], hw[0]], dtype=np.float64)
    placed: dict[int, list[np.ndarray]] = {i: [] for i in plan.face_concepts}
    for b in range(images):
        regions = per_image[min(b, len(per_image) - 1)]
        faces = list(layout_faces[min(b, len(layout_faces) - 1)]) if layout_faces else []
        for i in sorted(plan.face_concepts, key=lambda c: -_front(plan, c)):   # the front concept picks first
            region = region_mask(regions, i, hw)
            k = next((k for k, f in enumerate(faces) if in_region(f.box, region)), None)
            if k is not None:   # taken: a face is one concept's (Face holds arrays: pop by position)
                kps = np.asarray(faces.pop(k).kps, dtype=np.float64)
            else:
                kps = place(plan.concepts[i].face.kps_in_box, default_face_box(region))
            placed[i].append(np.asarray(kps, dtype=np.float64).reshape(5, 2) / scale)
    return placed


def _front(plan, index: int) -> int:
    return plan.back_to_front().index(index)


def hint_image(kps_fraction: np.ndarray, image_hw: tuple[int, int]) -> torch.Tensor:
    """(3, H, W) in [0, 1]: the keypoints drawn as InstantID draws them, at this size."""
    from ...faces.keypoints import draw_kps
    kps = np.asarray(kps_fraction) * np.array([image_hw[1], image_hw[0]])
    drawn = draw_kps(tuple(image_hw), kps)
    return torch.from_numpy(np.ascontiguousarray(drawn)).permute(2, 0, 1).float() / 255.0
