"""Pictures for people: slices in a display window, lung contours drawn over them."""

from __future__ import annotations

import cv2
import numpy as np

from .io import CTSlice
from .preprocess import normalize_intensity

CONTOUR_COLOUR = (0, 200, 255)  # BGR: amber, visible on grey
LESION_COLOUR = (60, 60, 255)  # BGR: red, filled half-transparent so the texture below stays visible
LESION_OPACITY = 0.45
REGION_COLOUR = (255, 255, 0)  # BGR: cyan, apart from the amber lungs and the red lesions


def outline_region(picture: np.ndarray, bbox: tuple[int, int, int, int] | list[int],
                   mask: np.ndarray | None = None, thickness: int | None = None) -> np.ndarray:
    """Draw a region on an overlay (BGR, the slice's size) in :data:`REGION_COLOUR`: its contour
    when its mask inside ``bbox`` (x0, y0, x1, y1, exclusive ends) is given, else its box; a
    box a few pixels larger around it, so a small nodule is found at a glance. ``thickness``:
    of the lines in pixels (default: one per 256 pixels of the picture's side)."""
    x0, y0, x1, y1 = (int(v) for v in bbox)
    thickness = thickness or max(1, round(max(picture.shape[:2]) / 256))
    if mask is not None and mask.shape == (y1 - y0, x1 - x0) and mask.any():
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE,
                                       offset=(x0, y0))
        cv2.drawContours(picture, contours, -1, REGION_COLOUR, thickness)
    margin = 3 * thickness
    cv2.rectangle(picture, (x0 - margin, y0 - margin), (x1 - 1 + margin, y1 - 1 + margin), REGION_COLOUR, thickness)
    return picture


def display_image(item: CTSlice, hu_window: tuple[float, float] = (-1000.0, 400.0)) -> np.ndarray:
    """The slice as 8-bit grey, HU shown in the lung window."""
    unit = normalize_intensity(item.pixels, item.intensity, hu_window)
    return np.round(unit * 255).astype(np.uint8)


def mask_png(mask: np.ndarray) -> np.ndarray:
    """A boolean mask as 0/255 8-bit pixels."""
    return (mask.astype(np.uint8) * 255)


def overlay(item: CTSlice, mask: np.ndarray, lesion: np.ndarray | None = None) -> np.ndarray:
    """The slice in colour with the lung contour drawn on it and, when given, the lesion map
    filled in half-transparent red (BGR, the slice's own size)."""
    picture = cv2.cvtColor(display_image(item), cv2.COLOR_GRAY2BGR)
    if lesion is not None and lesion.any():
        tinted = picture.astype(np.float32)
        tinted[lesion] = (1 - LESION_OPACITY) * tinted[lesion] + LESION_OPACITY * np.array(LESION_COLOUR, np.float32)
        picture = np.round(tinted).astype(np.uint8)
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
    thickness = max(1, round(max(mask.shape) / 256))
    cv2.drawContours(picture, contours, -1, CONTOUR_COLOUR, thickness)
    return picture


def write_png(path: str, pixels: np.ndarray) -> None:
    if not cv2.imwrite(path, pixels):
        raise OSError(f"cannot write {path}")


def match_strip(query: np.ndarray, matches: list[tuple[np.ndarray, str]], height: int = 256) -> np.ndarray:
    """Query overlay and neighbour overlays side by side, each captioned (e.g. rank and score)."""
    tiles = []
    for picture, caption in [(query, "query"), *matches]:
        scale = height / picture.shape[0]
        tile = cv2.resize(picture, (max(1, round(picture.shape[1] * scale)), height), interpolation=cv2.INTER_AREA)
        cv2.rectangle(tile, (0, 0), (tile.shape[1], 22), (0, 0, 0), -1)
        cv2.putText(tile, caption, (6, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1, cv2.LINE_AA)
        tiles.append(tile)
        tiles.append(np.full((height, 4, 3), 255, np.uint8))
    return np.hstack(tiles[:-1])
