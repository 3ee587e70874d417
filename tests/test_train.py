import pytest
from click.testing import CliRunner

from lungcbir.cli import main
from lungcbir.inference import LungModel


@pytest.mark.slow
def test_train_writes_loadable_weights_and_resumes(tmp_path, phantom_dir):
    out = tmp_path / "w.pt"
    args = ["train", "--images", str(phantom_dir / "png"), "--masks", str(phantom_dir / "masks"),
            "--out", str(out), "--epochs", "1", "--batch-size", "4", "--val-fraction", "0.3", "--quiet"]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "epoch 1/1" in result.output and "validation slices" in result.output
    model = LungModel.load(out)
    assert model.settings.training["epochs"] == 1
    result = CliRunner().invoke(main, [*args[:-3], "--epochs", "2", "--resume", "--quiet"], catch_exceptions=False)
    assert "epoch 2/2" in result.output and "epoch 1/2" not in result.output


def test_augment_moves_image_and_both_label_channels_together():
    import random

    import numpy as np

    from lungcbir.train import TrainingSample, augment

    pixels = np.full((64, 64), -1000.0, np.float32)
    pixels[16:48, 8:30] = 40.0
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 8:30] = 1
    sample = TrainingSample("s", "g", pixels, "hu", mask, infection=mask.copy())
    rng = random.Random(3)
    for _ in range(20):
        image, labels = augment(sample, rng, (-1000.0, 400.0))
        assert image.shape == (64, 64) and labels.shape == (2, 64, 64)
        assert 0.0 <= image.min() and image.max() <= 1.0
        assert np.array_equal(labels[0], labels[1])  # lesions follow the lungs exactly
    unlabelled = TrainingSample("s", "g", pixels, "hu", mask)
    assert augment(unlabelled, rng, (-1000.0, 400.0))[1][1].sum() == 0


def test_contrastive_loss_prefers_matching_pairs():
    import torch
    import torch.nn.functional as F

    from lungcbir.train import contrastive_loss

    first = F.normalize(torch.randn(8, 16, generator=torch.Generator().manual_seed(0)), dim=1)
    matched = contrastive_loss(first, first.clone(), 0.1)
    shuffled = contrastive_loss(first, first[torch.arange(7, -1, -1)], 0.1)
    assert matched < 0.1 < shuffled


def test_neighbours_are_nearby_slices_of_the_same_series():
    import numpy as np

    from lungcbir.train import TrainingSample, neighbour_lists

    blank = np.zeros((8, 8), np.float32), "uint8", np.zeros((8, 8), np.uint8)
    samples = [TrainingSample(f"a{k}", "p", *blank, series="a", position=k) for k in range(5)]
    samples += [TrainingSample("b0", "q", *blank, series="b", position=1), TrainingSample("lone", "r", *blank)]
    neighbours = neighbour_lists(samples, reach=1)
    assert neighbours[0] == [1] and neighbours[2] == [1, 3]
    assert neighbours[5] == [] and neighbours[6] == []


def _noisy_slices(seed: int, series: str | None = None) -> list:
    """Eight 32 x 32 HU slices of one patient with a lung-like block each, numbered along ``series``."""
    import numpy as np

    from lungcbir.train import TrainingSample

    rng = np.random.default_rng(seed)
    samples = []
    for k in range(8):
        pixels = rng.uniform(-1000, -900, (32, 32)).astype(np.float32)
        mask = np.zeros((32, 32), np.uint8)
        mask[8:24, 4 + k % 3:14] = 1
        pixels[mask > 0] = -850
        samples.append(TrainingSample(f"s{k}", "p", pixels, "hu", mask, series=series,
                                      position=k if series else None))
    return samples


def test_training_with_the_contrastive_objective_runs_and_resumes(tmp_path):
    import numpy as np

    from lungcbir.train import TrainConfig, train

    samples = _noisy_slices(seed=0, series="v")
    config = TrainConfig(epochs=1, batch_size=4, base_channels=4, depth=2, input_size=32, contrastive_weight=0.5)
    out = str(tmp_path / "c.pt")
    reports = train(samples[:6], samples[6:], out, config)
    assert len(reports) == 1 and np.isfinite(reports[0].loss)
    longer = TrainConfig(**{**config.__dict__, "epochs": 2})
    assert [r.epoch for r in train(samples[:6], samples[6:], out, longer, resume=True)] == [2]
    assert LungModel.load(out).settings.training["contrastive_weight"] == 0.5


