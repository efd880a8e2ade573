"""XYZ-plot axes of image concepts: appearance alpha, dilution beta and expand override the job,
checked as the job checks them."""

from types import SimpleNamespace

import pytest

from lib_mc.hosts.webui_xyz import XYZ_ATTR, apply_overrides, axis_specs
from lib_mc.job import JobError, parse_job


def test_image_concept_axes_override_the_job():
    specs = {label: (kind, apply, choices) for label, kind, apply, choices in axis_specs()}
    p = SimpleNamespace()
    for label, value in (("Appearance alpha", "0.3"), ("Dilution beta", "0.5"), ("Dilution expand", "0.05")):
        kind, apply, choices = specs[f"[Multi-Concept] {label}"]
        assert kind is float and choices is None   # numeric axes: ranges like 0.1-0.3 (+0.1) work
        apply(p, value, None)
    overrides = getattr(p, XYZ_ATTR)
    assert overrides == {"appearance_alpha": 0.3, "dilution_beta": 0.5, "dilution_expand": 0.05}
    job = apply_overrides(parse_job({"concepts": [{"name": "a"}]}), overrides)
    assert (job.appearance_alpha, job.dilution_beta, job.dilution_expand) == (0.3, 0.5, 0.05)
    with pytest.raises(JobError, match=r"^dilution_beta: must be <= 1, got 1.5"):
        apply_overrides(job, {"dilution_beta": 1.5})
