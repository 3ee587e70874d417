"""Scores shared by evaluation, training and the research benchmarks: a leaf module (NumPy only).

Example:
    >>> import numpy as np
    >>> a, b = np.zeros((4, 4), bool), np.zeros((4, 4), bool)
    >>> a[:2], b[1:3] = True, True
    >>> dice_score(a, b), iou_score(a, b)
    (0.5, 0.3333333333333333)
"""

from __future__ import annotations

import numpy as np


def dice_score(prediction: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two binary masks; 1.0 when both are empty."""
    prediction, truth = prediction.astype(bool), truth.astype(bool)
    total = prediction.sum() + truth.sum()
    return 1.0 if total == 0 else float(2 * (prediction & truth).sum() / total)


def iou_score(prediction: np.ndarray, truth: np.ndarray) -> float:
    """Intersection over union of two binary masks; 1.0 when both are empty."""
    prediction, truth = prediction.astype(bool), truth.astype(bool)
    union = (prediction | truth).sum()
    return 1.0 if union == 0 else float((prediction & truth).sum() / union)


def spearman(first: np.ndarray, second: np.ndarray) -> float:
    """Spearman's rank correlation (ties get mean ranks); NaN when either side is constant.

    Example:
        >>> round(spearman(np.array([1.0, 2, 3, 4]), np.array([10.0, 20, 20, 40])), 4)
        0.9487
    """
    if len(first) < 2 or np.ptp(first) == 0 or np.ptp(second) == 0:
        return float("nan")
    return float(np.corrcoef(_ranks(first), _ranks(second))[0, 1])


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for telling ``positive`` (bool) from the rest: the
    chance that a positive scores above a negative, ties counting half; NaN without both kinds.

    Example:
        >>> roc_auc(np.array([0.9, 0.4, 0.4, 0.1]), np.array([True, True, False, False]))
        0.875
    """
    high, low = scores[positive], scores[~positive]
    if not len(high) or not len(low):
        return float("nan")
    return float((high[:, None] > low[None]).mean() + 0.5 * (high[:, None] == low[None]).mean())


def _ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(1, len(values) + 1)
    for value in np.unique(values):  # ties: the mean of their ranks
        tied = values == value
        ranks[tied] = ranks[tied].mean()
    return ranks
