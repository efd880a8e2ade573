"""Cost of multi-concept sampling (every mode) against a plain generation, measured in one run.

    python tests/benchmark.py [--sd15 | --sdxl] [--steps 20] [--size 256] [--channels 64]
                              [--context-dim 32] [--modes blend,regional,conductor] [--concepts 1,2,4]
                              [--repeats 1] [--lora-rank 16] [--device auto] [--threads 1]

The UNet (random weights, tests/benchmark_models.py): SD1.5's layout (ldm) at the CPU size
(256 px, 64 channels) by default, at its full size with --sd15 (512 px, 320 channels, 768-wide
context), or SDXL's (sgm: 3 levels, 0/2/10 transformer blocks, `vector` conditioning through
label_emb, SDXL's conditioning and CFG host) with --sdxl: 1024 px, 320 channels (2.6 B
parameters, built on the device, fp16 weights on CUDA), 2048-wide context, unless --size,
--channels, --context-dim say otherwise (`--sdxl --size 128 --channels 32 --context-dim 64` runs
on a CPU). On CUDA both keep fp16 weights and sample under fp16 autocast, as A1111 does (earlier
SD1.5 figures had fp32 weights, whose fp16 copy under autocast counted in every peak).

For plain and, per mode, for 1, 2 and 4 concepts (same UNet, steps, seed, Euler a, every
concept with its own kohya LoRA on the attention, feed-forward and proj_in/proj_out layers) it
prints UNet sample-evaluations per image, their ratio to plain, the wall-time ratio to plain
(the median over --repeats, each against a plain run just before it), the peak memory above the
model, and for blend what the naive way (stage 1 + every branch separately, every step, as
OMG's official code does) would evaluate. Regional runs draw their regions from the first step
(start_at 0) with concept isolation on every step (the defaults); two more rows show what
isolation alone costs (2 concepts without it), re-initialisation (2 concepts with it: one
probe call of cond rows before the pass) and concept enhancement (a forward and a backward of
the cond rows in each of the first half of the steps: the evaluations column counts the
forwards). Conductor runs (one pass from the first step: base rows and every concept's rows in
each call, decoder attention injected) come with mask refinement on its default schedule,
without it, and with a reference latent (`conductor 2 reference`: a smooth stand-in for a VAE
latent, inverted at the first call, the latent aligned to its keys during the default
align_until; a line after the table splits its evaluations into the sampler's, the
inversion's and the alignment's, and gives its peak memory as a ratio to blend 2's). Image
concepts (PnP-MIX): `blend 2 image`, `conductor 2 image` and `blend 2 image+background` are the
2-concept runs with every concept also an image concept (a reference latent like the one
above, one per concept, no reference mask: the subject is found by the class word's attention
while it inverts), the last with a kept background too, each through session.sample as a host
samples a batch (schedule and to_x0 given); a line per image row after the table splits its
evaluations into the sampler's, the inversions' (steps + 1 per picture, checked to run once per
picture) and the reference rows', and gives the bytes the cached inverted latents take. A row that
fails is reported with its error (traceback on stderr) and the others still run; the exit status
is then 1. Peak memory is measured after all timing, in runs of its own. Then the memory one
more row adds to a UNet call, measured and as lib_mc/memory.py estimates it, and from both the
peak of 4 concepts at SDXL 1024x1024, batch 2, and the rows per call a 12 GB card holds.

torch runs one thread unless --threads says otherwise, and the load average is printed at the
start and the end: time ratios on a CPU shared with other work are only as good as that load.
A line per finished run goes to stderr as it ends, so a run cut short still tells what it measured.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import sys
import tempfile
import threading
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmark_models import (KOHYA_TARGETS, build_instantid, build_sd15, build_sdxl,  # noqa: E402,F401
                              sdp_attention_forward, write_kohya_lora)
from lib_mc.engine import HostPass, make_session  # noqa: E402
from lib_mc.lora import load_network  # noqa: E402
from lib_mc.memory import GIB, estimate_bytes_per_row, rows_that_fit  # noqa: E402
from lib_mc.methods.conductor.layers import alignment_layer  # noqa: E402
from lib_mc.methods.schedule import SamplerSchedule  # noqa: E402
from lib_mc.plan import build_plan  # noqa: E402
from tinyhost import count_unet_rows  # noqa: E402


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


def return_freed_memory_to_the_os():
    """Sampled RSS only sees a peak if freed blocks leave the process: glibc keeps freed heap for
    reuse, so a second run's peak would read as ~0. A fixed mmap threshold (64 KiB) maps every
    tensor of that size on its own and unmaps it on free."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 * 1024)   # M_MMAP_THRESHOLD
        libc.malloc_trim(0)           # and what earlier (timed) runs freed leaves now
    except (OSError, AttributeError):
        print("(not glibc: CPU peak memory figures may read low)")


