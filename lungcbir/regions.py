"""Regions of a slice: what describes one (issue 26 item 3), the region vector that stored
regions and region queries share (:func:`region_vector`), query regions (:class:`RegionBox` or
a mask, :func:`region_of`) and the regions of a mask or of the lesion output
(:func:`connected_regions`, :func:`lesion_regions`).

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
from typing import TYPE_CHECKING, TypeAlias

import cv2
import numpy as np
import torch

from .errors import RegionError
from .model import UNet

if TYPE_CHECKING:
    from .inference import SliceMaps

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


# -- regions as stored objects and queries (issue 26 items 1 and 2) ------------------------------

#: The recipe of stored region vectors (:func:`region_vector`); part of their model id, so
#: regions made by another recipe are refused as vectors of another model are. ``r1`` (until
#: 2026-12-07) weighed context 0.4, intensity 0.35, shape 0.15, lesion 0.1, set by hand.
REGION_RECIPE = "r2"
#: Each block's share of a region score: the score is the weighted sum of the blocks' cosines.
#: r2's weights are those the nodule benchmark's fold procedure ("r1 blocks, weights chosen in
#: folds") chooses when run once on all 624 nodules, HU input (context 0, intensity 1, shape 1,
#: lesion 2 of {0, 1, 2}; ``python benchmarks/nodule_retrieval.py``, docs/retrieval.md, "Similar
#: nodules"), normalised to sum to 1. A block of weight 0 is left out of the vector, never computed.
REGION_BLOCK_WEIGHTS = {"context": 0.0, "intensity": 0.25, "shape": 0.25, "lesion": 0.5}
#: The blocks of a region vector in their order, with their lengths (``context``: the model's
#: bottleneck channels).
REGION_BLOCKS = ("context", "intensity", "shape", "lesion")
#: Smallest lesion stored as a region, in pixels at the model's input (256 x 256 for the bundled
#: model: 4 x 4 pixels there, about 6 mm on a 512-pixel slice of 0.7 mm pixels); smaller
#: specks of the lesion output are mostly noise at the lung's edge.
LESION_REGION_MIN_PIXELS = 16
#: Region sources: a marked region (``--regions MASKS``) or a lesion the model found.
SOURCE_MASK, SOURCE_LESION = "mask", "lesion"


@dataclass(frozen=True)
class RegionBox:
    """A query region as a box in pixels of the input image: x0, y0 inclusive, x1, y1 exclusive.

    Example:
        >>> RegionBox.parse("10,20,30,40")
        RegionBox(x0=10, y0=20, x1=30, y1=40)
        >>> RegionBox(1, 0, 3, 2).mask((3, 4)).astype(int).tolist()
        [[0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]]
    """

    x0: int
    y0: int
    x1: int
    y1: int

    @classmethod
    def parse(cls, text: str) -> "RegionBox":
        """``X0,Y0,X1,Y1`` (four integers) as a box; :class:`RegionError` if it is not that."""
        parts = [part.strip() for part in str(text).split(",")]
        try:
            numbers = [int(part) for part in parts]
        except ValueError:
            numbers = []
        if len(numbers) != 4 or len(parts) != 4:
            raise RegionError(f"a region box is X0,Y0,X1,Y1 (four integers, pixels of the image), not {text!r}")
        return cls(*numbers)

    def mask(self, shape: tuple[int, ...]) -> np.ndarray:
        """The box as a boolean mask of an image of ``shape`` (after :meth:`check`)."""
        self.check(shape)
        return bbox_mask((int(shape[0]), int(shape[1])), (self.x0, self.y0, self.x1, self.y1))

    def check(self, shape: tuple[int, ...]) -> None:
        """Raise :class:`RegionError` unless the box is non-empty and inside an image of ``shape``."""
        height, width = int(shape[0]), int(shape[1])
        if self.x1 <= self.x0 or self.y1 <= self.y0:
            raise RegionError(f"the region box {self.x0},{self.y0},{self.x1},{self.y1} is empty "
                              f"(X1 must be above X0 and Y1 above Y0)")
        if self.x0 < 0 or self.y0 < 0 or self.x1 > width or self.y1 > height:
            raise RegionError(f"the region box {self.x0},{self.y0},{self.x1},{self.y1} is outside the image "
                              f"({width} x {height} pixels: 0 <= X0 < X1 <= {width}, 0 <= Y0 < Y1 <= {height})")


#: What a query region may be: a box, or a boolean mask of the query image's size.
Region: TypeAlias = RegionBox | np.ndarray


def region_of(region: Region, shape: tuple[int, ...]) -> np.ndarray:
    """The region as a boolean mask of an image of ``shape``; :class:`RegionError` when it is a
    box outside the image or empty, or a mask of another size or empty.

    Example:
        >>> region_of(np.eye(3), (3, 3)).sum()
        np.int64(3)
    """
    if isinstance(region, RegionBox):
        return region.mask(shape)
    mask = np.asarray(region)
    if mask.ndim != 2 or mask.shape != tuple(shape[:2]):
        raise RegionError(f"the region mask is {'x'.join(str(n) for n in mask.shape[::-1])} pixels, "
                          f"the image {shape[1]}x{shape[0]}: they must be the same size")
    mask = mask != 0
    if not mask.any():
        raise RegionError("the region mask is empty (no non-zero pixel)")
    return mask


@dataclass(frozen=True)
class FoundRegion:
    """One connected region of a slice: its box, area and its mask inside the box."""

    bbox: tuple[int, int, int, int]
    area: int
    mask: np.ndarray  # bool, the box's size

    def full(self, shape: tuple[int, int]) -> np.ndarray:
        """The region as a mask of the whole slice."""
        x0, y0, x1, y1 = self.bbox
        whole = np.zeros(shape, bool)
        whole[y0:y1, x0:x1] = self.mask
        return whole


def connected_regions(mask: np.ndarray, min_area: int = 1) -> list[FoundRegion]:
    """The 8-connected regions of a mask (non-zero = region) of at least ``min_area`` pixels,
    largest first.

    Example:
        >>> mask = np.zeros((5, 6), bool); mask[0:2, 0:2] = True; mask[3:5, 3:6] = True
        >>> [(r.bbox, r.area) for r in connected_regions(mask)]
        [((3, 3, 6, 5), 6), ((0, 0, 2, 2), 4)]
    """
    count, labels, stats, _ = cv2.connectedComponentsWithStats((np.asarray(mask) != 0).astype(np.uint8),
                                                               connectivity=8)
    found = []
    for label in range(1, count):
        area = int(stats[label, cv2.CC_STAT_AREA])
        if area < min_area:
            continue
        x0, y0 = int(stats[label, cv2.CC_STAT_LEFT]), int(stats[label, cv2.CC_STAT_TOP])
        x1, y1 = x0 + int(stats[label, cv2.CC_STAT_WIDTH]), y0 + int(stats[label, cv2.CC_STAT_HEIGHT])
        found.append(FoundRegion((x0, y0, x1, y1), area, labels[y0:y1, x0:x1] == label))
    return sorted(found, key=lambda r: (-r.area, r.bbox))


def lesion_regions(lesion_mask: np.ndarray, input_size: int = 256,
                   min_pixels: int = LESION_REGION_MIN_PIXELS) -> list[FoundRegion]:
    """The lesions of a slice's lesion mask (slice size) of at least ``min_pixels`` pixels at the
    model's ``input_size`` input (the slice's longer side is resized to it)."""
    scale = (max(lesion_mask.shape) / input_size) ** 2
    return connected_regions(lesion_mask, max(1, int(np.ceil(min_pixels * scale))))


def region_model_id(model_id: str) -> str:
    """The id of region vectors made by :func:`region_vector` with a model: model id and recipe."""
    return f"{model_id}/{REGION_RECIPE}"


def region_dimension(bottleneck_channels: int, weights: dict[str, float] | None = None) -> int:
    """The length of a region vector for a model with this many bottleneck channels: the
    lengths of the blocks of non-zero weight (``weights``: :data:`REGION_BLOCK_WEIGHTS`)."""
    sizes = {"context": bottleneck_channels, "intensity": 11, "shape": 4, "lesion": 2}
    weights = REGION_BLOCK_WEIGHTS if weights is None else weights
    return sum(sizes[name] for name in REGION_BLOCKS if weights.get(name, 0.0) > 0)


def _unit(vector: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(vector))
    return (vector / norm).astype(np.float32) if norm > 0 and np.isfinite(norm) else np.zeros_like(vector, np.float32)


def _to_model(region: np.ndarray, geometry, size: int) -> np.ndarray:
    """A slice-sized mask as each model-input cell's share of the region (``size`` x ``size``)."""
    square = np.zeros((geometry.side, geometry.side), np.float32)
    square[geometry.top:geometry.top + geometry.height, geometry.left:geometry.left + geometry.width] = region
    return cv2.resize(square, (size, size), interpolation=cv2.INTER_AREA)


