"""Post-processing must never delete a real lung (issue 13, item 4)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from lungcbir.postprocess import clean_probability


def _mediastinal_window_slice() -> tuple[np.ndarray, np.ndarray]:
    """A chest in a mediastinal-window export: air and lungs black, a thick layer of fat (0.15),
    soft tissue only in the mediastinum, so Otsu's threshold splits fat from soft tissue."""
    unit = np.zeros((256, 256), np.float32)
    cv2.ellipse(unit, (128, 128), (115, 95), 0, 0, 360, 0.15, -1)
    cv2.ellipse(unit, (128, 140), (28, 45), 0, 0, 360, 0.55, -1)
    cv2.rectangle(unit, (110, 200), (146, 222), 0.9, -1)
    probability = np.zeros_like(unit)
    for centre in (70, 186):
        cv2.ellipse(unit, (centre, 120), (32, 55), 0, 0, 360, 0.0, -1)
        cv2.ellipse(probability, (centre, 120), (30, 53), 0, 0, 360, 0.95, -1)
    return unit, probability


def test_lungs_inside_a_fat_body_are_kept_in_a_mediastinal_window_export():
    unit, probability = _mediastinal_window_slice()
    kept = clean_probability(probability, unit) > 0.5
    assert kept.sum() == (probability > 0.5).sum()


def test_air_outside_the_body_is_still_dropped_in_a_mediastinal_window_export():
    unit, probability = _mediastinal_window_slice()
    cv2.circle(probability, (128, 240), 8, 0.9, -1)  # under the body, in the black around it
    kept = clean_probability(probability, unit) > 0.5
    assert not kept[232:249, 120:137].any()
    assert kept[120, 70] and kept[120, 186]


@pytest.mark.realdata
def test_bundled_model_keeps_the_lungs_of_mediastinal_window_exports(bundled_weights, shared_data):
    """Held-out Kaggle slices exported in the mediastinal window [-160, 240] HU: before the fix
    post-processing deleted whole lungs of 5 of the 32 (Dice 0.99 -> 0.01)."""
    from lungcbir.datasets import kaggle_slices
    from lungcbir.inference import LungModel
    from lungcbir.io import CTSlice, read_file, read_mask
    from lungcbir.metrics import dice_score

    model = LungModel.load(bundled_weights)
    names = ("ID_0087_Z_0237.tif", "ID_0125_Z_0119.tif", "ID_0126_Z_0139.tif")
    chosen = [s for s in kaggle_slices()["test"] if s.image.endswith(names)]
    assert len(chosen) == len(names)
    exports = [CTSlice(np.round(np.clip((read_file(s.image)[0].pixels.astype(np.float32) + 160) / 400, 0, 1)
                                * 255).astype(np.uint8), "uint8", s.image, "png") for s in chosen]
    for sample, result in zip(chosen, model.segment(exports)):
        assert dice_score(result.mask, read_mask(sample.mask)) > 0.9, sample.image
