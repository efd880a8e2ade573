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