@pytest.mark.slow
def test_workers_give_the_same_training_as_one_process(tmp_path):
    import torch

    from lungcbir.train import TrainConfig, train

    samples = _noisy_slices(seed=1)
    config = TrainConfig(epochs=1, batch_size=4, base_channels=4, depth=2, input_size=32)
    states = []
    for workers in (0, 2):
        out = str(tmp_path / f"w{workers}.pt")
        losses = [r.loss for r in train(samples, [], out, config, workers=workers)]
        states.append((losses, torch.load(out, weights_only=True)["state_dict"]))
    assert states[0][0] == states[1][0]
    assert all(torch.equal(states[0][1][k], states[1][1][k]) for k in states[0][1])


def test_training_can_start_from_trained_weights(tmp_path):
    import numpy as np
    import pytest

    from lungcbir.errors import LungCBIRError
    from lungcbir.train import TrainConfig, TrainingSample, train

    pixels = np.full((32, 32), -1000.0, np.float32)
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 6:14] = 1
    pixels[mask > 0] = -850
    samples = [TrainingSample(f"s{k}", f"p{k}", pixels, "hu", mask) for k in range(4)]
    config = TrainConfig(epochs=1, batch_size=2, base_channels=4, depth=2, input_size=32, contrastive_weight=0)
    first = str(tmp_path / "first.pt")
    train(samples, [], first, config)
    tuned = str(tmp_path / "tuned.pt")
    train(samples, [], tuned, TrainConfig(**{**config.__dict__, "learning_rate": 0.0}), initial_weights=first)
    import torch

    before, after = (torch.load(path, weights_only=True)["state_dict"] for path in (first, tuned))
    assert all(torch.equal(before[k], after[k]) for k in before if k.endswith("weight"))  # lr 0: unchanged
    assert LungModel.load(tuned).settings.training["initial_weights"] == first
    with pytest.raises(LungCBIRError, match="does not match"):
        train(samples, [], str(tmp_path / "x.pt"), TrainConfig(**{**config.__dict__, "base_channels": 6}),
              initial_weights=first)


def test_training_samples_take_group_series_and_position_from_the_file_names(phantom_dir):
    # the CLI's `train` assembles its samples through this core function
    from pathlib import Path

    from lungcbir.train import pair_folders, training_samples

    folders = [(str(phantom_dir / "png"), str(phantom_dir / "masks"))]
    samples = training_samples(folders, 64, r"^(.+?)_[kzs]_?(\d+)")
    pairs = pair_folders(*folders[0])
    assert len(samples) == len(pairs) > 2
    for sample, (image, _) in zip(samples, pairs):
        group, number = Path(image).stem.rsplit("_s", 1)
        assert (sample.group, sample.series, sample.position) == (group, group, int(number))
        assert sample.pixels.shape == sample.mask.shape == (64, 64) and sample.mask.any()
    no_position = training_samples(folders, 64, r"^(.+?)_")  # one group: no slice number
    assert {s.position for s in no_position} == {None} and {s.group for s in no_position} == {"phantom01", "phantom02"}


def test_training_leaves_the_callers_random_generators_alone(tmp_path):
    import random

    import numpy as np
    import torch

    from lungcbir.train import TrainConfig, train

    samples = _noisy_slices(seed=2)[:4]
    config = TrainConfig(epochs=1, batch_size=2, base_channels=4, depth=2, input_size=32, contrastive_weight=0)
    random.seed(11)
    np.random.seed(11)
    torch.manual_seed(11)
    expected = (random.random(), np.random.random(), torch.rand(1).item())
    random.seed(11)
    np.random.seed(11)
    torch.manual_seed(11)
    first = [r.loss for r in train(samples, [], str(tmp_path / "a.pt"), config)]
    assert (random.random(), np.random.random(), torch.rand(1).item()) == expected
    assert [r.loss for r in train(samples, [], str(tmp_path / "b.pt"), config)] == first  # still reproducible
