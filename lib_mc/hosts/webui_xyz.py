"""XYZ-plot axes: the values land in `p.multi_concept_xyz` and override the job in `process`."""

from __future__ import annotations

XYZ_ATTR = "multi_concept_xyz"


def _setter(key, convert):
    def apply(p, value, values):
        overrides = dict(getattr(p, XYZ_ATTR, None) or {})
        overrides[key] = convert(value)
        setattr(p, XYZ_ATTR, overrides)
    return apply


def _to_bool(value) -> bool:
    return str(value).strip().lower() in ("true", "1", "yes", "on", "enabled")


def axis_specs():
    """(label, type, apply, choices) per axis; kept plain so tests can check them."""
    return [
        ("[Multi-Concept] Enabled", str, _setter("enabled", _to_bool), lambda: ["True", "False"]),
        ("[Multi-Concept] Start blending at", float, _setter("start_at", float), None),
        ("[Multi-Concept] Keep the layout (attention replay)", str, _setter("layout_replay", _to_bool),
         lambda: ["True", "False"]),
        ("[Multi-Concept] Keep the layout's shapes until", float, _setter("self_attn_replay_until", float), None),
        ("[Multi-Concept] Mask feather", float, _setter("feather", float), None),
        ("[Multi-Concept] Grow automatic regions (px)", float, _setter("auto_grow", float), None),
    ]


def _xyz_module():
    import modules.scripts as scripts
    for data in scripts.scripts_data:
        if data.script_class.__module__ in ("xyz_grid.py", "scripts.xyz_grid") and hasattr(data, "module"):
            return data.module
    return None


def _add_axes():
    xyz = _xyz_module()
    if xyz is None:
        return
    labels = {option.label for option in xyz.axis_options}
    for label, kind, apply, choices in axis_specs():
        if label not in labels:
            option = xyz.AxisOption(label, kind, apply, choices=choices) if choices else xyz.AxisOption(label, kind, apply)
            xyz.axis_options.append(option)


def register_xyz_axes():
    """After all scripts load (the XYZ script may load after us)."""
    from modules import script_callbacks
    script_callbacks.on_before_ui(_add_axes)
