"""Intensity normalisation and resizing between a slice's own pixels and the network's input.

* Hounsfield units are windowed (lung window [-1000, 400] HU by default) to [0, 1].
* 8-bit images are divided by 255; float images already in [0, 1] are kept.
* Anything else (16-bit non-HU, odd float ranges) is min-max scaled to [0, 1].
* Non-square slices are padded to a square (with 0, the value of air) so anatomy keeps its
  aspect ratio, then resized to the model's input with ``cv2.INTER_LANCZOS4``.
* Ground-truth masks are resized with ``cv2.INTER_NEAREST``; predicted lung probabilities are
  resized back to the slice's own resolution with linear interpolation and then thresholded,
  which gives smoother, more accurate borders than resizing a binary mask.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import cv2
import numpy as np

from .io import Intensity


@dataclass(frozen=True)
class PreprocessConfig:
    """How slices become network input; saved with the weights.

    Example:
        >>> PreprocessConfig().hu_window
        (-1000.0, 400.0)
    """

    input_size: int = 256
    hu_window: tuple[float, float] = (-1000.0, 400.0)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "PreprocessConfig":
        return cls(input_size=int(values["input_size"]), hu_window=tuple(values["hu_window"]))


@dataclass(frozen=True)
class Geometry:
    """Where a slice sits inside the padded square that was resized to the model input."""

    height: int
    width: int
    side: int
    top: int
    left: int


def normalize_intensity(pixels: np.ndarray, intensity: Intensity | str,
                        hu_window: tuple[float, float] = (-1000.0, 400.0)) -> np.ndarray:
    """Map raw pixel values to float32 in [0, 1] according to their intensity kind.

    Example:
        >>> normalize_intensity(np.array([[-1000.0, -300.0, 400.0]]), "hu").round(2).tolist()
        [[0.0, 0.5, 1.0]]
    """
    values = pixels.astype(np.float32, copy=False)
    if intensity == Intensity.HU:
        low, high = hu_window
        return np.clip((values - low) / (high - low), 0.0, 1.0).astype(np.float32)
    if intensity == Intensity.UINT8:
        return values / np.float32(255.0)
    if intensity == Intensity.UNIT:
        return np.clip(values, 0.0, 1.0)
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros_like(values)
    # in float64: the range of float32 values (up to 3.4e38 either way) overflows float32
    return ((values.astype(np.float64) - low) / (high - low)).astype(np.float32)


def geometry_for(shape: tuple[int, int]) -> Geometry:
    height, width = shape
    side = max(height, width)
    return Geometry(height, width, side, (side - height) // 2, (side - width) // 2)


def pad_to_square(image: np.ndarray, fill: float = 0.0, dtype: np.dtype | type | None = None
                  ) -> tuple[np.ndarray, Geometry]:
    """``image`` centred in a square of ``fill`` (as ``dtype``, default the image's), and where
    it sits; a square image comes back as it is (unconverted).

    Example:
        >>> square, geometry = pad_to_square(np.ones((2, 4), np.float32))
        >>> square.astype(int).tolist(), (geometry.top, geometry.left)
        ([[0, 0, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0]], (1, 0))
    """
    geometry = geometry_for(image.shape)
    if geometry.height == geometry.width:
        return image, geometry
    square = np.full((geometry.side, geometry.side), fill, image.dtype if dtype is None else dtype)
    square[geometry.top:geometry.top + geometry.height, geometry.left:geometry.left + geometry.width] = image
    return square, geometry


def to_model_input(image: np.ndarray, input_size: int) -> tuple[np.ndarray, Geometry]:
    """Pad a [0, 1] image to a square (with 0) and resize it to ``input_size`` (Lanczos)."""
    square, geometry = pad_to_square(image, 0.0, np.float32)
    if geometry.side != input_size:
        square = cv2.resize(square, (input_size, input_size), interpolation=cv2.INTER_LANCZOS4)
    return np.clip(square, 0.0, 1.0).astype(np.float32), geometry


def probabilities_to_original(probabilities: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Resize model-resolution probabilities back to the slice's own size (linear)."""
    square: np.ndarray = probabilities.astype(np.float32)
    if square.shape[0] != geometry.side:
        square = cv2.resize(square, (geometry.side, geometry.side), interpolation=cv2.INTER_LINEAR)
    return square[geometry.top:geometry.top + geometry.height,
                  geometry.left:geometry.left + geometry.width]


def mask_to_model(mask: np.ndarray, input_size: int) -> np.ndarray:
    """Pad and resize a ground-truth mask to the model input (nearest neighbour)."""
    square, geometry = pad_to_square((mask > 0).astype(np.uint8), 0)
    if geometry.side != input_size:
        square = cv2.resize(square, (input_size, input_size), interpolation=cv2.INTER_NEAREST)
    return square
