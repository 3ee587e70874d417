"""Storage: one database row per indexed slice (SQLAlchemy) plus a FAISS index of the vectors.

The database is the source of truth: every row holds its vector. The FAISS index is a cache
whose ids are the rows' primary keys; it is written atomically after each commit and rebuilt
from the stored vectors whenever it is missing, corrupt or out of step with the database.

How an index is tied to the exact rows it holds: every transaction that adds or removes rows
first takes the next *generation* of the database (a counter in ``store_settings``, whose row
lock also serialises writers, so generations follow commit order) and logs what it did in
``store_changes``. The note beside an index file records the generation (plus count, lowest
and highest id, model) it holds and the file's SHA-256. An index is used as it is only at the
database's current generation; it is caught up by adding rows only when every change since
its generation was an addition, and rebuilt otherwise. Row ids are never reused (SQLite
``AUTOINCREMENT``; for SQLite databases made by earlier versions, which lack it, new ids are
assigned above every id ever used).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile  # noqa: F401 (the doctests use it)
import threading
import socket
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from enum import Enum
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import cv2
import faiss
import numpy as np
from sqlalchemy import (JSON, DateTime, Float, Integer, LargeBinary, String, Text, UniqueConstraint, and_, cast,
                        create_engine, delete, func, insert, inspect, or_, select, update)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from .config import DEFAULT_DB_URL, DEFAULT_INDEX_DIR
from .errors import LockedError, StoreError
from .fileutils import sha256_of as _sha256_of
from .fileutils import write_atomically as _write_atomically

INDEX_FILE = "lungcbir.faiss"
INDEX_META_FILE = "lungcbir.faiss.json"
LOCK_FILE = "write.lock"
REBUILD_CHUNK = 10_000
#: Vectors are stored as float16 in the database: half the size, and retrieval rankings are
#: unchanged for unit vectors (relative error about 1e-3).
VECTOR_DTYPE = np.float16
VECTOR_BYTES = 2
INDEX_KINDS = ("auto", "flat", "ivf", "hnsw")
#: ``auto`` switches from exact search to IVF at this many vectors (see docs/scale.md).
AUTO_IVF_FROM = 100_000
IVF_NPROBE = 32
HNSW_EF_SEARCH = 128
#: PostgreSQL advisory lock taken while the schema is created or checked (any constant number
#: that no other application on the server uses; "lungcbir" in ASCII).
SCHEMA_LOCK_KEY = 0x6C756E6763626972
#: Backends lungcbir supports (SQLAlchemy backend names).
SUPPORTED_BACKENDS = ("sqlite", "postgresql")
#: Version of the note written beside the index file; notes of other versions are not trusted.
INDEX_NOTE_FORMAT = 2
#: Stored vectors are unit vectors, so a similarity beyond the query's norm, give or take
#: float16 rounding (about 1e-3), means a corrupt index or vector.
SCORE_TOLERANCE = 1e-2
#: Rebuilds tried while rows are removed meanwhile, before using an index not tied to a state.
REBUILD_ATTEMPTS = 3
GENERATION_KEY = "generation"
#: What the note records of the database state an index holds.
STATE_KEYS = ("model_id", "dimension", "generation", "count", "min_id", "max_id")
#: A search restricted to at most this many rows (a ``--where`` filter) is exact, over their
#: vectors read from the database (about 1 KB each, so at most ~20 MB read): simpler than the
#: index and exact for every index kind. Larger sets go through the FAISS index with an id
#: selector, and fall back to the exact search where an approximate index found too few.
EXACT_RESTRICTED_SEARCH_MAX = 20_000
#: Metadata columns a filter may name; a label of the same name takes precedence.
FILTER_COLUMNS = ("patient_id", "series_uid", "study_uid", "source_format")
#: Seconds after which a claimed series whose claim was not renewed (its run was killed, or
#: its machine lost) may be claimed by another run. A working run renews its claim well
#: within this (see :meth:`Store.renew_claim`).
DEFAULT_CLAIM_TIMEOUT_S = 600.0
#: A series claimed this many times without being finished (every run that took it died on
#: it) is marked failed instead of being handed out again; a later run's enqueue retries it.
MAX_CLAIM_ATTEMPTS = 3
#: Most distinct values listed per label key by :meth:`Store.label_values`.
MAX_LABEL_VALUES = 200


class Base(DeclarativeBase):
    pass


class ImageRecord(Base):
    """One indexed slice."""

    __tablename__ = "images"
    # AUTOINCREMENT: SQLite would otherwise give the highest id again after it was deleted
    __table_args__ = (UniqueConstraint("sha256", "frame", "model_id", name="uq_image_content_model"),
                      {"sqlite_autoincrement": True})

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    frame: Mapped[int] = mapped_column(Integer, default=0)
    source_format: Mapped[str] = mapped_column(String(16))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    patient_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    study_uid: Mapped[str | None] = mapped_column(String(128), nullable=True)
    series_uid: Mapped[str | None] = mapped_column(String(128), nullable=True)
    sop_uid: Mapped[str | None] = mapped_column(String(128), nullable=True, index=True)
    instance_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    slice_location: Mapped[float | None] = mapped_column(Float, nullable=True)
    slice_index: Mapped[int | None] = mapped_column(Integer, nullable=True)
    pixel_spacing_row: Mapped[float | None] = mapped_column(Float, nullable=True)
    pixel_spacing_col: Mapped[float | None] = mapped_column(Float, nullable=True)
    labels: Mapped[dict] = mapped_column(JSON, default=dict)
    lung_fraction: Mapped[float] = mapped_column(Float)
    model_id: Mapped[str] = mapped_column(String(32), index=True)
    indexed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    vector: Mapped[bytes] = mapped_column(LargeBinary)
    #: the lung mask at the slice's own size (:func:`encode_mask`), so pictures of a stored
    #: slice need no model run; NULL in rows indexed before masks were kept. Deferred: loaded
    #: only by :meth:`Store.masks`.
    mask_png: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True, deferred=True)
    #: where patient_id / series_uid came from (:class:`lungcbir.identity.IdentitySource`
    #: value); NULL in rows indexed before it was recorded
    identity_source: Mapped[str | None] = mapped_column(String(16), nullable=True)


class StoreSetting(Base):
    """Key/value facts about the whole store (which model, which dimension)."""

    __tablename__ = "store_settings"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class StoreChange(Base):
    """One committed change of the image rows, numbered by the database generation it made."""

    __tablename__ = "store_changes"

    generation: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    kind: Mapped[str] = mapped_column(String(8))  # "add" or "remove"
    rows: Mapped[int] = mapped_column(Integer)
    first_id: Mapped[int] = mapped_column(Integer)
    last_id: Mapped[int] = mapped_column(Integer)
    changed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class QueueState(str, Enum):
    """Where a series of the indexing queue stands."""

    PENDING = "pending"  # found, waiting for a run to claim it
    CLAIMED = "claimed"  # a run is indexing it (``claimed_by``), renewing ``claimed_at``
    DONE = "done"  # every instance is indexed
    FAILED = "failed"  # some instance (or the series listing) failed; ``error`` says why


class QueueEntry(Base):
    """One series of a DICOMweb archive to index with one model: the work shared by runs.

    ``root`` is the service root without credentials (:func:`lungcbir.dicomweb.display_url`).
    A run claims a pending series (or one whose claim expired), indexes it and marks it done
    or failed; the unique constraint makes enqueueing the same series again harmless.
    """

    __tablename__ = "index_queue"
    __table_args__ = (UniqueConstraint("root", "series_uid", "model_id", name="uq_queue_series_model"),
                      {"sqlite_autoincrement": True})

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    root: Mapped[str] = mapped_column(String(512))
    study_uid: Mapped[str] = mapped_column(String(128))
    series_uid: Mapped[str] = mapped_column(String(128))
    model_id: Mapped[str] = mapped_column(String(32))
    state: Mapped[str] = mapped_column(String(8), index=True)
    claimed_by: Mapped[str | None] = mapped_column(String(160), nullable=True)
    claimed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    enqueued_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


@dataclass(frozen=True)
class SeriesClaim:
    """A series a run has claimed from the queue (what :meth:`Store.claim_series` returns)."""

    id: int
    root: str
    study_uid: str
    series_uid: str
    model_id: str
    claimed_by: str
    attempts: int  # this claim's number: 1 for the first run that took the series


def claimer_name() -> str:
    """``host:pid``, what a claim records as its holder."""
    return f"{socket.gethostname()}:{os.getpid()}"


class _Unchanged(Exception):
    """Raised inside a change transaction that changed no row: it is rolled back, not logged."""


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


def safe_url(url: str) -> str:
    """The database URL with any password hidden, for messages and logs."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparseable database URL>"


