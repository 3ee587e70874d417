"""The quality verdict: signals on synthetic probability maps, the verdict rules, and what the user
sees (CLI, API): a no-lungs query is not searched."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from lungcbir.quality import Quality, QualitySignals, assess, colour_share, judge, measure


def _chest() -> tuple[np.ndarray, np.ndarray]:
    """A synthetic lung-window slice (body 0.7, lungs 0.1) and a sharp, confident lung map."""
    unit = np.zeros((256, 256), np.float32)
    cv2.ellipse(unit, (128, 128), (110, 85), 0, 0, 360, 0.7, -1)
    probability = np.zeros_like(unit)
    for centre in (80, 176):
        cv2.ellipse(unit, (centre, 120), (32, 55), 0, 0, 360, 0.1, -1)
        cv2.ellipse(probability, (centre, 120), (32, 55), 0, 0, 360, 1.0, -1)
    # a soft edge on part of the boundary, as a confident network gives (held-out median: 0.4
    # uncertain pixels per boundary pixel)
    probability[:, :100] = cv2.GaussianBlur(probability, (3, 3), 0)[:, :100]
    return unit, probability


def test_a_sharp_plausible_mask_is_ok():
    unit, probability = _chest()
    verdict = judge(probability, probability, unit)
    assert verdict.quality == Quality.OK and verdict.score > 0.9


def test_a_blurred_unsure_mask_is_doubtful():
    unit, probability = _chest()
    unsure = cv2.GaussianBlur(probability, (0, 0), 6)  # a wide band of 0.2 < p < 0.8
    sharp, blurred = measure(probability, probability, unit), measure(unsure, unsure, unit)
    assert blurred.band_width > 3 * sharp.band_width
    assert judge(unsure, unsure, unit).quality == Quality.DOUBTFUL


def test_a_mask_mostly_removed_by_post_processing_is_doubtful():
    unit, probability = _chest()
    raw = probability.copy()
    raw[180:250, 10:246] = 0.95  # the network also marked a big region that clean-up removed
    assert measure(raw, probability, unit).removed_share > 0.5
    assert judge(raw, probability, unit).quality == Quality.DOUBTFUL


def test_many_sizeable_fragments_are_doubtful():
    unit, _ = _chest()
    probability = np.zeros_like(unit)
    for x in range(40, 230, 30):
        probability[100:140, x:x + 15] = 1.0
    assert measure(probability, probability, unit).components >= 6
    assert judge(probability, probability, unit).quality == Quality.DOUBTFUL


def test_lungs_brighter_than_their_surroundings_are_doubtful():
    unit, probability = _chest()
    inverted = np.where(unit > 0, 0.9 - unit, 0.0).astype(np.float32)  # body 0.2, "lungs" 0.8
    assert judge(probability, probability, inverted).quality == Quality.DOUBTFUL


def test_an_empty_mask_is_no_lungs():
    unit, probability = _chest()
    empty = np.zeros_like(probability)
    verdict = judge(empty, empty, unit)
    assert verdict.quality == Quality.NO_LUNGS and verdict.score == 0.0


@pytest.mark.parametrize("kind", ["constant", "white page", "colour"])
def test_pictures_that_are_not_ct_are_no_lungs_whatever_the_mask(kind):
    unit, probability = _chest()
    colour = 0.0
    if kind == "constant":
        unit = np.full_like(unit, 0.4) + np.random.default_rng(0).normal(0, 0.004, unit.shape).astype(np.float32)
    elif kind == "white page":
        unit = np.where(np.random.default_rng(0).random(unit.shape) < 0.9, 1.0, 0.0).astype(np.float32)
    else:
        colour = 0.5
    assert judge(probability, probability, unit, colour).quality == Quality.NO_LUNGS
    # also when the mask signals are not judged (models the thresholds were not chosen for)
    assert judge(probability, probability, unit, colour, judge_mask=False).quality == Quality.NO_LUNGS


def test_colour_share_counts_coloured_pixels_only():
    picture = np.full((64, 64, 3), 90, np.uint8)
    picture[:32, :, 2] = 250  # top half red (BGR)
    assert colour_share(picture) == pytest.approx(0.5)
    assert colour_share(picture[:, :, 0]) == 0.0


def test_score_is_in_unit_range_and_falls_with_the_band():
    scores = [assess(QualitySignals(0.0, 0.0, 0.3, 0.2, band, 0.0, 2, 0.3)).score for band in np.linspace(0, 5, 11)]
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert scores == sorted(scores, reverse=True) and scores[0] == 1.0 and scores[-1] == 0.0


def test_a_colour_file_is_read_with_its_colour_share(tmp_path):
    from lungcbir.io import read_file

    picture = np.zeros((64, 64, 3), np.uint8)
    picture[:, :, 1] = np.arange(64, dtype=np.uint8)[None] + 150
    cv2.imwrite(str(tmp_path / "green.png"), picture)
    cv2.imwrite(str(tmp_path / "grey.png"), cv2.cvtColor(picture, cv2.COLOR_BGR2GRAY))
    assert read_file(tmp_path / "green.png")[0].colour_share == 1.0
    assert read_file(tmp_path / "grey.png")[0].colour_share == 0.0


# --- what the user sees -------------------------------------------------------------------

def text_page(side: int = 200) -> np.ndarray:
    page = np.full((side, side, 3), 255, np.uint8)
    for line in range(6):
        cv2.putText(page, f"Worklist row {line}", (5, 25 + 30 * line), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1)
    return page


def constant_ish(side: int = 120) -> np.ndarray:
    picture = np.full((side, side), 128, np.uint8)
    picture[::7, ::7] = 129  # not exactly constant (the reader refuses those), but nothing in it
    return picture


@pytest.fixture
def client(phantom_dir, tiny_weights, tmp_path):
    from fastapi.testclient import TestClient

    from lungcbir.retrieval import Retriever
    from lungcbir.web import create_app

    retriever = Retriever(weights=tiny_weights, db_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
                          index_dir=str(tmp_path / "index"))
    retriever.index_dataset([phantom_dir / "dicom"])
    return TestClient(create_app(retriever), base_url="http://localhost", raise_server_exceptions=False)


@pytest.mark.parametrize("picture", [text_page, constant_ish])
def test_api_does_not_search_a_picture_without_lungs(client, picture):
    data = cv2.imencode(".png", picture())[1].tobytes()
    answer = client.post("/api/query", files={"file": ("x.png", data, "image/png")}).json()
    assert answer["quality"] == "no-lungs" and answer["neighbors"] == [] and "not searched" in answer["warning"]
    assert answer["lesion_fraction"] is None and answer["quality_score"] == 0.0
    segmented = client.post("/api/segment", files={"file": ("x.png", data, "image/png")}).json()
    assert segmented["quality"] == "no-lungs" and "lung_fraction" in segmented


def test_api_searches_a_ct_slice_and_reports_its_quality(client, phantom_dir):
    data = (phantom_dir / "png" / "phantom01" / "phantom01_s002.png").read_bytes()
    answer = client.post("/api/query", files={"file": ("q.png", data, "image/png")}, data={"k": "2"}).json()
    assert answer["quality"] == "ok" and answer["neighbors"] and "warning" not in answer
    assert 0.0 <= answer["quality_score"] <= 1.0


def test_cli_query_prints_a_warning_instead_of_a_table_and_segment_json(phantom_dir, tiny_weights, tmp_path):
    from click.testing import CliRunner

    from lungcbir.cli import main

    store = ["--db", f"sqlite:///{tmp_path / 'db.sqlite'}", "--index-dir", str(tmp_path / "index")]
    runner = CliRunner()
    assert runner.invoke(main, ["index-dataset", str(phantom_dir / "dicom"), "--weights", tiny_weights,
                                "--quiet", *store]).exit_code == 0
    page = tmp_path / "page.png"
    cv2.imwrite(str(page), text_page())
    table = runner.invoke(main, ["query", str(page), "--weights", tiny_weights, "--out", str(tmp_path / "o"), *store])
    assert table.exit_code == 0, table.output
    assert "quality no-lungs" in table.output and "warning: no lungs found" in table.output
    assert "rank" not in table.output
    answer = json.loads(runner.invoke(main, ["query", str(page), "--json", "--weights", tiny_weights,
                                             "--out", str(tmp_path / "o"), *store]).output.splitlines()[0])
    assert answer["neighbors"] == [] and answer["quality"] == "no-lungs" and answer["warning"]
    slice_png = phantom_dir / "png" / "phantom01" / "phantom01_s002.png"
    segmented = runner.invoke(main, ["segment", str(slice_png), str(page), "--json", "--weights", tiny_weights,
                                     "--out", str(tmp_path / "masks")])
    assert segmented.exit_code == 0, segmented.output
    objects = [json.loads(line) for line in segmented.output.splitlines()]
    assert [set(o) for o in objects] == [{"image", "mask", "lung_fraction", "lesion_fraction", "quality",
                                          "quality_score"}] * 2
    assert [o["quality"] for o in objects] == ["ok", "no-lungs"]
    assert all(cv2.imread(o["mask"]) is not None for o in objects)
