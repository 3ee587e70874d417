"""Readers: turn PNG/JPEG/BMP/TIFF/DICOM/NIfTI files into :class:`CTSlice` objects.

Every reader returns raw pixel values plus how to interpret them (``intensity``); the
mapping to the network's [0, 1] input lives in :mod:`lungcbir.preprocess`.

Intensity kinds:

* ``"hu"``: Hounsfield units (DICOM after RescaleSlope/Intercept, NIfTI, signed or float TIFF
  whose values go below -200);
* ``"uint8"``: 8-bit exports, scaled by 1/255;
* ``"unit"``: float images already in [0, 1];
* ``"minmax"``: anything else (16-bit unsigned PNG/TIFF, odd float ranges), min-max scaled.
"""

from __future__ import annotations

import errno
import hashlib
import os
from collections import defaultdict
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Iterable, Iterator

import cv2
import numpy as np

from .errors import ReadError

RASTER_SUFFIXES = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".bmp": "bmp",
                   ".tif": "tiff", ".tiff": "tiff"}
DICOM_SUFFIXES = {".dcm", ".dicom", ".ima"}
NIFTI_SUFFIXES = (".nii", ".nii.gz")

#: Images with more pixels than this are refused before their pixels are decoded.
MAX_PIXELS = 8192 * 8192

#: Values below this in a signed or float image mean the image is in Hounsfield units.
HU_DETECTION_THRESHOLD = -200.0


@dataclass
class CTSlice:
    """One 2-D axial slice and what is known about where it came from.

    Example:
        >>> s = CTSlice(np.zeros((4, 4), np.float32), "uint8", "a.png", "png")
        >>> s.shape
        (4, 4)
    """

    pixels: np.ndarray
    intensity: str
    path: str
    source_format: str
    frame: int = 0  # position within the file (NIfTI slices); 0 for one-slice files
    slice_index: int | None = None  # position within its volume or DICOM series
    patient_id: str | None = None
    study_uid: str | None = None
    series_uid: str | None = None
    instance_number: int | None = None
    slice_location: float | None = None
    pixel_spacing: tuple[float, float] | None = None
    position_z: float | None = None  # ImagePositionPatient[2], for ordering a series
    sha256: str | None = None
    colour_share: float = 0.0  # share of strongly coloured pixels before grey conversion (not CT if high)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.pixels.shape)  # type: ignore[return-value]

    @property
    def name(self) -> str:
        """A short file-system-safe name for outputs derived from this slice."""
        stem = Path(self.path).name
        for suffix in (".nii.gz", *RASTER_SUFFIXES, *DICOM_SUFFIXES, ".nii"):
            if stem.lower().endswith(suffix):
                stem = stem[: -len(suffix)]
                break
        return f"{stem}_z{self.frame:03d}" if self.source_format == "nifti" else stem


@dataclass
class ReadFailure:
    """A file that could not be read, and why."""

    path: str
    reason: str


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_kind(path: str | os.PathLike) -> str | None:
    """``"raster"``, ``"dicom"``, ``"nifti"`` or ``None`` for files that are not images by name."""
    name = str(path).lower()
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    suffix = os.path.splitext(name)[1]
    if suffix in RASTER_SUFFIXES:
        return "raster"
    if suffix in DICOM_SUFFIXES:
        return "dicom"
    if suffix == "" and _has_dicom_preamble(path):
        return "dicom"
    return None


def _has_dicom_preamble(path: str | os.PathLike) -> bool:
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def classify_intensity(pixels: np.ndarray) -> str:
    """Decide how raw values map to [0, 1] (see the module docstring)."""
    if pixels.dtype == np.uint8:
        return "uint8"
    finite = pixels[np.isfinite(pixels)] if pixels.dtype.kind == "f" else pixels
    if finite.size == 0:
        return "minmax"
    low, high = float(finite.min()), float(finite.max())
    if pixels.dtype.kind in "if" and low < HU_DETECTION_THRESHOLD:
        return "hu"
    if pixels.dtype.kind == "f" and low >= 0.0 and high <= 1.0:
        return "unit"
    return "minmax"


