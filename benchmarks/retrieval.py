"""Retrieval quality of feature variants on the shared data, with chance levels.

Usage: python benchmarks/retrieval.py [--weights W.pt] [--segmentation-only S.pt] [--variants]

Columns: raw pixels (32x32), the same U-Net with random weights, a segmentation-only U-Net's
pooled bottleneck (pooled like ours, when --segmentation-only is given), and the lungcbir
feature of the model in use; --variants adds the other poolings of both and PCA-whitening.
"""

from __future__ import annotations

import argparse
import time

from lungcbir.inference import LungModel
from lungcbir.research.retrieval_benchmark import format_table, standard_comparison


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--weights")
    parser.add_argument("--segmentation-only")
    parser.add_argument("--variants", action="store_true")
    args = parser.parse_args()
    began = time.perf_counter()
    model = LungModel.load(args.weights)
    baseline = LungModel.load(args.segmentation_only) if args.segmentation_only else None
    count, measures = standard_comparison(model, baseline, args.variants)
    print(f"{count} slices; model {model.model_id}")
    print(format_table(measures))
    print(f"({time.perf_counter() - began:.0f} s)")


if __name__ == "__main__":
    main()
