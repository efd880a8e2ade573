"""The panel builds in a real gradio Blocks, more than once, with one argument component."""

import gradio as gr

from lib_mc.job import parse_job
from lib_mc.ui.panel import build_panel


def test_panel_builds_twice_without_side_effects_and_exposes_one_job_component():
    calls = []

    def names():
        calls.append(1)
        return ["bob_v1", "alice_v1"]
    panels = []
    for _ in range(2):   # the API builds script defaults by calling ui() again
        with gr.Blocks():
            panels.append(build_panel(names))
    for panel in panels:
        assert isinstance(panel.job, gr.Textbox) and "mc-hidden" in panel.job.elem_classes
        job = parse_job(panel.job.value)
        assert not job.enabled and len(job.concepts) == 2
    assert len(calls) == 2


def test_panel_builds_when_the_lora_list_fails():
    def broken():
        raise RuntimeError("Lora extension disabled")
    with gr.Blocks():
        panel = build_panel(broken)
    assert parse_job(panel.job.value).mode == "blend"


def test_the_mode_offers_blend_and_regional_and_a_one_mode_option_says_which():
    from lib_mc.job import MODE_OF_OPTION, MODES
    from lib_mc.ui.panel_state import TOP_FIELDS
    with gr.Blocks():
        panel = build_panel(lambda: [])
    control = dict(zip(TOP_FIELDS, panel.controls))
    offered = [c[0] if isinstance(c, (tuple, list)) else c for c in control["mode"].choices]   # gradio 4: pairs
    assert offered == list(MODES) == ["blend", "regional", "conductor"]
    for key in TOP_FIELDS:
        mode = MODE_OF_OPTION.get(key)
        label = control[key].label or ""
        assert (f"({mode})" in label) if mode else not any(f"({m})" in label for m in MODES), (key, label)
    assert control["start_at"].value == "" and "mode's default" in control["start_at"].info
    assert control["enhance"].label == "Concept enhancement (regional)" and control["enhance"].value is False
    assert isinstance(control["reference"], gr.Image) and control["reference"].label == "Reference picture (conductor)"
    assert control["mask_refine"].value is True and control["mask_refine_every"].value == 0.025
    from lib_mc.ui.panel_state import CONCEPT_FIELDS
    token = panel.controls[len(TOP_FIELDS) + CONCEPT_FIELDS.index("token")]
    assert token.label == "Identity words (token)" and getattr(token, "do_not_save_to_config", False)


def test_the_panels_events_are_no_api_endpoints():
    """The panel's events feed the page only (the API takes the job as a script argument): left
    out of gradio's API info, which gradio 4 builds when it first serves the page (seconds with
    every event taking every control: past the 3 s its launch waits for its own page)."""
    with gr.Blocks() as demo:
        build_panel(lambda: [])
    dependencies = demo.config["dependencies"]
    assert len(dependencies) > 100 and all(d["api_name"] is False for d in dependencies)
