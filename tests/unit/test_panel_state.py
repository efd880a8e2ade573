"""Panel controls <-> job JSON."""

import base64
import io
import json

import pytest
from PIL import Image

from lib_mc.job import JobError, parse_job
from lib_mc.regions import region_mask
from lib_mc.ui.panel_state import (AUTO_BOX, CONCEPT_FIELDS, DRAWN, REGION_CHOICES, TOP_FIELDS, add_lora, apply_canvas,
                                   compose, decompose, default_values, parse_loras, shown_fields)


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
    values[TOP_FIELDS.index("refine_regions")] = True
    values[TOP_FIELDS.index("auto_grow")] = -6
    mask = Image.new("L", (64, 48), 0)
    mask.paste(255, (10, 10, 30, 40))
    set_row(values, 0, loras="alice_v1:0.8, freckles:0.3", prompt="photo of alice", class_word="woman")
    set_row(values, 1, region="rectangle", x=0.5, y=0.1, w=0.4, h=0.9)
    set_row(values, 2, region="mask", mask=mask, negative_prompt="blurry")
    text = compose(*values)
    job = parse_job(text)
    assert job.enabled and job.start_at == 0.45 and len(job.concepts) == 3 and job.refine_regions
    assert job.auto_grow == -6
    assert [(r.name, r.weight) for r in job.concepts[0].loras] == [("alice_v1", 0.8), ("freckles", 0.3)]
    assert (job.concepts[1].region.type, job.concepts[1].region.y) == ("rect", 0.1)
    drawn = region_mask(job.concepts[2].region, (48, 64), "m")
    assert drawn[20, 20] == 1 and drawn[0, 0] == 0
    again = decompose(text)
    assert compose(*again) == text
    assert again[TOP_FIELDS.index("count")] == 3


def test_concepts_in_the_hires_pass_round_trips_through_the_job_and_a_paste():
    values = default_values()
    assert parse_job(compose(*values)).hires_loras is True   # the job's default
    values[TOP_FIELDS.index("hires_loras")] = False
    text = compose(*values)
    assert json.loads(text)["hires_loras"] is False and parse_job(text).hires_loras is False
    assert decompose(text)[TOP_FIELDS.index("hires_loras")] is False
    pasted = decompose(json.dumps({"hires_loras": False, "concepts": [{"name": "a"}]}))
    assert pasted[TOP_FIELDS.index("hires_loras")] is False
    assert decompose(json.dumps({"concepts": [{"name": "a"}]}))[TOP_FIELDS.index("hires_loras")] is True


def test_concepts_in_the_hires_pass_off_comes_back_from_an_image_infotext():
    from lib_mc.infotext import job_to_infotext
    values = default_values()
    values[TOP_FIELDS.index("enabled")] = True
    values[TOP_FIELDS.index("hires_loras")] = False
    text = job_to_infotext(parse_job(compose(*values)))   # what the image's parameters hold
    pasted = decompose(text)
    assert pasted[TOP_FIELDS.index("hires_loras")] is False and pasted[TOP_FIELDS.index("enabled")] is True


def test_a_concept_shows_only_the_fields_its_region_kind_needs():
    shown = {kind: {name for name, on in shown_fields(kind).items() if on} for kind in REGION_CHOICES}
    assert shown["rectangle"] == {"box"}
    assert shown[AUTO_BOX] == {"box", "class_word"}
    assert shown["auto"] == {"class_word"}
    assert shown["mask"] == {"mask"}
    assert shown[DRAWN] == shown["left half"] == shown["full"] == set()


def test_pasting_something_that_is_not_a_job_changes_nothing():
    assert decompose("{not json") is None
    assert decompose(json.dumps({"enabled": False})) is None


def test_lora_text_helpers():
    assert parse_loras("a:0.5, b , c:x") == [{"name": "a", "weight": 0.5}, {"name": "b", "weight": 1.0},
                                             {"name": "c:x", "weight": 1.0}]
    assert add_lora("", "alice") == "alice:0.8"
    assert add_lora("alice:0.8", "bob", 0.6) == "alice:0.8, bob:0.6"
    assert add_lora("alice:0.8", "alice") == "alice:0.8"


def canvas(regions, z=None):
    return json.dumps({"regions": regions, "z": z or list(range(len(regions)))})


