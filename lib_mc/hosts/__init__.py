"""Host adapters. `detect()` says which WebUI imported us; only that adapter is imported."""

from __future__ import annotations

import importlib.util


def detect() -> str | None:
    """'forge', 'a1111' or None (not inside a WebUI, e.g. in tests)."""
    if importlib.util.find_spec("modules_forge") is not None and importlib.util.find_spec("backend") is not None:
        return "forge"
    if importlib.util.find_spec("modules") is not None and importlib.util.find_spec("modules.scripts") is not None:
        return "a1111"
    return None
