"""The exceptions lungcbir raises; the CLI and web layer turn them into one-line messages."""

from __future__ import annotations


class LungCBIRError(Exception):
    """Base class of every error lungcbir raises on purpose."""

    exit_code = 2


class ReadError(LungCBIRError):
    """A file could not be read as a CT image."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class WeightsError(LungCBIRError):
    """Model weights are missing, unreadable or of the wrong shape."""

    exit_code = 3


class StoreError(LungCBIRError):
    """The database or FAISS index cannot be used as asked."""

    exit_code = 4


class NoRegionsError(StoreError):
    """A region query on a store that holds no regions, or none this version can search (made
    by another model or region recipe). ``advice`` says how to make them without naming the
    database, for a client that must not see its URL (the web)."""

    def __init__(self, message: str, advice: str) -> None:
        super().__init__(message)
        self.advice = advice


class LockedError(StoreError):
    """Another process holds the write lock of an index folder."""

    exit_code = 5


class SegError(LungCBIRError):
    """A DICOM Segmentation could not be made from these sources (mixed series, no geometry...)."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class DicomwebError(LungCBIRError):
    """A DICOMweb archive cannot be searched or refuses what we store (unreachable, HTTP error)."""


class FilterError(LungCBIRError):
    """A result filter is malformed (not KEY=VALUE) or names a key that is neither a stored label
    nor a metadata column; the CLI reports it as bad usage, the web as 422."""


class UploadRefused(LungCBIRError):
    """An uploaded series is over its limits (files, bytes, a ZIP bomb) or holds no readable slice."""


class RegionError(LungCBIRError):
    """A query region is unusable: a box not ``X0,Y0,X1,Y1``, outside the image or empty, or a
    region mask of another size than the image, or empty. Bad usage: exit status 2, web 422."""
