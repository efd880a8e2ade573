"""Conductor mode's mask refinement (Concept Conductor) on the real ldm UNet with kohya LoRAs.

Self-attention is planted in the refinement layer only (output_blocks.5.1 of the tiny UNet, the
place of SD1.5's output_blocks.8.1): the cells of each subject attend to each other, the rest to
the rest. Refinement must turn each drawn box into its subject's shape, from that layer, with
k-means at k = N + 1 .. 2N + 1, at the paper's steps, and the masks must reach the next calls,
the hires fix plan and the save_layout steps.
"""

import pytest
import torch
from k_diffusion.external import CompVisDenoiser

from lib_mc.engine import make_session
from lib_mc.methods.conductor import refine as refine_module
from lib_mc.methods.conductor.layers import decoder_attention, refinement_layer
from lib_mc.methods.conductor.refine import (apply, at_grid, cluster_counts, head_mean_probabilities, refine_image,
                                             refinement_steps, segments)
from lib_mc.methods.calls import CallImages
from lib_mc.plan import build_plan
from tinyhost import CFGHost, count_unet_rows, sample, two_lora_world

IMAGE = (128, 128)   # latent 16 x 16; the refinement layer's grid is 8 x 8 (16 px cells)
GRID = (8, 8)


def grid_cells(top, left, bottom, right):
    mask = torch.zeros(GRID, dtype=torch.bool)
    mask[top:bottom, left:right] = True
    return mask


SUBJECT_A = grid_cells(2, 1, 6, 4)    # 4 x 3 cells
SUBJECT_B = grid_cells(2, 5, 7, 8)    # 5 x 3 cells


def pixels(cells):
    """Grid cells -> an image-size mask (16 px per cell)."""
    return cells.float().repeat_interleave(16, 0).repeat_interleave(16, 1)


BOX_A = pixels(grid_cells(2, 0, 6, 4))   # a box around subject A: one column more (IoU 0.75)
BOX_B = pixels(grid_cells(1, 5, 7, 8))   # a box around subject B: one row more (IoU 0.83)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return two_lora_world(tmp_path_factory.mktemp("loras"))


def planted_vectors(module, groups, strength=30.0):
    """(64, inner): strength * u_g at the cells of group g (each subject, and the rest as one
    more group), u_g orthonormal."""
    inner = module.to_q.out_features
    basis = torch.linalg.qr(torch.randn(inner, len(groups) + 1, generator=torch.Generator().manual_seed(5)))[0]
    labels = torch.full(GRID, len(groups))
    for g, cells in enumerate(groups):
        labels[cells] = g
    return strength * basis.T[labels.flatten()]


class Planted:
    """Forward hooks on one attention module's to_q and to_k adding `planted_vectors`, every row."""

    def __init__(self, module, groups):
        self.add = planted_vectors(module, groups)
        self.handles = [m.register_forward_hook(self._hook) for m in (module.to_q, module.to_k)]

    def _hook(self, module, args, out):
        assert out.shape[1] == self.add.shape[0], "planted layer is not at the 8 x 8 grid"
        return out + self.add.to(out.dtype)

    def remove(self):
        for handle in self.handles:
            handle.remove()


class PlantedByBranch(Planted):
    """Planted with other groups in the base rows of the call in flight."""

    def __init__(self, module, base_groups, groups, session):
        self.base_add, self.session = planted_vectors(module, base_groups), session
        super().__init__(module, groups)

    def _hook(self, module, args, out):
        out = super()._hook(module, args, out)
        rows = self.session.run.call.rows.find("base").rows
        out[rows] += (self.base_add - self.add).to(out.dtype)
        return out


@pytest.fixture
def planted(world):
    plant = Planted(refinement_layer(world["unet"])[1], [SUBJECT_A, SUBJECT_B])
    yield plant
    plant.remove()


def concepts(world):
    return [dict(name="alice", cond=world["alice_cond"], loras=[(world["alice"], 0.8)], mask=BOX_A),
            dict(name="bob", cond=world["bob_cond"], loras=[(world["bob"], 1.0)], mask=BOX_B)]


