"""Segmentation quality: per-image Dice and IoU against ground-truth masks, and their summary;
for models with a lesion head, lesion Dice and the rank correlation of lesion fractions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .datasets import covid_slices, kaggle_slices
from .errors import LungCBIRError
from .inference import LungModel
from .io import file_stem, find_image_files, read_file, read_mask
from .metrics import dice_score, iou_score, spearman

#: Names of the groups :func:`evaluation_groups` makes.
GIVEN_FOLDERS = "given folders"
HELD_OUT_GROUPS = ("kaggle-lungs-2d test", "covid19-ct-lungmask test")


def pair_folders(images: str, masks: str) -> list[tuple[str, str]]:
    """Match images to masks by file name (the extension may differ)."""
    by_stem = {}
    for path in find_image_files([masks]):
        by_stem[file_stem(path)] = path
    pairs = []
    for path in find_image_files([images]):
        mask = by_stem.get(file_stem(path))
        if mask is None:
            raise LungCBIRError(f"{path}: no mask with the same name in {masks}")
        pairs.append((path, mask))
    if not pairs:
        raise LungCBIRError(f"{images}: no images found")
    return pairs


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


def evaluate_segmentation(model: LungModel, pairs: Sequence[tuple[str, str]],
                          batch_size: int = 16) -> SegmentationEvaluation:
    """Score the model on (image, mask) file pairs; masks compared at the truth's resolution.

    Masks are read as masks (:func:`~lungcbir.io.read_mask`), so a ground truth without lungs
    (a slice above or below them) is scored like any other: with an empty prediction it counts
    as Dice and IoU 1, with any predicted lung pixel as 0.

    Example:
        >>> import tempfile
        >>> from lungcbir.phantom import write_phantom
        >>> folder = tempfile.mkdtemp()
        >>> _ = write_phantom(folder, slices=3, size=96, patients=1)
        >>> pairs = pair_folders(f"{folder}/png/phantom01", f"{folder}/masks/phantom01")
        >>> evaluation = evaluate_segmentation(LungModel.load(), pairs)
        >>> len(evaluation.scores), evaluation.summary()["dice_mean"] > 0.5
        (3, True)
    """
    scores = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        slices = [read_file(image)[0] for image, _ in chunk]
        truths = [read_mask(mask) for _, mask in chunk]  # not read_file: it refuses constant images
        for (image, _), truth, result in zip(chunk, truths, model.segment(slices, batch_size)):
            scores.append(ImageScore(image, dice_score(result.mask, truth), iou_score(result.mask, truth)))
    return SegmentationEvaluation(scores)


@dataclass
class LesionScore:
    path: str
    dice: float  # of the slice's lesion map (1.0 when both are empty)
    true_fraction: float  # true lesion pixels inside the true lungs / true lung pixels
    predicted_fraction: float


@dataclass
class LesionEvaluation:
    """Per-slice lesion scores; the summary pools them three ways."""

    scores: list[LesionScore]
    overlap: int  # lesion pixels predicted and true, over all slices
    total: int  # predicted plus true lesion pixels, over all slices

    def summary(self) -> dict[str, float]:
        with_lesions = [s.dice for s in self.scores if s.true_fraction > 0]
        truth = np.array([s.true_fraction for s in self.scores])
        predicted = np.array([s.predicted_fraction for s in self.scores])
        return {"images": len(self.scores), "images_with_lesions": len(with_lesions),
                "dice_mean_with_lesions": float(np.mean(with_lesions)) if with_lesions else float("nan"),
                "dice_median_with_lesions": float(np.median(with_lesions)) if with_lesions else float("nan"),
                "dice_pooled": 2 * self.overlap / self.total if self.total else 1.0,
                "fraction_spearman": spearman(predicted, truth),
                "fraction_mean_abs_error": float(np.abs(predicted - truth).mean())}


def evaluate_lesions(model: LungModel, triples: Sequence[tuple[str, str, str]],
                     batch_size: int = 16) -> LesionEvaluation:
    """Score the lesion head on (image, lung mask, lesion mask) files at the truth's resolution.

    The true lesion map is restricted to the true lungs, as the prediction is to the predicted
    lungs; ``lesion_fraction`` is compared with the true lesion share of the true lungs.
    """
    if not model.has_lesion_head:
        raise ValueError("the model has no lesion head")
    scores, overlap, total = [], 0, 0
    for start in range(0, len(triples), batch_size):
        chunk = triples[start:start + batch_size]
        slices = [read_file(image)[0] for image, _, _ in chunk]
        for (image, lung_path, lesion_path), result in zip(chunk, model.segment(slices, batch_size)):
            lungs = read_mask(lung_path).astype(bool)
            truth = read_mask(lesion_path).astype(bool) & lungs
            predicted = result.lesion_mask
            # a model with a lesion head (checked above) always gives a lesion mask and fraction
            assert predicted is not None and result.lesion_fraction is not None
            overlap += int((predicted & truth).sum())
            total += int(predicted.sum() + truth.sum())
            scores.append(LesionScore(image, dice_score(predicted, truth),
                                      float(truth.sum() / lungs.sum()) if lungs.any() else 0.0,
                                      float(result.lesion_fraction)))
    return LesionEvaluation(scores, overlap, total)
def lesion_fractions(model: LungModel, images: Sequence[str], batch_size: int = 16) -> np.ndarray:
    """The predicted ``lesion_fraction`` of each image (its first slice): on slices known to be
    lesion-free, how much the lesion output calls abnormal where nothing is."""
    if not model.has_lesion_head:
        raise ValueError("the model has no lesion head")
    fractions = []
    for start in range(0, len(images), batch_size):
        results = model.segment([read_file(path)[0] for path in images[start:start + batch_size]], batch_size)
        fractions += [float(r.lesion_fraction or 0.0) for r in results]
    return np.asarray(fractions)


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
