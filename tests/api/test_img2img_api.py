"""The extension in img2img through the WebUI API: `/sdapi/v1/img2img` with
`alwayson_scripts: {"multi-concept": {"args": [job]}}` (skipped without MULTI_CONCEPT_WEBUI)."""

import base64
import io
import json

import numpy as np
import pytest
import requests
from PIL import Image, ImageDraw

from test_txt2img_api import PROMPT, pixels, with_job

SIZE = {"width": 128, "height": 128, "steps": 4, "sampler_name": "Euler a", "cfg_scale": 7}


def init_picture() -> str:
    """A picture with a left, middle and right part (sky, ground, two blocks)."""
    image = Image.new("RGB", (128, 128), (110, 160, 220))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 80, 127, 127), fill=(200, 180, 120))
    draw.rectangle((10, 40, 35, 100), fill=(180, 40, 40))
    draw.rectangle((92, 40, 117, 100), fill=(40, 160, 60))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def half_mask(left=True) -> str:
    """White (repainted) on the left half, black (kept) on the right, or the reverse."""
    mask = np.zeros((128, 128), dtype=np.uint8)
    mask[:, :64] = 255
    if not left:
        mask = 255 - mask
    buffer = io.BytesIO()
    Image.fromarray(mask).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def img2img(webui, **payload):
    body = {"prompt": PROMPT, "negative_prompt": "blurry", "seed": 1234, "denoising_strength": 0.75,
            "init_images": [init_picture()], **SIZE, **payload}
    return requests.post(f"{webui}/sdapi/v1/img2img", json=body, timeout=1800)


def thirds(loras, **top):
    """Two concepts in the left and right thirds; the middle third is background."""
    return {"enabled": True, "start_at": 0.0, **top, "concepts": [
        {"name": "left", "loras": [{"name": loras[0], "weight": 1.0}], "prompt": "photo of a man",
         "region": {"type": "rect", "x": 0, "y": 0, "w": 0.34, "h": 1}},
        {"name": "right", "loras": [{"name": loras[1], "weight": 1.0}], "prompt": "photo of a woman",
         "region": {"type": "rect", "x": 0.66, "y": 0, "w": 0.34, "h": 1}}]}


def difference(a, b) -> float:
    return float(np.abs(a.astype(int) - b.astype(int)).mean())


def test_the_script_is_listed_for_img2img(webui):
    scripts = requests.get(f"{webui}/sdapi/v1/scripts", timeout=30).json()
    assert "multi-concept" in scripts["img2img"] and "multi-concept" in scripts["txt2img"]


def test_disabled_img2img_is_plain_img2img(webui):
    # a freshly started A1111's first img2img differs from every later one (0.7 of 255 on average,
    # no extension involved: seen on this CPU): compare warm runs
    assert img2img(webui).status_code == 200
    plain = img2img(webui)
    assert plain.status_code == 200, plain.text
    disabled = img2img(webui, **with_job({"enabled": False, "concepts": []}))
    assert disabled.status_code == 200, disabled.text
    assert np.array_equal(pixels(plain.json()["images"][0]), pixels(disabled.json()["images"][0]))


def test_concepts_in_img2img_change_their_regions_and_keep_the_background(webui, lora_names):
    """Blend and conductor: each concept's third changes against plain img2img; with the kept
    background (the default) the middle third stays nearer the init picture than plain img2img's."""
    source = pixels(init_picture())
    plain = pixels(img2img(webui).json()["images"][0])
    for mode in ("blend", "conductor"):
        response = img2img(webui, **with_job(thirds(lora_names, mode=mode)))
        assert response.status_code == 200, response.text
        result = response.json()
        assert "Multi-Concept: " in json.loads(result["info"])["infotexts"][0]
        image = pixels(result["images"][0])
        assert difference(image[:, :40], plain[:, :40]) > 1 and difference(image[:, 88:], plain[:, 88:]) > 1, mode
        middle = slice(52, 76)
        assert difference(image[:, middle], source[:, middle]) < difference(plain[:, middle], source[:, middle]), mode


def test_regional_img2img_runs(webui, lora_names):
    plain = pixels(img2img(webui).json()["images"][0])
    response = img2img(webui, **with_job(thirds(lora_names, mode="regional")))
    assert response.status_code == 200, response.text
    image = pixels(response.json()["images"][0])
    assert difference(image[:, :40], plain[:, :40]) > 1


def test_inpainting_with_concepts_keeps_what_the_mask_keeps(webui, lora_names):
    """The left half repainted, one concept there: the right half is the init picture (the WebUI
    pastes it back, mask blur aside), the left half differs from plain inpainting."""
    source = pixels(init_picture())
    inpaint = {"mask": half_mask(), "mask_blur": 4, "inpainting_fill": 1, "inpaint_full_res": False}
    plain = img2img(webui, **inpaint)
    assert plain.status_code == 200, plain.text
    job = thirds(lora_names)
    job["concepts"] = job["concepts"][:1]
    response = img2img(webui, **inpaint, **with_job(job))
    assert response.status_code == 200, response.text
    image, base = pixels(response.json()["images"][0]), pixels(plain.json()["images"][0])
    assert difference(image[:, 80:], source[:, 80:]) < 1
    assert difference(image[:, :40], base[:, :40]) > 1


def test_a_bad_img2img_job_names_the_problem(webui, lora_names):
    response = img2img(webui, **with_job(thirds(lora_names, start_at=2)))
    assert response.status_code >= 400 and "start_at" in response.text


@pytest.mark.parametrize("mode", ["blend", "conductor"])
def test_an_image_concept_with_a_kept_background_in_txt2img(webui, lora_names, mode):
    """txt2img with an image concept (its reference picture, the subject found by its class word)
    and a kept background picture: no error or warning, and the reference changes the image."""
    from test_txt2img_api import TINY, txt2img
    job = thirds(lora_names, mode=mode, background={"png": init_picture()})
    plain_job = json.loads(json.dumps(job))
    job["concepts"][0].update(reference={"png": init_picture()}, class_word="man")
    with_reference = txt2img(webui, **TINY, **with_job(job))
    assert with_reference.status_code == 200, with_reference.text[:2000]
    info = json.loads(with_reference.json()["info"])["infotexts"][0]
    assert "Multi-Concept warnings" not in info, info
    without = txt2img(webui, **TINY, **with_job(plain_job))
    assert without.status_code == 200, without.text[:2000]
    assert difference(pixels(with_reference.json()["images"][0]), pixels(without.json()["images"][0])) > 0.5
