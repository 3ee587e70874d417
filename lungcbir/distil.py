"""A narrower lesion branch taught by a wider one, trained on cached frozen-network features.

The lesion branch is the only part that learns: the encoder, the bottleneck and the decoder
levels the branch reads are frozen, so what they give for a training view is computed once
(:func:`branch_inputs`) and the student branch then trains on those cached tensors alone
(:func:`distil`), several times cheaper a step than a full forward pass on two CPU cores. The
student starts as the teacher's branch with each level's weakest channels dropped
(:func:`narrowed`): a fresh narrow branch found no lesion at all after two epochs, the narrowed
one learns from its first. The targets are the teacher's: its lesion probability at every pixel
of every view and, weighted by ``DistillationConfig.share_weight``, its lesion share of the lungs
per view. Adding the lesion masks and slice labels the teacher learnt from (lungcbir.train)
pulled the student below the teacher on val, as later epochs pulled the teacher itself.

Example:
    >>> import random
    >>> from lungcbir.model import UNet, UNetConfig
    >>> from lungcbir.train import TrainingSample
    >>> teacher = UNet(UNetConfig(base_channels=4, depth=3, lesion_levels=2)).eval()
    >>> sample = TrainingSample("s", "p", np.full((32, 32), -800.0, np.float32), "hu",
    ...                         np.ones((32, 32), np.uint8), np.zeros((32, 32), np.uint8))
    >>> inputs = branch_inputs(teacher, [sample], count=4, seed=0, hu_window=(-1000.0, 400.0))
    >>> student = narrowed(teacher, 2, inputs)
    >>> student.config.lesion_width_divisor, len(inputs)
    (2, 4)
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lungcbir.model import DoubleConv, UNet
from lungcbir.train import TrainingSample, augment_view


@dataclass
class BranchInputs:
    """Cached training views as the lesion branch sees them, float16 to halve the memory
    (about 2.2 MB a view for the bundled network)."""

    shared: torch.Tensor  # (N, C, h, w): the shared decoder levels' output
    skips: list[torch.Tensor]  # the skips of the branch's levels, coarsest first
    taught: torch.Tensor  # (N, 1, S, S): the teacher's lesion logits
    lungs: torch.Tensor  # (N, 1, S, S) bool: the teacher's lung mask, which a lesion share is of

    def __len__(self) -> int:
        return int(self.taught.shape[0])


@dataclass(frozen=True)
class DistillationConfig:
    """The student's training recipe."""

    epochs: int = 4
    batch_size: int = 16
    learning_rate: float = 1e-3
    weight_decay: float = 1e-5
    seed: int = 1
    # weight of |sqrt(student's lesion share of the lungs) - sqrt(the teacher's)| per view, beside
    # the per-pixel term: the burden ranks slices of different scans, where the pixels' small
    # errors add up to a shift of the whole slice's share
    share_weight: float = 0.0


@dataclass
class DistillationEpoch:
    epoch: int
    loss: float
    val_lesion_dice: float
    seconds: float
    best: bool


def branch_inputs(teacher: UNet, samples: Sequence[TrainingSample], count: int, seed: int,
                  hu_window: tuple[float, float], batch_size: int = 16,
                  progress: Callable[[int], None] | None = None) -> BranchInputs:
    """``count`` augmented views (lungcbir.train.augment_view) of samples drawn at random, passed
    once through ``teacher``'s frozen network; the tensors are allocated once, so memory peaks at
    the cache's own size."""
    if not teacher.config.lesion_branch:
        raise ValueError("the teacher has no lesion branch")
    teacher.eval()
    rng = random.Random(seed)
    inputs: BranchInputs | None = None
    for start in range(0, count, batch_size):
        chosen = [samples[rng.randrange(len(samples))] for _ in range(min(batch_size, count - start))]
        views = [augment_view(sample, random.Random(rng.randrange(2**31)), hu_window) for sample in chosen]
        images = torch.from_numpy(np.stack([view.image for view in views])[:, None])
        with torch.inference_mode():
            shared, skips = teacher.shared_decode(teacher.encode(images))
            taught, lungs = teacher.lesion_logits(shared, skips), teacher.lung_logits(shared, skips) > 0
        if inputs is None:
            inputs = BranchInputs(_empty(shared, count), [_empty(skip, count) for skip in skips],
                                  _empty(taught, count), _empty(lungs, count, torch.bool))
        end = start + len(chosen)
        inputs.shared[start:end], inputs.taught[start:end], inputs.lungs[start:end] = shared, taught, lungs
        for cache, skip in zip(inputs.skips, skips):
            cache[start:end] = skip
        if progress is not None:
            progress(end)
    if inputs is None:
        raise ValueError("no views asked for")
    return inputs


