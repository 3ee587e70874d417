"""Train the model bundled as lungcbir/weights/lung_unet.pt on the shared data's train split.

Usage: python benchmarks/train_bundled_model.py OUT.pt [--epochs N] [--device cpu|cuda] [--only kaggle|covid19]

Validation (checkpoint choice) uses the val split; the test split is never seen here.
"""

from __future__ import annotations

import argparse
import sys

from lungcbir.datasets import covid_slices, kaggle_slices
from lungcbir.train import TrainConfig, load_sample, train


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", choices=["kaggle", "covid19"])
    parser.add_argument("--kaggle-repeats", type=int, default=2, help="oversample the smaller HU set")
    parser.add_argument("--infection-head", action="store_true",
                        help="also learn COVID-19 lesions (the variant that was tried and not shipped)")
    args = parser.parse_args()
    config = TrainConfig(epochs=args.epochs, infection_head=args.infection_head)
    sources = {"kaggle": kaggle_slices(), "covid19": covid_slices()}
    if args.only:
        sources = {args.only: sources[args.only]}
    train_set, val_set = [], []
    for name, parts in sources.items():
        loaded = [load_sample(s.image, s.mask, config.input_size, s.group,
                              s.infection if config.infection_head else None) for s in parts["train"]]
        repeats = args.kaggle_repeats if name == "kaggle" and len(sources) > 1 else 1
        train_set += loaded * repeats
        val_set += [load_sample(s.image, s.mask, config.input_size, s.group) for s in parts["val"]]
    print(f"train {len(train_set)} views, val {len(val_set)} slices", flush=True)
    for report in train(train_set, val_set, args.out, config, device=args.device, resume=True,
                        on_epoch=lambda r: print(r, flush=True)):
        pass
    sys.exit(0)


if __name__ == "__main__":
    main()
