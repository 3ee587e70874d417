"""Click to answer: how long the web API takes to answer one slice and one whole series.

Indexes every covid-ct-md series of the shared data but one (normal001, 26 DICOM files) into a
temporary store with the bundled model, then, through the web app in-process (the FastAPI test
client: upload, decoding, the network, the search and the JSON answer; no browser drawing),
times ``/api/query`` on single slices of normal001 and ``/api/query-series`` on all 26 files
(``other_patients``), interleaved, ``--repeats`` times. Prints median, min and max of each.

``--levels`` measures what the answers pair instead: all six covid-ct-md series stored, each
queried as a series with ``other_patients``; for the best case, the |level difference| of every
level-aligned pair (median pooled and per series, a 95 % interval from resampling the series,
which are one per patient), pairs from a query or stored slice without lungs, and cases of the
query's own patient among all cases returned.

Usage: PYTHONPATH=. python benchmarks/click_to_answer.py [--repeats 5] [--threads 2] [--levels]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from fastapi.testclient import TestClient

from lungcbir import Retriever
from lungcbir.config import Settings
from lungcbir.datasets import data_root
from lungcbir.web import create_app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--levels", action="store_true", help="measure the level-aligned pairs instead of the time")
    args = parser.parse_args()
    root = data_root() / "covid-ct-md"
    if not root.is_dir():
        print(f"no shared data at {root}: nothing to measure", file=sys.stderr)
        return
    if args.levels:
        levels(root, args.threads)
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


def levels(root: Path, threads: int, resamples: int = 2000) -> None:
    import numpy as np
    import pydicom

    series = [folder for folder in sorted(root.glob("*/*")) if folder.is_dir()]
    with tempfile.TemporaryDirectory() as folder:
        retriever = Retriever(db_url=f"sqlite:///{folder}/db.sqlite", index_dir=f"{folder}/index",
                              settings=Settings(threads=threads))
        report = retriever.index_dataset(series)
        print(f"stored {report.indexed} slices of {len(series)} series", flush=True)
        client = TestClient(create_app(retriever), base_url="http://localhost")
        differences: dict[str, list[float]] = {}
        outside = own = cases = 0
        for query in series:
            files = sorted(query.iterdir())
            patient = str(pydicom.dcmread(files[0], stop_before_pixels=True).PatientID)
            answer = client.post("/api/query-series", data={"other_patients": "true", "k": "5"},
                                 files=[("files", (f.name, f.read_bytes())) for f in files])
            answer.raise_for_status()
            found = answer.json()["cases"]
            cases += len(found)
            own += sum(case["case"] == f"patient:{patient}" for case in found)
            aligned = found[0]["aligned"] if found else []
            outside += sum(pair["query_level"] is None or pair["level"] is None for pair in aligned)
            differences[query.name] = [abs(pair["query_level"] - pair["level"]) for pair in aligned
                                       if pair["query_level"] is not None and pair["level"] is not None]
    pooled = [d for values in differences.values() for d in values]
    rng = np.random.default_rng(0)
    names = list(differences)
    medians = [np.median([d for name in rng.choice(names, len(names)) for d in differences[name]])
               for _ in range(resamples)]
    low, high = np.percentile(medians, [2.5, 97.5])
    per_series = ", ".join(f"{name} {np.median(values):.3f}" for name, values in differences.items() if values)
    print(f"best case's level-aligned pairs: median |level difference| {np.median(pooled):.3f} "
          f"[{low:.3f}, {high:.3f}] over {len(pooled)} pairs (per series: {per_series}); "
          f"two random levels: median about 0.29")
    print(f"pairs with a slice outside the lungs: {outside}; own-patient cases: {own} of {cases}")


if __name__ == "__main__":
    main()
