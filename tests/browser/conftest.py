"""Browser tests: the real panel in a gradio app, driven by Debian's chromium through Playwright.

Each test runs twice: with gradio 3.41.2 (A1111; this interpreter) and gradio 4.40.0 (Forge; the
interpreter in MC_GRADIO4_PYTHON or .venv-gradio4, which `.ci/run` creates). Without chromium,
Playwright or the gradio-4 environment the tests skip, unless MC_REQUIRE_BROWSER=1 (set by
`.ci/run`), where that is an error.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
REQUIRED = os.environ.get("MC_REQUIRE_BROWSER") == "1"


def missing(why: str):
    if REQUIRED:
        pytest.fail(f"browser tests required but {why}")
    pytest.skip(why)


def gradio_python(flavour: str) -> str:
    if flavour == "gradio3":
        return sys.executable
    candidate = os.environ.get("MC_GRADIO4_PYTHON") or str(ROOT / ".venv-gradio4" / "bin" / "python")
    if not os.path.exists(candidate):
        missing(f"no gradio 4 environment at {candidate}")
    return candidate


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PanelApp:
    def __init__(self, python: str, tmp: pathlib.Path):
        self.record = tmp / "received.json"
        self.log = tmp / "app.log"
        for attempt in range(3):
            if self._start(python):
                return
            # gradio 4's launch gives its own server 3 s to answer a HEAD request and exits
            # with httpx.ReadTimeout when it does not: a busy machine, not a broken panel
            if "ReadTimeout" not in self.log.read_text():
                break
        raise RuntimeError(f"panel app exited:\n{self.log.read_text()[-3000:]}")

    def _start(self, python: str) -> bool:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.process = subprocess.Popen(
            [python, str(ROOT / "tests" / "browser" / "app.py"), str(self.port), str(self.record)],
            stdout=self.log.open("w"), stderr=subprocess.STDOUT, cwd=ROOT,
            env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"})
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                urllib.request.urlopen(self.url, timeout=2).read()
                return True
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"panel app did not start:\n{self.log.read_text()[-3000:]}")

    def received(self, after: float) -> str | None:
        if self.record.exists() and self.record.stat().st_mtime >= after:
            return self.record.read_text()
        return None

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()


@pytest.fixture(scope="session")
def browser():
    executable = shutil.which("chromium")
    if not executable:
        missing("Debian's chromium is not installed (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("playwright is not installed")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable,
                                             args=["--headless", "--no-sandbox", "--disable-gpu"])
        yield browser
        browser.close()


@pytest.fixture(scope="session", params=["gradio3", "gradio4"])
def panel_app(request, tmp_path_factory):
    app = PanelApp(gradio_python(request.param), tmp_path_factory.mktemp(request.param))
    app.flavour = request.param
    yield app
    app.stop()


@pytest.fixture
def page(browser, panel_app):
    context = browser.new_context(viewport={"width": 1280, "height": 2000}, has_touch=True)
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda error: errors.append(f"{error.message}\n{error.stack}"))
    page.goto(panel_app.url)
    page.locator("#multi_concept .label-wrap").first.click()
    page.locator("#multi_concept canvas.mc-canvas").wait_for(state="visible", timeout=30000)
    page.wait_for_function("window.MultiConcept.editor.concepts.length === 2")
    yield page
    context.close()
    assert not [e for e in errors if "multi_concept_" in e], errors   # errors thrown by our scripts
