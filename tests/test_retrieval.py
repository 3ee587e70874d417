import os

import numpy as np
import pytest

from lungcbir.errors import LungCBIRError, StoreError
from lungcbir.retrieval import Retriever


def test_index_then_query_finds_itself(phantom_dir, tiny_weights, store_paths):
    retriever = Retriever(weights=tiny_weights, **store_paths)
    report = retriever.index_dataset([phantom_dir / "dicom", phantom_dir / "png"])
    assert (report.indexed, report.skipped, report.failed) == (24, 0, 0)
    query = phantom_dir / "dicom" / "phantom01"
    probe = sorted(os.listdir(query))[2]
    result = retriever.query(query / probe, k=3, per_patient=0)
    assert result.neighbors[0].path == str((query / probe).resolve())
    assert result.neighbors[0].patient_id == "PHANTOM01"
    assert result.neighbors[0].slice_index is not None
    assert [n.rank for n in result.neighbors] == [1, 2, 3]
    assert result.mask.shape == (96, 96) and result.mask.dtype == bool


def test_reindex_skips_and_bad_files_continue(phantom_dir, tiny_weights, store_paths, tmp_path):
    bad = tmp_path / "in"
    bad.mkdir()
    (bad / "broken.png").write_bytes(b"not a png")
    (bad / "notes.txt").write_text("ignored quietly")
    retriever = Retriever(weights=tiny_weights, **store_paths)
    retriever.index_dataset([phantom_dir / "png"])
    report = retriever.index_dataset([phantom_dir / "png", bad])
    assert report.indexed == 0 and report.skipped == 12
    assert [os.path.basename(f.path) for f in report.failures] == ["broken.png"]


def test_labels_are_stored_and_returned(phantom_dir, tiny_weights, store_paths, tmp_path):
    png = phantom_dir / "png" / "phantom01"
    first = sorted(os.listdir(png))[0]
    labels = tmp_path / "labels.csv"
    labels.write_text(f"path,diagnosis\n{png / first},synthetic\n")
    retriever = Retriever(weights=tiny_weights, **store_paths)
    retriever.index_dataset([png], labels=labels)
    result = retriever.query(png / first, k=1)
    assert result.neighbors[0].labels == {"diagnosis": "synthetic"}


def test_query_with_other_model_is_refused(phantom_dir, tiny_weights, other_tiny_weights, store_paths):
    Retriever(weights=tiny_weights, **store_paths).index_dataset([phantom_dir / "png" / "phantom01"])
    with pytest.raises(LungCBIRError, match="model"):
        Retriever(weights=other_tiny_weights, **store_paths).query(np.zeros((64, 64), np.uint8))
    with pytest.raises(StoreError, match="holds vectors of model"):
        Retriever(weights=other_tiny_weights, **store_paths).index_dataset([phantom_dir / "png"])


def test_segment_array(tiny_weights):
    mask = Retriever(weights=tiny_weights, db_url="sqlite://").segment(np.zeros((40, 30), np.uint8))
    assert mask.shape == (40, 30)


def test_where_filters_on_labels_and_metadata(phantom_dir, tiny_weights, store_paths, tmp_path):
    png = phantom_dir / "png" / "phantom01"
    names = sorted(os.listdir(png))
    labels = tmp_path / "labels.csv"
    labels.write_text("path,diagnosis\n" + "".join(f"{png / n},{'a' if i % 2 else 'b'}\n" for i, n in enumerate(names)))
    retriever = Retriever(weights=tiny_weights, **store_paths)
    retriever.index_dataset([png, phantom_dir / "dicom" / "phantom02"], labels=labels)
    result = retriever.query(png / names[0], k=10, where={"diagnosis": "a"}, per_patient=0)
    assert len(result.neighbors) == 3 and all(n.labels["diagnosis"] == "a" for n in result.neighbors)
    result = retriever.query(png / names[0], k=4, where={"patient_id": "PHANTOM02"}, per_patient=0)
    assert len(result.neighbors) == 4 and {n.patient_id for n in result.neighbors} == {"PHANTOM02"}


def test_per_patient_collapses_cases(phantom_dir, tiny_weights, store_paths):
    retriever = Retriever(weights=tiny_weights, **store_paths)
    retriever.index_dataset([phantom_dir / "dicom"])
    probe = sorted((phantom_dir / "dicom" / "phantom01").iterdir())[0]
    collapsed = retriever.query(probe, k=5)
    assert [n.patient_id for n in collapsed.neighbors] in (["PHANTOM01", "PHANTOM02"], ["PHANTOM02", "PHANTOM01"])
    two_each = retriever.query(probe, k=5, per_patient=2)
    assert len(two_each.neighbors) == 4
    assert len(retriever.query(probe, k=5, per_patient=0).neighbors) == 5
