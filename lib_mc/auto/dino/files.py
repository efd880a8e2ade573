"""Where Grounding DINO checkpoints are, and the original checkpoint's config.

Two formats: a transformers folder (config.json with model_type "grounding-dino" and its weights)
and IDEA-Research's original .pth files, which sd-webui-segment-anything downloads into its
models/grounding-dino folder next to their config files (GroundingDINO_SwinT_OGC.py, ...).
"""

from __future__ import annotations

import ast
import json
import os

from ..sam import ModelFileError

ORIGINAL_FILES = ("groundingdino_swint_ogc.pth", "groundingdino_swinb_cogcoor.pth")
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
# the config file names the original repository and its users ship beside each checkpoint
CONFIG_FILES = {
    "groundingdino_swint_ogc.pth": ("GroundingDINO_SwinT_OGC.py", "GroundingDINO_SwinT_OGC.cfg.py"),
    "groundingdino_swinb_cogcoor.pth": ("GroundingDINO_SwinB.cfg.py", "GroundingDINO_SwinB_cfg.py"),
}
# GroundingDINO_SwinT_OGC.py, the released config (the parts that shape the model); SwinB differs
# only in its backbone
SWINT_OGC = dict(
    backbone="swin_T_224_1k", position_embedding="sine", pe_temperatureH=20, pe_temperatureW=20,
    return_interm_indices=[1, 2, 3], enc_layers=6, dec_layers=6, pre_norm=False, dim_feedforward=2048,
    hidden_dim=256, nheads=8, num_queries=900, query_dim=4, num_patterns=0, num_feature_levels=4,
    enc_n_points=4, dec_n_points=4, two_stage_type="standard", two_stage_bbox_embed_share=False,
    two_stage_class_embed_share=False, transformer_activation="relu", dec_pred_bbox_embed_share=True,
    embed_init_tgt=True, max_text_len=256, text_encoder_type="bert-base-uncased", use_text_enhancer=True,
    use_fusion_layer=True, use_text_cross_attention=True, sub_sentence_present=True,
)
BUILT_IN = {
    "groundingdino_swint_ogc.pth": SWINT_OGC,
    "groundingdino_swinb_cogcoor.pth": dict(SWINT_OGC, backbone="swin_B_384_22k"),
}


def is_hf_folder(path: str) -> bool:
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config) or not any(os.path.isfile(os.path.join(path, w)) for w in HF_WEIGHTS):
        return False
    try:
        with open(config, encoding="utf-8") as f:
            return json.load(f).get("model_type") == "grounding-dino"
    except (OSError, ValueError, AttributeError):
        return False


def _weights_size(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return max(os.path.getsize(os.path.join(path, w)) for w in HF_WEIGHTS if os.path.isfile(os.path.join(path, w)))


def find_checkpoint(folders) -> str | None:
    """The first folder holding a usable checkpoint wins; within it the smallest weights (Swin-T
    before Swin-B): the folder itself or a subfolder in transformers' format, or an original .pth."""
    for folder in folders:
        if not folder or not os.path.isdir(folder):
            continue
        candidates = [os.path.join(folder, f) for f in ORIGINAL_FILES if os.path.isfile(os.path.join(folder, f))]
        if is_hf_folder(folder):
            candidates.append(folder)
        candidates += [os.path.join(folder, d) for d in sorted(os.listdir(folder))
                       if is_hf_folder(os.path.join(folder, d))]
        if candidates:
            return min(candidates, key=_weights_size)
    return None


def missing_message(folders) -> str:
    where = ", ".join(str(f) for f in folders) or "(no folder given)"
    return (f"automatic regions: no Grounding DINO checkpoint in {where} (put {ORIGINAL_FILES[0]} or "
            f"{ORIGINAL_FILES[1]} there, as sd-webui-segment-anything does, or a transformers Grounding DINO "
            "folder such as grounding-dino-tiny): used the attention boxes")


def read_config_py(path: str) -> dict:
    """An original config file (plain `name = value` lines) read without running it."""
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), filename=path)
    except (OSError, SyntaxError, ValueError) as exc:
        raise ModelFileError(f"Grounding DINO config {path} could not be read: {exc}") from exc
    args = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                args[node.targets[0].id] = ast.literal_eval(node.value)
                continue
            except ValueError:
                pass
        raise ModelFileError(f"Grounding DINO config {path}, line {node.lineno}: only `name = value` lines "
                             "with plain values are read (as in GroundingDINO_SwinT_OGC.py)")
    return args


def config_file(path: str) -> str | None:
    """The original config beside a .pth: its known names for the released files, or <stem>.py."""
    folder, name = os.path.split(path)
    stem = os.path.splitext(name)[0]
    for candidate in CONFIG_FILES.get(name.lower(), ()) + (stem + ".py", stem + ".cfg.py"):
        if os.path.isfile(os.path.join(folder, candidate)):
            return os.path.join(folder, candidate)
    return None


def original_args(path: str) -> dict:
    """The original model's arguments for a .pth: from the config file beside it when there is one
    (what sd-webui-segment-anything keeps there), else the released config its file name implies."""
    found = config_file(path)
    if found is not None:
        return dict(SWINT_OGC, **read_config_py(found))
    name = os.path.basename(path).lower()
    if name in BUILT_IN:
        return dict(BUILT_IN[name])
    raise ModelFileError(f"Grounding DINO checkpoint {path}: cannot tell its config (the file name is not "
                         f"{' or '.join(ORIGINAL_FILES)} and no {os.path.splitext(os.path.basename(path))[0]}.py "
                         "config is beside it)")


def tokenizer_folders(path: str, extra=()) -> list[str]:
    """Folders that may hold the BERT tokenizer (vocab.txt) of an original .pth, in search order."""
    here = os.path.dirname(os.path.abspath(path))
    return [f for f in list(extra) + [here, os.path.join(here, "bert-base-uncased")] if f]
