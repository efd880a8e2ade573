"""XYZ-plot axes: each value lands as an override of the job that `process` applies."""

from types import SimpleNamespace

from lib_mc.hosts.webui_xyz import XYZ_ATTR, axis_specs


def test_axes_cover_enabled_and_start_at_and_accumulate_overrides():
    specs = {label: (kind, apply, choices) for label, kind, apply, choices in axis_specs()}
    p = SimpleNamespace()
    specs["[Multi-Concept] Start blending at"][1](p, "0.45", None)
    specs["[Multi-Concept] Enabled"][1](p, "False", None)
    specs["[Multi-Concept] Keep the layout (attention replay)"][1](p, "True", None)
    specs["[Multi-Concept] Grow automatic regions (px)"][1](p, "-8", None)
    assert getattr(p, XYZ_ATTR) == {"start_at": 0.45, "enabled": False, "layout_replay": True, "auto_grow": -8.0}
    assert specs["[Multi-Concept] Enabled"][2]() == ["True", "False"]
