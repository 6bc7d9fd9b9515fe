"""The playground page in a real headless Chromium (Debian's ``chromium``, driven by Playwright)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers import RunningServer, in_ci, wait_until

CHROMIUM = "/usr/bin/chromium"
# Chromium runs as root here (so no sandbox) on a network without internet.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Where the screenshot goes: TEXTGEN_ARTIFACTS_DIR when set (CI keeps it), else the test's tmp folder.
ARTIFACTS_ENV = "TEXTGEN_ARTIFACTS_DIR"


def _chromium() -> str:
    if os.path.exists(CHROMIUM):
        return CHROMIUM
    found = shutil.which("chromium")
    if found:
        return found
    reason = "chromium is not installed (Debian package 'chromium'; scripts/test.sh installs it)"
    if in_ci():
        pytest.fail(f"{reason}, and CI=true requires it", pytrace=False)
    pytest.skip(reason)


def test_the_playground_streams_text_into_the_page_and_stops(
    start_server: Callable[..., RunningServer], tmp_path: Path
) -> None:
    sync_api = pytest.importorskip("playwright.sync_api")
    executable = _chromium()
    running = start_server(http_port=0)
    url = f"http://127.0.0.1:{running.server.http_port}/"
    artifacts = Path(os.environ.get(ARTIFACTS_ENV) or tmp_path)
    artifacts.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 390, "height": 844})  # a phone-width screen
            page.goto(url)
            page.wait_for_function("document.querySelector('#model').options.length > 0")
            assert page.input_value("#model") == "tiny"
            page.fill("#prompt", "The ")
            page.fill("#max_tokens", "20000")
            page.fill("#seed", "7")
            # Record the generated text's length after every change, from inside the page.
            page.evaluate(
                """() => {
                    window.lengths = [];
                    const output = document.querySelector('#output');
                    new MutationObserver(() => window.lengths.push(output.textContent.length))
                        .observe(output, {subtree: true, characterData: true, childList: true});
                }"""
            )
            page.click("#generate")
            # Emptied, the prompt shown, then at least three updates of the generated text.
            page.wait_for_function("new Set(window.lengths).size >= 5", timeout=60_000)
            assert page.is_enabled("#stop-button") and page.is_disabled("#generate")
            assert page.text_content("#ttft") != "-"
            page.screenshot(path=str(artifacts / "playground.png"), full_page=True)
            page.click("#stop-button")
            page.wait_for_function("document.querySelector('#finish').textContent === 'stopped'")
            assert page.is_enabled("#generate")
            lengths = page.evaluate("window.lengths")
            assert len(set(lengths)) >= 5 and lengths == sorted(lengths)  # the text grew, update by update
        finally:
            browser.close()
    # Stop aborted the request: its row left the batch, counted as a cancel.
    assert wait_until(lambda: running.sample("textgen_requests_total", {"code": "CANCELLED", "protocol": "http"}) == 1)
    assert running.server.engine.active == 0
    assert (artifacts / "playground.png").stat().st_size > 10_000
