"""Property-based fuzz of malformed jobs through parse_job and prepare (the path every API
payload, pasted infotext and panel state takes): whatever is wrong, the only exceptions are the
project's own (MultiConceptError), and each message names the field that is wrong
(`concepts[1].region.w: ...`), in the concept that was broken.

Each case is a valid job (1-3 concepts: rects, uploaded masks, automatic regions, LoRAs, tags)
with 1-3 mutations: a value replaced by junk (wrong types, NaN, huge integers, out-of-range
numbers, odd text, broken or odd PNGs), a key removed, or the whole argument replaced by
non-object JSON or text. Deterministic (derandomize) so CI sees the same cases every run."""

import base64
import copy
import io
import math
import re
import struct
import zlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from lib_mc.errors import MultiConceptError
from lib_mc.job import parse_job
from lib_mc.prepare import LoraFile, prepare
from test_prepare import Services   # the fake host side of `prepare`
from tinyhost import make_unet, write_lora

BASE_PROMPT = "a man and a woman on a beach"
IMAGE_HW = (64, 96)
EXAMPLES = 600          # 6 s on this 2-core machine; at least MIN_MALFORMED of them are rejected
MIN_MALFORMED = 500     # (the rest happen to be valid: a mutation may leave a job usable)

# every field a message may name: the job's own paths, as the parser and prepare spell them
FIELD = re.compile(r"(multi-concept|version|mode|enabled|start_at|layout_replay|self_attn_replay_until|feather"
                   r"|save_layout|refine_regions|auto_grow|hires_loras|isolation|isolation_until|reinit|enhance|prompt|concepts(\[\d+\](\.(name|z"
                   r"|prompt( <lora:[^>]*>)?|negative_prompt|class_word|loras(\[\d+\](\.(name|weight))?)?"
                   r"|region(\.(type|x|y|w|h|png|found))?))?)?)")


# ---- PNGs: valid ones in every mode a user may upload, and broken ones ---------------------------

def png_b64(mode: str, size: tuple[int, int], fill) -> str:
    out = io.BytesIO()
    Image.new(mode, size, fill).save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


