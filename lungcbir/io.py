"""Readers: turn PNG/JPEG/BMP/TIFF/DICOM/NIfTI files into :class:`CTSlice` objects.

Every reader returns raw pixel values plus how to interpret them (``intensity``); the
mapping to the network's [0, 1] input lives in :mod:`lungcbir.preprocess`.

Intensity kinds (:class:`Intensity`, a ``str`` enum whose values are what is stored):

* ``"hu"``: Hounsfield units (DICOM after RescaleSlope/Intercept, NIfTI, signed or float TIFF
  whose values go below -200);
* ``"uint8"``: 8-bit exports, scaled by 1/255;
* ``"unit"``: float images already in [0, 1];
* ``"minmax"``: anything else (16-bit unsigned PNG/TIFF, odd float ranges), min-max scaled.

Bad input: every file is read once into memory (at most :data:`MAX_FILE_BYTES`), hashed, and
decoded from those same bytes; sizes are checked from the header before anything is decoded
(:data:`MAX_PIXELS` per slice, :func:`voxel_limit` per volume), and a volume is decoded one
plane at a time (never whole, so memory holds what is returned); a raster file is decoded only
if its content is PNG, JPEG, BMP or TIFF; anything that is not a regular file (a named pipe,
a device) is refused without being opened for a blocking read; and whatever the decoding
libraries print about a broken file is silenced, so each failure is one :class:`ReadError`.
"""

from __future__ import annotations

import errno
import hashlib
import io
import math
import os
import stat
import struct
import zlib
from collections import defaultdict
from dataclasses import dataclass
from enum import Enum
from fnmatch import fnmatch
from pathlib import Path
from typing import Iterable, Iterator, Sequence, cast

import cv2
import numpy as np

from . import config
from .errors import LungCBIRError, ReadError

RASTER_SUFFIXES = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".bmp": "bmp",
                   ".tif": "tiff", ".tiff": "tiff"}  # suffix: SourceFormat value
DICOM_SUFFIXES = {".dcm", ".dicom", ".ima"}
NIFTI_SUFFIXES = (".nii", ".nii.gz")

#: Images with more pixels than this are refused before their pixels are decoded.
MAX_PIXELS = 8192 * 8192

#: Files larger than this are refused before they are read. Every file is read into memory
#: once (so that its hash and its pixels come from the same bytes); 1 GiB holds any single
#: slice within MAX_PIXELS and an uncompressed chest volume within the default voxel limit.
MAX_FILE_BYTES = 1 << 30

#: The voxel limit of volumes (:data:`lungcbir.config.DEFAULT_MAX_VOXELS`); change it per call
#: (``max_voxels``) or with the environment variable named by MAX_VOXELS_ENV.
DEFAULT_MAX_VOXELS = config.DEFAULT_MAX_VOXELS
MAX_VOXELS_ENV = config.MAX_VOXELS_ENV

#: Values below this in a signed or float image mean the image is in Hounsfield units.
HU_DETECTION_THRESHOLD = -200.0


class Intensity(str, Enum):
    """How a slice's raw values map to [0, 1] (see the module docstring); equal to its value,
    so ``Intensity.HU == "hu"`` and JSON or database text stays the same string."""

    HU = "hu"
    UINT8 = "uint8"
    UNIT = "unit"
    MINMAX = "minmax"

    def __str__(self) -> str:
        return self.value


class SourceFormat(str, Enum):
    """What a slice was read from (:attr:`CTSlice.source_format`, stored as its value). A new
    reader adds its value here (a reader defined outside the package may use plain text);
    slices made in memory are ``ARRAY``."""

    PNG = "png"
    JPEG = "jpeg"
    BMP = "bmp"
    TIFF = "tiff"
    RASTER = "raster"  # a raster whose suffix names none of the four (read by content)
    DICOM = "dicom"
    NIFTI = "nifti"
    ARRAY = "array"

    def __str__(self) -> str:
        return self.value


@dataclass
class CTSlice:
    """One 2-D axial slice and what is known about where it came from.

    Example:
        >>> s = CTSlice(np.zeros((4, 4), np.float32), "uint8", "a.png", "png")
        >>> s.shape
        (4, 4)
    """

    pixels: np.ndarray
    intensity: Intensity
    path: str
    source_format: SourceFormat | str  # str: a format of a reader that adds no SourceFormat value
    frame: int = 0  # position within the file (NIfTI slices); 0 for one-slice files
    frames_in_file: int = 1  # planes of the file it was read from (a volume's depth)
    slice_index: int | None = None  # position within its volume or DICOM series
    patient_id: str | None = None
    study_uid: str | None = None
    series_uid: str | None = None
    sop_uid: str | None = None  # DICOM SOP Instance UID, None when absent or empty
    instance_number: int | None = None
    slice_location: float | None = None
    study_date: str | None = None  # DICOM StudyDate as stored (YYYYMMDD)
    series_description: str | None = None
    pixel_spacing: tuple[float, float] | None = None
    #: ImagePositionPatient along the slice normal (:func:`slice_axis_position`), for ordering a series
    axis_position: float | None = None
    sha256: str | None = None
    colour_share: float = 0.0  # share of strongly coloured pixels before grey conversion (not CT if high)

    def __post_init__(self) -> None:
        # plain strings are accepted (what older code and JSON give); kept as the enums
        self.intensity = Intensity(self.intensity)
        if self.source_format in SourceFormat._value2member_map_:
            self.source_format = SourceFormat(self.source_format)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.pixels.shape)

    @property
    def name(self) -> str:
        """A short file-system-safe name for outputs derived from this slice."""
        stem = Path(self.path).name
        if file_suffix(stem) in supported_suffixes():
            stem = file_stem(stem)
        return f"{stem}_z{self.frame:03d}" if self.source_format == SourceFormat.NIFTI else stem


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


def voxel_limit(max_voxels: int | None = None) -> int:
    """The voxel limit for volumes: ``max_voxels`` if given, else
    :data:`lungcbir.config.DEFAULT_MAX_VOXELS` (the library reads no environment; the program
    passes ``Settings.max_voxels``, from ``LUNGCBIR_MAX_VOXELS``).

    Example:
        >>> voxel_limit(1000), voxel_limit() == config.DEFAULT_MAX_VOXELS
        (1000, True)
    """
    return config.DEFAULT_MAX_VOXELS if max_voxels is None else int(max_voxels)


def _file_type(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "named pipe"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISDIR, "folder")):
        if test(mode):
            return name
    return "special file"


def _open_regular(path: str):
    """Open ``path`` for reading only if it is a regular file, without ever blocking.

    O_NONBLOCK makes opening a named pipe return at once instead of waiting for a writer; the
    type is then checked on the open descriptor, so a file swapped for a pipe is caught too.
    """
    descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(descriptor).st_mode
        if not stat.S_ISREG(mode):
            raise ReadError(path, f"not a regular file ({_file_type(mode)})")
        return os.fdopen(descriptor, "rb")
    except BaseException:
        os.close(descriptor)
        raise