def region_vector(maps: SliceMaps, region: np.ndarray, centre: np.ndarray | None = None,
                  hu_window: tuple[float, float] = (-1000.0, 400.0),
                  weights: dict[str, float] | None = None) -> np.ndarray:
    """The stored and query vector of a region (``region``: bool, the slice's size) of a slice
    segmented with ``keep_maps`` (:class:`~lungcbir.inference.SliceMaps`): no second network run.

    Unit blocks joined with the square roots of their weights (``weights``, by default
    :data:`REGION_BLOCK_WEIGHTS`, summing to 1), so the cosine of two region vectors is the
    weighted sum of the blocks' cosines; a block of weight 0 is left out and not computed:

    * ``context``: the bottleneck averaged over the region (each cell weighted by its share of
      the region), minus the slice vectors' centre (``centre``: the mean part of the model's
      saved centre), what the network sees there (weight 0 in recipe r2: the nodule
      benchmark's fold procedure dropped it);
    * ``intensity``: :func:`intensity_features` in HU (mean, spread, percentiles, ground-glass,
      soft-tissue and calcified shares, core minus rim), scaled to about [-1, 1];
    * ``shape``: :func:`shape_features` (log area, compactness, elongation, solidity);
    * ``lesion``: the lesion output's mean and maximum in the region (zero without one).
    """
    if not region.any():
        raise RegionError("the region is empty")
    weights = REGION_BLOCK_WEIGHTS if weights is None else weights
    wanted = [name for name in REGION_BLOCKS if weights.get(name, 0.0) > 0]
    blocks = {}
    if "context" in wanted:
        blocks["context"] = _context_block(maps, region, centre)
    if "intensity" in wanted:
        hu = hu_window[0] + maps.unit * (hu_window[1] - hu_window[0])
        stats = intensity_features(hu, region)
        blocks["intensity"] = _unit(np.concatenate([
            (stats[[0]] + 500) / 500, stats[[1]] / 250 - 0.5, (stats[2:7] + 500) / 500,
            2 * stats[7:10] - 1, stats[[10]] / 250]))
    if "shape" in wanted:
        shape = shape_features(region)
        blocks["shape"] = _unit(np.array([(shape[0] - 5.0) / 2.0, *(2 * shape[1:] - 1)], np.float32))
    if "lesion" in wanted:
        blocks["lesion"] = _unit(_lesion_stats(maps, region))
    vector = np.concatenate([np.sqrt(weights[name]) * blocks[name] for name in wanted])
    return _unit(vector.astype(np.float32))