def test_a_drawn_rectangle_becomes_a_preset_or_numbers_and_a_stroke_becomes_a_drawn_mask():
    values = default_values()
    stroke = Image.new("RGBA", (32, 32), (255, 255, 255, 0))
    stroke.paste((255, 255, 255, 255), (20, 4, 28, 30))
    buffer = io.BytesIO()
    stroke.save(buffer, format="PNG")
    png = base64.b64encode(buffer.getvalue()).decode()
    values[TOP_FIELDS.index("canvas")] = canvas([{"type": "rect", "x": 0.1, "y": 0.2, "w": 0.3, "h": 0.4},
                                                 {"type": "mask", "png": png}])
    applied = apply_canvas(*values)
    row0 = dict(zip(CONCEPT_FIELDS, applied[len(TOP_FIELDS):]))
    row1 = dict(zip(CONCEPT_FIELDS, applied[len(TOP_FIELDS) + len(CONCEPT_FIELDS):]))
    assert (row0["region"], row0["x"], row0["y"], row0["w"], row0["h"]) == ("rectangle", 0.1, 0.2, 0.3, 0.4)
    assert row1["region"] == "drawn"
    job = parse_job(compose(*applied))
    assert job.concepts[1].region.png == png
    drawn = region_mask(job.concepts[1].region, (32, 32), "m")
    assert drawn[10, 24] == 1 and drawn[10, 5] == 0 and drawn[31, 24] == 0
    # a rectangle that is a preset reads as that preset
    values[TOP_FIELDS.index("canvas")] = canvas([{"type": "rect", "x": 0.5, "y": 0, "w": 0.5, "h": 1}, None])
    applied = apply_canvas(*values)
    assert applied[len(TOP_FIELDS) + CONCEPT_FIELDS.index("region")] == "right half"


def test_a_region_the_canvas_reports_unchanged_keeps_its_control():
    values = default_values()
    mask = Image.new("L", (16, 16), 0)
    mask.paste(255, (0, 0, 8, 16))
    set_row(values, 1, region="mask", mask=mask)
    uploaded = parse_job(compose(*values)).concepts[1].region.png
    values[TOP_FIELDS.index("canvas")] = canvas([{"type": "rect", "x": 0, "y": 0, "w": 0.5, "h": 1},
                                                 {"type": "mask", "png": uploaded}])
    applied = apply_canvas(*values)
    assert applied == values   # left half stays the preset, the upload stays an upload


def test_a_canvas_edit_sets_only_the_concepts_it_edited():
    """The canvas still shows concept 1's left half while its control was just set to a
    rectangle (that job is on its way to the page); a stroke for concept 2 must not set it back."""
    values = default_values()
    set_row(values, 0, region="rectangle", x=0.2, y=0.1, w=0.3, h=0.5)
    stroke = compose_mask_png()
    regions = [{"type": "rect", "x": 0, "y": 0, "w": 0.5, "h": 1}, {"type": "mask", "png": stroke}]
    values[TOP_FIELDS.index("canvas")] = json.dumps({"regions": regions, "z": [0, 1], "edited": [1]})
    job = parse_job(compose(*apply_canvas(*values)))
    first = job.concepts[0].region
    assert (first.type, first.x, first.w) == ("rect", 0.2, 0.3)
    assert job.concepts[1].region.png == stroke
    # an edit of every concept (undo, a preset; or a canvas that does not say) sets them all
    values[TOP_FIELDS.index("canvas")] = json.dumps({"regions": regions, "z": [0, 1]})
    assert parse_job(compose(*apply_canvas(*values))).concepts[0].region.x == 0


def test_a_cleared_region_asks_for_a_drawing_by_name():
    values = default_values()
    values[TOP_FIELDS.index("canvas")] = canvas([None, {"type": "rect", "x": 0.5, "y": 0, "w": 0.5, "h": 1}])
    text = compose(*apply_canvas(*values))
    with pytest.raises(JobError, match=r"concepts\[0\].region.png: is empty: draw this concept's region"):
        parse_job(text)


def test_front_to_back_order_from_the_canvas_goes_into_z_and_comes_back_on_paste():
    values = default_values()
    values[TOP_FIELDS.index("canvas")] = canvas([None, None], z=[1, 0])   # concept 1 in front
    job = parse_job(compose(*values))
    assert [c.z for c in job.concepts] == [1, 0]
    back = decompose(compose(*values))
    assert json.loads(back[TOP_FIELDS.index("canvas")])["z"] == [1, 0]
    values[TOP_FIELDS.index("canvas")] = canvas([None, None], z=[0, 1])   # list order: no z in the JSON
    assert all(c.z is None for c in parse_job(compose(*values)).concepts)


def test_a_pasted_mask_region_shows_as_drawn_and_survives_unchanged():
    png = compose_mask_png()
    text = json.dumps({"enabled": True, "concepts": [{"region": {"type": "mask", "png": png}},
                                                     {"region": {"type": "rect", "x": 0.5, "w": 0.5}}]})
    values = decompose(text)
    assert values[len(TOP_FIELDS) + CONCEPT_FIELDS.index("region")] == "drawn"
    assert parse_job(compose(*values)).concepts[0].region.png == png
    assert parse_job(compose(*apply_canvas(*values))).concepts[0].region.png == png


