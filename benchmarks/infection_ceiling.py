"""How good must a slice's infection signal be for the mixed-store targets (issue 14)?

Usage: python benchmarks/infection_ceiling.py [--split choice|report] [--noise 0,0.25,0.5,1]
                                               [--anatomy 0.5,0.7,0.9]

Replaces the findings part of the bundled model's vectors by an oracle: the true covid-ct-md
slice label (infected 1, clean or normal 0) plus Gaussian noise of the given standard
deviation, as the unit vector (cos, sin) of label x 90 degrees, and measures the mixed store
of the split (and its slices against all six series) with the anatomy part weighted as given.
The AUC column is what that noisy label would score as an infected-vs-clean detector, to put
beside a real output's AUC (printed for the model's ``lesion_fraction``). No figure here is a
result of lungcbir: it bounds what any findings part built on this anatomy part can reach.
"""

from __future__ import annotations

import argparse

import numpy as np

from lungcbir.focus import focus_queries
from lungcbir.inference import LungModel
from lungcbir.metrics import roc_auc
from lungcbir.research.retrieval_benchmark import (
    SPLITS,
    assign_levels,
    encode,
    load_benchmark,
    split_measures,
)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--split", choices=sorted(SPLITS), default="choice")
    parser.add_argument("--noise", default="0,0.25,0.5,1")
    parser.add_argument("--anatomy", default="0.5,0.7,0.9")
    parser.add_argument("--weights", help="the model whose anatomy part and lesion output are used (default bundled)")
    args = parser.parse_args()
    split = SPLITS[args.split]
    model = LungModel.load(args.weights)
    # the measures need the COVID-19 lung-mask slices too (burden), though it is not printed here
    items = [item for item in load_benchmark() if item.dataset in ("covid-ct-md", "covid19-ct-lungmask")]
    slices = [item.slice for item in items]
    assign_levels(items, encode(LungModel.load(), slices).lung_fractions)
    segmented = model.segment(slices)
    anatomy = np.stack([result.vector for result in segmented])[:, :model.parts[0]] * np.sqrt(len(model.parts))
    label = np.array([1.0 if item.infected else 0.0 for item in items])  # normal patients' slices: 0
    queried = np.array([item.series in split.series and item.infected is not None for item in items])
    if model.has_lesion_head:
        fractions = np.array([result.lesion_fraction for result in segmented])
        print(f"{split.name} split: lesion_fraction AUC, infected vs clean slices of the labelled patients: "
              f"{roc_auc(fractions[queried], label[queried] == 1):.3f}")
    print(f"{'noise':>6} {'AUC':>6} {'anatomy':>8} {'level':>7} {'infected':>9} {'level, 6':>9} {'infected, 6':>12}")
    for noise in (float(v) for v in args.noise.split(",")):
        signal = label + noise * np.random.default_rng(0).normal(size=len(label))
        findings = np.stack([np.cos(signal * np.pi / 2), np.sin(signal * np.pi / 2)], axis=1)
        vectors = (np.concatenate([anatomy, findings], axis=1) / np.sqrt(2)).astype(np.float32)
        for weight in (float(v) for v in args.anatomy.split(",")):
            found = split_measures(items, vectors, focus_queries(vectors, anatomy.shape[1], weight), split)
            values = [found[name][0] for name in ("level top-1 error (lower is better)", "infected share in top 5",
                                                  "level top-1 error (lower is better), six-series store",
                                                  "infected share in top 5, six-series store")]
            print(f"{noise:6.2f} {roc_auc(signal[queried], label[queried] == 1):6.3f} {weight:8.2f} "
                  + " ".join(f"{v:{w}.3f}" for v, w in zip(values, (7, 9, 9, 12))))


if __name__ == "__main__":
    main()
