"""The real server: a browser clicks through the page, and concurrent clients hammer the API."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_weights, shared_data):
    """`lungcbir serve` on a free port over a small index of real slices."""
    folder = tmp_path_factory.mktemp("live")
    store = ["--db", f"sqlite:///{folder}/db.sqlite", "--index-dir", str(folder / "index"), "--weights", tiny_weights]
    command = [sys.executable, "-m", "lungcbir.cli"]
    md = shared_data / "covid-ct-md"
    slices = [path for series in sorted(md.glob("*/*")) if series.is_dir()
              for path in sorted(series.glob("*.dcm"))[8:10]]
    slices += sorted((shared_data / "kaggle-lungs-2d" / "images").glob("*.tif"))[:6]
    subprocess.run([*command, "index-dataset", *map(str, slices), "--quiet", *store], check=True,
                   capture_output=True)
    port = free_port()
    process = subprocess.Popen([*command, "serve", "--port", str(port), *store],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(f"{url}/healthz").status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
    else:
        process.kill()
        pytest.fail("server did not start: " + process.stderr.read().decode()[-2000:])
    yield url
    process.terminate()
    process.wait(10)


def query_file(shared_data) -> Path:
    return sorted((shared_data / "kaggle-lungs-2d" / "images").glob("*.tif"))[3]


def test_browser_upload_click_and_results(server, shared_data, tmp_path):
    if not os.path.exists(CHROMIUM):
        if os.environ.get("CI"):
            pytest.fail(f"Chromium is not installed at {CHROMIUM}; .ci/run should install Debian's chromium")
        pytest.skip(f"Chromium is not installed at {CHROMIUM} (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(server)
        page.set_input_files("#file", str(query_file(shared_data)))
        page.fill("#k", "6")
        page.click("#search")
        page.wait_for_selector("#results .card", timeout=60_000)
        assert page.locator("#results .card").count() == 6
        page.wait_for_function("document.getElementById('query-overlay').naturalWidth > 0")
        assert page.eval_on_selector("#query-overlay", "img => img.naturalWidth") == 512
        page.wait_for_function("[...document.querySelectorAll('#results img')].every(i => i.naturalWidth > 0)")
        page.locator("#results .card").first.click()
        page.wait_for_selector("#detail[open]")
        assert "patient_id" in page.inner_text("#detail-meta")
        if os.environ.get("LUNGCBIR_SCREENSHOT"):
            page.keyboard.press("Escape")
            page.screenshot(path=os.environ["LUNGCBIR_SCREENSHOT"], full_page=True)
        browser.close()


def test_concurrent_clients_never_fail(server, shared_data):
    content = query_file(shared_data).read_bytes()

    def one(number: int) -> int:
        with httpx.Client(timeout=60) as client:
            if number % 5 == 4:
                return client.get(f"{server}/api/stats").status_code
            response = client.post(f"{server}/api/query", files={"file": ("q.tif", content)}, data={"k": "3"})
            return response.status_code

    with ThreadPoolExecutor(max_workers=8) as pool:
        statuses = list(pool.map(one, range(200)))
    assert statuses.count(200) == 200, statuses
