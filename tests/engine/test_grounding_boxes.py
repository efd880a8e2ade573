"""Grounding DINO's boxes -> automatic concepts (lib_mc/auto/boxes.py) and per-image boxes in the
masks found from attention (two women: each image's own boxes decide who is where)."""

from dataclasses import dataclass

import torch

from lib_mc.auto.boxes import assign_boxes, iou
from lib_mc.auto.masks import masks_from_maps


@dataclass(frozen=True)
class Found:   # the fields of lib_mc.auto.dino.Detection that the assignment reads
    box: tuple
    score: float


LEFT, MIDDLE, RIGHT = (0.05, 0.1, 0.25, 0.8), (0.4, 0.2, 0.2, 0.6), (0.7, 0.1, 0.25, 0.8)


def test_a_words_best_boxes_go_left_to_right_in_list_order_and_hints_choose_first():
    found = {"woman": [Found(RIGHT, 0.9), Found(LEFT, 0.8), Found(MIDDLE, 0.3)]}
    boxes, notes = assign_boxes(found, ["woman", "woman"], ["", ""], [None, None], ["alice", "bea"])
    assert boxes == [LEFT, RIGHT] and notes == []   # the two best, left to right; the weak third unused
    boxes, _ = assign_boxes(found, ["woman", "woman"], ["right", ""], [None, None], ["alice", "bea"])
    assert boxes == [RIGHT, LEFT]
    big = (0.3, 0.0, 0.5, 1.0)
    boxes, _ = assign_boxes({"woman": [Found(LEFT, 0.9), Found(big, 0.8)]}, ["woman", "woman"], ["", "largest"],
                            [None, None], ["alice", "bea"])
    assert boxes == [LEFT, big]


def test_a_drawn_box_stays_and_the_detection_inside_it_is_left_to_it():
    drawn = (0.6, 0.0, 0.4, 1.0)
    found = {"woman": [Found(RIGHT, 0.95), Found(LEFT, 0.5)]}
    boxes, _ = assign_boxes(found, ["woman", "woman"], ["", ""], [None, drawn], ["alice", "bea"])
    assert boxes == [LEFT, drawn]   # alice does not take the woman in bea's drawn box, though she scored best


def test_one_person_under_two_words_goes_to_the_word_that_scored_it_higher():
    same = (0.06, 0.1, 0.25, 0.8)
    assert iou(LEFT, same) > 0.9
    found = {"man": [Found(LEFT, 0.6), Found(RIGHT, 0.55)], "person": [Found(same, 0.8)]}
    boxes, notes = assign_boxes(found, ["man", "person"], ["", ""], [None, None], ["bob", "kid"])
    assert boxes == [RIGHT, same] and notes == []


def test_a_concept_without_a_detection_searches_the_whole_image_and_is_named():
    boxes, notes = assign_boxes({"woman": [Found(MIDDLE, 0.7)], "dog": []}, ["woman", "woman", "dog"],
                                ["", "", ""], [None, None, None], ["alice", "bea", "rex"])
    assert boxes == [MIDDLE, None, None]
    assert len(notes) == 2 and "'bea'" in notes[0] and "'rex'" in notes[1] and "whole image" in notes[0]


def test_each_image_of_a_batch_looks_for_its_concepts_in_its_own_boxes():
    """Two women watching one word: in image 0 alice is boxed left, in image 1 right; the attention
    (the same in both) has a subject on each side."""
    maps = torch.zeros(2, 2, 8, 12)
    maps[:, :, 1:7, 0:4] = 1.0
    maps[:, :, 1:7, 8:12] = 0.9
    left, right = (0.0, 0.0, 0.4, 1.0), (0.6, 0.0, 0.4, 1.0)
    found = masks_from_maps(maps, [0, 0], image_boxes=[[left, right], [right, left]])
    assert found[0, 0][3, 1] == 1 and found[0, 0][:, 6:].sum() == 0 and found[0, 1][3, 10] == 1
    assert found[1, 0][3, 10] == 1 and found[1, 0][:, :6].sum() == 0 and found[1, 1][3, 1] == 1
    # without image boxes both images split the word alike (alice left)
    plain = masks_from_maps(maps, [0, 0])
    assert torch.equal(plain[0], plain[1]) and plain[1, 0][3, 1] == 1
