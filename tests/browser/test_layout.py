"""The panel's layout in a real browser: one screen tall, only what applies, one concept at a time."""

from __future__ import annotations

import json

from lib_mc.regions import region_mask
from lib_mc.job import parse_job
from panel_page import (MAX_HEIGHT, PANEL, edit_every_kind_of_control, fill_number, generate, open_panel, panel_height,
                        pick, show_tab, shown, wait_for_job, wait_until)


def visible_tabs(page) -> list[str]:
    return [t.strip() for t in page.locator(f"{PANEL}_tabs .tab-nav button:visible").all_inner_texts()]


def test_two_concepts_fit_one_screen_and_more_concepts_do_not_grow_the_panel(browser, panel_app):
    # 1,400 px: the bare app's full width; 700 px: about the settings column of the WebUI's txt2img
    for width in (1400, 700):
        context = browser.new_context(viewport={"width": width, "height": 1000})
        page = context.new_page()
        page.goto(panel_app.url)
        open_panel(page)
        canvas = page.locator(f"{PANEL} canvas.mc-canvas").bounding_box()
        panel = page.locator(PANEL).bounding_box()
        # a square image: the canvas keeps its full size (512 px), or beside its legend, most of the width
        assert min(canvas["width"], canvas["height"]) >= min(500, 0.6 * panel["width"]), (canvas, panel)
        two = panel_height(page)
        assert two <= MAX_HEIGHT, f"{two:.0f} px tall at {width} px wide"
        fill_number(page, "multi_concept_count", 6)
        wait_for_job(page, "job.concepts.length === 6")
        wait_until(page, lambda: len(visible_tabs(page)) == 6, "six concept tabs")
        assert panel_height(page) <= two + 40, "a tab row at most"   # six concepts: tabs, not six cards
        fill_number(page, "multi_concept_count", 3)
        wait_until(page, lambda: visible_tabs(page) == ["Concept 1", "Concept 2", "Concept 3"], "three concept tabs")
        context.close()


def test_a_concept_shows_only_the_fields_its_region_needs(page, panel_app):
    assert shown(page, 0) == set()   # a preset: nothing to type
    for kind, expected in (("rectangle", {"box"}), ("mask", {"mask"}), ("auto", {"class_word"}),
                           ("auto in rectangle", {"box", "class_word"}), ("right third", set())):
        pick(page, "multi_concept_region_0", kind)
        wait_until(page, lambda: shown(page, 0) == expected, f"{kind}: {expected}, got {shown(page, 0)}")
    # a pasted job shows what each concept's region needs
    page.fill("#load_text textarea", json.dumps({"version": 1, "enabled": True, "concepts": [
        {"name": "him", "class_word": "man", "region": {"type": "auto"}},
        {"name": "her", "region": {"type": "rect", "x": 0.4, "y": 0, "w": 0.6, "h": 1}}]}))
    page.click("#load_button")
    wait_for_job(page, "job.concepts[0].name === 'him'")
    wait_until(page, lambda: shown(page, 0) == {"class_word"}, "pasted auto region: the class word")
    show_tab(page, 1)
    wait_until(page, lambda: shown(page, 1) == {"box"}, "pasted rectangle: its numbers")
    assert page.locator("#multi_concept_x_1 input[type=number]").input_value() == "0.4"


def test_the_concept_tab_and_the_concept_drawn_on_the_canvas_go_together(page, panel_app):
    show_tab(page, 1)
    page.wait_for_function("window.MultiConcept.editor.active === 1")
    page.click(f'{PANEL} [data-concept="0"]')   # the legend
    page.locator(f"{PANEL}_name_0").wait_for(state="visible")
    assert not page.locator(f"{PANEL}_name_1").is_visible()


def test_every_kind_of_control_reaches_the_job_and_no_edit_rewrites_another_concept(page, panel_app, tmp_path):
    job, _ = edit_every_kind_of_control(page, tmp_path, "alice_v1")
    received = generate(page, panel_app)
    assert received == job
    parsed = parse_job(received)
    assert parsed.enabled and parsed.start_at == 0.45 and parsed.hires_loras is False
    assert (parsed.mode, parsed.isolation, parsed.isolation_until, parsed.reinit) == ("regional", False, 0.6, True)
    assert parsed.enhance is True
    second = parsed.concepts[1]
    assert (second.name, second.prompt, second.negative_prompt, second.class_word) == (
        "bob", "photo of bob man", "blurry", "man")
    assert [(lora.name, lora.weight) for lora in second.loras] == [("typed_lora", 0.7), ("alice_v1", 0.8)]
    mask = region_mask(second.region, (64, 64), "m").numpy()   # the uploaded file: white lower half
    assert mask[48, 32] == 1 and mask[16, 32] == 0
    assert parsed.concepts[0].region.type == "rect" and parsed.concepts[0].region.w == 0.5


def test_a_canvas_edit_names_the_concept_it_changed(page, panel_app):
    """Python sets the region controls of those concepts only (panel_state.apply_canvas)."""
    page.click(f'{PANEL} [data-concept="1"]')
    page.click(f'{PANEL} [data-tool="rect"]')
    box = page.locator(f"{PANEL} canvas.mc-canvas").bounding_box()
    page.mouse.move(box["x"] + 0.6 * box["width"], box["y"] + 0.2 * box["height"])
    page.mouse.down()
    page.mouse.move(box["x"] + 0.9 * box["width"], box["y"] + 0.8 * box["height"], steps=8)
    page.mouse.up()
    wait_for_job(page, "Math.abs(job.concepts[1].region.x - 0.6) < 0.02")
    sent = json.loads(page.locator(f"{PANEL}_canvas_data textarea").input_value())
    assert sent["edited"] == [1] and len(sent["regions"]) == 2
    page.locator(f'{PANEL} [data-concept="0"] button[title="Bring forward"]').click()   # the order only
    page.wait_for_function("JSON.parse(document.querySelector('#multi_concept_canvas_data textarea').value)"
                           ".edited.length === 0")


def test_canvas_edits_that_pile_up_all_reach_python(page, panel_app):
    """Three edits sent at once: gradio 4 runs the first and then only the last of the rest;
    the last must carry the second's concept too."""
    page.evaluate("""() => {
        const editor = window.MultiConcept.editor;
        const [w, h] = editor.layerSize();
        const draw = (index, x, y, rw, rh) => {
            editor.setActive(index, false);
            editor.remember();
            editor.concepts[index].layer.clear();
            editor.concepts[index].layer.fillRect(x * w, y * h, rw * w, rh * h, false);
            editor.exportRegions([index]);
        };
        draw(0, 0.1, 0.1, 0.2, 0.2);
        draw(1, 0.6, 0.2, 0.3, 0.5);
        draw(0, 0.1, 0.5, 0.25, 0.25);
    }""")
    wait_for_job(page, "Math.abs(job.concepts[0].region.y - 0.5) < 0.02 && Math.abs(job.concepts[1].region.x - 0.6) < 0.02"
                       " && Math.abs(job.concepts[1].region.h - 0.5) < 0.02")