def read_bytes(path: str, max_bytes: int | None = None) -> bytes:
    """The whole content of a regular file, refused when empty or above ``max_bytes`` (:data:`MAX_FILE_BYTES`)."""
    max_bytes = MAX_FILE_BYTES if max_bytes is None else max_bytes
    try:
        handle = _open_regular(path)
    except OSError as error:
        raise ReadError(path, f"cannot open ({error.strerror})") from None
    with handle:
        size = os.fstat(handle.fileno()).st_size
        if size > max_bytes:
            raise ReadError(path, f"file is {size} bytes, above the limit of {max_bytes} bytes")
        parts = [handle.read(size)]
        total = len(parts[0])
        while True:  # a file that grew since fstat: read on, in pieces, up to the limit
            part = handle.read(min(1 << 20, max_bytes + 1 - total))
            if not part:
                break
            parts.append(part)
            total += len(part)
            if total > max_bytes:
                raise ReadError(path, f"file is above the limit of {max_bytes} bytes")
    data = parts[0] if len(parts) == 1 else b"".join(parts)
    if not data:
        raise ReadError(path, "file is empty")
    return data


def file_kind(path: str | os.PathLike) -> str | None:
    """``"raster"``, ``"dicom"``, ``"nifti"`` (the :attr:`Reader.kind` of :func:`reader_for`) or
    ``None`` for files that are not images by name."""
    reader = reader_for(path)
    return reader.kind if reader is not None else None


def _has_dicom_preamble(path: str | os.PathLike) -> bool:
    try:
        with _open_regular(str(path)) as handle:  # never opens a pipe for a blocking read
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except (OSError, ReadError):
        return False


