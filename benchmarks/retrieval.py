"""Retrieval quality of feature variants on the shared data, with chance levels.

Usage: python benchmarks/retrieval.py [--weights W.pt] [--variants]

Columns: raw pixels (32x32), the same U-Net with random weights, the segmentation-only U-Net's
pooled bottleneck (mean+max), and the default lungcbir feature. With --variants, pooling
alternatives of the trained model are added as extra columns.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from lungcbir.evaluate_retrieval import (assign_levels, compare, encode, format_table, load_benchmark, pooled,
                                         raw_pixel_features, whiten)
from lungcbir.inference import LungModel


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--weights")
    parser.add_argument("--variants", action="store_true")
    args = parser.parse_args()
    began = time.perf_counter()
    items = load_benchmark()
    slices = [i.slice for i in items]
    model = LungModel.load(args.weights)
    trained = encode(model, slices)
    assign_levels(items, trained.lung_fractions)
    torch.manual_seed(0)
    random_model = LungModel(type(model.network)(model.settings.unet), model.settings, "random")
    random = encode(random_model, slices)
    datasets = np.array([i.dataset for i in items])
    features = {"raw pixels": raw_pixel_features(slices), "random U-Net": pooled(random, "mean-max"),
                "seg-only mean-max": pooled(trained, "mean-max")}
    if args.variants:
        for method in ("lung-mean-max",):
            features[f"trained {method}"] = pooled(trained, method)
        features["mean-max + whitening"] = whiten(pooled(trained, "mean-max"), datasets)
        features["lung-mean-max + whitening"] = whiten(pooled(trained, "lung-mean-max"), datasets)
    features[f"lungcbir default ({model.settings.pooling})"] = pooled(trained, model.settings.pooling)
    print(f"{len(items)} slices; model {model.model_id}")
    print(format_table(compare(items, features)))
    print(f"({time.perf_counter() - began:.0f} s)")


if __name__ == "__main__":
    main()
