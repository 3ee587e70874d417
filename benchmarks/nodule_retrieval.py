"""Similar-nodule retrieval on LIDC-IDRI nodules pasted into full HU slices (issue 26 item 4).

How the slices are made, the measures and the choices inside the folds:
:mod:`lungcbir.research.nodule_benchmark`. Prints one table per input (HU; the same slices as an
8-bit lung-window export): chance, the baseline (HU histogram inside the region plus its size),
size alone, the region features with block weights chosen inside the folds, a distance learnt
inside the folds, the stored region vector of recipe r1 (``region_vector`` with r1's hand-set
weights, inner product as the region index ranks), r1's blocks with weights chosen inside the
folds, and the region vector the product stores and searches now (recipe r2, as shipped), each
with its 95 % interval from resampling patients. Also prints the block weights the fold
procedure chooses when run once on all nodules: how r2's weights were chosen (HU input).

Usage: python benchmarks/nodule_retrieval.py [--cache runs/nodules] [--limit N] [--resamples 2000]
(region features and stored region vectors are computed once per model and input and kept in the
cache folder.)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from lungcbir.inference import LungModel
from lungcbir.preprocess import normalize_intensity
from lungcbir.regions import REGION_BLOCK_WEIGHTS, REGION_RECIPE, region_features
from lungcbir.research.nodule_benchmark import (
    CANDIDATE_BLOCKS,
    MEASURES,
    R1_WEIGHTS,
    Labels,
    cross_validated,
    cross_validated_cosine,
    cross_validated_learned,
    cross_validated_r1_weights,
    export_8bit,
    pasted_nodules,
    product_region_vectors,
    r1_blocks,
    recipe_weights,
    summary,
)

INPUTS = ("hu", "uint8")


def features(model: LungModel, cache: Path, limit: int | None) -> tuple[dict[str, dict[str, np.ndarray]], Labels]:
    path = cache / f"features-{model.model_id}-{limit or 'all'}.npz"
    if not path.exists():
        started = time.time()
        cases = pasted_nodules(limit=limit)
        rows: dict[str, dict[str, list[np.ndarray]]] = {kind: {} for kind in INPUTS}
        window = model.settings.preprocess.hu_window
        for number, case in enumerate(cases):
            for kind in INPUTS:
                pixels = case.pixels if kind == "hu" else export_8bit(case.pixels)
                unit = normalize_intensity(pixels, kind, window)
                found = region_features(model.network, unit, case.region, model.input_size, window)
                for name, vector in found.blocks.items():
                    rows[kind].setdefault(name, []).append(vector)
            if number % 100 == 0:
                print(f"  {number}/{len(cases)} nodules, {time.time() - started:.0f} s", flush=True)
        cache.mkdir(parents=True, exist_ok=True)
        arrays = {f"{kind}/{name}": np.stack(values)
                  for kind, blocks in rows.items() for name, values in blocks.items()}
        arrays["patient"] = np.array([case.patient for case in cases])
        arrays["malignancy"] = np.array([case.malignancy for case in cases])
        arrays["texture"] = np.array([case.texture for case in cases])
        np.savez_compressed(path, **arrays)
    stored = np.load(path)
    labels = Labels(stored["patient"], stored["malignancy"], stored["texture"])
    blocks = {kind: {key.split("/", 1)[1]: stored[key] for key in stored.files if key.startswith(kind + "/")}
              for kind in INPUTS}
    return blocks, labels


def stored_vectors(model: LungModel, cache: Path, limit: int | None, labels: Labels, recipe: str
                   ) -> dict[str, np.ndarray]:
    """Per input, the region vector the product stores and searches for each nodule: recipe r1
    (its hand-set weights) or the shipped recipe (``REGION_RECIPE``)."""
    if recipe not in ("r1", REGION_RECIPE):
        raise ValueError(f"recipe {recipe!r}: r1 or the shipped {REGION_RECIPE}")
    weights = R1_WEIGHTS if recipe == "r1" else None
    path = cache / f"{recipe}-{model.model_id}-{limit or 'all'}.npz"
    if not path.exists():
        started = time.time()
        cases = pasted_nodules(limit=limit)
        arrays = {}
        for kind in INPUTS:
            images = [case.pixels if kind == "hu" else export_8bit(case.pixels) for case in cases]
            vectors, usable = product_region_vectors(model, images, [case.region for case in cases],
                                                     weights=weights)
            arrays[kind], arrays[f"{kind}-usable"] = vectors, usable
            print(f"  {recipe} {kind}: {len(cases)} nodules, {time.time() - started:.0f} s", flush=True)
        arrays["patient"] = np.array([case.patient for case in cases])
        cache.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, **arrays)
    stored = np.load(path)
    if not np.array_equal(stored["patient"], labels.patient):
        raise SystemExit(f"{path} holds other nodules than the features cache: delete it")
    for kind in INPUTS:
        unusable = int((~stored[f"{kind}-usable"]).sum())
        if unusable:
            print(f"[{kind}] {recipe}: {unusable} slices judged without lungs (a region query would answer nothing)")
    return {kind: stored[kind] for kind in INPUTS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default="runs/nodules")
    parser.add_argument("--limit", type=int, default=None, help="only the first N nodules (a quick look)")
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--inputs", nargs="+", default=list(INPUTS), choices=INPUTS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = LungModel.load(runtime="torch")
    blocks, labels = features(model, Path(args.cache), args.limit)
    vectors = stored_vectors(model, Path(args.cache), args.limit, labels, "r1")
    shipped = stored_vectors(model, Path(args.cache), args.limit, labels, REGION_RECIPE)
    channels = model.settings.unet.bottleneck_channels
    print(f"{len(labels.patient)} nodules, {len(set(labels.patient))} patients, model {model.model_id}")
    for kind in args.inputs:
        found = blocks[kind]
        histogram = found["histogram"]
        found = {**found, "bins": histogram[:, :-1], "size": histogram[:, -1:]}
        variants = {
            "baseline: histogram + size": {"bins": histogram[:, :-1], "size": histogram[:, -1:]},
            "size alone": {"size": histogram[:, -1:]},
            "region features (weights chosen in folds)": {name: found[name] for name in CANDIDATE_BLOCKS},
            "learnt distance (fitted in folds)": {name: found[name] for name in CANDIDATE_BLOCKS},
            "stored region vector r1 (hand-set weights, cosine)": {},
            "r1 blocks, weights chosen in folds": {},
            f"stored region vector {REGION_RECIPE} (as shipped)": {},
        }
        chosen_all, normalised = recipe_weights(r1_blocks(vectors[kind], channels), labels)
        print(f"[{kind}] r1 block weights chosen by the fold procedure on all {len(labels.patient)} nodules: "
              + ", ".join(f"{block}={w:g}" for block, w in chosen_all.items())
              + "; normalised: " + ", ".join(f"{block}={w:.4g}" for block, w in normalised.items())
              + f" (shipped {REGION_RECIPE}: "
              + ", ".join(f"{block}={w:.4g}" for block, w in REGION_BLOCK_WEIGHTS.items()) + ")", flush=True)
        results = {}
        for name, variant in variants.items():
            if name.startswith("stored region vector r1"):
                scores = cross_validated_cosine(vectors[kind], labels)
            elif name.startswith("stored"):
                scores = cross_validated_cosine(shipped[kind], labels)
            elif name.startswith("r1 blocks"):
                scores, chosen = cross_validated_r1_weights(r1_blocks(vectors[kind], channels), labels)
                print(f"[{kind}] r1 block weights per fold: " + "; ".join(
                    ",".join(f"{block}={w:g}" for block, w in weights.items() if w) for weights in chosen), flush=True)
            elif name.startswith("learnt"):
                scores, shrinkages = cross_validated_learned(variant, labels)
                print(f"[{kind}] shrinkage per fold: {shrinkages}", flush=True)
            else:
                scores, chosen = cross_validated(variant, labels, choose=name.startswith("region"))
            results[name] = summary(scores, labels, args.resamples)
            if name.startswith("region"):
                print(f"[{kind}] weights per fold: " + "; ".join(
                    ",".join(f"{block}={w:g}" for block, w in weights.items() if w) for weights in chosen), flush=True)
        print(f"\n### Input: {'HU' if kind == 'hu' else '8-bit export, window [-1350, 150] HU'}\n")
        print("| measure | chance | " + " | ".join(results) + " |")
        print("|---" * (2 + len(results)) + "|")
        first = next(iter(results.values()))
        for title, key, chance in MEASURES:
            cells = [f"{first[chance][0]:.3f}" if chance else "0.500"]
            cells += [f"{r[key][0]:.3f} [{r[key][1]:.3f}, {r[key][2]:.3f}]" for r in results.values()]
            print(f"| {title} | " + " | ".join(cells) + " |")
        print()


if __name__ == "__main__":
    main()
