"""The extension through the WebUI API: `alwayson_scripts: {"multi-concept": {"args": [job]}}`."""

import base64
import io
import json

import numpy as np
import requests
from PIL import Image

SIZE = {"width": 256, "height": 256, "steps": 4, "sampler_name": "Euler a", "cfg_scale": 7}
PROMPT = "a man and a woman on a beach"


def txt2img(webui, **payload):
    body = {"prompt": PROMPT, "negative_prompt": "blurry", "seed": 1234, **SIZE, **payload}
    return requests.post(f"{webui}/sdapi/v1/txt2img", json=body, timeout=1800)


def pixels(image_b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(image_b64))).convert("RGB"))


def two_concepts(loras, **top):
    return {"enabled": True, "start_at": 0.25, **top, "concepts": [
        {"name": "left", "loras": [{"name": loras[0], "weight": 1.0}], "prompt": "photo of a man",
         "class_word": "man", "region": {"type": "rect", "x": 0, "y": 0, "w": 0.5, "h": 1}},
        {"name": "right", "loras": [{"name": loras[1], "weight": 1.0}], "prompt": "photo of a woman",
         "class_word": "woman", "region": {"type": "rect", "x": 0.5, "y": 0, "w": 0.5, "h": 1}}]}


def with_job(job):
    return {"alwayson_scripts": {"multi-concept": {"args": [job]}}}


def test_the_script_is_listed_for_txt2img(webui):
    scripts = requests.get(f"{webui}/sdapi/v1/scripts", timeout=30).json()
    assert "multi-concept" in scripts["txt2img"]


def test_two_concepts_give_an_image_with_the_job_in_its_infotext(webui, lora_names):
    plain = txt2img(webui)
    assert plain.status_code == 200, plain.text
    response = txt2img(webui, **with_job(two_concepts(lora_names)))
    assert response.status_code == 200, response.text
    result = response.json()
    assert len(result["images"]) == 1
    infotext = json.loads(result["info"])["infotexts"][0]
    assert "Multi-Concept: " in infotext
    mixed, base = pixels(result["images"][0]), pixels(plain.json()["images"][0])
    assert mixed.shape == base.shape == (256, 256, 3)
    # the LoRAs change the image in both halves (each half its own concept)
    assert np.abs(mixed[:, :128].astype(int) - base[:, :128]).mean() > 1
    assert np.abs(mixed[:, 128:].astype(int) - base[:, 128:]).mean() > 1


def test_job_as_a_json_string_and_a_batch_of_two(webui, lora_names):
    response = txt2img(webui, batch_size=2, **with_job(json.dumps(two_concepts(lora_names))))
    assert response.status_code == 200, response.text
    images = response.json()["images"]
    assert len(images) == 2 and not np.array_equal(pixels(images[0]), pixels(images[1]))


def test_bad_requests_name_the_problem(webui, lora_names):
    unknown = two_concepts(lora_names)
    unknown["concepts"][1]["loras"][0]["name"] = "no_such_lora_x"
    response = txt2img(webui, **with_job(unknown))
    assert response.status_code >= 400
    assert "concepts[1].loras[0]: unknown LoRA 'no_such_lora_x'" in response.text

    response = txt2img(webui, **with_job(two_concepts(lora_names, start_at=2)))
    assert response.status_code >= 400 and "start_at" in response.text

    response = txt2img(webui, **with_job({"enabled": True, "concepts": [
        {"name": "a", "region": {"type": "mask", "png": "not base64 png"}}]}))
    assert response.status_code >= 400 and "concepts[0].region" in response.text


def test_plain_generation_is_bit_identical_before_and_after(webui, lora_names):
    before = txt2img(webui, seed=99)
    assert before.status_code == 200, before.text
    assert txt2img(webui, seed=99, **with_job(two_concepts(lora_names))).status_code == 200
    broken = two_concepts(lora_names)
    broken["concepts"][0]["loras"][0]["name"] = "no_such_lora_y"
    assert txt2img(webui, seed=99, **with_job(broken)).status_code >= 400
    after = txt2img(webui, seed=99)
    assert after.status_code == 200, after.text
    assert np.array_equal(pixels(before.json()["images"][0]), pixels(after.json()["images"][0]))
