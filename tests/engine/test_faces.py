"""Face detection for automatic regions: an SCRFD-shaped ONNX model run through onnxruntime.

The model is built here and exported to ONNX with insightface's output layout (scores, box
distances and keypoints for strides 8, 16, 32, two anchors a cell). It is not random: its score
is high where a 64x64 window of the input is bright, so a bright square is "a face" and the
test knows where the faces are.
"""

import numpy as np
import pytest
import torch
from torch import nn

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from lib_mc.auto.faces import FaceDetector, find_detector, to_cells   # noqa: E402
from lib_mc.auto.masks import masks_from_maps   # noqa: E402
from lib_mc.auto.sam import ModelFileError   # noqa: E402


class BrightSquares(nn.Module):
    def forward(self, x):
        bright = (x.mean(1, keepdim=True) + 1) / 2                      # input in about [-1, 1]
        scores, boxes, kps = [], [], []
        for stride in (8, 16, 32):
            window = nn.functional.avg_pool2d(bright, 64, stride=stride, padding=0)
            window = nn.functional.pad(window, (0, 640 // stride - window.shape[-1], 0, 640 // stride - window.shape[-2]))
            # the window starts at the cell's corner; SCRFD anchors sit at cell corners: shift by half a face
            score = torch.sigmoid(40 * (window - 0.9)).flatten(2).transpose(1, 2)  # (1, n, 1)
            score = score.repeat_interleave(2, dim=1)[0]                          # two anchors a cell
            n = score.shape[0]
            left_top = torch.zeros(n, 2) - 0.0
            right_bottom = torch.full((n, 2), 64.0 / stride)
            scores.append(score)
            boxes.append(torch.cat([left_top, right_bottom], 1) + 0 * score)
            kps.append(torch.zeros(n, 10) + 0 * score)
        return tuple(scores + boxes + kps)


@pytest.fixture(scope="module")
def detector_path(tmp_path_factory):
    folder = tmp_path_factory.mktemp("insightface") / "models" / "buffalo_l"
    folder.mkdir(parents=True)
    path = folder / "det_10g.onnx"
    torch.onnx.export(BrightSquares(), torch.zeros(1, 3, 640, 640), str(path), opset_version=13,
                      input_names=["input.1"])
    return path


def picture(squares, size=(256, 384)):
    image = np.zeros(size + (3,), dtype=np.uint8)
    for top, left, side in squares:
        image[top:top + side, left:left + side] = 255
    return image


def test_the_detector_is_found_and_finds_each_bright_square_once(detector_path):
    assert find_detector(str(detector_path.parents[2])) == str(detector_path)
    detector = FaceDetector(str(detector_path))
    # 384 px wide -> scaled by 640/384: a 40 px square becomes 66 px, over the 64 px window
    faces = detector.detect(picture([(100, 40, 40), (60, 280, 40)]))
    assert len(faces) == 2
    centres = sorted(((f[0] + f[2]) / 2, (f[1] + f[3]) / 2) for f in faces)
    assert abs(centres[0][0] - 60) < 12 and abs(centres[0][1] - 120) < 12
    assert abs(centres[1][0] - 300) < 12 and abs(centres[1][1] - 80) < 12
    assert len(detector.detect(picture([]))) == 0


def test_faces_split_a_shared_word_where_k_means_would_not():
    # one blob of attention: a big person on the left, a small one lower right
    maps = torch.zeros(1, 2, 16, 24)
    maps[0, :, 0:16, 0:17] = 1
    maps[0, :, 8:16, 17:23] = 1
    faces = np.array([[6, 1, 11, 6, 0.9], [18, 8, 22, 12, 0.8]], dtype=np.float32)   # in map cells
    by_faces = masks_from_maps(maps, [0, 0], faces=[faces])[0]
    by_kmeans = masks_from_maps(maps, [0, 0])[0]
    assert by_faces[0, 1, 14] == 1 and by_kmeans[1, 1, 14] == 1   # the big person's shoulder
    assert by_faces[1, 10, 20] == 1 and (by_faces[0] * by_faces[1]).sum() == 0
    cells = to_cells(faces, (128, 192), (16, 24))
    assert np.allclose(cells[0], [0.75, 0.125, 1.375, 0.75])


def test_a_file_that_is_not_a_detector_is_named(tmp_path):
    bad = tmp_path / "det_10g.onnx"
    bad.write_bytes(b"not onnx")
    with pytest.raises(ModelFileError, match="det_10g.onnx could not be loaded"):
        FaceDetector(str(bad))
    assert find_detector(str(tmp_path / "missing")) is None