def row_bytes(model, batches: tuple[int, int], latent_hw, device) -> float:
    """Peak memory one more batch row adds to a UNet call: (peak(b2) - peak(b1)) / (b2 - b1)."""
    peaks = []
    for rows in batches:
        with torch.no_grad(), torch.autocast("cuda", torch.float16, enabled=device.type == "cuda"):
            model.call(rows, latent_hw)   # warm-up: first-call allocations are not per row
            with PeakMemory(device) as memory:
                model.call(rows, latent_hw)
        peaks.append(memory.peak - memory.start)
    return (peaks[1] - peaks[0]) / (batches[1] - batches[0])


# what the 12 GB card holds besides the UNet's activations: fp16 weights (parameter counts of the
# SDXL base checkpoint), kept on the card as A1111 does without --medvram
SDXL_UNET_BYTES = 2_567_000_000 * 2       # 2.57 B parameters
SDXL_TEXT_VAE_BYTES = (123_000_000 + 695_000_000 + 84_000_000) * 2   # CLIP ViT-L, OpenCLIP bigG, VAE
CUDA_CONTEXT_BYTES = GIB // 2
CARD_BYTES = 12 * GIB


def print_memory(measured: float, estimated: int, label: str):
    mib = 2 ** 20
    ratio = measured / estimated
    print(f"\nmemory per UNet row, {label}: measured {measured / mib:.1f} MiB, "
          f"lib_mc/memory.py estimates {estimated / mib:.1f} MiB: measured/estimated {ratio:.2f}")
    rows = 2 + 4 + 4 * 4
    per_row = estimate_bytes_per_row("sdxl", (128, 128), 2) * max(1.0, ratio)
    fixed = SDXL_UNET_BYTES + SDXL_TEXT_VAE_BYTES + CUDA_CONTEXT_BYTES
    peak = fixed + rows * per_row + GIB
    fit = rows_that_fit(CARD_BYTES - fixed, round(per_row))
    print(f"4 concepts, SDXL 1024x1024, batch 2: {rows} rows per call (layout 2 + base 4 + 4 concepts x 4)")
    print(f"  assumed: fp16 weights and activations, attention via SDP (no n x n scores), A1111 keeping "
          f"the text encoders and VAE on the card")
    print(f"  per row {per_row / mib:.0f} MiB (the estimate, x the measured/estimated above when > 1); "
          f"{rows} rows {rows * per_row / GIB:.2f} GiB")
    print(f"  + UNet weights {SDXL_UNET_BYTES / GIB:.2f} GiB + text encoders and VAE {SDXL_TEXT_VAE_BYTES / GIB:.2f} GiB"
          f" + CUDA context {CUDA_CONTEXT_BYTES / GIB:.1f} GiB + reserve 1.0 GiB = peak {peak / GIB:.1f} GiB")
    print(f"  a 12 GB card ({CARD_BYTES / GIB:.0f} GiB) holds {fit} rows per call: "
          f"{'the 22 rows fit in one call' if fit >= rows else f'{-(-rows // max(fit, 1))} calls per step'}")


