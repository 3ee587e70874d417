"""Load a trained U-Net and run it: lung masks and feature vectors for slices of any size.

:class:`LungModel` is the one inference class: it owns the network, the preprocessing
settings saved with the weights and the pooling that turns the bottleneck into a vector.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .config import Settings
from .errors import WeightsError
from .features import FindingsConfig, centre_parts, findings_vectors, pool_bottleneck
from .fileutils import write_atomically
from .focus import DEFAULT_FOCUS, Focus, anatomy_weight, focus_queries
from .io import CTSlice
from .model import UNet, UNetConfig, fuse_batch_norm
from .postprocess import clean_probability, include_lesions
from .preprocess import (
    Geometry,
    PreprocessConfig,
    normalize_intensity,
    probabilities_to_original,
    to_model_input,
)
from .quality import Quality, QualitySignals, judge
from .runtimes import Forward, RuntimeOptions, start_runtime

WEIGHTS_FORMAT = "lungcbir-weights/1"
BUNDLED_WEIGHTS = "lung_unet.pt"


@dataclass
class Segmentation:
    """The model's answer for one slice."""

    mask: np.ndarray  # bool, at the slice's own resolution
    lung_fraction: float  # share of the slice's pixels that are lung
    vector: np.ndarray  # float32, L2-normalised
    quality: Quality = Quality.OK  # how far to trust the mask (lungcbir.quality)
    quality_score: float = 1.0  # 1 = confident, 0 = not at all
    lesion_fraction: float | None = None  # lesion pixels / lung pixels (0 without lungs); None: no lesion head
    signals: QualitySignals | None = None  # what the quality verdict was computed from
    lesion_mask: np.ndarray | None = None  # bool, slice size: lesion prob > 0.5 AND lung; None: no lesion head
    maps: SliceMaps | None = None  # what region vectors are pooled from (``segment(..., keep_maps=True)``)

    def summary_json(self) -> dict:
        """The per-slice fields of ``segment --json``, ``query --json`` and the web API."""
        return {"lung_fraction": round(self.lung_fraction, 6), "lesion_fraction": self.lesion_fraction,
                "quality": self.quality.value, "quality_score": round(self.quality_score, 4)}


@dataclass
class SliceMaps:
    """What the forward pass of one slice leaves for its regions (:func:`lungcbir.regions.region_vector`):
    regions of the slice are described from these, with no second run of the network."""

    bottleneck: np.ndarray  # (C, s, s) float32: the encoder's last feature map
    lesions: np.ndarray | None  # (S, S) lesion probability at the model input; None without a lesion output
    geometry: Geometry  # where the slice sits in the model input
    unit: np.ndarray  # the slice as the model's [0, 1] input at its own size (normalize_intensity)


@dataclass
class NetworkOutputs:
    """What one forward pass gives for a batch of prepared inputs (tensors on the model's device)."""

    bottleneck: torch.Tensor  # (N, C, s, s): the encoder's last feature map
    lungs: torch.Tensor  # (N, 1, S, S): lung probability
    lesions: torch.Tensor | None  # (N, 1, S, S): lesion probability; None without a lesion output


