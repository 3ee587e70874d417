"""Index kinds at archive scale: build time, memory, query latency and recall@10 vs exact search.

Synthetic vectors are drawn to resemble real lungcbir features: PCA coefficients of real
vectors (from the shared data, through the bundled model) resampled around randomly chosen real
vectors with noise, so the synthetic set keeps the clusters and the spectrum of real features.

Usage: python benchmarks/scale.py [--sizes 10000,100000,1000000] [--kinds flat,ivf,hnsw]
                                  [--rebuild-rows 1000000] [--weights W.pt]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from datetime import datetime, timezone

import faiss
import numpy as np

from lungcbir.datasets import covid_slices, kaggle_slices
from lungcbir.inference import LungModel
from lungcbir.io import read_file
from lungcbir.store import ImageRecord, Store, build_index, encode_vector


def real_vectors(model: LungModel) -> np.ndarray:
    paths = [s.image for part in (kaggle_slices(), covid_slices()) for split in part.values() for s in split]
    slices = [read_file(p)[0] for p in paths]
    return np.stack([r.vector for r in model.segment(slices, 32)])


def synthetic(real: np.ndarray, count: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mean = real.mean(0)
    _, singular, basis = np.linalg.svd(real - mean, full_matrices=False)
    coefficients = (real - mean) @ basis.T
    spread = singular / np.sqrt(len(real))
    out = np.empty((count, real.shape[1]), np.float32)
    for start in range(0, count, 100_000):
        n = min(100_000, count - start)
        centre = coefficients[rng.integers(len(real), size=n)]
        sample = centre + rng.normal(size=(n, len(spread))) * spread * 0.35
        block = mean + sample @ basis
        out[start:start + n] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def search_quality(index, queries: np.ndarray, truth: np.ndarray) -> tuple[float, float, float]:
    latencies, found = [], []
    for query in queries:
        began = time.perf_counter()
        _, ids = index.search(query[None], 10)
        latencies.append((time.perf_counter() - began) * 1000)
        found.append(ids[0])
    recall = np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth)])
    return float(np.percentile(latencies, 50)), float(np.percentile(latencies, 95)), float(recall)


def measure(kind: str, vectors: np.ndarray, queries: np.ndarray, truth: np.ndarray) -> list[dict]:
    def stream():
        for start in range(0, len(vectors), 50_000):
            yield np.arange(start, min(start + 50_000, len(vectors)), dtype=np.int64), vectors[start:start + 50_000]

    def sample(size):
        return vectors[np.random.default_rng(1).choice(len(vectors), size=min(size, len(vectors)), replace=False)]

    began = time.perf_counter()
    index = build_index(kind, len(vectors), vectors.shape[1], stream, sample)
    build = time.perf_counter() - began
    memory = len(faiss.serialize_index(index)) / 2**20
    rows = []
    settings = [None]
    if kind == "ivf":
        settings = [8, 16, 32, 64, 128]
    for nprobe in settings:
        label = kind
        if nprobe is not None:
            faiss.extract_index_ivf(index).nprobe = nprobe
            label = f"ivf/{nprobe}"
        p50, p95, recall = search_quality(index, queries, truth)
        rows.append({"kind": label, "build_s": build, "memory_mb": memory, "p50_ms": p50, "p95_ms": p95,
                     "recall10": recall})
    return rows


def rebuild_from_database(vectors: np.ndarray) -> None:
    """Insert rows into SQLite as lungcbir does, then time `rebuild_index` (streamed) for ivf."""
    folder = tempfile.mkdtemp()
    store = Store(f"sqlite:///{folder}/scale.sqlite", f"{folder}/index")
    store.check_model("synthetic", vectors.shape[1])
    now = datetime.now(timezone.utc)
    began = time.perf_counter()
    with store.engine.begin() as connection:
        for start in range(0, len(vectors), 20_000):
            connection.execute(ImageRecord.__table__.insert(), [
                {"path": f"/synthetic/{n}.dcm", "sha256": f"{n:064d}", "frame": 0, "source_format": "dicom",
                 "width": 512, "height": 512, "labels": {}, "lung_fraction": 0.2, "model_id": "synthetic",
                 "indexed_at": now, "vector": encode_vector(vectors[n])}
                for n in range(start, min(start + 20_000, len(vectors)))])
    print(f"  inserted {len(vectors)} rows in {time.perf_counter() - began:.0f} s "
          f"(database {os.path.getsize(f'{folder}/scale.sqlite') / 2**20:.0f} MiB)")
    for kind in ("flat", "ivf"):
        began = time.perf_counter()
        index = store.rebuild_index(kind)
        print(f"  rebuild-index --kind {kind} from the database: {time.perf_counter() - began:.0f} s, "
              f"{index.ntotal} vectors")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--kinds", default="flat,ivf,hnsw")
    parser.add_argument("--hnsw-max", type=int, default=100_000, help="largest size to build HNSW at")
    parser.add_argument("--rebuild-rows", type=int, default=0)
    parser.add_argument("--weights")
    args = parser.parse_args()
    real = real_vectors(LungModel.load(args.weights))
    print(f"fitted to {len(real)} real feature vectors of dimension {real.shape[1]}; "
          f"{faiss.omp_get_max_threads()} threads")
    print(f"{'vectors':>9} {'kind':>8} {'build s':>8} {'memory MB':>10} {'p50 ms':>7} {'p95 ms':>7} {'recall@10':>9}")
    for size in map(int, args.sizes.split(",")):
        vectors = synthetic(real, size)
        queries = synthetic(real, 200, seed=99)
        exact = faiss.IndexFlatIP(vectors.shape[1])
        exact.add(vectors)
        truth = exact.search(queries, 10)[1]
        del exact
        for kind in args.kinds.split(","):
            if kind == "hnsw" and size > args.hnsw_max:
                print(f"{size:>9} {kind:>8}  skipped: build time on 2 cores (see docs/scale.md)")
                continue
            for row in measure(kind, vectors, queries, truth):
                print(f"{size:>9} {row['kind']:>8} {row['build_s']:8.1f} {row['memory_mb']:10.1f} "
                      f"{row['p50_ms']:7.2f} {row['p95_ms']:7.2f} {row['recall10']:9.3f}", flush=True)
    if args.rebuild_rows:
        rebuild_from_database(synthetic(real, args.rebuild_rows, seed=5))


if __name__ == "__main__":
    main()