REFERENCE_ROW = "conductor 2 reference"
FACE_ROWS = ("blend 2 face", "conductor 2 face")   # 2 LoRA concepts, the first also a face concept (InstantID)
IMAGE_ROWS = ("blend 2 image", "blend 2 image+background", "conductor 2 image")   # 2 image concepts each


class ReferenceRowCounter:
    """Counts the UNet's reference rows (image concepts) of the watched session's calls: the
    engine's row plan of the call in flight says which rows are references."""

    def __init__(self, unet):
        self.session, self.count = None, 0
        self.handle = unet.register_forward_pre_hook(self._hook)

    def watch(self, session):
        self.session, self.count = session, 0

    def _hook(self, module, args):
        call = self.session.run.call if self.session is not None else None
        if call is not None:
            self.count += len(call.reference_rows)

    def remove(self):
        self.handle.remove()


def counting_puts(cache) -> dict[str, int]:
    """How often each key is put into this inversion cache: one put per picture inverted."""
    puts: dict[str, int] = {}
    put = cache.put

    def counted(key, inverted):
        puts[key] = puts.get(key, 0) + 1
        put(key, inverted)
    cache.put = counted
    return puts


def print_images(results, images: dict, steps: int, latent_hw) -> bool:
    """Per image row: its evaluations by kind, the inversion checked to have run once per
    picture, and the cached inverted latents' bytes. False when a check fails."""
    by_label = {r[0]: r for r in results}
    ok = True
    for label in IMAGE_ROWS:
        if label not in images or label not in by_label:
            continue
        session, puts, reference_rows, pictures = images[label]
        evals = by_label[label][3]
        inversion = session.stats.invert_rows
        sampler = evals - inversion - reference_rows
        levels = [{k: v for k, v in entry.items() if isinstance(k, float)} for entry in session.inversions.entries.values()]
        level_bytes = sum(t.numel() * t.element_size() for entry in levels for t in entry.values())
        clean_bytes = sum(e["clean"].numel() * e["clean"].element_size() for e in session.inversions.entries.values())
        once = len(puts) == pictures and set(puts.values()) == {1} and inversion == pictures * (steps + 1)
        ok = ok and once
        plain_twin = label.replace(" image+background", "").replace(" image", "")
        twin = by_label.get(plain_twin)
        print(f"\n{label}: {evals} UNet evals = {sampler} of the sampler's calls"
              f"{f' (as {plain_twin})' if twin and twin[3] == sampler else ''} + {inversion} of the inversions "
              f"({pictures} pictures x ({steps} levels + 1), cond rows, no LoRA) + {reference_rows} reference rows "
              f"(one per image concept in each call that holds its rows)")
        print(f"  inversion: {'once per picture' if once else 'CHECK FAILED: not once per picture'} "
              f"({len(puts)} pictures put in the cache, {max(puts.values(), default=0)} time(s) each at most, "
              f"{inversion} rows)")
        size = 4 * latent_hw[0] * latent_hw[1] * 4
        print(f"  cached inverted latents: {len(levels)} pictures x {len(levels[0]) if levels else 0} levels x "
              f"{size} B (4 x {latent_hw[0]} x {latent_hw[1]} float32) = {level_bytes} B, "
              f"+ {clean_bytes} B of the clean latents")
    return ok


def print_faces(results, face_rows: dict, steps: int) -> None:
    """A face concept's cost: its row against the same 2 LoRA concepts without the face."""
    by_label = {r[0]: r for r in results}
    for label, base in zip(FACE_ROWS, ("blend 2", "conductor 2")):
        if label not in by_label or base not in by_label:
            continue
        face, plain = by_label[label], by_label[base]
        print(f"{label} (concept 1 also a face concept: identity attention on its rows, the IdentityNet on its "
              f"rows): {face[3] - plain[3]:+d} UNet evals against {base}, {face_rows.get(label, 0)} IdentityNet rows "
              f"({face_rows.get(label, 0) / steps:.1f} a step), time x plain {face[4] - plain[4]:+.2f}, "
              f"peak {face[5] - plain[5]:+.1f} MB")


