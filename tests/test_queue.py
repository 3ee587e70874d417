"""The indexing queue: DICOMweb series shared by concurrent `index-dataset URL` runs.

The store-level tests run on SQLite and PostgreSQL (``store_paths``); the archive tests run
against the Orthanc of the ``dicomweb_archive`` fixture, and the two-process test against
Orthanc and PostgreSQL together.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pydicom
import pytest
from conftest import postgres_url
from sqlalchemy import update

from lungcbir.database import QueueEntry
from lungcbir.dicomweb import DicomwebSource, is_dicomweb_url
from lungcbir.retrieval import Retriever
from lungcbir.store import Store
from lungcbir.work_queue import MAX_CLAIM_ATTEMPTS, QueueState

ROOT = "http://pacs.example/dicom-web"
MODEL = "model-a"
REPO = str(Path(__file__).resolve().parent.parent)


def series(count: int, study: str = "1.2.1") -> list[tuple[str, str]]:
    return [(study, f"{study}.{number}") for number in range(1, count + 1)]


def age_claims(store: Store, seconds: float) -> None:
    """Make every claim look ``seconds`` old (as if its run stopped renewing it then)."""
    with store.engine.begin() as connection:
        connection.execute(update(QueueEntry).where(QueueEntry.state == QueueState.CLAIMED.value)
                           .values(claimed_at=datetime.now(timezone.utc) - timedelta(seconds=seconds)))


# -- the queue in the store (SQLite and PostgreSQL) ------------------------------------------------


def test_enqueueing_is_idempotent_and_looks_again_at_done_and_failed_series(store_paths):
    store = Store(**store_paths)
    assert store.queue.enqueue_series(ROOT, series(3), MODEL) == 3
    assert store.queue.enqueue_series(ROOT, series(3), MODEL) == 0  # the unique constraint decides
    assert store.queue.enqueue_series(ROOT, series(3), "model-b") == 3  # another model indexes them again
    assert store.queue.counts(ROOT, MODEL)[QueueState.PENDING] == 3
    done, failed, claimed = (store.queue.claim_series(ROOT, MODEL, f"run:{n}") for n in range(3))
    assert store.queue.finish_claim(done) and store.queue.finish_claim(failed, "1 of 20 instances could not be read")
    assert store.queue.counts(ROOT, MODEL) == {QueueState.PENDING: 0, QueueState.CLAIMED: 1,
                                               QueueState.DONE: 1, QueueState.FAILED: 1}
    assert store.queue.enqueue_series(ROOT, series(4), MODEL) == 1  # a nightly run finds one new series
    # done and failed series are looked at again (new instances, retry); the claimed one is left alone
    assert store.queue.counts(ROOT, MODEL) == {QueueState.PENDING: 3, QueueState.CLAIMED: 1,
                                               QueueState.DONE: 0, QueueState.FAILED: 0}
    assert store.queue.renew_claim(claimed)


def test_each_series_is_claimed_once_then_nothing_is_left(store_paths):
    store = Store(**store_paths)
    store.queue.enqueue_series(ROOT, series(3), MODEL)
    store.queue.enqueue_series("http://other/dicom-web", series(2), MODEL)
    claims = [store.queue.claim_series(ROOT, MODEL, f"host:{n}") for n in range(4)]
    assert claims[3] is None
    assert sorted(claim.series_uid for claim in claims[:3]) == [uid for _, uid in series(3)]
    assert all(claim.attempts == 1 and claim.root == ROOT for claim in claims[:3])
    assert store.queue.claim_series(ROOT, "model-b", "host:9") is None  # other models' and archives' work is apart
    assert store.queue.claim_series("http://other/dicom-web", MODEL, "host:9") is not None


def test_claims_of_one_study(store_paths):
    store = Store(**store_paths)
    store.queue.enqueue_series(ROOT, series(2, "1.2.1") + series(2, "1.2.2"), MODEL)
    claimed = [store.queue.claim_series(ROOT, MODEL, "host:1", study_uid="1.2.2") for _ in range(3)]
    assert [claim.study_uid for claim in claimed[:2]] == ["1.2.2", "1.2.2"] and claimed[2] is None
    assert store.queue.counts(ROOT, MODEL)[QueueState.PENDING] == 2


def test_an_expired_claim_is_taken_over_and_its_old_holder_loses_it(store_paths):
    store = Store(**store_paths)
    store.queue.enqueue_series(ROOT, series(1), MODEL)
    killed = store.queue.claim_series(ROOT, MODEL, "host-a:11", timeout_s=600)
    assert store.queue.claim_series(ROOT, MODEL, "host-b:22", timeout_s=600) is None  # not expired yet
    age_claims(store, 601)
    assert store.queue.claim_series(ROOT, MODEL, "host-b:22", timeout_s=3600) is None  # a longer timeout: still held
    taken = store.queue.claim_series(ROOT, MODEL, "host-b:22", timeout_s=600)
    assert (taken.series_uid, taken.claimed_by, taken.attempts) == (killed.series_uid, "host-b:22", 2)
    assert not store.queue.renew_claim(killed) and not store.queue.finish_claim(killed)  # the old run cannot mark it
    assert store.queue.finish_claim(taken)
    assert store.queue.counts(ROOT, MODEL)[QueueState.DONE] == 1


def test_a_renewed_claim_does_not_expire(store_paths):
    store = Store(**store_paths)
    store.queue.enqueue_series(ROOT, series(1), MODEL)
    working = store.queue.claim_series(ROOT, MODEL, "host-a:11", timeout_s=600)
    age_claims(store, 500)
    assert store.queue.renew_claim(working)  # the heartbeat of a run on a long series
    assert store.queue.claim_series(ROOT, MODEL, "host-b:22", timeout_s=600) is None


def test_a_released_claim_is_pending_at_once_and_does_not_count(store_paths):
    store = Store(**store_paths)
    store.queue.enqueue_series(ROOT, series(1), MODEL)
    interrupted = store.queue.claim_series(ROOT, MODEL, "host-a:11")
    assert store.queue.release_claim(interrupted)
    again = store.queue.claim_series(ROOT, MODEL, "host-a:11")
    assert again.series_uid == interrupted.series_uid and again.attempts == 1


def test_a_series_every_run_dies_on_is_failed(store_paths):
    store = Store(**store_paths)
    store.queue.enqueue_series(ROOT, series(1), MODEL)
    for attempt in range(1, MAX_CLAIM_ATTEMPTS + 1):
        claim = store.queue.claim_series(ROOT, MODEL, f"host:{attempt}", timeout_s=60)
        assert claim is not None and claim.attempts == attempt
        age_claims(store, 61)
    assert store.queue.claim_series(ROOT, MODEL, "host:last", timeout_s=60) is None
    assert store.queue.counts(ROOT, MODEL)[QueueState.FAILED] == 1
    store.queue.enqueue_series(ROOT, series(1), MODEL)  # a later run retries it, with fresh attempts
    assert store.queue.claim_series(ROOT, MODEL, "host:next", timeout_s=60).attempts == 1


def test_racing_claimers_never_get_the_same_series(store_paths):
    """Eight claimers (threads, each with its own Store and connections, as separate processes
    would have) start at once on 120 series; every series goes to exactly one of them."""
    Store(**store_paths).queue.enqueue_series(ROOT, series(120), MODEL)
    claimers = 8
    start, got, errors = threading.Barrier(claimers), {n: [] for n in range(claimers)}, []

    def claim_all(number: int) -> None:
        try:
            store = Store(**store_paths)
            start.wait()
            while (claim := store.queue.claim_series(ROOT, MODEL, f"host:{number}")) is not None:
                got[number].append(claim.series_uid)
                assert store.queue.finish_claim(claim)
        except Exception as error:  # reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=claim_all, args=(n,)) for n in range(claimers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors
    claimed = [uid for uids in got.values() for uid in uids]
    assert sorted(claimed) == sorted(uid for _, uid in series(120))  # all of them, none twice
    assert sum(1 for uids in got.values() if uids) > 1  # they really raced
    assert Store(**store_paths).queue.counts(ROOT, MODEL)[QueueState.DONE] == 120


# -- against a real archive (Orthanc) ---------------------------------------------------------------


def archive_sops(tmp_path: Path) -> list[str]:
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}", tmp_path / "index", create=False)
    return [row.sop_uid for row in store.records(range(1, store.count() + 1000)).values() if is_dicomweb_url(row.path)]


@pytest.mark.realdata
def test_a_series_claimed_by_a_killed_run_is_indexed_after_the_timeout(dicomweb_archive, tiny_weights, tmp_path):
    url, files = dicomweb_archive["url"], dicomweb_archive["files"]
    retriever = Retriever(f"sqlite:///{tmp_path / 'db.sqlite'}", tmp_path / "index", weights=tiny_weights)
    store, model_id = retriever.store(), retriever.model.model_id
    source = DicomwebSource(url)
    found, _ = source.find_series()
    store.queue.enqueue_series(source.root, [(s.study_uid, s.series_uid) for s in found], model_id)
    held = store.queue.claim_series(source.root, model_id, "dead-host:4242")  # its run was killed (SIGKILL)
    in_held = {ref.sop_uid for ref in source.instances(found[0])[0]}
    assert held.series_uid == found[0].series_uid
    report = retriever.index_dataset([url])
    assert report.indexed == len(files) - len(in_held) and not in_held & set(archive_sops(tmp_path))
    assert store.queue.counts(source.root, model_id)[QueueState.CLAIMED] == 1  # not taken within the timeout
    age_claims(store, 601)
    report = retriever.index_dataset([url], claim_timeout=600)
    assert (report.indexed, report.skipped) == (len(in_held), len(files) - len(in_held))
    assert sorted(archive_sops(tmp_path)) == sorted(files.values())  # each once
    assert store.queue.counts(source.root, model_id)[QueueState.DONE] == len(found)


@pytest.mark.realdata
def test_a_long_series_keeps_its_claim_by_renewing_it(dicomweb_archive, tiny_weights, tmp_path, monkeypatch):
    """A run slower than the claim timeout on one series renews its claim: nobody takes it over.

    Time is a clock the test moves (0.4 s per instance), read by the run's renewals and by the
    queue's claim stamps alike, so a loaded machine cannot make the claim expire for real."""
    from datetime import datetime, timedelta, timezone
    from types import SimpleNamespace

    import lungcbir.indexing
    from lungcbir.work_queue import WorkQueue

    clock, start = [0.0], datetime.now(timezone.utc)
    monkeypatch.setattr(lungcbir.indexing, "time", SimpleNamespace(monotonic=lambda: clock[0],
                                                                    perf_counter=lambda: clock[0]))
    monkeypatch.setattr(WorkQueue, "_now", lambda self: start + timedelta(seconds=clock[0]))
    url = dicomweb_archive["url"]
    study = next(iter(dicomweb_archive["studies"]))
    retriever = Retriever(f"sqlite:///{tmp_path / 'db.sqlite'}", tmp_path / "index", weights=tiny_weights)
    rival = Store(f"sqlite:///{tmp_path / 'db.sqlite'}", tmp_path / "index-rival")
    taken, seen = [], []

    def slow(path):  # one instance per 0.4 s: the whole series takes several claim timeouts
        seen.append(path)
        clock[0] += 0.4
        if len(seen) % 5 == 0:
            taken.append(rival.queue.claim_series(DicomwebSource(url).root, retriever.model.model_id, "rival:1",
                                                  timeout_s=1.0))

    report = retriever.index_dataset([url], study=study, on_file=slow, claim_timeout=1.0)
    assert len(seen) >= 15 and report.failed == 0  # the run outlasted its timeout several times
    assert taken and taken == [None] * len(taken)
    assert retriever.store().queue.counts()[QueueState.DONE] == 1


