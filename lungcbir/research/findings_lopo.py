"""Findings retrieval measured patient by patient (issue 25): leave-one-patient-out, patient-resampled intervals.

Research code (:mod:`lungcbir.research`). Every patient with findings labels takes its turn as
the unseen patient: the six ``covid-ct-md`` series (radiologists' slice labels; the normal
patients' slices count as clean), the ``covid19-ct-lungmask`` patients (11 in its manifest) (lesion masks give
the burden; every slice is infected) and the ``kaggle-lungs-2d`` scans (lesion-free, clean;
one patient per scan ID). ``lidc-nodules`` is not used here (nodules are a region question, not
a slice label).

**Cross-fitting.** Anything learned (the read-out, :mod:`lungcbir.readout`) or chosen (the
balanced focus's anatomy weight) in the fold of query patient ``q`` sees no slice of ``q``;
and each *stored* slice of patient ``p`` is described by a read-out fitted without ``q`` and
without ``p`` as well, so no figure scores a slice that its own describer was trained on (a
deployed model meets unseen patients on both sides of a search).

**The measures** (queries: every slice of ``q`` with lungs; store: the other patients' slices of
the same collection with lungs, as the issue's six-series store):

* infected share in the top 5 of ``q``'s infected slices, clean share in the top 5 of its clean
  slices (``covid-ct-md``; chance: the share in the store);
* level top-1 error (``covid-ct-md``; chance: mean error of a random stored slice);
* slice AUC of the findings signal for infected against clean (``covid-ct-md``, each patient's
  slices scored by the read-out of its own fold);
* burden rho (``covid19-ct-lungmask``): Spearman between a query's infection fraction and the
  mean of its top-5 other-patient neighbours', all patients, and the five the lesion
  output never trained on (the model's val and test patients).

Each figure comes with the 95 % interval of 2000 resamples of the query *patients* (with
replacement; the queries of a drawn patient all count), and per patient: mean, median, worst.
Baselines beside every figure: chance, raw pixels, a level-only read-out (lung level and lung
area, fitted in the fold like the learned one: disease and level are confounded here),
``lesion_fraction`` alone, and the vector of the bundled model before the read-out.

The network is run once per slice; :func:`build_cache` keeps what every measure needs in an
``.npz`` under ``runs/`` (not the pixels).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Iterable

import cv2
import numpy as np

from ..datasets import COVID_TEST_PATIENTS, COVID_VAL_PATIENTS, data_root
from ..features import centre_parts
from ..inference import LungModel
from ..io import CTSlice, Intensity, SourceFormat, read_file
from ..metrics import roc_auc, spearman
from ..preprocess import normalize_intensity
from ..readout import DENSITY_FEATURES, FindingsReadout, angle_embedding, fit_readout, joined_embedding, lung_density
from .retrieval_benchmark import LUNG_PRESENT, assign_levels, covid_ct_md_items, raw_pixel_features

MD, COVID, KAGGLE = "covid-ct-md", "covid19-ct-lungmask", "kaggle-lungs-2d"
#: The forms each HU slice is cached in: as stored, and as two 8-bit exports (the read-out is
#: trained on all three, so that "8-bit" cannot stand for "infected": every 8-bit slice of the
#: labelled collections but these is a COVID-19 one).
FORMS = ("original", "lung-window png", "clahe png")
#: Patients the lesion output never trained on (the bundled model's val and test patients).
UNSEEN_COVID = frozenset(COVID_VAL_PATIENTS) | frozenset(COVID_TEST_PATIENTS)
#: Anatomy weights the balanced focus chooses from, inside each fold (rule: :func:`choose_weight`).
BALANCED_WEIGHTS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
#: The level error a balanced focus must keep (issue 25's target).
LEVEL_LIMIT = 0.10
BOOTSTRAP = 2000


def lung_window_export(item: CTSlice) -> CTSlice:
    """An HU slice as an 8-bit PNG in the lung window [-1000, 400] HU."""
    unit = normalize_intensity(item.pixels, "hu", (-1000.0, 400.0))
    return CTSlice(np.round(unit * 255).astype(np.uint8), Intensity.UINT8, item.path, SourceFormat.PNG)


def clahe_export(item: CTSlice) -> CTSlice:
    """An HU slice exported the way covid19-ct-lungmask's slices were (its README): window
    [-1250, 250] HU, 256 x 256, per-slice min-max, CLAHE clip 7."""
    unit = cv2.resize(normalize_intensity(item.pixels, "hu", (-1250.0, 250.0)), (256, 256),
                      interpolation=cv2.INTER_AREA)
    unit = (unit - unit.min()) / max(float(unit.max() - unit.min()), 1e-6)
    grey = cv2.createCLAHE(clipLimit=7.0, tileGridSize=(8, 8)).apply(np.round(unit * 255).astype(np.uint8))
    return CTSlice(grey, Intensity.UINT8, item.path, SourceFormat.PNG)


@dataclass
class FindingsCache:
    """Per cached slice (row): who, labels, and the model's outputs that the measures need."""

    patient: np.ndarray  # str
    collection: np.ndarray  # str
    form: np.ndarray  # str, one of FORMS
    source: np.ndarray  # int: the row of the original slice this row is a form of
    infected: np.ndarray  # float: 1, 0, NaN (unknown)
    burden: np.ndarray  # float: lesion / lung pixels from the masks, NaN where unknown
    level: np.ndarray  # float: 0 apex .. 1 base (covid-ct-md), NaN elsewhere or outside the lungs
    lung_fraction: np.ndarray  # share of the model input that is lung (> 0.5)
    lesion_fraction: np.ndarray  # lesion / lung pixels of the lesion output at the model's input size
    anatomy: np.ndarray  # (N, A): the stored anatomy part, centred, unit length
    findings: np.ndarray  # (N, F): the stored findings part of the bundled model, centred, unit length
    findings_raw: np.ndarray  # (N, F): the findings part before centring (what a read-out reads)
    density: np.ndarray  # (N, 8): lung_density on the eroded lung mask (meaningful for HU originals only)
    pixels: np.ndarray  # (N, 1024): the raw-pixel baseline

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, **{f.name: getattr(self, f.name) for f in fields(self)})

    @classmethod
    def load(cls, path: Path) -> "FindingsCache":
        with np.load(path, allow_pickle=False) as data:
            return cls(**{f.name: data[f.name] for f in fields(cls)})

    def subset(self, rows: np.ndarray) -> "FindingsCache":
        return FindingsCache(**{f.name: getattr(self, f.name)[rows] for f in fields(self)})


