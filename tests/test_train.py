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
