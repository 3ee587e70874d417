"""Storage: one database row per indexed slice (SQLAlchemy) plus a FAISS index of the vectors.

The database is the source of truth: every row holds its vector. The FAISS index is a cache
whose ids are the rows' primary keys; it is written atomically after each commit and rebuilt
from the stored vectors whenever it is missing or out of step with the database.
"""

from __future__ import annotations

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
                        create_engine, func, inspect, select)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from .errors import StoreError

DEFAULT_DB_URL = "sqlite:///db/lungcbir.sqlite"
DEFAULT_INDEX_DIR = "index"
INDEX_FILE = "lungcbir.faiss"
INDEX_META_FILE = "lungcbir.faiss.json"
REBUILD_CHUNK = 10_000


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

    def add(self, records: Sequence[ImageRecord], vectors: np.ndarray) -> list[int]:
        """Insert rows with their vectors in one transaction, then update the index file."""
        if not records:
            return []
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        now = datetime.now(timezone.utc)
        for record, vector in zip(records, vectors):
            record.vector = vector.tobytes()
            record.indexed_at = now
        try:
            with Session(self.engine, expire_on_commit=False) as session, session.begin():
                session.add_all(records)
                session.flush()
                ids = [record.id for record in records]
        except SQLAlchemyError as error:
            raise StoreError(f"cannot write to {safe_url(self.db_url)}: {_reason(error)}") from None
        index = self._load_or_rebuild_index(expected_extra=len(ids))
        if index.ntotal + len(ids) == self.count():
            index.add_with_ids(vectors, np.asarray(ids, dtype=np.int64))
            self._save_index(index)
        else:
            self._index = None  # someone else wrote too; rebuild on next use
        return ids

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

    def iter_vectors(self, chunk: int = REBUILD_CHUNK) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Stream (ids, vectors) from the database in chunks, ordered by id."""
        last = -1
        with Session(self.engine) as session:
            while True:
                rows = session.execute(select(ImageRecord.id, ImageRecord.vector)
                                       .where(ImageRecord.id > last).order_by(ImageRecord.id)
                                       .limit(chunk)).all()
                if not rows:
                    return
                ids = np.fromiter((row[0] for row in rows), dtype=np.int64, count=len(rows))
                vectors = np.stack([np.frombuffer(row[1], dtype=np.float32) for row in rows])
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
        return {"model_id": self.model_id, "dimension": self.dimension, "count": self.count(),
                "max_id": self._max_id()}

    def _max_id(self) -> int:
        with Session(self.engine) as session:
            return session.scalar(select(func.max(ImageRecord.id))) or 0

    def _save_index(self, index: faiss.Index) -> None:
        meta = self._index_meta()
        meta["count"] = int(index.ntotal)
        try:
            _write_atomically(self.index_path, lambda path: faiss.write_index(index, path))
            _write_atomically(self.index_meta_path,
                              lambda path: Path(path).write_text(json.dumps(meta, indent=1)))
        except OSError as error:
            raise StoreError(f"cannot write the index in {self.index_dir}: {error.strerror}") from None
        self._index = index

    def _index_is_current(self) -> bool:
        try:
            saved = json.loads(self.index_meta_path.read_text())
        except (OSError, ValueError):
            return False
        return saved == self._index_meta()

    def _load_or_rebuild_index(self, expected_extra: int = 0) -> faiss.Index:
        """The index matching the database before the last ``expected_extra`` rows were added."""
        if self._index is not None and self._index.ntotal + expected_extra == self.count():
            return self._index
        if expected_extra == 0 and self._index_is_current() and self.index_path.exists():
            try:
                index = faiss.read_index(str(self.index_path))
                if index.ntotal == self.count() and index.d == (self.dimension or index.d):
                    self._index = index
                    return index
            except RuntimeError:
                pass  # unreadable: rebuilt below
        return self.rebuild_index(exclude_last=expected_extra)

    def index(self) -> faiss.Index:
        """The FAISS index, rebuilt from the database first if it is missing or stale."""
        return self._load_or_rebuild_index()

    def rebuild_index(self, exclude_last: int = 0) -> faiss.Index:
        """Build a fresh exact inner-product index from the stored vectors and save it."""
        dimension = self.dimension
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(dimension or 1))
        total = self.count() - exclude_last
        added = 0
        for ids, vectors in self.iter_vectors():
            take = min(len(ids), total - added)
            if take <= 0:
                break
            index.add_with_ids(vectors[:take], ids[:take])
            added += take
        if exclude_last == 0:
            self._save_index(index)
        return index

    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Scores and ids of the ``k`` nearest stored vectors for each query vector."""
        index = self.index()
        if index.ntotal == 0:
            return np.zeros((len(vectors), 0), np.float32), np.zeros((len(vectors), 0), np.int64)
        if vectors.shape[1] != index.d:
            raise StoreError(f"query vectors have dimension {vectors.shape[1]}, the index {index.d}")
        scores, ids = index.search(np.ascontiguousarray(vectors, dtype=np.float32), min(k, index.ntotal))
        return scores, ids

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
                          database=safe_url(self.db_url), database_bytes=database_bytes,
                          index_bytes=self.index_path.stat().st_size if self.index_path.exists() else None)


def _reason(error: SQLAlchemyError) -> str:
    original = getattr(error, "orig", None) or error
    text = str(original).strip().splitlines()
    return text[0][:200] if text else type(error).__name__
