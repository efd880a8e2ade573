from .session import ConductorSession

__all__ = ["ConductorSession"]
