"""Train the model bundled as lungcbir/weights/lung_unet.pt on the shared data's train split.

Usage: python benchmarks/train_bundled_model.py OUT.pt [--epochs N] [--device cpu|cuda]
           [--only kaggle|covid19] [--base-channels C] [--contrastive W] [--cache FILE.npz]
           [--workers N] [--init W.pt|bundled] [--learning-rate LR] [--seed S]
           [--infection-head | --lesion-levels N] [--freeze-encoder] [--pathology] [--kaggle-lesion-free]
           [--steps-per-epoch N] [--slice-labels REPEATS] [--threads N]
           [--pathology-kinds K,K] [--pathology-probability P] [--lung-levels N] [--lesion-lung-weight W]
           [--teacher W.pt|bundled] [--distillation-weight W] [--synthetic-val]
       python benchmarks/train_bundled_model.py W.pt --centre-only
       python benchmarks/train_bundled_model.py OUT.pt --graft BRANCH.pt LUNGS.pt

After training, the centre (mean vector of the train split's slices, lungcbir.centring) is
computed and saved in OUT.pt's settings, for a model with a lesion output together with the
findings part of its vector (``--findings-statistics``, ``--balanced-anatomy``; chosen on the
choice split, docs/retrieval.md); ``--centre-only`` does only that, in place, for weights
trained before (how the bundled model got its centre). Both read the train split's files from
../shared/data.

The bundled model, in three steps (MODEL_CARD.md):

1. the lung network (run I): I.pt --epochs 140 --contrastive 0.5 --seed 1 --device cuda
   --workers 4, stopped by the time limit at epoch 137;
2. its lesion branch on the frozen lung network (run L4): L4.pt --init I.pt --lesion-levels 4
   --kaggle-lesion-free --contrastive 0 --epochs 26 --steps-per-epoch 8 --learning-rate 2e-3
   --threads 1 --seed 1 (CPU, about 10 minutes);
3. its findings part, chosen on the retrieval choice split (benchmarks/choose_findings.py), and
   the centre: L4.pt --centre-only --findings-statistics 1.0 --balanced-anatomy 0.5.

The lesion-output runs A-E of MODEL_CARD.md (tried, not adopted) are fine-tunes of run I, e.g.
run A: OUT.pt --init bundled --infection-head --freeze-encoder --contrastive 0 --epochs 16
--steps-per-epoch 8 --learning-rate 1e-3 --seed 1.
Validation (checkpoint choice) uses the val split; the test split is never seen here.
``--cache`` keeps the slices, already resized to the model input, in one compressed file
(about 40 MB), so a training machine without ../shared/data can run from it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os

import numpy as np
import torch

from lungcbir.augment import PATHOLOGY_KINDS
from lungcbir.centring import add_training_centre
from lungcbir.datasets import covid_slices, kaggle_slices
from lungcbir.features import FindingsConfig
from lungcbir.inference import LungModel
from lungcbir.io import CTSlice
from lungcbir.preprocess import mask_to_model
from lungcbir.research.retrieval_benchmark import CHOICE_SPLIT, covid_ct_md_items
from lungcbir.research.synthetic_disease import diseased_slices
from lungcbir.train import (
    TrainConfig,
    TrainingSample,
    graft_lung_levels,
    load_sample,
    model_pixels,
    slice_labelled_sample,
    train,
)


def load_split(config: TrainConfig) -> dict[str, dict[str, list[TrainingSample]]]:
    """Train and val samples of each source, resized to the model input."""
    split = {}
    for name, parts in (("kaggle", kaggle_slices()), ("covid19", covid_slices())):
        # lesion masks teach a lesion output, and give the shapes pasted consolidation is cut from
        lesions = config.infection_head or config.lesion_levels or (config.pathology
                                                                    and "consolidation" in config.pathology_kinds)
        split[name] = {part: [dataclasses.replace(load_sample(s.image, s.mask, config.input_size, s.group,
                                                              s.infection if lesions else None),
                                                  series=s.series, position=s.position)
                              for s in parts[part]] for part in ("train", "val")}
    return split


def slice_labelled_samples(config: TrainConfig, lungs_from: str | None) -> list[TrainingSample]:
    """covid-ct-md's choice-split series (HU, another hospital) with their slice labels: infected
    slices teach the lesion output by slice label (lungcbir.train.slice_label_loss), the others
    (the normal patient's too) count as lesion-free. Lung masks from the ``lungs_from`` model
    (the frozen lung network the branch learns on)."""
    items = covid_ct_md_items(series=CHOICE_SPLIT.series)
    model = LungModel.load(None if lungs_from in (None, "bundled") else lungs_from)
    masks = [result.mask for result in model.segment([item.slice for item in items])]
    return [slice_labelled_sample(item.slice, mask, bool(item.infected), config.input_size, item.patient,
                                  item.series, item.index_in_series) for item, mask in zip(items, masks)]


def synthetic_val_samples(config: TrainConfig) -> list[TrainingSample]:
    """The val split's SYNTHETIC dense disease in HU as val samples: the Kaggle val slices with
    pasted consolidation or dependent density, whose lung mask (the truth) includes them."""
    samples = []
    for case in diseased_slices("val", kinds=("consolidation", "dependent")):
        item = CTSlice(case.pixels, "hu", case.name, "tiff")
        samples.append(TrainingSample(f"{case.name}:{case.kind}", f"synthetic:{case.name}",
                                      model_pixels(item, config.input_size), "hu",
                                      mask_to_model(case.truth, config.input_size)))
    return samples


def save_cache(path: str, split: dict) -> None:
    arrays, rows = {}, []
    for source, parts in split.items():
        for part, samples in parts.items():
            for number, sample in enumerate(samples):
                key = f"{source}.{part}.{number}"
                arrays[key + ".pixels"] = sample.pixels.astype(np.float16 if sample.intensity == "hu" else np.float32)
                arrays[key + ".mask"] = sample.mask
                if sample.infection is not None:
                    arrays[key + ".infection"] = sample.infection
                rows.append([key, source, part, sample.name, sample.group, sample.intensity,
                             sample.series or "", -1 if sample.position is None else sample.position])
    np.savez_compressed(path, rows=np.array(rows, dtype=str), **arrays)


def load_cache(path: str) -> dict:
    data = np.load(path)
    split: dict = {}
    for key, source, part, name, group, intensity, series, position in data["rows"]:
        infection = data[key + ".infection"] if key + ".infection" in data else None
        sample = TrainingSample(str(name), str(group), data[key + ".pixels"].astype(np.float32), str(intensity),
                                data[key + ".mask"], infection, str(series) or None,
                                None if int(position) < 0 else int(position))
        split.setdefault(str(source), {"train": [], "val": []})[str(part)].append(sample)
    return split


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", choices=["kaggle", "covid19"])
    parser.add_argument("--kaggle-repeats", type=int, default=2, help="oversample the smaller HU set")
    parser.add_argument("--base-channels", type=int, default=TrainConfig.base_channels)
    parser.add_argument("--contrastive", type=float, default=TrainConfig.contrastive_weight,
                        help="weight of the contrastive loss (0: segmentation only)")
    parser.add_argument("--init", help='start from these weights ("bundled": the package\'s model)')
    parser.add_argument("--learning-rate", type=float, default=TrainConfig.learning_rate)
    parser.add_argument("--seed", type=int, default=TrainConfig.seed)
    parser.add_argument("--workers", type=int, default=0, help="processes preparing augmented views")
    parser.add_argument("--cache", help="read the resized slices from this .npz (written if missing)")
    parser.add_argument("--infection-head", action="store_true",
                        help="a second output channel learns the COVID-19 lesions (a fresh head with --init)")
    parser.add_argument("--lesion-levels", type=int, default=0,
                        help="a lesion branch, a copy of the last N decoder levels, learns on frozen --init "
                             "weights (lung mask and vector unchanged)")
    parser.add_argument("--pathology", action="store_true",
                        help="synthetic disease in the lung field and further exports (lungcbir/augment.py)")
    parser.add_argument("--freeze-encoder", action="store_true",
                        help="train the decoder and heads only (the retrieval bottleneck stays as --init's)")
    parser.add_argument("--steps-per-epoch", type=int, default=0, help="0: every training view once an epoch")
    parser.add_argument("--kaggle-lesion-free", action="store_true",
                        help="treat the Kaggle training slices as known lesion-free (lesion negatives in HU); "
                             "with --pathology, consolidation pasted into them becomes a lesion label")
    parser.add_argument("--slice-labels", type=int, default=0, metavar="REPEATS",
                        help="also learn lesions from covid-ct-md's choice-split series by slice label "
                             "(lesion branch on frozen --init weights), each slice REPEATS times an epoch")
    parser.add_argument("--pathology-kinds", default=",".join(PATHOLOGY_KINDS),
                        help=f"the synthetic findings --pathology draws, comma-separated ({','.join(PATHOLOGY_KINDS)})")
    parser.add_argument("--pathology-probability", type=float, default=0.0,
                        help="draw every --pathology kind with this probability (0: each kind's own)")
    parser.add_argument("--lesion-lung-weight", type=float, default=0.0,
                        help="add the lung output's cross-entropy over lesion pixels (real and pasted) with "
                             "this weight: dense disease must be lung")
    parser.add_argument("--lung-levels", type=int, default=0,
                        help="train only the lung decoder's last N levels and the lung head on frozen --init "
                             "weights (the bottleneck and the levels a lesion branch of depth-N levels reads "
                             "stay as they are)")
    parser.add_argument("--teacher", help='with --lesion-levels: a model ("bundled" or W.pt) whose lesion output the '
                                          "branch also learns (distillation), its branch's last levels the start")
    parser.add_argument("--distillation-weight", type=float, default=1.0,
                        help="weight of the teacher's lesion probabilities in the loss (with --teacher)")
    parser.add_argument("--synthetic-val", action="store_true",
                        help="also validate on the val split's SYNTHETIC dense disease in HU (consolidation and "
                             "dependent density pasted into Kaggle val slices, the lung mask the truth; "
                             "lungcbir.research.synthetic_disease), so the checkpoint is chosen on both")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--centre-only", action="store_true",
                        help="only compute the training centre and save it in OUT (no training)")
    parser.add_argument("--findings-statistics", type=float, default=FindingsConfig.statistics_weight,
                        help="models with a lesion output: weight of the lesion statistics in the findings part")
    parser.add_argument("--balanced-anatomy", type=float, default=FindingsConfig.balanced_anatomy_weight,
                        help="models with a lesion output: the anatomy part's weight in the balanced focus")
    parser.add_argument("--graft", nargs=2, metavar=("BRANCH.pt", "LUNGS.pt"),
                        help="no training: OUT = BRANCH's model with the last lung levels of LUNGS (trained with "
                             "--lung-levels on the same frozen lungs), then its centre and findings part")
    args = parser.parse_args()
    findings = FindingsConfig(statistics_weight=args.findings_statistics,
                              balanced_anatomy_weight=args.balanced_anatomy)
    if args.graft:
        graft_lung_levels(*args.graft, args.out)
    if args.centre_only or args.graft:
        finish(args.out, findings)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    config = TrainConfig(epochs=args.epochs, infection_head=args.infection_head, pathology=args.pathology,
                         lesion_levels=args.lesion_levels,
                         steps_per_epoch=args.steps_per_epoch, freeze_encoder=args.freeze_encoder,
                         base_channels=args.base_channels, contrastive_weight=args.contrastive,
                         learning_rate=args.learning_rate, seed=args.seed,
                         pathology_kinds=tuple(args.pathology_kinds.split(",")), lung_levels=args.lung_levels,
                         pathology_probability=args.pathology_probability,
                         lesion_lung_weight=args.lesion_lung_weight,
                         teacher=args.teacher, distillation_weight=args.distillation_weight if args.teacher else 0.0)
    if args.cache and os.path.exists(args.cache):
        split = load_cache(args.cache)
    else:
        split = load_split(config)
        if args.cache:
            save_cache(args.cache, split)
    if args.only:
        split = {args.only: split[args.only]}
    train_set, val_set = [], []
    for name, parts in split.items():
        repeats = args.kaggle_repeats if name == "kaggle" and len(split) > 1 else 1
        train_part = parts["train"]
        if name == "kaggle" and args.kaggle_lesion_free:
            train_part = [dataclasses.replace(s, infection=np.zeros_like(s.mask)) for s in train_part]
        train_set += train_part * repeats
        val_set += parts["val"]
    if args.slice_labels:
        if not args.lesion_levels:
            raise SystemExit("--slice-labels teaches a lesion branch: give --lesion-levels")
        train_set += slice_labelled_samples(config, args.init) * args.slice_labels
    if args.synthetic_val:
        val_set += synthetic_val_samples(config)
    print(f"train {len(train_set)} views, val {len(val_set)} slices", flush=True)
    for report in train(train_set, val_set, args.out, config, device=args.device, resume=True,
                        on_epoch=lambda r: print(r, flush=True), workers=args.workers,
                        initial_weights=args.init):
        pass
    finish(args.out, findings)


def finish(weights: str, findings: FindingsConfig) -> None:
    """Save the centre (the mean vector of the train split, so scores spread over [-1, 1]) and, for
    a model with a lesion output, the findings part of its vector."""
    lesions = LungModel.load(weights).has_lesion_head
    add_training_centre(weights, findings=findings if lesions else None)
    print(f"centre{' and findings part' if lesions else ''} saved in {weights}", flush=True)


if __name__ == "__main__":
    main()
