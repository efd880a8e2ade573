from types import SimpleNamespace

import torch

device = torch.device("cpu")
state = SimpleNamespace(interrupted=False, skipped=False, sampling_step=0, sampling_steps=0)
# A1111's defaults for the options the CFG denoiser reads
opts = SimpleNamespace(batch_cond_uncond=True, pad_cond_uncond=False, pad_cond_uncond_v0=False,
                       eta_noise_seed_delta=0, s_min_uncond=0.0, img2img_fix_steps=False)
cmd_opts = SimpleNamespace(lowvram=False, medvram=False)
