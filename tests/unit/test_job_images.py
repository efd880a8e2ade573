"""Image concepts and the kept background in the job schema: the pictures (a concept's reference
and its mask, the job's background) and the PnP-MIX options, their defaults, round trip, and
errors that name the field."""

import base64
import io

import pytest
from PIL import Image

from lib_mc.job import IMAGE_OPTIONS, MODE_OF_OPTION, JobError, parse_job

RECT = {"type": "rect", "x": 0, "y": 0, "w": 0.5, "h": 1}


def png(size=(16, 12), colour=(200, 30, 30), kind="PNG") -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format=kind)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def concept(**extra):
    return {"name": "dog", "class_word": "dog", "region": RECT, **extra}


def test_defaults_are_the_papers():
    job = parse_job({"concepts": [concept()]})
    assert (job.background, job.keep_background, job.appearance_alpha, job.dilution_beta, job.dilution_expand) == \
        ("", True, 0.15, 0.8, 0.1)
    assert (job.concepts[0].reference, job.concepts[0].reference_mask) == ("", "")
    assert not set(IMAGE_OPTIONS) & set(MODE_OF_OPTION)   # read by blend and conductor alike
    data = job.to_dict()
    assert data["background"] is None and "reference" not in data["concepts"][0]


@pytest.mark.parametrize("mode", ["blend", "conductor"])
def test_an_image_concept_and_a_background_round_trip(mode):
    job = parse_job({"mode": mode, "background": {"png": png((32, 32))}, "keep_background": False,
                     "appearance_alpha": 0.3, "dilution_beta": 0.5, "dilution_expand": 0.2,
                     "concepts": [concept(reference={"png": png()}, reference_mask={"png": png(colour=(255,) * 3)}),
                                  concept(name="mug", loras=[{"name": "mug_v1"}])]})
    assert (job.background, job.keep_background, job.appearance_alpha, job.dilution_beta, job.dilution_expand) == \
        (png((32, 32)), False, 0.3, 0.5, 0.2)
    assert (job.concepts[0].reference, job.concepts[0].reference_mask) == (png(), png(colour=(255,) * 3))
    assert job.concepts[1].reference == ""
    data = job.to_dict()
    assert data["background"] == {"png": png((32, 32))}
    assert data["concepts"][0]["reference"] == {"png": png()}
    assert data["concepts"][0]["reference_mask"] == {"png": png(colour=(255,) * 3)}
    assert parse_job(data) == job


def test_a_picture_may_be_a_data_url_a_plain_string_or_a_jpeg():
    url = "data:image/png;base64," + png()
    job = parse_job({"background": url, "concepts": [concept(reference={"png": png(kind="JPEG")})]})
    assert job.background == url and job.concepts[0].reference == png(kind="JPEG")
    assert parse_job({"background": {"png": ""}, "concepts": [concept(reference=None)]}).background == ""


@pytest.mark.parametrize("change, field, problem", [
    ({"background": 7}, "background", "must be {\"png\": \"<base64 PNG>\"}"),
    ({"background": {"png": "not base64 at all!"}}, r"background\.png", "is not base64"),
    ({"background": {"png": base64.b64encode(b"some bytes, no picture").decode()}}, r"background\.png",
     "is not a picture PIL can read"),
    ({"background": {"png": "A" * (23 * 2 ** 20)}}, r"background\.png", "is larger than 16 MB"),
    ({"background": {"png": png((9000, 4))}}, r"background\.png", "is 9000x4; pictures may be at most 8192"),
    ({"keep_background": "yes"}, "keep_background", "must be true or false"),
    ({"appearance_alpha": -0.1}, "appearance_alpha", "must be >= 0"),
    ({"appearance_alpha": 3}, "appearance_alpha", "must be <= 2"),
    ({"dilution_beta": 1.5}, "dilution_beta", "must be <= 1"),
    ({"dilution_beta": "much"}, "dilution_beta", "must be a number"),
    ({"dilution_expand": -0.5}, "dilution_expand", "must be >= 0"),
    ({"dilution_expand": 2}, "dilution_expand", "must be <= 1"),
])
def test_bad_top_level_pictures_and_options_are_named(change, field, problem):
    with pytest.raises(JobError, match=rf"^{field}: {problem}"):
        parse_job({"concepts": [concept()], **change})


@pytest.mark.parametrize("extra, field, problem", [
    ({"reference": {"png": "%%%"}}, r"reference\.png", "is not base64"),
    ({"reference": {"png": base64.b64encode(b"GIF89 nothing").decode()}}, r"reference\.png", "is not a picture"),
    ({"reference": ["x"]}, "reference", "must be {\"png\""),
    ({"reference": {"png": png()}, "reference_mask": {"png": "@@"}}, r"reference_mask\.png", "is not base64"),
    ({"reference_mask": {"png": png()}}, "reference_mask", r"is given without a reference picture"),
])
def test_bad_concept_pictures_are_named(extra, field, problem):
    with pytest.raises(JobError, match=rf"^concepts\[1\]\.{field}: {problem}"):
        parse_job({"concepts": [concept(), concept(**extra)]})


def test_regional_mode_refuses_an_image_concept_and_a_background_naming_them():
    with pytest.raises(JobError, match=r"^concepts\[1\]\.reference: image concepts need blend or conductor mode"):
        parse_job({"mode": "regional", "concepts": [concept(), concept(reference={"png": png()})]})
    with pytest.raises(JobError, match=r"^background: a kept background needs blend or conductor mode"):
        parse_job({"mode": "regional", "background": {"png": png()}, "concepts": [concept()]})
    parse_job({"mode": "regional", "concepts": [concept()]})   # without them it runs