def read_raster(path: str) -> CTSlice:
    """Read a PNG, JPEG, BMP or TIFF slice; colour is converted to grey."""
    _check_raster_size(path)
    pixels = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if pixels is None:
        raise ReadError(path, "not a decodable image (corrupt, truncated or not the format its name says)")
    colour = 0.0
    if pixels.ndim == 3:
        channels = pixels.shape[2]
        if channels in (3, 4) and pixels.dtype == np.uint8:
            from .quality import colour_share

            colour = colour_share(pixels)
        if channels in (1, 2):  # grey, or grey + alpha
            pixels = pixels[:, :, 0]
        elif channels in (3, 4):
            code = cv2.COLOR_BGRA2GRAY if channels == 4 else cv2.COLOR_BGR2GRAY
            pixels = cv2.cvtColor(pixels, code)
        else:
            raise ReadError(path, f"unsupported number of channels ({channels})")
    if pixels.ndim != 2:
        raise ReadError(path, f"expected a 2-D image, got shape {pixels.shape}")
    if pixels.dtype.kind == "f":
        pixels = _replace_non_finite(pixels)
    _check_usable(path, pixels)
    suffix = os.path.splitext(path.lower())[1]
    return CTSlice(pixels=pixels, intensity=classify_intensity(pixels), path=path,
                   source_format=RASTER_SUFFIXES.get(suffix, "raster"), colour_share=colour)


def _check_raster_size(path: str) -> None:
    """Refuse huge images from the header alone, before any pixel is allocated."""
    import PIL.Image  # reads only the header here

    PIL.Image.MAX_IMAGE_PIXELS = None  # we apply our own limit below, without decoding
    try:
        with PIL.Image.open(path) as image:
            width, height = image.size
    except Exception:
        return  # not something Pillow understands; cv2 decides below
    if width * height > MAX_PIXELS:
        raise ReadError(path, f"image is {width}x{height}, above the limit of {MAX_PIXELS} pixels")


def _replace_non_finite(pixels: np.ndarray) -> np.ndarray:
    finite = np.isfinite(pixels)
    if finite.all():
        return pixels
    if not finite.any():
        return pixels  # caught by _check_usable
    pixels = pixels.copy()
    pixels[~finite] = float(pixels[finite].min())
    return pixels


def _check_usable(path: str, pixels: np.ndarray, allow_constant: bool = False) -> None:
    if min(pixels.shape) < 8:
        raise ReadError(path, f"image is {pixels.shape[1]}x{pixels.shape[0]} pixels, too small to be a CT slice")
    if pixels.dtype.kind == "f" and not np.isfinite(pixels).any():
        raise ReadError(path, "image holds no finite values")
    if not allow_constant and pixels.min() == pixels.max():
        raise ReadError(path, f"image is constant (every pixel is {pixels.flat[0]}), nothing to segment")


def _pydicom():
    """pydicom, told not to warn about values that de-identified archives often break (UIDs)."""
    import pydicom

    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    return pydicom


def _dicom_text(dataset, keyword: str) -> str | None:
    value = dataset.get(keyword)
    if value is None or str(value).strip() == "":
        return None
    return str(value).strip()


def _dicom_float(dataset, keyword: str) -> float | None:
    try:
        value = dataset.get(keyword)
        return None if value in (None, "") else float(value)
    except (TypeError, ValueError):
        return None


