"""The optional lesion head: two-channel weights in inference, training it on top of lung-only
weights (fresh head, frozen encoder), its loss, and its evaluation."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from lungcbir.inference import LungModel, ModelSettings, load_network, save_weights
from lungcbir.io import CTSlice
from lungcbir.model import UNet, UNetConfig
from lungcbir.preprocess import PreprocessConfig

TWO = UNetConfig(base_channels=4, depth=3, out_channels=2)


def _two_channel_weights(path, lesion_bias: float, lung_bias: float = 0.0) -> str:
    torch.manual_seed(0)
    network = UNet(TWO)
    with torch.no_grad():  # steer the outputs: lungs where the random net says so, lesions on or off
        network.head.bias[0] += lung_bias
        network.head.bias[1] = lesion_bias
        network.head.weight[1] = 0
    save_weights(path, network, ModelSettings(unet=TWO, preprocess=PreprocessConfig(input_size=64),
                                              postprocess=False))
    return str(path)


def _slices() -> list[CTSlice]:
    rng = np.random.default_rng(0)
    return [CTSlice(rng.random((80, 96)).astype(np.float32), "unit", f"s{k}", "png") for k in range(3)]


def test_one_channel_weights_have_no_lesion_output(tiny_weights):
    model = LungModel.load(tiny_weights)
    assert not model.has_lesion_head
    result = model.segment(_slices())[0]
    assert result.lesion_mask is None and result.lesion_fraction is None


@pytest.mark.parametrize("bias, expected", [(10.0, 1.0), (-10.0, 0.0)])
def test_two_channel_weights_give_lesions_inside_the_lungs(tmp_path, bias, expected):
    model = LungModel.load(_two_channel_weights(tmp_path / "two.pt", bias, lung_bias=3.0))
    assert model.has_lesion_head
    for item, result in zip(_slices(), model.segment(_slices())):
        assert result.lesion_mask.dtype == bool and result.lesion_mask.shape == item.shape
        assert not (result.lesion_mask & ~result.mask).any()
        assert result.mask.any()
        assert result.lesion_fraction == pytest.approx(expected)
        assert result.lesion_fraction == pytest.approx(result.lesion_mask.sum() / result.mask.sum())


def test_lesion_fraction_is_zero_without_lungs(tmp_path):
    model = LungModel.load(_two_channel_weights(tmp_path / "two.pt", 10.0, lung_bias=-30.0))
    result = model.segment(_slices())[0]
    assert not result.mask.any() and result.lesion_fraction == 0.0 and not result.lesion_mask.any()


def test_weighted_lesion_loss_ignores_unknown_pixels():
    from lungcbir.train import dice_loss, weighted_dice_loss

    logits = torch.randn(2, 1, 8, 8, requires_grad=True)
    target = (torch.rand(2, 1, 8, 8) > 0.5).float()
    ones = torch.ones_like(target)
    assert torch.allclose(weighted_dice_loss(logits, target, ones), dice_loss(logits, target))
    weight = ones.clone()
    weight[:, :, :4] = 0
    changed = target.clone()
    changed[:, :, :4] = 1 - changed[:, :, :4]  # labels flipped where they are unknown
    assert torch.allclose(weighted_dice_loss(logits, target, weight), weighted_dice_loss(logits, changed, weight))
    zero = weighted_dice_loss(logits, target, torch.zeros_like(target))
    zero.backward()
    assert float(zero.detach()) == 0.0 and float(logits.grad.abs().sum()) == 0.0


def lesion_samples(seed: int) -> list:
    """Four small training slices of one lung; the first two with a known lesion, the rest unknown."""
    from lungcbir.train import TrainingSample

    rng = np.random.default_rng(seed)
    samples = []
    for k in range(4):
        mask = np.zeros((64, 64), np.uint8)
        mask[16:48, 10:30] = 1
        pixels = np.where(mask, 0.1, 0.6).astype(np.float32) + rng.uniform(0, 0.05, (64, 64)).astype(np.float32)
        infection = np.zeros_like(mask)
        infection[20:30, 12:22] = 1
        samples.append(TrainingSample(f"s{k}", f"p{k % 2}", pixels, "unit", mask, infection if k < 2 else None))
    return samples


def test_lesion_head_added_to_lung_weights_with_a_frozen_encoder(tmp_path, tiny_weights):
    from lungcbir.train import TrainConfig, train

    samples = lesion_samples(seed=0)
    out = str(tmp_path / "lesion.pt")
    config = TrainConfig(epochs=1, batch_size=2, base_channels=4, depth=3, input_size=64, infection_head=True,
                         freeze_encoder=True, contrastive_weight=0.0, pathology=True, steps_per_epoch=2)
    reports = train(samples[:3], samples[3:] + samples[:1], out, config, initial_weights=tiny_weights)
    assert not np.isnan(reports[0].val_lesion_dice)
    trained, settings, _ = load_network(out)
    start, _, _ = load_network(tiny_weights)
    assert settings.unet.out_channels == 2
    before, after = start.state_dict(), trained.state_dict()
    for key in before:
        if key.startswith(("down_blocks", "bottleneck")):  # batch-norm statistics included
            assert torch.allclose(before[key].float(), after[key].float(), atol=1e-3), key
    assert not torch.allclose(before["up_blocks.0.0.weight"].float(), after["up_blocks.0.0.weight"].float())
    # the lung channel of the head is kept; the lesion channel learned from its starting bias
    assert torch.allclose(before["head.weight"].float(), after["head.weight"][:1].float(), atol=1e-3)
    assert torch.allclose(before["head.bias"].float(), after["head.bias"][:1].float(), atol=1e-3)
    assert float(after["head.bias"][1]) != pytest.approx(-2.0)


def test_frozen_encoder_needs_initial_weights_and_no_contrastive_loss(tmp_path, tiny_weights):
    from lungcbir.errors import LungCBIRError
    from lungcbir.train import TrainConfig, TrainingSample, train

    mask = np.ones((64, 64), np.uint8)
    sample = TrainingSample("s", "p", np.zeros((64, 64), np.float32), "unit", mask)
    base = {"epochs": 1, "batch_size": 1, "base_channels": 4, "depth": 3, "input_size": 64, "freeze_encoder": True}
    with pytest.raises(LungCBIRError, match="initial weights"):
        train([sample], [], str(tmp_path / "a.pt"), TrainConfig(**base, contrastive_weight=0.0))
    with pytest.raises(LungCBIRError, match="contrastive"):
        train([sample], [], str(tmp_path / "b.pt"), TrainConfig(**base), initial_weights=tiny_weights)


def test_lesion_evaluation_scores_and_ranks(tmp_path):
    import cv2

    from lungcbir.evaluate import evaluate_lesions

    model = LungModel.load(_two_channel_weights(tmp_path / "two.pt", 10.0, lung_bias=30.0))
    triples = []
    for k, share in enumerate((0.0, 0.25, 0.5)):
        image = np.random.default_rng(k).integers(0, 256, (64, 64), dtype=np.uint8)
        lung = np.ones((64, 64), np.uint8) * 255
        lesion = np.zeros((64, 64), np.uint8)
        lesion[:int(64 * share)] = 255
        for name, array in (("ct", image), ("lung", lung), ("lesion", lesion)):
            cv2.imwrite(str(tmp_path / f"{name}{k}.png"), array)
        triples.append(tuple(str(tmp_path / f"{name}{k}.png") for name in ("ct", "lung", "lesion")))
    summary = evaluate_lesions(model, triples).summary()
    # lesions everywhere in the lungs (all of the image): Dice of each slice = 2 s / (1 + s)
    assert summary["images_with_lesions"] == 2
    assert summary["dice_mean_with_lesions"] == pytest.approx(np.mean([2 * 0.25 / 1.25, 2 * 0.5 / 1.5]), abs=1e-6)
    assert np.isnan(summary["fraction_spearman"])  # the prediction is constant: no ranking


def test_lesion_branch_learns_on_frozen_lung_weights(tmp_path, tiny_weights):
    from lungcbir.train import TrainConfig, train

    samples = lesion_samples(seed=1)
    out = str(tmp_path / "branch.pt")
    config = TrainConfig(epochs=1, batch_size=2, base_channels=4, depth=3, input_size=64, lesion_levels=2,
                         contrastive_weight=0.0, pathology=True, steps_per_epoch=3)
    train(samples[:3], samples[:1], out, config, initial_weights=tiny_weights)
    before, after = LungModel.load(tiny_weights), LungModel.load(out)
    assert after.has_lesion_head and not before.has_lesion_head
    trained, _, _ = load_network(out)
    start, _, _ = load_network(tiny_weights)
    for key, value in start.state_dict().items():  # every lung weight and statistic as it was
        assert torch.equal(value.half(), trained.state_dict()[key].half()), key
    items = _slices()
    for old, new in zip(before.segment(items), after.segment(items)):
        difference = np.abs(old.vector - new.vector).max()
        assert np.array_equal(old.mask, new.mask) and difference < 1e-5, difference
        assert new.lesion_mask is not None and not (new.lesion_mask & ~new.mask).any()


def test_slice_label_loss_looks_at_the_strongest_pixels_inside_the_lungs():
    from lungcbir.train import slice_label_loss

    lungs = torch.zeros(2, 32, 32, dtype=torch.bool)
    lungs[:, 8:24, 8:24] = True
    quiet = torch.full((2, 32, 32), -6.0)
    spot = quiet.clone()
    spot[:, 10:14, 10:14] = 6.0  # a small lesion inside the lungs
    outside = quiet.clone()
    outside[:, :4, :4] = 6.0  # the same outside them: not a lesion of the lungs
    infected, clean = torch.ones(2), torch.zeros(2)
    assert slice_label_loss(spot, lungs, infected) < slice_label_loss(quiet, lungs, infected) / 2
    assert slice_label_loss(outside, lungs, infected) == pytest.approx(float(slice_label_loss(quiet, lungs, infected)))
    assert slice_label_loss(quiet, lungs, clean) < slice_label_loss(spot, lungs, clean) / 2


def test_lesion_branch_learns_from_slice_labels_without_lesion_masks(tmp_path, tiny_weights):
    from lungcbir.train import TrainConfig, slice_labelled_sample, train

    rng = np.random.default_rng(2)
    samples = []
    for k in range(4):
        pixels = rng.uniform(-900, -700, (64, 64)).astype(np.float32)
        pixels[30:36, 20:26] = -200  # "ground glass" on the infected ones only
        item = CTSlice(pixels if k % 2 else np.minimum(pixels, -700), "hu", f"s{k}.dcm", "dicom")
        lungs = np.zeros((64, 64), bool)
        lungs[12:52, 8:56] = True
        samples.append(slice_labelled_sample(item, lungs, bool(k % 2), 64, f"p{k}"))
    assert samples[1].infection is None and samples[0].infection is not None and not samples[0].infection.any()
    config = TrainConfig(epochs=1, batch_size=2, base_channels=4, depth=3, input_size=64, lesion_levels=2,
                         contrastive_weight=0.0, steps_per_epoch=2)
    # the infected slices alone: no lesion mask at all, yet the branch learns
    out = str(tmp_path / "labels.pt")
    train([samples[1], samples[3]], samples[:1], out, config, initial_weights=tiny_weights)
    branch_weights = {k: v for k, v in load_network(out)[0].state_dict().items() if k.startswith("lesion_head")}
    fresh = str(tmp_path / "fresh.pt")
    train([samples[1], samples[3]], samples[:1], fresh, dataclasses.replace(config, slice_label_weight=0.0),
          initial_weights=tiny_weights)
    unchanged = {k: v for k, v in load_network(fresh)[0].state_dict().items() if k.startswith("lesion_head")}
    assert any(not torch.equal(branch_weights[k], unchanged[k]) for k in branch_weights)


def test_include_lesions_joins_consolidation_to_the_mask_and_leaves_the_verdict(tmp_path, monkeypatch):
    """The lung output leaves dense consolidation out, the lesion output sees it; with
    ``include_lesions`` the mask (and the lesion fraction's denominator) includes it, and the
    quality verdict, which judges the lung output, does not change for it."""
    import cv2

    unit = np.zeros((64, 64), np.float32)
    cv2.ellipse(unit, (32, 32), (29, 24), 0, 0, 360, 0.7, -1)
    lungs = np.zeros((64, 64), np.uint8)
    for centre in (19, 45):
        cv2.ellipse(lungs, (centre, 30), (8, 15), 0, 0, 360, 1, -1)
    consolidation = lungs.astype(bool) & (np.arange(64)[:, None] >= 36) & (np.arange(64)[None, :] < 32)
    unit[lungs.astype(bool)] = 0.1
    unit[consolidation] = 0.68
    lung_probability = np.where(lungs.astype(bool) & ~consolidation, 0.95, 0.02).astype(np.float32)
    lesion_probability = np.where(consolidation, 0.9, 0.0).astype(np.float32)
    path = _two_channel_weights(tmp_path / "two.pt", 0.0)
    results = {}
    for joined in (False, True):
        model = LungModel.load(path)
        model.settings.postprocess, model.settings.include_lesions = True, joined
        monkeypatch.setattr(model, "run_all", lambda inputs, model=model: (
            lung_probability[None], np.zeros((1, model.dimension), np.float32), lesion_probability[None]))
        results[joined] = model.segment([CTSlice(unit, "unit", "chest.png", "png")])[0]
    before, after = results[False], results[True]
    assert not (before.mask & consolidation).any()
    assert (after.mask & consolidation).sum() == consolidation.sum()
    assert (after.mask & ~consolidation == before.mask).all()
    assert (after.quality, after.quality_score) == (before.quality, before.quality_score)
    assert before.lesion_fraction == 0.0
    assert after.lesion_fraction == pytest.approx(consolidation.sum() / after.mask.sum())


def test_include_lesions_is_saved_with_the_weights_and_off_by_default(tmp_path):
    assert not ModelSettings().include_lesions
    assert not ModelSettings.from_dict(ModelSettings().to_dict() | {"include_lesions": None}).include_lesions
    network = UNet(TWO)
    save_weights(tmp_path / "on.pt", network, ModelSettings(unet=TWO, include_lesions=True))
    assert load_network(tmp_path / "on.pt")[1].include_lesions


def test_last_lung_levels_learn_alone(tmp_path, tiny_weights):
    """Only the last lung levels and the lung head move: the encoder, the bottleneck (the vector's
    source) and the decoder levels a lesion branch of the other levels reads stay bit-identical."""
    from lungcbir.train import TrainConfig, train

    samples = lesion_samples(seed=2)
    out = str(tmp_path / "lungs.pt")
    config = TrainConfig(epochs=1, batch_size=2, base_channels=4, depth=3, input_size=64, lung_levels=1,
                         contrastive_weight=0.0, pathology=True, pathology_kinds=("consolidation", "dependent"),
                         steps_per_epoch=3, learning_rate=1e-2)
    train(samples, samples[:1], out, config, initial_weights=tiny_weights)
    start, trained = (load_network(path)[0].state_dict() for path in (tiny_weights, out))
    moved = {key for key in start if not torch.equal(start[key].half(), trained[key].half())}
    assert moved and all(key.startswith(("up_convs.2.", "up_blocks.2.", "head.")) for key in moved), moved
    assert any(key.startswith("up_blocks.2.") for key in moved)


def test_last_lung_levels_refuse_a_lesion_output_or_no_start(tmp_path, tiny_weights):
    from lungcbir.errors import LungCBIRError
    from lungcbir.train import TrainConfig, train

    base = {"epochs": 1, "batch_size": 2, "base_channels": 4, "depth": 3, "input_size": 64, "lung_levels": 1,
            "contrastive_weight": 0.0}
    samples = lesion_samples(seed=3)
    with pytest.raises(LungCBIRError, match="initial weights"):
        train(samples, [], str(tmp_path / "a.pt"), TrainConfig(**base))
    with pytest.raises(LungCBIRError, match="no lesion output"):
        train(samples, [], str(tmp_path / "b.pt"), TrainConfig(**base, lesion_levels=1), initial_weights=tiny_weights)


def test_a_cheaper_branch_learns_from_a_teacher_branch(tmp_path, tiny_weights):
    """Distillation: a one-level branch starts as a copy of the last lung level, learns towards the
    teacher's lesion probabilities, and leaves the lungs alone."""
    from lungcbir.train import TrainConfig, train

    samples = lesion_samples(seed=4)
    teacher = str(tmp_path / "teacher.pt")
    base = {"epochs": 1, "batch_size": 2, "base_channels": 4, "depth": 3, "input_size": 64,
            "contrastive_weight": 0.0, "steps_per_epoch": 2}
    train(samples, [], teacher, TrainConfig(**base, lesion_levels=2), initial_weights=tiny_weights)
    student = str(tmp_path / "student.pt")
    untaught = TrainConfig(**base, lesion_levels=1, teacher=teacher, distillation_weight=1.0, learning_rate=0.0)
    train(samples, [], student, untaught, initial_weights=tiny_weights)
    learnt = load_network(student)[0].state_dict()
    # learning rate 0: the weights are the start, the lung decoder's last level (batch-norm statistics move)
    for part, lung_part in (("lesion_up_convs", "up_convs"), ("lesion_up_blocks", "up_blocks")):
        for key in [k for k in learnt if k.startswith(f"{part}.0.") and "running_" not in k and "batches" not in k]:
            assert torch.equal(learnt[key], learnt[key.replace(f"{part}.0.", f"{lung_part}.2.")]), key
    for key, value in load_network(tiny_weights)[0].state_dict().items():
        assert torch.equal(value.half(), learnt[key].half()), key
    losses = []
    for weight in (0.0, 1.0):  # the same views with and without the teacher's term
        config = TrainConfig(**base, lesion_levels=1, teacher=teacher, distillation_weight=weight, seed=5)
        losses.append(train(samples, [], str(tmp_path / f"s{weight}.pt"), config,
                            initial_weights=tiny_weights)[0].loss)
    assert losses[1] > losses[0]


def test_a_teacher_must_share_the_lung_network_and_have_a_branch(tmp_path, tiny_weights, other_tiny_weights):
    from lungcbir.errors import LungCBIRError
    from lungcbir.train import TrainConfig, train

    samples = lesion_samples(seed=6)
    base = {"epochs": 1, "batch_size": 2, "base_channels": 4, "depth": 3, "input_size": 64,
            "contrastive_weight": 0.0, "steps_per_epoch": 1, "lesion_levels": 1, "distillation_weight": 1.0}
    with pytest.raises(LungCBIRError, match="lesion branch of at least"):
        train(samples, [], str(tmp_path / "a.pt"), TrainConfig(**base, teacher=other_tiny_weights),
              initial_weights=tiny_weights)
    other_teacher = str(tmp_path / "other.pt")
    train(samples, [], other_teacher, TrainConfig(**{**base, "distillation_weight": 0.0}),
          initial_weights=other_tiny_weights)
    with pytest.raises(LungCBIRError, match="lung network differs"):
        train(samples, [], str(tmp_path / "b.pt"), TrainConfig(**base, teacher=other_teacher),
              initial_weights=tiny_weights)


def test_graft_joins_a_branch_and_last_lung_levels_trained_apart(tmp_path, tiny_weights, other_tiny_weights):
    from lungcbir.errors import LungCBIRError
    from lungcbir.train import TrainConfig, graft_lung_levels, train

    samples = lesion_samples(seed=7)
    base = {"epochs": 1, "batch_size": 2, "base_channels": 4, "depth": 3, "input_size": 64,
            "contrastive_weight": 0.0, "steps_per_epoch": 2, "learning_rate": 1e-2}
    branch, lungs, out = (str(tmp_path / name) for name in ("branch.pt", "lungs.pt", "out.pt"))
    train(samples, [], branch, TrainConfig(**base, lesion_levels=2), initial_weights=tiny_weights)
    train(samples, [], lungs, TrainConfig(**base, lung_levels=2), initial_weights=tiny_weights)
    graft_lung_levels(branch, lungs, out)
    grafted, from_branch, from_lungs = (load_network(path)[0].state_dict() for path in (out, branch, lungs))
    for key, value in grafted.items():
        source = from_lungs if key.startswith(("up_convs.1.", "up_blocks.1.", "up_convs.2.", "up_blocks.2.",
                                               "head.")) else from_branch
        assert torch.equal(value, source[key]), key
    assert not torch.equal(from_lungs["head.weight"], from_branch["head.weight"])  # the lungs did learn
    other = str(tmp_path / "other.pt")
    train(samples, [], other, TrainConfig(**base, lung_levels=2), initial_weights=other_tiny_weights)
    with pytest.raises(LungCBIRError, match="did not learn on the same lungs"):
        graft_lung_levels(branch, other, str(tmp_path / "bad.pt"))
    with pytest.raises(LungCBIRError, match="lung-only"):
        graft_lung_levels(lungs, branch, str(tmp_path / "bad.pt"))


def test_lesion_pixels_can_weigh_more_in_the_lung_loss(tmp_path, tiny_weights):
    """A lesion-inclusive lung output: the lung logits over lesion pixels get a cross-entropy of
    their own on top of the lung loss."""
    from lungcbir.train import TrainConfig, train

    samples = lesion_samples(seed=8)
    losses = []
    for weight in (0.0, 1.0):
        config = TrainConfig(epochs=1, batch_size=2, base_channels=4, depth=3, input_size=64, lung_levels=2,
                             contrastive_weight=0.0, steps_per_epoch=2, augment=False, lesion_lung_weight=weight)
        losses.append(train(samples[:2], [], str(tmp_path / f"w{weight}.pt"), config,
                            initial_weights=tiny_weights)[0].loss)
    assert losses[1] > losses[0]
