"""The SYNTHETIC HU disease benchmark's cases (lungcbir.research.synthetic_disease)."""

from __future__ import annotations

import numpy as np
import pytest

from lungcbir.research.synthetic_disease import (
    CONSOLIDATION_HU,
    dependent_region,
    diseased_slices,
    moved_shape,
)


def _two_lungs() -> np.ndarray:
    lungs = np.zeros((100, 100), bool)
    lungs[20:80, 10:40] = lungs[20:80, 60:90] = True
    return lungs


def test_a_moved_shape_keeps_its_place_in_the_lungs_and_stays_inside_them():
    shape_lungs = np.zeros((50, 50), bool)
    shape_lungs[10:40, 5:45] = True
    shape = np.zeros((50, 50), bool)
    shape[30:40, 5:15] = True  # posterior (bottom rows) of the left lung
    moved = moved_shape(shape, shape_lungs, _two_lungs())
    ys, xs = np.nonzero(moved)
    assert moved.any() and not (moved & ~_two_lungs()).any()
    assert ys.min() >= 59 and xs.max() < 40  # still posterior, still left


def test_dependent_region_is_the_posterior_part_of_each_lung():
    lungs = _two_lungs()
    region = dependent_region(lungs, np.random.default_rng(0))
    assert not (region & ~lungs).any()
    for columns in (slice(10, 40), slice(60, 90)):
        rows = np.nonzero(region[:, columns].any(axis=1))[0]
        share = region[:, columns].sum() / lungs[:, columns].sum()
        assert rows.max() == 79 and rows.min() > 40 and 0.2 < share < 0.6


def test_the_train_split_is_refused():
    with pytest.raises(ValueError):
        diseased_slices("train")


@pytest.mark.realdata
def test_val_cases_paste_lesions_inside_the_lungs_at_their_hu(shared_data):
    cases = diseased_slices("val", kinds=("consolidation", "dependent"))
    assert len(cases) == 2 * 16
    for case in cases:
        assert case.lesion.sum() > 0.03 * case.truth.sum() and not (case.lesion & ~case.truth).any()
        core = np.median(case.pixels[case.lesion])
        assert CONSOLIDATION_HU[0] - 60 < core < CONSOLIDATION_HU[1] + 60
