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
