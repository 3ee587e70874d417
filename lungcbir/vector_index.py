"""The vector side of a store: a FAISS index of the stored vectors, a cache of the database.

The index's ids are the rows' primary keys. It is written atomically, with a note beside it
recording the database state it holds (generation, count, lowest and highest id, model; see
:meth:`lungcbir.database.Database.state`) and the file's SHA-256. An index is used as it is
only at the database's current generation; it is caught up by adding rows only when every
change since its generation was an addition, and rebuilt from the stored vectors otherwise
(missing, corrupt, of another model, or rows were removed).

The file is a checkpoint, not a copy kept in step: rewriting it after every committed batch
would cost the whole index (199 MiB at 1 M compact rows) per batch. Additions are written
when the rows added since the file reach :data:`CHECKPOINT_SHARE` of the index or the file
is :data:`CHECKPOINT_SECONDS` old, and at the end of an indexing run
(:meth:`VectorIndex.checkpoint`); rebuilds and removals are written at once. A run killed
between checkpoints leaves a file of an earlier generation, which the next load catches up
from the database (rows added since) like any index out of step: the database is the truth.

Index kinds are one registry, :data:`INDEX_KIND_REGISTRY` (name, description, build, tune,
describe, search parameters, whether it can remove, how many candidates it re-ranks); a new
kind is one :class:`IndexKind` entry there, and the CLI's ``rebuild-index --kind`` choice follows.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import faiss
import numpy as np

from .database import STATE_KEYS, Committed, Database, RegionRows, same_state
from .errors import LockedError, StoreError
from .fileutils import sha256_of as _sha256_of
from .fileutils import write_atomically as _write_atomically

INDEX_FILE = "lungcbir.faiss"
INDEX_META_FILE = "lungcbir.faiss.json"
#: The regions' index (:class:`lungcbir.database.RegionRows`) beside the slices' in the same folder.
REGION_INDEX_FILE = "regions.faiss"
LOCK_FILE = "write.lock"
#: ``auto`` switches from exact search to the compact kind (IVF, PQ codes, re-ranked) at this
#: many vectors (see docs/scale.md).
AUTO_IVF_FROM = 100_000
IVF_NPROBE = 32
#: The compact kind's PQ codes: one byte (8-bit code) per this many dimensions.
COMPACT_DIMENSIONS_PER_BYTE = 4
#: The compact kind re-ranks this many candidates per query by their exact stored vectors.
COMPACT_RERANK = 200
HNSW_EF_SEARCH = 128
#: How long a search trusts an unchanged generation before it reads the full database state again.
FULL_CHECK_SECONDS = 10.0
#: Additions are written to the index file once the rows added since it was written reach this
#: share of the rows in it: the cost of a write (the whole index) is then spread over a number of
#: new rows that grows with the index, so indexing into a large store costs what it costs into
#: an empty one, and a load after a crash catches up at most this share from the database.
CHECKPOINT_SHARE = 0.05
#: ... or once the file is this old (seconds; in a long run into a very large store, writes of
#: the whole index at most this often), whichever comes first.
CHECKPOINT_SECONDS = 600.0
#: Version of the note written beside the index file; notes of other versions are not trusted.
INDEX_NOTE_FORMAT = 2
#: Stored vectors are unit vectors, so a similarity beyond the query's norm, give or take
#: float16 rounding (about 1e-3), means a corrupt index or vector.
SCORE_TOLERANCE = 1e-2
#: Rebuilds tried while rows are removed meanwhile, before using an index not tied to a state.
REBUILD_ATTEMPTS = 3
#: A search restricted to at most this many rows (a ``--where`` filter) is exact, over their
#: vectors read from the database (about 1 KB each, so at most ~20 MB read): simpler than the
#: index and exact for every index kind. Larger sets go through the FAISS index with an id
#: selector, and fall back to the exact search where an approximate index found too few.
EXACT_RESTRICTED_SEARCH_MAX = 20_000

#: ``stream()`` yields (int64 ids, float32 vectors) chunks; ``sample(n)`` about n vectors.
Stream = Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]]
Sample = Callable[[int], np.ndarray]


@dataclass(frozen=True)
class IndexKind:
    """One kind of FAISS index: how to build, tune and describe it.

    ``build(count, dimension, stream, sample)`` returns the index filled from ``stream()``
    (``count`` vectors; ``sample`` for training); ``holds(index)`` says whether an index read
    from a file is of this kind, so ``tune`` (search-time parameters, which FAISS files do not
    always keep), ``describe`` and ``search_parameters`` (its tuning plus an id selector) can
    be found for it. ``supports_remove``: whether rows can be removed in place (else a removal
    rebuilds the index). ``rerank``: when not 0, a search asks the index for this many
    candidates (at least k) and ranks them again by their exact vectors read from the database
    (:meth:`lungcbir.database.Database.vectors_of`), so the index's codes only need to find
    them, not order them; the scores returned are then exact.
    """

    name: str
    description: str
    build: Callable[[int, int, Stream, Sample], faiss.Index]
    holds: Callable[[faiss.Index], bool]
    tune: Callable[[faiss.Index], None]
    describe: Callable[[faiss.Index], str]
    search_parameters: Callable[[faiss.Index, faiss.IDSelector], faiss.SearchParameters]
    supports_remove: bool = True
    rerank: int = 0
    # fewer vectors than FAISS needs to train this kind (a clustering of N centroids needs N
    # points): such an index is built exact (flat) instead, as ``auto`` does below its threshold,
    # and becomes this kind at its next rebuild (a small region index of a compact store, say)
    min_vectors: int = 0


def _filled(index: faiss.Index, stream: Stream) -> faiss.Index:
    for ids, vectors in stream():
        index.add_with_ids(vectors, ids)
    return index


def _ivf_of(index: faiss.Index) -> faiss.IndexIVF | None:
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def _hnsw_of(index: faiss.Index) -> faiss.IndexHNSWFlat | None:
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else None
    return inner if isinstance(inner, faiss.IndexHNSWFlat) else None


def _ivf(index: faiss.Index) -> faiss.IndexIVF:
    return faiss.extract_index_ivf(index)


def _is_pq(ivf: faiss.IndexIVF | None) -> bool:
    return ivf is not None and isinstance(faiss.downcast_index(ivf), faiss.IndexIVFPQ)


def _pq(index: faiss.Index) -> faiss.IndexIVFPQ:
    inner = faiss.downcast_index(_ivf(index))
    if not isinstance(inner, faiss.IndexIVFPQ):
        raise StoreError("not a compact (IVF, PQ) index")
    return inner


def _hnsw(index: faiss.Index) -> faiss.IndexHNSWFlat:
    graph = _hnsw_of(index)
    if graph is None:
        raise StoreError("not an HNSW index")
    return graph


def _build_flat(count: int, dimension: int, stream: Stream, sample: Sample) -> faiss.Index:
    return _filled(faiss.IndexIDMap2(faiss.IndexFlatIP(dimension)), stream)


#: The fewest inverted lists an IVF index gets, and the codes of one PQ code book (8 bits):
#: each is a k-means that FAISS cannot train on fewer points.
MIN_IVF_LISTS, PQ_CODES = 16, 256


def _ivf_lists(count: int) -> int:
    return int(min(max(MIN_IVF_LISTS, 2 * np.sqrt(count)), 65536, max(MIN_IVF_LISTS, count // 39)))


def _build_ivf(count: int, dimension: int, stream: Stream, sample: Sample) -> faiss.Index:
    # float16 codes: 8-bit codes lose too much (neighbouring slices differ in the third
    # decimal of their similarity)
    lists = _ivf_lists(count)
    index = faiss.index_factory(dimension, f"IVF{lists},SQfp16", faiss.METRIC_INNER_PRODUCT)
    index.train(sample(min(count, max(40 * lists, 20_000))))
    return _filled(index, stream)


def _build_compact(count: int, dimension: int, stream: Stream, sample: Sample) -> faiss.Index:
    # PQ codes of one byte per 4 dimensions find the candidates; their order comes from the
    # exact stored vectors (``rerank``). PQ needs a dimension divisible by its sub-vectors:
    # others (e.g. 773 = 2 x 256 + 256 + 5 with a findings part) are padded with zero columns
    per_byte = COMPACT_DIMENSIONS_PER_BYTE
    padded = -(-dimension // per_byte) * per_byte
    lists = _ivf_lists(count)
    index = faiss.index_factory(padded, f"IVF{lists},PQ{padded // per_byte}x8np", faiss.METRIC_INNER_PRODUCT)
    if padded != dimension:
        # (d_in, d_out, uniform): the input columns spread evenly, zeros between; the SWIG
        # stubs know only the (d_in, d_out, map) form
        remap = faiss.RemapDimensionsTransform(dimension, padded, True)  # type: ignore[arg-type]
        index = faiss.IndexPreTransform(remap, index)
    # PQ's 256 codes per sub-vector want ~10,000 training vectors even for few lists
    index.train(sample(min(count, max(40 * lists, 20_000))))
    return _filled(index, stream)


def _build_hnsw(count: int, dimension: int, stream: Stream, sample: Sample) -> faiss.Index:
    graph = faiss.IndexHNSWFlat(dimension, 32, faiss.METRIC_INNER_PRODUCT)
    graph.hnsw.efConstruction = 80
    return _filled(faiss.IndexIDMap2(graph), stream)


def _build_auto(count: int, dimension: int, stream: Stream, sample: Sample) -> faiss.Index:
    name = "flat" if count < AUTO_IVF_FROM else "compact"
    return INDEX_KIND_REGISTRY[name].build(count, dimension, stream, sample)


def _set_nprobe(index: faiss.Index) -> None:
    _ivf(index).nprobe = IVF_NPROBE


def _set_ef_search(index: faiss.Index) -> None:
    _hnsw(index).hnsw.efSearch = HNSW_EF_SEARCH


def _never(index: faiss.Index) -> bool:
    return False


def _untuned(index: faiss.Index) -> None:
    pass


_FLAT = IndexKind(
    "flat", "exact search (IndexFlatIP), 4 bytes per dimension", _build_flat,
    holds=lambda index: isinstance(index, faiss.IndexIDMap2) and isinstance(faiss.downcast_index(index.index),
                                                                        faiss.IndexFlat), tune=_untuned,
    describe=lambda index: "flat (exact)",
    # faiss's SWIG stubs list no constructor keywords, which its Python layer does accept
    search_parameters=lambda index, selector: faiss.SearchParameters(sel=selector))  # type: ignore[call-arg]
_IVF = IndexKind(
    "ivf", f"inverted lists of float16 vectors (IVF, SQfp16), 2 bytes per dimension, nprobe {IVF_NPROBE}",
    _build_ivf, holds=lambda index: _ivf_of(index) is not None and not _is_pq(_ivf_of(index)), tune=_set_nprobe,
    describe=lambda index: f"ivf (lists={_ivf(index).nlist}, nprobe={_ivf(index).nprobe}, float16)",
    search_parameters=lambda index, selector: faiss.SearchParametersIVF(  # type: ignore[call-arg]
        sel=selector, nprobe=_ivf(index).nprobe),
    min_vectors=MIN_IVF_LISTS)
_HNSW = IndexKind(
    "hnsw", "a graph index (HNSW32), fast but as large as flat, no removal", _build_hnsw,
    holds=lambda index: _hnsw_of(index) is not None, tune=_set_ef_search,
    describe=lambda index: f"hnsw (M=32, efSearch={_hnsw(index).hnsw.efSearch})",
    search_parameters=lambda index, selector: faiss.SearchParametersHNSW(  # type: ignore[attr-defined]
        sel=selector, efSearch=_hnsw(index).hnsw.efSearch),
    supports_remove=False)
_COMPACT = IndexKind(
    "compact", f"inverted lists of PQ codes (IVF, PQ), 1 byte per {COMPACT_DIMENSIONS_PER_BYTE} dimensions, "
               f"nprobe {IVF_NPROBE}, the top {COMPACT_RERANK} re-ranked by the stored vectors",
    _build_compact, holds=lambda index: _is_pq(_ivf_of(index)), tune=_set_nprobe,
    describe=lambda index: f"compact (lists={_ivf(index).nlist}, nprobe={_ivf(index).nprobe}, "
                           f"PQ {_pq(index).pq.M} bytes, re-ranks {COMPACT_RERANK})",
    search_parameters=lambda index, selector: faiss.SearchParametersIVF(  # type: ignore[call-arg]
        sel=selector, nprobe=_ivf(index).nprobe),
    rerank=COMPACT_RERANK, min_vectors=PQ_CODES)
# a choice, not a kind of index: what it builds is flat or compact, so it holds no index itself
_AUTO = IndexKind(
    "auto", f"flat below {AUTO_IVF_FROM:,} vectors, compact from there on", _build_auto, holds=_never,
    tune=_untuned, describe=lambda index: "auto",
    search_parameters=lambda index, selector: faiss.SearchParameters(sel=selector))  # type: ignore[call-arg]

#: Every index kind by name, the default (``auto``) first; the CLI's ``--kind`` lists these.
INDEX_KIND_REGISTRY: dict[str, IndexKind] = {kind.name: kind for kind in (_AUTO, _FLAT, _IVF, _HNSW, _COMPACT)}
INDEX_KINDS = tuple(INDEX_KIND_REGISTRY)
DEFAULT_INDEX_KIND = "auto"


def kind_of(index: faiss.Index) -> IndexKind:
    """The registry entry of a built index (one read from a file included); an index no
    entry holds is treated as exact (``flat``): searched without parameters, not tuned."""
    for kind in INDEX_KIND_REGISTRY.values():
        if kind.holds(index):
            return kind
    return _FLAT


def build_index(kind: str, count: int, dimension: int, stream: Stream, sample: Sample) -> faiss.Index:
    """A tuned FAISS inner-product index of the given kind (see :data:`INDEX_KIND_REGISTRY`),
    filled from ``stream()`` chunks; an empty one, or one with fewer vectors than its kind can be
    trained on (:attr:`IndexKind.min_vectors`), is flat, whatever the kind."""
    if kind not in INDEX_KIND_REGISTRY:
        raise StoreError(f"unknown index kind {kind!r}")
    name = "flat" if count == 0 or count < INDEX_KIND_REGISTRY[kind].min_vectors else kind
    index = INDEX_KIND_REGISTRY[name].build(count, dimension, stream, sample)
    tune_index(index)
    return index


def tune_index(index: faiss.Index) -> None:
    """Set an index's search-time parameters, which FAISS files do not always keep."""
    kind_of(index).tune(index)


