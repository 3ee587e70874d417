import numpy as np
import pytest

from lungcbir.postprocess import clean_mask
from lungcbir.preprocess import mask_to_model, normalize_intensity, probabilities_to_original, to_model_input


def test_hu_window_maps_to_unit_range():
    out = normalize_intensity(np.array([[-3000.0, -1000.0, 400.0, 3000.0]]), "hu")
    assert out.tolist() == [[0.0, 0.0, 1.0, 1.0]]


def test_uint8_and_minmax():
    assert normalize_intensity(np.array([[0, 255]], np.uint8), "uint8").tolist() == [[0.0, 1.0]]
    out = normalize_intensity(np.array([[1000, 3000]], np.uint16), "minmax")
    assert out.tolist() == [[0.0, 1.0]]
    assert normalize_intensity(np.full((4, 4), 7.0), "minmax").max() == 0.0


@pytest.mark.parametrize("shape", [(100, 60), (60, 100), (64, 64), (300, 301)])
def test_model_input_round_trip_keeps_geometry(shape):
    image = np.zeros(shape, np.float32)
    image[shape[0] // 4:shape[0] // 2, shape[1] // 4:shape[1] // 2] = 1.0
    resized, geometry = to_model_input(image, 64)
    assert resized.shape == (64, 64) and 0.0 <= resized.min() and resized.max() <= 1.0
    back = probabilities_to_original(resized, geometry) > 0.5
    assert back.shape == shape
    overlap = (back & (image > 0.5)).sum() / (image > 0.5).sum()
    assert overlap > 0.8


def test_mask_to_model_is_binary():
    mask = np.zeros((100, 80), np.uint8)
    mask[10:50, 10:40] = 255
    small = mask_to_model(mask, 32)
    assert small.shape == (32, 32) and set(np.unique(small)) <= {0, 1}


def test_clean_mask_removes_specks_and_fills_holes():
    mask = np.zeros((64, 64), bool)
    mask[10:50, 5:25] = True
    mask[10:50, 35:60] = True
    mask[20, 10] = False  # a vessel
    mask[2, 2] = True  # a speck
    cleaned = clean_mask(mask)
    assert cleaned[20, 10] and not cleaned[2, 2] and cleaned[30, 40]


def test_outside_air_is_dropped_but_enclosed_lungs_kept():
    from lungcbir.phantom import phantom_slice
    from lungcbir.postprocess import drop_outside_air
    from lungcbir.preprocess import normalize_intensity

    item = phantom_slice(0.5, size=128)
    unit = normalize_intensity(item.hu, "hu")
    prediction = item.mask.astype(bool).copy()
    prediction[:10, :30] = True  # air above the body, touching the border
    prediction[2:8, 100:110] = True  # air near the border
    cleaned = drop_outside_air(prediction, unit)
    assert not cleaned[:10, :30].any() and not cleaned[2:8, 100:110].any()
    assert (cleaned == item.mask.astype(bool)).mean() > 0.99


def test_one_pad_to_square_serves_model_input_masks_and_training(tmp_path):
    """The three padders (model input, ground-truth masks, training samples) are one helper:
    the same image sits at the same place in all three."""
    import cv2

    from lungcbir.preprocess import mask_to_model, pad_to_square, to_model_input
    from lungcbir.train import load_sample

    image = np.zeros((40, 64), np.uint8)
    image[10:30, 20:44] = 200
    square, geometry = pad_to_square(image, 7)
    assert square.shape == (64, 64) and (geometry.top, geometry.left) == (12, 0)
    assert (square[:12] == 7).all() and (square[52:] == 7).all() and (square[12:52] == image).all()
    unit, _ = to_model_input(image.astype(np.float32) / 255, 64)
    mask = mask_to_model(image > 0, 64)
    assert np.array_equal(unit > 0.5, mask.astype(bool))
    cv2.imwrite(str(tmp_path / "i.png"), image)
    cv2.imwrite(str(tmp_path / "m.png"), (image > 0).astype(np.uint8) * 255)
    sample = load_sample(str(tmp_path / "i.png"), str(tmp_path / "m.png"), 64)
    assert np.array_equal(sample.pixels > 100, mask.astype(bool)) and sample.name == "i"


def test_minmax_of_the_whole_float32_range_warns_nothing():
    """Values - low overflowed float32 (a RuntimeWarning on stderr)."""
    import warnings

    values = np.array([[-3e38, 0.0, 3e38]], np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = normalize_intensity(values, "minmax")
    assert out.dtype == np.float32 and out.tolist() == [[0.0, 0.5, 1.0]]