@dataclass
class _Source:
    item: CTSlice
    patient: str
    collection: str
    infected: float
    burden: float = float("nan")
    level: float = float("nan")


def _sources(root: Path, model: LungModel) -> list[_Source]:
    items = covid_ct_md_items(root)
    fractions = [r.lung_fraction for r in model.segment([i.slice for i in items])]
    assign_levels(items, np.asarray(fractions))
    sources = [_Source(i.slice, i.patient, MD, 0.0 if i.infected is None else float(i.infected),
                       level=float("nan") if i.level is None else i.level) for i in items]
    with open(root / COVID / "manifest.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            sources.append(_Source(read_file(root / COVID / "ct" / row["file"])[0], row["patient"], COVID, 1.0,
                                   int(row["infection_px"]) / max(1, int(row["lung_px"]))))
    for path in sorted((root / KAGGLE / "images").iterdir()):
        sources.append(_Source(read_file(path)[0], path.name[:7], KAGGLE, 0.0, 0.0))
    return sources


def build_cache(model: LungModel, root: Path | None = None, batch_size: int = 16) -> FindingsCache:
    """Run ``model`` (the bundled one: its lesion output and findings part) on every labelled
    slice, and each HU slice's two 8-bit exports, and keep what the measures need."""
    if model.settings.findings is None or model.settings.findings.readout is not None:
        raise ValueError("the cache needs a model with a findings part and no read-out (the part it reads)")
    root = root or data_root()
    sources = _sources(root, model)
    rows: list[tuple[int, str, CTSlice]] = []
    for number, source in enumerate(sources):
        rows.append((number, FORMS[0], source.item))
        if source.item.intensity == "hu":
            rows += [(number, FORMS[1], lung_window_export(source.item)), (number, FORMS[2], clahe_export(source.item))]
    columns: dict[str, list] = {name: [] for name in ("anatomy", "findings", "findings_raw", "lung", "lesion",
                                                       "density")}
    low, high = model.settings.preprocess.hu_window
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        inputs = np.stack([model.prepare(item)[0] for _, _, item in chunk])
        out = model.outputs(inputs)
        raw = model.uncentred_vectors(out.bottleneck, out.lungs, out.lesions)
        centred = centre_parts(raw, model.settings.centre, model.parts) * np.sqrt(len(model.parts))
        lungs = out.lungs[:, 0].cpu().numpy() > 0.5
        assert out.lesions is not None  # a findings part needs a lesion output (checked by LungModel)
        lesions = (out.lesions[:, 0].cpu().numpy() > 0.5) & lungs
        columns["anatomy"].append(centred[:, :model.parts[0]])
        columns["findings"].append(centred[:, model.parts[0]:])
        columns["findings_raw"].append(raw[:, model.parts[0]:])
        columns["lung"].append(lungs.mean((1, 2)))
        columns["lesion"].append(lesions.sum((1, 2)) / np.maximum(lungs.sum((1, 2)), 1))
        for (_, form, item), image, lung in zip(chunk, inputs, lungs):
            hu = image * (high - low) + low  # the model input of an HU slice is linear in HU
            usable = form == FORMS[0] and item.intensity == "hu"
            columns["density"].append(lung_density(hu, lung) if usable else np.full(DENSITY_FEATURES, np.nan))
    source_of = np.array([number for number, _, _ in rows])
    return FindingsCache(
        patient=np.array([sources[n].patient for n in source_of]),
        collection=np.array([sources[n].collection for n in source_of]),
        form=np.array([form for _, form, _ in rows]), source=source_of,
        infected=np.array([sources[n].infected for n in source_of]),
        burden=np.array([sources[n].burden for n in source_of]),
        level=np.array([sources[n].level for n in source_of]),
        lung_fraction=np.concatenate(columns["lung"]), lesion_fraction=np.concatenate(columns["lesion"]),
        anatomy=np.concatenate(columns["anatomy"]).astype(np.float32),
        findings=np.concatenate(columns["findings"]).astype(np.float32),
        findings_raw=np.concatenate(columns["findings_raw"]).astype(np.float32),
        density=np.asarray(columns["density"], np.float32),
        pixels=raw_pixel_features([item for _, _, item in rows]))


