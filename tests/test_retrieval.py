import os

import numpy as np
import pytest

from lungcbir.errors import LungCBIRError, StoreError
from lungcbir.io import read_file
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


def test_a_run_looks_up_only_its_own_files_among_the_stored_slices(phantom_dir, tiny_weights, store_paths,
                                                                   monkeypatch):
    # loading every stored key at a run's start took 4.6 s and 356 MiB at a million rows
    from lungcbir.database import Database

    retriever = Retriever(weights=tiny_weights, **store_paths)
    retriever.index_dataset([phantom_dir / "png" / "phantom01"])
    asked: list[tuple[str, int]] = []
    lookup = Database.stored_keys

    def spy(self, model_id, keys):
        keys = set(keys)
        asked.extend(keys)
        return lookup(self, model_id, keys)

    monkeypatch.setattr(Database, "stored_keys", spy)
    report = retriever.index_dataset([phantom_dir / "png"])  # phantom01 again, and phantom02
    assert (report.indexed, report.skipped) == (6, 6)
    run_keys = {(read_file(path)[0].sha256, 0) for path in sorted((phantom_dir / "png").rglob("*.png"))}
    assert set(asked) == run_keys and len(asked) == len(run_keys)  # each file's key once, nothing else


def _labels_csv(tmp_path, rows):
    """A labels CSV of ``(path, diagnosis)`` rows."""
    labels = tmp_path / "labels.csv"
    labels.write_text("path,diagnosis\n" + "".join(f"{path},{diagnosis}\n" for path, diagnosis in rows))
    return labels


def test_labels_are_stored_and_returned(phantom_dir, tiny_weights, store_paths, tmp_path):
    png = phantom_dir / "png" / "phantom01"
    first = sorted(os.listdir(png))[0]
    labels = _labels_csv(tmp_path, [(png / first, "synthetic")])
    retriever = Retriever(weights=tiny_weights, **store_paths)
    retriever.index_dataset([png], labels=labels)
    result = retriever.query(png / first, k=1)
    assert result.neighbors[0].labels == {"diagnosis": "synthetic"}


def test_labels_match_a_file_however_its_folder_is_spelt(phantom_dir, tiny_weights, store_paths, tmp_path):
    # a CSV written against the real folder, files indexed through a link to it (and the
    # reverse): the same files, so the labels must not be lost silently
    png = phantom_dir / "png" / "phantom01"
    link = tmp_path / "linked"
    link.symlink_to(png, target_is_directory=True)
    names = sorted(os.listdir(png))
    labels = _labels_csv(tmp_path, [(png / names[0], "real"), (link / names[1], "linked")])
    retriever = Retriever(weights=tiny_weights, **store_paths)
    retriever.index_dataset([link], labels=labels)
    stored = [retriever.query(png / name, k=1).neighbors[0].labels for name in names[:2]]
    assert stored == [{"diagnosis": "real"}, {"diagnosis": "linked"}]


def test_index_counts_label_rows_that_name_no_indexed_file(phantom_dir, tiny_weights, store_paths, tmp_path):
    png = phantom_dir / "png" / "phantom01"
    first = sorted(os.listdir(png))[0]
    labels = _labels_csv(tmp_path, [(png / first, "found"), (png / "typo.png", "lost")])
    retriever = Retriever(weights=tiny_weights, **store_paths)
    assert retriever.index_dataset([png], labels=labels).unmatched_labels == 1
    assert retriever.index_dataset([png], labels=labels).unmatched_labels == 1  # skipped files still match


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


def _store_around(retriever, probe, rows):
    """Stored rows with vectors at chosen distances from ``probe``'s vector: (labels, patient, noise)."""
    from lungcbir.database import ImageRecord

    model, store = retriever.model, retriever.store()
    store.check_model(model.model_id, model.dimension)
    centre = model.segment([probe])[0].vector
    rng = np.random.default_rng(0)
    vectors = np.stack([centre + rng.normal(scale=noise, size=centre.shape) for _, _, noise in rows])
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return store.add([ImageRecord(path=f"/archive/{n}.png", sha256=f"{n:064d}", frame=0, source_format="png",
                                  width=8, height=8, labels=labels, patient_id=patient, lung_fraction=0.2,
                                  model_id=model.model_id) for n, (labels, patient, _) in enumerate(rows)],
                     vectors.astype(np.float32))


