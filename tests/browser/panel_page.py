"""Driving the Multi-Concept panel in a page: the bare gradio apps (test_canvas.py, test_layout.py)
and a running A1111 or Forge (test_webui_page.py) share these, so both tiers do the same things
to the same element ids the same way."""

from __future__ import annotations

import base64
import io
import json
import re
import time

from PIL import Image

PANEL = "#multi_concept"
MAX_HEIGHT = 1400   # px, at a 1,400 px wide window, with two concepts: one screen


def open_panel(page, timeout=30000):
    """Opens the accordion (if closed) and waits until the canvas has drawn the job's concepts."""
    if not page.locator(f"{PANEL} canvas.mc-canvas").is_visible():
        page.locator(f"{PANEL} .label-wrap").first.click(timeout=timeout)
    page.locator(f"{PANEL} canvas.mc-canvas").wait_for(state="visible", timeout=timeout)
    page.wait_for_function("window.MultiConcept && window.MultiConcept.editor.concepts.length > 0", timeout=timeout)


def job_in_page(page) -> dict:
    return json.loads(page.locator(f"{PANEL}_job textarea").input_value())


def wait_for_job(page, condition: str, timeout=20000):
    """Waits until the job JSON held by the page (written by Python) satisfies a JS condition on `job`."""
    page.wait_for_function(
        "(cond) => { const box = document.querySelector('#multi_concept_job textarea');"
        " if (!box) return false; const job = JSON.parse(box.value); return eval(cond); }",
        arg=condition, timeout=timeout)


def panel_height(page) -> float:
    return page.locator(PANEL).bounding_box()["height"]


def start_box(page):
    """The Concepts start at box (a one-line textbox: gradio renders an input or a textarea)."""
    return page.locator(f"{PANEL}_start_at").locator("input, textarea").first


def show_tab(page, i: int):
    """Shows concept i's tab (0-based)."""
    button = page.locator(f"{PANEL}_tabs .tab-nav button", has_text=re.compile(rf"^\s*Concept {i + 1}\s*$"))
    button.click()
    page.locator(f"{PANEL}_name_{i}").wait_for(state="visible")


def pick(page, elem_id: str, option: str):
    """Picks an option of a gradio dropdown (3.41 and 4.40 both list them as li[aria-label])."""
    page.locator(f"#{elem_id} input").click()
    page.locator(f'#{elem_id} ul.options li[aria-label="{option}"]').click()


def fill_number(page, elem_id: str, value):
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def shown(page, i: int) -> set[str]:
    """Which of concept i's region-dependent fields are on screen (its tab shown)."""
    ids = {"box": f"multi_concept_box_{i}", "mask": f"multi_concept_mask_{i}", "class_word": f"multi_concept_class_{i}"}
    return {name for name, elem_id in ids.items() if page.locator(f"#{elem_id}").is_visible()}


def mask_png_file(tmp_path) -> tuple[str, str]:
    """A mask file to upload (white: the lower half) and its base64 PNG."""
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 32, 64, 64))
    path = tmp_path / "mask.png"
    mask.save(path)
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    return str(path), base64.b64encode(buffer.getvalue()).decode()


