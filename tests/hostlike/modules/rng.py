"""A1111's ImageRNG: one generator per seed; the first `next()` is the initial noise, every later
one the sampler's ancestral noise (A1111 routes k-diffusion's randn_like here)."""

import torch


class ImageRNG:
    def __init__(self, shape, seeds, subseeds=None, subseed_strength=0.0, seed_resize_from_h=0,
                 seed_resize_from_w=0):
        self.shape = tuple(map(int, shape))
        self.seeds, self.subseeds, self.subseed_strength = seeds, subseeds, subseed_strength
        self.seed_resize_from_h, self.seed_resize_from_w = seed_resize_from_h, seed_resize_from_w
        self.generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
        self.is_first = True

    def next(self):
        self.is_first = False
        return torch.stack([torch.randn(self.shape, generator=g) for g in self.generators])
