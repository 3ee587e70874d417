"""The shared real-data folders (``../shared/data``): where they are and how they are split.

The split is by scan (Kaggle: one slice per ID) and by patient (COVID-19 set), fixed by a seed,
so training, evaluation and benchmarks all use the same held-out slices:

* ``train``: what the bundled model learns from;
* ``val``: what picks the best epoch (never reported as a result);
* ``test``: what the model card reports.
"""

from __future__ import annotations

import csv
import os
import random
from dataclasses import dataclass
from pathlib import Path

from .config import Settings

#: COVID-19 patients held out for the reported test and for checkpoint selection.
COVID_TEST_PATIENTS = ("coronacases_007", "radiopaedia_p14", "radiopaedia_p7")
COVID_VAL_PATIENTS = ("radiopaedia_p27", "radiopaedia_p36")
KAGGLE_TEST_COUNT = 32
KAGGLE_VAL_COUNT = 16


@dataclass(frozen=True)
class LabelledSlice:
    """An image file, its lung mask file, and the scan/patient it belongs to."""

    image: str
    mask: str
    group: str
    dataset: str
    infection: str | None = None  # lesion mask, where the dataset has one
    series: str | None = None  # the volume, where the dataset has several slices of one
    position: int | None = None  # order within that volume


def data_root(settings: Settings | None = None) -> Path:
    """The shared data folder, absolute: ``$LUNGCBIR_DATA``, else ``../shared/data`` relative to
    the working directory (:data:`lungcbir.config.DEFAULT_DATA_ROOT`)."""
    settings = Settings.from_environment() if settings is None else settings
    return Path(os.path.abspath(settings.data_root))


def kaggle_slices(root: Path | None = None) -> dict[str, list[LabelledSlice]]:
    """Kaggle lung slices split into train/val/test by scan ID."""
    folder = (root or data_root()) / "kaggle-lungs-2d"
    names = sorted(os.listdir(folder / "images"))
    random.Random(0).shuffle(names)
    parts = {"test": names[:KAGGLE_TEST_COUNT],
             "val": names[KAGGLE_TEST_COUNT:KAGGLE_TEST_COUNT + KAGGLE_VAL_COUNT],
             "train": names[KAGGLE_TEST_COUNT + KAGGLE_VAL_COUNT:]}
    return {part: [LabelledSlice(str(folder / "images" / n), str(folder / "masks" / n), n[:7], "kaggle")
                   for n in sorted(files)] for part, files in parts.items()}


def covid_slices(root: Path | None = None) -> dict[str, list[LabelledSlice]]:
    """COVID-19 lung-mask slices split into train/val/test by patient."""
    folder = (root or data_root()) / "covid19-ct-lungmask"
    parts: dict[str, list[LabelledSlice]] = {"train": [], "val": [], "test": []}
    with open(folder / "manifest.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            patient = row["patient"]
            part = "test" if patient in COVID_TEST_PATIENTS else "val" if patient in COVID_VAL_PATIENTS else "train"
            parts[part].append(LabelledSlice(str(folder / "ct" / row["file"]), str(folder / "lungs" / row["file"]),
                                             patient, "covid19", str(folder / "infection" / row["file"]),
                                             row["volume"], int(row["k"])))
    return parts


def available(root: Path | None = None) -> bool:
    root = root or data_root()
    return (root / "kaggle-lungs-2d").is_dir() and (root / "covid19-ct-lungmask").is_dir()
