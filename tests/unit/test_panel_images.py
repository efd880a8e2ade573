"""The panel's image-concept controls as pure functions: a concept's reference picture and its
mask, the kept background and the PnP-MIX options reach the job, come back on paste, and an
empty upload leaves them out."""

import json

import numpy as np
from PIL import Image

from lib_mc.job import parse_job
from lib_mc.regions import decode_png
from lib_mc.ui.panel_state import CONCEPT_FIELDS, TOP_FIELDS, compose, decompose, default_values
from test_panel_state import set_row


def test_uploads_start_empty_and_the_options_at_the_papers_defaults():
    values = default_values()
    assert values[TOP_FIELDS.index("background")] is None
    assert [values[TOP_FIELDS.index(k)] for k in ("keep_background", "appearance_alpha", "dilution_beta",
                                                  "dilution_expand")] == [True, 0.15, 0.8, 0.1]
    row = dict(zip(CONCEPT_FIELDS, values[len(TOP_FIELDS):len(TOP_FIELDS) + len(CONCEPT_FIELDS)]))
    assert row["reference"] is None and row["reference_mask"] is None
    data = json.loads(compose(*values))
    assert "background" not in data and "reference" not in data["concepts"][0]


def test_an_image_concept_a_background_and_the_options_reach_the_job_and_come_back_on_paste():
    values = default_values()
    values[TOP_FIELDS.index("enabled")] = True
    values[TOP_FIELDS.index("mode")] = "conductor"
    values[TOP_FIELDS.index("keep_background")] = False
    values[TOP_FIELDS.index("appearance_alpha")] = 0   # sliders may send ints
    values[TOP_FIELDS.index("dilution_beta")] = 0.6
    values[TOP_FIELDS.index("dilution_expand")] = 0.25
    background = Image.new("RGB", (2048, 1024), (10, 200, 10))   # kept at most 1,024 px a side
    values[TOP_FIELDS.index("background")] = background
    dog = np.zeros((300, 200, 3), np.uint8)   # gradio may hand a numpy array
    dog[:, :, 0] = 180
    mask = Image.new("L", (200, 300), 0)
    mask.paste(255, (50, 50, 150, 250))
    set_row(values, 1, reference=dog, reference_mask=mask)
    text = compose(*values)
    data = json.loads(text)
    assert (data["keep_background"], data["appearance_alpha"], data["dilution_beta"], data["dilution_expand"]) == \
        (False, 0.0, 0.6, 0.25)
    assert '"appearance_alpha": 0.0' in text   # one spelling, whatever the slider sent
    assert decode_png(data["background"]["png"], "b").size == (1024, 512)
    second = data["concepts"][1]
    assert decode_png(second["reference"]["png"], "r").convert("RGB").getpixel((5, 5)) == (180, 0, 0)
    assert decode_png(second["reference_mask"]["png"], "m").getpixel((100, 150)) == 255
    assert "reference" not in data["concepts"][0]
    job = parse_job(text)
    assert job.concepts[1].reference == second["reference"]["png"] and job.appearance_alpha == 0.0
    back = decompose(text)   # pasted: the uploads hold the pictures again, every option as it was
    assert back[TOP_FIELDS.index("background")].size == (1024, 512)
    assert back[TOP_FIELDS.index("keep_background")] is False and back[TOP_FIELDS.index("dilution_beta")] == 0.6
    row = dict(zip(CONCEPT_FIELDS, back[len(TOP_FIELDS) + len(CONCEPT_FIELDS):]))
    assert row["reference"].size == (200, 300) and row["reference_mask"].size == (200, 300)
    assert compose(*back) == text
    values[TOP_FIELDS.index("background")] = None   # cleared
    set_row(values, 1, reference=None, reference_mask=None)
    cleared = parse_job(compose(*values))
    assert cleared.background == "" and cleared.concepts[1].reference == "" == cleared.concepts[1].reference_mask
