"""Does a stored slice come back first when it is queried as another export or orientation?

Stores the 32 Kaggle test slices (HU) and every 6th COVID-19 test slice (8-bit), then queries
each stored slice again as an 8-bit export in three windows and in five flips/turns, and
prints, per view, how often the original is the top match, in the top 5, and its median and
worst rank. Real archives hold the same anatomy in any of these forms.

Usage: python benchmarks/retrieval_invariance.py [--weights W.pt] [--focus balanced]

The 8-bit forms include a JPEG of the lung-window export and an export made the way
covid19-ct-lungmask's were (per-slice min-max, CLAHE). For a model with a findings part it also
prints how alike the findings parts of the original and the query are (their cosine).
"""

from __future__ import annotations

import argparse

import cv2
import numpy as np

from lungcbir.datasets import covid_slices, kaggle_slices
from lungcbir.focus import DEFAULT_FOCUS, FOCUSES
from lungcbir.inference import LungModel
from lungcbir.io import CTSlice, read_file
from lungcbir.research.findings_lopo import clahe_export


def exported(low: float, high: float):
    def view(item: CTSlice) -> CTSlice:
        if item.intensity != "hu":
            return item  # already an export: only HU slices can be re-windowed
        unit = np.clip((item.pixels.astype(np.float32) - low) / (high - low), 0, 1)
        return CTSlice(np.round(unit * 255).astype(np.uint8), "uint8", item.path, "png")
    return view


def jpeg_of_lung_window(item: CTSlice) -> CTSlice:
    """The 8-bit lung-window export saved as a JPEG (quality 90) and decoded again."""
    grey = exported(-1000, 400)(item)
    _, encoded = cv2.imencode(".jpg", grey.pixels, [cv2.IMWRITE_JPEG_QUALITY, 90])
    return CTSlice(cv2.imdecode(encoded, cv2.IMREAD_UNCHANGED), "uint8", item.path, "jpeg")


def clahe_png(item: CTSlice) -> CTSlice:
    """Exported the way covid19-ct-lungmask's slices were (per-slice min-max and CLAHE)."""
    return clahe_export(item) if item.intensity == "hu" else item


def turned(operation):
    def view(item: CTSlice) -> CTSlice:
        return CTSlice(np.ascontiguousarray(operation(item.pixels)), item.intensity, item.path, item.source_format)
    return view


VIEWS = {
    "8-bit lung window": exported(-1000, 400),
    "8-bit mediastinal window": exported(-160, 240),
    "8-bit bone window": exported(-500, 1500),
    "8-bit lung window, JPEG": jpeg_of_lung_window,
    "8-bit CLAHE export": clahe_png,
    "flipped left-right": turned(lambda a: a[:, ::-1]),
    "flipped up-down": turned(lambda a: a[::-1]),
    "turned 90 degrees": turned(np.rot90),
    "turned 180 degrees": turned(lambda a: np.rot90(a, 2)),
    "turned 270 degrees": turned(lambda a: np.rot90(a, 3)),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--weights")
    parser.add_argument("--focus", choices=FOCUSES, default=str(DEFAULT_FOCUS),
                        help="the query's focus (default %(default)s)")
    args = parser.parse_args()
    model = LungModel.load(args.weights)
    stored = ([read_file(s.image)[0] for s in kaggle_slices()["test"]]
              + [read_file(s.image)[0] for s in covid_slices()["test"][::6]])
    vectors = np.stack([r.vector for r in model.segment(stored)])
    hu = [n for n, item in enumerate(stored) if item.intensity == "hu"]
    print(f"model {model.model_id}: {len(stored)} stored slices ({len(hu)} HU); rank of the original "
          f"({args.focus} focus); findings cosine: of the query's findings part with the original's (1 = the same)")
    for name, view in VIEWS.items():
        queries = hu if name.startswith("8-bit") else range(len(stored))
        results = model.segment([view(stored[n]) for n in queries])
        asked = model.focused(np.stack([r.vector for r in results]), args.focus)
        similarities = asked @ vectors.T
        ranks = np.array([int((row > row[n]).sum()) + 1 for n, row in zip(queries, similarities)])
        cut = model.parts[0]
        findings = [float(r.vector[cut:] @ vectors[n, cut:]) * len(model.parts) for n, r in zip(queries, results)]
        print(f"  {name:<26} queries {len(ranks):>3}  top-1 {np.mean(ranks == 1):.2f}  "
              f"top-5 {np.mean(ranks <= 5):.2f}  median {np.median(ranks):.0f}  worst {ranks.max()}  "
              f"findings cosine median {np.median(findings):.3f} min {np.min(findings):.3f}")


if __name__ == "__main__":
    main()
