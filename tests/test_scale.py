"""Several indexing machines on one PostgreSQL database; parallel reading."""

from __future__ import annotations

import subprocess
import sys

import pytest
from sqlalchemy import create_engine, text

from lungcbir.phantom import write_phantom
from lungcbir.retrieval import Retriever
from lungcbir.store import Store


@pytest.mark.slow
def test_three_concurrent_indexers_on_overlapping_folders(tmp_path, tiny_weights, backend, store_paths):
    if backend != "postgresql":
        pytest.skip("several machines share a server database; SQLite is the single-machine store")
    write_phantom(tmp_path / "data", slices=12, size=64, patients=3)
    dicom, png = tmp_path / "data" / "dicom", tmp_path / "data" / "png"
    folders = [[dicom, png / "phantom01"], [png, dicom / "phantom02"], [dicom, png]]
    runs = []
    for number, inputs in enumerate(folders):
        # each "machine" has its own index folder; the database is shared
        runs.append(subprocess.Popen(
            [sys.executable, "-m", "lungcbir.cli", "index-dataset", *map(str, inputs), "--quiet",
             "--commit-every", "5", "--db", store_paths["db_url"], "--index-dir", str(tmp_path / f"index{number}"),
             "--weights", tiny_weights], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [run.communicate(timeout=300) for run in runs]
    assert [run.returncode for run in runs] == [0, 0, 0], outputs
    engine = create_engine(store_paths["db_url"])
    with engine.connect() as connection:
        rows = connection.execute(text("SELECT count(*), count(DISTINCT (sha256, frame)) FROM images")).one()
    engine.dispose()
    assert rows == (72, 72)
    indexed = sum(int(out.split("indexed ")[1].split(",")[0]) for out, _ in outputs)
    assert indexed == 72  # every image counted as indexed by exactly one run
    for number in range(3):
        # a run that ended before another machine's last commit left its file at its own last
        # checkpoint (check notes the rows it lacks); the next run's checkpoint brings it up
        store = Store(store_paths["db_url"], tmp_path / f"index{number}")
        assert store.checkpoint().ntotal == 72 and store.check() == []


@pytest.mark.slow
def test_parallel_reading_gives_the_same_store(tmp_path, tiny_weights, phantom_dir, store_paths):
    report = Retriever(weights=tiny_weights, workers=2, **store_paths).index_dataset([phantom_dir / "dicom"])
    assert report.indexed == 12 and report.failed == 0
    serial = Retriever(weights=tiny_weights, db_url=f"sqlite:///{tmp_path}/serial.sqlite",
                       index_dir=tmp_path / "serial").index_dataset([phantom_dir / "dicom"])
    assert serial.indexed == 12
    a = sorted((r.path, r.slice_index) for r in Store(**store_paths).records(range(1, 100)).values())
    b = sorted((r.path, r.slice_index) for r in Store(f"sqlite:///{tmp_path}/serial.sqlite",
                                                       tmp_path / "serial").records(range(1, 100)).values())
    assert a == b
