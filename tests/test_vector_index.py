"""The index-kind registry of lungcbir/vector_index.py: a new kind is one entry."""

import faiss
import numpy as np
import pytest
from conftest import records, unit

from lungcbir.store import Store
from lungcbir.vector_index import (
    COMPACT_RERANK,
    INDEX_KIND_REGISTRY,
    IVF_NPROBE,
    IndexKind,
    describe_index,
    kind_of,
)


def _scalar_quantised(index: faiss.Index) -> bool:
    return isinstance(index, faiss.IndexIDMap2) and isinstance(faiss.downcast_index(index.index),
                                                               faiss.IndexScalarQuantizer)


def _build_fp16(count, dimension, stream, sample):
    index = faiss.IndexIDMap2(faiss.IndexScalarQuantizer(dimension, faiss.ScalarQuantizer.QT_fp16,
                                                         faiss.METRIC_INNER_PRODUCT))
    for ids, vectors in stream():
        index.add_with_ids(vectors, ids)
    return index


FP16 = IndexKind("fp16", "exact over float16 codes", _build_fp16, holds=_scalar_quantised, tune=lambda index: None,
                 describe=lambda index: "fp16 (exact, float16)",
                 search_parameters=lambda index, selector: faiss.SearchParameters(sel=selector))


def test_a_new_index_kind_is_one_registry_entry(store_paths, monkeypatch):
    monkeypatch.setitem(INDEX_KIND_REGISTRY, "fp16", FP16)
    store = Store(**store_paths)
    store.check_model("m1", 8)
    vectors = unit(50, seed=2)
    ids = store.add(records(50), vectors)
    index = store.rebuild_index("fp16")
    assert kind_of(index) is FP16 and describe_index(index) == "fp16 (exact, float16)"
    assert "fp16 (exact, float16); setting fp16" == store.stats().index_kind
    assert store.search(vectors[:5], 1)[1][:, 0].tolist() == ids[:5]
    assert store.search(vectors[:1], 3, restrict_to=np.array(ids[10:13]))[1][0].tolist() \
        == sorted(ids[10:13], key=lambda i: -float(vectors[0] @ vectors[ids.index(i)]))
    store.remove(ids[:5])
    fresh = Store(**store_paths)  # read back from its file, tied to its kind
    assert kind_of(fresh.index()) is FP16 and fresh.index().ntotal == 45 and fresh.check() == []


def test_rebuild_index_kind_choice_is_the_registry():
    from lungcbir.cli import main

    kind = next(option for option in main.commands["rebuild-index"].params if option.name == "kind")
    assert list(kind.type.choices) == list(INDEX_KIND_REGISTRY)
    assert all(entry.description in kind.help for entry in INDEX_KIND_REGISTRY.values())


