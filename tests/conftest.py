"""Shared fixtures: small synthetic inputs, tiny random-weight models, the shared real data."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest

from lungcbir.database import ImageRecord
from lungcbir.datasets import data_root
from lungcbir.inference import ModelSettings, bundled_weights_path, save_weights
from lungcbir.model import UNet, UNetConfig
from lungcbir.phantom import write_phantom
from lungcbir.preprocess import PreprocessConfig

TINY = UNetConfig(base_channels=4, depth=3)


@pytest.fixture(scope="session", autouse=True)
def _own_cache(tmp_path_factory):
    """The ONNX models the tests generate go to a folder of this session, not the user's cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LUNGCBIR_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        yield


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
def findings_weights(tmp_path_factory) -> str:
    """A tiny random U-Net with a lesion branch whose vectors have a findings part (centre: none),
    its lesion head biased so that some pixels are called lesions."""
    import torch

    from lungcbir.features import FindingsConfig

    torch.manual_seed(2)
    config = UNetConfig(base_channels=4, depth=3, lesion_levels=2)
    network = UNet(config)
    with torch.no_grad():
        network.lesion_head.bias.fill_(0.2)
    path = tmp_path_factory.mktemp("weights") / "findings.pt"
    save_weights(path, network, ModelSettings(unet=config, preprocess=PreprocessConfig(input_size=64), quality=False,
                                              postprocess=False, findings=FindingsConfig(balanced_anatomy_weight=0.4)))
    return str(path)


#: Where the fixture paints its two findings in every 96-pixel phantom slice (x, y, radius):
#: a solid nodule in the left lung, a ground-glass patch in the right one.
SOLID = (31, 48, 4)
GROUND_GLASS = (66, 48, 5)


def disc(shape: tuple[int, int], x: int, y: int, radius: int) -> np.ndarray:
    ys, xs = np.ogrid[:shape[0], :shape[1]]
    return (ys - y) ** 2 + (xs - x) ** 2 <= radius**2


@pytest.fixture(scope="session")
def nodule_dir(tmp_path_factory) -> Path:
    """Three synthetic patients of 4 slices (8-bit PNG, 96 pixels), each slice with a solid
    nodule (HU 40) and a ground-glass patch (about HU -550, textured), and ``regions/``: a
    mask of both per slice, under the same relative names."""
    out = tmp_path_factory.mktemp("nodules")
    write_phantom(out, slices=4, size=96, patients=3)
    rng = np.random.default_rng(0)
    for image in sorted((out / "png").rglob("*.png")):
        pixels = cv2.imread(str(image), cv2.IMREAD_GRAYSCALE)
        solid, glass = disc(pixels.shape, *SOLID), disc(pixels.shape, *GROUND_GLASS)
        pixels[solid] = 189
        pixels[glass] = np.clip(82 + rng.normal(0, 6, int(glass.sum())), 0, 255).astype(np.uint8)
        cv2.imwrite(str(image), pixels)
        mask = out / "regions" / image.relative_to(out / "png")
        mask.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(mask), ((solid | glass) * 255).astype(np.uint8))
    return out


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

    from lungcbir.database import Base

    engine = create_engine(POSTGRES_URL)
    Base.metadata.drop_all(engine)
    engine.dispose()
    return POSTGRES_URL


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def backend(request) -> str:
    """The database backend of a test that runs on both; the PostgreSQL variants are marked
    ``postgres`` (deselect them with ``-m "not postgres"``)."""
    return request.param


def pytest_collection_modifyitems(items) -> None:
    """Tests that need the throw-away Orthanc (the ``dicomweb_archive`` fixture) are marked
    ``orthanc``, whoever writes them."""
    for item in items:
        if "dicomweb_archive" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.orthanc)


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


DICOMWEB_URL = os.environ.get("LUNGCBIR_TEST_DICOMWEB")


