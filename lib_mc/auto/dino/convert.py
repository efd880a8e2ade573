"""IDEA-Research's original Grounding DINO checkpoint -> transformers' GroundingDinoForObjectDetection.

Our own mapping, written from the two model codes (groundingdino-py 0.4.0 and transformers 4.46):
the module paths are renamed, fused attention projections (Swin's `qkv`, nn.MultiheadAttention's
`in_proj_*`) are split into query/key/value, and what the detector does not use is dropped.
"""

from __future__ import annotations

import re

from ..sam import ModelFileError

# Swin variants of the original builder: embed_dim, depths, num_heads, window_size, pretrain size
SWIN = {
    "swin_T_224_1k": (96, [2, 2, 6, 2], [3, 6, 12, 24], 7, 224),
    "swin_B_224_22k": (128, [2, 2, 18, 2], [4, 8, 16, 32], 7, 224),
    "swin_B_384_22k": (128, [2, 2, 18, 2], [4, 8, 16, 32], 12, 384),
    "swin_L_224_22k": (192, [2, 2, 18, 2], [6, 12, 24, 48], 7, 224),
    "swin_L_384_22k": (192, [2, 2, 18, 2], [6, 12, 24, 48], 12, 384),
}
# what the transformers model implements; other original options change the architecture
REQUIRED = dict(two_stage_type="standard", use_text_enhancer=True, use_fusion_layer=True,
                use_text_cross_attention=True, sub_sentence_present=True, query_dim=4, num_patterns=0,
                pre_norm=False, position_embedding="sine", two_stage_class_embed_share=False)

QKV = "{qkv}"   # marks a fused projection split into query, key, value
SW = "model.backbone.conv_encoder.model."
# (original key prefix as a regex, new prefix, {original sub-prefix: new sub-prefix}); the sub-table
# covers everything after the prefix ("" keeps the rest as is)
RULES = [
    (r"backbone\.0\.patch_embed\.proj\.", SW + "embeddings.patch_embeddings.projection.", {"": ""}),
    (r"backbone\.0\.patch_embed\.norm\.", SW + "embeddings.norm.", {"": ""}),
    (r"backbone\.0\.layers\.(\d+)\.downsample\.", SW + r"encoder.layers.\1.downsample.", {"": ""}),
    (r"backbone\.0\.layers\.(\d+)\.blocks\.(\d+)\.", SW + r"encoder.layers.\1.blocks.\2.", {
        "norm1.": "layernorm_before.", "norm2.": "layernorm_after.",
        "attn.qkv.": "attention.self." + QKV + ".", "attn.proj.": "attention.output.dense.",
        "attn.relative_position_bias_table": "attention.self.relative_position_bias_table",
        "attn.relative_position_index": "attention.self.relative_position_index",
        "mlp.fc1.": "intermediate.dense.", "mlp.fc2.": "output.dense."}),
    # original norm{i} follows Swin stage i (0-based); transformers counts the stem as stage 0
    (r"backbone\.0\.norm(\d)\.", lambda m: f"{SW}hidden_states_norms.stage{int(m.group(1)) + 1}.", {"": ""}),
    # dropped: BERT's pooler; the training-only denoising label embedding and the position ids
    # older transformers saved (both in the released .pth files: GroundingDINO issue 271)
    (r"bert\.pooler\.", None, {}),
    (r"label_enc\.", None, {}),
    (r"bert\.embeddings\.position_ids$", None, {}),
    (r"bert\.", "model.text_backbone.", {"": ""}),
    (r"feat_map\.", "model.text_projection.", {"": ""}),
    (r"input_proj\.", "model.input_proj_vision.", {"": ""}),
    (r"bbox_embed\.", "bbox_embed.", {"": ""}),
    (r"transformer\.level_embed", "model.level_embed", {"": ""}),
    (r"transformer\.tgt_embed\.", "model.query_position_embeddings.", {"": ""}),
    (r"transformer\.enc_output", "model.enc_output", {"": ""}),
    (r"transformer\.enc_out_bbox_embed\.", "model.encoder_output_bbox_embed.", {"": ""}),
    (r"transformer\.encoder\.layers\.(\d+)\.", r"model.encoder.layers.\1.deformable_layer.", {
        "self_attn.": "self_attn.", "norm1.": "self_attn_layer_norm.", "linear1.": "fc1.",
        "linear2.": "fc2.", "norm2.": "final_layer_norm."}),
    (r"transformer\.encoder\.text_layers\.(\d+)\.", r"model.encoder.layers.\1.text_enhancer_layer.", {
        "self_attn.in_proj_": "self_attn." + QKV + ".", "self_attn.out_proj.": "self_attn.out_proj.",
        "linear1.": "fc1.", "linear2.": "fc2.", "norm1.": "layer_norm_before.", "norm2.": "layer_norm_after."}),
    (r"transformer\.encoder\.fusion_layers\.(\d+)\.", r"model.encoder.layers.\1.fusion_layer.", {
        "gamma_v": "vision_param", "gamma_l": "text_param", "layer_norm_v.": "layer_norm_vision.",
        "layer_norm_l.": "layer_norm_text.", "attn.v_proj.": "attn.vision_proj.", "attn.l_proj.": "attn.text_proj.",
        "attn.values_v_proj.": "attn.values_vision_proj.", "attn.values_l_proj.": "attn.values_text_proj.",
        "attn.out_v_proj.": "attn.out_vision_proj.", "attn.out_l_proj.": "attn.out_text_proj."}),
    # decoder layer order: self-attention (norm2), text cross-attention (catext_norm),
    # deformable cross-attention (norm1), FFN (norm3)
    (r"transformer\.decoder\.layers\.(\d+)\.", r"model.decoder.layers.\1.", {
        "self_attn.in_proj_": "self_attn." + QKV + ".", "self_attn.out_proj.": "self_attn.out_proj.",
        "norm2.": "self_attn_layer_norm.",
        "ca_text.in_proj_": "encoder_attn_text." + QKV + ".", "ca_text.out_proj.": "encoder_attn_text.out_proj.",
        "catext_norm.": "encoder_attn_text_layer_norm.",
        "cross_attn.": "encoder_attn.", "norm1.": "encoder_attn_layer_norm.",
        "linear1.": "fc1.", "linear2.": "fc2.", "norm3.": "final_layer_norm."}),
    (r"transformer\.decoder\.norm\.", "model.decoder.layer_norm.", {"": ""}),
    (r"transformer\.decoder\.ref_point_head\.", "model.decoder.reference_points_head.", {"": ""}),
    (r"transformer\.decoder\.bbox_embed\.", "model.decoder.bbox_embed.", {"": ""}),
]
_COMPILED = [(re.compile(pattern), new, table) for pattern, new, table in RULES]


