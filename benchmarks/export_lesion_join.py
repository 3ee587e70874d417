"""Issue 31, item 1 with item 2's harmonisation: the lesion output of HU presented as an 8-bit
export, joined to the HU lung mask. Val only (a probe, to decide whether to go on).

The bundled lesion output hardly fires on dense consolidation in HU, and is strong on the 8-bit
CLAHE exports it learnt from. So each SYNTHETIC val slice (lungcbir.research.synthetic_disease)
goes through the network twice at the model input (256 x 256): as HU, for the lung mask (cleaned
as the product cleans it), and as covid19-ct-lungmask's export (benchmarks/synthetic_disease.py
``as_export``), for the lesion output; that lesion output joins the lung mask by
``lungcbir.postprocess.include_lesions``. Per kind: lung Dice of the mask alone, joined with the
HU pass's lesions and joined with the export pass's lesions; the share of each pasted lesion
inside; and how much of it the export pass's lesion output covers.

Usage: PYTHONPATH=. python benchmarks/export_lesion_join.py [--threads 1]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from benchmarks.synthetic_disease import _original, as_export
from lungcbir.inference import load_network
from lungcbir.io import CTSlice
from lungcbir.metrics import dice_score
from lungcbir.postprocess import clean_mask, include_lesions
from lungcbir.preprocess import mask_to_model, normalize_intensity
from lungcbir.research.synthetic_disease import diseased_slices
from lungcbir.train import model_pixels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    network, settings, _ = load_network(None)
    network.eval()
    window = settings.preprocess.hu_window
    cases = diseased_slices("val")
    clean = {case.name: case for case in cases}  # one clean copy per slice
    items = [(case.kind, case.pixels, case.truth, case.lesion) for case in cases]
    items += [("clean", _original(case), case.truth, case.lesion) for case in clean.values()]
    rows: dict[str, list[tuple[float, ...]]] = {}
    for kind, hu, truth, lesion in items:
        as_hu = normalize_intensity(model_pixels(CTSlice(hu, "hu", "slice.tiff", "tiff"), 256), "hu", window)
        exported = normalize_intensity(model_pixels(as_export(hu), 256), "uint8", window)
        with torch.inference_mode():
            logits = network(torch.from_numpy(np.stack([as_hu, exported])[:, None])).numpy()
        lungs = clean_mask(logits[0, 0] > 0)
        joined_hu = include_lesions(lungs, logits[0, 1] > 0, as_hu)
        joined_export = include_lesions(lungs, logits[1, 1] > 0, as_hu)
        truth_mask, pasted = mask_to_model(truth, 256) > 0, mask_to_model(lesion, 256) > 0

        def inside(mask: np.ndarray) -> float:
            return float((mask & pasted).sum() / max(1, pasted.sum()))

        rows.setdefault(kind, []).append(
            (dice_score(lungs, truth_mask), dice_score(joined_hu, truth_mask), dice_score(joined_export, truth_mask),
             inside(lungs), inside(joined_hu), inside(joined_export), inside(logits[1, 1] > 0)))
    print("kind, slices | lung Dice: mask / + HU lesions / + export lesions (min: mask / + export) | inside: "
          "mask / + HU / + export (>= 90 %: mask / + export) | export lesion output covers")
    for kind, values in rows.items():
        table = np.array(values)
        mean, low = table.mean(0), table.min(0)
        print(f"{kind:14s} {len(table):3d} | {mean[0]:.4f} / {mean[1]:.4f} / {mean[2]:.4f} (min {low[0]:.4f} / "
              f"{low[2]:.4f}) | {mean[3]:.3f} / {mean[4]:.3f} / {mean[5]:.3f} (>= 90 %: {(table[:, 3] >= 0.9).sum()} / "
              f"{(table[:, 5] >= 0.9).sum()}) | {mean[6]:.3f}")


if __name__ == "__main__":
    main()
