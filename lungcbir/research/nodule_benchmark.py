"""Similar-nodule retrieval on LIDC-IDRI nodules pasted into full HU slices (issue 26 item 4).

**The slices.** Each of ``lidc-nodules``' 624 nodules gives one full slice: its central slice
(the one where its mask is largest, the slice a reader would point at), in HU, is pasted into a
lesion-free lung of a ``kaggle-lungs-2d`` val or test slice (slices the bundled model did not
learn from), at a random place where the whole crop lies inside the lung, inside its mask only
(the masks are loose, so the nodule keeps a rim of its own lung) with a one-pixel soft edge. The
crops hold no body or mediastinum, so pasting is what gives the model the context it was trained
on. The Kaggle slices are "HU-like" (air about -810): each is shifted so that its air outside the
body lies at -1000, so the nodule's real HU and its new surroundings agree. The mask (inside the
lung) is the region. Pixels stay 1:1 (LIDC about 0.7 mm, Kaggle slices 512 pixels of a similar
field of view), so sizes keep their meaning. Background and place come from a generator seeded by
the nodule's file name: the same slices on every run.

**The measures**, every query against the nodules of *other* patients (leave-patient-out):

* malignancy agreement: queries rated 1-2 or 4-5 (3 = indeterminate, left out of queries and
  neighbours), the share of the top 5 in the same class;
* ground-glass share: queries whose texture is Non-Solid/GGO, the share of GGO in the top 5;
* texture agreement: every query, the share of the top 5 with the same of the five textures;
* majority-vote AUC: the malignant share of the top 5 as a score for the query's class.

**Choices inside the folds.** Patients are split into five folds; for the queries of one fold,
each feature block is standardised with the other folds' mean and spread, and the block weights
(each 0, 1 or 2; the baseline's histogram bins and size among the blocks) are those with the best
mean of malignancy agreement and ground-glass share on the other folds alone (their own
leave-patient-out retrieval), found by coordinate ascent. A learnt distance (two Fisher
directions, malignancy and ground glass, over every block) is fitted on the other folds too.
The neighbours of a query are every other patient's nodules. Intervals: 95 % percentile bootstrap resampling patients.

**The stored region vectors** (:func:`lungcbir.regions.region_vector`) are measured as the
product computes and searches them: :func:`product_region_vectors` runs each slice through
``as_slice`` and one ``LungModel.segment(..., keep_maps=True)`` pass and calls ``region_vector``
with the model's saved centre and HU window, as ``Retriever.query_region`` and indexing do; the
neighbours are ranked by inner product of the unit vectors (the region index's cosine), with the
recipe's block weights and nothing fitted (:func:`cross_validated_cosine`). Two recipes: ``r1``
(:data:`R1_WEIGHTS`, set by hand, shipped until 2026-12-07) and the shipped ``r2``. A separate
variant (:func:`cross_validated_r1_weights`) keeps r1's four unit blocks and chooses their
weights inside the folds as above; that procedure, run once on every nodule
(:func:`recipe_weights`), chose r2's weights, so its cross-validated figures are the honest
estimate for r2, while r2's own column is optimistic (its weights saw every query).
"""

from __future__ import annotations

import csv
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import cv2
import numpy as np

from ..datasets import data_root, kaggle_slices
from ..io import read_file, read_mask
from ..metrics import roc_auc
from .synthetic_disease import paste

if TYPE_CHECKING:
    from ..inference import LungModel

#: The lung window of an 8-bit export (W 1500, L -600), not the model's own window, as archives do.
EXPORT_WINDOW = (-1350.0, 150.0)
CANDIDATE_BLOCKS = ("bins", "size", "intensity", "shape", "zoom128", "zoom256", "context")
WEIGHTS = (0.0, 1.0, 2.0)
TOP = 5
FOLDS = 5
GROUND_GLASS = 1  # LIDC texture code of Non-Solid/GGO


