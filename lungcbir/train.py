"""Training the lung U-Net: paired image/mask folders, augmentation for real archives, Adam.

The augmentation is what makes one model serve HU slices and 8-bit exports from any scanner:
random lung/mediastinal/bone windows, simulated 8-bit exports (per-slice min-max + CLAHE, as
many public sets are published), gamma and contrast changes, noise, blur, flips, 90-degree
turns, rotations, scaling and shifts; optionally (``TrainConfig.pathology``) synthetic disease
inside the lung field and further exports (:mod:`lungcbir.augment`).

With ``TrainConfig.infection_head`` a second output channel learns lesions (BCE + soft Dice)
from the COVID-19 infection masks, only where lesion labels are known.
"""

from __future__ import annotations

import math
import os
import random
import re
import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .augment import PATHOLOGY_KINDS, add_export, add_pathology
from .errors import LungCBIRError, ReadError
from .evaluate import pair_folders
from .features import pooled_vectors
from .inference import ModelSettings, load_network, save_weights
from .io import CTSlice, file_stem, read_file, read_mask
from .metrics import dice_score
from .model import UNet, UNetConfig
from .preprocess import PreprocessConfig, mask_to_model, normalize_intensity, pad_to_square

#: The pooling the contrastive loss sees in training, and the one saved for retrieval. They differ
#: because the bundled model was trained with the first, and the second then gave its bottleneck
#: the best retrieval of the poolings compared in docs/retrieval.md; no run trained with the second.
CONTRASTIVE_POOLING = "lung-mean-max"
RETRIEVAL_POOLING = "lung-mean+global-max"
#: Starting bias of a new lesion channel: sigmoid(-2) = 0.12, "few lesions", so its first steps
#: refine a small map instead of erasing a random one.
NEW_HEAD_BIAS = -2.0
#: The share of a slice's pixels (inside its lungs) that a slice label (TrainingSample.infected)
#: says must be lesion: 0.5 % of 256 x 256 = 328 pixels, about 2 % of a usual lung field.
SLICE_LABEL_SHARE = 0.005
#: What the training views give as the slice label of a slice without one.
NO_SLICE_LABEL = -1.0


@dataclass(frozen=True)
class TrainConfig:
    """Training recipe; saved in the weights file.

    Example:
        >>> TrainConfig(epochs=2).batch_size
        16
    """

    epochs: int = 40
    batch_size: int = 16
    learning_rate: float = 2e-3
    weight_decay: float = 1e-5
    seed: int = 0
    base_channels: int = 8
    depth: int = 5
    input_size: int = 256
    augment: bool = True
    infection_head: bool = False  # a second output channel learns lesions where masks exist
    # > 0: a separate lesion branch (UNetConfig.lesion_levels: a copy of the last decoder levels)
    # trained on frozen initial weights: only the branch learns, so the lung mask and the retrieval
    # vector stay exactly those of the initial weights
    lesion_levels: int = 0
    infection_weight: float = 0.5
    # weight of the slice-label loss (TrainingSample.infected): the lesion output's strongest
    # pixels inside the lungs (the top SLICE_LABEL_SHARE of the image) learn to say "lesion" on a
    # slice labelled infected and "no lesion" on one labelled clean (multiple-instance learning)
    slice_label_weight: float = 0.5
    # synthetic disease in the lung field (honeycombing, pasted consolidation, emphysema, dependent
    # density) and further exports (JPEG, reconstruction circle, low-dose noise, sharp kernel)
    pathology: bool = False
    # which synthetic findings ``pathology`` draws (lungcbir.augment.PATHOLOGY_KINDS); a lung decoder
    # taught to include dense disease sees consolidation and dependent density only
    pathology_kinds: tuple[str, ...] = PATHOLOGY_KINDS
    # > 0: train only the lung decoder's last ``lung_levels`` levels and the lung head on initial
    # lung-only weights: the encoder, the bottleneck (the retrieval vector's source) and the decoder
    # levels a lesion branch of ``depth - lung_levels`` or fewer levels reads stay as initialised
    lung_levels: int = 0
    # > 0: the lung output's cross-entropy over lesion pixels (real infection masks and pasted
    # consolidation, all inside the lung mask) is added with this weight: dense disease is a small
    # share of the lung, which the Dice loss lets go for a few per cent, and it is exactly what a
    # lesion-inclusive mask must keep
    lesion_lung_weight: float = 0.0
    # > 0: every pathology kind is drawn with this probability instead of its own default
    pathology_probability: float = 0.0
    # > 0 (lesion branch only): also learn the lesion output of a teacher model (``teacher``, a
    # weights file or "bundled") on every view, binary cross-entropy towards its probabilities:
    # a cheaper branch learns from dense soft targets on every slice, HU ones included, not only
    # from the few lesion masks
    distillation_weight: float = 0.0
    teacher: str | None = None
    # train the decoder and heads only: the encoder (and so the retrieval bottleneck, batch-norm
    # statistics included) stays as initialised; needs initial weights; about 3x cheaper a step on CPU
    freeze_encoder: bool = False
    steps_per_epoch: int = 0  # 0: every training view once an epoch; more or fewer for short runs
    # the checkpoint is chosen by mean val lung Dice + this x pooled val lesion Dice (lesion head only):
    # small, so a lesion gain can never buy more than a trace of lung Dice
    lesion_selection_weight: float = 0.02
    # a lesion head added to lung-only weights starts from nothing: its 1x1 convolution learns at
    # this multiple of the learning rate (Adam moves a weight by about the learning rate a step,
    # too little for a fresh head in a short fine-tune), while the lung channel of the head is kept
    # as initialised so that faster rate cannot disturb the lung mask
    new_head_lr_factor: float = 10.0
    # > 0: also pull together the pooled bottleneck vectors of two views of one slice (or of two
    # neighbouring slices of one series) and push apart those of other slices (NT-Xent), so the
    # retrieval vector ignores window, export and orientation and follows anatomy
    contrastive_weight: float = 0.5  # the bundled model's recipe; 0 trains segmentation only
    contrastive_temperature: float = 0.1