def read_dicom(path: str) -> CTSlice:
    """Read one DICOM file as Hounsfield units (RescaleSlope/Intercept applied)."""
    pydicom = _pydicom()
    from pydicom.errors import InvalidDicomError

    try:
        dataset = pydicom.dcmread(path)
    except InvalidDicomError:
        raise ReadError(path, "not a DICOM file") from None
    except Exception as error:  # pydicom raises many kinds on truncated files
        raise ReadError(path, f"unreadable DICOM ({_short(error)})") from None
    if "PixelData" not in dataset:
        raise ReadError(path, "DICOM file has no pixel data (not an image)")
    rows, columns = int(dataset.get("Rows", 0)), int(dataset.get("Columns", 0))
    if rows * columns > MAX_PIXELS:
        raise ReadError(path, f"image is {columns}x{rows}, above the limit of {MAX_PIXELS} pixels")
    try:
        raw = dataset.pixel_array
    except Exception as error:
        raise ReadError(path, f"cannot decode DICOM pixel data ({_short(error)})") from None
    if raw.ndim == 3 and int(dataset.get("NumberOfFrames", 1) or 1) > 1:
        raise ReadError(path, "multi-frame DICOM is not supported; export single slices")
    if raw.ndim == 3:  # colour (secondary capture)
        raw = cv2.cvtColor(raw.astype(np.uint8), cv2.COLOR_RGB2GRAY)
    pixels = raw.astype(np.float32)
    intensity = "minmax"
    if "RescaleSlope" in dataset or "RescaleIntercept" in dataset or dataset.get("Modality") == "CT":
        slope = _dicom_float(dataset, "RescaleSlope") or 1.0
        intercept = _dicom_float(dataset, "RescaleIntercept") or 0.0
        pixels = pixels * slope + intercept
        intensity = "hu"
    _check_usable(path, pixels)
    spacing = dataset.get("PixelSpacing")
    instance = dataset.get("InstanceNumber")
    return CTSlice(
        pixels=pixels, intensity=intensity, path=path, source_format="dicom",
        patient_id=_dicom_text(dataset, "PatientID"),
        study_uid=_dicom_text(dataset, "StudyInstanceUID"),
        series_uid=_dicom_text(dataset, "SeriesInstanceUID"),
        instance_number=int(instance) if instance not in (None, "") else None,
        slice_location=_dicom_float(dataset, "SliceLocation"),
        pixel_spacing=(float(spacing[0]), float(spacing[1])) if spacing else None,
        position_z=_dicom_position_z(dataset),
    )


def _dicom_position_z(dataset) -> float | None:
    position = dataset.get("ImagePositionPatient")
    try:
        return float(position[2]) if position is not None and len(position) == 3 else None
    except (TypeError, ValueError):
        return None


def read_nifti(path: str) -> list[CTSlice]:
    """Read a NIfTI volume; every axial slice (last axis) becomes one :class:`CTSlice`."""
    import nibabel

    try:
        image = nibabel.load(path)
        shape = image.shape
        if len(shape) == 4 and shape[3] == 1:
            shape = shape[:3]
        if len(shape) not in (2, 3):
            raise ReadError(path, f"expected a 3-D volume, got shape {image.shape}")
        if shape[0] * shape[1] > MAX_PIXELS:
            raise ReadError(path, f"slices are {shape[0]}x{shape[1]}, above the limit of {MAX_PIXELS} pixels")
        volume = np.asarray(image.dataobj, dtype=np.float32).reshape(shape)
        zooms = image.header.get_zooms()
    except ReadError:
        raise
    except Exception as error:
        raise ReadError(path, f"unreadable NIfTI ({_short(error)})") from None
    if volume.ndim == 2:
        volume = volume[:, :, None]
    volume = _replace_non_finite(volume)
    intensity = classify_intensity(volume)
    if intensity in ("minmax", "unit") and volume.min() >= -1024 and volume.max() > 255:
        intensity = "hu"  # CT volumes stored without the -1024 offset still are HU-like
    slices = []
    for z in range(volume.shape[2]):
        # NIfTI stores (x, y); transpose so rows run anterior-posterior like DICOM display
        pixels = np.ascontiguousarray(volume[:, :, z].T)
        _check_usable(path, pixels, allow_constant=True)  # blank slices belong to the volume too
        slices.append(CTSlice(pixels=pixels, intensity=intensity, path=path, source_format="nifti",
                              frame=z, slice_index=z,
                              pixel_spacing=(float(zooms[1]), float(zooms[0]))))
    return slices


