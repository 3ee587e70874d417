"""Post-processing must never delete a real lung."""

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


def _chest_with_consolidation() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A body with two lungs; the lower part of the left lung is consolidated (tissue-bright),
    the lung output covers only its aerated part and the lesion output the consolidation."""
    unit = np.zeros((128, 128), np.float32)
    cv2.ellipse(unit, (64, 64), (58, 48), 0, 0, 360, 0.7, -1)
    lungs = np.zeros((128, 128), bool)
    for centre in (38, 90):
        cv2.ellipse(unit, (centre, 60), (16, 30), 0, 0, 360, 0.1, -1)
    unit[70:92, 20:58] = np.where(unit[70:92, 20:58] < 0.5, 0.68, unit[70:92, 20:58])  # consolidation
    lungs[:] = unit < 0.5
    lungs[:, :8] = lungs[:, -8:] = False  # (no air around this body)
    lesions = (unit > 0.6) & (unit < 0.69)
    return unit, lungs, lesions


def test_include_lesions_joins_consolidation_that_touches_the_lungs():
    from lungcbir.postprocess import include_lesions

    unit, lungs, lesions = _chest_with_consolidation()
    joined = include_lesions(lungs, lesions, unit)
    assert joined[80, 38] and not lungs[80, 38]
    assert (joined & ~lungs).sum() == lesions.sum()


def test_include_lesions_leaves_out_what_does_not_touch_the_lungs_or_lies_outside_the_body():
    from lungcbir.postprocess import include_lesions

    unit, lungs, _ = _chest_with_consolidation()
    lesions = np.zeros_like(lungs)
    lesions[60:70, 60:68] = True  # mediastinum, apart from both lungs
    lesions[0:4, 0:4] = True  # the corner outside the field of view
    lesions[118:126, 30:40] = True  # under the body, not on the border
    lesions[118:121, 40:44] = True
    assert (include_lesions(lungs, lesions, unit) == lungs).all()
    assert (include_lesions(np.zeros_like(lungs), lesions, unit) == 0).all()
