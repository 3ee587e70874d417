"""Who a slice belongs to (patient, series) for every format, and where that was learnt.

Identity decides "one result per patient" and "other patients only", so it must exist for
PNG exports too, not only for DICOM. At indexing, the first source that gives a patient wins:

1. ``dicom``: PatientID / SeriesInstanceUID of the file itself;
2. ``labels``: ``patient_id`` / ``series_uid`` columns of the ``--labels`` CSV;
3. ``pattern``: ``--case-pattern REGEX``, searched (:func:`re.search`) in the file's path
   relative to the indexed folder it was found in, with ``/`` separators (a file named
   directly: its file name); group 1 is the patient, group 2 (if any) the series;
4. ``folder``: a folder of slices of one scan, that is a folder holding at least
   :data:`MIN_FOLDER_SLICES` non-DICOM 2-D image files whose names differ only in their last
   number (``slice_001.png``, ``slice_002.png``...): the folder's path relative to the
   indexed folder (the indexed folder itself: its own name) is the patient and the series.
   Folders of mixed names (``ID_0001_Z_0142.tif``, ``ID_0007_Z_0080.tif``: many scans) are
   not one scan and get no identity from their folder; use ``--case-pattern`` there;
5. ``none``: nothing known; the slice is a case of its own (its file).
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum

from .errors import LungCBIRError
from .io import CTSlice, file_kind

#: A folder needs at least this many 2-D image files of one name pattern to count as one scan.
MIN_FOLDER_SLICES = 2
#: The labels CSV columns that are identity, not labels.
IDENTITY_COLUMNS = ("patient_id", "series_uid")

_LAST_NUMBER = re.compile(r"\d+(?=\D*$)")


class IdentitySource(str, Enum):
    """Where a stored slice's patient and series came from (stored as its value)."""

    DICOM = "dicom"
    LABELS = "labels"
    PATTERN = "pattern"
    FOLDER = "folder"
    NONE = "none"


@dataclass(frozen=True)
class Identity:
    patient_id: str | None
    series_uid: str | None
    source: IdentitySource


def compile_case_pattern(pattern: str | None) -> re.Pattern | None:
    """The ``--case-pattern`` as a compiled regex with at least one group; LungCBIRError if not."""
    if pattern is None:
        return None
    try:
        compiled = re.compile(pattern)
    except re.error as error:
        raise LungCBIRError(f"--case-pattern {pattern!r} is not a valid regular expression: {error}") from None
    if compiled.groups < 1:
        raise LungCBIRError(f"--case-pattern {pattern!r} needs a group: the first group is the patient, "
                            f"e.g. '^(ID_\\d+)_Z'")
    return compiled


def _name_pattern(path: str) -> str:
    """A file name with its last number blanked: equal for the slices of one export."""
    return _LAST_NUMBER.sub("#", os.path.basename(path), count=1)


class IdentityResolver:
    """Decides each slice's identity for one indexing run (see the module docstring).

    ``roots`` are the paths given to index (folders or files) and ``files`` every image file
    found under them.
    """

    def __init__(self, roots: Iterable[str | os.PathLike], files: Iterable[str],
                 case_pattern: str | re.Pattern | None = None) -> None:
        self.roots = [os.path.abspath(str(root)) for root in roots]
        self.pattern = case_pattern if isinstance(case_pattern, re.Pattern) else compile_case_pattern(case_pattern)
        self._root_of: dict[str, str] = {}
        by_folder: dict[str, list[str]] = defaultdict(list)
        for path in files:
            absolute = os.path.abspath(path)
            self._root_of[absolute] = self._root_for(absolute)
            if file_kind(absolute) == "raster":
                by_folder[os.path.dirname(absolute)].append(absolute)
        self._scan_folders = {folder: self._folder_name(folder, members[0])
                              for folder, members in by_folder.items()
                              if len(members) >= MIN_FOLDER_SLICES and len({_name_pattern(m) for m in members}) == 1}

    def _root_for(self, path: str) -> str:
        best = None
        for root in self.roots:
            inside = path == root or path.startswith(os.path.join(root, ""))
            if inside and (best is None or len(root) > len(best)):  # the innermost given folder
                best = root
        return best or os.path.dirname(path)

    def _folder_name(self, folder: str, member: str) -> str:
        root = self._root_of[member]
        if root == member:  # files named directly: relative to their own folder
            root = os.path.dirname(member)
        relative = os.path.relpath(folder, root)
        return os.path.basename(folder) if relative == "." else relative.replace(os.sep, "/")

    def relative_path(self, path: str) -> str:
        """The path the case pattern is searched in: relative to its indexed folder."""
        absolute = os.path.abspath(path)
        root = self._root_of.get(absolute) or os.path.dirname(absolute)
        if root == absolute:  # a file named directly
            return os.path.basename(absolute)
        return os.path.relpath(absolute, root).replace(os.sep, "/")

    def resolve(self, item: CTSlice, labels: dict[str, str]) -> tuple[Identity, dict[str, str]]:
        """The slice's identity and its labels without the identity columns."""
        labels = dict(labels)
        given = {key: labels.pop(key) for key in IDENTITY_COLUMNS if key in labels}
        if item.patient_id:
            return Identity(item.patient_id, item.series_uid, IdentitySource.DICOM), labels
        if given.get("patient_id") or given.get("series_uid"):
            return Identity(given["patient_id"], given.get("series_uid") or item.series_uid,
                            IdentitySource.LABELS), labels
        if self.pattern is not None:
            match = self.pattern.search(self.relative_path(item.path))
            if match and match.group(1):
                series = match.group(2) if self.pattern.groups >= 2 and match.group(2) else item.series_uid
                return Identity(match.group(1), series, IdentitySource.PATTERN), labels
        folder = self._scan_folders.get(os.path.dirname(os.path.abspath(item.path)))
        if folder is not None and item.source_format != "dicom":
            return Identity(folder, folder, IdentitySource.FOLDER), labels
        if item.series_uid:  # a DICOM file without PatientID: its series is still known
            return Identity(None, item.series_uid, IdentitySource.DICOM), labels
        return Identity(None, None, IdentitySource.NONE), labels
