"""Grounding DINO: an original IDEA-Research checkpoint converted to transformers' model, checked
against the ORIGINAL code (groundingdino-py 0.4.0, pure torch), and the transformers format.

The original model is built by its own builder from a GroundingDINO_SwinT_OGC.py written beside the
.pth (Swin-T backbone as released, a small transformer, a tiny BERT), saved as the released files
are; our loader reads that config and converts the weights. Random weights: the boxes mean nothing,
so the tests compare numbers with the original's and check what `detect` decides with them.
"""

import os
import shutil

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

import grounding_dino_files as files
from lib_mc.auto import dino
from lib_mc.auto.dino import model as dino_model
from lib_mc.auto.sam import ModelFileError

SIZE, MAX_SIZE = 128, 400   # the released 800/1333 would take minutes on 2 CPU cores
PHRASES = ["man", "woman"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("dino")
    bert = files.write_bert(str(root / "bert"))
    path, original = files.write_original(str(root / "grounding-dino"), bert)
    return root, bert, path, original


@pytest.fixture(scope="module")
def loaded(tiny):
    root, bert, path, _ = tiny
    return dino.GroundingDino(path, [bert], size=SIZE, max_size=MAX_SIZE)


@pytest.fixture(scope="module")
def image():
    # smooth shapes rather than noise, so that the features vary across the image
    y, x = np.mgrid[0:96, 0:128]
    rgb = np.stack([(x * 2) % 256, (y * 3) % 256, ((x - 64) ** 2 + (y - 48) ** 2) % 256], axis=-1)
    return rgb.astype(np.uint8)


def original_outputs(original, image):
    """The original inference: its own transforms (groundingdino.datasets.transforms) and forward."""
    from groundingdino.datasets import transforms as T
    from groundingdino.util.vl_utils import build_captions_and_token_span

    caption, spans = build_captions_and_token_span(PHRASES, True)
    prepare = T.Compose([T.RandomResize([SIZE], max_size=MAX_SIZE), T.ToTensor(),
                         T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    pixels, _ = prepare(Image.fromarray(image), None)
    with torch.no_grad():
        out = original(pixels[None], captions=[caption])
    return pixels, caption, spans, out


def midpoint_above(values: torch.Tensor, rank: int) -> float:
    """A threshold halfway between the rank-th and (rank+1)-th largest values: far from both,
    so float rounding between the two implementations cannot move anything across it."""
    ordered = values.sort(descending=True).values
    return float((ordered[rank - 1] + ordered[rank]) / 2)


def test_converted_original_checkpoint_matches_the_original_model(tiny, loaded, image):
    _, _, _, original = tiny
    pixels, caption, _, out = original_outputs(original, image)
    ours_pixels = dino_model.preprocess(image, SIZE, MAX_SIZE)
    torch.testing.assert_close(ours_pixels[0], pixels, atol=1e-6, rtol=0)   # same image preparation
    assert caption == dino_model.caption_and_spans(PHRASES)[0] == "man . woman ."
    ours, _ = loaded.outputs(ours_pixels, caption)
    assert ours.logits.shape == out["pred_logits"].shape == (1, files.SMALL["num_queries"], 256)
    torch.testing.assert_close(ours.logits, out["pred_logits"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours.pred_boxes, out["pred_boxes"], atol=1e-4, rtol=1e-4)
    # the perturbed random weights give boxes that differ between queries
    assert out["pred_boxes"][0].std(dim=0).min() > 0.01


def test_detect_returns_the_boxes_of_the_originals_post_processing(tiny, loaded, image):
    from groundingdino.util.utils import get_phrases_from_posmap
    from groundingdino.util.vl_utils import create_positive_map_from_span
    from torchvision.ops import box_convert, nms

    _, _, _, original = tiny
    _, caption, spans, out = original_outputs(original, image)
    logits = out["pred_logits"][0].sigmoid()
    boxes = out["pred_boxes"][0]
    box_threshold = midpoint_above(logits.max(dim=1).values, 20)
    tokenizer = original.tokenizer
    tokenized = tokenizer(caption)
    positive = create_positive_map_from_span(tokenizer(caption, return_tensors="pt"), [spans[p] for p in PHRASES]) > 0
    kept = logits.max(dim=1).values > box_threshold
    phrase_scores = torch.stack([logits[:, row].max(dim=1).values for row in positive], dim=1)
    text_threshold = midpoint_above(phrase_scores[kept].flatten(), int(kept.sum() * 1.5))
    # the original's predict(): boxes above box_threshold, each named by its tokens above text_threshold
    named = [get_phrases_from_posmap(logit > text_threshold, tokenized, tokenizer).replace(".", "").split()
             for logit in logits]
    found = loaded.detect(image, PHRASES, box_threshold=box_threshold, text_threshold=text_threshold)
    assert len(found) == 2
    removed = 0
    for p, phrase in enumerate(PHRASES):
        rows = [i for i in range(len(logits)) if kept[i] and phrase in named[i]]
        assert rows, f"no box of the original's for {phrase}: thresholds chosen badly"
        xyxy = box_convert(boxes[rows], "cxcywh", "xyxy").clamp(0, 1)
        order = nms(xyxy, phrase_scores[rows, p], 0.5)
        removed += len(rows) - len(order)
        expected = [(x0, y0, x1 - x0, y1 - y0) for x0, y0, x1, y1 in xyxy[order].tolist()]
        assert len(found[p]) == len(expected)
        torch.testing.assert_close(torch.tensor([d.box for d in found[p]]), torch.tensor(expected), atol=1e-4, rtol=0)
        scores = [d.score for d in found[p]]
        assert scores == pytest.approx(phrase_scores[rows, p][order].tolist(), rel=1e-3)
        assert scores == sorted(scores, reverse=True)
    assert removed > 0, "NMS removed no box: the test does not check it"
    assert all(isinstance(d, dino.Detection) for row in found for d in row)
    # deterministic: the same call gives the same boxes
    assert loaded.detect(image, PHRASES, box_threshold=box_threshold, text_threshold=text_threshold) == found


def test_a_checkpoint_with_a_key_missing_is_refused_naming_the_file_and_key(tiny, tmp_path):
    root, bert, path, _ = tiny
    state = torch.load(path, weights_only=True)["model"]
    dropped = "module.transformer.decoder.layers.1.catext_norm.weight"
    del state[dropped]
    broken = tmp_path / "groundingdino_swint_ogc.pth"
    torch.save({"model": state}, broken)
    shutil.copy(os.path.join(os.path.dirname(path), "GroundingDINO_SwinT_OGC.py"), tmp_path)
    with pytest.raises(ModelFileError, match="encoder_attn_text_layer_norm") as error:
        dino.GroundingDino(str(broken), [bert])
    assert str(broken) in str(error.value) and "missing" in str(error.value)


def test_transformers_folder_is_found_and_detects(tiny, image, tmp_path):
    _, bert, _, _ = tiny
    models = tmp_path / "models"
    folder = files.write_hf(str(models / "grounding-dino-tiny"), bert)
    assert dino.find_checkpoint([str(tmp_path / "elsewhere"), str(models)]) == folder
    kept = dino.DinoModels()
    found = kept.model(folder, "cpu")
    assert kept.model(folder, "cpu") is found   # kept between jobs
    found.size, found.max_size = SIZE, MAX_SIZE
    out, encoded = found.outputs(dino_model.preprocess(image, SIZE, MAX_SIZE), "man . woman .")
    probs = out.logits[0].sigmoid()
    tokens = {w: encoded["input_ids"][0].tolist().index(found.tokenizer.convert_tokens_to_ids(w)) for w in PHRASES}
    box_threshold = midpoint_above(probs.max(dim=1).values, 10)
    detections = found.detect(image, PHRASES, box_threshold=box_threshold, text_threshold=0.0)
    for phrase, row in zip(PHRASES, detections):
        assert row, phrase
        best = int(torch.argmax(torch.where(probs.max(dim=1).values > box_threshold, probs[:, tokens[phrase]], -1.0)))
        cx, cy, w, h = out.pred_boxes[0, best].tolist()
        assert row[0].box == pytest.approx((max(cx - w / 2, 0), max(cy - h / 2, 0),
                                            min(cx + w / 2, 1) - max(cx - w / 2, 0),
                                            min(cy + h / 2, 1) - max(cy - h / 2, 0)), abs=1e-5)
        assert row[0].score == pytest.approx(float(probs[best, tokens[phrase]]), rel=1e-5)
        assert all(0 <= v <= 1 for d in row for v in (d.box[0], d.box[1], d.box[0] + d.box[2], d.box[1] + d.box[3]))
    kept.free()
    assert kept.loaded is None


def test_find_checkpoint_prefers_swint_and_the_first_folder(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir(), second.mkdir()
    (second / "groundingdino_swinb_cogcoor.pth").write_bytes(b"x" * 20)
    (second / "groundingdino_swint_ogc.pth").write_bytes(b"x" * 10)
    assert dino.find_checkpoint([str(first), str(second)]) == str(second / "groundingdino_swint_ogc.pth")
    (first / "groundingdino_swinb_cogcoor.pth").write_bytes(b"x" * 20)
    assert dino.find_checkpoint([str(first), str(second)]) == str(first / "groundingdino_swinb_cogcoor.pth")


def test_no_checkpoint_message_names_the_files_and_folders(tmp_path):
    folders = [str(tmp_path / "models" / "grounding-dino"), str(tmp_path / "segment-anything" / "models")]
    os.makedirs(folders[0])
    (tmp_path / "models" / "grounding-dino" / "groundingdino.pth").write_bytes(b"x")   # not a known name
    assert dino.find_checkpoint(folders) is None
    message = dino.missing_message(folders)
    for part in folders + ["groundingdino_swint_ogc.pth", "groundingdino_swinb_cogcoor.pth", "attention boxes"]:
        assert part in message


def test_old_transformers_is_refused_with_the_versions(tiny, monkeypatch):
    _, bert, path, _ = tiny
    monkeypatch.setattr(transformers, "__version__", "4.30.2")
    with pytest.raises(ModelFileError, match=r"transformers 4\.30\.2 is installed.*4\.40 or newer") as error:
        dino.GroundingDino(path, [bert])
    assert path in str(error.value)


def test_corrupt_checkpoint_is_refused_naming_it(tiny, tmp_path):
    _, bert, path, _ = tiny
    corrupt = tmp_path / "groundingdino_swint_ogc.pth"
    corrupt.write_bytes(open(path, "rb").read()[:5000])   # a download cut short
    with pytest.raises(ModelFileError, match="could not be read") as error:
        dino.GroundingDino(str(corrupt), [bert])
    assert str(corrupt) in str(error.value)


def test_original_checkpoint_without_tokenizer_is_refused(tiny, tmp_path, monkeypatch):
    _, bert, path, _ = tiny
    monkeypatch.setattr(dino_model, "HF_CACHE_DIR", str(tmp_path / "empty-cache"))
    shutil.copy(path, tmp_path)
    # the released config names bert-base-uncased (the Hugging Face cache), not a folder
    files.write_config(str(tmp_path / "GroundingDINO_SwinT_OGC.py"), "bert-base-uncased")
    copy = str(tmp_path / os.path.basename(path))
    with pytest.raises(ModelFileError, match="no BERT tokenizer") as error:
        dino.GroundingDino(copy, [str(tmp_path / "no-such-folder")])
    assert copy in str(error.value) and str(tmp_path) in str(error.value)
    # a vocabulary whose separator ids are not bert-base-uncased's is refused too
    wrong = files.vocabulary()
    wrong[1012], wrong[5] = wrong[5], wrong[1012]
    other = files.write_bert(str(tmp_path / "other-bert"), wrong)
    with pytest.raises(ModelFileError, match="not bert-base-uncased's vocabulary"):
        dino.GroundingDino(copy, [other])


def test_loading_never_compiles_the_cuda_kernel(tiny, monkeypatch):
    """With CUDA and ninja present, transformers would JIT-compile its deformable attention kernel
    while building the model; the loader keeps to the pure-torch path."""
    from transformers.models.grounding_dino import modeling_grounding_dino as modeling

    _, bert, path, _ = tiny
    compiled = []
    monkeypatch.setattr(modeling, "is_torch_cuda_available", lambda: True)
    monkeypatch.setattr(modeling, "is_ninja_available", lambda: True)
    monkeypatch.setattr(modeling, "load_cuda_kernels", lambda: compiled.append(1))
    loaded = dino.GroundingDino(path, [bert])
    assert compiled == [] and loaded.model.config.disable_custom_kernels
    assert modeling.is_ninja_available() is True   # restored after loading

