"""Choose the findings part of the vector on the CHOICE split only.

Usage: python benchmarks/choose_findings.py W.pt [--statistics 0,0.5,1,2,4]
                                                  [--anatomy 0.3,0.4,0.5,0.6,0.7]

For a model with a lesion output, tries every ``statistics_weight`` (how much the five lesion
statistics count beside the lesion-pooled bottleneck) and every ``balanced_anatomy_weight``
(the anatomy part's share of the ``balanced`` focus), each with its own training centre, on
:data:`lungcbir.research.retrieval_benchmark.CHOICE_SPLIT` (never on the report split), and
prints every measure and the choice, made by rules fixed before looking:

* ``statistics_weight``: the highest mean of the ``findings`` focus's infected share in the
  top 5 and burden rho;
* ``balanced_anatomy_weight``: with that, the highest infected share of the ``balanced`` focus
  among weights whose level top-1 error is at most 0.08 (the issue's target); if none
  qualifies, the lowest level error.

Then save it: ``python benchmarks/train_bundled_model.py W.pt --centre-only
--findings-statistics G --balanced-anatomy A``.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from lungcbir.centring import training_images
from lungcbir.features import FindingsConfig, centre_parts
from lungcbir.inference import LungModel, NetworkOutputs
from lungcbir.io import read_file
from lungcbir.research.retrieval_benchmark import CHOICE_SPLIT, assign_levels, encode, load_benchmark, split_measures

LEVEL_LIMIT = 0.08


def network_outputs(model: LungModel, slices: list, batch_size: int = 32) -> NetworkOutputs:
    parts = [model.outputs(np.stack([model.prepare(s)[0] for s in slices[start:start + batch_size]]))
             for start in range(0, len(slices), batch_size)]
    lesions = [p.lesions for p in parts]
    if any(lesion is None for lesion in lesions):
        raise SystemExit("the model has no lesion output: nothing to choose")
    return NetworkOutputs(torch.cat([p.bottleneck for p in parts]), torch.cat([p.lungs for p in parts]),
                          torch.cat(lesions))  # type: ignore[arg-type]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("weights")
    parser.add_argument("--statistics", default="0,0.5,1,2,4")
    parser.add_argument("--anatomy", default="0.3,0.4,0.5,0.6,0.7")
    args = parser.parse_args()
    model = LungModel.load(args.weights)
    items = [i for i in load_benchmark() if i.dataset in ("covid-ct-md", "covid19-ct-lungmask")]
    slices = [i.slice for i in items]
    assign_levels(items, encode(LungModel.load(), slices).lung_fractions)
    train = network_outputs(model, [read_file(path)[0] for path in training_images()])
    bench = network_outputs(model, slices)
    print(f"{len(items)} slices; choice split {sorted(CHOICE_SPLIT.series)} + {sorted(CHOICE_SPLIT.burden_patients)}")
    rows = []
    for statistics in (float(v) for v in args.statistics.split(",")):
        for anatomy in (float(v) for v in args.anatomy.split(",")):
            model.settings.findings = FindingsConfig(statistics, anatomy)
            centre = model.uncentred_vectors(train.bottleneck, train.lungs, train.lesions).mean(0)
            vectors = centre_parts(model.uncentred_vectors(bench.bottleneck, bench.lungs, bench.lesions), centre,
                                   model.parts)
            found = {focus: split_measures(items, vectors, model.focused(vectors, focus), CHOICE_SPLIT)
                     for focus in ("anatomy", "findings", "balanced")}
            rows.append((statistics, anatomy, found))
            line = "  ".join(f"{focus}: level {m['level top-1 error (lower is better)'][0]:.3f} "
                             f"infected {m['infected share in top 5'][0]:.3f} "
                             f"rho {m['burden Spearman rho, top 5'][0]:.3f}" for focus, m in found.items())
            print(f"statistics {statistics:<4} anatomy {anatomy:<4} {line}", flush=True)

    def findings_score(row: tuple) -> float:
        measures = row[2]["findings"]
        return (measures["infected share in top 5"][0] + measures["burden Spearman rho, top 5"][0]) / 2

    best_statistics = max(rows, key=findings_score)[0]
    candidates = [row for row in rows if row[0] == best_statistics]
    level = "level top-1 error (lower is better)"
    allowed = [row for row in candidates if row[2]["balanced"][level][0] <= LEVEL_LIMIT]
    chosen = (max(allowed, key=lambda row: row[2]["balanced"]["infected share in top 5"][0]) if allowed
              else min(candidates, key=lambda row: row[2]["balanced"][level][0]))
    print(f"chosen on the choice split: --findings-statistics {chosen[0]} --balanced-anatomy {chosen[1]}")


if __name__ == "__main__":
    main()
