"""The region canvas in a real browser: drawing reaches Python, the job reaches the canvas."""

from __future__ import annotations

import base64
import io
import json
import os
import pathlib
import time

import numpy as np
from PIL import Image

from lib_mc.job import parse_job
from lib_mc.regions import region_mask
from panel_page import generate, wait_for_job

COLOURS = [(0xE6, 0x19, 0x4B), (0x3C, 0xB4, 0x4B)]   # concepts 1 and 2, as in multi_concept_2_widgets.js
GROUND = (0x20, 0x20, 0x20)
# MC_SCREENSHOTS=tests/browser/screenshots refreshes the README's pictures; otherwise they go to a temp dir
SCREENSHOTS = os.environ.get("MC_SCREENSHOTS")


def canvas_box(page):
    return page.locator("#multi_concept canvas.mc-canvas").bounding_box()


def at(box, fx, fy):
    return box["x"] + fx * box["width"], box["y"] + fy * box["height"]


def drag(page, box, start, end, steps=12):
    page.mouse.move(*at(box, *start))
    page.mouse.down()
    page.mouse.move(*at(box, *end), steps=steps)
    page.mouse.up()


def touch_stroke(page, box, points):
    """A finger stroke through Chromium's touch input (pointerType "touch")."""
    cdp = page.context.new_cdp_session(page)
    kinds = ["touchStart"] + ["touchMove"] * (len(points) - 1)
    for kind, point in zip(kinds, points):
        x, y = at(box, *point)
        cdp.send("Input.dispatchTouchEvent", {"type": kind, "touchPoints": [{"x": x, "y": y}]})
    cdp.send("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})
    cdp.detach()


def canvas_pixels(page) -> np.ndarray:
    shot = page.locator("#multi_concept canvas.mc-canvas").screenshot()
    return np.asarray(Image.open(io.BytesIO(shot)).convert("RGB"), dtype=np.int16)


def tint(colour, alpha=0.55):
    return np.array([round(c * alpha + g * (1 - alpha)) for c, g in zip(colour, GROUND)])


def pixel_is(pixels, fx, fy, colour, tol=12):
    h, w = pixels.shape[:2]
    return np.abs(pixels[int(fy * h), int(fx * w)] - np.array(colour)).max() <= tol


def png_b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_drawing_a_rectangle_and_a_brush_stroke_reaches_python_as_regions(page, panel_app, tmp_path):
    box = canvas_box(page)
    page.click('#multi_concept [data-concept="0"]')
    page.click('#multi_concept [data-tool="rect"]')
    drag(page, box, (0.1, 0.1), (0.4, 0.6))
    page.click('#multi_concept [data-concept="1"]')
    page.click('#multi_concept button[title="Clear the selected concept\'s region"]')   # its preset half
    page.click('#multi_concept [data-tool="brush"]')
    drag(page, box, (0.6, 0.2), (0.9, 0.8), steps=20)
    wait_for_job(page, "job.concepts[1].region.type === 'mask' && Math.abs(job.concepts[0].region.x - 0.1) < 0.02")

    job = parse_job(generate(page, panel_app))
    first, second = job.concepts[0].region, job.concepts[1].region
    assert first.type == "rect"
    assert [round(v, 2) for v in (first.x, first.y, first.w, first.h)] == [0.1, 0.1, 0.3, 0.5]
    assert second.type == "mask"
    mask = region_mask(second, (128, 128), "concepts[1].region").numpy()
    for t in np.linspace(0, 1, 9):   # painted all along the stroke (the brush is 48 px of 512 wide)
        assert mask[int((0.2 + 0.6 * t) * 127), int((0.6 + 0.3 * t) * 127)] == 1
    assert mask[:, :64].sum() == 0 and mask[:16].sum() == 0 and mask[112:].sum() == 0   # nothing elsewhere
    assert mask[64, 110] == 0   # beside the stroke

    folder = pathlib.Path(SCREENSHOTS) if SCREENSHOTS else tmp_path
    folder.mkdir(parents=True, exist_ok=True)
    page.locator("#multi_concept").screenshot(path=str(folder / f"panel-{panel_app.flavour}.png"))
    assert (folder / f"panel-{panel_app.flavour}.png").stat().st_size > 10000


def test_a_loaded_job_shows_on_the_canvas_and_comes_back_unchanged(page, panel_app):
    triangle = Image.new("L", (64, 64), 0)
    for row in range(32, 64):
        triangle.paste(255, (96 - row, row, 64, row + 1))   # lower right, a shape no rect can be
    png = png_b64(triangle)
    job = {"version": 1, "enabled": True, "concepts": [
        {"name": "alice", "region": {"type": "rect", "x": 0, "y": 0, "w": 0.5, "h": 0.5}},
        {"name": "bob", "region": {"type": "mask", "png": png}}]}
    page.fill("#load_text textarea", json.dumps(job))
    page.click("#load_button")
    wait_for_job(page, "job.concepts[0].name === 'alice'")
    page.wait_for_function("window.MultiConcept.editor.concepts[1].layer.version > 0 && "
                           "window.MultiConcept.editor.concepts[0].name === 'alice'")
    time.sleep(0.3)   # the next animation frame draws

    pixels = canvas_pixels(page)
    assert pixel_is(pixels, 0.25, 0.25, tint(COLOURS[0]))      # alice's rectangle
    assert pixel_is(pixels, 0.9, 0.9, tint(COLOURS[1]))        # inside bob's triangle
    assert pixel_is(pixels, 0.6, 0.6, GROUND)                  # below the triangle's diagonal
    assert pixel_is(pixels, 0.75, 0.25, GROUND)                # nobody's
    legend = page.locator("#multi_concept .mc-legend").inner_text()
    assert "alice" in legend and "bob" in legend

    received = generate(page, panel_app)   # untouched regions come back exactly as loaded
    assert received["concepts"][1]["region"] == {"type": "mask", "png": png}
    assert received["concepts"][0]["region"] == {"type": "rect", "x": 0, "y": 0, "w": 0.5, "h": 0.5}


def test_front_to_back_order_touch_drawing_undo_and_shortcuts(page, panel_app):
    box = canvas_box(page)
    # typing a shortcut letter into a prompt must not switch tools
    page.fill("#multi_concept_prompt_0 textarea", "a brave knight")
    assert page.evaluate("window.MultiConcept.editor.tool") == "rect"
    # a finger stroke for concept 2 over concept 1's preset half
    page.click('#multi_concept [data-concept="1"]')
    page.click('#multi_concept [data-tool="brush"]')
    touch_stroke(page, box, [(0.2, 0.5), (0.3, 0.5), (0.4, 0.5)])
    wait_for_job(page, "job.concepts[1].region.type === 'mask'")
    # bring concept 1 to the front from the legend: concept 2 is listed first (in front) now
    page.locator('#multi_concept [data-concept="0"] button[title="Bring forward"]').click()
    wait_for_job(page, "job.concepts[0].z === 1 && job.concepts[1].z === 0")
    received = parse_job(generate(page, panel_app))
    assert [c.z for c in received.concepts] == [1, 0] and received.concepts[0].prompt == "a brave knight"
    stroke = region_mask(received.concepts[1].region, (128, 128), "m")   # layer size: a quarter of 512
    assert stroke[64, 40] == 1 and stroke[64, 10] == 0   # painted by the finger, not beyond its start

    # keys act only on the focused canvas; Ctrl+Z undoes the order change, then the stroke
    page.locator("#multi_concept canvas.mc-canvas").focus()
    page.keyboard.press("e")
    assert page.evaluate("window.MultiConcept.editor.tool") == "eraser"
    page.keyboard.press("Control+z")
    wait_for_job(page, "job.concepts.every((c) => c.z === undefined)")
    page.keyboard.press("Control+z")
    wait_for_job(page, "job.concepts[1].region.type === 'rect' && job.concepts[1].region.x === 0.5")


def test_the_canvas_follows_width_and_height_and_survives_a_rerender(page, panel_app):
    for width, height in ((1024, 512), (512, 768)):
        page.fill("#txt2img_width input[type=number]", str(width))
        page.fill("#txt2img_height input[type=number]", str(height))
        page.locator("#txt2img_height input[type=number]").press("Enter")
        page.wait_for_function(f"document.querySelector('#multi_concept canvas.mc-canvas')"
                               f".dataset.imageSize === '{width}x{height}'")
        box = canvas_box(page)
        assert abs(box["width"] / box["height"] - width / height) < 0.02

    box = canvas_box(page)
    page.click('#multi_concept [data-concept="0"]')
    drag(page, box, (0.05, 0.05), (0.3, 0.3))
    wait_for_job(page, "job.concepts[0].region.w < 0.3")
    # the page re-renders the panel's HTML: the same editor, with what was drawn, comes back
    page.evaluate("""() => {
        const slot = document.querySelector('#multi_concept_canvas_slot');
        const fresh = slot.cloneNode(false);
        slot.replaceWith(fresh);
    }""")
    page.wait_for_function("document.querySelector('#multi_concept_canvas_slot canvas.mc-canvas') !== null")
    time.sleep(0.3)
    pixels = canvas_pixels(page)
    assert pixel_is(pixels, 0.15, 0.15, tint(COLOURS[0]))
    assert pixel_is(pixels, 0.6, 0.8, tint(COLOURS[1]))   # concept 2's preset right half

    # idle means idle: no frames are drawn while nothing changes (no busy loop)
    before = page.evaluate("window.MultiConcept.editor.renderCount")
    time.sleep(1.0)
    assert page.evaluate("window.MultiConcept.editor.renderCount") == before


def test_undo_after_a_size_change_and_a_new_concept_keeps_drawing_in_place(page, panel_app):
    box = canvas_box(page)
    page.click('#multi_concept [data-concept="0"]')
    drag(page, box, (0.1, 0.1), (0.3, 0.3))
    wait_for_job(page, "Math.abs(job.concepts[0].region.w - 0.2) < 0.02")
    page.fill("#txt2img_width input[type=number]", "1024")
    page.locator("#txt2img_width input[type=number]").press("Enter")
    page.wait_for_function("document.querySelector('#multi_concept canvas.mc-canvas').dataset.imageSize === '1024x512'")
    page.fill("#multi_concept_count input[type=number]", "3")
    page.locator("#multi_concept_count input[type=number]").press("Enter")
    page.wait_for_function("window.MultiConcept.editor.concepts.length === 3")
    page.locator("#multi_concept canvas.mc-canvas").focus()
    page.keyboard.press("Control+z")   # back to before the rectangle: concept 1's preset left half
    wait_for_job(page, "job.concepts.length === 3 && job.concepts[0].region.w === 0.5")
    assert page.locator("#multi_concept .mc-legend-item").count() == 3   # the new concept stays
    box = canvas_box(page)
    page.click('#multi_concept [data-concept="0"]')
    drag(page, box, (0.5, 0.2), (0.7, 0.6))
    wait_for_job(page, "Math.abs(job.concepts[0].region.x - 0.5) < 0.02")
    region = parse_job(generate(page, panel_app)).concepts[0].region
    assert [round(v, 1) for v in (region.x, region.y, region.w, region.h)] == [0.5, 0.2, 0.2, 0.4]


def test_a_size_set_from_python_while_the_panel_is_closed_shows_when_it_opens(page, panel_app):
    """Forge's UI presets set width/height from Python at load, without input events in the
    page; the canvas must have that aspect before the first stroke, not change under it."""
    page.mouse.move(0, 0)
    page.locator("#multi_concept .label-wrap").first.click()   # close
    page.locator("#multi_concept canvas.mc-canvas").wait_for(state="hidden", timeout=10000)
    page.click("#size_preset")
    page.wait_for_function("document.querySelector('#txt2img_height input[type=number]').value === '640'")
    page.locator("#multi_concept .label-wrap").first.click()   # open again: no pointer over the canvas
    page.wait_for_function("document.querySelector('#multi_concept canvas.mc-canvas')"
                           ".dataset.imageSize === '512x640'", timeout=10000)
    box = canvas_box(page)
    assert abs(box["width"] / box["height"] - 512 / 640) < 0.02
    page.click('#multi_concept [data-concept="0"]')
    drag(page, box, (0.1, 0.1), (0.4, 0.9))
    wait_for_job(page, "Math.abs(job.concepts[0].region.x - 0.1) < 0.02 && Math.abs(job.concepts[0].region.w - 0.3) < 0.02")


def test_auto_in_rectangle_draws_its_box_and_a_loaded_box_shows_and_comes_back(page, panel_app):
    page.fill("#load_text textarea", json.dumps({"version": 1, "enabled": True, "concepts": [
        {"name": "him", "class_word": "man", "region": {"type": "auto", "x": 0.5, "y": 0.25, "w": 0.5, "h": 0.75}},
        {"name": "her", "class_word": "woman", "region": {"type": "auto"}}]}))
    page.click("#load_button")
    wait_for_job(page, "job.concepts[0].name === 'him'")
    page.wait_for_function("window.MultiConcept.editor.concepts[0].name === 'him'")
    time.sleep(0.3)
    pixels = canvas_pixels(page)
    assert pixel_is(pixels, 0.75, 0.6, tint(COLOURS[0]))       # his box is drawn
    assert pixel_is(pixels, 0.25, 0.6, GROUND) and pixel_is(pixels, 0.75, 0.1, GROUND)   # hers is found later
    received = generate(page, panel_app)
    assert received["concepts"][0]["region"] == {"type": "auto", "x": 0.5, "y": 0.25, "w": 0.5, "h": 0.75}
    assert received["concepts"][1]["region"] == {"type": "auto"}

    page.locator("#multi_concept canvas.mc-canvas").scroll_into_view_if_needed()   # Generate scrolled away
    box = canvas_box(page)   # a new box for him: still automatic, searched in the new box
    page.click('#multi_concept [data-concept="0"]')
    page.click('#multi_concept [data-tool="rect"]')
    drag(page, box, (0.1, 0.2), (0.4, 0.9))
    wait_for_job(page, "Math.abs(job.concepts[0].region.x - 0.1) < 0.02")
    # the drawn rect came back from Python as the box: the canvas knows its own echo at once
    # (otherwise it ignores outside changes for seconds and may send stale regions back)
    page.wait_for_function("window.MultiConcept.editor.awaiting === null", timeout=2500)
    region = parse_job(generate(page, panel_app)).concepts[0].region
    assert region.type == "auto" and region.boxed
    assert [round(v, 2) for v in (region.x, region.y, region.w, region.h)] == [0.1, 0.2, 0.3, 0.7]


def test_a_conductor_jobs_reference_picture_shows_under_the_regions_and_reaches_python(page, panel_app):
    picture = Image.new("RGB", (64, 64), (255, 0, 0))
    picture.paste((0, 0, 255), (32, 0, 64, 64))   # red left, blue right
    reference = png_b64(picture)
    job = {"version": 1, "enabled": True, "mode": "conductor", "reference": reference, "concepts": [
        {"name": "alice", "class_word": "woman", "token": "alice woman", "region": {"type": "auto"}}]}
    page.fill("#load_text textarea", json.dumps(job))
    page.click("#load_button")
    wait_for_job(page, "job.mode === 'conductor' && job.reference.length > 0")
    page.wait_for_function("window.MultiConcept.editor.background !== null")
    time.sleep(0.3)   # the next animation frame draws
    pixels = canvas_pixels(page)
    dimmed = lambda colour: [round(0.6 * c + 0.4 * g) for c, g in zip(colour, GROUND)]   # noqa: E731
    assert pixel_is(pixels, 0.25, 0.5, dimmed((255, 0, 0))) and pixel_is(pixels, 0.75, 0.5, dimmed((0, 0, 255)))
    received = parse_job(json.dumps(generate(page, panel_app)))   # the upload holds it: Python gets the picture
    assert received.mode == "conductor" and received.concepts[0].token == "alice woman"
    got = Image.open(io.BytesIO(base64.b64decode(received.reference))).convert("RGB")
    assert got.size == (64, 64) and got.getpixel((10, 10)) == (255, 0, 0) and got.getpixel((50, 10)) == (0, 0, 255)
    page.fill("#load_text textarea", json.dumps({**job, "reference": ""}))   # a job without one: removed
    page.click("#load_button")
    page.wait_for_function("window.MultiConcept.editor.background === null")


def test_the_selected_output_becomes_the_reference_picture(page, panel_app):
    page.locator("#txt2img_gallery img").first.wait_for(state="visible")
    page.wait_for_function("(() => { const i = document.querySelector('#txt2img_gallery img');"
                           " return i && i.complete && i.naturalWidth > 0; })()")
    page.locator("#multi_concept_options .label-wrap").first.click()
    page.click("#multi_concept_reference_from_output")
    wait_for_job(page, "job.reference && job.reference.length > 0")
    received = parse_job(json.dumps(generate(page, panel_app)))
    got = Image.open(io.BytesIO(base64.b64decode(received.reference))).convert("RGB")
    assert got.size == (96, 64)
    assert np.abs(np.array(got.getpixel((10, 30))) - (0, 200, 0)).max() <= 3
    assert np.abs(np.array(got.getpixel((80, 30))) - (200, 0, 200)).max() <= 3
    page.wait_for_function("window.MultiConcept.editor.background !== null")   # and it is under the regions
