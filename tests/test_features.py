"""The findings part of the vector: lesion statistics, per-part centring, a model's vector parts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lungcbir.features import FindingsConfig, centre_parts, findings_vectors, lesion_statistics
from lungcbir.inference import LungModel
from lungcbir.io import CTSlice


def _lungs_and_lesions(size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    lungs = np.zeros((1, size, size), np.float32)
    lungs[0, 10:54, 6:28] = lungs[0, 10:54, 36:58] = 1  # two lungs
    lesions = np.zeros_like(lungs)
    lesions[0, 30:54, 6:14] = 1  # at the edge of one lung, low
    return lungs, lesions


def test_lesion_statistics_are_shares_of_the_lung_and_free_of_flips():
    lungs, lesions = _lungs_and_lesions()
    total, periphery, core, worse_side, better_side = lesion_statistics(lungs, lesions)[0] ** 2
    lesion_pixels, lung_pixels = 24 * 8, 2 * 44 * 22
    assert total == pytest.approx(lesion_pixels / lung_pixels, abs=1e-6)
    assert periphery > total > core and better_side == 0 and worse_side == pytest.approx(2 * total, abs=1e-6)
    for flip in (lambda a: a[:, :, ::-1], lambda a: a[:, ::-1, :], lambda a: a[:, ::-1, ::-1]):
        flipped = lesion_statistics(np.ascontiguousarray(flip(lungs)), np.ascontiguousarray(flip(lesions)))
        assert np.allclose(flipped, lesion_statistics(lungs, lesions), atol=1e-6)


def test_lesion_statistics_without_lesions_or_lungs_are_zero():
    lungs, _ = _lungs_and_lesions()
    assert not lesion_statistics(lungs, np.zeros_like(lungs)).any()
    assert not lesion_statistics(np.zeros_like(lungs), np.ones_like(lungs)).any()  # lesions outside lungs
    more = _lungs_and_lesions()[1]
    more[0, 10:54, 36:58] = 1
    assert lesion_statistics(lungs, more)[0, 0] > lesion_statistics(lungs, _lungs_and_lesions()[1])[0, 0]


def test_findings_vectors_follow_the_lesions_not_the_rest_of_the_lung():
    bottleneck = torch.zeros(2, 4, 8, 8)
    bottleneck[:, 0] = 1.0  # everywhere
    bottleneck[:, 1, 4:, :] = 5.0  # only in the lower half
    lungs = torch.ones(2, 1, 64, 64)
    lesions = torch.zeros(2, 1, 64, 64)
    lesions[0, :, 32:] = 1  # lesions in the lower half of slice 0 only
    vectors = findings_vectors(bottleneck, lungs, lesions, FindingsConfig(statistics_weight=0.0))
    assert vectors.shape == (2, 4 + 5)
    # slice 0 is described by its lesions (channel 1 is 5 there), slice 1 by its whole lung (mean 2.5)
    assert vectors[0, 1] / vectors[0, 0] == pytest.approx(5.0, rel=0.01)
    assert vectors[1, 1] / vectors[1, 0] == pytest.approx(2.5, rel=0.01)


def test_parts_are_centred_and_normalised_on_their_own():
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(5, 7)).astype(np.float32)
    centre = rng.normal(size=7).astype(np.float32)
    out = centre_parts(vectors, centre, (4, 3))
    assert np.allclose(np.linalg.norm(out, axis=1), 1, atol=1e-6)
    assert np.allclose(np.linalg.norm(out[:, :4], axis=1), np.sqrt(0.5), atol=1e-6)
    expected = vectors[:, 4:] - centre[4:]
    expected /= np.linalg.norm(expected, axis=1, keepdims=True) * np.sqrt(2)
    assert np.allclose(out[:, 4:], expected, atol=1e-6)
    with pytest.raises(ValueError, match="do not add up"):
        centre_parts(vectors, None, (4, 4))


def test_a_model_with_a_findings_part_has_two_unit_parts(findings_weights, tiny_weights):
    model = LungModel.load(findings_weights)
    assert model.parts == (2 * 32, 32 + 5) and model.dimension == 101
    rng = np.random.default_rng(0)
    slices = [CTSlice(rng.random((64, 64)).astype(np.float32), "unit", f"s{k}", "png") for k in range(3)]
    results = model.segment(slices)
    for result in results:
        assert result.vector.shape == (101,) and result.lesion_fraction is not None
        assert np.linalg.norm(result.vector[:64]) == pytest.approx(np.sqrt(0.5), abs=1e-5)
    assert LungModel.load(tiny_weights).parts == (64,)
    assert model.model_id != LungModel.load(tiny_weights).model_id