def test_where_returns_k_matches_behind_many_nearer_others(tiny_weights, store_paths):
    retriever = Retriever(weights=tiny_weights, **store_paths)
    probe = retriever_probe()
    ids = _store_around(retriever, probe, [({"group": "near"}, f"N{n}", 0.001) for n in range(700)]
                        + [({"group": "far"}, f"F{n}", 0.05) for n in range(25)])
    result = retriever.query(probe, k=8, where={"group": "far"}, per_patient=0)
    assert len(result.neighbors) == 8 and {n.labels["group"] for n in result.neighbors} == {"far"}
    assert {n.id for n in result.neighbors} <= set(ids[700:])
    collapsed = retriever.query(probe, k=8, where={"group": "far"})  # per patient: 25 patients
    assert len(collapsed.neighbors) == 8


def test_per_patient_returns_k_cases_behind_one_patients_many_slices(tiny_weights, store_paths):
    retriever = Retriever(weights=tiny_weights, **store_paths)
    probe = retriever_probe()
    _store_around(retriever, probe, [({}, "SAME", 0.001) for _ in range(700)]
                  + [({}, f"P{n}", 0.05) for n in range(12)])
    result = retriever.query(probe, k=10, per_patient=1)
    assert len(result.neighbors) == 10 and len({n.patient_id for n in result.neighbors}) == 10
    assert len(retriever.query(probe, k=30, per_patient=1).neighbors) == 13  # every case, no more


def retriever_probe():
    from lungcbir.io import CTSlice

    pixels = np.full((64, 64), -900.0, np.float32)
    pixels[16:48, 8:28] = 40.0
    return CTSlice(pixels, "hu", "probe", "array")


def test_stored_masks_come_from_the_rows_and_old_rows_fall_back_to_the_model(phantom_dir, tiny_weights,
                                                                              store_paths, monkeypatch):
    from sqlalchemy import text

    from lungcbir.inference import LungModel

    retriever = Retriever(weights=tiny_weights, **store_paths)
    retriever.index_dataset([phantom_dir / "png" / "phantom01"])
    stored = [(n.id, retriever.stored_slice(n.id))
              for n in retriever.query(phantom_dir / "png" / "phantom01" / "phantom01_s001.png", k=4,
                                       per_patient=0).neighbors]
    made = [s.mask for s in retriever.segment_slices([item for _, item in stored])]
    calls = []
    original = LungModel.segment
    monkeypatch.setattr(LungModel, "segment", lambda self, slices, batch_size=16: calls.append(len(slices))
                        or original(self, slices, batch_size))
    kept = retriever.stored_masks(stored)
    assert calls == [] and all(np.array_equal(a, b) for a, b in zip(kept, made))
    with retriever.store().engine.begin() as connection:  # rows indexed before masks were kept
        connection.execute(text("UPDATE images SET mask_png = NULL WHERE id = :id"), {"id": stored[1][0]})
    again = retriever.stored_masks(stored)
    assert calls == [1] and all(np.array_equal(a, b) for a, b in zip(again, made))


# filters and series order in the core, for the CLI and the web alike -----------

def test_parse_filters_strips_and_refuses_what_is_not_key_value():
    from lungcbir.errors import FilterError
    from lungcbir.retrieval import parse_filters

    assert parse_filters([" diagnosis = covid ", "patient_id=P1", "note="]) == \
        {"diagnosis": "covid", "patient_id": "P1", "note": ""}
    for bad in ("diagnosis", "=covid", " =covid"):
        with pytest.raises(FilterError, match="expected KEY=VALUE"):
            parse_filters(["patient_id=P1", bad])


def test_series_in_order_follows_the_headers_not_the_file_names(phantom_dir):
    from lungcbir.io import read_file
    from lungcbir.retrieval import series_in_order

    files = sorted((phantom_dir / "dicom" / "phantom01").glob("*.dcm"), reverse=True)
    read = [(str(path), read_file(str(path))) for path in files]
    ordered = series_in_order(read)
    assert len(ordered) == len(files) > 2
    locations = [item.slice_location for item in ordered]
    assert locations == sorted(locations, reverse=True)  # most superior first
    assert [item.instance_number for item in ordered] != [items[0].instance_number for _, items in read]