def load_test_archive_file(path: Path, root: Path):
    """One shared covid-ct-md file as a pydicom dataset ready for an archive (in memory only).

    Archives refuse files with an empty SOP Instance UID or UUID-text study/series UIDs (Orthanc
    answers HTTP 400), as 73 of the 152 files have: those get valid UIDs by the rules of
    :mod:`lungcbir.dicom_ids` (``2.25.<UUID as integer>``; an empty SOP Instance UID derived from
    the file's SHA-256), the same every time the file is loaded.
    """
    import hashlib

    import pydicom

    from lungcbir.dicom_ids import repair_identifiers

    data = path.read_bytes()
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    dataset = pydicom.dcmread(path)
    repair_identifiers(dataset, hashlib.sha256(data).hexdigest(), str(path.parent.relative_to(root)))
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID  # some files hold "1.2.3"
    return dataset


@pytest.fixture(scope="session")
def dicomweb_archive(shared_data) -> dict:
    """A real DICOMweb archive (Orthanc, started by .ci/run) holding the covid-ct-md series.

    Emptied first (it is a throw-away test server), then loaded by STOW-RS. Returns
    ``{"url": service root, "files": {local path: SOP Instance UID as stored}, "study_of": {local
    path: Study Instance UID as stored}, "studies": {study UID: StudyDate or ""}}``. Skips
    outside CI when no archive is configured; fails in CI.
    """
    import requests

    from lungcbir.dicomweb import DicomwebSource

    if not DICOMWEB_URL:
        if os.environ.get("CI"):
            pytest.fail("LUNGCBIR_TEST_DICOMWEB is not set; .ci/run should start Orthanc")
        pytest.skip("no DICOMweb archive: run Orthanc (.ci/orthanc start DIR) and set "
                    "LUNGCBIR_TEST_DICOMWEB=http://127.0.0.1:PORT/dicom-web")
    base = DICOMWEB_URL.rstrip("/").rsplit("/dicom-web", 1)[0]  # Orthanc's own REST API
    for study in requests.get(f"{base}/studies", timeout=30).json():
        requests.delete(f"{base}/studies/{study}", timeout=30).raise_for_status()
    root = shared_data / "covid-ct-md"
    files, study_of, studies, datasets = {}, {}, {}, []
    for path in sorted(root.rglob("*.dcm")):
        dataset = load_test_archive_file(path, root)
        files[str(path)] = str(dataset.SOPInstanceUID)
        study_of[str(path)] = str(dataset.StudyInstanceUID)
        studies[str(dataset.StudyInstanceUID)] = str(dataset.get("StudyDate") or "")
        datasets.append(dataset)
    if not files:
        pytest.skip(f"{root} holds no DICOM files")
    source = DicomwebSource(DICOMWEB_URL)
    for start in range(0, len(datasets), 32):
        answer = source.client.store(datasets[start:start + 32])
        assert not answer.get("FailedSOPSequence"), f"the archive refused files: {answer}"
    return {"url": DICOMWEB_URL, "files": files, "study_of": study_of, "studies": studies}


# -- helpers shared by several test modules (import them from conftest) -------------------------


def records(count, start=0):
    """``count`` rows of model "m1" with distinct contents (paths /x/N.png), for store tests."""
    return [ImageRecord(path=f"/x/{start + i}.png", sha256=f"{start + i:064d}", frame=0, source_format="png",
                        width=8, height=8, labels={}, lung_fraction=0.2, model_id="m1") for i in range(count)]


def unit(count, dim=8, seed=0):
    """``count`` random unit vectors of ``dim`` dimensions."""
    vectors = np.random.default_rng(seed).normal(size=(count, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def dciodvfy(path) -> str:
    """dciodvfy's report; fails on any error. Skips outside CI when dicom3tools is missing."""
    if shutil.which("dciodvfy") is None:
        if os.environ.get("CI"):
            pytest.fail("dciodvfy is not installed; .ci/run should install dicom3tools")
        pytest.skip("dciodvfy is not installed (apt-get install dicom3tools)")
    done = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, errors="replace", timeout=120,
                          check=False)
    report = done.stdout + done.stderr
    assert done.returncode == 0 and "Error" not in report, report
    return report
