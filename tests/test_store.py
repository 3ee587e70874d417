import numpy as np
import pytest
from conftest import records, unit

from lungcbir.database import ImageRecord, RegionRows, safe_url
from lungcbir.errors import StoreError
from lungcbir.store import Store


def test_index_ids_are_row_keys(store_paths):
    store = Store(**store_paths)
    store.check_model("m1", 8)
    vectors = unit(5)
    ids = store.add(records(5), vectors)
    scores, found = store.search(vectors, 1)
    assert found[:, 0].tolist() == ids
    assert np.allclose(scores[:, 0], 1.0, atol=1e-3)


def test_missing_or_stale_index_is_rebuilt(store_paths):
    store = Store(**store_paths)
    store.check_model("m1", 8)
    vectors = unit(6)
    ids = store.add(records(6), vectors)
    store.index_path.unlink()
    fresh = Store(**store_paths)
    assert fresh.index().ntotal == 6
    # an index written for fewer rows (as after a crash between commit and index write)
    fresh.add(records(2, start=10), unit(2, seed=1))
    fresh.index_meta_path.write_text('{"count": 3}')
    assert Store(**store_paths).search(vectors[:1], 1)[1][0, 0] == ids[0]
    assert Store(**store_paths).index().ntotal == 8


def test_other_model_is_refused(store_paths):
    store = Store(**store_paths)
    store.check_model("m1", 8)
    with pytest.raises(StoreError, match="holds vectors of model m1"):
        store.check_model("m2", 8)


def test_missing_database_is_explained(tmp_path):
    with pytest.raises(StoreError, match="create one with"):
        Store(f"sqlite:///{tmp_path}/none.sqlite", tmp_path / "i", create=False)


def test_password_is_hidden():
    assert "secret" not in safe_url("postgresql://user:secret@host/db")
    assert "user" in safe_url("postgresql://user:secret@host/db")


def test_stats_and_streaming(store_paths):
    store = Store(**store_paths)
    store.check_model("m1", 8)
    store.add(records(7), unit(7))
    chunks = list(store.iter_vectors(chunk=3))
    assert [len(ids) for ids, _ in chunks] == [3, 3, 1]
    stats = store.stats()
    assert stats.images == 7 and stats.index_vectors == 7 and stats.dimension == 8


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw", "compact"])
def test_index_kinds_find_the_same_vectors(store_paths, kind):
    store = Store(**store_paths)
    store.check_model("m1", 8)
    vectors = unit(300, seed=3)
    ids = store.add(records(300), vectors)
    index = store.rebuild_index(kind)
    assert index.ntotal == 300 and Store(**store_paths).index_kind == kind
    found = store.search(vectors[:20], 1)[1][:, 0]
    assert (found == np.array(ids[:20])).mean() >= 0.9
    assert store.check() == []
    store.remove(ids[:10])
    assert store.index().ntotal == 290 and store.check() == []


def test_query_node_catches_up_incrementally(store_paths, tmp_path):
    writer = Store(**store_paths)
    writer.check_model("m1", 8)
    writer.add(records(5), unit(5))
    reader = Store(store_paths["db_url"], tmp_path / "query-node-index")  # another machine
    first = reader.index()
    writer.add(records(4, start=50), unit(4, seed=9))
    second = reader.index()
    assert second is first and second.ntotal == 9  # the same object, brought up to date


def test_vectors_are_stored_as_float16(store_paths):
    store = Store(**store_paths)
    store.check_model("m1", 8)
    store.add(records(1), unit(1))
    assert len(store.records([1])[1].vector) == 8 * 2


# -- hardening ---------------------------------------------------------------------


def legacy_database(store_paths):
    """The tables as the previous version created them: ids without AUTOINCREMENT (SQLite
    reuses the highest id after it is deleted) and no change log."""
    import os

    from sqlalchemy import create_engine
    from sqlalchemy.schema import CreateTable

    from lungcbir.database import Base

    url = store_paths["db_url"]
    if url.startswith("sqlite"):
        os.makedirs(os.path.dirname(url.split("///", 1)[1]), exist_ok=True)
    engine = create_engine(url)
    with engine.begin() as connection:
        for name in ("images", "store_settings"):
            table = Base.metadata.tables[name]
            connection.exec_driver_sql(str(CreateTable(table).compile(engine)).replace("AUTOINCREMENT", ""))
            for index in table.indexes:
                index.create(connection)
    engine.dispose()


