"""Job -> Plan for conductor mode: its options reach the plan, its start defaults, and a
reference picture that does not decode stops the job naming `reference`."""

import base64

import pytest

from lib_mc.job import JobError
from test_job_conductor import png
from test_prepare import Services, job, run
from tinyhost import make_unet

LEFT = {"name": "him", "class_word": "man", "region": {"type": "rect", "x": 0, "y": 0, "w": 0.5, "h": 1}}
AUTO = {"name": "her", "class_word": "woman", "region": {"type": "auto"}}


@pytest.fixture(scope="module")
def unet():
    return make_unet()


def test_conductor_options_reach_the_plan(unet):
    prepared, _ = run(unet, Services({}), job(LEFT, mode="conductor", mask_refine=False, mask_refine_from=0.1,
                                              mask_refine_until=0.6, mask_refine_every=0.1, mask_refine_k=5,
                                              align_until=0.2, align_step=12))
    o = prepared.plan.options
    assert (o.mask_refine, o.mask_refine_from, o.mask_refine_until, o.mask_refine_every, o.mask_refine_k) == \
        (False, 0.1, 0.6, 0.1, 5)
    assert (o.align_until, o.align_step, o.start_at) == (0.2, 12.0, 0.0)
    defaults, _ = run(unet, Services({}), job(LEFT, mode="conductor"))
    d = defaults.plan.options
    assert (d.mask_refine, d.mask_refine_from, d.mask_refine_until, d.mask_refine_every, d.mask_refine_k,
            d.align_until, d.align_step) == (True, 0.25, 0.4, 0.025, 0, 0.3, 0.0)


def test_automatic_regions_start_later_unless_a_reference_gives_them(unet):
    later, _ = run(unet, Services({}), job(LEFT, AUTO, mode="conductor"))
    at_once, _ = run(unet, Services({}), job(LEFT, AUTO, mode="conductor", reference=png()))
    assert (later.plan.options.start_at, at_once.plan.options.start_at) == (0.3, 0.0)


@pytest.mark.parametrize("reference, problem", [
    ("not base64 at all!", "cannot be decoded as a PNG image"),
    (base64.b64encode(b"just some bytes, no picture").decode(), "cannot be decoded as a PNG image"),
])
def test_a_reference_that_is_no_picture_is_named(unet, reference, problem):
    with pytest.raises(JobError, match=rf"^reference: {problem}.*\(a conductor-mode option\)$"):
        run(unet, Services({}), job(LEFT, mode="conductor", reference=reference))
    run(unet, Services({}), job(LEFT, reference=reference))   # blend does not read it
