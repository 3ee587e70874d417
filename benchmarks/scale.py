"""Index kinds at archive scale: build time, memory, query latency and recall@10 vs exact search.

Synthetic vectors are drawn to resemble real lungcbir features: PCA coefficients of real
vectors (from the shared data, through the bundled model, centred as the model centres them)
resampled around randomly chosen real vectors with noise, so the synthetic set keeps the
clusters and the spectrum of real features.

``--dimension`` above the model's adds a second part to the real vectors, as a findings part
would: a random projection of the anatomy part plus as much independent noise, centred and
normalised on its own, the parts joined as :func:`lungcbir.features.centre_parts` joins them.
The bundled model's own vectors have a findings part (773 = 512 + 256 + 5), so its default
dimension needs no such approximation.

Kinds: those of lungcbir's registry; ``compact`` (and any kind that re-ranks) is measured
through a :class:`~lungcbir.store.Store` on SQLite, so its latency includes reading the
candidates' vectors from the database, as in lungcbir (the check every ``Store.search`` makes
that its index is current is timed apart: it is the same for every kind); its rows are
``compact/NPROBE/RERANK``, and ``compact/NPROBE/pq`` the same index's own PQ ranking without
re-ranking. A first pass through the database is not counted (its pages come into the page
cache; its latency is printed). ``sq8`` and ``sq4`` (IVF with 8- or 4-bit scalar codes) are
benchmark-only comparisons. ``--repeats`` repeats the query pass with fresh queries (build
once) and prints the median, with the range over repeats.

``--incremental`` measures what indexing new studies into a large store costs: the
same 640 real slices (158 Kaggle + 482 COVID-19 CT files) indexed with ``Retriever.index_dataset``
into an empty store and into a store of ``--incremental-rows`` rows (1 M; synthetic vectors
fitted to the 640 real ones, the ``compact`` kind, SQLite), interleaved ``--repeats`` times, the
model shared (its start-up is the same for both). Each run is a fresh ``Retriever`` and
``Store``, as a new ``lungcbir index-dataset`` process would be: it loads the index file, adds its
batches and checkpoints at the end; its rows are removed again after each run on the large store.
Then query latency (``Store.search``, batch 1, 200 queries, the generation check included), a
whole ``Retriever.query`` of real slices (segmentation, search, per-patient collapse, percentiles)
and the index's memory at that size; ``--queries-only`` measures these alone on a kept store, and
with ``--far-queries`` the recall@10 of real slices of sources the store is not fitted to
(:func:`far_queries`) at each ``--nprobes`` and ``--reranks``.
``--store-dir`` keeps the large store for a later run (its build is most of the time: ~2 min
insert and ~3-7 min index on 2 cores). Its rows carry the lung mask PNGs of the first empty
run's real rows, in turn, as real rows carry theirs (so a row fills a database page, as in a
real store: 4.3 GB at 1 M rows, where rows without masks made 2.2 GB).

Usage: python benchmarks/scale.py [--sizes 10000,100000,1000000] [--kinds flat,ivf,hnsw,compact,sq8]
                                  [--dimension 773] [--repeats 3] [--nprobes 8,16,32,64,128] [--reranks 100,200]
                                  [--rebuild-rows 1000000] [--weights W.pt]
       python benchmarks/scale.py --incremental [--incremental-rows 1000000] [--repeats 3] [--store-dir DIR]
                                  [--runtime auto] [--weights W.pt]
       python benchmarks/scale.py --queries-only --store-dir DIR   (the query latencies alone)
                                  [--far-queries --nprobes 16,24,32 --reranks 100,200]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from datetime import datetime, timezone

import faiss
import numpy as np
from sqlalchemy import select

from lungcbir.config import Settings
from lungcbir.database import ImageRecord, encode_vector
from lungcbir.datasets import covid_slices, data_root, kaggle_slices
from lungcbir.features import centre_vectors
from lungcbir.inference import LungModel
from lungcbir.io import CTSlice, find_image_files, read_file
from lungcbir.retrieval import Retriever
from lungcbir.store import Store
from lungcbir.vector_index import COMPACT_RERANK, INDEX_KIND_REGISTRY, _ivf_lists, build_index, describe_index


def grown(real: np.ndarray, dimension: int, seed: int = 3) -> np.ndarray:
    """``real`` with a second part of ``dimension - real.shape[1]`` columns (see the module note)."""
    extra = dimension - real.shape[1]
    if extra <= 0:
        return real
    rng = np.random.default_rng(seed)
    projection = np.linalg.qr(rng.normal(size=(real.shape[1], extra)))[0]
    second = real @ projection
    second = second + rng.normal(size=second.shape) * second.std(0)
    second = centre_vectors(second.astype(np.float32), second.mean(0).astype(np.float32))
    return (np.hstack([real, second]) / np.sqrt(2)).astype(np.float32)


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


def summary(passes: list[tuple[float, float, float]]) -> dict:
    """Median and range over repeated query passes of (p50, p95, recall)."""
    columns = np.array(passes)
    return {"p50_ms": np.median(columns[:, 0]), "p95_ms": np.median(columns[:, 1]),
            "recall10": np.median(columns[:, 2]), "p95_range": (columns[:, 1].min(), columns[:, 1].max()),
            "recall_range": (columns[:, 2].min(), columns[:, 2].max())}


def measure(kind: str, vectors: np.ndarray, query_sets: list[tuple[np.ndarray, np.ndarray]],
            nprobes: list[int], reranks: list[int]) -> list[dict]:
    if INDEX_KIND_REGISTRY.get(kind) is not None and INDEX_KIND_REGISTRY[kind].rerank:
        return measure_in_store(kind, vectors, query_sets, nprobes, reranks)

    def stream():
        for start in range(0, len(vectors), 50_000):
            yield np.arange(start, min(start + 50_000, len(vectors)), dtype=np.int64), vectors[start:start + 50_000]

    def sample(size):
        return vectors[np.random.default_rng(1).choice(len(vectors), size=min(size, len(vectors)), replace=False)]

    began = time.perf_counter()
    if kind in ("sq8", "sq4"):  # 8- or 4-bit scalar codes, for comparison only
        lists = _ivf_lists(len(vectors))
        index = faiss.index_factory(vectors.shape[1], f"IVF{lists},SQ{kind[2:]}", faiss.METRIC_INNER_PRODUCT)
        index.train(sample(max(40 * lists, 20_000)))
        for ids, chunk in stream():
            index.add_with_ids(chunk, ids)
    else:
        index = build_index(kind, len(vectors), vectors.shape[1], stream, sample)
    build = time.perf_counter() - began
    memory = len(faiss.serialize_index(index)) / 2**20
    rows = []
    settings: list[int | None] = [None]
    if kind in ("ivf", "sq8", "sq4"):
        settings = list(nprobes)
    for nprobe in settings:
        label = kind
        if nprobe is not None:
            faiss.extract_index_ivf(index).nprobe = nprobe
            label = f"{kind}/{nprobe}"
        passes = [search_quality(index, queries, truth) for queries, truth in query_sets]
        rows.append({"kind": label, "build_s": build, "memory_mb": memory, **summary(passes)})
    return rows


def measure_in_store(kind: str, vectors: np.ndarray, query_sets: list[tuple[np.ndarray, np.ndarray]],
                     nprobes: list[int], reranks: list[int]) -> list[dict]:
    """A re-ranking kind as lungcbir runs it: rows in SQLite, the index rebuilt from them,
    each query through :meth:`Store.search` (index, then the candidates' stored vectors)."""
    folder = tempfile.mkdtemp()
    store = Store(f"sqlite:///{folder}/scale.sqlite", f"{folder}/index")
    store.check_model("synthetic", vectors.shape[1])
    began = time.perf_counter()
    insert_rows(store, vectors)
    inserted = time.perf_counter() - began
    began = time.perf_counter()
    index = store.rebuild_index(kind)
    build = time.perf_counter() - began
    memory = len(faiss.serialize_index(index)) / 2**20
    print(f"  {kind}: {len(vectors)} rows inserted in {inserted:.0f} s (database "
          f"{os.path.getsize(f'{folder}/scale.sqlite') / 2**20:.0f} MiB); build from the database "
          f"{build:.1f} s; {index.ntotal} vectors", flush=True)

    class InStore:  # ids are rows (position + 1); answers as positions, like the other kinds
        @staticmethod
        def search(query, k):  # Store.search less its check that the index is current (below)
            scores, ids = store.vectors._search_index(index, query, k, None, 0)
            return scores, ids - 1

    database = store.vectors.database
    began = time.perf_counter()
    for _ in range(20):
        database.generation()
    generation = (time.perf_counter() - began) / 20 * 1000
    began = time.perf_counter()
    for _ in range(5):
        database.state()
    state = (time.perf_counter() - began) / 5 * 1000
    print(f"  every Store.search first reads the database generation: {generation:.2f} ms, on top of every kind; "
          f"the full state (a row count) {state:.1f} ms at {len(vectors)} rows, read when the generation moved "
          f"and at most every FULL_CHECK_SECONDS otherwise", flush=True)

    class Unranked:  # the same index, its own PQ order
        @staticmethod
        def search(query, k):
            scores, ids = index.search(query, k)
            return scores, ids - 1

    # one pass first, not counted: the database's pages come into the page cache (its p95 is printed)
    first = search_quality(InStore, *query_sets[0])
    print(f"  first (uncounted) pass through the database: p50 {first[0]:.2f} ms, p95 {first[1]:.2f} ms", flush=True)
    rows = []
    entry = INDEX_KIND_REGISTRY[kind]
    ivf = faiss.extract_index_ivf(index)
    for nprobe in nprobes:
        ivf.nprobe = nprobe
        for rerank in reranks:
            INDEX_KIND_REGISTRY[kind] = dataclasses.replace(entry, rerank=rerank)
            passes = [search_quality(InStore, queries, truth) for queries, truth in query_sets]
            rows.append({"kind": f"{kind}/{nprobe}/{rerank}", "build_s": build, "memory_mb": memory,
                         **summary(passes)})
        INDEX_KIND_REGISTRY[kind] = entry
        passes = [search_quality(Unranked, queries, truth) for queries, truth in query_sets]
        rows.append({"kind": f"{kind}/{nprobe}/pq", "build_s": build, "memory_mb": memory, **summary(passes)})
    store.engine.dispose()
    shutil.rmtree(folder, ignore_errors=True)  # 1.5 GB at 1 M rows
    return rows


def insert_rows(store: Store, vectors: np.ndarray, model_id: str = "synthetic",
                masks: Sequence[bytes] = ()) -> None:
    """Rows as lungcbir stores them (float16 vectors), ids 1..n, in one transaction; with
    ``masks`` (lung mask PNGs of real rows, taken in turn) each row carries one, as real rows do
    (a row then fills about a whole database page, as in a real store)."""
    now = datetime.now(timezone.utc)
    with store.engine.begin() as connection:
        for start in range(0, len(vectors), 20_000):
            connection.execute(ImageRecord.__table__.insert(), [
                {"id": n + 1, "path": f"/synthetic/{n}.dcm", "sha256": f"{n:064d}", "frame": 0,
                 "source_format": "dicom", "width": 512, "height": 512, "labels": {}, "lung_fraction": 0.2,
                 "model_id": model_id, "indexed_at": now, "vector": encode_vector(vectors[n]),
                 "mask_png": masks[n % len(masks)] if masks else None}
                for n in range(start, min(start + 20_000, len(vectors)))])


def rebuild_from_database(vectors: np.ndarray) -> None:
    """Insert rows into SQLite as lungcbir does, then time `rebuild_index` (streamed) for ivf."""
    folder = tempfile.mkdtemp()
    store = Store(f"sqlite:///{folder}/scale.sqlite", f"{folder}/index")
    store.check_model("synthetic", vectors.shape[1])
    began = time.perf_counter()
    insert_rows(store, vectors)
    print(f"  inserted {len(vectors)} rows in {time.perf_counter() - began:.0f} s "
          f"(database {os.path.getsize(f'{folder}/scale.sqlite') / 2**20:.0f} MiB)")
    for kind in ("flat", "ivf"):
        began = time.perf_counter()
        index = store.rebuild_index(kind)
        print(f"  rebuild-index --kind {kind} from the database: {time.perf_counter() - began:.0f} s, "
              f"{index.ntotal} vectors")


def incremental_files(count: int = 640) -> list[str]:
    """``count`` real slice files: the Kaggle images, then COVID-19 CT slices (one slice each)."""
    root = data_root()
    files = [path for folder in ("kaggle-lungs-2d/images", "covid19-ct-lungmask/ct")
             for path in find_image_files([str(root / folder)])]
    if len(files) < count:
        raise SystemExit(f"only {len(files)} slice files under {root}; {count} wanted")
    return files[:count]


def timed_run(model: LungModel, db_url: str, index_dir: str, files: list[str]) -> tuple[float, int]:
    """Seconds and slices of one ``index_dataset`` run through a fresh Retriever and Store."""
    retriever = Retriever(db_url=db_url, index_dir=index_dir, settings=Settings.from_environment())
    retriever._model = model  # the model's start-up is the same for both stores: not timed
    began = time.perf_counter()
    report = retriever.index_dataset(files)
    seconds = time.perf_counter() - began
    retriever.store().engine.dispose()
    if report.failures or report.indexed != len(files):
        raise SystemExit(f"indexed {report.indexed} of {len(files)} ({len(report.failures)} failures)")
    return seconds, report.indexed


def large_store(folder: str, rows: int, model: LungModel, real: np.ndarray,
                masks: Sequence[bytes] = ()) -> tuple[str, str]:
    """A store of ``rows`` synthetic rows of ``model``'s id and dimension (with ``masks``, see
    :func:`insert_rows`), compact index built and saved; reused when ``folder`` holds one already."""
    db_url, index_dir = f"sqlite:///{folder}/large.sqlite", f"{folder}/index"
    store = Store(db_url, index_dir)
    if store.count() == rows and store.model_id == model.model_id and store.index_kind == "compact":
        with store.engine.connect() as connection:
            with_masks = connection.execute(select(ImageRecord.mask_png).where(ImageRecord.id == 1)).scalar()
        store.engine.dispose()
        if masks and with_masks is None:
            raise SystemExit(f"{folder} holds a store whose rows carry no lung mask, as real rows do (made by an "
                             f"earlier version of this script); give an empty or new folder")
        print(f"  reusing the {rows}-row store in {folder}", flush=True)
        return db_url, index_dir
    if store.count():
        raise SystemExit(f"{folder} holds another store; give an empty or new folder")
    store.check_model(model.model_id, model.dimension)
    began = time.perf_counter()
    insert_rows(store, synthetic(real, rows), model.model_id, masks)
    inserted = time.perf_counter() - began
    began = time.perf_counter()
    store.rebuild_index("compact")
    print(f"  large store: {rows} rows inserted in {inserted:.0f} s, compact index built and saved in "
          f"{time.perf_counter() - began:.0f} s", flush=True)
    store.engine.dispose()
    return db_url, index_dir


def query_latency(model: LungModel, db_url: str, index_dir: str, real: np.ndarray, slices: int = 24) -> None:
    """Query latency at the large store's size: ``Store.search`` (batch 1, 200 synthetic queries
    fitted to ``real``, the generation check included) and a whole ``Retriever.query`` (default
    options: one real Kaggle test slice read beforehand, segmented, searched, its neighbours
    collapsed per patient and explained; ``slices`` of them, twice); and the index's memory."""
    store = Store(db_url, index_dir)
    index = store.index()
    memory = len(faiss.serialize_index(index)) / 2**20
    queries = synthetic(real, 400, seed=77)
    for query in queries[:200]:  # the database's pages into the page cache: not counted
        store.search(query[None], 10)
    latencies = []
    for query in queries[200:]:
        began = time.perf_counter()
        store.search(query[None], 10)
        latencies.append((time.perf_counter() - began) * 1000)
    print(f"  query through Store.search at {index.ntotal} rows ({describe_index(index)}): p50 "
          f"{np.percentile(latencies, 50):.2f} ms, p95 {np.percentile(latencies, 95):.2f} ms; index memory "
          f"{memory:.1f} MiB", flush=True)
    store.engine.dispose()
    retriever = Retriever(db_url=db_url, index_dir=index_dir, settings=Settings.from_environment())
    items = [read_file(case.image)[0] for case in kaggle_slices()["test"][:slices]]
    retriever.query(items[0], k=5)  # the model's session and the percentile reference: not counted
    whole = []
    for _ in range(2):
        for item in items:
            began = time.perf_counter()
            retriever.query(item, k=5)
            whole.append((time.perf_counter() - began) * 1000)
    print(f"  whole query through Retriever.query (k 5, one case per patient) at {index.ntotal} rows: p50 "
          f"{np.percentile(whole, 50):.0f} ms, p95 {np.percentile(whole, 95):.0f} ms ({len(whole)} queries of "
          f"{slices} real slices)", flush=True)


def queries_only(model: LungModel, store_dir: str) -> None:
    """:func:`query_latency` on a large store kept by an earlier ``--incremental --store-dir``
    run (its synthetic queries fitted to the store's first 640 rows)."""
    db_url, index_dir = f"sqlite:///{store_dir}/large.sqlite", f"{store_dir}/index"
    store = Store(db_url, index_dir)
    if store.model_id != model.model_id:
        raise SystemExit(f"{store_dir} holds no large store of model {model.model_id}: make one with "
                         f"--incremental --store-dir {store_dir}")
    real = next(store.iter_vectors(chunk=640))[1]
    store.engine.dispose()
    query_latency(model, db_url, index_dir, real)


def far_queries(model: LungModel) -> np.ndarray:
    """Vectors of real slices from sources the large store's vectors are not fitted to
    (covid-ct-md's DICOM series, tcga-ct-slices' TIFFs), each also turned a quarter and, for HU
    slices, exported as an 8-bit lung-window picture: queries an archive's neighbours lie
    further from than the fitted ones."""
    root = data_root()
    files = list(find_image_files([root / "tcga-ct-slices" / "tiff", root / "covid-ct-md"]))
    slices = [read_file(path)[0] for path in files]
    slices += [dataclasses.replace(item, pixels=np.ascontiguousarray(np.rot90(item.pixels))) for item in slices]
    slices += [CTSlice((np.clip((item.pixels + 1350) / 1500, 0, 1) * 255).astype(np.uint8), "uint8", item.path,
                       "png") for item in slices if item.intensity == "hu"]
    return np.stack([result.vector for result in model.segment(slices)]).astype(np.float32)


def far_query_recall(model: LungModel, store_dir: str, nprobes: list[int], reranks: list[int]) -> None:
    """recall@10 against exact search of :func:`far_queries` on a large store kept by an earlier
    ``--incremental --store-dir`` run, for each nprobe and re-rank depth, through the store's
    own index and re-ranking."""
    store = Store(f"sqlite:///{store_dir}/large.sqlite", f"{store_dir}/index")
    queries = far_queries(model)
    best_scores = np.full((len(queries), 0), -np.inf, np.float32)
    best_ids = np.zeros((len(queries), 0), np.int64)
    for ids, vectors in store.iter_vectors(chunk=100_000):
        scores = queries @ vectors.T
        best_scores = np.hstack([best_scores, scores])
        best_ids = np.hstack([best_ids, np.broadcast_to(ids, scores.shape)])
        keep = np.argpartition(-best_scores, 9, axis=1)[:, :10]
        best_scores, best_ids = np.take_along_axis(best_scores, keep, 1), np.take_along_axis(best_ids, keep, 1)
    index = store.index()
    ivf = faiss.extract_index_ivf(index)
    print(f"  {len(queries)} far queries (covid-ct-md, tcga-ct-slices, turned, 8-bit exports) on {index.ntotal} rows, "
          f"median best similarity {np.median(best_scores.max(1)):.3f}", flush=True)
    for nprobe in nprobes:
        ivf.nprobe = nprobe
        for rerank in reranks:
            found = 0
            for query, truth in zip(queries, best_ids):
                candidates = index.search(query[None], rerank)[1]
                answer = store.vectors._reranked(query[None], candidates, 10)[1][0]
                found += len(set(truth.tolist()) & set(answer.tolist()))
            print(f"  far queries, compact/{nprobe}/{rerank}: recall@10 {found / (10 * len(queries)):.4f}", flush=True)
    store.engine.dispose()


def incremental(model: LungModel, rows: int, repeats: int, store_dir: str | None, slices: int = 640) -> None:
    """Index the same real slices into an empty and into a large store, interleaved (see the module note)."""
    files = incremental_files(slices)
    scratch = tempfile.mkdtemp()
    print(f"incremental: {len(files)} real slices, model {model.model_id} ({model.runtime} runtime), "
          f"{faiss.omp_get_max_threads()} FAISS threads, {repeats} interleaved repeats; load average "
          f"{os.getloadavg()[0]:.1f} at the start", flush=True)
    warm = f"{scratch}/warm"  # the model's first batches (ONNX session, caches) outside the timings
    timed_run(model, f"sqlite:///{warm}.sqlite", f"{warm}-index", files[:32])
    folder = store_dir or f"{scratch}/large"
    os.makedirs(folder, exist_ok=True)
    rates: dict[str, list[float]] = {"empty": [], "large": []}
    large: tuple[str, str] | None = None
    for repeat in range(repeats):
        for name in ("empty", "large"):
            if name == "empty":
                db_url, index_dir = f"sqlite:///{scratch}/empty{repeat}.sqlite", f"{scratch}/empty{repeat}-index"
            else:
                if large is None:  # fitted to the first empty run's real vectors, with its real masks
                    first = Store(f"sqlite:///{scratch}/empty0.sqlite", f"{scratch}/empty0-index")
                    real = np.concatenate([v for _, v in first.iter_vectors()])
                    with first.engine.connect() as connection:
                        masks = connection.execute(select(ImageRecord.mask_png).where(
                            ImageRecord.mask_png.is_not(None)).order_by(ImageRecord.id)).scalars().all()
                    large = large_store(folder, rows, model, real, masks)
                db_url, index_dir = large
            seconds, count = timed_run(model, db_url, index_dir, files)
            rates[name].append(count / seconds)
            print(f"  repeat {repeat + 1}: {name:>5} store {count / seconds:6.1f} slices/s ({seconds:.1f} s, load "
                  f"average {os.getloadavg()[0]:.1f})", flush=True)
            if name == "large":  # back to the same store for the next repeat (a removal: written at once)
                store = Store(db_url, index_dir)
                store.remove(store.ids_for(paths=files))
                store.engine.dispose()
    ratios = [large / empty for large, empty in zip(rates["large"], rates["empty"])]
    empty_rate, large_rate, ratio = (float(np.median(values)) for values in (rates["empty"], rates["large"], ratios))
    print(f"incremental: empty {empty_rate:.1f} slices/s, 1M {large_rate:.1f} slices/s, ratio {ratio:.2f} "
          f"(median of {repeats}; ratios {', '.join(f'{r:.2f}' for r in ratios)}; {rows} rows)")
    assert large is not None
    query_latency(model, *large, real)
    shutil.rmtree(scratch, ignore_errors=True)  # 2 GB at 1 M rows, unless kept in --store-dir


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--incremental", action="store_true",
                        help="index 640 real slices into an empty and into a large store, interleaved")
    parser.add_argument("--incremental-rows", type=int, default=1_000_000, help="rows of the large store")
    parser.add_argument("--incremental-slices", type=int, default=640, help="real slices indexed (a smoke test: fewer)")
    parser.add_argument("--store-dir", help="--incremental: keep (and reuse) the large store in this folder")
    parser.add_argument("--queries-only", action="store_true",
                        help="only the query latencies, on the large store kept in --store-dir")
    parser.add_argument("--far-queries", action="store_true",
                        help="--queries-only: also recall@10 of real slices of other sources at each --nprobes and "
                             "--reranks")
    parser.add_argument("--runtime", help="where the network runs (default: the settings', auto)")
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--kinds", default="flat,ivf,hnsw,compact")
    parser.add_argument("--dimension", type=int, default=0, help="vector length (default: the model's)")
    parser.add_argument("--repeats", type=int, default=1, help="query passes, each with 200 fresh queries")
    parser.add_argument("--nprobes", default="8,16,32,64,128", help="nprobe values measured (IVF kinds)")
    parser.add_argument("--reranks", help=f"candidates re-ranked, measured for compact (default {COMPACT_RERANK})")
    parser.add_argument("--hnsw-max", type=int, default=100_000, help="largest size to build HNSW at")
    parser.add_argument("--rebuild-rows", type=int, default=0)
    parser.add_argument("--weights")
    args = parser.parse_args()
    model = LungModel.load(args.weights, runtime=args.runtime)
    if args.queries_only:
        if not args.store_dir:
            raise SystemExit("--queries-only needs --store-dir (a large store kept by --incremental)")
        queries_only(model, args.store_dir)
        if args.far_queries:
            far_query_recall(model, args.store_dir, [int(n) for n in args.nprobes.split(",")],
                             [int(n) for n in args.reranks.split(",")] if args.reranks else [COMPACT_RERANK])
        return
    if args.incremental:
        incremental(model, args.incremental_rows, args.repeats, args.store_dir, args.incremental_slices)
        return
    real = grown(real_vectors(model), args.dimension or model.dimension)
    print(f"fitted to {len(real)} real feature vectors of dimension {real.shape[1]} (model {model.dimension}, "
          f"centred: {model.settings.centre is not None}); {faiss.omp_get_max_threads()} threads; "
          f"{args.repeats} query passes of 200")
    print(f"{'vectors':>9} {'kind':>14} {'build s':>8} {'memory MiB':>10} {'p50 ms':>7} {'p95 ms':>7} "
          f"{'recall@10':>9}  (p95 range, recall range over passes)")
    nprobes = [int(n) for n in args.nprobes.split(",")]
    reranks = [int(n) for n in args.reranks.split(",")] if args.reranks else [COMPACT_RERANK]
    for size in map(int, args.sizes.split(",")):
        vectors = synthetic(real, size)
        exact = faiss.IndexFlatIP(vectors.shape[1])
        exact.add(vectors)
        query_sets = []
        for repeat in range(args.repeats):
            queries = synthetic(real, 200, seed=99 + repeat)
            query_sets.append((queries, exact.search(queries, 10)[1]))
        del exact
        for kind in args.kinds.split(","):
            if kind == "hnsw" and size > args.hnsw_max:
                print(f"{size:>9} {kind:>14}  skipped: build time on 2 cores (see docs/scale.md)")
                continue
            for row in measure(kind, vectors, query_sets, nprobes, reranks):
                print(f"{size:>9} {row['kind']:>14} {row['build_s']:8.1f} {row['memory_mb']:10.1f} "
                      f"{row['p50_ms']:7.2f} {row['p95_ms']:7.2f} {row['recall10']:9.3f}  "
                      f"({row['p95_range'][0]:.2f}-{row['p95_range'][1]:.2f}, "
                      f"{row['recall_range'][0]:.3f}-{row['recall_range'][1]:.3f})", flush=True)
    if args.rebuild_rows:
        rebuild_from_database(synthetic(real, args.rebuild_rows, seed=5))


if __name__ == "__main__":
    main()