@pytest.mark.realdata
def test_a_done_series_with_a_new_instance_gets_only_that_one(dicomweb_archive, tiny_weights, tmp_path):
    import requests

    url, files = dicomweb_archive["url"], dicomweb_archive["files"]
    clean = next(path for path in files if "P001" in path)
    study = dicomweb_archive["study_of"][clean]
    retriever = Retriever(f"sqlite:///{tmp_path / 'db.sqlite'}", tmp_path / "index", weights=tiny_weights)
    first = retriever.index_dataset([url], study=study)
    added = pydicom.dcmread(clean)
    added.SOPInstanceUID = pydicom.uid.generate_uid()
    added.file_meta.MediaStorageSOPInstanceUID = added.SOPInstanceUID
    assert not DicomwebSource(url).client.store([added]).get("FailedSOPSequence")
    try:
        again = retriever.index_dataset([url], study=study)
        assert (again.indexed, again.skipped, again.failed) == (1, first.indexed, 0)
        assert archive_sops(tmp_path).count(added.SOPInstanceUID) == 1
    finally:
        base = url.rsplit("/dicom-web", 1)[0]
        for item in requests.post(f"{base}/tools/lookup", data=added.SOPInstanceUID, timeout=30).json():
            requests.delete(f"{base}{item['Path']}", timeout=30)