def _context_block(maps: SliceMaps, region: np.ndarray, centre: np.ndarray | None) -> np.ndarray:
    """The bottleneck averaged over the region, minus the centre's unit mean part, unit length."""
    channels, cells = maps.bottleneck.shape[0], maps.bottleneck.shape[-1]
    weights = _to_model(region, maps.geometry, cells)
    if weights.sum() <= 0:
        weights = np.ones_like(weights)
    context = _unit((maps.bottleneck * weights).sum((1, 2)) / weights.sum())
    if centre is not None and len(centre) >= channels:
        context = _unit(context - _unit(np.asarray(centre[:channels], np.float32)))
    return context


def _lesion_stats(maps: SliceMaps, region: np.ndarray) -> np.ndarray:
    """The lesion output's mean and maximum inside the region, scaled to [-1, 1] (zero without
    a lesion output)."""
    lesion = np.zeros(2, np.float32)
    if maps.lesions is not None:
        inside = _to_model(region, maps.geometry, maps.lesions.shape[-1])
        cells_in = inside > 0.5 if (inside > 0.5).any() else inside > 0
        if cells_in.any():
            lesion = np.array([2 * float((maps.lesions * inside).sum() / max(inside.sum(), 1e-6)) - 1,
                               2 * float(maps.lesions[cells_in].max()) - 1], np.float32)
    return lesion