def test_resolve_filters_matches_stored_spellings_and_refuses_unknown_keys(phantom_dir, tiny_weights, tmp_path):
    from lungcbir.errors import FilterError

    labels = tmp_path / "labels.csv"
    rows = [f"{path},{'COVID-19' if path.parent.name == 'phantom01' else 'Normal'}"
            for path in sorted((phantom_dir / "dicom").rglob("*.dcm"))]
    labels.write_text("path,diagnosis\n" + "\n".join(rows) + "\n")
    retriever = Retriever(weights=tiny_weights, db_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
                          index_dir=str(tmp_path / "index"))
    retriever.index_dataset([phantom_dir / "dicom"], labels=str(labels))
    assert retriever.resolve_filters({}) == {}
    assert retriever.resolve_filters({"DIAGNOSIS": ["covid-19"]}) == {"diagnosis": "COVID-19"}
    assert retriever.resolve_filters({"diagnosis": ["normal", "Covid-19"]}) == {"diagnosis": ["COVID-19", "Normal"]}
    assert retriever.resolve_filters({"Patient_ID": ["PHANTOM01"]}) == {"patient_id": "PHANTOM01"}
    with pytest.raises(FilterError, match="unknown label key 'diagnosys'"):
        retriever.resolve_filters({"diagnosys": ["CAP"]})


def test_focus_weighs_the_anatomy_and_findings_parts_of_the_stored_vectors(phantom_dir, findings_weights, tmp_path):
    from lungcbir.focus import anatomy_weight

    retriever = Retriever(weights=findings_weights, db_url=f"sqlite:///{tmp_path / 'f.db'}", index_dir=tmp_path / "i")
    retriever.index_dataset([phantom_dir / "png"])
    query = read_file(sorted((phantom_dir / "png" / "phantom01").iterdir())[2])[0]
    mine = retriever.model.segment([query])[0].vector
    stored = {int(i): v for ids, vectors in retriever.store(create=False).iter_vectors()
              for i, v in zip(ids, vectors)}
    anatomy = retriever.model.parts[0]
    rankings = {}
    for focus in ("anatomy", "findings", "balanced"):
        weight = anatomy_weight(focus, retriever.model.settings.findings.balanced_anatomy_weight)
        result = retriever.query(query, k=8, per_patient=0, focus=focus)
        for neighbor in result.neighbors:
            other = stored[neighbor.id]
            expected = 2 * (weight * mine[:anatomy] @ other[:anatomy] + (1 - weight) * mine[anatomy:] @ other[anatomy:])
            assert neighbor.score == pytest.approx(expected, abs=2e-3)
        rankings[focus] = [n.id for n in result.neighbors]
    assert rankings["anatomy"] != rankings["findings"]
    with pytest.raises(LungCBIRError, match="unknown focus"):
        retriever.query(query, focus="level")


def test_scores_are_clipped_to_minus_one_one():
    """A self-match's float16 vector gives an inner product of 1.000047; a similarity is never above 1."""
    from lungcbir.database import ImageRecord
    from lungcbir.retrieval import _collapse, _slice_candidates

    rows = {1: ImageRecord(id=1, path="a.png"), 2: ImageRecord(id=2, path="b.png")}
    neighbors = _collapse(_slice_candidates(np.array([1.000047, -1.00002], np.float32), np.array([1, 2]), rows),
                          k=2, per_patient=0, leave_out=set())
    assert [n.score for n in neighbors] == [1.0, -1.0]


def test_a_long_folder_identity_is_stored_whole_on_every_backend(phantom_dir, tiny_weights, store_paths, tmp_path):
    # a plain archive: two slices of one scan whose folder's relative path is 184 characters
    relative = "/".join(["study-" + "a" * 40] * 4)[:184].rstrip("/")
    folder = tmp_path / "archive" / relative
    folder.mkdir(parents=True)
    for source in sorted((phantom_dir / "png" / "phantom01").glob("*.png"))[:2]:
        (folder / source.name).write_bytes(source.read_bytes())
    retriever = Retriever(weights=tiny_weights, **store_paths)
    report = retriever.index_dataset([tmp_path / "archive"])
    assert (report.indexed, report.failed) == (2, 0)
    rows = retriever.store().records(retriever.store().ids_for(under=[tmp_path]))
    assert {(row.patient_id, row.series_uid) for row in rows.values()} == {(relative, relative)}


