"""Automatic regions from the layout pass's cross-attention, on the real ldm UNet.

Attention is planted in the real CrossAttention modules: for each planted token, its key is
set to a direction u and the queries of the chosen latent cells get a large multiple of u, so
that token dominates those cells' attention in every cross-attention layer, through ldm's own
forward. The engine must find masks where the tokens were planted.
"""

import pytest
import torch

from lib_mc.auto.masks import masks_from_maps
from lib_mc.auto.tokens import assign_occurrences, find_word
from lib_mc.engine import MultiConceptSession
from lib_mc.errors import PlanError
from lib_mc.plan import build_plan
from planted import LATENT, cells, covers, plant
from tinyhost import CFGHost, TinyLDM, make_unet, random_context, sample

IMAGE = (128, 128)   # latent 16 x 16


def auto_plan(concepts, **options):
    return build_plan(concepts, IMAGE, start_at=0.5, **options)


def run_two_stages(unet, plan, batch=1, seed=0):
    host = CFGHost(TinyLDM(unet), random_context(1), random_context(2))
    session = MultiConceptSession(unet, plan)
    host.route = session.denoise
    with session.stage1():
        sample(host, "euler", steps=6, batch=batch, seed=seed)
    with session.stage2():
        out = sample(host, "euler", steps=6, batch=batch, seed=seed)
    return session, out


def two_words_after_layout_pass(box_a=None, **options):
    """Words A (token 2, left) and B (token 5, right) planted; concepts a and b watch them; the
    layout pass has run. Returns (plan, session, host) for a host's own steps after it (SAM)."""
    unet = plant(make_unet(), [2, 5], [[cells(3, 1, 13, 6), cells(2, 10, 12, 15)]])
    plan = auto_plan([dict(name="a", cond=random_context(3), auto_tokens=[2], auto_box=box_a),
                      dict(name="b", cond=random_context(4), auto_tokens=[5])], **options)
    host = CFGHost(TinyLDM(unet), random_context(1), random_context(2))
    session = MultiConceptSession(unet, plan)
    host.route = session.denoise
    with session.stage1():
        sample(host, "euler", steps=6)
    return plan, session, host


def test_planted_attention_gives_each_word_its_mask_and_different_masks_per_image():
    left, right = cells(3, 1, 13, 6), cells(2, 10, 12, 15)
    # image 0: word A (token 2) on the left, word B (token 5) on the right; image 1 the other way round
    unet = plant(make_unet(), [2, 5], [[left, right], [right, left]])
    plan = auto_plan([dict(name="a", cond=random_context(3), auto_tokens=[2]),
                      dict(name="b", cond=random_context(4), auto_tokens=[5])])
    session, _ = run_two_stages(unet, plan, batch=2)
    found = plan.found_masks
    assert found.shape == (2, 2, 16, 16)
    assert covers(found[0, 0], left) and covers(found[0, 1], right)
    assert covers(found[1, 0], right) and covers(found[1, 1], left)
    assert (found[0, 0] * found[0, 1]).sum() == 0
    # the blend uses each image's own masks: image 0's concept a sits left, image 1's right
    weights = plan.weights_for(torch.zeros(4, 4, 16, 16), [0, 1, 0, 1])
    assert weights.shape == (3, 4, 1, 16, 16)
    assert weights[1, 0, 0, 8, 3] == 1 and weights[1, 1, 0, 8, 12] == 1 and weights[1, 3, 0, 8, 12] == 1
    assert weights[1, 0, 0, 8, 12] == 0


def test_two_concepts_with_one_shared_word_get_two_different_subjects_left_to_right():
    left, right = cells(4, 1, 12, 5), cells(4, 11, 12, 15)
    unet = plant(make_unet(), [3], [[left + right]])
    plan = auto_plan([dict(name="man 1", cond=random_context(3), auto_tokens=[3], auto_group=0),
                      dict(name="man 2", cond=random_context(4), auto_tokens=[3], auto_group=0)])
    run_two_stages(unet, plan)
    first, second = plan.found_masks[0]
    assert (first * second).sum() == 0
    assert covers(first, left) and covers(second, right)


def test_drawn_and_automatic_concepts_mix_and_the_unet_is_left_unpatched():
    unet = plant(make_unet(), [4], [[cells(0, 0, 8, 8)]])
    drawn = torch.zeros(IMAGE)
    drawn[64:, 64:] = 1
    plan = auto_plan([dict(name="auto", cond=random_context(3), auto_tokens=[4]),
                      dict(name="drawn", cond=random_context(4), mask=drawn)])
    probe = torch.randn(1, 4, 16, 16)
    context = random_context(9)
    with torch.no_grad():
        before = unet(probe, torch.tensor([500]), context=context)
    run_two_stages(unet, plan)
    with torch.no_grad():
        after = unet(probe, torch.tensor([500]), context=context)
    assert torch.equal(before, after)
    weights = plan.image_regions[0].latent
    assert weights[1, 2, 2] == 1 and weights[2, 12, 12] == 1 and weights[1, 12, 12] == 0


