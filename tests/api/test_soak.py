"""A soak against a running WebUI: many mixed jobs (valid, malformed, interrupted in the second
pass, other samplers, hires fix, batch 2, automatic regions, long negatives that split cond and
uncond), after which a plain generation is bit-identical to one from before and the WebUI's
memory grew by at most 300 MB.

Runs only with MULTI_CONCEPT_WEBUI set and MULTI_CONCEPT_SOAK=<number of jobs> (e.g. 50); it takes
minutes on a CPU. MC_SOAK_REPORT=path.json also writes the figures there."""

import json
import os
import threading
import time

import pytest
import requests

from test_txt2img_api import pixels, two_concepts, txt2img, with_job

# small enough for a CPU soak; MC_SOAK_SIZE=128 for larger images
SIZE_PX = int(os.environ.get("MC_SOAK_SIZE", "64"))
SMALL = {"width": SIZE_PX, "height": SIZE_PX, "steps": 3}
SAMPLERS = ["DPM++ 2M", "DPM++ SDE", "Heun", "DDIM", "UniPC", "LMS", "DPM2 a", "Euler"]
LONG_NEGATIVE = ", ".join(["blurry, lowres, bad anatomy, jpeg artifacts, watermark"] * 12)   # > 75 tokens


def used_ram(webui) -> int:
    """The WebUI process's resident memory (A1111 and Forge report psutil's rss as ram.used)."""
    return int(requests.get(f"{webui}/sdapi/v1/memory", timeout=30).json()["ram"]["used"])


def malformed(loras, n):
    cases = [
        lambda j: j["concepts"][0]["loras"][0].update(name="no_such_lora_soak"),
        lambda j: j.update(start_at="soon"),
        lambda j: j["concepts"][1].update(region={"type": "mask", "png": "bm90IGEgcG5n"}),
        lambda j: j["concepts"][0].update(region={"type": "rect", "x": 0.8, "w": 0.5}),
        lambda j: j.update(concepts="two"),
        lambda j: j["concepts"][0].update(class_word="giraffe", region={"type": "auto"}),
    ]
    job = two_concepts(loras)
    cases[n % len(cases)](job)
    return {**SMALL, **with_job(job)}, "malformed"


def job_kinds(loras):
    """(payload, kind) for job n."""
    def valid(n):
        return {**SMALL, **with_job(two_concepts(loras))}, "valid"

    def sampler(n):
        return {**SMALL, "sampler_name": SAMPLERS[n % len(SAMPLERS)], **with_job(two_concepts(loras))}, "sampler"

    def hires(n):
        return {**SMALL, "enable_hr": True, "hr_scale": 1.5, "hr_upscaler": "Latent", "denoising_strength": 0.5,
                "hr_second_pass_steps": 2, "hr_additional_modules": ["Use same choices"],   # Forge's API needs it
                **with_job(two_concepts(loras))}, "hires"

    def batch(n):
        return {**SMALL, "batch_size": 2, **with_job(two_concepts(loras))}, "batch 2"

    def auto(n):
        job = two_concepts(loras)
        for concept in job["concepts"]:
            concept["region"] = {"type": "auto"}
        return {**SMALL, **with_job(job)}, "auto"

    def split(n):
        return {**SMALL, "negative_prompt": LONG_NEGATIVE, **with_job(two_concepts(loras))}, "long negative"

    return [valid, lambda n: malformed(loras, n), sampler, hires, batch, auto, split, "interrupt"]


def interrupted(webui, loras, after_s):
    """A valid job interrupted after `after_s` seconds (late in the job: the second pass)."""
    result = {}
    worker = threading.Thread(target=lambda: result.update(r=txt2img(webui, **SMALL, **with_job(two_concepts(loras)))))
    worker.start()
    time.sleep(after_s)
    requests.post(f"{webui}/sdapi/v1/interrupt", timeout=30)
    worker.join()
    return result["r"]


def test_soak(webui, lora_names):
    count = int(os.environ.get("MULTI_CONCEPT_SOAK", "0") or 0)
    if count <= 0:
        pytest.skip("set MULTI_CONCEPT_SOAK=<jobs> to run the soak")
    warm = txt2img(webui, seed=7, **SMALL, **with_job(two_concepts(lora_names)))   # loads everything once
    assert warm.status_code == 200, warm.text
    started = time.time()
    valid_s = txt2img(webui, seed=7, **SMALL, **with_job(two_concepts(lora_names)))
    job_seconds = time.time() - started
    before = txt2img(webui, seed=4242, **SMALL)
    assert before.status_code == 200, before.text
    ram_before = used_ram(webui)
    kinds, log = job_kinds(lora_names), []
    for n in range(count):
        kind = kinds[n % len(kinds)]
        started = time.time()
        if kind == "interrupt":
            response, label = interrupted(webui, lora_names, after_s=0.75 * job_seconds), "interrupted"
        else:
            payload, label = kind(n)
            response = txt2img(webui, seed=1000 + n, **payload)
        log.append({"n": n, "kind": label, "status": response.status_code, "seconds": round(time.time() - started, 1),
                    "error": "" if response.status_code == 200 else response.text[:300]})
        if label == "malformed":
            assert response.status_code >= 400 and ("concepts" in response.text or "start_at" in response.text), log[-1]
        elif label != "interrupted":
            assert response.status_code == 200, log[-1]
    after = txt2img(webui, seed=4242, **SMALL)
    assert after.status_code == 200, after.text
    ram_after = used_ram(webui)
    report = {"jobs": count, "by_kind": {}, "ram_before_mb": ram_before // 2 ** 20, "ram_after_mb": ram_after // 2 ** 20,
              "plain_identical": bool((pixels(before.json()["images"][0]) == pixels(after.json()["images"][0])).all()),
              "valid_job_seconds": round(job_seconds, 1), "log": log}
    for entry in log:
        kind = report["by_kind"].setdefault(entry["kind"], {"jobs": 0, "statuses": {}})
        kind["jobs"] += 1
        kind["statuses"][str(entry["status"])] = kind["statuses"].get(str(entry["status"]), 0) + 1
    if os.environ.get("MC_SOAK_REPORT"):
        with open(os.environ["MC_SOAK_REPORT"], "w") as f:
            json.dump(report, f, indent=1)
    print(json.dumps({k: v for k, v in report.items() if k != "log"}, indent=1))
    assert valid_s.status_code == 200
    assert report["plain_identical"], "a plain generation after the soak differs from the one before"
    assert ram_after - ram_before <= 300 * 2 ** 20, f"memory grew {(ram_after - ram_before) // 2 ** 20} MB"