def _rename(key: str) -> str | None:
    """The transformers name of one original key (None: dropped), QKV still unsplit."""
    for pattern, new, table in _COMPILED:
        match = pattern.match(key)
        if match is None:
            continue
        if new is None:
            return None
        prefix = new(match) if callable(new) else match.expand(new)
        rest = key[match.end():]
        for old in sorted(table, key=len, reverse=True):   # longest sub-prefix first
            if rest.startswith(old):
                return prefix + table[old] + rest[len(old):]
        break
    raise KeyError(key)


def convert_state_dict(state: dict) -> dict:
    """Original state dict (read_original's: no "module." prefix) -> transformers' state dict."""
    converted = {}
    for key, value in state.items():
        try:
            new = _rename(key)
        except KeyError:
            raise ModelFileError(f"unknown key {key!r} (not part of the original Grounding DINO)") from None
        if new is None:
            continue
        if QKV in new:
            if value.shape[0] % 3:
                raise ModelFileError(f"{key}: a fused query/key/value projection of {value.shape[0]} rows")
            for name, part in zip(("query", "key", "value"), value.chunk(3, dim=0)):
                converted[new.replace(QKV, name)] = part.clone()
        else:
            converted[new] = value
    return converted


def text_config(state: dict, num_attention_heads: int | None = None) -> dict:
    """BERT's config from the checkpoint's own text-encoder weights; the head count is not in the
    shapes: from the tokenizer folder's config.json when there, else BERT's 64-wide heads."""
    prefix = "bert."
    try:
        words = state[prefix + "embeddings.word_embeddings.weight"]
        layers = {int(k[len(prefix + "encoder.layer."):].split(".")[0]) for k in state
                  if k.startswith(prefix + "encoder.layer.")}
        return dict(
            model_type="bert", vocab_size=words.shape[0], hidden_size=words.shape[1],
            max_position_embeddings=state[prefix + "embeddings.position_embeddings.weight"].shape[0],
            type_vocab_size=state[prefix + "embeddings.token_type_embeddings.weight"].shape[0],
            num_hidden_layers=len(layers),
            intermediate_size=state[prefix + "encoder.layer.0.intermediate.dense.weight"].shape[0],
            num_attention_heads=num_attention_heads or max(1, words.shape[1] // 64))
    except KeyError as exc:
        raise ModelFileError(f"no BERT text encoder weights ({exc.args[0]} is missing)") from None


def hf_config(args: dict, text: dict):
    """transformers' GroundingDinoConfig for the original model's arguments."""
    from transformers import GroundingDinoConfig, SwinConfig

    for name, needed in REQUIRED.items():
        if name in args and args[name] != needed:
            raise ModelFileError(f"{name} = {args[name]!r} is not supported (transformers' Grounding DINO "
                                 f"implements {name} = {needed!r})")
    if args["backbone"] not in SWIN:
        raise ModelFileError(f"backbone {args['backbone']!r} is not supported (one of {', '.join(SWIN)})")
    if args["pe_temperatureH"] != args["pe_temperatureW"]:
        raise ModelFileError("pe_temperatureH and pe_temperatureW must be equal")
    embed_dim, depths, heads, window, size = SWIN[args["backbone"]]
    backbone = SwinConfig(embed_dim=embed_dim, depths=depths, num_heads=heads, window_size=window,
                          image_size=size, out_indices=[i + 1 for i in args["return_interm_indices"]])
    return GroundingDinoConfig(
        backbone_config=backbone, text_config=dict(text), num_queries=args["num_queries"],
        encoder_layers=args["enc_layers"], decoder_layers=args["dec_layers"],
        encoder_ffn_dim=args["dim_feedforward"], decoder_ffn_dim=args["dim_feedforward"],
        encoder_attention_heads=args["nheads"], decoder_attention_heads=args["nheads"],
        d_model=args["hidden_dim"], activation_function=args["transformer_activation"],
        num_feature_levels=args["num_feature_levels"], encoder_n_points=args["enc_n_points"],
        decoder_n_points=args["dec_n_points"], two_stage=True,
        max_text_len=256,   # the original model fixes it at 256 whatever its config says
        embedding_init_target=args["embed_init_tgt"], decoder_bbox_embed_share=args["dec_pred_bbox_embed_share"],
        two_stage_bbox_embed_share=args["two_stage_bbox_embed_share"],
        positional_embedding_temperature=args["pe_temperatureH"], position_embedding_type="sine")
