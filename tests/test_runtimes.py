"""lungcbir.runtimes: ONNX Runtime as the CPU default, torch on request."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from lungcbir import runtimes
from lungcbir.cli import main
from lungcbir.config import ConfigError, Settings
from lungcbir.inference import LungModel, load_network
from lungcbir.io import find_image_files, read_file
from lungcbir.runtimes import RUNTIME_REGISTRY, RuntimeOptions, start_runtime

TOLERANCE = 1e-4


def _pair(weights: str, cache: Path) -> tuple[LungModel, LungModel]:
    settings = Settings(cache_dir=cache, threads=1)
    return LungModel.load(weights, runtime="onnx", settings=settings), LungModel.load(weights, runtime="torch",
                                                                                       settings=settings)


def _inputs(count: int = 3, size: int = 64) -> np.ndarray:
    return np.random.default_rng(0).random((count, size, size), dtype=np.float32)


def _assert_same_outputs(first: LungModel, second: LungModel, inputs: np.ndarray) -> None:
    lungs, vectors, lesions = first.run_all(inputs)
    other_lungs, other_vectors, other_lesions = second.run_all(inputs)
    assert np.abs(lungs - other_lungs).max() <= TOLERANCE
    assert np.abs(vectors - other_vectors).max() <= TOLERANCE
    assert (lesions is None) == (other_lesions is None)
    if lesions is not None and other_lesions is not None:
        assert np.abs(lesions - other_lesions).max() <= TOLERANCE


@pytest.mark.parametrize("weights_name", ["tiny_weights", "findings_weights"])
def test_onnx_gives_torch_outputs(weights_name, request, tmp_path):
    onnx_model, torch_model = _pair(request.getfixturevalue(weights_name), tmp_path)
    _assert_same_outputs(onnx_model, torch_model, _inputs())


def test_onnx_is_the_default_on_the_cpu_and_torch_stays_on_request(tiny_weights, tmp_path, monkeypatch):
    monkeypatch.delenv("LUNGCBIR_RUNTIME", raising=False)
    model = LungModel.load(tiny_weights, settings=Settings(cache_dir=tmp_path))
    assert model.runtime == "auto"
    model.run(_inputs(1))
    assert len(list((tmp_path / "onnx").glob("*.onnx"))) == 1  # auto on the CPU ran ONNX Runtime
    monkeypatch.setenv("LUNGCBIR_RUNTIME", "torch")
    assert LungModel.load(tiny_weights).runtime == "torch"
    assert LungModel.load(tiny_weights, runtime="onnx").runtime == "onnx"  # an argument wins


def test_the_onnx_model_is_generated_once_then_read_from_the_cache(tiny_weights, tmp_path, monkeypatch):
    first, torch_model = _pair(tiny_weights, tmp_path)
    first.run(_inputs(1))
    [note_path] = (tmp_path / "onnx").glob("*.json")
    note = json.loads(note_path.read_text())
    assert note["model_id"] == first.model_id and note_path.stem == first.model_id

    def no_export(*args, **kwargs):
        raise AssertionError("exported again although the cache holds this model")

    monkeypatch.setattr(runtimes, "export_onnx", no_export)
    again = LungModel.load(tiny_weights, runtime="onnx", settings=Settings(cache_dir=tmp_path, threads=1))
    _assert_same_outputs(again, torch_model, _inputs())


@pytest.mark.parametrize("damage", ["truncated", "flipped", "note-of-another-model", "note-missing"])
def test_a_damaged_or_foreign_cache_is_generated_again(damage, tiny_weights, tmp_path):
    first, torch_model = _pair(tiny_weights, tmp_path)
    first.run(_inputs(1))
    [path] = (tmp_path / "onnx").glob("*.onnx")
    note_path = path.with_suffix(".json")
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[:len(data) // 2])
    elif damage == "flipped":  # still a loadable model, with one weight changed: only the checksum sees it
        position = len(data) - 100
        path.write_bytes(data[:position] + bytes([data[position] ^ 0x40]) + data[position + 1:])
    elif damage == "note-of-another-model":
        note = json.loads(note_path.read_text())
        note_path.write_text(json.dumps(dict(note, weights="0" * 64)))
    else:
        note_path.unlink()
    again = LungModel.load(tiny_weights, runtime="onnx", settings=Settings(cache_dir=tmp_path, threads=1))
    _assert_same_outputs(again, torch_model, _inputs())
    assert path.read_bytes() == data  # generated again, the same model


def test_a_model_id_is_not_trusted_for_other_weights(tiny_weights, other_tiny_weights, tmp_path):
    """Two networks given the same id (as a caller building a LungModel may do) never share an ONNX model."""
    options = RuntimeOptions(threads=1, cache_dir=tmp_path)
    models = []
    for weights in (tiny_weights, other_tiny_weights):
        network, settings, _ = load_network(weights)
        models.append((LungModel(network, settings, "same-id", runtime="onnx", runtime_options=options),
                       LungModel(network, settings, "same-id", runtime="torch")))
    for onnx_model, torch_model in models:
        _assert_same_outputs(onnx_model, torch_model, _inputs())


def test_an_unwritable_cache_costs_the_export_not_the_answer(tiny_weights, tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("a file where the cache folder would be")
    onnx_model, torch_model = _pair(tiny_weights, blocked)
    _assert_same_outputs(onnx_model, torch_model, _inputs())


def test_a_bad_export_is_refused(tiny_weights, monkeypatch):
    network, settings, _ = load_network(tiny_weights)
    real_session = runtimes._session

    class Shifted:  # an ONNX Runtime that answers a little differently from torch
        def __init__(self, model, threads):
            self.session = real_session(model, threads)

        def run(self, names, feeds):
            return [value + 1e-3 for value in self.session.run(names, feeds)]

    monkeypatch.setattr(runtimes, "_session", Shifted)
    with pytest.raises(Exception, match="differs from torch"):
        runtimes.export_onnx(network, 64)


def test_the_session_uses_its_own_threads_not_torchs(tiny_weights, tmp_path):
    before = torch.get_num_threads()
    onnx_model, _ = _pair(tiny_weights, tmp_path)
    onnx_model.run(_inputs(1))
    assert torch.get_num_threads() == before


def test_unknown_runtimes_and_devices_are_refused(tiny_weights):
    network, settings, _ = load_network(tiny_weights)
    with pytest.raises(ConfigError, match="unknown runtime 'tensorrt'"):
        start_runtime("tensorrt", network, "x", "cpu", 64, RuntimeOptions())
    with pytest.raises(ConfigError, match="--runtime onnx does not run on cuda"):
        start_runtime("onnx", network, "x", "cuda", 64, RuntimeOptions())
    assert list(RUNTIME_REGISTRY) == ["auto", "onnx", "torch"]


@pytest.mark.parametrize("runtime", ["torch", "onnx"])
def test_cli_segment_takes_runtime(runtime, tiny_weights, phantom_dir, tmp_path):
    out = tmp_path / runtime
    result = CliRunner().invoke(main, ["segment", str(phantom_dir / "png" / "phantom01"), "--out", str(out),
                                       "--weights", tiny_weights, "--runtime", runtime])
    assert result.exit_code == 0, result.output
    assert len(list(out.rglob("*.png"))) == 6


def test_cli_segment_masks_are_the_same_in_both_runtimes(tiny_weights, phantom_dir, tmp_path):
    masks = {}
    for runtime in ("torch", "onnx"):
        out = tmp_path / runtime
        result = CliRunner().invoke(main, ["segment", str(phantom_dir / "png" / "phantom01"), "--out", str(out),
                                           "--weights", tiny_weights, "--runtime", runtime])
        assert result.exit_code == 0, result.output
        masks[runtime] = {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*.png"))}
    assert masks["torch"] == masks["onnx"]


@pytest.mark.realdata
def test_bundled_model_onnx_equals_torch_on_every_shared_folder(bundled_weights, shared_data, tmp_path):
    """Lung and lesion probabilities and vectors within 1e-4 on real slices of every shared folder."""
    onnx_model, torch_model = _pair(bundled_weights, tmp_path)
    folders = sorted(path for path in shared_data.iterdir() if path.is_dir())
    assert len(folders) >= 5
    for folder in folders:
        # the CT images, not the masks beside them
        images = [folder / name for name in ("images", "ct") if (folder / name).is_dir()] or [folder]
        slices = []
        for path in find_image_files([str(images[0])], ()):
            try:
                slices.extend(read_file(path)[:2])
            except Exception:
                continue  # labels, masks that are no CT, unreadable files: not what is compared
            if len(slices) >= 6:
                break
        assert slices, f"no readable slice in {folder}"
        inputs = np.stack([onnx_model.prepare(item)[0] for item in slices[:6]])
        _assert_same_outputs(onnx_model, torch_model, inputs)
