"""The panel and the WebUI's saved UI defaults (ui-config.json).

A1111 v1.10 and Forge (modules/ui_loadsave.py, the same code in both) walk the txt2img page
after it is built and, for every labelled control, save its value under
"txt2img/<label>/<field>" at the first start and write the saved value back into it at every
later start; a component with `do_not_save_to_config` is skipped. Two controls with one key
share one saved value: the first one's. `walk` below computes the keys the same way, so these
tests see what the WebUI would restore. They run with this interpreter's gradio (3.41, A1111's)
and, in a subprocess, with gradio 4.40 (Forge's) from .venv-gradio4 or MC_GRADIO4_PYTHON.
"""

from __future__ import annotations

import collections
import json
import pathlib
import sys

import gradio as gr

ROOT = pathlib.Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lib_mc.job import parse_job            # noqa: E402
from lib_mc.ui.panel import build_panel     # noqa: E402

# the exact types ui_loadsave handles (its ToolButton is a gr.Button subclass of the WebUI's own)
FIELDS = {gr.Slider: ("value", "minimum", "maximum", "step"), gr.Radio: ("value",), gr.Checkbox: ("value",),
          gr.Textbox: ("value",), gr.Number: ("value",), gr.Dropdown: ("value",), gr.Button: ()}


def walk(block, path="txt2img"):
    """(key, component, field) for every value the WebUI would save and restore, in its order."""
    if hasattr(block, "children"):
        if isinstance(block, gr.Tabs) and block.elem_id is not None:
            yield from _fields(f"{path}/Tabs@{block.elem_id}", block, ("selected",))
        for child in block.children:
            yield from walk(child, path)
    elif getattr(block, "label", None) is not None:
        yield from _fields(f"{path}/{block.label}", block, FIELDS.get(type(block), ()))
    elif isinstance(block, gr.Button) and block.value is not None:
        yield from _fields(f"{path}/{block.value}", block, FIELDS.get(type(block), ()))


def _fields(path, component, fields):
    if type(component) in FIELDS and component.visible:
        fields = ("visible",) + tuple(fields)
    for field in fields:
        key = f"{path}/{field}"
        if getattr(component, "custom_script_source", None) is not None:
            key = f"customscript/{component.custom_script_source}/{key}"
        if not getattr(component, "do_not_save_to_config", False):
            yield key, component, field


def build():
    with gr.Blocks() as demo:
        panel = build_panel(lambda: ["alice_v1", "bob_v1"])
    panel.job.custom_script_source = "multi_concept.py"   # what the WebUI sets on ui()'s components
    return demo, panel


def restore(demo, saved: dict) -> None:
    """What the WebUI does at start with a saved ui-config.json: the first control of a key
    records its value, every later one with that key gets it."""
    settings = dict(saved)
    for key, component, field in walk(demo):
        if key in settings:
            setattr(component, field, settings[key])
        else:
            settings[key] = getattr(component, field)


def served_job(demo, panel) -> dict:
    """The job JSON the page starts with: the job box's value in the page config."""
    config = demo.get_config_file()
    props = next(c["props"] for c in config["components"] if c["id"] == panel.job._id)
    return json.loads(props["value"])


def problems() -> list[str]:
    """Everything wrong with the panel's saved defaults, as sentences (empty: all is well)."""
    demo, panel = build()
    found = []
    saved = list(walk(demo))
    per_concept = {id(c) for components in panel.per_concept for c in components}
    for key, component, _ in saved:
        if id(component) in per_concept:
            found.append(f"per-concept control saved as UI default: {key}")
    counts = collections.Counter(key for key, _, _ in saved)
    found += [f"{n} controls restored from one key: {key}" for key, n in counts.items() if n > 1]
    # a saved ui-config.json (old keys of per-concept controls included): the job the page
    # starts with is what its controls show
    restore(demo, {"txt2img/Concepts start at/value": "0.55", "txt2img/Concepts in the hires pass/value": False,
                   "txt2img/Concept isolation (regional)/value": False, "txt2img/Isolation until (regional)/value": 0.4,
                   "txt2img/Concept enhancement (regional)/value": True,
                   "txt2img/Mask refinement (conductor)/value": False, "txt2img/Alignment until (conductor)/value": 0.1,
                   "txt2img/Refinement segments (conductor)/value": 5, "txt2img/Identity words (token)/value": "x y",
                   "txt2img/Keep background/value": False, "txt2img/Appearance alpha (image concepts)/value": 0.3,
                   "txt2img/Dilution expand (image concepts)/value": 0.2,
                   "txt2img/Region/value": "centre", "txt2img/x/value": 0.25, "txt2img/Concepts/value": 4,
                   "txt2img/Concept prompt/value": "concept 1's prompt"})
    job = served_job(demo, panel)
    shown = {key: component.value for key, component, field in walk(demo) if field == "value"}
    if shown.get("txt2img/Concepts start at/value") != "0.55" or job.get("start_at") != 0.55 \
            or job["hires_loras"] is not False \
            or job["isolation"] is not False or job["isolation_until"] != 0.4 or job.get("enhance") is not True \
            or job["mask_refine"] is not False or job["align_until"] != 0.1 or job["mask_refine_k"] != 5 \
            or job["keep_background"] is not False or job["appearance_alpha"] != 0.3 or job["dilution_expand"] != 0.2:
        found.append(f"the page's job does not hold the restored options: {job}")
    parsed = parse_job(job)
    if len(parsed.concepts) != 2 or [c.region.x for c in parsed.concepts] != [0, 0.5] or parsed.concepts[1].prompt \
            or parsed.concepts[1].token:
        found.append(f"restored values reached the concepts: {job['concepts']}")
    return found


def test_no_per_concept_control_is_saved_no_key_is_shared_and_the_job_shows_restored_options():
    assert problems() == []


def test_the_same_holds_with_forges_gradio_4():
    from gradio4_run import problems_under_gradio4
    assert problems_under_gradio4(__file__) == []


if __name__ == "__main__":   # the gradio 4 run
    print(json.dumps([gr.__version__, problems()]))
