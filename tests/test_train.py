from click.testing import CliRunner

from lungcbir.cli import main
from lungcbir.inference import LungModel


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
