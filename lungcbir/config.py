"""Configuration: every environment variable lungcbir reads, and every default, in one place.

:class:`Settings` is a frozen value built by :meth:`Settings.from_environment` (from
``os.environ`` or any mapping); nothing here is global or mutable. Explicit arguments win over
it: the CLI's options (``--db``, ``--index-dir``, ``--token-file``), ``Retriever(db_url=...)``,
``read_file(path, max_voxels=...)``, ``DicomwebSource(url, environ=...)``.

| setting | variable | default |
|---|---|---|
| database URL | ``LUNGCBIR_DB`` | ``sqlite:///db/lungcbir.sqlite`` (a file **relative to the working directory**) |
| FAISS index folder | ``LUNGCBIR_INDEX_DIR`` | ``index``, relative to the working directory |
| shared real data (tests, benchmarks, training) | ``LUNGCBIR_DATA`` | ``../shared/data``, relative to it too |
| largest volume, voxels | ``LUNGCBIR_MAX_VOXELS`` | 512 x 512 x 768 |
| the ONNX model made from the weights | ``LUNGCBIR_CACHE_DIR`` | ``$XDG_CACHE_HOME/lungcbir`` or ``~/.cache/...`` |
| where the network runs (``lungcbir.runtimes``) | ``LUNGCBIR_RUNTIME`` | ``auto``: ONNX Runtime on CPU, torch on CUDA |
| threads of the ONNX Runtime session | ``LUNGCBIR_THREADS`` | the CPUs this process may use |
| web access token | ``LUNGCBIR_TOKEN`` | none (``serve --token-file`` takes precedence) |
| DICOMweb credentials | ``LUNGCBIR_DICOMWEB_TOKEN``, or ``..._USER`` + ``LUNGCBIR_DICOMWEB_PASSWORD`` | none |
| longest wait for one DICOMweb answer, seconds | ``LUNGCBIR_DICOMWEB_RESPONSE_SECONDS`` | 300 |
| most pages of one DICOMweb search (QIDO-RS) | ``LUNGCBIR_DICOMWEB_MAX_PAGES`` | 100 (of 1000 results) |

An empty variable counts as unset. Values are checked here (a bad ``LUNGCBIR_MAX_VOXELS``
raises :class:`ConfigError`); what a token must look like is checked where it is used
(:func:`lungcbir.websecurity.load_token`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from .errors import LungCBIRError

Number = TypeVar("Number", int, float)

DB_ENV = "LUNGCBIR_DB"
INDEX_DIR_ENV = "LUNGCBIR_INDEX_DIR"
DATA_ENV = "LUNGCBIR_DATA"
MAX_VOXELS_ENV = "LUNGCBIR_MAX_VOXELS"
CACHE_DIR_ENV = "LUNGCBIR_CACHE_DIR"
RUNTIME_ENV = "LUNGCBIR_RUNTIME"
THREADS_ENV = "LUNGCBIR_THREADS"
TOKEN_ENV = "LUNGCBIR_TOKEN"
DICOMWEB_TOKEN_ENV = "LUNGCBIR_DICOMWEB_TOKEN"
DICOMWEB_USER_ENV = "LUNGCBIR_DICOMWEB_USER"
DICOMWEB_PASSWORD_ENV = "LUNGCBIR_DICOMWEB_PASSWORD"
DICOMWEB_RESPONSE_SECONDS_ENV = "LUNGCBIR_DICOMWEB_RESPONSE_SECONDS"
DICOMWEB_MAX_PAGES_ENV = "LUNGCBIR_DICOMWEB_MAX_PAGES"

#: A SQLite file relative to the working directory (``./db/lungcbir.sqlite``), so a first run
#: needs no setup; a shared installation sets ``LUNGCBIR_DB`` (e.g. a PostgreSQL URL).
DEFAULT_DB_URL = "sqlite:///db/lungcbir.sqlite"
#: The FAISS index folder, relative to the working directory.
DEFAULT_INDEX_DIR = "index"
#: The shared real-data folder, relative to the working directory (a checkout's sibling
#: ``shared/data`` when run from the checkout); never derived from where the package is
#: installed, which for a wheel is site-packages.
DEFAULT_DATA_ROOT = "../shared/data"
#: Volumes (NIfTI) with more voxels than this are refused from their header, before anything
#: is decompressed or decoded. 512 x 512 x 768 admits a chest CT at 0.625 mm over 48 cm
#: (about 600-770 slices; 0.8 GB as float32) and refuses a 512 x 512 x 1000 volume, which a
#: 0.5 MB .nii.gz of zeros can claim.
DEFAULT_MAX_VOXELS = 512 * 512 * 768
#: An archive answer (headers and body, after any redirect) must be complete within this many
#: seconds, however slowly it trickles in: the per-read timeout alone lets a server that sends a
#: byte every few seconds hold a run forever. Kept below the default claim timeout (600 s), so
#: a run waiting on one answer still renews its claim in time.
DEFAULT_DICOMWEB_RESPONSE_SECONDS = 300.0
#: A search (QIDO-RS) reads at most this many pages of results, so an archive that ignores
#: ``offset`` (it answers the first page again and again) cannot keep a run paging forever.
DEFAULT_DICOMWEB_MAX_PAGES = 100
#: ``auto``: ONNX Runtime on the CPU (faster there, see docs/scale.md), torch on CUDA.
DEFAULT_RUNTIME = "auto"


class ConfigError(LungCBIRError):
    """A configuration value that cannot be used (exit status 2)."""


@dataclass(frozen=True)
class Settings:
    """Where lungcbir keeps and finds things, and its limits.

    Example:
        >>> Settings.from_environment({"LUNGCBIR_DB": "sqlite:///x.sqlite"}).db_url
        'sqlite:///x.sqlite'
        >>> Settings.from_environment({}).index_dir
        'index'
    """

    db_url: str = DEFAULT_DB_URL
    index_dir: str = DEFAULT_INDEX_DIR
    data_root: Path = Path(DEFAULT_DATA_ROOT)
    max_voxels: int = DEFAULT_MAX_VOXELS
    token: str | None = None  # the web server's access token, unchecked (see load_token)
    dicomweb_token: str | None = None
    dicomweb_user: str | None = None
    dicomweb_password: str | None = None
    dicomweb_response_seconds: float = DEFAULT_DICOMWEB_RESPONSE_SECONDS
    dicomweb_max_pages: int = DEFAULT_DICOMWEB_MAX_PAGES
    #: derived files kept between runs (the ONNX model generated from the weights); never a
    #: source of truth: anything in it may be deleted and is generated again
    cache_dir: Path = Path("~/.cache/lungcbir").expanduser()
    runtime: str = DEFAULT_RUNTIME  # checked where it is used (lungcbir.runtimes.RUNTIME_REGISTRY)
    threads: int | None = None  # None: the CPUs this process may use

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> "Settings":
        """The settings from ``environ`` (default ``os.environ``); unset or empty variables
        give the defaults. Raises :class:`ConfigError` for a value that cannot be used."""
        environ = os.environ if environ is None else environ

        def text(name: str) -> str | None:
            value = environ.get(name)
            return value if value not in (None, "") else None

        return cls(db_url=text(DB_ENV) or DEFAULT_DB_URL,
                   index_dir=text(INDEX_DIR_ENV) or DEFAULT_INDEX_DIR,
                   data_root=Path(text(DATA_ENV) or DEFAULT_DATA_ROOT),
                   max_voxels=_positive(environ, MAX_VOXELS_ENV, DEFAULT_MAX_VOXELS, int, "whole number of voxels"),
                   token=text(TOKEN_ENV),
                   dicomweb_token=text(DICOMWEB_TOKEN_ENV),
                   dicomweb_user=text(DICOMWEB_USER_ENV),
                   dicomweb_password=text(DICOMWEB_PASSWORD_ENV),
                   dicomweb_response_seconds=_positive(environ, DICOMWEB_RESPONSE_SECONDS_ENV,
                                                       DEFAULT_DICOMWEB_RESPONSE_SECONDS, float, "number of seconds"),
                   dicomweb_max_pages=_positive(environ, DICOMWEB_MAX_PAGES_ENV, DEFAULT_DICOMWEB_MAX_PAGES, int,
                                                "whole number of pages"),
                   cache_dir=_cache_dir(text(CACHE_DIR_ENV), text("XDG_CACHE_HOME")),
                   runtime=text(RUNTIME_ENV) or DEFAULT_RUNTIME,
                   threads=_positive(environ, THREADS_ENV, 0, int, "whole number of threads") or None)  # 0: unset


def _cache_dir(explicit: str | None, xdg_cache: str | None) -> Path:
    if explicit:
        return Path(explicit).expanduser()
    # the XDG base directory rule: $XDG_CACHE_HOME when set to an absolute path, else ~/.cache
    base = Path(xdg_cache) if xdg_cache and os.path.isabs(xdg_cache) else Path("~/.cache").expanduser()
    return base / "lungcbir"


def _positive(environ: Mapping[str, str], name: str, default: Number, kind: Callable[[str], Number],
              unit: str) -> Number:
    """A positive number from ``environ[name]``, ``default`` when unset or empty."""
    text = environ.get(name, "").strip()
    if not text:
        return default
    try:
        value: Number | None = kind(text)
    except ValueError:
        value = None
    if value is None or not 0 < value < float("inf"):  # also refuses "nan"
        raise ConfigError(f"{name}={text!r}: expected a positive {unit}")
    return value
