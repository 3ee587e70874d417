"""Features of one region of a slice (issue 26 item 3): what describes a small lesion.

A slice vector pools the whole lung, so a 5 mm nodule barely moves it, and the bottleneck of a
512-pixel slice fed at 256 x 256 is 8 x 8 cells of about 64 pixels (45 mm) each: coarser than
most nodules. A region is therefore described by

* ``histogram``: the intensity histogram inside the region (16 bins over the model's HU window)
  and the log of its area: the simple baseline;
* ``intensity``: calibrated statistics inside the region (mean, spread, percentiles, the shares
  of ground-glass, soft-tissue and calcified values, the core's mean against the rim's);
* ``shape``: log area, compactness, elongation and solidity;
* ``zoom<side>``: the encoder's feature maps of a crop of ``side`` pixels around the region,
  resized to the model's input (so the bottleneck's cells become ``side / 8`` pixels), pooled
  inside the region at each of the last four levels (mean), plus the lesion output's mean and
  maximum inside the region;
* ``context``: the same pooling on the whole slice at the model's usual scale.

Intensity statistics are computed on the values the model sees, as HU of its window
(``PreprocessConfig.hu_window``): exact for HU input; for an 8-bit export its grey levels read as
if exported in that window, which is what an uncalibrated export can offer.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch

from .model import UNet

#: Crop sides (pixels of the slice) whose encoder features are pooled around a region.
ZOOM_SIDES = (128, 256)
#: Encoder levels pooled (0 = full input resolution ... 5 = bottleneck); the first two are edges.
POOLED_LEVELS = (2, 3, 4, 5)
HISTOGRAM_BINS = 16
#: Ground glass and soft tissue in HU, for the shares inside a region.
GROUND_GLASS_HU = (-800.0, -300.0)
SOFT_TISSUE_HU = (-300.0, 200.0)


@dataclass
class RegionFeatures:
    """The feature blocks of one region, each a float32 vector (see the module docstring)."""

    blocks: dict[str, np.ndarray]
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 (x1, y1 exclusive), pixels of the slice
    area: int


def bbox_mask(shape: tuple[int, int], bbox: tuple[int, int, int, int]) -> np.ndarray:
    """A boolean mask of ``shape`` that is True inside ``bbox`` = (x0, y0, x1, y1), clipped.

    Example:
        >>> bbox_mask((4, 5), (1, 0, 3, 2)).astype(int).tolist()
        [[0, 1, 1, 0, 0], [0, 1, 1, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0]]
    """
    x0, y0, x1, y1 = bbox
    mask = np.zeros(shape, bool)
    mask[max(0, y0):max(0, y1), max(0, x0):max(0, x1)] = True
    return mask


def region_bbox(region: np.ndarray) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of a non-empty mask, x1 and y1 exclusive."""
    ys, xs = np.nonzero(region)
    if len(ys) == 0:
        raise ValueError("the region is empty")
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def histogram_features(values: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """Share of the values in each of 16 equal bins of ``window`` (outside values in the end bins)
    and the log of their count: the HU-histogram-plus-size baseline."""
    clipped = np.clip(values, window[0], window[1] - 1e-3)
    counts, _ = np.histogram(clipped, HISTOGRAM_BINS, window)
    return np.append(counts / max(1, len(values)), np.log(max(1, len(values)))).astype(np.float32)


def intensity_features(hu: np.ndarray, region: np.ndarray) -> np.ndarray:
    """Statistics of ``hu`` inside ``region``: mean, standard deviation, 10/25/50/75/90th
    percentiles, ground-glass / soft-tissue / calcified shares, and core mean minus rim mean
    (a solid centre in a ground-glass halo is part-solid)."""
    values = hu[region]
    core = cv2.erode(region.astype(np.uint8), np.ones((3, 3), np.uint8), iterations=2) > 0
    rim = region & ~core
    core_mean = float(hu[core].mean()) if core.any() else float(values.mean())
    rim_mean = float(hu[rim].mean()) if rim.any() else float(values.mean())
    shares = [np.mean((values >= low) & (values < high)) for low, high in (GROUND_GLASS_HU, SOFT_TISSUE_HU)]
    return np.array([values.mean(), values.std(), *np.percentile(values, [10, 25, 50, 75, 90]),
                     *shares, np.mean(values >= SOFT_TISSUE_HU[1]), core_mean - rim_mean], np.float32)


def shape_features(region: np.ndarray) -> np.ndarray:
    """Log area, compactness (4 pi area / perimeter^2), elongation (minor / major axis) and
    solidity (area / convex hull area) of the region's largest connected part."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(region.astype(np.uint8), connectivity=8)
    largest = (labels == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))) if count > 1 else region
    contours, _ = cv2.findContours(largest.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    contour = max(contours, key=cv2.contourArea)
    area = float(largest.sum())
    perimeter = max(float(cv2.arcLength(contour, True)), 1.0)
    hull = max(float(cv2.contourArea(cv2.convexHull(contour))), 1.0)
    ys, xs = np.nonzero(largest)
    if len(ys) > 2:
        eigen = np.linalg.eigvalsh(np.cov(np.stack([xs, ys]).astype(np.float64)))
        elongation = float(np.sqrt(max(eigen[0], 0.0) / max(eigen[1], 1e-9)))
    else:
        elongation = 1.0
    return np.array([np.log(max(1.0, float(region.sum()))), min(1.0, 4 * np.pi * area / perimeter**2),
                     elongation, min(1.0, area / hull)], np.float32)


def _crop(unit: np.ndarray, region: np.ndarray, side: int) -> tuple[np.ndarray, np.ndarray]:
    """A ``side`` x ``side`` window of ``unit`` (0 outside the slice) and of ``region``, centred on
    the region's bounding box, widened to hold the whole region."""
    x0, y0, x1, y1 = region_bbox(region)
    side = max(side, x1 - x0 + 8, y1 - y0 + 8)
    top, left = (y0 + y1) // 2 - side // 2, (x0 + x1) // 2 - side // 2
    image = np.zeros((side, side), np.float32)
    mask = np.zeros((side, side), bool)
    sy0, sx0 = max(0, top), max(0, left)
    sy1, sx1 = min(unit.shape[0], top + side), min(unit.shape[1], left + side)
    image[sy0 - top:sy1 - top, sx0 - left:sx1 - left] = unit[sy0:sy1, sx0:sx1]
    mask[sy0 - top:sy1 - top, sx0 - left:sx1 - left] = region[sy0:sy1, sx0:sx1]
    return image, mask


def _square(unit: np.ndarray, region: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The whole slice padded to a square with 0 (as the model's preprocessing does)."""
    side = max(unit.shape)
    top, left = (side - unit.shape[0]) // 2, (side - unit.shape[1]) // 2
    image = np.zeros((side, side), np.float32)
    mask = np.zeros((side, side), bool)
    image[top:top + unit.shape[0], left:left + unit.shape[1]] = unit
    mask[top:top + unit.shape[0], left:left + unit.shape[1]] = region
    return image, mask


@torch.inference_mode()
def encoder_region_pool(network: UNet, views: list[tuple[np.ndarray, np.ndarray]], input_size: int
                        ) -> list[np.ndarray]:
    """For each (square [0, 1] image, region mask) view: the encoder maps of ``POOLED_LEVELS``
    averaged with the region's share of each cell as weight, then the lesion output's mean and
    maximum inside the region (absent without a lesion output)."""
    inputs = np.stack([cv2.resize(image, (input_size, input_size), interpolation=cv2.INTER_AREA)
                       for image, _ in views])
    weights = np.stack([cv2.resize(mask.astype(np.float32), (input_size, input_size),
                                   interpolation=cv2.INTER_AREA) for _, mask in views])
    encoded = network.encode(torch.from_numpy(np.clip(inputs, 0, 1))[:, None])
    logits = network.decode(encoded)
    weight = torch.from_numpy(weights)[:, None]
    parts = []
    for level in POOLED_LEVELS:
        maps = encoded[level]
        # area pooling keeps each cell's share of the region, so a nodule smaller than a cell
        # still weighs the cell it sits in
        size = (int(maps.shape[-2]), int(maps.shape[-1]))
        cell = torch.nn.functional.adaptive_avg_pool2d(weight, size).clamp_min(1e-6)
        parts.append(((maps * cell).sum((2, 3)) / cell.sum((2, 3))).numpy())
    if logits.shape[1] > 1:
        lesion = torch.sigmoid(logits[:, -1:]).numpy()[:, 0]
        inside = weights > 0.5
        stats = [[float(p[m].mean()) if m.any() else 0.0, float(p[m].max()) if m.any() else 0.0]
                 for p, m in zip(lesion, inside)]
        parts.append(np.asarray(stats, np.float32))
    return list(np.concatenate(parts, axis=1).astype(np.float32))


def region_features(network: UNet, unit: np.ndarray, region: np.ndarray, input_size: int = 256,
                    hu_window: tuple[float, float] = (-1000.0, 400.0),
                    zoom_sides: tuple[int, ...] = ZOOM_SIDES) -> RegionFeatures:
    """Every feature block of ``region`` (bool, the slice's size) of a slice given as the model's
    [0, 1] input at the slice's own resolution (``preprocess.normalize_intensity``)."""
    if not region.any():
        raise ValueError("the region is empty")
    hu = hu_window[0] + unit.astype(np.float32) * (hu_window[1] - hu_window[0])
    views = [_crop(unit, region, side) for side in zoom_sides] + [_square(unit, region)]
    pooled = encoder_region_pool(network, views, input_size)
    blocks = {"histogram": histogram_features(hu[region], hu_window),
              "intensity": intensity_features(hu, region),
              "shape": shape_features(region)}
    for side, vector in zip(zoom_sides, pooled):
        blocks[f"zoom{side}"] = vector
    blocks["context"] = pooled[-1]
    return RegionFeatures(blocks, region_bbox(region), int(region.sum()))