def reference_latent(latent_hw, seed: int = 7) -> torch.Tensor:
    """What a VAE makes of a picture, roughly: smooth, low-frequency values of unit scale (a
    latent of pure noise would be a picture of noise)."""
    coarse = torch.randn((1, 4, 4, 4), generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.interpolate(coarse, size=tuple(latent_hw), mode="bicubic", align_corners=False)


def print_alignment(results, stats, align_name: str, steps: int) -> None:
    """The reference row's evaluations by kind, and its peak memory against blend 2's (the issue:
    under 2x)."""
    by_label = {r[0]: r for r in results}
    _, _, _, evals, ratio, peak, _ = by_label[REFERENCE_ROW]
    sampler = evals - stats.invert_rows - stats.align_rows
    print(f"\n{REFERENCE_ROW}: {evals} UNet evals = {sampler} of the sampler's calls (base and concept rows) + "
          f"{stats.invert_rows} of the reference's inversion ({steps} levels + 1, cond rows, no grad) + "
          f"{stats.align_rows} of the alignment (forward up to {align_name}, then backward, one branch at a "
          f"time); time {ratio:.2f}x plain, peak {peak:.1f} MB above the model")
    blend = by_label.get("blend 2")
    if blend is None:
        print("  (no blend 2 row in this run: --modes with blend and --concepts with 2 give the memory ratio)")
    elif blend[5] > 0:
        print(f"  peak / blend 2's peak ({blend[5]:.1f} MB): {peak / blend[5]:.2f} (the issue asks for under 2)")


def run_sampler(host, steps, latent_hw, device, seed=0, initial=None, moved=None):
    """Euler a from the seed's noise (or `initial`, unscaled noise of that shape); the ancestral
    noise always comes from the seed, after the initial noise's draw. moved: a dict the engine
    fills with {image: latent} during a denoiser call (layout alignment's HostPass.latent_moved);
    those latents become the sampler's own when the call returns, as a host does it."""
    from k_diffusion import sampling
    gen = torch.Generator(device="cpu").manual_seed(seed)
    sigmas = host.inner.get_sigmas(steps).to(device)
    drawn = torch.randn((1, 4) + latent_hw, generator=gen)
    x = ((drawn if initial is None else initial.cpu()) * sigmas[0].cpu()).to(device)
    noise = lambda s, s_next: torch.randn(x.shape, generator=gen).to(device)  # noqa: E731
    host.step, host.total_steps = 0, steps
    denoiser = host

    if moved is not None:
        def denoiser(x, sigma):
            out = host(x, sigma)
            for image, latent in moved.items():
                x[image] = latent.to(x.dtype)   # in place: the sampler's next move starts from it
            moved.clear()
            return out
    # like A1111: fp32 latents, UNet matmuls in fp16 under autocast on CUDA
    with torch.no_grad(), torch.autocast("cuda", torch.float16, enabled=device.type == "cuda"):
        out = sampling.sample_euler_ancestral(denoiser, x, sigmas, disable=True, noise_sampler=noise)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out


SIZES = {   # (image side, model_channels, context width) when not given
    "cpu": (256, 64, 32),      # the CPU size of the SD1.5 layout
    "sd15": (512, 320, 768),
    "sdxl": (1024, 320, 2048),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, help="image side in pixels (latent = size / 8); default 256, "
                                                 "--sd15 512, --sdxl 1024")
    parser.add_argument("--channels", type=int, help="UNet model_channels (default 64; SD1.5 and SDXL: 320)")
    parser.add_argument("--context-dim", type=int, help="text context width (default 32; SD1.5: 768, SDXL: 2048)")
    family = parser.add_mutually_exclusive_group()
    family.add_argument("--sd15", action="store_true", help="SD1.5's full size: 512px, 320 channels, 768 context")
    family.add_argument("--sdxl", action="store_true",
                        help="SDXL's UNet (sgm, 3 levels, transformer depth 0/2/10, `vector` conditioning): "
                             "1024px, 320 channels (2.6 B parameters), 2048 context unless --size, --channels, "
                             "--context-dim say otherwise (e.g. --size 128 --channels 32 --context-dim 64 on a CPU)")
    parser.add_argument("--start-at", type=float, default=0.3)
    parser.add_argument("--concepts", default="1,2,4")
    parser.add_argument("--auto-concepts", default="2",
                        help="blend: also time these counts with automatic regions (stage-1 attention recording); "
                             "'' skips")
    parser.add_argument("--modes", default="blend,regional,conductor", help="which methods to time beside plain")
    parser.add_argument("--lora-rank", type=int, default=16, help="rank of every concept's LoRA (kohya: 16-32)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--host-attention", choices=["sdp", "ldm"], default="sdp",
                        help="the host's attention: A1111's sdp optimisation (default) or ldm's / sgm's own")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1, so other work on the machine skews plain and "
                             "two-stage alike)")
    parser.add_argument("--row-batches", default="4,12",
                        help="memory per UNet row from the peaks of calls of these two batch sizes; '' skips")
    args = parser.parse_args(argv)
    defaults = SIZES["sdxl" if args.sdxl else "sd15" if args.sd15 else "cpu"]
    for name, default in zip(("size", "channels", "context_dim"), defaults):
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.size % 8 or args.size < 64:
        parser.error(f"--size: the image side must be a multiple of 8 and at least 64, got {args.size}")
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = set(args.modes) - {"blend", "regional", "conductor"}
    if unknown:
        parser.error(f"--modes: unknown mode {sorted(unknown)[0]!r} (known: blend, regional, conductor)")
    return args


