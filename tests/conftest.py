"""Shared fixtures: small synthetic inputs, tiny random-weight models, the shared real data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lungcbir.datasets import data_root
from lungcbir.inference import ModelSettings, bundled_weights_path, save_weights
from lungcbir.model import UNet, UNetConfig
from lungcbir.phantom import write_phantom
from lungcbir.preprocess import PreprocessConfig

TINY = UNetConfig(base_channels=4, depth=3)


def _tiny_weights(folder: Path, seed: int) -> str:
    import torch

    torch.manual_seed(seed)
    path = folder / f"tiny{seed}.pt"
    # quality=False: an untrained network's masks say nothing; only "is it CT at all" is judged
    save_weights(path, UNet(TINY), ModelSettings(unet=TINY, preprocess=PreprocessConfig(input_size=64),
                                                 quality=False))
    return str(path)


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> str:
    """A randomly initialised, very small U-Net: fast, and enough to test plumbing."""
    return _tiny_weights(tmp_path_factory.mktemp("weights"), seed=0)


@pytest.fixture(scope="session")
def other_tiny_weights(tmp_path_factory) -> str:
    """Another model (other weights, so another model id)."""
    return _tiny_weights(tmp_path_factory.mktemp("weights"), seed=1)


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory) -> Path:
    """Two synthetic series of 6 slices: DICOM, PNG and masks."""
    out = tmp_path_factory.mktemp("phantom")
    write_phantom(out, slices=6, size=96, patients=2)
    return out


POSTGRES_URL = os.environ.get("LUNGCBIR_TEST_POSTGRES")


def postgres_url() -> str:
    """A PostgreSQL database emptied for one test; CI provides one, elsewhere it may be missing."""
    if not POSTGRES_URL:
        if os.environ.get("CI"):
            pytest.fail("LUNGCBIR_TEST_POSTGRES is not set; .ci/run should start PostgreSQL")
        pytest.skip("no PostgreSQL server: set LUNGCBIR_TEST_POSTGRES=postgresql+psycopg://user:pw@host/db")
    from sqlalchemy import create_engine

    from lungcbir.store import Base

    engine = create_engine(POSTGRES_URL)
    Base.metadata.drop_all(engine)
    engine.dispose()
    return POSTGRES_URL


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request) -> str:
    return request.param


@pytest.fixture
def store_paths(tmp_path, backend) -> dict:
    """Database URL and index folder for one test, on SQLite and on PostgreSQL."""
    url = f"sqlite:///{tmp_path / 'db' / 'test.sqlite'}" if backend == "sqlite" else postgres_url()
    return {"db_url": url, "index_dir": str(tmp_path / "index")}


@pytest.fixture(scope="session")
def shared_data() -> Path:
    root = data_root()
    if not root.is_dir():
        pytest.skip(f"real data folder {root} is missing (set LUNGCBIR_DATA)")
    return root


@pytest.fixture(scope="session")
def bundled_weights() -> str:
    path = bundled_weights_path()
    assert path is not None, "the package ships no bundled weights (lungcbir/weights/lung_unet.pt)"
    return str(path)
