import os
import re
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from lungcbir.errors import ReadError
from lungcbir.io import classify_intensity, dicom_series_positions, file_kind, find_image_files, read_file


def write(path, pixels):
    assert cv2.imwrite(str(path), pixels)
    return str(path)


def test_png_8bit_gray_is_uint8(tmp_path):
    item = read_file(write(tmp_path / "a.png", np.arange(32 * 40, dtype=np.uint8).reshape(32, 40)))[0]
    assert item.intensity == "uint8" and item.shape == (32, 40) and item.source_format == "png"
    assert len(item.sha256) == 64


def test_png_16bit_is_minmax(tmp_path):
    pixels = np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 40
    item = read_file(write(tmp_path / "a.png", pixels))[0]
    assert item.intensity == "minmax" and item.pixels.dtype == np.uint16


@pytest.mark.parametrize("channels", [3, 4])
def test_colour_png_becomes_gray(tmp_path, channels):
    pixels = np.zeros((16, 16, channels), np.uint8)
    pixels[..., :3] = 120
    pixels[0, 1, :3] = 0
    item = read_file(write(tmp_path / "c.png", pixels))[0]
    assert item.pixels.ndim == 2 and int(item.pixels[0, 0]) == 120


@pytest.mark.parametrize("suffix,name", [(".jpg", "jpeg"), (".bmp", "bmp")])
def test_jpeg_and_bmp(tmp_path, suffix, name):
    item = read_file(write(tmp_path / f"a{suffix}", np.tile(np.arange(20, dtype=np.uint8), (20, 1))))[0]
    assert item.source_format == name and item.intensity == "uint8"


def test_int16_tiff_with_air_is_hu(tmp_path):
    pixels = np.full((16, 16), -1000, np.int16)
    pixels[4:8] = 40
    item = read_file(write(tmp_path / "hu.tif", pixels))[0]
    assert item.intensity == "hu" and item.source_format == "tiff"


def test_float_tiff_nan_is_replaced(tmp_path):
    pixels = np.full((16, 16), -800.0, np.float32)
    pixels[5:9] = 40.0
    pixels[0, 0] = np.nan
    pixels[1, 1] = np.inf
    item = read_file(write(tmp_path / "f.tif", pixels))[0]
    assert np.isfinite(item.pixels).all() and item.intensity == "hu"


def test_unit_float_is_unit():
    assert classify_intensity(np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)) == "unit"


def test_dicom_series_metadata_and_order(phantom_dir):
    files = sorted(find_image_files([phantom_dir / "dicom" / "phantom01"]))
    positions = dicom_series_positions(files)
    items = [read_file(f)[0] for f in files]
    assert all(i.intensity == "hu" and i.patient_id == "PHANTOM01" for i in items)
    # file names are unrelated to order; positions must follow InstanceNumber (superior first)
    by_position = sorted(items, key=lambda i: positions[i.path])
    assert [i.instance_number for i in by_position] == list(range(1, 7))
    assert items[0].pixel_spacing == (0.7, 0.7)
    assert items[0].pixels.min() >= -1024


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_nifti_volume_gives_one_slice_per_z(tmp_path, suffix):
    import nibabel

    volume = np.full((24, 20, 3), -1000, np.int16)
    volume[5:10] = 40
    path = str(tmp_path / f"v{suffix}")
    nibabel.save(nibabel.Nifti1Image(volume, np.eye(4)), path)
    slices = read_file(path)
    assert [s.frame for s in slices] == [0, 1, 2]
    assert slices[0].shape == (20, 24) and slices[0].intensity == "hu"
    assert slices[2].name.endswith("_z002")


@pytest.mark.parametrize("content,name,message", [
    (b"", "empty.png", "empty"),
    (b"hello, I am text", "text.png", "not a decodable image"),
    (b"\x89PNG\r\n\x1a\n\x00\x00", "truncated.png", "not a decodable image"),
    (b"not dicom at all" * 20, "x.dcm", "DICOM"),
    (b"abc", "notes.txt", "not a supported image type"),
])
def test_bad_files_give_one_clear_reason(tmp_path, content, name, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ReadError) as raised:
        read_file(path)
    assert message in str(raised.value) and str(path) in str(raised.value)


def test_tiny_image_is_refused(tmp_path):
    with pytest.raises(ReadError, match="too small"):
        read_file(write(tmp_path / "one.png", np.zeros((1, 1), np.uint8)))


