import json
import os
import re

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from lungcbir.cli import main


def _runner(store_paths, weights_path):
    runner = CliRunner()

    def invoke(*args, store=True, weights=True):
        extra = []
        if store:
            extra += ["--db", store_paths["db_url"], "--index-dir", store_paths["index_dir"]]
        if weights:
            extra += ["--weights", weights_path]
        return runner.invoke(main, [*args, *extra], catch_exceptions=False)

    return invoke


@pytest.fixture
def run(store_paths, tiny_weights):
    return _runner(store_paths, tiny_weights)


@pytest.fixture
def run_bundled(store_paths, bundled_weights):
    """As ``run``, with the bundled model: series queries pair slices by lung level, which needs
    masks that find the lungs."""
    return _runner(store_paths, bundled_weights)


def test_help_lists_commands():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for command in ("index-dataset", "query", "segment", "stats", "train", "evaluate", "make-phantom"):
        assert command in result.output


def test_index_warns_of_label_rows_that_name_no_indexed_file(run, phantom_dir, tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("path,diagnosis\nnot/here.png,lost\n")
    result = run("index-dataset", str(phantom_dir / "png"), "--labels", str(labels), "--quiet")
    assert result.exit_code == 0, result.output
    assert "warning: 1 row(s) of the labels CSV name no file indexed here" in result.output


def test_index_query_stats(run, phantom_dir, tmp_path):
    result = run("index-dataset", str(phantom_dir / "png"), "--quiet")
    assert result.exit_code == 0, result.output
    assert "indexed 12, skipped 0" in result.output
    again = run("index-dataset", str(phantom_dir / "png"), "--quiet")
    assert "indexed 0, skipped 12" in again.output
    image = str(phantom_dir / "png" / "phantom02" / "phantom02_s004.png")
    out = tmp_path / "out"
    result = run("query", image, "--k", "3", "--out", str(out), "--json", "--per-patient", "0")
    assert result.exit_code == 0, result.output
    answer = json.loads(result.output.strip().splitlines()[0])
    assert set(answer) == {"query", "mask", "overlay", "matches", "lung_fraction", "lesion_fraction", "quality",
                           "quality_score", "focus", "neighbors", "label_summary", "lesion_mask"}
    assert cv2.imread(answer["matches"]).shape[0] == 256
    assert answer["neighbors"][0]["path"] == os.path.abspath(image)
    assert set(answer["neighbors"][0]) == {"rank", "id", "path", "score", "patient_id", "study_uid", "series_uid",
                                           "sop_uid", "slice_index", "labels", "anatomy_score", "findings_score",
                                           "percentile", "level", "copies"}
    mask = cv2.imread(answer["mask"], cv2.IMREAD_UNCHANGED)
    assert mask.shape == (96, 96) and set(np.unique(mask)) <= {0, 255}
    assert cv2.imread(answer["overlay"]).shape == (96, 96, 3)
    table = run("query", image, "--k", "2", "--out", str(out))
    assert table.exit_code == 0 and "rank" in table.output
    stats = run("stats", "--json", weights=False)
    assert json.loads(stats.output)["images"] == 12


def test_index_reports_failures_with_status_1(run, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    cv2.imwrite(str(folder / "good.png"), np.eye(64, dtype=np.uint8) * 200)
    (folder / "bad.png").write_bytes(b"garbage")
    result = run("index-dataset", str(folder), "--quiet")
    assert result.exit_code == 1
    assert "indexed 1" in result.output and "bad.png: not a decodable image" in result.output


def test_query_without_database_says_how_to_create(run, phantom_dir, tmp_path):
    image = str(phantom_dir / "png" / "phantom01" / "phantom01_s000.png")
    result = run("query", image, "--out", str(tmp_path / "o"))
    assert result.exit_code == 4
    assert "lungcbir index-dataset" in result.output and "Traceback" not in result.output


def test_missing_weights_status_3(run, phantom_dir, tmp_path):
    result = CliRunner().invoke(main, ["segment", str(phantom_dir / "png"), "--out", str(tmp_path),
                                       "--weights", str(tmp_path / "none.pt")])
    assert result.exit_code == 3 and "does not exist" in result.output


def test_segment_png_and_nifti(run, phantom_dir, tmp_path):
    import nibabel

    volume = tmp_path / "v.nii.gz"
    planes = np.full((48, 40, 3), -900, np.int16)
    planes[10:30, 5:20] = 40  # a constant plane is refused, as constant images are
    nibabel.save(nibabel.Nifti1Image(planes, np.eye(4)), str(volume))
    image = str(phantom_dir / "png" / "phantom01" / "phantom01_s002.png")
    result = run("segment", image, str(volume), "--out", str(tmp_path / "masks"), store=False)
    assert result.exit_code == 0, result.output
    assert cv2.imread(str(tmp_path / "masks" / "phantom01_s002_mask.png")).shape[:2] == (96, 96)
    assert nibabel.load(str(tmp_path / "masks" / "v_mask.nii.gz")).shape == (48, 40, 3)


def test_segment_unreadable_input(run, tmp_path):
    bad = tmp_path / "x.png"
    bad.write_bytes(b"")
    result = run("segment", str(bad), "--out", str(tmp_path / "m"), store=False)
    assert result.exit_code == 1 and "x.png: file is empty" in result.output


def test_make_phantom_and_evaluate(run, tmp_path):
    result = CliRunner().invoke(main, ["make-phantom", str(tmp_path / "ph"), "--slices", "3", "--patients", "1"])
    assert result.exit_code == 0 and "synthetic" in result.output
    result = run("evaluate", "--images", str(tmp_path / "ph" / "png"), "--masks", str(tmp_path / "ph" / "masks"),
                 "--json", store=False)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)["given folders"]["summary"]
    assert summary["images"] == 3 and 0.0 <= summary["dice_min"] <= summary["dice_mean"] <= 1.0


def test_check_rebuild_remove(run, phantom_dir, store_paths):
    assert run("index-dataset", str(phantom_dir / "png"), "--quiet").exit_code == 0
    result = run("check", "--files", weights=False)
    assert result.exit_code == 0 and "ok" in result.output
    index_file = os.path.join(store_paths["index_dir"], "lungcbir.faiss")
    os.unlink(index_file)
    result = run("check", weights=False)
    assert result.exit_code == 4 and "missing" in result.output
    result = run("rebuild-index", weights=False)
    assert result.exit_code == 0 and "12 vectors" in result.output
    assert run("check", weights=False).exit_code == 0
    one = str(phantom_dir / "png" / "phantom01" / "phantom01_s000.png")
    assert "removed 1 image" in run("remove", one, weights=False).output
    assert "removed 5 image" in run("remove", "--under", str(phantom_dir / "png" / "phantom01"), weights=False).output
    assert run("check", weights=False).exit_code == 0
    stats = json.loads(run("stats", "--json", weights=False).output)
    assert stats["images"] == 6 and stats["index_vectors"] == 6
    assert run("remove", weights=False).exit_code == 2


def test_second_writer_is_refused(run, phantom_dir, store_paths):
    from lungcbir.store import Store

    with Store(**store_paths).write_lock():
        result = run("index-dataset", str(phantom_dir / "png"), "--quiet")
    assert result.exit_code == 5 and "holds the lock" in result.output


def test_query_by_series(run_bundled, phantom_dir):
    run = run_bundled
    assert run("index-dataset", str(phantom_dir / "dicom"), "--quiet").exit_code == 0
    result = run("query", str(phantom_dir / "dicom" / "phantom02"), "--by-series", "--json", "--k", "2")
    assert result.exit_code == 0, result.output
    answer = json.loads(result.output)
    assert answer["slices"] == 6 and answer["cases"][0]["patient_id"] == "PHANTOM02"
    assert answer["cases"][0]["score"] == pytest.approx(1.0, abs=2e-3)
    assert len(answer["cases"]) == 2 and answer["cases"][0]["pairs"]


def _series_with_broken_file(source, folder):
    import shutil

    shutil.copytree(source, folder)
    (folder / "broken.dcm").write_bytes(b"DICM but not really")
    return folder


@pytest.mark.parametrize("as_json", [True, False])
def test_query_by_series_failed_file_gives_status_1_after_every_source(run, phantom_dir, tmp_path, as_json):
    assert run("index-dataset", str(phantom_dir / "dicom"), "--quiet").exit_code == 0
    damaged = _series_with_broken_file(phantom_dir / "dicom" / "phantom01", tmp_path / "damaged")
    clean = phantom_dir / "dicom" / "phantom02"
    result = run("query", str(damaged), str(clean), "--by-series", "--k", "2", *(["--json"] if as_json else []))
    assert result.exit_code == 1, result.output
    assert "broken.dcm" in result.output and "failed:" in result.output
    # the failure of the first source neither stops nor hides the answer to the second
    if as_json:
        answers = [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]
        assert [a["query"] for a in answers] == [str(damaged), str(clean)]
    else:
        assert f"{damaged}: 6 slices" in result.output and f"{clean}: 6 slices" in result.output


def test_query_by_series_source_without_readable_files(run, phantom_dir, tmp_path):
    assert run("index-dataset", str(phantom_dir / "dicom"), "--quiet").exit_code == 0
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "only.dcm").write_bytes(b"not a DICOM file")
    result = run("query", str(broken), str(phantom_dir / "dicom" / "phantom02"), "--by-series", "--json")
    assert result.exit_code == 1 and "only.dcm" in result.output and "Traceback" not in result.output
    answers = [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]
    assert [a["query"] for a in answers] == [str(phantom_dir / "dicom" / "phantom02")]