def huge_png_b64(width: int, height: int) -> str:
    """A tiny file whose header claims a huge image (what a decompression bomb looks like)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    return base64.b64encode(data).decode()


good_pngs = st.builds(png_b64, st.sampled_from(["1", "L", "LA", "RGB", "RGBA", "P", "I", "I;16"]),
                      st.tuples(st.integers(1, 40), st.integers(1, 40)), st.integers(0, 255))


@st.composite
def broken_pngs(draw):
    data = bytearray(base64.b64decode(draw(good_pngs)))
    kind = draw(st.sampled_from(["truncate", "flip", "prefix", "text", "huge", "wide"]))
    if kind == "truncate":
        data = data[:draw(st.integers(0, len(data) - 1))]
    elif kind == "flip":
        for _ in range(draw(st.integers(1, 4))):
            data[draw(st.integers(0, len(data) - 1))] ^= draw(st.integers(1, 255))
    elif kind == "prefix":
        return "data:image/png;base64," + draw(st.sampled_from(["", "!!", "AAAA"]))
    elif kind == "text":
        return draw(st.text(max_size=40))
    elif kind == "huge":
        return huge_png_b64(draw(st.integers(14000, 60000)), draw(st.integers(14000, 60000)))
    else:
        return huge_png_b64(draw(st.integers(8193, 70000)), 1)
    return base64.b64encode(bytes(data)).decode()


# ---- valid jobs and their mutations -------------------------------------------------------------

names = st.sampled_from(["alice_v1", "bob_v1", "xl_style", "wide", "alice_v2", "", "  ", "ALICE_V1"])
tag_args = st.sampled_from(["alice_v1", "alice_v1:0.6", "alice_v1:", "alice_v1:nan", "alice_v1:inf", "bob_v1:1e999",
                            "alice_v1:-inf", ":0.5", "zzz:1", "alice_v1:heavy", "alice_v1:0.5:0.2", "bob_v1:1e308"])
prompts = st.one_of(st.text(max_size=30), st.builds(lambda a, b: f"photo of <lora:{a}> {b}", tag_args, st.text(max_size=8)),
                    st.builds(lambda a: f"x <lyco:{a}>, <hypernet:{a}>", tag_args))
junk = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70), st.just(10 ** 400), st.just(-10 ** 400),
              st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=6)
fractions = st.one_of(st.floats(-0.5, 1.5), st.sampled_from([0, 1, 0.0, 1e-9, 1.00005, -0.0]))
not_finite = st.sampled_from([math.nan, math.inf, -math.inf, 10 ** 400, -10 ** 400, "0.8", None])


def outside(low, high):
    return st.one_of(st.floats(high, 1e6, exclude_min=True), st.floats(-1e6, low, exclude_max=True), not_finite)


# what a leaf may become, by its key: values wrong for it (and some plausible ones, so that
# combinations such as x + w > 1 or a mask region without a png arise), else any junk
LEAF = {
    "x": fractions, "y": fractions, "w": fractions, "h": fractions,
    "weight": not_finite, "z": not_finite,
    "name": st.one_of(names, st.text(max_size=12)),
    "prompt": prompts, "negative_prompt": prompts,
    "class_word": st.sampled_from(["man", "woman", "women", "", " ", "beach", "a man", "dog"]),
    "type": st.sampled_from(["rect", "mask", "auto", "Rect", "", "polygon"]),
    "png": st.one_of(good_pngs, broken_pngs(), st.sampled_from(["", " "])),
    "start_at": outside(0, 1), "self_attn_replay_until": outside(0, 1), "feather": outside(0, 256),
    "auto_grow": outside(-128, 128),
    "enabled": st.sampled_from(["true", 1, 0, "yes"]), "refine_regions": st.sampled_from(["false", 1, None]),
    "version": st.sampled_from([0, 2, "1", None]),
    "mode": st.sampled_from(["", "Blend", "compose", None, "regional", "blend"]),
    "isolation": st.sampled_from(["true", 0, None]), "reinit": st.sampled_from(["false", 1, None]),
    "isolation_until": outside(0, 1), "enhance": st.sampled_from(["true", 1, None]),
}


@st.composite
def concepts(draw, i: int, count: int):
    kind = draw(st.sampled_from(["rect", "mask", "auto", "boxed"]))
    concept = {"name": draw(st.sampled_from(["alice", "left man", "", "b"])),
               "loras": [{"name": n, "weight": draw(st.floats(-2, 2))}
                         for n in draw(st.lists(st.sampled_from(["alice_v1", "bob_v1"]), max_size=2))],
               "prompt": draw(st.sampled_from(["", "photo of alice", "x <lora:alice_v1:0.5>"])),
               "class_word": draw(st.sampled_from(["man", "woman"]))}
    if kind == "rect":
        concept["region"] = {"type": "rect", "x": i / count, "y": 0, "w": 1 / count, "h": 1}
    elif kind == "mask":
        mask = torch.zeros(IMAGE_HW)
        mask[:, i * IMAGE_HW[1] // count:(i + 1) * IMAGE_HW[1] // count] = 255
        out = io.BytesIO()
        Image.fromarray(mask.byte().numpy()).save(out, format="PNG")
        concept["region"] = {"type": "mask", "png": base64.b64encode(out.getvalue()).decode()}
    else:
        concept["region"] = {"type": "auto"}
        if kind == "boxed":
            concept["region"].update(x=0, y=0.25, w=0.5, h=0.5)
    if draw(st.booleans()):
        concept["z"] = draw(st.integers(-3, 3))
    return concept


@st.composite
def valid_jobs(draw):
    count = draw(st.integers(1, 3))
    job = {"enabled": True, "start_at": draw(st.floats(0, 1)), "feather": draw(st.sampled_from([0, 2])),
           "auto_grow": draw(st.sampled_from([0, 4, -4])), "refine_regions": draw(st.booleans()),
           "concepts": [draw(concepts(i, count)) for i in range(count)]}
    if draw(st.booleans()):   # regional: automatic regions are found at start_at, so it is > 0
        job.update(mode="regional", start_at=draw(st.floats(0.05, 1)), isolation=draw(st.booleans()),
                   isolation_until=draw(st.floats(0, 1)), reinit=draw(st.booleans()), enhance=draw(st.booleans()))
    return job


def locations(value, path=""):
    """(path as messages spell it, container, key) of every value inside a job, containers too."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, inner in items:
        where = f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}" if path else key
        yield where, value, key
        yield from locations(inner, where)


def scope(path: str) -> str:
    """The top-level field or the concept a mutation at `path` is in."""
    return re.match(r"concepts\[\d+\]|[^.\[]+", path).group(0)


def parent(path: str) -> str:
    return re.sub(r"(\.[^.\[]+|\[\d+\])$", "", path)


def names_a_broken_field(field: str, broken: set[str]) -> bool:
    """The broken value itself, what holds it (`region` for x + w > 1), what was put in its place
    (`loras[0].name` in a replaced `loras`), or a sibling it made necessary (`region.png` after
    `region.type` became "mask")."""
    field = field.split(" <")[0]   # "concepts[0].prompt <lora:x>": the tag in that prompt
    return any(field.startswith(path) or path.startswith(field) or parent(field) == parent(path)
               for path in broken)


