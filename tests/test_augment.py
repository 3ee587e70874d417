"""Pathology and export augmentation (lungcbir/augment.py) on synthetic arrays: the lung mask is
never touched, pathology changes pixels only inside the lung, values stay in [0, 1]."""

from __future__ import annotations

import random

import numpy as np
import pytest

from lungcbir import augment
from lungcbir.train import TrainingSample, augment_view


def _slice(size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """A body (soft tissue 0.6) with two dark lungs (0.1, some texture) on black air."""
    yy, xx = np.mgrid[:size, :size]
    body = ((yy - size / 2) / (0.42 * size)) ** 2 + ((xx - size / 2) / (0.46 * size)) ** 2 < 1
    lung = np.zeros((size, size), bool)
    for centre in (0.32, 0.68):
        lung |= ((yy - size / 2) / (0.3 * size)) ** 2 + ((xx - centre * size) / (0.14 * size)) ** 2 < 1
    image = np.where(body, 0.6, 0.0).astype(np.float32)
    image[lung] = 0.1 + np.random.default_rng(0).uniform(0, 0.05, lung.sum()).astype(np.float32)
    return image, lung


def _lesion_shape(size: int = 128) -> np.ndarray:
    shape = np.zeros((size, size), np.uint8)
    shape[50:70, 20:45] = 1
    return shape


PATHOLOGY = {
    "honeycomb": lambda image, lung, rng: augment.add_honeycomb(image, lung, rng),
    "consolidation": lambda image, lung, rng: augment.add_consolidation(image, lung, _lesion_shape(), rng),
    "emphysema": lambda image, lung, rng: augment.add_emphysema(image, lung, rng),
    "dependent density": lambda image, lung, rng: augment.add_dependent_density(image, lung, rng),
}


@pytest.mark.parametrize("name", sorted(PATHOLOGY))
def test_pathology_changes_only_the_lung_and_stays_in_range(name):
    image, lung = _slice()
    mask_before = lung.copy()
    changed_somewhere = False
    for seed in range(8):
        new, region = PATHOLOGY[name](image.copy(), lung, random.Random(seed))
        assert new.shape == image.shape and new.dtype == np.float32
        assert 0.0 <= new.min() and new.max() <= 1.0
        assert np.array_equal(new[~lung], image[~lung]), "pixels outside the lung changed"
        assert not (region & ~lung).any(), "the synthetic finding's region leaves the lung"
        changed_somewhere |= bool(np.abs(new - image)[lung].max() > 0.02)
    assert np.array_equal(lung, mask_before)
    assert changed_somewhere, "the ingredient never changed the lung"


def test_honeycomb_makes_cysts_darker_and_walls_brighter_than_the_lung():
    image, lung = _slice(256)
    new, region = augment.add_honeycomb(image, lung, random.Random(4))
    assert region.sum() > 100
    inside = new[region]
    assert inside.min() < image[lung].min()  # air cysts
    assert inside.max() > 0.3  # bright walls and reticular lines (the lung is 0.10-0.15)


def test_pathology_without_lungs_changes_nothing():
    image, _ = _slice()
    empty = np.zeros(image.shape, bool)
    for name, function in PATHOLOGY.items():
        new, region = function(image.copy(), empty, random.Random(0))
        assert np.array_equal(new, image) and not region.any(), name


def test_add_pathology_labels_pasted_consolidation_and_marks_other_findings_unknown(monkeypatch):
    image, lung = _slice()
    lesion = np.zeros(lung.shape, np.uint8)
    monkeypatch.setattr(augment, "CONSOLIDATION_P", 1.0)
    monkeypatch.setattr(augment, "HONEYCOMB_P", 1.0)
    view = augment.add_pathology(image, lung, lesion, random.Random(1), [_lesion_shape()])
    assert view.lesion.any() and not (view.lesion.astype(bool) & ~lung).any()
    assert (view.lesion_weight == 0).any() and (view.lesion_weight == 1).any()
    assert not (view.lesion.astype(bool) & (view.lesion_weight == 0)).all()
    unknown = augment.add_pathology(image, lung, None, random.Random(1), [_lesion_shape()])
    assert (unknown.lesion_weight == 0).all()  # a slice without lesion masks teaches no lesions


@pytest.mark.parametrize("name", ["jpeg", "fov", "low dose", "sharpen"])
def test_exports_keep_range_and_shape(name):
    image, lung = _slice()
    rng = random.Random(2)
    function = {"jpeg": lambda: augment.jpeg_compress(image, rng),
                "fov": lambda: augment.circular_fov(image, lung, rng),
                "low dose": lambda: augment.low_dose_noise(image, rng),
                "sharpen": lambda: augment.sharpen(image, rng)}[name]
    new = function()
    assert new.shape == image.shape and new.dtype == np.float32
    assert 0.0 <= new.min() and new.max() <= 1.0 and not np.array_equal(new, image)


def test_circular_fov_never_cuts_into_the_lung():
    image, lung = _slice()
    for seed in range(20):
        new = augment.circular_fov(image, lung, random.Random(seed))
        assert np.array_equal(new[lung], image[lung])


def test_training_view_with_pathology_keeps_the_lung_label_binary_and_weights_unknown_lesions_zero():
    image, lung = _slice(64)
    pixels = image * 1400 - 1000  # as HU
    sample = TrainingSample("s", "g", pixels.astype(np.float32), "hu", lung.astype(np.uint8))
    for seed in range(10):
        view = augment_view(sample, random.Random(seed), (-1000.0, 400.0), pathology=True, donors=[_lesion_shape(64)])
        assert view.labels.shape == (3, 64, 64)
        assert set(np.unique(view.labels[0])) <= {0.0, 1.0} and view.labels[0].sum() > 0
        assert (view.labels[2] == 0).all()  # Kaggle-like slice: lesion label unknown everywhere
        assert 0.0 <= view.image.min() and view.image.max() <= 1.0


def test_add_pathology_draws_only_the_kinds_asked_for(monkeypatch):
    import random

    from lungcbir import augment

    drawn = []
    for name in ("add_honeycomb", "add_emphysema", "add_dependent_density", "add_consolidation"):
        monkeypatch.setattr(augment, name, lambda image, lung, *rest, _name=name: (drawn.append(_name) or image,
                                                                                   np.zeros_like(lung, bool)))
    monkeypatch.setattr(augment, "CONSOLIDATION_P", 1.0)
    for name in ("HONEYCOMB_P", "EMPHYSEMA_P", "DEPENDENT_P"):
        monkeypatch.setattr(augment, name, 1.0)
    image, lung = np.zeros((16, 16), np.float32), np.ones((16, 16), bool)
    augment.add_pathology(image, lung, None, random.Random(0), [lung], kinds=("consolidation", "dependent"))
    assert drawn == ["add_consolidation", "add_dependent_density"]
    with pytest.raises(ValueError, match="unknown pathology kinds"):
        augment.add_pathology(image, lung, None, random.Random(0), kinds=("fibrosis",))


def test_add_pathology_can_draw_every_kind_with_one_probability(monkeypatch):
    import random

    from lungcbir import augment

    drawn = []
    for name in ("add_honeycomb", "add_emphysema", "add_dependent_density", "add_consolidation"):
        monkeypatch.setattr(augment, name, lambda image, lung, *rest, _name=name: (drawn.append(_name) or image,
                                                                                   np.zeros_like(lung, bool)))
    for name in ("CONSOLIDATION_P", "HONEYCOMB_P", "EMPHYSEMA_P", "DEPENDENT_P"):
        monkeypatch.setattr(augment, name, 0.0)
    image, lung = np.zeros((16, 16), np.float32), np.ones((16, 16), bool)
    augment.add_pathology(image, lung, None, random.Random(0), [lung])
    assert drawn == []
    augment.add_pathology(image, lung, None, random.Random(0), [lung], probability=1.0)
    assert sorted(drawn) == ["add_consolidation", "add_dependent_density", "add_emphysema", "add_honeycomb"]