@pytest.fixture
def segment_calls(monkeypatch):
    """Counts the slices each call of the model's segment is given."""
    from lungcbir.inference import LungModel

    calls = []
    original = LungModel.segment

    def counting(self, slices, batch_size=16, **options):
        calls.append(len(slices))
        return original(self, slices, batch_size, **options)

    monkeypatch.setattr(LungModel, "segment", counting)
    return calls


def test_query_k60_runs_the_model_for_the_query_only(run, phantom_dir, tmp_path, segment_calls):
    assert run("index-dataset", str(phantom_dir / "png"), str(phantom_dir / "dicom"), "--quiet").exit_code == 0
    image = str(phantom_dir / "png" / "phantom01" / "phantom01_s002.png")
    segment_calls.clear()
    result = run("query", image, "--k", "60", "--per-patient", "0", "--out", str(tmp_path / "out"), "--json")
    assert result.exit_code == 0, result.output
    assert segment_calls == [1]  # the stored neighbours' masks come from their rows
    answer = json.loads(result.output)
    assert len(answer["neighbors"]) == 24
    strip = cv2.imread(answer["matches"])
    assert strip.shape[0] == 256 and strip.shape[1] < 10 * (256 + 4)  # the query and at most 8 neighbours


def test_query_no_pictures_writes_no_files(run, phantom_dir, tmp_path, segment_calls):
    assert run("index-dataset", str(phantom_dir / "png"), "--quiet").exit_code == 0
    image = str(phantom_dir / "png" / "phantom01" / "phantom01_s002.png")
    out = tmp_path / "out"
    result = run("query", image, "--k", "5", "--out", str(out), "--json", "--no-pictures")
    assert result.exit_code == 0, result.output
    answer = json.loads(result.output)
    assert answer["mask"] is None and answer["overlay"] is None and answer["matches"] is None
    assert answer["neighbors"] and not out.exists()
    table = run("query", image, "--k", "5", "--out", str(out), "--no-pictures")
    assert table.exit_code == 0 and "rank" in table.output and not out.exists()


