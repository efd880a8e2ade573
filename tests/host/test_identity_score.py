"""The identity score in the WebUI flow: `process` adds the infotext key for a job with face
photos, the script's `postprocess_image` scores each generated image (the antelopev2 models
found in models/insightface, real ONNX files the tests export) and the infotext of that image
says `alice 1.00, bob no face`; images of a batch and of later batches keep their own scores."""

from types import SimpleNamespace

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from lib_mc.hosts import identity_score, webui, webui_models
from lib_mc.methods.faces import FaceIdentity
from lib_mc.plan import build_plan
from lib_mc.prepare import Prepared
from facemodels import face, picture, write_antelopev2


@pytest.fixture()
def models(tmp_path, monkeypatch):
    write_antelopev2(tmp_path / "insightface" / "models" / "antelopev2")
    monkeypatch.setattr(webui_models.paths, "models_path", str(tmp_path))
    webui_models._loaded.pop("antelopev2", None)
    yield webui_models.face_analysis()
    webui_models._loaded.pop("antelopev2", None)


def png(pixels) -> str:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def half(left: bool) -> torch.Tensor:
    mask = torch.zeros(320, 640)
    mask[:, :320] = 1
    return mask if left else 1 - mask


def processed(models, photos):
    """process() and a prepared plan for two scored concepts: alice on the left, bob on the right."""
    job = {"enabled": True, "mode": "blend", "concepts": [
        {"name": name, "region": {"type": "rect", "x": 0.5 * k, "w": 0.5},
         "faces": [{"png": png(pixels)}], "face_weight": 0, "face_control": 0}
        for k, (name, pixels) in enumerate(photos)]}
    p = SimpleNamespace(prompt="a woman and a man", sampler_name="Euler a", extra_generation_params={},
                        iteration=0, batch_size=2, batch_index=0)
    webui.process(p, job)
    state = p._multi_concept
    assert state.error is None and identity_score.KEY in p.extra_generation_params
    concepts = []
    for k, (name, pixels) in enumerate(photos):
        found = models.faces(pixels)[0]
        concepts.append(dict(name=name, cond={"c": torch.zeros(1)}, mask=half(k == 0),
                             face=FaceIdentity(found.embedding, np.full((5, 2), 0.5), 0.0, 0.0)))
    state.prepared = Prepared(build_plan(concepts, (320, 640)))
    return p, state


def generated(*faces_at) -> Image.Image:
    return Image.fromarray(picture((320, 640), faces_at))


def test_each_image_gets_the_similarity_of_the_face_in_each_region(models):
    alice, bob = face(21, 64), face(22, 64)
    p, state = processed(models, [("alice", picture((320, 640), [(alice, 64, 128)])),
                                  ("bob", picture((320, 640), [(bob, 64, 448)]))])
    value = p.extra_generation_params[identity_score.KEY]
    # image 0: alice's own face in her half, nobody in bob's
    webui.postprocess_image(p, SimpleNamespace(image=generated((alice, 128, 64))))
    # image 1: bob's face in alice's half (a stranger to her), alice's face in bob's half
    p.batch_index = 1
    webui.postprocess_image(p, SimpleNamespace(image=generated((bob, 64, 192), (alice, 128, 512))))
    first, second = value(index=0, p=p), value(index=1, p=p)
    assert first == "alice 1.00, bob no face"
    scores = dict(part.rsplit(" ", 1) for part in second.split(", "))
    assert float(scores["alice"]) < 0.9 and float(scores["bob"]) < 0.9
    # a later batch keeps its own images' scores
    p.iteration, p.batch_index = 1, 0
    webui.postprocess_image(p, SimpleNamespace(image=generated()))
    assert value(index=2, p=p) == "alice no face, bob no face" and value(index=0, p=p) == first


def test_a_job_without_face_photos_writes_no_score(models):
    p = SimpleNamespace(prompt="a woman", sampler_name="Euler a", extra_generation_params={})
    webui.process(p, {"enabled": True, "concepts": [{"name": "a", "region": {"type": "rect", "w": 0.5}}]})
    assert identity_score.KEY not in p.extra_generation_params
    webui.postprocess_image(p, SimpleNamespace(image=generated()))
    assert p._multi_concept.identity == {}


def test_every_next_job_finds_the_identitynet_back_in_cpu_memory(monkeypatch):
    """A face job moves the IdentityNet to the GPU at its first call; `process` of the next job
    (with Multi-Concept or without) moves it back."""
    class OnTheCard(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(2))
            self.moves = []

        def parameters(self, recurse=True):   # as if on the card (no CUDA here)
            yield SimpleNamespace(device=torch.device("cuda" if not self.moves else "cpu"))

        def to(self, *args, **kwargs):
            self.moves.append(args)
            return self
    net = OnTheCard()
    monkeypatch.setattr(webui_models, "_loaded", {"net": ("/models/instantid/ControlNetModel", net),
                                                  "ip": (("/models/instantid/ip-adapter.bin", 1), object())})
    webui.process(SimpleNamespace(prompt="a cat", sampler_name="Euler a", extra_generation_params={}),
                  {"enabled": False})
    assert net.moves == [("cpu",)]
    webui.process(SimpleNamespace(prompt="a cat", sampler_name="Euler a", extra_generation_params={}), None)
    assert net.moves == [("cpu",)]   # already there: not moved again


def test_the_layout_is_decoded_once_for_regions_and_faces(models):
    """Automatic regions and face placement look at the same layout image: one VAE decode;
    another batch's layout is decoded again."""
    decoded = []

    def decode_first_stage(latents):
        decoded.append(latents)
        return torch.zeros(latents.shape[0], 3, 64, 64)
    p = SimpleNamespace(sd_model=SimpleNamespace(first_stage_model=None, decode_first_stage=decode_first_stage))
    first = torch.zeros(1, 4, 8, 8)
    regions = webui_models.layout_images(p, first)()
    faces = webui_models.find_faces(p, first, [])
    assert len(decoded) == 1 and len(regions) == 1 and faces == [[]]
    webui_models.find_faces(p, torch.zeros(1, 4, 8, 8), [])
    assert len(decoded) == 2
