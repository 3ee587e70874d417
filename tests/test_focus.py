"""The search focus: weighted query vectors, and what a model without a findings part does."""

from __future__ import annotations

import numpy as np
import pytest

from lungcbir.focus import FOCUSES, Focus, anatomy_weight, focus_queries
from lungcbir.inference import LungModel


def _unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_focused_score_is_the_weighted_sum_of_the_parts_cosines():
    rng = np.random.default_rng(0)
    anatomy, findings = _unit(rng.normal(size=(6, 5))), _unit(rng.normal(size=(6, 3)))
    stored = np.concatenate([anatomy, findings], axis=1) / np.sqrt(2)
    for weight in (1.0, 0.7, 0.5, 0.0):
        scores = focus_queries(stored[:1], 5, weight) @ stored.T
        expected = weight * anatomy[:1] @ anatomy.T + (1 - weight) * findings[:1] @ findings.T
        assert np.allclose(scores, expected, atol=1e-6)
        assert scores.max() == pytest.approx(1.0, abs=1e-6) and (np.abs(scores) <= 1 + 1e-6).all()


def test_focus_names_and_weights():
    assert FOCUSES == ("anatomy", "findings", "balanced") and str(Focus.BALANCED) == "balanced"
    assert anatomy_weight("anatomy", 0.3) == 1.0 and anatomy_weight("findings", 0.3) == 0.0
    assert anatomy_weight(Focus.BALANCED, 0.3) == 0.3
    with pytest.raises(ValueError, match="unknown focus 'level'"):
        anatomy_weight("level", 0.3)


def test_models_weigh_their_parts_by_focus(findings_weights, tiny_weights):
    vectors = np.random.default_rng(1).normal(size=(2, 101)).astype(np.float32)
    model = LungModel.load(findings_weights)  # balanced_anatomy_weight 0.4
    assert np.allclose(model.focused(vectors, "balanced")[:, :64], 0.8 * vectors[:, :64])
    assert not model.focused(vectors, "anatomy")[:, 64:].any()
    plain = LungModel.load(tiny_weights)
    same = vectors[:, :64]
    assert plain.focused(same, "findings") is same  # no findings part: every focus searches alike
    with pytest.raises(ValueError):
        plain.focused(same, "level")
