"""Findings retrieval, leave-one-patient-out, with patient-resampled 95 % intervals (issue 25).

Usage: PYTHONPATH=. python benchmarks/findings_lopo.py [--cache runs/findings_lopo_cache.npz] [--rebuild]
                                                      [--before W.pt]

Runs the bundled model once over every slice with findings labels (covid-ct-md, covid19-ct-lungmask,
kaggle-lungs-2d; HU slices also as two 8-bit exports), caches its outputs, then prints the table of
``lungcbir.research.findings_lopo`` (protocol in its docstring): every read-out and every balanced
weight fitted inside the fold, every stored slice described by a read-out that saw neither it
nor the query's patient. One thread, so colleagues on the machine are not starved.

The cache holds what a read-out reads, so it is built from weights *without* a read-out: the
bundled model before issue 25 (``git show 625cce4:lungcbir/weights/lung_unet.pt > runs/before.pt``
and ``--before runs/before.pt``); the network and its outputs are the same in both.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from lungcbir.inference import LungModel
from lungcbir.research.findings_lopo import cached, default_cache_path, format_lopo, lopo_table


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cache", type=Path, default=default_cache_path())
    parser.add_argument("--rebuild", action="store_true", help="run the network again even if the cache exists")
    parser.add_argument("--before", help="weights without a read-out to build the cache from (default: bundled)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.rebuild and args.cache.is_file():
        args.cache.unlink()
    if not args.cache.is_file():
        model = LungModel.load(args.before)
        if model.settings.findings is None or model.settings.findings.readout is not None:
            raise SystemExit("the cache is built from weights with a findings part and no read-out: pass --before")
    cache = cached(model if not args.cache.is_file() else None, args.cache)
    patients = {c: len(set(cache.patient[cache.collection == c])) for c in sorted(set(cache.collection))}
    print(f"{len(cache.form)} cached rows ({int((cache.form == 'original').sum())} slices); patients {patients}")
    table, chosen = lopo_table(cache)
    print(format_lopo(table, chosen))


if __name__ == "__main__":
    main()
