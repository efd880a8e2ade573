"""Grounding DINO boxes in the WebUI flow (`webui._find_regions` between the layout pass and the
second stage): with the setting on and a transformers-format checkpoint in models/grounding-dino
(a real GroundingDinoForObjectDetection with random weights, written by the test), each image's
automatic concepts are looked for in the boxes the model finds for their class words, the boxes
are a save_layout step and the infotext says `Multi-Concept boxes: Grounding DINO`. Without the
model, with transformers too old, or with the setting at attention: attention boxes, a note."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

import grounding_dino_files as files
from lib_mc.auto.boxes import assign_boxes
from lib_mc.auto.masks import boxes_as_masks
from lib_mc.engine import MultiConceptSession
from lib_mc.hosts import grounding_boxes, webui, webui_models
from lib_mc.hosts.layout_images import to_images
from lib_mc.plan import build_plan
from modules import shared
from planted import cells, plant
from tinyhost import CFGHost, TinyLDM, make_unet, random_context, sample

IMAGE = (128, 128)   # latent 16 x 16
DETECT_SIZE = 128    # the released 800 px would take seconds per image on 2 CPU cores


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    bert = files.write_bert(str(root / "bert"))
    return root, files.write_hf(str(root / "grounding-dino" / "grounding-dino-tiny"), bert)


@pytest.fixture()
def host(checkpoint, monkeypatch):
    root, path = checkpoint
    monkeypatch.setattr(webui_models.paths, "models_path", str(root))
    monkeypatch.setattr(shared.opts, grounding_boxes.SETTING, grounding_boxes.GROUNDING_DINO, raising=False)
    monkeypatch.setattr(shared.opts, webui_models.SETTING, "none", raising=False)   # attention + boxes, no SAM
    monkeypatch.setattr(shared.opts, webui_models.FACES_SETTING, False, raising=False)
    model = grounding_boxes.MODELS.model(path, "cpu", tokenizer_folders=grounding_boxes.folders())
    model.size = model.max_size = DETECT_SIZE
    yield model
    grounding_boxes.MODELS.free()


def decoded_image(latents):
    """What the host's VAE gives for the layout latents: a smooth picture in [-1, 1]."""
    y, x = torch.meshgrid(torch.linspace(-1, 1, IMAGE[0]), torch.linspace(-1, 1, IMAGE[1]), indexing="ij")
    picture = torch.stack([x, y, (x * x + y * y) - 1]).clamp(-1, 1)
    return picture[None].expand(latents.shape[0], -1, -1, -1).clone()


def after_layout_pass(batch=1):
    """Two women (one shared word, planted on both halves) and a man: all automatic."""
    unet = plant(make_unet(), [2, 5], [[cells(2, 1, 14, 7), cells(2, 9, 14, 15)]] * batch)
    plan = build_plan([dict(name="alice", cond=random_context(3), auto_tokens=[2], auto_group=0, auto_word="woman"),
                       dict(name="bea", cond=random_context(4), auto_tokens=[2], auto_group=0, auto_word="woman"),
                       dict(name="bob", cond=random_context(5), auto_tokens=[5], auto_group=1, auto_word="man")],
                      IMAGE, start_at=0.5)
    session = MultiConceptSession(unet, plan)
    host = CFGHost(TinyLDM(unet), random_context(1), random_context(2))
    host.route = session.denoise
    with session.stage1():
        sample(host, "euler", steps=6, batch=batch)
    p = SimpleNamespace(sd_model=SimpleNamespace(first_stage_model=None, decode_first_stage=decoded_image),
                        extra_generation_params={})
    state = SimpleNamespace(session=session, prepared=SimpleNamespace(plan=plan, warnings=[]))
    return p, state, plan


def expected_boxes(model, plan, batch):
    image = to_images(decoded_image(torch.zeros(1, 4, 16, 16)))[0]
    found = dict(zip(["woman", "man"], model.detect(np.asarray(image), ["woman", "man"],
                                                     grounding_boxes.BOX_THRESHOLD, grounding_boxes.TEXT_THRESHOLD)))
    concepts = plan.concepts
    boxes, notes = assign_boxes(found, [c.auto_word for c in concepts], [""] * 3, [None] * 3,
                                [c.name for c in concepts])
    return [boxes] * batch, notes