# -- signals: what each findings similarity is built from, fitted without some patients ------------


@dataclass(frozen=True)
class Signal:
    """A findings signal: ``fit(cache, train_rows)`` returns a scorer of rows (a probability);
    ``embed`` turns the scores of rows into findings parts; ``rows`` says which rows it can score."""

    name: str
    fit: Callable[[FindingsCache, np.ndarray], Callable[[np.ndarray], np.ndarray]] | None
    embed: Callable[[FindingsCache, np.ndarray, np.ndarray], np.ndarray]
    #: another signal whose fits this one uses (the same read-out, another findings part)
    shares: str | None = None


def _collection_weights(cache: FindingsCache, rows: np.ndarray) -> np.ndarray:
    """Each collection counts as much as each other in a fit, and within one, each class half
    (where it has both): the sizes of the collections must not decide the read-out."""
    weight = np.zeros(len(rows))
    for collection in np.unique(cache.collection[rows]):
        members = cache.collection[rows] == collection
        for label in (0.0, 1.0):
            chosen = members & (cache.infected[rows] == label)
            if chosen.any():
                weight[chosen] = 1.0 / chosen.sum() / len(np.unique(cache.infected[rows][members]))
    return weight


#: The pooled part's share of the findings cosine in the joined findings part (fixed beforehand).
POOLED_WEIGHT = 0.5
#: Penalties a read-out chooses from inside its fold (:func:`_logistic`).
ALPHAS = (0.01, 0.1, 1.0, 10.0)


