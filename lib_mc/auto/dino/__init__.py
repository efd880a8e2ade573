"""Grounding DINO boxes for automatic regions: transformers' implementation (original checkpoints
converted on load), or with a transformers older than 4.40 IDEA-Research's own code (original.py)."""

from .files import find_checkpoint, missing_message
from .model import Detection, DinoModels, GroundingDino, load
from .original import OriginalGroundingDino

__all__ = ["find_checkpoint", "missing_message", "Detection", "DinoModels", "GroundingDino", "OriginalGroundingDino",
           "load"]