@dataclass
class ModelSettings:
    """Everything about a model that is not a weight; saved in the weights file."""

    unet: UNetConfig = field(default_factory=UNetConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    pooling: str = "mean-max"
    postprocess: bool = True
    training: dict = field(default_factory=dict)
    #: Mean pooled vector of the training slices (see :mod:`lungcbir.centring`), subtracted
    #: before the final L2 normalisation so that scores spread over [-1, 1]; None: not centred.
    centre: list[float] | None = None
    #: a findings part after the anatomy part of the vector (lungcbir.features.FindingsConfig);
    #: None: the vector is the anatomy part only. Needs a lesion output.
    findings: FindingsConfig | None = None
    #: join the lesion output's pixels that touch the lungs inside the body to the lung mask
    #: (lungcbir.postprocess.include_lesions), after the clean-up; needs a lesion output. Off for
    #: the bundled model: its lesion output misses consolidation in HU and marks heart and liver
    #: beside the lung bases in 8-bit exports, so the union cost val Dice (MODEL_CARD.md)
    include_lesions: bool = False
    #: judge masks with lungcbir.quality's mask signals (calibrated on the bundled model); when
    #: False only the input signals count (not CT -> no-lungs), e.g. for untrained test networks
    quality: bool = True

    def to_dict(self) -> dict:
        values = {"unet": self.unet.to_dict(), "preprocess": self.preprocess.to_dict(),
                  "pooling": self.pooling, "postprocess": self.postprocess, "training": self.training,
                  "quality": self.quality, "include_lesions": self.include_lesions}
        if self.centre is not None:
            values["centre"] = list(self.centre)
        if self.findings is not None:
            values["findings"] = self.findings.to_dict()
        return values

    @classmethod
    def from_dict(cls, values: dict) -> "ModelSettings":
        return cls(unet=UNetConfig(**values["unet"]),
                   preprocess=PreprocessConfig.from_dict(values["preprocess"]),
                   pooling=values.get("pooling", "mean-max"),
                   postprocess=bool(values.get("postprocess", True)),
                   training=dict(values.get("training", {})),
                   centre=[float(v) for v in values["centre"]] if values.get("centre") is not None else None,
                   quality=bool(values.get("quality", True)),
                   include_lesions=bool(values.get("include_lesions", False)),
                   findings=FindingsConfig.from_dict(values["findings"]) if values.get("findings") else None)


def bundled_weights_path() -> Path | None:
    """Path of the weights shipped inside the package, or None when there are none."""
    path = Path(str(resources.files("lungcbir") / "weights" / BUNDLED_WEIGHTS))
    return path if path.is_file() else None


def save_weights(path: str | os.PathLike, network: UNet, settings: ModelSettings) -> None:
    """Write weights (as float16 CPU tensors, to keep the file small and loadable anywhere) and
    settings to one file, atomically."""
    state = {key: (value.half() if value.is_floating_point() else value).detach().cpu()
             for key, value in network.state_dict().items()}
    payload = {"format": WEIGHTS_FORMAT, "settings": settings.to_dict(), "state_dict": state}
    write_atomically(path, lambda temporary: torch.save(payload, temporary))


def load_network(path: str | os.PathLike | None = None) -> tuple[UNet, ModelSettings, dict]:
    """The trainable network (float32, batch norm unfolded), its settings and the stored state.

    ``path`` None means the bundled weights. Used to start training from trained weights.
    """
    if path is None:
        path = bundled_weights_path()
        if path is None:
            raise WeightsError("no bundled weights in this installation; pass --weights FILE")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise WeightsError(f"{path}: weights file does not exist") from None
    except Exception as error:
        raise WeightsError(f"{path}: not a lungcbir weights file ({type(error).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != WEIGHTS_FORMAT:
        raise WeightsError(f"{path}: not a lungcbir weights file")
    settings = ModelSettings.from_dict(payload["settings"])
    network = UNet(settings.unet)
    state = payload["state_dict"]
    try:
        network.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    except RuntimeError:
        raise WeightsError(f"{path}: weights do not fit the network described in the file") from None
    return network, settings, state


def _model_digest(state: dict, settings: "ModelSettings") -> str:
    """Hash of the weights and of every setting that changes the vectors (preprocessing, pooling,
    centre). Models without a centre keep the ids they had before centring existed."""
    digest = hashlib.sha256()
    changing = {"preprocess": settings.preprocess.to_dict(), "pooling": settings.pooling}
    if settings.centre is not None:
        changing["centre"] = np.asarray(settings.centre, np.float32).tobytes().hex()
    if settings.findings is not None:
        changing["findings"] = settings.findings.to_dict()
    digest.update(json.dumps(changing, sort_keys=True).encode())
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


class LungModel:
    """A trained lung U-Net ready for inference.

    Example:
        >>> import tempfile
        >>> from lungcbir.io import read_file
        >>> from lungcbir.phantom import write_phantom
        >>> folder = tempfile.mkdtemp()
        >>> _ = write_phantom(folder, slices=3, size=64, patients=1)
        >>> slice_ = read_file(f"{folder}/png/phantom01/phantom01_s002.png")[0]
        >>> model = LungModel.load()                      # the bundled weights
        >>> result = model.segment([slice_])[0]
        >>> result.mask.shape == slice_.shape, 0.0 < result.lung_fraction < 1.0
        (True, True)
    """

    def __init__(self, network: UNet, settings: ModelSettings, model_id: str,
                 device: str = "cpu", runtime: str = "torch", runtime_options: RuntimeOptions | None = None) -> None:
        # Module.to takes memory_format at run time; torch's overloads do not list it
        self.network = fuse_batch_norm(network.to(device)).to(
            memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.settings = settings
        self.model_id = model_id
        self.device = device
        #: where the network runs (lungcbir.runtimes.RUNTIME_REGISTRY); a network built here
        #: runs in torch unless told otherwise, loaded weights in the default (see ``load``)
        self.runtime = runtime
        self.runtime_options = runtime_options or RuntimeOptions()
        self._runner: Forward | None = None  # started on first use: loading stays cheap
        self._starting = threading.Lock()  # one start (one ONNX export) for a web server's threads

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, device: str = "cpu", runtime: str | None = None,
             settings: Settings | None = None) -> "LungModel":
        """Load weights from ``path`` or, when None, the weights bundled with the package.

        ``runtime`` (a name of :data:`lungcbir.runtimes.RUNTIME_REGISTRY`; default
        ``settings.runtime``, ``auto``: ONNX Runtime on the CPU) runs the network with
        ``settings.threads`` threads and its ONNX model cached in ``settings.cache_dir``
        (``settings`` default: :meth:`Settings.from_environment`).
        """
        if device == "cuda" and not torch.cuda.is_available():
            raise WeightsError("--device cuda asked for, but no CUDA device is available")
        config = Settings.from_environment() if settings is None else settings
        network, model_settings, state = load_network(path)
        return cls(network, model_settings, _model_digest(state, model_settings), device, runtime or config.runtime,
                   RuntimeOptions(threads=config.threads, cache_dir=config.cache_dir))

    @property
    def input_size(self) -> int:
        return self.settings.preprocess.input_size

    @property
    def parts(self) -> tuple[int, ...]:
        """Lengths of the vector's parts: (anatomy,) or (anatomy, findings)."""
        anatomy = 2 * self.settings.unet.bottleneck_channels
        findings = self.settings.findings
        if findings is None:
            return (anatomy,)
        return anatomy, findings.dimension(self.settings.unet.bottleneck_channels)

    @property
    def dimension(self) -> int:
        return sum(self.parts)

    def focused(self, vectors: np.ndarray, focus: Focus | str = DEFAULT_FOCUS) -> np.ndarray:
        """Query vectors for a search with this focus (:class:`lungcbir.focus.Focus`); a model
        without a findings part searches the same way whatever the focus."""
        if self.settings.findings is None:
            anatomy_weight(focus, 0.5)  # still refuse an unknown focus
            return vectors
        weight = anatomy_weight(focus, self.settings.findings.balanced_anatomy_weight)
        return focus_queries(vectors, self.parts[0], weight)

    def prepare(self, item: CTSlice) -> tuple[np.ndarray, Geometry]:
        """Normalise and resize one slice; returns the model input and its geometry."""
        unit = normalize_intensity(item.pixels, item.intensity, self.settings.preprocess.hu_window)
        return to_model_input(unit, self.input_size)

    @property
    def has_lesion_head(self) -> bool:
        """Whether the weights have a second output channel (lesions)."""
        return self.settings.unet.out_channels >= 2 or self.settings.unet.lesion_branch

    @torch.inference_mode()
    def run(self, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Lung probabilities ``(N, S, S)`` and feature vectors ``(N, D)`` for prepared inputs."""
        probabilities, vectors, _ = self.run_all(inputs)
        return probabilities, vectors

    @torch.inference_mode()
    def run_all(self, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """As :meth:`run`, plus lesion probabilities ``(N, S, S)`` (None without a lesion head)."""
        probabilities, vectors, lesions, _ = self._run_with_bottleneck(inputs)
        return probabilities, vectors, lesions

    def _run_with_bottleneck(self, inputs: np.ndarray
                             ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, torch.Tensor]:
        out = self.outputs(inputs)
        uncentred = self.uncentred_vectors(out.bottleneck, out.lungs, out.lesions)
        vectors = centre_parts(uncentred, self.settings.centre, self.parts)
        lesions = None if out.lesions is None else out.lesions[:, 0].cpu().numpy()
        return out.lungs[:, 0].cpu().numpy(), vectors, lesions, out.bottleneck

    @torch.inference_mode()
    def uncentred(self, inputs: np.ndarray) -> np.ndarray:
        """The vectors of prepared inputs before centring (what the saved centre is the mean of)."""
        return self._forward(inputs)[2]

    @torch.inference_mode()
    def outputs(self, inputs: np.ndarray) -> NetworkOutputs:
        """The network's raw outputs for prepared inputs ``(N, S, S)``, before any pooling."""
        with self._starting:
            if self._runner is None:
                self._runner = start_runtime(self.runtime, self.network, self.model_id, self.device,
                                              self.input_size, self.runtime_options)
        probabilities, bottleneck = self._runner(inputs[:, None])
        lesions = probabilities[:, 1:2] if self.has_lesion_head else None
        return NetworkOutputs(bottleneck, probabilities[:, :1], lesions)  # channel 0: lungs

    def _forward(self, inputs: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None, np.ndarray]:
        out = self.outputs(inputs)
        return out.lungs, out.lesions, self.uncentred_vectors(out.bottleneck, out.lungs, out.lesions)

    def uncentred_vectors(self, bottleneck: torch.Tensor, lung_probability: torch.Tensor,
                          lesion_probability: torch.Tensor | None) -> np.ndarray:
        """The parts of the vector joined before centring (what the saved centre is the mean of)."""
        anatomy = pool_bottleneck(bottleneck, lung_probability, self.settings.pooling)
        if self.settings.findings is None:
            return anatomy
        if lesion_probability is None:
            raise WeightsError("a findings part in the vector needs a model with a lesion output")
        findings = findings_vectors(bottleneck, lung_probability, lesion_probability, self.settings.findings)
        return np.concatenate([anatomy, findings], axis=1)

    @torch.inference_mode()
    def segment(self, slices: Sequence[CTSlice], batch_size: int = 16, keep_maps: bool = False) -> list[Segmentation]:
        """Masks at each slice's own resolution, lung fractions and feature vectors; with
        ``keep_maps``, also what regions of the slices are described from (:class:`SliceMaps`)."""
        results: list[Segmentation] = []
        for start in range(0, len(slices), batch_size):
            chunk = slices[start:start + batch_size]
            prepared = [self.prepare(item) for item in chunk]
            inputs = np.stack([p[0] for p in prepared])
            bottleneck: torch.Tensor | None = None
            if keep_maps:
                probabilities, vectors, lesions, bottleneck = self._run_with_bottleneck(inputs)
            else:
                probabilities, vectors, lesions = self.run_all(inputs)
            for index, (item, (image, geometry), raw, vector) in enumerate(zip(chunk, prepared, probabilities,
                                                                               vectors)):
                probability = clean_probability(raw, image) if self.settings.postprocess else raw
                # the verdict judges the lung output; lesions it joins below are not a fault of it
                verdict = judge(raw, probability, image, item.colour_share, self.settings.quality)
                if lesions is not None and self.settings.postprocess and self.settings.include_lesions:
                    lungs = probability > 0.5
                    joined = include_lesions(lungs, lesions[index] > 0.5, image)
                    probability = np.where(joined & ~lungs, np.float32(1.0), probability)
                mask = probabilities_to_original(probability, geometry) > 0.5
                result = Segmentation(mask, float(mask.mean()), vector, verdict.quality, verdict.score,
                                      None, verdict.signals)
                if lesions is not None:  # lesions only inside the (cleaned) lung mask
                    result.lesion_mask = (probabilities_to_original(lesions[index], geometry) > 0.5) & mask
                    lung_pixels = int(mask.sum())
                    result.lesion_fraction = float(result.lesion_mask.sum() / lung_pixels) if lung_pixels else 0.0
                if bottleneck is not None:
                    unit = normalize_intensity(item.pixels, item.intensity, self.settings.preprocess.hu_window)
                    result.maps = SliceMaps(bottleneck[index].float().cpu().numpy(),
                                            None if lesions is None else lesions[index], geometry, unit)
                results.append(result)
        return results
