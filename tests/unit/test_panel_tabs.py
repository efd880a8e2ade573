"""The panel in the txt2img and the img2img tab: txt2img's element ids as they always were (saved
UI defaults, the page script and the browser tests name them), img2img's all its own, each panel's
page script calls naming its prefix; the image-concept controls in both."""

import gradio as gr

from lib_mc.job import parse_job
from lib_mc.ui.panel import build_panel
from lib_mc.ui.panel_state import CONCEPT_FIELDS, TOP_FIELDS

# ids the browser tests, the page script and saved defaults name (txt2img)
KNOWN = {"multi_concept", "multi_concept_job", "multi_concept_canvas_data", "multi_concept_tabs", "multi_concept_count",
         "multi_concept_mode", "multi_concept_enabled", "multi_concept_options", "multi_concept_region_1",
         "multi_concept_w_1", "multi_concept_pick_1", "multi_concept_isolation_until", "multi_concept_prompt_0",
         "multi_concept_box_0", "multi_concept_mask_0", "multi_concept_class_0", "multi_concept_reference",
         "multi_concept_reference_from_output", "multi_concept_paste"}


def built(is_img2img):
    with gr.Blocks() as demo:
        panel = build_panel(lambda: ["alice_v1"], is_img2img=is_img2img)
    ids = {block.elem_id for block in demo.blocks.values() if getattr(block, "elem_id", None)}
    html = " ".join(str(block.value) for block in demo.blocks.values() if isinstance(block, gr.HTML))
    scripts = " ".join(str(d.get("js") or "") for d in demo.config["dependencies"])
    return panel, ids, html, scripts


def test_txt2img_keeps_its_ids_and_img2img_has_its_own():
    _, txt, txt_html, txt_js = built(False)
    _, img, img_html, img_js = built(True)
    assert KNOWN <= txt and all(i.startswith("multi_concept") for i in txt)
    assert 'id="multi_concept_canvas_slot"' in txt_html
    assert all(i.startswith("img2img_multi_concept") for i in img) and not txt & img
    assert {"img2img_multi_concept_job", "img2img_multi_concept_canvas_data", "img2img_multi_concept_tabs"} <= img
    assert 'id="img2img_multi_concept_canvas_slot"' in img_html
    # the page script is told which panel's canvas a job or a pick of the output is for
    assert "fromJob(job, 'multi_concept')" in txt_js and "selectedOutputPicture('multi_concept')" in txt_js
    assert "fromJob(job, 'img2img_multi_concept')" in img_js and "'multi_concept'" not in img_js


def test_the_image_concept_controls_reach_the_job_in_both_tabs():
    for is_img2img in (False, True):
        panel, ids, _, _ = built(is_img2img)
        prefix = "img2img_multi_concept" if is_img2img else "multi_concept"
        control = dict(zip(TOP_FIELDS, panel.controls))
        assert isinstance(control["background"], gr.Image) and control["background"].label == \
            "Background picture (kept)"
        assert getattr(control["background"], "do_not_save_to_config", False)   # a picture is never a default
        assert (control["keep_background"].label, control["keep_background"].value) == ("Keep background", True)
        assert [control[k].value for k in ("appearance_alpha", "dilution_beta", "dilution_expand")] == [0.15, 0.8, 0.1]
        row = dict(zip(CONCEPT_FIELDS, panel.controls[len(TOP_FIELDS) + len(CONCEPT_FIELDS):]))   # concept 2
        assert row["reference"].label == "Reference picture (image concept)"
        assert row["reference_mask"].label == "Reference mask (optional)"
        assert {f"{prefix}_reference_1", f"{prefix}_reference_mask_1", f"{prefix}_background"} <= ids
        job = parse_job(panel.job.value)
        assert job.keep_background and job.background == "" and job.concepts[1].reference == ""
