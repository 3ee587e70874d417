"""Where the network runs: torch, or ONNX Runtime on the CPU (about twice as fast there).

:data:`RUNTIME_REGISTRY` maps a name (``--runtime``, ``LUNGCBIR_RUNTIME``) to a
:class:`Runtime`, whose ``start`` turns the inference network into a *forward* function:
prepared inputs ``(N, 1, S, S)`` float32 -> (per-channel sigmoid probabilities ``(N, C, S, S)``,
bottleneck ``(N, B, s, s)``), both torch tensors. Everything after it (pooling, centring,
post-processing) is the same whatever the runtime.

The ONNX model is never a second source of truth: it is generated from the torch weights on
first use, checked against torch on one input, and kept in the cache folder
(``<cache>/onnx/<model id>.onnx`` with a note of the model id, a digest of the weights it came
from and its own SHA-256). A cached file that is corrupt, of another model or of other weights
is generated again; a cache folder that cannot be written only costs the export on every start.
Torch stays for training and as ``--runtime torch`` (and on CUDA, which the CPU build of ONNX
Runtime does not serve).
"""

from __future__ import annotations

import hashlib
import inspect
import io
import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from .config import DEFAULT_RUNTIME, ConfigError
from .errors import WeightsError
from .fileutils import write_atomically

if TYPE_CHECKING:  # torch and ONNX Runtime are imported when a runtime starts: the CLI starts without them
    import torch

    from .model import UNet

#: The exported graph's version: bump it when the export changes, so cached models are redone.
ONNX_EXPORT_FORMAT = "lungcbir-onnx/1"
ONNX_OPSET = 17
#: An export whose outputs differ from torch's by more than this (absolute, on probabilities
#: and bottleneck) is refused: a converter bug must not change masks or vectors.
ONNX_TOLERANCE = 1e-4

