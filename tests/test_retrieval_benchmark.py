import numpy as np
import pytest

from lungcbir.io import CTSlice
from lungcbir.research.retrieval_benchmark import BenchmarkSlice, compare, measure, whiten


def synthetic_items():
    """Six covid-ct-md-like series, a covid19-like set and a tcga-like set, with known labels."""
    items = []
    blank = CTSlice(np.zeros((8, 8), np.float32), "hu", "x", "dicom")
    for number, diagnosis in enumerate(["COVID-19", "COVID-19", "CAP", "CAP", "normal", "normal"]):
        for index in range(11):
            items.append(BenchmarkSlice(blank, "covid-ct-md", f"p{number}", f"s{number}", index, level=index / 10,
                                        infected=(index > 5) if diagnosis != "normal" else None, diagnosis=diagnosis))
    for patient in range(4):
        for index in range(6):
            items.append(BenchmarkSlice(blank, "covid19-ct-lungmask", f"c{patient}", f"c{patient}", index,
                                        infected=True, infection_fraction=index / 10 + patient / 100))
    for number in range(12):
        items.append(BenchmarkSlice(blank, "tcga-ct-slices", f"t{number}", f"t{number}", contrast=number % 2 == 0))
    return items


def test_oracle_features_beat_chance_and_random_do_not():
    items = synthetic_items()

    def one_hot(values):
        keys = sorted(set(values), key=str)
        return np.array([[v == k for k in keys] for v in values], np.float32)
    level = np.array([[np.cos(np.pi / 2 * (i.level or 0)), np.sin(np.pi / 2 * (i.level or 0))] for i in items])
    perfect = np.hstack([level * 2, one_hot([i.infected for i in items]), one_hot([i.contrast for i in items]),
                         one_hot([round(i.infection_fraction or 0, 1) for i in items]),
                         one_hot([i.diagnosis for i in items])])
    perfect /= np.linalg.norm(perfect, axis=1, keepdims=True)
    results = measure(items, perfect)
    error, chance, _ = results[("anatomical level (covid-ct-md)", "top-1 level error")]
    assert error < 0.05 < chance
    infected, chance, _ = results[("infected slices (covid-ct-md labels)", "precision@5")]
    assert infected == 1.0 > chance
    contrast, chance, _ = results[("contrast agent (tcga-ct-slices)", "precision@1")]
    assert contrast == 1.0 > chance
    rng = np.random.default_rng(0)
    noise = rng.normal(size=(len(items), 32)).astype(np.float32)
    noisy = measure(items, noise / np.linalg.norm(noise, axis=1, keepdims=True))
    error, chance, _ = noisy[("anatomical level (covid-ct-md)", "top-1 level error")]
    assert abs(error - chance) < 0.15


def test_compare_table_and_whitening():
    items = synthetic_items()
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(len(items), 16)).astype(np.float32)
    table = compare(items, {"a": vectors, "b": whiten(vectors, 8)})
    assert all(set(row.values) == {"a", "b"} for row in table)
    assert np.allclose(np.linalg.norm(whiten(vectors, 8), axis=1), 1.0, atol=1e-5)


