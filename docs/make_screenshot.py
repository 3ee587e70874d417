"""Regenerate docs/web.png and docs/web_detail.png: serve an indexed store, upload a slice in
Chromium, screenshot the answer, then open the best neighbour side by side and screenshot that.

Usage: python docs/make_screenshot.py --db URL --index-dir DIR QUERY_IMAGE
Needs Debian's chromium and the playwright package (both installed by .ci/run).
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time

import httpx
from playwright.sync_api import sync_playwright


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--db", required=True)
    parser.add_argument("--index-dir", required=True)
    parser.add_argument("--out", default="docs/web.png")
    parser.add_argument("--detail-out", default="docs/web_detail.png")
    parser.add_argument("query")
    args = parser.parse_args()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "lungcbir.cli", "serve", "--port", str(port),
                               "--db", args.db, "--index-dir", args.index_dir])
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(f"{url}/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=[
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(url)
            page.set_input_files("#file", args.query)
            page.fill("#k", "8")
            page.click("#search")
            page.wait_for_selector("#results .card")
            page.wait_for_function("[...document.querySelectorAll('img')].every(i => !i.src || i.naturalWidth > 0)")
            page.screenshot(path=args.out, full_page=True)
            page.locator("#results .card").first.click()
            page.wait_for_selector("#detail[open]")
            page.wait_for_function("document.getElementById('detail').dataset.neighborId")
            page.wait_for_timeout(300)
            page.screenshot(path=args.detail_out)
            browser.close()
    finally:
        server.terminate()
        server.wait(10)
    print(f"wrote {args.out} and {args.detail_out}")


if __name__ == "__main__":
    main()