REQUIRED = {"type", "png", "concepts", "class_word"}   # keys whose removal breaks a job (class_word: when auto)


@st.composite
def malformed(draw):
    """(raw argument, paths of the values that were broken)."""
    if draw(st.integers(0, 19)) == 0:   # not a job object at all
        raw = draw(st.one_of(junk.filter(lambda v: not isinstance(v, dict)), st.text(max_size=30),
                             st.sampled_from(["{", "[1, 2]", "null", '"x"', "{'a': 1}", "[" * 100000])))
        return raw, {"multi-concept"}
    job = draw(valid_jobs())
    broken = set()
    for _ in range(draw(st.integers(1, 3))):
        where, container, key = draw(st.sampled_from(list(locations(job))))
        if key in REQUIRED and draw(st.integers(0, 3)) == 0:
            del container[key]
        else:
            leaf = LEAF.get(key)
            container[key] = draw(junk if leaf is None or draw(st.booleans()) else leaf)
        broken.add(where)
    return job, broken


# ---- the property ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    unet = make_unet()
    folder = tmp_path_factory.mktemp("fuzz_loras")
    write_lora(folder / "alice_v1.safetensors", unet, seed=1)
    write_lora(folder / "bob_v1.safetensors", unet, seed=2)
    files = {"alice_v1": LoraFile("alice_v1", str(folder / "alice_v1.safetensors"), "sd1"),
             "bob_v1": LoraFile("bob_v1", str(folder / "bob_v1.safetensors"), None),
             "xl_style": LoraFile("xl_style", str(folder / "alice_v1.safetensors"), "sdxl")}
    return unet, files


def test_malformed_jobs_raise_only_named_project_errors(world):
    unet, files = world
    cache, rejected = {}, []

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(malformed())
    def check(case):
        raw, broken = case
        snapshot = copy.deepcopy(raw)
        try:
            job = parse_job(raw)
            if job.enabled:
                prepare(job, base_prompt=BASE_PROMPT, base_negative="blurry", image_hw=IMAGE_HW, unet=unet,
                        services=Services(files), networks_cache=cache, warn=lambda message: None)
        except MultiConceptError as exc:
            field, message = getattr(exc, "field", ""), str(exc)
            assert FIELD.fullmatch(field), f"{message!r} does not name a field of the job ({snapshot!r:.300})"
            assert names_a_broken_field(field, broken), f"{message!r} names a field outside {broken}"
            assert message.startswith(f"{field}: ") and " object at 0x" not in message, message
            rejected.append(message)

    check()
    assert len(rejected) >= MIN_MALFORMED, f"only {len(rejected)} of {EXAMPLES} cases were malformed"


# ---- what the fuzz found, one case each ----------------------------------------------------------

def rejection(world, raw) -> str:
    unet, files = world
    with pytest.raises(MultiConceptError) as caught:
        job = parse_job(raw)
        prepare(job, base_prompt=BASE_PROMPT, base_negative="", image_hw=IMAGE_HW, unet=unet,
                services=Services(files), warn=lambda message: None)
    return str(caught.value)


def one(**concept):
    return {"enabled": True, "concepts": [{"name": "a"}, {"name": "b", **concept}]}


def test_what_the_fuzz_found_is_rejected_by_field(world):
    # an integer past float range (OverflowError), JSON nested past the recursion limit (RecursionError)
    assert rejection(world, {"enabled": True, "start_at": 10 ** 400, "concepts": [{}]}).startswith(
        "start_at: must be a number, got 1000")
    assert rejection(world, "[" * 100000).startswith("multi-concept: argument is not valid JSON")
    # a PNG header claiming a decompression bomb (PIL's own error), or a mask too wide to decode
    assert rejection(world, one(region={"type": "mask", "png": huge_png_b64(20000, 20000)})).startswith(
        "concepts[1].region: cannot be decoded as a PNG image (Image size (400000000 pixels) exceeds limit")
    assert rejection(world, one(region={"type": "mask", "png": huge_png_b64(9000, 1)})) == \
        "concepts[1].region: is 9000x1; masks may be at most 8192 pixels a side"
    # a tag's weight: which concept's prompt, and nan/inf are no weights
    assert rejection(world, one(prompt="x <lora:alice_v1:heavy>")) == \
        "concepts[1].prompt: <lora:alice_v1:heavy> has a weight that is not a number"
    assert rejection(world, one(prompt="x <lora:alice_v1:nan>")) == \
        "concepts[1].prompt: <lora:alice_v1:nan> has a weight that is not a finite number"
    # the plan's mask is the job's region
    assert rejection(world, one(region={"type": "mask", "png": png_b64("L", (8, 8), 0)})) == \
        "concepts[1].region: is all zero: the concept has no region"
