"""Feature vectors: pool the U-Net encoder bottleneck to a fixed-length, L2-normalised vector."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from .readout import FindingsReadout, findings_embedding


class Pooling(str, Enum):
    """How the bottleneck becomes a vector (see :func:`pool_bottleneck`); equal to its value,
    which is what weights files and the model id record."""

    MEAN_MAX = "mean-max"
    LUNG_MEAN_MAX = "lung-mean-max"
    LUNG_MEAN_GLOBAL_MAX = "lung-mean+global-max"

    def __str__(self) -> str:
        return self.value


#: Pooling methods by name; the vector length is the bottleneck channel count times two.
POOLINGS = tuple(pooling.value for pooling in Pooling)


def pool_bottleneck(bottleneck: torch.Tensor, lung_probability: torch.Tensor | None = None,
                    method: Pooling | str = Pooling.MEAN_MAX) -> np.ndarray:
    """Pool a ``(N, C, h, w)`` bottleneck into ``(N, 2C)`` float32 unit vectors.

    ``"mean-max"`` concatenates global average and global max pooling. ``"lung-mean-max"``
    weights both by the predicted lung probability (downsampled to the bottleneck grid) so
    the vector describes the lungs rather than the body outline or the scanner table.
    ``"lung-mean+global-max"`` (the bundled model's) joins the lung-weighted mean (what the
    parenchyma looks like: lesions, texture) with the global max (the strongest responses
    anywhere, the body's shape among them: a cue to the anatomical level).

    Example:
        >>> vectors = pool_bottleneck(torch.rand(2, 8, 4, 4))
        >>> vectors.shape, np.allclose(np.linalg.norm(vectors, axis=1), 1)
        ((2, 16), True)
    """
    return pooled_vectors(bottleneck, lung_probability, method).cpu().numpy().astype(np.float32)


def pooled_vectors(bottleneck: torch.Tensor, lung_probability: torch.Tensor | None = None,
                   method: Pooling | str = Pooling.MEAN_MAX) -> torch.Tensor:
    """The same pooling as :func:`pool_bottleneck`, kept as a (differentiable) tensor for training."""
    if method not in POOLINGS:
        raise ValueError(f"unknown pooling {str(method)!r}; choose from {POOLINGS}")
    method = Pooling(method)
    features = bottleneck.float()
    mean, peak = features.mean((2, 3)), features.amax((2, 3))
    if method != Pooling.MEAN_MAX and lung_probability is not None:
        weights = F.adaptive_avg_pool2d(lung_probability.float(), (features.shape[-2], features.shape[-1]))
        weights = weights + 1e-3  # keep slices without lungs defined
        mean = (features * weights).sum((2, 3)) / weights.sum((2, 3))
        if method == Pooling.LUNG_MEAN_MAX:
            peak = (features * (weights / weights.amax((2, 3), keepdim=True))).amax((2, 3))
    return F.normalize(torch.cat([mean, peak], dim=1), dim=1)


def centre_vectors(vectors: np.ndarray, centre: np.ndarray | list[float] | None) -> np.ndarray:
    """Subtract ``centre`` (the mean unit vector of the training slices) and L2-normalise again.

    Every pooled bottleneck points in nearly the same direction (all activations are
    positive), so uncentred cosines sit between 0.9 and 1 for any two slices; after centring,
    unrelated slices score near 0 and near-duplicates near 1. ``None`` returns ``vectors``.

    Example:
        >>> v = centre_vectors(np.array([[0.6, 0.8], [0.8, 0.6]], np.float32), [0.7, 0.7])
        >>> np.round(v @ v.T, 3).tolist()
        [[1.0, -1.0], [-1.0, 1.0]]
    """
    if centre is None:
        return vectors
    centred = np.asarray(vectors, np.float32) - np.asarray(centre, np.float32)[None]
    norms = np.linalg.norm(centred, axis=1, keepdims=True)
    return (centred / np.maximum(norms, 1e-8)).astype(np.float32)


# -- the findings part (the search focus that weighs it: lungcbir.focus) ----------------------------


@dataclass(frozen=True)
class FindingsConfig:
    """How a model with a lesion output builds the *findings* part of its vector.

    The vector of such a model is ``[anatomy | findings]``: the anatomy part is the pooled
    bottleneck of :func:`pool_bottleneck` (slice level, body shape); the findings part is the
    bottleneck pooled with the lesion probability as weight (what the abnormal parenchyma looks
    like), joined with ``statistics_weight`` times :func:`lesion_statistics` (how much is abnormal
    and where). Each part is centred and L2-normalised on its own, then both are divided by
    sqrt(2), so the whole vector has unit length and a search can weigh the parts
    (:class:`lungcbir.focus.Focus`).

    Example:
        >>> FindingsConfig().statistics_dimension
        5
    """

    statistics_weight: float = 1.0
    #: weight of the anatomy part in the ``balanced`` focus (the findings part gets the rest)
    balanced_anatomy_weight: float = 0.5
    #: a read-out learned from slice labels (lungcbir.readout); when set, the findings part is its
    #: 4-d embedding instead of the pooled part it reads (issue 25). None: the pooled part.
    readout: FindingsReadout | None = None

    @property
    def statistics_dimension(self) -> int:
        """How many numbers :func:`lesion_statistics` gives per slice."""
        return LESION_STATISTICS

    def dimension(self, bottleneck_channels: int) -> int:
        """Length of the findings part for a bottleneck of this many channels."""
        return self.readout.dimension if self.readout is not None else bottleneck_channels + LESION_STATISTICS

    def to_dict(self) -> dict:
        values: dict = {"statistics_weight": self.statistics_weight,
                        "balanced_anatomy_weight": self.balanced_anatomy_weight}
        if self.readout is not None:  # absent otherwise, so models without one keep their ids
            values["readout"] = self.readout.to_dict()
        return values

    @classmethod
    def from_dict(cls, values: dict) -> "FindingsConfig":
        readout = values.get("readout")
        return cls(statistics_weight=float(values["statistics_weight"]),
                   balanced_anatomy_weight=float(values["balanced_anatomy_weight"]),
                   readout=FindingsReadout.from_dict(readout) if readout else None)


#: Numbers per slice from :func:`lesion_statistics`.
LESION_STATISTICS = 5
#: Pixels (at the model's input size of 256) within this distance of the lung edge count as the
#: lung's periphery in :func:`lesion_statistics`: about 1 cm of a usual chest field of view,
#: where COVID-19's ground glass typically starts.
PERIPHERY_PIXELS = 8


def lesion_statistics(lung_probability: np.ndarray, lesion_probability: np.ndarray) -> np.ndarray:
    """Where the lesions are, as five orientation-free numbers per slice, square-rooted so that
    small burdens stay apart: lesion share of the lung, of its periphery, of its core, and of its
    more and its less affected side (halves split at the lungs' centre of mass). ``(N, S, S)``
    probability maps in, ``(N, 5)`` float32 out; a slice without lungs gives zeros.

    Example:
        >>> lungs = np.zeros((1, 64, 64), np.float32); lungs[0, 8:56, 8:56] = 1
        >>> lesions = np.zeros_like(lungs); lesions[0, 8:56, 8:20] = 1   # the left quarter
        >>> [round(float(v), 2) for v in lesion_statistics(lungs, lesions)[0] ** 2]
        [0.25, 0.35, 0.12, 0.5, 0.0]
    """
    out = np.zeros((len(lung_probability), LESION_STATISTICS), np.float32)
    for number, (lung_map, lesion_map) in enumerate(zip(lung_probability, lesion_probability)):
        lungs = lung_map > 0.5
        if lungs.sum() < 16:
            continue
        lesions = (lesion_map > 0.5) & lungs
        inside = cv2.distanceTransform(np.pad(lungs, 1).astype(np.uint8), cv2.DIST_L2, 3)[1:-1, 1:-1]
        periphery = lungs & (inside <= PERIPHERY_PIXELS)
        core = lungs & ~periphery
        middle = int(round(np.nonzero(lungs)[1].mean()))
        halves = [lungs.copy(), lungs.copy()]
        halves[0][:, middle:], halves[1][:, :middle] = False, False
        shares = [lesions[region].mean() if region.any() else 0.0 for region in (lungs, periphery, core, *halves)]
        out[number] = np.sqrt([*shares[:3], max(shares[3:]), min(shares[3:])])
    return out


def findings_vectors(bottleneck: torch.Tensor, lung_probability: torch.Tensor, lesion_probability: torch.Tensor,
                     config: FindingsConfig) -> np.ndarray:
    """The findings part before centring: ``(N, C + 5)`` of the bottleneck pooled with weight
    lesion probability x lung probability (plus a trace of the lung weight, so that a slice
    without lesions is described by its lungs), L2-normalised, joined with
    ``config.statistics_weight`` x :func:`lesion_statistics`; with a read-out
    (``config.readout``), the findings part it makes of that (:func:`lungcbir.readout.findings_embedding`)."""
    features = bottleneck.float()
    grid = (features.shape[-2], features.shape[-1])
    lungs = F.adaptive_avg_pool2d(lung_probability.float(), grid)
    weights = F.adaptive_avg_pool2d((lesion_probability * lung_probability).float(), grid) + 1e-3 * lungs + 1e-6
    mean = F.normalize((features * weights).sum((2, 3)) / weights.sum((2, 3)), dim=1).cpu().numpy()
    statistics = lesion_statistics(lung_probability[:, 0].cpu().numpy(), lesion_probability[:, 0].cpu().numpy())
    pooled = np.concatenate([mean, config.statistics_weight * statistics], axis=1).astype(np.float32)
    if config.readout is None:
        return pooled
    return findings_embedding(config.readout, pooled, statistics[:, 0])


def centre_parts(vectors: np.ndarray, centre: np.ndarray | list[float] | None, parts: Sequence[int]) -> np.ndarray:
    """:func:`centre_vectors` for each part (of the given lengths, in order) on its own, each part
    divided by sqrt(number of parts) so the whole vector has unit length. One part is
    :func:`centre_vectors`.

    Example:
        >>> v = centre_parts(np.array([[3.0, 4.0, 0.0, 2.0]], np.float32), None, (2, 2))
        >>> np.round(v * np.sqrt(2), 3).tolist()
        [[0.6, 0.8, 0.0, 1.0]]
    """
    bounds = np.cumsum([0, *parts])
    if bounds[-1] != np.shape(vectors)[1]:
        raise ValueError(f"parts {tuple(parts)} do not add up to the vector length {np.shape(vectors)[1]}")
    if len(parts) == 1 and centre is None:
        return vectors
    # without a centre each part is only normalised: centring on zero does exactly that
    centre_array = np.zeros(bounds[-1], np.float32) if centre is None else np.asarray(centre, np.float32)
    pieces = [centre_vectors(vectors[:, start:stop], centre_array[start:stop])
              for start, stop in zip(bounds[:-1], bounds[1:])]
    return (np.concatenate(pieces, axis=1) / np.sqrt(len(parts))).astype(np.float32)
