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
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


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
        "float RGB tiff": ("float_rgb.tif",
                           encoded(".tif", np.dstack([GOOD, GOOD, GOOD]).astype(np.float32) / 255), None),
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


# --- hardening: bad tags, odd files, library noise, interrupts ---------------------

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bad_dicom(phantom_dir, index=0, raw=None, remove=()) -> bytes:
    """A phantom slice with tags replaced by raw, possibly invalid, bytes (pydicom refuses to set them)."""
    import pydicom
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    dataset = pydicom.dcmread(sorted((phantom_dir / "dicom" / "phantom02").iterdir())[index])
    for keyword, (vr, value) in (raw or {}).items():
        tag = Tag(keyword)
        dataset._dict[tag] = RawDataElement(tag, vr, len(value), value, 0, False, True)
    for keyword in remove:
        delattr(dataset, keyword)
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def radiance_hdr(width: int, height: int) -> bytes:
    """A small, valid Radiance HDR picture (OpenCV decodes it; Pillow cannot)."""
    rows = np.linspace(0, 255, width, dtype=np.uint8)
    line = b"\x02\x02" + struct.pack(">H", width) + b"".join(
        bytes([width]) + bytes(channel) for channel in (rows, rows, rows, np.full(width, 128, np.uint8)))
    return b"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n\n" + f"-Y {height} +X {width}\n".encode() + line * height


def colour_tiff(dtype) -> bytes:
    bgr = np.zeros((48, 48, 3), np.float64)
    bgr[..., 1] = np.arange(48) * 20 - 400
    bgr[..., 2] = -1000
    return encoded(".tif", bgr.astype(dtype))


def store_args(store_paths, weights):
    return ["--db", store_paths["db_url"], "--index-dir", store_paths["index_dir"], "--weights", weights]


def test_bad_dicom_tags_and_colour_tiffs_do_not_stop_index_dataset(tmp_path, phantom_dir, tiny_weights, store_paths):
    folder = tmp_path / "archive"
    folder.mkdir()
    for source in sorted((phantom_dir / "dicom" / "phantom01").iterdir()):
        (folder / source.name).write_bytes(source.read_bytes())
    (folder / "bad_instance.dcm").write_bytes(bad_dicom(phantom_dir, 1, {"InstanceNumber": ("IS", b"ab")},
                                                        remove=("ImagePositionPatient", "SliceLocation")))
    (folder / "bad_spacing.dcm").write_bytes(bad_dicom(phantom_dir, 2, {"PixelSpacing": ("DS", b"x\\y ")}))
    for dtype in (np.int16, np.int32, np.float64):
        (folder / f"rgb_{np.dtype(dtype).name}.tif").write_bytes(colour_tiff(dtype))
    result = CliRunner().invoke(main, ["index-dataset", str(folder), "--quiet", *store_args(store_paths, tiny_weights)])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == 0, result.output
    assert "indexed 11, skipped 0 (already indexed), failed 0" in result.output
    assert Store(store_paths["db_url"], store_paths["index_dir"]).stats().images == 11


def test_query_and_segment_read_bad_tags_and_report_bad_files(tmp_path, phantom_dir, tiny_weights, store_paths):
    store = store_args(store_paths, tiny_weights)
    assert CliRunner().invoke(main, ["index-dataset", str(phantom_dir / "png"), "--quiet", *store]).exit_code == 0
    bad_tags = tmp_path / "bad_tags.dcm"
    bad_tags.write_bytes(bad_dicom(phantom_dir, 3, {"InstanceNumber": ("IS", b"ab"), "PixelSpacing": ("DS", b"x\\y ")},
                                   remove=("ImagePositionPatient", "SliceLocation")))
    hdr = tmp_path / "picture.png"
    hdr.write_bytes(radiance_hdr(64, 64))
    series = tmp_path / "series"
    series.mkdir()
    for source in sorted((phantom_dir / "dicom" / "phantom02").iterdir())[1:]:
        (series / source.name).write_bytes(source.read_bytes())
    (series / "no_position.dcm").write_bytes(bad_tags.read_bytes())
    commands = {
        "query": ["query", str(bad_tags), str(hdr), "--out", str(tmp_path / "q"), *store],
        "segment": ["segment", str(bad_tags), str(hdr), "--out", str(tmp_path / "s"), "--weights", tiny_weights],
        "query --by-series": ["query", "--by-series", str(series), *store],
    }
    for name, args in commands.items():
        result = CliRunner().invoke(main, args)
        assert result.exception is None or isinstance(result.exception, SystemExit), f"{name}: {result.exception!r}"
        assert "Traceback" not in result.output
        failed = [line for line in result.output.splitlines() if line.startswith("failed: ")]
        if name == "query --by-series":
            assert result.exit_code == 0 and not failed, result.output
            assert f"{series}: 6 slices" in result.output
            continue
        assert result.exit_code == 1, f"{name}: {result.output}"
        expected = [f"failed: {hdr}: not a decodable image (not a PNG file; the content looks like Radiance HDR)"]
        if name == "query":  # a DICOM query's SEG needs the pixel spacing this file lacks; its answer stands
            expected.append(f"failed: {bad_tags}: cannot make a DICOM SEG (could not convert string to float: 'x')")
        assert sorted(failed) == sorted(expected), f"{name}: {result.output}"
        assert str(bad_tags) in result.output.replace(f"failed: {hdr}", "")  # the bad-tag file was answered
    assert (tmp_path / "s" / "bad_tags_mask.png").exists()


