import torch

from lib_mc.engine import CallImages
from lib_mc.hosts.cfg_calls import CondRows, context_key, unpack_cond


def test_cond_rows_in_one_batch_and_in_chunks():
    rows = CondRows()
    rows.begin(n_cond=2)
    assert rows.take(4) == CallImages((0, 1), (0, 1))        # batch_cond_uncond: [2 cond, 2 uncond]
    rows.begin(n_cond=2)
    assert [rows.take(2), rows.take(2)] == [CallImages((0, 1), ()), CallImages((), (0, 1))]  # cond, then uncond
    rows.begin(n_cond=3)
    assert [rows.take(2), rows.take(2), rows.take(2)] == [
        CallImages((0, 1), ()), CallImages((2,), (0,)), CallImages((), (1, 2))]
    rows.begin(n_cond=2)
    assert rows.take(2) == CallImages((0, 1), ())            # uncond skipped (NGMS)
    assert rows.calls == 4


def test_unpack_and_pack_sd1_and_sdxl_conditions():
    t, ic, v = torch.zeros(2, 77, 8), torch.zeros(2, 5, 1, 1), torch.zeros(2, 16)
    sd1 = {"c_crossattn": [t], "c_concat": [ic]}
    plain, pack = unpack_cond(sd1)
    assert plain["c_crossattn"] is t and context_key(plain) == "c_crossattn"
    assert pack(plain)["c_concat"][0] is ic and isinstance(pack(plain)["c_crossattn"], list)
    sdxl = {"crossattn": t, "vector": v, "c_concat": [ic]}
    plain, pack = unpack_cond(sdxl)
    assert context_key(plain) == "crossattn" and pack(plain)["vector"] is v
