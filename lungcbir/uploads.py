"""Uploaded series for the web app: several files or a ZIP, unpacked within fixed bounds.

A whole-series query arrives as several files, one ZIP of them, or one NIfTI volume. Here
they become CT slices in series order, without trusting anything the client sent: a ZIP's
member count and uncompressed sizes are checked from its directory *before* anything is
extracted (a ZIP bomb is refused unread), every member is read with a hard cap on its size
(a lying directory cannot get past it), and everything is decoded in memory
(:func:`lungcbir.io.decode`): no name from the client or the archive ever becomes a path.
"""

from __future__ import annotations

import io
import os
import zipfile
from dataclasses import dataclass

from .errors import ReadError, UploadRefused
from .io import CTSlice, ReadFailure, SourceFormat, decode, series_order_key, voxel_limit

#: Files accepted in one series upload (loose files plus ZIP members).
MAX_SERIES_FILES = 1000
#: Largest ratio of a ZIP member's uncompressed to compressed size: DICOM compresses about
#: 2-10x; 1000x is a bomb (a 64 MiB upload claiming 64 GB).
MAX_ZIP_RATIO = 200
#: Suffixes read as images inside a ZIP (other members, e.g. DICOMDIR or README, are skipped).
IMAGE_SUFFIXES = (".dcm", ".dicom", ".ima", ".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".nii", ".nii.gz")


@dataclass(frozen=True)
class SeriesLimits:
    """Bounds of one series upload: ``max_files`` files, ``max_bytes`` in all once unpacked,
    ``max_voxels`` in all once decoded (None: :func:`lungcbir.io.voxel_limit`'s default)."""

    max_files: int = MAX_SERIES_FILES
    max_bytes: int = 256 * 2**20
    max_ratio: int = MAX_ZIP_RATIO
    max_voxels: int | None = None


def suffix_of(name: str) -> str:
    lower = name.lower()
    return ".nii.gz" if lower.endswith(".nii.gz") else os.path.splitext(lower)[1]


def is_zip(name: str, data: bytes) -> bool:
    return name.lower().endswith(".zip") or data[:4] == b"PK\x03\x04"


def _looks_like_dicom(name: str) -> bool:
    """DICOM files in archives often have no suffix at all (IM0001, 1.2.840...)."""
    base = os.path.basename(name)
    return "." not in base or base.replace(".", "").isdigit()


def unpack_zip(name: str, data: bytes, limits: SeriesLimits, budget: int) -> list[tuple[str, bytes]]:
    """The image members of a ZIP as (member name, bytes), refused whole when over the limits.

    ``budget`` is how many bytes the upload may still take. Sizes and counts come from the
    central directory and are checked before any member is decompressed; each member is then
    read with a cap of its declared size, so a directory that lies gains nothing.
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        members = [m for m in archive.infolist() if not m.is_dir()]
    except (zipfile.BadZipFile, ValueError, OSError) as error:
        raise UploadRefused(f"{name}: not a readable ZIP file ({error})") from None
    members = [m for m in members if suffix_of(m.filename) in IMAGE_SUFFIXES or _looks_like_dicom(m.filename)]
    if len(members) > limits.max_files:
        raise UploadRefused(f"{name}: {len(members)} files; at most {limits.max_files} per series")
    total = sum(m.file_size for m in members)
    if total > budget:
        raise UploadRefused(f"{name}: {total // 2**20} MiB once unpacked; at most {budget // 2**20} MiB per series")
    for member in members:
        if member.file_size > limits.max_ratio * max(member.compress_size, 1) + 4096:
            ratio = member.file_size // max(member.compress_size, 1)
            raise UploadRefused(f"{name}: {member.filename} is compressed {ratio}"
                                f"x, more than any image (refused as a ZIP bomb)")
        if member.flag_bits & 0x1:
            raise UploadRefused(f"{name}: {member.filename} is encrypted")
    found = []
    for member in members:
        try:
            with archive.open(member) as handle:
                content = handle.read(member.file_size + 1)
        except (zipfile.BadZipFile, NotImplementedError, RuntimeError, ValueError, OSError, EOFError) as error:
            raise UploadRefused(f"{name}: {member.filename}: cannot unpack ({error})") from None
        if len(content) > member.file_size:  # the directory lied about the size
            raise UploadRefused(f"{name}: {member.filename} is larger than its ZIP entry says")
        found.append((member.filename, content))
    return found


def expand(files: list[tuple[str, bytes]], limits: SeriesLimits) -> list[tuple[str, bytes]]:
    """Uploaded (name, bytes) with every ZIP replaced by its image members, within ``limits``."""
    out: list[tuple[str, bytes]] = []
    used = 0
    for name, data in files:
        if is_zip(name, data):
            members = unpack_zip(name, data, limits, limits.max_bytes - used)
            out += [(f"{name}/{member}", content) for member, content in members]
            used += sum(len(content) for _, content in members)
        else:
            out.append((name, data))
            used += len(data)
        if len(out) > limits.max_files:
            raise UploadRefused(f"{len(out)} files; at most {limits.max_files} per series")
        if used > limits.max_bytes:
            raise UploadRefused(f"the series is larger than {limits.max_bytes // 2**20} MiB")
    if not out:
        raise UploadRefused("no image files in the upload")
    return out


def read_series(files: list[tuple[str, bytes]], limits: SeriesLimits | None = None, unpacked: bool = False
                ) -> tuple[list[CTSlice], list[ReadFailure]]:
    """Every slice of the uploaded files (ZIPs unpacked, unless ``unpacked`` says they are
    :func:`expand`'s answer already: a ZIP inside is then not unpacked), in series order, and
    the files that failed.

    Slices keep the client's file name (``path``: the member name inside a ZIP, never a
    server path). DICOM files are ordered by their headers (as ``query --by-series`` does),
    NIfTI slices by frame. Raises :class:`UploadRefused` when over the limits or when no
    file could be read.
    """
    limits = limits or SeriesLimits()
    if not unpacked:
        files = expand(files, limits)
    limit = voxel_limit(limits.max_voxels)
    decoded: list[tuple[int, CTSlice]] = []
    failures: list[ReadFailure] = []
    pixels = 0
    for number, (name, data) in enumerate(files):
        try:
            items = decode(data, name, limit)
        except ReadError as error:
            failures.append(ReadFailure(name, error.reason))
            continue
        for item in items:
            pixels += item.pixels.size
            if pixels > limit:
                raise UploadRefused(f"the series has more than {limit} voxels")
            item.path = os.path.basename(name)
            decoded.append((number, item))
    ranks = _positions_in_series([item for _, item in decoded if item.source_format == SourceFormat.DICOM])
    slices = [(ranks.get(id(item), number), item.frame, item) for number, item in decoded]
    if not slices:
        shown = "; ".join(f"{f.path}: {f.reason}" for f in failures[:3])
        raise UploadRefused(f"no readable slice in the upload ({shown})")
    slices.sort(key=lambda entry: (entry[0], entry[1]))
    return [item for _, _, item in slices], failures


def _positions_in_series(items: list[CTSlice]) -> dict[int, int]:
    """The rank of each DICOM slice (by ``id``) within the uploaded slices of its series, by
    its headers (as :func:`lungcbir.io.dicom_series_positions` ranks files), whatever the
    file names."""
    by_series: dict[str | None, list[CTSlice]] = {}
    for item in items:
        by_series.setdefault(item.series_uid, []).append(item)
    ranks = {}
    for members in by_series.values():
        members.sort(key=lambda item: series_order_key(item.axis_position, item.slice_location, item.instance_number))
        ranks.update({id(item): rank for rank, item in enumerate(members)})
    return ranks