def plan_of(world, **options):
    return build_plan(concepts(world), IMAGE, **{"start_at": 0.0, **options})


def unpatched(unet):
    return not [n for n, m in unet.named_modules() if "forward" in vars(m)]


class KMeansSpy:
    """Records the k of every k-means the refinement runs."""

    def __init__(self, monkeypatch):
        self.ks: list[int] = []
        original = refine_module.kmeans

        def spy(features, k, *args, **kwargs):
            self.ks.append(k)
            return original(features, k, *args, **kwargs)
        monkeypatch.setattr(refine_module, "kmeans", spy)


class WatchedLayers:
    """Which decoder self-attention layers the session watches while they run, by step."""

    def __init__(self, world, session, host):
        self.seen: dict[int, set[str]] = {}
        self.handles = [module.register_forward_pre_hook(
            lambda m, args, name=name: self.seen.setdefault(host.step, set()).add(name)
            if m in session._watchers else None)
            for module, name in decoder_attention(world["unet"]).items() if name.endswith("attn1")]

    def remove(self):
        for handle in self.handles:
            handle.remove()


def run(world, plan, steps=6, watch=False):
    session = make_session("conductor", world["unet"], plan)
    host = CFGHost(world["ldm"], world["cond"], world["uncond"])
    host.route = session.denoise
    watched = WatchedLayers(world, session, host) if watch else None
    try:
        with session.single_pass():
            out = sample(host, steps=steps)
    finally:
        if watched is not None:
            watched.remove()
    return out, session, watched


def as_latent(cells):
    return cells.float().repeat_interleave(2, 0).repeat_interleave(2, 1)   # grid 8 -> latent 16


# ---- on the real UNet ------------------------------------------------------------------------

def test_refinement_turns_each_box_into_its_subjects_shape_from_the_papers_layer(world, planted, monkeypatch):
    spy = KMeansSpy(monkeypatch)
    plan = plan_of(world)
    _, session, watched = run(world, plan, steps=6, watch=True)
    assert unpatched(world["unet"]) and not session._watchers
    # 6 steps: refinement at step 2 only (round(0.25 * 6) .. round(0.4 * 6), every max(1, round(0.15)))
    assert watched.seen == {2: {refinement_layer(world["unet"])[0]}}
    assert refinement_layer(world["unet"])[0] == "output_blocks.5.1.transformer_blocks.0.attn1"
    # k from N + 1 to 2N + 1 (N = 2) for the base branch and each concept's branch
    assert sorted(spy.ks) == [3, 3, 3, 4, 4, 4, 5, 5, 5]
    assert plan.concept_masks.shape == (1, 2, 16, 16)
    assert torch.equal(plan.concept_masks[0, 0], as_latent(SUBJECT_A))
    assert torch.equal(plan.concept_masks[0, 1], as_latent(SUBJECT_B))
    # the regions the later calls use are the refined ones
    assert torch.equal(plan.image_regions[0].latent[1] > 0.5, as_latent(SUBJECT_A) > 0)
    assert torch.equal(plan.image_regions[0].latent[2] > 0.5, as_latent(SUBJECT_B) > 0)


def test_the_new_mask_is_the_union_of_the_base_branchs_segment_and_the_concept_branchs(world):
    """The base rows see the subjects' top halves as groups, the concept rows their bottom
    halves: each concept's refined mask is its whole subject."""
    top = lambda cells: cells & grid_cells(0, 0, 4, 8)      # noqa: E731  grid rows 2-3 of each subject
    bottom = lambda cells: cells & grid_cells(4, 0, 8, 8)   # noqa: E731
    plan = plan_of(world)
    session = make_session("conductor", world["unet"], plan)
    plant = PlantedByBranch(refinement_layer(world["unet"])[1], [top(SUBJECT_A), top(SUBJECT_B)],
                            [bottom(SUBJECT_A), bottom(SUBJECT_B)], session)
    host = CFGHost(world["ldm"], world["cond"], world["uncond"])
    host.route = session.denoise
    try:
        with session.single_pass():
            sample(host, steps=6)
    finally:
        plant.remove()
    assert torch.equal(plan.concept_masks[0, 0], as_latent(SUBJECT_A))
    assert torch.equal(plan.concept_masks[0, 1], as_latent(SUBJECT_B))


