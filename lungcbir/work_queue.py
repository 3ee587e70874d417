"""The indexing work queue: series of DICOMweb archives shared by concurrent indexing runs.

The queue is the database's ``index_queue`` table (:class:`lungcbir.database.QueueEntry`, one
row per archive, series and model); :class:`WorkQueue` enqueues series, hands each to one
run (:meth:`WorkQueue.claim_series`), renews, finishes and releases claims. Runs on several
machines coordinate only through these rows.

Example:
    >>> import tempfile
    >>> from lungcbir.database import Database
    >>> queue = WorkQueue(Database(f"sqlite:///{tempfile.mkdtemp()}/q.sqlite"))
    >>> queue.enqueue_series("http://pacs/dicom-web", [("1.2", "1.2.3")], "model-a")
    1
    >>> claim = queue.claim_series("http://pacs/dicom-web", "model-a", "host:1")
    >>> claim.series_uid, queue.finish_claim(claim), queue.counts()[QueueState.DONE]
    ('1.2.3', True, 1)
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from enum import Enum
from typing import Iterable

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session
from sqlalchemy.sql.expression import Executable

from .database import Database, QueueEntry, insert_ignoring_duplicates, safe_url, sql_reason
from .errors import StoreError

#: Seconds after which a claimed series whose claim was not renewed (its run was killed, or
#: its machine lost) may be claimed by another run. A working run renews its claim well
#: within this (see :meth:`WorkQueue.renew_claim`).
DEFAULT_CLAIM_TIMEOUT_S = 600.0
#: A series claimed this many times without being finished (every run that took it died on
#: it) is marked failed instead of being handed out again; a later run's enqueue retries it.
MAX_CLAIM_ATTEMPTS = 3

class QueueState(str, Enum):
    """Where a series of the indexing queue stands."""

    PENDING = "pending"  # found, waiting for a run to claim it
    CLAIMED = "claimed"  # a run is indexing it (``claimed_by``), renewing ``claimed_at``
    DONE = "done"  # every instance is indexed
    FAILED = "failed"  # some instance (or the series listing) failed; ``error`` says why


@dataclass(frozen=True)
class SeriesClaim:
    """A series a run has claimed from the queue (what :meth:`WorkQueue.claim_series` returns)."""

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


class WorkQueue:
    """The indexing queue of one database."""

    def __init__(self, database: Database) -> None:
        self.database = database

    def _now(self):
        """The time claims are stamped and compared with: the database's own clock on
        PostgreSQL (the claimers run on machines whose clocks differ), this machine's on SQLite
        (one machine), where the database has no time type to compare stamps with."""
        if self.database.engine.dialect.name == "postgresql":
            return func.now()
        return datetime.now(timezone.utc)

    def _queue_write(self, statement: Executable) -> tuple[list, int]:
        """Run one statement in its own short transaction; its returned rows and row count."""
        self.database.refuse_if_read_only()
        try:
            with self.database.engine.begin() as connection:
                if self.database.engine.dialect.name == "sqlite":
                    # take the write lock before reading: two deferred transactions that both read
                    # and then want to write get "database is locked" at once, without waiting
                    connection.exec_driver_sql("BEGIN IMMEDIATE")
                result = connection.execute(statement)
                return (list(result.all()) if result.returns_rows else []), result.rowcount
        except SQLAlchemyError as error:
            raise StoreError(f"cannot write to {safe_url(self.database.db_url)}: {sql_reason(error)}") from None

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
            added += len(self._queue_write(insert_ignoring_duplicates(
                self.database.engine.dialect.name, QueueEntry, rows).returning(QueueEntry.id))[0])
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
        if self.database.engine.dialect.name == "postgresql":
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

    def counts(self, root: str | None = None, model_id: str | None = None) -> dict[QueueState, int]:
        """How many queued series are in each state (of one archive and model, if given)."""
        conditions = [column == value for column, value in ((QueueEntry.root, root), (QueueEntry.model_id, model_id))
                      if value is not None]
        with Session(self.database.engine) as session:
            rows = session.execute(select(QueueEntry.state, func.count(QueueEntry.id)).where(*conditions)
                                   .group_by(QueueEntry.state)).all()
        counts = {state: 0 for state in QueueState}
        counts.update({QueueState(state): number for state, number in rows})
        return counts
