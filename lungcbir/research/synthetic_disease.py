"""SYNTHETIC disease in Hounsfield units with the truth known.

Real lesions are pasted into the lesion-free HU lungs of ``kaggle-lungs-2d`` and the slice's own
lung mask stays the truth: a lesion-inclusive mask must cover the pasted lesions too.

Kinds (one variant of each Kaggle slice per kind):

* ``consolidation``: the shape of a real COVID-19 infection mask (``covid19-ct-lungmask``),
  moved with the lung's bounding box onto this slice's lungs, filled with dense consolidation
  (-100 to +50 HU, as COVID-CT-MD's consolidation) and a smooth texture;
* ``ground-glass``: the same kind of shape at -700 to -450 HU (never darker than the lung was);
* ``dependent``: dense consolidation of the posterior part of each lung (the last 30-50 % of its
  height, a wavy upper edge), the issue's failure: the mask followed the aerated lung only;
* ``nodule``: an LIDC-IDRI nodule (``lidc-nodules``) with its own HU values, pasted where its
  mask fits inside a lung.

Donors are split like the Kaggle slices they are pasted into, so nothing of the reported (test)
benchmark was seen when choosing on val: COVID-19 shapes of the val patients for val and of the
test patients for test; LIDC patients by the parity of their number.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import cv2
import numpy as np

from ..datasets import covid_slices, data_root, kaggle_slices
from ..io import read_file, read_mask

KINDS = ("consolidation", "ground-glass", "dependent", "nodule")
#: Dense consolidation and ground glass, in HU.
CONSOLIDATION_HU = (-100.0, 50.0)
GROUND_GLASS_HU = (-700.0, -450.0)
#: A pasted shape smaller than this share of the lungs is drawn again (it is no test of the mask).
MIN_LESION_SHARE = 0.03


@dataclass
class DiseasedSlice:
    """A Kaggle HU slice with a pasted lesion; ``truth`` is its own lung mask, lesion included."""

    name: str
    kind: str
    pixels: np.ndarray  # float32, HU
    truth: np.ndarray  # bool: the original lung mask
    lesion: np.ndarray  # bool: the pasted lesion (inside ``truth``)


def _texture(rng: np.random.Generator, shape: tuple[int, int], spread: float) -> np.ndarray:
    return (cv2.GaussianBlur(rng.normal(0, 1, shape).astype(np.float32), (0, 0), 2.0) * spread).astype(np.float32)


def paste(hu: np.ndarray, region: np.ndarray, values: np.ndarray, denser_only: bool = False) -> np.ndarray:
    """``hu`` with ``values`` inside ``region``, blended over about a pixel (no hard edge).

    Example:
        >>> hu = np.full((21, 21), -800.0, np.float32); region = np.zeros((21, 21), bool); region[5:16, 5:16] = True
        >>> out = paste(hu, region, np.zeros((21, 21), np.float32))
        >>> round(float(out[10, 10]), 1), round(float(out[0, 0]), 1)
        (0.0, -800.0)
    """
    soft = cv2.GaussianBlur(region.astype(np.float32), (0, 0), 1.0)
    new = hu + soft * (values - hu)
    return (np.maximum(hu, new) if denser_only else new).astype(np.float32)


def moved_shape(shape: np.ndarray, shape_lungs: np.ndarray, lungs: np.ndarray) -> np.ndarray:
    """A lesion shape moved from its own slice onto ``lungs`` by the lungs' bounding boxes, kept
    inside ``lungs`` (so a posterior lesion stays posterior, a subpleural one subpleural)."""
    ys, xs = np.nonzero(shape_lungs)
    target_ys, target_xs = np.nonzero(lungs)
    sy = (target_ys.max() - target_ys.min()) / max(1, ys.max() - ys.min())
    sx = (target_xs.max() - target_xs.min()) / max(1, xs.max() - xs.min())
    matrix = np.array([[sx, 0, target_xs.min() - sx * xs.min()], [0, sy, target_ys.min() - sy * ys.min()]],
                      np.float32)
    moved = cv2.warpAffine(shape.astype(np.uint8), matrix, lungs.shape[::-1], flags=cv2.INTER_NEAREST) > 0
    return moved & lungs


def dependent_region(lungs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The posterior (bottom-row) 30-50 % of each sizeable lung, with a wavy upper edge."""
    count, labels = cv2.connectedComponents(lungs.astype(np.uint8), connectivity=8)
    region = np.zeros(lungs.shape, bool)
    rows = np.arange(lungs.shape[0], dtype=np.float32)[:, None]
    sizes = np.bincount(labels.ravel(), minlength=count)
    for label in range(1, count):
        if sizes[label] < 0.2 * sizes[1:].max():
            continue
        part = labels == label
        top, bottom = np.nonzero(part.any(axis=1))[0][[0, -1]]
        height = bottom - top
        wave = cv2.GaussianBlur(rng.normal(0, 1, (1, lungs.shape[1])).astype(np.float32), (0, 0), 12)[0]
        wave = wave / max(float(np.abs(wave).max()), 1e-6) * 0.08 * height
        cut = bottom - rng.uniform(0.3, 0.5) * height + wave[None, :]
        region |= part & (rows > cut)
    return region


