"""Grounding DINO on IDEA-Research's own code (original.py), the backend for a transformers older than
4.40 (A1111 1.10 ships 4.30.2): transformers' version is patched to 4.30.2, the code is the real
groundingdino-py 0.4.0, and also that package copied as sd-webui-segment-anything keeps it
(`local_groundingdino`, its imports renamed). The checkpoint is test_grounding_dino's: written by the
original builder, saved as the released files are.
"""

import os
import shutil
import sys

import numpy as np
import pytest
import torch
import transformers

import grounding_dino_files as files
from lib_mc.auto import dino
from lib_mc.auto.dino import model as dino_model
from lib_mc.auto.dino import original as dino_original
from lib_mc.auto.sam import ModelFileError

SIZE, MAX_SIZE = 128, 400   # as test_grounding_dino.py: the released 800/1333 take minutes on 2 cores
PHRASES = ["man", "woman"]
OLD = "4.30.2"   # A1111 1.10's transformers


def offline(patch: pytest.MonkeyPatch, cache: str) -> None:
    """No Hugging Face download can happen, and nothing is in the (empty) cache."""
    import transformers.utils.hub as hub

    os.makedirs(cache, exist_ok=True)
    patch.setenv("HF_HUB_OFFLINE", "1")
    patch.setenv("HF_HOME", cache)
    patch.setattr(hub, "_is_offline_mode", True, raising=False)   # read from the environment on import
    patch.setattr(hub, "TRANSFORMERS_CACHE", cache, raising=False)
    patch.setattr(dino_model, "HF_CACHE_DIR", cache)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The checkpoint, the original model it holds, and a copy whose config names bert-base-uncased
    (as the released config does) instead of the tiny BERT's folder."""
    root = tmp_path_factory.mktemp("dino-original")
    bert = files.write_bert(str(root / "bert"))
    path, original = files.write_original(str(root / "grounding-dino"), bert)
    released = root / "released"
    released.mkdir()
    shutil.copy(path, released)
    files.write_config(str(released / "GroundingDINO_SwinT_OGC.py"), "bert-base-uncased")
    return root, bert, path, original, str(released / os.path.basename(path))


@pytest.fixture(scope="module")
def loaded(tiny):
    """The released-config copy loaded with transformers 4.30.2 and no Hugging Face access."""
    root, bert, _, _, released = tiny
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(transformers, "__version__", OLD)
        offline(patch, str(root / "empty-cache"))
        model = dino.load(released, [bert], size=SIZE, max_size=MAX_SIZE)
    return model


@pytest.fixture(scope="module")
def image():
    y, x = np.mgrid[0:96, 0:128]
    rgb = np.stack([(x * 2) % 256, (y * 3) % 256, ((x - 64) ** 2 + (y - 48) ** 2) % 256], axis=-1)
    return rgb.astype(np.uint8)


@pytest.fixture
def old_transformers(monkeypatch):
    monkeypatch.setattr(transformers, "__version__", OLD)


@pytest.fixture(scope="module")
def extension(tmp_path_factory):
    """<extensions>/sd-webui-segment-anything with local_groundingdino: the installed package copied
    under that name, its absolute imports renamed and, as in the extension, no top-level __init__.py
    (a namespace package)."""
    import groundingdino

    folder = tmp_path_factory.mktemp("extensions") / "sd-webui-segment-anything"
    target = folder / "local_groundingdino"
    shutil.copytree(os.path.dirname(groundingdino.__file__), target, ignore=shutil.ignore_patterns("__pycache__"))
    for where, _, names in os.walk(target):
        for name in names:
            if name.endswith(".py"):
                file = os.path.join(where, name)
                with open(file, encoding="utf-8") as f:
                    text = f.read()
                text = text.replace("from groundingdino", "from local_groundingdino")
                text = text.replace("import groundingdino", "import local_groundingdino")
                with open(file, "w", encoding="utf-8") as f:
                    f.write(text)
    os.remove(target / "__init__.py")
    yield str(folder)
    for name in [n for n in sys.modules if n.split(".")[0] == "local_groundingdino"]:
        del sys.modules[name]


@pytest.fixture
def no_pip_package(monkeypatch):
    """`groundingdino` not importable (None in sys.modules makes `import` raise ImportError)."""
    monkeypatch.setitem(sys.modules, "groundingdino", None)


