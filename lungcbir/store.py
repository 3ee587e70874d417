"""Storage: one database row per indexed slice (SQLAlchemy) plus a FAISS index of the vectors.

The database is the source of truth: every row holds its vector. The FAISS index is a cache
whose ids are the rows' primary keys; it is written atomically after each commit and rebuilt
from the stored vectors whenever it is missing or out of step with the database.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import faiss
import numpy as np
from sqlalchemy import (JSON, DateTime, Float, Integer, LargeBinary, String, Text, UniqueConstraint,
                        create_engine, delete, func, or_, select)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from .errors import LockedError, StoreError

DEFAULT_DB_URL = "sqlite:///db/lungcbir.sqlite"
DEFAULT_INDEX_DIR = "index"
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


class Base(DeclarativeBase):
    pass


class ImageRecord(Base):
    """One indexed slice."""

    __tablename__ = "images"
    __table_args__ = (UniqueConstraint("sha256", "frame", "model_id", name="uq_image_content_model"),)

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


class StoreSetting(Base):
    """Key/value facts about the whole store (which model, which dimension)."""

    __tablename__ = "store_settings"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


@dataclass
class StoreStats:
    """What is in a store."""

    images: int
    patients: int
    series: int
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


def _write_atomically(path: Path, write: callable) -> None:
    """Write through a temporary file in the same folder, fsync, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(handle)
    try:
        write(temporary)
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