def fit_chosen(cache: FindingsCache, train: np.ndarray, features: Callable[[FindingsCache, np.ndarray], np.ndarray],
               usable: Callable[[FindingsCache], np.ndarray], alphas: tuple[float, ...] = ALPHAS) -> FindingsReadout:
    """A read-out fitted on the usable labelled ``train`` rows; its penalty is chosen from
    ``alphas`` by the slice AUC of an inner leave-one-patient-out over the covid-ct-md patients
    of those rows (their original slices), so nothing outside ``train`` decides anything."""
    def fitted(rows: np.ndarray, alpha: float) -> FindingsReadout:
        return fit_readout(features(cache, rows), cache.infected[rows] == 1, _collection_weights(cache, rows), alpha)

    train = train[usable(cache)[train] & ~np.isnan(cache.infected[train])]
    inner = train[(cache.collection[train] == MD) & (cache.form[train] == FORMS[0])]
    alpha = alphas[0]
    if len(alphas) > 1 and len(np.unique(cache.infected[inner])) == 2:
        aucs = []
        for value in alphas:
            scores = np.empty(len(inner))
            for patient in np.unique(cache.patient[inner]):
                mine = cache.patient[inner] == patient
                scores[mine] = fitted(train[cache.patient[train] != patient], value).probability(
                    features(cache, inner[mine]))
            aucs.append(roc_auc(scores, cache.infected[inner] == 1))
        alpha = alphas[int(np.argmax(aucs))]
    return fitted(train, alpha)


