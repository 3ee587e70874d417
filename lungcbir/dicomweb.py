"""A DICOMweb archive (a PACS such as Orthanc) as a source of CT slices and a place to store SEGs.

QIDO-RS finds the CT series (optionally of one study, or of studies dated on or after a day),
WADO-RS fetches their instances (a few at a time, concurrently), STOW-RS stores what we write
back (a DICOM SEG). Fetched instances are decoded with :func:`lungcbir.io.decode`;
each slice's ``path`` is its WADO-RS URL, which is what gets stored as its source. An archive
is a *source* (where bytes come from), not a file format: it adds no reader class to
:data:`lungcbir.io.READERS` but reuses the DICOM one, and :class:`lungcbir.retrieval.Retriever`
picks it for paths starting with ``http(s)://``.

Authentication comes from the environment only, so it never appears on a command line, in a
stored row or in a message: ``LUNGCBIR_DICOMWEB_TOKEN`` (a bearer token), or
``LUNGCBIR_DICOMWEB_USER`` and ``LUNGCBIR_DICOMWEB_PASSWORD`` (basic auth). User and password
written into the URL (``https://user:pw@host/...``) are taken as basic auth and removed from
every URL we keep or print.

An archive is not trusted: every UID it answers is checked (:func:`is_uid`) before it goes into
a URL or a cache file name; an answer must be complete within
``LUNGCBIR_DICOMWEB_RESPONSE_SECONDS`` and a search may take at most
``LUNGCBIR_DICOMWEB_MAX_PAGES`` pages; a redirect to another host is not followed; an instance
is kept only when it is the one asked for and of modality CT (or none).
"""

from __future__ import annotations

import functools
import io
import math
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import date
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urljoin, urlsplit, urlunsplit

import requests
from requests.adapters import HTTPAdapter

from .config import (
    DICOMWEB_MAX_PAGES_ENV,
    DICOMWEB_PASSWORD_ENV,
    DICOMWEB_RESPONSE_SECONDS_ENV,
    DICOMWEB_TOKEN_ENV,
    DICOMWEB_USER_ENV,
    Settings,
)
from .errors import DicomwebError, ReadError
from .io import CTSlice, decode, slice_axis_position

if TYPE_CHECKING:
    from pydicom import Dataset

TOKEN_ENV = DICOMWEB_TOKEN_ENV
USER_ENV = DICOMWEB_USER_ENV
PASSWORD_ENV = DICOMWEB_PASSWORD_ENV

#: Instances fetched at the same time (WADO-RS requests in flight).
FETCH_WORKERS = 4
#: Seconds to wait for an archive to accept a connection, and for each read of its answer; the
#: whole answer is bounded by ``Settings.dicomweb_response_seconds``.
TIMEOUT_S = (10.0, 120.0)
#: Results asked for per page of a search (QIDO-RS ``limit``); an archive may send fewer.
QIDO_PAGE_SIZE = 1000
#: Attempts per request when the archive answers "busy" (429, 502, 503, 504): a PACS under load
#: or behind a restarting proxy answers one of these now and then, and one should not fail a
#: whole series. Waits between attempts grow exponentially from RETRY_WAIT_MS.
RETRY_ATTEMPTS = 3
RETRY_WAIT_MS = 500
RETRY_STATUSES = (HTTPStatus.TOO_MANY_REQUESTS, HTTPStatus.BAD_GATEWAY, HTTPStatus.SERVICE_UNAVAILABLE,
                  HTTPStatus.GATEWAY_TIMEOUT)
#: The modality of the series and instances that are indexed.
CT_MODALITY = "CT"
#: The longest UID DICOM allows.
MAX_UID_LENGTH = 64

_ACCEPT_ANY_TRANSFER_SYNTAX = 'multipart/related; type="application/dicom"; transfer-syntax=*'
_UID_PATTERN = r"[0-9]+(?:\.[0-9]+)*"  # digits and dots; no empty component, so never "." or ".."
_UID = re.compile(_UID_PATTERN)
_INSTANCE_URL = re.compile(rf"^(?P<root>.+)/studies/(?P<study>{_UID_PATTERN})/series/(?P<series>{_UID_PATTERN})"
                           rf"/instances/(?P<sop>{_UID_PATTERN})$")