def _empty(like: torch.Tensor, count: int, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    return torch.empty((count, *like.shape[1:]), dtype=dtype)


def narrowed(teacher: UNet, divisor: int, inputs: BranchInputs, count: int = 256) -> UNet:
    """A copy of ``teacher`` whose lesion branch keeps ``1/divisor`` of each level's channels:
    at each level the up-convolution's, the first and the second convolution's outputs with the
    largest mean square activation over ``count`` cached views. Everything else is the teacher's.
    ``divisor`` 1 gives the teacher back exactly (a test)."""
    if teacher.config.lesion_width_divisor != 1:
        raise ValueError("the teacher's branch must be a full-width copy of the lung decoder")
    student = UNet(dataclasses.replace(teacher.config, lesion_width_divisor=divisor)).eval()
    student.load_state_dict({k: v for k, v in teacher.state_dict().items() if not k.startswith("lesion_")},
                            strict=False)
    teacher.eval()
    views = torch.arange(min(count, len(inputs)))
    teacher_levels, student_levels = _branch_levels(teacher), _branch_levels(student)
    energies = []
    with torch.inference_mode():
        features = inputs.shared[views].float()
        for level, skip in zip(teacher_levels, inputs.skips):
            upsampled, middle, features = level.run(features, skip[views].float())
            energies.append([tensor.pow(2).mean((0, 2, 3)) for tensor in (upsampled, middle, features)])
    previous = None  # the channels kept at the level before (None: all of the shared output)
    with torch.no_grad():
        for old, new, energy in zip(teacher_levels, student_levels, energies):
            width = old.up_conv.out_channels
            up_kept, middle_kept, out_kept = (e.topk(width // divisor).indices.sort().values for e in energy)
            weight = old.up_conv.weight if previous is None else old.up_conv.weight[previous]
            new.up_conv.weight.copy_(weight[:, up_kept])
            _copy(new.up_conv.bias, old.up_conv.bias, up_kept)
            skip_width = old.first.in_channels - width
            read = torch.cat([up_kept, torch.arange(width, width + skip_width)])  # kept upsampled, every skip
            new.first.weight.copy_(old.first.weight[middle_kept][:, read])
            new.second.weight.copy_(old.second.weight[out_kept][:, middle_kept])
            for new_norm, old_norm, kept in ((new.first_norm, old.first_norm, middle_kept),
                                             (new.second_norm, old.second_norm, out_kept)):
                for name in ("weight", "bias", "running_mean", "running_var"):
                    _copy(getattr(new_norm, name), getattr(old_norm, name), kept)
            previous = out_kept
        student.lesion_head.weight.copy_(teacher.lesion_head.weight[:, previous])
        _copy(student.lesion_head.bias, teacher.lesion_head.bias, torch.arange(1))
    return student


@dataclass
class _Level:
    """One level of a lesion branch, its parts typed (a DoubleConv is an nn.Sequential)."""

    up_conv: nn.ConvTranspose2d
    first: nn.Conv2d
    first_norm: nn.BatchNorm2d
    second: nn.Conv2d
    second_norm: nn.BatchNorm2d

    def run(self, features: torch.Tensor, skip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The upsampled features, the first and the second convolution's activations."""
        upsampled = self.up_conv(features)
        middle = F.relu(self.first_norm(self.first(torch.cat([upsampled, skip], 1))))
        return upsampled, middle, F.relu(self.second_norm(self.second(middle)))


def _branch_levels(network: UNet) -> list[_Level]:
    levels = []
    for up_conv, module in zip(network.lesion_up_convs, network.lesion_up_blocks):
        block = cast(DoubleConv, module)
        levels.append(_Level(cast(nn.ConvTranspose2d, up_conv), cast(nn.Conv2d, block[0]),
                             cast(nn.BatchNorm2d, block[1]), cast(nn.Conv2d, block[3]),
                             cast(nn.BatchNorm2d, block[4])))
    return levels


def _copy(target: torch.Tensor | None, source: torch.Tensor | None, kept: torch.Tensor) -> None:
    if target is None or source is None:
        raise ValueError("a lesion branch's convolutions and norms have these parameters")
    target.copy_(source[kept])


def distil(student: UNet, inputs: BranchInputs, config: DistillationConfig,
           validate: Callable[[UNet], float]) -> Iterator[DistillationEpoch]:
    """Train ``student``'s lesion branch on ``inputs``; after each epoch ``validate`` gives the
    val lesion Dice, and the branch is left at its best epoch's weights when the loop ends."""
    torch.manual_seed(config.seed)
    modules = student.lesion_modules()
    parameters = [p for module in modules for p in module.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
    steps = len(inputs) // config.batch_size
    if steps == 0 or config.epochs < 1:
        raise ValueError("distillation needs at least one epoch of one batch")
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.learning_rate,
                                                    total_steps=config.epochs * steps, pct_start=0.1)
    best, best_state = -1.0, None
    for epoch in range(1, config.epochs + 1):
        started, losses = time.perf_counter(), []
        for module in modules:
            module.train()
        order = torch.randperm(len(inputs))
        for step in range(steps):
            views = order[step * config.batch_size:(step + 1) * config.batch_size]
            losses.append(_step(student, inputs, views, optimizer, config.share_weight))
            scheduler.step()
        student.eval()
        dice = validate(student)
        improved = dice > best
        if improved:
            best = dice
            best_state = {name: value.clone() for name, value in student.state_dict().items()
                          if name.startswith("lesion_")}
        yield DistillationEpoch(epoch, float(np.mean(losses)), dice, time.perf_counter() - started, improved)
    if best_state is not None:
        student.load_state_dict(best_state, strict=False)


def _step(student: UNet, inputs: BranchInputs, views: torch.Tensor, optimizer: torch.optim.Optimizer,
          share_weight: float) -> float:
    logits = student.lesion_logits(inputs.shared[views].float(), [skip[views].float() for skip in inputs.skips])
    taught = torch.sigmoid(inputs.taught[views].float())
    loss = F.binary_cross_entropy_with_logits(logits, taught)
    if share_weight:
        lungs = inputs.lungs[views].float()
        area = lungs.sum((1, 2, 3)).clamp(min=1.0)
        mine = ((torch.sigmoid(logits) * lungs).sum((1, 2, 3)) / area).clamp(min=1e-6).sqrt()
        theirs = ((taught * lungs).sum((1, 2, 3)) / area).clamp(min=1e-6).sqrt()
        loss = loss + share_weight * (mine - theirs).abs().mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())
