"""A1111's callback registry, as far as scripts register at import: callbacks kept, never run here."""

registered: dict[str, list] = {}


def on_before_ui(callback):
    registered.setdefault("before_ui", []).append(callback)


def on_ui_settings(callback):
    registered.setdefault("ui_settings", []).append(callback)
