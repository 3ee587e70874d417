"""A corpus of bad and odd inputs: each gets one clear line naming the file, nothing half-stored."""

from __future__ import annotations

import gzip
import io
import os
import struct
import zlib

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from lungcbir.cli import main
from lungcbir.store import Store

GOOD = np.tile(np.arange(64, dtype=np.uint8) * 3, (64, 1))


def encoded(suffix: str, pixels: np.ndarray) -> bytes:
    return cv2.imencode(suffix, pixels)[1].tobytes()


def huge_png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims a huge size, with (almost) no pixel data behind it."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def dicom_bytes(phantom_dir, **changes) -> bytes:
    import pydicom

    path = sorted((phantom_dir / "dicom" / "phantom01").iterdir())[0]
    dataset = pydicom.dcmread(path)
    for key, value in changes.items():
        if value is None:
            delattr(dataset, key)
        else:
            setattr(dataset, key, value)
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def nifti_bytes(shape) -> bytes:
    import nibabel

    volume = np.random.default_rng(0).integers(-1000, 400, size=shape).astype(np.int16)
    return gzip.compress(nibabel.Nifti1Image(volume, np.eye(4)).to_bytes())


# name -> (file name, content builder, expected reason); reason None = must be indexed fine
def corpus_entries(phantom_dir):
    png, jpeg, tiff = encoded(".png", GOOD), encoded(".jpg", GOOD), encoded(".tif", GOOD)
    dicom = dicom_bytes(phantom_dir)
    nifti = nifti_bytes((32, 32, 3))
    rgb16 = np.zeros((40, 40, 3), np.uint16)
    rgb16[..., 1] = np.arange(40, dtype=np.uint16) * 1000
    nan_tiff = np.full((32, 32), np.nan, np.float32)
    partly_nan = np.linspace(-1000, 300, 32 * 32, dtype=np.float32).reshape(32, 32)
    partly_nan[0, :4] = [np.nan, np.inf, -np.inf, np.nan]
    multi_frame = dicom_bytes(phantom_dir, NumberOfFrames=2)
    return {
        "empty file": ("empty.png", b"", "file is empty"),
        "empty dicom": ("empty.dcm", b"", "file is empty"),
        "truncated png": ("truncated.png", png[: len(png) // 2], "not a decodable image"),
        "truncated jpeg": ("truncated.jpg", jpeg[:200], "not a decodable image"),
        "truncated tiff": ("truncated.tif", tiff[:100], "not a decodable image"),
        "truncated bmp": ("truncated.bmp", encoded(".bmp", GOOD)[:300], "not a decodable image"),
        "truncated dicom": ("truncated.dcm", dicom[: len(dicom) // 3], "DICOM"),
        "truncated nifti": ("truncated.nii.gz", nifti[: len(nifti) // 2], "unreadable NIfTI"),
        "text named png": ("notes.png", b"this is not an image\n" * 10, "not a decodable image"),
        "png named dcm": ("picture.dcm", png, "not a DICOM file"),
        "dicom named png": ("scan.png", dicom, "not a decodable image"),
        "png named jpg": ("really_png.jpg", encoded(".png", GOOD.T.copy()), None),
        "dicom without pixels": ("nopixels.dcm", dicom_bytes(phantom_dir, PixelData=None), "no pixel data"),
        "structured report": ("report.dcm", None, "no pixel data"),
        "multi-frame dicom claim": ("multiframe.dcm", multi_frame, "DICOM"),
        "huge dicom header": ("huge.dcm", dicom_bytes(phantom_dir, Rows=30000, Columns=30000), "above the limit"),
        "1x1 image": ("one.png", encoded(".png", np.zeros((1, 1), np.uint8)), "too small"),
        "constant image": ("constant.png", encoded(".png", np.full((64, 64), 7, np.uint8)), "constant"),
        "all-NaN float tiff": ("nan.tif", encoded(".tif", nan_tiff), "no finite values"),
        "partly NaN/inf float tiff": ("partly_nan.tif", encoded(".tif", partly_nan), None),
        "16-bit RGB png": ("rgb16.png", encoded(".png", rgb16), None),
        "grey + alpha png": ("grey_alpha.png", None, None),
        "4-D nifti": ("fourd.nii.gz", nifti_bytes((16, 16, 2, 3)), "expected a 3-D volume"),
        "30000x30000 png": ("huge.png", huge_png_header(30000, 30000), "above the limit"),
        "gif": ("anim.gif", b"GIF89a" + b"\0" * 20, None),  # not an image type by name: passed over
        "float RGB tiff": ("float_rgb.tif", encoded(".tif", np.dstack([GOOD, GOOD, GOOD]).astype(np.float32) / 255), None),
    }


def build_corpus(folder, phantom_dir):
    entries = corpus_entries(phantom_dir)
    expected = {}
    for kind, (name, content, reason) in entries.items():
        path = folder / name
        if kind == "structured report":
            from pydicom.dataset import FileDataset, FileMetaDataset
            from pydicom.uid import ExplicitVRLittleEndian, generate_uid

            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
            meta.MediaStorageSOPInstanceUID = generate_uid()
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            report = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
            report.Modality = "SR"
            report.save_as(path, enforce_file_format=True)
        elif kind == "grey + alpha png":
            import PIL.Image

            PIL.Image.fromarray(np.dstack([GOOD, np.full_like(GOOD, 255)]), "LA").save(path)
        else:
            path.write_bytes(content)
        expected[name] = reason
    # links and names that archives contain
    os.symlink(folder / "nowhere.png", folder / "broken_link.png")
    expected["broken_link.png"] = "broken symbolic link"
    os.symlink(folder / "loop_b.png", folder / "loop_a.png")
    os.symlink(folder / "loop_a.png", folder / "loop_b.png")
    expected["loop_a.png"] = expected["loop_b.png"] = "symbolic link loop"
    bad_name = os.fsdecode(bytes(folder) + b"/latin1_\xe9.png")
    with open(bad_name, "wb") as handle:
        handle.write(encoded(".png", GOOD))
    expected["latin1_\ufffd.png"] = "not valid UTF-8"
    (folder / "README.md").write_text("not an image, passed over quietly")
    (folder / "empty_sub").mkdir()
    (folder / "good.png").write_bytes(encoded(".png", GOOD))
    expected["good.png"] = None
    return expected


def test_index_dataset_over_bad_corpus(tmp_path, phantom_dir, tiny_weights, store_paths):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    expected = build_corpus(corpus, phantom_dir)
    store = ["--db", store_paths["db_url"], "--index-dir", store_paths["index_dir"], "--weights", tiny_weights]
    result = CliRunner().invoke(main, ["index-dataset", str(corpus), "--quiet", *store])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    failures = {}
    for line in result.output.splitlines():
        if line.startswith("failed: "):
            path, _, reason = line[len("failed: "):].partition(": ")
            failures[os.path.basename(path)] = reason
    bad = {name: reason for name, reason in expected.items() if reason}
    good = [name for name, reason in expected.items() if reason is None and not name.endswith(".gif")]
    for name, reason in bad.items():
        assert name in failures, f"{name} was not reported"
        assert reason in failures[name], f"{name}: {failures[name]!r} does not say {reason!r}"
    assert set(failures) == set(bad), f"unexpected failures: {set(failures) - set(bad)}"
    assert f"indexed {len(good)}, skipped 0 (already indexed), failed {len(bad)}" in result.output
    assert Store(store_paths["db_url"], store_paths["index_dir"]).stats().images == len(good)
    assert Store(store_paths["db_url"], store_paths["index_dir"]).check() == []


def test_empty_folder_and_folder_without_images(tmp_path, tiny_weights, store_paths):
    store = ["--db", store_paths["db_url"], "--index-dir", store_paths["index_dir"], "--weights", tiny_weights]
    (tmp_path / "empty").mkdir()
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "README.txt").write_text("x")
    for folder in ("empty", "docs"):
        result = CliRunner().invoke(main, ["index-dataset", str(tmp_path / folder), *store])
        assert result.exit_code == 2 and "no images found" in result.output


def test_missing_input_path(tmp_path, tiny_weights, store_paths):
    store = ["--db", store_paths["db_url"], "--index-dir", store_paths["index_dir"], "--weights", tiny_weights]
    result = CliRunner().invoke(main, ["index-dataset", str(tmp_path / "nope"), *store])
    assert result.exit_code == 1 and "nope: file does not exist" in result.output


def test_corrupt_database_file(tmp_path, tiny_weights, phantom_dir):
    database = tmp_path / "broken.sqlite"
    database.write_bytes(b"this is not a database" * 100)
    result = CliRunner().invoke(main, ["index-dataset", str(phantom_dir / "png"), "--db", f"sqlite:///{database}",
                                       "--index-dir", str(tmp_path / "i"), "--weights", tiny_weights])
    assert result.exit_code == 4 and "cannot open database" in result.output and "Traceback" not in result.output


def test_index_file_of_another_model_or_dimension(tmp_path, tiny_weights, phantom_dir, store_paths):
    import faiss

    store = ["--db", store_paths["db_url"], "--index-dir", store_paths["index_dir"], "--weights", tiny_weights]
    CliRunner().invoke(main, ["index-dataset", str(phantom_dir / "png"), "--quiet", *store])
    foreign = faiss.IndexIDMap2(faiss.IndexFlatIP(7))
    foreign.add_with_ids(np.ones((12, 7), np.float32), np.arange(1, 13))
    faiss.write_index(foreign, os.path.join(store_paths["index_dir"], "lungcbir.faiss"))
    check = CliRunner().invoke(main, ["check", "--db", store_paths["db_url"], "--index-dir", store_paths["index_dir"]])
    assert check.exit_code == 4 and "dimension 7" in check.output
    image = str(phantom_dir / "png" / "phantom01" / "phantom01_s001.png")
    result = CliRunner().invoke(main, ["query", image, "--json", "--out", str(tmp_path / "o"), *store])
    assert result.exit_code == 0, result.output  # the foreign index is never used: rebuilt from the database
    assert '"rank": 1' in result.output and os.path.abspath(image) in result.output.splitlines()[0]


def test_unwritable_output_folder(tmp_path, tiny_weights, phantom_dir):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    image = str(phantom_dir / "png" / "phantom01" / "phantom01_s001.png")
    result = CliRunner().invoke(main, ["segment", image, "--out", str(blocker / "sub"), "--weights", tiny_weights])
    assert result.exit_code == 2 and "cannot create output folder" in result.output


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_permissions(tmp_path, tiny_weights, store_paths):
    path = tmp_path / "secret.png"
    path.write_bytes(encoded(".png", GOOD))
    path.chmod(0)
    result = CliRunner().invoke(main, ["index-dataset", str(tmp_path), "--db", store_paths["db_url"],
                                       "--index-dir", store_paths["index_dir"], "--weights", tiny_weights])
    assert result.exit_code == 1 and "permission denied" in result.output


def test_labels_csv_problems(tmp_path, tiny_weights, phantom_dir, store_paths):
    store = ["--db", store_paths["db_url"], "--index-dir", store_paths["index_dir"], "--weights", tiny_weights]
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("file,diagnosis\na.png,x\n")
    result = CliRunner().invoke(main, ["index-dataset", str(phantom_dir / "png"), "--labels", str(wrong), *store])
    assert result.exit_code == 2 and "needs a 'path' column" in result.output
    result = CliRunner().invoke(main, ["index-dataset", str(phantom_dir / "png"), "--labels",
                                       str(tmp_path / "none.csv"), *store])
    assert result.exit_code == 2 and "cannot read labels" in result.output
