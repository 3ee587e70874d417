"""Feature vectors: pool the U-Net encoder bottleneck to a fixed-length, L2-normalised vector."""

from __future__ import annotations

from enum import Enum

import numpy as np
import torch
import torch.nn.functional as F


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
