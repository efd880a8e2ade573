"""The slice of A1111 v1.10's `modules` package that lib_mc/hosts imports, written for offline
tests from A1111's documented behaviour (not its code): devices, the image RNG that replays
initial and ancestral noise, shared state/options, prompt tags, the script base class and
callback registry, img2img's step setup. The CFG denoiser and sampler
shaped like A1111's are in tests/a1111like.py. A real A1111 is checked through tests/api."""
