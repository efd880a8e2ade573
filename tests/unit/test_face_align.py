"""Face alignment against insightface's published ArcFace template, skimage's
SimilarityTransform (which insightface's face_align.py uses) and cv2.warpAffine (its crop)."""

import math

import numpy as np
import pytest

from lib_mc.faces.align import ARCFACE_TEMPLATE, estimate_norm, norm_crop, warp_affine

transform = pytest.importorskip("skimage.transform")

# insightface python-package/insightface/utils/face_align.py, arcface_dst
PUBLISHED = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                      [41.5493, 92.3655], [70.7299, 92.2041]])


def similarity(scale, degrees, shift):
    angle = math.radians(degrees)
    rotation = scale * np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    return np.column_stack([rotation, shift])


def apply(matrix, points):
    return points @ matrix[:, :2].T + matrix[:, 2]


def test_the_template_is_insightfaces_and_maps_onto_itself():
    np.testing.assert_allclose(ARCFACE_TEMPLATE, PUBLISHED, atol=1e-4)
    # float32 as insightface's: the identity to float32 precision
    np.testing.assert_allclose(estimate_norm(PUBLISHED), [[1, 0, 0], [0, 1, 0]], atol=1e-5)


@pytest.mark.parametrize("scale, degrees, shift", [(2.5, 0, (100, 40)), (0.7, 30, (-5, 12)), (4.0, -75, (300, 210))])
def test_keypoints_moved_by_a_similarity_are_moved_back(scale, degrees, shift):
    moved = similarity(scale, degrees, shift)
    kps = apply(moved, PUBLISHED)
    matrix = estimate_norm(kps)
    np.testing.assert_allclose(apply(matrix, kps), PUBLISHED, atol=1e-4)
    # the inverse of the move, as skimage finds it from the same points
    inverse = np.linalg.inv(np.vstack([moved, [0, 0, 1]]))[:2]
    np.testing.assert_allclose(matrix, inverse, atol=1e-5)
    tform = transform.SimilarityTransform()
    assert tform.estimate(kps, ARCFACE_TEMPLATE)
    np.testing.assert_allclose(matrix, tform.params[:2], atol=1e-5)


def test_noisy_keypoints_get_skimages_least_squares_fit_at_112_and_its_scaled_templates():
    rng = np.random.default_rng(0)
    kps = apply(similarity(1.8, 12, (60, 30)), PUBLISHED) + rng.normal(0, 3, (5, 2))
    template = ARCFACE_TEMPLATE.astype(np.float64)
    for size, dst in [(112, template), (224, template * 2), (256, template * 2 + [16, 0])]:
        tform = transform.SimilarityTransform()
        tform.estimate(kps, dst)
        np.testing.assert_allclose(estimate_norm(kps, size), tform.params[:2], atol=1e-9)
    with pytest.raises(ValueError, match="multiple of 112 or 128"):
        estimate_norm(kps, 100)
    with pytest.raises(ValueError, match="5 finite"):
        estimate_norm(kps[:4])


def test_the_crop_puts_the_faces_pixels_where_the_template_says():
    # a picture with a coloured dot at each keypoint of a face moved by a known similarity
    moved = similarity(2.0, 20, (150, 90))
    kps = apply(moved, PUBLISHED)
    image = np.zeros((400, 500, 3), dtype=np.uint8)
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255)]
    for (x, y), colour in zip(kps, colours):
        ys, xs = np.mgrid[:400, :500]
        image[(xs - x) ** 2 + (ys - y) ** 2 <= 36] = colour
    crop = norm_crop(image, kps)
    assert crop.shape == (112, 112, 3) and crop.dtype == np.uint8
    for (x, y), colour in zip(PUBLISHED, colours):
        assert tuple(crop[int(round(y)), int(round(x))]) == colour
    assert crop[5, 5].sum() == 0 and crop[56, 20].sum() == 0
    # black outside the picture, as cv2's borderValue=0: the template moved 40 px left is the
    # identity moved 40 px, so the crop's first 40 columns come from x < 0
    grey = np.full((112, 112, 3), 200, dtype=np.uint8)
    edge = norm_crop(grey, PUBLISHED - [40, 0])
    assert (edge[:, :40] == 0).all() and (edge[:, 41:] == 200).all()


def test_the_warp_is_cv2s_bilinear_warp():
    cv2 = pytest.importorskip("cv2")
    # smooth: cv2 rounds sample positions to 1/32 px, which would show on noise
    ys, xs = np.mgrid[:90, :120]
    image = np.stack([127 + 120 * np.sin(xs / 7) * np.cos(ys / 9), xs * 2, ys * 2.5], -1).astype(np.uint8)
    kps = apply(similarity(0.6, -35, (20, 70)), PUBLISHED)
    matrix = estimate_norm(kps)
    ours = warp_affine(image, matrix, 112).astype(int)
    theirs = cv2.warpAffine(image, matrix, (112, 112), borderValue=0.0).astype(int)
    inside = np.ones((90, 120), np.uint8)
    away = cv2.warpAffine(inside, matrix, (112, 112), flags=cv2.INTER_NEAREST)
    interior = cv2.erode(away, np.ones((3, 3), np.uint8)).astype(bool)   # edges: cv2 blends with the border
    assert interior.sum() > 2000
    off = np.abs(ours - theirs)[interior]
    assert (off <= 1).mean() > 0.999 and off.max() <= 3
    outside = cv2.warpAffine(np.full((90, 120), 255, np.uint8), matrix, (112, 112), borderValue=0.0) == 0
    assert outside.sum() > 1000 and ours[outside].max() <= 1   # rounding where a sample just grazes the picture
