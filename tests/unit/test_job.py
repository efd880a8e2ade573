"""The job schema: what the panel writes and the API takes."""

import json

import pytest
import torch

from lib_mc.job import JobError, parse_job
from lib_mc.regions import compact_mask, encode_png, preset_region, region_mask

EXAMPLE = {"enabled": True, "mode": "blend", "start_at": 0.3,
           "layout_replay": True, "self_attn_replay_until": 0.4, "feather": 0, "save_layout": False,
           "concepts": [
               {"name": "left", "loras": [{"name": "alice_v1", "weight": 0.8}],
                "prompt": "photo of alice woman on a beach", "negative_prompt": "",
                "class_word": "woman",
                "region": {"type": "rect", "x": 0.0, "y": 0.0, "w": 0.5, "h": 1.0}}]}


def test_the_documented_example_parses_and_round_trips():
    job = parse_job(EXAMPLE)
    assert job.enabled and job.start_at == 0.3 and job.concepts[0].loras[0].name == "alice_v1"
    assert job.concepts[0].region.w == 0.5
    again = parse_job(json.dumps(job.to_dict()))
    assert again == job


def test_empty_argument_means_disabled_and_unknown_keys_are_ignored():
    assert not parse_job(None).enabled and not parse_job("").enabled
    job = parse_job({**EXAMPLE, "colour": "red", "concepts": [{**EXAMPLE["concepts"][0], "extra": 1}]})
    assert job.enabled


@pytest.mark.parametrize("change, field, problem", [
    ({"start_at": 2}, "start_at", "<= 1"),
    ({"auto_grow": 500}, "auto_grow", "<= 128"),
    ({"auto_grow": "wide"}, "auto_grow", "must be a number"),
    ({"start_at": "soon"}, "start_at", "must be a number"),
    ({"enabled": "yes"}, "enabled", "true or false"),
    ({"mode": "magic"}, "mode", "must be one of blend"),
    ({"version": 2}, "version", "schema version 1"),
    ({"concepts": []}, "concepts", "is empty"),
    ({"concepts": "alice"}, "concepts", "must be a list"),
    ({"concepts": [{}] * 9}, "concepts", "at most 8"),
    ({"concepts": [{"loras": [{"name": "a", "weight": "x"}]}]}, r"concepts\[0\].loras\[0\].weight", "number"),
    ({"concepts": [{"loras": [{"weight": 1}]}]}, r"concepts\[0\].loras\[0\].name", "missing"),
    ({"concepts": [{"loras": "alice"}]}, r"concepts\[0\].loras", "must be a list"),
    ({"concepts": [{"region": {"type": "rect", "w": 0}}]}, r"concepts\[0\].region.w", "empty"),
    ({"concepts": [{"region": {"type": "rect", "x": 0.6, "w": 0.5}}]}, r"concepts\[0\].region", "outside"),
    ({"concepts": [{"region": {"type": "circle"}}]}, r"concepts\[0\].region.type", "'rect', 'mask' or 'auto'"),
    ({"concepts": [{"region": {"type": "mask"}}]}, r"concepts\[0\].region.png", "base64 PNG"),
    ({"concepts": [{"region": {"type": "mask", "png": " "}}]}, r"concepts\[0\].region.png", "draw this concept"),
    ({"concepts": [{"prompt": 5}]}, r"concepts\[0\].prompt", "must be text"),
])
def test_bad_fields_are_named(change, field, problem):
    with pytest.raises(JobError, match=f"^{field}: .*{problem}"):
        parse_job({**EXAMPLE, **change})


def test_bad_json_text_is_reported():
    with pytest.raises(JobError, match="not valid JSON"):
        parse_job("{concepts: [")
    with pytest.raises(JobError, match="must be a JSON object"):
        parse_job("[1, 2]")


def test_rect_and_mask_regions_become_masks():
    left = region_mask(preset_region("left half"), (64, 96), "r")
    assert left[:, :48].min() == 1 and left[:, 48:].max() == 0
    drawn = torch.zeros(20, 30)
    drawn[5:15, 10:20] = 1
    job = parse_job({"concepts": [{"region": {"type": "mask", "png": encode_png(drawn)}}]})
    mask = region_mask(job.concepts[0].region, (64, 96), "concepts[0].region.png")
    torch.testing.assert_close(mask, drawn)


def test_undecodable_mask_and_auto_regions_give_clear_errors():
    job = parse_job({"concepts": [{"region": {"type": "mask", "png": "bm90IGEgcG5n"}},
                                  {"region": {"type": "auto"}}]})
    with pytest.raises(JobError, match=r"concepts\[0\].region.png: cannot be decoded as a PNG") as caught:
        region_mask(job.concepts[0].region, (64, 64), "concepts[0].region.png")
    assert "<" not in str(caught.value) and "object at 0x" not in str(caught.value)   # no Python reprs
    with pytest.raises(JobError, match=r"concepts\[1\].region: is automatic \('auto'\): it is found in the layout pass"):
        region_mask(job.concepts[1].region, (64, 64), "concepts[1].region")


def test_compact_mask_is_small_and_keeps_the_shape():
    big = torch.zeros(768, 512)
    big[100:600, 50:300] = 1
    small, digest = compact_mask(encode_png(big), "m")
    assert len(small) < 1000 and len(digest) == 12
    restored = region_mask(parse_job({"concepts": [{"region": {"type": "mask", "png": small}}]})
                           .concepts[0].region, (768, 512), "m")
    assert restored.shape == (128, 85)
    assert restored[60, 40] == 1 and restored[5, 5] == 0


def test_an_automatic_region_may_carry_the_box_to_search_in():
    concept = {"name": "her", "class_word": "woman"}
    plain = parse_job({"concepts": [{**concept, "region": {"type": "auto"}}]})
    assert not plain.concepts[0].region.boxed and "x" not in plain.to_dict()["concepts"][0]["region"]
    boxed = parse_job({"concepts": [{**concept, "region": {"type": "auto", "x": 0.5, "w": 0.5}}]})
    region = boxed.concepts[0].region
    assert region.boxed and (region.x, region.y, region.w, region.h) == (0.5, 0, 0.5, 1)
    assert parse_job(json.dumps(boxed.to_dict())) == boxed
    with pytest.raises(JobError, match=r"concepts\[0\].region: reaches outside"):
        parse_job({"concepts": [{**concept, "region": {"type": "auto", "x": 0.8, "w": 0.5}}]})
    with pytest.raises(JobError, match=r"concepts\[0\].region.h: must be > 0"):
        parse_job({"concepts": [{**concept, "region": {"type": "auto", "h": 0}}]})
