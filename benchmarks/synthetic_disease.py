"""Lesion-inclusive lung masks on SYNTHETIC disease in HU.

Real lesion shapes and nodules pasted into the lesion-free HU lungs of ``kaggle-lungs-2d``
(:mod:`lungcbir.research.synthetic_disease`); the slice's own lung mask is the truth, so the
pasted lesions count as lung. Per model and kind: lung Dice (mean / median / min) and, for
the dense kinds (consolidation, dependent), the share of each pasted lesion inside the mask
(mean / min, and how many lesions are at least 90 % inside).

Usage: python benchmarks/synthetic_disease.py [--split val|test] [--weights W.pt ...]
           [--seed 31] [--threads 1] [--export] [--as-saved-only]
(the bundled model is always included, each model with a lesion output also with its
saved ``include_lesions`` switched; choose on ``val``, report on ``test``.)
"""

from __future__ import annotations

import argparse

import cv2
import numpy as np
import torch

from lungcbir.inference import LungModel
from lungcbir.io import CTSlice
from lungcbir.metrics import dice_score
from lungcbir.preprocess import normalize_intensity
from lungcbir.research.synthetic_disease import KINDS, diseased_slices

DENSE = ("consolidation", "dependent")


def as_export(hu: np.ndarray) -> CTSlice:
    """Item 2's harmonisation: HU presented the way the COVID-19 training lesions were seen, an
    8-bit export as covid19-ct-lungmask's (window [-1250, 250] HU, per-slice min-max, CLAHE clip 7
    at 256 x 256; see its README), resized back to the slice so masks compare at its size."""
    unit = cv2.resize(normalize_intensity(hu, "hu", (-1250.0, 250.0)), (256, 256), interpolation=cv2.INTER_AREA)
    unit = (unit - unit.min()) / max(float(unit.max() - unit.min()), 1e-6)
    grey = cv2.createCLAHE(clipLimit=7.0, tileGridSize=(8, 8)).apply(np.round(unit * 255).astype(np.uint8))
    return CTSlice(cv2.resize(grey, hu.shape[::-1], interpolation=cv2.INTER_CUBIC), "uint8", "export.png", "png")


def score(model: LungModel, split: str, seed: int, export: bool = False) -> dict[str, dict[str, np.ndarray]]:
    """Per kind (and ``clean``): Dice per slice, inclusion per lesion, quality verdicts."""
    cases = diseased_slices(split, seed)
    clean = {case.name: case for case in cases}  # one clean copy per slice
    rows: dict[str, dict[str, list]] = {}

    def present(hu: np.ndarray, name: str) -> CTSlice:
        return as_export(hu) if export else CTSlice(hu, "hu", name, "tiff")

    items = [(case.kind, present(case.pixels, case.name), case.truth, case.lesion) for case in cases]
    items += [("clean", present(_original(case), case.name), case.truth, case.lesion) for case in clean.values()]
    for start in range(0, len(items), 16):
        chunk = items[start:start + 16]
        for (kind, _, truth, lesion), result in zip(chunk, model.segment([item for _, item, _, _ in chunk])):
            row = rows.setdefault(kind, {"dice": [], "inside": [], "doubtful": []})
            row["dice"].append(dice_score(result.mask, truth))
            row["inside"].append(float((result.mask & lesion).sum() / max(1, lesion.sum())))
            row["doubtful"].append(result.quality.value != "ok")
    return {kind: {key: np.asarray(values) for key, values in row.items()} for kind, row in rows.items()}


def _original(case) -> np.ndarray:
    from lungcbir.datasets import data_root
    from lungcbir.io import read_file

    return read_file(data_root() / "kaggle-lungs-2d" / "images" / case.name)[0].pixels.astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", choices=["val", "test"], default="val")
    parser.add_argument("--weights", nargs="*", default=[])
    parser.add_argument("--seed", type=int, default=31)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--export", action="store_true",
                        help="present every slice as an 8-bit CLAHE export (harmonisation, item 2)")
    parser.add_argument("--as-saved-only", action="store_true",
                        help="skip each model's variant with include_lesions switched")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models = {}
    for path in [None, *args.weights]:
        label = path or "bundled"
        models[label] = LungModel.load(path)
        if models[label].has_lesion_head and not args.as_saved_only:
            other = LungModel.load(path)  # what include_lesions (lesion output joined to the lungs) changes
            other.settings.include_lesions = not other.settings.include_lesions
            models[f"{label}, {'lesions joined' if other.settings.include_lesions else 'lung output only'}"] = other
    print(f"SYNTHETIC disease in HU on kaggle-lungs-2d {args.split} (seed {args.seed}); truth: the original lungs"
          + ("; presented as 8-bit CLAHE exports" if args.export else ""))
    for label, model in models.items():
        results = score(model, args.split, args.seed, args.export)
        everything = np.concatenate([results[kind]["dice"] for kind in KINDS])
        print(f"{label} ({model.model_id}): all diseased {len(everything)}: Dice mean {everything.mean():.4f} "
              f"median {np.median(everything):.4f} min {everything.min():.4f}")
        for kind in ("clean", *KINDS):
            row = results[kind]
            dice = row["dice"]
            line = (f"  {kind:14s} {len(dice):3d}  Dice {dice.mean():.4f} / {np.median(dice):.4f} / {dice.min():.4f}"
                    f"  not ok {int(row['doubtful'].sum())}")
            if kind in DENSE:
                inside = row["inside"]
                line += (f"  lesion inside mask mean {inside.mean():.3f} min {inside.min():.3f}"
                         f" >=90%: {int((inside >= 0.9).sum())}/{len(inside)}")
            print(line)


if __name__ == "__main__":
    main()
