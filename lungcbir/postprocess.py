"""Light clean-up of predicted lung masks: drop air outside the body and small islands, fill holes.

It runs on the network's probability map at model resolution (:func:`clean_probability`),
before the map is resized to the slice, so its cost does not grow with the slice size.
"""

from __future__ import annotations

import cv2
import numpy as np

#: Components smaller than this share of the largest one are dropped (specks, bowel gas).
MIN_COMPONENT_SHARE = 0.05
#: Enclosed holes smaller than this share of the lung area are filled.
MAX_HOLE_SHARE = 0.1
#: A body found at the lower tissue threshold replaces the first one when it is this many times
#: larger (the first was the mediastinum of a mediastinal-window export, not the patient).
BODY_GROWTH = 2.0


def clean_mask(mask: np.ndarray) -> np.ndarray:
    """Drop small islands and fill enclosed holes (vessels, nodules) in a binary lung mask.

    Example:
        >>> m = np.zeros((20, 20), bool); m[2:18, 2:9] = True; m[5, 5] = False; m[0, 19] = True
        >>> cleaned = clean_mask(m)
        >>> bool(cleaned[5, 5]), bool(cleaned[0, 19])
        (True, False)
    """
    islands = _Components(mask, connectivity=8)
    if islands.count <= 1:
        return mask.astype(bool)
    areas = islands.areas.copy()
    areas[0] = 0
    kept = islands.select(areas >= MIN_COMPONENT_SHARE * areas.max())
    # holes: background components that do not touch the border and are small compared
    # with the lungs (vessels, nodules); a large enclosed region is more likely mediastinum
    gaps = _Components(~kept, connectivity=4)
    holes = ~gaps.touching_border(1) & (gaps.areas < MAX_HOLE_SHARE * kept.sum())
    holes[0] = False
    return kept | gaps.select(holes)


class _Components:
    """Connected components of a binary image: labels (0 = background), areas, border contact.

    Areas and border contact come from the labels with numpy: OpenCV's own statistics
    (bounding boxes, centroids) cost four times the labelling itself.
    """

    def __init__(self, binary: np.ndarray, connectivity: int) -> None:
        self.count, self.labels = cv2.connectedComponents(binary.astype(np.uint8), connectivity=connectivity)
        self.areas = np.bincount(self.labels.ravel(), minlength=self.count)

    def touching_border(self, margin: int) -> np.ndarray:
        """Per label: whether any of its pixels lies within ``margin`` pixels of the image border."""
        labels = self.labels
        edges = np.concatenate([labels[:margin].ravel(), labels[-margin:].ravel(),
                                labels[:, :margin].ravel(), labels[:, -margin:].ravel()])
        touching = np.zeros(self.count, bool)
        touching[edges] = True
        return touching

    def select(self, chosen: np.ndarray) -> np.ndarray:
        """The pixels of the labels where ``chosen`` (one bool per label) is true."""
        return chosen[self.labels]


def clean_probability(probability: np.ndarray, unit_image: np.ndarray) -> np.ndarray:
    """Apply :func:`drop_outside_air` and :func:`clean_mask` to a lung probability map.

    Dropped components get probability 0 and filled holes 1, everything else is unchanged,
    so resizing the result and thresholding at 0.5 gives the cleaned mask at any resolution.

    Example:
        >>> unit = np.zeros((64, 64), np.float32); unit[8:56, 8:56] = 0.8; unit[16:48, 12:30] = 0.1
        >>> p = np.zeros((64, 64), np.float32); p[16:48, 12:30] = 0.9; p[30, 20] = 0.2; p[0:4, 0:4] = 0.9
        >>> cleaned = clean_probability(p, unit)
        >>> float(cleaned[30, 20]), float(cleaned[1, 1]), round(float(cleaned[20, 20]), 2)
        (1.0, 0.0, 0.9)
    """
    lungs = probability > 0.5
    kept = clean_mask(drop_outside_air(lungs, unit_image))
    return np.where(kept & ~lungs, 1.0, np.where(lungs & ~kept, 0.0, probability)).astype(probability.dtype)


def _grey(unit_image: np.ndarray) -> np.ndarray:
    """The slice as blurred 8-bit grey, what the tissue thresholds are taken on."""
    return cv2.GaussianBlur(np.round(np.clip(unit_image, 0, 1) * 255).astype(np.uint8), (5, 5), 0)


def _otsu(values: np.ndarray) -> int:
    threshold, _ = cv2.threshold(values.reshape(-1, 1), 0, 1, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return int(threshold)


def body_mask(unit_image: np.ndarray, threshold: int | None = None) -> np.ndarray:
    """The patient's body with everything it encloses (lungs, airways), from a [0, 1] slice.

    Tissue is separated from air by Otsu's threshold (or ``threshold``, on 0-255 grey); a
    small opening detaches the scanner table; the largest component is the body and its
    enclosed holes are filled. Air outside the body (around the patient, under the table,
    outside a circular field of view) is excluded.
    """
    grey = _grey(unit_image)
    if threshold is None:
        threshold = _otsu(grey)
    tissue: np.ndarray = (grey > threshold).astype(np.uint8)
    side = max(3, round(min(grey.shape) / 64)) | 1
    tissue = cv2.morphologyEx(tissue, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (side, side)))
    parts = _Components(tissue, connectivity=8)
    if parts.count <= 1:
        return np.ones(grey.shape, bool)
    body = parts.labels == 1 + int(np.argmax(parts.areas[1:]))
    # enclosed holes: background components that do not touch the image border
    outside = _Components(~body, connectivity=4)
    enclosed = ~outside.touching_border(1)
    enclosed[0] = False
    return body | outside.select(enclosed)


