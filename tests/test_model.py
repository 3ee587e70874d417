import numpy as np
import pytest
import torch

from lungcbir.features import POOLINGS, pool_bottleneck, pooled_vectors
from lungcbir.inference import LungModel
from lungcbir.io import CTSlice
from lungcbir.model import UNet, UNetConfig


def test_unet_shapes_and_bottleneck():
    config = UNetConfig(base_channels=4, depth=3)
    net = UNet(config).eval()
    x = torch.zeros(2, 1, 64, 64)
    logits, bottleneck = net.forward_with_bottleneck(x)
    assert logits.shape == (2, 1, 64, 64)
    assert bottleneck.shape == (2, config.bottleneck_channels, 8, 8)
    assert torch.equal(net.encode(x)[-1], bottleneck)


def test_pooling_gives_unit_vectors_of_fixed_length():
    for method in POOLINGS:
        vectors = pool_bottleneck(torch.rand(3, 16, 5, 7), torch.rand(3, 1, 40, 56), method)
        assert vectors.shape == (3, 32) and vectors.dtype == np.float32
        assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_poolings_are_an_enum_whose_values_are_the_recorded_names():
    import json

    import pytest

    from lungcbir.features import Pooling

    assert POOLINGS == tuple(p.value for p in Pooling)
    assert json.dumps(Pooling.LUNG_MEAN_GLOBAL_MAX) == '"lung-mean+global-max"'
    bottleneck = torch.rand(2, 4, 3, 3)
    for pooling in Pooling:  # the enum and its name give the same vectors
        assert torch.equal(pooled_vectors(bottleneck, None, pooling), pooled_vectors(bottleneck, None, pooling.value))
    with pytest.raises(ValueError, match="unknown pooling 'max'"):
        pooled_vectors(bottleneck, None, "max")


def test_lung_mean_global_max_pooling_reads_the_lungs_for_the_mean_and_everything_for_the_max():
    bottleneck = torch.zeros(1, 2, 4, 4)
    bottleneck[0, 0, :2] = 1.0  # channel 0 is on only where the lungs are
    bottleneck[0, 1, 3, 3] = 5.0  # channel 1 peaks outside the lungs
    lungs = torch.zeros(1, 1, 4, 4)
    lungs[0, 0, :2] = 1.0
    vector = pooled_vectors(bottleneck, lungs, "lung-mean+global-max")[0]
    # lung-weighted mean (1, ~0), then global max (1, 5), normalised
    expected = torch.tensor([1.0, 0.0, 1.0, 5.0]) / 27 ** 0.5
    assert torch.allclose(vector, expected, atol=0.01)
    lung_max = pooled_vectors(bottleneck, lungs, "lung-mean-max")[0]
    assert lung_max[3] < 0.01  # where the max too is lung-weighted, the outside peak is gone


def test_weights_round_trip_and_model_id(tmp_path, tiny_weights, other_tiny_weights):
    model = LungModel.load(tiny_weights)
    again = LungModel.load(tiny_weights)
    assert model.model_id == again.model_id
    assert LungModel.load(other_tiny_weights).model_id != model.model_id
    slices = [CTSlice(np.full((50, 70), -900.0, np.float32), "hu", "x", "tiff"),
              CTSlice(np.zeros((64, 64), np.uint8), "uint8", "y", "png")]
    results = model.segment(slices)
    assert results[0].mask.shape == (50, 70) and results[1].mask.shape == (64, 64)
    assert results[0].vector.shape == (model.dimension,)
    assert 0.0 <= results[0].lung_fraction <= 1.0


def test_bad_weights_file(tmp_path):
    import pytest

    from lungcbir.errors import WeightsError

    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    with pytest.raises(WeightsError, match="not a lungcbir weights file"):
        LungModel.load(bad)
    with pytest.raises(WeightsError, match="does not exist"):
        LungModel.load(tmp_path / "none.pt")


def test_a_narrower_lesion_branch_has_fewer_channels_and_cannot_start_as_a_lung_decoder_copy():
    full = UNet(UNetConfig(base_channels=4, depth=3, lesion_levels=2))
    narrow = UNet(UNetConfig(base_channels=4, depth=3, lesion_levels=2, lesion_width_divisor=2))
    assert [c.out_channels for c in narrow.lesion_up_convs] == [4, 2]
    assert [c.out_channels for c in full.lesion_up_convs] == [8, 4]
    assert narrow(torch.rand(1, 1, 32, 32)).shape == (1, 2, 32, 32)
    with pytest.raises(ValueError, match="copy of the lung decoder"):
        narrow.copy_decoder_into_lesion_branch()
