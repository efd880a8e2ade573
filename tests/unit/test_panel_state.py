"""Panel controls <-> job JSON."""

import json

import torch
from PIL import Image

from lib_mc.job import parse_job
from lib_mc.regions import region_mask
from lib_mc.ui.panel_state import (CONCEPT_FIELDS, TOP_FIELDS, add_lora, compose, decompose, default_values,
                                   parse_loras)


def set_row(values, i, **fields):
    start = len(TOP_FIELDS) + i * len(CONCEPT_FIELDS)
    for key, value in fields.items():
        values[start + CONCEPT_FIELDS.index(key)] = value


def test_defaults_compose_to_a_valid_disabled_job_with_two_half_regions():
    job = parse_job(compose(*default_values()))
    assert not job.enabled and len(job.concepts) == 2
    assert (job.concepts[0].region.x, job.concepts[0].region.w) == (0, 0.5)
    assert (job.concepts[1].region.x, job.concepts[1].region.w) == (0.5, 0.5)


def test_controls_round_trip_through_json():
    values = default_values()
    values[TOP_FIELDS.index("enabled")] = True
    values[TOP_FIELDS.index("start_at")] = 0.45
    values[TOP_FIELDS.index("count")] = 3
    mask = Image.new("L", (64, 48), 0)
    mask.paste(255, (10, 10, 30, 40))
    set_row(values, 0, loras="alice_v1:0.8, freckles:0.3", prompt="photo of alice", class_word="woman")
    set_row(values, 1, region="rectangle", x=0.5, y=0.1, w=0.4, h=0.9)
    set_row(values, 2, region="mask", mask=mask, negative_prompt="blurry")
    text = compose(*values)
    job = parse_job(text)
    assert job.enabled and job.start_at == 0.45 and len(job.concepts) == 3
    assert [(r.name, r.weight) for r in job.concepts[0].loras] == [("alice_v1", 0.8), ("freckles", 0.3)]
    assert (job.concepts[1].region.type, job.concepts[1].region.y) == ("rect", 0.1)
    drawn = region_mask(job.concepts[2].region, (48, 64), "m")
    assert drawn[20, 20] == 1 and drawn[0, 0] == 0
    again = decompose(text)
    assert compose(*again) == text
    assert again[TOP_FIELDS.index("count")] == 3


def test_pasting_something_that_is_not_a_job_changes_nothing():
    assert decompose("{not json") is None
    assert decompose(json.dumps({"enabled": False})) is None


def test_lora_text_helpers():
    assert parse_loras("a:0.5, b , c:x") == [{"name": "a", "weight": 0.5}, {"name": "b", "weight": 1.0},
                                             {"name": "c:x", "weight": 1.0}]
    assert add_lora("", "alice") == "alice:0.8"
    assert add_lora("alice:0.8", "bob", 0.6) == "alice:0.8, bob:0.6"
    assert add_lora("alice:0.8", "alice") == "alice:0.8"