def test_masks_from_maps_never_leaves_a_concept_empty():
    flat = torch.full((1, 2, 8, 8), 0.1)
    flat[0, 1, 2:5, 2:5] = 1.0   # concept 0 has no clear subject at all
    found = masks_from_maps(flat, [0, 1])
    assert found[0, 0].sum() > 0 and found[0, 1][3, 3] == 1
    assert (found[0, 0] * found[0, 1]).sum() == 0


def test_class_word_tokens_are_found_per_occurrence():
    #            a   man  and  a   man  on  a   beach      ("man" = one token 10)
    prompt = [49406, 1, 10, 2, 1, 10, 3, 1, 11, 49407]
    assert find_word(prompt, [10]) == [[2], [5]]
    assert find_word(prompt, [1, 11]) == [[7, 8]]
    assert find_word(prompt, [12]) == []
    picked = assign_occurrences(["man", "man", "beach"], {"man": [[2], [5]], "beach": [[7, 8]]})
    assert picked == [[2], [5], [7, 8]]
    assert assign_occurrences(["dog", "dog"], {"dog": [[4]]}) == [[4], [4]]


def test_bad_automatic_concepts_are_named():
    with pytest.raises(PlanError, match=r"concepts\[0\].auto_tokens"):
        build_plan([dict(cond=random_context(3), auto_tokens=[])], IMAGE)
    with pytest.raises(PlanError, match=r"concepts\[0\].mask: is missing"):
        build_plan([dict(cond=random_context(3))], IMAGE)


def test_hints_pick_the_part_of_a_shared_word():
    maps = torch.zeros(1, 2, 8, 12)   # two concepts watching one word: identical maps
    maps[0, :, 2:6, 0:2] = 1          # a small subject on the left
    maps[0, :, 1:7, 5:12] = 1         # a large one on the right
    plain = masks_from_maps(maps, [0, 0])
    assert plain[0, 0][3, 0] == 1 and plain[0, 1][3, 8] == 1            # list order: left to right
    hinted = masks_from_maps(maps, [0, 0], hints=["right", ""])
    assert hinted[0, 0][3, 8] == 1 and hinted[0, 1][3, 0] == 1
    largest = masks_from_maps(maps, [0, 0], hints=["", "largest"])
    assert largest[0, 1][3, 8] == 1 and largest[0, 0][3, 0] == 1


def test_the_never_empty_fallback_keeps_masks_disjoint():
    maps = torch.zeros(1, 2, 8, 8)
    maps[0, 0] = 1.0
    maps[0, 0, 0, 0] = 0.0            # concept 0 strong everywhere (a flat map but one cell)
    maps[0, 1, 7, 7] = 0.2            # concept 1: next to nothing
    found = masks_from_maps(maps, [0, 1])
    assert (found[0].sum(0) <= 1).all()
    assert found[0, 0].sum() > 0 and found[0, 1].sum() > 0


def test_auto_grow_widens_found_masks_by_image_pixels_and_every_step_is_kept():
    left, right = cells(3, 1, 13, 6), cells(2, 10, 12, 15)
    unet = plant(make_unet(), [2, 5], [[left, right]])
    concepts = [dict(name="a", cond=random_context(3), auto_tokens=[2]),
                dict(name="b", cond=random_context(4), auto_tokens=[5])]
    plain = auto_plan(concepts)
    run_two_stages(unet, plain)
    grown = auto_plan(concepts, auto_grow=16.0)   # 16 image px = 2 latent cells
    run_two_stages(unet, grown)
    before, after = plain.found_masks[0] > 0.5, grown.found_masks[0] > 0.5
    assert (after >= before).all() and (after.sum((1, 2)) > before.sum((1, 2))).all()
    assert (after[0] & after[1]).sum() == 0
    # a cell two rows above concept a's top edge is reached; three rows above is not
    top = int(before[0].float().sum(1).nonzero()[0])
    column = int(before[0][top].nonzero()[0])
    assert top >= 2 and after[0, top - 2, column] and (top < 3 or not after[0, top - 3, column])
    assert [label for label, _ in grown.mask_steps] == ["attention", "attention masks", "cleaned, grown +16 px"]
    assert [label for label, _ in plain.mask_steps] == ["attention", "attention masks"]
    maps = grown.mask_steps[0][1]
    assert maps.shape == (1, 2, 16, 16) and maps.min() >= 0 and maps.max() <= 1
    assert torch.equal(grown.mask_steps[-1][1], grown.found_masks)


