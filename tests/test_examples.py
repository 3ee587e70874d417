"""The examples in examples/ run as documented (on the synthetic phantom, or the shared data)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(name: str, *args, cwd: Path, env: dict | None = None) -> str:
    done = subprocess.run([sys.executable, str(EXAMPLES / name), *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=600, env={**os.environ, **(env or {})}, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    return done.stdout


@pytest.mark.slow
def test_index_and_query_example_finds_the_query_slice(tmp_path):
    output = run_example("index_and_query.py", cwd=tmp_path)
    assert "indexed 24, skipped 0, failed 0" in output
    first = next(line for line in output.splitlines() if line.strip().startswith("1. "))
    assert "phantom01" in first and "slice 5" in first, output  # the PNG query finds its own DICOM slice


def test_segment_folder_example_writes_a_mask_per_slice(phantom_dir, tmp_path):
    output = run_example("segment_folder.py", phantom_dir / "png" / "phantom01", tmp_path / "masks", cwd=tmp_path)
    written = sorted(p.name for p in (tmp_path / "masks").iterdir())
    assert len(written) == 6 and all(name.endswith("_mask.png") for name in written)
    assert output.count("lung fraction") == 6


@pytest.mark.realdata
def test_shared_data_labels_example_writes_a_row_per_shared_file(shared_data, tmp_path):
    output = run_example("shared_data_labels.py", tmp_path / "labels.csv", cwd=tmp_path,
                         env={"LUNGCBIR_DATA": str(shared_data)})
    rows = (tmp_path / "labels.csv").read_text().splitlines()
    assert rows[0] == "path,dataset,diagnosis,contrast,infection" and len(rows) > 100
    assert f"wrote {len(rows) - 1} rows" in output


def test_the_screenshot_script_says_why_it_stops_without_the_shared_data(tmp_path):
    """docs/make_screenshot.py pictures the shared data; without it there is nothing to picture."""
    script = EXAMPLES.parent / "docs" / "make_screenshot.py"
    done = subprocess.run([sys.executable, str(script), "--data", str(tmp_path / "missing"), "--out-dir",
                           str(tmp_path)], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0 and not done.stderr, done.stderr
    assert done.stdout.startswith(f"skipped: {tmp_path / 'missing'} has no covid-ct-md")
    assert not list(tmp_path.iterdir())