@pytest.mark.parametrize("schema", ["current", "previous version"])
def test_remove_then_add_never_leaves_another_index_stale(store_paths, tmp_path, schema):
    if schema == "previous version":
        legacy_database(store_paths)
    writer = Store(**store_paths)
    writer.check_model("m1", 8)
    vectors = unit(6)
    ids = writer.add(records(6), vectors)
    server = Store(store_paths["db_url"], tmp_path / "server-index")  # a running server's own folder
    assert server.search(vectors[-1:], 1)[1][0, 0] == ids[-1]
    other = Store(store_paths["db_url"], tmp_path / "other-index")
    other.index()  # written once, then left alone
    writer.remove([ids[-1]])
    fresh = unit(1, seed=5)
    new_id = writer.add(records(1, start=100), fresh)[0]
    assert new_id not in ids  # ids are never reused
    scores, found = server.search(vectors[-1:], 6)
    assert ids[-1] not in found[0].tolist() and scores[0, 0] < 0.99  # the removed slice is gone
    scores, found = server.search(fresh, 1)
    assert found[0, 0] == new_id and scores[0, 0] == pytest.approx(1.0, abs=1e-3)
    problems = Store(store_paths["db_url"], tmp_path / "other-index", create=False, read_only=True).check()
    assert problems and any("out of date" in p for p in problems)


def test_search_never_returns_an_id_twice(store_paths):
    store = Store(**store_paths)
    store.check_model("m1", 8)
    vectors = unit(5)
    ids = store.add(records(5), vectors)
    store.index().add_with_ids(vectors, np.asarray(ids, dtype=np.int64))  # as a lost race would leave it
    found = store.search(vectors, 10)[1]
    for row in found:
        kept = row[row >= 0].tolist()
        assert len(kept) == len(set(kept)) == 5


