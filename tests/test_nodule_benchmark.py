"""The similar-nodule benchmark's folds, measures and choices (lungcbir.research.nodule_benchmark)."""

from __future__ import annotations

import numpy as np
import pytest

from lungcbir.research.nodule_benchmark import (
    Labels,
    block_distances,
    choose_weights,
    cross_validated,
    cross_validated_learned,
    export_8bit,
    pasted_nodules,
    patient_folds,
    query_scores,
    summary,
)


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
