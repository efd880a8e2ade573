"""Job -> Plan for face concepts: the photos embedded by the antelopev2 models (real ONNX files the
tests export), InstantID's identity tokens from its IP-Adapter file (official format) for the
sgm UNet, the IdentityNet only when a concept uses keypoint control, score-only faces needing
no InstantID file, and every missing or wrong piece named before anything samples."""

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from lib_mc.auto.sam import ModelFileError
from lib_mc.faces.analysis import FaceAnalysis
from lib_mc.faces.instantid.identitynet import load_identitynet
from lib_mc.faces.instantid.ip_adapter import load_ip_adapter
from lib_mc.job import JobError
from facemodels import face, picture, write_antelopev2
from instantid_files import write_identitynet_folder, write_ip_adapter
from test_prepare import Services, job, run
from tinyxl import make_xl_unet

RECT = {"type": "rect", "x": 0, "y": 0, "w": 0.5, "h": 1}


def pixels(seed: int) -> np.ndarray:
    """A 'face photo' the test detector finds: one 64 px face on black, on the detector's grid."""
    return picture((320, 640), [(face(seed, 64), 64, 128)])


def photo(seed: int) -> str:
    buffer = io.BytesIO()
    Image.fromarray(pixels(seed)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    folder = tmp_path_factory.mktemp("faces")
    unet = make_xl_unet()
    detector, recogniser = write_antelopev2(folder / "antelopev2")
    write_ip_adapter(folder / "ip-adapter.bin", unet, seed=1)
    write_identitynet_folder(folder / "ControlNetModel", seed=2)
    return dict(unet=unet, analysis=FaceAnalysis(detector, recogniser), ip=str(folder / "ip-adapter.bin"),
                net=str(folder / "ControlNetModel"))


class FaceServices(Services):
    """Services with the host's face models: antelopev2 and InstantID's files (or their absence)."""

    def __init__(self, world, model_arch="sdxl", missing=None):
        super().__init__({}, model_arch)
        self.world, self.missing, self.loaded = world, missing, []

    def face_analysis(self):
        if self.missing == "antelopev2":
            raise ModelFileError("antelopev2: scrfd_10g_bnkps.onnx and glintr100.onnx are not in /models/insightface")
        return self.world["analysis"]

    def instantid(self, unet, need_control):
        if self.missing == "instantid":
            raise ModelFileError("InstantID: ip-adapter.bin is not in /models/instantid")
        self.loaded.append(need_control)
        return load_ip_adapter(self.world["ip"], unet), load_identitynet(self.world["net"]) if need_control else None


def alice(**extra):
    return {"name": "alice", "class_word": "woman", "region": RECT, "faces": [{"png": photo(1)}], **extra}


def test_a_face_concept_gets_its_identity_tokens_and_instantid(world):
    services = FaceServices(world)
    prepared, _ = run(world["unet"], services, job(alice(face_weight=0.6), {"name": "bob", "region": RECT}))
    plan = prepared.plan
    identity = plan.concepts[0].face
    assert plan.concepts[1].face is None and plan.face_concepts == [0] and services.loaded == [True]
    found = world["analysis"].faces(pixels(1))[0]
    np.testing.assert_allclose(identity.embedding, found.embedding, rtol=1e-5)
    ip = load_ip_adapter(world["ip"], world["unet"])
    cond, uncond = ip.tokens(torch.as_tensor(found.embedding, dtype=torch.float32))
    torch.testing.assert_close(identity.cond_tokens, cond)
    torch.testing.assert_close(identity.uncond_tokens, uncond)
    assert (identity.weight, identity.control) == (0.6, 0.8)
    assert set(plan.instantid.ip_layers) == set(ip.layers) and plan.instantid.identitynet is not None
    # the photo's face shape (keypoints in its box) for placing it
    assert identity.kps_in_box.shape == (5, 2) and ((identity.kps_in_box > 0) & (identity.kps_in_box < 1)).all()


def test_several_photos_are_averaged_and_control_off_loads_no_identitynet(world):
    services = FaceServices(world)
    prepared, _ = run(world["unet"], services, job(alice(faces=[photo(1), photo(2)], face_control=0)))
    identity = prepared.plan.concepts[0].face
    one = [world["analysis"].faces(pixels(s))[0].embedding for s in (1, 2)]
    np.testing.assert_allclose(identity.embedding, np.mean(one, axis=0), rtol=1e-5)
    assert services.loaded == [False] and prepared.plan.instantid.identitynet is None


@pytest.mark.parametrize("mode", ["blend", "regional"])
def test_score_only_faces_need_no_instantid(world, mode):
    services = FaceServices(world, missing="instantid")
    prepared, _ = run(world["unet"], services, job(alice(face_weight=0, face_control=0), mode=mode))
    identity = prepared.plan.concepts[0].face
    assert identity is not None and not identity.acts and identity.cond_tokens is None
    assert prepared.plan.face_concepts == [] and prepared.plan.instantid is None


@pytest.mark.parametrize("missing, words", [("antelopev2", "glintr100.onnx"), ("instantid", "ip-adapter.bin")])
def test_missing_model_files_are_named(world, missing, words):
    with pytest.raises(JobError) as error:
        run(world["unet"], FaceServices(world, missing=missing), job(alice()))
    assert error.value.field == "concepts[0].faces" and words in error.value.problem


def test_a_photo_without_a_face_and_an_sd15_model_are_named(world):
    buffer = io.BytesIO()
    Image.new("RGB", (128, 128)).save(buffer, format="PNG")
    empty = base64.b64encode(buffer.getvalue()).decode("ascii")
    with pytest.raises(JobError, match=r"concepts\[0\]\.faces\[1\]: no face found"):
        run(world["unet"], FaceServices(world), job(alice(faces=[photo(1), empty])))
    with pytest.raises(JobError, match=r"concepts\[0\]\.faces: InstantID works with SDXL checkpoints; the model is SD1"):
        run(world["unet"], FaceServices(world, model_arch="sd1"), job(alice()))
    # only scored: any model
    prepared, _ = run(world["unet"], FaceServices(world, model_arch="sd1"), job(alice(face_weight=0, face_control=0)))
    assert prepared.plan.concepts[0].face is not None


def test_a_host_without_face_models_is_named(world):
    from test_prepare import Services as Plain
    with pytest.raises(JobError, match="not available on this host"):
        run(world["unet"], Plain({}, "sdxl"), job(alice()))