@pytest.mark.parametrize("where", ["diagnosis", "=covid", " =covid"])
def test_query_where_that_is_not_key_value_is_bad_usage(where, tmp_path):
    # one parser for the CLI and the web (lungcbir.retrieval.parse_filters); a blank key is
    # refused too instead of filtering on a label named ""
    image = tmp_path / "q.png"
    image.write_bytes(b"not read: the options are checked first")
    result = CliRunner().invoke(main, ["query", str(image), "--where", where, "--db",
                                       f"sqlite:///{tmp_path / 'db.sqlite'}", "--index-dir", str(tmp_path / "i")])
    assert result.exit_code == 2 and "--where" in result.output and "expected KEY=VALUE" in result.output
    assert "Traceback" not in result.output


def test_query_table_shows_stored_paths_relative_to_the_working_directory(run, phantom_dir, tmp_path, monkeypatch):
    """Docs and reports quote the table: it must not show the folders of the machine it ran on."""
    assert run("index-dataset", str(phantom_dir / "png"), "--quiet").exit_code == 0
    image = sorted((phantom_dir / "png" / "phantom01").glob("*.png"))[1]
    monkeypatch.chdir(phantom_dir)
    result = run("query", str(image), "--k", "2", "--no-pictures")
    assert result.exit_code == 0, result.output
    rows = [line for line in result.output.splitlines() if line.strip().startswith("1 ")]
    assert rows and os.path.relpath(image, phantom_dir) in rows[0] and str(phantom_dir) not in rows[0]