def test_a_fixed_k_and_the_schedule_at_20_steps(world, planted, monkeypatch):
    spy = KMeansSpy(monkeypatch)
    plan = plan_of(world, mask_refine_k=4)
    _, session, watched = run(world, plan, steps=20, watch=True)
    assert sorted(watched.seen) == [5, 6, 7, 8]   # 25% to 40% of 20 steps, every step
    assert sorted({s for s, _ in session._refined_steps}) == [5, 6, 7, 8]
    assert spy.ks == [4] * 3 * 4                   # base, alice, bob at 4 steps
    assert torch.equal(plan.concept_masks[0, 0], as_latent(SUBJECT_A))


def test_refinement_off_changes_nothing_and_is_bit_identical_to_refinement_never_due(world, planted):
    off_plan = plan_of(world, mask_refine=False)
    off, off_session, _ = run(world, off_plan)
    never_plan = plan_of(world, mask_refine_from=1.0, mask_refine_until=1.0)
    never, never_session, _ = run(world, never_plan)
    assert torch.equal(off, never)
    for plan, session in ((off_plan, off_session), (never_plan, never_session)):
        assert plan.concept_masks is None and plan.image_regions is None and not session._refined_steps
        assert torch.equal(plan.regions.latent[1] > 0.5, as_latent(grid_cells(2, 0, 6, 4)) > 0)   # the drawn box
    refined, _, _ = run(world, plan_of(world))
    assert (refined - off).abs().max() > 1e-4   # refinement, when on, changes the image


def call_inputs(world, seed=5):
    x = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(seed)) * 3
    return x, torch.full((1,), 3.0)


def test_split_host_calls_refine_once_per_step_and_the_masks_act_from_the_next_call(world, planted, monkeypatch):
    """A host that calls uncond and cond apart: only the cond call refines, once per step; that
    call itself still uses the old masks (bit-identical to no refinement), the next one the new."""
    spy = KMeansSpy(monkeypatch)
    denoiser = CompVisDenoiser(world["ldm"])
    model_fn = lambda xx, ss, cc: denoiser(xx, ss, cond=cc)   # noqa: E731
    x, sigma = call_inputs(world)
    cond = {"c_crossattn": world["cond"]}
    uncond = {"c_crossattn": world["uncond"]}

    def calls(plan):
        session = make_session("conductor", world["unet"], plan)
        outs = []
        with torch.no_grad(), session.single_pass():
            for step in (1, 2, 2, 2, 3):   # at 10 steps, step 2 refines (round(2.5) = 2 .. 4, every 1)
                outs.append(session.denoise(model_fn, x, sigma, uncond, n_cond=0, step=step, total_steps=10,
                                            images=CallImages((), (0,))))
                outs.append(session.denoise(model_fn, x, sigma, cond, n_cond=1, step=step, total_steps=10,
                                            images=CallImages((0,), ())))
        return outs, session
    plan = plan_of(world, mask_refine_until=0.2)   # 10 steps: refinement at step 2 only
    refined, session = calls(plan)
    assert session._refined_steps == {(2, 0)}
    assert len(spy.ks) == 3 * 3   # one refinement: base, alice and bob, k = 3, 4, 5
    assert torch.equal(plan.concept_masks[0, 0], as_latent(SUBJECT_A))
    plain, _ = calls(plan_of(world, mask_refine=False))
    for i in range(4):   # steps 1 and the first step-2 calls (uncond, then the refining cond call)
        assert torch.equal(refined[i], plain[i]), i
    assert (refined[5] - plain[5]).abs().max() > 1e-4   # the next call: the refined masks