def test_missing_and_broken_link(tmp_path):
    with pytest.raises(ReadError, match="does not exist"):
        read_file(tmp_path / "nope.png")
    os.symlink(tmp_path / "nowhere.png", tmp_path / "link.png")
    with pytest.raises(ReadError, match="broken symbolic link"):
        read_file(tmp_path / "link.png")


def test_dicom_without_pixels(tmp_path):
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # basic text SR
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.Modality = "SR"
    path = tmp_path / "report.dcm"
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(ReadError, match="no pixel data"):
        read_file(path)


def test_walk_skips_non_images_and_honours_exclude(tmp_path):
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub" / "a.png", np.eye(16, dtype=np.uint8))
    write(tmp_path / "b.png", np.eye(16, dtype=np.uint8))
    (tmp_path / "README.md").write_text("x")
    (tmp_path / "table.csv").write_text("x")
    assert [os.path.basename(p) for p in find_image_files([tmp_path])] == ["b.png", "a.png"]
    assert [os.path.basename(p) for p in find_image_files([tmp_path], exclude=["sub"])] == ["b.png"]
    assert file_kind("x.nii.gz") == "nifti" and file_kind("x.csv") is None


# --- hardening: one read, bounded decoding, bad tags, odd files -------------------

def _dicom(tmp_path, phantom_dir, name="x.dcm", raw=None, remove=(), frames=None):
    """A phantom DICOM, with tags replaced by raw (possibly invalid) bytes or removed."""
    import pydicom
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    dataset = pydicom.dcmread(sorted((phantom_dir / "dicom" / "phantom01").iterdir())[0])
    for keyword, (vr, value) in (raw or {}).items():
        tag = Tag(keyword)
        dataset._dict[tag] = RawDataElement(tag, vr, len(value), value, 0, False, True)
    for keyword in remove:
        delattr(dataset, keyword)
    if frames:
        dataset.NumberOfFrames = frames
        dataset.PixelData = dataset.PixelData * frames
    path = tmp_path / name
    dataset.save_as(path, enforce_file_format=True)
    return str(path)


@pytest.mark.parametrize("kind", ["png", "dicom"])
def test_hash_and_pixels_come_from_the_same_bytes(tmp_path, phantom_dir, monkeypatch, kind):
    """A file replaced while it is read is stored with the hash of the content it was decoded from."""
    import hashlib

    import pydicom

    first = np.tile(np.arange(64, dtype=np.uint8) * 3, (64, 1))
    if kind == "png":
        path = write(tmp_path / "a.png", first)
        replacement = cv2.imencode(".png", first.T.copy())[1].tobytes()
        module, names = cv2, ("imread", "imdecode")
    else:
        path = _dicom(tmp_path, phantom_dir)
        other = _dicom(tmp_path, phantom_dir, "other.dcm", raw={"PatientID": ("LO", b"OTHER ")})
        replacement = Path(other).read_bytes()
        module, names = pydicom, ("dcmread",)
    original = Path(path).read_bytes()

    def swapping(decode):
        def wrapper(*args, **kwargs):
            result = decode(*args, **kwargs)
            with open(path, "wb") as handle:  # the file changes right after it was decoded
                handle.write(replacement)
            return result
        return wrapper

    for name in names:
        monkeypatch.setattr(module, name, swapping(getattr(module, name)))
    item = read_file(path)[0]
    assert item.sha256 == hashlib.sha256(original).hexdigest()
    if kind == "png":
        assert np.array_equal(item.pixels, first)
    else:
        assert item.patient_id == "PHANTOM01"


def test_file_size_limit(tmp_path, monkeypatch):
    import lungcbir.io

    path = write(tmp_path / "a.png", np.tile(np.arange(64, dtype=np.uint8), (64, 1)))
    monkeypatch.setattr(lungcbir.io, "MAX_FILE_BYTES", os.path.getsize(path) - 1)
    with pytest.raises(ReadError, match="above the limit of"):
        read_file(path)


def _gzip_nifti_of_zeros(path, shape):
    """A .nii.gz of zeros with the given shape, written in pieces: tiny on disk, huge when decoded."""
    import nibabel

    header = nibabel.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.int16)
    header["vox_offset"] = 352
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    remaining = int(np.prod(shape)) * 2
    with open(path, "wb") as handle:
        handle.write(compressor.compress(header.binaryblock + b"\0" * 4))
        block = b"\0" * (1 << 22)
        while remaining:
            piece = block[:min(remaining, len(block))]
            handle.write(compressor.compress(piece))
            remaining -= len(piece)
        handle.write(compressor.flush())
    return str(path)


