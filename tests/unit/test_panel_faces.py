"""The panel's face-concept controls: up to MAX_FACES photo slots per concept and the two
sliders reach the job (the filled slots in order, the weights only with photos), come back on a
paste of the infotext (its small copies fill the slots), are never saved as UI defaults, and
carry labels unique within a concept's tab, in gradio 3 and 4 alike."""

from __future__ import annotations

import collections
import json
import pathlib
import sys

import numpy as np
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parents[2]
for path in (ROOT, ROOT / "tests" / "unit"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from lib_mc.infotext import FACE_SIDE, job_to_infotext   # noqa: E402
from lib_mc.job import MAX_FACES, parse_job               # noqa: E402
from lib_mc.regions import decode_png                     # noqa: E402
from lib_mc.ui.panel_state import (CONCEPT_FIELDS, FACE_FIELDS, TOP_FIELDS, compose, decompose,  # noqa: E402
                                   default_values)


def row_of(values, i) -> dict:
    start = len(TOP_FIELDS) + i * len(CONCEPT_FIELDS)
    return dict(zip(CONCEPT_FIELDS, values[start:start + len(CONCEPT_FIELDS)]))


def set_row(values, i, **fields):
    start = len(TOP_FIELDS) + i * len(CONCEPT_FIELDS)
    for key, value in fields.items():
        values[start + CONCEPT_FIELDS.index(key)] = value


def face(colour, size=(240, 320)):
    return Image.new("RGB", size, colour)


def test_slots_start_empty_the_sliders_at_the_jobs_defaults_and_no_photo_no_face_keys():
    values = default_values()
    row = row_of(values, 1)
    assert len(FACE_FIELDS) == MAX_FACES == 4
    assert [row[k] for k in FACE_FIELDS] == [None] * MAX_FACES
    assert (row["face_weight"], row["face_control"]) == (0.8, 0.8)
    set_row(values, 1, face_weight=1.5)   # a weight without a photo means nothing: left out
    concept = json.loads(compose(*values))["concepts"][1]
    assert not {"faces", "face_weight", "face_control"} & set(concept)
    assert parse_job(compose(*values)).concepts[1].faces == []


def test_photos_and_weights_reach_the_job_and_come_back_on_paste():
    values = default_values()
    values[TOP_FIELDS.index("mode")] = "conductor"
    big = np.zeros((2000, 1000, 3), np.uint8)   # gradio may hand a numpy array; kept at most 1,024 px a side
    big[:, :, 1] = 150
    # slots 2 and 4 filled: the job takes them in order, without gaps
    set_row(values, 1, face_2=face((200, 10, 10)), face_4=big, face_weight=1, face_control=0.35)
    text = compose(*values)
    concept = json.loads(text)["concepts"][1]
    assert [decode_png(f["png"], "f").convert("RGB").getpixel((3, 3)) for f in concept["faces"]] == \
        [(200, 10, 10), (0, 150, 0)]
    assert decode_png(concept["faces"][1]["png"], "f").size == (512, 1024)
    assert (concept["face_weight"], concept["face_control"]) == (1.0, 0.35)
    assert '"face_weight": 1.0' in text   # one spelling, whatever the slider sent
    assert "faces" not in json.loads(text)["concepts"][0]
    spec = parse_job(text).concepts[1]
    assert len(spec.faces) == 2 and (spec.face_weight, spec.face_control) == (1.0, 0.35)
    back = decompose(text)   # a loaded job: the slots fill from the front, the sliders as they were
    row = row_of(back, 1)
    assert [row[k].size if row[k] else None for k in FACE_FIELDS] == [(240, 320), (512, 1024), None, None]
    assert (row["face_weight"], row["face_control"]) == (1.0, 0.35)
    assert [row_of(back, 0)[k] for k in FACE_FIELDS] == [None] * MAX_FACES
    assert compose(*back) == text
    set_row(values, 1, face_2=None, face_4=None)   # cleared
    assert parse_job(compose(*values)).concepts[1].faces == []


def test_a_pasted_infotext_fills_the_slots_with_its_small_copies():
    values = default_values()
    set_row(values, 0, **{key: face((10 * k, 100, 200), (600, 800)) for k, key in enumerate(FACE_FIELDS)},
            face_weight=0.8, face_control=0.0)
    text = job_to_infotext(parse_job(compose(*values)))   # what the image's parameters hold
    carried = json.loads(text)["concepts"][0]
    assert len(carried["faces"]) == MAX_FACES and "sha" in carried["faces"][0] and "face_weight" not in carried
    row = row_of(decompose(text), 0)
    assert [row[k].size for k in FACE_FIELDS] == [(FACE_SIDE * 3 // 4, FACE_SIDE)] * MAX_FACES
    assert (row["face_weight"], row["face_control"]) == (0.8, 0.0)   # the default left out, back as 0.8
    assert row_of(decompose(text), 1)["face_1"] is None
    again = parse_job(compose(*decompose(text))).concepts[0]
    assert len(again.faces) == MAX_FACES and (again.face_weight, again.face_control) == (0.8, 0.0)


def built_panel_problems() -> list[str]:
    """The face controls of a built panel, as sentences of what is wrong (empty: all is well)."""
    import gradio as gr

    from lib_mc.ui.panel import build_panel
    from test_panel_config import walk
    found = []
    for is_img2img in (False, True):
        with gr.Blocks() as demo:
            panel = build_panel(lambda: [], is_img2img=is_img2img)
        saved = {key for key, _, _ in walk(demo)}
        for key in saved:
            if "Face" in key:
                found.append(f"saved as a UI default: {key}")
        for i, components in enumerate(panel.per_concept):
            labels = collections.Counter(c.label for c in components if getattr(c, "label", None))
            found += [f"concept {i + 1}: label {label!r} used {n} times" for label, n in labels.items() if n > 1]
            row = dict(zip(CONCEPT_FIELDS, panel.controls[len(TOP_FIELDS) + i * len(CONCEPT_FIELDS):]))
            for key in FACE_FIELDS:
                if not isinstance(row[key], gr.Image) or row[key] not in components:
                    found.append(f"concept {i + 1}: {key} is no per-concept picture upload")
            sliders = [(row[k].label, row[k].minimum, row[k].maximum, row[k].step, row[k].value, bool(row[k].info))
                       for k in ("face_weight", "face_control")]
            if sliders != [("Face weight", 0, 2, 0.05, 0.8, True), ("Face control", 0, 2, 0.05, 0.8, True)]:
                found.append(f"concept {i + 1}: sliders {sliders}")
    return found


def test_face_controls_are_never_saved_and_their_labels_are_unique_in_a_tab():
    assert built_panel_problems() == []


def test_the_same_holds_with_forges_gradio_4():
    from gradio4_run import problems_under_gradio4
    assert problems_under_gradio4(__file__) == []


if __name__ == "__main__":   # the gradio 4 run
    import gradio
    print(json.dumps([gradio.__version__, built_panel_problems()]))