def test_malformed_canvas_data_reads_as_nothing_drawn():
    for junk in ("{", "[1]", json.dumps({"regions": "x", "z": {}}), json.dumps({"regions": [{"type": "svg"}]})):
        values = default_values()
        values[TOP_FIELDS.index("canvas")] = junk
        assert apply_canvas(*values) == values
        assert parse_job(compose(*values)).concepts[0].region.w == 0.5


def compose_mask_png():
    mask = Image.new("L", (24, 24), 0)
    mask.paste(255, (4, 4, 12, 20))
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_an_emptied_number_box_does_not_break_drawing():
    values = default_values()
    set_row(values, 0, region="rectangle", x=None, y=0.1, w=0.4, h=0.5)
    values[TOP_FIELDS.index("canvas")] = canvas([{"type": "rect", "x": 0.2, "y": 0.2, "w": 0.3, "h": 0.3}, None])
    applied = apply_canvas(*values)
    assert applied[len(TOP_FIELDS) + CONCEPT_FIELDS.index("x")] == 0.2


def test_auto_in_rectangle_takes_the_drawn_rectangle_as_its_box_and_pastes_back():
    values = default_values()
    set_row(values, 0, region=AUTO_BOX, class_word="man")
    right = {"type": "rect", "x": 0.5, "y": 0, "w": 0.5, "h": 1}
    values[TOP_FIELDS.index("canvas")] = canvas([{"type": "rect", "x": 0.1, "y": 0.2, "w": 0.3, "h": 0.7}, right])
    applied = apply_canvas(*values)
    row0 = dict(zip(CONCEPT_FIELDS, applied[len(TOP_FIELDS):]))
    assert (row0["region"], row0["x"], row0["w"]) == (AUTO_BOX, 0.1, 0.3)   # still automatic, now boxed
    text = compose(*applied)
    region = parse_job(text).concepts[0].region
    assert region.type == "auto" and region.boxed and (region.x, region.y, region.w, region.h) == (0.1, 0.2, 0.3, 0.7)
    back = decompose(text)
    assert back[len(TOP_FIELDS) + CONCEPT_FIELDS.index("region")] == AUTO_BOX
    shown = json.loads(back[TOP_FIELDS.index("canvas")])["regions"][0]
    assert shown == {"type": "auto", "x": 0.1, "y": 0.2, "w": 0.3, "h": 0.7}   # the canvas draws the box
    # the editor hands the untouched box back: nothing changes; erasing it searches the whole image
    back[TOP_FIELDS.index("canvas")] = canvas([shown, right])
    assert apply_canvas(*back) == back
    back[TOP_FIELDS.index("canvas")] = canvas([None, right])
    assert apply_canvas(*back)[len(TOP_FIELDS) + CONCEPT_FIELDS.index("region")] == "auto"


def test_switching_a_boxed_automatic_region_to_drawn_makes_its_box_a_drawn_rectangle():
    values = default_values()
    set_row(values, 0, region=DRAWN)
    values[TOP_FIELDS.index("canvas")] = canvas([{"type": "auto", "x": 0.1, "y": 0.2, "w": 0.3, "h": 0.7},
                                                 {"type": "rect", "x": 0.5, "y": 0, "w": 0.5, "h": 1}])
    region = parse_job(compose(*values)).concepts[0].region
    assert region.type == "rect" and (region.x, region.y, region.w, region.h) == (0.1, 0.2, 0.3, 0.7)


def test_regional_mode_and_its_options_reach_the_job_and_come_back_on_paste():
    values = default_values()
    assert values[TOP_FIELDS.index("start_at")] == ""   # the box starts empty: the mode's default
    values[TOP_FIELDS.index("enabled")] = True
    values[TOP_FIELDS.index("mode")] = "regional"
    values[TOP_FIELDS.index("isolation")] = False
    values[TOP_FIELDS.index("isolation_until")] = 1   # a slider may send an int
    values[TOP_FIELDS.index("reinit")] = True
    assert values[TOP_FIELDS.index("enhance")] is False   # off by default
    values[TOP_FIELDS.index("enhance")] = True
    text = compose(*values)
    data = json.loads(text)
    assert (data["mode"], data["isolation"], data["isolation_until"], data["reinit"]) == ("regional", False, 1.0, True)
    assert data["enhance"] is True
    assert "start_at" not in data   # empty box: left to the mode
    job = parse_job(text)
    assert job.mode == "regional" and job.start_at is None and job.start_fraction(False) == 0.0
    back = decompose(text)
    assert back[TOP_FIELDS.index("mode")] == "regional" and back[TOP_FIELDS.index("start_at")] == ""
    assert (back[TOP_FIELDS.index("isolation")], back[TOP_FIELDS.index("reinit")]) == (False, True)
    assert back[TOP_FIELDS.index("enhance")] is True
    assert compose(*back) == text
    values[TOP_FIELDS.index("start_at")] = " 0.25 "   # typed: kept as given
    assert parse_job(compose(*values)).start_at == 0.25 and decompose(compose(*values))[TOP_FIELDS.index("start_at")] == "0.25"
    values[TOP_FIELDS.index("start_at")] = "soon"   # no number: the job names it
    with pytest.raises(JobError, match="^start_at: must be a number, got 'soon'"):
        parse_job(compose(*values))


