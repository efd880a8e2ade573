"""XYZ-plot axes: the values land in `p.multi_concept_xyz` and override the job in `process`."""

from __future__ import annotations

from ..job import MODES, Job, parse_job

XYZ_ATTR = "multi_concept_xyz"
# axes that set a field of every face concept (a concept with face photos), not of the job
FACE_FIELDS = ("face_weight", "face_control")


def _setter(key, convert):
    def apply(p, value, values):
        overrides = dict(getattr(p, XYZ_ATTR, None) or {})
        overrides[key] = convert(value)
        setattr(p, XYZ_ATTR, overrides)
    return apply


def _to_bool(value) -> bool:
    return str(value).strip().lower() in ("true", "1", "yes", "on", "enabled")


def _to_mode(value) -> str:
    """A mode as the axis lists it, any case; anything else is left for the job to name."""
    text = str(value).strip().lower()
    return text if text in MODES else str(value)


def apply_overrides(job: Job, overrides: dict) -> Job:
    """The job with the axis values of one cell, checked as a job is: a bad value (a mode that
    does not exist, regional mode with an automatic region and start_at 0) stops the job naming
    its field, like the same value in the panel or the API."""
    if not overrides:
        return job
    data = job.to_dict()
    top = {k: v for k, v in overrides.items() if k not in FACE_FIELDS}
    for concept in data["concepts"]:
        if concept.get("faces"):
            concept.update({k: v for k, v in overrides.items() if k in FACE_FIELDS})
    return parse_job({**data, **top})


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
        ("[Multi-Concept] Mode", str, _setter("mode", _to_mode), lambda: list(MODES)),
        ("[Multi-Concept] Concept isolation (regional)", str, _setter("isolation", _to_bool),
         lambda: ["True", "False"]),
        ("[Multi-Concept] Isolation until (regional)", float, _setter("isolation_until", float), None),
        ("[Multi-Concept] Re-initialise latents (regional)", str, _setter("reinit", _to_bool),
         lambda: ["True", "False"]),
        ("[Multi-Concept] Concept enhancement (regional)", str, _setter("enhance", _to_bool),
         lambda: ["True", "False"]),
        ("[Multi-Concept] Mask refinement (conductor)", str, _setter("mask_refine", _to_bool),
         lambda: ["True", "False"]),
        ("[Multi-Concept] Alignment until (conductor)", float, _setter("align_until", float), None),
        ("[Multi-Concept] Alignment step (conductor)", float, _setter("align_step", float), None),
        ("[Multi-Concept] Appearance alpha", float, _setter("appearance_alpha", float), None),
        ("[Multi-Concept] Dilution beta", float, _setter("dilution_beta", float), None),
        ("[Multi-Concept] Dilution expand", float, _setter("dilution_expand", float), None),
        ("[Multi-Concept] Face weight (every face concept)", float, _setter("face_weight", float), None),
        ("[Multi-Concept] Face control (every face concept)", float, _setter("face_control", float), None),
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