@dataclass
class NoduleCase:
    """One LIDC nodule pasted into a full HU slice."""

    name: str
    patient: str
    malignancy: int  # 1-5, the radiologists' max-voting rating
    texture: int  # 1 (Non-Solid/GGO) ... 5 (Solid)
    diameter_mm: float
    background: str  # the Kaggle slice it was pasted into
    pixels: np.ndarray  # float32 HU, the full slice
    region: np.ndarray  # bool, the nodule's mask inside the lung


def calibrated(pixels: np.ndarray, lungs: np.ndarray) -> np.ndarray:
    """A Kaggle "HU-like" slice shifted so that the air outside the body (values between -1200
    and -600 outside the lungs; the out-of-field fill lies far lower) has median -1000.

    Example:
        >>> image = np.full((4, 4), -810.0); image[1:3, 1:3] = -690.0
        >>> calibrated(image, image > -700).tolist()[1][1]
        -880.0
    """
    air = pixels[~lungs & (pixels > -1200) & (pixels < -600)]
    shift = -1000.0 - float(np.median(air)) if air.size else 0.0
    return (pixels + shift).astype(np.float32)


def _central_slice(image_path: Path, mask_path: Path) -> tuple[np.ndarray, np.ndarray]:
    import nibabel  # only the benchmark reads NIfTI crops as arrays

    # nibabel.load is typed as any image; these files are NIfTI images, which have dataobj
    image = np.asarray(cast(Any, nibabel.load(image_path)).dataobj, np.float32)
    mask = np.asarray(cast(Any, nibabel.load(mask_path)).dataobj) > 0
    z = int(np.argmax(mask.sum(axis=(0, 1))))
    return image[:, :, z].T.copy(), mask[:, :, z].T.copy()


