"""Host adapters. `detect()` says which WebUI imported us; only that adapter is imported."""

from __future__ import annotations

import importlib.util

from ..job import JobError


def detect() -> str | None:
    """'forge', 'a1111' or None (not inside a WebUI, e.g. in tests)."""
    if importlib.util.find_spec("modules_forge") is not None and importlib.util.find_spec("backend") is not None:
        return "forge"
    if importlib.util.find_spec("modules") is not None and importlib.util.find_spec("modules.scripts") is not None:
        return "a1111"
    return None


def check_model_family(model) -> None:
    """SD1.x, SD2.x and SDXL have the UNet the engine hooks; SD3 and Flux (both hosts flag their
    family on the model) do not."""
    if not any(getattr(model, flag, False) for flag in ("is_sd1", "is_sd2", "is_sdxl")):
        family = next((name[3:] for name in ("is_sd3", "is_flux") if getattr(model, name, False)), None)
        raise JobError("model", f"{(family or type(model).__name__).upper()} checkpoints are not supported: "
                                "Multi-Concept works with SD1.5, SD2 and SDXL checkpoints")
