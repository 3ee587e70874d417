"""The search focus: how much the anatomy and the findings part of a vector count in a search.

A model with a lesion output has vectors ``[anatomy | findings] / sqrt(2)``
(:class:`lungcbir.features.FindingsConfig`); the stored vectors never change, only the query is
weighted (:func:`focus_queries`), so one index answers every focus. Light on purpose (numpy
only): the CLI reads :data:`FOCUSES` before anything heavy is imported.
"""

from __future__ import annotations

from enum import Enum

import numpy as np


class Focus(str, Enum):
    """What a search looks for in a model with a findings part (:class:`lungcbir.features.FindingsConfig`):

    * ``anatomy``: the same level of the lungs and body shape (the anatomy part only);
    * ``findings``: the same kind and amount of abnormality (the findings part only);
    * ``balanced`` (the default): both, weighted by the model's ``balanced_anatomy_weight``.

    The score stays a cosine in [-1, 1]: the weighted sum of the two parts' cosines. For a model
    without a findings part every focus is the same search.
    """

    ANATOMY = "anatomy"
    FINDINGS = "findings"
    BALANCED = "balanced"

    def __str__(self) -> str:
        return self.value


FOCUSES = tuple(focus.value for focus in Focus)
DEFAULT_FOCUS = Focus.BALANCED
#: The names of a vector's parts, in order (a model without a findings part has the first only).
VECTOR_PARTS = ("anatomy", "findings")


def anatomy_weight(focus: Focus | str, balanced: float) -> float:
    """The anatomy part's weight in a search with this focus (the findings part gets 1 minus it);
    ``balanced`` is the model's weight for :attr:`Focus.BALANCED`.

    Example:
        >>> anatomy_weight("findings", 0.4), anatomy_weight(Focus.BALANCED, 0.4)
        (0.0, 0.4)
    """
    if focus not in FOCUSES:
        raise ValueError(f"unknown focus {str(focus)!r}; choose from {', '.join(FOCUSES)}")
    return {Focus.ANATOMY: 1.0, Focus.FINDINGS: 0.0, Focus.BALANCED: balanced}[Focus(focus)]


def focus_queries(vectors: np.ndarray, anatomy_dimension: int, weight: float) -> np.ndarray:
    """Query vectors whose inner product with a stored ``[anatomy | findings] / sqrt(2)`` vector is
    ``weight`` x the anatomy parts' cosine + (1 - ``weight``) x the findings parts' cosine.

    Example:
        >>> stored = np.array([[1.0, 0.0, 0.0, 1.0]]) / np.sqrt(2)     # anatomy [1, 0], findings [0, 1]
        >>> query = np.array([[1.0, 0.0, 1.0, 0.0]]) / np.sqrt(2)      # same anatomy, other findings
        >>> [round(float((focus_queries(query, 2, w) @ stored.T)[0, 0]), 3) for w in (1.0, 0.5, 0.0)]
        [1.0, 0.5, 0.0]
    """
    weighted = np.array(vectors, np.float32)
    weighted[:, :anatomy_dimension] *= 2 * weight
    weighted[:, anatomy_dimension:] *= 2 * (1 - weight)
    return weighted
