"""A findings similarity learned from labels (issue 25): a linear read-out of the findings part.

A cosine over the long findings part (:func:`lungcbir.features.findings_vectors`: the
lesion-weighted bottleneck and five lesion statistics) dilutes what tells an infected slice
from a clean one. :class:`FindingsReadout` reads that part with a logistic regression trained
on slice labels (infected / clean) into one calibrated number, the infection probability ``p``,
and takes the lesion output's burden ``b`` (square root of the lesion share of the lung, the
first lesion statistic) as it is. The findings part of a stored vector is then the 4-d unit
vector :func:`findings_embedding` of the two, so the findings cosine of two slices is

    w x cos(pi/2 (p1 - p2)) + (1 - w) x cos(pi/2 (b1 - b2)),

high when both are equally likely infected and equally burdened. The read-out is saved with the
model (``FindingsConfig.readout``, part of the model id), never beside it.

It reads network outputs only, never pixel values: the same slice as HU or as an 8-bit export
gets the same read-out as far as the network's outputs agree (it was trained on both forms).
Lung density in HU (:func:`lung_density`) was measured as a variant and is not part of it
(docs/retrieval.md, leave-one-patient-out table).

Example:
    >>> readout = FindingsReadout([0.0, 0.0], [1.0, 1.0], [4.0, 0.0], 0.0)
    >>> embedding = findings_embedding(readout, np.array([[1.0, 0.0], [-1.0, 0.0]]), np.array([0.3, 0.0]))
    >>> embedding.shape, np.round(np.linalg.norm(embedding, axis=1), 3).tolist()
    ((2, 4), [1.0, 1.0])
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

#: Numbers in the findings part of a model with a read-out (:func:`findings_embedding`).
READOUT_DIMENSION = 4


@dataclass(frozen=True)
class FindingsReadout:
    """A logistic read-out of the uncentred findings part: ``p = sigmoid(((x - mean) / scale) .
    weights + intercept)``; ``infection_weight`` is ``w`` of the module's formula.

    With ``pooled_weight`` a > 0 the findings part keeps the pooled part it reads too, centred on
    ``pooled_centre`` and scaled: ``[sqrt(a) pooled | sqrt(1 - a) embedding]``, so the findings
    cosine is a x the pooled parts' cosine + (1 - a) x the read-out's similarity."""

    mean: list[float]
    scale: list[float]
    weights: list[float]
    intercept: float
    infection_weight: float = 0.5
    pooled_weight: float = 0.0
    pooled_centre: list[float] | None = None

    @property
    def dimension(self) -> int:
        """Length of the findings part this read-out makes."""
        return READOUT_DIMENSION + (len(self.mean) if self.pooled_weight > 0 else 0)

    def to_dict(self) -> dict:
        # plain floats: weights files are loaded with weights_only, which refuses NumPy scalars
        return {"mean": [float(v) for v in self.mean], "scale": [float(v) for v in self.scale],
                "weights": [float(v) for v in self.weights], "intercept": float(self.intercept),
                "infection_weight": float(self.infection_weight), "pooled_weight": float(self.pooled_weight),
                "pooled_centre": None if self.pooled_centre is None else [float(v) for v in self.pooled_centre]}

    @classmethod
    def from_dict(cls, values: dict) -> "FindingsReadout":
        centre = values.get("pooled_centre")
        return cls([float(v) for v in values["mean"]], [float(v) for v in values["scale"]],
                   [float(v) for v in values["weights"]], float(values["intercept"]),
                   float(values.get("infection_weight", 0.5)), float(values.get("pooled_weight", 0.0)),
                   None if centre is None else [float(v) for v in centre])

    def probability(self, features: np.ndarray) -> np.ndarray:
        """Infection probability of each row of ``features`` (the uncentred findings part)."""
        standard = (np.asarray(features, np.float64) - np.asarray(self.mean)) / np.asarray(self.scale)
        return _sigmoid(standard @ np.asarray(self.weights) + self.intercept)


def _sigmoid(values: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(values, -40, 40)))


def fit_readout(features: np.ndarray, infected: np.ndarray, sample_weight: np.ndarray | None = None,
                alpha: float = 0.01, infection_weight: float = 0.5, steps: int = 50) -> FindingsReadout:
    """L2-regularised logistic regression (Newton's method) of ``infected`` (bool) on the
    standardised ``features``; ``alpha`` is the penalty on the weights per unit of mean loss.

    Example:
        >>> x = np.array([[0.0], [1.0], [2.0], [3.0]]); y = np.array([False, False, True, True])
        >>> readout = fit_readout(x, y)
        >>> bool(readout.probability(np.array([[0.0]]))[0] < 0.5 < readout.probability(np.array([[3.0]]))[0])
        True
    """
    x = np.asarray(features, np.float64)
    y = np.asarray(infected, np.float64)
    weight = np.ones(len(x)) if sample_weight is None else np.asarray(sample_weight, np.float64)
    weight = weight / weight.sum()
    mean = (weight[:, None] * x).sum(0)
    scale = np.sqrt((weight[:, None] * (x - mean) ** 2).sum(0)) + 1e-6
    design = np.concatenate([(x - mean) / scale, np.ones((len(x), 1))], axis=1)
    penalty = np.full(design.shape[1], alpha)
    penalty[-1] = 0.0  # the intercept is free
    theta = np.zeros(design.shape[1])
    for _ in range(steps):
        p = _sigmoid(design @ theta)
        gradient = design.T @ (weight * (p - y)) + penalty * theta
        hessian = (design * (weight * p * (1 - p))[:, None]).T @ design + np.diag(penalty + 1e-9)
        step = np.linalg.solve(hessian, gradient)
        theta -= step
        if np.abs(step).max() < 1e-8:
            break
    return FindingsReadout([float(v) for v in mean], [float(v) for v in scale], [float(v) for v in theta[:-1]],
                           float(theta[-1]), infection_weight)


def angle_embedding(probability: np.ndarray, burden: np.ndarray, infection_weight: float) -> np.ndarray:
    """The unit vectors ``[sqrt(w) u(p), sqrt(1 - w) u(b)]``, ``u(t) = (cos pi t / 2, sin pi t / 2)``,
    whose inner products are the module's findings similarity (``p``, ``b`` clipped to [0, 1])."""
    p = np.clip(np.asarray(probability, np.float64), 0, 1) * np.pi / 2
    b = np.clip(np.asarray(burden, np.float64), 0, 1) * np.pi / 2
    first, second = np.sqrt(infection_weight), np.sqrt(1 - infection_weight)
    return np.stack([first * np.cos(p), first * np.sin(p), second * np.cos(b), second * np.sin(b)],
                    axis=1).astype(np.float32)


def findings_embedding(readout: FindingsReadout, features: np.ndarray, burden: np.ndarray) -> np.ndarray:
    """The findings part of a model with a read-out: :func:`angle_embedding` of the read-out's
    probability of the pooled findings part ``features`` and the ``burden``, the square root of
    the lesion share of the lung (the first lesion statistic); with ``readout.pooled_weight`` > 0
    the centred pooled part before it (:class:`FindingsReadout`)."""
    embedding = angle_embedding(readout.probability(features), burden, readout.infection_weight)
    if readout.pooled_weight <= 0:
        return embedding
    return joined_embedding(np.asarray(features, np.float32), readout.pooled_centre, embedding, readout.pooled_weight)


def joined_embedding(pooled: np.ndarray, centre: list[float] | np.ndarray | None, embedding: np.ndarray,
                     pooled_weight: float) -> np.ndarray:
    """``[sqrt(a) unit(pooled - centre) | sqrt(1 - a) embedding]``: a unit vector whose cosines are
    a x the centred pooled parts' cosine + (1 - a) x the embeddings' (``embedding`` rows are unit)."""
    centred = pooled - (0.0 if centre is None else np.asarray(centre, np.float32))
    centred = centred / np.maximum(np.linalg.norm(centred, axis=1, keepdims=True), 1e-8)
    return np.concatenate([np.sqrt(pooled_weight) * centred, np.sqrt(1 - pooled_weight) * embedding],
                          axis=1).astype(np.float32)


#: Hounsfield ranges of :func:`lung_density`: ground glass and consolidation.
GROUND_GLASS_HU = (-700.0, -300.0)
CONSOLIDATION_HU = (-300.0, 100.0)
#: Lung-mask erosion (pixels at the model's input size) before :func:`lung_density`: partial-volume
#: pixels along the lung edge look like ground glass on small apical and basal sections.
DENSITY_EROSION = 3
DENSITY_FEATURES = 8


def lung_density(hu: np.ndarray, lungs: np.ndarray, erosion: int = DENSITY_EROSION) -> np.ndarray:
    """Density of the lung in calibrated HU (meaningless for an 8-bit export): share of the eroded
    lung mask in ground glass and in consolidation, HU percentiles 10, 25, 50, 75, 90 and the
    mean, scaled to about unit range. Zeros when fewer than 16 eroded lung pixels remain.

    Example:
        >>> hu = np.full((32, 32), -850.0); hu[:, 16:] = -500.0
        >>> lungs = np.zeros((32, 32), bool); lungs[4:28, 4:28] = True
        >>> [round(float(v), 2) for v in lung_density(hu, lungs, erosion=1)[:2]]
        [0.5, 0.0]
    """
    kernel = np.ones((2 * erosion + 1, 2 * erosion + 1), np.uint8)
    inside = cv2.erode(lungs.astype(np.uint8), kernel).astype(bool) if erosion else lungs.astype(bool)
    if inside.sum() < 16:
        return np.zeros(DENSITY_FEATURES, np.float32)
    values = hu[inside]
    shares = [np.mean((values >= low) & (values < high)) for low, high in (GROUND_GLASS_HU, CONSOLIDATION_HU)]
    levels = np.percentile(values, [10, 25, 50, 75, 90]).tolist() + [float(values.mean())]
    return np.array(shares + [(v + 1000.0) / 1000.0 for v in levels], np.float32)
