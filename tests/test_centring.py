"""The centre saved with a model: vectors centred before normalisation, a new model id, the
bundled model's centre taken from its training split, and scores that spread over [-1, 1]."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from lungcbir.centring import (
    add_training_centre,
    training_centre,
    training_images,
    uncentred_vectors,
    write_centre,
)
from lungcbir.datasets import covid_slices, kaggle_slices
from lungcbir.errors import LungCBIRError
from lungcbir.features import centre_vectors
from lungcbir.inference import LungModel
from lungcbir.io import CTSlice, read_file
from lungcbir.retrieval import Retriever


def _slices(count: int = 6) -> list[CTSlice]:
    generator = np.random.default_rng(0)
    return [CTSlice(generator.uniform(-1000, 400, (64, 64)).astype(np.float32), "hu", f"s{n}", "tiff")
            for n in range(count)]


def test_centre_is_saved_changes_the_id_and_is_applied_before_normalisation(tmp_path, tiny_weights):
    plain = LungModel.load(tiny_weights)
    raw = np.stack([r.vector for r in plain.segment(_slices())])
    centre = raw.mean(0)
    centred_path = tmp_path / "centred.pt"
    write_centre(tiny_weights, centre, centred_path)
    centred = LungModel.load(centred_path)
    assert centred.model_id != plain.model_id
    assert np.allclose(centred.settings.centre, centre)
    vectors = np.stack([r.vector for r in centred.segment(_slices())])
    expected = (raw - centre) / np.linalg.norm(raw - centre, axis=1, keepdims=True)
    assert np.allclose(vectors, expected, atol=1e-5)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    # only the settings changed: the stored weights are the same tensors
    before = torch.load(tiny_weights, weights_only=True)["state_dict"]
    after = torch.load(centred_path, weights_only=True)["state_dict"]
    assert all(torch.equal(before[key], after[key]) and before[key].dtype == after[key].dtype for key in before)


def test_centre_vectors_without_centre_is_the_identity():
    vectors = np.eye(3, dtype=np.float32)
    assert centre_vectors(vectors, None) is vectors


def test_add_training_centre_ignores_an_existing_centre(tmp_path, tiny_weights):
    path = tmp_path / "w.pt"
    shutil.copy(tiny_weights, path)
    files = []
    for number, item in enumerate(_slices(4)):
        files.append(str(tmp_path / f"s{number}.tif"))
        import cv2
        cv2.imwrite(files[-1], item.pixels)
    first = add_training_centre(path, files=files)
    second = add_training_centre(path, files=files)  # computed from uncentred vectors again
    assert np.allclose(first, second)
    assert np.allclose(first, uncentred_vectors(LungModel.load(tiny_weights), files).mean(0))


def test_database_of_another_model_id_tells_to_reindex(phantom_dir, tiny_weights, tmp_path):
    paths = {"db_url": f"sqlite:///{tmp_path / 'db.sqlite'}", "index_dir": str(tmp_path / "index")}
    Retriever(weights=tiny_weights, **paths).index_dataset([phantom_dir / "png" / "phantom01"])
    centred = tmp_path / "centred.pt"
    write_centre(tiny_weights, np.zeros(LungModel.load(tiny_weights).dimension, np.float32) + 0.01, centred)
    with pytest.raises(LungCBIRError, match="re-index"):
        Retriever(weights=centred, **paths).query(np.zeros((64, 64), np.uint8))
    with pytest.raises(LungCBIRError, match="re-index"):
        Retriever(weights=centred, **paths).index_dataset([phantom_dir / "png"])


@pytest.mark.realdata
@pytest.mark.slow
def test_bundled_centre_is_the_mean_of_the_training_split(bundled_weights, shared_data):
    model = LungModel.load(bundled_weights)
    assert model.settings.centre is not None and len(model.settings.centre) == model.dimension
    test_files = {s.image for s in kaggle_slices()["test"] + covid_slices()["test"]}
    assert not test_files & set(training_images())
    assert np.allclose(training_centre(model), model.settings.centre, atol=1e-4)


@pytest.mark.realdata
def test_unrelated_real_slices_score_near_zero_once_centred(bundled_weights, shared_data):
    """Slices of other patients and datasets: uncentred cosines crowd near 1; centred, the
    median is far lower, while a slice and its 8-bit export still score near 1."""
    model = LungModel.load(bundled_weights)
    items = ([read_file(s.image)[0] for s in kaggle_slices()["test"][::2]]
             + [read_file(s.image)[0] for s in covid_slices()["test"][::12]])
    vectors = np.stack([r.vector for r in model.segment(items)])
    raw = uncentred_vectors(model, [item.path for item in items])
    off_diagonal = ~np.eye(len(items), dtype=bool)
    assert np.median((raw @ raw.T)[off_diagonal]) > 0.8
    assert np.median((vectors @ vectors.T)[off_diagonal]) < 0.5
    hu = items[0].pixels.astype(np.float32)
    export = CTSlice(np.round(np.clip((hu + 1000) / 1400, 0, 1) * 255).astype(np.uint8), "uint8", "x", "png")
    assert float(model.segment([export])[0].vector @ vectors[0]) > 0.9
