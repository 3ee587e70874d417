"""The database side of a store: the schema, the connection and every read and write of rows.

One row per indexed slice (:class:`ImageRecord`, vector and mask included), one per region
of a slice (:class:`RegionRecord`: a marked or found lesion, with its own vector), the store's
settings (:class:`StoreSetting`: model, dimension, index kind, generation), the change logs
(:class:`StoreChange`, :class:`RegionChange`), the regions set aside by an unfinished
``rebuild-regions`` (:class:`PendingRegion`) and the indexing queue of DICOMweb series
(:class:`QueueEntry`). SQLite and PostgreSQL are supported (:data:`SUPPORTED_BACKENDS`).

Regions follow the same design as slices, with their own generation (``region_generation``)
and change log, so that their vector index (:class:`RegionRows` is what it reads) knows
exactly which rows it holds; a transaction that adds or removes both takes the slices'
generation first, then the regions', so writers never wait on each other in a cycle. A
transaction of regions alone (``rebuild-regions``: :meth:`RegionRows.begin_rebuild`,
:meth:`Database.replace_regions`) takes the regions' generation only, so the slices' index
does not see a change.

Every transaction that adds or removes rows first takes the next *generation* of the
database (a counter in ``store_settings``, whose row lock also serialises writers, so
generations follow commit order) and logs what it did in ``store_changes``; the vector index
(:mod:`lungcbir.vector_index`) uses both to know whether it holds exactly the rows stored.
Row ids are never reused (SQLite ``AUTOINCREMENT``; for SQLite databases made by earlier
versions, which lack it, new ids are assigned above every id ever used).
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import cv2
import numpy as np
from sqlalchemy import (
    JSON,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Table,
    Text,
    UniqueConstraint,
    cast,
    create_engine,
    delete,
    event,
    func,
    insert,
    inspect,
    or_,
    select,
    update,
)
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from .config import DEFAULT_DB_URL
from .errors import StoreError

REBUILD_CHUNK = 10_000
#: Vectors are stored as float16 in the database: half the size, and retrieval rankings are
#: unchanged for unit vectors (relative error about 1e-3).
VECTOR_DTYPE = np.float16
VECTOR_BYTES = 2
#: PostgreSQL advisory lock taken while the schema is created or checked (any constant number
#: that no other application on the server uses; "lungcbir" in ASCII).
SCHEMA_LOCK_KEY = 0x6C756E6763626972
#: Backends lungcbir supports (SQLAlchemy backend names).
SUPPORTED_BACKENDS = ("sqlite", "postgresql")
GENERATION_KEY = "generation"
#: The settings of the regions' side: their own generation, model (vector recipe) and dimension.
REGION_GENERATION_KEY = "region_generation"
REGION_MODEL_KEY = "region_model_id"
REGION_DIMENSION_KEY = "region_dimension"
#: At most this many bound parameters in one INSERT (PostgreSQL allows 65,535, SQLite 32,766).
INSERT_PARAMETERS = 30_000
#: What the note records of the database state an index holds.
STATE_KEYS = ("model_id", "dimension", "generation", "count", "min_id", "max_id")
#: Metadata columns a filter may name; a label of the same name takes precedence.
FILTER_COLUMNS = ("patient_id", "series_uid", "study_uid", "source_format")
#: Most distinct values listed per label key by :meth:`Database.label_values`.
MAX_LABEL_VALUES = 200
#: Longest SOP Instance UID stored, in UTF-8 bytes: the column is indexed, and a PostgreSQL
#: index entry holds at most about 2,700 bytes (a valid UID has at most 64).
MAX_SOP_UID_BYTES = 1024


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
    # identifiers are TEXT, kept whole: a folder's relative path is a patient, and messy DICOM
    # has long UIDs; VARCHAR(128), as earlier versions made them, is widened on open
    patient_id: Mapped[str | None] = mapped_column(Text, nullable=True)
    study_uid: Mapped[str | None] = mapped_column(Text, nullable=True)
    series_uid: Mapped[str | None] = mapped_column(Text, nullable=True)
    sop_uid: Mapped[str | None] = mapped_column(Text, nullable=True, index=True)
    instance_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    slice_location: Mapped[float | None] = mapped_column(Float, nullable=True)
    #: what PACS lists a study and series by; NULL for non-DICOM rows and rows indexed before
    study_date: Mapped[str | None] = mapped_column(String(16), nullable=True)
    series_description: Mapped[str | None] = mapped_column(String(128), nullable=True)
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
    #: only by :meth:`Database.masks`.
    mask_png: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True, deferred=True)
    #: where patient_id / series_uid came from (:class:`lungcbir.identity.IdentitySource`
    #: value); NULL in rows indexed before it was recorded
    identity_source: Mapped[str | None] = mapped_column(String(16), nullable=True)


class StoreSetting(Base):
    """Key/value facts about the whole store (which model, which dimension)."""

    __tablename__ = "store_settings"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class _ChangeLog:
    """The columns of a change log: one committed change of some rows, numbered by the
    generation it made."""

    generation: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    kind: Mapped[str] = mapped_column(String(8))  # "add" or "remove"
    rows: Mapped[int] = mapped_column(Integer)
    first_id: Mapped[int] = mapped_column(Integer)
    last_id: Mapped[int] = mapped_column(Integer)
    changed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class StoreChange(_ChangeLog, Base):
    """One committed change of the image rows, numbered by the database generation it made."""

    __tablename__ = "store_changes"


class RegionRecord(Base):
    """One region of a stored slice: a marked finding (``source`` "mask") or a lesion the model
    found itself ("lesion"), with its own vector (:func:`lungcbir.regions.region_vector`).

    Removing the slice removes its regions: explicitly in :meth:`Database.remove` (which logs
    them), and by the foreign key's ON DELETE CASCADE for any other delete.
    """

    __tablename__ = "regions"
    __table_args__ = ({"sqlite_autoincrement": True},)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    image_id: Mapped[int] = mapped_column(Integer, ForeignKey("images.id", ondelete="CASCADE"), index=True)
    #: bounding box in pixels of the slice as read (x1, y1 exclusive)
    x0: Mapped[int] = mapped_column(Integer)
    y0: Mapped[int] = mapped_column(Integer)
    x1: Mapped[int] = mapped_column(Integer)
    y1: Mapped[int] = mapped_column(Integer)
    area: Mapped[int] = mapped_column(Integer)  # pixels of the slice as read
    source: Mapped[str] = mapped_column(String(8))  # "mask" or "lesion"
    model_id: Mapped[str] = mapped_column(String(32), index=True)  # the region vector's recipe and model
    vector: Mapped[bytes] = mapped_column(LargeBinary)
    #: the region itself inside its box (:func:`encode_mask` of the box's pixels), for pictures
    mask_png: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True, deferred=True)


class RegionChange(_ChangeLog, Base):
    """One committed change of the region rows, numbered by the region generation it made."""

    __tablename__ = "region_changes"


class PendingRegion(Base):
    """A region made with an earlier region recipe, set aside while ``lungcbir rebuild-regions``
    makes its slice's regions again (:meth:`RegionRows.begin_rebuild`): not searchable, no
    vector. A marked region's mask is what the rebuild takes it back from; a slice with pending
    rows has not been rebuilt yet. Removed with its slice (ON DELETE CASCADE) or once rebuilt.
    """

    __tablename__ = "regions_pending"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    image_id: Mapped[int] = mapped_column(Integer, ForeignKey("images.id", ondelete="CASCADE"), index=True)
    x0: Mapped[int] = mapped_column(Integer)
    y0: Mapped[int] = mapped_column(Integer)
    x1: Mapped[int] = mapped_column(Integer)
    y1: Mapped[int] = mapped_column(Integer)
    area: Mapped[int] = mapped_column(Integer)
    source: Mapped[str] = mapped_column(String(8))
    mask_png: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)


@dataclass
class NewRegion:
    """A region to store with its slice: box, area, source, vector and the region's mask in its box."""

    bbox: tuple[int, int, int, int]
    area: int
    source: str
    vector: np.ndarray
    mask: np.ndarray | None = None  # bool, the box's size


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
    root: Mapped[str] = mapped_column(Text)
    study_uid: Mapped[str] = mapped_column(Text)
    series_uid: Mapped[str] = mapped_column(Text)
    model_id: Mapped[str] = mapped_column(String(32))
    state: Mapped[str] = mapped_column(String(8), index=True)
    claimed_by: Mapped[str | None] = mapped_column(String(160), nullable=True)
    claimed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    enqueued_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class _Unchanged(Exception):
    """Raised inside a change transaction that changed no row: it is rolled back, not logged."""


