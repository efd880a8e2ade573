# vendored: `from .encoders.modules import GeneralConditioner` trimmed (text encoders not vendored)

UNCONDITIONAL_CONFIG = {
    "target": "sgm.modules.GeneralConditioner",
    "params": {"emb_models": []},
}
