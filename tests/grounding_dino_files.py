"""Small Grounding DINO checkpoints in the real formats, for tests.

- a tiny BERT (transformers BertModel + a vocab.txt with bert-base-uncased's ids for [CLS], [SEP],
  "." and "?", which transformers' Grounding DINO hard-codes),
- an ORIGINAL checkpoint built by IDEA-Research's own code (groundingdino-py: `build_model` from a
  GroundingDINO_SwinT_OGC.py config written beside the .pth, small transformer, the fixed Swin-T
  backbone), saved as the released files are: {"model": state_dict} with "module." prefixes,
- a transformers folder (GroundingDinoForObjectDetection.save_pretrained + its tokenizer).
"""

from __future__ import annotations

import os

import torch

# bert-base-uncased's layout: [PAD] 0, [unused*], [UNK] 100, [CLS] 101, [SEP] 102, [MASK] 103,
# "." 1012, "?" 1029; the words after those
WORDS = ["man", "woman", "dog", "a", "and", "on", "beach", "red", "car", "sofa"]
# hidden_dim stays 256: the original hard-codes 256 features for the text positions
SMALL = dict(dim_feedforward=256, enc_layers=2, dec_layers=2, num_queries=30)


def vocabulary() -> list[str]:
    vocab = [f"[unused{i}]" for i in range(1030)]
    for token, index in {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103,
                         ".": 1012, "?": 1029}.items():
        vocab[index] = token
    return vocab + WORDS


def write_bert(folder: str, vocab: list[str] | None = None, seed: int = 0) -> str:
    from transformers import BertConfig, BertModel, BertTokenizerFast

    os.makedirs(folder, exist_ok=True)
    vocab = vocab or vocabulary()
    with open(os.path.join(folder, "vocab.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(vocab) + "\n")
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    BertModel(config).save_pretrained(folder)
    BertTokenizerFast(os.path.join(folder, "vocab.txt")).save_pretrained(folder)
    return folder


def released_config() -> str:
    """The GroundingDINO_SwinT_OGC.py that groundingdino-py ships."""
    import groundingdino

    path = os.path.join(os.path.dirname(groundingdino.__file__), "config", "GroundingDINO_SwinT_OGC.py")
    with open(path, encoding="utf-8") as f:
        return f.read()


def write_config(path: str, bert_folder: str, **changes) -> str:
    """The released config with its values replaced, as a user's edited copy would be."""
    lines = []
    values = dict(SMALL, text_encoder_type=bert_folder, **changes)
    for line in released_config().splitlines():
        name = line.split("=")[0].strip()
        lines.append(f"{name} = {values.pop(name)!r}" if name in values else line)
    lines += [f"{name} = {value!r}" for name, value in values.items()]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return path


def build_original(config_path: str, seed: int = 0):
    """The original model from its own builder, weights perturbed so that no layer is left at its
    zero or identity initialisation (the box head's last layer starts at zero)."""
    from groundingdino.models import build_model
    from groundingdino.util.slconfig import SLConfig

    torch.manual_seed(seed)
    model = build_model(SLConfig.fromfile(config_path))
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
        # encoder proposals off the image get zeroed features, hence one shared score: keep that
        # score at 0, below the real ones, so ties never decide which proposals become queries
        model.transformer.enc_output.bias.zero_()
        model.transformer.enc_output_norm.bias.zero_()
    return model.eval()


def write_original(folder: str, bert_folder: str, name: str = "groundingdino_swint_ogc.pth",
                   config_name: str = "GroundingDINO_SwinT_OGC.py", seed: int = 0):
    """(checkpoint path, the original model it holds)."""
    os.makedirs(folder, exist_ok=True)
    config = write_config(os.path.join(folder, config_name), bert_folder)
    model = build_original(config, seed)
    path = os.path.join(folder, name)
    state = dict(model.state_dict())
    # the released files also hold what groundingdino-py 0.4.0 no longer builds (its loader passes
    # strict=False): the denoising label embedding and BERT's position ids of older transformers
    state["label_enc.weight"] = torch.randn(2001, 256)
    state["bert.embeddings.position_ids"] = torch.arange(64)[None]
    torch.save({"model": {"module." + k: v for k, v in state.items()}}, path)
    return path, model


def write_hf(folder: str, bert_folder: str, seed: int = 0) -> str:
    """A transformers Grounding DINO folder (Swin-T backbone, small transformer) with its tokenizer."""
    from transformers import (BertConfig, BertTokenizerFast, GroundingDinoConfig, GroundingDinoForObjectDetection,
                              SwinConfig)

    torch.manual_seed(seed)
    config = GroundingDinoConfig(
        backbone_config=SwinConfig(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7,
                                   out_indices=[2, 3, 4]),
        text_config=BertConfig.from_pretrained(bert_folder).to_dict(), num_queries=SMALL["num_queries"],
        encoder_layers=2, decoder_layers=2, d_model=64, encoder_ffn_dim=128, decoder_ffn_dim=128,
        encoder_attention_heads=4, decoder_attention_heads=4)
    model = GroundingDinoForObjectDetection(config)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    model.save_pretrained(folder)
    BertTokenizerFast.from_pretrained(bert_folder).save_pretrained(folder)
    return folder
