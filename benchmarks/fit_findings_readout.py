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

``--pooled-weight 0.5`` keeps the pooled findings part beside the read-out's embedding (the
"joined" column of the table; its centre is the model's centre of that part).

The rule to adopt one (fixed before the leave-one-patient-out run with the joined column was
read; the read-out alone had been measured): a candidate (read-out alone, joined) qualifies if,
in that table, its findings focus's infected share is above the findings part's it replaces,
its clean share above chance, its balanced focus's level error at most 0.10 and its burden rho
on the five patients the lesion output never saw at least 0.80 (the issue's target); of those
that qualify, the highest infected share is saved; if none does, the bundled model stays.
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
    POOLED_WEIGHT,
    SIGNALS,
    CrossFitted,
    FindingsCache,
    choose_weight,
    default_cache_path,
    every_row,
    fit_chosen,
    network_features,
)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cache", type=Path, default=default_cache_path())
    parser.add_argument("--weights", type=Path, default=bundled_weights_path())
    parser.add_argument("--out", type=Path, help="default: --weights, in place")
    parser.add_argument("--pooled-weight", type=float, default=0.0,
                        help="share of the pooled findings part in the findings cosine (0: the read-out alone)")
    args = parser.parse_args()
    _, settings, _ = load_network(args.weights)
    if settings.findings is None or settings.findings.readout is not None or settings.centre is None:
        raise SystemExit(f"{args.weights}: needs a centred findings part without a read-out")
    cache = FindingsCache.load(args.cache)
    every = np.arange(len(cache.form))
    anatomy = 2 * settings.unet.bottleneck_channels
    readout = dataclasses.replace(fit_chosen(cache, every, network_features, every_row),
                                  pooled_weight=args.pooled_weight,
                                  pooled_centre=[float(v) for v in settings.centre[anatomy:]]
                                  if args.pooled_weight > 0 else None)
    md = np.flatnonzero((cache.form == FORMS[0]) & (cache.collection == MD) & (cache.lung_fraction >= LUNG_PRESENT))
    signal = SIGNALS["read-out + pooled part"] if args.pooled_weight > 0 else SIGNALS["learned read-out"]
    if args.pooled_weight not in (0.0, POOLED_WEIGHT):
        raise SystemExit(f"--pooled-weight: 0 or {POOLED_WEIGHT}, the weights the table measured")
    findings = CrossFitted(cache, signal, every).parts(md, frozenset())
    weight = choose_weight(cache, md, cache.anatomy[md], findings, sorted(set(cache.patient[md])))
    config = dataclasses.replace(settings.findings, readout=readout, balanced_anatomy_weight=weight)
    centre = np.concatenate([np.asarray(settings.centre[:anatomy], np.float32),
                             np.zeros(config.dimension(settings.unet.bottleneck_channels), np.float32)])
    write_centre(args.weights, centre, args.out, config)
    model = LungModel.load(args.out or args.weights)
    print(f"read-out of {len(readout.weights)} numbers, balanced anatomy weight {weight}; model {model.model_id}, "
          f"parts {model.parts}")


if __name__ == "__main__":
    main()
