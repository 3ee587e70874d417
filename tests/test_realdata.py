"""End-to-end on the real shared data (../shared/data): every format read, indexed, queried."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from click.testing import CliRunner

from lungcbir.cli import main
from lungcbir.io import dicom_series_positions, find_image_files, read_file

pytestmark = pytest.mark.realdata


def pick(folder, count):
    return sorted(find_image_files([folder]))[:count]


def test_real_formats_are_read_as_expected(shared_data):
    tiff = read_file(pick(shared_data / "kaggle-lungs-2d" / "images", 1)[0])[0]
    assert tiff.intensity == "hu" and tiff.shape == (512, 512)
    jpeg_lossless = read_file(pick(shared_data / "covid-ct-md" / "covid" / "P001", 1)[0])[0]
    assert jpeg_lossless.intensity == "hu" and jpeg_lossless.patient_id and jpeg_lossless.series_uid
    assert -1100 < float(np.median(jpeg_lossless.pixels)) < 200
    rle = read_file(shared_data / "tcga-ct-slices" / "dicom" / "ID_0050_AGE_0074_CONTRAST_0_CT.dcm")[0]
    assert rle.intensity == "hu" and rle.pixels.shape == (512, 512)
    float_tiff = read_file(shared_data / "tcga-ct-slices" / "tiff" / "ID_0050_AGE_0074_CONTRAST_0_CT.tif")[0]
    assert float_tiff.intensity == "hu" and np.allclose(float_tiff.pixels, np.floor(rle.pixels), atol=1)
    png = read_file(pick(shared_data / "covid19-ct-lungmask" / "ct", 1)[0])[0]
    assert png.intensity == "uint8" and png.shape == (256, 256)


def test_dicom_series_order_matches_instance_number(shared_data):
    files = list(find_image_files([shared_data / "covid-ct-md" / "covid" / "P001"]))
    positions = dicom_series_positions(files)
    instances = {f: read_file(f)[0].instance_number for f in files}
    ordered = sorted(files, key=positions.get)
    assert [instances[f] for f in ordered] == sorted(instances.values())


def test_index_and_query_a_mix_of_real_formats(shared_data, tiny_weights, tmp_path):
    inputs = tmp_path / "inputs"
    groups = {
        "tiff": pick(shared_data / "kaggle-lungs-2d" / "images", 6),
        "dicom-jpegls": pick(shared_data / "covid-ct-md" / "cap" / "cap002", 8),
        "png": pick(shared_data / "covid19-ct-lungmask" / "ct", 6),
        "dicom-rle": pick(shared_data / "tcga-ct-slices" / "dicom", 30)[20:26],
        "float-tiff": pick(shared_data / "tcga-ct-slices" / "tiff", 2),
    }
    for name, files in groups.items():
        (inputs / name).mkdir(parents=True)
        for path in files:
            os.symlink(path, inputs / name / os.path.basename(path))
    store = ["--db", f"sqlite:///{tmp_path}/db.sqlite", "--index-dir", str(tmp_path / "index"),
             "--weights", tiny_weights]
    runner = CliRunner()
    result = runner.invoke(main, ["index-dataset", str(inputs), "--quiet", *store], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert f"indexed {sum(map(len, groups.values()))}, skipped 0 (already indexed), failed 0" in result.output
    queries = [str(inputs / name / os.path.basename(files[-1])) for name, files in groups.items()]
    result = runner.invoke(main, ["query", *queries, "--k", "3", "--json", "--out", str(tmp_path / "out"), *store],
                           catch_exceptions=False)
    assert result.exit_code == 0, result.output
    answers = [json.loads(line) for line in result.output.strip().splitlines()]
    assert len(answers) == len(queries)
    for query, answer in zip(queries, answers):
        assert answer["neighbors"][0]["path"] == os.path.abspath(query)
        assert answer["neighbors"][0]["score"] == pytest.approx(1.0, abs=2e-3)
        assert 0.0 <= answer["lung_fraction"] <= 1.0
        shape = read_file(query)[0].shape
        import cv2

        assert cv2.imread(answer["mask"], cv2.IMREAD_UNCHANGED).shape == shape
    dicom_answer = answers[1]["neighbors"][0]
    assert dicom_answer["patient_id"] and dicom_answer["series_uid"] and dicom_answer["slice_index"] is not None
