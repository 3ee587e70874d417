"""Choose lesion-inclusive lung masks on val: real val Dice beside SYNTHETIC dense disease in HU.

For each weights file (or training state ``OUT.pt.state``, read with the bundled network's
shape): mean lung Dice on the val slices of kaggle-lungs-2d and covid19-ct-lungmask, and on the
val split's SYNTHETIC consolidation and dependent density pasted into Kaggle val slices in HU
(lungcbir.research.synthetic_disease), its mean Dice and the share of each pasted lesion inside
the mask (mean, and how many are at least 90 % inside). The lung output alone, at the model
input (256 x 256), without post-processing: what a lung-decoder fine-tune changes.

Usage: PYTHONPATH=. python benchmarks/lesion_inclusive_val.py bundled W.pt [OUT.pt.state ...]
           [--cache runs/train_cache.npz] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
from dataclasses import replace

import numpy as np
import torch

from benchmarks.train_bundled_model import load_cache, load_split, synthetic_val_samples
from lungcbir.inference import load_network
from lungcbir.metrics import dice_score
from lungcbir.model import UNet
from lungcbir.preprocess import mask_to_model, normalize_intensity
from lungcbir.research.synthetic_disease import diseased_slices
from lungcbir.train import TrainConfig, TrainingSample


def network(path: str) -> UNet:
    if not path.endswith(".state"):
        return load_network(None if path == "bundled" else path)[0].eval()
    state = torch.load(path, map_location="cpu", weights_only=False)["network"]
    _, settings, _ = load_network(None)
    levels = settings.unet.lesion_levels if any(k.startswith("lesion_") for k in state) else 0
    net = UNet(replace(settings.unet, lesion_levels=levels))
    net.load_state_dict(state)
    return net.eval()


def lung_masks(net: UNet, samples: list[TrainingSample]) -> np.ndarray:
    images = np.stack([normalize_intensity(s.pixels, s.intensity, (-1000.0, 400.0)) for s in samples])[:, None]
    with torch.inference_mode():
        return np.concatenate([net(torch.from_numpy(images[i:i + 16]))[:, 0].numpy() > 0
                               for i in range(0, len(images), 16)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("weights", nargs="+")
    parser.add_argument("--cache", help="the training script's cache of resized slices (read if it exists)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = TrainConfig()
    split = load_cache(args.cache) if args.cache and os.path.exists(args.cache) else load_split(config)
    synthetic = synthetic_val_samples(config)
    lesions = [mask_to_model(case.lesion, config.input_size) > 0
               for case in diseased_slices("val", kinds=("consolidation", "dependent"))]
    print("weights | kaggle val Dice | covid19 val Dice | SYNTHETIC val Dice | lesion inside: mean, >= 90 %")
    for path in args.weights:
        net = network(path)
        real = [np.mean([dice_score(m, s.mask) for m, s in zip(lung_masks(net, split[source]["val"]),
                                                                 split[source]["val"])])
                for source in ("kaggle", "covid19")]
        masks = lung_masks(net, synthetic)
        dice = np.mean([dice_score(m, s.mask) for m, s in zip(masks, synthetic)])
        inside = np.array([(m & lesion).sum() / max(1, lesion.sum()) for m, lesion in zip(masks, lesions)])
        print(f"{path} | {real[0]:.4f} | {real[1]:.4f} | {dice:.3f} | {inside.mean():.3f}, "
              f"{int((inside >= 0.9).sum())}/{len(inside)}", flush=True)


if __name__ == "__main__":
    main()
