"""Teach a narrower lesion branch from the bundled one (issue 28 item 2; lungcbir/distil.py).

Usage: PYTHONPATH=. python benchmarks/distil_lesion_branch.py OUT.pt [--divisor 2] [--views 3000]
           [--epochs 4] [--learning-rate 1e-3] [--share-weight 0] [--seed 1] [--threads 2]
           [--cache FILE.npz]
       PYTHONPATH=. python benchmarks/distil_lesion_branch.py --val-only bundled X.pt ... [--cache FILE.npz]

The training views are drawn from the bundled branch's own training slices (run W2,
MODEL_CARD.md): the train split's Kaggle slices twice, its COVID-19 slices, and the retrieval
choice split's covid-ct-md series three times. ``--views`` augmented views of them go once
through the frozen network and are kept in memory (about 2.2 MB each); the student branch then
learns the teacher's lesion probabilities on them (and, with ``--share-weight``, the teacher's
lesion share of the lungs per view), and nothing else. The checkpoint is the epoch with the
best val lesion Dice (lungcbir.train's validation, pooled over the COVID-19 val slices), as for
W2; the teacher's and the student's val burden rho (Spearman, predicted against true lesion
share of the lungs, COVID-19 val slices) are printed beside it. The lung network, and so the
lung masks and the anatomy part of the vector, are unchanged. After training the centre and
findings part are saved as ``train_bundled_model.py --centre-only`` does. The test split is
never read here.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

import numpy as np
import torch

from benchmarks.train_bundled_model import finish, load_cache, load_split, save_cache, slice_labelled_samples
from lungcbir.distil import DistillationConfig, branch_inputs, distil, narrowed
from lungcbir.features import FindingsConfig
from lungcbir.inference import load_network, save_weights
from lungcbir.metrics import spearman
from lungcbir.model import UNet
from lungcbir.preprocess import normalize_intensity
from lungcbir.train import TrainConfig, TrainingSample, validate


def lesion_dice(network: UNet, samples: list[TrainingSample], hu_window: tuple[float, float]) -> float:
    """The pooled lesion Dice of lungcbir.train's validation."""
    dice = validate(network, samples, hu_window, "cpu")[1]
    network.eval()  # validate leaves a network in training mode
    return dice


def burden_rho(network: UNet, samples: list[TrainingSample], hu_window: tuple[float, float]) -> float:
    """Spearman rho of the predicted against the true lesion share of the lungs, over the
    samples with a lesion mask (at the model input's size)."""
    labelled = [sample for sample in samples if sample.infection is not None]
    predicted, true = [], []
    with torch.inference_mode():
        for start in range(0, len(labelled), 16):
            chunk = labelled[start:start + 16]
            batch = np.stack([normalize_intensity(s.pixels, s.intensity, hu_window) for s in chunk])
            logits = network(torch.from_numpy(batch[:, None])).numpy()
            lungs = logits[:, 0] > 0
            lesions = (logits[:, 1] > 0) & lungs
            predicted += [lesion.sum() / max(lung.sum(), 1) for lesion, lung in zip(lesions, lungs)]
            true += [(s.infection > 0).sum() / max(s.mask.sum(), 1) for s in chunk]
    return spearman(np.array(true, float), np.array(predicted, float))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", nargs="?", help="the student's weights file (not with --val-only)")
    parser.add_argument("--divisor", type=int, default=2, help="the student's channels: 1/DIVISOR of the teacher's")
    parser.add_argument("--views", type=int, default=3000, help="augmented training views cached")
    parser.add_argument("--epochs", type=int, default=DistillationConfig.epochs)
    parser.add_argument("--learning-rate", type=float, default=DistillationConfig.learning_rate)
    parser.add_argument("--share-weight", type=float, default=DistillationConfig.share_weight,
                        help="weight of the per-view lesion share term")
    parser.add_argument("--seed", type=int, default=DistillationConfig.seed)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--cache", help="read the resized slices from this .npz (written if missing)")
    parser.add_argument("--val-only", nargs="+", metavar="WEIGHTS",
                        help="print these models' val lesion Dice and burden rho ('bundled' for W2) and stop")
    args = parser.parse_args()
    if not args.out and not args.val_only:
        parser.error("the student's weights file OUT is needed")
    torch.set_num_threads(args.threads)
    teacher, settings, _ = load_network(None)
    config = TrainConfig(lesion_levels=teacher.config.lesion_levels)
    split = load_cache(args.cache) if args.cache and os.path.exists(args.cache) else load_split(config)
    if args.cache and not os.path.exists(args.cache):
        save_cache(args.cache, split)
    samples = split["kaggle"]["train"] * 2 + split["covid19"]["train"] + slice_labelled_samples(config, "bundled") * 3
    val = split["kaggle"]["val"] + split["covid19"]["val"]
    hu_window = settings.preprocess.hu_window
    if args.val_only:
        for weights in args.val_only:
            network = load_network(None if weights == "bundled" else weights)[0].eval()
            print(f"{weights}: val lesion Dice {lesion_dice(network, val, hu_window):.3f}, "
                  f"val burden rho {burden_rho(network, val, hu_window):.3f}", flush=True)
        return
    started = time.perf_counter()
    inputs = branch_inputs(teacher, samples, args.views, args.seed, hu_window,
                           progress=lambda done: done % 480 == 0 and print(f"views {done}", flush=True))
    print(f"{len(inputs)} views of {len(samples)} samples cached in {time.perf_counter() - started:.0f} s",
          flush=True)

    def val_lesion_dice(network: UNet) -> float:
        return lesion_dice(network, val, hu_window)

    print(f"teacher: val lesion Dice {val_lesion_dice(teacher):.3f}, "
          f"val burden rho {burden_rho(teacher, val, hu_window):.3f}", flush=True)
    student = narrowed(teacher, args.divisor, inputs)
    print(f"narrowed start: val lesion Dice {val_lesion_dice(student):.3f}", flush=True)
    recipe = DistillationConfig(epochs=args.epochs, learning_rate=args.learning_rate, seed=args.seed,
                                share_weight=args.share_weight)
    for report in distil(student, inputs, recipe, val_lesion_dice):
        print(report, flush=True)
    student.eval()
    dice, rho = val_lesion_dice(student), burden_rho(student, val, hu_window)
    training = dict(settings.training, distillation=dict(dataclasses.asdict(recipe), divisor=args.divisor,
                                                         views=args.views, val_lesion_dice=dice,
                                                         val_burden_rho=rho,
                                                         teacher_val_lesion_dice=settings.training.get(
                                                             "val_lesion_dice")))
    save_weights(args.out, student, dataclasses.replace(settings, unet=student.config, training=training))
    print(f"best val lesion Dice {dice:.3f}, val burden rho {rho:.3f}; saved {args.out}", flush=True)
    finish(args.out, settings.findings or FindingsConfig())


if __name__ == "__main__":
    main()
