"""The panel in a running A1111 or Forge page, as users meet it (skipped without one).

    MULTI_CONCEPT_WEBUI_PAGE=http://127.0.0.1:7860 .venv/bin/python -m pytest tests/browser/test_webui_page.py

Optional: MULTI_CONCEPT_WEBUI_UI_CONFIG=<the WebUI's ui-config.json> runs the saved-defaults test
(it writes that file, reloads the UI, and puts the file back); MC_SCREENSHOTS=DIR saves
panel-a1111.png or panel-forge.png there (README pictures). The page is the real one: the
WebUI restores ui-config.json into it, its own CSS and scripts run beside ours.
"""

from __future__ import annotations

import json
import os
import pathlib

import pytest

from panel_page import (MAX_HEIGHT, PANEL, add_face_photos, edit_every_kind_of_control, fill_number, job_in_page,
                        mask_png_file, open_panel, panel_height, pick, show_tab, start_box, wait_for_job, wait_until)

ADDRESS_VARIABLE = "MULTI_CONCEPT_WEBUI_PAGE"
CONFIG_VARIABLE = "MULTI_CONCEPT_WEBUI_UI_CONFIG"
PAGE_TIMEOUT = 180000   # ms: a WebUI page on a busy CPU is slow to build


@pytest.fixture(scope="module")
def address():
    value = os.environ.get(ADDRESS_VARIABLE, "").rstrip("/")
    if not value:
        pytest.skip(f"no running WebUI page: set {ADDRESS_VARIABLE}=http://host:port")
    return value


def load(page, address):
    page.goto(address + "/", timeout=PAGE_TIMEOUT)
    page.locator(PANEL).wait_for(state="attached", timeout=PAGE_TIMEOUT)
    open_panel(page, timeout=PAGE_TIMEOUT)


@pytest.fixture
def webui(browser, address):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda error: errors.append(f"{error.message}\n{error.stack}"))
    load(page, address)
    page.host = "a1111" if page.evaluate("window.gradio_config.version").startswith("3") else "forge"
    yield page
    context.close()
    assert not [e for e in errors if "multi_concept_" in e], errors   # errors thrown by our scripts


def shown_concept(page, i: int) -> dict:
    """What concept i's controls show (its tab is shown first)."""
    show_tab(page, i)
    value = lambda name: page.locator(f"{PANEL}_{name}_{i} textarea, {PANEL}_{name}_{i} input").first.input_value()  # noqa: E731
    return {"name": value("name"), "region": value("region"), "prompt": value("prompt"),
            "negative_prompt": value("negative"), "loras": value("loras")}


def assert_page_shows_the_job(page):
    job = job_in_page(page)
    presets = {(0, 0, 0.5, 1): "left half", (0.5, 0, 0.5, 1): "right half"}
    for i, concept in enumerate(job["concepts"]):
        shown = shown_concept(page, i)
        region = concept["region"]
        expected = presets.get(tuple(region.get(k) for k in ("x", "y", "w", "h")))
        assert (shown["name"], shown["prompt"], shown["negative_prompt"]) == (
            concept["name"], concept["prompt"], concept["negative_prompt"]), (i, shown, concept)
        assert expected and shown["region"] == expected, (i, shown, region)
    return job


def test_the_page_shows_what_the_job_holds_and_the_panel_is_one_screen_tall(webui):
    job = assert_page_shows_the_job(webui)
    assert len(job["concepts"]) == 2 and job["concepts"][1]["region"]["x"] == 0.5
    height = panel_height(webui)
    print(f"{webui.host}: panel {height:.0f} px tall at 1400 px wide")
    assert height <= MAX_HEIGHT, f"{height:.0f} px"


def test_every_kind_of_control_reaches_the_job_and_no_edit_rewrites_another_concept(webui, tmp_path):
    choices = webui.evaluate("""() => {
        const config = window.gradio_config.components.find((c) => c.props.elem_id === 'multi_concept_pick_1');
        return (config.props.choices || []).map((c) => Array.isArray(c) ? c[0] : c);
    }""")
    job, _ = edit_every_kind_of_control(webui, tmp_path, choices[0] if choices else None)
    assert job["enabled"] and job["hires_loras"] is False and job["concepts"][1]["class_word"] == "man"


