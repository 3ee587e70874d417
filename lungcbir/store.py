"""Storage: one database row per indexed slice plus a FAISS index of the vectors, kept in agreement.

:class:`Store` is a thin coordinator over two parts:

* :class:`lungcbir.database.Database` (``database.py``): the SQLAlchemy schema, the connection,
  every read and write of rows, the settings, the change log and the indexing queue's table. The
  database is the source of truth: every row holds its vector.
* :class:`lungcbir.vector_index.VectorIndex` (``vector_index.py``): the FAISS index, a cache
  whose ids are the rows' primary keys, written atomically as checkpoints (not after every
  commit) with a note of the database generation it holds and caught up or rebuilt whenever it
  is missing, corrupt or out of step; the index kinds
  (:data:`~lungcbir.vector_index.INDEX_KIND_REGISTRY`); the write lock.

The Store adds what needs both (adding and removing rows with the index following, ``check``,
``stats``); the indexing queue of the same database is :attr:`Store.queue`
(:class:`lungcbir.work_queue.WorkQueue`). Regions of slices (:class:`~lungcbir.database.RegionRecord`)
have their own vector index, :attr:`Store.region_vectors`, kept by the same rules.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import faiss
import numpy as np

from .config import DEFAULT_DB_URL, DEFAULT_INDEX_DIR
from .database import (
    MAX_LABEL_VALUES,
    REBUILD_CHUNK,
    VECTOR_DTYPE,
    Database,
    ImageRecord,
    NeighborRow,
    NewRegion,
    safe_url,
)
from .vector_index import (
    EXACT_RESTRICTED_SEARCH_MAX,
    REGION_INDEX_FILE,
    SCORE_TOLERANCE,
    VectorIndex,
    describe_index,
)
from .work_queue import WorkQueue


@dataclass
class StoreStats:
    """What is in a store."""

    images: int
    patients: int
    series: int
    #: how identity was found: {source: {"patients": distinct patients, "slices": rows}}
    identity: dict
    model_id: str | None
    dimension: int | None
    index_vectors: int
    index_kind: str
    database: str
    database_bytes: int | None
    index_bytes: int | None
    #: stored regions by source ("mask": marked, "lesion": found by the model) and their index's size
    regions: dict[str, int] | None = None
    region_index_vectors: int = 0


class Store:
    """The database and the FAISS index, kept in agreement.

    ``create=False``: the database must exist already (else :class:`StoreError`, "no
    database"). ``read_only=True`` (for ``stats``, ``check``, ``query``): no table is created
    and no index file written; an index out of step with the database is brought up to date
    in memory only; adding and removing rows is refused. One Store may be used from many
    threads (a web server's request pool): catch-up, rebuild and search are serialised.
    ``database`` and ``vectors`` are the two parts, ``queue`` the database's indexing queue;
    the row methods below only pass through.

    Example:
        >>> import tempfile
        >>> store = Store("sqlite://", index_dir=tempfile.mkdtemp())
        >>> store.stats().images
        0
    """

    def __init__(self, db_url: str = DEFAULT_DB_URL, index_dir: str | os.PathLike = DEFAULT_INDEX_DIR,
                 create: bool = True, read_only: bool = False) -> None:
        self.db_url = db_url
        self.index_dir = Path(index_dir)
        self.read_only = read_only
        self.database = Database(db_url, create=create, read_only=read_only)
        self.engine = self.database.engine
        self.vectors = VectorIndex(self.index_dir, self.database)
        self.region_vectors = VectorIndex(self.index_dir, self.database.regions, REGION_INDEX_FILE)
        self.queue = WorkQueue(self.database)

    # -- settings -----------------------------------------------------------------------------

    @property
    def model_id(self) -> str | None:
        return self.database.model_id

    @property
    def dimension(self) -> int | None:
        return self.database.dimension

    def check_model(self, model_id: str, dimension: int) -> None:
        """Raise if the store holds vectors of another model; claim an empty store."""
        self.database.check_model(model_id, dimension)

    # -- rows and the index together ----------------------------------------------------------------

    def add(self, records: Sequence[ImageRecord], vectors: np.ndarray,
            regions: Sequence[Sequence[NewRegion]] | None = None, region_model_id: str | None = None) -> list[int]:
        """Insert rows with their vectors in one transaction, then the index (its file at the next checkpoint).

        A row whose (sha256, frame, model) is already stored, by this or a concurrent run, is
        left alone (the unique constraint decides, not a check-then-insert). ``regions`` (one
        list per record, vectors made by ``region_model_id``) go in with their rows, and the
        region index follows. Returns the ids of the rows inserted.
        """
        return self.add_slices(records, vectors, regions, region_model_id)[0]

    def add_slices(self, records: Sequence[ImageRecord], vectors: np.ndarray,
                   regions: Sequence[Sequence[NewRegion]] | None = None,
                   region_model_id: str | None = None) -> tuple[list[int], int]:
        """:meth:`add`, also saying how many regions were stored (those of the rows inserted)."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        committed = self.database.add(records, vectors, regions, region_model_id)
        if committed is None:
            return [], 0
        # as stored (float16): the index holds exactly what the database holds, so a rebuild changes nothing
        self.vectors.added(committed, vectors[committed.positions].astype(VECTOR_DTYPE).astype(np.float32))
        if committed.regions is not None and committed.region_vectors is not None:
            self.region_vectors.added(committed.regions, committed.region_vectors)
        return committed.ids, len(committed.regions.ids) if committed.regions is not None else 0

    def remove(self, ids: Iterable[int]) -> int:
        """Delete rows and their vectors together; returns how many rows were deleted."""
        ids = [int(i) for i in ids]
        if not ids:
            return 0
        self.database.refuse_if_read_only()
        self.vectors.current()  # up to date first, so that this change can be applied to it in place
        if self.regions_in_use():
            self.region_vectors.current()
        committed = self.database.remove(ids)
        if committed is None:
            return 0
        self.vectors.removed(committed)
        if committed.regions is not None:
            self.region_vectors.removed(committed.regions)
        return len(committed.ids)

    def begin_region_rebuild(self, region_model_id: str, dimension: int) -> int:
        """Switch the regions to ``region_model_id`` (vectors of ``dimension``), setting aside the
        regions made otherwise (:meth:`RegionRows.begin_rebuild
        <lungcbir.database.RegionRows.begin_rebuild>`); returns how many were set aside. The region
        index follows at the next :meth:`checkpoint` or search (the change log says what changed)."""
        return self.database.regions.begin_rebuild(region_model_id, dimension)

    def replace_regions(self, image_ids: Sequence[int], regions: Sequence[tuple[int, NewRegion]],
                        region_model_id: str) -> int:
        """Replace every region of these slices by ``regions`` in one transaction
        (:meth:`Database.replace_regions`); the slices and their index are not touched. Returns
        how many regions were stored.

        The region index is not changed here: a rebuild replaces every slice's regions, batch
        after batch, and applying each batch's removal would write the whole region index each
        time; it catches up (or is rebuilt) once, at the next :meth:`checkpoint` or search.
        """
        _, added = self.database.replace_regions(image_ids, regions, region_model_id)
        return len(added[0].ids) if added is not None else 0

    # -- rows (see :class:`Database`) ---------------------------------------------------------------

    def stored_keys(self, model_id: str, keys: Iterable[tuple[str, int]]) -> set[tuple[str, int]]:
        return self.database.stored_keys(model_id, keys)

    def contents_at(self, paths: Iterable[str], model_id: str) -> dict[str, list[tuple[int, str, int]]]:
        return self.database.contents_at(paths, model_id)

    def known_sop_uids(self, model_id: str, series_uid: str | None = None) -> set[str]:
        return self.database.known_sop_uids(model_id, series_uid)

    def ids_for(self, paths: Iterable[str] = (), ids: Iterable[int] = (), under: Iterable[str] = ()) -> list[int]:
        return self.database.ids_for(paths, ids, under)

    def count(self) -> int:
        return self.database.count()

    def is_empty(self) -> bool:
        return self.database.is_empty()

    def records(self, ids: Iterable[int]) -> dict[int, ImageRecord]:
        return self.database.records(ids)

    def neighbor_rows(self, ids: Iterable[int]) -> dict[int, NeighborRow]:
        return self.database.neighbor_rows(ids)

    def masks(self, ids: Iterable[int]) -> dict[int, np.ndarray]:
        return self.database.masks(ids)

    def ids_matching(self, where: Mapping[str, str | Sequence[str]]) -> np.ndarray:
        return self.database.ids_matching(where)

    def records_with_content(self, keys: Iterable[tuple[str | None, int]]) -> dict[tuple[str, int], list[ImageRecord]]:
        return self.database.records_with_content(keys)

    def label_values(self, max_values: int = MAX_LABEL_VALUES) -> dict[str, list[str]]:
        return self.database.label_values(max_values)

    def series_members(self, image_id: int) -> list[int]:
        return self.database.series_members(image_id)

    def iter_vectors(self, chunk: int = REBUILD_CHUNK, after: int = -1,
                     up_to: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        return self.database.iter_vectors(chunk, after, up_to)

    # -- index (see :class:`VectorIndex`) -----------------------------------------------------------

    @property
    def index_path(self) -> Path:
        return self.vectors.path

    @property
    def index_meta_path(self) -> Path:
        return self.vectors.meta_path

    @property
    def index_kind(self) -> str:
        return self.vectors.kind

    def index(self) -> faiss.Index:
        """The FAISS index matching the database now (caught up or rebuilt if need be)."""
        return self.vectors.current()

    def checkpoint(self) -> faiss.Index:
        """The index matching the database now, its file written if behind (end of a run;
        see :meth:`VectorIndex.checkpoint`)."""
        if self.regions_in_use():
            self.region_vectors.checkpoint()
        return self.vectors.checkpoint()

    def rebuild_index(self, kind: str | None = None) -> faiss.Index:
        """Build a fresh index from the stored vectors, streamed in chunks, and save it.

        ``kind`` (a name of :data:`INDEX_KIND_REGISTRY`) is remembered for later rebuilds.
        """
        if kind is not None:
            self.vectors.set_kind(kind)
        if self.regions_in_use():
            self.region_vectors.rebuild()
        return self.vectors.rebuild()

    def search(self, vectors: np.ndarray, k: int, restrict_to: np.ndarray | None = None,
               exact_up_to: int = EXACT_RESTRICTED_SEARCH_MAX) -> tuple[np.ndarray, np.ndarray]:
        """Scores and ids of the ``k`` nearest stored vectors, best first (see
        :meth:`VectorIndex.search`); ``restrict_to``, e.g. from :meth:`ids_matching`, searches
        among those rows only."""
        return self.vectors.search(vectors, k, restrict_to, exact_up_to=exact_up_to)

    def search_regions(self, vectors: np.ndarray, k: int,
                       restrict_to: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Scores and region ids of the ``k`` nearest stored regions (as :meth:`search`, on the
        regions' index; ``restrict_to``: region ids)."""
        return self.region_vectors.search(vectors, k, restrict_to)

    @contextlib.contextmanager
    def write_lock(self, wait: bool = False) -> Iterator[None]:
        """Hold the index folder's write lock: one writer at a time per index."""
        with self.vectors.write_lock(wait):
            yield

    # -- checks and summary ---------------------------------------------------------------------

    def check(self, verify_files: bool = False) -> list[str]:
        """Everything wrong with the store, one line each; an empty list means all is well.

        Reads only: nothing is written, not even an index out of date (that is a problem). An
        index file behind the database by additions only is not a problem: it is the last
        checkpoint of an indexing run, and :meth:`notes` says so.
        """
        state = self.database.state()
        problems, stored_ids = self.database.check_rows(state)
        if state["dimension"] and not problems:  # what would give similarities outside [-1, 1]
            corrupt = sum(int((~(np.linalg.norm(vectors, axis=1) <= 1 + SCORE_TOLERANCE)).sum())
                          for _, vectors in self.database.iter_vectors())
            if corrupt:
                problems.append(f"{corrupt} rows hold vectors longer than unit length or not finite (corrupt); "
                                f"remove them and index their files again")
        problems += self.vectors.check(state, stored_ids)
        problems += self._check_regions()
        if verify_files:
            problems += self._check_files()
        return problems

    def notes(self) -> list[str]:
        """What is worth knowing about the store but not wrong, one line each: index files that
        lack the rows added since their last checkpoint (an indexing run in progress, or one
        stopped between checkpoints). Searches add those rows from the database."""
        lines = []
        for prefix, vectors, database in (("", self.vectors, self.database),
                                          ("regions: ", self.region_vectors, self.database.regions)):
            behind = vectors.rows_behind(database.state()) if vectors.meta_path.exists() else 0
            if behind:
                lines.append(f"{prefix}the index file lacks the {behind} rows added since its last checkpoint; "
                             f"searches add them from the database, the next checkpoint (at the latest at the "
                             f"end of an indexing run) writes them")
        return lines

    def regions_in_use(self) -> bool:
        """Whether regions were ever stored here (or their index written): a store without them
        keeps no region index, and reads or writes none."""
        return bool(self.database.regions.generation()) or self.region_vectors.path.exists()

    def _check_regions(self) -> list[str]:
        """What is wrong with the regions and their index (nothing to say when none are stored and
        no region index was ever written)."""
        regions = self.database.regions
        state = regions.state()
        problems, stored_ids = regions.check_rows(state)
        if not stored_ids and not self.regions_in_use():
            return problems
        if state["dimension"] and not problems:
            corrupt = sum(int((~(np.linalg.norm(vectors, axis=1) <= 1 + SCORE_TOLERANCE)).sum())
                          for _, vectors in regions.iter_vectors())
            if corrupt:
                problems.append(f"{corrupt} regions hold vectors longer than unit length or not finite (corrupt); "
                                f"remove their slices and index their files again")
        return problems + [f"regions: {line}" for line in self.region_vectors.check(state, stored_ids)]

    def _check_files(self) -> list[str]:
        """Indexed local files that are gone or changed since (re-hashed)."""
        from .io import file_sha256

        problems = []
        for path, digest in self.database.stored_files():
            if path.startswith(("http://", "https://")):
                continue  # indexed from a DICOMweb archive: not a local file, not fetched here
            if not os.path.exists(path):
                problems.append(f"{path}: indexed file no longer exists")
            else:
                try:
                    if file_sha256(path) != digest:
                        problems.append(f"{path}: file changed since it was indexed")
                except OSError as error:
                    problems.append(f"{path}: cannot read ({error.strerror})")
        return problems

    def stats(self) -> StoreStats:
        """Counts and sizes for ``lungcbir stats``."""
        rows = self.database.row_stats()
        index = self.index()
        region_vectors = int(self.region_vectors.current().ntotal) if self.regions_in_use() else 0
        return StoreStats(images=rows.images, patients=rows.patients, series=rows.series, identity=rows.identity,
                          model_id=self.model_id, dimension=self.dimension, index_vectors=int(index.ntotal),
                          index_kind=f"{describe_index(index)}; setting {self.index_kind}",
                          database=safe_url(self.db_url), database_bytes=rows.database_bytes,
                          index_bytes=self.index_path.stat().st_size if self.index_path.exists() else None,
                          regions=self.database.regions.counts(), region_index_vectors=region_vectors)