def safe_url(url: str) -> str:
    """The database URL with any password hidden, for messages and logs."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparseable database URL>"


def other_regions_message(stored: str | None, wanted: str) -> str:
    """Why stored region vectors made by ``stored`` (``<model id>/<recipe>``,
    :func:`lungcbir.regions.region_model_id`) cannot be searched or added to with ``wanted``'s,
    and what to do: ``lungcbir rebuild-regions`` makes them again in place when only the recipe
    differs; another model's regions belong to slices of that model, which must be re-indexed.

    Example:
        >>> other_regions_message("m1/r1", "m1/r2")[:80]
        'the stored regions were made with region recipe r1, this version of lungcbir mak'
    """
    stored_model, _, stored_recipe = (stored or "").rpartition("/")
    model, _, recipe = wanted.rpartition("/")
    if stored_model == model and stored_recipe != recipe:
        return (f"the stored regions were made with region recipe {stored_recipe}, this version of lungcbir "
                f"makes {recipe} ({wanted}), and the two cannot be compared: rebuild the regions in place with "
                f"`lungcbir rebuild-regions` (the slices stay as they are; marked regions are kept)")
    return (f"this database holds region vectors of {stored}, not of the regions in use ({wanted}); "
            f"re-index into a new --db and --index-dir with this model to rebuild the slices and their regions "
            f"(`lungcbir index-dataset PATH...`), or use the weights they were made with; when the slices "
            f"themselves were indexed with this model, `lungcbir rebuild-regions` rebuilds the regions alone")


#: Ids per ``IN (...)`` list: bounds a statement's parameter count (SQLite's limit, PostgreSQL's plan size).
IN_LIST_CHUNK = 5000


def _in_chunks(ids: Sequence[int]) -> Iterator[Sequence[int]]:
    """``ids`` in slices of at most :data:`IN_LIST_CHUNK`, one ``IN (...)`` list each."""
    for start in range(0, len(ids), IN_LIST_CHUNK):
        yield ids[start:start + IN_LIST_CHUNK]


class _LastState:
    """The newest committed state (:meth:`Database.state`) of one row table this process has
    read or made.

    An addition whose generation directly follows it gets its state by adding its rows to it,
    where :meth:`Database.state` counts every row: 0.2-0.3 s at a million rows on SQLite, paid
    at every commit of an indexing run. Sound because every change of the rows takes the next
    generation in its own transaction: nothing else changed between the two generations.
    """

    def __init__(self) -> None:
        self._state: dict | None = None
        self._lock = threading.Lock()

    def remember(self, state: dict) -> None:
        with self._lock:
            if self._state is None or state["generation"] >= self._state["generation"]:
                self._state = dict(state)

    def after_add(self, generation: int, ids: Sequence[int]) -> dict | None:
        """The state right after ``ids`` were added as ``generation``; None when not known (then
        count). Only from a state with rows: the model and dimension are set before the first."""
        with self._lock:
            last = self._state
        if last is None or last["generation"] != generation - 1 or not last["count"] or not ids:
            return None
        return dict(last, generation=generation, count=last["count"] + len(ids),
                    max_id=max(last["max_id"], max(ids)))


def _state_of(row: Sequence) -> dict:
    """A state dict of a (count, lowest id, highest id, generation, model, dimension) row."""
    count, low, high, generation, model_id, dimension = row
    return {"model_id": model_id, "dimension": int(dimension) if dimension else None,
            "generation": int(generation or 0), "count": count or 0, "min_id": low or 0, "max_id": high or 0}


def same_state(one: dict | None, other: dict | None) -> bool:
    """Whether two database states (:meth:`Database.state`, or an index note) are the same."""
    return one is not None and other is not None and all(one.get(key) == other.get(key) for key in STATE_KEYS)


@dataclass(frozen=True)
class Committed:
    """A change of the image rows just committed: what the vector index needs to follow it."""

    generation: int  # the database generation the change made
    state: dict  # the database state right after it (:meth:`Database.state`)
    ids: list[int]  # the rows added (ascending) or removed
    positions: list[int]  # for an addition: where each added row was in the records given
    #: the regions added or removed with these rows, as their own change (None: none)
    regions: Committed | None = None
    #: for an addition: the added regions' vectors as stored, in ``regions.ids`` order
    region_vectors: np.ndarray | None = None


@dataclass(frozen=True)
class RowStats:
    """What :meth:`Database.row_stats` counts."""

    images: int
    patients: int
    series: int
    #: how identity was found: {source: {"patients": distinct patients, "slices": rows}}
    identity: dict
    database_bytes: int | None  # the SQLite file's size; None for PostgreSQL


class Database:
    """The rows of a store in a SQLite or PostgreSQL database (the source of truth).

    ``create=False``: the database must exist already (else :class:`StoreError`, "no
    database"). ``read_only=True``: no table is created and every write is refused.
    Safe to use from many threads: each call opens its own session.
    """

    def __init__(self, db_url: str = DEFAULT_DB_URL, create: bool = True, read_only: bool = False) -> None:
        self.db_url = db_url
        self.read_only = read_only
        self.last_state = _LastState()
        self._assign_ids = False  # set by _connect for SQLite tables without AUTOINCREMENT
        self.has_regions = True  # set by _connect: False for a read-only database of an earlier version
        self.has_pending = True  # the same for the table of regions waiting for a rebuild
        self.engine = self._connect(db_url, create and not read_only)
        self.regions = RegionRows(self)

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
            if backend == "sqlite":
                # SQLite enforces foreign keys (the regions' ON DELETE CASCADE) only when asked, per connection
                event.listen(engine, "connect", _sqlite_foreign_keys)
        except ImportError as error:
            raise StoreError(f"cannot use {safe_url(db_url)}: its driver ({error.name or url.get_driver_name()}) is "
                             f"not installed; SQLite and PostgreSQL are supported "
                             f"(postgresql+psycopg://: pip install 'lungcbir[postgres]')") from None
        except SQLAlchemyError as error:
            raise StoreError(f"cannot open database {safe_url(db_url)}: {sql_reason(error)}") from None
        try:
            with engine.begin() as connection:
                if backend == "postgresql" and not self.read_only:
                    # machines starting together on a new database would create its tables and
                    # types at once and collide: one creates them, the others then find them
                    connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({SCHEMA_LOCK_KEY})")
                tables = set(inspect(connection).get_table_names())
                self.has_regions = RegionRecord.__tablename__ in tables or not self.read_only
                self.has_pending = PendingRegion.__tablename__ in tables or not self.read_only
                if ImageRecord.__tablename__ not in tables and not create:
                    raise StoreError(f"no lungcbir database in {safe_url(db_url)}; "
                                     f"create one with `lungcbir index-dataset PATH`")
                if not self.read_only:
                    if backend == "sqlite" and not set(Base.metadata.tables) <= tables:
                        # the same race on SQLite, which has no advisory lock: its write lock,
                        # taken before create_all looks again, lets one opener create the tables
                        connection.exec_driver_sql("BEGIN IMMEDIATE")
                    Base.metadata.create_all(connection)  # also adds tables new in this version
                    if backend == "postgresql":
                        _widen_text_columns(connection)
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
            raise StoreError(f"cannot open database {safe_url(db_url)}: {sql_reason(error)}") from None
        return engine

    # -- settings -----------------------------------------------------------------------------

    @staticmethod
    def _setting(session: Session, key: str) -> str | None:
        row = session.get(StoreSetting, key)
        return row.value if row else None

    def setting(self, key: str) -> str | None:
        """One value of ``store_settings``; None when it was never set."""
        with Session(self.engine) as session:
            return self._setting(session, key)

    def set_setting(self, key: str, value: str) -> None:
        """Set one value of ``store_settings`` (refused when read-only)."""
        self.refuse_if_read_only()
        with Session(self.engine) as session, session.begin():
            session.merge(StoreSetting(key=key, value=value))

    @property
    def model_id(self) -> str | None:
        """The model whose vectors the database holds (None while empty and unclaimed)."""
        return self.setting("model_id")

    @property
    def dimension(self) -> int | None:
        """The length of the stored vectors (None while unclaimed)."""
        value = self.setting("dimension")
        return int(value) if value else None

    def check_model(self, model_id: str, dimension: int) -> None:
        """Raise if the store holds vectors of another model; claim an empty store."""
        with Session(self.engine) as session:
            stored = self._setting(session, "model_id")
        if stored is None:
            self.refuse_if_read_only()
            # machines starting together on an empty database race to claim it: the first
            # claim stands (INSERT ... ON CONFLICT DO NOTHING), the others read it back
            try:
                with self.engine.begin() as connection:
                    connection.execute(insert_ignoring_duplicates(
                        self.engine.dialect.name, StoreSetting,
                        [{"key": "model_id", "value": model_id}, {"key": "dimension", "value": str(dimension)}]))
            except SQLAlchemyError as error:
                raise StoreError(f"cannot write to {safe_url(self.db_url)}: {sql_reason(error)}") from None
            with Session(self.engine) as session:
                stored = self._setting(session, "model_id")
        if stored != model_id:
            raise StoreError(f"this database holds vectors of model {stored}, not of the model in use "
                             f"({model_id}); re-index into a new --db and --index-dir with this model, "
                             f"or use the weights the database was indexed with")

    def refuse_if_read_only(self) -> None:
        """Raise :class:`StoreError` if this database was opened read-only."""
        if self.read_only:
            raise StoreError(f"the store {safe_url(self.db_url)} was opened read-only")

    # -- rows -----------------------------------------------------------------------------------

    def stored_keys(self, model_id: str, keys: Iterable[tuple[str, int]]) -> set[tuple[str, int]]:
        """Which of these (sha256, frame) are already indexed with this model: looked up by the
        sha256 index, so the cost follows the keys asked about, not the rows stored (loading
        every stored key took 4.6 s and 356 MiB at a million rows, at every run's start)."""
        wanted = set(keys)
        shas = sorted({sha for sha, _ in wanted})
        found: set[tuple[str, int]] = set()
        with Session(self.engine) as session:
            for start in range(0, len(shas), 500):  # bound the statement's parameter count
                rows = session.execute(select(ImageRecord.sha256, ImageRecord.frame).where(
                    ImageRecord.model_id == model_id, ImageRecord.sha256.in_(shas[start:start + 500])))
                found.update((sha, frame) for sha, frame in rows if (sha, frame) in wanted)
        return found

    def contents_at(self, paths: Iterable[str], model_id: str) -> dict[str, list[tuple[int, str, int]]]:
        """(id, sha256, frame) of the rows indexed with this model at each of these exact paths
        (paths without rows are left out): what a rerun compares each file's content with. A path
        that is not valid UTF-8 has no row (such a file is refused when it is read)."""
        paths = [path for path in paths if _storable_text(path)]
        found: dict[str, list[tuple[int, str, int]]] = {}
        with Session(self.engine) as session:
            for start in range(0, len(paths), 1000):  # bound the statement's parameter count
                for row_id, path, sha, frame in session.execute(
                        select(ImageRecord.id, ImageRecord.path, ImageRecord.sha256, ImageRecord.frame).where(
                            ImageRecord.model_id == model_id, ImageRecord.path.in_(paths[start:start + 1000]))):
                    found.setdefault(path, []).append((row_id, sha, frame))
        return found

    @contextlib.contextmanager
    def _change(self):
        """A write transaction numbered by the next database generation, taken first.

        Taking the generation locks its row until commit, so writers (on any machine) change
        rows one after the other and generations, ids and commits come in the same order.
        Raise :class:`_Unchanged` inside to roll back a transaction that changed nothing.
        """
        self.refuse_if_read_only()
        try:
            with self.engine.begin() as connection:
                yield connection, _next_generation(connection, self.engine.dialect.name, GENERATION_KEY)
        except _Unchanged:
            pass
        except SQLAlchemyError as error:
            raise StoreError(f"cannot write to {safe_url(self.db_url)}: {sql_reason(error)}") from None

    def known_sop_uids(self, model_id: str, series_uid: str | None = None) -> set[str]:
        """SOP Instance UIDs of every DICOM slice already indexed with this model (of one
        series only, when ``series_uid`` is given)."""
        conditions = [ImageRecord.model_id == model_id, ImageRecord.sop_uid.is_not(None)]
        if series_uid is not None:
            conditions.append(ImageRecord.series_uid == series_uid)
        with Session(self.engine) as session:
            return set(session.scalars(select(ImageRecord.sop_uid).where(*conditions)))

    def add(self, records: Sequence[ImageRecord], vectors: np.ndarray,
            regions: Sequence[Sequence[NewRegion]] | None = None, region_model_id: str | None = None
            ) -> Committed | None:
        """Insert rows with their vectors in one transaction, logged as one generation.

        A row whose (sha256, frame, model) is already stored, by this or a concurrent run, is
        left alone (the unique constraint decides, not a check-then-insert). ``regions`` (one
        list per record, made with ``region_model_id``) are stored in the same transaction with
        the rows inserted, logged as one region generation. Returns what was inserted, or None
        when nothing was.
        """
        if not records:
            return None
        for record in records:
            if (problem := unstorable(record)) is not None:
                raise StoreError(f"{record.path}: {problem}")
        now = datetime.now(timezone.utc)
        columns = [c.key for c in ImageRecord.__table__.columns if c.key != "id"]
        rows = []
        for record, vector in zip(records, vectors):
            record.vector, record.indexed_at = encode_vector(vector), now
            rows.append({key: getattr(record, key) for key in columns})
        position = {(r["sha256"], r["frame"], r["model_id"]): i for i, r in enumerate(rows)}
        inserted = []
        state: dict = {}
        with self._change() as (connection, generation):
            if self._assign_ids:  # an old SQLite table without AUTOINCREMENT: never give an id twice
                highest = max(connection.scalar(select(func.max(ImageRecord.id))) or 0,
                              connection.scalar(select(func.max(StoreChange.last_id))) or 0)
                for number, row in enumerate(rows, highest + 1):
                    row["id"] = number
            # one statement's bound parameters are limited (PostgreSQL: 65,535), so big batches
            # go in several statements of the same transaction
            per_statement = max(1, INSERT_PARAMETERS // len(columns))
            for start in range(0, len(rows), per_statement):
                inserted += connection.execute(insert_ignoring_duplicates(
                    self.engine.dialect.name, ImageRecord, rows[start:start + per_statement]).returning(
                    ImageRecord.id, ImageRecord.sha256, ImageRecord.frame, ImageRecord.model_id)).all()
            inserted.sort()
            if not inserted:
                raise _Unchanged
            _log_change(connection, StoreChange, generation, "add", [row[0] for row in inserted])
            state = self.last_state.after_add(generation, [row[0] for row in inserted]) or self.state(connection)
            added_regions = None
            if regions:
                added_regions = self._add_regions(connection, [
                    (row[0], region) for row in inserted for region in regions[position[(row[1], row[2], row[3])]]],
                    region_model_id or "")
        if not inserted:
            return None
        self.last_state.remember(state)
        region_part, region_vectors = added_regions or (None, None)
        if region_part is not None:
            self.regions.last_state.remember(region_part.state)
        return Committed(generation, state, [row[0] for row in inserted],
                         [position[(row[1], row[2], row[3])] for row in inserted], region_part, region_vectors)

    def _add_regions(self, connection, regions: list[tuple[int, NewRegion]],
                     model_id: str) -> tuple[Committed, np.ndarray] | None:
        """Insert regions (image id, region) inside a change transaction, as the next region generation."""
        if not regions:
            return None
        generation = _next_generation(connection, self.engine.dialect.name, REGION_GENERATION_KEY)
        rows = [{"image_id": image_id, "x0": int(region.bbox[0]), "y0": int(region.bbox[1]),
                 "x1": int(region.bbox[2]), "y1": int(region.bbox[3]), "area": int(region.area),
                 "source": region.source, "model_id": model_id, "vector": encode_vector(region.vector),
                 "mask_png": encode_mask(region.mask) if region.mask is not None and region.mask.size else None}
                for image_id, region in regions]
        ids: list[int] = []
        per_statement = max(1, INSERT_PARAMETERS // len(rows[0]))
        for start in range(0, len(rows), per_statement):
            # RETURNING gives no order promise: each row's id is matched back by its place below
            ids += connection.execute(insert(RegionRecord).values(rows[start:start + per_statement])
                                      .returning(RegionRecord.id)).scalars().all()
        order = np.argsort(ids, kind="stable")
        ids = [int(ids[n]) for n in order]
        _log_change(connection, RegionChange, generation, "add", ids)
        vectors = np.stack([decode_vector(rows[n]["vector"]) for n in order])
        state = self.regions.last_state.after_add(generation, ids) or self.regions.state(connection)
        return Committed(generation, state, ids, [int(n) for n in order]), vectors

    def remove(self, ids: Iterable[int]) -> Committed | None:
        """Delete rows (vectors included) in one transaction, logged as one generation.

        Returns what was deleted, or None when none of the ids was stored.
        """
        ids = [int(i) for i in ids]
        if not ids:
            return None
        removed: list[int] = []
        state: dict = {}
        regions: Committed | None = None
        with self._change() as (connection, generation):
            regions = self._remove_regions_of(connection, ids)
            for start in range(0, len(ids), 500):
                chunk = ids[start:start + 500]
                removed += connection.execute(delete(ImageRecord).where(ImageRecord.id.in_(chunk))
                                              .returning(ImageRecord.id)).scalars().all()
            if not removed:
                raise _Unchanged
            _log_change(connection, StoreChange, generation, "remove", removed)
            state = self.state(connection)
        if not removed:
            return None
        self.last_state.remember(state)
        return Committed(generation, state, removed, [], regions)

    def _remove_regions_of(self, connection, image_ids: list[int]) -> Committed | None:
        """Delete the regions of these slices inside a change transaction, as the next region
        generation (deleted here, not left to the cascade, so that the change is logged)."""
        if not self.has_regions:
            return None
        found: list[int] = []
        for start in range(0, len(image_ids), 500):
            found += connection.execute(select(RegionRecord.id).where(
                RegionRecord.image_id.in_(image_ids[start:start + 500]))).scalars().all()
        if not found:
            return None
        generation = _next_generation(connection, self.engine.dialect.name, REGION_GENERATION_KEY)
        removed: list[int] = []
        for start in range(0, len(found), 500):
            removed += connection.execute(delete(RegionRecord).where(RegionRecord.id.in_(found[start:start + 500]))
                                          .returning(RegionRecord.id)).scalars().all()
        _log_change(connection, RegionChange, generation, "remove", removed)
        return Committed(generation, self.regions.state(connection), sorted(removed), [])

    def replace_regions(self, image_ids: Sequence[int], regions: Sequence[tuple[int, NewRegion]], model_id: str
                        ) -> tuple[Committed | None, tuple[Committed, np.ndarray] | None]:
        """Replace every region of these slices, stored or pending, by ``regions`` ((image id,
        region), vectors made by ``model_id``) in one transaction: the stored ones are deleted as
        one region generation, the new ones inserted as the next; the slices' rows and their
        generation are not touched. Regions of a slice removed meanwhile are left out. Returns
        the removal and the addition (None where there was none), for the region index.
        """
        ids = sorted({int(i) for i in image_ids})
        self.refuse_if_read_only()
        if not ids:
            return None, None
        try:
            with self.engine.begin() as connection:
                removed = self._remove_regions_of(connection, ids)
                present: set[int] = set()
                for start in range(0, len(ids), 500):
                    chunk = ids[start:start + 500]
                    if self.has_pending:
                        connection.execute(delete(PendingRegion).where(PendingRegion.image_id.in_(chunk)))
                    present.update(connection.execute(select(ImageRecord.id).where(ImageRecord.id.in_(chunk)))
                                   .scalars().all())
                added = self._add_regions(connection, [(image_id, region) for image_id, region in regions
                                                       if image_id in present], model_id)
        except SQLAlchemyError as error:
            raise StoreError(f"cannot write to {safe_url(self.db_url)}: {sql_reason(error)}") from None
        return removed, added

    def slice_sources(self, after: int = -1, limit: int = 1000) -> list[SliceSource]:
        """Where the stored slices with ids above ``after`` came from, at most ``limit`` of them
        in id order (what ``rebuild-regions`` reads again)."""
        with Session(self.engine) as session:
            rows = session.execute(select(ImageRecord.id, ImageRecord.path, ImageRecord.frame, ImageRecord.sha256,
                                          ImageRecord.width, ImageRecord.height)
                                   .where(ImageRecord.id > after).order_by(ImageRecord.id).limit(limit)).all()
        return [SliceSource(row.id, row.path, row.frame, row.sha256, row.width, row.height) for row in rows]

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
        """How many rows are stored (every row is read: :meth:`is_empty` where that is the question)."""
        with Session(self.engine) as session:
            return session.scalar(select(func.count(ImageRecord.id))) or 0

    def is_empty(self) -> bool:
        """Whether no row is stored: one row looked up, where :meth:`count` reads them all."""
        with Session(self.engine) as session:
            return session.scalar(select(ImageRecord.id).limit(1)) is None

    def records(self, ids: Iterable[int]) -> dict[int, ImageRecord]:
        """Rows by id (vectors included)."""
        ids = [int(i) for i in ids]
        if not ids:
            return {}
        rows: list[ImageRecord] = []
        with Session(self.engine, expire_on_commit=False) as session:
            for chunk in _in_chunks(ids):
                rows += session.scalars(select(ImageRecord).where(ImageRecord.id.in_(chunk))).all()
            for row in rows:
                session.expunge(row)
        return {row.id: row for row in rows}

    def neighbor_rows(self, ids: Iterable[int]) -> dict[int, NeighborRow]:
        """:class:`NeighborRow` of these rows by id (rows since removed are left out)."""
        wanted = [int(i) for i in ids]
        found: dict[int, NeighborRow] = {}
        columns = (ImageRecord.id, ImageRecord.path, ImageRecord.patient_id, ImageRecord.study_uid,
                   ImageRecord.series_uid, ImageRecord.sop_uid, ImageRecord.slice_index, ImageRecord.labels,
                   ImageRecord.vector)
        with self.engine.connect() as connection:
            for chunk in _in_chunks(wanted):
                for row in connection.execute(select(*columns).where(ImageRecord.id.in_(chunk))):
                    found[row.id] = NeighborRow(row.id, row.path, row.patient_id, row.study_uid, row.series_uid,
                                                row.sop_uid, row.slice_index, dict(row.labels or {}), row.vector)
        return found

    def masks(self, ids: Iterable[int]) -> dict[int, np.ndarray]:
        """The lung masks kept in these rows, by id (rows without one are left out)."""
        ids = [int(i) for i in ids]
        found: dict[int, np.ndarray] = {}
        try:
            with Session(self.engine) as session:
                for chunk in _in_chunks(ids):
                    rows = session.execute(select(ImageRecord.id, ImageRecord.mask_png).where(
                        ImageRecord.id.in_(chunk), ImageRecord.mask_png.is_not(None)))
                    for row_id, data in rows:
                        if data is None:  # excluded by the query; this only tells the type checker
                            continue
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
            raise StoreError(f"cannot read {safe_url(self.db_url)}: {sql_reason(error)}") from None

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
            raise StoreError(f"cannot read {safe_url(self.db_url)}: {sql_reason(error)}") from None
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
            raise StoreError(f"cannot read {safe_url(self.db_url)}: {sql_reason(error)}") from None

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

    def state(self, connection=None) -> dict:
        """Generation, count, lowest and highest id, model and dimension, read in one statement
        (so from one snapshot of the database)."""
        def setting(key: str):
            return select(StoreSetting.value).where(StoreSetting.key == key).scalar_subquery()

        statement = select(func.count(ImageRecord.id), func.min(ImageRecord.id), func.max(ImageRecord.id),
                           setting(GENERATION_KEY), setting("model_id"), setting("dimension"))
        if connection is not None:  # inside a transaction, which may still be rolled back
            return _state_of(connection.execute(statement).one())
        with self.engine.connect() as own:
            state = _state_of(own.execute(statement).one())
        self.last_state.remember(state)
        return state

    def generation(self) -> int:
        """The change counter alone: one row read, where :meth:`state` counts every row (about
        0.1 s at a million rows on SQLite)."""
        with self.engine.connect() as connection:
            value = connection.execute(select(StoreSetting.value).where(StoreSetting.key == GENERATION_KEY)).scalar()
        return int(value or 0)

    def training_sample(self, size: int) -> np.ndarray:
        """About ``size`` stored vectors spread over the whole id range (for IVF training)."""
        step = max(1, self.count() // max(size, 1))
        with Session(self.engine) as session:
            rows = session.scalars(select(ImageRecord.vector).where(ImageRecord.id % step == 0).limit(size)).all()
        if not rows:
            return np.zeros((0, self.dimension or 1), np.float32)
        return np.stack([decode_vector(row) for row in rows])

    def vectors_of(self, ids: np.ndarray, chunk: int = 1000) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Stream (ids, float32 vectors) of the rows ``ids`` in chunks (rows since removed are
        left out), all read on one connection.

        Fast enough to re-rank a few hundred candidates per query (the compact index kind):
        no ORM session, each chunk's float16 blobs decoded in one ``np.frombuffer`` over their
        joined bytes, and on SQLite a plain parameterised statement, which skips SQLAlchemy's
        statement compilation (about 0.4 ms for 200 rows instead of 1 ms).
        """
        plain = self.engine.dialect.name == "sqlite"
        statement = select(ImageRecord.id, ImageRecord.vector)
        with self.engine.connect() as connection:
            for start in range(0, len(ids), chunk):
                wanted = tuple(int(n) for n in ids[start:start + chunk])
                if not wanted:
                    continue
                if plain:
                    rows = connection.exec_driver_sql(
                        f"SELECT id, vector FROM {ImageRecord.__tablename__} "
                        f"WHERE id IN ({', '.join('?' * len(wanted))})", wanted).all()
                else:
                    rows = connection.execute(statement.where(ImageRecord.id.in_(wanted))).all()
                if rows:
                    yield _decoded(rows)

    def changes_between(self, first: int, last: int) -> list[tuple[str, int]] | None:
        """(kind, rows) of each logged change after generation ``first`` up to ``last``; None
        when the database has no change log (made by an earlier version)."""
        return _changes_between(self.engine, StoreChange, first, last)

    # -- checks and summary -----------------------------------------------------------------------

    def check_rows(self, state: dict) -> tuple[list[str], set[int]]:
        """What is wrong with the rows themselves (integrity, model, vector lengths), one line
        each, and the ids of every stored row."""
        problems = []
        if self.engine.dialect.name == "sqlite":
            with self.engine.connect() as connection:
                result = connection.exec_driver_sql("PRAGMA quick_check").scalar()
            if result != "ok":
                problems.append(f"database integrity check failed: {result}")
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
        return problems, stored_ids

    def stored_files(self) -> list[tuple[str, str]]:
        """Every distinct (path, sha256) indexed."""
        with Session(self.engine) as session:
            return [(path, digest) for path, digest in
                    session.execute(select(ImageRecord.path, ImageRecord.sha256).distinct())]

    def row_stats(self) -> RowStats:
        """Counts of rows, patients and series, how identity was found, and the file's size."""
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
        return RowStats(images, patients, series, identity, database_bytes)


@dataclass(frozen=True)
class NeighborRow:
    """What a search's candidates need of a stored slice (:meth:`Database.neighbor_rows`): who
    it is, what an answer shows of it and its vector (copies of the same pixels are told by it);
    a tenth of what reading the whole :class:`ImageRecord` costs a search that starts from
    hundreds of candidates."""

    id: int
    path: str
    patient_id: str | None
    study_uid: str | None
    series_uid: str | None
    sop_uid: str | None
    slice_index: int | None
    labels: dict
    vector: bytes


@dataclass(frozen=True)
class SliceSource:
    """Where a stored slice came from (:meth:`Database.slice_sources`): its file or WADO-RS URL,
    frame, the content's SHA-256 and its size."""

    id: int
    path: str
    frame: int
    sha256: str
    width: int
    height: int


@dataclass(frozen=True)
class MarkedRegion:
    """A stored marked region as a rebuild takes it back (:meth:`RegionRows.marked_of`): its
    slice, box, area and its mask inside the box (None when none was kept)."""

    image_id: int
    bbox: tuple[int, int, int, int]
    area: int
    mask: np.ndarray | None


@dataclass(frozen=True)
class StoredRegion:
    """A stored region as read back: its row's fields without the vector."""

    id: int
    image_id: int
    bbox: tuple[int, int, int, int]
    area: int
    source: str


class RegionRows:
    """The regions of a :class:`Database` as their vector index reads them: the same calls as
    the database offers for slices (state, generation, change log, vectors), on the regions'
    table, generation and settings. The index kind setting is shared: one kind for both indexes.

    Example:
        >>> database = Database("sqlite://")
        >>> database.regions.state()["count"]
        0
    """

    def __init__(self, database: Database) -> None:
        self.database = database
        self.last_state = _LastState()

    @property
    def read_only(self) -> bool:
        return self.database.read_only

    def setting(self, key: str) -> str | None:
        return self.database.setting(key)

    def set_setting(self, key: str, value: str) -> None:
        self.database.set_setting(key, value)

    @property
    def model_id(self) -> str | None:
        """The region vectors' recipe and model (:func:`lungcbir.regions.region_model_id`)."""
        return self.database.setting(REGION_MODEL_KEY)

    @property
    def dimension(self) -> int | None:
        value = self.database.setting(REGION_DIMENSION_KEY)
        return int(value) if value else None

    def check_model(self, model_id: str, dimension: int) -> None:
        """Raise if the stored regions were made by another recipe or model; claim an unclaimed store."""
        database = self.database
        if self.model_id is None:
            database.refuse_if_read_only()
            try:
                with database.engine.begin() as connection:
                    connection.execute(insert_ignoring_duplicates(
                        database.engine.dialect.name, StoreSetting,
                        [{"key": REGION_MODEL_KEY, "value": model_id},
                         {"key": REGION_DIMENSION_KEY, "value": str(dimension)}]))
            except SQLAlchemyError as error:
                raise StoreError(f"cannot write to {safe_url(database.db_url)}: {sql_reason(error)}") from None
        stored = self.model_id
        if stored != model_id:
            raise StoreError(other_regions_message(stored, model_id))

    def begin_rebuild(self, model_id: str, dimension: int) -> int:
        """Start making the regions again with ``model_id`` (model and recipe, vectors of
        ``dimension``), in one transaction: every stored region made otherwise is set aside as
        pending (:class:`PendingRegion`: no longer searched; a marked one keeps its mask), logged
        as a removal, and the regions' model and dimension become these. Nothing changes when
        every region is of ``model_id`` already. Returns how many regions were set aside.

        The regions table thus never holds vectors of two recipes, whenever the rebuild stops:
        slices with pending rows are those still to rebuild (:meth:`pending_slices`).
        """
        database = self.database
        database.refuse_if_read_only()
        dialect = database.engine.dialect.name
        wanted = {REGION_MODEL_KEY: model_id, REGION_DIMENSION_KEY: str(dimension)}
        moved: list[int] = []
        columns = ("image_id", "x0", "y0", "x1", "y1", "area", "source", "mask_png")
        try:
            with database.engine.begin() as connection:
                generation = _next_generation(connection, dialect, REGION_GENERATION_KEY)  # locks: one writer
                stored = {key: value for key, value in connection.execute(
                    select(StoreSetting.key, StoreSetting.value).where(StoreSetting.key.in_(list(wanted))))}
                other = RegionRecord.model_id != model_id
                connection.execute(insert(PendingRegion).from_select(
                    list(columns), select(*(getattr(RegionRecord, name) for name in columns)).where(other)))
                moved = list(connection.execute(delete(RegionRecord).where(other).returning(RegionRecord.id))
                             .scalars().all())
                if not moved and stored == wanted:
                    raise _Unchanged  # rolled back: the generation is not used up
                if moved:
                    _log_change(connection, RegionChange, generation, "remove", moved)
                for key, value in wanted.items():
                    connection.execute(insert_ignoring_duplicates(dialect, StoreSetting,
                                                                  [{"key": key, "value": value}]))
                    connection.execute(update(StoreSetting).where(StoreSetting.key == key).values(value=value))
        except _Unchanged:
            return 0
        except SQLAlchemyError as error:
            raise StoreError(f"cannot write to {safe_url(database.db_url)}: {sql_reason(error)}") from None
        return len(moved)

    def pending_slices(self) -> int:
        """How many slices have regions set aside by an unfinished ``rebuild-regions``."""
        if not self.database.has_pending:
            return 0
        with Session(self.database.engine) as session:
            return session.scalar(select(func.count(func.distinct(PendingRegion.image_id)))) or 0

    def pending_of(self, image_ids: Iterable[int]) -> dict[int, int]:
        """How many regions of each of these slices are set aside (pending a rebuild), by slice id."""
        wanted = [int(i) for i in image_ids]
        found: dict[int, int] = {}
        if not wanted or not self.database.has_pending:
            return found
        with Session(self.database.engine) as session:
            for chunk in _in_chunks(wanted):
                found.update({image_id: count for image_id, count in session.execute(
                    select(PendingRegion.image_id, func.count(PendingRegion.id))
                    .where(PendingRegion.image_id.in_(chunk))
                    .group_by(PendingRegion.image_id))})
        return found

    def marked_of(self, image_ids: Iterable[int]) -> dict[int, list[MarkedRegion]]:
        """The marked regions (source "mask") of these slices, by slice id, in the order they
        were stored: a slice's stored regions, or, for a slice with none stored, those set aside
        for a rebuild (:meth:`begin_rebuild`). Each mask inside its box gives the region back
        exactly, so that a rebuild needs no masks folder."""
        wanted = [int(i) for i in image_ids]
        found: dict[int, list[MarkedRegion]] = {}
        if not wanted or not self.database.has_regions:
            return found
        tables: list[type[RegionRecord] | type[PendingRegion]] = [RegionRecord]
        if self.database.has_pending:
            tables.append(PendingRegion)
        with Session(self.database.engine) as session:
            for table in tables:
                taken: dict[int, list[MarkedRegion]] = {}
                for chunk in _in_chunks(wanted):
                    rows = session.execute(select(
                        table.image_id, table.x0, table.y0, table.x1, table.y1, table.area, table.mask_png).where(
                        table.image_id.in_(chunk), table.source == "mask")
                        .order_by(table.id))
                    for row in rows:
                        mask = None
                        if row.mask_png is not None:
                            with contextlib.suppress(StoreError):
                                mask = decode_mask(row.mask_png)
                        taken.setdefault(row.image_id, []).append(
                            MarkedRegion(row.image_id, (row.x0, row.y0, row.x1, row.y1), row.area, mask))
                for image_id, marked in taken.items():
                    found.setdefault(image_id, marked)  # stored regions first: a rebuilt slice has no pending ones
        return found

    def state(self, connection=None) -> dict:
        """As :meth:`Database.state`, of the regions."""
        if not self.database.has_regions:
            return {"model_id": self.model_id, "dimension": self.dimension, "generation": 0, "count": 0,
                    "min_id": 0, "max_id": 0}

        def setting(key: str):
            return select(StoreSetting.value).where(StoreSetting.key == key).scalar_subquery()

        statement = select(func.count(RegionRecord.id), func.min(RegionRecord.id), func.max(RegionRecord.id),
                           setting(REGION_GENERATION_KEY), setting(REGION_MODEL_KEY), setting(REGION_DIMENSION_KEY))
        if connection is not None:  # inside a transaction, which may still be rolled back
            return _state_of(connection.execute(statement).one())
        with self.database.engine.connect() as own:
            state = _state_of(own.execute(statement).one())
        self.last_state.remember(state)
        return state

    def generation(self) -> int:
        value = self.database.setting(REGION_GENERATION_KEY)
        return int(value or 0)

    def changes_between(self, first: int, last: int) -> list[tuple[str, int]] | None:
        if not self.database.has_regions:
            return None
        return _changes_between(self.database.engine, RegionChange, first, last)

    def iter_vectors(self, chunk: int = REBUILD_CHUNK, after: int = -1,
                     up_to: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        if not self.database.has_regions:
            return
        last = after
        with Session(self.database.engine) as session:
            while True:
                query = select(RegionRecord.id, RegionRecord.vector).where(RegionRecord.id > last)
                if up_to is not None:
                    query = query.where(RegionRecord.id <= up_to)
                rows = session.execute(query.order_by(RegionRecord.id).limit(chunk)).all()
                if not rows:
                    return
                ids, vectors = _decoded(rows)
                last = int(ids[-1])
                yield ids, vectors

    def training_sample(self, size: int) -> np.ndarray:
        step = max(1, self.count() // max(size, 1))
        with Session(self.database.engine) as session:
            rows = session.scalars(select(RegionRecord.vector).where(RegionRecord.id % step == 0).limit(size)).all()
        if not rows:
            return np.zeros((0, self.dimension or 1), np.float32)
        return np.stack([decode_vector(row) for row in rows])

    def vectors_of(self, ids: np.ndarray, chunk: int = 1000) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        with self.database.engine.connect() as connection:
            for start in range(0, len(ids), chunk):
                wanted = [int(n) for n in ids[start:start + chunk]]
                if wanted:
                    rows = connection.execute(select(RegionRecord.id, RegionRecord.vector)
                                              .where(RegionRecord.id.in_(wanted))).all()
                    if rows:
                        yield _decoded(rows)

    def count(self) -> int:
        if not self.database.has_regions:
            return 0
        with Session(self.database.engine) as session:
            return session.scalar(select(func.count(RegionRecord.id))) or 0

    def is_empty(self) -> bool:
        """Whether no region is stored (one row looked up, as :meth:`Database.is_empty`)."""
        if not self.database.has_regions:
            return True
        with Session(self.database.engine) as session:
            return session.scalar(select(RegionRecord.id).limit(1)) is None

    def read(self, ids: Iterable[int]) -> dict[int, StoredRegion]:
        """Stored regions by id (ids since removed are left out)."""
        ids = [int(i) for i in ids]
        found: dict[int, StoredRegion] = {}
        if not ids or not self.database.has_regions:
            return found
        with Session(self.database.engine) as session:
            for chunk in _in_chunks(ids):
                for row in session.execute(select(
                        RegionRecord.id, RegionRecord.image_id, RegionRecord.x0, RegionRecord.y0, RegionRecord.x1,
                        RegionRecord.y1, RegionRecord.area, RegionRecord.source).where(
                        RegionRecord.id.in_(chunk))):
                    found[row.id] = StoredRegion(row.id, row.image_id, (row.x0, row.y0, row.x1, row.y1), row.area,
                                                 row.source)
        return found

    def masks(self, ids: Iterable[int]) -> dict[int, np.ndarray]:
        """Each region's own mask inside its box, by region id (regions without one are left out)."""
        ids = [int(i) for i in ids]
        found: dict[int, np.ndarray] = {}
        if not ids or not self.database.has_regions:
            return found
        with Session(self.database.engine) as session:
            for row_id, data in session.execute(select(RegionRecord.id, RegionRecord.mask_png).where(
                    RegionRecord.id.in_(ids), RegionRecord.mask_png.is_not(None))):
                if data is not None:
                    with contextlib.suppress(StoreError):
                        found[row_id] = decode_mask(data)
        return found

    def of_images(self, image_ids: Iterable[int]) -> dict[int, list[StoredRegion]]:
        """The stored regions of these slices, by slice id."""
        image_ids = [int(i) for i in image_ids]
        found: dict[int, list[StoredRegion]] = {}
        if not image_ids or not self.database.has_regions:
            return found
        with Session(self.database.engine) as session:
            for chunk in _in_chunks(image_ids):
                ids = session.scalars(select(RegionRecord.id).where(
                    RegionRecord.image_id.in_(chunk))).all()
                for region in self.read(ids).values():
                    found.setdefault(region.image_id, []).append(region)
        return found

    def ids_of_images(self, image_ids: np.ndarray) -> np.ndarray:
        """Sorted ids of the regions of these slices (what a slice filter allows among regions)."""
        found: list[int] = []
        if not self.database.has_regions:
            return np.zeros(0, np.int64)
        wanted = [int(i) for i in image_ids]
        with Session(self.database.engine) as session:
            for chunk in _in_chunks(wanted):
                found += session.scalars(select(RegionRecord.id).where(
                    RegionRecord.image_id.in_(chunk))).all()
        return np.unique(np.asarray(found, np.int64))

    def counts(self) -> dict[str, int]:
        """Stored regions by source ("mask", "lesion")."""
        if not self.database.has_regions:
            return {}
        with Session(self.database.engine) as session:
            return {source: count for source, count in session.execute(
                select(RegionRecord.source, func.count(RegionRecord.id)).group_by(RegionRecord.source))}

    def check_rows(self, state: dict) -> tuple[list[str], set[int]]:
        """What is wrong with the region rows (recipe, vector lengths, regions without their
        slice), one line each, and the ids of every stored region."""
        if not self.database.has_regions:
            return [], set()
        problems = []
        model_id, dimension = state["model_id"], state["dimension"]
        with Session(self.database.engine) as session:
            others = session.scalar(select(func.count(RegionRecord.id)).where(RegionRecord.model_id != model_id))
            if others:
                problems.append(f"{others} regions were made by another model or recipe than {model_id}")
            if dimension:
                wrong = session.scalar(select(func.count(RegionRecord.id))
                                       .where(func.length(RegionRecord.vector) != dimension * VECTOR_BYTES))
                if wrong:
                    problems.append(f"{wrong} regions hold vectors of the wrong length (dimension {dimension})")
            orphans = session.scalar(select(func.count(RegionRecord.id)).where(
                RegionRecord.image_id.not_in(select(ImageRecord.id))))
            if orphans:
                problems.append(f"{orphans} regions belong to no stored slice")
            stored_ids = set(session.scalars(select(RegionRecord.id)))
        if pending := self.pending_slices():
            problems.append(f"{pending} slices wait for their regions to be made again with {model_id} (an "
                            f"unfinished `lungcbir rebuild-regions`; run it again to finish)")
        return problems, stored_ids


def _next_generation(connection: Connection, dialect: str, key: str) -> int:
    """Take the next value of the generation counter ``key``; its row stays locked until commit."""
    connection.execute(insert_ignoring_duplicates(dialect, StoreSetting, [{"key": key, "value": "0"}]))
    return int(connection.execute(
        update(StoreSetting).where(StoreSetting.key == key)
        .values(value=cast(cast(StoreSetting.value, Integer) + 1, String))
        .returning(StoreSetting.value)).scalar_one())


def _sqlite_foreign_keys(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys = ON")
    cursor.close()


def _log_change(connection: Connection, table: type[_ChangeLog], generation: int, kind: str,
                ids: list[int]) -> None:
    """Log one change (``kind`` "add" or "remove" of ``ids``) in a change-log table."""
    connection.execute(insert(table).values(generation=generation, kind=kind, rows=len(ids), first_id=min(ids),
                                            last_id=max(ids), changed_at=datetime.now(timezone.utc)))


def _changes_between(engine: Engine, table: type[_ChangeLog], first: int, last: int
                     ) -> list[tuple[str, int]] | None:
    """(kind, rows) of each change logged in ``table`` after generation ``first`` up to ``last``;
    None when the database has no such table (made by an earlier version)."""
    try:
        with Session(engine) as session:
            return [(kind, rows) for kind, rows in session.execute(
                select(table.kind, table.rows).where(table.generation > first, table.generation <= last))]
    except SQLAlchemyError:
        return None


def sql_reason(error: SQLAlchemyError) -> str:
    original = getattr(error, "orig", None) or error
    text = str(original).strip().splitlines()
    return text[0][:200] if text else type(error).__name__


def insert_ignoring_duplicates(dialect: str, table: type[Base], rows: list[dict]):
    """INSERT ... ON CONFLICT DO NOTHING for the backends we support."""
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as postgresql_insert
        return postgresql_insert(table).values(rows).on_conflict_do_nothing()
    if dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert
        return sqlite_insert(table).values(rows).on_conflict_do_nothing()
    raise StoreError(f"unsupported database backend {dialect!r}; use SQLite or PostgreSQL")


def _image_table() -> Table:
    """The table of :class:`ImageRecord`; SQLAlchemy types ``__table__`` as any FROM clause,
    while a declarative class always has a :class:`Table`."""
    return ImageRecord.__table__  # type: ignore[return-value]  # stubs: FromClause


def unstorable(record: ImageRecord) -> str | None:
    """Why a row cannot be stored alike on every backend (None when it can).

    PostgreSQL refuses a NUL character in text, and one in JSON fails every later filter on
    that row, while SQLite stores both: a NUL is refused on both, so that both hold the same.
    """
    for column in _image_table().columns:
        value = getattr(record, column.key, None)
        if column.key == "labels" and _holds_nul(value):
            return "labels hold a NUL character, which a database cannot store"
        if isinstance(value, str) and "\x00" in value:
            return f"{column.key} holds a NUL character, which a database cannot store"
    if record.sop_uid and len(record.sop_uid.encode("utf-8", "replace")) > MAX_SOP_UID_BYTES:
        return f"sop_uid is longer than {MAX_SOP_UID_BYTES} bytes (a valid UID has at most 64)"
    return None


def _storable_text(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _holds_nul(value: object) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_holds_nul(key) or _holds_nul(item) for key, item in value.items())
    if isinstance(value, (list, tuple)):
        return any(_holds_nul(item) for item in value)
    return False


def _widen_text_columns(connection: Connection) -> None:
    """Make TEXT the columns that a database made by an earlier version has as VARCHAR(n).

    PostgreSQL enforces n (SQLite does not), so a long identifier would fail a whole batch
    there. VARCHAR to TEXT is a change of the catalogue only: no row is rewritten. A role
    that may not alter the table keeps the old columns (a savepoint undoes the attempt).
    """
    inspector = inspect(connection)
    for table in Base.metadata.sorted_tables:
        if not inspector.has_table(table.name):
            continue
        lengths = {column["name"]: getattr(column["type"], "length", None)
                   for column in inspector.get_columns(table.name)}
        for column in table.columns:
            if isinstance(column.type, Text) and lengths.get(column.name):
                try:
                    with connection.begin_nested():
                        connection.exec_driver_sql(f"ALTER TABLE {table.name} ALTER COLUMN {column.name} TYPE TEXT")
                except SQLAlchemyError:
                    return


def _missing_columns(engine: Engine) -> list:
    """The nullable columns of :class:`ImageRecord` that a database made by an older release lacks."""
    table = _image_table()
    present = {column["name"] for column in inspect(engine).get_columns(table.name)}
    return [column for column in table.columns if column.name not in present and column.nullable]


def _add_missing_columns(engine: Engine) -> None:
    """Add the columns newer than a database (``mask_png``, ``sop_uid``), so older ones keep working.

    Existing rows get NULL there. A database that cannot be altered (a role without the right)
    is used as it is where it can be: rows without masks get them made again.
    """
    table = _image_table()
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
            pass  # added meanwhile by another process, or not allowed; Database.masks copes with both


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


def _decoded(rows: Sequence) -> tuple[np.ndarray, np.ndarray]:
    """(int64 ids, float32 vectors) of (id, vector blob) rows whose blobs are all one length."""
    ids = np.fromiter((row[0] for row in rows), dtype=np.int64, count=len(rows))
    blobs = [row[1] for row in rows]
    if len({len(blob) for blob in blobs}) != 1:  # vectors of another length: let them show as such
        return ids, np.stack([decode_vector(blob) for blob in blobs])
    joined = np.frombuffer(b"".join(blobs), dtype=VECTOR_DTYPE)
    return ids, joined.reshape(len(rows), -1).astype(np.float32)