def progress(message: str) -> None:
    """A line per finished run on stderr, so a run stopped by a time limit still tells what it measured."""
    print(message, file=sys.stderr, flush=True)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    load_at_start = os.getloadavg()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    build = build_sdxl if args.sdxl else build_sd15
    model = build(args.channels, args.context_dim, device, args.host_attention)
    unet, host = model.unet, model.host
    context = model.cond
    latent_hw = (args.size // 8, args.size // 8)
    folder = tempfile.mkdtemp()
    counts = [int(c) for c in args.concepts.split(",")]
    auto_counts = [int(c) for c in args.auto_concepts.split(",") if c.strip()]
    modes = args.modes
    if "blend" not in modes:
        auto_counts = []
    extra = [2] if {"regional", "conductor"} & set(modes) else []   # the 2-concept variant rows
    networks = []
    for i in range(max(counts + auto_counts + extra)):
        path = os.path.join(folder, f"concept{i}.safetensors")
        layers = write_kohya_lora(path, unet, seed=100 + i, rank=args.lora_rank)
        networks.append(load_network(path))
    progress(f"built {model.description} on {device}; {len(networks)} LoRA files of {layers} layers")

    instantid = build_instantid(model, device) if args.sdxl else None   # face concepts: InstantID is SDXL's

    def plan_for(n, auto=False, images=False, background=False, face=False, **options):
        if auto:   # concept i watches context token 1 + i of the base prompt
            return build_plan([dict(cond=context(10 + i), loras=[(networks[i], 0.8)], auto_tokens=[1 + i])
                               for i in range(n)], (args.size, args.size), start_at=args.start_at)
        masks = []
        for i in range(n):
            mask = torch.zeros(args.size, args.size)
            mask[:, i * args.size // n:(i + 1) * args.size // n] = 1
            masks.append(mask)
        # class word of concept i: context token 1 + i (re-initialisation, enhancement and an image
        # concept's subject found without a reference mask read it)
        pictures = [dict(reference=reference_latent(latent_hw, seed=20 + i)) if images else {} for i in range(n)]
        faces = [instantid[1] if face and i == 0 else None for i in range(n)]   # concept 0 a face concept
        return build_plan([dict(cond=context(10 + i), loras=[(networks[i], 0.8)], mask=masks[i], face=faces[i],
                                class_tokens=[1 + i], own_class_tokens=[1 + i], **pictures[i]) for i in range(n)],
                          (args.size, args.size), background=reference_latent(latent_hw, seed=30) if background else None,
                          instantid=instantid[0] if face else None, **{"start_at": args.start_at, **options})

    def session_for(mode, plan):
        return make_session(mode, unet, plan, context_key=model.context_key)

    def plain():
        host.route = None
        return run_sampler(host, args.steps, latent_hw, device)

    def two_stage(n, auto=False, face=False):
        session = session_for("blend", plan_for(n, auto, face=face))
        host.route = session.denoise
        with session.stage1():
            run_sampler(host, args.steps, latent_hw, device)
        with session.stage2():
            return run_sampler(host, args.steps, latent_hw, device)

    def regional(n, **options):
        """One pass; drawn regions from the first step. With reinit through session.sample, as a
        host samples a batch: the probe pass stops at its first call, the real pass samples the
        re-initialised noise with the same ancestral noise."""
        session = session_for("regional", plan_for(n, start_at=0.0, **options))
        host.route = session.denoise
        if not options.get("reinit"):
            with session.single_pass():
                return run_sampler(host, args.steps, latent_hw, device)
        initial = torch.randn((1, 4) + latent_hw, generator=torch.Generator().manual_seed(0))
        return session.sample(HostPass(sample=lambda noise: run_sampler(host, args.steps, latent_hw, device,
                                                                        initial=noise),
                                       initial=initial, replay_noise=lambda: None))

    stats = {}   # run label -> the session's Stats of its latest run

    def conductor(n, reference=False, label=None, face=False, **options):
        """One pass; drawn regions from the first step, every concept's branch rows beside the
        base rows, mask refinement on its default schedule unless switched off. reference: with
        a reference latent, through session.sample as a host samples a batch: the reference
        inverted at the first call, the latent aligned to its keys in the early steps."""
        session = session_for("conductor", plan_for(n, start_at=0.0, face=face, **options))
        stats[label] = session.stats
        host.route = session.denoise
        if not reference:
            with session.single_pass():
                return run_sampler(host, args.steps, latent_hw, device)
        moved = {}
        initial = torch.randn((1, 4) + latent_hw, generator=torch.Generator().manual_seed(0))
        return session.sample(HostPass(
            sample=lambda noise: run_sampler(host, args.steps, latent_hw, device, initial=noise, moved=moved),
            initial=initial, replay_noise=lambda: None, reference=reference_latent(latent_hw).to(device),
            schedule=SamplerSchedule(host.inner.get_sigmas(args.steps)), latent_moved=moved.update))

    images = {}   # image row label -> (its session, puts per cache key, reference rows, pictures)

    def image_concepts(mode, n=2, background=False, label=None, inversions=None):
        """n concepts, each also an image concept, through session.sample as a host samples a
        batch (schedule and to_x0 given; k-diffusion's denoiser outputs x0); blend from its start
        step, conductor from the first. inversions: the job's cache of an earlier batch."""
        plan = plan_for(n, images=True, background=background,
                        **({"start_at": 0.0} if mode == "conductor" else {}))
        session = make_session(mode, unet, plan, context_key=model.context_key, inversions=inversions)
        puts = counting_puts(session.inversions)
        references.watch(session)
        host.route = session.denoise
        initial = torch.randn((1, 4) + latent_hw, generator=torch.Generator().manual_seed(0))
        out = session.sample(HostPass(
            sample=lambda noise: run_sampler(host, args.steps, latent_hw, device, initial=noise),
            initial=initial, replay_noise=lambda: initial, to_x0=lambda x, denoised, sigma: denoised,
            schedule=SamplerSchedule(host.inner.get_sigmas(args.steps))))
        images[label] = (session, puts, references.count, n + (1 if background else 0))
        references.watch(None)
        return out

    plain()  # warm-up
    rows = count_unet_rows(unet)
    identity_rows = count_unet_rows(instantid[0].identitynet) if instantid else None
    references = ReferenceRowCounter(unet)
    results = []
    runs = [("plain", 0, "plain", plain)]
    if "blend" in modes:
        runs += [(f"blend {n}", n, "blend", (lambda n=n: two_stage(n))) for n in counts]
        runs += [(f"blend {n} auto", n, "blend", (lambda n=n: two_stage(n, auto=True))) for n in auto_counts]
        runs += [(IMAGE_ROWS[0], 2, "blend image", lambda: image_concepts("blend", label=IMAGE_ROWS[0])),
                 (IMAGE_ROWS[1], 2, "blend image", lambda: image_concepts("blend", background=True, label=IMAGE_ROWS[1]))]
        if instantid:
            runs += [(FACE_ROWS[0], 2, "blend", lambda: two_stage(2, face=True))]
    if "regional" in modes:
        runs += [(f"regional {n}", n, "regional", (lambda n=n: regional(n))) for n in counts]
        runs += [("regional 2 no isolation", 2, "regional", lambda: regional(2, isolation=False)),
                 ("regional 2 reinit", 2, "regional", lambda: regional(2, reinit=True)),
                 ("regional 2 enhance", 2, "regional", lambda: regional(2, enhance=True))]
    if "conductor" in modes:
        runs += [(f"conductor {n}", n, "conductor", (lambda n=n: conductor(n))) for n in counts]
        runs += [("conductor 2 no refinement", 2, "conductor", lambda: conductor(2, mask_refine=False)),
                 (REFERENCE_ROW, 2, "conductor", lambda: conductor(2, reference=True, label=REFERENCE_ROW)),
                 (IMAGE_ROWS[2], 2, "conductor image", lambda: image_concepts("conductor", label=IMAGE_ROWS[2]))]
        if instantid:
            runs += [(FACE_ROWS[1], 2, "conductor", lambda: conductor(2, face=True, label=FACE_ROWS[1]))]
    plain_times = []
    face_rows = {}   # face row label -> IdentityNet rows it ran
    not_finite = []
    failed = {}   # label -> the error: a row that fails is reported, the others still run
    timed = []
    for label, n, mode, fn in runs:
        ratios, cpu_ratios = [], []
        try:
            for _ in range(args.repeats):
                start, cpu_start = time.perf_counter(), time.process_time()
                plain()
                plain_time, plain_cpu = time.perf_counter() - start, time.process_time() - cpu_start
                rows.count = 0
                if identity_rows is not None:
                    identity_rows.count = 0
                start, cpu_start = time.perf_counter(), time.process_time()
                out = fn()
                elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
                plain_times.append(plain_time)
                ratios.append(elapsed / plain_time)
                cpu_ratios.append(cpu / plain_cpu)
        except Exception as exc:   # noqa: BLE001 (reported below, with its traceback on stderr)
            failed[label] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
            progress(f"FAILED {label}:\n{traceback.format_exc()}")
            host.route = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        if not torch.isfinite(out).all():
            not_finite.append(label)
        results.append([label, n, mode, rows.count, statistics.median(ratios), None,
                        statistics.median(cpu_ratios)])
        if label in FACE_ROWS:
            face_rows[label] = identity_rows.count
        timed.append(fn)
        progress(f"timed {label}: {rows.count} UNet evals, {elapsed:.2f} s (plain {plain_time:.2f} s)")
    # peak memory in runs of their own, after all timing: on the CPU it is sampled by a thread
    # (whose CPU time and GIL turns would count against a timed run), and freed memory has to
    # leave the process to be seen, which makes every allocation a page fault (return_freed_
    # memory_to_the_os): that would slow the method with more temporaries more than plain
    if device.type == "cpu":
        return_freed_memory_to_the_os()
    for result, fn in zip(results, timed):
        with PeakMemory(device) as memory:
            fn()
        result[5] = memory.extra_mb
        progress(f"memory {result[0]}: peak {memory.extra_mb:.1f} MB above the model")
    second_batch = None   # a job's second batch: the first batch's pictures are not inverted again
    if IMAGE_ROWS[1] in images:
        rows.count = 0
        image_concepts("blend", background=True, label="batch 2", inversions=images[IMAGE_ROWS[1]][0].inversions)
        second_batch = (rows.count, images.pop("batch 2"))
    rows.remove()
    references.remove()
    if identity_rows is not None:
        identity_rows.remove()
    host.route = None

    plain_evals = 2 * args.steps
    start_step = round(args.start_at * args.steps)
    precision = (f"{str(model.weights_dtype).replace('torch.', '')} weights, fp16 autocast"
                 if device.type == "cuda" else "float32")
    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}), {precision}, "
          f"host attention {args.host_attention}, {model.description}, "
          f"{args.size}x{args.size}, "
          f"{args.steps} steps Euler a, CFG, batch 1; blend from step {start_step}, regional and conductor from step 0")
    print(f"each concept: a kohya LoRA of rank {args.lora_rank} on {layers} layers (attention, ff, proj_in/out), "
          f"weight 0.8; regions: vertical strips")
    print(f"torch threads {torch.get_num_threads()} of {os.cpu_count()} CPUs; load average (1 min) "
          f"{load_at_start[0]:.2f} at the start, {os.getloadavg()[0]:.2f} at the end; "
          f"plain run {statistics.median(plain_times):.2f} s (median of {len(plain_times)}), "
          f"time ratios: median of {args.repeats}")
    if device.type == "cpu":
        print("cpu time x: the process's CPU time (all its threads) against plain's: unlike wall time, "
              "it leaves out waiting for a core that other work holds")
    print(f"{'run':<25}{'UNet evals':>11}{'x plain':>9}{'time x plain':>14}{'peak MB':>9}"
          f"{'naive evals':>13}{'naive x':>9}{'cpu time x':>12}")
    for label, n, mode, evals, ratio, peak, cpu_ratio in results:
        naive = plain_evals + args.steps * (2 + 2 + 2 * n) if mode == "blend" else plain_evals
        naive_cells = f"{naive:>13}{naive / plain_evals:>9.2f}" if mode == "blend" else f"{'-':>13}{'-':>9}"
        print(f"{label:<25}{evals:>11}{evals / plain_evals:>9.2f}{ratio:>14.2f}{peak:>9.1f}{naive_cells}"
              f"{cpu_ratio:>12.2f}")
    for label, error in failed.items():
        print(f"{label:<25}FAILED {error}")
    if REFERENCE_ROW in stats and REFERENCE_ROW not in failed:
        print_alignment(results, stats[REFERENCE_ROW], align_name=alignment_layer(unet)[0], steps=args.steps)
    images_ok = print_images(results, images, args.steps, latent_hw)
    print_faces(results, face_rows, args.steps)
    if second_batch is not None:
        evals, (session, puts, reference_rows, _) = second_batch
        again = session.stats.invert_rows
        images_ok = images_ok and again == 0 and not puts
        print(f"{IMAGE_ROWS[1]}, a second batch of the same job (the first batch's inversion cache, as the hosts "
              f"keep it per job): {evals} UNet evals, {again} of the inversions"
              f"{'' if again == 0 and not puts else ' CHECK FAILED: pictures inverted again'}, "
              f"{reference_rows} reference rows")
    if not_finite:
        print(f"(non-finite values in the final latents of: {', '.join(not_finite)}; random weights in "
              f"{'fp16' if device.type == 'cuda' else 'float32'} can overflow, the timings still hold)")

    if args.row_batches.strip():
        batches = tuple(int(b) for b in args.row_batches.split(","))
        measured = row_bytes(model, batches, latent_hw, device)
        estimated = estimate_bytes_per_row(model.shape, latent_hw, 2 if device.type == "cuda" else 4)
        print_memory(measured, estimated, f"{args.size}x{args.size} (calls of {batches[0]} and {batches[1]} rows, "
                                          f"{'fp16 autocast' if device.type == 'cuda' else 'float32'})")
    return 1 if failed or not images_ok else 0


if __name__ == "__main__":
    sys.exit(main())
