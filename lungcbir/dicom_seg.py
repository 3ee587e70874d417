"""DICOM Segmentation (SEG) output: the model's masks of a DICOM series as one binary SEG.

A SEG is what PACS viewers (OHIF, 3D Slicer, ...) show over the CT: one frame per source slice
(empty frames kept, so frame *i* always is slice *i*), each frame referencing its source SOP
instance, and ``ReferencedSeriesSequence`` filled (OHIF refuses SEGs without it). It is
written with highdicom, which copies the patient and study attributes of the source.

Sources with missing or invalid identifiers are repaired in memory first (see
:mod:`lungcbir.dicom_ids`); the SEG then references the derived UIDs and says so in its
Content Description and, per frame, in the Derivation Description.

Segments come from the model's outputs: today "Lung"; :class:`SegmentKind` also describes
"Lesion", for a model with a lesion output.

How it relates to the readers: each file format's own mask writer (PNG per slice, a NIfTI
volume) is part of its reader class in :mod:`lungcbir.io` (``Reader.write_masks``). A SEG is
not a per-file mask but one object per DICOM *series*, needing the whole series' datasets and
the model id, so it lives here and ``segment --format dicom-seg`` calls it instead.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import numpy as np

from .dicom_ids import DerivedIdentifier, derived_uid, repair_identifiers
from .errors import ReadError, SegError
from .io import CTSlice, ReadFailure, _pydicom

#: Equipment written into every SEG (Enhanced General Equipment module).
MANUFACTURER = "lungcbir"
MANUFACTURER_MODEL_NAME = "lungcbir lung U-Net"
DEVICE_SERIAL_NUMBER = "0"  # software, no device; the element is Type 1 in the SEG IOD

#: Series Number of the SEG series (the source's series numbers are usually small).
SEG_SERIES_NUMBER = 9901

#: Why a non-DICOM input cannot get a SEG (shown as ``failed: PATH: <this>``).
NEEDS_DICOM = "dicom-seg needs DICOM input"


@dataclass(frozen=True)
class SegmentCodes:
    """How one segment is labelled and coded (SNOMED CT, as DICOM CID 7150 / 7151 use)."""

    label: str
    category: tuple[str, str, str]  # (code value, scheme, meaning)
    property_type: tuple[str, str, str]


class SegmentKind(Enum):
    """The segments a lungcbir model can produce, in segment-number order."""

    LUNG = SegmentCodes("Lung", ("91723000", "SCT", "Anatomical Structure"), ("39607008", "SCT", "Lung"))
    LESION = SegmentCodes("Lesion", ("49755003", "SCT", "Morphologically Abnormal Structure"),
                          ("52988006", "SCT", "Lesion"))


@dataclass
class DicomSeries:
    """The slices of one DICOM series to be written as one SEG, superior first."""

    name: str  # the series folder name, or the file stem for a single named file
    source: str  # the folder, or the file, to name in messages
    slices: list[CTSlice]


@dataclass
class SegWritten:
    """What :func:`write_dicom_seg` wrote."""

    path: Path
    frames: int
    segments: list[str]
    sop_instance_uid: str
    series_instance_uid: str
    referenced_series_uid: str
    derived: list[DerivedIdentifier] = field(default_factory=list)  # source identifiers replaced
    sources_with_derived: int = 0  # how many source files had identifiers derived


def group_series(inputs: Sequence[tuple[str, list[CTSlice]]], named: Sequence[str] = ()) -> tuple[
        list[DicomSeries], list[ReadFailure]]:
    """Group read inputs into DICOM series; non-DICOM inputs become failures.

    A series is the files of one folder with one Series Instance UID (an empty UID counts as
    one value). It is named after its folder, or after the file's stem when it is a single
    file named explicitly (in ``named``); clashing names get ``_2``, ``_3``, ...
    """
    groups: dict[tuple[str, str], list[CTSlice]] = defaultdict(list)
    failures = []
    for path, slices in inputs:
        if not slices or slices[0].source_format != "dicom":
            failures.append(ReadFailure(path, NEEDS_DICOM))
            continue
        groups[(os.path.dirname(os.path.abspath(path)), slices[0].series_uid or "")].extend(slices)
    explicit = {os.path.abspath(p) for p in named}
    series, used = [], set()
    for (folder, _), slices in groups.items():
        slices.sort(key=_superior_first)
        single = len(slices) == 1 and os.path.abspath(slices[0].path) in explicit
        base = slices[0].name if single else (os.path.basename(folder) or "series")
        source = slices[0].path if single else folder
        name, number = base, 1
        while name in used:
            number += 1
            name = f"{base}_{number}"
        used.add(name)
        series.append(DicomSeries(name, source, slices))
    return series, failures


def _superior_first(item: CTSlice) -> tuple:
    """Slice order within a series: by position along the slice normal (head first for axial
    slices, :func:`lungcbir.io.slice_axis_position`), then InstanceNumber."""
    z = item.axis_position if item.axis_position is not None else item.slice_location
    return (0, -z) if z is not None else (1, item.instance_number or 0, item.path)


def _codes(codes: SegmentCodes):
    from pydicom.sr.coding import Code

    return Code(*codes.category), Code(*codes.property_type)


def _series_seed(slices: Sequence[CTSlice]) -> str:
    """What seeds missing study/series UIDs: the sorted digests of the series' files (stable)."""
    digests = sorted({item.sha256 or os.path.abspath(item.path) for item in slices})
    return hashlib.sha256("\n".join(digests).encode()).hexdigest()


