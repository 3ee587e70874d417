"""Retrieval quality on the shared real data: anatomical level, infection, diagnosis, contrast.

Research code (see :mod:`lungcbir.research`): it hard-codes the shared data sets' folder
names, label files and the duplicated TCGA slices (:data:`TCGA_DUPLICATE_IDS`), so it lives
outside the package's API; ``lungcbir evaluate-retrieval`` and ``benchmarks/`` call it.

Every measure excludes the query itself and every slice of the query's own patient, and every
database is a single dataset, so a feature cannot score by recognising the source; a separate
confound measure reports how often neighbours come from the query's own dataset when all
datasets are mixed. Each number is shown beside its chance level.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np
import torch

from ..datasets import COVID_TEST_PATIENTS, COVID_VAL_PATIENTS, data_root
from ..features import POOLINGS, pool_bottleneck
from ..focus import FOCUSES
from ..inference import LungModel
from ..io import CTSlice, dicom_series_positions, find_image_files, read_file
from ..metrics import spearman
from ..preprocess import normalize_intensity, to_model_input

#: Slices whose predicted lung fraction is below this are outside the lungs (level measure).
LUNG_PRESENT = 0.01
#: tcga-ct-slices ids whose pixels duplicate another slice's: one member of each pair is left
#: out, so a slice cannot find its own copy.
TCGA_DUPLICATE_IDS = frozenset({6, 13, 34, 66, 85, 99})


@dataclass
class BenchmarkSlice:
    """One real slice with everything the retrieval measures need to know about it."""

    slice: CTSlice
    dataset: str
    patient: str
    series: str
    index_in_series: int | None = None
    level: float | None = None  # 0 = lung apex, 1 = lung base
    infected: bool | None = None
    infection_fraction: float | None = None
    contrast: bool | None = None
    diagnosis: str | None = None


@dataclass
class Measure:
    task: str
    metric: str
    chance: float
    values: dict[str, float] = field(default_factory=dict)
    lower_is_better: bool = False


FeatureFunction = Callable[[Sequence[CTSlice]], np.ndarray]


def load_benchmark(root: Path | None = None) -> list[BenchmarkSlice]:
    """Read the shared data used by the retrieval measures (about 900 slices)."""
    root = root or data_root()
    items = covid_ct_md_items(root)
    # covid19-ct-lungmask: infection fraction from the lesion masks
    lungmask = root / "covid19-ct-lungmask"
    with open(lungmask / "manifest.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            item = read_file(lungmask / "ct" / row["file"])[0]
            fraction = int(row["infection_px"]) / max(1, int(row["lung_px"]))
            items.append(BenchmarkSlice(item, "covid19-ct-lungmask", row["patient"], row["volume"], int(row["k"]),
                                        infected=True, infection_fraction=fraction))
    # tcga: contrast yes/no; the duplicated pixel pairs keep one member each
    tcga = root / "tcga-ct-slices"
    with open(tcga / "overview.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            if int(row["id"]) in TCGA_DUPLICATE_IDS:
                continue
            item = read_file(tcga / "dicom" / row["dicom_name"])[0]
            items.append(BenchmarkSlice(item, "tcga-ct-slices", item.patient_id or row["id"], item.series_uid or "",
                                        contrast=row["Contrast"] == "True"))
    return items


def covid_ct_md_items(root: Path | None = None, series: frozenset[str] | None = None) -> list[BenchmarkSlice]:
    """covid-ct-md's DICOM series (``series``, default all six): diagnosis per series, infection
    per slice for the four labelled ones (the normal patients' slices count as clean only where
    a measure says so: ``infected`` is None for them)."""
    md = (root or data_root()) / "covid-ct-md"
    labels = {}  # by path: P002, cap002 and normal002 share file names (IM0001.dcm, ...)
    with open(md / "slice_labels.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            labels[row["path"]] = row["infection"] == "1"
    diagnosis = {"covid": "COVID-19", "cap": "CAP", "normal": "normal"}
    items = []
    for folder in sorted(p for p in md.glob("*/*") if p.is_dir() and p.parent.name in diagnosis):
        if series is not None and folder.name not in series:
            continue
        files = list(find_image_files([folder]))
        positions = dicom_series_positions(files)
        for path in files:
            item = read_file(path)[0]
            items.append(BenchmarkSlice(item, "covid-ct-md", folder.name, folder.name, positions[path],
                                        infected=labels.get(Path(path).relative_to(md).as_posix()),
                                        diagnosis=diagnosis[folder.parent.name]))
    return items


def assign_levels(items: list[BenchmarkSlice], lung_fractions: np.ndarray) -> None:
    """Relative level within the lungs of each covid-ct-md slice, from predicted lung masks."""
    # (position in series, item number) per series; a slice without a position has no level
    by_series: dict[str, list[tuple[int, int]]] = {}
    for number, item in enumerate(items):
        if item.dataset == "covid-ct-md" and item.index_in_series is not None:
            by_series.setdefault(item.series, []).append((item.index_in_series, number))
    for members in by_series.values():
        members.sort(key=lambda member: member[0])
        inside = [(position, n) for position, n in members if lung_fractions[n] >= LUNG_PRESENT]
        if len(inside) < 2:
            continue
        first, last = inside[0][0], inside[-1][0]
        for position, n in inside:
            items[n].level = (position - first) / (last - first)


# -- features ---------------------------------------------------------------------------------


def raw_pixel_features(slices: Sequence[CTSlice], side: int = 32) -> np.ndarray:
    """Baseline: the lung-windowed slice resized to 32x32, L2-normalised."""
    vectors = []
    for item in slices:
        unit = normalize_intensity(item.pixels, item.intensity)
        square, _ = to_model_input(unit, side * 8)
        small = cv2.resize(square, (side, side), interpolation=cv2.INTER_AREA).ravel()
        vectors.append(small / max(float(np.linalg.norm(small)), 1e-8))
    return np.asarray(vectors, np.float32)


@dataclass
class Encoded:
    """Bottlenecks and lung probabilities of a model for a list of slices."""

    bottlenecks: torch.Tensor
    probabilities: torch.Tensor
    lung_fractions: np.ndarray


def encode(model: LungModel, slices: Sequence[CTSlice], batch_size: int = 32) -> Encoded:
    """Run the network on the model's device; the results are gathered on the CPU."""
    bottlenecks, probabilities = [], []
    with torch.inference_mode():
        for start in range(0, len(slices), batch_size):
            inputs = np.stack([model.prepare(s)[0] for s in slices[start:start + batch_size]])
            batch = torch.from_numpy(inputs[:, None]).to(model.device).to(memory_format=torch.channels_last)
            logits, bottleneck = model.network.forward_with_bottleneck(batch)
            # to the CPU batch by batch: device memory stays bounded and numpy can read them
            bottlenecks.append(bottleneck.float().cpu())
            probabilities.append(torch.sigmoid(logits[:, :1].float()).cpu())  # channel 0: lungs
    probability = torch.cat(probabilities)
    return Encoded(torch.cat(bottlenecks), probability, (probability[:, 0] > 0.5).float().mean((1, 2)).numpy())