def midpoint_above(values: torch.Tensor, rank: int) -> float:
    ordered = values.sort(descending=True).values
    return float((ordered[rank - 1] + ordered[rank]) / 2)


def assert_same_outputs(model, original, image):
    from groundingdino.datasets import transforms as T
    from PIL import Image

    caption = "man . woman ."
    prepare = T.Compose([T.RandomResize([SIZE], max_size=MAX_SIZE), T.ToTensor(),
                         T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    pixels, _ = prepare(Image.fromarray(image), None)
    with torch.no_grad():
        expected = original(pixels[None], captions=[caption])
    ours = model.outputs(dino_model.preprocess(image, SIZE, MAX_SIZE), caption)
    assert ours["pred_logits"].shape == (1, files.SMALL["num_queries"], 256)
    torch.testing.assert_close(ours["pred_logits"], expected["pred_logits"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours["pred_boxes"], expected["pred_boxes"], atol=1e-5, rtol=1e-5)
    assert expected["pred_boxes"][0].std(dim=0).min() > 0.01   # boxes differ between queries


def test_old_transformers_builds_the_original_offline_and_it_equals_the_original_model(tiny, loaded, image):
    """Built with our tokenizer and a BertModel(config) in place of the download of
    bert-base-uncased, with the checkpoint's weights: the same model as the original's builder
    makes from the tiny BERT's folder."""
    _, _, _, original, released = tiny
    assert isinstance(loaded, dino.OriginalGroundingDino) and loaded.code == "groundingdino"
    assert type(loaded.model).__module__.startswith("groundingdino.models")
    assert loaded.model.tokenizer is loaded.tokenizer   # the model tokenizes with our tokenizer
    assert loaded.path == released and not loaded.model.training
    assert_same_outputs(loaded, original, image)


def test_detect_equals_the_transformers_backend(tiny, loaded, image):
    _, bert, path, _, _ = tiny
    converted = dino.GroundingDino(path, [bert], size=SIZE, max_size=MAX_SIZE)
    out = loaded.outputs(dino_model.preprocess(image, SIZE, MAX_SIZE), "man . woman .")
    probs = out["pred_logits"][0].sigmoid()
    box_threshold = midpoint_above(probs.max(dim=1).values, 20)
    text_threshold = midpoint_above(probs[probs.max(dim=1).values > box_threshold][:, [1, 3]].flatten(), 20)
    ours = loaded.detect(image, PHRASES, box_threshold, text_threshold)
    theirs = converted.detect(image, PHRASES, box_threshold, text_threshold)
    assert [len(row) for row in ours] == [len(row) for row in theirs]
    assert all(ours) and sum(map(len, ours)) > 2
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(torch.tensor([d.box for d in a]), torch.tensor([d.box for d in b]),
                                   atol=1e-4, rtol=0)
        assert [d.score for d in a] == pytest.approx([d.score for d in b], abs=1e-4)
    assert loaded.detect(image, []) == []


def test_builds_from_the_released_config_when_none_is_beside_the_checkpoint(tiny, tmp_path, old_transformers,
                                                                              monkeypatch):
    """No config file: the released Swin-T config (900 queries, 6 layers) is built, and the small
    checkpoint does not fit it: refused naming the file and a missing key."""
    _, bert, path, _, _ = tiny
    offline(monkeypatch, str(tmp_path / "empty-cache"))
    alone = tmp_path / os.path.basename(path)
    shutil.copy(path, alone)
    with pytest.raises(ModelFileError, match="does not fit the released config of groundingdino_swint_ogc.pth") as error:
        dino.load(str(alone), [bert])
    assert str(alone) in str(error.value) and "size mismatch" in str(error.value)


def test_a_key_missing_is_refused_naming_the_file_and_key(tiny, tmp_path, old_transformers):
    _, bert, path, _, _ = tiny
    state = torch.load(path, weights_only=True)["model"]
    del state["module.transformer.decoder.layers.1.catext_norm.weight"]
    broken = tmp_path / "groundingdino_swint_ogc.pth"
    torch.save({"model": state}, broken)
    shutil.copy(os.path.join(os.path.dirname(path), "GroundingDINO_SwinT_OGC.py"), tmp_path)
    with pytest.raises(ModelFileError, match=r"missing \['transformer\.decoder\.layers\.1\.catext_norm\.weight'\]") \
            as error:
        dino.load(str(broken), [bert])
    assert str(broken) in str(error.value)


def test_the_loaders_are_restored_even_when_the_build_raises(tiny, tmp_path, old_transformers, monkeypatch):
    from groundingdino.util import get_tokenlizer

    _, bert, path, _, _ = tiny
    before = (get_tokenlizer.get_tokenlizer, get_tokenlizer.get_pretrained_language_model)
    downloads = []
    monkeypatch.setattr(transformers.BertModel, "from_pretrained",
                        classmethod(lambda cls, *args, **kwargs: downloads.append(args)))
    shutil.copy(path, tmp_path)
    # an option the original model asserts on after it has built its text encoder
    files.write_config(str(tmp_path / "GroundingDINO_SwinT_OGC.py"), bert, two_stage_type="bogus")
    with pytest.raises(ModelFileError, match="could not be built from .*GroundingDINO_SwinT_OGC.py") as error:
        dino.load(str(tmp_path / os.path.basename(path)), [bert])
    assert "bogus" in str(error.value) and str(tmp_path) in str(error.value)
    assert (get_tokenlizer.get_tokenlizer, get_tokenlizer.get_pretrained_language_model) == before
    assert downloads == []   # the builder's own loader was never called


def test_local_groundingdino_is_found_in_the_extension_folder(tiny, image, extension, old_transformers,
                                                              no_pip_package):
    _, bert, path, original, _ = tiny
    path_before = list(sys.path)
    kept = dino.DinoModels()
    model = kept.model(path, "cpu", tokenizer_folders=[bert], code_folders=["", extension])
    assert isinstance(model, dino.OriginalGroundingDino) and model.code == "local_groundingdino"
    assert type(model.model).__module__.startswith("local_groundingdino.models")
    assert sys.path == path_before   # the extension folder was on sys.path only while importing
    assert kept.model(path, "cpu", tokenizer_folders=[bert], code_folders=["", extension]) is model
    model.size, model.max_size = SIZE, MAX_SIZE
    assert_same_outputs(model, original, image)
    # once imported (as the extension's scripts do), it is found without the folder
    assert dino_original.find_code().name == "local_groundingdino"
    kept.free()


def test_a_pip_package_without_its_compiled_cuda_op_gives_way_to_local_groundingdino(extension, monkeypatch):
    """IDEA-Research's package sends CUDA tensors to its compiled _C; without it, on a GPU machine,
    sd-webui-segment-anything's pure-torch copy is used."""
    from groundingdino.models.GroundingDINO import ms_deform_attn

    assert dino_original.find_code([extension]).name == "groundingdino"
    monkeypatch.setattr(ms_deform_attn, "MultiScaleDeformableAttnFunction", object, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert dino_original.find_code([extension]).name == "local_groundingdino"
    monkeypatch.setattr(ms_deform_attn, "_C", None, raising=False)   # what some copies set when it failed
    assert dino_original.find_code([extension]).name == "local_groundingdino"
    monkeypatch.setattr(ms_deform_attn, "_C", object())
    assert dino_original.find_code([extension]).name == "groundingdino"


def test_no_code_and_old_transformers_names_both_remedies(tiny, tmp_path, old_transformers, no_pip_package,
                                                          monkeypatch):
    _, bert, path, _, _ = tiny
    monkeypatch.setitem(sys.modules, "local_groundingdino", None)   # imported by an earlier test
    with pytest.raises(ModelFileError) as error:
        dino.load(path, [bert], code_folders=[str(tmp_path / "sd-webui-segment-anything")])
    message = str(error.value)
    for part in (path, "transformers 4.30.2 is installed", "4.40", "sd-webui-segment-anything"):
        assert part in message
    # a transformers folder needs transformers 4.40+ whatever code is there
    folder = tmp_path / "grounding-dino-tiny"
    folder.mkdir()
    with pytest.raises(ModelFileError, match=r"transformers 4\.30\.2 is installed.*4\.40 or newer"):
        dino.load(str(folder), [bert])
