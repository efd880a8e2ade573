"""Grounding DINO boxes for automatic regions (transformers' implementation; original checkpoints
converted on load)."""

from .files import find_checkpoint, missing_message
from .model import Detection, DinoModels, GroundingDino

__all__ = ["find_checkpoint", "missing_message", "Detection", "DinoModels", "GroundingDino"]
