"""The bundled model on real held-out slices: a floor that catches a broken model or preprocessing,
and robustness to the ways real archives store the same slice (windows, 8-bit exports, flips)."""

from __future__ import annotations

import numpy as np
import pytest

from lungcbir.datasets import covid_slices, kaggle_slices
from lungcbir.inference import LungModel
from lungcbir.io import CTSlice, read_file, read_mask
from lungcbir.metrics import dice_score

pytestmark = pytest.mark.realdata


@pytest.fixture(scope="module")
def model(bundled_weights, shared_data):
    return LungModel.load(bundled_weights)


@pytest.mark.parametrize("split", [kaggle_slices, covid_slices])
def test_dice_floor_on_held_out_slices(model, split):
    chosen = split()["test"][::12][:8]
    slices = [read_file(s.image)[0] for s in chosen]
    scores = [dice_score(r.mask, read_mask(s.mask)) for s, r in zip(chosen, model.segment(slices))]
    assert np.mean(scores) > 0.95 and min(scores) > 0.85, scores


def test_same_slice_in_other_windows_and_orientations(model):
    sample = kaggle_slices()["test"][3]
    item = read_file(sample.image)[0]
    truth = read_mask(sample.mask)
    hu = item.pixels.astype(np.float32)
    views = {
        "HU": (item, truth),
        "8-bit lung window export": (CTSlice(np.round(np.clip((hu + 1000) / 1400, 0, 1) * 255).astype(np.uint8),
                                             "uint8", "x", "png"), truth),
        "8-bit mediastinal window export": (CTSlice(np.round(np.clip((hu + 160) / 400, 0, 1) * 255).astype(np.uint8),
                                                    "uint8", "x", "png"), truth),
        "flipped left-right": (CTSlice(hu[:, ::-1].copy(), "hu", "x", "tiff"), truth[:, ::-1]),
        "upside down": (CTSlice(hu[::-1].copy(), "hu", "x", "tiff"), truth[::-1]),
        "rotated 90 degrees": (CTSlice(np.rot90(hu).copy(), "hu", "x", "tiff"), np.rot90(truth)),
    }
    results = model.segment([view for view, _ in views.values()])
    scores = {name: dice_score(result.mask, expected) for (name, (_, expected)), result in zip(views.items(), results)}
    assert min(scores.values()) > 0.9, scores


def test_same_slice_exported_or_turned_finds_itself_among_other_real_slices(model):
    """A stored HU slice must come back first when it is queried as an 8-bit export in any
    window, as a JPEG or a CLAHE export, flipped or turned (a guard; docs/retrieval.md measures
    this on more slices: benchmarks/retrieval_invariance.py)."""
    import cv2

    from lungcbir.research.findings_lopo import clahe_export

    stored = ([read_file(s.image)[0] for s in kaggle_slices()["test"][::4]]
              + [read_file(s.image)[0] for s in covid_slices()["test"][::40]])
    vectors = np.stack([r.vector for r in model.segment(stored)])
    for index in (0, 3, 6):
        hu = stored[index].pixels.astype(np.float32)
        exports = [CTSlice(np.round(np.clip((hu - low) / (high - low), 0, 1) * 255).astype(np.uint8),
                           "uint8", "x", "png")
                   for low, high in ((-1000, 400), (-160, 240), (-500, 1500))]  # lung, mediastinal, bone
        # the lung-window export saved as a JPEG, and an export like covid19-ct-lungmask's (CLAHE)
        _, jpeg = cv2.imencode(".jpg", exports[0].pixels, [cv2.IMWRITE_JPEG_QUALITY, 90])
        exports += [CTSlice(cv2.imdecode(jpeg, cv2.IMREAD_UNCHANGED), "uint8", "x", "jpeg"),
                    clahe_export(stored[index])]
        turned = [CTSlice(np.ascontiguousarray(view), "hu", "x", "tiff")
                  for view in (hu[:, ::-1], hu[::-1], np.rot90(hu), np.rot90(hu, 2), np.rot90(hu, 3))]
        for result in model.segment(exports + turned):
            assert int(np.argmax(vectors @ result.vector)) == index