def test_flipped_bit_in_the_index_file_is_noticed(store_paths):
    store = Store(**store_paths)
    store.check_model("m1", 8)
    vectors = unit(50, seed=4)
    ids = store.add(records(50), vectors)
    data = bytearray(store.index_path.read_bytes())
    data[len(data) // 2] ^= 0x40
    store.index_path.write_bytes(bytes(data))
    problems = Store(**store_paths).check()
    assert any("checksum" in p for p in problems), problems
    scores, found = Store(**store_paths).search(vectors, 1)  # rebuilt from the database
    assert found[:, 0].tolist() == ids and np.all(np.abs(scores) <= 1.0 + 1e-2)
    assert Store(**store_paths).check() == []


def test_scores_outside_minus_one_to_one_are_refused(store_paths):
    import faiss
    from sqlalchemy import create_engine, update

    store = Store(**store_paths)
    store.check_model("m1", 8)
    vectors = unit(5)
    ids = store.add(records(5), vectors)
    index = store.index()  # corrupted in memory: the next search notices and rebuilds from the database
    flat = faiss.downcast_index(index.index)
    faiss.rev_swig_ptr(flat.get_xb(), index.ntotal * index.d)[:] *= 1e30
    scores, found = store.search(vectors, 1)
    assert found[:, 0].tolist() == ids and np.all(np.abs(scores) <= 1.0 + 1e-2)
    engine = create_engine(store_paths["db_url"])  # a vector in the database itself is wrong
    with engine.begin() as connection:
        connection.execute(update(ImageRecord).where(ImageRecord.id == ids[0])
                           .values(vector=(np.ones(8, np.float16) * 100).tobytes()))
    engine.dispose()
    store.rebuild_index()
    with pytest.raises(StoreError, match="rebuild-index"):
        store.search(np.ones((1, 8), np.float32) / np.sqrt(8), 1)


def test_abandoned_temporary_files_are_removed(store_paths, tmp_path):
    import subprocess
    import sys
    import textwrap

    store = Store(**store_paths)
    store.check_model("m1", 8)
    store.add(records(3), unit(3))

    def writer(finish: str) -> str:
        return textwrap.dedent(f"""
            import os, signal, sys, time
            from pathlib import Path
            from lungcbir.fileutils import write_atomically as _write_atomically
            def write(path):
                Path(path).write_bytes(b"x" * 100000)
                {finish}
            _write_atomically(Path({str(store.index_path)!r}), write)
        """)

    # a writer still busy writing its own temporary file, and one killed in the middle of writing
    busy = subprocess.Popen([sys.executable, "-c", writer("print('ready', flush=True); time.sleep(60)")],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert busy.stdout.readline().strip() == "ready"
        kept = set(store.index_dir.glob("*.tmp"))
        subprocess.run([sys.executable, "-c", writer("os.kill(os.getpid(), signal.SIGKILL)")], check=False)
        assert len(kept) == 1 and len(set(store.index_dir.glob("*.tmp"))) == 2
        store.add(records(2, start=10), unit(2, seed=1))  # the next write
        assert set(store.index_dir.glob("*.tmp")) == kept  # the killed writer's is gone, the busy one's kept
    finally:
        busy.kill()
        busy.wait()


def test_unsupported_database_is_one_line(tmp_path):
    from click.testing import CliRunner

    from lungcbir.cli import main

    with pytest.raises(StoreError, match="mysql.*SQLite and PostgreSQL"):
        Store("mysql://x@y/z", tmp_path / "i")
    result = CliRunner().invoke(main, ["stats", "--db", "mysql://x@y/z", "--index-dir", str(tmp_path / "i")])
    assert result.exit_code == 4 and "SQLite and PostgreSQL" in result.output
    assert "Traceback" not in result.output and result.output.count("\n") == 1


def test_read_only_commands_write_nothing(store_paths, tmp_path):
    import os

    from click.testing import CliRunner
    from sqlalchemy import create_engine, inspect

    from lungcbir.cli import main

    url, index_dir = store_paths["db_url"], store_paths["index_dir"]
    if url.startswith("sqlite"):  # a database file without tables, as PostgreSQL's empty database
        path = url.split("///", 1)[1]
        os.makedirs(os.path.dirname(path))
        open(path, "w").close()
    options = ["--db", url, "--index-dir", index_dir]
    for command in ("stats", "check"):
        result = CliRunner().invoke(main, [command, *options])
        assert result.exit_code == 4 and "create one with" in result.output, result.output
    engine = create_engine(url)
    assert inspect(engine).get_table_names() == []
    engine.dispose()
    assert not os.path.exists(index_dir)
    # a filled database whose index folder is out of date: stats and check read, never write
    writer = Store(url, tmp_path / "writer-index")
    writer.check_model("m1", 8)
    writer.add(records(4), unit(4))
    Store(url, index_dir).index()
    writer.add(records(2, start=10), unit(2, seed=1))
    before = {name: os.stat(os.path.join(index_dir, name)).st_mtime_ns for name in os.listdir(index_dir)}
    result = CliRunner().invoke(main, ["stats", "--json", *options])
    assert result.exit_code == 0 and '"images": 6' in result.output and '"index_vectors": 6' in result.output
    result = CliRunner().invoke(main, ["check", *options])  # behind by additions: a note, not a problem
    assert result.exit_code == 0 and "note: the index file lacks the 2 rows added" in result.output, result.output
    reader = Store(url, index_dir, create=False, read_only=True)
    assert reader.search(unit(1), 6)[1].shape == (1, 6)
    after = {name: os.stat(os.path.join(index_dir, name)).st_mtime_ns for name in os.listdir(index_dir)}
    assert after == before
def labelled(labels_and_patients, start=0):
    rows = records(len(labels_and_patients), start)
    for row, (labels, patient) in zip(rows, labels_and_patients):
        row.labels, row.patient_id = labels, patient
    return rows


def test_ids_matching_filters_labels_and_metadata_in_the_database(store_paths):
    store = Store(**store_paths)
    store.check_model("m1", 8)
    ids = store.add(labelled([({"diagnosis": "a", "site": "x"}, "P1"), ({"diagnosis": "b"}, "P1"),
                              ({"diagnosis": "a", "site": "y"}, "P2"), ({}, None),
                              ({"patient_id": "label wins"}, "P3"), ({"grade": 3}, "P4")]), unit(6))
    assert store.ids_matching({"diagnosis": "a"}).tolist() == [ids[0], ids[2]]
    assert store.ids_matching({"diagnosis": "a", "site": "y"}).tolist() == [ids[2]]
    assert store.ids_matching({"patient_id": "P1"}).tolist() == [ids[0], ids[1]]
    assert store.ids_matching({"patient_id": "label wins"}).tolist() == [ids[4]]
    assert store.ids_matching({"source_format": "png", "diagnosis": "b"}).tolist() == [ids[1]]
    assert store.ids_matching({"diagnosis": "c"}).tolist() == []
    assert store.ids_matching({"grade": "3"}).tolist() == [ids[5]]  # compared as text
    assert store.ids_matching({'odd "key".x': "1"}).tolist() == []


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw", "compact"])
@pytest.mark.parametrize("exact_up_to", [0, 10_000])  # 0: through the FAISS index with an id selector
def test_restricted_search_returns_k_matches_behind_nearer_others(store_paths, kind, exact_up_to, monkeypatch):
    import lungcbir.store

    monkeypatch.setattr(lungcbir.store, "EXACT_RESTRICTED_SEARCH_MAX", exact_up_to)
    store = Store(**store_paths)
    store.check_model("m1", 8)
    query = unit(1, seed=5)
    rng = np.random.default_rng(6)
    near = query + rng.normal(scale=0.05, size=(700, 8)).astype(np.float32)  # nearer, not wanted
    far = query + rng.normal(scale=0.8, size=(30, 8)).astype(np.float32)  # wanted
    vectors = np.vstack([near, far])
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = np.array(store.add(records(730), vectors))
    index = store.rebuild_index(kind)
    if kind in ("ivf", "compact"):  # one list searched: the selector alone finds too few, the exact fallback steps in
        import faiss

        faiss.extract_index_ivf(index).nprobe = 1
    wanted = ids[700:]
    scores, found = store.search(query, 12, restrict_to=wanted)
    assert found.shape == (1, 12) and set(found[0].tolist()) <= set(wanted.tolist())
    best = wanted[np.argsort(-(vectors[700:] @ query[0]))[:12]]
    assert (np.isin(found[0], best)).mean() >= 0.9  # exact or nearly (IVF, HNSW)
    assert np.all(np.diff(scores[0]) <= 1e-6)
    assert store.search(query, 50, restrict_to=wanted)[1].shape == (1, 30)
    assert store.search(query, 5, restrict_to=np.zeros(0, np.int64))[1].shape == (1, 0)


def test_masks_are_kept_compressed_in_their_rows(store_paths):
    from lungcbir.database import encode_mask

    store = Store(**store_paths)
    store.check_model("m1", 8)
    mask = np.zeros((30, 40), bool)
    mask[5:20, 3:15] = True
    rows = records(2)
    rows[0].mask_png = encode_mask(mask)
    ids = store.add(rows, unit(2))
    kept = Store(**store_paths).masks(ids)
    assert list(kept) == [ids[0]] and np.array_equal(kept[ids[0]], mask)  # none kept for the second


def test_database_without_the_mask_column_gets_it_on_open(store_paths):
    from sqlalchemy import inspect, text

    store = Store(**store_paths)
    store.check_model("m1", 8)
    ids = store.add(records(3), unit(3))
    with store.engine.begin() as connection:  # as a database made before masks were kept
        connection.execute(text("ALTER TABLE images DROP COLUMN mask_png"))
    store.engine.dispose()
    reopened = Store(**store_paths)
    assert "mask_png" in {c["name"] for c in inspect(reopened.engine).get_columns("images")}
    assert reopened.masks(ids) == {} and sorted(reopened.records(ids)) == ids
    assert reopened.search(unit(1), 2)[1].shape == (1, 2)
    Store(**store_paths)  # opening again (the column is there now) is fine


def test_writers_starting_together_on_an_empty_database_all_claim_it(store_paths, tmp_path):
    """Three indexing machines started at once on a new database: each checks the model and
    claims the empty store; the first claim stands and nobody fails (a select-then-insert raced)."""
    import threading

    stores = [Store(store_paths["db_url"], tmp_path / f"index{n}") for n in range(8)]
    barrier, errors = threading.Barrier(len(stores)), []

    def claim(store):
        barrier.wait()
        try:
            store.check_model("m1", 8)
        except Exception as error:  # noqa: BLE001 - the test reports whatever went wrong
            errors.append(error)

    threads = [threading.Thread(target=claim, args=(store,)) for store in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert all(store.model_id == "m1" and store.dimension == 8 for store in stores)
    with pytest.raises(StoreError, match="holds vectors of model m1"):
        stores[0].check_model("m2", 8)


# -- hardening ---------------------------------------------------------------------


def test_long_identifiers_are_stored_whole_on_every_backend(store_paths):
    store = Store(**store_paths)
    store.check_model("m1", 8)
    rows = records(2)
    long_id = "case/" + "x" * 600  # a folder's relative path as identity, a messy DICOM UID
    rows[0].patient_id = rows[0].series_uid = rows[0].study_uid = long_id
    rows[1].sop_uid = "1.2." + "3" * 300
    ids = store.add(rows, unit(2))
    stored = Store(**store_paths).records(ids)
    assert stored[ids[0]].patient_id == stored[ids[0]].series_uid == stored[ids[0]].study_uid == long_id
    assert stored[ids[1]].sop_uid == rows[1].sop_uid
    assert store.ids_matching({"patient_id": long_id}).tolist() == [ids[0]]


@pytest.mark.parametrize("field", ["patient_id", "series_uid", "sop_uid", "label"])
def test_a_nul_character_is_refused_alike_on_every_backend(store_paths, field):
    """PostgreSQL cannot store NUL in text (nor extract it from JSON); SQLite can. Both refuse it,
    naming the file and the field, and store nothing of the batch."""
    store = Store(**store_paths)
    store.check_model("m1", 8)
    rows = records(2)
    if field == "label":
        rows[1].labels = {"diagnosis": "covid\x00"}
    else:
        setattr(rows[1], field, "P\x001")
    with pytest.raises(StoreError, match=f"/x/1.png: {'labels' if field == 'label' else field} holds? a NUL character"):
        store.add(rows, unit(2))
    assert store.count() == 0


@pytest.mark.postgres
def test_a_postgresql_database_with_128_character_identifiers_is_widened_on_open(tmp_path):
    from conftest import postgres_url
    from sqlalchemy import inspect, text

    url = postgres_url()
    store = Store(url, tmp_path / "index")
    store.check_model("m1", 8)
    with store.engine.begin() as connection:  # as earlier versions made the tables (VARCHAR(128))
        for column in ("patient_id", "study_uid", "series_uid", "sop_uid"):
            connection.execute(text(f"ALTER TABLE images ALTER COLUMN {column} TYPE VARCHAR(128)"))
        for column in ("study_uid", "series_uid"):
            connection.execute(text(f"ALTER TABLE index_queue ALTER COLUMN {column} TYPE VARCHAR(128)"))
        connection.execute(text("ALTER TABLE index_queue ALTER COLUMN root TYPE VARCHAR(512)"))
    store.engine.dispose()
    reopened = Store(url, tmp_path / "index")
    for table in ("images", "index_queue"):
        lengths = {c["name"]: getattr(c["type"], "length", None) for c in inspect(reopened.engine).get_columns(table)}
        assert all(lengths[name] is None for name in ("study_uid", "series_uid")), lengths
    rows = records(1)
    rows[0].patient_id = "p" * 200
    assert len(reopened.add(rows, unit(1))) == 1


def test_a_commit_right_after_a_known_state_adds_its_rows_to_it_instead_of_counting_every_row(store_paths,
                                                                                              monkeypatch):
    # counting every row took 0.2-0.3 s at a million rows on SQLite, at every commit
    from lungcbir.database import Database, NewRegion

    store = Store(**store_paths)
    store.check_model("m1", 8)
    store.database.regions.check_model("m1/r1", 8)
    store.add(records(5), unit(5), [[NewRegion((0, 0, 1, 1), 1, "mask", v)] for v in unit(5, seed=9)], "m1/r1")
    counted: list[str] = []
    state, region_state = Database.state, RegionRows.state

    def counting(kind, original):
        def spy(self, connection=None):
            if connection is not None:  # a count inside a writing transaction
                counted.append(kind)
            return original(self, connection)
        return spy

    monkeypatch.setattr(Database, "state", counting("slices", state))
    monkeypatch.setattr(RegionRows, "state", counting("regions", region_state))
    committed = store.database.add(records(3, start=10), unit(3, seed=1),
                                   [[NewRegion((0, 0, 1, 1), 1, "mask", v)] for v in unit(3, seed=8)], "m1/r1")
    assert counted == []
    assert committed.state == state(store.database) and committed.state["count"] == 8
    assert committed.regions.state == region_state(store.database.regions) and committed.regions.state["count"] == 8
    # another process wrote in between: the next commit cannot add to what it knew, counts, and is right
    Database(store_paths["db_url"]).add(records(2, start=20), unit(2, seed=2))
    committed = store.database.add(records(1, start=30), unit(1, seed=3))
    assert counted == ["slices", "slices"]  # the other writer's first commit, then this one's
    assert committed.state == state(store.database) and committed.state["count"] == 11
