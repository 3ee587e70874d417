"""Indexing killed with SIGKILL at random moments, then run again, must end exactly like one clean run."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest
from sqlalchemy import create_engine, text

from lungcbir.phantom import write_phantom
from lungcbir.store import Store

KILL_POINTS = int(os.environ.get("LUNGCBIR_KILL_POINTS", "8"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    write_phantom(folder, slices=10, size=64, patients=3)
    return folder


def command(store_paths, weights, corpus):
    return [sys.executable, "-m", "lungcbir.cli", "index-dataset", str(corpus / "dicom"), str(corpus / "png"),
            "--quiet", "--commit-every", "4", "--batch-size", "4", "--db", store_paths["db_url"],
            "--index-dir", store_paths["index_dir"], "--weights", weights]


def stored_keys(db_url: str) -> list[tuple[str, int]]:
    engine = create_engine(db_url)
    with engine.connect() as connection:
        keys = [tuple(row) for row in connection.execute(text("SELECT sha256, frame FROM images"))]
    engine.dispose()
    return keys


@pytest.mark.slow
def test_sigkill_at_random_points_loses_and_duplicates_nothing(store_paths, tiny_weights, corpus):
    run = command(store_paths, tiny_weights, corpus)
    began = time.perf_counter()
    subprocess.run(run, check=True, capture_output=True)
    clean_duration = time.perf_counter() - began
    reference = sorted(stored_keys(store_paths["db_url"]))
    assert len(reference) == 60
    rng = random.Random(1234)
    for trial in range(KILL_POINTS):
        Store(**store_paths).remove(Store(**store_paths).ids_for(under=[corpus]))
        # kill once or twice, anywhere from start-up to the end of a clean run
        for _ in range(rng.choice([1, 2])):
            process = subprocess.Popen(run, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(rng.uniform(0.2, clean_duration))
            process.send_signal(signal.SIGKILL)
            process.wait()
        finished = subprocess.run(run, capture_output=True, text=True)
        assert finished.returncode == 0, finished.stderr
        keys = stored_keys(store_paths["db_url"])
        assert sorted(keys) == reference, f"trial {trial}: rows differ from a clean run"
        assert len(keys) == len(set(keys)), f"trial {trial}: duplicated rows"
        store = Store(**store_paths)
        assert store.check() == [], f"trial {trial}: {store.check()}"