def is_uid(value: object) -> bool:
    """Whether ``value`` is a UID we put into a URL or a file name: digits and dots (no empty
    component), at most 64 characters. Anything else from an archive is refused, so an answer
    like ``../../x`` or ``/etc/x`` can neither climb out of the cache nor change a URL."""
    return isinstance(value, str) and len(value) <= MAX_UID_LENGTH and _UID.fullmatch(value) is not None


def _shown(value: object) -> str:
    """An archive's value, quoted for a message: one line of ASCII, however hostile."""
    return ascii(str(value)[:MAX_UID_LENGTH + 16])


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
    if match is None or not all(is_uid(match[part]) for part in ("study", "series", "sop")):
        raise ReadError(display_url(url), "not a DICOMweb instance URL (.../studies/S/series/S/instances/I)")
    return InstanceRef(match["root"], match["study"], match["series"], match["sop"])


def _tag_values(attributes: object, tag: str) -> list:
    """The values of a tag in a DICOM JSON dataset; [] for a missing or malformed one."""
    element = attributes.get(tag) if isinstance(attributes, Mapping) else None
    values = element.get("Value") if isinstance(element, Mapping) else None
    return values if isinstance(values, list) else []


def _tag_value(attributes: object, tag: str) -> Any:
    values = _tag_values(attributes, tag)
    return values[0] if values else None


def _number(value: object, kind: Callable[[Any], float | int]) -> float | int | None:
    """``value`` as a finite number, or None (unknown) for anything else, as local files' tags are read."""
    if isinstance(value, bool):
        return None
    try:
        number = kind(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None


def _order_key(attributes: object) -> tuple:
    """Where an instance sits in its series from its QIDO attributes: by Image Position along the
    slice normal from Image Orientation (superior first for axial slices), else Instance Number;
    malformed values count as unknown (0), as in :func:`lungcbir.io.dicom_series_positions`."""
    z = slice_axis_position(_tag_values(attributes, "00200032"), _tag_values(attributes, "00200037"))
    if z is not None:
        return (0, -z)
    return (1, _number(_tag_value(attributes, "00200013"), int) or 0)


class _Refused(requests.RequestException):
    """An archive answer that is not used (too slow, too many pages, a redirect elsewhere, not
    DICOM JSON); its text is the reason. A RequestException, so requests and dicomweb-client
    pass it through unchanged."""


def _reason(error: Exception) -> str:
    """A one-line reason that cannot carry credentials (no request headers, no URL user info)."""
    if isinstance(error, _Refused):
        return str(error)
    if isinstance(error, requests.HTTPError) and error.response is not None:
        response = error.response
        return f"HTTP {response.status_code} {response.reason or ''}".strip()
    if isinstance(error, requests.JSONDecodeError):
        return "the archive's answer is not JSON"
    if isinstance(error, requests.TooManyRedirects):
        return "too many redirects"
    if isinstance(error, requests.ConnectionError):
        return "cannot connect"
    if isinstance(error, requests.Timeout):
        return "timed out"
    if isinstance(error, (requests.exceptions.ChunkedEncodingError, requests.exceptions.ContentDecodingError)):
        return "the archive's answer broke off or cannot be decoded"
    # dicomweb-client's own parsing (a multipart answer without its boundary, say); the text
    # holds no credentials: they travel in headers and the root URL we give has none
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200]}" if text else type(error).__name__


def _cached_file(cache_dir: Path, ref: InstanceRef) -> Path:
    """Where the instance ``ref`` is kept under ``cache_dir``: ``<study>/<series>/<sop>.dcm``,
    a name built from checked UIDs only, so it cannot leave ``cache_dir``."""
    if not all(is_uid(uid) for uid in (ref.study_uid, ref.series_uid, ref.sop_uid)):
        raise ReadError(ref.url, "not a DICOM UID (digits and dots), not cached")
    return cache_dir / ref.study_uid / ref.series_uid / f"{ref.sop_uid}.dcm"


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    return parts.scheme.lower(), (parts.hostname or "").lower(), parts.port or {"http": 80, "https": 443}.get(
        parts.scheme.lower())


