"""Light clean-up of predicted lung masks: keep the large components, fill holes."""

from __future__ import annotations

import cv2
import numpy as np

#: Components smaller than this share of the largest one are dropped (specks, bowel gas).
MIN_COMPONENT_SHARE = 0.05
#: Enclosed holes smaller than this share of the lung area are filled.
MAX_HOLE_SHARE = 0.1


def clean_mask(mask: np.ndarray) -> np.ndarray:
    """Drop small islands and fill enclosed holes (vessels, nodules) in a binary lung mask.

    Example:
        >>> m = np.zeros((20, 20), bool); m[2:18, 2:9] = True; m[5, 5] = False; m[0, 19] = True
        >>> cleaned = clean_mask(m)
        >>> bool(cleaned[5, 5]), bool(cleaned[0, 19])
        (True, False)
    """
    binary = mask.astype(np.uint8)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
    if count <= 1:
        return mask.astype(bool)
    areas = stats[1:, cv2.CC_STAT_AREA]
    keep = np.flatnonzero(areas >= MIN_COMPONENT_SHARE * areas.max()) + 1
    kept = np.isin(labels, keep)
    # holes: background components that do not touch the border and are small compared
    # with the lungs (vessels, nodules); a large enclosed region is more likely mediastinum
    background = (~kept).astype(np.uint8)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(background, connectivity=4)
    height, width = mask.shape
    x, y, w, h, area = (stats[:, i] for i in range(5))
    inner = (x > 0) & (y > 0) & (x + w < width) & (y + h < height)
    small = area < MAX_HOLE_SHARE * kept.sum()
    holes = np.flatnonzero(inner & small)
    holes = holes[holes > 0]
    return kept | np.isin(labels, holes)


def body_mask(unit_image: np.ndarray) -> np.ndarray:
    """The patient's body with everything it encloses (lungs, airways), from a [0, 1] slice.

    Tissue is separated from air by Otsu's threshold; a small opening detaches the scanner
    table; the largest component is the body and its enclosed holes are filled. Air outside the
    body (around the patient, under the table, outside a circular field of view) is excluded.
    """
    image = np.round(np.clip(unit_image, 0, 1) * 255).astype(np.uint8)
    _, tissue = cv2.threshold(cv2.GaussianBlur(image, (5, 5), 0), 0, 1, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    side = max(3, round(min(image.shape) / 64)) | 1
    tissue = cv2.morphologyEx(tissue, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (side, side)))
    count, labels, stats, _ = cv2.connectedComponentsWithStats(tissue, connectivity=8)
    if count <= 1:
        return np.ones(image.shape, bool)
    body = labels == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    # enclosed holes: background components that do not touch the image border
    count, labels, stats, _ = cv2.connectedComponentsWithStats((~body).astype(np.uint8), connectivity=4)
    height, width = image.shape
    x, y, w, h = (stats[:, i] for i in range(4))
    inner = np.flatnonzero((x > 0) & (y > 0) & (x + w < width) & (y + h < height))
    return body | np.isin(labels, inner[inner > 0])


def drop_outside_air(mask: np.ndarray, unit_image: np.ndarray) -> np.ndarray:
    """Remove predicted components that are air around the patient, not lung.

    A component is dropped when it touches the image border or when less than half of it lies
    within the convex hull of the body (the hull, not the body outline, so that an outline
    with gaps, as in some 8-bit exports, never cuts real lungs away).
    """
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if count <= 1:
        return mask.astype(bool)
    height, width = mask.shape
    hull = body_hull(unit_image)
    margin = max(1, round(min(height, width) / 100))
    keep = np.zeros(count, bool)
    for label in range(1, count):
        x, y, w, h, area = stats[label]
        touches_border = min(x, y) < margin or x + w > width - margin or y + h > height - margin
        keep[label] = not touches_border and (hull & (labels == label)).sum() >= 0.5 * area
    return keep[labels]


def body_hull(unit_image: np.ndarray) -> np.ndarray:
    """Convex hull of the patient's body (largest tissue component, table detached)."""
    body = body_mask(unit_image)
    points = cv2.findNonZero(body.astype(np.uint8))
    hull = np.zeros(body.shape, np.uint8)
    if points is not None:
        cv2.fillConvexPoly(hull, cv2.convexHull(points), 1)
    return hull.astype(bool)