def test_encode_sends_batches_to_the_model_device(tiny_weights):
    """`evaluate-retrieval --device cuda` must feed the network on its device, not on the CPU."""
    import torch

    from lungcbir.inference import LungModel
    from lungcbir.research.retrieval_benchmark import encode

    model = LungModel.load(tiny_weights)
    channels = model.settings.unet.bottleneck_channels
    seen = []

    class RecordingNetwork:
        """Records where its inputs live; answers with CPU tensors of the right shapes."""

        def forward_with_bottleneck(self, batch):
            seen.append(batch.device)
            count, _, side, _ = batch.shape
            return torch.zeros(count, 1, side, side), torch.ones(count, channels, side // 8, side // 8)

    model.network = RecordingNetwork()
    model.device = torch.device("meta")  # stands in for a GPU: any device other than the CPU's
    slices = [CTSlice(np.random.default_rng(n).normal(size=(40, 40)).astype(np.float32), "unit", "x", "png")
              for n in range(3)]
    encoded = encode(model, slices, batch_size=2)
    assert seen == [torch.device("meta")] * 2
    assert encoded.bottlenecks.shape[0] == 3 and encoded.lung_fractions.shape == (3,)


def test_research_code_is_outside_the_core():
    """Benchmark-only code (shared data set names, duplicate ids) lives in lungcbir.research;
    no core module imports it, only the CLI's evaluate-retrieval command."""
    import re
    from pathlib import Path

    import lungcbir

    package = Path(lungcbir.__file__).parent
    assert not (package / "evaluate_retrieval.py").exists()
    assert (package / "research" / "retrieval_benchmark.py").is_file()
    importers = sorted(path.name for path in package.glob("*.py")
                       if re.search(r"from \.research\b|from lungcbir\.research\b|import lungcbir\.research\b",
                                    path.read_text()))
    assert importers == ["cli.py"]


def split_items():
    """covid-ct-md-like series named as the choice / report split's, and COVID-19 patients of both."""
    from lungcbir.research.retrieval_benchmark import CHOICE_SPLIT, REPORT_SPLIT

    items = []
    blank = CTSlice(np.zeros((8, 8), np.float32), "hu", "x", "dicom")
    for series in sorted(CHOICE_SPLIT.series | REPORT_SPLIT.series):
        for index in range(11):
            infected = None if series.startswith("normal") else index % 2 == 0
            items.append(BenchmarkSlice(blank, "covid-ct-md", series, series, index, level=index / 10,
                                        infected=infected))
    for patient in sorted(CHOICE_SPLIT.burden_patients | REPORT_SPLIT.burden_patients):
        for index in range(6):
            items.append(BenchmarkSlice(blank, "covid19-ct-lungmask", patient, patient, index, infected=True,
                                        infection_fraction=index / 10))
    return items


def anatomy_and_findings(items):
    """Unit vectors [level on a quarter circle | infected or burden one-hot] / sqrt(2)."""
    level = np.array([[np.cos(np.pi / 2 * (i.level or 0)), np.sin(np.pi / 2 * (i.level or 0))] for i in items])
    findings = np.zeros((len(items), 8))
    for row, item in enumerate(items):
        findings[row, 7 if item.infection_fraction is None and item.infected else
                 round((item.infection_fraction or 0) * 10) if item.infection_fraction is not None else 6] = 1
    return (np.hstack([level, findings]) / np.sqrt(2)).astype(np.float32)


def test_report_split_measures_do_not_depend_on_the_choice_split():
    from lungcbir.research.retrieval_benchmark import CHOICE_SPLIT, REPORT_SPLIT, split_measures

    items = split_items()
    vectors = anatomy_and_findings(items)
    scrambled = vectors.copy()
    choice = [n for n, i in enumerate(items)
              if i.series in CHOICE_SPLIT.series or i.patient in CHOICE_SPLIT.burden_patients]
    scrambled[choice] = np.random.default_rng(0).permutation(scrambled[choice])
    before = split_measures(items, vectors, None, REPORT_SPLIT)
    after = split_measures(items, scrambled, None, REPORT_SPLIT)
    own = [name for name in before if "six-series" not in name]
    assert own and all(before[name] == after[name] for name in own)
    assert split_measures(items, vectors, None, CHOICE_SPLIT) != split_measures(items, scrambled, None, CHOICE_SPLIT)


def test_the_focus_decides_what_the_split_measures_reward():
    from lungcbir.focus import focus_queries
    from lungcbir.research.retrieval_benchmark import REPORT_SPLIT, split_measures

    items = split_items()
    vectors = anatomy_and_findings(items)
    anatomy = split_measures(items, vectors, focus_queries(vectors, 2, 1.0), REPORT_SPLIT)
    findings = split_measures(items, vectors, focus_queries(vectors, 2, 0.0), REPORT_SPLIT)
    level, infected = "level top-1 error (lower is better)", "infected share in top 5"
    assert anatomy[level][0] == 0.0 < findings[level][0]
    assert findings[infected][0] == 1.0 > anatomy[infected][0]
    assert findings["burden Spearman rho, top 5"][0] > 0.9
    assert anatomy[level][1] > 0.2 and 0 < anatomy[infected][1] < 1  # chance levels


def test_symmetric_focus_gives_the_focused_scores(findings_weights):
    from lungcbir.inference import LungModel
    from lungcbir.research.retrieval_benchmark import symmetric_focus

    model = LungModel.load(findings_weights)
    vectors = np.random.default_rng(0).normal(size=(6, model.dimension)).astype(np.float32)
    for focus in ("anatomy", "findings", "balanced"):
        weighted = symmetric_focus(model, vectors, focus)
        assert np.allclose(weighted @ weighted.T, model.focused(vectors, focus) @ vectors.T, atol=1e-5)


@pytest.mark.realdata
def test_covid_ct_md_labels_belong_to_their_own_series(shared_data):
    """P002, cap002 and normal002 share file names (IM0001.dcm, ...): a label must be looked up
    by the file's path, or one series' labels land on another's slices (normal ones included)."""
    import csv
    from pathlib import Path

    from lungcbir.research.retrieval_benchmark import load_benchmark

    folder = shared_data / "covid-ct-md"
    with open(folder / "slice_labels.csv", newline="") as handle:
        truth = {(row["patient"], row["file"]): row["infection"] == "1" for row in csv.DictReader(handle)}
    items = [i for i in load_benchmark(shared_data) if i.dataset == "covid-ct-md"]
    for item in items:
        assert item.infected == truth.get((item.series, Path(item.slice.path).name)), item.slice.path
    assert all(i.infected is None for i in items if i.diagnosis == "normal")
