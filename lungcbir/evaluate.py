"""Segmentation quality: per-image Dice and IoU against ground-truth masks, and their summary."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .inference import LungModel
from .io import read_file, read_mask
from .train import dice_score


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
