"""What a face concept carries into the plan: its identity tokens (InstantID's IP-Adapter
Resampler over the photos' ArcFace embedding), the scales, where its face sits in the photo
(for placing the keypoints) and the embedding the identity score compares against."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class FaceIdentity:
    embedding: np.ndarray                  # (512,) raw ArcFace embedding, averaged over the photos
    kps_in_box: np.ndarray                 # (5, 2) the first photo's keypoints in its face box (0..1)
    weight: float = 0.8                    # IP-Adapter scale: identity tokens in its cross-attention
    control: float = 0.8                   # IdentityNet scale: keypoint control residuals
    cond_tokens: torch.Tensor | None = None     # (1, T, D) identity tokens (None: score only)
    uncond_tokens: torch.Tensor | None = None   # (1, T, D) the Resampler over zeros (InstantID's negative)

    @property
    def acts(self) -> bool:
        """False: the photos only serve the identity score."""
        return self.cond_tokens is not None and (self.weight > 0 or self.control > 0)


@dataclass
class InstantID:
    """The job's InstantID models: the IP-Adapter (its to_k_ip / to_v_ip per cross-attention,
    by the host UNet's module names) and the IdentityNet (None when no concept uses control)."""
    ip_layers: dict[str, tuple[torch.Tensor, torch.Tensor]]
    identitynet: torch.nn.Module | None = None