def describe_content(data: bytes) -> str:
    """What a file's first bytes look like, for messages about files whose name lies.

    Example:
        >>> describe_content(b"#?RADIANCE\\nFORMAT=32-bit_rle_rgbe\\n")
        'Radiance HDR'
    """
    head = data[:16]
    signatures = [(b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"II*\0", "TIFF"), (b"MM\0*", "TIFF"),
                  (b"II+\0", "BigTIFF"), (b"MM\0+", "BigTIFF"), (b"BM", "BMP"), (b"#?RADIANCE", "Radiance HDR"),
                  (b"#?RGBE", "Radiance HDR"), (b"GIF8", "GIF"), (b"\x1f\x8b", "gzip-compressed data"),
                  (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"), (b"\xff\x4f\xff\x51", "JPEG 2000"),
                  (b"v/1\x01", "OpenEXR"), (b"%PDF", "PDF"), (b"PK\x03\x04", "ZIP"), (b"\x01\xda", "SGI image")]
    for signature, name in signatures:
        if head.startswith(signature):
            return name
    if data[128:132] == b"DICM":
        return "DICOM"
    if head[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    if len(head) >= 2 and head[0] == ord("P") and chr(head[1]) in "1234567":
        return "PNM"
    if len(head) >= 4 and _NIFTI_HEADER_BYTES.count(struct.unpack("<i", head[:4])[0]) + \
            _NIFTI_HEADER_BYTES.count(struct.unpack(">i", head[:4])[0]):
        return "NIfTI"
    sample = data[:512]
    if sample and all(32 <= byte < 127 or byte in b"\t\r\n" for byte in sample):
        return "text"
    return "unknown binary data"


_RASTER_SIGNATURES = {"png": (b"\x89PNG\r\n\x1a\n",), "jpeg": (b"\xff\xd8\xff",), "bmp": (b"BM",),
                      "tiff": (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+")}


def _raster_format(data: bytes) -> str | None:
    """The raster format the content really is (png, jpeg, bmp, tiff), else None."""
    for name, signatures in _RASTER_SIGNATURES.items():
        if data.startswith(signatures):
            return name
    return None


def _raster_size(data: bytes, kind: str) -> tuple[int, int] | None:
    """(width, height) from the header of a PNG/JPEG/BMP/TIFF, without decoding; None if unreadable."""
    try:
        if kind == "png":
            if data[12:16] != b"IHDR":
                return None
            return struct.unpack(">II", data[16:24])
        if kind == "bmp":
            header_size = struct.unpack("<I", data[14:18])[0]
            if header_size == 12:  # OS/2 BITMAPCOREHEADER
                return struct.unpack("<HH", data[18:22])
            width, height = struct.unpack("<ii", data[18:26])
            return abs(width), abs(height)  # a negative height means top-down rows
        if kind == "jpeg":
            return _jpeg_size(data)
        return _tiff_size(data)
    except (struct.error, IndexError, ValueError):
        return None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """Walk the JPEG markers to the first frame header (SOFn)."""
    position = 2
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            return None
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # markers without a length
            position += 2
            continue
        length = struct.unpack(">H", data[position + 2:position + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF):
            height, width = struct.unpack(">HH", data[position + 5:position + 9])
            return width, height
        if marker == 0xDA or length < 2:  # scan data before any frame header: broken
            return None
        position += 2 + length
    return None


def _tiff_size(data: bytes) -> tuple[int, int] | None:
    """ImageWidth and ImageLength of the first IFD (the page OpenCV decodes), classic or BigTIFF."""
    order = "<" if data[:2] == b"II" else ">"
    big = struct.unpack(order + "H", data[2:4])[0] == 43
    if big:
        offset = struct.unpack(order + "Q", data[8:16])[0]
        count = struct.unpack(order + "Q", data[offset:offset + 8])[0]
        start, entry_size = offset + 8, 20
    else:
        offset = struct.unpack(order + "I", data[4:8])[0]
        count = struct.unpack(order + "H", data[offset:offset + 2])[0]
        start, entry_size = offset + 2, 12
    found = {}
    for number in range(min(count, 4096)):
        entry = data[start + number * entry_size:start + (number + 1) * entry_size]
        tag, kind = struct.unpack(order + "HH", entry[:4])
        if tag not in (256, 257):
            continue
        value = entry[12:] if big else entry[8:]
        codes = {3: "H", 4: "I", 16: "Q"}
        if kind not in codes:
            return None
        found[tag] = struct.unpack(order + codes[kind], value[:struct.calcsize(codes[kind])])[0]
    if 256 not in found or 257 not in found:
        return None
    return found[256], found[257]


def classify_intensity(pixels: np.ndarray) -> Intensity:
    """Decide how raw values map to [0, 1] (see the module docstring)."""
    if pixels.dtype == np.uint8:
        return Intensity.UINT8
    finite = pixels[np.isfinite(pixels)] if pixels.dtype.kind == "f" else pixels
    if finite.size == 0:
        return Intensity.MINMAX
    return _classify_range(pixels.dtype.kind, float(finite.min()), float(finite.max()))


def _classify_range(kind: str, low: float, high: float) -> Intensity:
    """:func:`classify_intensity` of values of numpy type ``kind`` whose finite range is [low, high]."""
    if kind in "if" and low < HU_DETECTION_THRESHOLD:
        return Intensity.HU
    if kind == "f" and low >= 0.0 and high <= 1.0:
        return Intensity.UNIT
    return Intensity.MINMAX


def read_raster(path: str, data: bytes | None = None) -> CTSlice:
    """Read a PNG, JPEG, BMP or TIFF slice from ``data`` (the file's bytes); colour becomes grey.

    The content must be one of those four formats (whatever the suffix says among them), and
    its header's size within :data:`MAX_PIXELS`, before OpenCV decodes anything.
    """
    data = read_bytes(path) if data is None else data
    claimed = RASTER_SUFFIXES.get(file_suffix(path), SourceFormat.RASTER.value)
    kind = _raster_format(data)
    if kind is None:
        raise ReadError(path, f"not a decodable image (not a {claimed.upper()} file; "
                              f"the content looks like {describe_content(data)})")
    size = _raster_size(data, kind)
    if size is None:
        raise ReadError(path, f"not a decodable image (corrupt or truncated {kind.upper()} header)")
    width, height = size
    if width * height > MAX_PIXELS:
        raise ReadError(path, f"image is {width}x{height}, above the limit of {MAX_PIXELS} pixels")
    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
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
            pixels = _bgr_to_grey(pixels)
        else:
            raise ReadError(path, f"unsupported number of channels ({channels})")
    if pixels.ndim != 2:
        raise ReadError(path, f"expected a 2-D image, got shape {pixels.shape}")
    if pixels.dtype.kind == "f":
        pixels = _replace_non_finite(pixels)
    _check_usable(path, pixels)
    return CTSlice(pixels=pixels, intensity=classify_intensity(pixels), path=path, source_format=claimed,
                   colour_share=colour)


def _bgr_to_grey(pixels: np.ndarray) -> np.ndarray:
    """BGR(A) to grey with OpenCV's weights; OpenCV itself only takes 8/16-bit unsigned and float32."""
    if pixels.dtype in (np.uint8, np.uint16, np.float32):
        return cv2.cvtColor(pixels, cv2.COLOR_BGRA2GRAY if pixels.shape[2] == 4 else cv2.COLOR_BGR2GRAY)
    blue, green, red = (pixels[:, :, i].astype(np.float64) for i in range(3))
    grey = 0.114 * blue + 0.587 * green + 0.299 * red
    if pixels.dtype.kind == "f":
        return grey.astype(pixels.dtype)
    info = np.iinfo(pixels.dtype)  # a weighted mean stays within the type's range; clip guards rounding
    return np.clip(np.rint(grey), info.min, info.max).astype(pixels.dtype)


def _replace_non_finite(pixels: np.ndarray) -> np.ndarray:
    finite = np.isfinite(pixels)
    if finite.all():
        return pixels
    if not finite.any():
        return pixels  # caught by _check_usable
    pixels = pixels.copy()
    pixels[~finite] = float(pixels[finite].min())
    return pixels


def _check_usable(path: str, pixels: np.ndarray) -> None:
    if min(pixels.shape) < 8:
        raise ReadError(path, f"image is {pixels.shape[1]}x{pixels.shape[0]} pixels, too small to be a CT slice")
    if pixels.dtype.kind == "f" and not np.isfinite(pixels).any():
        raise ReadError(path, "image holds no finite values")
    if pixels.min() == pixels.max():
        raise ReadError(path, f"image is constant (every pixel is {pixels.flat[0]}), nothing to segment")


def _pydicom():
    """pydicom, imported when a DICOM file is first read (its settings are the embedder's:
    values that de-identified archives break, such as UUID-text UIDs, are read either way)."""
    import pydicom

    return pydicom


def _dicom_value(dataset, keyword: str):
    """A tag's value, or None when it is missing or malformed (an optional tag never stops a read)."""
    try:
        return dataset.get(keyword)
    except Exception:  # pydicom converts values lazily and raises many kinds on bad ones
        return None


def _dicom_text(dataset, keyword: str) -> str | None:
    value = _dicom_value(dataset, keyword)
    if value is None or str(value).strip() == "":
        return None
    return str(value).strip()


def _dicom_float(dataset, keyword: str) -> float | None:
    value = _dicom_value(dataset, keyword)
    try:
        return None if value in (None, "") else float(value)
    except (TypeError, ValueError, OverflowError):
        return None


def _dicom_int(dataset, keyword: str) -> int | None:
    value = _dicom_value(dataset, keyword)
    try:
        return None if value in (None, "") else int(value)
    except (TypeError, ValueError, OverflowError):
        return None


def _dicom_spacing(dataset) -> tuple[float, float] | None:
    value = _dicom_value(dataset, "PixelSpacing")
    try:
        return (float(value[0]), float(value[1])) if value else None
    except (TypeError, ValueError, IndexError, OverflowError):
        return None  # "x\\y" and the like: spacing unknown, the image is still usable


def read_dicom(path: str, data: bytes | None = None) -> CTSlice:
    """Read one DICOM file from ``data`` (its bytes) as Hounsfield units (RescaleSlope/Intercept applied).

    Multi-frame files and images above :data:`MAX_PIXELS` are refused from the header, before
    the pixel data is decoded; malformed optional tags (InstanceNumber, PixelSpacing, ...) are
    treated as unknown.
    """
    data = read_bytes(path) if data is None else data
    pydicom = _pydicom()
    from pydicom.errors import InvalidDicomError

    try:
        dataset = pydicom.dcmread(io.BytesIO(data))
    except InvalidDicomError:
        raise ReadError(path, "not a DICOM file") from None
    except Exception as error:  # pydicom raises many kinds on truncated files
        raise ReadError(path, f"unreadable DICOM ({_short(error)})") from None
    if "PixelData" not in dataset:
        raise ReadError(path, "DICOM file has no pixel data (not an image)")
    frames = _dicom_int(dataset, "NumberOfFrames") or 1
    if frames > 1:
        raise ReadError(path, f"multi-frame DICOM ({frames} frames) is not supported; export single slices")
    rows, columns = _dicom_int(dataset, "Rows") or 0, _dicom_int(dataset, "Columns") or 0
    if rows * columns > MAX_PIXELS:
        raise ReadError(path, f"image is {columns}x{rows}, above the limit of {MAX_PIXELS} pixels")
    _check_native_pixel_length(path, dataset, rows, columns)
    try:
        raw = dataset.pixel_array
    except Exception as error:
        raise ReadError(path, f"cannot decode DICOM pixel data ({_short(error)})") from None
    if raw.ndim == 3 and raw.shape[2] == 3:  # colour (secondary capture)
        raw = cv2.cvtColor(raw.astype(np.uint8), cv2.COLOR_RGB2GRAY)
    if raw.ndim != 2:
        raise ReadError(path, f"unsupported DICOM pixel layout (shape {raw.shape}); export single grey slices")
    pixels = raw.astype(np.float32)
    intensity = Intensity.MINMAX
    if "RescaleSlope" in dataset or "RescaleIntercept" in dataset or _dicom_value(dataset, "Modality") == "CT":
        slope = _dicom_float(dataset, "RescaleSlope") or 1.0
        intercept = _dicom_float(dataset, "RescaleIntercept") or 0.0
        _check_rescale(path, slope, intercept, float(raw.min()), float(raw.max()))
        pixels = pixels * slope + intercept
        intensity = Intensity.HU
    _check_usable(path, pixels)
    return CTSlice(
        pixels=pixels, intensity=intensity, path=path, source_format=SourceFormat.DICOM,
        patient_id=_dicom_text(dataset, "PatientID"),
        study_uid=_dicom_text(dataset, "StudyInstanceUID"),
        series_uid=_dicom_text(dataset, "SeriesInstanceUID"),
        sop_uid=_dicom_text(dataset, "SOPInstanceUID"),
        instance_number=_dicom_int(dataset, "InstanceNumber"),
        slice_location=_dicom_float(dataset, "SliceLocation"),
        study_date=_dicom_text(dataset, "StudyDate"),
        series_description=_dicom_text(dataset, "SeriesDescription"),
        pixel_spacing=_dicom_spacing(dataset),
        axis_position=_dicom_axis_position(dataset),
    )


#: Rescaled DICOM values beyond this magnitude are not CT numbers (Hounsfield units run from
#: -1024 to a few thousand, about 30 000 on extended-range scanners).
MAX_RESCALED_MAGNITUDE = 1e6


def _check_rescale(path: str, slope: float, intercept: float, low: float, high: float) -> None:
    """Refuse a RescaleSlope/Intercept that is not a number, or that maps the stored values
    [low, high] beyond :data:`MAX_RESCALED_MAGNITUDE` (checked on the two ends, in Python
    floats, so a slope of 1e308 fails here instead of overflowing the pixels)."""
    for name, value in (("RescaleSlope", slope), ("RescaleIntercept", intercept)):
        if not math.isfinite(value):
            raise ReadError(path, f"{name} is {value}, not a number")
    if max(abs(low * slope + intercept), abs(high * slope + intercept)) > MAX_RESCALED_MAGNITUDE:
        raise ReadError(path, f"RescaleSlope {slope:g} and RescaleIntercept {intercept:g} give values of "
                              f"magnitude above {MAX_RESCALED_MAGNITUDE:g}, not CT numbers")


def _check_native_pixel_length(path: str, dataset, rows: int, columns: int) -> None:
    """Refuse uncompressed pixel data whose length is not what Rows x Columns say: pydicom
    would reshape the bytes to the header's size (a 512 x 512 image read as 9 x 512, say).
    Compressed pixel data carries its own size, which the decoder checks."""
    syntax = dataset.file_meta.get("TransferSyntaxUID") if hasattr(dataset, "file_meta") else None
    if syntax is not None and syntax.is_encapsulated:
        return
    samples = _dicom_int(dataset, "SamplesPerPixel") or 1
    bits = _dicom_int(dataset, "BitsAllocated") or 0
    values = rows * columns * samples
    expected = -(-values // 8) if bits == 1 else values * -(-bits // 8)
    actual = len(dataset.PixelData)
    if actual not in (expected, expected + 1):  # + 1: the pad byte of an odd length
        raise ReadError(path, f"DICOM pixel data is {actual} bytes, but Rows {rows} x Columns {columns} x "
                              f"{samples} sample(s) of {bits} bits take {expected}")


def _dicom_axis_position(dataset) -> float | None:
    return slice_axis_position(_dicom_value(dataset, "ImagePositionPatient"),
                               _dicom_value(dataset, "ImageOrientationPatient"))


def slice_axis_position(position: object, orientation: object = None) -> float | None:
    """Where a slice lies along its series' axis: ImagePositionPatient projected on the slice
    normal (the row direction x the column direction of ImageOrientationPatient), so tilted
    and oblique series sort by where their slices are, not by their corners' z. For axial
    slices this is z (larger: superior). Without a usable orientation, the position's z;
    None when the position is missing or not three finite numbers.

    Example:
        >>> slice_axis_position([0, 0, -52.5], [1, 0, 0, 0, 1, 0])
        -52.5
        >>> round(slice_axis_position([0, -100, 40], [1, 0, 0, 0, 0.866, 0.5]), 3)  # 30 degrees of gantry tilt
        84.642
        >>> slice_axis_position(["1", "x", "3"], None) is None
        True
    """
    point = _finite_numbers(position, 3)
    if point is None:
        return None
    cosines = _finite_numbers(orientation, 6)
    normal = np.cross(cosines[:3], cosines[3:]) if cosines is not None else np.zeros(3)
    length = float(np.linalg.norm(normal))
    if length < 1e-6:  # no orientation, or not two directions
        return float(point[2])
    return float(point @ normal / length)


def _finite_numbers(values: object, count: int) -> np.ndarray | None:
    try:
        numbers = np.array([float(value) for value in values], dtype=np.float64)  # type: ignore[attr-defined]
    except (TypeError, ValueError, OverflowError):
        return None
    return numbers if len(numbers) == count and np.isfinite(numbers).all() else None


#: Bytes of a NIfTI-1 and a NIfTI-2 header; the first field (sizeof_hdr) says which.
_NIFTI_HEADER_BYTES = (348, 540)


def _gunzip(path: str, data: bytes, limit: int) -> bytes:
    """At most ``limit`` bytes of gzip-compressed ``data`` (several members allowed).

    Decompression stops at the limit, so a small file of zeros cannot expand past what its
    header was allowed to claim.
    """
    parts, total = [], 0
    while data and total < limit:
        decompressor = zlib.decompressobj(wbits=31)
        try:
            part = decompressor.decompress(data, limit - total)
        except zlib.error as error:
            raise ReadError(path, f"unreadable NIfTI (not valid gzip data: {_short(error)})") from None
        parts.append(part)
        total += len(part)
        if total >= limit or not decompressor.eof:
            break  # at the limit, or the stream is truncated: what is there is returned
        data = decompressor.unused_data.lstrip(b"\0")  # padding after the last member is allowed
    return b"".join(parts)


def _nifti_layout(path: str, head: bytes) -> tuple[int, tuple[int, ...], int]:
    """(header size, shape, bytes up to the end of the voxel data) from a NIfTI header alone."""
    for order in "<>":
        if len(head) >= 4 and struct.unpack(order + "i", head[:4])[0] in _NIFTI_HEADER_BYTES:
            break
    else:
        raise ReadError(path, f"unreadable NIfTI (no NIfTI header; the content looks like {describe_content(head)})")
    header_bytes = struct.unpack(order + "i", head[:4])[0]
    if len(head) < header_bytes:
        raise ReadError(path, "unreadable NIfTI (truncated header)")
    if header_bytes == 348:
        dims = struct.unpack(order + "8h", head[40:56])
        bitpix = struct.unpack(order + "h", head[72:74])[0]
        offset = struct.unpack(order + "f", head[108:112])[0]
        offset = int(offset) if math.isfinite(offset) else 0
    else:
        bitpix = struct.unpack(order + "h", head[14:16])[0]
        dims = struct.unpack(order + "8q", head[16:80])
        offset = struct.unpack(order + "q", head[168:176])[0]
    count = dims[0]
    if not 1 <= count <= 7 or any(d < 1 for d in dims[1:count + 1]):
        raise ReadError(path, f"unreadable NIfTI (bad dimensions {dims[1:count + 1] if 1 <= count <= 7 else dims})")
    if not 1 <= bitpix <= 128:  # 128 bits: the widest real type (float128); complex types cannot be read anyway
        raise ReadError(path, f"unreadable NIfTI (unsupported {bitpix} bits per voxel)")
    shape = tuple(int(d) for d in dims[1:count + 1])
    voxels = int(np.prod(shape, dtype=object))
    return header_bytes, shape, max(offset, header_bytes + 4) + voxels * -(-bitpix // 8)


#: What :func:`read_file` is given as ``frame`` for the slice a single-slice query of a volume
#: uses: the usable slice nearest the middle.
MIDDLE = "middle"


class _NiftiPlanes:
    """The axial planes of one NIfTI file, decoded one at a time from its bytes.

    nibabel's array proxy reads only the bytes of the plane asked for; a ``.nii.gz`` is
    decompressed as a stream (forward reads continue where the last stopped), so a volume is
    never whole in memory, however much it claims once decompressed. Only the fixed header is
    parsed: extensions are never read.
    """

    def __init__(self, path: str, data: bytes, max_voxels: int | None) -> None:
        import gzip

        import nibabel
        from nibabel.arrayproxy import ArrayProxy

        limit = voxel_limit(max_voxels)
        compressed = path.lower().endswith(".gz")
        if compressed and not data.startswith(b"\x1f\x8b"):
            raise ReadError(path, "unreadable NIfTI (not gzip-compressed; "
                                  f"the content looks like {describe_content(data)})")
        head = _gunzip(path, data, max(_NIFTI_HEADER_BYTES)) if compressed else data[:max(_NIFTI_HEADER_BYTES)]
        header_bytes, shape, needed = _nifti_layout(path, head)
        voxels = int(np.prod(shape, dtype=object))
        if voxels > limit:
            raise ReadError(path, f"volume is {'x'.join(map(str, shape))} = {voxels} voxels, above the limit of "
                                  f"{limit} (set {MAX_VOXELS_ENV} to change it)")
        if needed > MAX_FILE_BYTES:  # a .nii.gz expands to no more than a .nii may hold
            raise ReadError(path, f"volume takes {needed} bytes uncompressed, above the limit of "
                                  f"{MAX_FILE_BYTES} bytes")
        if len(shape) == 4 and shape[3] == 1:
            shape = shape[:3]
        if len(shape) not in (2, 3):
            raise ReadError(path, f"expected a 3-D volume, got shape {shape}")
        if shape[0] * shape[1] > MAX_PIXELS:
            raise ReadError(path, f"slices are {shape[0]}x{shape[1]}, above the limit of {MAX_PIXELS} pixels")
        if min(shape[:2]) < 8:
            raise ReadError(path, f"image is {shape[0]}x{shape[1]} pixels, too small to be a CT slice")
        header_class = nibabel.Nifti1Header if header_bytes == 348 else nibabel.Nifti2Header
        try:
            header = header_class(head[:header_bytes])
            stream = gzip.GzipFile(fileobj=io.BytesIO(data)) if compressed else io.BytesIO(data)
            self.proxy = ArrayProxy(stream, header)
            zooms = header.get_zooms()
        except Exception as error:
            raise ReadError(path, f"unreadable NIfTI ({_short(error)})") from None
        self.path = path
        self.count = shape[2] if len(shape) > 2 else 1
        self.depth_axes = len(self.proxy.shape) - 2  # a (x, y, z, 1) volume has a fourth axis of one
        self.spacing = (float(zooms[1]), float(zooms[0]))

    def plane(self, z: int) -> np.ndarray:
        """Plane ``z`` on its (x, y) grid as float32; values beyond float32 become infinite
        (and are then treated as non-finite)."""
        index = (slice(None), slice(None), z, 0)[:2 + self.depth_axes]
        try:
            values = np.asarray(self.proxy[index])
        except Exception as error:  # truncated data, a broken gzip stream: one line
            raise ReadError(self.path, f"unreadable NIfTI ({_short(error)})") from None
        with np.errstate(over="ignore"):
            return values.astype(np.float32)


@dataclass
class _PlaneRange:
    """The finite range of one plane (None when it has no finite value) and whether it has
    non-finite values."""

    low: float | None
    high: float | None
    non_finite: bool

    @classmethod
    def of(cls, plane: np.ndarray) -> "_PlaneRange":
        finite = np.isfinite(plane)
        if finite.all():
            return cls(float(plane.min()), float(plane.max()), False)
        if not finite.any():
            return cls(None, None, True)
        values = plane[finite]
        return cls(float(values.min()), float(values.max()), True)

    def constant(self, fill: float) -> bool:
        """Whether the plane is one value once its non-finite values are ``fill``."""
        values = {value for value in (self.low, self.high) if value is not None}
        if self.non_finite:
            values.add(fill)
        return len(values) == 1


def read_nifti(path: str, data: bytes | None = None, max_voxels: int | None = None,
               frame: int | str | None = None) -> list[CTSlice]:
    """Read a NIfTI volume from ``data`` (the file's bytes); every axial slice (last axis) that
    is not constant becomes one slice (``frame``: its plane), or only the slice at ``frame``
    (an int, or :data:`MIDDLE`: the usable slice nearest the middle).

    The voxel count is checked against :func:`voxel_limit` from the header, before anything
    is decompressed (``.nii.gz``) or decoded; planes are then decoded one at a time, so memory
    holds the slices returned and one plane. A volume of constant planes only is refused.
    The intensity kind is the volume's (every slice has the same): one pass over all planes
    finds its range, and non-finite values become its finite minimum.
    """
    volume = _NiftiPlanes(path, read_bytes(path) if data is None else data, max_voxels)
    if frame == MIDDLE:
        target: int | None = volume.count // 2
    elif frame is None or isinstance(frame, int):
        target = frame
    else:
        raise ValueError(f"frame must be a number or {MIDDLE!r}, not {frame!r}")
    if target is not None and not 0 <= target < volume.count:
        raise ReadError(path, f"no slice {target} (the volume has {volume.count})")
    ranges, kept = [], {}
    for z in range(volume.count):
        plane = volume.plane(z)
        ranges.append(_PlaneRange.of(plane))
        # a plane with only finite values and one of them is constant whatever the volume holds
        surely_constant = not ranges[-1].non_finite and ranges[-1].low == ranges[-1].high
        if (target is None and not surely_constant) or z == target:
            kept[z] = plane
    lows = [r.low for r in ranges if r.low is not None]
    if not lows:
        raise ReadError(path, "volume holds no finite values")
    low, high = min(lows), max(r.high for r in ranges if r.high is not None)
    usable = [z for z, r in enumerate(ranges) if not r.constant(low)]
    if not usable:
        what = f"volume is constant (every voxel is {low:g})" if low == high else "every slice is constant"
        raise ReadError(path, f"{what}, nothing to segment")
    if target is not None:
        if target not in usable and frame != MIDDLE:
            raise ReadError(path, f"slice {target} is constant, nothing to segment")
        chosen = min(usable, key=lambda z: (abs(z - target), z))
        usable = [chosen]
        if chosen not in kept:
            kept[chosen] = volume.plane(chosen)
    intensity = _classify_range("f", low, high)
    if intensity in (Intensity.MINMAX, Intensity.UNIT) and low >= -1024 and high > 255:
        intensity = Intensity.HU  # CT volumes stored without the -1024 offset still are HU-like
    slices = []
    for z in usable:
        plane = kept.pop(z)
        if ranges[z].non_finite:
            plane[~np.isfinite(plane)] = low
        slices.append(CTSlice(pixels=slice_plane(plane),  # NIfTI stores (x, y); see slice_plane
                              intensity=intensity, path=path, source_format=SourceFormat.NIFTI,
                              frame=z, slice_index=z, pixel_spacing=volume.spacing,
                              frames_in_file=volume.count))
    return slices


# --- the reader registry ----------------------------------------------------------------------
#
# One class per file format: the suffixes it claims, a content check, ``read`` (bytes to
# slices) and the matching mask writer. :data:`READERS` lists them in the order they are asked;
# everything format-specific elsewhere (folder walking, the "supported formats" text of error
# messages, the web upload check, ``segment``'s mask files) is derived from it. A new format
# (MHA, NRRD...) is one new class added to READERS. Sources that are not files have their own
# modules: :mod:`lungcbir.dicomweb` fetches instances from an archive and decodes them with the
# DICOM reader (:func:`decode` with ``kind="dicom"``); :mod:`lungcbir.dicom_seg` writes a DICOM series'
# masks as one DICOM SEG object (``segment --format dicom-seg``), beside the per-format mask
# writers here.


def file_suffix(path: str | os.PathLike) -> str:
    """The lower-case suffix of a file name, ``.nii.gz`` counting as one.

    Example:
        >>> file_suffix("Scan.NII.GZ"), file_suffix("a/b.png"), file_suffix("README")
        ('.nii.gz', '.png', '')
    """
    name = os.path.basename(str(path)).lower()
    return ".nii.gz" if name.endswith(".nii.gz") else os.path.splitext(name)[1]


def file_stem(path: str | os.PathLike) -> str:
    """The file name without :func:`file_suffix`.

    Example:
        >>> file_stem("/x/ID_0001.tif"), file_stem("vol.nii.gz")
        ('ID_0001', 'vol')
    """
    name = os.path.basename(str(path))
    return name[:len(name) - len(file_suffix(name))]


class Reader:
    """One file format: how it is recognised, read, and how masks of its slices are written.

    Subclasses set :attr:`kind` (what :func:`file_kind` answers), :attr:`formats` (names for
    messages), :attr:`suffixes` and :attr:`mask_formats` (the first is the default of
    ``segment``), and implement :meth:`read`.
    """

    kind: str = ""
    formats: tuple[str, ...] = ()
    suffixes: tuple[str, ...] = ()
    #: The :attr:`CTSlice.source_format` values of the slices it makes.
    source_formats: frozenset[str] = frozenset()
    #: Mask outputs this format's slices can be written as; the first is the default.
    mask_formats: tuple[str, ...] = ("png",)
    #: How an input that can be written as a given mask format is called in messages.
    input_description: str = ""

    def claims(self, path: str | os.PathLike) -> bool:
        """Whether this reader takes ``path``, by its name (and, for some formats, a peek at its content)."""
        return file_suffix(path) in self.suffixes

    def content_matches(self, data: bytes) -> bool:
        """Whether ``data`` (a file's first bytes at least) looks like this format."""
        raise NotImplementedError

    def read(self, path: str, data: bytes, max_voxels: int | None = None) -> list[CTSlice]:
        """The slices of a file whose whole content is ``data``; raises :class:`ReadError`."""
        raise NotImplementedError

    def read_frame(self, path: str, data: bytes, frame: int | str, max_voxels: int | None = None) -> CTSlice:
        """The one slice at ``frame`` (an int, or :data:`MIDDLE`: the one nearest the middle).
        The default reads every slice; a volume's reader decodes only what it needs."""
        slices = self.read(path, data, max_voxels)
        if frame == MIDDLE:
            return slices[len(slices) // 2]
        chosen = next((item for item in slices if item.frame == frame), None)
        if chosen is None:
            raise ReadError(path, f"no usable slice {frame} (the file has {len(slices)})")
        return chosen

    def write_masks(self, source: str, slices: Sequence[CTSlice], masks: Sequence[np.ndarray],
                    folder: Path, mask_format: str) -> str:
        """Write the masks of one input's slices into ``folder`` as ``mask_format``; returns what
        was written, for messages. The default: one 0/255 PNG per slice, ``<name>_mask.png``."""
        if mask_format != "png":
            raise ValueError(f"{type(self).__name__} writes no {mask_format} masks")
        targets = [folder / f"{item.name}_mask.png" for item in slices]
        for target, mask in zip(targets, masks):
            if not cv2.imwrite(str(target), mask.astype(np.uint8) * 255):
                raise OSError(f"cannot write {target}")
        return str(targets[0]) if len(targets) == 1 else f"{folder} ({len(targets)} PNG masks)"


class RasterReader(Reader):
    """PNG, JPEG, BMP and TIFF slices (:func:`read_raster`)."""

    kind = "raster"
    formats = ("PNG", "JPEG", "BMP", "TIFF")
    suffixes = tuple(RASTER_SUFFIXES)
    source_formats = frozenset({*RASTER_SUFFIXES.values(), SourceFormat.RASTER.value})

    def content_matches(self, data: bytes) -> bool:
        return _raster_format(data) is not None

    def read(self, path: str, data: bytes, max_voxels: int | None = None) -> list[CTSlice]:
        return [read_raster(path, data)]


class DicomReader(Reader):
    """Single-frame DICOM files (:func:`read_dicom`); a file without a suffix is taken when it
    has the DICOM preamble."""

    kind = "dicom"
    formats = ("DICOM",)
    suffixes = tuple(sorted(DICOM_SUFFIXES))
    source_formats = frozenset({SourceFormat.DICOM.value})

    def claims(self, path: str | os.PathLike) -> bool:
        suffix = file_suffix(path)
        return suffix in self.suffixes or (suffix == "" and _has_dicom_preamble(path))

    def content_matches(self, data: bytes) -> bool:
        return data[128:132] == b"DICM"

    def read(self, path: str, data: bytes, max_voxels: int | None = None) -> list[CTSlice]:
        return [read_dicom(path, data)]


class NiftiReader(Reader):
    """NIfTI-1/2 volumes (:func:`read_nifti`), one slice per axial plane; masks go back into a
    volume with the source's affine."""

    kind = "nifti"
    formats = ("NIfTI",)
    suffixes = NIFTI_SUFFIXES
    source_formats = frozenset({SourceFormat.NIFTI.value})
    mask_formats = ("nifti", "png")
    input_description = "NIfTI volume"

    def content_matches(self, data: bytes) -> bool:
        if data.startswith(b"\x1f\x8b"):
            return True
        return len(data) >= 4 and any(struct.unpack(order + "i", data[:4])[0] in _NIFTI_HEADER_BYTES
                                      for order in "<>")

    def read(self, path: str, data: bytes, max_voxels: int | None = None) -> list[CTSlice]:
        return read_nifti(path, data, max_voxels)

    def read_frame(self, path: str, data: bytes, frame: int | str, max_voxels: int | None = None) -> CTSlice:
        return read_nifti(path, data, max_voxels, frame)[0]

    def write_masks(self, source: str, slices: Sequence[CTSlice], masks: Sequence[np.ndarray],
                    folder: Path, mask_format: str) -> str:
        """``nifti``: one ``<volume>_mask.nii.gz`` (0/1 uint8) on the grid and affine of ``source``
        (planes that gave no slice, being constant, are 0)."""
        if mask_format != "nifti":
            return super().write_masks(source, slices, masks, folder, mask_format)
        import nibabel
        from nibabel.spatialimages import SpatialImage

        # nibabel.load is typed as any image file; a NIfTI source is always a spatial image
        affine = cast(SpatialImage, nibabel.load(source)).affine
        height, width = slices[0].shape
        volume = np.zeros((width, height, slices[0].frames_in_file), np.uint8)
        for item, mask in zip(slices, masks):
            volume[:, :, item.frame] = nifti_plane(mask)
        target = folder / f"{slices[0].name.rsplit('_z', 1)[0]}_mask.nii.gz"
        nibabel.save(nibabel.Nifti1Image(volume, affine), str(target))
        return str(target)


def slice_plane(plane: np.ndarray) -> np.ndarray:
    """A NIfTI (x, y) plane as a slice's (row, column) pixels: transposed, so rows run
    anterior-posterior as DICOM displays them. :func:`nifti_plane` undoes it."""
    return np.ascontiguousarray(plane.T)


def nifti_plane(pixels: np.ndarray) -> np.ndarray:
    """A slice's (row, column) array back on the NIfTI (x, y) grid (the inverse of :func:`slice_plane`)."""
    return pixels.T


#: Every file format, asked in this order. A new format is one more :class:`Reader` here.
READERS: tuple[Reader, ...] = (RasterReader(), DicomReader(), NiftiReader())


def reader_for(path: str | os.PathLike) -> Reader | None:
    """The reader that takes ``path`` by name, or None for files that are not images by name."""
    return next((reader for reader in READERS if reader.claims(path)), None)


def reader_for_format(source_format: str) -> Reader:
    """The reader that made slices of ``source_format`` (:attr:`CTSlice.source_format`), for
    writing their masks; slices made in memory (``array``) are written like rasters."""
    return next((reader for reader in READERS if source_format in reader.source_formats), READERS[0])


def supported_suffixes() -> frozenset[str]:
    """Every file suffix some reader takes (lower case, ``.nii.gz`` as one)."""
    return frozenset(suffix for reader in READERS for suffix in reader.suffixes)


def supported_formats(last: str = " or ") -> str:
    """The supported formats for messages, from :data:`READERS`.

    Example:
        >>> supported_formats()
        'PNG, JPEG, BMP, TIFF, DICOM or NIfTI'
    """
    names = [name for reader in READERS for name in reader.formats]
    return ", ".join(names[:-1]) + last + names[-1]


def read_file(path: str | os.PathLike, max_voxels: int | None = None,
              frame: int | str | None = None) -> list[CTSlice]:
    """Read any supported file; returns its slices (one for 2-D files), or only the one at
    ``frame`` (an int, or :data:`MIDDLE`: a volume's usable slice nearest its middle), which
    a volume decodes without keeping the others.

    The file is read once: its SHA-256 and its pixels come from the same bytes, even if the
    file is replaced meanwhile. ``max_voxels`` bounds volumes (see :func:`voxel_limit`).
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
        mode = os.stat(path).st_mode
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise ReadError(path, "symbolic link loop") from None
        raise ReadError(path, "broken symbolic link") from None
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        raise ReadError(printable(path), "file name is not valid UTF-8; rename the file") from None
    if stat.S_ISDIR(mode):
        raise ReadError(path, "is a folder, not a file")
    if not stat.S_ISREG(mode):
        raise ReadError(path, f"not a regular file ({_file_type(mode)})")
    if not os.access(path, os.R_OK):
        raise ReadError(path, "permission denied")
    if os.path.getsize(path) == 0:
        raise ReadError(path, "file is empty")
    if reader_for(path) is None:
        raise ReadError(path, f"not a supported image type ({supported_formats(', ')})")
    return decode(read_bytes(path), path, max_voxels, frame)


def decode(data: bytes, name: str, max_voxels: int | None = None, frame: int | str | None = None,
           kind: str | None = None) -> list[CTSlice]:
    """The readers' entry point: the slices of a file held in memory (an upload, an archive's
    instance), or only the one at ``frame`` (as :func:`read_file`). ``name`` (a file name or
    URL) picks the reader by its suffix, or by content when it has none (DICOM without a
    suffix), unless ``kind`` names it (:attr:`Reader.kind`: an archive's instance is
    ``"dicom"`` whatever its URL), and names the slices and errors. The slices' ``sha256`` is that of ``data``.
    ``max_voxels`` bounds volumes (default :data:`DEFAULT_MAX_VOXELS`; the program passes its
    setting). Raises :class:`ReadError` with a one-line reason for anything unusable.

    Example:
        >>> import cv2
        >>> png = cv2.imencode(".png", np.tile(np.arange(64, dtype=np.uint8) * 4, (64, 1)))[1].tobytes()
        >>> [(item.path, item.shape) for item in decode(png, "upload.png")]
        [('upload.png', (64, 64))]
        >>> decode(b"hello", "notes.txt")
        Traceback (most recent call last):
        lungcbir.errors.ReadError: notes.txt: not a supported image type (PNG, JPEG, BMP, TIFF, DICOM, NIfTI)
    """
    if not data:
        raise ReadError(name, "file is empty")
    if len(data) > MAX_FILE_BYTES:
        raise ReadError(name, f"file is {len(data)} bytes, above the limit of {MAX_FILE_BYTES} bytes")
    suffix = "" if kind is not None else file_suffix(name)
    reader = next((reader for reader in READERS if (reader.kind == kind if kind else suffix in reader.suffixes)),
                  None)
    if reader is None and suffix == "" and kind is None:
        reader = next((reader for reader in READERS if reader.content_matches(data)), None)
    if reader is None:
        raise ReadError(name, f"not a supported image type ({supported_formats(', ')})")
    try:
        slices = reader.read(name, data, max_voxels) if frame is None else \
            [reader.read_frame(name, data, frame, max_voxels)]
    except (ReadError, LungCBIRError):
        raise
    except MemoryError:
        raise ReadError(name, "not enough memory to decode this file") from None
    except Exception as error:  # a decoder's own error on a malformed file: one line, never a traceback
        raise ReadError(name, f"cannot decode ({type(error).__name__}: {_short(error)})") from None
    digest = hashlib.sha256(data).hexdigest()
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
            found: list[str] = []
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


def series_order_key(axis_position: float | None, slice_location: float | None,
                     instance_number: int | None) -> tuple:
    """Where a DICOM slice sorts in its series: by position along the slice normal (superior
    first for axial slices), else SliceLocation, else InstanceNumber (a missing or malformed
    one counts as 0).

    Example:
        >>> sorted([series_order_key(-10.0, None, 1), series_order_key(5.0, None, 2), series_order_key(None, None, 3)])
        [(0, -5.0), (0, 10.0), (1, 3)]
    """
    position = axis_position if axis_position is not None else slice_location
    return (0, -position) if position is not None else (1, instance_number or 0)


def dicom_series_positions(paths: Iterable[str]) -> dict[str, int]:
    """Position of each DICOM file within its series (0 = most superior), from headers only.

    Files are grouped by folder and SeriesInstanceUID and ordered by ImagePositionPatient along
    the slice normal (:func:`slice_axis_position`; then SliceLocation, then InstanceNumber),
    whatever their file names.
    """
    pydicom = _pydicom()
    series: dict[tuple[str, str], list[tuple[tuple, str]]] = defaultdict(list)
    for path in paths:
        if file_kind(path) != "dicom":
            continue
        try:
            with _open_regular(path) as handle:  # a pipe named .dcm must not hang us
                header = pydicom.dcmread(handle, stop_before_pixels=True)
        except Exception:
            continue  # reported when the file itself is read
        uid = _dicom_text(header, "SeriesInstanceUID")
        if uid is None:
            continue
        key = series_order_key(_dicom_axis_position(header), _dicom_float(header, "SliceLocation"),
                               _dicom_int(header, "InstanceNumber"))
        series[(os.path.dirname(path), uid)].append((key, path))
    positions = {}
    for members in series.values():
        for index, (_, path) in enumerate(sorted(members)):
            positions[path] = index
    return positions


def printable(path: str) -> str:
    """A path safe to print and store even when its bytes are not valid UTF-8."""
    return os.fsencode(path).decode("utf-8", "replace")


#: The longest reason a decoder's error gives a failure line.
MAX_REASON_CHARACTERS = 300


def _short(error: Exception) -> str:
    """A decoder's error as one line: its lines joined, so a first line that only introduces
    the rest ("... raised by all available plugins:") keeps what follows it."""
    lines = [" ".join(line.split()) for line in str(error).splitlines()]
    text = "; ".join(line for line in lines if line).replace(":;", ":") or type(error).__name__
    return text if len(text) <= MAX_REASON_CHARACTERS else text[:MAX_REASON_CHARACTERS - 3] + "..."


#: Formats a region mask may be in (``index-dataset --regions``, ``query --region-mask``).
MASK_FORMATS = (".png", ".tif", ".tiff", ".bmp", ".nii", ".nii.gz")


def decode_region_mask(data: bytes, name: str, max_voxels: int | None = None) -> dict[int, np.ndarray]:
    """A region mask file's planes as boolean masks (non-zero = region), by frame: one (frame 0)
    for PNG, TIFF and BMP, every axial plane of a NIfTI volume, oriented as :func:`read_nifti`
    orients the planes of a volume of images. Unlike an image, an empty or constant mask is
    a mask. Raises :class:`ReadError` for anything else.

    Example:
        >>> import cv2
        >>> png = cv2.imencode(".png", np.eye(8, dtype=np.uint8) * 255)[1].tobytes()
        >>> {frame: int(mask.sum()) for frame, mask in decode_region_mask(png, "m.png").items()}
        {0: 8}
    """
    suffix = file_suffix(name)
    if suffix in (".nii", ".nii.gz"):
        volume = _NiftiPlanes(name, data, max_voxels)
        return {z: slice_plane(volume.plane(z)) != 0 for z in range(volume.count)}
    if suffix not in MASK_FORMATS:
        raise ReadError(name, f"a region mask is {', '.join(s.lstrip('.').upper() for s in MASK_FORMATS)}")
    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED) if data else None
    if pixels is None:
        raise ReadError(name, f"unreadable {suffix.lstrip('.').upper()} mask")
    return {0: (pixels != 0).any(axis=-1) if pixels.ndim == 3 else pixels != 0}


def read_region_mask(path: str | os.PathLike, max_voxels: int | None = None) -> dict[int, np.ndarray]:
    """:func:`decode_region_mask` of a file."""
    path = str(path)
    if not os.path.lexists(path):
        raise ReadError(path, "file does not exist")
    return decode_region_mask(read_bytes(path), path, max_voxels)
