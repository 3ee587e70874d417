"""Two models' held-out lesion figures side by side, with paired intervals for the differences.

Usage:
    lungcbir evaluate --held-out --json > A.json
    lungcbir evaluate --held-out --json --weights OTHER.pt > B.json
    python benchmarks/compare_lesion_outputs.py A.json B.json [--resamples 2000] [--seed 0]

Prints, for the COVID-19 test slices with lesions, each model's mean lesion Dice and the Spearman
rho of its predicted against the true lesion fraction, per patient and over all, then B - A with
a 95 % interval. The held-out split has three patients, too few to resample patients, so the
interval resamples slices within each patient (each patient keeps its number of slices): it
says how sure the difference is on these patients, not on others.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict

import numpy as np

from lungcbir.metrics import spearman

SECTION = "covid19-ct-lungmask test lesions"


def per_slice(path: str) -> dict[str, tuple[str, float, float, float]]:
    """File name -> (patient, Dice, true fraction, predicted fraction) of the lesion section."""
    with open(path) as handle:
        images = json.load(handle)[SECTION]["images"]
    rows = {}
    for image in images:
        name = image["path"].rsplit("/", 1)[-1]
        patient = re.sub(r"_k\d+\.\w+$", "", name)
        rows[name] = (patient, image["dice"], image["true_fraction"], image["predicted_fraction"])
    return rows


def figures(dice_difference: np.ndarray, truth: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Dice difference and rho difference (B - A) of the slices given."""
    return np.array([dice_difference.mean(), spearman(truth, b) - spearman(truth, a)])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    first, second = per_slice(args.a), per_slice(args.b)
    names = sorted(first)
    if sorted(second) != names:
        raise SystemExit("the two files hold different slices: evaluate both with --held-out")
    patient = np.array([first[n][0] for n in names])
    truth = np.array([first[n][2] for n in names])
    dice_a, dice_b = np.array([first[n][1] for n in names]), np.array([second[n][1] for n in names])
    pred_a, pred_b = np.array([first[n][3] for n in names]), np.array([second[n][3] for n in names])
    print(f"{'':>22} {'Dice A':>7} {'Dice B':>7} {'rho A':>7} {'rho B':>7}  slices")
    groups = defaultdict(list)
    for index, who in enumerate(patient):
        groups[who].append(index)
    for who, rows in sorted(groups.items()) + [("all", list(range(len(names))))]:
        rows_ = np.array(rows)
        print(f"{who:>22} {dice_a[rows_].mean():7.3f} {dice_b[rows_].mean():7.3f} "
              f"{spearman(truth[rows_], pred_a[rows_]):7.3f} {spearman(truth[rows_], pred_b[rows_]):7.3f}"
              f"  {len(rows)}")
    observed = figures(dice_b - dice_a, truth, pred_a, pred_b)
    generator = np.random.default_rng(args.seed)
    draws = []
    for _ in range(args.resamples):
        rows_ = np.concatenate([generator.choice(rows, len(rows)) for rows in groups.values()])
        draws.append(figures(dice_b[rows_] - dice_a[rows_], truth[rows_], pred_a[rows_], pred_b[rows_]))
    low, high = np.percentile(np.array(draws), [2.5, 97.5], axis=0)
    for label, index in (("lesion Dice", 0), ("rho", 1)):
        print(f"B - A {label}: {observed[index]:+.3f} [{low[index]:+.3f}, {high[index]:+.3f}] "
              f"(95 %, slices resampled within each patient, {args.resamples} resamples)")


if __name__ == "__main__":
    main()
