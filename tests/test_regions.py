"""Region features (lungcbir.regions, issue 26 item 3) on small synthetic slices."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lungcbir.inference import SliceMaps
from lungcbir.model import UNet, UNetConfig
from lungcbir.preprocess import geometry_for
from lungcbir.regions import (
    HISTOGRAM_BINS,
    REGION_BLOCK_WEIGHTS,
    REGION_RECIPE,
    bbox_mask,
    histogram_features,
    intensity_features,
    region_bbox,
    region_dimension,
    region_features,
    region_model_id,
    region_vector,
    shape_features,
)
from lungcbir.research.nodule_benchmark import R1_WEIGHTS, r1_blocks


def _disc(shape: tuple[int, int], centre: tuple[int, int], radius: float) -> np.ndarray:
    ys, xs = np.ogrid[:shape[0], :shape[1]]
    return (ys - centre[0]) ** 2 + (xs - centre[1]) ** 2 <= radius**2


def test_a_bbox_mask_and_the_bbox_of_a_mask_agree():
    mask = bbox_mask((40, 50), (5, 7, 20, 30))
    assert region_bbox(mask) == (5, 7, 20, 30) and mask.sum() == 15 * 23
    assert bbox_mask((10, 10), (-5, -5, 3, 2)).sum() == 6  # clipped to the slice
    with pytest.raises(ValueError):
        region_bbox(np.zeros((4, 4), bool))


def test_the_histogram_is_shares_in_the_window_plus_log_size():
    values = np.array([-2000.0, -1000.0, -300.0, 399.0, 5000.0])
    found = histogram_features(values, (-1000.0, 400.0))
    assert found.shape == (HISTOGRAM_BINS + 1,)
    assert found[:-1].sum() == pytest.approx(1.0) and found[0] == pytest.approx(0.4)  # below the window: first bin
    assert found[-2] == pytest.approx(0.4) and found[-1] == pytest.approx(np.log(5))


def test_intensity_features_tell_ground_glass_from_solid():
    region = _disc((64, 64), (32, 32), 10)
    glass = np.where(region, -550.0, -900.0).astype(np.float32)
    solid = np.where(region, 20.0, -900.0).astype(np.float32)
    part_solid = np.where(_disc((64, 64), (32, 32), 5), 20.0, glass).astype(np.float32)
    g, s, p = (intensity_features(hu, region) for hu in (glass, solid, part_solid))
    assert g[7] == pytest.approx(1.0) and s[7] == 0.0  # ground-glass share
    assert s[8] == pytest.approx(1.0) and g[8] == 0.0  # soft-tissue share
    assert p[-1] > 200 and abs(g[-1]) < 1  # a dense core in a halo: core minus rim


def test_shape_features_tell_a_round_region_from_a_long_one():
    disc = _disc((100, 100), (50, 50), 12)
    bar = np.zeros((100, 100), bool)
    bar[45:55, 10:90] = True
    round_, long_ = shape_features(disc), shape_features(bar)
    assert round_[0] == pytest.approx(np.log(disc.sum()))
    assert round_[2] > 0.9 and long_[2] < 0.2  # elongation: minor / major axis
    assert round_[1] > long_[1]  # compactness


def test_region_features_follow_the_region_not_the_rest_of_the_slice():
    torch.manual_seed(0)
    network = UNet(UNetConfig(base_channels=2, depth=5, lesion_levels=1)).eval()
    rng = np.random.default_rng(0)
    unit = np.full((96, 128), 0.1, np.float32) + rng.normal(0, 0.01, (96, 128)).astype(np.float32)
    region = _disc(unit.shape, (40, 40), 6)
    unit[region] = 0.7
    first = region_features(network, unit, region, input_size=64, zoom_sides=(32,))
    assert set(first.blocks) == {"histogram", "intensity", "shape", "zoom32", "context"}
    assert first.area == int(region.sum()) and first.bbox == region_bbox(region)
    # the lesion output's mean and max close the zoomed block
    assert first.blocks["zoom32"].shape == (8 + 16 + 32 + 64 + 2,)
    elsewhere = unit.copy()
    elsewhere[80:, 100:] = 0.9  # far from the region: outside the zoomed crop
    again = region_features(network, elsewhere, region, input_size=64, zoom_sides=(32,))
    np.testing.assert_allclose(again.blocks["zoom32"], first.blocks["zoom32"], atol=1e-5)
    np.testing.assert_array_equal(again.blocks["intensity"], first.blocks["intensity"])
    moved = region_features(network, unit, _disc(unit.shape, (70, 90), 6), input_size=64, zoom_sides=(32,))
    assert not np.allclose(moved.blocks["zoom32"], first.blocks["zoom32"])
    with pytest.raises(ValueError):
        region_features(network, unit, np.zeros(unit.shape, bool), input_size=64)


# -- the stored region vector (recipe r2) ---------------------------------------------------------


def _maps(bottleneck: np.ndarray | None = None) -> tuple[SliceMaps, np.ndarray]:
    rng = np.random.default_rng(1)
    unit = np.full((48, 64), 0.1, np.float32) + rng.normal(0, 0.01, (48, 64)).astype(np.float32)
    region = _disc(unit.shape, (20, 30), 5)
    unit[region] = 0.7
    lesions = rng.random((32, 32)).astype(np.float32)
    bottleneck = rng.normal(0, 1, (8, 4, 4)).astype(np.float32) if bottleneck is None else bottleneck
    return SliceMaps(bottleneck, lesions, geometry_for(unit.shape), unit), region


def test_recipe_r2_leaves_out_the_context_block_and_never_pools_the_bottleneck():
    assert REGION_RECIPE == "r2" and region_model_id("m1") == "m1/r2"
    # the weights the fold procedure chose on all 624 nodules (HU): 0, 1, 1, 2, normalised
    assert REGION_BLOCK_WEIGHTS == {"context": 0.0, "intensity": 0.25, "shape": 0.25, "lesion": 0.5}
    maps, region = _maps()
    vector = region_vector(maps, region)
    assert vector.shape == (region_dimension(8),) == (11 + 4 + 2,)
    assert abs(float(np.linalg.norm(vector)) - 1) < 1e-5
    # the bottleneck is not read: a NaN one gives the same vector
    nan_maps, _ = _maps(np.full((8, 4, 4), np.nan, np.float32))
    np.testing.assert_array_equal(region_vector(nan_maps, region), vector)
    # each block holds its weight's share of the unit vector
    edges = np.cumsum([0, 11, 4, 2])
    for (name, weight), start, stop in zip(list(REGION_BLOCK_WEIGHTS.items())[1:], edges[:-1], edges[1:]):
        assert float(np.sum(vector[start:stop] ** 2)) == pytest.approx(weight, abs=1e-5)


def test_recipe_r1_weights_still_give_r1_vectors_with_their_context_block():
    maps, region = _maps()
    r1 = region_vector(maps, region, weights=R1_WEIGHTS)
    assert r1.shape == (region_dimension(8, R1_WEIGHTS),) == (8 + 11 + 4 + 2,)
    blocks = r1_blocks(r1[None], 8)
    for name, block in blocks.items():
        assert float(np.sum(block**2)) == pytest.approx(R1_WEIGHTS[name], abs=1e-5)
    # r2's blocks are r1's unit blocks (all but context) with r2's weights
    rebuilt = np.concatenate([np.sqrt(REGION_BLOCK_WEIGHTS[name]) * blocks[name][0] / np.sqrt(R1_WEIGHTS[name])
                              for name in ("intensity", "shape", "lesion")])
    np.testing.assert_allclose(region_vector(maps, region), rebuilt, atol=1e-6)
