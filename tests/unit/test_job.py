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
    ({"isolation_until": 2}, "isolation_until", r"must be <= 1, got 2 \(a regional-mode option\)$"),
    ({"isolation": "on"}, "isolation", r"true or false, got 'on' \(a regional-mode option\)$"),
    ({"reinit": 1}, "reinit", r"true or false, got 1 \(a regional-mode option\)$"),
    ({"enhance": "yes"}, "enhance", r"true or false, got 'yes' \(a regional-mode option\)$"),
    ({"layout_replay": "no"}, "layout_replay", r"true or false, got 'no' \(a blend-mode option\)$"),
    ({"self_attn_replay_until": -1}, "self_attn_replay_until", r"must be >= 0, got -1 \(a blend-mode option\)$"),
    ({"mode": "regional", "start_at": 0, "concepts": [{"class_word": "woman", "region": {"type": "auto"}}]},
     "start_at", "automatic regions in regional mode are found at start_at: it must be > 0"),
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


REGIONAL = {**EXAMPLE, "mode": "regional", "isolation": False, "isolation_until": 0.6, "reinit": True,
            "enhance": True}


def test_a_regional_job_and_its_options_parse_and_round_trip():
    job = parse_job(REGIONAL)
    assert (job.mode, job.isolation, job.isolation_until, job.reinit) == ("regional", False, 0.6, True)
    assert job.enhance is True and job.to_dict()["enhance"] is True
    assert parse_job(job.to_dict()) == job and parse_job(json.dumps(job.to_dict())) == job
    plain = parse_job({"mode": "regional", "concepts": EXAMPLE["concepts"]})   # the regional defaults
    assert (plain.isolation, plain.isolation_until, plain.reinit, plain.start_at) == (True, 1.0, False, None)
    assert plain.enhance is False   # off by default: it costs a forward and a backward per guided step
    assert parse_job(plain.to_dict()) == plain


def test_an_option_of_the_other_mode_is_accepted_and_kept():
    regional = parse_job({**REGIONAL, "layout_replay": False, "self_attn_replay_until": 0.2})
    assert not regional.layout_replay and regional.self_attn_replay_until == 0.2
    blend = parse_job({**EXAMPLE, "isolation": False, "reinit": True, "enhance": True})
    assert blend.mode == "blend" and not blend.isolation and blend.reinit and blend.enhance


def test_start_at_left_out_means_the_modes_default():
    auto = {"class_word": "woman", "region": {"type": "auto"}}
    blend = parse_job({"concepts": [auto]})
    assert blend.start_at is None and blend.start_fraction(True) == blend.start_fraction(False) == 0.3
    regional = parse_job({"mode": "regional", "concepts": [EXAMPLE["concepts"][0]]})
    assert regional.start_fraction(False) == 0.0 and regional.start_fraction(True) == 0.3
    found = parse_job({"mode": "regional", "concepts": [auto]})   # found at 0.3 unless told otherwise
    assert found.start_at is None and found.start_fraction(True) == 0.3
    given = parse_job({"mode": "regional", "start_at": 0.45, "concepts": [auto]})
    assert given.start_fraction(True) == given.start_fraction(False) == 0.45
    # drawn regions in regional mode, or blend mode, may start at 0
    assert parse_job({**REGIONAL, "start_at": 0}).start_fraction(False) == 0.0
    assert parse_job({"start_at": 0, "concepts": [auto]}).start_fraction(True) == 0.0


def test_an_old_job_with_start_at_reads_as_before():
    job = parse_job(EXAMPLE)   # "start_at": 0.3 written out, as every job before the modes
    assert job.start_at == 0.3 and job.start_fraction(False) == 0.3 and job.to_dict()["start_at"] == 0.3
    assert parse_job({**EXAMPLE, "start_at": 0.55}).start_at == 0.55
