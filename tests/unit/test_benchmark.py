"""tests/benchmark.py end to end at tiny CPU sizes: the SD1.5 layout with every mode's rows, and
SDXL's layout (the real sgm UNet, its {"crossattn", "vector"} conditioning, kohya SDXL LoRA
keys) with the conductor rows, the reference's alignment and image concepts included. Both run in one
process of their own: the benchmark patches the attention classes and the allocator for the
whole process."""

import os
import re
import subprocess
import sys

import pytest

import benchmark

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.dirname(TESTS)
STEPS = 2
TINY = ["--steps", str(STEPS), "--size", "64", "--channels", "32", "--concepts", "2", "--auto-concepts", "",
        "--lora-rank", "4"]
SD = TINY + ["--context-dim", "32", "--row-batches", ""]
XL = TINY + ["--sdxl", "--context-dim", "64", "--modes", "conductor", "--row-batches", "2,3"]
MARK = "===== next run ====="


@pytest.fixture(scope="module")
def outputs():
    code = (f"import sys; sys.path[:0] = [{TESTS!r}, {ROOT!r}]; import benchmark; "
            f"a = benchmark.main({SD!r}); print({MARK!r}, flush=True); b = benchmark.main({XL!r}); sys.exit(a or b)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    sd, xl = done.stdout.split(MARK)
    return sd, xl


def evals(output: str) -> dict[str, int]:
    """run label -> UNet evals, from the table."""
    table = output.split("cpu time x\n", 2)[-1]
    return {m.group(1).strip(): int(m.group(2))
            for m in re.finditer(r"^(\S.*?)\s+(\d+)\s+\d+\.\d\d\s", table, re.M)}


def blend_evals(n: int) -> int:
    """Stage 1 plain; stage 2 from its start step (0.3 of 2 steps: step 1) the layout row, the
    base rows and n concepts' rows."""
    return 2 * STEPS + (STEPS - 1) * (1 + 2 + 2 * n)


def check_reference_row(output: str, counts: dict[str, int], layer: str, blend: bool = True) -> None:
    found = re.search(r"conductor 2 reference: (\d+) UNet evals = (\d+) of the sampler's calls .*? \+ (\d+) of the "
                      r"reference's inversion .*? \+ (\d+) of the alignment \(forward up to (\S+),", output)
    assert found, output
    total, sampler, inversion, alignment = (int(g) for g in found.groups()[:4])
    assert total == counts["conductor 2 reference"] == sampler + inversion + alignment
    assert sampler == counts["conductor 2"]          # the pass itself costs what it costs without a reference
    assert inversion == STEPS + 1                    # every level the sampler visits, plus the clean latent's
    assert alignment > 0
    assert found.group(5) == layer
    ratio = r"peak / blend 2's peak \([\d.]+ MB\): [\d.]+" if blend else r"no blend 2 row in this run"
    assert re.search(ratio, output), output


def check_image_row(output: str, counts: dict[str, int], label: str, twin: str, pictures: int,
                    reference_rows: int, latent_side: int = 8) -> None:
    """The image row's split: the sampler's rows as its LoRA-only twin's, each picture inverted
    once (steps + 1 rows), one reference row per image concept and call, and the cache's bytes."""
    found = re.search(re.escape(label) + r": (\d+) UNet evals = (\d+) of the sampler's calls.*? \+ (\d+) of the "
                      r"inversions \((\d+) pictures .*? \+ (\d+) reference rows", output)
    assert found, output
    total, sampler, inversion, shown_pictures, references = (int(g) for g in found.groups())
    assert total == counts[label] == sampler + inversion + references
    assert sampler == counts[twin]
    assert shown_pictures == pictures and inversion == pictures * (STEPS + 1)
    assert references == reference_rows
    block = output.split(f"\n{label}: ", 1)[1]
    assert re.match(r".*\n  inversion: once per picture \(%d pictures put in the cache, 1 time\(s\) each" % pictures,
                    block), block
    latent = 4 * latent_side * latent_side * 4   # float32
    cached = re.search(r"cached inverted latents: (\d+) pictures x (\d+) levels x (\d+) B .*? = (\d+) B", block)
    assert cached and [int(g) for g in cached.groups()] == [pictures, STEPS, latent, pictures * STEPS * latent], block


def test_sd15_layout_every_mode(outputs):
    sd, _ = outputs
    counts = evals(sd)
    assert "SD1.5 layout (ldm)" in sd and "on 192 layers" in sd
    assert counts["plain"] == 2 * STEPS
    assert counts["blend 2"] == blend_evals(2)
    assert counts["regional 2"] == counts["regional 2 no isolation"] == 2 * STEPS
    assert counts["regional 2 reinit"] == 2 * STEPS + 1
    # from the first step, the base rows and each concept's rows for each of the host's 2 rows
    assert counts["conductor 2"] == counts["conductor 2 no refinement"] == 3 * 2 * STEPS
    check_reference_row(sd, counts, "output_blocks.3.1.transformer_blocks.0.attn1")
    # 2 image concepts: blend's one blended call (step 1 of 2) and conductor's 2 calls hold one
    # reference row per concept; the kept background is a third picture to invert
    check_image_row(sd, counts, "blend 2 image", "blend 2", pictures=2, reference_rows=2 * (STEPS - 1))
    check_image_row(sd, counts, "blend 2 image+background", "blend 2", pictures=3, reference_rows=2 * (STEPS - 1))
    check_image_row(sd, counts, "conductor 2 image", "conductor 2", pictures=2, reference_rows=2 * STEPS)
    # the job's second batch finds all 3 pictures in the job's cache: the sampler's and reference rows only
    second = re.search(r"blend 2 image\+background, a second batch of the same job .*?: (\d+) UNet evals, (\d+) of "
                       r"the inversions, (\d+) reference rows", sd)
    assert second and [int(g) for g in second.groups()] == [counts["blend 2"] + 2 * (STEPS - 1), 0, 2 * (STEPS - 1)], sd
    assert "FAILED" not in sd


def test_sdxl_layout(outputs):
    _, xl = outputs
    counts = evals(xl)
    # sgm's UNet at SDXL's depth (transformers 0/2/10 per level): 70 transformer blocks x 10
    # LoRA layers + 11 proj_in/proj_out pairs
    assert "SDXL layout (sgm)" in xl and "on 722 layers" in xl
    assert counts["plain"] == 2 * STEPS
    assert counts["conductor 2"] == 3 * 2 * STEPS
    assert set(counts) == {"plain", "conductor 2", "conductor 2 no refinement", "conductor 2 reference",
                           "conductor 2 image", "conductor 2 face"}
    # a face concept adds no UNet evaluation: the IdentityNet runs on its rows, cond and uncond, every step
    assert counts["conductor 2 face"] == counts["conductor 2"]
    assert re.search(rf"conductor 2 face \(concept 1 also a face concept.*\): \+0 UNet evals against conductor 2, "
                     rf"{2 * STEPS} IdentityNet rows", xl), xl
    # SDXL's alignment layer: the fifth transformer of output block 1 (needs the 10-deep level)
    check_reference_row(xl, counts, "output_blocks.1.1.transformer_blocks.4.attn1", blend=False)
    check_image_row(xl, counts, "conductor 2 image", "conductor 2", pictures=2, reference_rows=2 * STEPS)
    assert re.search(r"memory per UNet row, 64x64 \(calls of 2 and 3 rows", xl)


@pytest.mark.parametrize("argv, named", [
    (["--size", "100"], "--size"),
    (["--modes", "blend,collage"], "'collage'"),
    (["--sd15", "--sdxl"], "--sdxl"),
])
def test_bad_arguments_are_named(argv, named, capsys):
    with pytest.raises(SystemExit):
        benchmark.parse_args(argv)
    assert named in capsys.readouterr().err
