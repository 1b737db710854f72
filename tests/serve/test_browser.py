"""End to end in a real browser: Debian's Chromium, headless, uploads a demo tile through the page."""
from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

from oncotransfer.data.demo import demo_path

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not CHROMIUM.exists(), reason="Chromium not installed at /usr/bin/chromium "
                                 "(apt-get install chromium; .ci/run installs it)")]
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_run):
    import uvicorn
    from oncotransfer.serve.app import create_app
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(tiny_run, engine="torch"), host="127.0.0.1", port=port,
                                        log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
    yield url
    srv.should_exit = True
    thread.join(timeout=10)


def test_upload_shows_bars_and_heatmap(server, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (test extra)")
    image = sorted(demo_path("osteosarcoma").rglob("*.jpg"))[0]
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 800})
            page.goto(server + "/")
            page.wait_for_function("document.getElementById('model').textContent.includes('tiny')")
            page.set_input_files("#file", str(image))
            page.wait_for_selector("#bars .bar", timeout=120_000)
            page.wait_for_function("document.getElementById('heatmap').complete && "
                                   "document.getElementById('heatmap').naturalWidth > 0", timeout=60_000)
            bars = page.locator("#bars .bar")
            assert bars.count() == 3
            widths = [float(bars.nth(i).locator(".fill").evaluate("e => parseFloat(e.style.width)"))
                      for i in range(3)]
            assert abs(sum(widths) - 100) < 0.5
            assert page.locator("#bars .bar.predicted").count() == 1
            assert "predicted:" in page.locator("#status").text_content()
            shot = tmp_path / "page.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            print(f"screenshot: {shot}")
        finally:
            browser.close()


def test_page_asks_for_the_token_when_auth_is_on(tiny_run, live):
    """serve --token-file: the page shows a token field (from /health's auth_required), then works with it."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (test extra)")
    from oncotransfer.serve.app import create_app
    from oncotransfer.serve.limits import ServeLimits
    token = "page-token-0123456789abcdef"
    limits = ServeLimits()
    image = sorted(demo_path("osteosarcoma").rglob("*.jpg"))[0]
    with live(create_app(tiny_run, engine="torch", token=token), limits) as port, \
            sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        try:
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_selector("#auth:not([hidden])")
            assert "token required" in page.locator("#model").text_content()
            page.fill("#token", token)
            page.click("#auth button")
            page.wait_for_function("document.getElementById('model').textContent.includes('tiny')")
            page.set_input_files("#file", str(image))
            page.wait_for_selector("#bars .bar", timeout=120_000)
            assert "predicted:" in page.locator("#status").text_content()
        finally:
            browser.close()


def test_out_of_distribution_upload_shows_the_warning_instead_of_a_confident_answer(kfold_run, live):
    """A breast ultrasound sent to an osteosarcoma model: the page warns and greys the bars; the next, an
    osteosarcoma tile, gets its answer without the warning."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (test extra)")
    from oncotransfer.serve.app import create_app
    from oncotransfer.serve.limits import ServeLimits
    ultrasound = demo_path("bus250") / "benign" / "us10.png"
    tile = sorted(demo_path("osteosarcoma").rglob("*.jpg"))[5]
    with live(create_app(kfold_run[0], engine="torch"), ServeLimits()) as port, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        try:
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_function("document.getElementById('model').textContent.includes('kfold')")
            page.set_input_files("#file", str(ultrasound))
            page.wait_for_selector("#trust.ood:not([hidden])", timeout=120_000)
            warning = page.locator("#trust").text_content()
            assert "does not look like the images the model was trained on" in warning
            assert "should not be trusted; refer to a person" in warning and "out of distribution" in warning
            assert "not answered" in page.locator("#status").text_content()
            assert "predicted:" not in page.locator("#status").text_content()
            assert float(page.locator("#bars").evaluate("e => getComputedStyle(e).opacity")) < 0.5
            assert not page.locator("#heatmap").is_visible()
            page.set_input_files("#file", str(tile))
            page.wait_for_function("document.getElementById('status').textContent.includes('predicted:') || "
                                   "document.getElementById('status').textContent.includes('refer')",
                                   timeout=120_000)
            assert page.locator("#trust.ood").count() == 0
            assert float(page.locator("#bars").evaluate("e => getComputedStyle(e).opacity")) == 1
        finally:
            browser.close()
