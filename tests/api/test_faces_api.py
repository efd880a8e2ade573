"""Face concepts (InstantID) through the WebUI API, on an SDXL checkpoint of the running WebUI.

Needs, besides MULTI_CONCEPT_WEBUI: MULTI_CONCEPT_SDXL, the title of an SDXL checkpoint in its
list (the tests switch to it and back); MULTI_CONCEPT_FACE_PHOTOS, two face photos on this
machine ("alice.png,bob.png"; sent as base64, never as paths) that the host's antelopev2 pack
detects; and InstantID's files and the antelopev2 pack where the README says. Skipped otherwise.
"""

import base64
import io
import json
import os
import re

import numpy as np
import pytest
import requests
from PIL import Image

from test_txt2img_api import pixels, txt2img, with_job

SIZE = {"width": 256, "height": 256, "steps": 4}


@pytest.fixture(scope="module")
def photos():
    paths = [p.strip() for p in os.environ.get("MULTI_CONCEPT_FACE_PHOTOS", "").split(",") if p.strip()]
    if len(paths) < 2:
        pytest.skip("set MULTI_CONCEPT_FACE_PHOTOS to two face photos to run the face-concept API tests")
    return [base64.b64encode(open(p, "rb").read()).decode("ascii") for p in paths[:2]]


@pytest.fixture(scope="module")
def sdxl(webui):
    wanted = os.environ.get("MULTI_CONCEPT_SDXL", "").strip()
    if not wanted:
        pytest.skip("set MULTI_CONCEPT_SDXL to an SDXL checkpoint's title to run the face-concept API tests")
    before = requests.get(f"{webui}/sdapi/v1/options", timeout=30).json()["sd_model_checkpoint"]
    requests.post(f"{webui}/sdapi/v1/options", json={"sd_model_checkpoint": wanted}, timeout=600).raise_for_status()
    yield webui
    requests.post(f"{webui}/sdapi/v1/options", json={"sd_model_checkpoint": before}, timeout=600)


def faces_job(photos, **top):
    return {"enabled": True, "mode": "blend", **top, "concepts": [
        {"name": "alice", "class_word": "woman", "faces": [{"png": photos[0]}],
         "region": {"type": "rect", "x": 0, "y": 0, "w": 0.5, "h": 1}},
        {"name": "bob", "class_word": "man", "faces": [{"png": photos[1]}], "face_weight": 0.6,
         "region": {"type": "rect", "x": 0.5, "y": 0, "w": 0.5, "h": 1}}]}


def identity(response) -> str:
    infotext = json.loads(response.json()["info"])["infotexts"][0]
    found = re.search(r'Multi-Concept identity: ("[^"]*"|[^,]*)', infotext)
    assert found, infotext
    return found.group(1).strip('"')


@pytest.mark.parametrize("mode", ["blend", "conductor"])
def test_face_concepts_change_the_image_score_it_and_leave_the_host_as_it_was(sdxl, photos, mode):
    plain = txt2img(sdxl, seed=7, **SIZE)
    assert plain.status_code == 200, plain.text
    faced = txt2img(sdxl, seed=7, **SIZE, **with_job(faces_job(photos, mode=mode)))
    assert faced.status_code == 200, faced.text
    scores = identity(faced)
    assert re.fullmatch(r"alice (-?\d\.\d\d|no face), bob (-?\d\.\d\d|no face)", scores), scores
    image, before = pixels(faced.json()["images"][0]), pixels(plain.json()["images"][0])
    assert not np.array_equal(image, before)
    after = txt2img(sdxl, seed=7, **SIZE)
    assert np.array_equal(pixels(after.json()["images"][0]), before)


def test_score_only_faces_run_in_regional_mode_too(sdxl, photos):
    job = faces_job(photos, mode="regional")
    for concept in job["concepts"]:
        concept.update(face_weight=0, face_control=0)
    response = txt2img(sdxl, seed=7, **SIZE, **with_job(job))
    assert response.status_code == 200, response.text
    assert identity(response).startswith("alice ")


def test_a_photo_without_a_face_is_named_and_the_next_image_is_plain(sdxl, photos):
    buffer = io.BytesIO()
    Image.new("RGB", (320, 320), (128, 128, 128)).save(buffer, format="PNG")   # nobody in it
    blank = base64.b64encode(buffer.getvalue()).decode("ascii")
    plain = txt2img(sdxl, seed=8, **SIZE)
    job = faces_job([blank, photos[1]])
    response = txt2img(sdxl, seed=8, **SIZE, **with_job(job))
    assert response.status_code >= 400 and "concepts[0].faces[0]" in response.text, response.text
    after = txt2img(sdxl, seed=8, **SIZE)
    assert np.array_equal(pixels(after.json()["images"][0]), pixels(plain.json()["images"][0]))


def test_a_batch_of_two_with_hires_fix_scores_every_image(sdxl, photos):
    """Batch size 2 (each image its own score) and the hires pass (the keypoints drawn again at
    its size, the face rows carried into it)."""
    hires = {"enable_hr": True, "hr_scale": 1.5, "hr_upscaler": "Latent", "denoising_strength": 0.5,
             "hr_second_pass_steps": 2}
    plain = txt2img(sdxl, seed=9, batch_size=2, **SIZE, **hires)
    assert plain.status_code == 200, plain.text
    faced = txt2img(sdxl, seed=9, batch_size=2, **SIZE, **hires, **with_job(faces_job(photos)))
    assert faced.status_code == 200, faced.text
    infotexts = json.loads(faced.json()["info"])["infotexts"]
    assert len(infotexts) == 2 and all("Multi-Concept identity: " in text for text in infotexts), infotexts
    assert "Multi-Concept warnings" not in infotexts[0], infotexts[0]   # the hires pass kept the concepts
    for ours, theirs in zip(faced.json()["images"], plain.json()["images"]):
        assert pixels(ours).shape == (384, 384, 3) and not np.array_equal(pixels(ours), pixels(theirs))
