"""The leave-one-patient-out findings evaluation (issue 25) on a small synthetic cache."""

from __future__ import annotations

import numpy as np

from lungcbir.metrics import roc_auc
from lungcbir.research.findings_lopo import (
    COVID,
    FORMS,
    KAGGLE,
    MD,
    SIGNALS,
    CrossFitted,
    FindingsCache,
    PerQuery,
    Signal,
    choose_weight,
    format_lopo,
    lopo_table,
    mean_figure,
    search_measures,
)


def synthetic_cache(signal: float = 3.0, seed: int = 0) -> FindingsCache:
    """Six covid-ct-md-like patients (levels, infected lower slices in four), four COVID-19-like
    patients (all infected, burden known) and ten clean Kaggle-like scans; the findings part
    carries the label in one coordinate with strength ``signal``."""
    rng = np.random.default_rng(seed)
    patient, collection, infected, burden, level = [], [], [], [], []
    for number in range(6):
        for index in range(12):
            patient.append(f"md{number}")
            collection.append(MD)
            level.append(index / 11)
            infected.append(float(number < 4 and index >= 5))
            burden.append(np.nan)
    for number in range(4):
        for index in range(8):
            patient.append(f"c{number}")
            collection.append(COVID)
            level.append(np.nan)
            infected.append(1.0)
            burden.append(0.02 + 0.04 * index + 0.01 * number)
    for number in range(10):
        patient.append(f"k{number}")
        collection.append(KAGGLE)
        level.append(np.nan)
        infected.append(0.0)
        burden.append(0.0)
    n = len(patient)
    infected_array, level_array, burden_array = np.array(infected), np.array(level), np.array(burden)
    findings_raw = rng.normal(size=(n, 12)).astype(np.float32)
    findings_raw[:, 0] += signal * infected_array
    lesion = np.where(np.isnan(burden_array), 0.02 * infected_array * (signal > 0), burden_array)
    findings_raw[:, -5] = np.sqrt(lesion)
    anatomy = np.stack([np.cos(np.nan_to_num(level_array, nan=0.5) * np.pi / 2),
                        np.sin(np.nan_to_num(level_array, nan=0.5) * np.pi / 2)], axis=1)
    anatomy = anatomy + 0.05 * rng.normal(size=anatomy.shape)
    anatomy /= np.linalg.norm(anatomy, axis=1, keepdims=True)
    findings = findings_raw / np.linalg.norm(findings_raw, axis=1, keepdims=True)
    return FindingsCache(
        patient=np.array(patient), collection=np.array(collection), form=np.full(n, FORMS[0]), source=np.arange(n),
        infected=infected_array, burden=burden_array, level=level_array, lung_fraction=np.full(n, 0.2),
        lesion_fraction=lesion, anatomy=anatomy.astype(np.float32), findings=findings.astype(np.float32),
        findings_raw=findings_raw, density=np.where(np.array(collection)[:, None] == COVID, np.nan,
                                                    rng.normal(size=(n, 8))).astype(np.float32),
        pixels=rng.normal(size=(n, 16)).astype(np.float32))


def test_no_fit_sees_the_excluded_patients_or_the_scored_rows_own():
    cache = synthetic_cache()
    seen: list[set[str]] = []

    def spy(c: FindingsCache, train: np.ndarray):
        seen.append(set(c.patient[train]))
        return lambda rows: np.zeros(len(rows))

    fitted = CrossFitted(cache, Signal("spy", spy, lambda c, r, p: np.zeros((len(r), 1))), np.arange(len(cache.form)))
    rows = np.flatnonzero(cache.collection == MD)
    fitted.scores(rows, frozenset({"md0"}))
    assert len(seen) == 6  # one fit per scored patient, each without md0 and without that patient
    assert all("md0" not in patients for patients in seen)
    assert sorted(len({f"md{k}" for k in range(6)} - patients) for patients in seen) == [1] + [2] * 5


def test_a_findings_signal_in_the_vectors_is_found_and_the_table_prints_it():
    table, chosen = lopo_table(synthetic_cache(4.0))
    share = "infected share in top 5 (covid-ct-md)"
    assert table[share]["learned, findings"].value > 0.9 > table[share]["learned, findings"].chance
    assert table["slice AUC infected vs clean (covid-ct-md)"]["learned, findings"].value > 0.95
    for figure in table[share].values():
        assert figure.low <= figure.value <= figure.high
    assert len(chosen["learned, balanced"]) == 6  # one balanced weight chosen per fold
    text = format_lopo(table, chosen)
    assert "| infected share in top 5 (covid-ct-md) |" in text and "burden rho" in text


def test_a_readout_of_noise_finds_nothing_out_of_fold():
    cache = synthetic_cache(0.0)
    rows = np.flatnonzero((cache.collection == MD) & (cache.patient < "md4"))
    scores = CrossFitted(cache, SIGNALS["learned read-out"], np.arange(len(cache.form))).scores(rows, frozenset())
    assert roc_auc(scores, cache.infected[rows] == 1) < 0.75


def test_intervals_come_from_resampling_patients_not_slices():
    # one patient all 1, one all 0: a slice bootstrap would be narrow, resampling patients is not
    found = PerQuery(["a"] * 50 + ["b"] * 50, [1.0] * 50 + [0.0] * 50, [0.5] * 100)
    figure = mean_figure(found)
    assert figure.value == 0.5 and figure.low == 0.0 and figure.high == 1.0
    assert figure.patient_worst == 0.0 and figure.patient_median == 0.5


def test_the_balanced_weight_keeps_the_level_limit_when_any_weight_can():
    cache = synthetic_cache(4.0)
    rows = np.flatnonzero(cache.collection == MD)
    findings = SIGNALS["lesion_fraction"].embed(cache, rows, np.zeros(len(rows)))
    patients = sorted(set(cache.patient[rows]))
    weight = choose_weight(cache, rows, cache.anatomy[rows], findings, patients)
    level = np.mean(search_measures(cache, rows, cache.anatomy[rows], findings, weight, patients)["level"].values)
    assert level <= 0.10
