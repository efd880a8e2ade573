import json

import torch

from lib_mc.infotext import infotext_to_job, job_to_infotext
from lib_mc.job import Region, parse_job
from lib_mc.regions import encode_png, region_mask


def test_infotext_is_compact_and_pastes_back_to_the_same_job():
    mask = torch.zeros(512, 512)
    mask[:, 300:] = 1
    job = parse_job({"start_at": 0.45, "concepts": [
        {"name": "alice", "loras": [{"name": "alice_v1", "weight": 0.8}], "prompt": "photo of alice, a woman",
         "class_word": "woman", "region": {"type": "rect", "x": 0, "y": 0, "w": 0.5, "h": 1}},
        {"name": "bob", "loras": [{"name": "bob_v1", "weight": 0.7}], "region": {"type": "mask", "png": encode_png(mask)}},
    ]})
    text = job_to_infotext(job)
    assert len(text) < 800 and "layout_replay" not in text and '"start_at":0.45' in text
    assert "auto_grow" not in text and '"auto_grow":12' in job_to_infotext(parse_job({**job.to_dict(), "auto_grow": 12}))
    assert "hires_loras" not in text
    off = job_to_infotext(parse_job({**job.to_dict(), "hires_loras": False}))
    assert '"hires_loras":false' in off and not infotext_to_job(off).hires_loras
    back = infotext_to_job(text)
    assert back.enabled and back.start_at == 0.45
    assert back.concepts[0] == job.concepts[0]
    assert back.concepts[1].loras == job.concepts[1].loras
    restored = region_mask(back.concepts[1].region, (512, 512), "m")
    assert restored.shape == (128, 128) and restored[:, 80:].min() == 1 and restored[:, :70].max() == 0
    assert len(json.loads(text)["concepts"][1]["region"]["sha"]) == 12


def test_a_found_automatic_region_travels_small_and_pastes_back_drawn():
    from lib_mc.ui.panel_state import CONCEPT_FIELDS, TOP_FIELDS, compose, decompose
    found = torch.zeros(512, 512)
    found[100:400, 50:200] = 1
    job = parse_job({"enabled": True, "concepts": [
        {"name": "him", "class_word": "man", "region": {"type": "auto", "found": encode_png(found)}},
        {"name": "her", "class_word": "woman", "region": {"type": "auto"}}]})
    text = job_to_infotext(job)
    back = infotext_to_job(text)
    small = region_mask(Region("mask", png=back.concepts[0].region.found), (1, 1), "found")
    assert max(small.shape) == 128 and small[64, 30] == 1 and small[5, 5] == 0
    assert back.concepts[0].region.type == "auto" and not back.concepts[1].region.found
    values = decompose(text)   # pasted: the found mask is on the canvas, as a drawn region
    assert values[len(TOP_FIELDS) + CONCEPT_FIELDS.index("region")] == "drawn"
    assert values[len(TOP_FIELDS) + len(CONCEPT_FIELDS) + CONCEPT_FIELDS.index("region")] == "auto"
    rerun = parse_job(compose(*values))
    assert rerun.concepts[0].region.type == "mask" and rerun.concepts[1].region.type == "auto"


def _state(job, error=None, found=None):
    from types import SimpleNamespace
    return SimpleNamespace(job=job, error=error, found=found or {})


def test_each_image_infotext_carries_the_mask_found_for_that_image():
    from lib_mc.infotext import ImageInfotext
    job = parse_job({"concepts": [{"name": "him", "class_word": "man", "region": {"type": "auto"}}]})
    left, right = torch.zeros(64, 64), torch.zeros(64, 64)
    left[:, :20], right[:, 40:] = 1, 1
    value = ImageInfotext(_state(job, found={0: {0: encode_png(left)}, 1: {0: encode_png(right)}}))
    masks = [region_mask(Region("mask", png=infotext_to_job(value(index=i)).concepts[0].region.found), (64, 64), "f")
             for i in (0, 1)]
    assert masks[0][:, :16].min() == 1 and masks[0][:, 48:].max() == 0
    assert masks[1][:, 48:].min() == 1 and masks[1][:, :16].max() == 0
    assert not job.concepts[0].region.found   # the job itself is left as it was


