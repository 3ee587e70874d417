"""Patients for every format (identity from DICOM, labels, --case-pattern, one-scan folders),
--other-patients, and several examples searched together."""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient

from lungcbir.cli import main
from lungcbir.errors import LungCBIRError, StoreError
from lungcbir.identity import IdentitySource
from lungcbir.io import CTSlice, read_file
from lungcbir.retrieval import Retriever, together_vector
from lungcbir.store import Store
from lungcbir.web import create_app


def _write_pngs(folder: Path, names: list[str], seed: int) -> list[Path]:
    """Distinct synthetic 8-bit slices (a bright disc on noise, moving with the slice)."""
    folder.mkdir(parents=True, exist_ok=True)
    generator = np.random.default_rng(seed)
    paths = []
    for number, name in enumerate(names):
        pixels = generator.integers(0, 120, (64, 64), dtype=np.uint8)
        cv2.circle(pixels, (16 + 4 * number, 32), 10 + seed % 5, 255, -1)
        paths.append(folder / name)
        cv2.imwrite(str(paths[-1]), pixels)
    return paths


@pytest.fixture
def exports(tmp_path) -> Path:
    """Two PNG export folders of eight slices each (two scans), plus a folder of mixed scans."""
    root = tmp_path / "archive"
    _write_pngs(root / "export_a", [f"slice_{n:03d}.png" for n in range(1, 9)], seed=1)
    _write_pngs(root / "export_b" / "series2", [f"IM-0001-{n:04d}.png" for n in range(1, 9)], seed=2)
    _write_pngs(root / "mixed", ["ID_0001_Z_0010.png", "ID_0002_Z_0020.png", "ID_0003_Z_0030.png"], seed=3)
    return root


def _retriever(tiny_weights, tmp_path) -> Retriever:
    return Retriever(weights=tiny_weights, db_url=f"sqlite:///{tmp_path / 'db' / 'id.sqlite'}",
                     index_dir=str(tmp_path / "index"))


def test_one_export_folder_is_one_patient(exports, tiny_weights, tmp_path):
    retriever = _retriever(tiny_weights, tmp_path)
    retriever.index_dataset([exports / "export_a"])
    query = exports / "export_a" / "slice_004.png"
    collapsed = retriever.query(query, k=5)  # per_patient=1 by default
    assert len(collapsed.neighbors) == 1 and collapsed.neighbors[0].patient_id == "export_a"
    assert len(retriever.query(query, k=5, per_patient=0).neighbors) == 5
    record = retriever.store(create=False).records([collapsed.neighbors[0].id])[collapsed.neighbors[0].id]
    assert record.identity_source == IdentitySource.FOLDER.value and record.series_uid == "export_a"


def test_folder_identity_is_relative_to_the_indexed_root_and_mixed_folders_get_none(exports, tiny_weights, tmp_path):
    retriever = _retriever(tiny_weights, tmp_path)
    retriever.index_dataset([exports])
    result = retriever.query(exports / "export_b" / "series2" / "IM-0001-0003.png", k=10)
    patients = [n.patient_id for n in result.neighbors]
    assert patients.count("export_b/series2") == 1 and patients.count("export_a") == 1
    assert patients.count(None) == 3  # the mixed folder: three cases of their own
    stats = retriever.store(create=False).stats()
    assert stats.identity == {"folder": {"patients": 2, "slices": 16}, "none": {"patients": 0, "slices": 3}}


def test_case_pattern_on_the_relative_path(exports, tiny_weights, tmp_path):
    retriever = _retriever(tiny_weights, tmp_path)
    retriever.index_dataset([exports], case_pattern=r"^mixed/(ID_\d+)_Z")
    result = retriever.query(exports / "mixed" / "ID_0002_Z_0020.png", k=30, per_patient=0)
    by_path = {os.path.basename(n.path): n.patient_id for n in result.neighbors}
    assert by_path["ID_0001_Z_0010.png"] == "ID_0001" and by_path["ID_0003_Z_0030.png"] == "ID_0003"
    stats = retriever.store(create=False).stats()
    assert stats.identity["pattern"] == {"patients": 3, "slices": 3}
    assert stats.identity["folder"] == {"patients": 2, "slices": 16}  # the pattern did not match there


def test_bad_case_pattern_is_refused_before_indexing(exports, tiny_weights, tmp_path):
    for pattern in ("(unclosed", r"ID_\d+"):
        with pytest.raises(LungCBIRError, match="case-pattern"):
            _retriever(tiny_weights, tmp_path).index_dataset([exports], case_pattern=pattern)