def _logistic(features: Callable[[FindingsCache, np.ndarray], np.ndarray],
              usable: Callable[[FindingsCache], np.ndarray], alphas: tuple[float, ...] = ALPHAS):
    """A fitter for :class:`Signal`: :func:`fit_chosen`, returned as a scorer of rows."""
    def fit(cache: FindingsCache, train: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
        readout = fit_chosen(cache, train, features, usable, alphas)
        return lambda rows: readout.probability(features(cache, rows))
    return fit


def _density_or_network(cache: FindingsCache, train: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """Density in HU where a row has it (an HU original), else the network read-out: an 8-bit
    export's grey values are not HU, so there the read-out is all that works."""
    with_density = _logistic(lambda c, r: np.concatenate([c.findings_raw[r], c.density[r]], axis=1),
                             _hu_original)(cache, train)
    network = _logistic(network_features, every_row)(cache, train)

    def score(rows: np.ndarray) -> np.ndarray:
        usable = _hu_original(cache)[rows]
        out = np.empty(len(rows))
        if usable.any():
            out[usable] = with_density(rows[usable])
        if (~usable).any():
            out[~usable] = network(rows[~usable])
        return out
    return score


def _level_features(cache: FindingsCache, rows: np.ndarray) -> np.ndarray:
    level = np.nan_to_num(cache.level[rows], nan=0.5)
    return np.stack([level, level ** 2, cache.lung_fraction[rows], cache.lung_fraction[rows] ** 2], axis=1)


def _hu_original(cache: FindingsCache) -> np.ndarray:
    return (cache.form == FORMS[0]) & ~np.isnan(cache.density).any(1)


def _burden(cache: FindingsCache, rows: np.ndarray) -> np.ndarray:
    return np.sqrt(cache.lesion_fraction[rows])


def network_features(cache: FindingsCache, rows: np.ndarray) -> np.ndarray:
    """What the shipped read-out reads: the pooled findings part before centring."""
    return cache.findings_raw[rows]


def every_row(cache: FindingsCache) -> np.ndarray:
    return np.ones(len(cache.form), bool)


def learned_signal(infection_weight: float = 0.5) -> Signal:
    """The read-out of :mod:`lungcbir.readout` on the network's findings part (every form)."""
    return Signal("learned read-out", _logistic(network_features, every_row),
                  lambda c, r, p: angle_embedding(p, _burden(c, r), infection_weight))


SIGNALS: dict[str, Signal] = {
    "learned read-out": learned_signal(),
    # the learned read-out's embedding joined to the findings part it reads (half each)
    "read-out + pooled part": Signal(
        "read-out + pooled part", _logistic(network_features, every_row),
        lambda c, r, p: joined_embedding(c.findings[r], None, angle_embedding(p, _burden(c, r), 0.5), POOLED_WEIGHT),
        shares="learned read-out"),
    # the same, plus lung density in HU where the slice is HU (fitted and used on HU originals)
    "read-out + HU density": Signal("read-out + HU density", _density_or_network,
                                    lambda c, r, p: angle_embedding(p, _burden(c, r), 0.5)),
    # a predictor that knows only where the slice is (level, lung area): the confound's baseline
    "level-only read-out": Signal("level-only read-out", _logistic(_level_features, lambda c: ~np.isnan(c.level)),
                                  lambda c, r, p: angle_embedding(p, np.zeros(len(r)), 1.0)),
    # the lesion output's burden alone as the similarity
    "lesion_fraction": Signal("lesion_fraction", None,
                              lambda c, r, p: angle_embedding(np.zeros(len(r)), _burden(c, r), 0.0)),
    # the bundled model's findings part before the read-out (cosine over 261 numbers)
    "findings part before": Signal("findings part before", None, lambda c, r, p: c.findings[r]),
}


class CrossFitted:
    """Scores of rows by a signal fitted without a set of patients; fits are remembered."""

    def __init__(self, cache: FindingsCache, signal: Signal, train_rows: np.ndarray) -> None:
        self.cache, self.signal, self.train_rows = cache, signal, train_rows
        self._fits: dict[frozenset[str], Callable[[np.ndarray], np.ndarray]] = {}

    def share_fits(self, other: "CrossFitted") -> None:
        """Use (and add to) ``other``'s fits: both signals read the rows with the same read-out."""
        self._fits = other._fits

    def scorer(self, excluded: frozenset[str]) -> Callable[[np.ndarray], np.ndarray]:
        if excluded not in self._fits:
            assert self.signal.fit is not None
            train = self.train_rows[~np.isin(self.cache.patient[self.train_rows], list(excluded))]
            self._fits[excluded] = self.signal.fit(self.cache, train)
        return self._fits[excluded]

    def scores(self, rows: np.ndarray, excluded: frozenset[str]) -> np.ndarray:
        """Each row scored by the fit without ``excluded`` and the row's own patient."""
        out = np.full(len(rows), np.nan)
        if self.signal.fit is None:
            return out
        for patient in np.unique(self.cache.patient[rows]):
            mine = self.cache.patient[rows] == patient
            out[mine] = self.scorer(excluded | {patient})(rows[mine])
        return out

    def parts(self, rows: np.ndarray, excluded: frozenset[str]) -> np.ndarray:
        return self.signal.embed(self.cache, rows, self.scores(rows, excluded))


# -- the measures of one search over cached rows ------------------------------------------------


@dataclass
class PerQuery:
    """Per-query values of one figure, with the query's patient (for resampling patients)."""

    patients: list[str]
    values: list[float]
    chance: list[float]

    def extend(self, patient: str, values: Iterable[float], chance: Iterable[float]) -> None:
        values, chance = list(values), list(chance)
        self.patients += [patient] * len(values)
        self.values += values
        self.chance += chance


def search_measures(cache: FindingsCache, rows: np.ndarray, anatomy: np.ndarray, findings: np.ndarray, weight: float,
                    queried: Iterable[str]) -> dict[str, PerQuery]:
    """Level error, infected and clean share in the top 5 of the queried patients' slices among
    ``rows`` (other patients' rows only), scored ``weight`` x anatomy cosine + (1 - weight) x
    findings cosine (each part a unit vector)."""
    scores = weight * anatomy @ anatomy.T + (1 - weight) * findings @ findings.T
    patients, level, infected = cache.patient[rows], cache.level[rows], cache.infected[rows]
    out = {name: PerQuery([], [], []) for name in ("level", "infected", "clean")}
    for patient in queried:
        for q in np.flatnonzero(patients == patient):
            others = np.flatnonzero(patients != patient)
            order = others[np.argsort(-scores[q, others], kind="stable")]
            if not np.isnan(level[q]):
                inside = order[~np.isnan(level[order])]
                out["level"].extend(patient, [abs(level[inside[0]] - level[q])],
                                    [float(np.abs(level[inside] - level[q]).mean())])
            kind = "infected" if infected[q] == 1 else "clean"
            out[kind].extend(patient, [float(np.mean(infected[order[:5]] == infected[q]))],
                             [float(np.mean(infected[others] == infected[q]))])
    return out


def choose_weight(cache: FindingsCache, rows: np.ndarray, anatomy: np.ndarray, findings: np.ndarray,
                  patients: list[str]) -> float:
    """The balanced focus's anatomy weight, from :data:`BALANCED_WEIGHTS` on ``patients`` only:
    the highest infected share among weights whose level error is at most :data:`LEVEL_LIMIT`,
    else the lowest level error (the rule of docs/retrieval.md, with the issue's limit)."""
    found = []
    for weight in BALANCED_WEIGHTS:
        measures = search_measures(cache, rows, anatomy, findings, weight, patients)
        found.append((weight, float(np.mean(measures["level"].values)), float(np.mean(measures["infected"].values))))
    allowed = [f for f in found if f[1] <= LEVEL_LIMIT]
    if allowed:
        return max(allowed, key=lambda f: (f[2], f[0]))[0]
    return min(found, key=lambda f: f[1])[0]


# -- intervals ----------------------------------------------------------------------------------


@dataclass
class Figure:
    """One figure: its value, 95 % interval over resampled patients, chance, per-patient spread."""

    value: float
    low: float
    high: float
    chance: float
    patient_mean: float = float("nan")
    patient_median: float = float("nan")
    patient_worst: float = float("nan")

    def text(self) -> str:
        return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}]"