CONDUCTOR_CONTROLS = ("mask_refine", "mask_refine_from", "mask_refine_until", "mask_refine_every", "mask_refine_k",
                      "reference", "align_until", "align_step")


def test_conductor_mode_shows_its_options_and_they_reach_the_job(webui, tmp_path):
    """Mode offers conductor; its options (each label says "(conductor)") and the reference
    upload sit in the folded Options; an option, a picture and identity words reach the job."""
    modes = webui.evaluate("""() => {
        const config = window.gradio_config.components.find((c) => c.props.elem_id === 'multi_concept_mode');
        return (config.props.choices || []).map((c) => Array.isArray(c) ? c[0] : c);
    }""")
    assert "conductor" in modes, modes
    pick(webui, "multi_concept_mode", "conductor")
    wait_for_job(webui, "job.mode === 'conductor'")
    webui.locator(f"{PANEL}_options .label-wrap").first.click()
    for name in CONDUCTOR_CONTROLS:
        control = webui.locator(f"{PANEL}_{name}")
        control.wait_for(state="visible")
        assert "(conductor)" in control.inner_text(), (name, control.inner_text())
    fill_number(webui, "multi_concept_mask_refine_k", 3)
    wait_for_job(webui, "job.mask_refine_k === 3")
    picture, _ = mask_png_file(tmp_path)
    webui.locator(f"{PANEL}_reference input[type=file]").set_input_files(picture)
    wait_for_job(webui, "job.mode === 'conductor' && job.reference.length > 100")
    show_tab(webui, 1)
    webui.fill(f"{PANEL}_token_1 textarea", "alice woman")
    wait_for_job(webui, "job.concepts[1].token === 'alice woman' && job.reference.length > 100")
    webui.locator(f"{PANEL}_class_1").wait_for(state="visible")   # identity words replace the class word


def test_face_photos_and_their_sliders_reach_the_job(webui, tmp_path):
    """Concept 2's folded face box in the real page: two photos into slots 1 and 3 and both
    sliders reach the job; the WebUI restored no saved value into them."""
    show_tab(webui, 1)
    sliders = [webui.locator(f"{PANEL}_face_{name}_1 input[type=number]") for name in ("weight", "control")]
    webui.locator(f"{PANEL}_faces_1 .label-wrap").first.click()
    assert [s.input_value() for s in sliders] == ["0.8", "0.8"]
    webui.locator(f"{PANEL}_faces_1 .label-wrap").first.click()   # folded again: add_face_photos opens it
    job = add_face_photos(webui, tmp_path, 1)
    assert len(job["concepts"][1]["faces"]) == 2 and (job["concepts"][1]["face_weight"],
                                                      job["concepts"][1]["face_control"]) == (1.25, 0)


def test_the_panel_as_pictured(webui):
    """Two concepts set up as in the README, then a picture of the panel in this WebUI."""
    for i, (name, prompt) in enumerate((("alice", "photo of alice woman, red dress"),
                                        ("bob", "photo of bob man, grey suit"))):
        show_tab(webui, i)
        webui.fill(f"{PANEL}_name_{i} textarea", name)
        webui.fill(f"{PANEL}_prompt_{i} textarea", prompt)
        webui.fill(f"{PANEL}_loras_{i} textarea", f"{name}_v1:0.8")
    wait_for_job(webui, "job.concepts[1].loras.length === 1 && job.concepts[0].name === 'alice'")
    webui.locator(f"{PANEL}_enabled input").check()
    canvas = webui.locator(f"{PANEL} canvas.mc-canvas")

    def stroke(start, end, steps):
        canvas.scroll_into_view_if_needed()   # showing the concept's tab may have moved the page
        box = canvas.bounding_box()
        at = lambda fx, fy: (box["x"] + fx * box["width"], box["y"] + fy * box["height"])  # noqa: E731
        webui.mouse.move(*at(*start))
        webui.mouse.down()
        webui.mouse.move(*at(*end), steps=steps)
        webui.mouse.up()
    webui.click(f'{PANEL} [data-concept="1"]')
    webui.click(f'{PANEL} button[title="Clear the selected concept\'s region"]')
    webui.click(f'{PANEL} [data-tool="brush"]')
    stroke((0.62, 0.2), (0.8, 0.85), 20)
    wait_for_job(webui, "job.concepts[1].region.type === 'mask' && job.concepts[1].region.png.length > 100")
    webui.click(f'{PANEL} [data-concept="0"]')
    webui.click(f'{PANEL} [data-tool="rect"]')
    stroke((0.08, 0.1), (0.45, 0.95), 10)
    wait_for_job(webui, "job.concepts[0].region.type === 'rect' && job.concepts[0].region.w < 0.45")
    assert panel_height(webui) <= MAX_HEIGHT
    folder = os.environ.get("MC_SCREENSHOTS")
    if folder:
        pathlib.Path(folder).mkdir(parents=True, exist_ok=True)
        path = pathlib.Path(folder) / f"panel-{webui.host}.png"
        webui.locator(PANEL).screenshot(path=str(path))
        assert path.stat().st_size > 10000


