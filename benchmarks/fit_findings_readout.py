"""Fit the findings read-out on every labelled patient and save it with the bundled model (issue 25).

Usage: PYTHONPATH=. python benchmarks/fit_findings_readout.py [--cache runs/findings_lopo_cache.npz]
                                                             [--weights W.pt] [--out OUT.pt]

The same recipe as every fold of ``benchmarks/findings_lopo.py`` (which builds the cache from the
weights without a read-out), now on all patients: the read-out of the pooled findings part
(``lungcbir.research.findings_lopo.fit_chosen``: penalty chosen by an inner leave-one-patient-out
AUC over the covid-ct-md patients), and the balanced focus's anatomy weight chosen by the rule of
``choose_weight`` on all six covid-ct-md patients, each described by a read-out fitted without it.
The weights' settings get the read-out (``FindingsConfig.readout``) and a centre whose findings
part is zero (the read-out's 4-d embedding is already a unit vector); the network is untouched.
The model id changes, so vectors of the two models never mix in one database.

The rule to adopt it was fixed before the final leave-one-patient-out run was read: the read-out
is saved if its findings focus's infected share is above the findings part's it replaces, its
clean share is above chance, and the balanced focus keeps the level error at or below 0.10.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np

from lungcbir.centring import write_centre
from lungcbir.inference import LungModel, bundled_weights_path, load_network
from lungcbir.research.findings_lopo import (
    FORMS,
    LUNG_PRESENT,
    MD,
    CrossFitted,
    FindingsCache,
    choose_weight,
    default_cache_path,
    every_row,
    fit_chosen,
    learned_signal,
    network_features,
)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cache", type=Path, default=default_cache_path())
    parser.add_argument("--weights", type=Path, default=bundled_weights_path())
    parser.add_argument("--out", type=Path, help="default: --weights, in place")
    args = parser.parse_args()
    _, settings, _ = load_network(args.weights)
    if settings.findings is None or settings.findings.readout is not None or settings.centre is None:
        raise SystemExit(f"{args.weights}: needs a centred findings part without a read-out")
    cache = FindingsCache.load(args.cache)
    every = np.arange(len(cache.form))
    readout = fit_chosen(cache, every, network_features, every_row)
    md = np.flatnonzero((cache.form == FORMS[0]) & (cache.collection == MD) & (cache.lung_fraction >= LUNG_PRESENT))
    findings = CrossFitted(cache, learned_signal(readout.infection_weight), every).parts(md, frozenset())
    weight = choose_weight(cache, md, cache.anatomy[md], findings, sorted(set(cache.patient[md])))
    config = dataclasses.replace(settings.findings, readout=readout, balanced_anatomy_weight=weight)
    anatomy = 2 * settings.unet.bottleneck_channels
    centre = np.concatenate([np.asarray(settings.centre[:anatomy], np.float32),
                             np.zeros(config.dimension(settings.unet.bottleneck_channels), np.float32)])
    write_centre(args.weights, centre, args.out, config)
    model = LungModel.load(args.out or args.weights)
    print(f"read-out of {len(readout.weights)} numbers, balanced anatomy weight {weight}; model {model.model_id}, "
          f"parts {model.parts}")


if __name__ == "__main__":
    main()