def _clustered(count, dim, seed=0):
    """Unit vectors around 40 centres: neighbours crowd as real slices do."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(40, dim))
    vectors = centres[rng.integers(40, size=count)] + rng.normal(scale=0.3, size=(count, dim))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("dim", [16, 18])  # 18: not a multiple of 4, padded for PQ
def test_the_compact_kind_finds_what_exact_search_finds_and_survives_reload(store_paths, dim):
    store = Store(**store_paths)
    store.check_model("m1", dim)
    vectors = _clustered(3000, dim)
    ids = np.array(store.add(records(3000), vectors))
    index = store.rebuild_index("compact")
    assert kind_of(index) is INDEX_KIND_REGISTRY["compact"] and index.ntotal == 3000
    assert describe_index(index).startswith("compact (") and f"re-ranks {COMPACT_RERANK}" in describe_index(index)
    queries = _clustered(30, dim, seed=7)
    truth = ids[np.argsort(-(queries @ vectors.T), axis=1)[:, :10]]
    scores, found = store.search(queries, 10)
    recall = np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found.tolist(), truth.tolist())])
    assert recall >= 0.97
    # the scores are exact (re-ranked by the stored float16 vectors), best first
    stored = {int(n): v for n, v in zip(ids, vectors.astype(np.float16).astype(np.float32))}
    assert np.allclose(scores[0], [queries[0] @ stored[int(n)] for n in found[0]], atol=1e-5)
    assert np.all(np.diff(scores, axis=1) <= 1e-6)
    store.remove(ids[:100].tolist())
    fresh = Store(**store_paths)  # read back from its file: still compact, tuned, without the removed rows
    assert kind_of(fresh.index()) is INDEX_KIND_REGISTRY["compact"] and fresh.index().ntotal == 2900
    assert faiss.extract_index_ivf(fresh.index()).nprobe == IVF_NPROBE and fresh.check() == []
    again = fresh.search(queries, 10)[1]
    assert not np.isin(again, ids[:100]).any() and (again >= 0).all()
    added = fresh.add(records(50, start=5000), _clustered(50, dim, seed=9))  # added in place, not rebuilt
    assert kind_of(fresh.index()) is INDEX_KIND_REGISTRY["compact"] and fresh.index().ntotal == 2950
    assert Store(**store_paths).search(_clustered(50, dim, seed=9)[:5], 1)[1][:, 0].tolist() == added[:5]


def test_compact_re_ranking_leaves_out_rows_gone_from_the_database(store_paths, monkeypatch):
    store = Store(**store_paths)
    store.check_model("m1", 16)
    vectors = _clustered(1000, 16)
    store.add(records(1000), vectors)
    index = store.rebuild_index("compact")
    candidates = index.search(vectors[:1], 20)[1]
    gone = candidates[0, :3]  # removed by another process after the index answered
    original = store.vectors.database.vectors_of
    monkeypatch.setattr(store.vectors.database, "vectors_of",
                        lambda wanted, chunk=1000: original(np.setdiff1d(wanted, gone), chunk))
    scores, found = store.vectors._reranked(vectors[:1], candidates, 10)
    assert found.shape == (1, 10) and not np.isin(found, gone).any() and np.isin(found, candidates).all()
    assert np.isfinite(scores).all()


def test_auto_picks_flat_below_the_threshold_and_compact_from_it(store_paths, monkeypatch):
    import lungcbir.vector_index

    monkeypatch.setattr(lungcbir.vector_index, "AUTO_IVF_FROM", 500)
    store = Store(**store_paths)
    store.check_model("m1", 16)
    store.add(records(499), _clustered(499, 16))
    assert kind_of(store.rebuild_index("auto")) is INDEX_KIND_REGISTRY["flat"]
    store.add(records(1, start=600), _clustered(1, 16, seed=3))
    index = store.rebuild_index("auto")
    assert kind_of(index) is INDEX_KIND_REGISTRY["compact"] and index.ntotal == 500
    assert store.index_kind == "auto" and kind_of(Store(**store_paths).index()) is INDEX_KIND_REGISTRY["compact"]


def test_a_search_reads_the_full_database_state_only_when_the_generation_moved(store_paths, monkeypatch):
    """Counting every row costs about 0.1 s at a million rows: a search on an index that holds
    the current generation must not do it again and again, and must still see other writers."""
    from lungcbir.database import Database

    store = Store(**store_paths)
    store.check_model("m1", 8)
    vectors = unit(30, seed=3)
    store.add(records(20), vectors[:20])
    store.search(vectors[:1], 3)  # brings the index up to date (reads the full state)
    calls = []
    full_state = Database.state
    monkeypatch.setattr(Database, "state", lambda self, *a: calls.append(1) or full_state(self, *a))
    for _ in range(5):
        store.search(vectors[:1], 3)
    assert calls == []
    other = Store(**store_paths)  # another writer, as another process would be
    ids = other.add([r for r in records(30)][20:], vectors[20:])
    assert store.search(vectors[25:26], 1)[1][0, 0] == ids[5] and calls


def test_an_unchanged_generation_is_checked_in_full_again_after_a_while(store_paths, monkeypatch):
    import lungcbir.vector_index as vector_index

    store = Store(**store_paths)
    store.check_model("m1", 8)
    vectors = unit(10, seed=4)
    store.add(records(10), vectors)
    store.search(vectors[:1], 1)
    monkeypatch.setattr(vector_index, "FULL_CHECK_SECONDS", 0.0)
    seen = []
    full_state = store.database.state
    monkeypatch.setattr(store.database, "state", lambda *a: seen.append(1) or full_state(*a))
    store.search(vectors[:1], 1)
    assert seen


# -- checkpoints: the index file is not rewritten after every committed batch --------


def _note_generation(store: Store) -> int:
    import json

    return json.loads(store.index_meta_path.read_text())["generation"]


def _counting_writes(monkeypatch) -> list[str]:
    from lungcbir import vector_index

    written: list[str] = []
    real = vector_index._write_atomically

    def counted(path, write):
        written.append(str(path))
        return real(path, write)

    monkeypatch.setattr(vector_index, "_write_atomically", counted)
    return written


def test_added_batches_are_written_by_checkpoints_not_each_time(store_paths, monkeypatch):
    store = Store(**store_paths)
    store.check_model("m1", 8)
    store.add(records(100), unit(100))
    written = _counting_writes(monkeypatch)
    for batch in range(4):  # 4 rows: under 5 % of the index
        store.add(records(1, start=200 + batch), unit(1, seed=10 + batch))
    assert written == []
    store.add(records(1, start=300), unit(1, seed=30))  # the fifth: a checkpoint is due
    assert [path.endswith(".json") for path in written] == [False, True]  # the index, then its note
    assert _note_generation(store) == store.database.generation()


def test_an_old_checkpoint_is_written_with_the_next_batch(store_paths, monkeypatch):
    from lungcbir import vector_index

    store = Store(**store_paths)
    store.check_model("m1", 8)
    store.add(records(100), unit(100))
    store.add(records(1, start=200), unit(1, seed=3))
    assert _note_generation(store) < store.database.generation()
    monkeypatch.setattr(vector_index, "CHECKPOINT_SECONDS", 0.0)
    store.add(records(1, start=201), unit(1, seed=4))
    assert _note_generation(store) == store.database.generation()


def test_a_run_killed_between_checkpoints_is_caught_up_from_the_database_not_rebuilt(store_paths, monkeypatch):
    from lungcbir import vector_index

    writer = Store(**store_paths)
    writer.check_model("m1", 8)
    writer.add(records(100), unit(100))
    late = unit(3, seed=7)
    late_ids = writer.add(records(3, start=500), late)
    assert _note_generation(writer) < writer.database.generation()  # as a killed run leaves it
    reader = Store(**store_paths, read_only=True)
    # not a problem: the file is a checkpoint; check says what it lacks, and writes nothing
    assert reader.check() == [] and "lacks the 3 rows added since its last checkpoint" in reader.notes()[0]

    def no_rebuild(*args, **kwargs):
        raise AssertionError("rebuilt, where adding the rows since the checkpoint is enough")

    monkeypatch.setattr(vector_index, "build_index", no_rebuild)
    reader = Store(**store_paths)  # the next run
    scores, found = reader.search(late, 1)
    assert found[:, 0].tolist() == late_ids and np.allclose(scores[:, 0], 1, atol=1e-3)
    assert reader.index().ntotal == 103
    reader.checkpoint()
    assert reader.check() == []


def test_the_end_of_a_run_checkpoints_and_a_removal_is_written_at_once(store_paths):
    store = Store(**store_paths)
    store.check_model("m1", 8)
    ids = store.add(records(100), unit(100))
    store.add(records(2, start=500), unit(2, seed=7))
    assert _note_generation(store) < store.database.generation()
    store.checkpoint()
    assert _note_generation(store) == store.database.generation() and store.check() == []
    store.add(records(1, start=600), unit(1, seed=8))
    store.remove(ids[:1])  # catching up cannot replay a removal: written at once
    assert _note_generation(store) == store.database.generation() and store.check() == []


def test_index_dataset_leaves_a_current_index_file(store_paths, tiny_weights, phantom_dir, monkeypatch):
    from lungcbir import vector_index
    from lungcbir.retrieval import Retriever

    monkeypatch.setattr(vector_index, "CHECKPOINT_SHARE", 100.0)  # no checkpoint during the run
    retriever = Retriever(weights=tiny_weights, files_per_commit=4, **store_paths)
    retriever.index_dataset([phantom_dir / "png"])
    store = Store(**store_paths)
    assert store.count() == 12 and store.check() == []


@pytest.mark.parametrize("kind", ["ivf", "compact"])
def test_a_kind_too_few_vectors_can_train_is_built_exact(store_paths, kind):
    """FAISS cannot train an IVF or PQ k-means on fewer points than centroids (it raised, and the
    indexing run stopped with a traceback): so few vectors are searched exactly until a rebuild."""
    store = Store(**store_paths)
    store.check_model("m1", 16)
    vectors = _clustered(12, 16)
    ids = store.add(records(12), vectors)
    index = store.rebuild_index(kind)
    assert kind_of(index) is INDEX_KIND_REGISTRY["flat"] and index.ntotal == 12
    assert store.index_kind == kind and store.search(vectors[:1], 1)[1][0, 0] == ids[0]
    assert store.check() == []


def test_a_file_behind_by_additions_still_has_a_problem_when_it_lacks_older_rows(store_paths, monkeypatch):
    from lungcbir import vector_index

    monkeypatch.setattr(vector_index, "CHECKPOINT_SHARE", 100.0)  # additions are not written
    writer = Store(**store_paths)
    writer.check_model("m1", 8)
    writer.add(records(10), unit(10))
    writer.checkpoint()
    writer.add(records(2, start=50), unit(2, seed=3))
    index = faiss.read_index(str(writer.vectors.path))
    index.remove_ids(np.array([1], np.int64))  # a row of the checkpoint itself gone from the file
    faiss.write_index(index, str(writer.vectors.path))
    reader = Store(**store_paths, read_only=True)
    assert any("1 rows without a vector" in problem for problem in reader.check())
    # (a removal since a file's checkpoint is a problem: test_store's remove-then-add test)