def mean_figure(found: PerQuery, lower_is_better: bool = False, seed: int = 0) -> Figure:
    """The mean over queries, its 95 % interval from resampling the query patients."""
    patients = np.array(found.patients)
    values, chance = np.array(found.values), np.array(found.chance)
    names = np.unique(patients)
    groups = [np.flatnonzero(patients == name) for name in names]
    rng = np.random.default_rng(seed)
    means = []
    for _ in range(BOOTSTRAP):
        drawn = np.concatenate([groups[i] for i in rng.integers(0, len(groups), len(groups))])
        means.append(values[drawn].mean())
    per_patient = np.array([values[g].mean() for g in groups])
    return Figure(float(values.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5)),
                  float(chance.mean()), float(per_patient.mean()), float(np.median(per_patient)),
                  float(per_patient.max() if lower_is_better else per_patient.min()))


def paired_figure(patients: np.ndarray, first: np.ndarray, second: np.ndarray,
                  score: Callable[[np.ndarray, np.ndarray], float], chance: float, seed: int = 0) -> Figure:
    """A score of pairs (AUC, Spearman) over all queries, its interval from resampling patients."""
    names = np.unique(patients)
    groups = [np.flatnonzero(patients == name) for name in names]
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(BOOTSTRAP):
        drawn = np.concatenate([groups[i] for i in rng.integers(0, len(groups), len(groups))])
        values.append(score(first[drawn], second[drawn]))
    values = [v for v in values if not np.isnan(v)]
    per_patient = np.array([score(first[g], second[g]) for g in groups])
    per_patient = per_patient[~np.isnan(per_patient)]
    return Figure(score(first, second), float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5)), chance,
                  float(np.mean(per_patient)) if len(per_patient) else float("nan"),
                  float(np.median(per_patient)) if len(per_patient) else float("nan"),
                  float(np.min(per_patient)) if len(per_patient) else float("nan"))


