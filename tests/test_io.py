import os

import cv2
import numpy as np
import pytest

from lungcbir.errors import ReadError
from lungcbir.io import (classify_intensity, dicom_series_positions, file_kind, find_image_files,
                         read_file)


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