def test_a_nul_in_a_files_identity_or_labels_fails_that_file_only(phantom_dir, tiny_weights, store_paths, tmp_path):
    png = phantom_dir / "png" / "phantom01"
    names = sorted(os.listdir(png))
    labels = tmp_path / "labels.csv"
    labels.write_text(f"path,patient_id,diagnosis\n{png / names[0]},P\x001,covid\n{png / names[1]},P2,co\x00vid\n"
                      f"{png / names[2]},P3,covid\n")
    retriever = Retriever(weights=tiny_weights, files_per_commit=100, **store_paths)
    report = retriever.index_dataset([png], labels=labels)
    assert sorted((os.path.basename(f.path), f.reason) for f in report.failures) == [
        (names[0], "patient_id holds a NUL character, which a database cannot store"),
        (names[1], "labels hold a NUL character, which a database cannot store")]
    assert (report.indexed, report.skipped) == (4, 0)
    assert retriever.store().count() == 4


def _copy_slices(phantom_dir, folder, count):
    """``count`` PNG slices of the phantom copied into ``folder`` (a scan of our own to change)."""
    folder.mkdir(parents=True)
    sources = sorted((phantom_dir / "png" / "phantom01").glob("*.png"))[:count]
    for source in sources:
        (folder / source.name).write_bytes(source.read_bytes())
    return [folder / source.name for source in sources]


def test_files_that_swapped_content_are_indexed_again(phantom_dir, tiny_weights, store_paths, tmp_path):
    from lungcbir.io import file_sha256

    first, second, third = _copy_slices(phantom_dir, tmp_path / "scan", 3)
    retriever = Retriever(weights=tiny_weights, **store_paths)
    assert retriever.index_dataset([tmp_path / "scan"]).indexed == 3
    one, other = first.read_bytes(), second.read_bytes()
    first.write_bytes(other)
    second.write_bytes(one)
    report = retriever.index_dataset([tmp_path / "scan"])
    assert (report.indexed, report.skipped, report.failed) == (2, 1, 0)
    store = retriever.store()
    rows = store.records(store.ids_for(under=[tmp_path / "scan"]))
    assert sorted((row.path, row.sha256) for row in rows.values()) == sorted(
        (str(path), file_sha256(path)) for path in (first, second, third))
    for path in (first, second):  # the vector (and the index, a cache of the rows) follow the content
        assert retriever.query(path, k=1, per_patient=0).neighbors[0].path == str(path)
    assert store.check(verify_files=True) == []


def test_a_changed_file_whose_old_content_another_file_now_has_keeps_both(phantom_dir, tiny_weights, store_paths,
                                                                          tmp_path):
    # b.png was a copy of a.png (one row: the content is stored once); then a.png changed
    first, second = _copy_slices(phantom_dir, tmp_path / "scan", 2)
    copy = tmp_path / "scan" / "z_copy_of_first.png"  # found after it: the row is the first's
    copy.write_bytes(first.read_bytes())
    retriever = Retriever(weights=tiny_weights, **store_paths)
    assert retriever.index_dataset([tmp_path / "scan"]).indexed == 2
    first.write_bytes((phantom_dir / "png" / "phantom02" / "phantom02_s003.png").read_bytes())
    report = retriever.index_dataset([tmp_path / "scan"])
    assert (report.indexed, report.failed) == (2, 0)
    store = retriever.store()
    paths = {row.path for row in store.records(store.ids_for(under=[tmp_path / "scan"])).values()}
    assert paths == {str(first), str(second), str(copy)}
    assert store.check(verify_files=True) == []


def _series(folder):
    from lungcbir.retrieval import series_in_order

    return series_in_order([(str(p), read_file(p)) for p in sorted(folder.iterdir())])


@pytest.fixture
def bundled_phantom(phantom_dir, bundled_weights, store_paths):
    """The phantom's DICOM series indexed with the bundled model (its masks find the lungs)."""
    retriever = Retriever(weights=bundled_weights, **store_paths)
    retriever.index_dataset([phantom_dir / "dicom"])
    return retriever


def test_series_query_with_other_patients_leaves_out_the_own_patient(bundled_phantom, phantom_dir):
    # --other-patients was ignored for series: the own patient ranked first at 1.000
    result = bundled_phantom.query_series(_series(phantom_dir / "dicom" / "phantom02"), k=2, other_patients=True)
    assert result.matches and {m.patient_id for m in result.matches} == {"PHANTOM01"}
    assert result.note and "1 of 2 cases" in result.note  # says why there are fewer than k