@dataclass
class _Nodule:
    pixels: np.ndarray  # HU, the nodule's largest slice
    mask: np.ndarray  # bool


def _nodules(folder: Path, parity: int, limit: int) -> list[_Nodule]:
    """Up to ``limit`` LIDC nodules of patients whose number has this parity (largest slice each)."""
    import nibabel  # only this benchmark needs NIfTI crops as arrays

    out: list[_Nodule] = []
    with open(folder / "nodules.csv", newline="") as handle:
        rows = sorted(csv.DictReader(handle), key=lambda row: row["file"])
    for row in rows:
        if int(row["patient_id"].rsplit("-", 1)[-1]) % 2 != parity or float(row["diameter_mm"]) < 6:
            continue
        # nibabel.load is typed as any image; these files are NIfTI images, which have dataobj
        image = np.asarray(cast(Any, nibabel.load(folder / "images" / row["file"])).dataobj, np.float32)
        mask = np.asarray(cast(Any, nibabel.load(folder / "masks" / row["file"])).dataobj) > 0
        z = int(np.argmax(mask.sum(axis=(0, 1))))
        out.append(_Nodule(image[:, :, z].T.copy(), mask[:, :, z].T.copy()))
        if len(out) >= limit:
            break
    return out


def _paste_nodule(hu: np.ndarray, lungs: np.ndarray, nodule: _Nodule, rng: np.random.Generator
                  ) -> tuple[np.ndarray, np.ndarray]:
    height, width = nodule.mask.shape
    inner = cv2.erode(lungs.astype(np.uint8), np.ones((height + 4, width + 4), np.uint8)) > 0
    ys, xs = np.nonzero(inner)
    region = np.zeros(lungs.shape, bool)
    if len(ys) == 0:
        return hu, region
    pick = int(rng.integers(len(ys)))
    top, left = int(ys[pick]) - height // 2, int(xs[pick]) - width // 2
    region[top:top + height, left:left + width] = nodule.mask
    values = np.zeros_like(hu)
    values[top:top + height, left:left + width] = nodule.pixels
    return paste(hu, region, values, denser_only=True), region & lungs


def diseased_slices(split: str, seed: int = 31, root: Path | None = None,
                    kinds: tuple[str, ...] = KINDS) -> list[DiseasedSlice]:
    """One diseased variant per kind of every Kaggle slice of ``split`` (``val`` or ``test``)."""
    if split not in ("val", "test"):
        raise ValueError("split must be val or test: train slices are what the model learnt from")
    root = root or data_root()
    donors = []
    for sample in covid_slices(root)[split]:
        shape = read_mask(sample.infection or "").astype(bool)
        if shape.sum() >= 300:
            donors.append((shape, read_mask(sample.mask).astype(bool)))
    nodules = _nodules(root / "lidc-nodules", 0 if split == "val" else 1, 200) if "nodule" in kinds else []
    out = []
    for number, sample in enumerate(kaggle_slices(root)[split]):
        hu = read_file(sample.image)[0].pixels.astype(np.float32)
        lungs = read_mask(sample.mask).astype(bool)
        rng = np.random.default_rng(seed * 100_003 + number)
        for kind in kinds:
            region = np.zeros(lungs.shape, bool)
            pixels = hu
            if kind in ("consolidation", "ground-glass"):
                for _ in range(20):  # a shape that covers enough of this lung
                    shape, shape_lungs = donors[int(rng.integers(len(donors)))]
                    region = moved_shape(shape[:, ::-1] if rng.random() < 0.5 else shape, shape_lungs, lungs)
                    if region.sum() >= MIN_LESION_SHARE * lungs.sum():
                        break
                low, high = CONSOLIDATION_HU if kind == "consolidation" else GROUND_GLASS_HU
                values = rng.uniform(low, high) + _texture(rng, hu.shape, 25.0)
                pixels = paste(hu, region, values, denser_only=kind == "ground-glass")
            elif kind == "dependent":
                region = dependent_region(lungs, rng)
                pixels = paste(hu, region, rng.uniform(*CONSOLIDATION_HU) + _texture(rng, hu.shape, 25.0))
            elif kind == "nodule":
                pixels, region = _paste_nodule(hu, lungs, nodules[int(rng.integers(len(nodules)))], rng)
            out.append(DiseasedSlice(Path(sample.image).name, kind, pixels, lungs, region))
    return out
