"""Training augmentation that shows the network what the shared data lacks.

Two kinds, both on an image already mapped to [0, 1] (see :func:`lungcbir.train.random_unit_image`):

* **Pathology inside the lung field**, whose lung mask stays the lung field (lungmask's R231
  lesson: the lung mask includes dense disease). Each function returns the new image and the
  region it changed; pixels change only where ``lung`` is set, values stay in [0, 1].

  - :func:`add_honeycomb`: clusters of small air cysts with bright walls and reticular lines,
    subpleural (fibrosis; the issue's failure case);
  - :func:`add_consolidation`: a lesion shape taken from another patient's COVID-19 infection
    mask, filled with ground glass to dense consolidation;
  - :func:`add_emphysema`: low-density patches and small wall-less holes;
  - :func:`add_dependent_density`: density rising towards the dependent (posterior) lung, as
    next to an effusion.

* **Exports not seen before**, over the whole image: :func:`jpeg_compress`,
  :func:`circular_fov` (a reconstruction circle with a constant outside; it always contains the
  whole lung mask), :func:`low_dose_noise` (correlated, stronger noise) and :func:`sharpen`
  (a sharp reconstruction kernel, by unsharp masking).

Lesion labels: a pasted consolidation is a lesion label (it is the infection masks' own kind of
finding, and its shape comes from one). The other synthetic findings are not: they are not what
the COVID-19 masks label, so their region is marked *unknown* for the lesion loss (weight 0)
rather than taught as "not a lesion". :func:`add_pathology` keeps that bookkeeping.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Collection, Sequence, cast

import cv2
import numpy as np
from numpy.typing import NDArray

#: Probability of each pathology ingredient per training view (when pathology augmentation is on).
HONEYCOMB_P = 0.25
CONSOLIDATION_P = 0.3
EMPHYSEMA_P = 0.15
DEPENDENT_P = 0.15
#: Probability of each export ingredient per training view.
JPEG_P = 0.15
FOV_P = 0.15
LOW_DOSE_P = 0.15
SHARPEN_P = 0.15
#: The synthetic findings :func:`add_pathology` can draw.
PATHOLOGY_KINDS = ("consolidation", "honeycomb", "emphysema", "dependent")


@dataclass
class PathologyView:
    """An image in [0, 1] with its lesion label and where that label is known (weight 0 or 1)."""

    image: np.ndarray  # float32
    lesion: np.ndarray  # uint8 {0, 1}
    lesion_weight: np.ndarray  # float32 {0, 1}: 0 where the lesion label is unknown


def _numpy(rng: random.Random) -> np.random.Generator:
    return np.random.default_rng(rng.randrange(2**31))


def intensity_levels(image: np.ndarray, lung: np.ndarray) -> tuple[float, float]:
    """(air, soft tissue): the darkest lung values and the chest wall/mediastinum next to the lungs.

    Taken from the image itself, so they hold in any window or export.
    """
    lung = lung.astype(bool)
    if not lung.any():
        return float(image.min()), float(np.percentile(image, 75))
    air = float(np.percentile(image[lung], 5))
    size = max(3, round(image.shape[0] / 32))
    ring = cv2.dilate(lung.astype(np.uint8), np.ones((size, size), np.uint8)).astype(bool) & ~lung
    tissue = float(np.percentile(image[ring], 75)) if ring.sum() > 10 else float(np.percentile(image, 75))
    return air, max(tissue, air + 0.1)


def _inside(image: np.ndarray, new: np.ndarray, lung: np.ndarray) -> np.ndarray:
    return np.where(lung.astype(bool), np.clip(new, 0, 1), image).astype(np.float32)


def _subpleural_centre(lung: np.ndarray, rng: random.Random) -> tuple[int, int] | None:
    """A lung pixel near the pleura (fibrosis starts there)."""
    distance = cv2.distanceTransform(lung.astype(np.uint8), cv2.DIST_L2, 3)
    limit = max(2.0, 0.04 * lung.shape[0])
    ys, xs = np.nonzero((distance > 0) & (distance <= limit))
    if len(ys) == 0:
        return None
    pick = rng.randrange(len(ys))
    return int(ys[pick]), int(xs[pick])


def add_honeycomb(image: np.ndarray, lung: np.ndarray, rng: random.Random) -> tuple[np.ndarray, np.ndarray]:
    """Honeycombing: a subpleural cluster of small air cysts with bright walls, plus reticular lines."""
    lung = lung.astype(bool)
    centre = _subpleural_centre(lung, rng)
    if centre is None:
        return image.astype(np.float32), np.zeros_like(lung)
    side = image.shape[0]
    air, tissue = intensity_levels(image, lung)
    scale = side / 256.0
    region = np.zeros(lung.shape, np.uint8)
    radius = int(rng.uniform(0.06, 0.18) * side)
    cv2.circle(region, (centre[1], centre[0]), radius, 1, -1)
    region = region.astype(bool) & lung
    new = image.astype(np.float32).copy()
    # fibrotic background: the cluster's parenchyma is a little denser
    new[region] += rng.uniform(0.0, 0.3) * (tissue - new[region])
    walls = np.zeros(lung.shape, np.float32)
    holes = np.zeros(lung.shape, np.uint8)
    ys, xs = np.nonzero(region)
    for _ in range(int(rng.uniform(0.4, 1.0) * max(4, region.sum() / (25 * scale * scale)))):
        pick = rng.randrange(len(ys))
        r = max(1, round(rng.uniform(1.5, 4.5) * scale))
        cv2.circle(holes, (int(xs[pick]), int(ys[pick])), r, 1, -1)
        cv2.circle(walls, (int(xs[pick]), int(ys[pick])), r + max(1, int(scale)), 1.0, max(1, round(scale)))
    for _ in range(rng.randint(2, 8)):  # reticular lines across the cluster
        a, b = rng.randrange(len(ys)), rng.randrange(len(ys))
        cv2.line(walls, (int(xs[a]), int(ys[a])), (int(xs[b]), int(ys[b])), rng.uniform(0.5, 1.0),
                 max(1, round(scale)))
    holes_mask = holes.astype(bool) & region
    new[holes_mask] = air - rng.uniform(0.0, 0.03)
    wall_mask = (walls > 0) & region & ~holes_mask
    strength = rng.uniform(0.6, 1.0)
    new[wall_mask] += strength * walls[wall_mask] * (tissue - new[wall_mask])
    return _inside(image, new, lung), region


def add_consolidation(image: np.ndarray, lung: np.ndarray, shape: np.ndarray,
                      rng: random.Random) -> tuple[np.ndarray, np.ndarray]:
    """Paste a lesion shape (another patient's infection mask) into this lung, ground glass to dense.

    Returns the image and the pasted lesion region (inside the lung).
    """
    lung = lung.astype(bool)
    shape = shape.astype(bool)
    if not lung.any() or not shape.any():
        return image.astype(np.float32), np.zeros_like(lung)
    if rng.random() < 0.5:
        shape = shape[:, ::-1]
    # move the shape's centre onto a random lung pixel
    ys, xs = np.nonzero(lung)
    sy, sx = np.nonzero(shape)
    pick = rng.randrange(len(ys))
    dy, dx = int(ys[pick] - sy.mean()), int(xs[pick] - sx.mean())
    matrix = np.array([[1, 0, dx], [0, 1, dy]], np.float32)
    moved = cv2.warpAffine(shape.astype(np.uint8), matrix, shape.shape[::-1], flags=cv2.INTER_NEAREST) > 0
    region = moved & lung
    if not region.any():
        return image.astype(np.float32), region
    _, tissue = intensity_levels(image, lung)
    alpha = rng.uniform(0.35, 1.0)  # ground glass .. consolidation
    soft = cv2.GaussianBlur(region.astype(np.float32), (0, 0), max(0.5, image.shape[0] / 256))
    texture = _numpy(rng).normal(0, 0.03, image.shape).astype(np.float32)
    new = image + alpha * soft * (tissue - image) + soft * texture
    return _inside(image, new, lung), region


def add_emphysema(image: np.ndarray, lung: np.ndarray, rng: random.Random) -> tuple[np.ndarray, np.ndarray]:
    """Emphysema-like low density: smooth darker patches and small holes without walls."""
    lung = lung.astype(bool)
    if not lung.any():
        return image.astype(np.float32), np.zeros_like(lung)
    air, _ = intensity_levels(image, lung)
    generator = _numpy(rng)
    field = cv2.GaussianBlur(generator.random(image.shape).astype(np.float32), (0, 0), image.shape[0] / 24)
    threshold = np.percentile(field[lung], rng.uniform(50, 85))
    patches = (field > threshold) & lung
    holes = np.zeros(lung.shape, np.uint8)
    ys, xs = np.nonzero(patches)
    for _ in range(rng.randint(0, 30) if len(ys) else 0):
        pick = rng.randrange(len(ys))
        cv2.circle(holes, (int(xs[pick]), int(ys[pick])), max(1, int(rng.uniform(1, 3) * image.shape[0] / 256)), 1, -1)
    # towards the lung's own darkest values, not below: emphysema (about -950 HU) is only a little
    # darker than normal lung (about -850 HU); pure black would look like bowel gas, which is not lung
    darkness = rng.uniform(0.3, 0.8)
    floor = air
    new = image.astype(np.float32).copy()
    new[patches] -= darkness * (new[patches] - floor)
    new[holes.astype(bool) & lung] = floor
    return _inside(image, new, lung), patches | (holes.astype(bool) & lung)


def add_dependent_density(image: np.ndarray, lung: np.ndarray, rng: random.Random) -> tuple[np.ndarray, np.ndarray]:
    """Density rising towards the posterior lung (the bottom rows, before the view is turned)."""
    lung = lung.astype(bool)
    rows = np.nonzero(lung.any(axis=1))[0]
    if len(rows) == 0:
        return image.astype(np.float32), np.zeros_like(lung)
    _, tissue = intensity_levels(image, lung)
    top, bottom = rows[0], rows[-1] + 1
    start = bottom - rng.uniform(0.15, 0.4) * (bottom - top)
    ramp = np.clip((np.arange(image.shape[0], dtype=np.float32) - start) / max(1.0, bottom - start), 0, 1)
    weight = (ramp ** rng.uniform(0.5, 1.5))[:, None] * np.ones_like(image, dtype=np.float32)
    alpha = rng.uniform(0.4, 1.0)
    new = image + alpha * weight * (tissue - image)
    return _inside(image, new, lung), (weight > 0.3) & lung


def jpeg_compress(image: np.ndarray, rng: random.Random) -> np.ndarray:
    """Round trip through an 8-bit JPEG of quality 15-85."""
    encoded = cv2.imencode(".jpg", np.round(np.clip(image, 0, 1) * 255).astype(np.uint8),
                           [cv2.IMWRITE_JPEG_QUALITY, rng.randint(15, 85)])[1]
    decoded = cv2.imdecode(encoded, cv2.IMREAD_GRAYSCALE)
    # None only for an undecodable buffer, and this one was just encoded by OpenCV itself
    assert decoded is not None
    return decoded.astype(np.float32) / 255.0


def circular_fov(image: np.ndarray, lung: np.ndarray, rng: random.Random) -> np.ndarray:
    """A reconstruction circle: a constant outside a circle that contains every lung pixel."""
    side = image.shape[0]
    centre = np.array([side / 2 + rng.uniform(-0.05, 0.05) * side, side / 2 + rng.uniform(-0.05, 0.05) * side])
    yy, xx = np.mgrid[:side, :side]
    distance = np.hypot(yy - centre[0], xx - centre[1])
    needed = float(distance[lung.astype(bool)].max()) + 2 if lung.any() else 0.0
    radius = max(needed, rng.uniform(0.42, 0.6) * side)
    outside = 0.0 if rng.random() < 0.7 else rng.uniform(0.0, 0.5)
    return np.where(distance > radius, np.float32(outside), image).astype(np.float32)


def low_dose_noise(image: np.ndarray, rng: random.Random) -> np.ndarray:
    """Stronger, spatially correlated noise, as in low-dose scans."""
    white = _numpy(rng).normal(0, 1, image.shape).astype(np.float32)
    # float32 in, float32 out: OpenCV's hints type every result as any integer or float image
    noise = cast(NDArray[np.float32], cv2.GaussianBlur(white, (0, 0), rng.uniform(0.6, 1.4)))
    noise *= rng.uniform(0.03, 0.12) / max(float(noise.std()), 1e-6)
    return np.clip(image + noise, 0, 1).astype(np.float32)


def sharpen(image: np.ndarray, rng: random.Random) -> np.ndarray:
    """A sharp reconstruction kernel, imitated by unsharp masking."""
    blurred = cv2.GaussianBlur(image.astype(np.float32), (0, 0), rng.uniform(0.8, 2.0))
    return np.clip(image + rng.uniform(0.5, 2.0) * (image - blurred), 0, 1).astype(np.float32)


def add_pathology(image: np.ndarray, lung: np.ndarray, lesion: np.ndarray | None, rng: random.Random,
                  donors: Sequence[np.ndarray] = (), kinds: Collection[str] = PATHOLOGY_KINDS,
                  probability: float = 0.0) -> PathologyView:
    """Draw each pathology ingredient of ``kinds`` with its probability (``probability`` > 0: that
    one for every kind); keep the lesion label and its weight.

    ``lesion`` None means the slice's lesions are unknown (weight 0 everywhere, as for the
    Kaggle slices); ``donors`` are infection masks of other slices to paste from.
    """
    unknown = set(kinds) - set(PATHOLOGY_KINDS)
    if unknown:
        raise ValueError(f"unknown pathology kinds {sorted(unknown)}; known: {', '.join(PATHOLOGY_KINDS)}")
    known = lesion is not None
    label = lesion.astype(np.uint8).copy() if lesion is not None else np.zeros(lung.shape, np.uint8)
    weight = np.full(lung.shape, 1.0 if known else 0.0, np.float32)
    image = image.astype(np.float32)
    if "consolidation" in kinds and donors and rng.random() < (probability or CONSOLIDATION_P):
        image, region = add_consolidation(image, lung, donors[rng.randrange(len(donors))], rng)
        label[region] = 1  # a pasted finding is a lesion label where the slice's lesions are known
    for kind, default, function in (("honeycomb", HONEYCOMB_P, add_honeycomb),
                                    ("emphysema", EMPHYSEMA_P, add_emphysema),
                                    ("dependent", DEPENDENT_P, add_dependent_density)):
        if kind in kinds and rng.random() < (probability or default):
            image, region = function(image, lung, rng)
            weight[region] = 0.0  # not the infection masks' kind of finding: unknown, not "no lesion"
    return PathologyView(image, label, weight)


def add_export(image: np.ndarray, lung: np.ndarray, rng: random.Random) -> np.ndarray:
    """Draw each export ingredient with its probability (after the geometric transforms)."""
    if rng.random() < SHARPEN_P:
        image = sharpen(image, rng)
    if rng.random() < LOW_DOSE_P:
        image = low_dose_noise(image, rng)
    if rng.random() < FOV_P:
        image = circular_fov(image, lung, rng)
    if rng.random() < JPEG_P:
        image = jpeg_compress(image, rng)
    return image.astype(np.float32)