def test_the_row_cap_and_a_batch_refine_each_image_as_one_call_does(world, planted):
    batch = 2
    x = torch.randn((batch, 4, 16, 16), generator=torch.Generator().manual_seed(3)) * 3
    sigma = torch.full((2 * batch,), 3.0)
    denoiser = CompVisDenoiser(world["ldm"])
    cond = {"c_crossattn": torch.cat([world["cond"].expand(batch, -1, -1), world["uncond"].expand(batch, -1, -1)])}
    results = []
    for cap in (None, 4):   # 4 rows: alice's call, bob's call, then the base rows'
        plan = plan_of(world, max_rows_per_call=cap)
        session = make_session("conductor", world["unet"], plan)
        counter = count_unet_rows(world["unet"])
        try:
            with torch.no_grad(), session.single_pass():
                session.denoise(lambda xx, ss, cc: denoiser(xx, ss, cond=cc), torch.cat([x, x]), sigma, cond,
                                n_cond=batch, step=0, total_steps=1)
        finally:
            counter.remove()
        assert counter.calls == (1 if cap is None else 3)
        results.append(plan.concept_masks)
    assert results[0].shape == (2, 2, 16, 16)
    for b in range(batch):
        assert torch.equal(results[0][b, 0], as_latent(SUBJECT_A)) and torch.equal(results[0][b, 1], as_latent(SUBJECT_B))
    assert torch.equal(results[0], results[1])


def test_the_hires_plan_carries_the_refined_masks(world, planted):
    plan = plan_of(world)
    run(world, plan)
    hires = plan.at_size((256, 256))   # latent 32 x 32
    assert not hires.options.mask_refine
    up = lambda cells: cells.float().repeat_interleave(4, 0).repeat_interleave(4, 1) > 0   # noqa: E731
    assert torch.equal(hires.regions.latent[1] > 0.5, up(SUBJECT_A))
    assert torch.equal(hires.regions.latent[2] > 0.5, up(SUBJECT_B))


def test_an_automatic_concept_is_refined_into_its_found_masks_the_layout_steps_and_its_box(world, planted):
    box = (0.0, 0.0, 0.25, 1.0)   # "auto in rectangle": the left quarter, cells 0-1 of the grid
    auto = dict(name="alice", cond=world["alice_cond"], loras=[(world["alice"], 0.8)], auto_tokens=[2], auto_box=box)
    plan = build_plan([auto, concepts(world)[1]], IMAGE, start_at=0.3)   # 6 steps: found at step 2, refined there
    run(world, plan)
    assert [label for label, _ in plan.mask_steps][-1] == "refined at step 3"
    assert torch.equal(plan.mask_steps[-1][1], plan.found_masks)
    assert torch.equal(plan.found_masks[:, 0], plan.concept_masks[:, 0])
    inside = torch.zeros(16, 16)
    inside[:, :4] = 1
    refined = plan.found_masks[0, 0]
    assert refined.sum() > 0 and (refined * (1 - inside)).sum() == 0   # never leaves its box
    assert torch.equal(plan.concept_masks[0, 1], as_latent(SUBJECT_B))


def test_forge_attention_path_refines_as_a1111(world, planted):
    from test_forge_routing import forge_regional
    x, sigma = call_inputs(world)
    forge_plan = plan_of(world)
    forge_regional(world, forge_plan, x, sigma, split=True, mode="conductor")   # step 0 of 1 is due
    assert torch.equal(forge_plan.concept_masks[0, 0], as_latent(SUBJECT_A))
    assert torch.equal(forge_plan.concept_masks[0, 1], as_latent(SUBJECT_B))


# ---- the pure functions ----------------------------------------------------------------------

