"""The index-kind registry of lungcbir/vector_index.py: a new kind is one entry."""

import faiss
import numpy as np
from test_store import records, unit

from lungcbir.store import Store
from lungcbir.vector_index import (
    INDEX_KIND_REGISTRY,
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