def dicom_headers(files: Sequence[tuple[str, bytes]], slices: Sequence[CTSlice]) -> list | None:
    """The DICOM headers (no pixels) of ``slices`` decoded from ``files`` (name, bytes) held in
    memory, such as an upload, matched by their ``sha256``: what :func:`write_dicom_seg` needs
    for slices without a file. None unless every slice is DICOM and its header was found."""
    if not slices or any(item.source_format != "dicom" for item in slices):
        return None
    pydicom = _pydicom()
    wanted = {item.sha256 for item in slices}
    found = {}
    for _, data in files:
        digest = hashlib.sha256(data).hexdigest()
        if digest in wanted and digest not in found:
            try:
                found[digest] = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
            except Exception:  # pydicom raises many kinds; the reader already judged the file
                return None
    headers = [found.get(item.sha256 or "") for item in slices]
    return headers if all(header is not None for header in headers) else None


def _source_headers(slices: Sequence[CTSlice], given: Sequence | None = None) -> tuple[
        list, list[list[DerivedIdentifier]]]:
    """The slices' DICOM headers (``given``, else read from their files), identifiers repaired."""
    pydicom = _pydicom()  # tolerant of the invalid UIDs we are about to repair
    seed = _series_seed(slices)
    if given is not None and len(given) != len(slices):
        raise SegError(slices[0].path, f"{len(given)} DICOM headers for {len(slices)} slices")
    headers, derived = [], []
    for number, item in enumerate(slices):
        if given is not None:
            header = given[number]
        else:
            try:
                header = pydicom.dcmread(item.path, stop_before_pixels=True)
            except Exception as error:  # pydicom raises many kinds on truncated files
                raise ReadError(item.path, f"unreadable DICOM header ({type(error).__name__})") from None
        digest = item.sha256 or hashlib.sha256(Path(item.path).read_bytes()).hexdigest()
        derived.append(repair_identifiers(header, digest, seed))
        headers.append(header)
    return headers, derived


def _stack(masks: Sequence[np.ndarray] | Mapping[SegmentKind, Sequence[np.ndarray]],
           headers: Sequence, source: str) -> tuple[list[SegmentKind], np.ndarray]:
    """Masks as highdicom's stacked-segments array (frames, rows, columns, segments), uint8 0/1."""
    by_kind = dict(masks) if isinstance(masks, Mapping) else {SegmentKind.LUNG: masks}
    kinds = [kind for kind in SegmentKind if kind in by_kind]  # segment numbers in a fixed order
    stacks = []
    for kind in kinds:
        planes = list(by_kind[kind])
        if len(planes) != len(headers):
            raise SegError(source, f"{len(planes)} {kind.value.label} masks for {len(headers)} slices")
        for plane, header in zip(planes, headers):
            if plane.shape != (int(header.Rows), int(header.Columns)):
                raise SegError(source, f"mask of shape {plane.shape} for a {header.Rows}x{header.Columns} slice")
        stacks.append(np.stack([np.asarray(plane, bool) for plane in planes]))
    return kinds, np.stack(stacks, axis=-1).astype(np.uint8)


