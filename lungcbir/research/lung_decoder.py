"""The lung decoder retrained on cached frozen-encoder features, so that dense disease counts as lung.

Issue 31: the bundled lung output leaves dense consolidation in HU out of the mask. Fine-tuning
its decoder through the whole network on the CPU gave 144 steps in 10-20 minutes, too few to
tell whether a frozen encoder can learn it (MODEL_CARD.md, runs M31-M31c). Here the encoder and
bottleneck stay frozen, as there (they give the retrieval vector and the lesion branch's input),
but what they give for a training view with synthetic disease pasted in is computed once
(:func:`cached_views`), and the lung decoder then trains on those tensors alone
(:func:`tune_lung_decoder`): several times cheaper a step, so ten times the steps fit in an hour.
The target is the lung field, which the pasted disease lies in (lungcbir.augment.add_pathology).

Example:
    >>> import random
    >>> from lungcbir.model import UNet, UNetConfig
    >>> from lungcbir.train import TrainingSample
    >>> network = UNet(UNetConfig(base_channels=4, depth=3, lesion_levels=3)).eval()
    >>> sample = TrainingSample("s", "p", np.full((32, 32), -800.0, np.float32), "hu",
    ...                         np.ones((32, 32), np.uint8), np.zeros((32, 32), np.uint8))
    >>> views = cached_views(network, [sample], count=4, seed=0, hu_window=(-1000.0, 400.0))
    >>> len(views), tuple(views.target.shape)
    (4, (4, 1, 32, 32))
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..augment import PATHOLOGY_KINDS
from ..model import UNet
from ..train import TrainingSample, augment_view, dice_loss


@dataclass
class DecoderViews:
    """Cached training views as the lung decoder sees them (float16 features)."""

    shared: torch.Tensor  # (N, C, h, w): the decoder levels before the lung decoder's own
    skips: list[torch.Tensor]  # the skips of the lung decoder's own levels, coarsest first
    target: torch.Tensor  # (N, 1, S, S) bool: the lung field, pasted disease included

    def __len__(self) -> int:
        return int(self.target.shape[0])


def decoder_modules(network: UNet) -> list[nn.Module]:
    """The levels :meth:`UNet.lung_logits` runs, and the lung head: what learns here."""
    first = network.config.depth - network.config.lesion_levels
    return [*network.up_convs[first:], *network.up_blocks[first:], network.head]


def cached_views(network: UNet, samples: Sequence[TrainingSample], count: int, seed: int,
                 hu_window: tuple[float, float], pathology_kinds: Sequence[str] = PATHOLOGY_KINDS,
                 pathology_probability: float = 0.0, batch_size: int = 16,
                 progress: Callable[[int], None] | None = None) -> DecoderViews:
    """``count`` augmented views with synthetic disease (lungcbir.train.augment_view with
    ``pathology``) of samples drawn at random, passed once through ``network``'s frozen encoder
    and shared decoder levels. Consolidation is cut from another patient's infection mask."""
    network.eval()
    rng = random.Random(seed)
    donors = {id(s.infection): (s.group, s.infection) for s in samples
              if s.infection is not None and s.infection.any()}
    views: DecoderViews | None = None
    for start in range(0, count, batch_size):
        chosen = [samples[rng.randrange(len(samples))] for _ in range(min(batch_size, count - start))]
        drawn = [augment_view(sample, random.Random(rng.randrange(2**31)), hu_window, True,
                              [mask for group, mask in donors.values() if group != sample.group],
                              pathology_kinds, pathology_probability) for sample in chosen]
        images = torch.from_numpy(np.stack([view.image for view in drawn])[:, None])
        with torch.inference_mode():
            shared, skips = network.shared_decode(network.encode(images))
        if views is None:
            views = DecoderViews(_empty(shared, count), [_empty(skip, count) for skip in skips],
                                 torch.empty((count, 1, *images.shape[2:]), dtype=torch.bool))
        end = start + len(chosen)
        views.shared[start:end] = shared
        views.target[start:end] = torch.from_numpy(np.stack([view.labels[0] > 0.5 for view in drawn])[:, None])
        for cache, skip in zip(views.skips, skips):
            cache[start:end] = skip
        if progress is not None:
            progress(end)
    if views is None:
        raise ValueError("no views asked for")
    return views


def _empty(like: torch.Tensor, count: int) -> torch.Tensor:
    return torch.empty((count, *like.shape[1:]), dtype=torch.float16)


@dataclass(frozen=True)
class DecoderTuning:
    """The lung decoder's training recipe."""

    epochs: int = 6
    batch_size: int = 16
    learning_rate: float = 5e-4
    weight_decay: float = 1e-5
    seed: int = 1


@dataclass
class TuningEpoch:
    epoch: int
    loss: float
    seconds: float


def tune_lung_decoder(network: UNet, views: DecoderViews, recipe: DecoderTuning,
                      after_epoch: Callable[[UNet, TuningEpoch], None]) -> None:
    """Train ``network``'s lung decoder (:func:`decoder_modules`) on ``views`` with binary
    cross-entropy plus Dice against the lung field; ``after_epoch`` sees the network in eval
    mode after each epoch (to validate it and keep the checkpoint it chooses)."""
    torch.manual_seed(recipe.seed)
    modules = decoder_modules(network)
    parameters = [p for module in modules for p in module.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=recipe.learning_rate, weight_decay=recipe.weight_decay)
    steps = len(views) // recipe.batch_size
    if steps == 0 or recipe.epochs < 1:
        raise ValueError("tuning needs at least one epoch of one batch")
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, recipe.learning_rate,
                                                    total_steps=recipe.epochs * steps, pct_start=0.1)
    for epoch in range(1, recipe.epochs + 1):
        started, losses = time.perf_counter(), []
        network.eval()  # the frozen parts keep their batch-norm statistics
        for module in modules:
            module.train()
        order = torch.randperm(len(views))
        for step in range(steps):
            chosen = order[step * recipe.batch_size:(step + 1) * recipe.batch_size]
            logits = network.lung_logits(views.shared[chosen].float(), [skip[chosen].float() for skip in views.skips])
            target = views.target[chosen].float()
            loss = dice_loss(logits, target)  # binary cross-entropy plus soft Dice
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))
        network.eval()
        after_epoch(network, TuningEpoch(epoch, float(np.mean(losses)), time.perf_counter() - started))
