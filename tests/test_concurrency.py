"""Several real processes on one store: readers during a write, and a second writer."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest

from lungcbir.phantom import write_phantom
from lungcbir.retrieval import Retriever
from lungcbir.store import Store


@pytest.mark.slow
def test_queries_during_indexing_and_a_second_writer(tmp_path, tiny_weights, store_paths):
    write_phantom(tmp_path / "data", slices=20, size=64, patients=3)
    base = [sys.executable, "-m", "lungcbir.cli", "index-dataset", "--quiet", "--db", store_paths["db_url"],
            "--index-dir", store_paths["index_dir"], "--weights", tiny_weights]
    # seed the store so queries have something to find from the start
    subprocess.run([*base, str(tmp_path / "data" / "png" / "phantom01")], check=True, capture_output=True)
    writer = subprocess.Popen([*base, "--commit-every", "3", "--batch-size", "3",
                               str(tmp_path / "data" / "dicom"), str(tmp_path / "data" / "png")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    probe = np.tile(np.arange(64, dtype=np.uint8) * 4, (64, 1))
    seeded = Store(**store_paths).count()
    seen, second = [], None
    while writer.poll() is None:
        retriever = Retriever(weights=tiny_weights, **store_paths)
        result = retriever.query(probe, k=500, per_patient=0)
        ids = [n.id for n in result.neighbors]
        assert len(ids) == len(set(ids))
        assert set(retriever.store().records(ids)) == set(ids)  # never a vector without its row
        seen.append(len(ids))
        if second is None and len(ids) > seeded:  # the first run holds the lock and is writing
            second = subprocess.Popen([*base, str(tmp_path / "data" / "png" / "phantom02")],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert writer.returncode == 0, writer.stderr.read()
    assert second is not None, "the first run finished before readers saw it write"
    _, second_errors = second.communicate(timeout=120)
    if second.returncode != 0:  # it ran while the first held the lock
        assert second.returncode == 5 and "holds the lock" in second_errors
    store = Store(**store_paths)
    assert store.check() == [] and store.count() == 120
    assert len(seen) >= 2 and seen == sorted(seen)  # readers only ever saw the store grow


def test_simultaneous_catch_up_from_threads(store_paths, tmp_path):
    """A server (own index folder, requests in a thread pool) while another process added rows."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from conftest import records, unit

    writer = Store(**store_paths)
    writer.check_model("m1", 8)
    writer.add(records(20), unit(20))
    server = Store(store_paths["db_url"], tmp_path / "server-index")
    server.index()
    writer.add(records(400, start=100), unit(400, seed=2))
    stream = server.database.iter_vectors  # what the index catches up and rebuilds from
    streamed = []

    def slow_stream(*args, **kwargs):  # a slow database widens the window between check and add
        kwargs.setdefault("chunk", 50)
        for chunk in stream(*args, **kwargs):
            streamed.append(len(chunk[0]))
            time.sleep(0.05)
            yield chunk

    server.database.iter_vectors = slow_stream
    start = threading.Barrier(30)

    def request(number: int) -> int:
        start.wait()
        return server.stats().index_vectors if number % 2 else server.index().ntotal

    with ThreadPoolExecutor(30) as pool:
        answers = list(pool.map(request, range(30)))
    assert streamed, "the slow stream never ran: the index reads its vectors elsewhere"
    assert answers == [420] * 30  # every request saw the index of exactly the rows stored
    assert server.index().ntotal == server.count() == 420
    ids = server.search(unit(10, seed=3), 420)[1]
    assert all(len(set(row.tolist())) == len(row) for row in ids)
    assert Store(store_paths["db_url"], tmp_path / "server-index").check() == []


def test_openings_of_a_new_sqlite_database_at_once_all_get_its_tables(tmp_path):
    """Machines starting at once on a database file that does not exist yet (here threads, each
    with its own engine, as processes would have): each creates the schema, and none may fail
    with "table images already exists"."""
    import threading

    from lungcbir.database import Database

    for trial in range(5):  # the race is narrow: several fresh files make it show
        url = f"sqlite:///{tmp_path / f'new{trial}.sqlite'}"
        barrier, errors = threading.Barrier(8), []

        def open_database():
            barrier.wait()
            try:
                Database(url).engine.dispose()
            except Exception as error:  # noqa: BLE001 - the test reports whatever went wrong
                errors.append(str(error))

        threads = [threading.Thread(target=open_database) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