def test_nifti_bomb_is_refused_from_its_header(tmp_path):
    import tracemalloc

    path = _gzip_nifti_of_zeros(tmp_path / "bomb.nii.gz", (512, 512, 1000))
    assert os.path.getsize(path) < 2 << 20
    tracemalloc.start()
    try:
        with pytest.raises(ReadError, match="512x512x1000 = 262144000 voxels, above the limit"):
            read_file(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3 * os.path.getsize(path) + (8 << 20), f"refusing the bomb allocated {peak} bytes"


def _peak_allocation(function):
    """What ``function()`` returns (or raises) and the most memory it held at once (tracemalloc)."""
    import tracemalloc

    tracemalloc.start()
    try:
        try:
            outcome = function()
        except ReadError as error:
            outcome = error
        return outcome, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_volume_of_zeros_is_refused_as_constant_plane_by_plane(tmp_path):
    """A small .nii.gz of zeros within the voxel limit once expanded to
    gigabytes; it is now decoded one plane at a time and refused as constant."""
    path = _gzip_nifti_of_zeros(tmp_path / "zeros.nii.gz", (512, 512, 200))  # 100 MB of int16 once expanded
    outcome, peak = _peak_allocation(lambda: read_file(path))
    assert isinstance(outcome, ReadError)
    assert "volume is constant (every voxel is 0), nothing to segment" in str(outcome)
    assert peak < 8 << 20, f"refusing a volume of zeros allocated {peak} bytes"


def test_constant_slices_of_a_volume_are_left_out_and_masks_keep_the_grid(tmp_path):
    import nibabel

    from lungcbir.io import reader_for_format

    volume = np.zeros((24, 20, 4), np.int16)  # planes 0 and 3 are blank padding
    volume[:, :, 1:3] = -1000
    volume[2:6, 11:17, 1:3] = 40
    source = str(tmp_path / "v.nii.gz")
    nibabel.save(nibabel.Nifti1Image(volume, np.eye(4)), source)
    slices = read_file(source)
    assert [s.frame for s in slices] == [1, 2] and all(s.frames_in_file == 4 for s in slices)
    assert all(s.intensity == "hu" for s in slices)
    target = reader_for_format("nifti").write_masks(source, slices, [s.pixels > -500 for s in slices], tmp_path,
                                                    "nifti")
    assert np.array_equal(np.asarray(nibabel.load(target).dataobj) > 0, volume > 0)
    with pytest.raises(ReadError, match="slice 0 is constant"):
        read_file(source, frame=0)


def test_one_slice_of_a_volume_is_read_without_keeping_the_others(tmp_path):
    import nibabel

    from lungcbir.io import MIDDLE

    volume = np.tile(np.arange(256, dtype=np.int16)[:, None, None] * 4 - 1000, (1, 256, 120))
    volume += np.arange(120, dtype=np.int16)  # every plane its own (and the volume 31 MB as float32)
    path = str(tmp_path / "v.nii.gz")
    nibabel.save(nibabel.Nifti1Image(volume, np.eye(4)), path)
    (middle,), peak = _peak_allocation(lambda: read_file(path, frame=MIDDLE))
    assert middle.frame == 60 and middle.frames_in_file == 120 and middle.intensity == "hu"
    assert np.array_equal(middle.pixels, volume[:, :, 60].T) and len(middle.sha256) == 64
    assert peak < 8 << 20, f"reading one slice allocated {peak} bytes"
    assert np.array_equal(read_file(path, frame=7)[0].pixels, volume[:, :, 7].T)
    with pytest.raises(ReadError, match="no slice 120 "):
        read_file(path, frame=120)


def test_voxel_limit_admits_a_chest_ct_and_is_configurable(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from lungcbir.cli import main
    from lungcbir.io import DEFAULT_MAX_VOXELS, voxel_limit

    assert 512 * 512 * 600 <= DEFAULT_MAX_VOXELS < 512 * 512 * 1000
    import nibabel

    volume = np.full((24, 20, 3), -1000, np.int16)
    volume[5:10] = 40
    path = str(tmp_path / "v.nii.gz")
    nibabel.save(nibabel.Nifti1Image(volume, np.eye(4)), path)
    assert len(read_file(path)) == 3
    with pytest.raises(ReadError, match="1440 voxels, above the limit of 1000"):
        read_file(path, max_voxels=1000)
    # the library reads no environment (an embedder passes its settings); the program does
    monkeypatch.setenv("LUNGCBIR_MAX_VOXELS", "1439")
    assert voxel_limit() == DEFAULT_MAX_VOXELS and len(read_file(path)) == 3
    result = CliRunner().invoke(main, ["segment", path, "--out", str(tmp_path / "out")])
    assert result.exit_code == 1 and "above the limit of 1439" in result.output, result.output
    monkeypatch.setenv("LUNGCBIR_MAX_VOXELS", "lots")
    result = CliRunner().invoke(main, ["segment", path, "--out", str(tmp_path / "out")])
    assert result.exit_code != 0 and "LUNGCBIR_MAX_VOXELS" in result.output


def _radiance_hdr(width, height) -> bytes:
    """A Radiance HDR image (flat, run-length encoded scanlines): small on disk for any size."""
    line = b"\x02\x02" + struct.pack(">H", width)
    for _ in range(4):  # R, G, B, E: runs of at most 127
        left = width
        while left:
            run = min(127, left)
            line += bytes([128 + run, 128])
            left -= run
    return b"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n\n" + f"-Y {height} +X {width}\n".encode() + line * height


@pytest.mark.parametrize("name,content,looks_like", [
    ("hdr.png", _radiance_hdr(12000, 12000), "Radiance HDR"),
    ("gif.tif", b"GIF89a\x10\x00\x10\x00\x00\x00\x00;", "GIF"),
    ("pnm.jpg", b"P5\n64 64\n255\n" + bytes(range(64)) * 64, "PNM"),
])
def test_raster_content_of_another_format_is_never_decoded(tmp_path, monkeypatch, name, content, looks_like):
    def must_not_decode(*args, **kwargs):
        pytest.fail("an image of an unsupported format reached the decoder")

    monkeypatch.setattr(cv2, "imread", must_not_decode)
    monkeypatch.setattr(cv2, "imdecode", must_not_decode)
    path = tmp_path / name
    path.write_bytes(content)
    claimed = {".png": "PNG", ".tif": "TIFF", ".jpg": "JPEG"}[os.path.splitext(name)[1]]
    with pytest.raises(ReadError, match=f"not a {claimed} file; the content looks like {looks_like}"):
        read_file(path)


def test_huge_size_in_a_tiff_or_jpeg_header_is_refused_before_decoding(tmp_path, monkeypatch):
    tiff = bytearray(cv2.imencode(".tif", np.eye(16, dtype=np.uint8))[1].tobytes())
    jpeg = bytearray(cv2.imencode(".jpg", np.eye(16, dtype=np.uint8) * 200)[1].tobytes())
    # patch the width/height fields in place: TIFF tags 256/257, the JPEG frame header
    offset = struct.unpack("<I", tiff[4:8])[0]
    for entry in range(struct.unpack("<H", tiff[offset:offset + 2])[0]):
        at = offset + 2 + 12 * entry
        tag, kind = struct.unpack("<HH", tiff[at:at + 4])
        if tag in (256, 257):
            tiff[at + 8:at + 12] = struct.pack("<H", 60000) + b"\0\0" if kind == 3 else struct.pack("<I", 60000)
    frame = jpeg.index(b"\xff\xc0")
    jpeg[frame + 5:frame + 9] = struct.pack(">HH", 60000, 60000)
    monkeypatch.setattr(cv2, "imdecode", lambda *a, **k: pytest.fail("decoded despite the header's size"))
    for name, content in (("big.tif", tiff), ("big.jpg", jpeg)):
        (tmp_path / name).write_bytes(bytes(content))
        with pytest.raises(ReadError, match="60000x60000, above the limit"):
            read_file(tmp_path / name)


def test_multi_frame_dicom_is_refused_before_its_pixels_are_decoded(tmp_path, phantom_dir, monkeypatch):
    import pydicom

    path = _dicom(tmp_path, phantom_dir, frames=20)
    monkeypatch.setattr(pydicom.dataset.Dataset, "pixel_array",
                        property(lambda self: pytest.fail("multi-frame pixel data was decoded")))
    with pytest.raises(ReadError, match="multi-frame DICOM"):
        read_file(path)


def test_malformed_optional_dicom_tags_count_as_unknown(tmp_path, phantom_dir):
    bad = _dicom(tmp_path, phantom_dir, "bad.dcm", raw={"InstanceNumber": ("IS", b"ab"),
                                                         "PixelSpacing": ("DS", b"x\\y ")},
                 remove=("ImagePositionPatient", "SliceLocation"))
    good = _dicom(tmp_path, phantom_dir, "good.dcm")
    item = read_file(bad)[0]
    assert item.instance_number is None and item.pixel_spacing is None and item.axis_position is None
    assert np.array_equal(item.pixels, read_file(good)[0].pixels)
    assert set(dicom_series_positions([bad, good])) == {bad, good}


@pytest.mark.parametrize("slope,intercept,reason", [
    (b"NaN ", b"0 ", "RescaleSlope is nan, not a number"),
    (b"1 ", b"-inf", "RescaleIntercept is -inf, not a number"),
    (b"1e308 ", b"0 ", "RescaleSlope 1e+308 and RescaleIntercept 0 give values of magnitude above 1e+06"),
    (b"1 ", b"-1e30 ", "RescaleSlope 1 and RescaleIntercept -1e+30 give values of magnitude above 1e+06"),
])
def test_unusable_rescale_fails_the_file_without_a_warning(tmp_path, phantom_dir, slope, intercept, reason):
    """A NaN or huge RescaleSlope overflowed the pixels (RuntimeWarning on stderr)."""
    import warnings

    path = _dicom(tmp_path, phantom_dir, raw={"RescaleSlope": ("DS", slope), "RescaleIntercept": ("DS", intercept)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ReadError, match=re.escape(reason + (", not CT numbers" if "give" in reason else ""))):
            read_file(path)


def test_a_decoder_error_of_several_lines_gives_its_useful_part_in_one_line(tmp_path, phantom_dir):
    """"... raised by all available plugins:" was cut at the colon."""
    import pydicom
    from pydicom.encaps import encapsulate
    from pydicom.uid import RLELossless

    dataset = pydicom.dcmread(sorted((phantom_dir / "dicom" / "phantom01").iterdir())[0])
    dataset.file_meta.TransferSyntaxUID = RLELossless
    dataset.PixelData = encapsulate([b"not RLE data at all" * 4])
    dataset["PixelData"].VR = "OB"
    dataset.save_as(tmp_path / "x.dcm", enforce_file_format=True)
    with pytest.raises(ReadError) as raised:
        read_file(tmp_path / "x.dcm")
    reason = raised.value.reason
    assert "\n" not in reason and len(reason) <= 360, reason
    assert re.search(r"all available plugins: \w+: \S.*invalid number of segments", reason), reason


@pytest.mark.parametrize("columns", [9, 95, 200])
def test_dicom_pixel_data_must_be_as_long_as_its_header_says(tmp_path, phantom_dir, columns):
    """A header whose Columns lie was read as a picture of the header's size."""
    path = _dicom(tmp_path, phantom_dir, raw={"Columns": ("US", struct.pack("<H", columns))})
    with pytest.raises(ReadError, match=f"DICOM pixel data is 18432 bytes, but Rows 96 x Columns {columns} x 1 "
                                        f"sample\\(s\\) of 16 bits take {96 * columns * 2}$"):
        read_file(path)


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32, np.float64])
def test_colour_tiff_of_any_sample_type_becomes_grey(tmp_path, dtype):
    bgr = np.zeros((32, 32, 3), np.float64)
    bgr[..., 0], bgr[..., 1], bgr[..., 2] = 10, np.arange(32) - 16, 100  # B, G, R
    item = read_file(write(tmp_path / "c.tif", bgr.astype(dtype)))[0]
    expected = 0.114 * bgr[..., 0] + 0.587 * bgr[..., 1] + 0.299 * bgr[..., 2]
    assert item.pixels.shape == (32, 32) and item.pixels.dtype == dtype
    assert np.abs(item.pixels.astype(np.float64) - expected).max() <= (0.5 if dtype != np.float64 else 1e-9)


def _unblock(fifo):
    """Let a reader stuck opening ``fifo`` go on (it then reads end-of-file)."""
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        pass


def test_named_pipes_are_refused_without_blocking(tmp_path):
    import threading

    pipes = [tmp_path / "x.dcm", tmp_path / "noext"]
    for pipe in pipes:
        os.mkfifo(pipe)
    good = write(tmp_path / "good.png", np.tile(np.arange(32, dtype=np.uint8), (32, 1)))
    outcome = {}

    def work():
        outcome["files"] = list(find_image_files([tmp_path]))
        outcome["positions"] = dicom_series_positions([str(p) for p in pipes])
        outcome["errors"] = []
        for pipe in pipes:
            try:
                read_file(pipe)
            except ReadError as error:
                outcome["errors"].append(error.reason)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    thread.join(20)
    stuck = thread.is_alive()
    while thread.is_alive():
        for pipe in pipes:
            _unblock(pipe)
        thread.join(0.2)
    assert not stuck, "reading a named pipe blocked"
    assert outcome["files"] == [good, str(pipes[0])]  # the pipe named like an image is reported when read
    assert outcome["positions"] == {}
    assert outcome["errors"] == ["not a regular file (named pipe)"] * 2


# --- the reader registry ----------------------------------------------------

def test_every_suffix_has_one_reader_and_the_message_text_comes_from_the_registry():
    from lungcbir import io

    for suffix in io.supported_suffixes():
        claimants = [reader.kind for reader in io.READERS if reader.claims(f"x{suffix}")]
        assert len(claimants) == 1, (suffix, claimants)
    names = [name for reader in io.READERS for name in reader.formats]
    text = io.supported_formats()
    assert all(name in text for name in names) and text.endswith(f" or {names[-1]}")


def test_each_reader_recognises_its_own_content_only(tmp_path, phantom_dir):
    import nibabel

    from lungcbir import io

    png = cv2.imencode(".png", np.eye(16, dtype=np.uint8))[1].tobytes()
    dicom = next((phantom_dir / "dicom" / "phantom01").iterdir()).read_bytes()
    nibabel.save(nibabel.Nifti1Image(np.zeros((8, 8, 2), np.int16), np.eye(4)), str(tmp_path / "v.nii"))
    samples = {"raster": png, "dicom": dicom, "nifti": (tmp_path / "v.nii").read_bytes()}
    for reader in io.READERS:
        assert [kind for kind, data in samples.items() if reader.content_matches(data)] == [reader.kind]


def test_nifti_masks_are_written_on_the_source_grid(tmp_path):
    """The NIfTI reader's mask writer undoes its own transpose: mask voxels sit where the
    source's voxels were (a non-square, asymmetric volume, so a missed transpose shows)."""
    import nibabel

    from lungcbir.io import reader_for_format

    volume = np.full((24, 20, 3), -1000, np.int16)
    volume[2:6, 11:17, :] = 40
    affine = np.diag([0.7, 0.8, 2.5, 1.0])
    source = str(tmp_path / "v.nii.gz")
    nibabel.save(nibabel.Nifti1Image(volume, affine), source)
    slices = read_file(source)
    reader = reader_for_format(slices[0].source_format)
    target = reader.write_masks(source, slices, [s.pixels > -500 for s in slices], tmp_path, "nifti")
    written = nibabel.load(target)
    assert target.endswith("v_mask.nii.gz") and np.allclose(written.affine, affine)
    assert np.array_equal(np.asarray(written.dataobj) > 0, volume > -500)


def test_a_new_format_is_one_reader_class(tmp_path, monkeypatch):
    """Registering one class is enough for reading, folder walking and the message text."""
    from lungcbir import io

    class TextGrid(io.Reader):
        kind, formats, suffixes, source_formats = "grid", ("GRID",), (".grid",), frozenset({"grid"})

        def content_matches(self, data):
            return data.startswith(b"grid")

        def read(self, path, data, max_voxels=None):
            rows = [[float(v) for v in line.split()] for line in data.decode().splitlines()[1:]]
            pixels = np.array(rows, np.float32)
            return [io.CTSlice(pixels, io.classify_intensity(pixels), path, "grid")]

    monkeypatch.setattr(io, "READERS", (*io.READERS, TextGrid()))
    grid = tmp_path / "a.grid"
    grid.write_text("grid\n" + "\n".join(" ".join(str(r * c) for c in range(9)) for r in range(9)))
    (tmp_path / "b.txt").write_text("x")
    assert list(find_image_files([tmp_path])) == [str(grid)]
    item = read_file(grid)[0]
    assert item.shape == (9, 9) and item.source_format == "grid" and len(item.sha256) == 64
    assert io.supported_formats().endswith(" or GRID") and file_kind(grid) == "grid"


def test_intensity_and_source_format_are_enums_equal_to_their_stored_strings(tmp_path):
    import json

    from lungcbir.io import CTSlice, Intensity, SourceFormat

    item = read_file(write(tmp_path / "a.png", np.eye(16, dtype=np.uint8) * 9))[0]
    assert item.intensity is Intensity.UINT8 and item.source_format is SourceFormat.PNG
    assert item.intensity == "uint8" and f"{item.source_format}" == "png" and str(item.intensity) == "uint8"
    assert json.loads(json.dumps({"f": item.source_format})) == {"f": "png"}
    made = CTSlice(np.zeros((8, 8), np.float32), "hu", "x", "dicom")  # plain strings are taken
    assert made.intensity is Intensity.HU and made.source_format is SourceFormat.DICOM
    with pytest.raises(ValueError):
        CTSlice(np.zeros((8, 8), np.float32), "bright", "x", "png")


def test_reading_leaves_pydicoms_settings_and_the_process_stderr_alone(phantom_dir, capfd):
    """An embedder's pydicom settings stay theirs, and their stderr is not redirected while we decode."""
    import pydicom

    before = pydicom.config.settings.reading_validation_mode
    path = sorted((phantom_dir / "dicom" / "phantom01").iterdir())[0]
    read_file(path)
    assert pydicom.config.settings.reading_validation_mode == before
    os.write(2, b"the embedder's line\n")
    assert "the embedder's line" in capfd.readouterr().err


def test_decodes_in_threads_run_at_the_same_time(phantom_dir, monkeypatch):
    """Two threads decode at once (a web server's uploads): a process-wide lock around decoders
    would leave the second waiting, and the barrier both decoders wait at would break."""
    import threading

    import cv2

    barrier = threading.Barrier(2, timeout=10)
    real = cv2.imdecode

    def meeting_decode(*args):
        barrier.wait()  # both decodes must be under way at once
        return real(*args)

    monkeypatch.setattr(cv2, "imdecode", meeting_decode)
    path = phantom_dir / "png" / "phantom01" / "phantom01_s001.png"
    errors = []

    def read():
        try:
            read_file(path)
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(repr(error))

    threads = [threading.Thread(target=read) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


def _tilted_series(phantom_dir, out, tilt_degrees: float = 30.0) -> list:
    """The phantom series with a gantry tilt: slices 5 mm apart along the tilted normal, each
    slice's corner moved along its column direction so that the corners' z fall from head to
    feet in the opposite order (z alone sorts this series backwards). Returns the files in true
    order, superior first."""
    import pydicom

    out.mkdir()
    tilt = np.radians(tilt_degrees)
    column = np.array([0.0, np.cos(tilt), np.sin(tilt)])
    normal = np.cross([1.0, 0.0, 0.0], column)
    files = []
    for number, path in enumerate(sorted((phantom_dir / "dicom" / "phantom01").iterdir())):
        ds = pydicom.dcmread(path)
        position = -5.0 * number * normal + 30.0 * number * column  # superior first, along the normal
        ds.ImageOrientationPatient = [1, 0, 0, *[round(float(v), 6) for v in column]]
        ds.ImagePositionPatient = [round(float(v), 4) for v in position]
        target = out / f"{(7 * number) % 6}.dcm"  # file names unrelated to the order
        ds.save_as(target)
        files.append(str(target))
    return files


def test_a_tilted_series_is_ordered_along_its_normal_not_by_z(phantom_dir, tmp_path):
    from lungcbir.io import dicom_series_positions

    files = _tilted_series(phantom_dir, tmp_path / "tilted")
    z = [pydicom_z(path) for path in files]
    assert z != sorted(z, reverse=True)  # by z alone the series would come out wrong
    positions = dicom_series_positions(files)
    assert [positions[path] for path in files] == list(range(len(files)))


def pydicom_z(path) -> float:
    import pydicom

    return float(pydicom.dcmread(path, stop_before_pixels=True).ImagePositionPatient[2])


def test_a_tilted_series_gets_its_seg_frames_in_order_along_its_normal(phantom_dir, tmp_path):
    from lungcbir.dicom_seg import group_series

    files = _tilted_series(phantom_dir, tmp_path / "tilted")
    series, failures = group_series([(path, read_file(path)) for path in sorted(files)])
    assert failures == [] and [item.path for item in series[0].slices] == files
