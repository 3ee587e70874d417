"""Does the quality flag catch bad masks, and leave good ones alone?

Runs the bundled model (full pipeline: preprocessing, network, post-processing, quality) on

* the held-out slices of a split (``val`` or ``test``, lungcbir/datasets.py), as stored;
* stress variants made from the same slices: left-right flip, 8-bit lung and mediastinal
  window exports (HU slices), gamma (8-bit slices), JPEG at quality 15, crops that leave a
  sliver of lung at the crop's border (from above and from the side), a crop with no lung
  in it (above the lungs), heavy Gaussian noise;
* synthetic pictures that are not CT at all (constant-ish, text on a white page, colour
  blocks, a photo-like colour gradient with blobs), written to files and read back through
  the ordinary reader so colour is seen as a user's file would be.

For every picture it scores the mask against the (transformed) truth (Dice; for a picture
with no lung in it, 1 when the mask is empty, else 0) and prints, for held-out slices and
variants separately: of the masks with Dice < 0.80 the share flagged (``doubtful`` or
``no-lungs``), of those with Dice >= 0.95 the share flagged, and how the lung-free and
non-CT pictures were judged.

Usage:
  python benchmarks/quality_flag.py                 # report on the test split (never tuned on)
  python benchmarks/quality_flag.py --split val     # the split the thresholds were chosen on
  python benchmarks/quality_flag.py --split val --calibrate   # search thresholds on val
  python benchmarks/quality_flag.py --postprocess-check       # what post-processing removes (item 4)
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import tempfile
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from lungcbir import quality as q
from lungcbir.datasets import LabelledSlice, covid_slices, kaggle_slices
from lungcbir.inference import LungModel, Segmentation
from lungcbir.io import CTSlice, read_file, read_mask
from lungcbir.metrics import dice_score

FAIL_BELOW, GOOD_FROM = 0.80, 0.95


@dataclass
class Case:
    name: str
    kind: str  # "held-out", a variant name, or "non-CT"
    item: CTSlice
    truth: np.ndarray | None  # None for non-CT pictures (the right answer is no-lungs)


def _unit(item: CTSlice) -> np.ndarray:
    from lungcbir.preprocess import normalize_intensity

    return normalize_intensity(item.pixels, item.intensity)


def _export(values: np.ndarray, low: float, high: float) -> np.ndarray:
    return np.round(np.clip((values - low) / (high - low), 0, 1) * 255).astype(np.uint8)


def _jpeg(pixels: np.ndarray, quality: int) -> np.ndarray:
    _, encoded = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, quality])
    return cv2.imdecode(encoded, cv2.IMREAD_UNCHANGED)


def variants(sample: LabelledSlice, rng: np.random.Generator) -> list[Case]:
    """The held-out slice and its stress variants, each with its transformed truth."""
    item = read_file(sample.image)[0]
    truth = read_mask(sample.mask)
    name = os.path.basename(sample.image)
    cases = [Case(name, "held-out", item, truth)]

    def add(kind: str, pixels: np.ndarray, intensity: str, mask: np.ndarray) -> None:
        cases.append(Case(name, kind, CTSlice(np.ascontiguousarray(pixels), intensity, name, "png"),
                          np.ascontiguousarray(mask)))

    add("flip", item.pixels[:, ::-1], item.intensity, truth[:, ::-1])
    if item.intensity == "hu":
        eight_bit = _export(item.pixels.astype(np.float32), -1000, 400)
        add("8-bit lung window", eight_bit, "uint8", truth)
        add("8-bit mediastinal window", _export(item.pixels.astype(np.float32), -160, 240), "uint8", truth)
    else:
        eight_bit = item.pixels.astype(np.uint8)
        add("gamma 0.5", np.round(255 * (eight_bit / 255.0) ** 0.5).astype(np.uint8), "uint8", truth)
    add("JPEG q15", _jpeg(eight_bit, 15), "uint8", truth)
    rows, cols = np.nonzero(truth)
    if rows.size:
        top, bottom, left, right = rows.min(), rows.max(), cols.min(), cols.max()
        # a sliver of lung along the crop's lower border (the crop ends just below the apex)
        for part in (0.12, 0.35):
            cut = top + max(3, int(part * (bottom - top)))
            if cut >= 32:
                add(f"crop: top {part:.0%} of lungs", item.pixels[:cut], item.intensity, truth[:cut])
            # one lung's outer part only, along the crop's right border
            cut = left + max(3, int(part * (right - left)))
            if cut >= 32:
                add(f"crop: side {part:.0%} of lungs", item.pixels[:, :cut], item.intensity, truth[:, :cut])
        # the field of view cuts through the lungs: they touch the crop's border, most is kept
        start = left + max(2, int(0.1 * (right - left)))
        add("crop: lung cut at side", item.pixels[:, start:], item.intensity, truth[:, start:])
        start = top + max(2, int(0.1 * (bottom - top)))
        add("crop: lung cut at top", item.pixels[start:], item.intensity, truth[start:])
        # above the lungs: no lung in view
        if top - 4 >= 40:
            add("crop: no lung", item.pixels[:top - 4], item.intensity, truth[:top - 4])
    noisy = np.clip(_unit(item) + rng.normal(0, 0.25, item.shape), 0, 1).astype(np.float32)
    add("heavy noise", noisy, "unit", truth)
    return cases


def non_ct_pictures(folder: str, count: int, rng: np.random.Generator) -> list[Case]:
    """Synthetic pictures that are not CT, saved as files and read back like a user's upload."""
    cases = []
    for number in range(count):
        side = int(rng.choice([256, 400, 512]))
        pictures = {}
        constant = np.full((side, side), int(rng.integers(0, 256)), np.float32)
        pictures["constant-ish"] = np.clip(constant + rng.normal(0, 1.0, constant.shape), 0, 255).astype(np.uint8)
        page = np.full((side, side, 3), 255, np.uint8)
        for line in range(8):
            cv2.putText(page, f"Patient list {number} row {line} ......", (8, 24 + line * side // 9),
                        cv2.FONT_HERSHEY_SIMPLEX, side / 700, (0, 0, 0), 1)
        cv2.rectangle(page, (0, 0), (side, side // 14), (200, 200, 200), -1)  # a toolbar
        pictures["text on white"] = page
        pictures["text on white (grey)"] = cv2.cvtColor(page, cv2.COLOR_BGR2GRAY)
        blocks = np.zeros((side, side, 3), np.uint8)
        for _ in range(12):
            x, y = rng.integers(0, side, 2)
            w, h = rng.integers(side // 10, side // 2, 2)
            blocks[y:y + h, x:x + w] = rng.integers(0, 256, 3)
        pictures["colour blocks"] = blocks
        yy, xx = np.mgrid[0:side, 0:side] / side
        photo = np.dstack([120 + 100 * np.sin(3 * xx + number), 100 + 80 * yy, 60 + 120 * xx * yy])
        for _ in range(6):  # blurred blobs, like objects in a photo
            cx, cy, radius = rng.integers(0, side), rng.integers(0, side), rng.integers(side // 12, side // 4)
            cv2.circle(photo, (int(cx), int(cy)), int(radius), [float(v) for v in rng.integers(0, 256, 3)], -1)
        photo = cv2.GaussianBlur(np.clip(photo, 0, 255).astype(np.uint8), (0, 0), side / 100)
        pictures["photo-like"] = photo
        pictures["photo-like (grey)"] = cv2.cvtColor(photo, cv2.COLOR_BGR2GRAY)
        for kind, pixels in pictures.items():
            path = os.path.join(folder, f"{kind.replace(' ', '_')}_{number}.png".replace("(", "").replace(")", ""))
            cv2.imwrite(path, pixels)
            cases.append(Case(os.path.basename(path), "non-CT: " + kind, read_file(path)[0], None))
    return cases


def split_samples(split: str) -> list[LabelledSlice]:
    return kaggle_slices()[split] + covid_slices()[split]


@dataclass
class Outcome:
    case: Case
    dice: float
    segmentation: Segmentation


def run(model: LungModel, cases: list[Case]) -> list[Outcome]:
    outcomes = []
    for start in range(0, len(cases), 16):
        chunk = cases[start:start + 16]
        for case, result in zip(chunk, model.segment([c.item for c in chunk])):
            if case.truth is None or not case.truth.any():
                dice = 1.0 if not result.mask.any() else 0.0
            else:
                dice = dice_score(result.mask, case.truth)
            outcomes.append(Outcome(case, dice, result))
    return outcomes


def verdicts(outcomes: list[Outcome]) -> list[q.QualityVerdict]:
    return [q.assess(o.segmentation.signals) for o in outcomes]


def share(values: list[bool]) -> str:
    return f"{np.mean(values):6.1%} ({sum(values)}/{len(values)})" if values else "   -   (0/0)"


def report(outcomes: list[Outcome], judged: list[q.QualityVerdict]) -> dict:
    """Print and return the figures."""
    figures = {}
    groups = {"held-out slices as stored": lambda o: o.case.kind == "held-out",
              "stress variants (slices with lungs)": lambda o: (o.case.kind not in ("held-out", "crop: no lung")
                                                                and not o.case.kind.startswith("non-CT")),
              "held-out + variants": lambda o: o.case.truth is not None and o.case.truth.any()}
    for title, chosen in groups.items():
        picked = [(o, v) for o, v in zip(outcomes, judged) if chosen(o) and o.case.truth is not None
                  and o.case.truth.any()]
        failing = [v.quality != q.Quality.OK for o, v in picked if o.dice < FAIL_BELOW]
        good = [v.quality != q.Quality.OK for o, v in picked if o.dice >= GOOD_FROM]
        print(f"{title}: {len(picked)} pictures")
        print(f"  Dice < {FAIL_BELOW:.2f}: flagged {share(failing)}   (target >= 90 %)")
        print(f"  Dice >= {GOOD_FROM:.2f}: flagged {share(good)}   (target <= 5 %)")
        figures[title] = {"pictures": len(picked), "failing": len(failing), "failing_flagged": sum(failing),
                          "good": len(good), "good_flagged": sum(good)}
    print("per kind: pictures, Dice<0.80 flagged, Dice>=0.95 flagged, no-lungs verdicts")
    for kind in sorted({o.case.kind for o in outcomes}):
        picked = [(o, v) for o, v in zip(outcomes, judged) if o.case.kind == kind]
        failing = [v.quality != q.Quality.OK for o, v in picked if o.dice < FAIL_BELOW]
        good = [v.quality != q.Quality.OK for o, v in picked if o.dice >= GOOD_FROM]
        no_lungs = [v.quality == q.Quality.NO_LUNGS for _, v in picked]
        print(f"  {kind:<30} {len(picked):>4}  {share(failing):>16}  {share(good):>16}  no-lungs {share(no_lungs)}")
    return figures


# --- threshold search on val (--calibrate) -------------------------------------------------

SEARCH = {
    "BAND_GOOD": [0.4, 0.5, 0.6, 0.8], "BAND_BAD": [0.8, 1.0, 1.2, 1.5, 2.0],
    "REMOVED_GOOD": [0.02, 0.05], "REMOVED_BAD": [0.2, 0.5],
    "AREA_GOOD": [0.03, 0.05, 0.08, 0.1], "AREA_BAD": [0.005, 0.01],
    "CONTRAST_GOOD": [0.1, 0.15, 0.2], "CONTRAST_BAD": [0.0, 0.05],
}


def calibrate(outcomes: list[Outcome]) -> None:
    """Grid-search the doubtful thresholds on these outcomes: most failures caught with at most
    5 % of good masks flagged (then fewest good flagged)."""
    with_lungs = [o for o in outcomes if o.case.truth is not None and o.case.truth.any()]
    best = None
    names = list(SEARCH)
    for values in itertools.product(*(SEARCH[n] for n in names)):
        setting = dict(zip(names, values))
        if setting["BAND_BAD"] <= setting["BAND_GOOD"] or setting["AREA_BAD"] >= setting["AREA_GOOD"]:
            continue
        for name, value in setting.items():
            setattr(q, name, value)
        judged = verdicts(with_lungs)
        failing = [v.quality != q.Quality.OK for o, v in zip(with_lungs, judged) if o.dice < FAIL_BELOW]
        good = [v.quality != q.Quality.OK for o, v in zip(with_lungs, judged) if o.dice >= GOOD_FROM]
        recall, false_rate = np.mean(failing), np.mean(good)
        key = (false_rate <= 0.05, recall, -false_rate)
        if best is None or key > best[0]:
            best = (key, setting, recall, false_rate)
    _, setting, recall, false_rate = best
    for name, value in setting.items():  # report below with the chosen setting
        setattr(q, name, value)
    print(f"best on these pictures: recall {recall:.3f}, good flagged {false_rate:.3f}: {setting}")


def postprocess_check(model: LungModel) -> None:
    """How much true lung post-processing removes: every held-out slice and
    variant with lungs, segmented with and without post-processing; removed = lung in the raw
    mask but not in the cleaned one, true = also in the ground truth."""
    rng = np.random.default_rng(0)
    for split in ("val", "test"):
        cases = [c for s in split_samples(split) for c in variants(s, rng) if c.truth.any()]
        model.settings.postprocess = False
        raw = [r.mask for r in _segment(model, cases)]
        model.settings.postprocess = True
        cleaned = [r.mask for r in _segment(model, cases)]
        for kind in sorted({c.kind for c in cases}):
            chosen = [i for i, c in enumerate(cases) if c.kind == kind]
            lost = np.array([(raw[i] & ~cleaned[i] & cases[i].truth).sum() / cases[i].truth.sum() for i in chosen])
            false = np.array([(raw[i] & ~cleaned[i] & ~cases[i].truth).sum() / cases[i].truth.sum() for i in chosen])
            gain = np.array([dice_score(cleaned[i], cases[i].truth) - dice_score(raw[i], cases[i].truth)
                             for i in chosen])
            print(f"{split} {kind:<26} {len(chosen):>4}: true lung removed: "
                  f"mean {lost.mean():.4f} max {lost.max():.4f} "
                  f"(> 1 % of the lung in {int((lost > 0.01).sum())}); non-lung removed mean {false.mean():.4f}; "
                  f"Dice change mean {gain.mean():+.4f} min {gain.min():+.4f}")


def _segment(model: LungModel, cases: list[Case]) -> list[Segmentation]:
    return [r for start in range(0, len(cases), 16) for r in model.segment([c.item for c in cases[start:start + 16]])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--split", default="test", choices=["val", "test"])
    parser.add_argument("--weights")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--non-ct", type=int, default=8, help="Synthetic non-CT pictures of each kind.")
    parser.add_argument("--calibrate", action="store_true")
    parser.add_argument("--postprocess-check", action="store_true")
    parser.add_argument("--dump", help="Write per-picture signals and Dice to this JSON file.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = LungModel.load(args.weights)
    if args.postprocess_check:
        postprocess_check(model)
        return
    rng = np.random.default_rng(0 if args.split == "val" else 1)
    cases = [c for s in split_samples(args.split) for c in variants(s, rng)]
    with tempfile.TemporaryDirectory() as folder:
        cases += non_ct_pictures(folder, args.non_ct, rng)
        outcomes = run(model, cases)
    print(f"split {args.split}, model {model.model_id}, {len(outcomes)} pictures")
    if args.dump:
        with open(args.dump, "w") as handle:
            json.dump([{"name": o.case.name, "kind": o.case.kind, "dice": o.dice,
                        "truth_share": float(o.case.truth.mean()) if o.case.truth is not None else None,
                        **o.segmentation.signals.to_json()} for o in outcomes], handle)
    if args.calibrate:
        calibrate(outcomes)
    report(outcomes, verdicts(outcomes))


if __name__ == "__main__":
    main()