class _WatchedConnection:
    """Mixed into urllib3's connection classes: a connection that sends a request while
    :class:`_BoundedSession` waits for an answer is noted, so that the deadline can shut its
    socket (a read blocked on a trickling server wakes up only then)."""

    watched = threading.local()  # this thread's list of connections in use, while it waits

    def request(self, *args: Any, **kwargs: Any) -> Any:
        in_use = getattr(self.watched, "connections", None)
        if in_use is not None:
            in_use.append(self)  # while the request is sent (its socket may not exist yet)
        answer = super().request(*args, **kwargs)  # type: ignore[misc]
        sock = getattr(self, "sock", None)
        if in_use is not None and sock is not None:
            # the answer is read from this socket even after http.client lets go of it (an
            # answer with "Connection: close" detaches it from the connection)
            in_use.append(sock)
        return answer


@functools.cache
def _watched(connection_class: type) -> type:
    if issubclass(connection_class, _WatchedConnection):
        return connection_class
    return type(f"Watched{connection_class.__name__}", (_WatchedConnection, connection_class), {})


class _WatchedAdapter(HTTPAdapter):
    """Every pool (direct, proxied, TLS or not) makes watched connections."""

    def get_connection_with_tls_context(self, *args: Any, **kwargs: Any) -> Any:
        pool = super().get_connection_with_tls_context(*args, **kwargs)
        pool.ConnectionCls = _watched(pool.ConnectionCls)
        return pool


