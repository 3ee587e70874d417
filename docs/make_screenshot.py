"""Regenerate the README's pictures of the web page from the shared data, the same way each time.

Indexes a few series of ``../shared/data`` (covid-ct-md's six DICOM series and five
covid19-ct-lungmask volumes, every third slice, with their labels) into a temporary store
with the bundled model, serves it with ``lungcbir serve`` and saves, from Chromium:

- ``docs/web.png``: a slice query, the covid19-ct-lungmask slice with the most infection
  (a volume that is not indexed), its lesion map in red over the query, and its neighbours;
- ``docs/web_detail.png``: that query beside its best neighbour, the lesion layer shown on both;
- ``docs/web_series.png``: a whole-series query (covid-ct-md P002, other patients only)
  beside the best case, both series scrolled together by lung level.

Each picture is reduced to 256 colours, so that it stays below about 300 KB.

Usage: python docs/make_screenshot.py [--data ../shared/data] [--out-dir docs]
Needs Debian's chromium and the playwright package (both installed by .ci/run). Without the
data folder it says so and exits 0: there is nothing to picture.
"""

from __future__ import annotations

import argparse
import csv
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

CHROMIUM = "/usr/bin/chromium"
#: covid19-ct-lungmask volumes indexed (every third slice); the query's volume is not among them
INDEXED_VOLUMES = ("radiopaedia_14_85914_0", "radiopaedia_27_86410_0", "radiopaedia_7_85703_0",
                   "radiopaedia_36_86526_0", "radiopaedia_4_85506_1")
QUERY_VOLUME = "radiopaedia_40_86625_0"
SERIES_QUERY = ("covid", "P002")  # a covid-ct-md series, queried whole against the other patients
DIAGNOSES = {"covid": "COVID-19", "cap": "CAP", "normal": "normal"}
#: the relative lung level the series comparison is shown at (0 apex, 1 base)
MID_LUNG = 0.6


