"""The findings read-out (issue 25): fitting, its embedding, lung density, and a model that saves it."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from lungcbir.features import FindingsConfig
from lungcbir.inference import LungModel, load_network, save_weights
from lungcbir.io import CTSlice
from lungcbir.readout import (
    READOUT_DIMENSION,
    FindingsReadout,
    angle_embedding,
    findings_embedding,
    fit_readout,
    lung_density,
)


def test_the_readout_learns_a_label_that_one_feature_carries_among_noise():
    rng = np.random.default_rng(0)
    labels = rng.random(400) < 0.4
    features = rng.normal(size=(400, 30))
    features[:, 7] += 4.0 * labels
    readout = fit_readout(features[:300], labels[:300])
    probability = readout.probability(features[300:])
    assert np.mean((probability > 0.5) == labels[300:]) > 0.85
    assert int(np.argmax(np.abs(readout.weights))) == 7
    assert FindingsReadout.from_dict(readout.to_dict()) == readout


def test_sample_weights_decide_which_rows_count():
    features = np.array([[0.0], [1.0], [0.0], [1.0]])
    labels = np.array([False, True, True, False])  # rows 0-1 say "high = infected", rows 2-3 the opposite
    first = fit_readout(features, labels, np.array([1.0, 1.0, 0.0, 0.0]), alpha=1e-3)
    second = fit_readout(features, labels, np.array([0.0, 0.0, 1.0, 1.0]), alpha=1e-3)
    assert first.weights[0] > 0 > second.weights[0]


def test_the_embedding_is_a_unit_vector_whose_cosine_is_the_weighted_angle_similarity():
    p, b = np.array([0.0, 1.0, 0.9]), np.array([0.1, 0.1, 0.6])
    embedding = angle_embedding(p, b, 0.5)
    assert embedding.shape == (3, READOUT_DIMENSION)
    assert np.allclose(np.linalg.norm(embedding, axis=1), 1, atol=1e-6)
    expected = 0.5 * np.cos(np.pi / 2 * (p[1] - p[2])) + 0.5 * np.cos(np.pi / 2 * (b[1] - b[2]))
    assert embedding[1] @ embedding[2] == pytest.approx(expected, abs=1e-6)
    # the infected slice of low burden is nearer the other infected one than the clean one is
    assert embedding[1] @ embedding[2] > embedding[0] @ embedding[2]


def test_lung_density_ignores_the_partial_volume_rim_once_eroded():
    hu = np.full((64, 64), -880.0, np.float32)
    lungs = np.zeros((64, 64), bool)
    lungs[10:54, 10:54] = True
    rim = lungs & ~np.pad(np.ones((40, 40), bool), 12)  # a 2-pixel rim at the lung edge
    hu[rim] = -500.0  # partial volume: looks like ground glass
    assert lung_density(hu, lungs, erosion=0)[0] > 0.1
    assert lung_density(hu, lungs, erosion=3)[0] == 0.0
    assert not lung_density(hu, np.zeros_like(lungs)).any()


def test_a_model_with_a_readout_stores_a_4_number_findings_part_and_has_another_id(findings_weights, tmp_path):
    network, settings, _ = load_network(findings_weights)
    channels = settings.unet.bottleneck_channels
    rng = np.random.default_rng(0)
    readout = FindingsReadout([0.0] * (channels + 5), [1.0] * (channels + 5),
                              list(rng.normal(size=channels + 5)), 0.0)
    assert settings.findings is not None
    settings.findings = dataclasses.replace(settings.findings, readout=readout)
    path = tmp_path / "readout.pt"
    save_weights(path, network, settings)
    plain, learned = LungModel.load(findings_weights), LungModel.load(path)
    assert learned.parts == (plain.parts[0], READOUT_DIMENSION)
    assert learned.model_id != plain.model_id
    assert learned.settings.findings == FindingsConfig.from_dict(learned.settings.findings.to_dict())
    slices = [CTSlice(rng.random((64, 64)).astype(np.float32), "unit", f"s{k}", "png") for k in range(3)]
    for result in learned.segment(slices):
        assert result.vector.shape == (learned.dimension,)
        assert np.linalg.norm(result.vector) == pytest.approx(1, abs=1e-5)
        assert np.linalg.norm(result.vector[plain.parts[0]:]) == pytest.approx(np.sqrt(0.5), abs=1e-5)


def test_a_joined_findings_part_weighs_the_pooled_cosine_and_the_readout_similarity():
    rng = np.random.default_rng(1)
    pooled = rng.normal(size=(2, 6)).astype(np.float32)
    centre = rng.normal(size=6).astype(np.float32)
    readout = FindingsReadout([0.0] * 6, [1.0] * 6, list(rng.normal(size=6)), 0.0, 0.5, 0.25,
                              [float(v) for v in centre])
    burden = np.array([0.2, 0.5])
    joined = findings_embedding(readout, pooled, burden)
    assert joined.shape == (2, readout.dimension) == (2, 10)
    assert np.allclose(np.linalg.norm(joined, axis=1), 1, atol=1e-6)
    centred = (pooled - centre) / np.linalg.norm(pooled - centre, axis=1, keepdims=True)
    alone = findings_embedding(dataclasses.replace(readout, pooled_weight=0.0), pooled, burden)
    assert joined[0] @ joined[1] == pytest.approx(0.25 * centred[0] @ centred[1] + 0.75 * alone[0] @ alone[1], abs=1e-5)
    assert FindingsReadout.from_dict(readout.to_dict()) == readout
