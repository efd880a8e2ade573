"""Grounding DINO boxes for automatic regions through the WebUI API (the setting
`multi_concept_boxes`, sent as an override): the job's automatic regions get their boxes from
the Grounding DINO checkpoint the running WebUI has (models/grounding-dino, or
sd-webui-segment-anything's folder), the infotext says so, and the host is left as it was.

Needs, besides MULTI_CONCEPT_WEBUI: MULTI_CONCEPT_DINO=1, saying the WebUI has such a
checkpoint. A host whose transformers is older than 4.40 (A1111 1.10 ships 4.30.2) must run
the job with attention boxes and name the version in the job's warnings. Skipped otherwise.
"""

import json
import os

import numpy as np
import pytest

from test_txt2img_api import pixels, two_concepts, txt2img, with_job

TINY = {"width": 128, "height": 128, "steps": 4}
DINO = {"override_settings": {"multi_concept_boxes": "Grounding DINO"}}


@pytest.fixture(scope="module")
def dino(webui):
    if os.environ.get("MULTI_CONCEPT_DINO", "") != "1":
        pytest.skip("set MULTI_CONCEPT_DINO=1 when the WebUI has a Grounding DINO checkpoint")
    return webui


def automatic(loras):
    job = two_concepts(loras, mode="blend", start_at=0.5)
    for concept in job["concepts"]:
        concept["region"] = {"type": "auto"}
    return job


def infotext(response) -> str:
    assert response.status_code == 200, response.text[:500]
    return json.loads(response.json()["info"])["infotexts"][0]


def test_automatic_regions_take_grounding_dino_boxes_and_the_host_is_left_as_it_was(dino, lora_names):
    before = txt2img(dino, seed=5, **TINY)
    text = infotext(txt2img(dino, seed=5, **TINY, **DINO, **with_job(automatic(lora_names))))
    if "Multi-Concept boxes: Grounding DINO" not in text:   # a host without transformers 4.40
        assert "transformers" in text and "4.40" in text and "attention boxes" in text, text
    attention = infotext(txt2img(dino, seed=5, **TINY, **with_job(automatic(lora_names))))
    assert "Multi-Concept boxes" not in attention and "Grounding DINO" not in attention, attention
    after = txt2img(dino, seed=5, **TINY)
    assert np.array_equal(pixels(before.json()["images"][0]), pixels(after.json()["images"][0]))