def run_cli(args, timeout, **options):
    """``lungcbir ARGS`` in its own process: C libraries' stderr and signals are only seen there."""
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "lungcbir.cli", *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=_ctrl_c_as_in_a_terminal,
                            **options)


def _ctrl_c_as_in_a_terminal() -> None:
    """A test run started in the background (``cmd &`` in a script) has SIGINT ignored, and an
    ignored signal is inherited across exec: give the child SIGINT as a terminal would."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def finish(process, timeout):
    import subprocess

    try:
        return process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        pytest.fail(f"lungcbir did not finish within {timeout} s")


def test_named_pipe_does_not_hang_index_dataset(tmp_path, tiny_weights):
    folder = tmp_path / "archive"
    folder.mkdir()
    os.mkfifo(folder / "x.dcm")
    os.mkfifo(folder / "dicom_without_suffix")
    (folder / "good.png").write_bytes(encoded(".png", GOOD))
    process = run_cli(["index-dataset", str(folder), "--quiet", "--db", f"sqlite:///{tmp_path / 'db.sqlite'}",
                       "--index-dir", str(tmp_path / "index"), "--weights", tiny_weights], timeout=60)
    out, err = finish(process, 60)
    assert process.returncode == 1, err
    assert err.splitlines() == [f"failed: {folder / 'x.dcm'}: not a regular file (named pipe)"]
    assert "indexed 1, skipped 0 (already indexed), failed 1" in out


def test_each_failure_is_one_line_on_stderr(tmp_path, phantom_dir, tiny_weights):
    png = encoded(".png", GOOD)
    crc = bytearray(png)
    crc[png.index(b"IDAT") + 8] ^= 0xFF  # the data no longer matches its checksum: libpng complains
    jpeg = encoded(".jpg", np.dstack([GOOD, GOOD.T, GOOD]))
    dicom = dicom_bytes(phantom_dir)
    bad = {"crc.png": bytes(crc), "truncated.png": png[: len(png) // 2], "truncated.jpg": jpeg[: len(jpeg) // 2],
           "truncated.bmp": encoded(".bmp", GOOD)[:300], "truncated.tif": encoded(".tif", GOOD)[:100],
           "truncated.dcm": dicom[: len(dicom) // 3], "bad_pixels.dcm": dicom[:-200],
           "text.png": b"hello\n" * 50}
    folder = tmp_path / "archive"
    folder.mkdir()
    for name, content in bad.items():
        (folder / name).write_bytes(content)
    (folder / "good.png").write_bytes(png)
    process = run_cli(["index-dataset", str(folder), "--quiet", "--db", f"sqlite:///{tmp_path / 'db.sqlite'}",
                       "--index-dir", str(tmp_path / "index"), "--weights", tiny_weights], timeout=120)
    out, err = finish(process, 120)
    assert process.returncode == 1, err
    lines = err.splitlines()
    assert len(lines) == len(bad) and all(line.startswith("failed: ") for line in lines), err
    assert {line.split(": ")[1] for line in lines} == {str(folder / name) for name in bad}
    assert out.splitlines()[0].startswith(f"indexed 1, skipped 0 (already indexed), failed {len(bad)}")


@pytest.mark.slow
def test_interrupt_with_workers_prints_one_line(tmp_path, tiny_weights):
    import signal
    import sqlite3
    import time

    folder = tmp_path / "archive"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for number in range(300):
        (folder / f"s{number:04d}.png").write_bytes(encoded(".png", rng.integers(0, 255, (96, 96), dtype=np.uint8)))
    database = tmp_path / "db.sqlite"
    process = run_cli(["index-dataset", str(folder), "--quiet", "--workers", "2", "--commit-every", "4",
                       "--batch-size", "1", "--db", f"sqlite:///{database}", "--index-dir", str(tmp_path / "index"),
                       "--weights", tiny_weights], timeout=120, start_new_session=True)

    def stored() -> int:
        try:
            with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=1) as connection:
                return connection.execute("SELECT count(*) FROM images").fetchone()[0]
        except sqlite3.Error:
            return 0

    deadline = time.monotonic() + 90
    while stored() < 8 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)  # the workers are reading and the model runs: now press Ctrl-C
    assert process.poll() is None, "the run ended before it could be interrupted"
    os.killpg(process.pid, signal.SIGINT)  # like Ctrl-C in a terminal: to the parent and its workers
    _, err = finish(process, 90)
    assert process.returncode == 130, err
    assert err.splitlines() == ["interrupted; everything committed before this point is kept"]


def test_ctrl_c_while_a_reader_worker_starts_is_not_lost():
    """A Ctrl-C that lands while a worker is being started is held back and then delivered
    (it was ignored, and so lost: an interrupted run went on to the end, exit status 0)."""
    import signal

    from lungcbir.indexing import _interrupts_inherited_as_ignored

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (see run_cli)
    try:
        with pytest.raises(KeyboardInterrupt):
            with _interrupts_inherited_as_ignored():
                os.kill(os.getpid(), signal.SIGINT)
            for _ in range(100):  # the interrupt arrives as soon as the block is lifted
                pass
    finally:
        signal.signal(signal.SIGINT, previous)