def test_labels_columns_give_identity_before_the_folder(exports, tiny_weights, tmp_path):
    labels = tmp_path / "labels.csv"
    folder = exports / "export_a"
    rows = [f"{folder / f'slice_{n:03d}.png'},{'P1' if n <= 4 else 'P2'},S{n <= 4},x" for n in range(1, 9)]
    labels.write_text("path,patient_id,series_uid,diagnosis\n" + "\n".join(rows) + "\n")
    retriever = _retriever(tiny_weights, tmp_path)
    retriever.index_dataset([folder], labels=labels)
    result = retriever.query(folder / "slice_001.png", k=5)
    assert sorted(n.patient_id for n in result.neighbors) == ["P1", "P2"]
    assert all(n.labels == {"diagnosis": "x"} for n in result.neighbors)  # identity is not a label
    assert {n.series_uid for n in result.neighbors} == {"STrue", "SFalse"}
    assert retriever.store(create=False).stats().identity == {"labels": {"patients": 2, "slices": 8}}


def test_dicom_identity_wins(phantom_dir, tiny_weights, tmp_path):
    retriever = _retriever(tiny_weights, tmp_path)
    retriever.index_dataset([phantom_dir / "dicom"], case_pattern="(phantom)")
    assert retriever.store(create=False).stats().identity == {"dicom": {"patients": 2, "slices": 12}}


def test_other_patients_drops_the_query_patient(exports, phantom_dir, tiny_weights, tmp_path):
    retriever = _retriever(tiny_weights, tmp_path)
    retriever.index_dataset([exports, phantom_dir / "dicom"])
    query = exports / "export_a" / "slice_002.png"
    own = retriever.query(query, k=30, per_patient=0)
    assert own.neighbors[0].path == str(query) and "export_a" in {n.patient_id for n in own.neighbors}
    others = retriever.query(query, k=30, per_patient=0, other_patients=True)
    assert others.neighbors and "export_a" not in {n.patient_id for n in others.neighbors}
    stored = 19 + 12  # the archive's PNGs and the phantom's DICOM slices
    assert len(others.neighbors) == stored - 8  # every stored slice but the eight of export_a
    # a query that is not stored but carries a patient id (DICOM) drops that patient
    # (a picture like CT: a constant one is "no-lungs" and not searched at all)
    pixels = read_file(sorted((phantom_dir / "png" / "phantom01").glob("*.png"))[2])[0].pixels
    item = CTSlice(pixels, "uint8", "new.png", "png", patient_id="PHANTOM01")
    found = retriever.query_slices([item], k=40, per_patient=0, other_patients=True)[0]
    assert "PHANTOM01" not in {n.patient_id for n in found.neighbors} and len(found.neighbors) == stored - 6
    # a stored slice of a mixed folder (no identity) drops only itself
    mixed = retriever.query(exports / "mixed" / "ID_0001_Z_0010.png", k=40, per_patient=0, other_patients=True)
    assert str(exports / "mixed" / "ID_0001_Z_0010.png") not in {n.path for n in mixed.neighbors}
    assert len(mixed.neighbors) == stored - 1


def test_query_together_searches_with_the_mean_and_leaves_out_the_examples(exports, tiny_weights, tmp_path):
    retriever = _retriever(tiny_weights, tmp_path)
    retriever.index_dataset([exports])
    examples = [exports / "export_a" / "slice_002.png", exports / "export_b" / "series2" / "IM-0001-0005.png"]
    unlike = [exports / "mixed" / "ID_0003_Z_0030.png"]
    result = retriever.query_together(examples, k=30, per_patient=0)
    paths = [n.path for n in result.neighbors]
    assert len(paths) == 19 - 2 and not {str(p) for p in examples} & set(paths)
    vectors = np.stack([r.vector for r in retriever.segment_slices([retriever_slice(p) for p in examples])])
    stored = {n.id: n for n in result.neighbors}
    store = retriever.store(create=False)
    ids, stored_vectors = next(store.iter_vectors())
    expected = together_vector(vectors)
    for identifier, vector in zip(ids, stored_vectors):
        if int(identifier) in stored:
            assert stored[int(identifier)].score == pytest.approx(float(vector @ expected), abs=2e-3)
    scores = [n.score for n in result.neighbors]
    assert scores == sorted(scores, reverse=True)
    less = retriever.query_together(examples, unlike=unlike, k=30, per_patient=0)
    assert str(unlike[0]) not in {n.path for n in less.neighbors}
    unlike_vector = retriever.segment_slices([retriever_slice(unlike[0])])[0].vector
    steered = together_vector(vectors, unlike_vector[None], 0.5)
    first = less.neighbors[0]
    assert first.score == pytest.approx(float(stored_vectors[list(ids).index(first.id)] @ steered), abs=2e-3)
    with pytest.raises(LungCBIRError, match="at least one example"):
        retriever.query_together([])


