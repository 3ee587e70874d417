import numpy as np
import pytest

from lungcbir.errors import StoreError
from lungcbir.store import ImageRecord, Store, safe_url


def records(count, start=0):
    return [ImageRecord(path=f"/x/{start + i}.png", sha256=f"{start + i:064d}", frame=0, source_format="png",
                        width=8, height=8, labels={}, lung_fraction=0.2, model_id="m1") for i in range(count)]


def unit(count, dim=8, seed=0):
    vectors = np.random.default_rng(seed).normal(size=(count, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


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


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
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


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
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
    if kind == "ivf":  # one list searched: the selector alone finds too few, the exact fallback must step in
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
    from lungcbir.store import encode_mask

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
