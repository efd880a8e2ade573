"""The Multi-Concept accordion. `build_panel` returns the ONE component the script takes as its
argument: a hidden textbox holding the job JSON, written by the visible controls.

Layout (one screen tall whatever the number of concepts): Enable, Mode and Concepts; the region
canvas; one tab per concept, showing only the fields its region kind needs; the rarely changed
options folded under "Options". What is to come fits the same frame: a mode's own settings go
under Options, a concept's other identities (face photos, reference pictures) into its tab,
shown by their kind as the region fields are.

Pasted infotext goes to a second hidden box (`paste_box`) that fills the controls, so a
control's own updates never loop back into it.

The region canvas (javascript/multi_concept_*.js) mounts into an HTML slot, writes what is drawn
into the hidden `canvas` box and redraws itself from the job whenever the job changes. The
hidden boxes the page script touches are rendered but hidden by CSS (`mc-hidden`): gradio 3
leaves invisible components out of the page.

Two tabs: the panel is built for txt2img and again for img2img. Its element ids start with the
tab's prefix (`elem_prefix`): txt2img keeps the ids it always had (`multi_concept_...`, which
saved UI defaults, the page script and the browser tests name), img2img's are
`img2img_multi_concept_...`; the page script keeps one canvas per prefix.

Saved UI defaults: the WebUI (modules/ui_loadsave.py) saves and restores every labelled control
in ui-config.json under "txt2img/<label>/<field>". Concepts share their labels, so every control
whose label is not unique to this panel, or that shapes the others (the number of concepts), is
kept out of it (`do_not_save_to_config`). The folded options keep their saved defaults, and the
job the page starts with is composed from what they show then (`compat.value_when_served`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import gradio as gr

from ..job import MODES
from . import compat
from .panel_state import (CONCEPT_FIELDS, FACE_FIELDS, MAX_UI_CONCEPTS, REGION_CHOICES, TOP_FIELDS, add_lora,
                          apply_canvas, compose, decompose, default_values, reference_image, shown_fields)

ELEM = "multi_concept"   # txt2img's element-id prefix
IMG2IMG_ELEM = "img2img_multi_concept"
HIDDEN = ["mc-hidden"]   # in the page for the canvas script, out of sight (style.css)
MAX_GROW_SLIDER = 64   # px; the API takes up to MAX_GROW_PX
PICK_OUTPUT_JS = ("(...values) => {{ values[0] = window.MultiConcept ? "
                  "window.MultiConcept.selectedOutputPicture('{prefix}') : ''; return values; }}")
TO_CANVAS_JS = "(job) => {{ if (window.MultiConcept) window.MultiConcept.fromJob(job, '{prefix}'); return []; }}"


def elem_prefix(is_img2img: bool = False) -> str:
    """The element-id prefix of the panel in that tab (txt2img's ids stay as they were)."""
    return IMG2IMG_ELEM if is_img2img else ELEM


@dataclass
class Panel:
    job: gr.components.Component        # the script argument
    paste_box: gr.components.Component  # infotext "Multi-Concept" lands here
    controls: list                      # every value the job is composed from, in panel_state order
    per_concept: list                   # per concept: its components (never saved as UI defaults)


def unsaved(component):
    """Keeps the component out of the WebUI's saved UI defaults (ui-config.json)."""
    component.do_not_save_to_config = True
    return component


@dataclass
class _Concept:
    tab: gr.components.Component
    values: list        # in CONCEPT_FIELDS order
    shown_by_region: list   # the box row, the mask upload, the class word: shown as shown_fields says
    pick: gr.components.Component
    refresh: gr.components.Component
    components: list
    face_box: gr.components.Component   # the folded face photos: opened when a pasted job has some


def _concept_tab(i: int, defaults: list, lora_choices: list[str], elem: str) -> _Concept:
    d = dict(zip(CONCEPT_FIELDS, defaults))
    shown = shown_fields(d["region"], d["token"])
    e = lambda name: f"{elem}_{name}_{i}"   # noqa: E731
    with gr.Tab(f"Concept {i + 1}", id=i, elem_id=e("tab"), visible=i < 2) as tab:
        with gr.Row():
            name = gr.Textbox(d["name"], label="Name", elem_id=e("name"), min_width=120,
                              placeholder="For you: the canvas, the infotext, the overlay")
            region = gr.Dropdown(REGION_CHOICES, value=d["region"], label="Region", elem_id=e("region"),
                                 min_width=120)
            class_word = gr.Textbox(d["class_word"], label="Class word", elem_id=e("class"), min_width=120,
                                    visible=shown["class_word"], placeholder="its word in the main prompt: woman")
            token = gr.Textbox(d["token"], label="Identity words (token)", elem_id=e("token"), min_width=120,
                               placeholder="alice woman: replace the class words in its prompt")
        with gr.Row(visible=shown["box"], elem_id=e("box")) as box:
            x = gr.Number(d["x"], label="x", elem_id=e("x"), min_width=60)
            y = gr.Number(d["y"], label="y", elem_id=e("y"), min_width=60)
            w = gr.Number(d["w"], label="width", elem_id=e("w"), min_width=60)
            h = gr.Number(d["h"], label="height", elem_id=e("h"), min_width=60)
        mask = compat.mask_upload("Mask (white = this concept)", elem_id=e("mask"), visible=shown["mask"],
                                  height=160)
        with gr.Row():
            prompt = gr.Textbox(d["prompt"], label="Concept prompt", lines=2, elem_id=e("prompt"), min_width=160,
                                placeholder="Empty: the main prompt. <lora:name:w> works")
            negative = gr.Textbox(d["negative_prompt"], label="Negative prompt", lines=2, elem_id=e("negative"),
                                  min_width=160, placeholder="Empty: the main negative prompt")
        with gr.Row():
            loras = gr.Textbox(d["loras"], label="LoRAs (name:weight, ...)", elem_id=e("loras"), min_width=160,
                               placeholder="Only in this concept's region")
            pick = gr.Dropdown(lora_choices, label="Add a LoRA", elem_id=e("pick"), min_width=120)
            refresh = gr.Button("\u21bb", elem_id=e("refresh"), elem_classes=["mc-tool"], min_width=40,
                                scale=0)
        # an image concept (PnP-MIX): folded, so a LoRA concept's tab stays as short as it was
        with gr.Accordion("Image concept", open=False, elem_id=e("image")):
            with gr.Row():
                reference = compat.mask_upload("Reference picture (image concept)", elem_id=e("reference"),
                                               height=160)
                reference_mask = compat.mask_upload("Reference mask (optional)", elem_id=e("reference_mask"),
                                                    height=160)
        # a face concept (InstantID): folded beside the image concept; one picture slot per photo,
        # each labelled apart (the hosts key values by label), like the reference picture never saved
        with gr.Accordion("Face concept", open=False, elem_id=e("faces")) as face_box:
            with gr.Row():
                faces = [compat.mask_upload(f"Face photo {k + 1}", elem_id=e(f"face_{k + 1}"), height=120,
                                            min_width=100) for k in range(len(FACE_FIELDS))]
            with gr.Row():
                face_weight = gr.Slider(0, 2, d["face_weight"], step=0.05, label="Face weight",
                                        elem_id=e("face_weight"),
                                        info="How strongly the photos' identity acts (InstantID's IP-Adapter scale)")
                face_control = gr.Slider(0, 2, d["face_control"], step=0.05, label="Face control",
                                         elem_id=e("face_control"),
                                         info="How firmly the face's keypoints hold it in place (IdentityNet's "
                                              "scale); both 0: the photos only score the likeness")
    values = [name, loras, prompt, negative, class_word, token, region, x, y, w, h, mask, reference, reference_mask,
              *faces, face_weight, face_control]
    for component in values + [pick, refresh]:
        unsaved(component)
    return _Concept(tab, values, [box, mask, class_word], pick, refresh, values + [pick, refresh], face_box)


def build_panel(lora_names: Callable[[], list[str]], refresh_lora_names: Callable[[], list[str]] | None = None,
                is_img2img: bool = False) -> Panel:
    elem = elem_prefix(is_img2img)   # the ids of this tab's panel
    defaults = default_values()
    top = dict(zip(TOP_FIELDS, defaults[:len(TOP_FIELDS)]))
    try:
        choices = sorted(lora_names())
    except Exception:   # the LoRA list is a convenience: the panel must build without it
        choices = []
    with gr.Accordion("Multi-Concept", open=False, elem_id=elem):
        with gr.Row():
            enabled = unsaved(gr.Checkbox(top["enabled"], label="Enable", elem_id=f"{elem}_enabled",
                                          info="Each concept's LoRAs and prompt apply only in its region"))
            mode = unsaved(gr.Dropdown(list(MODES), value=top["mode"], label="Mode", elem_id=f"{elem}_mode",
                                       info="blend: two passes; regional: one pass; conductor: attention "
                                            "injection"))
            count = unsaved(gr.Slider(1, MAX_UI_CONCEPTS, top["count"], step=1, label="Concepts",
                                      elem_id=f"{elem}_count", info="How many to place"))
        gr.HTML(f'<div id="{elem}_canvas_slot" class="mc-canvas-slot"></div>')   # the region canvas mounts here
        canvas = gr.Textbox(top["canvas"], elem_id=f"{elem}_canvas_data", elem_classes=HIDDEN, show_label=False)
        with unsaved(gr.Tabs(elem_id=f"{elem}_tabs")):
            concepts = []
            for i in range(MAX_UI_CONCEPTS):
                start = len(TOP_FIELDS) + i * len(CONCEPT_FIELDS)
                concepts.append(_concept_tab(i, defaults[start:start + len(CONCEPT_FIELDS)], choices, elem))
        # The folded options: labels unique to this panel, so they may keep saved UI defaults.
        # An option one mode reads says which in its label; the other mode ignores it.
        with gr.Accordion("Options", open=False, elem_id=f"{elem}_options"):
            with gr.Row():
                # text, not a number box or slider: empty must be possible (a number box never sends it)
                start_at = gr.Textbox(top["start_at"], label="Concepts start at", elem_id=f"{elem}_start_at",
                                      lines=1, max_lines=1, min_width=160, placeholder="mode default",
                                      info="Fraction of steps, e.g. 0.3. Empty: the mode's default (blend 0.3; "
                                           "regional and conductor 0, or 0.3 with automatic regions)")
                feather = gr.Slider(0, 64, top["feather"], step=1, label="Mask feather (px)",
                                    elem_id=f"{elem}_feather", info="Softens region edges")
                auto_grow = gr.Slider(-MAX_GROW_SLIDER, MAX_GROW_SLIDER, top["auto_grow"], step=1,
                                      label="Grow automatic regions (px)", elem_id=f"{elem}_auto_grow",
                                      info="Found masks grow (> 0) or shrink (< 0): room for hair, hats, outlines")
            with gr.Row():
                layout_replay = gr.Checkbox(top["layout_replay"], label="Layout replay (blend)",
                                            elem_id=f"{elem}_layout_replay",
                                            info="The base prompt follows the layout pass's attention")
                self_until = gr.Slider(0, 1, top["self_attn_replay_until"], step=0.05,
                                       label="Keep the layout's shapes until (blend)", elem_id=f"{elem}_self_until",
                                       info="Fraction of steps with self-attention replay in low-res layers")
            with gr.Row():
                isolation = gr.Checkbox(top["isolation"], label="Concept isolation (regional)",
                                        elem_id=f"{elem}_isolation",
                                        info="Regions do not see each other in self-attention")
                isolation_until = gr.Slider(0, 1, top["isolation_until"], step=0.05,
                                            label="Isolation until (regional)", elem_id=f"{elem}_isolation_until",
                                            info="Fraction of steps with concept isolation")
                reinit = gr.Checkbox(top["reinit"], label="Re-initialise latents (regional)",
                                     elem_id=f"{elem}_reinit",
                                     info="Starting noise re-drawn per region (class word)")
                enhance = gr.Checkbox(top["enhance"], label="Concept enhancement (regional)",
                                      elem_id=f"{elem}_enhance",
                                      info="Class words' attention pulled into their regions, first half of "
                                           "the steps (slower)")
            with gr.Row():
                mask_refine = gr.Checkbox(top["mask_refine"], label="Mask refinement (conductor)",
                                          elem_id=f"{elem}_mask_refine",
                                          info="Regions follow their subjects (decoder self-attention, k-means)")
                refine_from = gr.Slider(0, 1, top["mask_refine_from"], step=0.05, label="Refine from (conductor)",
                                        elem_id=f"{elem}_mask_refine_from", info="Fraction of steps")
                refine_until = gr.Slider(0, 1, top["mask_refine_until"], step=0.05, label="Refine until (conductor)",
                                         elem_id=f"{elem}_mask_refine_until", info="Fraction of steps")
                refine_every = gr.Slider(0.005, 0.5, top["mask_refine_every"], step=0.005,
                                         label="Refine every (conductor)", elem_id=f"{elem}_mask_refine_every",
                                         info="Fraction of steps between refinements (0.025: 5 of 200)")
                refine_k = gr.Number(top["mask_refine_k"], label="Refinement segments (conductor)", precision=0,
                                     elem_id=f"{elem}_mask_refine_k", minimum=0, min_width=120,
                                     info="k-means k; 0: every k from N+1 to 2N+1")
            with gr.Row():
                with gr.Column():
                    reference = unsaved(compat.mask_upload("Reference picture (conductor)",
                                                           elem_id=f"{elem}_reference", height=160))
                    from_output = unsaved(gr.Button("Use the selected output as reference",
                                                    elem_id=f"{elem}_reference_from_output", size="sm"))
                    picked = gr.Textbox("", visible=False, elem_id=f"{elem}_reference_picked")
                with gr.Column():
                    align_until = gr.Slider(0, 1, top["align_until"], step=0.05, label="Alignment until (conductor)",
                                            elem_id=f"{elem}_align_until",
                                            info="Fraction of steps the layout is pulled to the reference's")
                    align_step = gr.Number(top["align_step"], label="Alignment step (conductor)",
                                           elem_id=f"{elem}_align_step", minimum=0, min_width=120,
                                           info="Gradient step size; 0: the paper's (10 SD1.5, 40 SDXL)")
            with gr.Row():   # image concepts and the kept background (PnP-MIX): blend and conductor
                with gr.Column():
                    background = unsaved(compat.mask_upload("Background picture (kept)", elem_id=f"{elem}_background",
                                                            height=160))
                with gr.Column():
                    keep_background = gr.Checkbox(top["keep_background"], label="Keep background",
                                                  elem_id=f"{elem}_keep_background",
                                                  info="Outside the regions the image is the background picture "
                                                       "(img2img: the init image)")
                    appearance_alpha = gr.Slider(0, 1, top["appearance_alpha"], step=0.01,
                                                 label="Appearance alpha (image concepts)",
                                                 elem_id=f"{elem}_appearance_alpha",
                                                 info="Guidance of the reference's look: V + alpha (V - V_ref)")
                    dilution_beta = gr.Slider(0, 1, top["dilution_beta"], step=0.05,
                                              label="Dilution beta (image concepts)", elem_id=f"{elem}_dilution_beta",
                                              info="The reference's surroundings: beta x the background")
                    dilution_expand = gr.Slider(0, 0.5, top["dilution_expand"], step=0.01,
                                                label="Dilution expand (image concepts)",
                                                elem_id=f"{elem}_dilution_expand",
                                                info="The subject's box grown by this fraction of the image side")
            with gr.Row():
                refine = gr.Checkbox(top["refine_regions"], label="Refine automatic regions while sampling",
                                     elem_id=f"{elem}_refine",
                                     info="Auto regions follow their subjects (self-attention segments)")
                hires_loras = gr.Checkbox(top["hires_loras"], label="Concepts in the hires pass",
                                          elem_id=f"{elem}_hires_loras",
                                          info="Hires fix: each concept's LoRAs act in its region again")
                save_layout = gr.Checkbox(top["save_layout"], label="Also output the layout pass and masks",
                                          elem_id=f"{elem}_save_layout",
                                          info="The layout image, the regions over it, how automatic ones were found")
        job = gr.Textbox(compose(*defaults), elem_id=f"{elem}_job", elem_classes=HIDDEN, show_label=False)
        paste_box = gr.Textbox("", visible=False, elem_id=f"{elem}_paste")

    controls = [enabled, mode, start_at, layout_replay, self_until, feather, save_layout, refine, auto_grow,
                hires_loras, isolation, isolation_until, reinit, enhance, mask_refine, refine_from, refine_until,
                refine_every, refine_k, reference, align_until, align_step, background, keep_background,
                appearance_alpha, dilution_beta, dilution_expand, count, canvas]   # TOP_FIELDS order
    controls += [c for concept in concepts for c in concept.values]
    compat.value_when_served(job, lambda: compose(*(c.value for c in controls)))
    _wire(controls, job, paste_box, count, concepts, refresh_lora_names or lora_names, canvas)
    _wire_canvas(controls, job, canvas, elem)
    _wire_reference(controls, job, from_output, picked, elem)
    return Panel(job, paste_box, controls, [concept.components for concept in concepts])


def _wire(controls, job, paste_box, count, concepts, lora_names, canvas):
    for control in controls:
        if control is canvas:
            continue   # _wire_canvas
        # User edits only: programmatic updates (paste, the canvas) set the job themselves, and a
        # cascade of change events would race them with stale inputs.
        events = ("upload", "clear") if isinstance(control, gr.Image) else ("input",)
        for event in events:
            getattr(control, event)(compose, inputs=controls, outputs=[job], show_progress=False, queue=False,
                                    **compat.latest_wins(), **compat.not_in_api())

    count.change(lambda n: [compat.update(visible=i < int(n)) for i in range(MAX_UI_CONCEPTS)],
                 inputs=[count], outputs=[concept.tab for concept in concepts], show_progress=False,
                 **compat.not_in_api())
    picks = [concept.pick for concept in concepts]
    for concept in concepts:
        # only what this concept's region kind needs; on every change (a paste or the canvas too),
        # and it only shows or hides: the job is not touched
        region = concept.values[CONCEPT_FIELDS.index("region")]
        token = concept.values[CONCEPT_FIELDS.index("token")]
        for control in (region, token):   # identity words need the class word their variant replaces
            control.change(lambda kind, words: [compat.update(visible=v) for v in shown_fields(kind, words).values()],
                           inputs=[region, token], outputs=concept.shown_by_region, show_progress=False, queue=False,
                           **compat.not_in_api())
        loras_box = concept.values[CONCEPT_FIELDS.index("loras")]
        concept.pick.select(lambda text, name: add_lora(text, name), inputs=[loras_box, concept.pick],
                            outputs=[loras_box], show_progress=False, **compat.not_in_api()).then(
            compose, inputs=controls, outputs=[job], show_progress=False, **compat.not_in_api())

    def refreshed():
        return [compat.update(choices=sorted(lora_names())) for _ in picks]
    for concept in concepts:
        concept.refresh.click(refreshed, outputs=picks, show_progress=False, **compat.not_in_api())

    faces_at = [len(TOP_FIELDS) + i * len(CONCEPT_FIELDS) + CONCEPT_FIELDS.index(FACE_FIELDS[0])
                for i in range(MAX_UI_CONCEPTS)]

    def pasted(text):
        values = decompose(text)
        if values is None:
            return [compat.update() for _ in controls] + [compat.update()] + [compat.update() for _ in concepts]
        # a pasted face concept's photos are shown: its folded face box opens (others stay as they are)
        opened = [compat.update(open=True) if values[at] is not None else compat.update() for at in faces_at]
        return values + [compose(*values)] + opened
    paste_box.change(pasted, inputs=[paste_box], outputs=controls + [job] + [c.face_box for c in concepts],
                     show_progress=False, **compat.not_in_api())


def _wire_reference(controls, job, button, picked, elem):
    """The selected output image (the page reads its pixels) -> the reference upload and the job."""
    at = TOP_FIELDS.index("reference")

    def taken(picture, *values):
        image = reference_image(picture or "")
        if image is None:   # no output shown yet
            return [compat.update(), compat.update()]
        values = list(values)
        values[at] = image
        return [image, compose(*values)]
    button.click(taken, inputs=[picked] + controls, outputs=[controls[at], job], show_progress=False,
                 **compat.js_kwargs(PICK_OUTPUT_JS.format(prefix=elem)), **compat.not_in_api())


def _wire_canvas(controls, job, canvas, elem):
    """Canvas -> region controls -> job, and job -> canvas (client side only)."""
    region_fields = [CONCEPT_FIELDS.index(f) for f in ("region", "x", "y", "w", "h")]
    targets = [len(TOP_FIELDS) + i * len(CONCEPT_FIELDS) + f for i in range(MAX_UI_CONCEPTS) for f in region_fields]

    def drawn(*values):
        values = apply_canvas(*values)
        return [values[t] for t in targets] + [compose(*values)]
    # queue=False: a drawing must not wait behind a running generation in the WebUI's queue
    canvas.input(drawn, inputs=controls, outputs=[controls[t] for t in targets] + [job], show_progress=False,
                 queue=False, **compat.latest_wins(), **compat.not_in_api())
    job.change(None, inputs=[job], outputs=None, show_progress=False, queue=False, **compat.not_in_api(),
               **compat.js_kwargs(TO_CANVAS_JS.format(prefix=elem)))
