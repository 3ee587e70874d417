"""A DICOMweb archive (a PACS such as Orthanc) as a source of CT slices and a place to store SEGs.

QIDO-RS finds the CT series (optionally of one study, or of studies dated on or after a day),
WADO-RS fetches their instances (a few at a time, concurrently), STOW-RS stores what we write
back (a DICOM SEG). Fetched instances are decoded with :func:`lungcbir.io.read_dicom_bytes`;
each slice's ``path`` is its WADO-RS URL, which is what gets stored as its source. An archive
is a *source* (where bytes come from), not a file format: it adds no reader class to
:data:`lungcbir.io.READERS` but reuses the DICOM one, and :class:`lungcbir.retrieval.Retriever`
picks it for paths starting with ``http(s)://``.

Authentication comes from the environment only, so it never appears on a command line, in a
stored row or in a message: ``LUNGCBIR_DICOMWEB_TOKEN`` (a bearer token), or
``LUNGCBIR_DICOMWEB_USER`` and ``LUNGCBIR_DICOMWEB_PASSWORD`` (basic auth). User and password
written into the URL (``https://user:pw@host/...``) are taken as basic auth and removed from
every URL we keep or print.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from .config import DICOMWEB_PASSWORD_ENV, DICOMWEB_TOKEN_ENV, DICOMWEB_USER_ENV, Settings
from .errors import DicomwebError, ReadError
from .io import CTSlice, read_dicom_bytes

TOKEN_ENV = DICOMWEB_TOKEN_ENV
USER_ENV = DICOMWEB_USER_ENV
PASSWORD_ENV = DICOMWEB_PASSWORD_ENV

#: Instances fetched at the same time (WADO-RS requests in flight).
FETCH_WORKERS = 4
#: Seconds to wait for an archive's answer to one request (connect, read).
TIMEOUT_S = (10.0, 120.0)
#: The modality of the series that are indexed.
CT_MODALITY = "CT"

_ACCEPT_ANY_TRANSFER_SYNTAX = 'multipart/related; type="application/dicom"; transfer-syntax=*'
_INSTANCE_URL = re.compile(r"^(?P<root>.+)/studies/(?P<study>[0-9.]+)/series/(?P<series>[0-9.]+)"
                           r"/instances/(?P<sop>[0-9.]+)$")


def is_dicomweb_url(path: str | os.PathLike) -> bool:
    """Whether an input names a DICOMweb service (``http://`` or ``https://``), not a file."""
    return str(path).lower().startswith(("http://", "https://"))


def display_url(url: str) -> str:
    """``url`` without user, password, query or fragment: what may be printed and stored."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"  # IPv6
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


@dataclass(frozen=True)
class SeriesRef:
    """One CT series found in the archive."""

    study_uid: str
    series_uid: str
    study_date: str | None = None


@dataclass(frozen=True)
class InstanceRef:
    """One instance of a series, with its place in the series (0 = most superior) when known."""

    root: str  # the service root, without credentials
    study_uid: str
    series_uid: str
    sop_uid: str
    slice_index: int | None = None

    @property
    def url(self) -> str:
        """The instance's WADO-RS URL (stored as the slice's source)."""
        return f"{self.root}/studies/{self.study_uid}/series/{self.series_uid}/instances/{self.sop_uid}"


def parse_instance_url(url: str) -> InstanceRef:
    """The parts of a WADO-RS instance URL (as stored); raises ReadError for anything else."""
    match = _INSTANCE_URL.match(display_url(url))
    if match is None:
        raise ReadError(display_url(url), "not a DICOMweb instance URL (.../studies/S/series/S/instances/I)")
    return InstanceRef(match["root"], match["study"], match["series"], match["sop"])


def _tag_value(attributes: Mapping, tag: str):
    values = attributes.get(tag, {}).get("Value") or [None]
    return values[0]


def _reason(error: Exception) -> str:
    """A one-line reason that cannot carry credentials (no request headers, no URL user info)."""
    import requests

    if isinstance(error, requests.HTTPError) and error.response is not None:
        response = error.response
        return f"HTTP {response.status_code} {response.reason or ''}".strip()
    if isinstance(error, requests.ConnectionError):
        return "cannot connect"
    if isinstance(error, requests.Timeout):
        return "timed out"
    return type(error).__name__


def _cached_file(cache_dir: Path, ref: InstanceRef) -> Path:
    """Where the instance ``ref`` is kept under ``cache_dir``: ``<study>/<series>/<sop>.dcm``."""
    return cache_dir / ref.study_uid / ref.series_uid / f"{ref.sop_uid}.dcm"


class DicomwebSource:
    """One DICOMweb service: find, fetch and store instances.

    ``root`` is the service root (``http://localhost:8042/dicom-web``); ``environ`` is where
    credentials are read from (default: the process environment; see :class:`lungcbir.config.Settings`);
    ``cache_dir``, when given, keeps a copy of every fetched instance as
    ``<cache_dir>/<study>/<series>/<sop>.dcm`` and reads it from there next time instead of
    fetching it again.

    Example:
        >>> source = DicomwebSource("http://localhost:8042/dicom-web")          # doctest: +SKIP
        >>> refs = [r for s in source.find_series() for r in source.instances(s)]  # doctest: +SKIP
        >>> slices = [item for _, item in source.read_many(refs)]              # doctest: +SKIP
    """

    def __init__(self, root: str, environ: Mapping[str, str] | None = None,
                 cache_dir: str | os.PathLike | None = None, workers: int = FETCH_WORKERS) -> None:
        if not is_dicomweb_url(root):
            raise DicomwebError(f"{root}: not a DICOMweb URL (http:// or https://)")
        settings = Settings.from_environment(environ)
        parts = urlsplit(root)
        self.root = display_url(root)
        self._token = settings.dicomweb_token
        user, password = settings.dicomweb_user, settings.dicomweb_password
        if parts.username and not user:  # credentials written into the URL
            from urllib.parse import unquote

            user, password = unquote(parts.username), unquote(parts.password or "")
        self._basic = (user, password or "") if user and not self._token else None
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.workers = max(1, workers)
        self._local = threading.local()  # one HTTP session per thread

    def __repr__(self) -> str:  # never shows the credentials
        return f"DicomwebSource({self.root!r})"

    @property
    def client(self):
        """This thread's dicomweb-client (retries off: a failure is reported, the run goes on)."""
        client = getattr(self._local, "client", None)
        if client is None:
            import requests
            from dicomweb_client.api import DICOMwebClient

            session = requests.Session()
            if self._basic:
                session.auth = self._basic
            if self._token:
                session.headers["Authorization"] = f"Bearer {self._token}"
            client = DICOMwebClient(self.root, session=session, timeout=TIMEOUT_S)
            client.set_http_retry_params(retry=False)
            self._local.client = client
        return client

    # -- QIDO-RS --------------------------------------------------------------------------------

    def find_series(self, study: str | None = None, since: date | None = None) -> list[SeriesRef]:
        """The CT series of the archive, of one study, or of studies dated ``since`` or later.

        Studies without a Study Date are not matched by ``since``.
        Raises :class:`DicomwebError` when the archive cannot be asked.
        """
        filters = {}
        if study:
            filters["StudyInstanceUID"] = study
        if since:
            filters["StudyDate"] = f"{since:%Y%m%d}-"
        try:
            studies = self.client.search_for_studies(search_filters=filters, get_remaining=True)
            found = []
            for attributes in studies:
                study_uid = _tag_value(attributes, "0020000D")
                if not study_uid or (study and study_uid != study):
                    continue
                study_date = _tag_value(attributes, "00080020")
                for series in self.client.search_for_series(
                        study_uid, search_filters={"Modality": CT_MODALITY}, get_remaining=True):
                    series_uid = _tag_value(series, "0020000E")
                    if series_uid and _tag_value(series, "00080060") in (CT_MODALITY, None):
                        found.append(SeriesRef(study_uid, series_uid, study_date))
        except Exception as error:  # requests and dicomweb-client raise many kinds
            raise DicomwebError(f"{self.root}: cannot search the archive ({_reason(error)})") from None
        return sorted(found, key=lambda s: (s.study_uid, s.series_uid))

    def instances(self, series: SeriesRef) -> list[InstanceRef]:
        """The instances of a series, superior first (by Image Position, else Instance Number)."""
        try:
            found = self.client.search_for_instances(
                series.study_uid, series.series_uid, fields=["00200032", "00200013"], get_remaining=True)
        except Exception as error:
            raise DicomwebError(f"{self.root}: cannot list the instances of series {series.series_uid} "
                                f"({_reason(error)})") from None
        keyed = []
        for attributes in found:
            sop = _tag_value(attributes, "00080018")
            if not sop:
                continue
            position = attributes.get("00200032", {}).get("Value") or []
            number = _tag_value(attributes, "00200013")
            key = (0, -float(position[2])) if len(position) == 3 else (1, int(number or 0))
            keyed.append((key, sop))
        keyed.sort()
        return [InstanceRef(self.root, series.study_uid, series.series_uid, sop, index)
                for index, (_, sop) in enumerate(keyed)]

    # -- WADO-RS --------------------------------------------------------------------------------

    def _cache_path(self, ref: InstanceRef) -> Path | None:
        if self.cache_dir is None:
            return None
        return _cached_file(self.cache_dir, ref)

    def fetch(self, ref: InstanceRef) -> bytes:
        """The instance's DICOM file as stored (any transfer syntax); raises ReadError."""
        cached = self._cache_path(ref)
        if cached is not None and cached.is_file():
            return cached.read_bytes()
        client = self.client
        try:
            response = client._http_get(ref.url, headers={"Accept": _ACCEPT_ANY_TRANSFER_SYNTAX})
            if response.headers.get("Content-Type", "").startswith("application/dicom"):
                parts = [response.content]  # some servers send the single part bare
            else:
                parts = [part for part in client._decode_multipart_message(response, stream=False) if part]
        except Exception as error:
            raise ReadError(ref.url, f"cannot fetch the instance ({_reason(error)})") from None
        if len(parts) != 1:
            raise ReadError(ref.url, f"the archive sent {len(parts)} parts for one instance")
        data = parts[0]
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            temporary = cached.with_name(cached.name + ".tmp")
            temporary.write_bytes(data)
            os.replace(temporary, cached)  # a killed run leaves no half file under the real name
        return data

    def read(self, ref: InstanceRef) -> CTSlice:
        """Fetch and decode one instance; its ``path`` is the WADO-RS URL. Raises ReadError."""
        item = read_dicom_bytes(self.fetch(ref), ref.url)
        item.slice_index = ref.slice_index
        if item.sop_uid and item.sop_uid != ref.sop_uid:
            raise ReadError(ref.url, f"the archive sent instance {item.sop_uid}")
        item.sop_uid = ref.sop_uid
        return item

    def read_many(self, refs: Sequence[InstanceRef]) -> Iterator[tuple[InstanceRef, CTSlice | ReadError]]:
        """:meth:`read` for many instances, in order, ``workers`` requests at a time."""
        def attempt(ref: InstanceRef) -> CTSlice | ReadError:
            try:
                return self.read(ref)
            except ReadError as error:
                return error

        window = self.workers * 2  # fetched ahead of the consumer, to bound memory
        with ThreadPoolExecutor(self.workers) as pool:
            pending = []
            for ref in refs:
                pending.append((ref, pool.submit(attempt, ref)))
                if len(pending) >= window:
                    done, future = pending.pop(0)
                    yield done, future.result()
            for done, future in pending:
                yield done, future.result()

    def download(self, study: str) -> tuple[dict[str, str], list[ReadError]]:
        """Fetch the CT series of one study into :attr:`cache_dir` (one folder per series), so
        that they can be read like local series. Returns {series folder: series URL} and the
        instances that could not be fetched. Raises DicomwebError when nothing is found."""
        cache_dir = self.cache_dir
        if cache_dir is None:
            raise DicomwebError("download needs a cache folder")
        folders, failures = {}, []
        series_found = self.find_series(study)
        if not series_found:
            raise DicomwebError(f"{self.root}: no CT series in study {study}")
        for series in series_found:
            for ref in self.instances(series):
                try:
                    self.fetch(ref)
                except ReadError as error:
                    failures.append(error)
                    continue
                folder = str(_cached_file(cache_dir, ref).parent)
                folders[folder] = f"{self.root}/studies/{series.study_uid}/series/{series.series_uid}"
        return folders, failures

    # -- STOW-RS --------------------------------------------------------------------------------

    def store(self, paths: Iterable[str | os.PathLike]) -> list[str]:
        """Store DICOM files in the archive; returns their SOP Instance UIDs.

        Raises :class:`DicomwebError` when the archive refuses any of them.
        """
        import pydicom

        datasets = [pydicom.dcmread(str(path)) for path in paths]
        try:
            answer = self.client.store_instances(datasets)
        except Exception as error:
            raise DicomwebError(f"{self.root}: cannot store ({_reason(error)})") from None
        failed = answer.get("FailedSOPSequence") if answer is not None else None
        if failed:
            reasons = sorted({str(item.get("FailureReason", "?")) for item in failed})
            raise DicomwebError(f"{self.root}: the archive refused {len(failed)} instances "
                                f"(failure reason {', '.join(reasons)})")
        return [str(dataset.SOPInstanceUID) for dataset in datasets]


def fetch_slice(url: str, environ: Mapping[str, str] | None = None) -> CTSlice:
    """Fetch one stored instance by its WADO-RS URL (a stored row's path); raises ReadError."""
    ref = parse_instance_url(url)
    return DicomwebSource(ref.root, environ, workers=1).read(ref)

