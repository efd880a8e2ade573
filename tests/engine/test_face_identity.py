"""Face analysis with the antelopev2 pack's layout (tests/facemodels.py writes real ONNX files):
detection with keypoints, the raw ArcFace embedding of the aligned face, the photos' reference,
the identity score in a region, finding the files, and InstantID's keypoint drawing."""

import shutil

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
cv2 = pytest.importorskip("cv2")
transform = pytest.importorskip("skimage.transform")

from facemodels import FACE_KPS, face, picture, write_antelopev2   # noqa: E402
from lib_mc.auto.sam import ModelFileError   # noqa: E402
from lib_mc.faces.analysis import FaceAnalysis, cosine, normed   # noqa: E402
from lib_mc.faces.identity import reference_embedding, score_in_region   # noqa: E402
from lib_mc.faces.keypoints import default_face_box, draw_kps, place   # noqa: E402
from lib_mc.faces.models import ANTELOPE_FILES, antelopev2_folders, find_antelopev2   # noqa: E402
from lib_mc.job import JobError   # noqa: E402

# insightface's arcface_dst
TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                     [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float32)


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models") / "insightface" / "models" / "antelopev2"
    return write_antelopev2(str(folder))


@pytest.fixture(scope="module")
def analysis(pack):
    return FaceAnalysis(*pack)


def insightface_embedding(recogniser_path, image, kps, bgr=False):
    """As insightface's ArcFaceONNX.get: skimage's similarity onto the template, cv2's warp,
    (x - 127.5) / 127.5 in RGB order; the raw output."""
    tform = transform.SimilarityTransform()
    tform.estimate(np.asarray(kps), TEMPLATE)
    crop = cv2.warpAffine(image, tform.params[:2], (112, 112), borderValue=0.0).astype(np.float32)
    if bgr:
        crop = crop[..., ::-1]
    blob = ((crop - 127.5) / 127.5).transpose(2, 0, 1)[None].astype(np.float32)
    session = ort.InferenceSession(recogniser_path, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: blob})[0].reshape(-1)


def test_faces_have_boxes_keypoints_and_the_raw_embedding_largest_first(pack, analysis):
    small, big = face(1, 64), face(3, 128)
    image = picture((320, 640), [(small, 32, 64), (face(2, 64), 96, 480), (big, 160, 0)])
    found = analysis.faces(image)
    assert [tuple(f.box) for f in found][:1] == [(0, 160, 128, 288)] and len(found) == 3
    assert sorted(tuple(f.box) for f in found[1:]) == [(64, 32, 128, 96), (480, 96, 544, 160)]
    for f in found:
        side = f.box[2] - f.box[0]
        np.testing.assert_allclose(f.kps, f.box[:2] + FACE_KPS * side, atol=1e-3)
        assert 0.9 < f.score <= 1
        expected = insightface_embedding(pack[1], image, f.kps)
        assert f.embedding.shape == (512,)
        np.testing.assert_allclose(f.embedding, expected, rtol=0.02, atol=0.02)
        assert abs(np.linalg.norm(f.embedding) - 1) > 0.5   # raw, not normed
        assert cosine(f.embedding, insightface_embedding(pack[1], image, f.kps, bgr=True)) < 0.99   # RGB order
    np.testing.assert_allclose(np.linalg.norm(normed(found[0].embedding)), 1, atol=1e-9)
    assert all(f.embedding is None for f in analysis.faces(image, embed=False))
    assert analysis.faces(picture((100, 100))) == []
    # letterboxed at 640: a 32 px face in a 160 px photo is 128 px on the detector's input
    found = analysis.faces(picture((160, 120), [(small[::2, ::2], 24, 40)]))
    assert len(found) == 1 and np.allclose(found[0].box, [40, 24, 72, 56])
    np.testing.assert_allclose(found[0].kps, [40, 24] + FACE_KPS * 32, atol=1e-3)


