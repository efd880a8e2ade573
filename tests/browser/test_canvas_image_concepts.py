"""Image concepts and the panel in the img2img tab, in a real browser: a job's kept background
shows under the regions and reaches Python; the img2img panel has its own canvas, following
img2img's size, drawing into its own job and leaving txt2img's alone."""

from __future__ import annotations

import json
import time

from PIL import Image

from lib_mc.job import parse_job
from panel_page import generate, wait_for_job
from test_canvas import GROUND, canvas_pixels, drag, pixel_is, png_b64

IMG2IMG = "#img2img_multi_concept"


def test_a_jobs_background_picture_shows_under_the_regions_and_reaches_python(page, panel_app):
    picture = Image.new("RGB", (64, 64), (255, 0, 0))
    picture.paste((0, 0, 255), (32, 0, 64, 64))   # red left, blue right
    job = {"version": 1, "enabled": True, "mode": "blend", "background": {"png": png_b64(picture)},
           "keep_background": False, "dilution_beta": 0.6,
           "concepts": [{"name": "dog", "region": {"type": "auto"}, "reference": {"png": png_b64(picture)}}]}
    page.fill("#load_text textarea", json.dumps(job))
    page.click("#load_button")
    wait_for_job(page, "job.background && job.background.png.length > 0 && job.concepts[0].reference")
    page.wait_for_function("window.MultiConcept.editor.background !== null")
    time.sleep(0.3)   # the next animation frame draws
    pixels = canvas_pixels(page)
    dimmed = lambda colour: [round(0.6 * c + 0.4 * g) for c, g in zip(colour, GROUND)]   # noqa: E731
    assert pixel_is(pixels, 0.25, 0.5, dimmed((255, 0, 0))) and pixel_is(pixels, 0.75, 0.5, dimmed((0, 0, 255)))
    received = parse_job(json.dumps(generate(page, panel_app)))   # the uploads hold them: Python gets the pictures
    assert (received.keep_background, received.dilution_beta) == (False, 0.6)
    assert received.background and received.concepts[0].reference
    page.fill("#load_text textarea", json.dumps({**job, "background": None}))   # a job without one: removed
    page.click("#load_button")
    page.wait_for_function("window.MultiConcept.editor.background === null")


def test_the_img2img_panel_has_its_own_canvas_size_and_job(page, panel_app):
    page.locator(f"{IMG2IMG} .label-wrap").first.click()
    canvas = page.locator(f"{IMG2IMG} canvas.mc-canvas")
    canvas.wait_for(state="visible", timeout=30000)
    page.wait_for_function("window.MultiConcept.editors.img2img_multi_concept.concepts.length === 2")
    assert page.evaluate("window.MultiConcept.editors.img2img_multi_concept !== window.MultiConcept.editor")
    page.wait_for_function(f"document.querySelector('{IMG2IMG} canvas.mc-canvas').dataset.imageSize === '768x512'")
    assert page.evaluate("document.querySelector('#multi_concept canvas.mc-canvas').dataset.imageSize") == "512x512"
    txt2img_before = page.locator("#multi_concept_job textarea").input_value()
    canvas.scroll_into_view_if_needed()
    page.click(f'{IMG2IMG} [data-concept="0"]')
    page.click(f'{IMG2IMG} [data-tool="rect"]')
    drag(page, canvas.bounding_box(), (0.1, 0.2), (0.4, 0.8))
    page.wait_for_function("(() => { const job = JSON.parse(document.querySelector("
                           "'#img2img_multi_concept_job textarea').value);"
                           " return job.concepts[0].region.type === 'rect' && job.concepts[0].region.x > 0.05; })()",
                           timeout=20000)
    region = parse_job(json.dumps(generate(page, panel_app, "#img2img_generate"))).concepts[0].region
    assert region.type == "rect" and round(region.x, 1) == 0.1 and round(region.w, 1) == 0.3
    assert page.locator("#multi_concept_job textarea").input_value() == txt2img_before   # txt2img's untouched