def reload_ui(page, address):
    """Settings -> Reload UI: the WebUI builds its page again, reading ui-config.json."""
    with page.expect_navigation(timeout=PAGE_TIMEOUT * 2):
        page.locator("#settings_restart_gradio").dispatch_event("click")
    load(page, address)


def test_saved_ui_defaults_come_back_into_the_options_and_never_into_the_concepts(webui, address):
    """A ui-config.json that holds concept 1's values under the shared labels (what earlier
    versions of the panel left there), then the panel's options saved with Settings -> Defaults
    -> Apply, then Reload UI: the options come back, the job holds what the page shows."""
    path = os.environ.get(CONFIG_VARIABLE)
    if not path:
        pytest.skip(f"set {CONFIG_VARIABLE} to the WebUI's ui-config.json to reload the UI with it")
    original = pathlib.Path(path).read_text(encoding="utf8")
    try:
        saved = json.loads(original)
        saved.update({"txt2img/Region/value": "left half", "txt2img/x/value": 0.0, "txt2img/width/value": 1.0,
                      "txt2img/Concept prompt/value": "concept 1's prompt", "txt2img/Name/value": "concept 1"})
        pathlib.Path(path).write_text(json.dumps(saved, indent=4), encoding="utf8")
        webui.locator(f"{PANEL}_options .label-wrap").first.click()
        start_box(webui).fill("0.55")
        wait_for_job(webui, "job.start_at === 0.55")
        webui.locator("#ui_defaults_apply").dispatch_event("click")
        written = lambda: json.loads(pathlib.Path(path).read_text(encoding="utf8"))  # noqa: E731
        wait_until(webui, lambda: written().get("txt2img/Concepts start at/value") == "0.55",   # a text box
                   "Settings -> Defaults -> Apply wrote the option", timeout_ms=60000)
        reload_ui(webui, address)
        job = assert_page_shows_the_job(webui)
        assert job["start_at"] == 0.55 and not any(c["prompt"] for c in job["concepts"])
        webui.locator(f"{PANEL}_options .label-wrap").first.click()
        assert start_box(webui).input_value() == "0.55"
    finally:
        pathlib.Path(path).write_text(original, encoding="utf8")
        reload_ui(webui, address)


def test_the_img2img_tab_has_a_panel_of_its_own(webui):
    """The panel built a second time for img2img: its own ids, job box and region canvas in the
    img2img tab of the real page, beside txt2img's."""
    page = webui
    page.locator("#tabs button", has_text="img2img").first.click()
    panel = page.locator("#img2img_multi_concept")
    panel.wait_for(state="attached", timeout=PAGE_TIMEOUT)
    assert page.locator("#img2img_multi_concept_job").count() == 1
    assert page.locator("#multi_concept_job").count() == 1
    wait_until(page, lambda: page.locator("#img2img_multi_concept canvas").count() >= 1, "img2img's region canvas",
               timeout_ms=60000)