class _BoundedSession(requests.Session):
    """A session whose answers are complete within ``seconds`` (connection, headers, body and
    redirects together; requests' own timeout is per read only) and that follows redirects on
    the same host only. The body is bounded for requests without ``stream=True``: every
    request this module and dicomweb-client make for it."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds
        adapter = _WatchedAdapter()
        self.mount("http://", adapter)
        self.mount("https://", adapter)

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        watched = _WatchedConnection.watched
        if getattr(watched, "connections", None) is not None:  # a redirect: the first send's deadline holds
            return super().send(request, **kwargs)
        in_use: list = []
        expired = threading.Event()

        def expire() -> None:
            expired.set()
            for item in in_use:
                sock = item if isinstance(item, socket.socket) else getattr(item, "sock", None)
                if sock is not None:
                    try:  # the plain socket's shutdown: a TLS socket's own would unwrap it under the reader
                        socket.socket.shutdown(sock, socket.SHUT_RDWR)
                    except OSError:
                        pass  # already closed

        timer = threading.Timer(self.seconds, expire)
        timer.daemon = True
        watched.connections = in_use
        timer.start()
        try:
            response = super().send(request, **kwargs)
        except Exception:
            if expired.is_set():
                raise self._too_slow() from None
            raise
        finally:
            timer.cancel()
            watched.connections = None
        if expired.is_set():  # an answer without a length may look complete when cut off
            raise self._too_slow()
        return response

    def _too_slow(self) -> _Refused:
        return _Refused(f"no complete answer within {self.seconds:g} s ({DICOMWEB_RESPONSE_SECONDS_ENV})")

    def get_redirect_target(self, resp: requests.Response) -> str | None:
        target = super().get_redirect_target(resp)
        if target and _origin(urljoin(resp.url, target)) != _origin(resp.url):
            raise _Refused(f"redirected to {display_url(urljoin(resp.url, target))}, another host: not followed")
        return target


class DicomwebSource:
    """One DICOMweb service: find, fetch and store instances.

    ``root`` is the service root (``http://localhost:8042/dicom-web``); ``environ`` is where
    credentials are read from (default: the process environment; see :class:`lungcbir.config.Settings`);
    ``cache_dir``, when given, keeps a copy of every fetched instance as
    ``<cache_dir>/<study>/<series>/<sop>.dcm`` and reads it from there next time instead of
    fetching it again.

    Example (needs an archive, so not run as a doctest; ``tests/test_dicomweb.py`` runs the
    same against a fake archive and a real Orthanc)::

        source = DicomwebSource("http://localhost:8042/dicom-web")
        series, unusable = source.find_series()
        refs = [r for s in series for r in source.instances(s)[0]]
        slices = [item for _, item in source.read_many(refs)]
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
        self.response_seconds = settings.dicomweb_response_seconds
        self.max_pages = settings.dicomweb_max_pages
        self._local = threading.local()  # one HTTP session per thread

    def __repr__(self) -> str:  # never shows the credentials
        return f"DicomwebSource({self.root!r})"

    @property
    def client(self) -> _Client:
        """This thread's connection to the archive (busy answers retried, see :data:`RETRY_ATTEMPTS`)."""
        client = getattr(self._local, "client", None)
        if client is None:
            session = _BoundedSession(self.response_seconds)
            if self._basic:
                session.auth = self._basic
            if self._token:
                session.headers["Authorization"] = f"Bearer {self._token}"
            client = self._local.client = _Client(self.root, session)
        return client

    # -- QIDO-RS --------------------------------------------------------------------------------

    def series_url(self, series: SeriesRef) -> str:
        """The series' URL in the archive (how messages name it)."""
        return f"{self.root}/studies/{series.study_uid}/series/{series.series_uid}"

    def _search(self, search: Callable[..., object], what: str) -> list:
        """Every result of a QIDO-RS search, a page of :data:`QIDO_PAGE_SIZE` at a time, at most
        :attr:`max_pages` pages; raises :class:`_Refused` beyond that, or when the archive
        answers the same page twice (it ignores ``offset``: paging would never end)."""
        found: list = []
        previous = None
        for _ in range(self.max_pages):
            page = search(limit=QIDO_PAGE_SIZE, offset=len(found))
            if not isinstance(page, list):
                raise _Refused("the archive's answer is not a list of DICOM JSON datasets")
            if not page:
                return found
            if page == previous:
                raise _Refused(f"the archive ignores offset (it sent the same page of {what} twice)")
            found.extend(page)
            previous = page
        raise _Refused(f"more than {self.max_pages} pages of {QIDO_PAGE_SIZE} {what} ({DICOMWEB_MAX_PAGES_ENV})")

    def find_series(self, study: str | None = None,
                    since: date | None = None) -> tuple[list[SeriesRef], list[ReadError]]:
        """The CT series of the archive, of one study, or of studies dated ``since`` or later,
        and the series that cannot be used (a study or series UID that is not a UID).

        Studies without a Study Date are not matched by ``since``.
        Raises :class:`DicomwebError` when the archive cannot be asked.
        """
        if study is not None and not is_uid(study):
            raise DicomwebError(f"study {_shown(study)}: not a DICOM UID (digits and dots, "
                                f"at most {MAX_UID_LENGTH} characters)")
        filters = {}
        if study:
            filters["StudyInstanceUID"] = study
        if since:
            filters["StudyDate"] = f"{since:%Y%m%d}-"
        found, rejected = [], []
        try:
            studies = self._search(functools.partial(self.client.search_studies, search_filters=filters),
                                   "studies")
            for attributes in studies:
                study_uid = _tag_value(attributes, "0020000D")
                if not study_uid or (study and study_uid != study):
                    continue
                if not is_uid(study_uid):
                    rejected.append(ReadError(self.root, f"a study's Study Instance UID is not a DICOM UID "
                                                         f"({_shown(study_uid)})"))
                    continue
                study_date = _tag_value(attributes, "00080020")
                series_found = self._search(functools.partial(
                    self.client.search_series, study_uid, search_filters={"Modality": CT_MODALITY}),
                    f"series of study {study_uid}")
                for series in series_found:
                    series_uid = _tag_value(series, "0020000E")
                    if not series_uid or _tag_value(series, "00080060") not in (CT_MODALITY, None):
                        continue
                    if not is_uid(series_uid):
                        rejected.append(ReadError(f"{self.root}/studies/{study_uid}", f"a series' Series Instance "
                                                  f"UID is not a DICOM UID ({_shown(series_uid)})"))
                        continue
                    found.append(SeriesRef(study_uid, series_uid,
                                           study_date if isinstance(study_date, str) else None))
        except Exception as error:  # requests and dicomweb-client raise many kinds
            raise DicomwebError(f"{self.root}: cannot search the archive ({_reason(error)})") from None
        return sorted(set(found), key=lambda s: (s.study_uid, s.series_uid)), rejected

    def instances(self, series: SeriesRef) -> tuple[list[InstanceRef], list[ReadError]]:
        """The instances of a series, superior first (by Image Position, else Instance Number),
        and the instances that cannot be used (a SOP Instance UID that is not a UID).

        Raises :class:`DicomwebError` when the archive cannot list them.
        """
        series_url = self.series_url(series)
        if not (is_uid(series.study_uid) and is_uid(series.series_uid)):
            raise DicomwebError(f"{series_url}: not a DICOM UID (digits and dots)")
        try:
            found = self._search(functools.partial(
                self.client.search_instances, series.study_uid, series.series_uid,
                fields=["00200032", "00200037", "00200013"]), f"instances of series {series.series_uid}")
        except Exception as error:
            raise DicomwebError(f"{self.root}: cannot list the instances of series {series.series_uid} "
                                f"({_reason(error)})") from None
        keyed, rejected, seen = [], [], set()
        for attributes in found:
            sop = _tag_value(attributes, "00080018")
            if not sop:
                continue
            if not is_uid(sop):
                rejected.append(ReadError(series_url, f"an instance's SOP Instance UID is not a DICOM UID "
                                                      f"({_shown(sop)})"))
                continue
            if sop not in seen:  # an archive may list an instance twice
                seen.add(sop)
                keyed.append((_order_key(attributes), sop))
        keyed.sort()
        return [InstanceRef(self.root, series.study_uid, series.series_uid, sop, index)
                for index, (_, sop) in enumerate(keyed)], rejected

    # -- WADO-RS --------------------------------------------------------------------------------

    def _cache_path(self, ref: InstanceRef) -> Path | None:
        if self.cache_dir is None:
            return None
        return _cached_file(self.cache_dir, ref)

    def cached_url(self, path: str | os.PathLike) -> str | None:
        """The archive URL of a series folder or instance file under :attr:`cache_dir` (how
        messages name it); None for any other path."""
        if self.cache_dir is None:
            return None
        try:
            parts = Path(os.path.abspath(path)).relative_to(os.path.abspath(self.cache_dir)).parts
        except ValueError:
            return None
        if len(parts) == 2 and all(is_uid(part) for part in parts):
            return self.series_url(SeriesRef(*parts))
        if len(parts) == 3 and parts[2].endswith(".dcm"):
            study, series, sop = parts[0], parts[1], parts[2].removesuffix(".dcm")
            if all(is_uid(part) for part in (study, series, sop)):
                return InstanceRef(self.root, study, series, sop).url
        return None

    def fetch(self, ref: InstanceRef) -> bytes:
        """The instance's DICOM file as stored (any transfer syntax), from the cache when it
        holds it; raises ReadError. Nothing is written here: :meth:`read` caches what it checked."""
        cached = self._cache_path(ref)
        if cached is not None and cached.is_file():
            return cached.read_bytes()
        try:
            parts = self.client.instance_parts(ref.url)
        except Exception as error:
            raise ReadError(ref.url, f"cannot fetch the instance ({_reason(error)})") from None
        if len(parts) != 1:
            raise ReadError(ref.url, f"the archive sent {len(parts)} parts for one instance")
        return parts[0]

    def read(self, ref: InstanceRef) -> CTSlice:
        """Fetch and decode one instance; its ``path`` is the WADO-RS URL. Raises ReadError when
        it cannot be decoded, is another instance than the one asked for, or is not CT. Only
        then is it written to the cache."""
        data = self.fetch(ref)
        item = decode(data, ref.url, kind="dicom")[0]
        item.slice_index = ref.slice_index
        if item.sop_uid and item.sop_uid != ref.sop_uid:
            raise ReadError(ref.url, f"the archive sent instance {_shown(item.sop_uid)}")
        modality = _modality(data)
        if modality not in (CT_MODALITY, None):
            raise ReadError(ref.url, f"not a CT instance (Modality {_shown(modality)})")
        item.sop_uid = ref.sop_uid
        cached = self._cache_path(ref)
        if cached is not None and not cached.is_file():
            cached.parent.mkdir(parents=True, exist_ok=True)
            temporary = cached.with_name(cached.name + ".tmp")
            temporary.write_bytes(data)
            os.replace(temporary, cached)  # a killed run leaves no half file under the real name
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

    def headers(self, urls: Sequence[str]) -> list[Dataset]:
        """The DICOM headers (no pixels) of this archive's instances, by their WADO-RS URLs, in
        order: what a SEG of slices fetched into memory needs (:meth:`series_slices` keeps the
        pixels only). Raises ReadError for a URL of another archive, an instance that cannot be
        fetched or parsed, or another instance than the one asked for."""
        import pydicom

        refs = [parse_instance_url(url) for url in urls]
        for ref in refs:
            if ref.root != self.root:  # our credentials go to this archive only
                raise ReadError(ref.url, "not an instance of this archive")

        def header(ref: InstanceRef) -> Dataset:
            data = self.fetch(ref)
            try:
                found = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
            except Exception as error:  # pydicom raises many kinds on malformed headers
                raise ReadError(ref.url, f"unreadable DICOM header ({type(error).__name__})") from None
            sop = str(found.get("SOPInstanceUID", "") or "")
            if sop and sop != ref.sop_uid:
                raise ReadError(ref.url, f"the archive sent instance {_shown(sop)}")
            found.SOPInstanceUID = ref.sop_uid  # as read() names it: the SEG refers to what the archive holds
            return found

        with ThreadPoolExecutor(self.workers) as pool:
            return list(pool.map(header, refs))

    def series_slices(self, study: str, series: str | None = None) -> tuple[list[CTSlice], list[ReadError]]:
        """The slices of one CT series of ``study`` (the study's only one when ``series`` is not
        given), fetched into memory in series order, and what could not be fetched. Raises
        :class:`DicomwebError` when the study holds no such series, or several and none was chosen."""
        if series is not None and not is_uid(series):
            raise DicomwebError(f"series {_shown(series)}: not a DICOM UID (digits and dots, "
                                f"at most {MAX_UID_LENGTH} characters)")
        found, failures = self.find_series(study)
        chosen = [ref for ref in found if series is None or ref.series_uid == series]
        if not chosen:
            what = f"series {series}" if series else "CT series"
            raise DicomwebError(f"{self.root}: no {what} in study {study}")
        if len(chosen) > 1:
            raise DicomwebError(f"{self.root}: study {study} has {len(chosen)} CT series; choose one with --series "
                                f"({', '.join(ref.series_uid for ref in chosen[:5])})")
        refs, rejected = self.instances(chosen[0])
        failures += rejected
        slices: list[CTSlice] = []
        for _, outcome in self.read_many(refs):
            if isinstance(outcome, ReadError):
                failures.append(outcome)
            else:
                slices.append(outcome)
        return slices, failures

    def download(self, study: str) -> tuple[dict[str, str], list[ReadError]]:
        """Fetch the CT series of one study into :attr:`cache_dir` (one folder per series), so
        that they can be read like local series. Returns {series folder: series URL} and what
        could not be fetched or listed (named by its URL). Raises DicomwebError when nothing is
        found."""
        cache_dir = self.cache_dir
        if cache_dir is None:
            raise DicomwebError("download needs a cache folder")
        folders: dict[str, str] = {}
        series_found, failures = self.find_series(study)
        if not series_found:
            raise DicomwebError(f"{self.root}: no CT series in study {study}")
        for series in series_found:
            try:
                refs, rejected = self.instances(series)
            except DicomwebError as error:
                failures.append(ReadError(self.series_url(series), str(error).removeprefix(f"{self.root}: ")))
                continue
            failures += rejected
            for ref, outcome in self.read_many(refs):
                if isinstance(outcome, ReadError):
                    failures.append(outcome)
                else:
                    folders[str(_cached_file(cache_dir, ref).parent)] = self.series_url(series)
        return folders, failures

    # -- STOW-RS --------------------------------------------------------------------------------

    def store(self, paths: Iterable[str | os.PathLike]) -> list[str]:
        """Store DICOM files in the archive; returns their SOP Instance UIDs.

        Raises :class:`DicomwebError` when the archive refuses any of them.
        """
        import pydicom

        datasets = [pydicom.dcmread(str(path)) for path in paths]
        try:
            answer = self.client.store(datasets)
        except Exception as error:
            raise DicomwebError(f"{self.root}: cannot store ({_reason(error)})") from None
        failed = answer.get("FailedSOPSequence") if answer is not None else None
        if failed:
            reasons = sorted({str(item.get("FailureReason", "?")) for item in failed})
            raise DicomwebError(f"{self.root}: the archive refused {len(failed)} instances "
                                f"(failure reason {', '.join(reasons)})")
        return [str(dataset.SOPInstanceUID) for dataset in datasets]


class _Client:
    """The one place lungcbir talks to dicomweb-client (its private calls included), so a new
    version of it changes this class only. A busy answer (:data:`RETRY_STATUSES`) is asked
    again, at most :data:`RETRY_ATTEMPTS` times in all; nothing else is (a refused or too slow
    answer fails at once: the response bound is per answer, not per attempt)."""

    def __init__(self, root: str, session: requests.Session) -> None:
        from dicomweb_client.api import DICOMwebClient

        self.session = session
        self._client = DICOMwebClient(root, session=session, timeout=TIMEOUT_S)
        self._client.set_http_retry_params(retry=False)  # its retries would also repeat timeouts

    def search_studies(self, **options) -> list:
        return _retried(lambda: self._client.search_for_studies(**options))

    def search_series(self, study_uid: str, **options) -> list:
        return _retried(lambda: self._client.search_for_series(study_uid, **options))

    def search_instances(self, study_uid: str, series_uid: str, **options) -> list:
        return _retried(lambda: self._client.search_for_instances(study_uid, series_uid, **options))

    def instance_parts(self, url: str) -> list[bytes]:
        """The parts of a WADO-RS answer for one instance (any transfer syntax)."""
        response = _retried(lambda: self._client._http_get(url, headers={"Accept": _ACCEPT_ANY_TRANSFER_SYNTAX}))
        if response.headers.get("Content-Type", "").startswith("application/dicom"):
            return [response.content]  # some servers send the single part bare
        return [part for part in self._client._decode_multipart_message(response, stream=False) if part]

    def store(self, datasets: list) -> Dataset | None:
        """STOW-RS; the archive's answer (a FailedSOPSequence names refused instances)."""
        return _retried(lambda: self._client.store_instances(datasets))


def _retried(call: Callable[[], Any]) -> Any:
    for attempt in range(1, RETRY_ATTEMPTS + 1):
        try:
            return call()
        except requests.HTTPError as error:
            status = error.response.status_code if error.response is not None else None
            if status not in RETRY_STATUSES or attempt == RETRY_ATTEMPTS:
                raise
        time.sleep(RETRY_WAIT_MS / 1000 * 2 ** (attempt - 1))


def _modality(data: bytes) -> str | None:
    """The Modality of a DICOM file (None when it has none or cannot be parsed: the reader
    has judged the file already)."""
    import pydicom

    try:
        value = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, specific_tags=["Modality"]).get(
            "Modality")
    except Exception:  # pydicom raises many kinds on malformed headers
        return None
    text = str(value or "").strip()
    return text or None


def fetch_slice(url: str, environ: Mapping[str, str] | None = None) -> CTSlice:
    """Fetch one stored instance by its WADO-RS URL (a stored row's path); raises ReadError."""
    ref = parse_instance_url(url)
    return DicomwebSource(ref.root, environ, workers=1).read(ref)

