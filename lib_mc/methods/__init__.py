"""Sampling methods, one package each, chosen by the job's mode."""

from __future__ import annotations

from .base import SessionBase
from .blend import BlendSession
from .conductor import ConductorSession
from .regional import RegionalSession

SESSIONS: dict[str, type[SessionBase]] = {"blend": BlendSession, "regional": RegionalSession,
                                          "conductor": ConductorSession}


def make_session(mode: str, unet, plan, **kwargs) -> SessionBase:
    try:
        cls = SESSIONS[mode]
    except KeyError:
        raise ValueError(f"unknown mode {mode!r}; known: {', '.join(SESSIONS)}") from None
    return cls(unet, plan, **kwargs)
