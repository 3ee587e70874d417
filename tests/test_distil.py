"""lungcbir.distil: a narrower lesion branch started from the teacher's and taught by it."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from lungcbir.distil import DistillationConfig, _step, branch_inputs, distil, narrowed
from lungcbir.model import UNet, UNetConfig
from lungcbir.train import TrainingSample

HU_WINDOW = (-1000.0, 400.0)


def _sample(seed: int, infected: bool) -> TrainingSample:
    rng = np.random.default_rng(seed)
    pixels = rng.normal(-800, 60, (32, 32)).astype(np.float32)
    lesion = np.zeros((32, 32), np.uint8)
    if infected:
        lesion[10:18, 8:16] = 1
        pixels[lesion > 0] = 0.0
    return TrainingSample(f"s{seed}", f"p{seed}", pixels, "hu", np.ones((32, 32), np.uint8), lesion)


@pytest.fixture(scope="module")
def teacher() -> UNet:
    torch.manual_seed(0)
    network = UNet(UNetConfig(base_channels=4, depth=3, lesion_levels=2))
    with torch.no_grad():  # batch-norm statistics that are not the identity, as a trained network's
        for name, value in network.named_buffers():
            if "running_mean" in name:
                value.uniform_(-0.2, 0.2)
            elif "running_var" in name:
                value.uniform_(0.5, 2.0)
    return network.eval()


@pytest.fixture(scope="module")
def inputs(teacher):
    return branch_inputs(teacher, [_sample(i, i % 2 == 0) for i in range(6)], count=20, seed=0, hu_window=HU_WINDOW)


def test_the_cached_inputs_give_the_teachers_lesion_output(teacher, inputs):
    logits = teacher.lesion_logits(inputs.shared.float(), [skip.float() for skip in inputs.skips])
    assert len(inputs) == 20
    assert torch.allclose(logits, inputs.taught.float(), atol=2e-2)  # float16 cache


def test_the_cached_lungs_are_the_teachers_lung_mask(teacher):
    samples = [_sample(i, i % 2 == 0) for i in range(4)]

    def lung_logits(network: UNet, cached) -> torch.Tensor:
        with torch.no_grad():
            return network.lung_logits(cached.shared.float(), [skip.float() for skip in cached.skips])

    mixed = copy.deepcopy(teacher)  # its head moved so that about half of the pixels are lungs
    with torch.no_grad():
        mixed.head.bias -= lung_logits(mixed, branch_inputs(mixed, samples, 8, 0, HU_WINDOW)).median()
    cached = branch_inputs(mixed, samples, 8, 0, HU_WINDOW)
    expected = lung_logits(mixed, cached) > 0
    assert cached.lungs.dtype == torch.bool and 0.2 < float(expected.float().mean()) < 0.8
    assert (expected == cached.lungs).float().mean() > 0.99  # float16 cache: a pixel near 0 may flip


def test_the_share_term_adds_only_a_gap_between_the_lesion_shares(teacher, inputs):
    views = torch.arange(8)

    def losses(network: UNet) -> tuple[float, float]:
        still = torch.optim.SGD([p for m in network.lesion_modules() for p in m.parameters()], lr=0.0)
        return _step(network, inputs, views, still, 0.0), _step(network, inputs, views, still, 1.0)

    plain, with_share = losses(narrowed(teacher, 2, inputs))
    assert with_share > plain + 1e-3  # a student unlike its teacher pays for the gap
    plain, with_share = losses(narrowed(teacher, 1, inputs))
    assert with_share == pytest.approx(plain, abs=1e-3)  # the teacher itself pays nothing


def test_narrowing_by_one_gives_the_teacher_back_exactly(teacher, inputs):
    same = narrowed(teacher, 1, inputs)
    images = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(same(images), teacher(images))


def test_narrowing_by_two_keeps_the_lungs_and_halves_the_branch(teacher, inputs):
    student = narrowed(teacher, 2, inputs)
    assert [c.out_channels for c in student.lesion_up_convs] == [c.out_channels // 2 for c in teacher.lesion_up_convs]
    images = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(student(images)[:, :1], teacher(images)[:, :1])
    branch = sum(p.numel() for m in student.lesion_modules() for p in m.parameters())
    assert branch < 0.5 * sum(p.numel() for m in teacher.lesion_modules() for p in m.parameters())


def test_distillation_moves_only_the_branch_towards_the_teacher_and_keeps_the_best_epoch(teacher, inputs):
    student = narrowed(teacher, 2, inputs)
    frozen = {k: v.clone() for k, v in student.state_dict().items() if not k.startswith("lesion_")}

    def gap(network: UNet) -> float:  # what the validation reports: here the distance to the teacher
        with torch.no_grad():
            mine = network.lesion_logits(inputs.shared.float(), [s.float() for s in inputs.skips])
        return -float((torch.sigmoid(mine) - torch.sigmoid(inputs.taught.float())).abs().mean())

    before = gap(student)
    reports = list(distil(student, inputs, DistillationConfig(epochs=4, batch_size=4, learning_rate=5e-3), gap))
    assert len(reports) == 4 and any(r.best for r in reports)
    assert gap(student) == pytest.approx(max(r.val_lesion_dice for r in reports), abs=1e-6)  # the best epoch kept
    assert gap(student) > before
    assert all(torch.equal(student.state_dict()[k], v) for k, v in frozen.items())


def test_a_teacher_without_a_branch_or_a_divisor_that_does_not_divide_is_refused(teacher, inputs):
    with pytest.raises(ValueError, match="no lesion branch"):
        branch_inputs(UNet(UNetConfig(base_channels=4, depth=3)), [_sample(0, True)], 2, 0, HU_WINDOW)
    with pytest.raises(ValueError, match="must divide"):
        narrowed(teacher, 3, inputs)