# -- the table ------------------------------------------------------------------------------------

#: Columns of the table: a findings signal searched with a focus (anatomy weight, or "chosen":
#: the balanced weight chosen inside each fold), and the raw-pixel baseline.
COLUMNS: tuple[tuple[str, str, float | str], ...] = (
    ("raw pixels", "raw pixels", 1.0),
    ("anatomy", "findings part before", 1.0),
    ("level-only, findings", "level-only read-out", 0.0),
    ("lesion_fraction, findings", "lesion_fraction", 0.0),
    ("before, findings", "findings part before", 0.0),
    ("before, balanced", "findings part before", 0.5),
    ("learned, findings", "learned read-out", 0.0),
    ("learned, balanced", "learned read-out", "chosen"),
    ("joined, findings", "read-out + pooled part", 0.0),
    ("joined, balanced", "read-out + pooled part", "chosen"),
    ("+density, findings", "read-out + HU density", 0.0),
    ("+density, balanced", "read-out + HU density", "chosen"),
)


def lopo_table(cache: FindingsCache) -> tuple[dict[str, dict[str, Figure]], dict[str, list[float]]]:
    """Every figure of the leave-one-patient-out table: {row: {column: Figure}}, and the balanced
    weights chosen per fold {column: [weight per covid-ct-md patient]}."""
    originals = np.flatnonzero(cache.form == FORMS[0])
    train_rows = np.arange(len(cache.form))  # every form of every slice may train (minus the fold's patients)
    md = originals[(cache.collection[originals] == MD) & (cache.lung_fraction[originals] >= LUNG_PRESENT)]
    covid = originals[cache.collection[originals] == COVID]
    md_patients = sorted(set(cache.patient[md]))
    fitted = {name: CrossFitted(cache, signal, train_rows) for name, signal in SIGNALS.items()}
    for name, signal in SIGNALS.items():
        if signal.shares is not None:  # one read-out, fitted once per set of excluded patients
            fitted[name].share_fits(fitted[signal.shares])
    table: dict[str, dict[str, Figure]] = {}
    chosen: dict[str, list[float]] = {}

    def put(row: str, column: str, figure: Figure) -> None:
        table.setdefault(row, {})[column] = figure

    for column, signal_name, weight_rule in COLUMNS:
        collected = {name: PerQuery([], [], []) for name in ("level", "infected", "clean")}
        for patient in md_patients:
            excluded = frozenset({patient})
            anatomy = cache.pixels[md] if column == "raw pixels" else cache.anatomy[md]
            findings = (np.zeros((len(md), 1), np.float32) if signal_name not in fitted
                        else fitted[signal_name].parts(md, excluded))
            if weight_rule == "chosen":
                weight = choose_weight(cache, md, anatomy, findings, [p for p in md_patients if p != patient])
                chosen.setdefault(column, []).append(weight)
            else:
                weight = float(weight_rule)
            for name, found in search_measures(cache, md, anatomy, findings, weight, [patient]).items():
                collected[name].extend(found.patients[0] if found.patients else patient, found.values, found.chance)
        put("level top-1 error (covid-ct-md, lower is better)", column, mean_figure(collected["level"], True))
        put("infected share in top 5 (covid-ct-md)", column, mean_figure(collected["infected"]))
        put("clean share in top 5 (covid-ct-md)", column, mean_figure(collected["clean"]))

    # slice AUC of each signal's score on covid-ct-md's labelled slices (each patient's own fold)
    # the patients with slice labels (the normal series have none: they are clean throughout)
    labelled = md[np.isin(cache.patient[md], list(set(cache.patient[md][cache.infected[md] == 1])))]
    truth = cache.infected[labelled] == 1
    for signal_name, column in (("level-only read-out", "level-only, findings"),
                                ("read-out + pooled part", "joined, findings"),
                                ("learned read-out", "learned, findings"),
                                ("read-out + HU density", "+density, findings")):
        scores = fitted[signal_name].scores(labelled, frozenset())
        put("slice AUC infected vs clean (covid-ct-md)", column,
            paired_figure(cache.patient[labelled], scores, truth, lambda s, t: roc_auc(s, t), 0.5))
    put("slice AUC infected vs clean (covid-ct-md)", "lesion_fraction, findings",
        paired_figure(cache.patient[labelled], cache.lesion_fraction[labelled], truth,
                      lambda s, t: roc_auc(s, t), 0.5))

    # burden: covid19-ct-lungmask queries among the other patients' slices (findings focus)
    for column, signal_name, weight_rule in COLUMNS:
        # the findings focus of each signal, and the two baselines (no level there; no balanced rows)
        if signal_name == "level-only read-out" or weight_rule == "chosen" or (column != "raw pixels"
                                                                                and weight_rule == 0.5):
            continue
        query_burden, neighbour_burden, owners = [], [], []
        for patient in sorted(set(cache.patient[covid])):
            excluded = frozenset({patient})
            if column == "raw pixels":
                vectors = cache.pixels[covid]
            elif weight_rule == 1.0:
                vectors = cache.anatomy[covid]
            else:
                vectors = fitted[signal_name].parts(covid, excluded)
            mine = np.flatnonzero(cache.patient[covid] == patient)
            others = np.flatnonzero(cache.patient[covid] != patient)
            scores = vectors[mine] @ vectors[others].T
            top = others[np.argsort(-scores, axis=1, kind="stable")[:, :5]]
            query_burden += list(cache.burden[covid][mine])
            neighbour_burden += list(cache.burden[covid][top].mean(1))
            owners += [patient] * len(mine)
        owner = np.array(owners)
        first, second = np.array(query_burden), np.array(neighbour_burden)
        put("burden rho, top 5 (covid19-ct-lungmask, all patients)", column,
            paired_figure(owner, first, second, spearman, 0.0))
        unseen = np.isin(owner, list(UNSEEN_COVID))
        if unseen.any():
            put("burden rho, top 5 (5 patients the lesion output never saw)", column,
                paired_figure(owner[unseen], first[unseen], second[unseen], spearman, 0.0))
    return table, chosen


