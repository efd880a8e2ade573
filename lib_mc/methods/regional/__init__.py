"""LoRA-Composer's one pass: every concept acts in its region inside the host's own UNet calls."""

from .session import RegionalSession

__all__ = ["RegionalSession"]