def write_dicom_seg(slices: Sequence[CTSlice],
                    masks: Sequence[np.ndarray] | Mapping[SegmentKind, Sequence[np.ndarray]],
                    out_path: str | os.PathLike, model_id: str, headers: Sequence | None = None) -> SegWritten:
    """Write the masks of one DICOM series as a binary DICOM SEG at ``out_path``.

    ``slices`` are the series' slices as read (their files are read again for the headers,
    unless ``headers`` gives them: pydicom datasets of slices held in memory, such as those
    fetched from an archive, :meth:`lungcbir.dicomweb.DicomwebSource.headers`);
    ``masks`` one boolean mask per slice (lungs), or per :class:`SegmentKind` a list of them.
    Every slice gets a frame per segment, empty or not. The SEG's own UIDs are derived from the
    model, the source and the mask bits, so the same input gives the same SEG.
    Raises :class:`~lungcbir.errors.ReadError` for a non-DICOM slice and :class:`SegError` when
    highdicom refuses the sources (mixed series, missing geometry, ...).
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from . import __version__

    if not slices:
        raise SegError(str(out_path), "no slices to write a SEG for")
    for item in slices:
        if item.source_format != "dicom":
            raise ReadError(item.path, NEEDS_DICOM)
    headers, derived = _source_headers(slices, headers)
    source = slices[0].path if len(slices) == 1 else os.path.dirname(slices[0].path)
    kinds, pixels = _stack(masks, headers, source)
    algorithm = hd.AlgorithmIdentificationSequence(
        name=MANUFACTURER_MODEL_NAME, family=codes.cid7162.ArtificialIntelligence, version=model_id,
        parameters={"software": f"lungcbir {__version__}"})
    descriptions = []
    for number, kind in enumerate(kinds, 1):
        category, property_type = _codes(kind.value)
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number, segment_label=kind.value.label, segmented_property_category=category,
            segmented_property_type=property_type, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm))
    source_series = str(headers[0].SeriesInstanceUID)
    content = hashlib.sha256(pixels.tobytes() + "|".join(str(h.SOPInstanceUID) for h in headers).encode())
    any_derived = any(derived)
    try:
        seg = hd.seg.Segmentation(
            source_images=headers, pixel_array=pixels,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=descriptions,
            series_instance_uid=derived_uid("SEG series", f"{model_id}:{source_series}"),
            series_number=SEG_SERIES_NUMBER,
            sop_instance_uid=derived_uid("SEG instance", f"{model_id}:{content.hexdigest()}"),
            instance_number=1, manufacturer=MANUFACTURER, manufacturer_model_name=MANUFACTURER_MODEL_NAME,
            software_versions=f"lungcbir {__version__}", device_serial_number=DEVICE_SERIAL_NUMBER,
            content_label="LUNGCBIR", omit_empty_frames=False,
            content_description=("lungcbir masks; source identifiers derived, see frames" if any_derived
                                 else "lungcbir masks"),
            series_description=f"lungcbir {'+'.join(k.value.label for k in kinds)} model {model_id}"[:64])
    except (ValueError, TypeError, AttributeError) as error:
        raise SegError(source, f"cannot make a DICOM SEG ({error})") from None
    _note_derivations(seg, headers, derived)
    out_path = Path(out_path)
    temporary = out_path.with_name(out_path.name + ".tmp")
    try:
        seg.save_as(temporary, enforce_file_format=True)
        os.replace(temporary, out_path)  # never leave half a SEG under the final name
    except OSError as error:
        raise SegError(str(out_path), f"cannot write the SEG ({error.strerror})") from None
    return SegWritten(out_path, int(seg.NumberOfFrames), [k.value.label for k in kinds], str(seg.SOPInstanceUID),
                      str(seg.SeriesInstanceUID), source_series, [d for items in derived for d in items],
                      sum(1 for items in derived if items))


def _note_derivations(seg, headers: Sequence, derived: Sequence[list[DerivedIdentifier]]) -> None:
    """Say, on each frame whose source had identifiers derived, which ones and from what."""
    by_sop = {str(h.SOPInstanceUID): items for h, items in zip(headers, derived) if items}
    if not by_sop:
        return
    for frame in seg.PerFrameFunctionalGroupsSequence:
        for derivation in frame.get("DerivationImageSequence", []):
            sources = [str(s.ReferencedSOPInstanceUID) for s in derivation.get("SourceImageSequence", [])]
            notes = [d.describe() for sop in sources for d in by_sop.get(sop, [])]
            if notes:
                text = "lungcbir derived source identifiers: " + "; ".join(notes)
                derivation.DerivationDescription = text[:1024]  # ST holds 1024 characters
