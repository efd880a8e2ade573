"""The engine's entry points. Each sampling method is a package of its own under `methods/`
(`blend`: OMG's two stages; `regional`: LoRA-Composer's one pass) over the shared parts (plan,
masks, rows, LoRA ops, attention hooks, automatic regions); `make_session` picks one by mode."""

from __future__ import annotations

from .methods import SESSIONS, make_session
from .methods.base import HostPass, SessionBase
from .methods.blend import BlendSession, Recorded
from .methods.calls import CallImages, Stats

MultiConceptSession = BlendSession   # the two-stage session, as hosts and tests knew it

__all__ = ["SESSIONS", "make_session", "HostPass", "SessionBase", "BlendSession", "Recorded", "CallImages", "Stats",
           "MultiConceptSession"]
