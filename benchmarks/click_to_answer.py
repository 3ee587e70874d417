"""Click to answer: how long the web API takes to answer one slice and one whole series.

Indexes every covid-ct-md series of the shared data but one (normal001, 26 DICOM files) into a
temporary store with the bundled model, then, through the web app in-process (the FastAPI test
client: upload, decoding, the network, the search and the JSON answer; no browser drawing),
times ``/api/query`` on single slices of normal001 and ``/api/query-series`` on all 26 files
(``other_patients``), interleaved, ``--repeats`` times. Prints median, min and max of each.

Usage: PYTHONPATH=. python benchmarks/click_to_answer.py [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

from fastapi.testclient import TestClient

from lungcbir import Retriever
from lungcbir.config import Settings
from lungcbir.datasets import data_root
from lungcbir.web import create_app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    root = data_root() / "covid-ct-md"
    if not root.is_dir():
        print(f"no shared data at {root}: nothing to measure", file=sys.stderr)
        return
    query_series = root / "normal" / "normal001"
    stored = [folder for folder in sorted(root.glob("*/*")) if folder.is_dir() and folder != query_series]
    files = sorted(query_series.iterdir())
    with tempfile.TemporaryDirectory() as folder:
        settings = Settings(threads=args.threads)
        retriever = Retriever(db_url=f"sqlite:///{folder}/db.sqlite", index_dir=f"{folder}/index", settings=settings)
        report = retriever.index_dataset(stored)
        print(f"stored {report.indexed} slices of {len(stored)} series; query series {query_series.name}: "
              f"{len(files)} files", flush=True)
        client = TestClient(create_app(retriever), base_url="http://localhost")
        slices, series = [], []
        for repeat in range(args.repeats):
            one = files[(repeat * 7) % len(files)]
            began = time.perf_counter()
            answer = client.post("/api/query", files={"file": (one.name, one.read_bytes())})
            slices.append(time.perf_counter() - began)
            answer.raise_for_status()
            began = time.perf_counter()
            answer = client.post("/api/query-series", data={"other_patients": "true"},
                                 files=[("files", (f.name, f.read_bytes())) for f in files])
            series.append(time.perf_counter() - began)
            answer.raise_for_status()
        for name, seconds in (("one slice", slices), (f"series of {len(files)} files", series)):
            print(f"{name}: median {statistics.median(seconds):.2f} s, min {min(seconds):.2f} s, "
                  f"max {max(seconds):.2f} s over {len(seconds)}", flush=True)


if __name__ == "__main__":
    main()
