"""Mask refinement during stage 2 from self-attention (Concept Conductor), on the real ldm UNet.

The class word's cross-attention is planted a little off the subject, and the decoder's
self-attention is planted so that the subject's cells attend to each other: refinement must
move the automatic mask onto the subject.
"""

import torch
from torch import nn

from lib_mc.auto.refine import kmeans, refine_masks
from lib_mc.engine import MultiConceptSession
from lib_mc.plan import build_plan
from planted import plant
from tinyhost import CFGHost, TinyLDM, count_unet_rows, make_unet, random_context, sample

IMAGE = (256, 256)   # latent 32 x 32; the refinement grid (latent / 4) is 8 x 8


class Together(nn.Module):
    """Adds strength * u to q (or k) at the subject's cells, in self-attention of one grid size."""

    def __init__(self, inner: nn.Linear, cells: torch.Tensor, strength: float = 40.0):
        super().__init__()
        self.inner, self.cells, self.strength = inner, cells, strength
        self.u = nn.functional.normalize(torch.randn(inner.out_features, generator=torch.Generator().manual_seed(3)), dim=0)

    def forward(self, x):
        out = self.inner(x)
        side = int(round(x.shape[1] ** 0.5))
        grid = nn.functional.adaptive_avg_pool2d(self.cells[None, None].float(), (side, side))[0, 0]
        out[:, grid.flatten() >= 0.5] += self.strength * self.u
        return out


def plant_self(unet, cells):
    for name, module in unet.named_modules():
        if name.endswith("attn1") and "output_blocks" in name:
            module.to_q = Together(module.to_q, cells)
            module.to_k = Together(module.to_k, cells)
    return unet


def box(top, left, bottom, right, size=32):
    mask = torch.zeros(size, size)
    mask[top:bottom, left:right] = 1
    return mask


def test_refinement_moves_an_off_mask_onto_the_subject_self_attention_groups():
    subject = box(8, 16, 24, 28)          # latent cells; at the 8x8 grid: rows 2-5, cols 4-6
    off = box(10, 8, 26, 20)              # the word's attention, shifted left and down
    unet = plant_self(plant(make_unet(), [2], [[off]]), subject)
    plan = build_plan([dict(name="auto", cond=random_context(3), auto_tokens=[2]),
                       dict(name="drawn", cond=random_context(4), mask=box(0, 0, 256, 40, size=256))],
                      IMAGE, start_at=0.34, refine_every=1, refine_until=0.7)
    host = CFGHost(TinyLDM(unet), random_context(1), random_context(2))
    session = MultiConceptSession(unet, plan)
    host.route = session.denoise
    with session.stage1():
        sample(host, "euler", steps=6, latent_hw=(32, 32))
    before = session.find_regions()[0, 0].clone()
    rows = count_unet_rows(unet)
    try:
        with session.stage2():
            sample(host, "euler", steps=6, latent_hw=(32, 32))
    finally:
        rows.remove()
    after = plan.found_masks[0, 0]
    target = nn.functional.adaptive_avg_pool2d(subject[None, None], after.shape)[0, 0] >= 0.5

    def iou(mask):
        mask = nn.functional.adaptive_avg_pool2d(mask[None, None].float(), after.shape)[0, 0] > 0.5
        return float((mask & target).sum()) / float((mask | target).sum())
    assert iou(after) > iou(before) and iou(after) >= 0.75
    assert rows.calls == 4   # refinement adds no UNet call: steps 2-5 blended, one call each
    assert session._refined_steps == {2, 3}   # from the start step until 70% of 6 steps
    # each refinement is a step of the save_layout sheet (1-based step numbers, as the WebUI counts)
    assert [label for label, _ in plan.mask_steps] == ["attention", "attention masks",
                                                       "refined at step 3", "refined at step 4"]
    assert torch.equal(plan.mask_steps[-1][1], plan.found_masks)


def test_refined_masks_grow_at_the_found_masks_resolution():
    subject = box(8, 16, 24, 28)
    unet = plant_self(plant(make_unet(), [2], [[box(10, 8, 26, 20)]]), subject)
    plan = build_plan([dict(name="auto", cond=random_context(3), auto_tokens=[2]),
                       dict(name="drawn", cond=random_context(4), mask=box(0, 0, 256, 40, size=256))],
                      IMAGE, start_at=0.34, refine_every=1, refine_until=0.7, auto_grow=8.0)   # 8 px = 1 latent cell
    host = CFGHost(TinyLDM(unet), random_context(1), random_context(2))
    session = MultiConceptSession(unet, plan)
    host.route = session.denoise
    with session.stage1():
        sample(host, "euler", steps=6, latent_hw=(32, 32))
    with session.stage2():
        sample(host, "euler", steps=6, latent_hw=(32, 32))
    refined = plan.mask_steps[-1][1][0, 0]
    assert plan.mask_steps[-1][0].startswith("refined") and refined.shape == (32, 32)
    # a segment of the 8 x 8 grid is made of 4 x 4 blocks; grown by one latent cell it is not
    blocks = nn.functional.interpolate(nn.functional.adaptive_max_pool2d(refined[None, None], 8), size=(32, 32))[0, 0]
    assert refined.sum() > 0 and not torch.equal(refined, blocks)
    ys, xs = refined.nonzero(as_tuple=True)
    assert (int(xs.min()) % 4, int(ys.min()) % 4) == (3, 3)   # one cell out of the block grid


def test_two_concepts_choosing_one_segment_keep_their_masks():
    attention = torch.eye(16)   # every cell its own... then k-means with 2 segments
    masks = torch.zeros(2, 4, 4)
    masks[0, :2] = 1
    masks[1, :2] = 1
    refined = refine_masks(attention, masks, k=2)
    assert torch.equal(refined, masks)


def test_kmeans_is_deterministic_and_separates_clear_groups():
    points = torch.cat([torch.randn(20, 3, generator=torch.Generator().manual_seed(0)) * 0.1,
                        torch.randn(20, 3, generator=torch.Generator().manual_seed(1)) * 0.1 + 5])
    labels = kmeans(points, 2)
    assert torch.equal(labels, kmeans(points, 2))
    assert len(set(labels[:20].tolist())) == 1 and len(set(labels[20:].tolist())) == 1 and labels[0] != labels[20]


def test_kmeans_with_fewer_distinct_rows_than_segments_does_not_fail():
    labels = kmeans(torch.ones(16, 16) / 16, 4)   # uniform attention: one segment
    assert labels.shape == (16,) and len(set(labels.tolist())) == 1


def test_a_contested_concept_keeps_its_mask_at_full_precision():
    """Both concepts want the one segment of uniform attention: each keeps its own found mask,
    pixel for pixel, not its blocky image at the refinement grid (latent / 4)."""
    plan = build_plan([dict(name="a", cond=random_context(3), auto_tokens=[2]),
                       dict(name="b", cond=random_context(4), auto_tokens=[5])], IMAGE, start_at=0.34)
    found = torch.stack([box(5, 3, 19, 13), box(7, 17, 27, 30)])[None]   # edges off the 4-cell grid
    plan.resolve_auto(found.clone())
    session = MultiConceptSession(make_unet(), plan)
    session._refine(torch.full((1, 64, 64), 1 / 64), step=3, images=(0,))
    assert torch.equal(plan.found_masks, found)
    assert plan.mask_steps[-1][0] == "refined at step 4"