def pasted_nodules(root: Path | None = None, limit: int | None = None) -> list[NoduleCase]:
    """Every nodule of ``lidc-nodules`` pasted into a lesion-free Kaggle val/test slice."""
    root = root or data_root()
    folder = root / "lidc-nodules"
    split = kaggle_slices(root)
    backgrounds = []
    for sample in split["val"] + split["test"]:
        lungs = read_mask(sample.mask).astype(bool)
        pixels = read_file(sample.image)[0].pixels
        backgrounds.append((Path(sample.image).name, calibrated(pixels, lungs), lungs))
    with open(folder / "nodules.csv", newline="") as handle:
        rows = sorted(csv.DictReader(handle), key=lambda row: row["file"])[:limit]
    cases = []
    for row in rows:
        crop, mask = _central_slice(folder / "images" / row["file"], folder / "masks" / row["file"])
        rng = np.random.default_rng(zlib.crc32(row["file"].encode()))
        height, width = mask.shape
        for _ in range(50):  # a background whose lung holds the whole crop
            name, hu, lungs = backgrounds[int(rng.integers(len(backgrounds)))]
            inner = cv2.erode(lungs.astype(np.uint8), np.ones((height + 4, width + 4), np.uint8)) > 0
            if inner.any():
                break
        else:  # a crop larger than any lung: keep its centre inside
            inner = lungs
        ys, xs = np.nonzero(inner)
        pick = int(rng.integers(len(ys)))
        top = int(np.clip(ys[pick] - height // 2, 0, hu.shape[0] - height))
        left = int(np.clip(xs[pick] - width // 2, 0, hu.shape[1] - width))
        region = np.zeros(hu.shape, bool)
        region[top:top + height, left:left + width] = mask
        values = hu.copy()
        values[top:top + height, left:left + width] = crop
        cases.append(NoduleCase(row["file"], row["patient_id"], int(row["Malignancy_value"]),
                                int(row["Texture_value"]), float(row["diameter_mm"]), name,
                                paste(hu, region, values), region & lungs if (region & lungs).any() else region))
    return cases


def export_8bit(hu: np.ndarray) -> np.ndarray:
    """The slice as an 8-bit export in the lung window :data:`EXPORT_WINDOW`."""
    low, high = EXPORT_WINDOW
    return np.round(np.clip((hu - low) / (high - low), 0, 1) * 255).astype(np.uint8)


# --- evaluation -------------------------------------------------------------------------------


@dataclass
class Labels:
    patient: np.ndarray  # str per nodule
    malignancy: np.ndarray  # int 1-5
    texture: np.ndarray  # int 1-5


def patient_folds(patients: np.ndarray, folds: int = FOLDS, seed: int = 26) -> np.ndarray:
    """The fold of each nodule, by patient (a patient's nodules share one fold)."""
    unique = np.unique(patients)
    order = np.random.default_rng(seed).permutation(len(unique))
    fold_of = {patient: int(rank % folds) for patient, rank in zip(unique[order], range(len(unique)))}
    return np.array([fold_of[p] for p in patients])


def block_distances(blocks: dict[str, np.ndarray], train: np.ndarray) -> dict[str, np.ndarray]:
    """Per block, the mean squared difference of standardised features between every two nodules
    (standardised with the ``train`` rows' mean and spread)."""
    out = {}
    for name, values in blocks.items():
        mean, spread = values[train].mean(0), values[train].std(0) + 1e-6
        z = (values - mean) / spread
        squared = (z * z).sum(1)
        out[name] = np.maximum(squared[:, None] + squared[None, :] - 2 * z @ z.T, 0) / z.shape[1]
    return out


def top_neighbours(distance: np.ndarray, queries: np.ndarray, candidates: np.ndarray, patients: np.ndarray,
                   top: int = TOP) -> np.ndarray:
    """For each query row, the ``top`` nearest candidate rows of other patients (indices)."""
    sub = distance[np.ix_(queries, candidates)].copy()
    sub[patients[queries][:, None] == patients[candidates][None, :]] = np.inf
    top = min(top, sub.shape[1])
    nearest = np.argpartition(sub, top - 1, axis=1)[:, :top]
    order = np.argsort(np.take_along_axis(sub, nearest, 1), axis=1, kind="stable")
    return candidates[np.take_along_axis(nearest, order, 1)]


def query_scores(distance: np.ndarray, queries: np.ndarray, database: np.ndarray, labels: Labels,
                 chance: bool = True) -> dict[str, np.ndarray]:
    """Per query (NaN where a measure does not apply): malignancy agreement and malignant share
    of the top 5, ground-glass share, texture agreement, and their chance levels."""
    benign, malignant = labels.malignancy <= 2, labels.malignancy >= 4
    rated = benign | malignant
    n = len(queries)
    out = {key: np.full(n, np.nan) for key in ("malignancy", "malignant_share", "ground_glass", "texture",
                                                "chance_malignancy", "chance_ground_glass", "chance_texture")}
    rated_queries = queries[rated[queries]]
    if len(rated_queries):
        top = top_neighbours(distance, rated_queries, database[rated[database]], labels.patient)
        rows = np.nonzero(rated[queries])[0]
        same = malignant[top] == malignant[rated_queries][:, None]
        out["malignancy"][rows] = same.mean(1)
        out["malignant_share"][rows] = malignant[top].mean(1)
        for row, query in zip(rows, rated_queries):
            if chance:
                pool = database[rated[database] & (labels.patient[database] != labels.patient[query])]
                out["chance_malignancy"][row] = np.mean(malignant[pool] == malignant[query])
    top = top_neighbours(distance, queries, database, labels.patient)
    out["texture"] = (labels.texture[top] == labels.texture[queries][:, None]).mean(1)
    glass = labels.texture[queries] == GROUND_GLASS
    out["ground_glass"][glass] = (labels.texture[top[glass]] == GROUND_GLASS).mean(1)
    if chance:
        for index, query in enumerate(queries):
            pool = database[labels.patient[database] != labels.patient[query]]
            out["chance_texture"][index] = np.mean(labels.texture[pool] == labels.texture[query])
            if glass[index]:
                out["chance_ground_glass"][index] = np.mean(labels.texture[pool] == GROUND_GLASS)
    return out


def objective(scores: dict[str, np.ndarray]) -> float:
    """What the folds choose by: the mean of malignancy agreement and ground-glass share."""
    parts = [scores[key][~np.isnan(scores[key])] for key in ("malignancy", "ground_glass")]
    means = [part.mean() for part in parts if len(part)]
    return float(np.mean(means)) if means else 0.0


def combined(distances: dict[str, np.ndarray], weights: dict[str, float]) -> np.ndarray:
    """The weighted mean of the blocks' distances."""
    total = np.zeros_like(next(iter(distances.values())))
    for name, weight in weights.items():
        if weight:
            total += weight * distances[name]
    return total / sum(weights.values())


def choose_weights(distances: dict[str, np.ndarray], train: np.ndarray, labels: Labels,
                   names: tuple[str, ...] = CANDIDATE_BLOCKS, grid: tuple[float, ...] = WEIGHTS
                   ) -> dict[str, float]:
    """Block weights with the best :func:`objective` on ``train`` alone, by coordinate ascent
    (an exhaustive grid of seven blocks is 2,187 weightings per fold): start from the best
    single block, then change one block's weight at a time to the best value of ``grid`` while
    that raises the objective."""

    def value(weights: dict[str, float]) -> float:
        if not any(weights.values()):
            return -1.0
        return objective(query_scores(combined(distances, weights), train, train, labels, chance=False))

    singles = {name: value({n: float(n == name) for n in names}) for name in names}
    chosen = {n: float(n == max(singles, key=lambda k: singles[k])) for n in names}
    best = value(chosen)
    for _ in range(3 * len(names)):
        trials = [(value({**chosen, name: w}), name, w) for name in names for w in grid if w != chosen[name]]
        score, name, weight = max(trials, key=lambda trial: trial[0])
        if score <= best + 1e-9:
            break
        best, chosen = score, {**chosen, name: weight}
    return chosen


def cross_validated(blocks: dict[str, np.ndarray], labels: Labels, choose: bool,
                    names: tuple[str, ...] = CANDIDATE_BLOCKS) -> tuple[dict[str, np.ndarray], list[dict]]:
    """Every nodule queried once, with its fold's standardisation and (``choose``) weights chosen
    on the other folds; without ``choose`` all ``blocks`` weigh the same. Returns per-query
    scores (in nodule order) and each fold's weights."""
    folds = patient_folds(labels.patient)
    everyone = np.arange(len(folds))
    scores: dict[str, np.ndarray] = {}
    chosen = []
    for fold in range(FOLDS):
        train, test = everyone[folds != fold], everyone[folds == fold]
        distances = block_distances(blocks, train)
        weights = choose_weights(distances, train, labels, names) if choose else {n: 1.0 for n in blocks}
        chosen.append(weights)
        part = query_scores(combined(distances, weights), test, everyone, labels)
        for key, values in part.items():
            scores.setdefault(key, np.full(len(folds), np.nan))[test] = values
    return scores, chosen


# --- the stored region vectors (recipes r1 and r2) --------------------------------------------

#: The unit blocks of a region vector, in its order (:func:`lungcbir.regions.region_vector`).
R1_BLOCKS = ("context", "intensity", "shape", "lesion")
#: Recipe r1's block weights, set by hand (shipped until 2026-12-07; r2 replaced it): the
#: benchmark still computes r1 vectors with them (``region_vector(..., weights=R1_WEIGHTS)``).
R1_WEIGHTS = {"context": 0.4, "intensity": 0.35, "shape": 0.15, "lesion": 0.1}


def product_region_vectors(model: LungModel, images: list[np.ndarray], regions: list[np.ndarray],
                           batch_size: int = 4, weights: dict[str, float] | None = None
                           ) -> tuple[np.ndarray, np.ndarray]:
    """The region vectors the product stores and searches, for each (slice, region mask): the
    slice as ``Retriever.query_region`` takes an array (``as_slice``), one
    ``model.segment(..., keep_maps=True)`` pass, :func:`~lungcbir.regions.region_vector` with the
    model's saved centre and HU window (and ``weights``: by default the shipped recipe's; r1's
    with :data:`R1_WEIGHTS`). Returns the vectors and whether the product would search
    with each (False where the slice was judged to hold no lungs: ``query_region`` answers
    nothing there; its vector is still computed when the maps exist, else zero)."""
    from ..quality import Quality
    from ..regions import region_vector
    from ..retrieval import as_slice

    centre = model.settings.centre
    window = model.settings.preprocess.hu_window
    vectors, usable = [], []
    for start in range(0, len(images), batch_size):
        slices = [as_slice(image) for image in images[start:start + batch_size]]
        results = model.segment(slices, batch_size, keep_maps=True)
        for result, region in zip(results, regions[start:start + batch_size]):
            usable.append(result.quality != Quality.NO_LUNGS and result.maps is not None)
            if result.maps is None:
                vectors.append(np.zeros(0, np.float32))
                continue
            vectors.append(region_vector(result.maps, region, None if centre is None else np.asarray(centre), window,
                                         weights))
    width = max(len(v) for v in vectors)
    return (np.stack([v if len(v) else np.zeros(width, np.float32) for v in vectors]).astype(np.float32),
            np.array(usable, bool))


def vector_blocks(vectors: np.ndarray, channels: int, weights: dict[str, float] | None = None
                  ) -> dict[str, np.ndarray]:
    """The blocks of region vectors made with ``weights`` (by default the shipped recipe's;
    blocks of weight 0 are not in the vector; ``context`` has the bottleneck's ``channels``,
    then 11 + 4 + 2 values), as they are inside the vector (each the unit block times the square
    root of its weight)."""
    from ..regions import REGION_BLOCK_WEIGHTS

    weights = REGION_BLOCK_WEIGHTS if weights is None else weights
    lengths = {"context": channels, "intensity": 11, "shape": 4, "lesion": 2}
    names = [name for name in R1_BLOCKS if weights.get(name, 0.0) > 0]
    sizes = tuple(lengths[name] for name in names)
    if vectors.shape[1] != sum(sizes):
        raise ValueError(f"region vectors of length {vectors.shape[1]}, expected {sum(sizes)}")
    edges = np.cumsum((0,) + sizes)
    return {name: vectors[:, edges[i]:edges[i + 1]] for i, name in enumerate(names)}


def r1_blocks(vectors: np.ndarray, channels: int) -> dict[str, np.ndarray]:
    """The four blocks of recipe r1's region vectors (:data:`R1_WEIGHTS`: bottleneck
    ``channels`` + 11 + 4 + 2 values), as :func:`vector_blocks`."""
    return vector_blocks(vectors, channels, R1_WEIGHTS)


def cosine_distance(vectors: np.ndarray) -> np.ndarray:
    """1 - the inner product of every two rows: the region index's ranking for unit vectors."""
    vectors = vectors.astype(np.float64)
    return 1.0 - vectors @ vectors.T


def cross_validated_cosine(vectors: np.ndarray, labels: Labels) -> dict[str, np.ndarray]:
    """Every nodule queried once against every other patient's nodules by inner product of the
    vectors as given (nothing fitted, nothing standardised), in the same patient folds."""
    folds = patient_folds(labels.patient)
    everyone = np.arange(len(folds))
    distance = cosine_distance(vectors)
    scores: dict[str, np.ndarray] = {}
    for fold in range(FOLDS):
        test = everyone[folds == fold]
        for key, values in query_scores(distance, test, everyone, labels).items():
            scores.setdefault(key, np.full(len(folds), np.nan))[test] = values
    return scores


def block_cosine_distances(blocks: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each block's cosine distance between every two nodules (a weighted mean of them ranks as
    a weighted sum of the blocks' cosines, as a region vector does with its weights)."""
    distances = {}
    for name, values in blocks.items():
        norms = np.linalg.norm(values, axis=1, keepdims=True)
        distances[name] = cosine_distance(np.where(norms > 0, values / np.maximum(norms, 1e-12), 0.0))
    return distances


def cross_validated_r1_weights(blocks: dict[str, np.ndarray], labels: Labels
                               ) -> tuple[dict[str, np.ndarray], list[dict]]:
    """The stored vector's blocks re-weighted: each block's cosine distance
    (:func:`block_cosine_distances`), the weights chosen on the other folds by
    :func:`choose_weights`. This is the procedure that chose recipe r2's weights
    (:func:`recipe_weights`): its cross-validated figures are the estimate for r2."""
    distances = block_cosine_distances(blocks)
    folds = patient_folds(labels.patient)
    everyone = np.arange(len(folds))
    scores: dict[str, np.ndarray] = {}
    chosen = []
    for fold in range(FOLDS):
        train, test = everyone[folds != fold], everyone[folds == fold]
        weights = choose_weights(distances, train, labels, tuple(blocks))
        chosen.append(weights)
        for key, values in query_scores(combined(distances, weights), test, everyone, labels).items():
            scores.setdefault(key, np.full(len(folds), np.nan))[test] = values
    return scores, chosen


def recipe_weights(blocks: dict[str, np.ndarray], labels: Labels) -> tuple[dict[str, float], dict[str, float]]:
    """The weights :func:`cross_validated_r1_weights` chooses in each fold, chosen once on every
    nodule (the same :func:`choose_weights` on the blocks' cosine distances, ``train`` = all):
    how recipe r2's weights were picked. Returns the chosen weights (each of
    :data:`WEIGHTS`) and the same normalised to sum to 1, as ``REGION_BLOCK_WEIGHTS`` holds them."""
    everyone = np.arange(len(labels.patient))
    chosen = choose_weights(block_cosine_distances(blocks), everyone, labels, tuple(blocks))
    total = sum(chosen.values())
    return chosen, {name: weight / total for name, weight in chosen.items()}


SHRINKAGE = (0.1, 0.5, 0.9)


def fisher_direction(values: np.ndarray, positive: np.ndarray, shrinkage: float) -> np.ndarray:
    """Fisher's discriminant direction of two classes with the within-class covariance shrunk
    towards its mean variance (``shrinkage`` 0: none, 1: the difference of means), unit length.

    Example:
        >>> x = np.array([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]]); y = x[:, 0] > 0
        >>> fisher_direction(x, y, 0.5).round(3).tolist()
        [1.0, 0.0]
    """
    centred = np.concatenate([values[positive] - values[positive].mean(0),
                              values[~positive] - values[~positive].mean(0)])
    within = centred.T @ centred / max(1, len(centred) - 2)
    within = (1 - shrinkage) * within + shrinkage * np.trace(within) / len(within) * np.eye(len(within))
    direction = np.linalg.solve(within, values[positive].mean(0) - values[~positive].mean(0))
    return direction / max(float(np.linalg.norm(direction)), 1e-12)


def learned_distances(blocks: dict[str, np.ndarray], train: np.ndarray, labels: Labels, shrinkage: float
                      ) -> np.ndarray:
    """A distance learnt from the ``train`` rows' labels: the blocks standardised with their
    mean and spread and projected on two Fisher directions, benign (1-2) against malignant (4-5)
    and ground glass against the rest, each projection scaled to unit spread on ``train``."""
    values = np.concatenate([(v - v[train].mean(0)) / (v[train].std(0) + 1e-6) for v in blocks.values()], axis=1)
    rated = train[(labels.malignancy[train] <= 2) | (labels.malignancy[train] >= 4)]
    directions = [fisher_direction(values[rated], labels.malignancy[rated] >= 4, shrinkage),
                  fisher_direction(values[train], labels.texture[train] == GROUND_GLASS, shrinkage)]
    projected = values @ np.stack(directions, axis=1)
    projected /= projected[train].std(0) + 1e-12
    return ((projected[:, None, :] - projected[None, :, :]) ** 2).sum(-1)


def choose_shrinkage(blocks: dict[str, np.ndarray], train: np.ndarray, labels: Labels,
                     grid: tuple[float, ...] = SHRINKAGE) -> float:
    """The shrinkage of :func:`learned_distances` with the best :func:`objective` when fitted on
    three quarters of ``train``'s patients and queried with the other quarter (four times)."""
    inner = patient_folds(labels.patient[train], 4, seed=27)
    best, chosen = -1.0, grid[0]
    for shrinkage in grid:
        parts: dict[str, list[np.ndarray]] = {"malignancy": [], "ground_glass": []}
        for fold in range(4):
            fit, held = train[inner != fold], train[inner == fold]
            distance = learned_distances(blocks, fit, labels, shrinkage)
            found = query_scores(distance, held, train, labels, chance=False)
            for key in parts:
                parts[key].append(found[key])
        value = objective({key: np.concatenate(values) for key, values in parts.items()})
        if value > best:
            best, chosen = value, shrinkage
    return chosen


def cross_validated_learned(blocks: dict[str, np.ndarray], labels: Labels
                            ) -> tuple[dict[str, np.ndarray], list[float]]:
    """As :func:`cross_validated` with :func:`learned_distances`, fitted on the other folds (its
    shrinkage chosen inside them by :func:`choose_shrinkage`)."""
    folds = patient_folds(labels.patient)
    everyone = np.arange(len(folds))
    scores: dict[str, np.ndarray] = {}
    chosen = []
    for fold in range(FOLDS):
        train, test = everyone[folds != fold], everyone[folds == fold]
        shrinkage = choose_shrinkage(blocks, train, labels)
        chosen.append(shrinkage)
        part = query_scores(learned_distances(blocks, train, labels, shrinkage), test, everyone, labels)
        for key, values in part.items():
            scores.setdefault(key, np.full(len(folds), np.nan))[test] = values
    return scores, chosen


MEASURES = (("malignancy agreement, top 5", "malignancy", "chance_malignancy"),
            ("ground-glass share, top 5 (GGO queries)", "ground_glass", "chance_ground_glass"),
            ("texture agreement, top 5", "texture", "chance_texture"),
            ("majority-vote malignancy AUC", "auc", None))


def summary(scores: dict[str, np.ndarray], labels: Labels, resamples: int = 2000, seed: int = 0
            ) -> dict[str, tuple[float, float, float]]:
    """Each measure (and its chance) with a 95 % interval from resampling patients."""
    rated = ~np.isnan(scores["malignant_share"])
    malignant = labels.malignancy >= 4

    def measure(rows: np.ndarray) -> dict[str, float]:
        out = {key: float(np.nanmean(scores[key][rows])) for key in
               ("malignancy", "ground_glass", "texture", "chance_malignancy", "chance_ground_glass",
                "chance_texture")}
        pick = rows[rated[rows]]
        out["auc"] = roc_auc(scores["malignant_share"][pick], malignant[pick])
        return out

    unique, inverse = np.unique(labels.patient, return_inverse=True)
    members = [np.nonzero(inverse == i)[0] for i in range(len(unique))]
    point = measure(np.arange(len(labels.patient)))
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {key: [] for key in point}
    with np.errstate(all="ignore"):
        for _ in range(resamples):
            rows = np.concatenate([members[i] for i in rng.integers(len(unique), size=len(unique))])
            for key, value in measure(rows).items():
                draws[key].append(value)
    return {key: (value, float(np.nanpercentile(draws[key], 2.5)), float(np.nanpercentile(draws[key], 97.5)))
            for key, value in point.items()}
