"""The lung decoder tuned on cached frozen features (lungcbir/research/lung_decoder.py)."""

from __future__ import annotations

import numpy as np
import torch

from lungcbir.model import UNet, UNetConfig
from lungcbir.research.lung_decoder import DecoderTuning, TuningEpoch, cached_views, tune_lung_decoder
from lungcbir.train import TrainingSample


def _sample(group: str, seed: int) -> TrainingSample:
    rng = np.random.default_rng(seed)
    pixels = np.full((32, 32), 40.0, np.float32)  # soft tissue around two air-filled lungs
    lungs = np.zeros((32, 32), np.uint8)
    lungs[8:26, 4:14] = lungs[8:26, 18:28] = 1
    pixels[lungs > 0] = -850.0 + rng.normal(0, 20, int(lungs.sum()))
    infection = np.zeros((32, 32), np.uint8)
    infection[18:24, 6:12] = 1
    return TrainingSample(f"s{seed}", group, pixels, "hu", lungs, infection)


def _network() -> UNet:
    torch.manual_seed(0)
    return UNet(UNetConfig(base_channels=4, depth=3, lesion_levels=3)).eval()


def test_the_cached_target_is_the_lung_field_whatever_disease_is_pasted() -> None:
    samples = [_sample("a", 0), _sample("b", 1)]
    views = cached_views(_network(), samples, count=8, seed=3, hu_window=(-1000.0, 400.0),
                         pathology_kinds=("consolidation", "dependent"), pathology_probability=1.0)
    assert views.target.dtype == torch.bool and len(views) == 8
    assert views.shared.dtype == torch.float16 and [s.shape[0] for s in views.skips] == [8, 8, 8]
    # augmented views are turned and scaled, but every target keeps two lungs' worth of lung field
    areas = views.target.sum((1, 2, 3)).float() / samples[0].mask.sum()
    assert ((areas > 0.4) & (areas < 2.0)).all(), areas


def test_only_the_lung_decoder_learns_and_its_loss_falls() -> None:
    network = _network()
    before = {name: value.clone() for name, value in network.state_dict().items()}
    views = cached_views(network, [_sample("a", 0), _sample("b", 1)], count=32, seed=0,
                         hu_window=(-1000.0, 400.0), pathology_kinds=("consolidation",), pathology_probability=1.0)
    epochs: list[TuningEpoch] = []
    tune_lung_decoder(network, views, DecoderTuning(epochs=4, batch_size=8, learning_rate=1e-2),
                      lambda net, epoch: epochs.append(epoch))
    assert [e.epoch for e in epochs] == [1, 2, 3, 4]
    assert epochs[-1].loss < epochs[0].loss
    after = network.state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all(name.startswith(("up_convs", "up_blocks", "head")) for name in changed), changed
    assert not any(name.startswith(("down_blocks", "bottleneck", "lesion_")) for name in changed)
