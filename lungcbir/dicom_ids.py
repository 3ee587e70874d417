"""Valid DICOM identifiers for files whose own are missing or malformed.

Real archives are messy: de-identification tools leave SOP Instance UIDs empty, write UUID
text (``896911bf-...``) where a UID (digits and dots) belongs, and drop Type 2 attributes
(Patient's Name, Birth Date, ...) that must be present, if empty. Anything that writes DICOM
derived from such files (a SEG, an upload to an archive) needs valid identifiers that stay the
same every time the same file is seen, so that references made on one run still hold on the
next. This module repairs a header in memory (never the file) and says what it changed.

Derivation (stable, no randomness):

* a UID that is UUID text becomes ``2.25.<the UUID as an integer>`` (the UUID's own UID form);
* any other invalid or empty UID becomes ``2.25.<uuid5(NAMESPACE, keyword:seed) as integer>``,
  where the seed is the invalid text, or for an empty one the file's SHA-256 (SOP Instance
  UID) or a seed shared by its series (study, series), so all files of a series agree;
* an empty Frame of Reference UID is derived from the (repaired) Series Instance UID: the
  slices of one series share one frame of reference.

Text beyond DICOM's limits, which a derived object would copy and an archive that validates
would refuse, is fixed up the same way and reported:

* a value longer than its VR allows (PS3.5 6.2: LO 64, SH 16, PN 64 per component group...) is
  shortened; identifiers (LO, SH) keep their first characters and end in ``~`` plus 8 hex digits
  of the whole value's SHA-256, so two long IDs that share a beginning stay apart;
* non-ASCII text in a header without a Specific Character Set (which DICOM then reads as
  ASCII) gets ``ISO_IR 192``, so it is written as UTF-8 rather than as invalid bytes.

A Patient's Name of one component without a caret (``TCGA-17-Z011``, as anonymisers write
it) gets the trailing caret that says it is a family name (``TCGA-17-Z011^``, the same name
by PS3.5 6.2.1.2): without it highdicom warns on every SEG that copies it.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from dataclasses import dataclass

#: Namespace of lungcbir's derived UIDs (a fixed, random UUID; changing it changes every UID).
NAMESPACE = uuid.UUID("6f1c9a52-3d0e-4c7b-9f5a-2b8e1d4c7a90")

#: The UID root for UUID-derived UIDs (DICOM PS3.5 B.2).
UUID_ROOT = "2.25."

#: Longest valid UID (DICOM PS3.5 9.1).
MAX_UID_LENGTH = 64

_UID_PATTERN = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")

#: Type 2 attributes (present, possibly empty) of the Patient and General Study modules that
#: derived objects copy from their source, with the VR each is created with when absent.
TYPE2_ATTRIBUTES = {
    "PatientName": "PN", "PatientID": "LO", "PatientBirthDate": "DA", "PatientSex": "CS",
    "StudyDate": "DA", "StudyTime": "TM", "ReferringPhysicianName": "PN", "StudyID": "SH",
    "AccessionNumber": "SH",
}


#: Longest value, in characters, of each text VR whose values are fixed up (DICOM PS3.5 6.2; PN:
#: per component group). Other VRs (dates, numbers, UIDs) are either checked elsewhere or left.
MAX_TEXT_LENGTH = {"CS": 16, "SH": 16, "LO": 64, "PN": 64, "ST": 1024, "LT": 10240}

#: The character set given to headers with non-ASCII text and none declared (UTF-8).
UTF8_CHARACTER_SET = "ISO_IR 192"


@dataclass(frozen=True)
class DerivedIdentifier:
    """One identifier that was replaced: which, what it was, what it is now and why."""

    keyword: str
    original: str
    value: str
    reason: str

    def describe(self) -> str:
        return f"{self.keyword} {self.reason}: {_brief(self.original) or '(empty)'} -> {_brief(self.value)}"


def _brief(text: str, limit: int = 72) -> str:
    return text if len(text) <= limit else f"{text[:limit - 3]}..."


def is_valid_uid(text: str | None) -> bool:
    """Whether ``text`` is a valid DICOM UID (digits and dots, no leading zeros, 64 chars at most).

    Example:
        >>> is_valid_uid("1.2.840.10008.1.2"), is_valid_uid("896911bf-1143"), is_valid_uid("")
        (True, False, False)
    """
    if not text:
        return False
    return len(text) <= MAX_UID_LENGTH and _UID_PATTERN.match(text) is not None


def derived_uid(keyword: str, seed: str) -> str:
    """A stable ``2.25.`` UID for ``seed``: the UUID itself when the seed is UUID text.

    Example:
        >>> derived_uid("StudyInstanceUID", "00000000-0000-0000-0000-00000000000a")
        '2.25.10'
        >>> derived_uid("SOPInstanceUID", "abc") == derived_uid("SOPInstanceUID", "abc")
        True
    """
    try:
        value = uuid.UUID(seed.strip())
    except ValueError:
        value = uuid.uuid5(NAMESPACE, f"{keyword}:{seed}")
    return f"{UUID_ROOT}{value.int}"


def _text(dataset, keyword: str) -> str:
    value = dataset.get(keyword)
    return "" if value is None else str(value).strip()


def _repair_uid(dataset, keyword: str, empty_seed: str, derived: list[DerivedIdentifier]) -> str:
    original = _text(dataset, keyword)
    if is_valid_uid(original):
        return original
    if original:
        value, reason = derived_uid(keyword, original), "was not a valid UID"
    else:
        value, reason = derived_uid(keyword, empty_seed), "was missing or empty"
    setattr(dataset, keyword, value)
    derived.append(DerivedIdentifier(keyword, original, value, reason))
    return value


def repair_identifiers(dataset, sha256: str, series_seed: str | None = None) -> list[DerivedIdentifier]:
    """Give ``dataset`` (a pydicom header, changed in place) valid UIDs and its Type 2 attributes.

    ``sha256`` is the file's digest, the seed of a missing SOP Instance UID; ``series_seed``
    seeds missing study and series UIDs (pass the same value for every file of one series;
    default: the file's digest). Returns the identifiers that were derived, in the order
    SOP Instance, Study Instance, Series Instance, Frame of Reference UID.
    Absent Type 2 attributes are added empty; those are not reported (nothing is invented).
    Text beyond DICOM's limits is then fixed up (see the module's docstring) and reported after
    the UIDs.
    """
    derived: list[DerivedIdentifier] = []
    series_seed = series_seed or sha256
    sop = _repair_uid(dataset, "SOPInstanceUID", sha256, derived)
    if hasattr(dataset, "file_meta") and not is_valid_uid(_text(dataset.file_meta, "MediaStorageSOPInstanceUID")):
        dataset.file_meta.MediaStorageSOPInstanceUID = sop
    _repair_uid(dataset, "StudyInstanceUID", series_seed, derived)
    series = _repair_uid(dataset, "SeriesInstanceUID", series_seed, derived)
    _repair_uid(dataset, "FrameOfReferenceUID", series, derived)
    for keyword, vr in TYPE2_ATTRIBUTES.items():
        if keyword not in dataset:
            dataset.add_new(keyword, vr, "")
    name = _text(dataset, "PatientName")
    if name and not any(mark in name for mark in "^="):
        dataset.PatientName = name + "^"
    _repair_text(dataset, derived)
    return derived


def shortened_text(text: str, vr: str) -> str:
    """``text`` cut to what ``vr`` allows: identifiers end in ``~`` and a hash of the whole value.

    Example:
        >>> shortened_text("P" * 300, "LO")[-10:-8], len(shortened_text("P" * 300, "LO"))
        ('P~', 64)
        >>> shortened_text("Doe^" + "N" * 100, "PN") == "Doe^" + "N" * 60
        True
        >>> shortened_text("short", "SH")
        'short'
    """
    limit = MAX_TEXT_LENGTH[vr]
    if vr == "PN":  # the limit is per component group (alphabetic=ideographic=phonetic)
        return "=".join(group[:limit] for group in text.split("="))
    if len(text) <= limit:
        return text
    if vr in ("LO", "SH"):  # identifiers: keep two long IDs with one beginning apart
        suffix = "~" + hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:8]
        return text[:limit - len(suffix)] + suffix
    return text[:limit]


def _repair_text(dataset, derived: list[DerivedIdentifier]) -> None:
    non_ascii = False
    for element in dataset.iterall():
        if element.VR not in MAX_TEXT_LENGTH or element.value is None:
            continue
        values = list(element.value) if element.VM > 1 else [element.value]
        texts = [str(value) for value in values]
        non_ascii = non_ascii or any(not text.isascii() for text in texts)
        shortened = [shortened_text(text, element.VR) for text in texts]
        if shortened != texts:
            element.value = shortened if element.VM > 1 else shortened[0]
            limit = MAX_TEXT_LENGTH[element.VR]
            derived.append(DerivedIdentifier(element.keyword or str(element.tag), "\\".join(texts),
                                             "\\".join(shortened), f"was longer than {element.VR} allows ({limit})"))
    if non_ascii and not _text(dataset, "SpecificCharacterSet"):
        dataset.SpecificCharacterSet = UTF8_CHARACTER_SET
        derived.append(DerivedIdentifier("SpecificCharacterSet", "", UTF8_CHARACTER_SET,
                                         "was missing for non-ASCII text"))