def format_lopo(table: dict[str, dict[str, Figure]], chosen: dict[str, list[float]]) -> str:
    """The table as Markdown: value [95 % interval] per cell, chance per row, then per-patient
    mean / median / worst of the main columns and the chosen balanced weights."""
    columns = [c for c, _, _ in COLUMNS]
    lines = ["| measure | chance | " + " | ".join(columns) + " |", "|---" * (len(columns) + 2) + "|"]
    for row, cells in table.items():
        chance = next(iter(cells.values())).chance
        lines.append(f"| {row} | {chance:.3f} | " + " | ".join(cells[c].text() if c in cells else "-" for c in columns)
                     + " |")
    lines += ["", "Per patient (mean / median / worst patient):", ""]
    for row, cells in table.items():
        for column in ("level-only, findings", "learned, findings", "learned, balanced", "joined, findings",
                       "joined, balanced"):
            if column in cells:
                f = cells[column]
                lines.append(f"- {row}, {column}: {f.patient_mean:.3f} / {f.patient_median:.3f} / "
                             f"{f.patient_worst:.3f}")
    lines += [""] + [f"Balanced anatomy weight chosen per fold ({column}): {weights}"
                     for column, weights in chosen.items()]
    return "\n".join(lines)


def default_cache_path() -> Path:
    return Path("runs") / "findings_lopo_cache.npz"


def cached(model: LungModel | None, path: Path | None = None, root: Path | None = None) -> FindingsCache:
    """The cache at ``path`` (default runs/findings_lopo_cache.npz), built with ``model`` first if missing."""
    path = path or default_cache_path()
    if not path.is_file():
        if model is None:
            raise ValueError(f"{path} does not exist: a model is needed to build it")
        build_cache(model, root).save(path)
    return FindingsCache.load(path)
