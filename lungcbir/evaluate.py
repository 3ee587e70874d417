"""Segmentation quality: per-image Dice and IoU against ground-truth masks, and their summary."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .datasets import covid_slices, kaggle_slices
from .inference import LungModel
from .io import read_file, read_mask
from .train import dice_score, pair_folders

#: Names of the groups :func:`evaluation_groups` makes.
GIVEN_FOLDERS = "given folders"
HELD_OUT_GROUPS = ("kaggle-lungs-2d test", "covid19-ct-lungmask test")


@dataclass
class ImageScore:
    path: str
    dice: float
    iou: float


@dataclass
class SegmentationEvaluation:
    """Per-image scores plus mean, median and worst case."""

    scores: list[ImageScore]

    def _values(self, metric: str) -> np.ndarray:
        return np.array([getattr(s, metric) for s in self.scores])

    def summary(self) -> dict[str, float]:
        dice, iou = self._values("dice"), self._values("iou")
        return {"images": len(self.scores), "dice_mean": float(dice.mean()), "dice_median": float(np.median(dice)),
                "dice_min": float(dice.min()), "iou_mean": float(iou.mean()), "iou_median": float(np.median(iou)),
                "iou_min": float(iou.min())}

    def worst(self, count: int = 5) -> list[ImageScore]:
        return sorted(self.scores, key=lambda s: s.dice)[:count]


def iou_score(prediction: np.ndarray, truth: np.ndarray) -> float:
    prediction, truth = prediction.astype(bool), truth.astype(bool)
    union = (prediction | truth).sum()
    return 1.0 if union == 0 else float((prediction & truth).sum() / union)


def evaluate_segmentation(model: LungModel, pairs: Sequence[tuple[str, str]],
                          batch_size: int = 16) -> SegmentationEvaluation:
    """Score the model on (image, mask) file pairs; masks compared at the truth's resolution.

    Masks are read as masks (:func:`~lungcbir.io.read_mask`), so a ground truth without lungs
    (a slice above or below them) is scored like any other: with an empty prediction it counts
    as Dice and IoU 1, with any predicted lung pixel as 0.

    Example:
        >>> evaluation = evaluate_segmentation(LungModel.load(), [("ct.png", "mask.png")])  # doctest: +SKIP
        >>> evaluation.summary()["dice_mean"]                                                # doctest: +SKIP
    """
    scores = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        slices = [read_file(image)[0] for image, _ in chunk]
        truths = [read_mask(mask) for _, mask in chunk]  # not read_file: it refuses constant images
        for (image, _), truth, result in zip(chunk, truths, model.segment(slices, batch_size)):
            scores.append(ImageScore(image, dice_score(result.mask, truth), iou_score(result.mask, truth)))
    return SegmentationEvaluation(scores)


def evaluation_groups(folders: Sequence[tuple[str, str]], held_out: bool = False
                      ) -> dict[str, list[tuple[str, str]]]:
    """The (image, mask) pairs to score, by group name: every image of the given (image folder,
    mask folder) pairs as one group, and with ``held_out`` the bundled model's held-out test
    slices of the shared data, one group per dataset (so each is reported on its own)."""
    groups: dict[str, list[tuple[str, str]]] = {}
    if folders:
        groups[GIVEN_FOLDERS] = [pair for image_dir, mask_dir in folders for pair in pair_folders(image_dir, mask_dir)]
    if held_out:
        kaggle, covid = HELD_OUT_GROUPS
        groups[kaggle] = [(s.image, s.mask) for s in kaggle_slices()["test"]]
        groups[covid] = [(s.image, s.mask) for s in covid_slices()["test"]]
    return groups
