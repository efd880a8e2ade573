"""Multi-Concept engine: host-independent two-stage multi-concept sampling.

Nothing in this package imports the WebUI; host adapters live in `lib_mc.hosts`.
"""

from .errors import EngineError, LoraMismatchError, MultiConceptError, PlanError

__all__ = ["EngineError", "LoraMismatchError", "MultiConceptError", "PlanError"]