def test_a_bad_auto_grow_is_named():
    with pytest.raises(PlanError, match="auto_grow"):
        auto_plan([dict(name="a", cond=random_context(3), auto_tokens=[2])], auto_grow="wide")


def test_sam_masks_from_the_host_are_a_step_of_their_own_and_grow_in_image_pixels():
    plan, session, host = two_words_after_layout_pass(auto_grow=4.0)
    attention = session.find_regions(finish=False)          # what a host's SAM starts from
    assert [label for label, _ in plan.mask_steps] == ["attention", "attention masks"]
    sam = torch.zeros(1, 2, *IMAGE)                         # SAM's image-resolution masks
    sam[0, 0, 30:90, 10:40] = 1
    sam[0, 1, 30:90, 80:110] = 1
    sam[0, 0, 50:55, 20:25] = 0                             # a hole SAM left
    final = session.finish_regions(sam, found_by="SAM")
    assert [label for label, _ in plan.mask_steps] == ["attention", "attention masks", "SAM", "cleaned, grown +4 px"]
    assert attention.shape[-2:] == (16, 16) and final.shape == (1, 2, *IMAGE)
    assert final[0, 0, 50:55, 20:25].min() == 1              # filled
    assert final[0, 0, 26, 25] == 1 and final[0, 0, 25, 25] == 0   # 4 px above the top edge (row 30), not 5
    assert torch.equal(plan.found_masks, final) and plan.image_regions is not None
    with session.stage2():                                  # the host found them: stage 2 keeps them
        sample(host, "euler", steps=6)
    assert torch.equal(plan.found_masks, final)


def test_a_drawn_box_keeps_an_automatic_concept_inside_it():
    maps = torch.zeros(1, 1, 8, 12)
    maps[0, 0, 1:7, 8:12] = 1.0       # the word's subject is on the right ...
    maps[0, 0, 2:6, 1:3] = 0.4        # ... a weaker one on the left, where the user boxed it
    free = masks_from_maps(maps, [0])
    boxed = masks_from_maps(maps, [0], boxes=[(0.0, 0.0, 0.5, 1.0)])
    assert free[0, 0][3, 10] == 1 and free[0, 0][3, 1] == 0
    assert boxed[0, 0][3, 1] == 1 and boxed[0, 0][:, 6:].sum() == 0


def test_boxes_split_a_shared_word_and_a_free_sibling_stays_out_of_them():
    maps = torch.zeros(1, 3, 8, 12)   # three concepts watching one word: identical maps
    maps[0, :, 1:7, 0:3] = 1.0
    maps[0, :, 1:7, 4:7] = 0.9
    maps[0, :, 1:7, 9:12] = 0.8
    # concept 0 boxed on the right, concept 2 boxed on the left (against list order), concept 1 free
    found = masks_from_maps(maps, [0, 0, 0], boxes=[(0.7, 0.0, 0.3, 1.0), None, (0.0, 0.0, 0.3, 1.0)])
    assert found[0, 0][3, 10] == 1 and found[0, 0][:, :8].sum() == 0
    assert found[0, 2][3, 1] == 1 and found[0, 2][:, 4:].sum() == 0
    assert found[0, 1][3, 5] == 1 and found[0, 1][:, :3].sum() == 0 and found[0, 1][:, 9:].sum() == 0
    assert (found[0].sum(0) <= 1).all()


def test_box_cells_take_the_cells_whose_centres_are_inside_and_never_none():
    from lib_mc.auto.masks import box_cells
    cells_in = box_cells((0.25, 0.5, 0.5, 0.5), (4, 8))
    assert cells_in.sum() == 2 * 4 and cells_in[2:, 2:6].all()
    tiny = box_cells((0.51, 0.51, 0.01, 0.01), (4, 8))
    assert tiny.sum() == 1 and tiny[2, 4]


def test_a_boxed_concept_never_leaves_its_box_whatever_sam_or_growing_say():
    plan, session, _ = two_words_after_layout_pass(box_a=(0.0, 0.0, 0.5, 1.0), auto_grow=16.0)
    session.find_regions(finish=False)
    sam = torch.zeros(1, 2, *IMAGE)
    sam[0, 0, 20:100, 10:90] = 1          # SAM reached past the box's right edge (x = 64)
    sam[0, 1, 20:100, 100:120] = 1
    final = session.finish_regions(sam, found_by="SAM")
    assert final[0, 0, :, 64:].sum() == 0 and final[0, 0, 50, 60] == 1
    assert final[0, 1, 5, 110] == 1 and final[0, 1, 50, 125] == 1   # the free concept grew as asked
    assert (final[0].sum(0) <= 1).all()
    nothing_inside = torch.zeros(1, 2, *IMAGE)
    nothing_inside[0, 0, 20:100, 70:90] = 1   # SAM found it only outside the box: the box it is
    nothing_inside[0, 1, 20:100, 100:120] = 1
    plan.options.auto_grow = 0.0
    final = session.finish_regions(nothing_inside, found_by="SAM")
    assert final[0, 0, :, :64].min() == 1 and final[0, 0, :, 64:].sum() == 0


