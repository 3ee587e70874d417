"""The mixed store: all six covid-ct-md series (normals included) in one store.

Usage: python benchmarks/mixed_store.py [--weights W.pt]

Every slice is queried; neighbours come from other patients only. Prints, beside chance and a
raw-pixel baseline, the anatomical-level top-1 error, the share of infected slices among the
top 5 of infected queries and the median score of the 50th neighbour, for the anatomy part of
the model's vectors without its centre ("uncentred") and for its stored vectors searched with
each focus; then, per focus, the median scores that the README quotes for what a score means.
Levels come from the bundled model's lung masks, so every column is measured on the
same queries. (Choices are made on the choice split, not here: ``lungcbir evaluate-retrieval
--split``.)
"""

from __future__ import annotations

import argparse

import numpy as np

from lungcbir.focus import FOCUSES
from lungcbir.inference import LungModel
from lungcbir.research.retrieval_benchmark import (
    assign_levels,
    encode,
    load_benchmark,
    mixed_store_measures,
    model_vectors,
    pooled,
    raw_pixel_features,
)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--weights", help="model weights (default: the bundled model)")
    args = parser.parse_args()
    model = LungModel.load(args.weights)
    items = [i for i in load_benchmark() if i.dataset == "covid-ct-md"]
    slices = [i.slice for i in items]
    encoded = encode(model, slices)
    reference = encoded if args.weights is None else encode(LungModel.load(), slices)
    assign_levels(items, reference.lung_fractions)
    uncentred = pooled(encoded, model.settings.pooling)
    stored = model_vectors(model, slices)
    features = {"raw pixels": (raw_pixel_features(slices), None), "uncentred": (uncentred, None)}
    features.update({focus: (stored, model.focused(stored, focus)) for focus in FOCUSES})
    results = {name: mixed_store_measures(items, vectors, queries) for name, (vectors, queries) in features.items()}
    print(f"{len(items)} covid-ct-md slices, {len({i.patient for i in items})} patients; model {model.model_id}")
    names = list(results)
    print(f"{'measure':<40} {'chance':>8} " + " ".join(f"{n:>11}" for n in names))
    for measure in results[names[0]]:
        chance = results[names[0]][measure][1]
        print(f"{measure:<40} {chance:8.3f} " + " ".join(f"{results[n][measure][0]:11.3f}" for n in names))
    print("\nwhat a score means (README): median score of the best / 5th / 50th other-patient neighbour, "
          "and of all other-patient pairs")
    patients = np.array([i.patient for i in items])
    for focus in FOCUSES:
        scores = model.focused(stored, focus) @ stored.T
        ranked, pairs = [], []
        for q in range(len(items)):
            others = scores[q, patients != patients[q]]
            ranked.append(np.sort(others)[::-1][[0, 4, 49]])
            pairs.append(others)
        best, fifth, fiftieth = np.median(ranked, axis=0)
        print(f"{focus:<10} {best:.2f} / {fifth:.2f} / {fiftieth:.2f} / {np.median(np.concatenate(pairs)):.2f}")


if __name__ == "__main__":
    main()