def test_a_failed_job_leaves_its_key_out_of_the_infotext_instead_of_failing_again():
    from lib_mc.errors import MultiConceptError
    from lib_mc.infotext import ImageInfotext
    job = parse_job({"concepts": [{"name": "bob", "region": {"type": "mask", "png": "bm90IGEgcG5n"}}]})
    assert ImageInfotext(_state(job, error=MultiConceptError("concepts[0].region.png: not a PNG")))(index=0) is None
    # the same bad mask before the job noticed it: still no exception into the WebUI's infotext code
    assert ImageInfotext(_state(job))(index=0) is None


def test_a_regional_job_writes_its_mode_and_options_and_pastes_back_as_regional():
    from lib_mc.ui.panel_state import compose, decompose
    concepts = [{"name": "alice", "loras": [{"name": "alice_v1", "weight": 0.8}],
                 "region": {"type": "rect", "x": 0, "y": 0, "w": 0.5, "h": 1}}]
    job = parse_job({"mode": "regional", "isolation": False, "isolation_until": 0.5, "reinit": True,
                     "enhance": True, "layout_replay": False, "self_attn_replay_until": 0.1, "concepts": concepts})
    data = json.loads(job_to_infotext(job))
    assert (data["mode"], data["isolation"], data["isolation_until"], data["reinit"]) == ("regional", False, 0.5, True)
    assert data["enhance"] is True
    assert "layout_replay" not in data and "self_attn_replay_until" not in data   # blend's: not read here
    assert "start_at" not in data   # the mode's default
    back = infotext_to_job(job_to_infotext(job))
    assert (back.mode, back.isolation, back.isolation_until, back.reinit, back.start_at) == \
        ("regional", False, 0.5, True, None)
    assert back.enhance is True
    pasted = parse_job(compose(*decompose(job_to_infotext(job))))   # PNG Info -> Send to txt2img
    assert (pasted.mode, pasted.isolation, pasted.isolation_until, pasted.reinit) == ("regional", False, 0.5, True)
    assert pasted.enhance is True
    # regional defaults left out; an explicit start is kept, 0.3 too (regional's default depends on the regions)
    plain = json.loads(job_to_infotext(parse_job({"mode": "regional", "start_at": 0.3, "concepts": concepts})))
    assert plain["mode"] == "regional" and plain["start_at"] == 0.3
    assert not {"isolation", "isolation_until", "reinit", "enhance"} & set(plain)


def test_a_blend_job_leaves_regional_options_and_its_default_start_out():
    concepts = [{"name": "bob"}]
    text = job_to_infotext(parse_job({"start_at": 0.3, "isolation": False, "reinit": True, "isolation_until": 0.2,
                                      "enhance": True, "layout_replay": False, "concepts": concepts}))
    assert json.loads(text) == {"version": 1, "layout_replay": False, "concepts": [
        {"name": "bob", "region": {"type": "rect", "x": 0.0, "y": 0.0, "w": 1.0, "h": 1.0}}]}
    assert infotext_to_job(text).start_fraction(False) == 0.3
    # an image made before the modes: blend, its start and options as they were
    old = infotext_to_job('{"version":1,"start_at":0.45,"layout_replay":false,"concepts":[{"name":"bob"}]}')
    assert (old.mode, old.start_at, old.layout_replay) == ("blend", 0.45, False)