def test_overlapping_boxes_of_one_word_split_the_overlap_by_nearest_box():
    maps = torch.zeros(1, 2, 8, 12)   # "two men", both boxed; the boxes overlap in columns 4-7
    maps[0, :, 1:7, 2:6] = 0.9        # the left man, a little weaker, half in the overlap
    maps[0, :, 1:7, 6:11] = 1.0       # the right man, his left side in the overlap
    found = masks_from_maps(maps, [0, 0], boxes=[(0.0, 0.0, 0.7, 1.0), (0.3, 0.0, 0.7, 1.0)])
    assert found[0, 0][3, 2:6].min() == 1 and found[0, 0][:, 6:].sum() == 0
    assert found[0, 1][3, 6:11].min() == 1 and found[0, 1][:, :6].sum() == 0


def test_the_attention_floor_inside_a_box_is_not_taken_for_the_subject():
    maps = torch.full((1, 1, 8, 12), 0.3)   # a floor everywhere
    maps[0, 0, 1:7, 8:12] = 1.0             # the strong subject outside the box
    maps[0, 0, 3:6, 1:5] = 0.55             # a weaker one inside it
    found = masks_from_maps(maps, [0], boxes=[(0.0, 0.0, 0.5, 1.0)])[0, 0]
    assert found[3:6, 1:5].min() == 1 and found.sum() == 12


def test_a_concept_left_with_nothing_takes_a_cell_only_from_a_holder_that_keeps_others():
    maps = torch.zeros(1, 3, 4, 4)
    maps[0, 0, 0, 0] = 1.0                  # concept 0: one cell, its whole box
    maps[0, 1] = 0.1                        # concept 1: flat (no subject), boxed to cells (0,0) and (0,1)
    maps[0, 2, :, 1:] = 1.0                 # concept 2: columns 1-3 but one cell
    maps[0, 2, 3, 3] = 0.0
    boxes = [(0.0, 0.0, 0.25, 0.25), (0.0, 0.0, 0.5, 0.25), (0.25, 0.0, 0.75, 1.0)]
    found = masks_from_maps(maps, [0, 1, 2], boxes=boxes)[0]
    assert (found.sum((1, 2)) > 0).all() and (found.sum(0) <= 1).all()
    assert found[0, 0, 0] == 1 and found[1, 0, 1] == 1


def test_class_word_positions_per_image_when_the_batchs_prompts_differ():
    """Wildcards put the words elsewhere in image 1's prompt: its masks follow its own positions."""
    left, right = cells(3, 1, 13, 6), cells(2, 10, 12, 15)
    unet = plant(make_unet(), [2, 5], [[left, right], [right, left]])
    plan = auto_plan([dict(name="a", cond=random_context(3), auto_tokens=[2], auto_tokens_per_image=[[2], [5]]),
                      dict(name="b", cond=random_context(4), auto_tokens=[5], auto_tokens_per_image=[[5], [2]])])
    run_two_stages(unet, plan, batch=2)
    found = plan.found_masks
    assert covers(found[0, 0], left) and covers(found[1, 0], left)
    assert covers(found[0, 1], right) and covers(found[1, 1], right)


def test_boxes_found_per_image_guide_the_masks_and_are_a_step_of_their_own():
    """The host's Grounding DINO boxes (per image) limit where each concept is looked for; the
    save_layout sheet shows them as a step. a's word is planted on the left: boxed right, it is
    found in its box's strongest cells; the drawn box of the plan is not touched."""
    plan, session, _ = two_words_after_layout_pass()
    found = session.find_regions(finish=False, image_boxes=[[(0.5, 0.0, 0.5, 1.0), None]])
    assert found[0, 0][:, :8].sum() == 0 and found[0, 0].sum() > 0
    labels = [label for label, _ in plan.mask_steps]
    assert labels == ["attention", "DINO boxes", "attention masks"]   # a short label: sheets of 128 px panels
    boxes = plan.mask_steps[1][1]
    assert boxes.shape == (1, 2, 16, 16) and boxes[0, 0][:, 8:].min() == 1 and boxes[0, 1].sum() == 0
    assert plan.concepts[0].auto_box is None