def test_the_schedule_and_k_are_the_papers():
    assert refinement_steps(200, 0.25, 0.4, 0.025) == [50, 55, 60, 65, 70, 75, 80]
    assert refinement_steps(20, 0.25, 0.4, 0.025) == [5, 6, 7, 8]
    assert refinement_steps(40, 0.25, 0.4, 0.025) == [10, 11, 12, 13, 14, 15, 16]
    assert refinement_steps(6, 1.0, 1.0, 0.025) == []
    assert cluster_counts(2) == [3, 4, 5] and cluster_counts(1) == [2, 3] and cluster_counts(3, 4) == [4]


def test_head_averaged_probabilities():
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(6, 8, generator=gen), torch.randn(6, 8, generator=gen)
    expected = torch.stack([(q[:, h * 4:(h + 1) * 4] @ k[:, h * 4:(h + 1) * 4].T / 2).softmax(-1) for h in range(2)]).mean(0)
    torch.testing.assert_close(head_mean_probabilities(q, k, 2), expected)


def test_segments_pool_every_k():
    """Two kinds of rows (each attends to its own half): k = 2 finds the halves; k = 3 finds no
    third segment in two distinct rows; the segments of both are pooled."""
    left = torch.zeros(4, 4, dtype=torch.bool)
    left[:, :2] = True
    flat = left.flatten()
    probs = torch.where(flat[:, None] == flat[None, :], 1 / 8, 0.0)
    found = segments(probs, (4, 4), [2, 3])
    assert found.dtype == torch.bool and found.shape == (4, 4, 4)
    assert sum(torch.equal(s, left) for s in found) == 2 and sum(torch.equal(s, ~left) for s in found) == 2


def test_the_union_of_the_base_and_the_branch_segment():
    top, bottom = grid_cells(2, 1, 4, 4), grid_cells(4, 1, 6, 4)
    rest = ~(top | bottom)
    base = torch.stack([top, bottom | rest])       # the base branch sees the subject's top
    own = torch.stack([bottom, top | rest])        # the concept's branch its bottom
    old = grid_cells(2, 0, 6, 4)[None]
    new, overlap = refine_image(base, [own], old)
    assert torch.equal(new[0], SUBJECT_A) and not overlap.any()


def test_overlapping_new_masks_keep_the_old_masks_there():
    a_new, b_new = grid_cells(0, 0, 4, 5), grid_cells(0, 3, 4, 8)   # overlap: columns 3-4
    rest = ~(a_new | b_new)
    segs = torch.stack([a_new, b_new, rest])
    old = torch.stack([grid_cells(0, 0, 4, 3), grid_cells(0, 4, 4, 8)])
    new, overlap = refine_image(segs, [segs, segs], old)
    assert torch.equal(overlap, a_new & b_new)
    assert torch.equal(new[0], grid_cells(0, 0, 4, 3))             # its own old cells there: none of 3-4
    assert torch.equal(new[1], grid_cells(0, 4, 4, 8))             # its old column 4, not column 3
    # two concepts picking the same segment overlap on all of it: both keep their old masks
    both = grid_cells(0, 0, 4, 8)
    same, overlap = refine_image(torch.stack([both, ~both]), [torch.stack([both, ~both])] * 2, old)
    assert torch.equal(same, old) and torch.equal(overlap, both)


def test_back_at_latent_size_the_old_mask_is_kept_pixel_for_pixel_at_overlaps():
    old = torch.zeros(1, 16, 16)
    old[0, 3:9, 1:7] = 0.5   # soft and off the grid's 2-cell blocks
    new = grid_cells(0, 0, 2, 2)[None]
    overlap = grid_cells(1, 0, 8, 8)
    out = apply(old, new, overlap)
    assert torch.equal(out[0, :2, :4], torch.ones(2, 4))      # new cells, upsampled
    assert torch.equal(out[0, 2:], old[0, 2:])                # the old mask where it is kept
    # a coverage of 0.5 fills no grid cell by more than half: the mask takes every cell it touches
    assert torch.equal(at_grid(old, GRID)[0], torch.nn.functional.adaptive_avg_pool2d(old, GRID)[0] > 0)