def test_regional_automatic_regions_with_a_start_of_zero_are_refused_by_name():
    values = default_values()
    values[TOP_FIELDS.index("mode")] = "regional"
    values[TOP_FIELDS.index("start_at")] = "0"
    set_row(values, 0, region="auto", class_word="woman")
    with pytest.raises(JobError, match="^start_at: automatic regions in regional mode are found at start_at"):
        parse_job(compose(*values))
    values[TOP_FIELDS.index("start_at")] = ""
    assert parse_job(compose(*values)).start_fraction(True) == 0.3


def test_conductor_options_a_reference_upload_and_identity_words_reach_the_job_and_come_back_on_paste():
    from lib_mc.regions import decode_png
    values = default_values()
    assert values[TOP_FIELDS.index("reference")] is None and values[TOP_FIELDS.index("mask_refine")] is True
    values[TOP_FIELDS.index("enabled")] = True
    values[TOP_FIELDS.index("mode")] = "conductor"
    values[TOP_FIELDS.index("mask_refine")] = False
    values[TOP_FIELDS.index("mask_refine_from")] = 0   # sliders may send ints
    values[TOP_FIELDS.index("mask_refine_until")] = 0.5
    values[TOP_FIELDS.index("mask_refine_every")] = 0.05
    values[TOP_FIELDS.index("mask_refine_k")] = 5.0   # a number box
    values[TOP_FIELDS.index("align_until")] = 0.2
    values[TOP_FIELDS.index("align_step")] = 20
    picture = Image.new("RGB", (2048, 1024), (200, 10, 10))   # an upload: kept at most 1,024 px a side
    picture.paste((10, 10, 200), (1024, 0, 2048, 1024))
    values[TOP_FIELDS.index("reference")] = picture
    set_row(values, 0, token="alice woman", class_word="woman")
    text = compose(*values)
    data = json.loads(text)
    assert (data["mode"], data["mask_refine"], data["mask_refine_from"], data["mask_refine_until"],
            data["mask_refine_every"], data["align_until"], data["align_step"]) == \
        ("conductor", False, 0.0, 0.5, 0.05, 0.2, 20.0)
    assert data["mask_refine_k"] == 5 and isinstance(data["mask_refine_k"], int)
    assert data["concepts"][0]["token"] == "alice woman" and data["concepts"][1]["token"] == ""
    stored = decode_png(data["reference"], "reference")
    assert stored.format == "PNG" and stored.size == (1024, 512)
    assert stored.convert("RGB").getpixel((100, 100)) == (200, 10, 10)
    job = parse_job(text)
    assert job.reference == data["reference"] and job.concepts[0].token == "alice woman"
    back = decompose(text)   # pasted: every control as it was, the picture as an image for the upload
    assert back[TOP_FIELDS.index("mode")] == "conductor" and back[TOP_FIELDS.index("mask_refine")] is False
    assert back[TOP_FIELDS.index("mask_refine_k")] == 5 and back[TOP_FIELDS.index("align_step")] == 20
    assert back[TOP_FIELDS.index("reference")].size == (1024, 512)
    assert back[len(TOP_FIELDS) + CONCEPT_FIELDS.index("token")] == "alice woman"
    assert compose(*back) == text
    values[TOP_FIELDS.index("reference")] = None   # cleared
    assert parse_job(compose(*values)).reference == ""


def test_identity_words_show_the_class_word_their_variant_replaces():
    assert shown_fields("left half", "alice woman")["class_word"]
    assert not shown_fields("left half", "  ")["class_word"] and not shown_fields("left half")["class_word"]
    assert shown_fields("auto", "")["class_word"]


def test_conductor_automatic_regions_from_the_first_step_need_a_reference():
    values = default_values()
    values[TOP_FIELDS.index("mode")] = "conductor"
    values[TOP_FIELDS.index("start_at")] = "0"
    set_row(values, 0, region="auto", class_word="woman")
    with pytest.raises(JobError, match="^start_at: automatic regions in conductor mode without a reference"):
        parse_job(compose(*values))
    values[TOP_FIELDS.index("reference")] = Image.new("RGB", (64, 64))
    assert parse_job(compose(*values)).start_at == 0
