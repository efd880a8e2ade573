"""The Multi-Concept accordion. `build_panel` returns the ONE component the script takes as its
argument: a hidden textbox holding the job JSON, written by the visible controls.

Pasted infotext goes to a second hidden box (`paste_box`) that fills the controls, so a
control's own updates never loop back into it.

The region canvas (javascript/multi_concept_*.js) mounts into an HTML slot, writes what is drawn
into the hidden `canvas` box and redraws itself from the job whenever the job changes. The
hidden boxes the page script touches are rendered but hidden by CSS (`mc-hidden`): gradio 3
leaves invisible components out of the page.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import gradio as gr

from . import compat
from .panel_state import (CONCEPT_FIELDS, MAX_UI_CONCEPTS, REGION_CHOICES, TOP_FIELDS, add_lora, apply_canvas,
                          compose, decompose, default_values)

ELEM = "multi_concept"
HIDDEN = ["mc-hidden"]   # in the page for the canvas script, out of sight (style.css)
MAX_GROW_SLIDER = 64   # px; the API takes up to MAX_GROW_PX
TO_CANVAS_JS = "(job) => { if (window.MultiConcept) window.MultiConcept.fromJob(job); return []; }"


@dataclass
class Panel:
    job: gr.components.Component        # the script argument
    paste_box: gr.components.Component  # infotext "Multi-Concept" lands here
    controls: list


def _concept_row(i: int, defaults: list, lora_choices: list[str]):
    d = dict(zip(CONCEPT_FIELDS, defaults))
    with gr.Group(visible=i < 2, elem_id=f"{ELEM}_concept_{i}") as group:
        with gr.Row():
            name = gr.Textbox(d["name"], label=f"Concept {i + 1}", elem_id=f"{ELEM}_name_{i}",
                              info="A label for you; shown in the infotext and the layout overlay")
            loras = gr.Textbox(d["loras"], label="LoRAs (name:weight, ...)", elem_id=f"{ELEM}_loras_{i}",
                               info="Applied only inside this concept's region")
            pick = gr.Dropdown(lora_choices, label="Add a LoRA", elem_id=f"{ELEM}_pick_{i}",
                               info="Picks from the WebUI's LoRA list")
        prompt = gr.Textbox(d["prompt"], label="Concept prompt", lines=2, elem_id=f"{ELEM}_prompt_{i}",
                            placeholder="Empty: the main prompt. <lora:name:weight> tags work here too")
        with gr.Row():
            negative = gr.Textbox(d["negative_prompt"], label="Negative prompt", elem_id=f"{ELEM}_negative_{i}",
                                  placeholder="Empty: the main negative prompt")
            class_word = gr.Textbox(d["class_word"], label="Class word", elem_id=f"{ELEM}_class_{i}",
                                    info="The word in the main prompt this concept stands for, e.g. woman")
        with gr.Row():
            region = gr.Dropdown(REGION_CHOICES, value=d["region"], label="Region", elem_id=f"{ELEM}_region_{i}",
                                 info="Where this concept goes: a preset, a rectangle, drawn on the canvas, "
                                      "an uploaded mask, auto (found by its class word) or auto in rectangle "
                                      "(found inside the rectangle you draw)")
            x = gr.Number(d["x"], label="x", elem_id=f"{ELEM}_x_{i}", info="left edge, 0-1")
            y = gr.Number(d["y"], label="y", elem_id=f"{ELEM}_y_{i}", info="top edge, 0-1")
            w = gr.Number(d["w"], label="width", elem_id=f"{ELEM}_w_{i}", info="0-1")
            h = gr.Number(d["h"], label="height", elem_id=f"{ELEM}_h_{i}", info="0-1")
        mask = compat.mask_upload("Mask (white = this concept)", elem_id=f"{ELEM}_mask_{i}")
    return group, [name, loras, prompt, negative, class_word, region, x, y, w, h, mask], pick


def build_panel(lora_names: Callable[[], list[str]], refresh_lora_names: Callable[[], list[str]] | None = None) -> Panel:
    defaults = default_values()
    top = dict(zip(TOP_FIELDS, defaults[:len(TOP_FIELDS)]))
    try:
        choices = sorted(lora_names())
    except Exception:   # the LoRA list is a convenience: the panel must build without it
        choices = []
    with gr.Accordion("Multi-Concept", open=False, elem_id=ELEM):
        with gr.Row():
            enabled = gr.Checkbox(top["enabled"], label="Enable", elem_id=f"{ELEM}_enabled",
                                  info="Each concept's LoRAs and prompt apply only in its region")
            mode = gr.Dropdown(["blend"], value=top["mode"], label="Mode", elem_id=f"{ELEM}_mode",
                               info="blend: layout pass, then per-concept branches blended under the masks")
            save_layout = gr.Checkbox(top["save_layout"], label="Also output the layout pass and masks",
                                      elem_id=f"{ELEM}_save_layout")
        with gr.Row():
            start_at = gr.Slider(0, 1, top["start_at"], step=0.05, label="Start blending at",
                                 elem_id=f"{ELEM}_start_at",
                                 info="Fraction of steps. Earlier: stronger likeness; later: closer to the layout")
            feather = gr.Slider(0, 64, top["feather"], step=1, label="Mask feather (px)",
                                elem_id=f"{ELEM}_feather", info="Softens region edges")
        with gr.Row():
            layout_replay = gr.Checkbox(top["layout_replay"], label="Keep the layout (attention replay)",
                                        elem_id=f"{ELEM}_layout_replay",
                                        info="The base prompt follows the layout pass's attention")
            self_until = gr.Slider(0, 1, top["self_attn_replay_until"], step=0.05,
                                   label="Keep the layout's shapes until", elem_id=f"{ELEM}_self_until",
                                   info="Fraction of steps with self-attention replay in low-res layers")
            refine = gr.Checkbox(top["refine_regions"], label="Refine automatic regions while sampling",
                                 elem_id=f"{ELEM}_refine",
                                 info="Auto regions follow their subjects (self-attention segments)")
            auto_grow = gr.Slider(-MAX_GROW_SLIDER, MAX_GROW_SLIDER, top["auto_grow"], step=1,
                                  label="Grow automatic regions (px)", elem_id=f"{ELEM}_auto_grow",
                                  info="Found masks grow (> 0) or shrink (< 0): room for hair, hats, outlines")
        gr.HTML(f'<div id="{ELEM}_canvas_slot" class="mc-canvas-slot"></div>')   # the region canvas mounts here
        canvas = gr.Textbox(top["canvas"], elem_id=f"{ELEM}_canvas_data", elem_classes=HIDDEN, show_label=False)
        with gr.Row():
            count = gr.Slider(1, MAX_UI_CONCEPTS, top["count"], step=1, label="Concepts",
                              elem_id=f"{ELEM}_count", info="How many concepts to place")
            refresh = gr.Button("Refresh LoRA list", elem_id=f"{ELEM}_refresh")
        groups, rows, picks = [], [], []
        for i in range(MAX_UI_CONCEPTS):
            start = len(TOP_FIELDS) + i * len(CONCEPT_FIELDS)
            group, row, pick = _concept_row(i, defaults[start:start + len(CONCEPT_FIELDS)], choices)
            groups.append(group)
            rows.append(row)
            picks.append(pick)
        job = gr.Textbox(compose(*defaults), elem_id=f"{ELEM}_job", elem_classes=HIDDEN, show_label=False)
        paste_box = gr.Textbox("", visible=False, elem_id=f"{ELEM}_paste")

    controls = [enabled, mode, start_at, layout_replay, self_until, feather, save_layout, refine, auto_grow, count,
                canvas]
    controls += [c for row in rows for c in row]
    _wire(controls, job, paste_box, count, groups, rows, picks, refresh, refresh_lora_names or lora_names)
    _wire_canvas(controls, job, canvas)
    return Panel(job, paste_box, controls)


def _wire(controls, job, paste_box, count, groups, rows, picks, refresh, lora_names):
    for control in controls:
        if control.elem_id == f"{ELEM}_canvas_data":
            continue   # _wire_canvas
        # User edits only: programmatic updates (paste, the canvas) set the job themselves, and a
        # cascade of change events would race them with stale inputs.
        events = ("upload", "clear") if isinstance(control, gr.Image) else ("input",)
        for event in events:
            getattr(control, event)(compose, inputs=controls, outputs=[job], show_progress=False, queue=False,
                                    **compat.latest_wins())

    count.change(lambda n: [compat.update(visible=i < int(n)) for i in range(MAX_UI_CONCEPTS)],
                 inputs=[count], outputs=groups, show_progress=False)
    for pick, row in zip(picks, rows):
        loras_box = row[1]
        pick.select(lambda text, name: add_lora(text, name), inputs=[loras_box, pick], outputs=[loras_box],
                    show_progress=False).then(compose, inputs=controls, outputs=[job], show_progress=False)

    def refreshed():
        return [compat.update(choices=sorted(lora_names())) for _ in picks]
    refresh.click(refreshed, outputs=picks, show_progress=False)

    def pasted(text):
        values = decompose(text)
        if values is None:
            return [compat.update() for _ in controls] + [compat.update()]
        return values + [compose(*values)]
    paste_box.change(pasted, inputs=[paste_box], outputs=controls + [job], show_progress=False)


def _wire_canvas(controls, job, canvas):
    """Canvas -> region controls -> job, and job -> canvas (client side only)."""
    region_fields = [CONCEPT_FIELDS.index(f) for f in ("region", "x", "y", "w", "h")]
    targets = [len(TOP_FIELDS) + i * len(CONCEPT_FIELDS) + f for i in range(MAX_UI_CONCEPTS) for f in region_fields]

    def drawn(*values):
        values = apply_canvas(*values)
        return [values[t] for t in targets] + [compose(*values)]
    # queue=False: a drawing must not wait behind a running generation in the WebUI's queue
    canvas.input(drawn, inputs=controls, outputs=[controls[t] for t in targets] + [job], show_progress=False,
                 queue=False, **compat.latest_wins())
    job.change(None, inputs=[job], outputs=None, show_progress=False, queue=False, **compat.js_kwargs(TO_CANVAS_JS))
