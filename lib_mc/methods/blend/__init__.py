"""OMG's two-stage method: a layout pass, then every concept's branch blended under its mask."""

from .session import BlendSession, Recorded

__all__ = ["BlendSession", "Recorded"]
