"""Pictures for people: slices in a display window, lung contours drawn over them."""

from __future__ import annotations

import cv2
import numpy as np

from .io import CTSlice
from .preprocess import normalize_intensity

CONTOUR_COLOUR = (0, 200, 255)  # BGR: amber, visible on grey


def display_image(item: CTSlice, hu_window: tuple[float, float] = (-1000.0, 400.0)) -> np.ndarray:
    """The slice as 8-bit grey, HU shown in the lung window."""
    unit = normalize_intensity(item.pixels, item.intensity, hu_window)
    return np.round(unit * 255).astype(np.uint8)


def mask_png(mask: np.ndarray) -> np.ndarray:
    """A boolean mask as 0/255 8-bit pixels."""
    return (mask.astype(np.uint8) * 255)


def overlay(item: CTSlice, mask: np.ndarray) -> np.ndarray:
    """The slice in colour with the lung contour drawn on it (BGR, the slice's own size)."""
    picture = cv2.cvtColor(display_image(item), cv2.COLOR_GRAY2BGR)
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
    thickness = max(1, round(max(mask.shape) / 256))
    cv2.drawContours(picture, contours, -1, CONTOUR_COLOUR, thickness)
    return picture


def write_png(path: str, pixels: np.ndarray) -> None:
    if not cv2.imwrite(path, pixels):
        raise OSError(f"cannot write {path}")
