"""The similar-nodule benchmark's folds, measures and choices (lungcbir.research.nodule_benchmark)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from lungcbir.centring import write_centre
from lungcbir.inference import LungModel
from lungcbir.io import read_file
from lungcbir.phantom import write_phantom
from lungcbir.regions import REGION_BLOCK_WEIGHTS
from lungcbir.research.nodule_benchmark import (
    R1_BLOCKS,
    R1_WEIGHTS,
    WEIGHTS,
    Labels,
    block_cosine_distances,
    block_distances,
    choose_weights,
    cross_validated,
    cross_validated_cosine,
    cross_validated_learned,
    cross_validated_r1_weights,
    export_8bit,
    pasted_nodules,
    patient_folds,
    product_region_vectors,
    query_scores,
    r1_blocks,
    recipe_weights,
    summary,
    vector_blocks,
)
from lungcbir.retrieval import Retriever


def _toy(count: int = 120, seed: int = 0) -> tuple[dict[str, np.ndarray], Labels]:
    """Nodules of two per patient; block ``signal`` knows malignancy and ground glass, ``noise`` not."""
    rng = np.random.default_rng(seed)
    malignancy = rng.choice([1, 2, 3, 4, 5], count)
    texture = np.where(rng.random(count) < 0.2, 1, 5)
    signal = np.stack([(malignancy >= 4) * 3.0, (texture == 1) * 3.0], 1) + rng.normal(0, 0.3, (count, 2))
    blocks = {"signal": signal, "noise": rng.normal(0, 1, (count, 6))}
    return blocks, Labels(np.array([f"p{i // 2}" for i in range(count)]), malignancy, texture)


def test_folds_keep_each_patients_nodules_together():
    patients = np.array(["a", "a", "b", "c", "c", "c", "d", "e"])
    folds = patient_folds(patients, folds=3)
    for patient in set(patients):
        assert len(set(folds[patients == patient])) == 1
    assert set(folds) == {0, 1, 2}


def test_neighbours_come_from_other_patients_and_measures_count_the_top_five():
    labels = Labels(np.array(["a", "a", "b", "c", "d", "e", "f", "g"]), np.array([5, 5, 1, 5, 5, 1, 1, 3]),
                    np.array([1, 1, 5, 1, 5, 5, 5, 5]))
    position = np.array([0.0, 0.01, 5.0, 0.1, 0.2, 0.3, 0.4, 0.05])
    distance = np.abs(position[:, None] - position[None, :])
    found = query_scores(distance, np.array([0]), np.arange(8), labels)
    # own patient (row 1) and the rating-3 nodule (row 7) excluded: rows 3, 4, 5, 6, 2
    assert found["malignancy"][0] == pytest.approx(2 / 5)
    assert found["malignant_share"][0] == pytest.approx(2 / 5)
    # ground glass: rows 7, 3, 4, 5, 6 (any rating), one of them ground glass
    assert found["ground_glass"][0] == pytest.approx(1 / 5)
    assert found["chance_malignancy"][0] == pytest.approx(2 / 5)  # rows 2-6 of other patients
    assert found["chance_ground_glass"][0] == pytest.approx(1 / 6)


def test_the_folds_choose_the_block_that_carries_the_labels():
    blocks, labels = _toy()
    train = np.arange(80)
    assert choose_weights(block_distances(blocks, train), train, labels, ("signal", "noise"))["noise"] == 0
    scores, chosen = cross_validated(blocks, labels, choose=True, names=("signal", "noise"))
    assert all(weights["noise"] == 0 and weights["signal"] > 0 for weights in chosen)
    result = summary(scores, labels, resamples=200)
    low, value, high = result["malignancy"][1], result["malignancy"][0], result["malignancy"][2]
    assert value > 0.9 and low <= value <= high and result["chance_malignancy"][0] < 0.65
    noise_only, _ = cross_validated({"noise": blocks["noise"]}, labels, choose=False)
    assert summary(noise_only, labels, resamples=50)["malignancy"][0] < 0.75


def test_a_learnt_distance_fitted_in_the_folds_finds_the_signal_among_noise():
    blocks, labels = _toy(160, seed=1)
    scores, shrinkages = cross_validated_learned(blocks, labels)
    assert len(shrinkages) == 5
    result = summary(scores, labels, resamples=50)
    assert result["malignancy"][0] > 0.9 and result["auc"][0] > 0.9


def test_an_8bit_export_windows_the_lungs():
    assert export_8bit(np.array([-2000.0, -1350.0, -600.0, 150.0, 900.0])).tolist() == [0, 0, 128, 255, 255]


@pytest.mark.realdata
def test_pasted_nodules_lie_in_the_lungs_with_their_own_hu(shared_data):
    cases = pasted_nodules(shared_data, limit=6)
    assert len(cases) == 6
    for case in cases:
        assert case.pixels.shape == (512, 512) and case.region.sum() > 10
        # air in the lung around a nodule is near -1000 after calibration, the nodule denser
        ys, xs = np.nonzero(case.region)
        around = case.pixels[max(0, ys.min() - 30):ys.max() + 30, max(0, xs.min() - 30):xs.max() + 30]
        assert -1000 < np.median(case.pixels[case.region]) and np.percentile(around, 10) < -800


# -- the stored region vectors' columns (r1, r2) --------------------------------------------------


@pytest.fixture(scope="module")
def centred_findings_weights(findings_weights, tmp_path_factory) -> str:
    """The tiny lesion-branch model with a saved centre, so the column must pass the centre on."""
    model = LungModel.load(findings_weights)
    path = tmp_path_factory.mktemp("centred") / "centred.pt"
    centre = np.random.default_rng(3).normal(0, 1, model.dimension).astype(np.float32)
    write_centre(findings_weights, centre, path)
    return str(path)


def _marked_slices(folder: Path) -> tuple[list[Path], Path]:
    """Phantom PNG slices, each with a marked disc in its left lung under ``masks/``."""
    write_phantom(folder, slices=2, size=64, patients=2)
    images = sorted((folder / "png").rglob("*.png"))
    for number, image in enumerate(images):
        mask = np.zeros((64, 64), np.uint8)
        cv2.circle(mask, (20 + number, 32), 3 + number % 2, 255, -1)
        target = folder / "masks" / image.relative_to(folder / "png")
        target.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(target), mask)
    return images, folder / "masks"


def test_the_stored_vector_column_uses_the_vectors_the_product_stores(centred_findings_weights, tmp_path):
    images, masks = _marked_slices(tmp_path)
    retriever = Retriever(weights=centred_findings_weights, db_url=f"sqlite:///{tmp_path}/db.sqlite",
                          index_dir=tmp_path / "index")
    report = retriever.index_dataset([tmp_path / "png"], regions=masks, lesion_regions=False)
    assert report.indexed == len(images) and report.regions == len(images)
    store = retriever.store(create=False)
    stored = store.database.regions.read(range(1, 100))
    rows = store.records({region.image_id for region in stored.values()})
    by_file = {Path(rows[region.image_id].path).name: region_id for region_id, region in stored.items()}
    ids = np.array([by_file[image.name] for image in images])
    vectors = dict(pair for found, chunk in store.database.regions.vectors_of(ids) for pair in zip(found, chunk))
    expected = np.stack([vectors[i] for i in ids])

    pixels = [read_file(image)[0].pixels for image in images]
    regions = [cv2.imread(str(masks / image.relative_to(tmp_path / "png")), cv2.IMREAD_GRAYSCALE) > 0
               for image in images]
    model = retriever.model
    found, usable = product_region_vectors(model, pixels, regions, batch_size=3)
    assert usable.all() and found.shape == expected.shape
    np.testing.assert_allclose(found, expected, atol=2e-3)  # stored vectors are float16
    # the centre only moves the context block, which r2 leaves out; r1's vectors need it
    uncentred = LungModel.load(centred_findings_weights)
    uncentred.settings.centre = None
    np.testing.assert_allclose(product_region_vectors(uncentred, pixels, regions)[0], found, atol=1e-6)
    # the shipped vector's blocks: intensity, shape and lesion (r2 leaves context out), each
    # holding its shipped weight
    channels = model.settings.unet.bottleneck_channels
    blocks = vector_blocks(found, channels)
    assert tuple(blocks) == ("intensity", "shape", "lesion") and REGION_BLOCK_WEIGHTS["context"] == 0
    for name, block in blocks.items():
        norms = np.linalg.norm(block, axis=1)
        assert np.all((np.abs(norms**2 - REGION_BLOCK_WEIGHTS[name]) < 1e-4) | (norms < 1e-6))
    # recipe r1's vectors, still measured: context, intensity, shape and lesion with r1's weights
    r1, _ = product_region_vectors(model, pixels, regions, weights=R1_WEIGHTS)
    assert not np.allclose(product_region_vectors(uncentred, pixels, regions, weights=R1_WEIGHTS)[0], r1,
                           atol=2e-3)
    blocks = r1_blocks(r1, channels)
    assert tuple(blocks) == R1_BLOCKS
    for name, block in blocks.items():
        norms = np.linalg.norm(block, axis=1)
        assert np.all((np.abs(norms**2 - R1_WEIGHTS[name]) < 1e-4) | (norms < 1e-6))


def test_the_stored_vector_column_ranks_by_inner_product_with_nothing_fitted():
    """Two large coordinates that say nothing and a small one that knows malignancy: standardised
    distances (the older columns) would bring the small one up to scale; the inner product of
    the unit vectors, as the region index ranks, leaves it small."""
    _, labels = _toy(120, seed=2)
    rng = np.random.default_rng(2)
    signal = 3 * np.where(labels.malignancy >= 4, 1.0, -1.0)[:, None] + rng.normal(0, 0.2, (120, 1))
    raw = np.concatenate([rng.normal(0, 10, (120, 2)), signal], 1)
    vectors = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    scores = cross_validated_cosine(vectors, labels)
    expected = query_scores(-vectors @ vectors.T, np.arange(120), np.arange(120), labels)
    for key in ("malignancy", "ground_glass", "texture", "malignant_share"):
        np.testing.assert_allclose(scores[key], expected[key], equal_nan=True)
    standardised, _ = cross_validated({"all": vectors}, labels, choose=False)
    assert np.nanmean(standardised["malignancy"]) > np.nanmean(scores["malignancy"]) + 0.05


def test_r1_block_weights_chosen_in_the_folds_drop_a_block_that_says_nothing():
    blocks, labels = _toy(120, seed=3)
    r1 = {"context": blocks["noise"], "intensity": blocks["signal"]}
    scores, chosen = cross_validated_r1_weights(r1, labels)
    assert len(chosen) == 5 and all(w["context"] == 0 and w["intensity"] > 0 for w in chosen)
    assert summary(scores, labels, resamples=50)["malignancy"][0] > 0.9


def test_recipe_weights_are_the_fold_procedure_run_once_on_every_nodule():
    blocks, labels = _toy(120, seed=3)
    r1 = {"context": blocks["noise"], "intensity": blocks["signal"], "shape": blocks["signal"][:, ::-1]}
    chosen, normalised = recipe_weights(r1, labels)
    everyone = np.arange(120)
    assert chosen == choose_weights(block_cosine_distances(r1), everyone, labels, tuple(r1))
    assert chosen["context"] == 0 and set(chosen.values()) <= set(WEIGHTS)
    assert sum(normalised.values()) == pytest.approx(1)
    assert all(normalised[name] == pytest.approx(chosen[name] / sum(chosen.values())) for name in chosen)