def describe_index(index: faiss.Index) -> str:
    """A short human description of an index: kind and search parameters."""
    return kind_of(index).describe(index)


def index_ids(index: faiss.Index) -> np.ndarray:
    """Every id stored in an index (IDMap or IVF)."""
    if isinstance(index, faiss.IndexIDMap2) or hasattr(index, "id_map"):
        return faiss.vector_to_array(index.id_map)
    ivf = faiss.extract_index_ivf(index)
    lists = ivf.invlists  # typed Optional by the stubs; a built IVF index always has its lists
    parts = [faiss.rev_swig_ptr(lists.get_ids(n), lists.list_size(n)).copy()  # type: ignore[union-attr]
             for n in range(ivf.nlist) if lists.list_size(n)]  # type: ignore[union-attr]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def _unique_per_row(scores: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's first (best) hit of every id; the rest of the row is id -1, score -inf."""
    unique_scores, unique_ids = np.full_like(scores, -np.inf), np.full_like(ids, -1)
    for row, (row_scores, row_ids) in enumerate(zip(scores, ids)):
        _, first = np.unique(row_ids, return_index=True)
        keep = np.sort(first[row_ids[first] >= 0])
        unique_scores[row, :len(keep)], unique_ids[row, :len(keep)] = row_scores[keep], row_ids[keep]
    return unique_scores, unique_ids