def _same_state(one: dict | None, other: dict | None) -> bool:
    return one is not None and other is not None and all(one.get(key) == other.get(key) for key in STATE_KEYS)


class Store:
    """The database and the FAISS index, kept in agreement.

    ``create=False``: the database must exist already (else :class:`StoreError`, "no
    database"). ``read_only=True`` (for ``stats``, ``check``, ``query``): no table is created
    and no index file written; an index out of step with the database is brought up to date
    in memory only; adding and removing rows is refused. One Store may be used from many
    threads (a web server's request pool): catch-up, rebuild and search are serialised.

    Example:
        >>> store = Store("sqlite://", index_dir=tempfile.mkdtemp())
        >>> store.stats().images
        0
    """

    def __init__(self, db_url: str = DEFAULT_DB_URL, index_dir: str | os.PathLike = DEFAULT_INDEX_DIR,
                 create: bool = True, read_only: bool = False) -> None:
        self.db_url = db_url
        self.index_dir = Path(index_dir)
        self.read_only = read_only
        self._assign_ids = False  # set by _connect for SQLite tables without AUTOINCREMENT
        self.engine = self._connect(db_url, create and not read_only)
        self._index: faiss.Index | None = None
        self._index_state: dict | None = None  # the database state self._index holds exactly
        self._lock = threading.RLock()

    def _connect(self, db_url: str, create: bool) -> Engine:
        try:
            url = make_url(db_url)
        except Exception:
            raise StoreError(f"not a valid database URL: {safe_url(db_url)}") from None
        backend = url.get_backend_name()
        if backend not in SUPPORTED_BACKENDS:
            raise StoreError(f"unsupported database backend {backend!r} ({safe_url(db_url)}): SQLite and PostgreSQL "
                             f"are supported (sqlite:///PATH, postgresql+psycopg://USER@HOST/DB)")
        if backend == "sqlite" and url.database not in (None, "", ":memory:"):
            database = Path(url.database)
            if not database.exists():
                if not create:
                    raise StoreError(f"no database at {database}; create one with `lungcbir index-dataset PATH`")
                try:
                    database.parent.mkdir(parents=True, exist_ok=True)
                except OSError as error:
                    raise StoreError(f"cannot create the database folder {database.parent}: {error.strerror}") from None
        try:
            engine = create_engine(url)
        except ImportError as error:
            raise StoreError(f"cannot use {safe_url(db_url)}: its driver ({error.name or url.get_driver_name()}) is "
                             f"not installed; SQLite and PostgreSQL are supported "
                             f"(postgresql+psycopg://: pip install 'lungcbir[postgres]')") from None
        except SQLAlchemyError as error:
            raise StoreError(f"cannot open database {safe_url(db_url)}: {_reason(error)}") from None
        try:
            with engine.begin() as connection:
                if backend == "postgresql" and not self.read_only:
                    # machines starting together on a new database would create its tables and
                    # types at once and collide: one creates them, the others then find them
                    connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({SCHEMA_LOCK_KEY})")
                tables = set(inspect(connection).get_table_names())
                if ImageRecord.__tablename__ not in tables and not create:
                    raise StoreError(f"no lungcbir database in {safe_url(db_url)}; "
                                     f"create one with `lungcbir index-dataset PATH`")
                if not self.read_only:
                    Base.metadata.create_all(connection)  # also adds tables new in this version
                if backend == "sqlite" and ImageRecord.__tablename__ in tables:
                    schema = connection.exec_driver_sql(
                        "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'images'").scalar()
                    self._assign_ids = "AUTOINCREMENT" not in (schema or "").upper()
            if not self.read_only:
                _add_missing_columns(engine)
            elif ImageRecord.__tablename__ in tables and (missing := _missing_columns(engine)):
                # a read-only store writes nothing, so an old table is refused with a way out
                raise StoreError(f"the database {safe_url(db_url)} was made by an earlier lungcbir version (no "
                                 f"column {', '.join(c.name for c in missing)}); upgrade it by running a writing "
                                 f"command on it once (`lungcbir index-dataset PATH` or `lungcbir rebuild-index`)")
        except SQLAlchemyError as error:
            raise StoreError(f"cannot open database {safe_url(db_url)}: {_reason(error)}") from None
        return engine

    # -- settings -----------------------------------------------------------------------------

    def _setting(self, session: Session, key: str) -> str | None:
        row = session.get(StoreSetting, key)
        return row.value if row else None

    @property
    def model_id(self) -> str | None:
        with Session(self.engine) as session:
            return self._setting(session, "model_id")

    @property
    def dimension(self) -> int | None:
        with Session(self.engine) as session:
            value = self._setting(session, "dimension")
            return int(value) if value else None

    def check_model(self, model_id: str, dimension: int) -> None:
        """Raise if the store holds vectors of another model; claim an empty store."""
        with Session(self.engine) as session:
            stored = self._setting(session, "model_id")
        if stored is None:
            self._refuse_if_read_only()
            # machines starting together on an empty database race to claim it: the first
            # claim stands (INSERT ... ON CONFLICT DO NOTHING), the others read it back
            try:
                with self.engine.begin() as connection:
                    connection.execute(_insert_ignoring_duplicates(
                        self.engine.dialect.name, StoreSetting,
                        [{"key": "model_id", "value": model_id}, {"key": "dimension", "value": str(dimension)}]))
            except SQLAlchemyError as error:
                raise StoreError(f"cannot write to {safe_url(self.db_url)}: {_reason(error)}") from None
            with Session(self.engine) as session:
                stored = self._setting(session, "model_id")
        if stored != model_id:
            raise StoreError(f"this database holds vectors of model {stored}, not of the model in use "
                             f"({model_id}); re-index into a new --db and --index-dir with this model, "
                             f"or use the weights the database was indexed with")

    def _refuse_if_read_only(self) -> None:
        if self.read_only:
            raise StoreError(f"the store {safe_url(self.db_url)} was opened read-only")

    # -- rows -----------------------------------------------------------------------------------

    def known_keys(self, model_id: str) -> set[tuple[str, int]]:
        """(sha256, frame) of every slice already indexed with this model."""
        with Session(self.engine) as session:
            rows = session.execute(select(ImageRecord.sha256, ImageRecord.frame)
                                   .where(ImageRecord.model_id == model_id))
            return {(sha, frame) for sha, frame in rows}

    @contextlib.contextmanager
    def _change(self):
        """A write transaction numbered by the next database generation, taken first.

        Taking the generation locks its row until commit, so writers (on any machine) change
        rows one after the other and generations, ids and commits come in the same order.
        Raise :class:`_Unchanged` inside to roll back a transaction that changed nothing.
        """
        self._refuse_if_read_only()
        try:
            with self.engine.begin() as connection:
                connection.execute(_insert_ignoring_duplicates(
                    self.engine.dialect.name, StoreSetting, [{"key": GENERATION_KEY, "value": "0"}]))
                generation = int(connection.execute(
                    update(StoreSetting).where(StoreSetting.key == GENERATION_KEY)
                    .values(value=cast(cast(StoreSetting.value, Integer) + 1, String))
                    .returning(StoreSetting.value)).scalar_one())
                yield connection, generation
        except _Unchanged:
            pass
        except SQLAlchemyError as error:
            raise StoreError(f"cannot write to {safe_url(self.db_url)}: {_reason(error)}") from None
    def known_sop_uids(self, model_id: str, series_uid: str | None = None) -> set[str]:
        """SOP Instance UIDs of every DICOM slice already indexed with this model (of one
        series only, when ``series_uid`` is given)."""
        conditions = [ImageRecord.model_id == model_id, ImageRecord.sop_uid.is_not(None)]
        if series_uid is not None:
            conditions.append(ImageRecord.series_uid == series_uid)
        with Session(self.engine) as session:
            return set(session.scalars(select(ImageRecord.sop_uid).where(*conditions)))

    # -- the indexing queue (series of DICOMweb archives shared by concurrent runs) -------------

    def _now(self):
        """The time claims are stamped and compared with: the database's own clock on
        PostgreSQL (the claimers run on machines whose clocks differ), this machine's on SQLite
        (one machine), where the database has no time type to compare stamps with."""
        if self.engine.dialect.name == "postgresql":
            return func.now()
        return datetime.now(timezone.utc)

    def _queue_write(self, statement) -> tuple[list, int]:
        """Run one statement in its own short transaction; its returned rows and row count."""
        self._refuse_if_read_only()
        try:
            with self.engine.begin() as connection:
                if self.engine.dialect.name == "sqlite":
                    # take the write lock before reading: two deferred transactions that both read
                    # and then want to write get "database is locked" at once, without waiting
                    connection.exec_driver_sql("BEGIN IMMEDIATE")
                result = connection.execute(statement)
                return (result.all() if result.returns_rows else []), result.rowcount
        except SQLAlchemyError as error:
            raise StoreError(f"cannot write to {safe_url(self.db_url)}: {_reason(error)}") from None

    def enqueue_series(self, root: str, series: Iterable[tuple[str, str]], model_id: str) -> int:
        """Put (study_uid, series_uid) pairs of the archive at ``root`` into the queue for this model.

        Idempotent: a series already queued is not added again (the unique constraint on
        root, series and model decides, so concurrent runs may enqueue the same series). One
        that is done or failed becomes pending again, so that this run looks at it: a done
        series costs one instance listing (its indexed instances are not fetched again) and
        gets any new instances indexed; a failed one is retried. A claimed one is left to its
        run. Returns how many series were new to the queue.
        """
        pairs = sorted(set(series), key=lambda pair: pair[1])  # one order: concurrent inserts cannot deadlock
        now = datetime.now(timezone.utc)
        added = 0
        for start in range(0, len(pairs), 500):
            chunk = pairs[start:start + 500]
            rows = [{"root": root, "study_uid": study, "series_uid": uid, "model_id": model_id,
                     "state": QueueState.PENDING.value, "attempts": 0, "enqueued_at": now} for study, uid in chunk]
            added += len(self._queue_write(_insert_ignoring_duplicates(
                self.engine.dialect.name, QueueEntry, rows).returning(QueueEntry.id))[0])
            self._queue_write(update(QueueEntry).where(
                QueueEntry.root == root, QueueEntry.model_id == model_id,
                QueueEntry.series_uid.in_([uid for _, uid in chunk]),
                QueueEntry.state.in_([QueueState.DONE.value, QueueState.FAILED.value]))
                .values(state=QueueState.PENDING.value, attempts=0, error=None))
        return added

    def claim_series(self, root: str, model_id: str, claimer: str,
                     timeout_s: float = DEFAULT_CLAIM_TIMEOUT_S, study_uid: str | None = None) -> SeriesClaim | None:
        """Claim the next series of ``root`` to index with this model (of one study, if given).

        A pending series, or a claimed one whose claim was not renewed for ``timeout_s``
        seconds (its run was killed), is marked claimed by ``claimer`` in one short UPDATE,
        so two runs never get the same series: on PostgreSQL the candidate row is picked with
        ``SELECT ... FOR UPDATE SKIP LOCKED`` (concurrent claimers take different rows
        without waiting); SQLite serialises writers, and the UPDATE re-checks the state, so
        a row another run took meanwhile is not updated. A series whose claims expired
        :data:`MAX_CLAIM_ATTEMPTS` times is marked failed instead. Returns None when nothing
        is left to claim.
        """
        now = self._now()
        cutoff = now - timedelta(seconds=timeout_s)
        scope = [QueueEntry.root == root, QueueEntry.model_id == model_id]
        if study_uid is not None:
            scope.append(QueueEntry.study_uid == study_uid)
        expired = and_(QueueEntry.state == QueueState.CLAIMED.value, QueueEntry.claimed_at < cutoff)
        self._queue_write(update(QueueEntry).where(*scope, expired, QueueEntry.attempts >= MAX_CLAIM_ATTEMPTS).values(
            state=QueueState.FAILED.value,
            error=f"claimed {MAX_CLAIM_ATTEMPTS} times and never finished (every run that took it stopped)"))
        claimable = or_(QueueEntry.state == QueueState.PENDING.value, expired)
        candidate = select(QueueEntry.id).where(*scope, claimable).order_by(QueueEntry.id).limit(1)
        if self.engine.dialect.name == "postgresql":
            candidate = candidate.with_for_update(skip_locked=True)
        rows, _ = self._queue_write(update(QueueEntry).where(QueueEntry.id == candidate.scalar_subquery(), claimable)
                                .values(state=QueueState.CLAIMED.value, claimed_by=claimer, claimed_at=now,
                                        attempts=QueueEntry.attempts + 1)
                                .returning(QueueEntry.id, QueueEntry.study_uid, QueueEntry.series_uid,
                                           QueueEntry.attempts))
        if not rows:
            return None
        row = rows[0]
        return SeriesClaim(row[0], root, row[1], row[2], model_id, claimer, row[3])

    def _own(self, claim: SeriesClaim):
        """The condition that a queue row is still held by this claim (not expired and taken over)."""
        return and_(QueueEntry.id == claim.id, QueueEntry.state == QueueState.CLAIMED.value,
                    QueueEntry.claimed_by == claim.claimed_by, QueueEntry.attempts == claim.attempts)

    def renew_claim(self, claim: SeriesClaim) -> bool:
        """Stamp the claim's ``claimed_at`` again (a heartbeat while a long series is indexed).
        False when the claim is no longer ours: it expired and another run took the series."""
        return self._queue_write(update(QueueEntry).where(self._own(claim))
                                 .values(claimed_at=self._now()))[1] == 1

    def finish_claim(self, claim: SeriesClaim, error: str | None = None) -> bool:
        """Mark a claimed series done, or failed with ``error``; False when it is no longer ours."""
        state = QueueState.FAILED if error else QueueState.DONE
        return self._queue_write(update(QueueEntry).where(self._own(claim)).values(
            state=state.value, error=error, claimed_at=self._now()))[1] == 1

    def release_claim(self, claim: SeriesClaim) -> bool:
        """Give a claimed series back (the run was interrupted): pending again at once, and this
        claim does not count towards :data:`MAX_CLAIM_ATTEMPTS`."""
        return self._queue_write(update(QueueEntry).where(self._own(claim)).values(
            state=QueueState.PENDING.value, claimed_by=None, claimed_at=None,
            attempts=QueueEntry.attempts - 1))[1] == 1

    def queue_counts(self, root: str | None = None, model_id: str | None = None) -> dict[QueueState, int]:
        """How many queued series are in each state (of one archive and model, if given)."""
        conditions = [column == value for column, value in ((QueueEntry.root, root), (QueueEntry.model_id, model_id))
                      if value is not None]
        with Session(self.engine) as session:
            rows = session.execute(select(QueueEntry.state, func.count(QueueEntry.id)).where(*conditions)
                                   .group_by(QueueEntry.state)).all()
        counts = {state: 0 for state in QueueState}
        counts.update({QueueState(state): number for state, number in rows})
        return counts

    def add(self, records: Sequence[ImageRecord], vectors: np.ndarray) -> list[int]:
        """Insert rows with their vectors in one transaction, then update the index file.

        A row whose (sha256, frame, model) is already stored, by this or a concurrent run, is
        left alone (the unique constraint decides, not a check-then-insert). Returns the ids of
        the rows inserted.
        """
        if not records:
            return []
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        now = datetime.now(timezone.utc)
        columns = [c.key for c in ImageRecord.__table__.columns if c.key != "id"]
        rows = []
        for record, vector in zip(records, vectors):
            record.vector, record.indexed_at = encode_vector(vector), now
            rows.append({key: getattr(record, key) for key in columns})
        position = {(r["sha256"], r["frame"], r["model_id"]): i for i, r in enumerate(rows)}
        inserted = []
        with self._change() as (connection, generation):
            if self._assign_ids:  # an old SQLite table without AUTOINCREMENT: never give an id twice
                highest = max(connection.scalar(select(func.max(ImageRecord.id))) or 0,
                              connection.scalar(select(func.max(StoreChange.last_id))) or 0)
                for number, row in enumerate(rows, highest + 1):
                    row["id"] = number
            inserted = sorted(connection.execute(_insert_ignoring_duplicates(
                self.engine.dialect.name, ImageRecord, rows).returning(
                ImageRecord.id, ImageRecord.sha256, ImageRecord.frame, ImageRecord.model_id)).all())
            if not inserted:
                raise _Unchanged
            self._log_change(connection, generation, "add", [row[0] for row in inserted])
            state = self._db_state(connection)
        if not inserted:
            return []
        ids = [row[0] for row in inserted]
        # the index holds exactly what the database holds, so a rebuild changes nothing
        new_vectors = vectors[[position[(row[1], row[2], row[3])] for row in inserted]]
        new_vectors = new_vectors.astype(VECTOR_DTYPE).astype(np.float32)
        id_array = np.asarray(ids, dtype=np.int64)
        self._apply_own_change(generation, state, lambda index: index.add_with_ids(new_vectors, id_array))
        return ids

    def _log_change(self, connection, generation: int, kind: str, ids: list[int]) -> None:
        connection.execute(insert(StoreChange).values(generation=generation, kind=kind, rows=len(ids),
                                                      first_id=min(ids), last_id=max(ids),
                                                      changed_at=datetime.now(timezone.utc)))

    def _apply_own_change(self, generation: int, state: dict, change) -> None:
        """Apply a change this store just committed (as ``generation``) to the index in use when
        that index holds the generation before; otherwise catch up or rebuild."""
        with self._lock:
            if self._index is None:
                saved = self._read_index_file()
                if saved is not None:
                    self._index, self._index_state = saved
            index, held = self._index, self._index_state
            if index is not None and held is not None and held.get("generation") == generation - 1 \
                    and all(held.get(key) == state[key] for key in ("model_id", "dimension")):
                self._index, self._index_state = None, None  # untrusted until the change is applied
                try:
                    change(index)
                except RuntimeError:  # HNSW cannot remove
                    index = None
                if index is not None and index.ntotal == state["count"]:
                    self._save_index(index, state)
                    return
            self.index()  # catches up or rebuilds

    def remove(self, ids: Iterable[int]) -> int:
        """Delete rows and their vectors together; returns how many rows were deleted."""
        ids = [int(i) for i in ids]
        if not ids:
            return 0
        self._refuse_if_read_only()
        self.index()  # up to date first, so that this change can be applied to it in place
        removed: list[int] = []
        with self._change() as (connection, generation):
            for start in range(0, len(ids), 500):
                chunk = ids[start:start + 500]
                removed += connection.execute(delete(ImageRecord).where(ImageRecord.id.in_(chunk))
                                              .returning(ImageRecord.id)).scalars().all()
            if not removed:
                raise _Unchanged
            self._log_change(connection, generation, "remove", removed)
            state = self._db_state(connection)
        if removed:
            gone = np.asarray(removed, dtype=np.int64)
            self._apply_own_change(generation, state, lambda index: index.remove_ids(gone))
        return len(removed)

    def ids_for(self, paths: Iterable[str] = (), ids: Iterable[int] = (), under: Iterable[str] = ()) -> list[int]:
        """Row ids of images with these exact paths, these ids, or paths below these folders."""
        conditions = []
        paths, ids, under = [os.path.abspath(p) for p in paths], list(ids), list(under)
        if paths:
            conditions.append(ImageRecord.path.in_(paths))
        if ids:
            conditions.append(ImageRecord.id.in_(ids))
        for folder in under:
            prefix = os.path.join(os.path.abspath(folder), "")
            escaped = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            conditions.append(ImageRecord.path.like(escaped + "%", escape="\\"))
        if not conditions:
            return []
        with Session(self.engine) as session:
            return list(session.scalars(select(ImageRecord.id).where(or_(*conditions)).order_by(ImageRecord.id)))

    def count(self) -> int:
        with Session(self.engine) as session:
            return session.scalar(select(func.count(ImageRecord.id))) or 0

    def records(self, ids: Iterable[int]) -> dict[int, ImageRecord]:
        """Rows by id (vectors included)."""
        ids = [int(i) for i in ids]
        if not ids:
            return {}
        rows = []
        with Session(self.engine, expire_on_commit=False) as session:
            for start in range(0, len(ids), 5000):  # bound the statement's parameter count
                rows += session.scalars(select(ImageRecord).where(ImageRecord.id.in_(ids[start:start + 5000]))).all()
            for row in rows:
                session.expunge(row)
        return {row.id: row for row in rows}

    def masks(self, ids: Iterable[int]) -> dict[int, np.ndarray]:
        """The lung masks kept in these rows, by id (rows without one are left out)."""
        ids = [int(i) for i in ids]
        found: dict[int, np.ndarray] = {}
        try:
            with Session(self.engine) as session:
                for start in range(0, len(ids), 5000):
                    rows = session.execute(select(ImageRecord.id, ImageRecord.mask_png).where(
                        ImageRecord.id.in_(ids[start:start + 5000]), ImageRecord.mask_png.is_not(None)))
                    for row_id, data in rows:
                        with contextlib.suppress(StoreError):  # a damaged mask is made again
                            found[row_id] = decode_mask(data)
        except SQLAlchemyError:
            return {}  # a database that could not be given the column: masks are made again
        return found

    def ids_matching(self, where: Mapping[str, str | Sequence[str]]) -> np.ndarray:
        """Sorted ids of the rows matching every ``KEY=VALUE`` of ``where``, decided in SQL.

        KEY is a label, or one of :data:`FILTER_COLUMNS` when the row has no label of that
        name; values are compared as text (a label stored as the number 3 matches "3"). A
        list or tuple of values matches any of them.
        """
        conditions = []
        for key, value in where.items():
            label = ImageRecord.labels[key].as_string()  # json_extract / ->>: text or NULL
            column = getattr(ImageRecord, key) if key in FILTER_COLUMNS else None
            field = label if column is None else func.coalesce(label, column)
            if isinstance(value, (list, tuple)):
                conditions.append(field.in_([str(v) for v in value]))
            else:
                conditions.append(field == str(value))
        try:
            with Session(self.engine) as session:
                found = session.scalars(select(ImageRecord.id).where(*conditions).order_by(ImageRecord.id))
                return np.fromiter(found, dtype=np.int64)
        except SQLAlchemyError as error:
            raise StoreError(f"cannot read {safe_url(self.db_url)}: {_reason(error)}") from None

    def records_with_content(self, keys: Iterable[tuple[str | None, int]]) -> dict[tuple[str, int], list[ImageRecord]]:
        """Stored rows by (sha256, frame): where a query slice is itself stored."""
        wanted = {(sha, frame) for sha, frame in keys if sha}
        if not wanted:
            return {}
        found: dict[tuple[str, int], list[ImageRecord]] = {}
        with Session(self.engine, expire_on_commit=False) as session:
            rows = session.scalars(select(ImageRecord).where(
                ImageRecord.sha256.in_(sorted({sha for sha, _ in wanted})))).all()
            for row in rows:
                session.expunge(row)
                if (row.sha256, row.frame) in wanted:
                    found.setdefault((row.sha256, row.frame), []).append(row)
        return found
    def label_values(self, max_values: int = MAX_LABEL_VALUES) -> dict[str, list[str]]:
        """Every stored label key with its distinct values as text (sorted; at most
        ``max_values`` per key), for filter drop-downs.

        Distinct label sets are read (as text: PostgreSQL's ``json`` has no equality), so the
        cost follows the number of different label combinations, not of rows.
        """
        values: dict[str, set[str]] = {}
        try:
            with Session(self.engine) as session:
                for text in session.scalars(select(cast(ImageRecord.labels, Text)).distinct()):
                    try:
                        labels = json.loads(text) if text else {}
                    except ValueError:
                        continue
                    for key, value in (labels.items() if isinstance(labels, dict) else ()):
                        if value is not None:
                            values.setdefault(str(key), set()).add(str(value))
        except SQLAlchemyError as error:
            raise StoreError(f"cannot read {safe_url(self.db_url)}: {_reason(error)}") from None
        return {key: sorted(found)[:max_values] for key, found in sorted(values.items())}

    def series_members(self, image_id: int) -> list[int]:
        """Ids of the stored slices of ``image_id``'s series (same model), in slice order.

        The series is the DICOM series (SeriesInstanceUID), else the file (the frames of a
        NIfTI volume); ordered by slice_index, then frame, then id. Empty for an unknown id.
        """
        try:
            with Session(self.engine) as session:
                row = session.get(ImageRecord, int(image_id))
                if row is None:
                    return []
                same = ImageRecord.series_uid == row.series_uid if row.series_uid else ImageRecord.path == row.path
                found = session.execute(select(ImageRecord.id, ImageRecord.slice_index, ImageRecord.frame).where(
                    same, ImageRecord.model_id == row.model_id))
                ordered = sorted(found, key=lambda r: (r.slice_index is None, r.slice_index or 0, r.frame, r.id))
                return [r.id for r in ordered]
        except SQLAlchemyError as error:
            raise StoreError(f"cannot read {safe_url(self.db_url)}: {_reason(error)}") from None

    def iter_vectors(self, chunk: int = REBUILD_CHUNK, after: int = -1,
                     up_to: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Stream (ids, float32 vectors) from the database in chunks, ordered by id, for ids
        above ``after`` and, if given, not above ``up_to``."""
        last = after
        with Session(self.engine) as session:
            while True:
                query = select(ImageRecord.id, ImageRecord.vector).where(ImageRecord.id > last)
                if up_to is not None:
                    query = query.where(ImageRecord.id <= up_to)
                rows = session.execute(query.order_by(ImageRecord.id).limit(chunk)).all()
                if not rows:
                    return
                ids = np.fromiter((row[0] for row in rows), dtype=np.int64, count=len(rows))
                vectors = np.stack([decode_vector(row[1]) for row in rows])
                last = int(ids[-1])
                yield ids, vectors

    # -- index ----------------------------------------------------------------------------------

    @property
    def index_path(self) -> Path:
        return self.index_dir / INDEX_FILE

    @property
    def index_meta_path(self) -> Path:
        return self.index_dir / INDEX_META_FILE

    def _db_state(self, connection=None) -> dict:
        """Generation, count, lowest and highest id, model and dimension, read in one statement
        (so from one snapshot of the database)."""
        def setting(key: str):
            return select(StoreSetting.value).where(StoreSetting.key == key).scalar_subquery()

        statement = select(func.count(ImageRecord.id), func.min(ImageRecord.id), func.max(ImageRecord.id),
                           setting(GENERATION_KEY), setting("model_id"), setting("dimension"))
        if connection is None:
            with self.engine.connect() as own:
                count, low, high, generation, model_id, dimension = own.execute(statement).one()
        else:
            count, low, high, generation, model_id, dimension = connection.execute(statement).one()
        return {"model_id": model_id, "dimension": int(dimension) if dimension else None,
                "generation": int(generation or 0), "count": count or 0, "min_id": low or 0, "max_id": high or 0}

    def _save_index(self, index: faiss.Index, state: dict) -> None:
        """Keep ``index`` as the one in use, holding exactly ``state``, and (unless read-only)
        write it with a note of that state and the file's checksum, each file atomically."""
        self._index, self._index_state = index, state
        if self.read_only or state["count"] != index.ntotal:
            return
        try:
            digest = _write_atomically(self.index_path, lambda path: faiss.write_index(index, path))
            note = dict(state, sha256=digest, format=INDEX_NOTE_FORMAT)
            _write_atomically(self.index_meta_path, lambda path: Path(path).write_text(json.dumps(note, indent=1)))
        except OSError as error:
            if self.index_dir.exists() and not os.access(self.index_dir, os.W_OK):
                return  # a read-only index folder (a query node): serve from memory
            raise StoreError(f"cannot write the index in {self.index_dir}: {error.strerror}") from None

    def _read_index_file(self) -> tuple[faiss.Index, dict] | None:
        """The saved index and the state its note records, if the file is the one the note
        describes (same SHA-256) and agrees with it; None otherwise (then it is rebuilt)."""
        try:
            note = json.loads(self.index_meta_path.read_text())
            if not isinstance(note, dict) or note.get("format") != INDEX_NOTE_FORMAT:
                return None
            with open(self.index_path, "rb") as handle:
                inode = os.fstat(handle.fileno()).st_ino
                if _sha256_of(handle) != note.get("sha256"):
                    return None  # corrupt, or replaced by another writer after the note was read
                index = faiss.read_index(str(self.index_path))
                if os.stat(self.index_path).st_ino != inode:
                    return None  # replaced while it was read
        except (OSError, ValueError, RuntimeError):
            return None
        state = {key: note.get(key) for key in STATE_KEYS}
        dimension = self.dimension
        if state["model_id"] != self.model_id or (dimension and index.d != dimension) \
                or index.ntotal != state["count"]:
            return None
        _tune(index)
        return index, state

    def index(self) -> faiss.Index:
        """The FAISS index matching the database now.

        Used as it is when it holds the database's current generation; brought up to date by
        adding only the rows indexed since when every change since was an addition (another
        process or machine may have added them); rebuilt from the stored vectors when it is
        missing, corrupt, of another model, or rows were removed.
        """
        with self._lock:
            meta = self._db_state()
            if self._index is not None and _same_state(self._index_state, meta):
                return self._index
            candidates = []
            if self._index is not None and self._index_state is not None:
                candidates.append((self._index, self._index_state))
            saved = self._read_index_file()
            if saved is not None:
                candidates.append(saved)
            for index, state in candidates:
                if _same_state(state, meta):
                    self._index, self._index_state = index, state
                    return index
            for index, state in candidates:
                if self._catch_up(index, state, meta):
                    return index
            return self._rebuild()

    def _catch_up(self, index: faiss.Index, state: dict, meta: dict) -> bool:
        """Add the rows added since ``state`` to ``index`` if every change since was an addition."""
        first, last = state.get("generation"), meta["generation"]
        if any(state.get(key) != meta[key] for key in ("model_id", "dimension")) or first is None \
                or first >= last or index.ntotal != state.get("count"):
            return False  # same generation but other rows: changed by a version without the log
        try:
            with Session(self.engine) as session:
                changes = session.execute(select(StoreChange.kind, StoreChange.rows)
                                          .where(StoreChange.generation > first, StoreChange.generation <= last)).all()
        except SQLAlchemyError:
            return False  # no change log (a database of an earlier version)
        expected = sum(rows for _, rows in changes)
        if len(changes) != last - first or any(kind != "add" for kind, _ in changes) \
                or state["count"] + expected != meta["count"]:
            return False
        if self._index is index:
            self._index, self._index_state = None, None  # untrusted until caught up
        added = 0
        # ids grow with generations (writers take the generation first), so the rows added
        # since ``state`` are those between its highest id and the current one
        for ids, vectors in self.iter_vectors(after=state["max_id"], up_to=meta["max_id"]):
            index.add_with_ids(vectors, ids)
            added += len(ids)
        if added != expected:
            return False  # rows removed meanwhile: the index is dropped and rebuilt
        self._save_index(index, meta)
        return True

    @property
    def index_kind(self) -> str:
        with Session(self.engine) as session:
            return self._setting(session, "index_kind") or "auto"

    def rebuild_index(self, kind: str | None = None) -> faiss.Index:
        """Build a fresh index from the stored vectors, streamed in chunks, and save it.

        ``kind`` (``auto``, ``flat``, ``ivf`` or ``hnsw``) is remembered for later rebuilds;
        see :func:`build_index` for what each means.
        """
        if kind is not None:
            if kind not in INDEX_KINDS:
                raise StoreError(f"unknown index kind {kind!r}; choose from {', '.join(INDEX_KINDS)}")
            self._refuse_if_read_only()
            with Session(self.engine) as session, session.begin():
                session.merge(StoreSetting(key="index_kind", value=kind))
        return self._rebuild()

    def _rebuild(self) -> faiss.Index:
        with self._lock:
            for _ in range(REBUILD_ATTEMPTS):
                meta = self._db_state()
                # rows added meanwhile get higher ids: leave them out, to hold exactly ``meta``
                index = build_index(self.index_kind, meta["count"], meta["dimension"] or 1,
                                    lambda last=meta["max_id"]: self.iter_vectors(up_to=last), self.training_sample)
                if index.ntotal == meta["count"]:
                    self._save_index(index, meta)
                    return index
            # rows kept being removed while they were read: use it, but tie it to no state
            self._index, self._index_state = index, None
            return index

    def training_sample(self, size: int) -> np.ndarray:
        """About ``size`` stored vectors spread over the whole id range (for IVF training)."""
        step = max(1, self.count() // max(size, 1))
        with Session(self.engine) as session:
            rows = session.scalars(select(ImageRecord.vector).where(ImageRecord.id % step == 0).limit(size)).all()
        return np.stack([decode_vector(row) for row in rows]) if rows else np.zeros((0, self.dimension or 1), np.float32)

    def search(self, vectors: np.ndarray, k: int,
               restrict_to: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Scores and ids of the ``k`` nearest stored vectors for each query vector, best first.

        ``restrict_to`` (row ids, e.g. from :meth:`ids_matching`) searches among those rows
        only, so k of them come back however many other rows are nearer (see
        :data:`EXACT_RESTRICTED_SEARCH_MAX`). No id comes twice in a row of the answer; missing
        places are id -1, score -inf. Similarities beyond the query vector's norm (stored
        vectors are unit vectors) mean a corrupt index: it is rebuilt from the database once,
        automatically; if the rebuilt one answers such scores too, the stored vectors themselves
        are corrupt and :class:`StoreError` says so.
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
                index = self.index() if attempt == 0 else self._rebuild()
                if index.ntotal == 0:
                    return np.zeros((len(vectors), 0), np.float32), np.zeros((len(vectors), 0), np.int64)
                if vectors.shape[1] != index.d:
                    raise StoreError(f"query vectors have dimension {vectors.shape[1]}, the index {index.d}")
                scores, ids = self._search_index(index, vectors, k, restrict_to)
                wrong = (ids >= 0) & ~(np.abs(scores) <= limit)  # NaN counts as wrong
                if not wrong.any():
                    return _unique_per_row(scores, ids)
        raise StoreError(f"similarity {scores[wrong][0]:.3g} outside [-1, 1] from an index rebuilt from the "
                         f"database: some stored vectors are corrupt; `lungcbir check` counts them "
                         f"(remove and index their files again, then `lungcbir rebuild-index`)")

    def _search_index(self, index: faiss.Index, vectors: np.ndarray, k: int,
                      restrict_to: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        if restrict_to is None:
            return index.search(vectors, min(k, index.ntotal))
        if len(restrict_to) <= EXACT_RESTRICTED_SEARCH_MAX:
            return self._exact_search(vectors, k, restrict_to)
        selector = faiss.IDSelectorBatch(restrict_to)
        scores, ids = index.search(vectors, k, params=_search_parameters(index, selector))
        short = (ids >= 0).sum(axis=1) < k  # an approximate index may miss some of a small subset
        if short.any():
            scores[short], ids[short] = self._exact_search(vectors[short], k, restrict_to)
        return scores, ids

    def _exact_search(self, vectors: np.ndarray, k: int, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Brute-force top ``k`` among rows ``ids``, their vectors streamed from the database."""
        best_scores = np.full((len(vectors), 0), -np.inf, np.float32)
        best_ids = np.zeros((len(vectors), 0), np.int64)
        with Session(self.engine) as session:
            for start in range(0, len(ids), 1000):
                rows = session.execute(select(ImageRecord.id, ImageRecord.vector)
                                       .where(ImageRecord.id.in_(ids[start:start + 1000].tolist()))).all()
                if not rows:
                    continue
                chunk_ids = np.array([row[0] for row in rows], np.int64)
                chunk_scores = vectors @ np.stack([decode_vector(row[1]) for row in rows]).T
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

    # -- writers and checks -------------------------------------------------------------------

    @contextlib.contextmanager
    def write_lock(self, wait: bool = False):
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

    def check(self, verify_files: bool = False) -> list[str]:
        """Everything wrong with the store, one line each; an empty list means all is well.

        Reads only: nothing is written, not even an index out of date (that is a problem).
        """
        problems = []
        if self.engine.dialect.name == "sqlite":
            with self.engine.connect() as connection:
                result = connection.exec_driver_sql("PRAGMA quick_check").scalar()
            if result != "ok":
                problems.append(f"database integrity check failed: {result}")
        state = self._db_state()
        model_id, dimension = state["model_id"], state["dimension"]
        with Session(self.engine) as session:
            others = session.scalar(select(func.count(ImageRecord.id)).where(ImageRecord.model_id != model_id))
            if others:
                problems.append(f"{others} rows were made by another model than {model_id}")
            if dimension:
                wrong = session.scalar(select(func.count(ImageRecord.id))
                                       .where(func.length(ImageRecord.vector) != dimension * VECTOR_BYTES))
                if wrong:
                    problems.append(f"{wrong} rows hold vectors of the wrong length (dimension {dimension})")
            stored_ids = set(session.scalars(select(ImageRecord.id)))
        if dimension and not problems:  # what would give similarities outside [-1, 1]
            corrupt = sum(int((~(np.linalg.norm(vectors, axis=1) <= 1 + SCORE_TOLERANCE)).sum())
                          for _, vectors in self.iter_vectors())
            if corrupt:
                problems.append(f"{corrupt} rows hold vectors longer than unit length or not finite (corrupt); "
                                f"remove them and index their files again")
        if not self.index_path.exists():
            problems.append(f"index file {self.index_path} is missing")
            return problems + (self._check_files() if verify_files else [])
        try:
            index = faiss.read_index(str(self.index_path))
        except RuntimeError:
            problems.append(f"index file {self.index_path} is unreadable")
            return problems + (self._check_files() if verify_files else [])
        if dimension and index.d != dimension:
            problems.append(f"index dimension {index.d} differs from the database's {dimension}")
        indexed = set(index_ids(index).tolist())
        if indexed != stored_ids:
            problems.append(f"index and database disagree: {len(indexed - stored_ids)} vectors without "
                            f"a row, {len(stored_ids - indexed)} rows without a vector")
        try:
            note = json.loads(self.index_meta_path.read_text())
        except (OSError, ValueError):
            note = None
        if isinstance(note, dict):
            problems.extend(self._check_note(note, state))
        else:
            problems.append(f"index note {self.index_meta_path} is missing or unreadable")
        if verify_files:
            problems.extend(self._check_files())
        return problems

    def _check_note(self, note: dict, state: dict) -> list[str]:
        """What is wrong between the index note, the index file and the database state."""
        if note.get("format") != INDEX_NOTE_FORMAT or not note.get("sha256"):
            return [f"index note {self.index_meta_path} has no checksum (written by an earlier version)"]
        problems = []
        try:
            with open(self.index_path, "rb") as handle:
                if _sha256_of(handle) != note["sha256"]:
                    problems.append(f"index file {self.index_path} does not match the checksum in its note: "
                                    f"it is corrupt (searches rebuild it from the database)")
        except OSError as error:
            problems.append(f"index file {self.index_path} cannot be read: {error.strerror}")
        if note.get("model_id") != state["model_id"]:
            problems.append(f"index was built for model {note.get('model_id')}, database holds {state['model_id']}")
        elif not _same_state(note, state):
            problems.append(f"index is out of date: it holds the rows of database generation {note.get('generation')}"
                            f", the database is at generation {state['generation']}")
        return problems

    def _check_files(self) -> list[str]:
        from .io import file_sha256

        problems = []
        with Session(self.engine) as session:
            rows = session.execute(select(ImageRecord.path, ImageRecord.sha256).distinct()).all()
        for path, digest in rows:
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

    # -- summary ------------------------------------------------------------------------------

    def stats(self) -> StoreStats:
        with Session(self.engine) as session:
            images = session.scalar(select(func.count(ImageRecord.id))) or 0
            patients = session.scalar(select(func.count(func.distinct(ImageRecord.patient_id)))) or 0
            series = session.scalar(select(func.count(func.distinct(ImageRecord.series_uid)))) or 0
            identity = {}
            for source, patients_found, slices in session.execute(
                    select(ImageRecord.identity_source, func.count(func.distinct(ImageRecord.patient_id)),
                           func.count(ImageRecord.id)).group_by(ImageRecord.identity_source)):
                identity[source or "unrecorded"] = {"patients": patients_found, "slices": slices}
        url = make_url(self.db_url)
        database_bytes = None
        if url.get_backend_name() == "sqlite" and url.database and os.path.exists(url.database):
            database_bytes = os.path.getsize(url.database)
        index = self.index()
        return StoreStats(images=images, patients=patients, series=series, identity=identity, model_id=self.model_id,
                          dimension=self.dimension, index_vectors=int(index.ntotal),
                          index_kind=f"{describe_index(index)}; setting {self.index_kind}",
                          database=safe_url(self.db_url), database_bytes=database_bytes,
                          index_bytes=self.index_path.stat().st_size if self.index_path.exists() else None)


def _reason(error: SQLAlchemyError) -> str:
    original = getattr(error, "orig", None) or error
    text = str(original).strip().splitlines()
    return text[0][:200] if text else type(error).__name__


def _insert_ignoring_duplicates(dialect: str, table: type[Base], rows: list[dict]):
    """INSERT ... ON CONFLICT DO NOTHING for the backends we support."""
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    elif dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    else:
        raise StoreError(f"unsupported database backend {dialect!r}; use SQLite or PostgreSQL")
    return insert(table).values(rows).on_conflict_do_nothing()


def _unique_per_row(scores: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's first (best) hit of every id; the rest of the row is id -1, score -inf."""
    unique_scores, unique_ids = np.full_like(scores, -np.inf), np.full_like(ids, -1)
    for row, (row_scores, row_ids) in enumerate(zip(scores, ids)):
        _, first = np.unique(row_ids, return_index=True)
        keep = np.sort(first[row_ids[first] >= 0])
        unique_scores[row, :len(keep)], unique_ids[row, :len(keep)] = row_scores[keep], row_ids[keep]
    return unique_scores, unique_ids


def _missing_columns(engine: Engine) -> list:
    """The nullable columns of :class:`ImageRecord` that a database made by an older release lacks."""
    table = ImageRecord.__table__
    present = {column["name"] for column in inspect(engine).get_columns(table.name)}
    return [column for column in table.columns if column.name not in present and column.nullable]


def _add_missing_columns(engine: Engine) -> None:
    """Add the columns newer than a database (``mask_png``, ``sop_uid``), so older ones keep working.

    Existing rows get NULL there. A database that cannot be altered (a role without the right)
    is used as it is where it can be: rows without masks get them made again.
    """
    table = ImageRecord.__table__
    # IF NOT EXISTS: another process may add it at the same moment (SQLite serialises writers)
    guard = "IF NOT EXISTS " if engine.dialect.name == "postgresql" else ""
    for column in _missing_columns(engine):
        kind = column.type.compile(dialect=engine.dialect)
        try:
            with engine.begin() as connection:
                connection.exec_driver_sql(f"ALTER TABLE {table.name} ADD COLUMN {guard}{column.name} {kind}")
                if column.index:
                    connection.exec_driver_sql(f"CREATE INDEX IF NOT EXISTS ix_{table.name}_{column.name} "
                                               f"ON {table.name} ({column.name})")
        except SQLAlchemyError:
            pass  # added meanwhile by another process, or not allowed; Store.masks copes with both


def encode_mask(mask: np.ndarray) -> bytes:
    """A boolean mask as a 1-bit PNG: about 1.2 KB for a 512 x 512 lung mask (zlib level 6)."""
    ok, data = cv2.imencode(".png", mask.astype(np.uint8),
                            [cv2.IMWRITE_PNG_BILEVEL, 1, cv2.IMWRITE_PNG_COMPRESSION, 6])
    if not ok:
        raise StoreError("cannot encode a lung mask")
    return data.tobytes()


def decode_mask(data: bytes) -> np.ndarray:
    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
    if pixels is None:
        raise StoreError("a stored lung mask is not a readable PNG")
    return pixels > 0


def encode_vector(vector: np.ndarray) -> bytes:
    return np.asarray(vector, dtype=VECTOR_DTYPE).tobytes()


def decode_vector(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=VECTOR_DTYPE).astype(np.float32)


def build_index(kind: str, count: int, dimension: int, stream, sample) -> faiss.Index:
    """A FAISS inner-product index of the given kind, filled from ``stream()`` chunks.

    * ``flat``: exact search (``IndexIDMap2`` over ``IndexFlatIP``), 4 bytes per dimension;
    * ``ivf``: inverted lists holding float16 vectors (``IVF{n},SQfp16``), 2 bytes per
      dimension, trained on a sample of the stored vectors, ``nprobe`` 32 (8-bit codes lose
      too much: neighbouring slices differ in the third decimal of their similarity);
    * ``hnsw``: a graph index (``HNSW32,Flat``), fast but as large as flat, no removal;
    * ``auto``: ``flat`` below :data:`AUTO_IVF_FROM` vectors, ``ivf`` from there on.
    """
    if kind == "auto":
        kind = "flat" if count < AUTO_IVF_FROM else "ivf"
    if kind == "flat" or count == 0:
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(dimension))
    elif kind == "ivf":
        lists = int(min(max(16, 2 * np.sqrt(count)), 65536, max(16, count // 39)))
        index = faiss.index_factory(dimension, f"IVF{lists},SQfp16", faiss.METRIC_INNER_PRODUCT)
        index.train(sample(min(count, max(40 * lists, 20_000))))
    elif kind == "hnsw":
        graph = faiss.IndexHNSWFlat(dimension, 32, faiss.METRIC_INNER_PRODUCT)
        graph.hnsw.efConstruction = 80
        index = faiss.IndexIDMap2(graph)
    else:
        raise StoreError(f"unknown index kind {kind!r}")
    for ids, vectors in stream():
        index.add_with_ids(vectors, ids)
    _tune(index)
    return index


def describe_index(index: faiss.Index) -> str:
    """A short human description of an index: kind and search parameters."""
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else index
    if isinstance(inner, faiss.IndexHNSWFlat):
        return f"hnsw (M=32, efSearch={inner.hnsw.efSearch})"
    try:
        ivf = faiss.extract_index_ivf(index)
        return f"ivf (lists={ivf.nlist}, nprobe={ivf.nprobe}, float16)"
    except RuntimeError:
        return "flat (exact)"


def _search_parameters(index: faiss.Index, selector: faiss.IDSelector) -> faiss.SearchParameters:
    """Search parameters that keep the index's own tuning and search only ``selector``'s ids."""
    try:
        return faiss.SearchParametersIVF(sel=selector, nprobe=faiss.extract_index_ivf(index).nprobe)
    except RuntimeError:
        pass
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else None
    if isinstance(inner, faiss.IndexHNSWFlat):
        return faiss.SearchParametersHNSW(sel=selector, efSearch=inner.hnsw.efSearch)
    return faiss.SearchParameters(sel=selector)


def _tune(index: faiss.Index) -> None:
    """Search-time parameters, which FAISS files do not always keep."""
    try:
        faiss.extract_index_ivf(index).nprobe = IVF_NPROBE
        return
    except RuntimeError:
        pass
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else None
    if isinstance(inner, faiss.IndexHNSWFlat):
        inner.hnsw.efSearch = HNSW_EF_SEARCH


def index_ids(index: faiss.Index) -> np.ndarray:
    """Every id stored in an index (IDMap or IVF)."""
    if isinstance(index, faiss.IndexIDMap2) or hasattr(index, "id_map"):
        return faiss.vector_to_array(index.id_map)
    ivf = faiss.extract_index_ivf(index)
    lists = ivf.invlists
    parts = [faiss.rev_swig_ptr(lists.get_ids(n), lists.list_size(n)).copy()
             for n in range(ivf.nlist) if lists.list_size(n)]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)
