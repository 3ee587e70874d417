"""Segmentation scores against ground-truth masks (lungcbir/evaluate.py and `lungcbir evaluate`)."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from lungcbir.cli import main
from lungcbir.evaluate import evaluate_segmentation
from lungcbir.inference import Segmentation


class FixedModel:
    """Stands in for LungModel: predicts the same mask for every slice."""

    def __init__(self, mask: np.ndarray) -> None:
        self.mask = mask

    def segment(self, slices, batch_size=16):
        return [Segmentation(self.mask.copy(), float(self.mask.mean()), np.zeros(4, np.float32)) for _ in slices]


@pytest.fixture
def slice_without_lungs(tmp_path):
    image = tmp_path / "ct.png"
    cv2.imwrite(str(image), np.tile(np.arange(64, dtype=np.uint8) * 3, (64, 1)))
    mask = tmp_path / "ct_mask.png"
    cv2.imwrite(str(mask), np.zeros((64, 64), np.uint8))  # a slice below the lungs: nothing to find
    return str(image), str(mask)


def test_empty_truth_and_empty_prediction_score_one(slice_without_lungs):
    evaluation = evaluate_segmentation(FixedModel(np.zeros((64, 64), bool)), [slice_without_lungs])
    assert [(s.dice, s.iou) for s in evaluation.scores] == [(1.0, 1.0)]


def test_empty_truth_and_lungs_predicted_score_zero(slice_without_lungs):
    predicted = np.zeros((64, 64), bool)
    predicted[10:20, 10:20] = True
    evaluation = evaluate_segmentation(FixedModel(predicted), [slice_without_lungs])
    assert [(s.dice, s.iou) for s in evaluation.scores] == [(0.0, 0.0)]


def test_evaluate_command_goes_on_past_a_mask_without_lungs(tmp_path, tiny_weights):
    runner = CliRunner()
    made = runner.invoke(main, ["make-phantom", str(tmp_path / "ph"), "--slices", "3", "--patients", "1"])
    assert made.exit_code == 0
    masks = sorted((tmp_path / "ph" / "masks").rglob("*.png"))
    cv2.imwrite(str(masks[0]), np.zeros(cv2.imread(str(masks[0]), cv2.IMREAD_UNCHANGED).shape, np.uint8))
    result = runner.invoke(main, ["evaluate", "--images", str(tmp_path / "ph" / "png"), "--masks",
                                  str(tmp_path / "ph" / "masks"), "--json", "--weights", tiny_weights])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["given folders"]["summary"]["images"] == 3


def test_evaluation_groups_name_the_given_folders_and_each_held_out_dataset(phantom_dir, monkeypatch):
    # the CLI's `evaluate` assembles its groups through this core function
    import lungcbir.evaluate as evaluate
    from lungcbir.train import pair_folders

    folders = [(str(phantom_dir / "png"), str(phantom_dir / "masks"))]
    assert evaluate.evaluation_groups(folders) == {"given folders": pair_folders(*folders[0])}
    assert evaluate.evaluation_groups([]) == {}

    class Held:
        def __init__(self, name):
            self.image, self.mask = f"{name}.png", f"{name}_mask.png"

    monkeypatch.setattr(evaluate, "kaggle_slices", lambda: {"test": [Held("k1"), Held("k2")], "train": [Held("x")]})
    monkeypatch.setattr(evaluate, "covid_slices", lambda: {"test": [Held("c1")]})
    groups = evaluate.evaluation_groups([], held_out=True)
    assert groups == {"kaggle-lungs-2d test": [("k1.png", "k1_mask.png"), ("k2.png", "k2_mask.png")],
                      "covid19-ct-lungmask test": [("c1.png", "c1_mask.png")]}


def test_lesion_fractions_of_lesion_free_slices(tmp_path, findings_weights, tiny_weights):
    from lungcbir.evaluate import lesion_fractions
    from lungcbir.inference import LungModel

    paths = []
    for number in range(3):
        path = tmp_path / f"slice{number}.png"
        cv2.imwrite(str(path), np.random.default_rng(number).integers(0, 255, (48, 48), dtype=np.uint8))
        paths.append(str(path))
    fractions = lesion_fractions(LungModel.load(findings_weights), paths, batch_size=2)
    assert fractions.shape == (3,) and ((fractions >= 0) & (fractions <= 1)).all()
    with pytest.raises(ValueError):
        lesion_fractions(LungModel.load(tiny_weights), paths)