def test_an_mxnet_style_recogniser_that_normalises_inside_gets_0_to_255(pack, analysis, tmp_path):
    import torch
    from facemodels import TinyArcFace

    class Normalising(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = TinyArcFace()

        def forward(self, x):
            return self.net((x - 127.5) * (1 / 127.5))
    path = str(tmp_path / "glintr100.onnx")
    torch.onnx.export(Normalising().eval(), torch.zeros(1, 3, 112, 112), path, opset_version=13)
    model = onnx.load(path)
    first = {n.op_type: n for n in reversed(model.graph.node[:8])}
    first["Sub"].name, first["Mul"].name = "_minus0", "_mul0"   # MXNet's node names
    onnx.save(model, path)
    image = picture((320, 640), [(face(4, 64), 64, 128)])
    kps = analysis.faces(image, embed=False)[0].kps
    mxnet = FaceAnalysis(pack[0], path)
    assert (mxnet.mean, mxnet.std) == (0.0, 1.0)
    np.testing.assert_allclose(mxnet.embed(image, kps), analysis.embed(image, kps), rtol=1e-4, atol=1e-4)


def test_the_reference_averages_each_photos_largest_face_and_names_a_photo_without_one(pack, analysis):
    a, b = face(5, 64), face(6, 128)
    photos = [picture((320, 640), [(a, 64, 128)]),
              picture((320, 640), [(face(7, 64), 0, 0), (b, 128, 320)]),   # b is the larger
              picture((160, 120), [(a[::2, ::2], 24, 40)])]
    embedding, kps_in_box = reference_embedding(analysis, photos)
    boxes = [(128, 64, 64), (320, 128, 128), (40, 24, 32)]   # left, top, side
    expected = [insightface_embedding(pack[1], p, np.array([x, y]) + FACE_KPS * side)
                for p, (x, y, side) in zip(photos, boxes)]
    np.testing.assert_allclose(embedding, np.mean(expected, axis=0), rtol=0.02, atol=0.02)
    np.testing.assert_allclose(kps_in_box, FACE_KPS, atol=1e-5)
    with pytest.raises(JobError, match=r"concepts\[1\]\.faces\[1\]: no face found") as caught:
        reference_embedding(analysis, [photos[0], picture((200, 200))], field="concepts[1].faces")
    assert caught.value.field == "concepts[1].faces[1]"


def test_the_score_is_1_for_the_same_face_lower_for_another_and_none_without_a_face(analysis):
    alice, bob, big = face(8, 64), face(9, 64), face(10, 128, low=150)   # big: larger, lower score
    reference, _ = reference_embedding(analysis, [picture((320, 640), [(alice, 16, 16)])])
    image = picture((320, 640), [(alice, 32, 64), (alice, 208, 336), (bob, 64, 512), (big, 160, 96)])
    left, right = np.zeros((320, 640), bool), np.zeros((320, 640), np.float32)
    left[:, :240] = True
    right[:, 300:480] = 1.0
    assert score_in_region(analysis, image, right, reference) == pytest.approx(1, abs=1e-5)
    other = np.zeros((320, 640), bool)
    other[:, 500:] = True
    assert score_in_region(analysis, image, other, reference) < 0.9
    # alice and a larger face both in the left region: the larger one is the region's face
    found = analysis.faces(image, embed=False)
    assert found[0].box[2] - found[0].box[0] == 128 and found[0].score < min(f.score for f in found[1:])
    assert score_in_region(analysis, image, left, reference) < 0.9
    top_left = np.zeros((320, 640), bool)
    top_left[:150, :200] = True
    assert score_in_region(analysis, image, top_left, reference) == pytest.approx(1, abs=1e-5)
    empty = np.zeros((320, 640), bool)
    empty[250:, 500:] = True
    assert score_in_region(analysis, image, empty, reference) is None


@pytest.mark.parametrize("layout", ["models", "plain", "unzipped", "controlnet", "controlnet-main"])
def test_the_pack_is_found_where_users_keep_it(pack, tmp_path, layout):
    models, extensions = tmp_path / "models", tmp_path / "extensions"
    extensions.mkdir()
    annotator = "annotator/downloads/insightface/models/antelopev2"
    folder = {"models": models / "insightface/models/antelopev2", "plain": models / "insightface/antelopev2",
              "unzipped": models / "insightface/antelopev2/antelopev2",
              "controlnet": extensions / "sd-webui-controlnet" / annotator,
              "controlnet-main": extensions / "sd-webui-controlnet-main" / annotator}[layout]
    folder.mkdir(parents=True)
    for path in pack:
        shutil.copy(path, folder)
    found = find_antelopev2(antelopev2_folders(str(models), str(extensions)))
    assert found == (str(folder / ANTELOPE_FILES[0]), str(folder / ANTELOPE_FILES[1]))
    if layout != "models":   # the first folder in the list wins
        first = models / "insightface/models/antelopev2"
        first.mkdir(parents=True)
        for path in pack:
            shutil.copy(path, first)
        assert find_antelopev2(antelopev2_folders(str(models), str(extensions)))[0] == str(first / ANTELOPE_FILES[0])


def test_missing_or_broken_files_are_named_with_the_folders_searched(pack, tmp_path):
    folders = antelopev2_folders(str(tmp_path / "models"), str(tmp_path))
    (tmp_path / "sd-webui-controlnet").mkdir()
    folders = antelopev2_folders(str(tmp_path / "models"), str(tmp_path))
    assert len(folders) == 3
    shutil.copy(pack[0], tmp_path / "sd-webui-controlnet")   # not in a searched folder
    target = tmp_path / "models/insightface/antelopev2"
    target.mkdir(parents=True)
    shutil.copy(pack[0], target)
    with pytest.raises(ModelFileError) as caught:
        find_antelopev2(folders)
    message = str(caught.value)
    assert "scrfd_10g_bnkps.onnx" in message and "missing: glintr100.onnx." in message
    assert all(folder in message for folder in folders)
    broken = tmp_path / "glintr100.onnx"
    broken.write_bytes(b"not onnx")
    with pytest.raises(ModelFileError, match="glintr100.onnx could not be loaded"):
        FaceAnalysis(pack[0], str(broken))


def test_keypoints_are_drawn_as_instantid_draws_them():
    kps = np.array([[60, 80], [140, 80], [100, 130], [70, 180], [130, 180]], dtype=np.float64)
    drawn = draw_kps((256, 200), kps)
    assert drawn.shape == (256, 200, 3) and drawn.dtype == np.uint8
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255)]
    for (x, y), colour in zip(kps.astype(int), colours):
        assert tuple(drawn[y, x]) == colour and tuple(drawn[y + 9, x]) == colour   # filled, radius 10
    # limbs from each outer point to the nose, in the outer point's colour at 0.6, 4 px either side
    for (x, y), colour in zip(kps[[0, 1, 3, 4]], [colours[i] for i in (0, 1, 3, 4)]):
        mid = ((np.array([x, y]) + kps[2]) / 2).astype(int)
        assert tuple(drawn[mid[1], mid[0]]) == tuple(int(c * 0.6) for c in colour)
    # 4 px either side of the left eye's limb, nothing at 7 (the limb runs (60, 80) -> (100, 130))
    across = np.array([-50.0, 40.0]) / np.hypot(50, 40)
    for off, colour in [(3, (153, 0, 0)), (-3, (153, 0, 0)), (7, (0, 0, 0)), (-7, (0, 0, 0))]:
        x, y = np.rint(np.array([80.0, 105.0]) + off * across).astype(int)
        assert tuple(drawn[y, x]) == colour
    far = np.ones((256, 200), bool)
    ys, xs = np.mgrid[:256, :200]
    for x, y in kps:
        far &= (xs - x) ** 2 + (ys - y) ** 2 > 60 ** 2
    assert far.sum() > 10000 and drawn[far].max() == 0


