"""The extension through the WebUI API: `alwayson_scripts: {"multi-concept": {"args": [job]}}`."""

import base64
import concurrent.futures
import hashlib
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


# ---- conductor mode (concept injection): tiny images, the same drawn halves --------------------

CONDUCTOR_OPTIONS = {"mask_refine_k": 3, "mask_refine_until": 0.5, "align_step": 20}   # none a default


def conductor(loras, **top):
    """The two drawn concepts with identity words: the left one keeps its own prompt (the prompt
    wins), the right one has none, so its branch takes the main prompt's variant."""
    job = two_concepts(loras, **{"mode": "conductor", **CONDUCTOR_OPTIONS, **top})
    del job["start_at"]   # drawn regions: the mode's default, from the first step
    job["concepts"][0]["token"] = "bob man"
    job["concepts"][1]["token"] = "alice woman"
    job["concepts"][1]["prompt"] = ""
    return job


def reference_png() -> str:
    """A base64 PNG picture: a grey gradient with a dark blob on the left and a bright one on the right."""
    yy, xx = np.mgrid[0:128, 0:128]
    picture = np.repeat((64 + xx // 2)[..., None], 3, axis=2).astype(np.uint8)
    picture[(xx - 36) ** 2 + (yy - 70) ** 2 < 24 ** 2] = (20, 30, 120)
    picture[(xx - 94) ** 2 + (yy - 56) ** 2 < 20 ** 2] = (240, 200, 60)
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


@pytest.fixture(scope="module")
def conductor_runs(webui, lora_names):
    """One plain, conductor, blend (the same job) and conductor-with-reference image, in that order."""
    runs = {}
    for name, payload in (("plain", {}), ("conductor", with_job(conductor(lora_names))),
                          ("blend", with_job(conductor(lora_names, mode="blend"))),
                          ("reference", with_job(conductor(lora_names, reference=reference_png())))):
        started = time.monotonic()
        response = txt2img(webui, **TINY, **payload)
        print(f"{name}: HTTP {response.status_code} in {time.monotonic() - started:.0f} s")
        assert response.status_code == 200, (name, response.text[:2000])
        runs[name] = response
    return runs


def test_conductor_differs_from_plain_and_blend_and_its_infotext_holds_its_options_and_tokens(conductor_runs):
    image = {name: pixels(response.json()["images"][0]) for name, response in conductor_runs.items()}
    assert image["conductor"].shape == image["plain"].shape == (128, 128, 3)
    # the LoRAs act in both halves (each half its concept), and not as blend's pasted branches do
    assert differs(image["conductor"], image["plain"], slice(None, 64))
    assert differs(image["conductor"], image["plain"], slice(64, None))
    assert differs(image["conductor"], image["blend"])
    job = multi_concept_info(conductor_runs["conductor"])
    assert job["mode"] == "conductor" and "start_at" not in job   # drawn regions: the default, from step 0
    assert {key: job.get(key) for key in CONDUCTOR_OPTIONS} == CONDUCTOR_OPTIONS
    assert [c.get("token") for c in job["concepts"]] == ["bob man", "alice woman"]
    blend = multi_concept_info(conductor_runs["blend"])
    assert "mode" not in blend and "mask_refine_k" not in blend   # blend, the default; conductor's option left out


def test_conductor_concept_with_identity_words_and_no_prompt_shows_its_prompt_variant(conductor_runs):
    left, right = multi_concept_info(conductor_runs["conductor"])["concepts"]
    assert right["variant"] == "a alice woman and a alice woman on a beach", right
    assert "prompt" not in right
    assert "variant" not in left and left["prompt"] == "photo of a man"   # its own prompt wins


def test_conductor_with_a_reference_picture_changes_the_image_and_reports_no_error(conductor_runs):
    response = conductor_runs["reference"]
    infotext = json.loads(response.json()["info"])["infotexts"][0]
    assert "Multi-Concept warnings" not in infotext, infotext
    job = multi_concept_info(response)
    sent = reference_png()
    assert job["reference_sha"] == hashlib.sha256(sent.encode("ascii")).hexdigest()[:12]
    assert Image.open(io.BytesIO(base64.b64decode(job["reference"]))).size == (96, 96)   # its small copy
    aligned, unaligned = (pixels(conductor_runs[name].json()["images"][0]) for name in ("reference", "conductor"))
    assert differs(aligned, unaligned)


def test_conductor_bad_reference_is_named_and_the_next_plain_image_is_bit_identical(webui, lora_names, conductor_runs):
    for bad in ("not an image", base64.b64encode(b"GIF89a but not really a picture").decode()):
        response = txt2img(webui, **TINY, **with_job(conductor(lora_names, reference=bad)))
        assert response.status_code >= 400, response.text[:500]
        assert "reference" in response.text and "cannot be decoded" in response.text, response.text[:500]
    after = txt2img(webui, **TINY)
    assert after.status_code == 200, after.text
    assert np.array_equal(pixels(after.json()["images"][0]), pixels(conductor_runs["plain"].json()["images"][0]))