def test_series_pairs_are_level_aligned_and_leave_out_slices_without_lungs(bundled_phantom, phantom_dir):
    # pairs ignored the level, and slices without lungs took part
    series = _series(phantom_dir / "dicom" / "phantom02")
    blank = read_file(series[0].path)[0]
    blank.pixels = np.full_like(blank.pixels, -1000)  # air: a slice above the lungs
    slices = [blank, *series]
    result = bundled_phantom.query_series(slices, k=2, other_patients=True)
    assert result.levels[0] is None and result.slices[0].warning  # not matched
    best = result.matches[0]
    assert best.aligned and all(pair.query_slice != 0 for pair in best.aligned)
    assert all(abs(pair.level_difference) <= 0.1 for pair in best.aligned)
    answer = best.to_json()
    assert {"query_slice", "query_path", "query_level", "level", "level_difference"} <= set(answer["pairs"][0])


def test_slices_of_two_patients_are_not_one_series(bundled_phantom, phantom_dir):
    # two patients uploaded as one series were accepted without a word
    slices = _series(phantom_dir / "dicom" / "phantom01")[:2] + _series(phantom_dir / "dicom" / "phantom02")[:2]
    with pytest.raises(LungCBIRError, match="2 patients"):
        bundled_phantom.query_series(slices, k=2)


def test_a_short_answer_says_why(phantom_dir, tiny_weights, store_paths):
    # query(k=5) returned 2 results on a two-patient store without a word
    retriever = Retriever(weights=tiny_weights, **store_paths)
    retriever.index_dataset([phantom_dir / "dicom"])
    result = retriever.query(phantom_dir / "png" / "phantom01" / "phantom01_s002.png", k=5)
    assert len(result.neighbors) == 2
    assert result.note and "2 of 5" in result.note and "per patient" in result.note
    assert "note" in result.summary_json()
    assert retriever.query(phantom_dir / "png" / "phantom01" / "phantom01_s002.png", k=2).note is None


