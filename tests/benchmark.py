"""Cost of two-stage multi-concept sampling against a plain generation, measured in one run.

    python tests/benchmark.py [--steps 20] [--size 256] [--channels 64] [--device auto]

For plain and for 1, 2 and 4 concepts (same UNet, steps, seed, Euler a) it prints UNet
sample-evaluations per image, their ratio to plain, the wall-time ratio to plain, the peak
memory above the model, and what the naive way (stage 1 + every branch separately, every
step, as OMG's official code does) would evaluate.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lib_mc.engine import MultiConceptSession  # noqa: E402
from lib_mc.lora import load_network  # noqa: E402
from lib_mc.plan import build_plan  # noqa: E402
from tinyhost import CFGHost, TinyLDM, count_unet_rows, random_context, write_lora  # noqa: E402


class PeakMemory:
    """Peak memory above the level at start: CUDA allocator stats, else sampled RSS."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            self.start = self.peak = self._rss()
            self.running = True
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self.running = False
            self.thread.join()
        self.extra_mb = (self.peak - self.start) / 2 ** 20

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self._rss())
            time.sleep(0.01)


def sdp_attention_forward(self, x, context=None, mask=None, **kwargs):
    """Attention as A1111's sd_hijack_optimizations installs it (the 'sdp' option), class-wide."""
    source = x if context is None else context
    q, k, v = self.to_q(x), self.to_k(source), self.to_v(source)
    b, n, inner = q.shape
    q, k, v = (t.view(b, -1, self.heads, inner // self.heads).transpose(1, 2) for t in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    return self.to_out(out.transpose(1, 2).reshape(b, n, inner))


def build_unet(channels: int, context_dim: int, device):
    """SD1.5's UNet layout (sd-v1 config: 4 levels, 2 res blocks, 8 heads); width from --channels."""
    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    torch.manual_seed(0)
    unet = UNetModel(image_size=32, in_channels=4, out_channels=4, model_channels=channels,
                     attention_resolutions=[1, 2, 4], num_res_blocks=2, channel_mult=(1, 2, 4, 4),
                     num_heads=8, use_spatial_transformer=True, transformer_depth=1, context_dim=context_dim,
                     use_checkpoint=False, legacy=False)
    with torch.no_grad():
        for module in unet.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and module.weight.abs().max() == 0:
                module.weight.normal_(0, 0.02)
    return unet.eval().to(device)


def run_sampler(host, steps, latent_hw, device, seed=0):
    from k_diffusion import sampling
    gen = torch.Generator(device="cpu").manual_seed(seed)
    sigmas = host.inner.get_sigmas(steps).to(device)
    x = (torch.randn((1, 4) + latent_hw, generator=gen) * sigmas[0].cpu()).to(device)
    noise = lambda s, s_next: torch.randn(x.shape, generator=gen).to(device)  # noqa: E731
    host.step, host.total_steps = 0, steps
    # like A1111: fp32 latents, UNet matmuls in fp16 under autocast on CUDA
    with torch.no_grad(), torch.autocast("cuda", torch.float16, enabled=device.type == "cuda"):
        out = sampling.sample_euler_ancestral(host, x, sigmas, disable=True, noise_sampler=noise)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (latent = size / 8)")
    parser.add_argument("--channels", type=int, default=64, help="UNet model_channels (SD1.5: 320)")
    parser.add_argument("--context-dim", type=int, default=32, help="text context width (SD1.5: 768)")
    parser.add_argument("--sd15", action="store_true", help="SD1.5's full size: 512px, 320 channels, 768 context")
    parser.add_argument("--start-at", type=float, default=0.3)
    parser.add_argument("--concepts", default="1,2,4")
    parser.add_argument("--auto-concepts", default="2",
                        help="also time these counts with automatic regions (stage-1 attention recording); '' skips")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--host-attention", choices=["sdp", "ldm"], default="sdp",
                        help="the host's attention: A1111's sdp optimisation (default) or ldm's own einsum")
    args = parser.parse_args()
    if args.sd15:
        args.size, args.channels, args.context_dim = 512, 320, 768
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if args.host_attention == "sdp":
        from ldm.modules.attention import CrossAttention
        CrossAttention.forward = sdp_attention_forward
    unet = build_unet(args.channels, args.context_dim, device)
    ldm = TinyLDM(unet).to(device)
    context = lambda seed: random_context(seed, tokens=77, dim=args.context_dim).to(device)  # noqa: E731
    host = CFGHost(ldm, context(1), context(2))
    latent_hw = (args.size // 8, args.size // 8)
    folder = tempfile.mkdtemp()
    counts = [int(c) for c in args.concepts.split(",")]
    auto_counts = [int(c) for c in args.auto_concepts.split(",") if c.strip()]
    networks = []
    for i in range(max(counts + auto_counts)):
        path = os.path.join(folder, f"concept{i}.safetensors")
        write_lora(path, unet.cpu(), seed=100 + i, rank=16)
        networks.append(load_network(path))
    unet.to(device)

    def plan_for(n, auto=False):
        if auto:   # concept i watches context token 1 + i of the base prompt
            return build_plan([dict(cond=context(10 + i), loras=[(networks[i], 0.8)], auto_tokens=[1 + i])
                               for i in range(n)], (args.size, args.size), start_at=args.start_at)
        masks = []
        for i in range(n):
            mask = torch.zeros(args.size, args.size)
            mask[:, i * args.size // n:(i + 1) * args.size // n] = 1
            masks.append(mask)
        return build_plan([dict(cond=context(10 + i), loras=[(networks[i], 0.8)], mask=masks[i])
                           for i in range(n)], (args.size, args.size), start_at=args.start_at)

    def plain():
        host.route = None
        return run_sampler(host, args.steps, latent_hw, device)

    def two_stage(n, auto=False):
        session = MultiConceptSession(unet, plan_for(n, auto))
        host.route = session.denoise
        with session.stage1():
            run_sampler(host, args.steps, latent_hw, device)
        with session.stage2():
            return run_sampler(host, args.steps, latent_hw, device)

    plain()  # warm-up
    rows = count_unet_rows(unet)
    results = []
    runs = [("plain", plain)] + [(f"{n} concept{'s' * (n > 1)}", (lambda n=n: two_stage(n))) for n in counts]
    runs += [(f"{n} auto", (lambda n=n: two_stage(n, auto=True))) for n in auto_counts]
    for label, fn in runs:
        times, ratios = [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            plain()
            plain_time = time.perf_counter() - start
            rows.count = 0
            with PeakMemory(device) as memory:
                start = time.perf_counter()
                fn()
                elapsed = time.perf_counter() - start
            times.append(elapsed)
            ratios.append(elapsed / plain_time)
        results.append((label, rows.count, statistics.median(ratios), memory.extra_mb))
    rows.remove()

    plain_evals = 2 * args.steps
    start_step = round(args.start_at * args.steps)
    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}), "
          f"host attention {args.host_attention}, UNet model_channels {args.channels} context {args.context_dim}, "
          f"{args.size}x{args.size}, "
          f"{args.steps} steps Euler a, CFG, blending from step {start_step}, batch 1")
    print(f"{'run':<12}{'UNet evals':>11}{'x plain':>9}{'time x plain':>14}{'peak MB':>9}"
          f"{'naive evals':>13}{'naive x':>9}")
    for label, evals, ratio, peak in results:
        n = 0 if label == "plain" else int(label.split()[0])
        naive = plain_evals + args.steps * (2 + 2 + 2 * n) if n else plain_evals
        print(f"{label:<12}{evals:>11}{evals / plain_evals:>9.2f}{ratio:>14.2f}{peak:>9.1f}"
              f"{naive:>13}{naive / plain_evals:>9.2f}")


if __name__ == "__main__":
    main()