def retriever_slice(path):
    from lungcbir.io import read_file

    return read_file(path)[0]


def test_cli_together_other_patients_and_stats(exports, tiny_weights, tmp_path):
    runner = CliRunner()
    where = ["--db", f"sqlite:///{tmp_path / 'cli.sqlite'}", "--index-dir", str(tmp_path / "cli-index")]
    store = [*where, "--weights", tiny_weights]
    indexed = runner.invoke(main, ["index-dataset", str(exports), "--case-pattern", r"^mixed/(ID_\d+)", *store])
    assert indexed.exit_code == 0, indexed.output
    stats = runner.invoke(main, ["stats", *where])
    assert "folder 2 patient(s) in 16 slice(s)" in stats.output and "pattern 3 patient(s) in 3 slice(s)" in stats.output
    a, b = exports / "export_a" / "slice_001.png", exports / "export_a" / "slice_002.png"
    together = runner.invoke(main, ["query", str(a), str(b), "--together", "--unlike",
                                    str(exports / "mixed" / "ID_0001_Z_0010.png"), "--k", "20", "--per-patient", "0",
                                    "--json", *store])
    assert together.exit_code == 0, together.output
    lines = together.output.strip().splitlines()
    assert len(lines) == 1
    answer = json.loads(lines[0])
    assert answer["queries"] == [str(a), str(b)] and len(answer["unlike"]) == 1
    assert len(answer["neighbors"]) == 16 and not {str(a), str(b)} & {n["path"] for n in answer["neighbors"]}
    others = runner.invoke(main, ["query", str(a), "--other-patients", "--per-patient", "0", "--k", "30", "--json",
                                  "--out", str(tmp_path / "out"), *store])
    assert others.exit_code == 0, others.output
    assert "export_a" not in {n["patient_id"] for n in json.loads(others.output.splitlines()[-1])["neighbors"]}
    misuse = runner.invoke(main, ["query", str(a), "--unlike", str(b), *store])
    assert misuse.exit_code == 2 and "--together" in misuse.output


def test_web_other_patients_and_together(exports, tiny_weights, tmp_path):
    retriever = _retriever(tiny_weights, tmp_path)
    retriever.index_dataset([exports])
    client = TestClient(create_app(retriever), base_url="http://localhost", raise_server_exceptions=False)
    a = (exports / "export_a" / "slice_003.png").read_bytes()
    answer = client.post("/api/query", files={"file": ("a.png", a)},
                         data={"k": "30", "per_patient": "0", "other_patients": "true"}).json()
    assert answer["neighbors"] and "export_a" not in {n["patient_id"] for n in answer["neighbors"]}
    b = (exports / "export_b" / "series2" / "IM-0001-0002.png").read_bytes()
    c = (exports / "mixed" / "ID_0002_Z_0020.png").read_bytes()
    together = client.post("/api/query-together", files=[("files", ("a.png", a)), ("files", ("b.png", b)),
                                                         ("unlike", ("c.png", c))],
                           data={"k": "30", "per_patient": "0"}).json()
    assert together["queries"] == ["a.png", "b.png"] and together["unlike"] == ["c.png"]
    assert len(together["neighbors"]) == 16 and "thumbnail_url" in together["neighbors"][0]
    plain = client.post("/api/query-together", files=[("files", ("a.png", a))], data={"k": "3"})
    assert plain.status_code == 200 and plain.json()["unlike"] == [] and len(plain.json()["neighbors"]) == 3
    assert client.post("/api/query-together", data={"k": "3"}).status_code == 422


def test_old_database_gets_the_new_column_and_readers_are_told(exports, tiny_weights, tmp_path):
    retriever = _retriever(tiny_weights, tmp_path)
    retriever.index_dataset([exports / "export_a"])
    url = retriever.db_url
    store = Store(url, tmp_path / "index")
    with store.engine.begin() as connection:
        connection.exec_driver_sql("ALTER TABLE images DROP COLUMN identity_source")
    store.engine.dispose()
    with pytest.raises(StoreError, match="earlier lungcbir version.*index-dataset"):
        Store(url, tmp_path / "index", create=False, read_only=True)
    upgraded = Store(url, tmp_path / "index", create=False)
    assert upgraded.stats().identity == {"unrecorded": {"patients": 1, "slices": 8}}
