"""Load test of the web app: N concurrent users, each querying a slice and opening one detail view.

Indexes kaggle-lungs-2d and covid-ct-md of the shared data into a temporary store (or uses
--db/--index-dir), starts `lungcbir serve` with a token, then runs ``--users`` users at once.
Each user uploads one slice (a different one per user) to /api/query, then opens the detail
view of its first neighbour as the page does (metadata, series, query and neighbour pixels,
both masks). Reports p50/p95/max latency of the query and of the detail view, and errors.

Usage: python benchmarks/web_load.py [--users 50] [--db URL --index-dir DIR] [--weights PT]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

TOKEN = "load-test-token-0123456789abcdef"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))] if ordered else float("nan")


def user(url: str, path: Path) -> dict:
    """One user: query, then the detail view of the best neighbour; seconds per step, or an error."""
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=url, headers=headers, timeout=600) as client:
        started = time.perf_counter()
        answer = client.post("/api/query", files={"file": (path.name, path.read_bytes())}, data={"k": "8"})
        query_seconds = time.perf_counter() - started
        if answer.status_code != 200:
            return {"error": f"query {answer.status_code}: {answer.text[:200]}", "query": query_seconds}
        answer = answer.json()
        thumbnails = [client.get(n["thumbnail_url"]).status_code for n in answer["neighbors"]]
        query_total = time.perf_counter() - started
        if not answer["neighbors"]:
            return {"query": query_seconds, "query_total": query_total}
        neighbor = answer["neighbors"][0]
        started = time.perf_counter()
        statuses = [client.get(u).status_code for u in (
            f"/api/images/{neighbor['id']}", neighbor["series_url"], answer["pixels"], answer["mask"],
            neighbor["pixels_url"], neighbor["mask_url"])]
        detail_seconds = time.perf_counter() - started
        failed = [s for s in thumbnails + statuses if s != 200]
        result = {"query": query_seconds, "query_total": query_total, "detail": detail_seconds}
        if failed:
            result["error"] = f"statuses {failed}"
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=50)
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[1].parent / "shared" / "data"))
    parser.add_argument("--db")
    parser.add_argument("--index-dir")
    parser.add_argument("--weights")
    args = parser.parse_args()
    data = Path(os.environ.get("LUNGCBIR_DATA", args.data))
    command = [sys.executable, "-m", "lungcbir.cli"]
    folder = tempfile.mkdtemp(prefix="lungcbir-load-")
    store = ["--db", args.db or f"sqlite:///{folder}/db.sqlite", "--index-dir", args.index_dir or f"{folder}/index"]
    if args.weights:
        store += ["--weights", args.weights]
    if not args.db:
        started = time.perf_counter()
        subprocess.run([*command, "index-dataset", str(data / "kaggle-lungs-2d" / "images"), str(data / "covid-ct-md"),
                        "--labels", str(data / "covid-ct-md" / "slice_labels.csv"), "--quiet", *store], check=True)
        print(f"indexed into {folder} in {time.perf_counter() - started:.0f} s")
    token_file = Path(folder) / "token"
    token_file.write_text(TOKEN)
    token_file.chmod(0o600)
    port = free_port()
    server = subprocess.Popen([*command, "serve", "--port", str(port), "--token-file", str(token_file), *store],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{url}/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        stats = httpx.get(f"{url}/api/stats", headers={"Authorization": f"Bearer {TOKEN}"}).json()
        queries = sorted((data / "kaggle-lungs-2d" / "images").glob("*.tif"))
        queries += sorted((data / "covid-ct-md").glob("*/*/*.dcm"))
        chosen = [queries[(n * 7) % len(queries)] for n in range(args.users)]
        started = time.perf_counter()
        with ThreadPoolExecutor(args.users) as pool:
            results = list(pool.map(lambda path: user(url, path), chosen))
        wall = time.perf_counter() - started
    finally:
        server.terminate()
        server.wait(30)
    errors = [r["error"] for r in results if "error" in r]
    print(f"{args.users} concurrent users against {stats['images']} slices ({stats['patients']} patients), "
          f"{os.cpu_count()} CPUs, wall {wall:.1f} s, errors {len(errors)}")
    for key, what in (("query", "query (POST /api/query)"), ("query_total", "query + thumbnails"),
                      ("detail", "detail view (meta, series, 2x pixels, 2x mask)")):
        values = [r[key] for r in results if key in r]
        if values:
            print(f"  {what:<48} p50 {percentile(values, 0.5):6.2f} s  p95 {percentile(values, 0.95):6.2f} s  "
                  f"max {max(values):6.2f} s  mean {statistics.mean(values):6.2f} s")
    for error in errors[:5]:
        print("  error:", error)


if __name__ == "__main__":
    main()