def test_a_face_is_placed_by_its_box_and_by_default_at_the_top_of_its_region():
    box = np.array([10.0, 20.0, 74.0, 84.0])
    np.testing.assert_allclose(place(FACE_KPS, box), [10, 20] + FACE_KPS * 64)
    region = np.zeros((256, 320), bool)
    region[40:240, 160:260] = True
    x0, y0, x1, y1 = default_face_box(region)
    assert 160 <= x0 < x1 <= 260 and 40 <= y0 < y1 <= 40 + 200 / 2   # in the region's upper half
    assert abs((x0 + x1) / 2 - 210) < 2 and 30 <= x1 - x0 <= 50       # centred, a head wide
    kps = place(FACE_KPS, default_face_box(region))
    assert region[kps[:, 1].astype(int), kps[:, 0].astype(int)].all()
    # a person leaning right: the head follows the region's columns at its top
    leaning = np.zeros((256, 320), bool)
    leaning[40:100, 220:300] = True
    leaning[100:240, 100:300] = True
    x0, _, x1, _ = default_face_box(leaning)
    assert 220 <= x0 and x1 <= 300
    whole = default_face_box(np.zeros((256, 320), bool))
    assert whole[1] < 128 and abs((whole[0] + whole[2]) / 2 - 160) < 2