def lower_tissue_threshold(unit_image: np.ndarray) -> int:
    """Otsu's threshold among the pixels below Otsu's threshold: air against everything else.

    Otsu's threshold alone splits a slice into its two largest intensity classes. In a lung
    window those are air (lungs included) and tissue; in a mediastinal-window export, where
    air and lung are both black, they can be fat and soft tissue, and the "body" becomes the
    mediastinum alone. The second threshold separates air from fat there.
    """
    grey = _grey(unit_image)
    darker = grey[grey <= _otsu(grey)]
    return _otsu(darker) if darker.size and darker.min() < darker.max() else 0


def drop_outside_air(mask: np.ndarray, unit_image: np.ndarray) -> np.ndarray:
    """Remove predicted components that are air around the patient, not lung.

    A component is dropped when it touches the image border or when less than half of it lies
    within the convex hull of the body (the hull, not the body outline, so that an outline
    with gaps, as in some 8-bit exports, never cuts real lungs away).

    In a mediastinal-window export, where air and lungs are both black, Otsu's threshold can
    split fat from soft tissue, and the "body" is then the mediastinum alone: whole lungs lay
    outside its hull and were deleted. So when a component would be dropped for lying outside
    the hull, the body is found again at :func:`lower_tissue_threshold`; if that body is more
    than :data:`BODY_GROWTH` times larger (the first one was only part of the patient), its
    hull is used instead. (Always using the lower threshold would merge blankets and the table
    padding into the body and keep the air beneath the patient's back.)
    """
    parts = _Components(mask, connectivity=8)
    if parts.count <= 1:
        return mask.astype(bool)
    body = body_mask(unit_image)
    outside_hull = _share_in(convex_hull(body), parts) < 0.5
    border = parts.touching_border(max(1, round(min(mask.shape) / 100)))
    if (outside_hull & ~border)[1:].any():  # rare: only then pay for a second body
        wider = body_mask(unit_image, lower_tissue_threshold(unit_image))
        if wider.sum() > BODY_GROWTH * body.sum():
            outside_hull = _share_in(convex_hull(wider), parts) < 0.5
    keep = ~border & ~outside_hull
    keep[0] = False
    return parts.select(keep)


def _share_in(region: np.ndarray, parts: _Components) -> np.ndarray:
    """Per component: the share of its pixels inside ``region``."""
    return np.bincount(parts.labels[region], minlength=parts.count) / np.maximum(parts.areas, 1)


def convex_hull(region: np.ndarray) -> np.ndarray:
    """The convex hull of a binary region, filled."""
    # the hull of the outline is the hull of the whole region, from far fewer points
    outlines, _ = cv2.findContours(region.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    hull = np.zeros(region.shape, np.uint8)
    if outlines:
        cv2.fillConvexPoly(hull, cv2.convexHull(np.concatenate(outlines)), 1)
    return hull.astype(bool)


def include_lesions(lungs: np.ndarray, lesions: np.ndarray, unit_image: np.ndarray) -> np.ndarray:
    """The cleaned lung mask joined by the lesion output's pixels that belong to the lungs.

    The lung output can follow the aerated lung only and leave dense consolidation out; the
    lesion output may still see it. A lesion component (``lesions``: bool, model resolution)
    joins the lungs when it lies in the thoracic cavity, as far as one slice shows it: it
    touches the lung mask (disease grows from the lung, the heart or liver beside it is not
    reached through it), does not touch the image border and lies at least half inside the
    convex hull of the body (the lesion output's false alarms sit in the air or fill outside
    the field of view). Holes the union encloses are filled as in :func:`clean_mask`.

    Example:
        >>> unit = np.zeros((64, 64), np.float32); unit[4:60, 4:60] = 0.7; unit[10:54, 10:30] = 0.1
        >>> lungs = np.zeros((64, 64), bool); lungs[10:40, 10:30] = True
        >>> lesions = np.zeros((64, 64), bool); lesions[38:54, 10:30] = True; lesions[0:3, 0:3] = True
        >>> joined = include_lesions(lungs, lesions, unit)
        >>> bool(joined[50, 20]), bool(joined[1, 1]), int(joined.sum() - lungs.sum())
        (True, False, 280)
    """
    candidates = lesions & ~lungs
    if not lungs.any() or not candidates.any():
        return lungs
    parts = _Components(candidates, connectivity=8)
    near = cv2.dilate(lungs.view(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    touching = np.bincount(parts.labels[near], minlength=parts.count) > 0
    keep = touching & ~parts.touching_border(max(1, round(min(lungs.shape) / 100)))
    keep[0] = False
    if not keep.any():
        return lungs
    keep &= _share_in(convex_hull(body_mask(unit_image)), parts) >= 0.5
    keep[0] = False
    return clean_mask(lungs | parts.select(keep)) if keep.any() else lungs