@dataclass
class TrainingSample:
    """One slice resized to the model input, with its raw intensities kept for window jitter."""

    name: str
    group: str
    pixels: np.ndarray  # float32 raw values (HU, 0..255, ...) at input_size x input_size
    intensity: str
    mask: np.ndarray  # uint8 {0, 1} at input_size x input_size
    infection: np.ndarray | None = None  # uint8 {0, 1} lesion mask where one is known
    series: str | None = None  # the scan the slice comes from, where slices of one scan are known
    position: int | None = None  # the slice's order within that series
    # a slice label (radiologists' "shows infection" per slice; None: none) for the slice-label
    # loss (TrainConfig.slice_label_weight); a slice labelled infected has no lesion mask, one
    # labelled clean also has an all-zero one
    infected: bool | None = None


@dataclass
class EpochReport:
    epoch: int
    loss: float
    val_dice_mean: float
    val_dice_min: float
    seconds: float
    best: bool
    val_lesion_dice: float = float("nan")  # pooled over the val slices with lesion labels (lesion head)


def _stem(path: str) -> str:
    return file_stem(path)


def load_sample(image_path: str, mask_path: str, input_size: int, group: str | None = None,
                infection_path: str | None = None) -> TrainingSample:
    """Read a 2-D image and its mask (and lesion mask), pad to square and resize to the model input."""
    item = read_file(image_path)[0]
    mask = read_mask(mask_path)
    if mask.shape != item.shape:
        raise ReadError(mask_path, f"mask is {mask.shape}, image is {item.shape}")
    infection = None
    if infection_path is not None:
        infection = mask_to_model(read_mask(infection_path), input_size)
    return TrainingSample(_stem(image_path), group or _stem(image_path), model_pixels(item, input_size),
                          item.intensity, mask_to_model(mask, input_size), infection)


def model_pixels(item: CTSlice, input_size: int) -> np.ndarray:
    """The slice's raw values padded to a square with its own floor (air) and resized to the model input."""
    pixels = item.pixels.astype(np.float32)
    square, _ = pad_to_square(pixels, float(pixels.min()))
    return cv2.resize(square, (input_size, input_size), interpolation=cv2.INTER_LANCZOS4)


def slice_labelled_sample(item: CTSlice, lungs: np.ndarray, infected: bool, input_size: int, group: str,
                          series: str | None = None, position: int | None = None) -> TrainingSample:
    """A training slice with a slice label instead of a lesion mask: ``infected`` (lesions
    somewhere, :func:`slice_label_loss`) or lesion-free (a known all-zero lesion mask). ``lungs``
    is a lung mask at the slice's size, e.g. a trained model's, for a lesion branch that learns on
    frozen lung weights.

    Example:
        >>> item = CTSlice(np.full((64, 64), -800.0, np.float32), "hu", "a.dcm", "dicom")
        >>> sample = slice_labelled_sample(item, np.ones((64, 64), bool), False, 32, "P1")
        >>> sample.pixels.shape, int(sample.infection.sum()), sample.infected
        ((32, 32), 0, False)
    """
    mask = mask_to_model(lungs, input_size)
    return TrainingSample(file_stem(item.path), group, model_pixels(item, input_size), item.intensity, mask,
                          None if infected else np.zeros_like(mask), series, position, infected)


def random_unit_image(sample: TrainingSample, rng: random.Random, hu_window: tuple[float, float]) -> np.ndarray:
    """Map raw values to [0, 1] the way some archive might have: window or 8-bit export."""
    pixels = sample.pixels
    if sample.intensity == "hu":
        choice = rng.random()
        if choice < 0.45:
            window = (hu_window[0] + rng.uniform(-250, 200), hu_window[1] + rng.uniform(-300, 300))
        elif choice < 0.6:
            window = (rng.uniform(-200, -100), rng.uniform(200, 300))  # mediastinal
        elif choice < 0.7:
            window = (rng.uniform(-600, -400), rng.uniform(1200, 2000))  # bone
        else:  # an 8-bit export: pre-window, per-slice min-max, often CLAHE
            window = (rng.uniform(-1400, -1000), rng.uniform(150, 400))
            unit = normalize_intensity(pixels, "hu", window)
            low, high = float(unit.min()), float(unit.max())
            unit = (unit - low) / max(high - low, 1e-6)
            if rng.random() < 0.7:
                unit = _clahe(unit, rng.uniform(2.0, 8.0))
            return unit
        return normalize_intensity(pixels, "hu", window)
    unit = normalize_intensity(pixels, sample.intensity)
    if rng.random() < 0.2:
        unit = _clahe(unit, rng.uniform(1.0, 4.0))
    return unit


def _clahe(unit: np.ndarray, clip: float) -> np.ndarray:
    image = np.round(np.clip(unit, 0, 1) * 255).astype(np.uint8)
    return cv2.createCLAHE(clipLimit=clip, tileGridSize=(8, 8)).apply(image).astype(np.float32) / 255.0