def read_file(path: str | os.PathLike) -> list[CTSlice]:
    """Read any supported file; returns its slices (one for 2-D files).

    Raises :class:`ReadError` with a one-line reason for anything that is not a usable image.

    Example:
        >>> read_file("missing.png")
        Traceback (most recent call last):
        lungcbir.errors.ReadError: missing.png: file does not exist
    """
    path = str(path)
    if not os.path.lexists(path):
        raise ReadError(path, "file does not exist")
    try:
        os.stat(path)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise ReadError(path, "symbolic link loop") from None
        raise ReadError(path, "broken symbolic link") from None
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        raise ReadError(printable(path), "file name is not valid UTF-8; rename the file") from None
    if os.path.isdir(path):
        raise ReadError(path, "is a folder, not a file")
    if not os.access(path, os.R_OK):
        raise ReadError(path, "permission denied")
    if os.path.getsize(path) == 0:
        raise ReadError(path, "file is empty")
    kind = file_kind(path)
    if kind is None:
        raise ReadError(path, "not a supported image type (PNG, JPEG, BMP, TIFF, DICOM, NIfTI)")
    slices = {"raster": lambda: [read_raster(path)], "dicom": lambda: [read_dicom(path)],
              "nifti": lambda: read_nifti(path)}[kind]()
    digest = file_sha256(path)
    for item in slices:
        item.sha256 = digest
    return slices


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """A ground-truth mask file (PNG/TIFF/...) as a boolean array; empty masks are fine."""
    path = str(path)
    pixels = cv2.imread(path, cv2.IMREAD_UNCHANGED) if os.path.isfile(path) else None
    if pixels is None:
        raise ReadError(path, "mask is missing or not a decodable image")
    if pixels.ndim == 3:
        pixels = pixels[..., 0]
    return pixels > 0


def find_image_files(paths: Iterable[str | os.PathLike], exclude: Iterable[str] = ()) -> Iterator[str]:
    """Walk files and folders recursively, yielding image files by name, sorted, each once.

    Files that are not images by name (README, CSV, ...) are passed over quietly.
    ``exclude`` holds glob patterns matched against the full path and the file name.
    """
    patterns = list(exclude)
    seen: set[str] = set()

    def excluded(path: str) -> bool:
        return any(fnmatch(path, p) or fnmatch(os.path.basename(path), p) for p in patterns)

    for root in paths:
        root = str(root)
        if os.path.isdir(root):
            found = []
            for folder, subfolders, files in os.walk(root, followlinks=False):
                subfolders[:] = sorted(d for d in subfolders if not excluded(os.path.join(folder, d)))
                found.extend(os.path.join(folder, f) for f in files)
            candidates = sorted(found)
        else:
            candidates = [root]  # named explicitly: read it, and fail loudly if it is not an image
        for path in candidates:
            if path in seen or excluded(path):
                continue
            if os.path.isdir(root) and file_kind(path) is None:
                continue
            seen.add(path)
            yield path


def dicom_series_positions(paths: Iterable[str]) -> dict[str, int]:
    """Position of each DICOM file within its series (0 = most superior), from headers only.

    Files are grouped by folder and SeriesInstanceUID and ordered by ImagePositionPatient
    (then SliceLocation, then InstanceNumber), whatever their file names.
    """
    pydicom = _pydicom()
    series: dict[tuple[str, str], list[tuple[tuple, str]]] = defaultdict(list)
    for path in paths:
        if file_kind(path) != "dicom":
            continue
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:
            continue  # reported when the file itself is read
        uid = _dicom_text(header, "SeriesInstanceUID")
        if uid is None:
            continue
        position = _dicom_position_z(header)
        if position is None:
            position = _dicom_float(header, "SliceLocation")
        instance = header.get("InstanceNumber")
        key = (0, -position) if position is not None else (1, int(instance or 0))
        series[(os.path.dirname(path), uid)].append((key, path))
    positions = {}
    for members in series.values():
        for index, (_, path) in enumerate(sorted(members)):
            positions[path] = index
    return positions


def printable(path: str) -> str:
    """A path safe to print and store even when its bytes are not valid UTF-8."""
    return os.fsencode(path).decode("utf-8", "replace")


def _short(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:200]
