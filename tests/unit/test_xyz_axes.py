"""XYZ-plot axes: each value lands as an override of the job that `process` applies."""

from types import SimpleNamespace

import pytest

from lib_mc.hosts.webui_xyz import XYZ_ATTR, apply_overrides, axis_specs
from lib_mc.job import JobError, parse_job


def test_axes_cover_enabled_and_start_at_and_accumulate_overrides():
    specs = {label: (kind, apply, choices) for label, kind, apply, choices in axis_specs()}
    p = SimpleNamespace()
    specs["[Multi-Concept] Start blending at"][1](p, "0.45", None)
    specs["[Multi-Concept] Enabled"][1](p, "False", None)
    specs["[Multi-Concept] Keep the layout (attention replay)"][1](p, "True", None)
    specs["[Multi-Concept] Grow automatic regions (px)"][1](p, "-8", None)
    assert getattr(p, XYZ_ATTR) == {"start_at": 0.45, "enabled": False, "layout_replay": True, "auto_grow": -8.0}
    assert specs["[Multi-Concept] Enabled"][2]() == ["True", "False"]


def test_regional_axes_set_the_mode_and_its_options():
    specs = {label: (kind, apply, choices) for label, kind, apply, choices in axis_specs()}
    p = SimpleNamespace()
    specs["[Multi-Concept] Mode"][1](p, "Regional", None)
    specs["[Multi-Concept] Concept isolation (regional)"][1](p, "False", None)
    specs["[Multi-Concept] Isolation until (regional)"][1](p, "0.6", None)
    specs["[Multi-Concept] Re-initialise latents (regional)"][1](p, "True", None)
    specs["[Multi-Concept] Concept enhancement (regional)"][1](p, "true", None)
    overrides = getattr(p, XYZ_ATTR)
    assert overrides == {"mode": "regional", "isolation": False, "isolation_until": 0.6, "reinit": True,
                         "enhance": True}
    assert specs["[Multi-Concept] Mode"][2]() == ["blend", "regional", "conductor"]
    assert specs["[Multi-Concept] Concept isolation (regional)"][2]() == ["True", "False"]
    assert specs["[Multi-Concept] Concept enhancement (regional)"][2]() == ["True", "False"]
    job = apply_overrides(parse_job({"concepts": [{"name": "a"}]}), overrides)
    assert (job.mode, job.isolation, job.isolation_until, job.reinit) == ("regional", False, 0.6, True)
    assert job.enhance is True
    specs["[Multi-Concept] Concept enhancement (regional)"][1](p, "False", None)
    assert apply_overrides(job, getattr(p, XYZ_ATTR)).enhance is False


def test_an_axis_value_is_checked_as_the_job_checks_it():
    auto = parse_job({"start_at": 0, "concepts": [{"name": "a", "class_word": "man", "region": {"type": "auto"}}]})
    assert apply_overrides(auto, {}) is auto
    with pytest.raises(JobError, match="^start_at: automatic regions in regional mode are found at start_at"):
        apply_overrides(auto, {"mode": "regional"})
    with pytest.raises(JobError, match="^mode: must be one of blend, regional, conductor, got 'mixed'"):
        apply_overrides(auto, {"mode": "mixed"})
    with pytest.raises(JobError, match=r"^isolation_until: must be <= 1, got 1.5 \(a regional-mode option\)"):
        apply_overrides(auto, {"isolation_until": 1.5})


def test_conductor_axes_set_the_mode_and_its_options():
    specs = {label: (kind, apply, choices) for label, kind, apply, choices in axis_specs()}
    p = SimpleNamespace()
    specs["[Multi-Concept] Mode"][1](p, "Conductor", None)
    specs["[Multi-Concept] Mask refinement (conductor)"][1](p, "False", None)
    specs["[Multi-Concept] Alignment until (conductor)"][1](p, "0.2", None)
    specs["[Multi-Concept] Alignment step (conductor)"][1](p, "20", None)
    overrides = getattr(p, XYZ_ATTR)
    assert overrides == {"mode": "conductor", "mask_refine": False, "align_until": 0.2, "align_step": 20.0}
    assert specs["[Multi-Concept] Mask refinement (conductor)"][2]() == ["True", "False"]
    assert specs["[Multi-Concept] Alignment until (conductor)"][0] is float
    job = apply_overrides(parse_job({"concepts": [{"name": "a"}]}), overrides)
    assert (job.mode, job.mask_refine, job.align_until, job.align_step) == ("conductor", False, 0.2, 20.0)
    with pytest.raises(JobError, match=r"^align_until: must be <= 1, got 3 \(a conductor-mode option\)"):
        apply_overrides(job, {"align_until": 3.0})


def test_face_axes_set_every_face_concept_and_no_other():
    import base64
    import io
    from PIL import Image
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 150, 120)).save(buffer, format="PNG")
    photo = base64.b64encode(buffer.getvalue()).decode("ascii")
    specs = {label: (kind, apply, choices) for label, kind, apply, choices in axis_specs()}
    p = SimpleNamespace()
    specs["[Multi-Concept] Face weight (every face concept)"][1](p, "0.5", None)
    specs["[Multi-Concept] Face control (every face concept)"][1](p, "1.2", None)
    job = parse_job({"concepts": [{"name": "alice", "faces": [photo]}, {"name": "plain"},
                                  {"name": "bob", "faces": [photo], "face_weight": 0.3}]})
    moved = apply_overrides(job, getattr(p, XYZ_ATTR))
    assert [(c.face_weight, c.face_control) for c in moved.concepts] == [(0.5, 1.2), (0.8, 0.8), (0.5, 1.2)]
    assert moved.concepts[0].faces == [photo] and not moved.concepts[1].faces
    with pytest.raises(JobError, match=r"concepts\[0\]\.face_weight: must be <= 2"):
        apply_overrides(job, {"face_weight": 2.5})
