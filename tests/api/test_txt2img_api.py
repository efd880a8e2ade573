"""The extension through the WebUI API: `alwayson_scripts: {"multi-concept": {"args": [job]}}`."""

import base64
import concurrent.futures
import io
import json
import time

import numpy as np
import pytest
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


# ---- regional mode (one sampling pass): tiny images, the concepts in drawn left/right halves -----

TINY = {"width": 128, "height": 128, "steps": 4}
HIRES = {"enable_hr": True, "hr_scale": 1.5, "hr_upscaler": "Latent", "denoising_strength": 0.5,
         "hr_second_pass_steps": 2, "hr_additional_modules": ["Use same choices"]}   # Forge's API needs the last


def regional(loras, **top):
    job = two_concepts(loras, mode="regional", **top)
    if "start_at" not in top:
        del job["start_at"]   # the mode's default: from the first step with drawn regions
    return job


def multi_concept_info(response) -> dict:
    """The job written into the first image's infotext (the WebUI quotes values with commas)."""
    infotext = json.loads(response.json()["info"])["infotexts"][0]
    assert "Multi-Concept: " in infotext, infotext
    value = infotext.split("Multi-Concept: ", 1)[1]
    if value.startswith('"'):
        value, _ = json.JSONDecoder().raw_decode(value)
    job, _ = json.JSONDecoder().raw_decode(value)
    return job


def differs(a, b, columns=slice(None)) -> bool:
    return np.abs(a[:, columns].astype(int) - b[:, columns]).mean() > 1


@pytest.fixture(scope="module")
def tiny_plain_and_regional(webui, lora_names):
    plain = txt2img(webui, **TINY)
    assert plain.status_code == 200, plain.text
    response = txt2img(webui, **TINY, **with_job(regional(lora_names)))
    assert response.status_code == 200, response.text
    return pixels(plain.json()["images"][0]), response


def test_regional_two_concepts_give_an_image_with_the_regional_job_in_its_infotext(tiny_plain_and_regional):
    base, response = tiny_plain_and_regional
    assert len(response.json()["images"]) == 1
    job = multi_concept_info(response)
    assert job["mode"] == "regional" and [c["name"] for c in job["concepts"]] == ["left", "right"]
    assert "layout_replay" not in job and "start_at" not in job   # blend's option and the default left out
    mixed = pixels(response.json()["images"][0])
    assert mixed.shape == base.shape == (128, 128, 3)
    assert differs(mixed, base, slice(None, 64)) and differs(mixed, base, slice(64, None))


def test_regional_without_isolation_and_with_reinit_change_the_image(webui, lora_names, tiny_plain_and_regional):
    _, default = tiny_plain_and_regional
    default = pixels(default.json()["images"][0])
    for option, key, value in ((dict(isolation=False), "isolation", False), (dict(reinit=True), "reinit", True)):
        response = txt2img(webui, **TINY, prompt="a man and a woman", **with_job(regional(lora_names, **option)))
        assert response.status_code == 200, (option, response.text)
        assert multi_concept_info(response)[key] is value
        assert differs(pixels(response.json()["images"][0]), default), option


def sampling_steps_seen(webui, **payload):
    """Runs txt2img while polling the WebUI's progress: the response and every sampling step seen."""
    def state():
        return requests.get(f"{webui}/sdapi/v1/progress?skip_current_image=true", timeout=60).json()["state"]
    earlier = state()["job_timestamp"]   # the last job's: its steps are still in the state until ours begins
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(txt2img, webui, **payload)
        seen = []
        while not future.done():
            now = state()
            if now["job_timestamp"] != earlier and (not seen or seen[-1] != now["sampling_step"]):
                seen.append(now["sampling_step"])
            time.sleep(0.05)
        return future.result(), seen


def test_regional_with_an_automatic_region_runs_in_one_pass(webui, lora_names):
    job = regional(lora_names)
    job["concepts"][1]["region"] = {"type": "auto"}   # found from "woman"'s attention at start_at (0.3)
    response, steps = sampling_steps_seen(webui, **{**TINY, "steps": 8}, **with_job(job))
    assert response.status_code == 200, response.text
    found = multi_concept_info(response)["concepts"][1]["region"]
    assert found["type"] == "auto" and found.get("found"), found   # the mask found for this image
    while len(steps) > 1 and steps[-1] == 0:
        steps.pop()   # the WebUI sets the step back to 0 once the image is done (state.nextjob)
    assert max(steps) >= 4, steps   # the polling saw the pass (a second pass would start again at 0)
    assert steps == sorted(steps), f"sampling started again: steps seen {steps}"


def test_bad_regional_requests_name_the_problem(webui, lora_names):
    response = txt2img(webui, **TINY, **with_job(regional(lora_names, isolation_until=2)))
    assert response.status_code >= 400 and "isolation_until" in response.text, response.text[:500]
    assert "regional" in response.text, response.text[:500]
    job = regional(lora_names, start_at=0)
    job["concepts"][0]["region"] = {"type": "auto"}
    response = txt2img(webui, **TINY, **with_job(job))
    assert response.status_code >= 400 and "start_at" in response.text, response.text[:500]


def test_plain_generation_is_bit_identical_before_and_after_regional(webui, lora_names):
    before = txt2img(webui, seed=77, **TINY)
    assert before.status_code == 200, before.text
    assert txt2img(webui, seed=77, **TINY, **with_job(regional(lora_names, reinit=True))).status_code == 200
    broken = regional(lora_names)
    broken["concepts"][1]["loras"][0]["name"] = "no_such_lora_z"
    assert txt2img(webui, seed=77, **TINY, **with_job(broken)).status_code >= 400
    after = txt2img(webui, seed=77, **TINY)
    assert after.status_code == 200, after.text
    assert np.array_equal(pixels(before.json()["images"][0]), pixels(after.json()["images"][0]))


def test_regional_with_hires_fix(webui, lora_names):
    plain = txt2img(webui, **TINY, **HIRES)
    assert plain.status_code == 200, plain.text
    response = txt2img(webui, **TINY, **HIRES, **with_job(regional(lora_names)))
    assert response.status_code == 200, response.text
    assert multi_concept_info(response)["mode"] == "regional"
    assert "Hires upscale: 1.5" in json.loads(response.json()["info"])["infotexts"][0]
    mixed, base = pixels(response.json()["images"][0]), pixels(plain.json()["images"][0])
    assert mixed.shape == base.shape == (192, 192, 3)
    assert differs(mixed, base, slice(None, 96)) and differs(mixed, base, slice(96, None))
