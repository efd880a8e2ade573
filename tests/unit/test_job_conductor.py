"""Conductor mode in the job schema: its options, the reference picture, a concept's identity
words, when its concepts start, and errors that name the field and the mode."""

import base64
import io

import pytest
from PIL import Image

from lib_mc.job import MODE_OF_OPTION, MODES, JobError, parse_job

CONCEPT = {"name": "alice", "class_word": "woman", "region": {"type": "rect", "x": 0, "y": 0, "w": 0.5, "h": 1}}
AUTO = {"name": "bob", "class_word": "man", "region": {"type": "auto"}}


def png(size=(16, 12), colour=(200, 30, 30)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def test_conductor_is_a_mode_with_the_papers_defaults():
    assert MODES == ("blend", "regional", "conductor")
    job = parse_job({"mode": "conductor", "concepts": [CONCEPT]})
    assert (job.mode, job.mask_refine, job.mask_refine_from, job.mask_refine_until, job.mask_refine_every,
            job.mask_refine_k, job.reference, job.align_until, job.align_step) == \
        ("conductor", True, 0.25, 0.4, 0.025, 0, "", 0.3, 0.0)
    assert job.concepts[0].token == ""
    for key in ("mask_refine", "mask_refine_from", "mask_refine_until", "mask_refine_every", "mask_refine_k",
                "reference", "align_until", "align_step"):
        assert MODE_OF_OPTION[key] == "conductor"


def test_conductor_options_and_a_token_round_trip():
    job = parse_job({"mode": "conductor", "mask_refine": False, "mask_refine_from": 0.1, "mask_refine_until": 0.5,
                     "mask_refine_every": 0.05, "mask_refine_k": 4.0, "reference": png(), "align_until": 0.2,
                     "align_step": 25, "concepts": [{**CONCEPT, "token": "  alice   woman "}]})
    assert (job.mask_refine, job.mask_refine_from, job.mask_refine_until, job.mask_refine_every) == \
        (False, 0.1, 0.5, 0.05)
    assert job.mask_refine_k == 4 and isinstance(job.mask_refine_k, int)   # a number box's 4.0
    assert (job.align_until, job.align_step, job.reference) == (0.2, 25.0, png())
    assert job.concepts[0].token == "alice woman"   # spaces as one
    data = job.to_dict()
    assert data["concepts"][0]["token"] == "alice woman" and data["reference"] == png()
    assert parse_job(data) == job


@pytest.mark.parametrize("change, field, problem", [
    ({"mask_refine": "on"}, "mask_refine", "must be true or false, got 'on'"),
    ({"mask_refine_from": 1.5}, "mask_refine_from", "must be <= 1, got 1.5"),
    ({"mask_refine_until": -0.1}, "mask_refine_until", "must be >= 0, got -0.1"),
    ({"mask_refine_from": 0.5, "mask_refine_until": 0.3}, "mask_refine_until", "must be >= mask_refine_from"),
    ({"mask_refine_every": 0}, "mask_refine_every", "must be > 0, got 0"),
    ({"mask_refine_k": 2.5}, "mask_refine_k", "must be a whole number, got 2.5"),
    ({"mask_refine_k": -1}, "mask_refine_k", "must be >= 0, got -1"),
    ({"mask_refine_k": 100}, "mask_refine_k", "must be <= 32"),
    ({"mask_refine_k": True}, "mask_refine_k", "must be a number"),
    ({"reference": 7}, "reference", "must be a base64 PNG"),
    ({"reference": "A" * (23 * 2 ** 20)}, "reference", "is larger than 16 MB"),
    ({"align_until": 2}, "align_until", "must be <= 1, got 2"),
    ({"align_step": -10}, "align_step", "must be >= 0, got -10"),
    ({"align_step": "big"}, "align_step", "must be a number"),
])
def test_bad_conductor_options_are_named_as_conductor_options(change, field, problem):
    with pytest.raises(JobError, match=rf"^{field}: {problem}.*\(a conductor-mode option\)$"):
        parse_job({"mode": "conductor", "concepts": [CONCEPT], **change})


def test_a_bad_token_is_named():
    with pytest.raises(JobError, match=r"^concepts\[0\]\.token: must be text"):
        parse_job({"concepts": [{**CONCEPT, "token": ["alice"]}]})


def test_conductor_starts_at_once_with_drawn_regions_or_a_reference_and_later_for_automatic_ones():
    drawn = parse_job({"mode": "conductor", "concepts": [CONCEPT]})
    assert drawn.start_fraction(False) == 0.0
    auto = parse_job({"mode": "conductor", "concepts": [CONCEPT, AUTO]})
    assert auto.start_fraction(True) == 0.3
    referenced = parse_job({"mode": "conductor", "reference": png(), "concepts": [CONCEPT, AUTO]})
    assert referenced.start_fraction(True) == 0.0   # found in the reference while it is inverted
    assert parse_job({"mode": "conductor", "start_at": 0.2, "reference": png(),
                      "concepts": [AUTO]}).start_fraction(True) == 0.2
    assert parse_job({"reference": png(), "concepts": [CONCEPT]}).start_fraction(False) == 0.3   # blend


def test_conductor_refuses_automatic_regions_from_the_first_step_without_a_reference():
    with pytest.raises(JobError, match="^start_at: automatic regions in conductor mode without a reference "
                                       "picture are found at start_at: it must be > 0"):
        parse_job({"mode": "conductor", "start_at": 0, "concepts": [CONCEPT, AUTO]})
    assert parse_job({"mode": "conductor", "start_at": 0, "reference": png(), "concepts": [AUTO]}).start_at == 0
    assert parse_job({"mode": "conductor", "start_at": 0, "concepts": [CONCEPT]}).start_at == 0