def test_query_table_shows_the_lesion_fraction_of_a_model_with_a_lesion_output(store_paths, findings_weights,
                                                                              phantom_dir):
    runner = CliRunner()
    paths = ["--db", store_paths["db_url"], "--index-dir", store_paths["index_dir"], "--weights", findings_weights]
    assert runner.invoke(main, ["index-dataset", str(phantom_dir / "png"), "--quiet", *paths]).exit_code == 0
    image = sorted((phantom_dir / "png" / "phantom01").glob("*.png"))[1]
    result = runner.invoke(main, ["query", str(image), "--k", "2", "--no-pictures", *paths])
    assert result.exit_code == 0, result.output
    assert re.search(r"lung fraction \d\.\d{3}  lesion fraction \d\.\d{3}  quality", result.output), result.output


def test_query_json_says_which_focus_it_searched_with(run, phantom_dir):
    assert run("index-dataset", str(phantom_dir / "png"), "--quiet").exit_code == 0
    image = str(sorted((phantom_dir / "png" / "phantom01").glob("*.png"))[1])
    for arguments, focus in ((["--json"], "balanced"), (["--json", "--focus", "anatomy"], "anatomy"),
                             (["--json", "--together", "--focus", "findings"], "findings")):
        result = run("query", image, "--k", "2", "--no-pictures", *arguments)
        assert result.exit_code == 0, result.output
        assert json.loads(result.output.splitlines()[0])["focus"] == focus


def test_check_files_advice_repairs_swapped_files(run, phantom_dir, tmp_path):
    folder = tmp_path / "scan"
    folder.mkdir()
    first, second = sorted((phantom_dir / "png" / "phantom01").glob("*.png"))[:2]
    (folder / first.name).write_bytes(second.read_bytes())  # the two files swapped content
    (folder / second.name).write_bytes(first.read_bytes())
    assert run("index-dataset", str(folder), "--quiet").exit_code == 0
    (folder / first.name).write_bytes(first.read_bytes())
    (folder / second.name).write_bytes(second.read_bytes())
    result = run("check", "--files", weights=False)
    assert result.exit_code == 4
    assert result.output.count("file changed since it was indexed") == 2
    advice = result.output.splitlines()[-1]
    assert "`lungcbir index-dataset PATH`" in advice and "changed files" in advice, advice
    assert run("index-dataset", str(folder), "--quiet").exit_code == 0  # what the advice says
    result = run("check", "--files", weights=False)
    assert result.exit_code == 0, result.output


def test_series_query_with_other_patients_leaves_out_the_own_patient(run_bundled, phantom_dir):
    # --other-patients was ignored with --by-series (own patient first, 1.000)
    assert run_bundled("index-dataset", str(phantom_dir / "dicom"), "--quiet").exit_code == 0
    result = run_bundled("query", str(phantom_dir / "dicom" / "phantom02"), "--by-series", "--other-patients",
                         "--json", "--k", "2")
    assert result.exit_code == 0, result.output
    answer = json.loads(result.output)
    assert [case["patient_id"] for case in answer["cases"]] == ["PHANTOM01"]
    pair = answer["cases"][0]["pairs"][0]
    assert {"query_slice", "query_path", "query_level", "level", "level_difference"} <= set(pair)
    assert "label_summary" in answer and "1 of 2" in answer["note"]


def test_removing_a_path_that_is_not_stored_fails(run, phantom_dir, tmp_path):
    # `remove PATH` of a path not stored printed "removed 0 image(s)", exit 0
    assert run("index-dataset", str(phantom_dir / "png"), "--quiet").exit_code == 0
    result = run("remove", str(tmp_path / "never-indexed.png"), weights=False)
    assert result.exit_code == 1 and "not stored" in result.output


def test_query_writes_the_lesion_map_and_a_two_segment_seg(phantom_dir, findings_weights, store_paths, tmp_path):
    # the lesion map was computed but never shown or written
    import pydicom

    run = _runner(store_paths, findings_weights)
    assert run("index-dataset", str(phantom_dir / "dicom"), "--quiet").exit_code == 0
    image = sorted((phantom_dir / "dicom" / "phantom01").iterdir())[2]
    result = run("query", str(image), "--k", "2", "--out", str(tmp_path / "out"), "--json")
    assert result.exit_code == 0, result.output
    answer = json.loads(result.output)
    lesion = cv2.imread(answer["lesion_mask"], cv2.IMREAD_UNCHANGED)
    assert lesion.shape == (96, 96) and set(np.unique(lesion)) <= {0, 255} and lesion.any()
    seg = pydicom.dcmread(answer["seg"])
    assert [segment.SegmentLabel for segment in seg.SegmentSequence] == ["Lung", "Lesion"]
