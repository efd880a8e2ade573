"""One session's face concepts: where their faces go (placed once the layout is known) and,
per UNet call, the rows each face concept holds with their identity tokens and keypoint hint."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..calls import CallImages
from .placement import hint_image, place_faces


@dataclass
class FaceRows:
    rows: slice                  # the concept's rows in the call
    tokens: torch.Tensor         # (rows, T, D) identity tokens (cond rows) / the negative (uncond rows)
    hint: torch.Tensor | None    # (rows, 3, H, W) the keypoints drawn where the face goes, in [0, 1]
    weight: float
    control: float


def face_batch(plan) -> "FaceBatch | None":
    return FaceBatch(plan) if plan.face_concepts else None


class FaceBatch:
    def __init__(self, plan):
        self.plan = plan
        self._hints: dict[tuple, torch.Tensor] = {}

    def place(self, layout_faces: list | None) -> None:
        """layout_faces[b]: faces found in image b's layout (None: none looked for)."""
        self.plan.face_kps = place_faces(self.plan, layout_faces)
        self._hints.clear()

    def _hint(self, index: int, image: int, image_hw: tuple[int, int], like: torch.Tensor) -> torch.Tensor:
        if self.plan.face_kps is None:   # no layout seen (drawn regions from the first step): the region's top
            self.plan.face_kps = place_faces(self.plan)
        key = (index, image, image_hw, like.device, like.dtype)
        if key not in self._hints:
            per_image = self.plan.face_kps[index]
            self._hints[key] = hint_image(per_image[min(image, len(per_image) - 1)], image_hw).to(like.device, like.dtype)
        return self._hints[key]

    def rows(self, groups, images: CallImages, x: torch.Tensor) -> dict[int, FaceRows]:
        """The face concepts' rows of one call (`groups`: its RowPlan); x: the call's latent."""
        faces = {}
        image_hw = (x.shape[-2] * 8, x.shape[-1] * 8)
        for group in groups.concepts():
            concept = self.plan.concepts[group.index]
            face = concept.face
            if face is None or not face.acts or group.size == 0:
                continue
            row_images = list(images.cond[:group.n_cond]) + list(images.uncond[:group.n_uncond])
            tokens = torch.cat([face.cond_tokens] * group.n_cond + [face.uncond_tokens] * group.n_uncond)
            hint = None
            if face.control > 0:
                hint = torch.stack([self._hint(group.index, b, image_hw, x) for b in row_images])
            faces[group.index] = FaceRows(group.rows, tokens.to(x.device, x.dtype), hint, face.weight, face.control)
        return faces