def test_a_conductor_job_writes_its_options_and_tokens_and_pastes_back_as_conductor():
    from lib_mc.ui.panel_state import compose, decompose
    from test_job_conductor import png
    concepts = [{"name": "alice", "class_word": "woman", "token": "alice woman",
                 "region": {"type": "rect", "x": 0, "y": 0, "w": 0.5, "h": 1}}]
    job = parse_job({"mode": "conductor", "mask_refine": False, "mask_refine_from": 0.1, "mask_refine_until": 0.5,
                     "mask_refine_every": 0.05, "mask_refine_k": 4, "align_until": 0.2, "align_step": 25,
                     "isolation": False, "layout_replay": False, "concepts": concepts})
    data = json.loads(job_to_infotext(job))
    assert data["mode"] == "conductor" and data["concepts"][0]["token"] == "alice woman"
    assert (data["mask_refine"], data["mask_refine_from"], data["mask_refine_until"], data["mask_refine_every"],
            data["mask_refine_k"], data["align_until"], data["align_step"]) == (False, 0.1, 0.5, 0.05, 4, 0.2, 25)
    assert "isolation" not in data and "layout_replay" not in data and "reference" not in data
    for pasted in (infotext_to_job(job_to_infotext(job)), parse_job(compose(*decompose(job_to_infotext(job))))):
        assert pasted == parse_job({**job.to_dict(), "isolation": True, "layout_replay": True})   # theirs left out
    # conductor defaults and an empty token left out; other modes leave conductor's options out
    plain = json.loads(job_to_infotext(parse_job({"mode": "conductor", "concepts": [{"name": "bob"}]})))
    assert plain == {"version": 1, "mode": "conductor", "concepts": [
        {"name": "bob", "region": {"type": "rect", "x": 0.0, "y": 0.0, "w": 1.0, "h": 1.0}}]}
    regional = json.loads(job_to_infotext(parse_job({**job.to_dict(), "mode": "regional", "reference": png()})))
    assert not {"mask_refine", "mask_refine_k", "align_until", "align_step", "reference"} & set(regional)


def test_a_reference_picture_travels_as_a_small_copy_and_its_hash():
    import base64
    import io
    from PIL import Image
    from lib_mc.regions import decode_png
    picture = Image.new("RGB", (640, 480), (20, 40, 200))
    picture.paste((230, 220, 10), (0, 0, 320, 480))   # left half yellow
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    original = base64.b64encode(buffer.getvalue()).decode()
    job = parse_job({"mode": "conductor", "reference": original, "concepts": [{"name": "a"}]})
    text = job_to_infotext(job)
    data = json.loads(text)
    small = decode_png(data["reference"], "reference").convert("RGB")
    assert small.size == (96, 72) and len(data["reference"]) < 4000 and len(data["reference_sha"]) == 12
    assert small.getpixel((10, 36))[2] < 100 and small.getpixel((85, 36))[2] > 150   # the layout kept
    back = infotext_to_job(text)
    assert back.mode == "conductor" and back.reference == data["reference"] and back.start_fraction(True) == 0.0


def test_each_image_infotext_shows_the_prompt_variant_of_its_own_prompt():
    from types import SimpleNamespace
    from lib_mc.infotext import ImageInfotext
    job = parse_job({"mode": "conductor", "concepts": [
        {"name": "bob", "class_word": "man", "token": "bob man"},
        {"name": "alice", "class_word": "woman", "token": "alice woman", "prompt": "photo of alice"}]})
    p = SimpleNamespace(all_prompts=["a man and a woman", "a woman and a man in snow"])
    value = ImageInfotext(_state(job))
    first, second = (json.loads(value(index=i, p=p)) for i in (0, 1))
    assert first["concepts"][0]["variant"] == "a bob man and a bob man"
    assert second["concepts"][0]["variant"] == "a bob man and a bob man in snow"
    assert "variant" not in first["concepts"][1]   # its own prompt
    assert infotext_to_job(value(index=1, p=p)) == job   # pasting reads the job, not the note
    assert "variant" not in value(index=0)   # no prompts given: the job alone