def index_process(url: str, db_url: str, folder: Path, weights: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "lungcbir.cli", "index-dataset", url, "--quiet", "--db", db_url,
                             "--index-dir", str(folder / "index"), "--cache", str(folder / "cache"),
                             "--commit-every", "8", "--weights", weights],
                            cwd=REPO, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.realdata
def test_two_runs_at_once_share_an_archive_without_overlap(dicomweb_archive, bundled_weights, tmp_path):
    """Two `index-dataset URL` processes (two machines, each with its own index folder) against one
    PostgreSQL database: every instance is fetched by one of them only (each keeps what it fetched
    in its own --cache folder), stored once, and both did part of the work."""
    db_url = postgres_url()
    url, files = dicomweb_archive["url"], dicomweb_archive["files"]
    runs = [index_process(url, db_url, tmp_path / f"run{n}", bundled_weights) for n in (1, 2)]
    outputs = []
    for run in runs:
        out, err = run.communicate(timeout=600)
        assert run.returncode == 0, err
        outputs.append(out)
    indexed = [int(re.search(r"indexed (\d+), skipped (\d+)", out).group(1)) for out in outputs]
    fetched = [{path.stem for path in (tmp_path / f"run{n}" / "cache").rglob("*.dcm")} for n in (1, 2)]
    # both runs usually share the work, but a run that starts late may find every series claimed:
    # what must hold is that together they index each instance once, never one instance twice
    assert sum(indexed) == len(files), outputs
    assert not fetched[0] & fetched[1] and fetched[0] | fetched[1] == set(files.values())
    assert [len(f) for f in fetched] == indexed
    store = Store(db_url, tmp_path / "check")
    rows = store.records(range(1, store.count() + 1000)).values()
    assert sorted(row.sop_uid for row in rows) == sorted(files.values())  # each stored once
    counts = store.queue.counts()
    assert counts[QueueState.DONE] == len(DicomwebSource(url).find_series()[0]) and counts[QueueState.CLAIMED] == 0
