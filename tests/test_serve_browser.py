"""The playground page in a real headless browser: Debian's chromium driven by playwright.

No browser is downloaded: the test runs the system's chromium (`apt-get install -y chromium`; .ci/run installs
it when missing) and skips, saying why, only when there is none.
"""

from __future__ import annotations

import shutil
import time

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install 'minigpt[serve]')")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install 'minigpt[dev]')")

from test_serve import endless_ckpt, running, serve_app  # noqa: E402, F401  (endless_ckpt is a fixture)

CHROMIUM_FLAGS = [
    "--no-sandbox", "--headless=new", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
]  # fmt: skip


@pytest.fixture
def browser_page(tmp_path):
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed: apt-get install -y chromium (.ci/run installs it)")
    with sync_api.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=chromium, args=CHROMIUM_FLAGS, headless=True,
            viewport={"width": 900, "height": 640},
        )  # fmt: skip
        try:
            yield context.new_page()
        finally:
            context.close()


def test_playground_streams_text_and_stop_cancels_the_request(endless_ckpt, browser_page):  # noqa: F811
    app = serve_app(endless_ckpt, max_batch=2, max_tokens_limit=1_000_000)
    scheduler = app.state.scheduler
    page = browser_page
    with running(app) as url:
        page.goto(url + "/")
        page.fill("#prompt", "the movie was")
        page.fill("#max-tokens", "1000000")  # far more than the test waits for: only Stop ends it
        page.fill("#seed", "3")
        page.click("#generate")
        # Streamed text grows in the page while the request runs.
        page.wait_for_function("document.getElementById('generated').textContent.split(' ').length > 5")
        first = page.text_content("#generated")
        page.wait_for_function(f"document.getElementById('generated').textContent.length > {len(first)}")
        assert page.is_enabled("#stop") and not page.is_enabled("#generate")
        assert "tokens/s" in page.text_content("#status")
        assert scheduler.running == 1
        page.click("#stop")
        page.wait_for_function("document.getElementById('status').textContent.startsWith('stopped after')")
        assert page.is_enabled("#generate") and not page.is_enabled("#stop")
        deadline = time.monotonic() + 10
        while scheduler.running and time.monotonic() < deadline:  # the server frees the request's row
            time.sleep(0.01)
        assert scheduler.running == 0
        assert "minigpt_cancelled_jobs_total 1.0" in app.state.metrics.exposition().decode()
        stopped = page.text_content("#generated")
        time.sleep(0.3)
        assert page.text_content("#generated") == stopped  # nothing arrives after Stop