class VectorIndex:
    """The FAISS index of one index folder, kept in agreement with a :class:`Database`.

    Read-only when the database is: an index out of step is then brought up to date in
    memory only and no file is written. Catch-up, rebuild and search are serialised, so one
    VectorIndex may be used from many threads. The regions' index is the same class over
    :class:`~lungcbir.database.RegionRows` (their table, generation and change log), in the
    file ``file_name`` (:data:`REGION_INDEX_FILE`) of the same folder.
    """

    def __init__(self, index_dir: str | os.PathLike, database: Database | RegionRows,
                 file_name: str = INDEX_FILE) -> None:
        self.index_dir = Path(index_dir)
        self.database = database
        self.file_name = file_name
        self._index: faiss.Index | None = None
        self._index_state: dict | None = None  # the database state self._index holds exactly
        self._verified_at = -float("inf")  # time.monotonic() of the last full state check that matched
        #: the state the index file holds as this process last wrote or read it, and when it
        #: wrote it: how far the index in memory is ahead of its checkpoint
        self._file_state: dict | None = None
        self._written_at = -float("inf")
        self._lock = threading.RLock()

    @property
    def read_only(self) -> bool:
        return self.database.read_only

    @property
    def path(self) -> Path:
        return self.index_dir / self.file_name

    @property
    def meta_path(self) -> Path:
        return self.index_dir / (INDEX_META_FILE if self.file_name == INDEX_FILE else f"{self.file_name}.json")

    # -- kind ---------------------------------------------------------------------------------

    @property
    def kind(self) -> str:
        """The index kind set for this store (remembered in the database), ``auto`` if none."""
        return self.database.setting("index_kind") or DEFAULT_INDEX_KIND

    def set_kind(self, kind: str) -> None:
        """Remember ``kind`` for this and later rebuilds."""
        if kind not in INDEX_KIND_REGISTRY:
            raise StoreError(f"unknown index kind {kind!r}; choose from {', '.join(INDEX_KIND_REGISTRY)}")
        self.database.set_setting("index_kind", kind)

    # -- files ----------------------------------------------------------------------------------

    def _save(self, index: faiss.Index, state: dict, force: bool = True) -> None:
        """Keep ``index`` as the one in use, holding exactly ``state``, and (unless read-only)
        write it with a note of that state and the file's checksum, each file atomically.

        ``force=False`` (``index`` is the file's index plus added rows): write only when a
        checkpoint is due (:data:`CHECKPOINT_SHARE`, :data:`CHECKPOINT_SECONDS`)."""
        self._index, self._index_state = index, state
        if self.read_only or state["count"] != index.ntotal:
            return
        if not force and not self._checkpoint_due(index, state):
            return
        try:
            digest = _write_atomically(self.path, lambda path: faiss.write_index(index, path))
            note = dict(state, sha256=digest, format=INDEX_NOTE_FORMAT)
            _write_atomically(self.meta_path, lambda path: Path(path).write_text(json.dumps(note, indent=1)))
            self._file_state, self._written_at = dict(state), time.monotonic()
        except OSError as error:
            if self.index_dir.exists() and not os.access(self.index_dir, os.W_OK):
                return  # a read-only index folder (a query node): serve from memory
            raise StoreError(f"cannot write the index in {self.index_dir}: {error.strerror}") from None

    def _checkpoint_due(self, index: faiss.Index, state: dict) -> bool:
        """Whether the rows added since the file was written call for writing it again."""
        saved = self._file_state
        if same_state(saved, state):
            return False
        if saved is None or saved.get("model_id") != state.get("model_id") \
                or saved.get("generation", 0) > state.get("generation", 0):
            return True  # the file is not known to be an earlier state of this index
        in_file = int(saved.get("count") or 0)
        behind = index.ntotal - in_file
        if behind <= 0:
            return True  # not rows added to the file's: not its descendant
        return behind >= CHECKPOINT_SHARE * in_file or time.monotonic() - self._written_at >= CHECKPOINT_SECONDS

    def checkpoint(self) -> faiss.Index:
        """The index matching the database now, written to the file if the file is behind (the
        end of an indexing run: ``check`` then finds the file current)."""
        with self._lock:
            index = self.current()
            state = self._index_state
            if state is not None and self._index is index and not same_state(self._file_state, state):
                self._save(index, state)
            return index

    def _read_file(self) -> tuple[faiss.Index, dict] | None:
        """The saved index and the state its note records, if the file is the one the note
        describes (same SHA-256) and agrees with it; None otherwise (then it is rebuilt)."""
        try:
            note = json.loads(self.meta_path.read_text())
            if not isinstance(note, dict) or note.get("format") != INDEX_NOTE_FORMAT:
                return None
            with open(self.path, "rb") as handle:
                inode = os.fstat(handle.fileno()).st_ino
                if _sha256_of(handle) != note.get("sha256"):
                    return None  # corrupt, or replaced by another writer after the note was read
                index = faiss.read_index(str(self.path))
                if os.stat(self.path).st_ino != inode:
                    return None  # replaced while it was read
        except (OSError, ValueError, RuntimeError):
            return None
        state = {key: note.get(key) for key in STATE_KEYS}
        dimension = self.database.dimension
        if state["model_id"] != self.database.model_id or (dimension and index.d != dimension) \
                or index.ntotal != state["count"]:
            return None
        tune_index(index)
        if self._file_state is None or state.get("generation", 0) >= self._file_state.get("generation", 0):
            self._file_state = dict(state)  # the checkpoint the index in memory will grow from
            self._written_at = time.monotonic()  # its age counts from here (its mtime may be another host's)
        return index, state

    # -- keeping up with the database -------------------------------------------------------------

    def current(self) -> faiss.Index:
        """The FAISS index matching the database now.

        Used as it is when it holds the database's current generation; brought up to date by
        adding only the rows indexed since when every change since was an addition (another
        process or machine may have added them); rebuilt from the stored vectors when it is
        missing, corrupt, of another model, or rows were removed.
        """
        with self._lock:
            # every change takes the next generation in its own transaction: an unchanged
            # generation means unchanged rows, so the full state (which counts every row) is
            # read again only every FULL_CHECK_SECONDS, as a guard against any other writer
            if self._index is not None and self._index_state is not None \
                    and time.monotonic() - self._verified_at < FULL_CHECK_SECONDS \
                    and self.database.generation() == self._index_state.get("generation"):
                return self._index
            meta = self.database.state()
            if self._index is not None and same_state(self._index_state, meta):
                self._verified_at = time.monotonic()
                return self._index
            # the index in memory first: catching it up reads only the rows added, where
            # considering the file reads and hashes the whole index
            if self._index is not None and self._index_state is not None \
                    and self._catch_up(self._index, self._index_state, meta):
                return self._index
            saved = self._read_file()
            if saved is not None:
                index, state = saved
                if same_state(state, meta):
                    self._index, self._index_state = index, state
                    return index
                if self._catch_up(index, state, meta):
                    return index
            return self.rebuild()

    def _rows_added_since(self, saved: dict, meta: dict) -> int:
        """How many rows were added between the database state ``saved`` (an index's, or its
        note's) and ``meta`` when every change between them was an addition; 0 otherwise."""
        first, last = saved.get("generation"), meta["generation"]
        if any(saved.get(key) != meta[key] for key in ("model_id", "dimension")) \
                or not isinstance(first, int) or first >= last:
            return 0  # nothing since, or other rows under the same generation: a version without the log
        changes = self.database.changes_between(first, last)
        if changes is None or len(changes) != last - first or any(kind != "add" for kind, _ in changes):
            return 0  # no change log (a database of an earlier version), or removals since
        added = sum(rows for _, rows in changes)
        return added if saved.get("count", -1) + added == meta["count"] else 0

    def _catch_up(self, index: faiss.Index, state: dict, meta: dict) -> bool:
        """Add the rows added since ``state`` to ``index`` if every change since was an addition."""
        if index.ntotal != state.get("count"):
            return False
        expected = self._rows_added_since(state, meta)
        if not expected:
            return False
        if self._index is index:
            self._index, self._index_state = None, None  # untrusted until caught up
        added = 0
        # ids grow with generations (writers take the generation first), so the rows added
        # since ``state`` are those between its highest id and the current one
        for ids, vectors in self.database.iter_vectors(after=state["max_id"], up_to=meta["max_id"]):
            index.add_with_ids(vectors, ids)
            added += len(ids)
        if added != expected:
            return False  # rows removed meanwhile: the index is dropped and rebuilt
        self._save(index, meta, force=False)  # additions: written when a checkpoint is due
        return True

    def rebuild(self) -> faiss.Index:
        """Build a fresh index of the set kind from the stored vectors, streamed, and save it."""
        with self._lock:
            for _ in range(REBUILD_ATTEMPTS):
                meta = self.database.state()
                # rows added meanwhile get higher ids: leave them out, to hold exactly ``meta``
                index = build_index(self.kind, meta["count"], meta["dimension"] or 1,
                                    functools.partial(self.database.iter_vectors, up_to=meta["max_id"]),
                                    self.database.training_sample)
                if index.ntotal == meta["count"]:
                    self._save(index, meta)
                    return index
            # rows kept being removed while they were read: use it, but tie it to no state
            self._index, self._index_state = index, None
            return index

    def added(self, committed: Committed, vectors: np.ndarray) -> None:
        """Follow rows this process just added (``vectors``: theirs, in ``committed.ids`` order)."""
        ids = np.asarray(committed.ids, dtype=np.int64)
        self._apply_own_change(committed, lambda index: index.add_with_ids(vectors, ids), removes=False)

    def removed(self, committed: Committed) -> None:
        """Follow rows this process just removed."""
        gone = np.asarray(committed.ids, dtype=np.int64)
        # faiss's Python layer takes an id array here; the SWIG stubs know only the IDSelector form
        self._apply_own_change(committed, lambda index: index.remove_ids(gone),  # type: ignore[arg-type]
                               removes=True)

    def _apply_own_change(self, committed: Committed, change: Callable[[faiss.Index], object],
                          removes: bool) -> None:
        """Apply a change just committed (as ``committed.generation``) to the index in use when
        that index holds the generation before; otherwise catch up or rebuild."""
        generation, state = committed.generation, committed.state
        with self._lock:
            if self._index is None:
                saved = self._read_file()
                if saved is not None:
                    self._index, self._index_state = saved
            index, held = self._index, self._index_state
            if index is not None and held is not None and held.get("generation") == generation - 1 \
                    and all(held.get(key) == state[key] for key in ("model_id", "dimension")):
                self._index, self._index_state = None, None  # untrusted until the change is applied
                if removes and not kind_of(index).supports_remove:
                    index = None
                else:
                    try:
                        change(index)
                    except RuntimeError:  # a kind that cannot do it after all
                        index = None
                if index is not None and index.ntotal == state["count"]:
                    # additions wait for a checkpoint (the database has them); a removal is
                    # written at once, as catching up cannot replay it (it would rebuild)
                    self._save(index, state, force=removes)
                    return
            self.current()  # catches up or rebuilds

    # -- search -------------------------------------------------------------------------------------

    def search(self, vectors: np.ndarray, k: int, restrict_to: np.ndarray | None = None,
               exact_up_to: int = EXACT_RESTRICTED_SEARCH_MAX) -> tuple[np.ndarray, np.ndarray]:
        """Scores and ids of the ``k`` nearest stored vectors for each query vector, best first.

        ``restrict_to`` (row ids) searches among those rows only, so k of them come back
        however many other rows are nearer: exactly, over their stored vectors, for at most
        ``exact_up_to`` rows (see :data:`EXACT_RESTRICTED_SEARCH_MAX`). No id comes twice in a
        row of the answer; missing places are id -1, score -inf. Similarities beyond the query
        vector's norm (stored vectors are unit vectors) mean a corrupt index: it is rebuilt
        from the database once, automatically; if the rebuilt one answers such scores too, the
        stored vectors themselves are corrupt and :class:`StoreError` says so.
        """
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if restrict_to is not None:
            restrict_to = np.unique(np.asarray(restrict_to, dtype=np.int64))
            if len(restrict_to) == 0:
                return np.zeros((len(vectors), 0), np.float32), np.zeros((len(vectors), 0), np.int64)
            k = min(k, len(restrict_to))
        limit = np.linalg.norm(vectors, axis=1, keepdims=True) * (1 + SCORE_TOLERANCE) + SCORE_TOLERANCE
        with self._lock:
            for attempt in range(2):
                index = self.current() if attempt == 0 else self.rebuild()
                if index.ntotal == 0:
                    return np.zeros((len(vectors), 0), np.float32), np.zeros((len(vectors), 0), np.int64)
                if vectors.shape[1] != index.d:
                    raise StoreError(f"query vectors have dimension {vectors.shape[1]}, the index {index.d}")
                scores, ids = self._search_index(index, vectors, k, restrict_to, exact_up_to)
                wrong = (ids >= 0) & ~(np.abs(scores) <= limit)  # NaN counts as wrong
                if not wrong.any():
                    return _unique_per_row(scores, ids)
        raise StoreError(f"similarity {scores[wrong][0]:.3g} outside [-1, 1] from an index rebuilt from the "
                         f"database: some stored vectors are corrupt; `lungcbir check` counts them "
                         f"(remove and index their files again, then `lungcbir rebuild-index`)")

    def _search_index(self, index: faiss.Index, vectors: np.ndarray, k: int,
                      restrict_to: np.ndarray | None, exact_up_to: int) -> tuple[np.ndarray, np.ndarray]:
        kind = kind_of(index)
        depth = max(k, kind.rerank) if kind.rerank else k
        if restrict_to is None:
            scores, ids = index.search(vectors, min(depth, index.ntotal))
            return self._reranked(vectors, ids, k) if kind.rerank else (scores, ids)
        if len(restrict_to) <= exact_up_to:
            return self._exact_search(vectors, k, restrict_to)
        selector = faiss.IDSelectorBatch(restrict_to)
        scores, ids = index.search(vectors, depth, params=kind.search_parameters(index, selector))
        if kind.rerank:
            scores, ids = self._reranked(vectors, ids, k)
        short = (ids >= 0).sum(axis=1) < k  # an approximate index may miss some of a small subset
        if short.any():
            scores[short], ids[short] = self._exact_search(vectors[short], k, restrict_to)
        return scores, ids

    def _reranked(self, vectors: np.ndarray, candidates: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The top ``k`` of each row's ``candidates`` (ids, -1 for none) by exact similarity to
        the stored vectors, read from the database; rows removed since are left out."""
        wanted = np.unique(candidates[candidates >= 0])
        found_ids, found_vectors = np.zeros(0, np.int64), np.zeros((0, vectors.shape[1]), np.float32)
        chunks = list(self.database.vectors_of(wanted))
        if chunks:
            found_ids = np.concatenate([chunk_ids for chunk_ids, _ in chunks])
            found_vectors = np.concatenate([chunk_vectors for _, chunk_vectors in chunks])
            order = np.argsort(found_ids)
            found_ids, found_vectors = found_ids[order], found_vectors[order]
        width = min(k, candidates.shape[1])
        scores = np.full((len(vectors), width), -np.inf, np.float32)
        ids = np.full((len(vectors), width), -1, np.int64)
        if not len(found_ids):
            return scores, ids
        for row, (query, row_ids) in enumerate(zip(vectors, candidates)):
            place = np.minimum(np.searchsorted(found_ids, row_ids), len(found_ids) - 1)
            known = (row_ids >= 0) & (found_ids[place] == row_ids)
            row_scores = found_vectors[place[known]] @ query
            best = np.argsort(-row_scores, kind="stable")[:width]
            scores[row, :len(best)], ids[row, :len(best)] = row_scores[best], row_ids[known][best]
        return scores, ids

    def _exact_search(self, vectors: np.ndarray, k: int, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Brute-force top ``k`` among rows ``ids``, their vectors streamed from the database."""
        best_scores = np.full((len(vectors), 0), -np.inf, np.float32)
        best_ids = np.zeros((len(vectors), 0), np.int64)
        for chunk_ids, chunk_vectors in self.database.vectors_of(ids):
            chunk_scores = vectors @ chunk_vectors.T
            best_scores = np.hstack([best_scores, chunk_scores])
            best_ids = np.hstack([best_ids, np.broadcast_to(chunk_ids, chunk_scores.shape)])
            if best_scores.shape[1] > k:  # keep the running top k only
                keep = np.argpartition(-best_scores, k - 1, axis=1)[:, :k]
                best_scores = np.take_along_axis(best_scores, keep, 1)
                best_ids = np.take_along_axis(best_ids, keep, 1)
        order = np.argsort(-best_scores, axis=1, kind="stable")
        scores = np.take_along_axis(best_scores, order, 1)
        found = np.take_along_axis(best_ids, order, 1)
        missing = k - found.shape[1]  # rows removed since their ids were read
        if missing > 0:
            scores = np.hstack([scores, np.full((len(vectors), missing), -np.inf, np.float32)])
            found = np.hstack([found, np.full((len(vectors), missing), -1, np.int64)])
        return scores.astype(np.float32), found

    # -- the lock and checks ------------------------------------------------------------------------

    @contextlib.contextmanager
    def write_lock(self, wait: bool = False) -> Iterator[None]:
        """Hold the index folder's write lock: one writer at a time per index."""
        try:
            self.index_dir.mkdir(parents=True, exist_ok=True)
            handle = open(self.index_dir / LOCK_FILE, "a")
        except OSError as error:
            raise StoreError(f"cannot use the index folder {self.index_dir}: {error.strerror}") from None
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise LockedError(f"another indexing run holds the lock on {self.index_dir}; "
                                  f"try again later or pass --wait") from None
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def check(self, state: dict, stored_ids: set[int]) -> list[str]:
        """What is wrong with the index file and its note against the database ``state`` and
        its row ids, one line each. Reads only: nothing is fixed. A file behind the database by
        additions only is not wrong (:meth:`rows_behind`): it is a checkpoint, and a search adds
        those rows from the database."""
        if not self.path.exists():
            return [f"index file {self.path} is missing"]
        try:
            index = faiss.read_index(str(self.path))
        except RuntimeError:
            return [f"index file {self.path} is unreadable"]
        problems = []
        dimension = state["dimension"]
        if dimension and index.d != dimension:
            problems.append(f"index dimension {index.d} differs from the database's {dimension}")
        note = self._note()
        behind = self.rows_behind(state, note)
        indexed = set(index_ids(index).tolist())
        expected = {i for i in stored_ids if i <= note["max_id"]} if behind and note else stored_ids
        if indexed != expected:
            problems.append(f"index and database disagree: {len(indexed - stored_ids)} vectors without "
                            f"a row, {len(expected - indexed)} rows without a vector")
        if note is not None:
            problems.extend(self._check_note(note, state, behind))
        else:
            problems.append(f"index note {self.meta_path} is missing or unreadable")
        return problems

    def rows_behind(self, state: dict, note: dict | None = None) -> int:
        """How many rows added to the database since the index file's checkpoint it lacks, when
        every change since was an addition (0 otherwise: then the file is current, or wrong)."""
        note = self._note() if note is None else note
        return 0 if note is None else self._rows_added_since(note, state)

    def _note(self) -> dict | None:
        try:
            note = json.loads(self.meta_path.read_text())
        except (OSError, ValueError):
            return None
        return note if isinstance(note, dict) else None

    def _check_note(self, note: dict, state: dict, behind: int) -> list[str]:
        """What is wrong between the index note, the index file and the database state
        (``behind``: rows the file lacks by additions only, which is not wrong)."""
        if note.get("format") != INDEX_NOTE_FORMAT or not note.get("sha256"):
            return [f"index note {self.meta_path} has no checksum (written by an earlier version)"]
        problems = []
        try:
            with open(self.path, "rb") as handle:
                if _sha256_of(handle) != note["sha256"]:
                    problems.append(f"index file {self.path} does not match the checksum in its note: "
                                    f"it is corrupt (searches rebuild it from the database)")
        except OSError as error:
            problems.append(f"index file {self.path} cannot be read: {error.strerror}")
        if note.get("model_id") != state["model_id"]:
            problems.append(f"index was built for model {note.get('model_id')}, database holds {state['model_id']}")
        elif not same_state(note, state) and not behind:
            problems.append(f"index is out of date: it holds the rows of database generation {note.get('generation')}"
                            f", the database is at generation {state['generation']}")
        return problems