@dataclass
class TrainingView:
    """One augmented view: image in [0, 1] and ``(3, S, S)`` labels: lungs, lesions, lesion weight."""

    image: np.ndarray
    labels: np.ndarray


def augment_view(sample: TrainingSample, rng: random.Random, hu_window: tuple[float, float],
                 pathology: bool = False, donors: Sequence[np.ndarray] = (),
                 pathology_kinds: Sequence[str] = PATHOLOGY_KINDS, pathology_probability: float = 0.0
                 ) -> TrainingView:
    """One random training view; with ``pathology``, synthetic disease and further exports too.

    The lesion weight is 0 where the lesion label is unknown: everywhere on slices without lesion
    masks, and on the regions of synthetic findings the infection masks do not label.
    """
    image = random_unit_image(sample, rng, hu_window)
    if pathology:  # before the geometry, so the synthetic findings turn with the slice
        view = add_pathology(image, sample.mask, sample.infection, rng, donors, pathology_kinds,
                             pathology_probability)
        image = view.image
        labels = np.stack([sample.mask.astype(np.float32), view.lesion.astype(np.float32), view.lesion_weight])
    else:
        weight = np.full(sample.mask.shape, 1.0 if sample.infection is not None else 0.0, np.float32)
        labels = np.concatenate([_labels(sample).astype(np.float32), weight[None]])
    labels = labels.transpose(1, 2, 0)  # channels last, as OpenCV warps them
    size = image.shape[0]
    # geometry: flips and quarter turns (archives store slices in any orientation), then affine
    if rng.random() < 0.5:
        image, labels = image[:, ::-1], labels[:, ::-1]
    if rng.random() < 0.3:
        image, labels = image[::-1], labels[::-1]
    if rng.random() < 0.3:
        turns = rng.randint(1, 3)
        image, labels = np.rot90(image, turns), np.rot90(labels, turns)
    angle = rng.uniform(-15, 15)
    scale = math.exp(rng.uniform(math.log(0.75), math.log(1.25)))
    matrix = cv2.getRotationMatrix2D((size / 2, size / 2), angle, scale)
    matrix[:, 2] += [rng.uniform(-0.08, 0.08) * size, rng.uniform(-0.08, 0.08) * size]
    image = cv2.warpAffine(np.ascontiguousarray(image), matrix, (size, size), flags=cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_CONSTANT, borderValue=float(image.min()))
    labels = cv2.warpAffine(np.ascontiguousarray(labels), matrix, (size, size), flags=cv2.INTER_NEAREST,
                            borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    # intensity: gamma, contrast, blur, noise
    if rng.random() < 0.5:
        image = np.power(np.clip(image, 0, 1), math.exp(rng.uniform(-0.4, 0.4)))
    if rng.random() < 0.3:
        image = (image - 0.5) * rng.uniform(0.7, 1.3) + 0.5 + rng.uniform(-0.1, 0.1)
    if rng.random() < 0.2:
        image = cv2.GaussianBlur(image, (0, 0), rng.uniform(0.5, 1.5))
    if rng.random() < 0.3:
        noise = np.random.default_rng(rng.randrange(2**31)).normal(0, rng.uniform(0.01, 0.06), image.shape)
        image = image + noise.astype(np.float32)
    if pathology:
        image = add_export(np.clip(image, 0, 1).astype(np.float32), labels[..., 0] > 0.5, rng)
    return TrainingView(np.clip(image, 0, 1).astype(np.float32), labels.transpose(2, 0, 1).astype(np.float32))


def augment(sample: TrainingSample, rng: random.Random,
            hu_window: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """One random training view: image in [0, 1] and labels ``(2, S, S)`` (lungs, lesions)."""
    view = augment_view(sample, rng, hu_window)
    return view.image, view.labels[:2]


def _labels(sample: TrainingSample) -> np.ndarray:
    """``(2, S, S)`` uint8: lungs, and lesions (all zero where the lesions are not known)."""
    infection = sample.infection if sample.infection is not None else np.zeros_like(sample.mask)
    return np.stack([sample.mask, infection])


class ProjectionHead(nn.Module):
    """The small MLP the contrastive loss works on; only used in training, never saved."""

    def __init__(self, dimension: int, projection: int = 128) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(dimension, dimension), nn.ReLU(inplace=True),
                                    nn.Linear(dimension, projection))

    def forward(self, vectors: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.layers(vectors), dim=1)


def contrastive_loss(first: torch.Tensor, second: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent (SimCLR): row i of ``first`` and of ``second`` are a pair, every other row a negative."""
    projections = torch.cat([first, second])
    similarity = projections @ projections.T / temperature
    similarity.fill_diagonal_(float("-inf"))
    count = first.shape[0]
    partner = torch.cat([torch.arange(count, 2 * count), torch.arange(count)]).to(similarity.device)
    return F.cross_entropy(similarity, partner)


def neighbour_lists(samples: Sequence[TrainingSample], reach: int = 2) -> list[list[int]]:
    """For each sample, the indices of samples of the same series at most ``reach`` slices away."""
    by_series: dict[str, list[tuple[int, int]]] = {}  # series -> (sample index, position)
    for index, sample in enumerate(samples):
        if sample.series is not None and sample.position is not None:
            by_series.setdefault(sample.series, []).append((index, sample.position))
    neighbours: list[list[int]] = [[] for _ in samples]
    for members in by_series.values():
        for index, position in members:
            neighbours[index] = [other for other, other_position in members if other != index and
                                 abs(other_position - position) <= reach]
    return neighbours


class _Steps:
    """The batches of the current epoch, as ``(sample index, seed)`` keys; set before each epoch."""

    def __init__(self) -> None:
        self.batches: list[list[tuple[int, int]]] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class _Views(torch.utils.data.Dataset):
    """Training views by ``(sample index, seed)``: image ``(1, S, S)``, labels ``(3, S, S)`` (lungs,
    lesions, lesion weight), lesions known, slice label (1 infected, 0 clean, NO_SLICE_LABEL)."""

    def __init__(self, samples: Sequence[TrainingSample], augmented: bool, hu_window: tuple[float, float],
                 pathology: bool = False, pathology_kinds: Sequence[str] = PATHOLOGY_KINDS,
                 pathology_probability: float = 0.0) -> None:
        self.samples, self.augmented, self.hu_window, self.pathology = samples, augmented, hu_window, pathology
        self.pathology_kinds, self.pathology_probability = pathology_kinds, pathology_probability
        # lesion shapes to paste into other slices: every distinct infected training slice
        donors = {id(s.infection): (s.group, s.infection) for s in samples
                  if s.infection is not None and s.infection.any()}
        self.donors = list(donors.values())

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, bool, float]:
        index, seed = key
        sample = self.samples[index]
        if self.augmented:
            rng = random.Random(seed)
            # donors from another patient only: a slice's own lesion pasted back would teach nothing new
            donors = [mask for group, mask in self.donors if group != sample.group] if self.pathology else ()
            view = augment_view(sample, rng, self.hu_window, self.pathology, donors, self.pathology_kinds,
                                self.pathology_probability)
            image, labels = view.image, view.labels
        else:
            image = normalize_intensity(sample.pixels, sample.intensity, self.hu_window)
            weight = np.full(sample.mask.shape, 1.0 if sample.infection is not None else 0.0, np.float32)
            labels = np.concatenate([_labels(sample).astype(np.float32), weight[None]])
        return torch.from_numpy(np.ascontiguousarray(image)[None]), torch.from_numpy(labels), \
            sample.infection is not None, NO_SLICE_LABEL if sample.infected is None else float(sample.infected)


def _single_threaded(_worker: int) -> None:
    cv2.setNumThreads(1)  # one core per worker; the workers are the parallelism


def dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy plus soft Dice (per image, averaged)."""
    bce = F.binary_cross_entropy_with_logits(logits, target)
    probability = torch.sigmoid(logits)
    intersection = (probability * target).sum((1, 2, 3))
    total = probability.sum((1, 2, 3)) + target.sum((1, 2, 3))
    soft_dice = (2 * intersection + 1) / (total + 1)
    return bce + (1 - soft_dice).mean()


def weighted_dice_loss(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy plus soft Dice counted only where ``weight`` is 1 (the label is known)."""
    weight_sum = weight.sum()
    if weight_sum <= 0:
        return logits.sum() * 0
    bce = (F.binary_cross_entropy_with_logits(logits, target, reduction="none") * weight).sum() / weight_sum
    probability = torch.sigmoid(logits) * weight
    target = target * weight
    intersection = (probability * target).sum((1, 2, 3))
    total = probability.sum((1, 2, 3)) + target.sum((1, 2, 3))
    soft_dice = (2 * intersection + 1) / (total + 1)
    return bce + (1 - soft_dice).mean()


def slice_label_loss(lesion_logits: torch.Tensor, lungs: torch.Tensor, infected: torch.Tensor) -> torch.Tensor:
    """For ``(N, S, S)`` lesion logits of slices with a slice label (``infected``: ``(N,)``, 1 or
    0) and their lung masks: binary cross-entropy of the strongest :data:`SLICE_LABEL_SHARE` of
    the pixels inside the lungs towards the label. An infected slice must show lesions somewhere
    without being told where; a clean one nowhere (a pixel loss alone lets a lesion output that
    fires everywhere off lightly: soft Dice's pull vanishes as the false area grows).

    Example:
        >>> lungs, firing = torch.ones(1, 32, 32, dtype=torch.bool), torch.full((1, 32, 32), 5.0)
        >>> bool(slice_label_loss(firing, lungs, torch.ones(1)) < slice_label_loss(-firing, lungs, torch.ones(1)))
        True
        >>> bool(slice_label_loss(firing, lungs, torch.zeros(1)) > slice_label_loss(-firing, lungs, torch.zeros(1)))
        True
    """
    inside = lesion_logits.masked_fill(~lungs, -30.0).flatten(1)
    strongest = inside.topk(max(1, round(SLICE_LABEL_SHARE * inside.shape[1])), dim=1).values
    return F.binary_cross_entropy_with_logits(strongest, infected.float()[:, None].expand_as(strongest))


def _encoder_modules(network: UNet) -> list[nn.Module]:
    return [network.down_blocks, network.bottleneck]


def _last_lung_levels(network: UNet, levels: int) -> list[nn.Module]:
    """The lung decoder's last ``levels`` levels and the lung head."""
    return [*network.up_convs[-levels:], *network.up_blocks[-levels:], network.head]


def _train_mode(network: UNet, freeze_encoder: bool, lung_levels: int = 0) -> None:
    """Training mode; frozen parts stay in eval mode so their batch-norm statistics do not move
    (the encoder when it is frozen; everything but the branch when a lesion branch learns;
    everything but the last lung levels when only those learn)."""
    network.train()
    if network.config.lesion_branch:  # trained only on frozen lung weights (see train)
        network.eval()
        for module in network.lesion_modules():
            module.train()
    elif lung_levels:
        network.eval()
        for module in _last_lung_levels(network, lung_levels):
            module.train()
    elif freeze_encoder:
        for module in _encoder_modules(network):
            module.eval()


def validate(network: UNet, samples: Sequence[TrainingSample], hu_window, device: str,
              freeze_encoder: bool = False, lung_levels: int = 0) -> tuple[list[float], float]:
    """Lung Dice per val slice, and the pooled lesion Dice (lesion = channel 1 AND lung) over the
    val slices with lesion labels (NaN without a lesion head or such slices)."""
    network.eval()
    scores: list[float] = []
    overlap, total = 0, 0
    with torch.inference_mode():
        for start in range(0, len(samples), 16):
            chunk = samples[start:start + 16]
            batch = np.stack([normalize_intensity(s.pixels, s.intensity, hu_window) for s in chunk])
            logits = network(torch.from_numpy(batch[:, None]).to(device))
            predictions = (logits[:, 0] > 0).cpu().numpy()  # channel 0: lungs
            scores.extend(dice_score(p, s.mask) for p, s in zip(predictions, chunk))
            if logits.shape[1] > 1:
                lesions = (logits[:, 1] > 0).cpu().numpy() & predictions
                for lesion, s in zip(lesions, chunk):
                    if s.infection is not None:
                        overlap += int((lesion & (s.infection > 0)).sum())
                        total += int(lesion.sum() + (s.infection > 0).sum())
    _train_mode(network, freeze_encoder, lung_levels)
    return scores, (2 * overlap / total if total else float("nan"))


def train(train_samples: Sequence[TrainingSample], val_samples: Sequence[TrainingSample], out: str,
          config: TrainConfig = TrainConfig(), device: str = "cpu", resume: bool = False,
          on_epoch: Callable[[EpochReport], None] | None = None,
          on_step: Callable[[int, int, float], None] | None = None, workers: int = 0,
          initial_weights: str | None = None) -> list[EpochReport]:
    """Train and write the best checkpoint (by mean validation Dice) to ``out``.

    ``initial_weights`` starts from a weights file ("bundled": the package's model) instead of
    random weights, to fine-tune a trained model on new data; its network must match ``config``.

    ``workers`` processes prepare the augmented views (0: in this process); on a GPU the
    augmentation, not the network, limits the speed.

    A resumable state is kept in ``out + ".state"`` after every epoch; ``resume=True`` continues
    from it. Returns one report per epoch run.

    Training is reproducible from ``config.seed`` and leaves the caller's random generators
    (``random``, NumPy's and torch's global ones) as they were.
    """
    with torch.random.fork_rng():  # torch's global generator seeds the weights and the loader
        torch.manual_seed(config.seed)
        return _train(train_samples, val_samples, out, config, device, resume, on_epoch, on_step, workers,
                      initial_weights)


@dataclass
class _Run:
    """What one training run updates: the network, the contrastive head and their optimiser."""

    network: UNet
    head: ProjectionHead
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.OneCycleLR
    lung_head: tuple[torch.Tensor, torch.Tensor] | None  # (weight, bias) of the lung channel, kept fixed
    learns_lesions: bool
    teacher: UNet | None = None  # whose lesion output the branch also learns (TrainConfig.distillation_weight)


def _train(train_samples: Sequence[TrainingSample], val_samples: Sequence[TrainingSample], out: str,
           config: TrainConfig, device: str, resume: bool, on_epoch: Callable[[EpochReport], None] | None,
           on_step: Callable[[int, int, float], None] | None, workers: int,
           initial_weights: str | None) -> list[EpochReport]:
    if not train_samples:
        raise LungCBIRError("no training samples")
    rng = random.Random(config.seed)
    preprocess = PreprocessConfig(input_size=config.input_size)
    steps_per_epoch = config.steps_per_epoch or max(1, len(train_samples) // config.batch_size)
    run = _start_run(config, initial_weights, device, steps_per_epoch)
    state_path = out + ".state"
    start_epoch, best = 0, -1.0
    if resume and os.path.exists(state_path):
        start_epoch, best = _resume(run, state_path, device, rng, config.epochs * steps_per_epoch)
    settings = ModelSettings(unet=run.network.config, preprocess=preprocess, pooling=RETRIEVAL_POOLING,
                             training={**asdict(config), "initial_weights": initial_weights,
                                       "train_samples": len(train_samples),
                                       "val_samples": len(val_samples)})
    reports = []
    _train_mode(run.network, config.freeze_encoder, config.lung_levels)
    neighbours = neighbour_lists(train_samples)
    order = list(range(len(train_samples)))
    # workers are started once ("spawn": forking after OpenCV and torch have started threads can hang)
    steps = _Steps()
    loader = torch.utils.data.DataLoader(_Views(train_samples, config.augment, preprocess.hu_window,
                                                config.pathology, config.pathology_kinds,
                                                config.pathology_probability),
                                         batch_sampler=steps, num_workers=workers, persistent_workers=workers > 0,
                                         multiprocessing_context="spawn" if workers else None,
                                         worker_init_fn=_single_threaded if workers else None)
    benchmark = torch.backends.cudnn.benchmark
    # input shapes never change, so on a GPU let cuDNN time its algorithms once and keep the fastest
    torch.backends.cudnn.benchmark = benchmark or device.startswith("cuda")
    try:
        for epoch in range(start_epoch, config.epochs):
            began = time.perf_counter()
            steps.batches = _epoch_batches(order, neighbours, rng, config, steps_per_epoch)
            loss_sum = torch.zeros((), device=device)  # summed on the device: .item() per step would wait for the GPU
            for step, batch in enumerate(loader):
                loss_sum += _train_step(run, [tensor.to(device) for tensor in batch], config)
                if on_step:
                    on_step(step + 1, steps_per_epoch, float(loss_sum) / (step + 1))
            scores, lesion_dice = (validate(run.network, val_samples, preprocess.hu_window, device,
                                             config.freeze_encoder, config.lung_levels)
                                   if val_samples else ([float("nan")], float("nan")))
            mean_dice = float(np.mean(scores))
            criterion = mean_dice + (config.lesion_selection_weight * lesion_dice if run.learns_lesions
                                     and not math.isnan(lesion_dice) else 0.0)
            improved = not val_samples or criterion > best
            if improved:
                best = criterion if val_samples else best
                settings.training.update(epoch=epoch + 1, val_dice_mean=mean_dice, val_lesion_dice=lesion_dice)
                save_weights(out, run.network, settings)
            torch.save({"network": run.network.state_dict(), "head": run.head.state_dict(),
                        "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
                        "epoch": epoch + 1, "best": best, "rng": rng.getstate(),
                        "torch_rng": torch.get_rng_state()}, state_path)
            report = EpochReport(epoch + 1, float(loss_sum) / steps_per_epoch, mean_dice, float(np.min(scores)),
                                 time.perf_counter() - began, improved, lesion_dice)
            reports.append(report)
            if on_epoch:
                on_epoch(report)
    finally:
        torch.backends.cudnn.benchmark = benchmark
    return reports


def _start_run(config: TrainConfig, initial_weights: str | None, device: str, steps_per_epoch: int) -> _Run:
    """The network (random, or from ``initial_weights``), which parts of it learn, and the optimiser."""
    lesion_branch = config.lesion_levels > 0
    if lesion_branch and config.infection_head:
        raise LungCBIRError("choose a lesion channel (infection_head) or a lesion branch, not both")
    unet_config = UNetConfig(base_channels=config.base_channels, depth=config.depth,
                             out_channels=2 if config.infection_head else 1, lesion_levels=config.lesion_levels)
    network, lung_head = _initial_network(unet_config, config.input_size, initial_weights)
    network = network.to(device)
    if lesion_branch:
        if initial_weights is None:
            raise LungCBIRError("a lesion branch is trained on trained lung weights: give initial weights (--init)")
        if config.contrastive_weight:
            raise LungCBIRError("a lesion branch leaves the bottleneck as it is: train it with --contrastive 0")
        branch = {id(p) for module in network.lesion_modules() for p in module.parameters()}
        for parameter in network.parameters():
            parameter.requires_grad_(id(parameter) in branch)
    if config.lung_levels:
        if initial_weights is None:
            raise LungCBIRError("training the last lung levels needs initial weights (--init)")
        if lesion_branch or config.infection_head or config.contrastive_weight:
            raise LungCBIRError("the last lung levels learn alone: no lesion output, --contrastive 0")
        if not 0 < config.lung_levels <= config.depth:
            raise LungCBIRError(f"lung levels must be between 1 and the depth ({config.depth})")
        learning = {id(p) for module in _last_lung_levels(network, config.lung_levels) for p in module.parameters()}
        for parameter in network.parameters():
            parameter.requires_grad_(id(parameter) in learning)
    teacher = None
    if config.distillation_weight:
        if not lesion_branch or config.teacher is None:
            raise LungCBIRError("distillation teaches a lesion branch: give --lesion-levels and a teacher")
        teacher = _teacher(config.teacher, network).to(device)
    if config.freeze_encoder:
        if initial_weights is None:
            raise LungCBIRError("freezing the encoder needs initial weights (--init)")
        if config.contrastive_weight:
            raise LungCBIRError("a frozen encoder's bottleneck cannot change: train it with --contrastive 0")
        for module in _encoder_modules(network):
            module.requires_grad_(False)
    head = ProjectionHead(2 * unet_config.bottleneck_channels).to(device)
    head_parameters = list(network.head.parameters()) if lung_head is not None else []
    parameters = [p for p in network.parameters() if p.requires_grad and all(p is not h for h in head_parameters)] \
        + (list(head.parameters()) if config.contrastive_weight else [])
    groups: list[dict[str, Any]] = [{"params": parameters}]
    if head_parameters:
        groups.append({"params": head_parameters, "lr": config.learning_rate * config.new_head_lr_factor})
    optimizer = torch.optim.Adam(groups, lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer,
                                                    max_lr=[g.get("lr", config.learning_rate) for g in groups],
                                                    total_steps=config.epochs * steps_per_epoch,
                                                    pct_start=0.1)
    return _Run(network, head, optimizer, scheduler, lung_head, config.infection_head or lesion_branch, teacher)


def _teacher(weights: str, student: UNet) -> UNet:
    """The teacher network, frozen, in eval mode. It must share the student's lung network up to the
    levels the student's branch reads, so both see the same features. The student's branch starts
    as a copy of the lung decoder's last levels (see _initial_network): a start from the teacher
    branch's own last levels, whose inputs are the teacher branch's features and not the lung
    decoder's, forgot the lesions in the first epochs (val lesion Dice 0.24 -> 0.00; MODEL_CARD.md)."""
    teacher, settings, _ = load_network(None if weights == "bundled" else weights)
    if not settings.unet.lesion_branch or settings.unet.lesion_levels < student.config.lesion_levels:
        raise LungCBIRError(f"{weights}: the teacher needs a lesion branch of at least "
                            f"{student.config.lesion_levels} levels")
    shared = student.config.depth - student.config.lesion_levels
    keys = [k for k in student.state_dict() if k.startswith(("down_blocks.", "bottleneck."))
            or any(k.startswith(f"{part}.{level}.") for part in ("up_convs", "up_blocks") for level in range(shared))]
    ours, theirs = student.state_dict(), teacher.state_dict()
    if any(not torch.equal(ours[k], theirs[k]) for k in keys):
        raise LungCBIRError(f"{weights}: the teacher's lung network differs from the student's")
    teacher.eval().requires_grad_(False)
    return teacher


def _initial_network(unet_config: UNetConfig, input_size: int, initial_weights: str | None
                     ) -> tuple[UNet, tuple[torch.Tensor, torch.Tensor] | None]:
    """A new network, or one started from ``initial_weights`` (a new lesion head or branch added
    fresh); with a new lesion head, the lung head's (weight, bias), which then stay fixed."""
    network = UNet(unet_config)
    if initial_weights is None:
        return network, None
    start, start_settings, _ = load_network(None if initial_weights == "bundled" else initial_weights)
    adding_head = (start_settings.unet.out_channels, unet_config.out_channels) == (1, 2)
    adding_branch = unet_config.lesion_levels > 0 and start_settings.unet.lesion_levels != unet_config.lesion_levels
    comparable = replace(start_settings.unet, out_channels=unet_config.out_channels,
                         lesion_levels=unet_config.lesion_levels)
    if comparable != unet_config or start_settings.preprocess.input_size != input_size:
        raise LungCBIRError(f"{initial_weights}: its network ({start_settings.unet}, input "
                            f"{start_settings.preprocess.input_size}) does not match the training configuration "
                            f"({unet_config}, input {input_size})")
    state = start.state_dict()
    if start_settings.unet.lesion_levels != unet_config.lesion_levels:
        # another branch shape (or none): the start's branch is left behind, a new one starts below
        state = {k: v for k, v in state.items() if not k.startswith("lesion_")}
    lung_head = None
    if adding_head:  # channel 0 keeps the lung head, channel 1 starts fresh
        fresh = network.state_dict()
        for key in ("head.weight", "head.bias"):
            fresh[key][:1] = state[key]
            state[key] = fresh[key]
        state["head.bias"][1] = NEW_HEAD_BIAS
        lung_head = (state["head.weight"][:1].clone(), state["head.bias"][:1].clone())
    if adding_branch:  # the branch starts as a copy of the lung decoder, its head with the "few lesions" bias
        state.update({k: v for k, v in network.state_dict().items() if k.startswith("lesion_")})
        state["lesion_head.bias"] = torch.full_like(state["lesion_head.bias"], NEW_HEAD_BIAS)
    network.load_state_dict(state)
    if adding_branch:
        network.copy_decoder_into_lesion_branch()
    return network, lung_head


def _resume(run: _Run, state_path: str, device: str, rng: random.Random, total_steps: int) -> tuple[int, float]:
    """Load the run's state saved after an epoch; returns (epochs done, best criterion)."""
    state = torch.load(state_path, map_location=device, weights_only=False)
    run.network.load_state_dict(state["network"])
    if "head" in state:  # states written before the contrastive objective existed have none
        run.head.load_state_dict(state["head"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.scheduler.total_steps = total_steps  # resuming may extend the run
    rng.setstate(state["rng"])
    torch.set_rng_state(state["torch_rng"])
    return state["epoch"], state["best"]


def _epoch_batches(order: list[int], neighbours: list[list[int]], rng: random.Random, config: TrainConfig,
                   steps_per_epoch: int) -> list[list[tuple[int, int]]]:
    """The views of each step of an epoch as (sample index, seed), decided here and drawn (in
    worker processes, if any) from a seed of their own, so a run gives the same result with any
    number of workers. An epoch takes the first views of a fresh shuffle (repeated if it needs more)."""
    rng.shuffle(order)
    epoch_order = order * math.ceil(steps_per_epoch * config.batch_size / max(1, len(order)))
    batches = []
    for step in range(steps_per_epoch):
        picked = epoch_order[step * config.batch_size:(step + 1) * config.batch_size]
        if config.contrastive_weight:  # a second view: the same slice, or half the time a neighbour
            picked = picked + [rng.choice(neighbours[i]) if neighbours[i] and rng.random() < 0.5 else i
                               for i in picked]
        batches.append([(i, rng.randrange(2**31)) for i in picked])
    return batches


def _train_step(run: _Run, batch: list[torch.Tensor], config: TrainConfig) -> torch.Tensor:
    """One optimiser step on a batch of (images, labels, lesion labels known, slice labels); its loss."""
    images, labels, known, slice_labels = batch
    labelled = slice_labels != NO_SLICE_LABEL
    logits, bottleneck = run.network.forward_with_bottleneck(images)
    loss = dice_loss(logits[:, :1], labels[:, :1])
    if config.lesion_lung_weight:
        lesion_pixels = labels[:, 1:2] > 0.5
        if lesion_pixels.any():
            loss = loss + config.lesion_lung_weight * F.binary_cross_entropy_with_logits(
                logits[:, :1][lesion_pixels], torch.ones_like(logits[:, :1][lesion_pixels]))
    if config.contrastive_weight:
        vectors = run.head(pooled_vectors(bottleneck, torch.sigmoid(logits[:, :1]).detach(), CONTRASTIVE_POOLING))
        first, second = vectors.chunk(2)
        loss = loss + config.contrastive_weight * contrastive_loss(first, second, config.contrastive_temperature)
    if run.learns_lesions and known.any():  # slices without lesion masks add no lesion loss
        loss = loss + config.infection_weight * weighted_dice_loss(
            logits[known][:, 1:2], labels[known][:, 1:2], labels[known][:, 2:3])
    if run.teacher is not None:
        with torch.no_grad():
            taught = torch.sigmoid(run.teacher(images)[:, 1:2])
        loss = loss + config.distillation_weight * F.binary_cross_entropy_with_logits(logits[:, 1:2], taught)
    if run.learns_lesions and labelled.any():
        loss = loss + config.slice_label_weight * slice_label_loss(
            logits[labelled][:, 1], labels[labelled][:, 0] > 0.5, slice_labels[labelled])
    if loss.requires_grad:  # a lesion branch learns nothing from a batch without lesion labels
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        run.optimizer.step()
    run.scheduler.step()
    if run.lung_head is not None:
        with torch.no_grad():
            run.network.head.weight[:1] = run.lung_head[0]
            # torch types Conv2d.bias as Optional; this head is built with a bias
            run.network.head.bias[:1] = run.lung_head[1]  # type: ignore[index]
    return loss.detach()


def graft_lung_levels(branch_weights: str, lung_weights: str, out: str) -> None:
    """Write ``out``: the model of ``branch_weights`` (a lesion branch trained on frozen lungs) with
    the last lung levels and lung head of ``lung_weights`` (trained alone, ``TrainConfig.lung_levels``).

    Both must have learnt on the same frozen lung network: everything the branch reads (encoder,
    bottleneck, the shared decoder levels) must be identical in both, so each part sees exactly
    the features it was trained on. The two trainings are then independent and can run side by side.
    """
    branch, branch_settings, _ = load_network(branch_weights)
    lungs, lung_settings, _ = load_network(lung_weights)
    if not branch.config.lesion_branch or lungs.config.lesion_branch:
        raise LungCBIRError("graft: give a model with a lesion branch and a lung-only model")
    levels = int(lung_settings.training.get("lung_levels") or 0)
    if levels <= 0 or levels > branch.config.lesion_levels:
        raise LungCBIRError(f"{lung_weights}: its last lung levels ({levels}) must be trained alone and no more "
                            f"than the branch's ({branch.config.lesion_levels})")
    taken = [f"{part}.{level}." for part in ("up_convs", "up_blocks")
             for level in range(branch.config.depth - levels, branch.config.depth)] + ["head."]
    theirs, ours = lungs.state_dict(), branch.state_dict()
    for key, value in theirs.items():
        if not key.startswith(tuple(taken)) and not torch.equal(value, ours[key]):
            raise LungCBIRError(f"graft: {key} differs between the two models; they did not learn on the same lungs")
    ours.update({key: value for key, value in theirs.items() if key.startswith(tuple(taken))})
    branch.load_state_dict(ours)
    training = {**branch_settings.training, "grafted_lungs": lung_weights, "lung_training": lung_settings.training}
    save_weights(out, branch, replace(branch_settings, training=training, centre=None))


def split_by_group(samples: Sequence[TrainingSample], val_fraction: float, seed: int = 0
                   ) -> tuple[list[TrainingSample], list[TrainingSample]]:
    """Hold out whole groups (patients/volumes) until about ``val_fraction`` of the slices."""
    groups = sorted({s.group for s in samples})
    random.Random(seed).shuffle(groups)
    target = val_fraction * len(samples)
    held: set[str] = set()
    count = 0
    for group in groups:
        if count >= target:
            break
        held.add(group)
        count += sum(1 for s in samples if s.group == group)
    return [s for s in samples if s.group not in held], [s for s in samples if s.group in held]


def group_of(path: str, pattern: str) -> str:
    """The patient/volume a file belongs to: the first group of ``pattern`` in its name."""
    match = re.search(pattern, os.path.basename(path))
    return match.group(1) if match and match.groups() else _stem(path)


def training_samples(folders: Sequence[tuple[str, str]], input_size: int, group_regex: str
                     ) -> list[TrainingSample]:
    """Every image of each (image folder, mask folder) pair as a sample at the model input size,
    with its group (patient/volume, the first group of ``group_regex`` in the file name), its
    series (the same group) and its position in that series (the pattern's second group).

    Example:
        >>> import tempfile
        >>> from lungcbir.phantom import write_phantom
        >>> folder = tempfile.mkdtemp()
        >>> _ = write_phantom(folder, slices=3, size=64, patients=2)
        >>> samples = training_samples([(f"{folder}/png", f"{folder}/masks")], 64, r"^(.+?)_s(\\d+)")
        >>> train_set, val_set = split_by_group(samples, 0.4)
        >>> len(samples), sorted({s.group for s in val_set})
        (6, ['phantom01'])
    """
    samples = []
    for image_dir, mask_dir in folders:
        for image, mask in pair_folders(image_dir, mask_dir):
            group = group_of(image, group_regex)
            samples.append(replace(load_sample(image, mask, input_size, group), series=group,
                                   position=position_of(image, group_regex)))
    return samples


def position_of(path: str, pattern: str) -> int | None:
    """The slice's number within its volume: the second group of ``pattern``, if it has one.

    Example:
        >>> position_of("case7_k012.png", r"^(.+?)_[kzs]_?(\\d+)")
        12
    """
    match = re.search(pattern, os.path.basename(path))
    return int(match.group(2)) if match and len(match.groups()) >= 2 and match.group(2) else None