class Store:
    """The database and the FAISS index, kept in agreement.

    Example:
        >>> store = Store("sqlite://", index_dir=tempfile.mkdtemp())
        >>> store.stats().images
        0
    """

    def __init__(self, db_url: str = DEFAULT_DB_URL, index_dir: str | os.PathLike = DEFAULT_INDEX_DIR,
                 create: bool = True) -> None:
        self.db_url = db_url
        self.index_dir = Path(index_dir)
        self.engine = self._connect(db_url, create)
        self._index: faiss.Index | None = None
        self._index_state: dict | None = None

    def _connect(self, db_url: str, create: bool) -> Engine:
        try:
            url = make_url(db_url)
        except Exception:
            raise StoreError(f"not a valid database URL: {safe_url(db_url)}") from None
        if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
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
            with engine.begin() as connection:
                Base.metadata.create_all(connection)
                _add_missing_columns(connection)
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
        with Session(self.engine) as session, session.begin():
            stored = self._setting(session, "model_id")
            if stored is None:
                session.merge(StoreSetting(key="model_id", value=model_id))
                session.merge(StoreSetting(key="dimension", value=str(dimension)))
            elif stored != model_id:
                raise StoreError(f"this database holds vectors of model {stored}, not of the model in use "
                                 f"({model_id}); use another --db/--index-dir or the same weights")

    # -- rows -----------------------------------------------------------------------------------

    def known_keys(self, model_id: str) -> set[tuple[str, int]]:
        """(sha256, frame) of every slice already indexed with this model."""
        with Session(self.engine) as session:
            rows = session.execute(select(ImageRecord.sha256, ImageRecord.frame)
                                   .where(ImageRecord.model_id == model_id))
            return {(sha, frame) for sha, frame in rows}

    def known_sop_uids(self, model_id: str) -> set[str]:
        """SOP Instance UIDs of every DICOM slice already indexed with this model."""
        with Session(self.engine) as session:
            rows = session.scalars(select(ImageRecord.sop_uid).where(
                ImageRecord.model_id == model_id, ImageRecord.sop_uid.is_not(None)))
            return set(rows)

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
        try:
            with self.engine.begin() as connection:
                statement = _insert_ignoring_duplicates(self.engine.dialect.name, rows)
                inserted = connection.execute(statement.returning(
                    ImageRecord.id, ImageRecord.sha256, ImageRecord.frame, ImageRecord.model_id)).all()
        except SQLAlchemyError as error:
            raise StoreError(f"cannot write to {safe_url(self.db_url)}: {_reason(error)}") from None
        inserted = sorted(inserted)
        ids = [row[0] for row in inserted]
        # the index holds exactly what the database holds, so a rebuild changes nothing
        new_vectors = vectors[[position[(row[1], row[2], row[3])] for row in inserted]]
        new_vectors = new_vectors.astype(VECTOR_DTYPE).astype(np.float32)
        self._index_after_insert(np.asarray(ids, dtype=np.int64), new_vectors)
        return ids

    def _index_after_insert(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if self._index is None:
            saved = self._read_index_file()
            if saved is not None:
                self._index, self._index_state = saved
        index = self._index
        if index is not None and index.ntotal + len(ids) == self.count():
            if len(ids):
                index.add_with_ids(vectors, ids)
            self._save_index(index)
        else:
            self.index()  # catches up or rebuilds

    def remove(self, ids: Iterable[int]) -> int:
        """Delete rows and their vectors together; returns how many rows were deleted."""
        ids = [int(i) for i in ids]
        if not ids:
            return 0
        index = self.index()
        removed = 0
        try:
            with Session(self.engine) as session, session.begin():
                for start in range(0, len(ids), 500):
                    chunk = ids[start:start + 500]
                    removed += session.execute(delete(ImageRecord).where(ImageRecord.id.in_(chunk))).rowcount
        except SQLAlchemyError as error:
            raise StoreError(f"cannot write to {safe_url(self.db_url)}: {_reason(error)}") from None
        try:
            index.remove_ids(np.asarray(ids, dtype=np.int64))
        except RuntimeError:  # HNSW cannot remove: rebuild
            self.rebuild_index()
            return removed
        if index.ntotal == self.count():
            self._save_index(index)
        else:
            self.rebuild_index()
        return removed

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
        with Session(self.engine, expire_on_commit=False) as session:
            rows = session.scalars(select(ImageRecord).where(ImageRecord.id.in_(ids))).all()
            for row in rows:
                session.expunge(row)
        return {row.id: row for row in rows}

    def iter_vectors(self, chunk: int = REBUILD_CHUNK, after: int = -1) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Stream (ids, float32 vectors) from the database in chunks, ordered by id."""
        last = after
        with Session(self.engine) as session:
            while True:
                rows = session.execute(select(ImageRecord.id, ImageRecord.vector)
                                       .where(ImageRecord.id > last).order_by(ImageRecord.id)
                                       .limit(chunk)).all()
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

    def _index_meta(self) -> dict:
        with Session(self.engine) as session:
            count, low, high = session.execute(
                select(func.count(ImageRecord.id), func.min(ImageRecord.id), func.max(ImageRecord.id))).one()
        return {"model_id": self.model_id, "dimension": self.dimension, "count": count or 0,
                "min_id": low or 0, "max_id": high or 0}

    def _save_index(self, index: faiss.Index, state: dict | None = None) -> None:
        """Keep ``index`` as the one in use and write it with a note of the database state it
        matches, each file atomically; nothing is written when the database moved on meanwhile."""
        state = state or self._index_meta()
        self._index, self._index_state = index, state
        if state["count"] != index.ntotal:
            return
        try:
            _write_atomically(self.index_path, lambda path: faiss.write_index(index, path))
            _write_atomically(self.index_meta_path,
                              lambda path: Path(path).write_text(json.dumps(state, indent=1)))
        except OSError as error:
            if self.index_dir.exists() and not os.access(self.index_dir, os.W_OK):
                return  # a read-only index folder (a query node): serve from memory
            raise StoreError(f"cannot write the index in {self.index_dir}: {error.strerror}") from None

    def _read_index_file(self) -> tuple[faiss.Index, dict] | None:
        """The saved index and its note, if both are readable and agree with each other."""
        try:
            saved = json.loads(self.index_meta_path.read_text())
            index = faiss.read_index(str(self.index_path))
        except (OSError, ValueError, RuntimeError):
            return None
        dimension = self.dimension
        if saved.get("model_id") != self.model_id or (dimension and index.d != dimension) \
                or index.ntotal != saved.get("count"):
            return None
        _tune(index)
        return index, saved

    def index(self) -> faiss.Index:
        """The FAISS index matching the database now.

        Used as it is when it matches; brought up to date by adding only the rows indexed since
        (another process or machine may have added them); rebuilt from the stored vectors when
        it is missing, unreadable, of another model, or rows were removed.
        """
        meta = self._index_meta()
        if self._index is not None and self._index_state == meta:
            return self._index
        candidates = []
        if self._index is not None:
            candidates.append((self._index, self._index_state))
        saved = self._read_index_file()
        if saved is not None:
            candidates.append(saved)
        for index, state in candidates:
            if state == meta:
                self._index, self._index_state = index, state
                return index
        for index, state in candidates:
            if self._catch_up(index, state, meta):
                return index
        return self.rebuild_index()

    def _catch_up(self, index: faiss.Index, state: dict, meta: dict) -> bool:
        """Add the rows with ids above ``state``'s to ``index`` if nothing older changed."""
        if state.get("model_id") != meta["model_id"] or state.get("min_id") not in (meta["min_id"], 0) \
                or state.get("max_id", 0) > meta["max_id"]:
            return False
        with Session(self.engine) as session:
            newer = session.scalar(select(func.count(ImageRecord.id)).where(ImageRecord.id > state["max_id"]))
        if index.ntotal + newer != meta["count"]:
            return False
        for ids, vectors in self.iter_vectors(after=state["max_id"]):
            index.add_with_ids(vectors, ids)
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
            with Session(self.engine) as session, session.begin():
                session.merge(StoreSetting(key="index_kind", value=kind))
        meta = self._index_meta()
        index = build_index(self.index_kind, meta["count"], self.dimension or 1, self.iter_vectors,
                            self.training_sample)
        self._save_index(index, meta)
        return index

    def training_sample(self, size: int) -> np.ndarray:
        """About ``size`` stored vectors spread over the whole id range (for IVF training)."""
        meta = self._index_meta()
        step = max(1, meta["count"] // max(size, 1))
        with Session(self.engine) as session:
            rows = session.scalars(select(ImageRecord.vector).where(ImageRecord.id % step == 0).limit(size)).all()
        return np.stack([decode_vector(row) for row in rows]) if rows else np.zeros((0, self.dimension or 1), np.float32)

    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Scores and ids of the ``k`` nearest stored vectors for each query vector."""
        index = self.index()
        if index.ntotal == 0:
            return np.zeros((len(vectors), 0), np.float32), np.zeros((len(vectors), 0), np.int64)
        if vectors.shape[1] != index.d:
            raise StoreError(f"query vectors have dimension {vectors.shape[1]}, the index {index.d}")
        scores, ids = index.search(np.ascontiguousarray(vectors, dtype=np.float32), min(k, index.ntotal))
        return scores, ids

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
        """Everything wrong with the store, one line each; an empty list means all is well."""
        problems = []
        if self.engine.dialect.name == "sqlite":
            with self.engine.connect() as connection:
                result = connection.exec_driver_sql("PRAGMA quick_check").scalar()
            if result != "ok":
                problems.append(f"database integrity check failed: {result}")
        model_id, dimension = self.model_id, self.dimension
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
        if not self.index_path.exists():
            problems.append(f"index file {self.index_path} is missing")
        else:
            try:
                index = faiss.read_index(str(self.index_path))
            except RuntimeError:
                problems.append(f"index file {self.index_path} is unreadable")
            else:
                if dimension and index.d != dimension:
                    problems.append(f"index dimension {index.d} differs from the database's {dimension}")
                indexed = set(index_ids(index).tolist())
                if indexed != stored_ids:
                    problems.append(f"index and database disagree: {len(indexed - stored_ids)} vectors without "
                                    f"a row, {len(stored_ids - indexed)} rows without a vector")
                try:
                    saved = json.loads(self.index_meta_path.read_text())
                    if saved.get("model_id") != model_id:
                        problems.append(f"index was built for model {saved.get('model_id')}, database holds {model_id}")
                except (OSError, ValueError):
                    problems.append(f"index note {self.index_meta_path} is missing or unreadable")
        if verify_files:
            problems.extend(self._check_files())
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
        url = make_url(self.db_url)
        database_bytes = None
        if url.get_backend_name() == "sqlite" and url.database and os.path.exists(url.database):
            database_bytes = os.path.getsize(url.database)
        index = self.index()
        return StoreStats(images=images, patients=patients, series=series, model_id=self.model_id,
                          dimension=self.dimension, index_vectors=int(index.ntotal),
                          index_kind=f"{describe_index(index)}; setting {self.index_kind}",
                          database=safe_url(self.db_url), database_bytes=database_bytes,
                          index_bytes=self.index_path.stat().st_size if self.index_path.exists() else None)


def _add_missing_columns(connection) -> None:
    """Bring a database made by an older release up to date: add the nullable columns of
    :class:`ImageRecord` that its ``images`` table lacks (existing rows get NULL there)."""
    from sqlalchemy import inspect

    present = {column["name"] for column in inspect(connection).get_columns(ImageRecord.__tablename__)}
    for column in ImageRecord.__table__.columns:
        if column.name in present or not column.nullable:
            continue
        kind = column.type.compile(dialect=connection.dialect)
        connection.exec_driver_sql(f"ALTER TABLE {ImageRecord.__tablename__} ADD COLUMN {column.name} {kind}")
        if column.index:
            connection.exec_driver_sql(f"CREATE INDEX IF NOT EXISTS ix_{ImageRecord.__tablename__}_{column.name} "
                                       f"ON {ImageRecord.__tablename__} ({column.name})")


def _reason(error: SQLAlchemyError) -> str:
    original = getattr(error, "orig", None) or error
    text = str(original).strip().splitlines()
    return text[0][:200] if text else type(error).__name__


def _insert_ignoring_duplicates(dialect: str, rows: list[dict]):
    """INSERT ... ON CONFLICT DO NOTHING for the backends we support."""
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    elif dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    else:
        raise StoreError(f"unsupported database backend {dialect!r}; use SQLite or PostgreSQL")
    return insert(ImageRecord).values(rows).on_conflict_do_nothing()


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