def test_each_concept_is_looked_for_in_the_box_found_for_its_class_word(host):
    p, state, plan = after_layout_pass(batch=2)
    boxes, notes = expected_boxes(host, plan, 2)
    assert any(box is not None for box in boxes[0]), "the random model must find something at these thresholds"
    webui._find_regions(p, state, torch.zeros(2, 4, 16, 16))
    assert p.extra_generation_params[grounding_boxes.INFOTEXT] == "Grounding DINO"
    steps = dict(plan.mask_steps)
    assert torch.equal(steps["DINO boxes"], boxes_as_masks(boxes, (16, 16)))
    attention = steps["attention masks"]
    for slot, box in enumerate(boxes[0]):
        if box is not None:   # nothing found outside its box
            assert (attention[:, slot] * (1 - steps["DINO boxes"][:, slot])).sum() == 0
            assert attention[:, slot].sum() > 0
    assert all(note in state.prepared.warnings for note in notes)
    assert plan.found_masks is not None and plan.found_masks.shape[:2] == (2, 3)


def test_the_attention_setting_never_loads_the_model(host, monkeypatch):
    monkeypatch.setattr(shared.opts, grounding_boxes.SETTING, grounding_boxes.ATTENTION)
    grounding_boxes.MODELS.free()
    p, state, plan = after_layout_pass()
    webui._find_regions(p, state, torch.zeros(1, 4, 16, 16))
    assert grounding_boxes.MODELS.loaded is None and grounding_boxes.INFOTEXT not in p.extra_generation_params
    assert "DINO boxes" not in dict(plan.mask_steps) and plan.found_masks is not None


def test_without_a_checkpoint_or_with_old_transformers_attention_boxes_are_used_with_a_note(host, monkeypatch, tmp_path):
    import transformers
    monkeypatch.setattr(transformers, "__version__", "4.30.2")   # A1111 1.10's
    grounding_boxes.MODELS.free()
    p, state, plan = after_layout_pass()
    webui._find_regions(p, state, torch.zeros(1, 4, 16, 16))
    note = " ".join(state.prepared.warnings)
    assert "4.30.2" in note and "4.40" in note and "attention boxes" in note
    assert grounding_boxes.INFOTEXT not in p.extra_generation_params and plan.found_masks is not None
    monkeypatch.undo()
    monkeypatch.setattr(webui_models.paths, "models_path", str(tmp_path))
    monkeypatch.setattr(shared.opts, grounding_boxes.SETTING, grounding_boxes.GROUNDING_DINO, raising=False)
    monkeypatch.setattr(shared.opts, webui_models.SETTING, "none", raising=False)
    p, state, plan = after_layout_pass()
    webui._find_regions(p, state, torch.zeros(1, 4, 16, 16))
    assert any(str(tmp_path / "grounding-dino") in w and "groundingdino_swint_ogc.pth" in w
               for w in state.prepared.warnings), state.prepared.warnings
    assert plan.found_masks is not None


def test_a_detection_that_fails_on_the_device_leaves_the_job_on_attention_boxes(host, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(host, "detect", out_of_memory)
    p, state, plan = after_layout_pass()
    webui._find_regions(p, state, torch.zeros(1, 4, 16, 16))
    assert any("Grounding DINO failed (CUDA out of memory" in w and "attention boxes" in w
               for w in state.prepared.warnings), state.prepared.warnings
    assert grounding_boxes.INFOTEXT not in p.extra_generation_params and plan.found_masks is not None


def test_with_old_transformers_an_original_checkpoint_runs_on_the_original_code(tmp_path, monkeypatch):
    """A1111 1.10 (transformers 4.30.2) with sd-webui-segment-anything's .pth: IDEA-Research's own
    code (here the pip `groundingdino`) finds the boxes; the job says so."""
    import transformers
    bert = files.write_bert(str(tmp_path / "bert"))
    files.write_original(str(tmp_path / "grounding-dino"), bert)
    monkeypatch.setattr(transformers, "__version__", "4.30.2")
    monkeypatch.setattr(webui_models.paths, "models_path", str(tmp_path))
    monkeypatch.setattr(shared.opts, grounding_boxes.SETTING, grounding_boxes.GROUNDING_DINO, raising=False)
    monkeypatch.setattr(shared.opts, webui_models.SETTING, "none", raising=False)
    monkeypatch.setattr(shared.opts, webui_models.FACES_SETTING, False, raising=False)
    grounding_boxes.MODELS.free()
    try:
        p, state, plan = after_layout_pass()
        webui._find_regions(p, state, torch.zeros(1, 4, 16, 16))
        assert type(grounding_boxes.MODELS.loaded[1]).__name__ == "OriginalGroundingDino"
        assert p.extra_generation_params[grounding_boxes.INFOTEXT] == "Grounding DINO", state.prepared.warnings
        assert "DINO boxes" in dict(plan.mask_steps) and plan.found_masks is not None
    finally:
        grounding_boxes.MODELS.free()
