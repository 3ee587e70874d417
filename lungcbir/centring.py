"""The centre saved with a model: the mean pooled vector of its training slices.

Pooled bottleneck vectors all point roughly the same way, so raw cosines crowd between 0.9
and 1. Subtracting their mean (then L2-normalising again, :func:`lungcbir.features.centre_vectors`)
makes ``score`` mean something: unrelated slices near 0, near-duplicates near 1. The mean is
taken on the model's own training split only (never on a store used for evaluation) and is
saved in the weights file's settings, so it travels with the model and changes its id.

``benchmarks/train_bundled_model.py`` calls :func:`add_training_centre` after training, and
``--centre-only W.pt`` adds the centre to weights trained before.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .datasets import covid_slices, kaggle_slices
from .errors import WeightsError
from .features import FindingsConfig
from .fileutils import write_atomically
from .inference import WEIGHTS_FORMAT, LungModel
from .io import read_file

#: Slices per forward pass while computing the centre.
CENTRE_BATCH = 32


def training_images(root: Path | None = None) -> list[str]:
    """The image files the bundled model was trained on: kaggle + COVID-19 ``train`` splits."""
    return [s.image for s in kaggle_slices(root)["train"]] + [s.image for s in covid_slices(root)["train"]]


def uncentred_vectors(model: LungModel, files: Sequence[str], batch_size: int = CENTRE_BATCH) -> np.ndarray:
    """Vectors of the first slice of every file before any centring (each part a unit vector)."""
    vectors = []
    for start in range(0, len(files), batch_size):
        inputs = np.stack([model.prepare(read_file(path)[0])[0] for path in files[start:start + batch_size]])
        vectors.append(model.uncentred(inputs))
    return np.concatenate(vectors)


def training_centre(model: LungModel, files: Sequence[str] | None = None) -> np.ndarray:
    """Mean of the uncentred vectors of ``files`` (default: :func:`training_images`)."""
    files = training_images() if files is None else list(files)
    if not files:
        raise WeightsError("no training images to compute the centre from")
    return uncentred_vectors(model, files).mean(0).astype(np.float32)


def write_centre(weights: str | os.PathLike, centre: np.ndarray, out: str | os.PathLike | None = None,
                 findings: FindingsConfig | None = None) -> None:
    """Save ``centre`` (and, if given, the findings part's settings it was computed with) in the
    settings of a weights file (to ``out``, default in place), atomically.

    The stored weights are copied as they are (no conversion), so only the settings change.
    """
    try:
        payload = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as error:
        raise WeightsError(f"{weights}: not a lungcbir weights file ({type(error).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != WEIGHTS_FORMAT:
        raise WeightsError(f"{weights}: not a lungcbir weights file")
    centre = np.asarray(centre, np.float32)
    if centre.ndim != 1 or not np.isfinite(centre).all():
        raise WeightsError("the centre must be a finite vector")
    payload["settings"]["centre"] = [float(v) for v in centre]
    if findings is not None:
        payload["settings"]["findings"] = findings.to_dict()
    write_atomically(out or weights, lambda temporary: torch.save(payload, temporary))


def add_training_centre(weights: str | os.PathLike, out: str | os.PathLike | None = None,
                        files: Sequence[str] | None = None, findings: FindingsConfig | None = None) -> np.ndarray:
    """Compute the training centre of a weights file's model and save it there (or to ``out``).

    An existing centre is ignored while computing (vectors are taken uncentred) and replaced.
    ``findings`` gives a model with a lesion output the findings part of its vector (the centre
    then covers both parts). Returns the centre.
    """
    model = LungModel.load(weights)
    if findings is not None:
        if not model.has_lesion_head:
            raise WeightsError(f"{weights}: a findings part needs a model with a lesion output")
        model.settings.findings = findings
    centre = training_centre(model, files)
    if centre.shape[0] != model.dimension:
        raise WeightsError(f"centre of dimension {centre.shape[0]}, model vectors {model.dimension}")
    write_centre(weights, centre, out, findings)
    return centre
