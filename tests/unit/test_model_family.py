"""Checkpoints whose UNet the engine cannot hook stop the job with a message naming the family."""

from types import SimpleNamespace

import pytest

from lib_mc.hosts import check_model_family
from lib_mc.job import JobError


@pytest.mark.parametrize("flag", ["is_sd1", "is_sd2", "is_sdxl"])
def test_sd_families_pass(flag):
    check_model_family(SimpleNamespace(**{flag: True}))


def test_sd3_is_named():
    with pytest.raises(JobError, match=r"model: SD3 checkpoints are not supported"):
        check_model_family(SimpleNamespace(is_sd1=False, is_sd2=False, is_sdxl=False, is_sd3=True))


def test_a_model_without_flags_is_named_by_its_class():
    class Flux:   # Forge's Flux engine sets every is_* flag False
        is_sd1 = is_sd2 = is_sdxl = is_sd3 = False
    with pytest.raises(JobError, match=r"FLUX checkpoints are not supported: .*SD1.5, SD2 and SDXL"):
        check_model_family(Flux())
