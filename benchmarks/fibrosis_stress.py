"""Stress check for fibrosis-like slices: lung Dice on held-out TEST slices with synthetic honeycombing.

SYNTHETIC: :func:`lungcbir.augment.add_honeycomb` (the training augmentation) is applied to each
held-out test slice at its own resolution, 1-3 clusters per slice, from seeds (``--seed``, default
2026) that are not training's; the lung mask is the slice's own (honeycombing lies inside the
lung field, so the truth does not change). Each model segments the clean and the stressed slices.

Usage: python benchmarks/fibrosis_stress.py [--weights W.pt ...] [--seed S] [--threads 2]
(the bundled model is always included, as "bundled").
"""

from __future__ import annotations

import argparse
import random

import numpy as np
import torch

from lungcbir.augment import add_honeycomb
from lungcbir.datasets import covid_slices, kaggle_slices
from lungcbir.inference import LungModel
from lungcbir.io import CTSlice, read_file, read_mask
from lungcbir.metrics import dice_score
from lungcbir.preprocess import normalize_intensity


def stressed_slices(seed: int) -> dict[str, list[tuple[CTSlice, CTSlice, np.ndarray]]]:
    """Per test set: (clean, honeycombed, truth) with pixels in [0, 1] ("unit": the model's own input)."""
    sets = {"kaggle-lungs-2d test": kaggle_slices()["test"], "covid19-ct-lungmask test": covid_slices()["test"]}
    out = {}
    for name, samples in sets.items():
        rows = []
        for number, sample in enumerate(samples):
            item = read_file(sample.image)[0]
            truth = read_mask(sample.mask).astype(bool)
            unit = normalize_intensity(item.pixels, item.intensity)
            rng = random.Random(seed * 100003 + number)
            stressed = unit
            for _ in range(rng.randint(1, 3)):
                stressed, _ = add_honeycomb(stressed, truth, rng)
            rows.append((CTSlice(unit, "unit", sample.image, "png"), CTSlice(stressed, "unit", sample.image, "png"),
                         truth))
        out[name] = rows
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--weights", nargs="*", default=[])
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models = {"bundled": LungModel.load()} | {path: LungModel.load(path) for path in args.weights}
    data = stressed_slices(args.seed)
    print("SYNTHETIC honeycombing on held-out test slices (lung Dice: mean / median / min)")
    for label, model in models.items():
        for name, rows in data.items():
            for variant, column in (("clean", 0), ("honeycomb", 1)):
                results = model.segment([row[column] for row in rows])
                scores = np.array([dice_score(r.mask, row[2]) for r, row in zip(results, rows)])
                print(f"  {label} ({model.model_id}) {name} {variant:>9}: {scores.mean():.4f} / "
                      f"{np.median(scores):.4f} / {scores.min():.4f}  ({len(scores)} slices)", flush=True)


if __name__ == "__main__":
    main()
