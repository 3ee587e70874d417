"""CPU segmentation speed of the lungcbir model, compared in the same run with lungmask's R231.

Prints throughput (slices/s) at the model's input size for batch sizes 1 and 16, the parameter
count and FLOPs per slice; then times both full pipelines (read arrays -> preprocess -> network
-> post-processing -> masks at 512x512) on the same 16 real Kaggle slices. lungmask's weights
cannot be downloaded here, so its R231 architecture runs with random weights: speed does not
depend on weight values.

``--compare OTHER.pt`` ("bundled" for the package's model) also times that model's full pipeline,
interleaved with this one's in the same run, and prints the ratio. ``--runtime`` picks where the
network runs (default ``auto``: ONNX Runtime on the CPU); ``--compare-runtime torch`` times the
same model in that runtime too, network (batch 16) and full pipeline interleaved with the first,
and prints the ratios per repeat.

Usage: python benchmarks/segmentation_speed.py [--weights W.pt] [--threads 2] [--repeats 3] [--compare W.pt]
                                               [--runtime auto] [--compare-runtime torch]
The lungmask comparison needs: pip install lungmask (not a lungcbir dependency); without it, it is skipped.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from lungcbir.config import Settings
from lungcbir.datasets import kaggle_slices
from lungcbir.inference import LungModel
from lungcbir.io import read_file
from lungcbir.model import UNet


def best_of(repeats: int, work) -> float:
    timings = []
    for _ in range(repeats):
        began = time.perf_counter()
        work()
        timings.append(time.perf_counter() - began)
    return min(timings)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--weights")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compare", help='another model to time in the same run ("bundled": the package\'s)')
    parser.add_argument("--runtime", default=None, help="where the network runs (auto, onnx, torch)")
    parser.add_argument("--compare-runtime", help="time the same model in this runtime too, interleaved")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = dataclasses.replace(Settings.from_environment(), threads=args.threads)
    model = LungModel.load(args.weights, runtime=args.runtime, settings=settings)
    size = model.input_size
    parameters = sum(p.numel() for p in UNet(model.settings.unet).parameters())  # as trained, before folding
    with FlopCounterMode(display=False) as counter:
        with torch.inference_mode():
            model.network(torch.zeros(1, 1, size, size))
    print(f"runtime {model.runtime}; load average {os.getloadavg()[0]:.1f}")
    print(f"lungcbir model {model.model_id}: {parameters / 1e6:.2f} M parameters, "
          f"{counter.get_total_flops() / 2 / 1e9:.2f} GMAC ({counter.get_total_flops() / 1e9:.2f} GFLOP) per slice "
          f"at {size}x{size}, {args.threads} threads")
    for batch in (1, 16):
        inputs = np.random.default_rng(0).random((batch, size, size), dtype=np.float32)
        model.run(inputs)  # warm-up
        seconds = best_of(args.repeats, lambda: model.run(inputs))
        print(f"  network, batch {batch:>2}: {batch / seconds:7.1f} slices/s")

    slices = [read_file(s.image)[0] for s in kaggle_slices()["test"][:16]]
    model.segment(slices[:2])
    ours = 16 / best_of(args.repeats, lambda: model.segment(slices, batch_size=16))
    print(f"  full pipeline, 16 Kaggle slices 512x512: {ours:7.1f} slices/s")
    # the quality verdict's cost: the same pipeline with the verdict replaced by a constant, interleaved
    import lungcbir.inference as inference

    judge, verdict = inference.judge, inference.judge(*(np.zeros((size, size), np.float32),) * 3)
    timings = {"with": [], "without": []}
    for _ in range(args.repeats):
        for name in timings:
            inference.judge = judge if name == "with" else (lambda *_, **__: verdict)
            timings[name].append(best_of(1, lambda: model.segment(slices, batch_size=16)))
    inference.judge = judge
    with_quality, without = 16 / min(timings["with"]), 16 / min(timings["without"])
    print(f"  full pipeline without the quality verdict: {without:7.1f} slices/s; with it {with_quality:7.1f} "
          f"(ratio {with_quality / without:.3f})")
    if args.compare_runtime:
        other = LungModel.load(args.weights, runtime=args.compare_runtime, settings=settings)
        inputs = np.random.default_rng(0).random((16, size, size), dtype=np.float32)
        other.run(inputs)  # warm-up (and the ONNX export, if not cached)
        network: dict[str, list[float]] = {"this": [], "other": []}
        pipeline: dict[str, list[float]] = {"this": [], "other": []}
        for _ in range(args.repeats):  # interleaved, so both see the same load on a shared machine
            for name, candidate in (("this", model), ("other", other)):
                network[name].append(16 / best_of(1, lambda: candidate.run(inputs)))
                pipeline[name].append(16 / best_of(1, lambda: candidate.segment(slices, batch_size=16)))
        for label, measured in (("network, batch 16", network), ("full pipeline", pipeline)):
            ratios = [a / b for a, b in zip(measured["this"], measured["other"])]
            print(f"  {label}: {model.runtime} {', '.join(f'{r:.1f}' for r in measured['this'])} slices/s; "
                  f"{other.runtime} {', '.join(f'{r:.1f}' for r in measured['other'])}; ratios "
                  f"{', '.join(f'{r:.2f}' for r in ratios)} (median {np.median(ratios):.2f}); load average "
                  f"{os.getloadavg()[0]:.1f}")
    if args.compare:
        other = LungModel.load(None if args.compare == "bundled" else args.compare)
        other.segment(slices[:2])
        rates: dict[str, list[float]] = {"this": [], "other": []}
        for _ in range(args.repeats):  # interleaved, so both see the same load on a shared machine
            for name, candidate in (("this", model), ("other", other)):
                rates[name].append(16 / best_of(1, lambda: candidate.segment(slices, batch_size=16)))
        print(f"  interleaved full pipelines: this model {max(rates['this']):.1f} slices/s, "
              f"{other.model_id} {max(rates['other']):.1f} slices/s, "
              f"ratio {max(rates['this']) / max(rates['other']):.2f}")

    try:
        from lungmask import LMInferer
        from lungmask.resunet import UNet as LungmaskUNet
    except ImportError:
        print("lungmask is not installed (pip install lungmask): its comparison is skipped")
        return

    torch.manual_seed(0)
    r231 = LungmaskUNet(n_classes=3, padding=True, depth=5, up_mode="upsample", batch_norm=True, residual=False)
    lm_parameters = sum(p.numel() for p in r231.parameters())
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "r231_random.pth")
        torch.save(r231.state_dict(), path)
        inferer = LMInferer(modelpath=path, force_cpu=True, batch_size=16, tqdm_disable=True)
    torch.set_num_threads(args.threads)
    volume = np.stack([np.clip(s.pixels, -1024, 3071) for s in slices]).astype(np.int16)
    inferer.apply(volume[:2])
    lungmask_rate = 16 / best_of(max(1, args.repeats - 1), lambda: inferer.apply(volume))
    print(f"lungmask R231 (random weights, {lm_parameters / 1e6:.1f} M parameters), full pipeline, "
          f"same 16 slices: {lungmask_rate:7.2f} slices/s")
    print(f"ratio lungcbir / lungmask (full pipelines): {ours / lungmask_rate:.0f}x")


if __name__ == "__main__":
    main()
