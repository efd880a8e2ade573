"""Plan validation: one error type, a message naming the field."""

import pytest
import torch

from lib_mc.errors import PlanError
from lib_mc.lora import parse_network
from lib_mc.plan import build_plan

MASK = torch.ones(64, 64)
COND = torch.zeros(1, 8, 32)
NET = parse_network({"lora_unet_x.lora_down.weight": torch.zeros(2, 4),
                     "lora_unet_x.lora_up.weight": torch.zeros(4, 2)}, "net")


def concept(**over):
    item = dict(name="c", cond=COND, mask=MASK, loras=[(NET, 0.8)])
    item.update(over)
    return item


def test_a_good_plan_builds():
    plan = build_plan([concept(), concept(z=-1)], (64, 64), start_at=0.25, feather=2)
    assert plan.start_step(20) == 5
    assert plan.self_replay_until_step(20) == 8
    assert len(plan.concepts) == 2 and plan.concepts[0].loras[0].weight == 0.8
    # z = -1 puts the second concept behind the first
    assert plan.regions.latent[1].min() == 1


@pytest.mark.parametrize("concepts, options, field, problem", [
    ([], {}, "concepts", "is empty"),
    ("abc", {}, "concepts", "must be a list"),
    ([concept(loras=[(NET, "strong")])], {}, r"concepts\[0\].loras\[0\].weight", "must be a number"),
    ([concept(loras=[(NET, True)])], {}, r"concepts\[0\].loras\[0\].weight", "must be a number"),
    ([concept(loras=[("alice", 1.0)])], {}, r"concepts\[0\].loras\[0\]", "not a loaded LoRA"),
    ([concept(), concept(mask=torch.zeros(64, 64))], {}, r"concepts\[1\].mask", "all zero"),
    ([concept(mask=torch.ones(3, 64, 64))], {}, r"concepts\[0\].mask", "2-D"),
    ([concept(mask=None)], {}, r"concepts\[0\].mask", "missing"),
    ([concept(cond=None)], {}, r"concepts\[0\].cond", "non-empty mapping"),
    ([concept(z="front")], {}, r"concepts\[0\].z", "must be a number"),
    ([concept()], {"start_at": 1.5}, "start_at", r"must be in \[0, 1\]"),
    ([concept()], {"start_at": -0.1}, "start_at", r"must be in \[0, 1\]"),
    ([concept()], {"start_at": "0.3"}, "start_at", "must be a number"),
    ([concept()], {"self_attn_replay_until": 2}, "self_attn_replay_until", r"\[0, 1\]"),
    ([concept()], {"feather": -1}, "feather", ">= 0"),
    ([concept()], {"layout_replay": "yes"}, "layout_replay", "true or false"),
    ([concept()], {"max_rows_per_call": 0}, "max_rows_per_call", "positive integer"),
    ([concept()], {"colour": "red"}, "colour", "not an engine option"),
])
def test_bad_input_names_the_field(concepts, options, field, problem):
    with pytest.raises(PlanError, match=f"^{field}: .*{problem}"):
        build_plan(concepts, (64, 64), **options)


@pytest.mark.parametrize("size", [(0, 64), (64,), ("64", 64), (64.0, 64)])
def test_bad_image_size(size):
    with pytest.raises(PlanError, match="^image_size"):
        build_plan([concept()], size)