def pooled(encoded: Encoded, method: str) -> np.ndarray:
    return pool_bottleneck(encoded.bottlenecks, encoded.probabilities, method)


def whiten(vectors: np.ndarray, dimension: int = 256) -> np.ndarray:
    """PCA-whitening fitted on the whole indexed set, then L2-normalised."""
    data = vectors - vectors.mean(0)
    _, singular, basis = np.linalg.svd(data, full_matrices=False)
    keep = min(dimension, len(singular))
    out = data @ basis[:keep].T / (singular[:keep] / np.sqrt(len(data)) + 1e-3 * singular[0])
    return (out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-8)).astype(np.float32)


# -- measures ---------------------------------------------------------------------------------


def _ranked(similarity_row: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    return candidates[np.argsort(-similarity_row[candidates], kind="stable")]


def measure(items: list[BenchmarkSlice], vectors: np.ndarray) -> dict[tuple[str, str], tuple[float, float, bool]]:
    """All measures for one feature: {(task, metric): (value, chance, lower_is_better)}."""
    similarity = vectors @ vectors.T
    patients = np.array([i.patient for i in items])
    datasets = np.array([i.dataset for i in items])
    results: dict[tuple[str, str], tuple[float, float, bool]] = {}

    # anatomical level: one series as database, every slice of another patient's series as query
    md = [n for n, i in enumerate(items) if i.dataset == "covid-ct-md" and i.level is not None]
    series = sorted({items[n].series for n in md})
    top1, top5, chance = [], [], []
    for query_series in series:
        for database_series in series:
            if query_series == database_series:
                continue
            database = np.array([n for n in md if items[n].series == database_series])
            levels = np.array([items[n].level for n in database])
            for q in (n for n in md if items[n].series == query_series):
                order = _ranked(similarity[q], database)
                found = np.array([items[n].level for n in order])
                top1.append(abs(found[0] - items[q].level))
                top5.append(np.abs(found[:5] - items[q].level).mean())
                chance.append(np.abs(levels - items[q].level).mean())
    section = "anatomical level (covid-ct-md)"
    results[(section, "top-1 level error")] = (float(np.mean(top1)), float(np.mean(chance)), True)
    results[(section, "top-5 level error")] = (float(np.mean(top5)), float(np.mean(chance)), True)

    def precision_block(task: str, queries: list[int], pool: np.ndarray, relevant: Callable[[int, int], bool]):
        p: dict[int, list[float]] = {1: [], 5: [], 10: []}
        recall10, average_precisions, chance_values = [], [], []
        for q in queries:
            candidates = pool[patients[pool] != patients[q]]
            order = _ranked(similarity[q], candidates)
            hits = np.array([relevant(q, n) for n in order])
            total = hits.sum()
            chance_values.append(hits.mean())
            for k in p:
                p[k].append(hits[:k].mean())
            recall10.append(hits[:10].sum() / total if total else 0.0)
            if total:
                ranks = np.flatnonzero(hits) + 1
                average_precisions.append(np.mean(np.arange(1, len(ranks) + 1) / ranks))
        level = float(np.mean(chance_values))
        for k, values in p.items():
            results[(task, f"precision@{k}")] = (float(np.mean(values)), level, False)
        results[(task, "mAP")] = (float(np.mean(average_precisions)), level, False)
        chance_recall = float(np.mean([min(10, len(pool)) / len(pool) for _ in queries]))
        results[(task, "recall@10")] = (float(np.mean(recall10)), chance_recall, False)

    md_all = np.array([n for n, i in enumerate(items) if i.dataset == "covid-ct-md" and i.level is not None])
    precision_block("diagnosis (covid-ct-md, 3 classes)", list(md_all),
                    md_all, lambda q, n: items[q].diagnosis == items[n].diagnosis)
    labelled = np.array([n for n, i in enumerate(items) if i.dataset == "covid-ct-md" and i.infected is not None])
    precision_block("infected slices (covid-ct-md labels)", [n for n in labelled if items[n].infected],
                    labelled, lambda q, n: bool(items[n].infected))
    tcga = np.array([n for n, i in enumerate(items) if i.dataset == "tcga-ct-slices"])
    precision_block("contrast agent (tcga-ct-slices)", list(tcga), tcga,
                    lambda q, n: items[q].contrast == items[n].contrast)

    # infection burden: rank correlation between a query's infection fraction and its neighbours'
    covid = np.array([n for n, i in enumerate(items) if i.dataset == "covid19-ct-lungmask"])
    fractions = np.array([items[n].infection_fraction for n in range(len(items))], dtype=object)
    query_values, neighbour_values = [], []
    for q in covid:
        candidates = covid[patients[covid] != patients[q]]
        order = _ranked(similarity[q], candidates)[:5]
        query_values.append(fractions[q])
        neighbour_values.append(np.mean([fractions[n] for n in order]))
    results[("infection burden (covid19-ct-lungmask)", "Spearman rho, top-5")] = (
        spearman(np.array(query_values, float), np.array(neighbour_values, float)), 0.0, False)

    # confound: neighbours from the query's own dataset when every dataset is in one database
    everything = np.arange(len(items))
    same, expected = [], []
    for q in range(len(items)):
        candidates = everything[patients != patients[q]]
        order = _ranked(similarity[q], candidates)[:10]
        same.append(np.mean(datasets[order] == datasets[q]))
        expected.append(np.mean(datasets[candidates] == datasets[q]))
    results[("confound: mixed database", "top-10 from own dataset")] = (
        float(np.mean(same)), float(np.mean(expected)), True)
    return results


def compare(items: list[BenchmarkSlice], features: dict[str, np.ndarray]) -> list[Measure]:
    """Run every measure for every named feature; one :class:`Measure` per row of the table."""
    table: dict[tuple[str, str], Measure] = {}
    for name, vectors in features.items():
        for (task, metric), (value, chance, lower) in measure(items, vectors).items():
            row = table.setdefault((task, metric), Measure(task, metric, chance, lower_is_better=lower))
            row.values[name] = value
    return list(table.values())


def format_table(measures: list[Measure]) -> str:
    names = list(measures[0].values)
    width = max(10, *(len(n) for n in names))
    arrows = {id(row): " (lower is better)" if row.lower_is_better else "" for row in measures}
    task_width = max(40, *(len(row.task) for row in measures))
    metric_width = max(24, *(len(row.metric + arrows[id(row)]) for row in measures))
    lines = [f"{'task':<{task_width}} {'metric':<{metric_width}} {'chance':>8} "
             + "  ".join(f"{n:>{width}}" for n in names)]
    for row in measures:
        lines.append(f"{row.task:<{task_width}} {row.metric + arrows[id(row)]:<{metric_width}} {row.chance:8.3f} "
                     + "  ".join(f"{row.values[n]:>{width}.3f}" for n in names))
    return "\n".join(lines)


def standard_comparison(model: LungModel, segmentation_only: LungModel | None = None, variants: bool = False,
                        root: Path | None = None) -> tuple[int, list[Measure]]:
    """The issue's table: raw pixels, random-weight U-Net, segmentation-only U-Net, lungcbir.

    Returns the number of slices and the measures. ``variants`` adds pooling alternatives.
    Lung levels come from the bundled model's masks, so every model is measured on the same
    queries.
    """
    items = load_benchmark(root)
    slices = [i.slice for i in items]
    trained = encode(model, slices)
    bundled = LungModel.load(device=model.device)
    reference = trained if model.model_id == bundled.model_id else encode(bundled, slices)
    assign_levels(items, reference.lung_fractions)
    torch.manual_seed(0)
    random_model = LungModel(type(model.network)(model.settings.unet), model.settings, "random", model.device)
    # the random network's lung map is noise, so it is pooled without one; the segmentation-only
    # network is pooled like ours, so that the difference is the training
    features = {"raw pixels": raw_pixel_features(slices),
                "random U-Net": pooled(encode(random_model, slices), "mean-max")}
    others = [method for method in POOLINGS if method != model.settings.pooling] if variants else []
    if segmentation_only is not None:
        baseline = encode(segmentation_only, slices)
        features["seg-only U-Net"] = pooled(baseline, model.settings.pooling)
        for method in others:
            features[f"seg-only {method}"] = pooled(baseline, method)
    for method in others:
        features[f"ours {method}"] = pooled(trained, method)
    if variants:
        features["lungcbir +PCA-white"] = whiten(pooled(trained, model.settings.pooling))
    stored = model_vectors(model, slices)
    if model.settings.findings is None:
        features["lungcbir"] = stored
    else:
        features.update({f"lungcbir {focus}": symmetric_focus(model, stored, focus) for focus in FOCUSES})
    return len(items), compare(items, features)


def symmetric_focus(model: LungModel, vectors: np.ndarray, focus: str) -> np.ndarray:
    """Stored vectors whose plain inner products are the focused search's scores: each part
    scaled by the square root of what :func:`lungcbir.focus.focus_queries` multiplies the query
    by (the focused score is symmetric in query and stored slice), for the measures that
    compare every slice with every other."""
    multipliers = model.focused(np.ones((1, vectors.shape[1]), np.float32), focus)[0]
    return (vectors * np.sqrt(multipliers)).astype(np.float32)


# -- the mixed store and the search focus, on a choice / report split ---------------

#: The neighbour whose score the mixed-store measure reports (median over all queries).
SCORE_RANK = 50


@dataclass(frozen=True)
class RetrievalSplit:
    """One half of the retrieval split by patient: poolings, weights and focus mixes are chosen
    on :data:`CHOICE_SPLIT` only, and tables report :data:`REPORT_SPLIT`."""

    name: str
    series: frozenset[str]  # covid-ct-md series (one patient each): the mixed store
    burden_patients: frozenset[str]  # covid19-ct-lungmask patients: the infection-burden measure


#: One COVID-19, one CAP and one normal covid-ct-md patient each; the COVID-19 lung-mask
#: patients that picked the bundled model's epoch (val) and those its card reports (test).
CHOICE_SPLIT = RetrievalSplit("choice", frozenset({"P001", "cap001", "normal001"}), frozenset(COVID_VAL_PATIENTS))
REPORT_SPLIT = RetrievalSplit("report", frozenset({"P002", "cap002", "normal002"}), frozenset(COVID_TEST_PATIENTS))
SPLITS = {split.name: split for split in (CHOICE_SPLIT, REPORT_SPLIT)}
#: Every covid-ct-md series of the split.
SPLIT_SERIES = CHOICE_SPLIT.series | REPORT_SPLIT.series


def _store_and_queries(items: list[BenchmarkSlice], dataset: str, groups: list[str], asked: frozenset[str] | None,
                       stored: frozenset[str] | None) -> tuple[np.ndarray, list[int]]:
    """The item numbers of ``dataset``'s store (items whose group is in ``stored``, default
    ``asked``, all when both are None) and the positions in it of the queries (group in ``asked``)."""
    stored = asked if stored is None else stored
    store = np.array([n for n, i in enumerate(items)
                      if i.dataset == dataset and (stored is None or groups[n] in stored)])
    return store, [q for q, n in enumerate(store) if asked is None or groups[n] in asked]


def mixed_store_measures(items: list[BenchmarkSlice], vectors: np.ndarray, queries: np.ndarray | None = None,
                         series: frozenset[str] | None = None,
                         store_series: frozenset[str] | None = None) -> dict[str, tuple[float, float]]:
    """The mixed-store task: covid-ct-md series in one store, normals included, every slice of
    ``series`` queried (default all), neighbours from other patients of ``store_series`` only
    (default: the queried series). {measure: (value, chance)}.

    ``queries`` are the query vectors (default ``vectors``; a focused search weighs them,
    :meth:`lungcbir.inference.LungModel.focused`), row for row with ``vectors``.

    * level top-1 error: |level of the best other-patient slice - query level| over queries
      inside the lungs, candidates inside the lungs (chance: mean over all such candidates);
    * infected share in the top 5: for infected query slices, the share of infected slices
      among the 5 best other-patient slices (normal patients' slices count as clean);
    * median score of the 50th neighbour over the queries (chance column: not applicable, NaN;
      NaN where the store has fewer other-patient slices).
    """
    queries = vectors if queries is None else queries
    md, asked = _store_and_queries(items, "covid-ct-md", [i.series for i in items], series, store_series)
    similarity = queries[md] @ vectors[md].T
    patients = np.array([items[n].patient for n in md])
    levels = np.array([np.nan if items[n].level is None else items[n].level for n in md])
    infected = np.array([bool(items[n].infected) for n in md])
    level_errors, level_chance, share, share_chance, fiftieth = [], [], [], [], []
    for q in asked:
        others = np.flatnonzero(patients != patients[q])
        order = _ranked(similarity[q], others)
        if len(order) >= SCORE_RANK:
            fiftieth.append(similarity[q, order[SCORE_RANK - 1]])
        if not np.isnan(levels[q]):
            inside = order[~np.isnan(levels[order])]
            level_errors.append(abs(levels[inside[0]] - levels[q]))
            level_chance.append(np.abs(levels[inside] - levels[q]).mean())
        if infected[q]:
            share.append(infected[order[:5]].mean())
            share_chance.append(infected[others].mean())
    return {"level top-1 error (lower is better)": (float(np.mean(level_errors)), float(np.mean(level_chance))),
            "infected share in top 5": (float(np.mean(share)), float(np.mean(share_chance))),
            f"median score of neighbour {SCORE_RANK}": (float(np.median(fiftieth)) if fiftieth else float("nan"),
                                                        float("nan"))}


def burden_correlation(items: list[BenchmarkSlice], vectors: np.ndarray, queries: np.ndarray | None = None,
                       patients: frozenset[str] | None = None, store: frozenset[str] | None = None) -> float:
    """Spearman rho between each covid19-ct-lungmask query's true infection fraction and the
    mean of its 5 best other-patient neighbours' (queries: ``patients``, default all; store:
    ``store``, default the queried patients)."""
    queries = vectors if queries is None else queries
    covid, asked = _store_and_queries(items, "covid19-ct-lungmask", [i.patient for i in items], patients, store)
    similarity = queries[covid] @ vectors[covid].T
    owners = np.array([items[n].patient for n in covid])
    fractions = np.array([items[n].infection_fraction for n in covid], float)
    neighbours = [fractions[_ranked(similarity[q], np.flatnonzero(owners != owners[q]))[:5]].mean() for q in asked]
    return spearman(fractions[asked], np.array(neighbours))


def split_measures(items: list[BenchmarkSlice], vectors: np.ndarray, queries: np.ndarray | None,
                   split: RetrievalSplit) -> dict[str, tuple[float, float]]:
    """Every focus measure of one split: the mixed store of the split's three covid-ct-md
    patients, the infection burden of its COVID-19 patients' slices among theirs and the
    training patients', and (for comparison with the
    issue's table) the split's queries against all six covid-ct-md series. {measure: (value, chance)}."""
    own = mixed_store_measures(items, vectors, queries, split.series)
    everything = mixed_store_measures(items, vectors, queries, split.series, frozenset(SPLIT_SERIES))
    results = {name: own[name] for name in list(own)[:2]}
    # the split's patients query a store of them and the training patients, a range of burdens
    # that three patients alone lack (neighbours of another patient only: within three, a
    # patient of high burden can only find lower ones)
    held_out = CHOICE_SPLIT.burden_patients | REPORT_SPLIT.burden_patients
    training = frozenset(i.patient for i in items if i.dataset == "covid19-ct-lungmask") - held_out
    results["burden Spearman rho, top 5"] = (
        burden_correlation(items, vectors, queries, split.burden_patients, split.burden_patients | training), 0.0)
    results.update({f"{name}, six-series store": value for name, value in everything.items()})
    return results



def model_vectors(model: LungModel, slices: Sequence[CTSlice], batch_size: int = 32) -> np.ndarray:
    """The vectors the model stores for these slices (centred, every part)."""
    vectors = []
    for start in range(0, len(slices), batch_size):
        inputs = np.stack([model.prepare(item)[0] for item in slices[start:start + batch_size]])
        vectors.append(model.run_all(inputs)[1])
    return np.concatenate(vectors)


def focus_comparison(model: LungModel, split: RetrievalSplit, baselines: dict[str, LungModel] | None = None,
                     root: Path | None = None) -> list[Measure]:
    """The per-focus table of one split: chance, raw pixels, each baseline model (e.g. a
    segmentation-only U-Net) and the model searched with every focus."""
    items = [i for i in load_benchmark(root) if i.dataset in ("covid-ct-md", "covid19-ct-lungmask")]
    slices = [i.slice for i in items]
    reference = LungModel.load(device=model.device)
    assign_levels(items, encode(reference, slices).lung_fractions)
    columns: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    pixels = raw_pixel_features(slices)
    columns["raw pixels"] = (pixels, pixels)
    for name, baseline in (baselines or {}).items():
        stored = model_vectors(baseline, slices)
        columns[name] = (stored, baseline.focused(stored))
    stored = model_vectors(model, slices)
    for focus in FOCUSES:
        columns[f"lungcbir {focus}"] = (stored, model.focused(stored, focus))
    table: dict[str, Measure] = {}
    for name, (vectors, queries) in columns.items():
        for metric, (value, chance) in split_measures(items, vectors, queries, split).items():
            lower = " (lower is better)" in metric
            row = table.setdefault(metric, Measure(f"{split.name} split", metric.replace(" (lower is better)", ""),
                                                   chance, lower_is_better=lower))
            row.values[name] = value
    return list(table.values())
