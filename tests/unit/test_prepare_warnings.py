"""What a LoRA file holds that cannot be applied reaches the job's warnings (the infotext's
`Multi-Concept warnings`), named with the concept, not only the console."""

import torch
from safetensors.torch import save_file

from lib_mc.job import parse_job
from lib_mc.prepare import LoraFile, parse_lora_tags, prepare
from tinyhost import make_unet, random_context


class Services:
    model_arch = "sd1"

    def __init__(self, files):
        self.files = files

    def lora_names(self):
        return list(self.files)

    def find_lora(self, name):
        return self.files.get(name)

    def parse_tags(self, prompt):
        return parse_lora_tags(prompt)

    def encode(self, prompt, loras):
        return {"c_crossattn": random_context(1)}


def test_layers_a_lora_cannot_apply_are_in_the_jobs_warnings(tmp_path):
    unet = make_unet()
    name = "input_blocks_1_1_transformer_blocks_0_attn1_to_q"
    q = dict(unet.named_modules())["input_blocks.1.1.transformer_blocks.0.attn1.to_q"].weight
    save_file({f"lora_unet_{name}.lora_down.weight": torch.randn(4, q.shape[1]),
               f"lora_unet_{name}.lora_up.weight": torch.randn(q.shape[0], 4),
               "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_k.mystery_w": torch.randn(4, 4)},
              str(tmp_path / "odd.safetensors"))
    services = Services({"odd": LoraFile("odd", str(tmp_path / "odd.safetensors"), "sd1")})
    job = parse_job({"enabled": True, "concepts": [{"name": "a", "loras": [{"name": "odd"}],
                                                    "region": {"type": "rect", "w": 0.5}}]})
    prepared = prepare(job, base_prompt="a man", base_negative="", image_hw=(128, 128), unet=unet,
                       services=services, warn=lambda m: None)
    text = "; ".join(prepared.warnings)
    assert "mystery_w" in text and "(concepts[0])" in text
    assert not text.startswith("[Multi-Concept]")
