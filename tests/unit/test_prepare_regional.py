"""Job -> Plan for regional mode: the mode's start defaults, its options into the plan, the
class-word positions re-initialisation and enhancement read."""

import pytest

from test_prepare import Services, job, run
from tinyhost import make_unet

LEFT = {"type": "rect", "x": 0, "y": 0, "w": 0.5, "h": 1}
RIGHT = {"type": "rect", "x": 0.5, "y": 0, "w": 0.5, "h": 1}


@pytest.fixture(scope="module")
def unet():
    return make_unet()


def concepts():
    return ({"name": "him", "class_word": "man", "prompt": "photo of alice man", "region": LEFT},
            {"name": "her", "class_word": "woman", "region": RIGHT},
            {"name": "dog", "class_word": "dog", "region": RIGHT})


def test_regional_drawn_regions_start_at_the_first_step_and_blend_keeps_its_default(unet):
    regional, _ = run(unet, Services({}), job(*concepts()[:2], mode="regional"))
    blend, _ = run(unet, Services({}), job(*concepts()[:2]))
    later, _ = run(unet, Services({}), job(*concepts()[:2], mode="regional", start_at=0.2))
    assert (regional.plan.options.start_at, blend.plan.options.start_at, later.plan.options.start_at) == (0.0, 0.3, 0.2)


def test_regional_with_an_automatic_region_starts_when_it_is_found(unet):
    auto = {"name": "him", "class_word": "man", "region": {"type": "auto"}}
    prepared, _ = run(unet, Services({}), job(auto, concepts()[1], mode="regional"))
    assert prepared.plan.options.start_at == 0.3


def test_regional_options_reach_the_plan(unet):
    prepared, _ = run(unet, Services({}), job(*concepts()[:2], mode="regional", isolation=False,
                                              isolation_until=0.4, reinit=True))
    o = prepared.plan.options
    assert (o.isolation, o.isolation_until, o.reinit) == (False, 0.4, True)


def test_reinit_reads_each_drawn_concepts_class_word_in_the_main_prompt(unet):
    """'a man and a woman on a beach': man at 2, woman at 5 (one token per word after the start);
    a class word missing from the main prompt leaves that concept's noise, with a warning."""
    prepared, messages = run(unet, Services({}), job(*concepts(), mode="regional", reinit=True))
    assert [c.class_tokens for c in prepared.plan.concepts] == [[2], [5], None]
    assert any("'dog' keeps its noise" in w for w in prepared.warnings)
    off, _ = run(unet, Services({}), job(*concepts(), mode="regional"))
    assert [c.class_tokens for c in off.plan.concepts] == [None, None, None]


def test_enhancement_reads_each_concepts_class_word_in_its_own_prompt(unet):
    """concept 1's own prompt 'photo of alice man': man at 4; concept 2 has none: the main
    prompt's, woman at 5; concept 3's dog is in neither: not guided, with a warning."""
    prepared, _ = run(unet, Services({}), job(*concepts(), mode="regional", enhance=True))
    assert prepared.plan.options.enhance
    assert [c.own_class_tokens for c in prepared.plan.concepts] == [[4], [5], None]
    assert any("'dog' is not guided" in w for w in prepared.warnings)
