"""The real server: a browser clicks through the page, and concurrent clients hammer the API."""

from __future__ import annotations

import os
import select
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

#: Every test here shares a live server that takes seconds to start and index.
pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
TOKEN = "live-test-token-" + "0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server_log(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("live-log") / "server.log"


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_weights, shared_data, server_log):
    """`lungcbir serve --token-file` on a free port over a small index of real slices."""
    folder = tmp_path_factory.mktemp("live")
    token_file = folder / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    store = ["--db", f"sqlite:///{folder}/db.sqlite", "--index-dir", str(folder / "index"), "--weights", tiny_weights]
    command = [sys.executable, "-m", "lungcbir.cli"]
    md = shared_data / "covid-ct-md"
    slices = [path for series in sorted(md.glob("*/*")) if series.is_dir()
              for path in sorted(series.glob("*.dcm"))[8:10]]
    slices += sorted((shared_data / "kaggle-lungs-2d" / "images").glob("*.tif"))[:6]
    subprocess.run([*command, "index-dataset", *map(str, slices), "--quiet", *store], check=True,
                   capture_output=True)
    port = free_port()
    log = open(server_log, "wb")
    process = subprocess.Popen([*command, "serve", "--port", str(port), "--token-file", str(token_file), *store],
                               stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(f"{url}/healthz").status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
    else:
        process.kill()
        pytest.fail("server did not start: " + server_log.read_text()[-2000:])
    yield url
    process.terminate()
    process.wait(10)
    log.close()


def query_file(shared_data) -> Path:
    return sorted((shared_data / "kaggle-lungs-2d" / "images").glob("*.tif"))[3]


def need_chromium() -> None:
    if not os.path.exists(CHROMIUM):
        if os.environ.get("CI"):
            pytest.fail(f"Chromium is not installed at {CHROMIUM}; .ci/run should install Debian's chromium")
        pytest.skip(f"Chromium is not installed at {CHROMIUM} (apt-get install chromium)")


def launch(playwright):
    return playwright.chromium.launch(executable_path=CHROMIUM, args=[
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"])


@pytest.mark.browser
def test_browser_upload_click_and_results(server, shared_data, tmp_path):
    need_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = launch(playwright)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        requests = []
        page.on("request", lambda request: requests.append(request))
        page.goto(server)
        # the page asks for the token once; a wrong one is refused and asked for again
        page.wait_for_selector("#login[open]")
        page.fill("#token", "wrong-token-0123456789")
        page.press("#token", "Enter")
        page.wait_for_function("document.getElementById('login-message').textContent.includes('not accepted')")
        page.fill("#token", TOKEN)
        page.press("#token", "Enter")
        page.wait_for_function("document.getElementById('stats').textContent.includes('slices')")
        assert not page.locator("#login[open]").count()
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
        page.wait_for_function("document.getElementById('detail-overlay').naturalWidth > 0")
        assert page.evaluate("sessionStorage.getItem('lungcbir-token')") == TOKEN
        # every call went to this server, with the token in a header and never in a URL
        assert requests and all(r.url.startswith(server) or r.url.startswith("blob:") for r in requests)
        assert not [r.url for r in requests if TOKEN in r.url]
        sent = [r.headers.get("authorization") for r in requests if "/api/" in r.url]
        assert set(sent) <= {None, f"Bearer {TOKEN}", "Bearer wrong-token-0123456789"}  # None: the first try
        assert sent.count(f"Bearer {TOKEN}") > 8  # stats, query, its pictures, thumbnails, detail
        if os.environ.get("LUNGCBIR_SCREENSHOT"):
            page.keyboard.press("Escape")
            page.screenshot(path=os.environ["LUNGCBIR_SCREENSHOT"], full_page=True)
        browser.close()


def test_concurrent_clients_never_fail(server, shared_data):
    content = query_file(shared_data).read_bytes()

    def one(number: int) -> int:
        with httpx.Client(timeout=60) as client:
            if number % 5 == 4:
                return client.get(f"{server}/api/stats", headers=AUTH).status_code
            response = client.post(f"{server}/api/query", files={"file": ("q.tif", content)}, data={"k": "3"},
                                   headers=AUTH)
            return response.status_code

    with ThreadPoolExecutor(max_workers=8) as pool:
        statuses = list(pool.map(one, range(200)))
    assert statuses.count(200) == 200, statuses


@pytest.mark.browser
def test_api_docs_page_loads_nothing_from_other_hosts(server):
    need_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = launch(playwright)
        page = browser.new_page()
        requests = []
        page.on("request", lambda request: requests.append(request.url))
        page.goto(f"{server}/docs")
        page.wait_for_selector(".swagger-ui .info .title", timeout=30_000)  # rendered from /openapi.json
        browser.close()
    assert f"{server}/openapi.json" in requests
    assert all(url.startswith(server) or url.startswith("data:") for url in requests), requests


def test_refused_without_token_or_with_a_foreign_host(server):
    assert httpx.get(f"{server}/healthz").status_code == 200
    assert httpx.get(f"{server}/api/stats").status_code == 401
    assert httpx.get(f"{server}/api/stats", headers=AUTH).status_code == 200
    # DNS rebinding: a page of another site that resolves its name to this server
    assert httpx.get(f"{server}/api/stats", headers={**AUTH, "Host": "attacker.example"}).status_code == 400


def test_streamed_upload_is_refused_at_the_limit(server):
    """A chunked upload with no Content-Length is answered 413 once past 64 MiB, not read to the end."""
    host, port = server.removeprefix("http://").split(":")
    total = 400  # MiB offered
    chunk = b"\0" * 2**20
    head = (b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\n'
            b"Content-Type: image/png\r\n\r\n")
    offered = 0  # body bytes handed to the socket
    pending = (f"POST /api/query HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {TOKEN}\r\n"
               "Content-Type: multipart/form-data; boundary=XyZ\r\nTransfer-Encoding: chunked\r\n\r\n"
               ).encode() + f"{len(head):x}\r\n".encode() + head + b"\r\n"
    answer = b""
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and b"\r\n\r\n" not in answer:
            if not pending and offered < total * 2**20:
                pending = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
                offered += len(chunk)
            readable, writable, _ = select.select([sock], [sock] if pending else [], [], 1)
            if readable:
                data = sock.recv(65536)
                if not data:
                    break
                answer += data
            elif writable:
                try:
                    pending = pending[sock.send(pending):]
                except (BrokenPipeError, ConnectionResetError):
                    pending = b""
                    offered = total * 2**20
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert offered < 100 * 2**20, f"{offered / 2**20:.0f} MiB sent before the answer"


def test_server_log_never_shows_the_token(server, server_log):
    httpx.get(f"{server}/api/stats", headers=AUTH)
    httpx.get(f"{server}/api/stats", headers={"Authorization": "Bearer " + TOKEN[::-1]})
    time.sleep(0.5)
    text = server_log.read_text()
    assert "/api/stats" in text  # the access log is there...
    assert TOKEN not in text and TOKEN[::-1] not in text  # ...without any token