#: prepared inputs (N, 1, S, S) float32 -> (sigmoid of every output channel, bottleneck)
Forward = Callable[[np.ndarray], "tuple[torch.Tensor, torch.Tensor]"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RuntimeOptions:
    """How a runtime starts: session threads (None: the CPUs this process may use; torch
    keeps its own process-wide setting, which a library does not change) and the cache folder."""

    threads: int | None = None
    cache_dir: Path | None = None


@dataclass(frozen=True)
class Runtime:
    """One way to run the network. ``start(network, model_id, device, input_size, options)``
    gives its forward function for inputs of ``input_size`` squared; ``devices``: where it can run."""

    name: str
    description: str
    start: Callable[[UNet, str, str, int, RuntimeOptions], Forward]
    devices: tuple[str, ...]


def available_cpus() -> int:
    """CPUs this process may run on (its affinity, e.g. a container's share), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


# -- torch ---------------------------------------------------------------------------------------


def _start_torch(network: UNet, model_id: str, device: str, input_size: int, options: RuntimeOptions) -> Forward:
    import torch

    @torch.inference_mode()
    def forward(inputs: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        batch = torch.from_numpy(np.ascontiguousarray(inputs, dtype=np.float32)).to(device)
        batch = batch.to(memory_format=torch.channels_last)
        logits, bottleneck = network.forward_with_bottleneck(batch)
        return torch.sigmoid(logits.float()), bottleneck

    return forward


# -- ONNX Runtime ----------------------------------------------------------------------------------


def weights_digest(network: UNet) -> str:
    """SHA-256 of the network's tensors as they run (after batch-norm folding): what a cached
    ONNX model must have been generated from, whatever id the caller gave the model."""
    digest = hashlib.sha256(ONNX_EXPORT_FORMAT.encode())
    for key, value in sorted(network.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().float().contiguous().numpy().tobytes())
    return digest.hexdigest()


def export_onnx(network: UNet, size: int) -> bytes:
    """The network as an ONNX model (batch size free, float32), checked against torch."""
    import torch

    class Exported(torch.nn.Module):
        """What the graph computes: the sigmoid inside it, so ONNX Runtime fuses it."""

        def __init__(self) -> None:
            super().__init__()
            self.network = network

        def forward(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            logits, bottleneck = self.network.forward_with_bottleneck(inputs)
            return torch.sigmoid(logits), bottleneck

    wrapper = Exported().eval()
    example = torch.rand(2, network.config.in_channels, size, size, generator=torch.Generator().manual_seed(0))
    buffer = io.BytesIO()
    options: dict = {}
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        options["dynamo"] = False  # the TorchScript exporter: no onnxscript needed, one graph for any batch
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracer notes, not ours to act on
        # the exporter writes to a file object too; its annotation lists paths only
        torch.onnx.export(wrapper, (example,), buffer, input_names=["input"],  # type: ignore[arg-type]
                          output_names=["probabilities", "bottleneck"], opset_version=ONNX_OPSET,
                          dynamic_axes={name: {0: "batch"} for name in ("input", "probabilities", "bottleneck")},
                          **options)
    model = buffer.getvalue()
    with torch.no_grad():
        expected = [tensor.numpy() for tensor in wrapper(example)]
    got = _session(model, 1).run(None, {"input": example.numpy()})
    worst = max(float(np.abs(a - b).max()) for a, b in zip(got, expected))
    if not worst <= ONNX_TOLERANCE:
        raise WeightsError(f"the ONNX export differs from torch by {worst:.2g} (> {ONNX_TOLERANCE}); "
                           f"use --runtime torch")
    return model


def _session(model: bytes, threads: int):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads  # this session's own pool: nothing process-wide changes
    options.inter_op_num_threads = 1  # one chain of convolutions: nothing to run side by side
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only
    return onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def cached_onnx(network: UNet, model_id: str, size: int, cache_dir: Path | None) -> bytes:
    """The ONNX model of ``network`` from the cache when it is the one for these weights,
    generated (and cached, if the folder can be written) otherwise."""
    digest = weights_digest(network)
    folder = None if cache_dir is None else Path(cache_dir) / "onnx"
    name = "".join(c if c.isalnum() or c in "-_" else "_" for c in model_id) or "model"
    path, note_path = (None, None) if folder is None else (folder / f"{name}.onnx", folder / f"{name}.json")
    if path is not None and note_path is not None:
        try:
            note = json.loads(note_path.read_text())
            model = path.read_bytes()
            if isinstance(note, dict) and note.get("format") == ONNX_EXPORT_FORMAT \
                    and note.get("model_id") == model_id and note.get("weights") == digest \
                    and note.get("input_size") == size and hashlib.sha256(model).hexdigest() == note.get("sha256"):
                return model
        except (OSError, ValueError):
            pass  # missing or unreadable: generated below
    model = export_onnx(network, size)
    if path is not None and note_path is not None:
        note = {"format": ONNX_EXPORT_FORMAT, "model_id": model_id, "weights": digest, "input_size": size,
                "sha256": hashlib.sha256(model).hexdigest()}
        try:  # the model first, its note second: a note never describes a file not yet written
            write_atomically(path, lambda temporary: Path(temporary).write_bytes(model))
            write_atomically(note_path, lambda temporary: Path(temporary).write_text(json.dumps(note, indent=1)))
        except OSError as error:
            log.warning("cannot cache the ONNX model in %s (%s): it is generated again on every start",
                        folder, error.strerror)
    return model


def _start_onnx(network: UNet, model_id: str, device: str, input_size: int, options: RuntimeOptions) -> Forward:
    import torch

    model = cached_onnx(network, model_id, input_size, options.cache_dir)
    session = _session(model, options.threads or available_cpus())

    def forward(inputs: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        probabilities, bottleneck = session.run(None, {"input": np.ascontiguousarray(inputs, dtype=np.float32)})
        return torch.from_numpy(probabilities), torch.from_numpy(bottleneck)

    return forward


def _start_auto(network: UNet, model_id: str, device: str, input_size: int, options: RuntimeOptions) -> Forward:
    name = "onnx" if device == "cpu" else "torch"
    return RUNTIME_REGISTRY[name].start(network, model_id, device, input_size, options)


#: Every runtime by name, the default (``auto``) first; ``--runtime`` lists these.
RUNTIME_REGISTRY: dict[str, Runtime] = {runtime.name: runtime for runtime in (
    Runtime("auto", "ONNX Runtime on the CPU, torch on CUDA", _start_auto, ("cpu", "cuda")),
    Runtime("onnx", "ONNX Runtime (CPU), the model generated from the weights and cached", _start_onnx, ("cpu",)),
    Runtime("torch", "PyTorch (CPU or CUDA)", _start_torch, ("cpu", "cuda")),
)}
RUNTIMES = tuple(RUNTIME_REGISTRY)
assert DEFAULT_RUNTIME in RUNTIME_REGISTRY  # config.py's default names an entry here


def start_runtime(name: str, network: UNet, model_id: str, device: str, input_size: int,
                  options: RuntimeOptions) -> Forward:
    """The forward function of runtime ``name`` (see :data:`RUNTIME_REGISTRY`) for inputs of
    ``input_size`` squared (the ONNX graph is traced at that size)."""
    runtime = RUNTIME_REGISTRY.get(name)
    if runtime is None:
        raise ConfigError(f"unknown runtime {name!r}; choose from {', '.join(RUNTIME_REGISTRY)}")
    if device not in runtime.devices:
        raise ConfigError(f"--runtime {name} does not run on {device}; choose from "
                           f"{', '.join(r.name for r in RUNTIME_REGISTRY.values() if device in r.devices)}")
    return runtime.start(network, model_id, device, input_size, options)