def edit_every_kind_of_control(page, tmp_path, lora: str | None):
    """Edits one control of every kind in concept 2 and the options, checking after each edit that
    the job holds it and that concept 1 is untouched (no control's change rewrites another
    concept). `lora`: a name the Add a LoRA list offers (None: skip the picker); it goes after
    the typed `typed_lora:0.7`."""
    first = job_in_page(page)["concepts"][0]
    show_tab(page, 1)
    steps = [
        (lambda: page.fill(f"{PANEL}_name_1 textarea", "bob"), "job.concepts[1].name === 'bob'"),
        (lambda: page.fill(f"{PANEL}_prompt_1 textarea", "photo of bob man"),
         "job.concepts[1].prompt === 'photo of bob man'"),
        (lambda: page.fill(f"{PANEL}_negative_1 textarea", "blurry"), "job.concepts[1].negative_prompt === 'blurry'"),
        (lambda: page.fill(f"{PANEL}_loras_1 textarea", "typed_lora:0.7"),
         "job.concepts[1].loras.length === 1 && job.concepts[1].loras[0].weight === 0.7"),
        (lambda: pick(page, "multi_concept_region_1", "rectangle"), "job.concepts[1].region.type === 'rect'"),
        (lambda: fill_number(page, "multi_concept_w_1", 0.25), "job.concepts[1].region.w === 0.25"),
        (lambda: pick(page, "multi_concept_region_1", "auto"), "job.concepts[1].region.type === 'auto'"),
        (lambda: page.fill(f"{PANEL}_class_1 textarea", "man"), "job.concepts[1].class_word === 'man'"),
    ]
    if lora:
        steps.append((lambda: pick(page, "multi_concept_pick_1", lora),
                      f"job.concepts[1].loras.length === 2 && job.concepts[1].loras[1].name === {json.dumps(lora)}"))
    mask_file, mask_png = mask_png_file(tmp_path)
    steps += [
        (lambda: pick(page, "multi_concept_region_1", "mask"), "job.concepts[1].region.type === 'mask'"),
        (lambda: page.locator(f"{PANEL}_mask_1 input[type=file]").set_input_files(mask_file),
         "job.concepts[1].region.png && job.concepts[1].region.png.length > 0"),
        (lambda: page.locator(f"{PANEL}_enabled input").check(), "job.enabled === true"),
    ]
    for act, condition in steps:
        act()
        wait_for_job(page, condition)
        assert job_in_page(page)["concepts"][0] == first, condition
    pick(page, "multi_concept_mode", "regional")
    wait_for_job(page, "job.mode === 'regional'")
    page.locator(f"{PANEL}_options .label-wrap").first.click()
    start = start_box(page)
    start.fill("0.45")
    wait_for_job(page, "job.start_at === 0.45")
    start.fill("")   # emptied: the mode's default, left out of the job
    wait_for_job(page, "!('start_at' in job)")
    start.fill("0.45")
    wait_for_job(page, "job.start_at === 0.45")
    page.locator(f"{PANEL}_hires_loras input").uncheck()
    wait_for_job(page, "job.hires_loras === false")
    page.locator(f"{PANEL}_isolation input[type=checkbox]").uncheck()
    wait_for_job(page, "job.isolation === false")
    fill_number(page, "multi_concept_isolation_until", 0.6)
    wait_for_job(page, "job.isolation_until === 0.6")
    page.locator(f"{PANEL}_reinit input[type=checkbox]").check()
    wait_for_job(page, "job.reinit === true")
    page.locator(f"{PANEL}_enhance input[type=checkbox]").check()
    wait_for_job(page, "job.enhance === true")
    page.locator(f"{PANEL}_options .label-wrap").first.click()   # folded again
    job = job_in_page(page)
    assert job["concepts"][0] == first and job["concepts"][1]["name"] == "bob"
    return job, mask_png


def face_photo_file(tmp_path, name: str, colour) -> str:
    """A face photo to upload (a plain picture: the panel only carries it, it detects nothing)."""
    path = tmp_path / f"{name}.png"
    Image.new("RGB", (80, 100), colour).save(path)
    return str(path)


def add_face_photos(page, tmp_path, i: int = 1) -> dict:
    """Concept i's folded face box: a photo into slot 1 and one into slot 3, then both sliders,
    checking after each edit that the job holds it and that concept 0 is untouched. Returns the job."""
    first = job_in_page(page)["concepts"][0] if i else None
    show_tab(page, i)
    page.locator(f"{PANEL}_faces_{i} .label-wrap").first.click()
    slot = lambda k: page.locator(f"{PANEL}_face_{k}_{i} input[type=file]")   # noqa: E731
    faces = f"job.concepts[{i}].faces"
    steps = [
        (lambda: slot(1).set_input_files(face_photo_file(tmp_path, "alice", (200, 40, 40))),
         f"{faces} && {faces}.length === 1 && job.concepts[{i}].face_weight === 0.8"),
        (lambda: fill_number(page, f"multi_concept_face_weight_{i}", 1.25), f"job.concepts[{i}].face_weight === 1.25"),
        (lambda: fill_number(page, f"multi_concept_face_control_{i}", 0), f"job.concepts[{i}].face_control === 0"),
        (lambda: slot(3).set_input_files(face_photo_file(tmp_path, "alice_side", (40, 40, 200))),
         f"{faces}.length === 2 && job.concepts[{i}].face_weight === 1.25"),
    ]
    for act, condition in steps:
        act()
        wait_for_job(page, condition)
        if first is not None:
            assert job_in_page(page)["concepts"][0] == first, condition
    return job_in_page(page)


def wait_until(page, check, what: str, timeout_ms=10000):
    """Polls `check()` (Python, reading the page) until it holds; fails naming `what`."""
    for _ in range(timeout_ms // 100):
        if check():
            return
        page.wait_for_timeout(100)
    assert check(), what


def generate(page, panel_app, button="#txt2img_generate") -> dict:
    """Bare apps: clicks Generate (txt2img's, or `button`) and returns the job JSON the Python
    handler received."""
    before = time.time() - 0.01
    page.click(button)
    deadline = time.time() + 20
    while time.time() < deadline:
        text = panel_app.received(before)
        if text:
            return json.loads(text)
        time.sleep(0.1)
    raise AssertionError("the Generate handler received nothing")
