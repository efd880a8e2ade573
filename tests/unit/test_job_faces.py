"""Face concepts in the job schema: face photos (pictures, never paths), face_weight and
face_control, their defaults, the modes that take them, the round trip through the infotext,
and errors that name the field."""

import base64
import io
import json

import pytest
from PIL import Image

from lib_mc.infotext import FACE_SIDE, infotext_to_job, job_to_infotext
from lib_mc.job import MAX_FACES, JobError, parse_job


def png(size=(300, 400), colour=(200, 160, 140)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def job(mode="blend", **concept):
    return {"mode": mode, "concepts": [{"name": "alice", "class_word": "woman", **concept}]}


def test_defaults_and_a_round_trip():
    plain = parse_job(job()).concepts[0]
    assert (plain.faces, plain.face_weight, plain.face_control) == ([], 0.8, 0.8)
    assert "faces" not in parse_job(job()).to_dict()["concepts"][0]
    photos = [png(), png(colour=(10, 20, 30))]
    spec = parse_job(job(faces=[{"png": photos[0]}, photos[1]], face_weight=0.5, face_control=1.2)).concepts[0]
    assert spec.faces == photos and (spec.face_weight, spec.face_control) == (0.5, 1.2)
    again = parse_job(parse_job(job(faces=photos, face_weight=0.5)).to_dict()).concepts[0]
    assert again.faces == photos and again.face_weight == 0.5


@pytest.mark.parametrize("faces, field, words", [
    ("alice.png", "concepts[0].faces", "must be a list"),
    ([{"png": "not base64!"}], "concepts[0].faces[0].png", "not base64"),
    ([{"png": png()}, {"png": ""}], "concepts[0].faces[1]", "is empty"),
    ([png()] * (MAX_FACES + 1), "concepts[0].faces", f"at most {MAX_FACES}"),
    ([{"png": base64.b64encode(b"GIF89a...").decode()}], "concepts[0].faces[0].png", "not a picture"),
])
def test_bad_photos_are_named(faces, field, words):
    with pytest.raises(JobError) as error:
        parse_job(job(faces=faces))
    assert error.value.field == field and words in error.value.problem


@pytest.mark.parametrize("key", ["face_weight", "face_control"])
def test_weights_are_checked(key):
    with pytest.raises(JobError, match=rf"concepts\[0\]\.{key}: must be <= 2"):
        parse_job(job(faces=[png()], **{key: 2.5}))


def test_regional_mode_takes_faces_only_for_the_score():
    with pytest.raises(JobError, match=r"concepts\[0\]\.faces: face concepts need blend or conductor mode"):
        parse_job(job("regional", faces=[png()]))
    scored = parse_job(job("regional", faces=[png()], face_weight=0, face_control=0))
    assert scored.concepts[0].faces
    assert parse_job(job("conductor", faces=[png()])).concepts[0].faces


def test_the_infotext_carries_small_copies_and_leaves_defaults_out():
    original = job(faces=[png((600, 800))], face_control=0.4)
    text = job_to_infotext(parse_job(original))
    concept = json.loads(text)["concepts"][0]
    assert set(concept["faces"][0]) == {"png", "sha"} and "face_weight" not in concept
    assert concept["face_control"] == 0.4
    small = Image.open(io.BytesIO(base64.b64decode(concept["faces"][0]["png"])))
    assert max(small.size) == FACE_SIDE
    pasted = infotext_to_job(text).concepts[0]
    assert len(pasted.faces) == 1 and (pasted.face_weight, pasted.face_control) == (0.8, 0.4)