def test_quality_flag_on_real_slices_and_pictures_that_are_not_ct(model, tmp_path):
    """A clean held-out slice is ok; a constant picture, a text page and a colour photo-like
    picture (read from files, as a user's would be) are no-lungs."""
    import cv2

    from lungcbir.quality import Quality

    clean = [read_file(s.image)[0] for s in (kaggle_slices()["test"][0], covid_slices()["test"][60])]
    page = np.full((300, 300, 3), 255, np.uint8)
    for line in range(8):
        cv2.putText(page, f"Study list row {line}", (5, 30 + 33 * line), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 1)
    yy, xx = np.mgrid[0:300, 0:300] / 300
    photo = np.dstack([120 + 100 * np.sin(3 * xx), 100 + 80 * yy, 60 + 120 * xx * yy]).astype(np.uint8)
    cv2.circle(photo, (150, 150), 60, (40, 200, 90), -1)
    cv2.imwrite(str(tmp_path / "page.png"), page)
    cv2.imwrite(str(tmp_path / "photo.jpg"), photo)
    constant = CTSlice(np.full((256, 256), 0.5, np.float32), "unit", "constant", "array")
    others = [constant, read_file(tmp_path / "page.png")[0], read_file(tmp_path / "photo.jpg")[0]]
    results = model.segment(clean + others)
    assert [r.quality for r in results[:2]] == [Quality.OK] * 2, [r.signals for r in results[:2]]
    assert all(r.quality_score > 0.5 for r in results[:2])
    assert [r.quality for r in results[2:]] == [Quality.NO_LUNGS] * 3, [r.signals for r in results[2:]]


def test_lesion_output_on_held_out_covid_patients_and_lesion_free_slices(model):
    """The lesion output: overlap and burden ranking on held-out COVID-19 patients (MODEL_CARD.md
    reports all 186 slices: pooled Dice 0.610, rho 0.837), and next to nothing on held-out
    lesion-free Kaggle slices (HU, another source)."""
    from lungcbir.evaluate import evaluate_lesions

    assert model.has_lesion_head and model.settings.findings is not None
    covid = evaluate_lesions(model, [(s.image, s.mask, s.infection) for s in covid_slices()["test"][::2]])
    summary = covid.summary()
    assert summary["fraction_spearman"] > 0.75 and summary["dice_pooled"] > 0.45, summary
    clean = model.segment([read_file(s.image)[0] for s in kaggle_slices()["test"]])
    assert np.median([r.lesion_fraction for r in clean]) < 0.02


def test_the_findings_focus_ranks_by_lesion_burden_across_patients(model):
    """Held-out COVID-19 slices searched with the findings focus among the training patients'
    and the other held-out patients': their top-5 neighbours' infection burden follows theirs
    (docs/retrieval.md measures this on every slice; target rho >= 0.65)."""
    from lungcbir.metrics import spearman

    split = covid_slices()
    queries, store = split["test"][::3], split["test"][::3] + split["train"][::3]
    vectors = np.stack([r.vector for r in model.segment([read_file(s.image)[0] for s in store])])
    lungs = [read_mask(s.mask).astype(bool) for s in store]
    burden = np.array([(read_mask(s.infection).astype(bool) & lung).sum() / max(1, lung.sum())
                       for s, lung in zip(store, lungs)])
    patients = np.array([s.group for s in store])
    scores = model.focused(vectors[:len(queries)], "findings") @ vectors.T
    scores[patients[:len(queries), None] == patients[None]] = -np.inf  # other patients only
    rho = spearman(burden[:len(queries)], burden[np.argsort(-scores, axis=1)[:, :5]].mean(1))
    assert rho > 0.75, rho


def test_the_lesion_output_tells_infected_from_clean_slices_of_another_hospital(model):
    """covid-ct-md's report-split patients (HU DICOM of another hospital, radiologists' slice
    labels; never trained or chosen on): ``lesion_fraction`` ranks the infected slices above the
    clean ones (MODEL_CARD.md: AUC 0.822 with the bundled W2, 0.777 with L4 before it)."""
    from lungcbir.metrics import roc_auc
    from lungcbir.research.retrieval_benchmark import REPORT_SPLIT, covid_ct_md_items

    labelled = [item for item in covid_ct_md_items(series=REPORT_SPLIT.series) if item.infected is not None]
    fractions = np.array([r.lesion_fraction for r in model.segment([item.slice for item in labelled])])
    infected = np.array([bool(item.infected) for item in labelled])
    assert infected.any() and not infected.all()
    assert roc_auc(fractions, infected) > 0.8, roc_auc(fractions, infected)
