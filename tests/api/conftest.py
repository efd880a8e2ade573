"""Tests against a running WebUI (A1111 or Forge) with this extension installed.

Set MULTI_CONCEPT_WEBUI to its address (e.g. http://127.0.0.1:7860, started with --api) and,
optionally, MULTI_CONCEPT_LORAS to two LoRA names from its list ("alice_v1,bob_v1"; default:
the first two SD1 LoRAs it lists). Without MULTI_CONCEPT_WEBUI these tests are skipped.
"""

import os

import pytest
import requests

ADDRESS_VARIABLE = "MULTI_CONCEPT_WEBUI"


@pytest.fixture(scope="session")
def webui():
    address = os.environ.get(ADDRESS_VARIABLE, "").rstrip("/")
    if not address:
        pytest.skip(f"no running WebUI: set {ADDRESS_VARIABLE}=http://host:port to run the API tests")
    try:
        requests.get(f"{address}/sdapi/v1/options", timeout=10).raise_for_status()
    except requests.RequestException as exc:
        pytest.fail(f"{ADDRESS_VARIABLE}={address} does not answer: {exc}")
    return address


@pytest.fixture(scope="session")
def lora_names(webui):
    wanted = [n.strip() for n in os.environ.get("MULTI_CONCEPT_LORAS", "").split(",") if n.strip()]
    if wanted:
        return wanted
    listed = requests.get(f"{webui}/sdapi/v1/loras", timeout=30).json()
    sd1 = [item["name"] for item in listed
           if "xl" not in str(item.get("metadata", {}).get("ss_base_model_version", "")).lower()]
    if len(sd1) < 2:
        pytest.skip("the WebUI lists fewer than two SD1 LoRAs; set MULTI_CONCEPT_LORAS")
    return sd1[:2]
