"""How far to trust one segmentation: ``ok``, ``doubtful`` or ``no-lungs``, and a score in [0, 1].

The network always answers, even for a screenshot or a slice below the lungs. This module
turns cheap signals of each answer into a verdict the user can see:

* **input signals** (is this a CT slice at all?): the share of strongly coloured pixels of
  the file before grey conversion (CT exports are grey), the share of white pixels in the
  network input (text or UI on a white page; in CT only bone is white), the spread of the
  input (a constant-ish picture);
* **mask signals** (is the mask believable?): the predicted lung area, the width of the
  uncertain band along its boundary (pixels with 0.2 < p < 0.8 per boundary pixel), the
  share of the network's lung that post-processing had to remove, the number of sizeable
  lung components, how much darker the lungs are than their surroundings.

Every threshold below was chosen on the validation split and its stress variants only
(``python benchmarks/quality_flag.py --calibrate``); the test split reports them
(``python benchmarks/quality_flag.py``, figures in MODEL_CARD.md, "Quality flag"). All
signals are computed at the model's input resolution, so their cost (well under a
millisecond a slice) does not grow with the slice size.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import Enum

import cv2
import numpy as np


class Quality(str, Enum):
    """The verdict on one segmentation (its value is what JSON shows)."""

    OK = "ok"
    DOUBTFUL = "doubtful"  # a mask is given, but it may be wrong: check it by eye
    NO_LUNGS = "no-lungs"  # no lungs in view, or not a CT slice at all

    def __str__(self) -> str:
        return self.value


#: Probabilities strictly between these two count as uncertain.
UNCERTAIN_LOW, UNCERTAIN_HIGH = 0.2, 0.8

# --- no-lungs: not a CT slice, or no lungs in it -------------------------------------------
#: A picture with more than this share of strongly coloured pixels is not a CT export.
MAX_COLOUR_SHARE = 0.02
#: A pixel counts as strongly coloured when its channels differ by more than this (0-255).
COLOUR_CHROMA = 40
#: A network input with more than this share of white pixels (>= WHITE_LEVEL) is a page or UI.
MAX_WHITE_SHARE = 0.35
WHITE_LEVEL = 0.97
#: An input whose standard deviation is below this (on [0, 1]) is a constant-ish picture.
MIN_INPUT_STD = 0.03
#: Below this share of the model input predicted as lung, there are no lungs in view.
MIN_LUNG_SHARE = 0.002

# --- doubtful: each signal maps linearly to a score, 1 at its "good" end, 0 at its "bad" end --
#: Mean width (pixels at model resolution) of the uncertain band along the lung boundary.
BAND_GOOD, BAND_BAD = 0.5, 1.0
#: Share of the network's own lung pixels that post-processing removed.
REMOVED_GOOD, REMOVED_BAD = 0.02, 0.2
#: Lung area (share of the model input): small lungs are segmented worse (slivers, crops).
AREA_GOOD, AREA_BAD = 0.1, 0.005
#: Sizeable lung components (>= COMPONENT_SHARE of the largest): more than two is odd.
COMPONENT_SHARE = 0.1
COMPONENTS_GOOD, COMPONENTS_BAD = 2, 5
#: Lungs are darker than what surrounds them in every CT window and export: mean input in a
#: ring around the lungs minus mean input inside them.
CONTRAST_GOOD, CONTRAST_BAD = 0.1, 0.0
#: A segmentation whose score is below this is ``doubtful``.
DOUBTFUL_BELOW = 0.5


@dataclass(frozen=True)
class QualitySignals:
    """The measured signals of one segmentation (model resolution)."""

    colour_share: float  # share of strongly coloured pixels in the file (0 for grey files)
    white_share: float  # share of network input pixels >= WHITE_LEVEL
    input_std: float  # standard deviation of the network input
    lung_share: float  # share of the model input returned as lung (after post-processing)
    band_width: float  # uncertain pixels per boundary pixel of the returned lung
    removed_share: float  # share of the network's lung pixels removed by post-processing
    components: int  # sizeable connected lung components
    lung_contrast: float = 0.0  # mean input around the lungs minus mean input inside them

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class QualityVerdict:
    quality: Quality
    score: float  # 1 = confident, 0 = not at all
    signals: QualitySignals


def colour_share(pixels: np.ndarray, chroma: int = COLOUR_CHROMA) -> float:
    """Share of strongly coloured pixels of a colour picture (H, W, 3 or 4; uint8), on a grid.

    Every 4th pixel in each direction is enough for a share and keeps the cost tiny.

    Example:
        >>> grey = np.full((64, 64, 3), 120, np.uint8)
        >>> colour_share(grey), colour_share(np.dstack([grey[..., 0], grey[..., 1], grey[..., 2] + 100]))
        (0.0, 1.0)
    """
    if pixels.ndim != 3 or pixels.shape[2] < 3:
        return 0.0
    sample = pixels[::4, ::4, :3].astype(np.int16)
    spread = sample.max(axis=2) - sample.min(axis=2)
    return float((spread > chroma).mean())


def _boundary_pixels(lungs: np.ndarray) -> int:
    """Pixels of ``lungs`` with a 4-neighbour outside it (the inner boundary)."""
    eroded = cv2.erode(lungs.view(np.uint8), np.ones((3, 3), np.uint8))
    return int(lungs.sum()) - int(eroded.sum())


def measure(probability: np.ndarray, cleaned: np.ndarray, unit_image: np.ndarray,
            colour: float = 0.0) -> QualitySignals:
    """The signals of one segmentation.

    ``probability`` is the network's lung probability map, ``cleaned`` the same map after
    post-processing (what the returned mask comes from; pass ``probability`` again when there
    is none), ``unit_image`` the network input, all at model resolution; ``colour`` the
    slice's :func:`colour_share`.
    """
    raw_lungs = probability > 0.5
    lungs = cleaned > 0.5
    sample = unit_image[::2, ::2]  # input statistics from every other pixel: a quarter of the cost
    area = int(lungs.sum())
    uncertain = int(((cleaned > UNCERTAIN_LOW) & (cleaned < UNCERTAIN_HIGH)).sum())
    boundary = _boundary_pixels(lungs) if area else 0
    raw_area = int(raw_lungs.sum())
    removed = int((raw_lungs & ~lungs).sum())
    components = 0
    contrast = 0.0
    if area:
        inside = lungs.view(np.uint8)
        ring = cv2.dilate(inside, np.ones((9, 9), np.uint8)) - inside  # cv2.mean: no boolean indexing
        if ring.any():
            contrast = float(cv2.mean(unit_image, ring)[0] - cv2.mean(unit_image, inside)[0])
        count, labels = cv2.connectedComponents(lungs.view(np.uint8), connectivity=8)
        sizes = np.bincount(labels.ravel(), minlength=count)[1:]
        components = int((sizes >= COMPONENT_SHARE * sizes.max()).sum())
    return QualitySignals(
        colour_share=float(colour),
        white_share=float((sample >= WHITE_LEVEL).mean()),
        input_std=float(sample.std()),
        lung_share=area / lungs.size,
        band_width=uncertain / boundary if boundary else 0.0,
        removed_share=removed / raw_area if raw_area else 0.0,
        components=components,
        lung_contrast=contrast)


def _ramp(value: float, good: float, bad: float) -> float:
    """1 at ``good``, 0 at ``bad``, linear between (either direction)."""
    return float(np.clip((value - bad) / (good - bad), 0.0, 1.0))


def is_not_ct(signals: QualitySignals) -> bool:
    """Whether the input itself is not a CT slice (colour picture, white page, constant-ish)."""
    return (signals.colour_share > MAX_COLOUR_SHARE or signals.white_share > MAX_WHITE_SHARE
            or signals.input_std < MIN_INPUT_STD)


def assess(signals: QualitySignals, judge_mask: bool = True) -> QualityVerdict:
    """Turn signals into a verdict: ``no-lungs`` first, then a score and ``ok``/``doubtful``.

    The score is the weakest of the mask signals' scores (one bad sign is enough to doubt a
    mask); ``no-lungs`` answers get score 0. With ``judge_mask`` False only the input signals
    count (is it CT at all?): for models the mask thresholds were not calibrated on.

    Example:
        >>> good = QualitySignals(0.0, 0.01, 0.3, 0.2, 0.5, 0.0, 2, 0.3)
        >>> assess(good).quality.value, assess(good).score
        ('ok', 1.0)
        >>> assess(QualitySignals(0.0, 0.01, 0.3, 0.2, 4.0, 0.0, 2, 0.3)).quality.value
        'doubtful'
    """
    if is_not_ct(signals) or (judge_mask and signals.lung_share < MIN_LUNG_SHARE):
        return QualityVerdict(Quality.NO_LUNGS, 0.0, signals)
    if not judge_mask:
        return QualityVerdict(Quality.OK, 1.0, signals)
    score = min(_ramp(signals.band_width, BAND_GOOD, BAND_BAD),
                _ramp(signals.removed_share, REMOVED_GOOD, REMOVED_BAD),
                _ramp(signals.lung_share, AREA_GOOD, AREA_BAD),
                _ramp(signals.components, COMPONENTS_GOOD, COMPONENTS_BAD),
                _ramp(signals.lung_contrast, CONTRAST_GOOD, CONTRAST_BAD))
    quality = Quality.OK if score >= DOUBTFUL_BELOW else Quality.DOUBTFUL
    return QualityVerdict(quality, round(score, 4), signals)


def judge(probability: np.ndarray, cleaned: np.ndarray, unit_image: np.ndarray,
          colour: float = 0.0, judge_mask: bool = True) -> QualityVerdict:
    """:func:`measure` then :func:`assess`."""
    return assess(measure(probability, cleaned, unit_image, colour), judge_mask)
