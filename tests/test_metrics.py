import numpy as np

from lungcbir.metrics import dice_score, iou_score, roc_auc, spearman


def test_spearman_gives_tied_values_their_mean_rank():
    """Burden fractions tie often (many slices at 0): ranks by argsort order would invent an order."""
    zeros_then_rising = np.array([0.0, 0.0, 0.0, 0.1, 0.2])
    rising = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    falling_then_rising = np.array([3.0, 2.0, 1.0, 4.0, 5.0])
    # ranks 2, 2, 2, 4, 5: the tied zeros say nothing about the order of 3, 2, 1 (argsort ranks gave 0.6)
    expected = float(np.corrcoef([2, 2, 2, 4, 5], falling_then_rising)[0, 1])
    assert abs(spearman(zeros_then_rising, falling_then_rising) - expected) < 1e-12 and expected > 0.7
    assert abs(spearman(zeros_then_rising, rising) - float(np.corrcoef([2, 2, 2, 4, 5], rising)[0, 1])) < 1e-12
    assert np.isnan(spearman(np.zeros(4), rising[:4]))


def test_roc_auc_counts_ties_half_and_needs_both_kinds():
    assert roc_auc(np.array([0.5, 0.5]), np.array([True, False])) == 0.5
    assert np.isnan(roc_auc(np.array([0.5, 0.7]), np.array([True, True])))


def test_dice_and_iou_of_empty_masks_are_one():
    empty = np.zeros((3, 3), bool)
    assert dice_score(empty, empty) == iou_score(empty, empty) == 1.0
    assert dice_score(~empty, empty) == iou_score(~empty, empty) == 0.0