def test_the_same_pixels_stored_twice_come_once_with_their_copies(phantom_dir, tiny_weights, store_paths, tmp_path):
    # a DICOM and its TIFF export came back at ranks 2 and 3
    import cv2

    source = phantom_dir / "png" / "phantom01" / "phantom01_s002.png"
    pixels = cv2.imread(str(source), cv2.IMREAD_UNCHANGED)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    cv2.imwrite(str(tmp_path / "a" / "x.png"), pixels, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    cv2.imwrite(str(tmp_path / "b" / "x.tif"), pixels)  # other bytes, other format, the same pixels
    retriever = Retriever(weights=tiny_weights, **store_paths)
    retriever.index_dataset([phantom_dir / "png", tmp_path / "a", tmp_path / "b"])
    result = retriever.query(source, k=5, per_patient=0)
    paths = [n.path for n in result.neighbors] + [c["path"] for n in result.neighbors for c in n.copies]
    assert len(set(paths)) == len(paths)
    first = result.neighbors[0]
    assert len(first.copies) == 2 and {os.path.basename(c["path"]) for c in first.copies} | \
        {os.path.basename(first.path)} == {"phantom01_s002.png", "x.png", "x.tif"}
    assert sum(n.score > 0.999 for n in result.neighbors) == 1


def test_copies_are_one_answer_whichever_the_index_ranks_first():
    # a copy under another case (a TIFF export without a patient) ranked above the query's own
    # stored slice was shown under --other-patients, and counted as one more case under --per-patient
    from lungcbir.database import ImageRecord, encode_vector
    from lungcbir.retrieval import _collapse, _slice_candidates

    vectors = np.eye(8, dtype=np.float32)
    rows = {number: ImageRecord(id=number, path=path, patient_id=patient, vector=encode_vector(vectors[vector]))
            for number, path, patient, vector in [(1, "/export/x.tif", None, 0), (2, "/p1/s1.dcm", "P1", 0),
                                                  (3, "/p1/s2.dcm", "P1", 1), (4, "/p2/s1.dcm", "P2", 2)]}
    ids, scores = np.array([1, 2, 3, 4]), np.array([1.0, 0.9999, 0.8, 0.7])

    def walk(per_patient: int, leave_out: set[str]) -> list[tuple[str, list[str]]]:
        found = _collapse(_slice_candidates(scores, ids, rows), 5, per_patient, leave_out)
        assert [n.rank for n in found] == list(range(1, len(found) + 1))
        return [(n.path, [c["path"] for c in n.copies]) for n in found]

    assert walk(0, set()) == [("/export/x.tif", ["/p1/s1.dcm"]), ("/p1/s2.dcm", []), ("/p2/s1.dcm", [])]
    assert walk(0, {"patient:P1"}) == [("/p2/s1.dcm", [])]  # the export is P1's pixels: left out with them
    assert walk(1, set()) == [("/export/x.tif", ["/p1/s1.dcm"]), ("/p2/s1.dcm", [])]  # P1 once, with its copy


def test_neighbours_explain_themselves(phantom_dir, findings_weights, store_paths, tmp_path):
    # label summary, the parts' similarities and a percentile
    labels = tmp_path / "labels.csv"
    files = sorted((phantom_dir / "png" / "phantom01").glob("*.png"))
    labels.write_text("path,diagnosis\n" + "".join(f"{p},{'COVID-19' if n % 3 else 'normal'}\n"
                                                   for n, p in enumerate(files)))
    retriever = Retriever(weights=findings_weights, **store_paths)
    retriever.index_dataset([phantom_dir / "png"], labels=labels)
    result = retriever.query(files[2], k=6, per_patient=0)
    summary = result.label_summary()
    assert sum(summary["diagnosis"].values()) == sum("diagnosis" in n.labels for n in result.neighbors)
    assert result.summary_json()["label_summary"] == summary
    for neighbor in result.neighbors:
        assert 0 <= neighbor.percentile <= 100
        assert -1 <= neighbor.anatomy_score <= 1 and -1 <= neighbor.findings_score <= 1
    assert result.neighbors[0].percentile >= result.neighbors[-1].percentile
    # balanced with weight 0.4: the score is the weighted sum of the parts' cosines
    first = result.neighbors[0]
    assert first.score == pytest.approx(0.4 * first.anatomy_score + 0.6 * first.findings_score, abs=2e-3)


def test_lung_levels_and_pairs():
    from lungcbir.retrieval import level_pairs, lung_levels

    assert lung_levels([0.0, 0.2, 0.2, 0.2, 0.0]) == [None, 0.0, 0.5, 1.0, None]
    assert lung_levels([0.001, 0.002]) == [None, None]  # no lungs anywhere: no levels
    scores = np.array([[0.9, 0.1, 0.95], [0.1, 0.9, 0.2]])
    # the most similar slice is at another level: the pair is the one at the same level
    assert level_pairs([0.0, 1.0], [True, True], [0.0, 1.0, 0.5], [True] * 3, scores) == [0, 1]


def test_percentiles_follow_a_store_whose_rows_changed_but_not_their_number(phantom_dir, findings_weights,
                                                                            store_paths):
    """The reference sample of pair scores was kept while the row count stayed the same: slices
    removed and as many others indexed left percentiles taken among pairs no longer stored."""
    retriever = Retriever(weights=findings_weights, **store_paths)
    retriever.index_dataset([phantom_dir / "png" / "phantom01"])
    store = retriever.store()
    query = sorted((phantom_dir / "png" / "phantom02").glob("*.png"))[1]
    before = retriever._pair_scores(store, "balanced")
    store.remove(store.ids_for(under=[str(phantom_dir / "png" / "phantom01")]))
    retriever.index_dataset([phantom_dir / "png" / "phantom02"])
    assert store.count() == len(sorted((phantom_dir / "png" / "phantom01").glob("*.png")))  # the same number
    fresh = Retriever(weights=findings_weights, **store_paths)
    expected = fresh._pair_scores(fresh.store(), "balanced")
    assert not np.array_equal(before, expected)  # the stored pairs did change
    assert np.array_equal(retriever._pair_scores(store, "balanced"), expected)
    assert retriever.query(query, k=2).neighbors[0].percentile is not None


def test_a_query_does_not_count_the_stored_rows(phantom_dir, tiny_weights, store_paths, monkeypatch):
    """Every query counted the rows to tell an empty store (a full scan: about 60 ms a query at
    1 M rows on SQLite, a third of a query's time there); whether one row exists is enough."""
    from lungcbir.database import Database

    retriever = Retriever(weights=tiny_weights, **store_paths)
    retriever.index_dataset([phantom_dir / "png" / "phantom01"])

    def counted(self):
        raise AssertionError("a query counted every stored row")

    monkeypatch.setattr(Database, "count", counted)
    result = retriever.query(sorted((phantom_dir / "png" / "phantom02").glob("*.png"))[0], k=2, per_patient=0)
    assert len(result.neighbors) == 2