def dataset(data: Path) -> tuple[list[Path], dict[str, dict[str, str]], Path, list[Path]]:
    """What is indexed, its labels (by resolved path), the slice query and the series query."""
    md, lungmask = data / "covid-ct-md", data / "covid19-ct-lungmask"
    labels: dict[str, dict[str, str]] = {}
    with open(md / "slice_labels.csv", newline="") as handle:
        infected = {row["path"]: row["infection"] == "1" for row in csv.DictReader(handle)}
    indexed = sorted(md.glob("*/*/*.dcm"))
    for path in indexed:
        labels[os.path.abspath(path)] = {"dataset": "covid-ct-md", "diagnosis": DIAGNOSES[path.parts[-3]],
                                       "infection": "yes" if infected.get(str(path.relative_to(md))) else "no"}
    with open(lungmask / "manifest.csv", newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row["volume"] != "volume"]
    for volume in INDEXED_VOLUMES:
        for row in sorted((r for r in rows if r["volume"] == volume), key=lambda r: int(r["k"]))[::3]:
            path = lungmask / "ct" / row["file"]
            indexed.append(path)
            labels[os.path.abspath(path)] = {"dataset": "covid19-ct-lungmask", "diagnosis": "COVID-19",
                                           "infection": "yes" if int(row["infection_px"]) else "no"}
    most = max((r for r in rows if r["volume"] == QUERY_VOLUME), key=lambda r: int(r["infection_px"]))
    series = sorted((md / SERIES_QUERY[0] / SERIES_QUERY[1]).glob("*.dcm"))
    return indexed, labels, lungmask / "ct" / most["file"], series


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def small_png(path: Path) -> int:
    """Reduce a screenshot to 256 colours (a screenshot of CT in true colour is several times
    larger, with no grey level the eye would miss); its size in bytes."""
    from PIL import Image

    with Image.open(path) as image:
        reduced = image.convert("RGB").quantize(256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
    reduced.save(path, optimize=True)
    return path.stat().st_size


def wait_lesions(page) -> None:
    """Both sides' lesion layers fetched (the stored slice's runs the model)."""
    page.check("#lesions")
    page.wait_for_function("!/-/.test(document.getElementById('detail').dataset.lesions || '-')", timeout=120_000)
    page.wait_for_timeout(300)


def screenshots(url: str, query: Path, series: list[Path], out: Path) -> list[Path]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1280, "height": 940})
        page.goto(url)
        page.wait_for_function("document.getElementById('stats').textContent.includes('slices')")
        page.wait_for_load_state("networkidle")
        # (a) one infected slice: its lesion map on the query, then on the query and a neighbour
        page.set_input_files("#file", str(query))
        page.fill("#k", "8")
        page.click("#search")
        page.wait_for_selector("#results .card", timeout=120_000)
        page.wait_for_function("document.getElementById('query-overlay').naturalWidth > 0 && "
                               "[...document.querySelectorAll('#results img')].every(i => i.naturalWidth > 0)",
                               timeout=120_000)
        # down to the first row of neighbours
        bottom = page.evaluate("Math.max(...[...document.querySelectorAll('#results .result')].slice(0, 5)"
                               ".map(e => e.getBoundingClientRect().bottom + window.scrollY))")
        page.screenshot(path=out / "web.png", full_page=True, clip={"x": 0, "y": 0, "width": 1280,
                                                                    "height": bottom + 16})
        page.locator("#results .card").first.click()
        page.wait_for_selector("#detail[open]")
        page.wait_for_function("document.getElementById('detail').dataset.neighborId")
        wait_lesions(page)
        page.screenshot(path=out / "web_detail.png")
        page.keyboard.press("Escape")
        # (b) a whole series against the other patients, compared with the best case by lung level
        page.set_input_files("#file", [str(path) for path in series])
        if page.is_visible("#other-patients"):
            page.check("#other-patients")
        page.click("#search")
        page.wait_for_selector("#cases .case .card", timeout=300_000)
        page.locator("#cases .case").first.locator(".card").first.click()
        page.wait_for_selector("#detail[open]")
        page.wait_for_function("document.getElementById('slice-position').textContent.startsWith('query slice')")
        # step both series together to the query slice nearest mid-lung (the best pair may lie at the base)
        aligned = page.evaluate("detail.aligned.map(pair => pair.query_level)")
        here = page.evaluate("alignedIndex()")
        target = min(range(len(aligned)), key=lambda n: abs(aligned[n] - MID_LUNG))
        page.focus("#neighbor-canvas")
        direction = 1 if target > here else -1
        for at in range(here + direction, target + direction, direction):  # a step at a time, each shown
            page.keyboard.press("ArrowDown" if direction > 0 else "ArrowUp")
            page.wait_for_function(f"alignedIndex() === {at} && document.getElementById('detail').dataset"
                                   f".neighborId === String(detail.aligned[{at}].id)", timeout=120_000)
        page.evaluate("document.activeElement.blur()")  # no focus ring in the picture
        wait_lesions(page)
        page.screenshot(path=out / "web_series.png")
        browser.close()
    return [out / "web.png", out / "web_detail.png", out / "web_series.png"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data"), help="the shared data folder")
    parser.add_argument("--out-dir", type=Path, default=Path("docs"))
    args = parser.parse_args()
    if not (args.data / "covid-ct-md").is_dir() or not (args.data / "covid19-ct-lungmask").is_dir():
        print(f"skipped: {args.data} has no covid-ct-md and covid19-ct-lungmask folders (the shared data); "
              "nothing to picture")
        return 0
    from lungcbir.retrieval import Retriever

    indexed, labels, query, series = dataset(args.data)
    with tempfile.TemporaryDirectory(prefix="lungcbir-screenshots-") as folder:
        db, index_dir = f"sqlite:///{folder}/db.sqlite", f"{folder}/index"
        started = time.monotonic()
        report = Retriever(db, index_dir).index_dataset(indexed, labels=labels)
        print(f"indexed {report.indexed} slices in {time.monotonic() - started:.0f} s; query {query.name}, "
              f"series {'/'.join(SERIES_QUERY)} ({len(series)} files)")
        port = free_port()
        server = subprocess.Popen([sys.executable, "-m", "lungcbir.cli", "serve", "--port", str(port),
                                   "--db", db, "--index-dir", index_dir])
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(600):
                try:
                    if httpx.get(f"{url}/healthz").status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.1)
            written = screenshots(url, query, series, args.out_dir)
        finally:
            server.terminate()
            server.wait(10)
    for path in written:
        print(f"wrote {path} ({small_png(path) // 1024} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
