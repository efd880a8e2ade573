"""Found-mask clean-up (OpenCV): holes, specks, gaps, growing and shrinking, disjointness."""

import numpy as np
import torch

from lib_mc.auto.postprocess import finish, grow, tidy


def square(size, top, left, bottom, right):
    mask = np.zeros((size, size), bool)
    mask[top:bottom, left:right] = True
    return mask


def test_tidy_fills_holes_bridges_a_one_cell_gap_and_drops_specks():
    mask = square(32, 4, 4, 20, 20)
    mask[8:12, 8:12] = False          # a hole
    mask[4:20, 12] = False            # a one-cell crack through it
    mask[28, 28] = True               # a speck far away
    out = tidy(mask)
    assert out[4:20, 4:20].all()
    assert not out[28, 28] and out.sum() == 16 * 16


def test_tidy_keeps_two_real_blobs_and_an_empty_mask_empty():
    two = square(32, 2, 2, 12, 12) | square(32, 18, 18, 28, 26)
    assert (tidy(two) == two).all()
    assert not tidy(np.zeros((8, 8), bool)).any()


def test_grow_and_shrink_by_cells_and_shrinking_never_empties():
    mask = square(32, 10, 10, 20, 20)
    assert grow(mask, 2).sum() > mask.sum() and grow(mask, 2)[8, 15] and not grow(mask, 2)[7, 15]
    shrunk = grow(mask, -2)
    assert shrunk[12:18, 12:18].all() and not shrunk[11, 15] and shrunk.sum() == 36
    tiny = square(32, 5, 5, 7, 7)
    assert (grow(tiny, -3) == tiny).all()


def test_finish_grows_in_image_pixels_and_keeps_concepts_apart():
    left = torch.from_numpy(square(16, 4, 1, 12, 7).astype(np.float32))
    right = torch.from_numpy(square(16, 4, 9, 12, 15).astype(np.float32))
    masks = torch.stack([left, right])[None]                    # (1, 2, 16, 16): a gap of 2 cells
    grown = finish(masks, grow_px=16, px_per_cell=8)            # 16 px = 2 cells
    a, b = grown[0] > 0.5
    assert (a & b).sum() == 0
    assert a[2, 4] and a[8, 0] and b[13, 12]                    # grew up, out and down
    # the gap cells both growths reach stay background; each keeps what it had
    assert (a >= (left > 0.5)).all() and (b >= (right > 0.5)).all()
    assert not a[8, 8] and not b[8, 7]
    same = finish(masks, grow_px=0, px_per_cell=8)
    assert torch.equal(same, masks)
    smaller = finish(masks, grow_px=-8, px_per_cell=8)
    assert smaller[0, 0].sum() == 6 * 4 and smaller[0, 1].sum() == 6 * 4


def test_finish_never_hands_one_concepts_cells_to_another():
    inner = torch.zeros(16, 16)
    inner[6:10, 6:10] = 1                                       # concept 2 sits inside concept 1's ring
    ring = torch.zeros(16, 16)
    ring[3:13, 3:13] = 1
    ring[6:10, 6:10] = 0
    out = finish(torch.stack([ring, inner])[None])
    assert torch.equal(out[0, 1], inner) and (out[0, 0] * out[0, 1]).sum() == 0   # filling the ring's hole takes nothing
