"""Indexing runs: files, folders and DICOMweb archives read, segmented and stored in batches.

An :class:`Indexer` reads files (in worker processes when asked, so decoding overlaps the
model), claims DICOMweb series from the database's work queue (:mod:`lungcbir.work_queue`),
puts each batch of slices through the model and commits it to the :class:`~lungcbir.store.Store`.
:meth:`lungcbir.Retriever.index_dataset` is its public entry point and holds the index
folder's write lock around a run.

Example:
    >>> import tempfile
    >>> from lungcbir.inference import LungModel
    >>> from lungcbir.phantom import write_phantom
    >>> from lungcbir.store import Store
    >>> folder = tempfile.mkdtemp()
    >>> _ = write_phantom(folder, slices=3, size=64, patients=1)
    >>> store = Store(f"sqlite:///{folder}/db.sqlite", f"{folder}/index")
    >>> with store.write_lock():
    ...     report = Indexer(LungModel.load(), store).run([f"{folder}/png"])
    >>> report.indexed, report.failed
    (3, 0)
"""

from __future__ import annotations

import csv
import os
import re
import signal
import time
import warnings
from collections import deque
from contextlib import closing, contextmanager, suppress
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Generator, Iterable, Sequence

import numpy as np

from .database import ImageRecord, NewRegion, encode_mask, unstorable
from .errors import DicomwebError, LungCBIRError, ReadError
from .identity import Identity, IdentityResolver
from .inference import LungModel, Segmentation
from .io import (
    MASK_FORMATS,
    CTSlice,
    ReadFailure,
    dicom_series_positions,
    find_image_files,
    read_file,
    read_region_mask,
    supported_formats,
)
from .regions import (
    SOURCE_LESION,
    SOURCE_MASK,
    FoundRegion,
    connected_regions,
    lesion_regions,
    region_dimension,
    region_model_id,
    region_vector,
)
from .store import Store
from .work_queue import DEFAULT_CLAIM_TIMEOUT_S, SeriesClaim, claimer_name

if TYPE_CHECKING:
    from concurrent.futures import Future

    from .dicomweb import DicomwebSource, SeriesRef

#: Files read before a batch goes through the model and into the database.
FILES_PER_COMMIT = 64
#: At most this many regions of one source are stored per slice (the largest): a noisy mask
#: of thousands of specks would otherwise fill the region index with noise.
MAX_REGIONS_PER_SLICE = 64
#: A run renews its claim on the series it is indexing this many times per claim timeout,
#: so a slow batch does not let the claim expire while the run is still working on it.
CLAIM_RENEWALS_PER_TIMEOUT = 4


@dataclass
class IndexReport:
    """What an indexing run did."""

    indexed: int = 0
    skipped: int = 0
    failures: list[ReadFailure] = field(default_factory=list)
    seconds: float = 0.0
    # rows of the labels CSV that name no file of this run: a typo or another path spelling
    # would otherwise leave every slice unlabelled without a word
    unmatched_labels: int = 0
    regions: int = 0  # regions stored with the slices indexed (marked and found lesions)
    #: one line per image that has no region mask in the masks folder (indexed without marked regions)
    warnings: list[str] = field(default_factory=list)

    @property
    def failed(self) -> int:
        return len(self.failures)


def read_labels(csv_path: str | os.PathLike) -> dict[str, dict[str, str]]:
    """Labels by absolute file path from a CSV with a ``path`` column (other columns are labels).

    Relative paths are taken relative to the CSV's own folder; empty cells are not labels.
    """
    csv_path = str(csv_path)
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            if not reader.fieldnames or "path" not in reader.fieldnames:
                raise LungCBIRError(f"{csv_path}: labels CSV needs a 'path' column")
            base = os.path.dirname(os.path.abspath(csv_path))
            labels = {}
            for row in reader:
                path = row.pop("path")
                full = path if os.path.isabs(path) else os.path.join(base, path)
                labels[os.path.abspath(full)] = {k: v for k, v in row.items() if k and v not in (None, "")}
            return labels
    except OSError as error:
        raise LungCBIRError(f"{csv_path}: cannot read labels ({error.strerror})") from None


class RegionMasks:
    """The folder of region masks of an indexing run (``--regions MASKS``): the mask of an image
    has the image's path relative to the folder it was found in (a file named directly: its
    name), in MASKS, as the same file name or the same name with a mask format's suffix
    (:data:`~lungcbir.io.MASK_FORMATS`); non-zero pixels are regions.

    ``roots`` None (``rebuild-regions``, which does not know the folders the images were
    indexed from): the image's path relative to any folder above it, the longest such path
    that names a mask first (``MASKS/p01/s1.png`` before ``MASKS/s1.png`` for ``.../p01/s1.png``).
    """

    def __init__(self, folder: str | os.PathLike, roots: Sequence[str] | None,
                 max_voxels: int | None = None) -> None:
        self.folder = os.path.abspath(folder)
        self.max_voxels = max_voxels
        if not os.path.isdir(self.folder):
            raise LungCBIRError(f"{folder}: the region masks folder does not exist")
        self.roots = None if roots is None else sorted(
            (os.path.abspath(root) for root in roots if os.path.isdir(root)), key=len, reverse=True)

    def holds(self, path: str) -> bool:
        """Whether ``path`` is inside the masks folder (a mask, not an image to index)."""
        return os.path.abspath(path).startswith(os.path.join(self.folder, ""))

    def _relative_paths(self, absolute: str) -> list[str]:
        if self.roots is None:
            parts = Path(absolute).parts
            return [os.path.join(*parts[start:]) for start in range(1, len(parts))]
        root = next((r for r in self.roots if absolute.startswith(os.path.join(r, ""))), None)
        return [os.path.relpath(absolute, root) if root else os.path.basename(absolute)]

    def candidates(self, path: str) -> list[str]:
        """The mask files that would be ``path``'s, in the order they are looked for."""
        names = []
        for relative in self._relative_paths(os.path.abspath(path)):
            stem = relative
            for suffix in sorted(MASK_FORMATS, key=len, reverse=True):
                if relative.lower().endswith(suffix):
                    stem = relative[:-len(suffix)]
                    break
            names += [relative] + [stem + suffix for suffix in MASK_FORMATS if stem + suffix != relative]
        return [os.path.join(self.folder, name) for name in names]

    def masks_for(self, items: Sequence[CTSlice]) -> dict[int, np.ndarray] | str | None:
        """The region mask of each slice of one file, by frame (a frame the mask lacks has no
        region); None when there is no mask file; a reason, naming the mask, when it cannot be used."""
        mask_path = next((c for c in self.candidates(items[0].path) if os.path.isfile(c)), None)
        if mask_path is None:
            return None
        try:
            planes = read_region_mask(mask_path, self.max_voxels)
        except ReadError as error:
            return f"region mask {mask_path}: {error.reason}"
        masks = {}
        for item in items:
            plane = planes.get(item.frame)
            if plane is None:
                return f"region mask {mask_path} has {len(planes)} plane(s), no plane {item.frame} for this slice"
            if plane.shape != item.shape[:2]:
                return (f"region mask {mask_path} is {plane.shape[1]}x{plane.shape[0]} pixels, "
                        f"the image {item.shape[1]}x{item.shape[0]}")
            masks[item.frame] = plane
        return masks


def slice_regions(model: LungModel, result: Segmentation, shape: tuple[int, int], marked: Sequence[FoundRegion],
                  lesions: bool) -> list[NewRegion]:
    """The regions to store for one slice segmented with ``keep_maps`` (``shape``: its size):
    the ``marked`` regions (of a region mask, or kept from the store), then, when ``lesions``
    and the model has a lesion output, the lesions it found (of at least
    :data:`~lungcbir.regions.LESION_REGION_MIN_PIXELS` at its input); at most
    :data:`MAX_REGIONS_PER_SLICE` of each source, the first (largest) ones, each with its
    :func:`~lungcbir.regions.region_vector`. What indexing and ``rebuild-regions`` both store."""
    if result.maps is None:
        return []
    found = [(region, SOURCE_MASK) for region in marked[:MAX_REGIONS_PER_SLICE]]
    if lesions and result.lesion_mask is not None:
        found += [(region, SOURCE_LESION)
                  for region in lesion_regions(result.lesion_mask, model.input_size)[:MAX_REGIONS_PER_SLICE]]
    centre = model.settings.centre
    return [NewRegion(region.bbox, region.area, source,
                      region_vector(result.maps, region.full(shape), None if centre is None else np.asarray(centre),
                                    model.settings.preprocess.hu_window), region.mask)
            for region, source in found]


def _read_or_error(path: str, max_voxels: int | None = None) -> list[CTSlice] | ReadError:
    try:
        return read_file(path, max_voxels=max_voxels)
    except ReadError as error:
        return error


def read_files(files: Iterable[str], workers: int = 1, max_voxels: int | None = None,
               read: Callable[[str, int | None], list[CTSlice] | ReadError] = _read_or_error
               ) -> Generator[tuple[str, list[CTSlice] | ReadError], None, None]:
    """Read files in order, in ``workers`` processes when above 1, so decoding overlaps inference
    (``max_voxels``: as :func:`~lungcbir.io.read_file`; ``read``: what reads one, a module-level
    function that returns its ReadError, which a worker process can be given).

    At most a few files per worker are read ahead, to keep memory bounded (``files`` may be a
    generator: it is drawn from as they are read). Workers ignore Ctrl-C (it reaches the whole
    process group): only this process reports the interrupt, and closing the generator cancels
    what was queued.
    """
    if workers <= 1:
        for path in files:
            yield path, read(path, max_voxels)
        return
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    window = workers * 4
    pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_start_reader)
    try:
        pending: deque[tuple[str, Future[list[CTSlice] | ReadError]]] = deque()
        for path in files:
            with _interrupts_inherited_as_ignored():
                pending.append((path, pool.submit(read, path, max_voxels)))  # may start a worker
            if len(pending) >= window:
                done_path, future = pending.popleft()
                yield done_path, future.result()
        while pending:
            done_path, future = pending.popleft()
            yield done_path, future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _start_reader() -> None:
    """Initializer of a reader process (a process of ours, started for decoding only): Ctrl-C
    is the parent's to report, in one line, and so is a file the decoders warn about."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    warnings.simplefilter("ignore")


@contextmanager
def _interrupts_inherited_as_ignored():
    """Hold Ctrl-C back while a worker may be started, so the worker never sees one.

    SIGINT is blocked, not ignored: a blocked signal stays pending and reaches this process
    as soon as it is unblocked (an ignored one was lost, so a Ctrl-C landing here did
    nothing), while a worker started meanwhile inherits the block across exec and so cannot
    print a traceback before its initializer ignores SIGINT for good.
    """
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


_LOST = object()  # _index_claimed's answer when its claim was taken over


class _Batch:
    """Slices read but not yet stored: they go through the model and into the database every
    ``files_per_commit`` slices, so a killed run loses at most that many.

    ``stored_at`` holds the rows of this run's files as indexed before (by path,
    :meth:`Store.contents_at`): a file whose content is no longer what its rows hold was
    changed since, and :meth:`replace_changed` indexes it again.
    """

    def __init__(self, indexer: Indexer, label_map: dict, identities: IdentityResolver, report: IndexReport,
                 stored_at: dict[str, list[tuple[int, str, int]]] | None = None):
        self.indexer, self.label_map, self.report = indexer, label_map, report
        # (sha256, frame) taken by this run; stored ones are looked up per file, so a run's start
        # and memory do not grow with the store
        self.taken: set[tuple[str, int]] = set()
        self.identities = identities
        self.pending: list[CTSlice] = []
        self.marked: dict[tuple[str, int], np.ndarray] = {}  # region masks of pending slices, by (path, frame)
        self.refused: set[str] = set()  # files with a slice that cannot be stored: one failure each
        self.stored_at = dict(stored_at or {})
        self.stale: list[tuple[int, str, int]] = []  # (id, sha256, frame) of rows of changed files
        # (file, key) of slices skipped because another path's row holds their content: if that
        # row is stale (two files swapped content), they must be indexed after all
        self.held_elsewhere: list[tuple[str, tuple[str, int]]] = []

    def take(self, outcome: list[CTSlice] | ReadError, slice_index: int | None = None) -> None:
        """One file's or instance's slices (or why it could not be read)."""
        if isinstance(outcome, ReadError):
            self.report.failures.append(ReadFailure(outcome.path, outcome.reason))
            return
        before = self.stored_at.pop(_stored_path(outcome[0].path), []) if outcome else []
        # the readers always set sha256; "" stands in for a missing one, which no stored row has
        now = {(item.sha256 or "", item.frame) for item in outcome}
        self.stale += [row for row in before if (row[1], row[2]) not in now]
        here = {(sha, frame) for _, sha, frame in before}
        stored = self.indexer.store.stored_keys(self.indexer.model.model_id, now - self.taken) if now else set()
        new = []
        for item in outcome:
            key = (item.sha256 or "", item.frame)
            if key in self.taken or key in stored:
                self.report.skipped += 1
                if key not in here:
                    self.held_elsewhere.append((item.path, key))
                continue
            new.append(item)
        masks = self.indexer.region_masks
        if new and masks is not None:
            found = masks.masks_for(new)
            if isinstance(found, str):  # not indexed: a rerun with the mask mended indexes it with its regions
                self.report.failures.append(ReadFailure(new[0].path, found))
                return
            if found is None:
                self.report.warnings.append(f"{new[0].path}: no region mask (looked for "
                                            f"{masks.candidates(new[0].path)[0]}); indexed without marked regions")
            for item in new:
                if found and item.frame in found:
                    self.marked[(item.path, item.frame)] = found[item.frame]
        for item in new:
            self.taken.add((item.sha256 or "", item.frame))
            if item.slice_index is None:
                item.slice_index = slice_index
            self.pending.append(item)
        if len(self.pending) >= self.indexer.files_per_commit:
            self.commit()

    def commit(self) -> None:
        """Store what is pending (a row stored meanwhile by a concurrent run counts as skipped;
        a slice that cannot be stored fails its file, once)."""
        stored, refused, regions = self.indexer.store_slices(self.pending, self.label_map, self.identities,
                                                             self.marked)
        for path, reason in refused:
            if path not in self.refused:
                self.refused.add(path)
                self.report.failures.append(ReadFailure(path, reason))
        self.report.indexed += stored
        self.report.regions += regions
        self.report.skipped += len(self.pending) - stored - len(refused)
        self.pending, self.marked = [], {}

    def replace_changed(self, positions: dict[str, int]) -> None:
        """Remove the rows of files whose content changed since they were indexed (the index
        follows), then index the slices skipped because one of those rows held their content."""
        self.commit()
        if not self.stale:
            return
        self.indexer.store.remove([row_id for row_id, _, _ in self.stale])
        gone = {(sha, frame) for _, sha, frame in self.stale}
        self.taken -= gone
        wanted: dict[str, set[tuple[str, int]]] = {}
        for path, key in self.held_elsewhere:
            if key in gone:
                wanted.setdefault(path, set()).add(key)
        self.stale, self.held_elsewhere = [], []
        with closing(read_files(sorted(wanted), self.indexer.workers, self.indexer.max_voxels)) as outcomes:
            for path, outcome in outcomes:
                if isinstance(outcome, ReadError):  # gone or broken since: a failure, no longer a skip
                    self.report.skipped -= len(wanted[path])
                    self.take(outcome)
                    continue
                items = [item for item in outcome if (item.sha256 or "", item.frame) in wanted[path]]
                self.report.skipped -= len(items)  # counted as skipped by the first look
                self.take(items, positions.get(path))
        self.commit()


def _stored_path(path: str) -> str:
    """A slice's path as its row holds it: absolute, or an archive instance's WADO-RS URL."""
    from .dicomweb import is_dicomweb_url

    return path if is_dicomweb_url(path) else os.path.abspath(path)


class _Progress:
    """The ``on_file`` / ``on_total`` callbacks of an indexing run; the total grows as archive
    series are claimed."""

    def __init__(self, on_file: Callable[[str], None] | None, on_total: Callable[[int], None] | None, total: int):
        self.on_file, self.on_total, self.total = on_file, on_total, total
        if on_total:
            on_total(total)

    def add(self, count: int) -> None:
        self.total += count
        if self.on_total and count:
            self.on_total(self.total)

    def done(self, path: str) -> None:
        if self.on_file:
            self.on_file(path)


class Indexer:
    """One indexing run's machinery: the model, the store and how work is batched.

    ``batch_size`` slices go through the model at once; every ``files_per_commit`` slices are
    committed in one transaction; ``workers`` processes read files (1: this process);
    ``max_voxels`` bounds volumes (:func:`~lungcbir.io.read_file`). ``lesion_regions``: store
    the lesions the model's lesion output finds (of at least
    :data:`~lungcbir.regions.LESION_REGION_MIN_PIXELS` at its input) as regions of their slices.
    """

    def __init__(self, model: LungModel, store: Store, batch_size: int = 16,
                 files_per_commit: int = FILES_PER_COMMIT, workers: int = 1, max_voxels: int | None = None,
                 lesion_regions: bool = True) -> None:
        self.model, self.store = model, store
        self.batch_size, self.files_per_commit, self.workers = batch_size, files_per_commit, workers
        self.max_voxels = max_voxels
        self.lesion_regions = lesion_regions and model.has_lesion_head
        self.region_masks: RegionMasks | None = None  # set by run() from its ``regions`` folder

    @property
    def regions_wanted(self) -> bool:
        return self.region_masks is not None or self.lesion_regions

    def run(self, paths: Iterable[str | os.PathLike], labels: str | os.PathLike | dict | None = None,
            exclude: Iterable[str] = (), on_file: Callable[[str], None] | None = None,
            on_total: Callable[[int], None] | None = None, pattern: re.Pattern | None = None,
            study: str | None = None, since: date | None = None, cache_dir: str | os.PathLike | None = None,
            claim_timeout: float = DEFAULT_CLAIM_TIMEOUT_S,
            regions: str | os.PathLike | None = None) -> IndexReport:
        """Index ``paths`` (folders, files, DICOMweb roots); see :meth:`lungcbir.Retriever.index_dataset`.
        The caller holds the index folder's write lock."""
        from .dicomweb import DicomwebSource, is_dicomweb_url

        began = time.perf_counter()
        texts = [str(path) for path in paths]
        urls, folders = [p for p in texts if is_dicomweb_url(p)], [p for p in texts if not is_dicomweb_url(p)]
        label_map = read_labels(labels) if isinstance(labels, (str, os.PathLike)) else dict(labels or {})
        # by real path: a CSV and an index run may reach the same files through different links
        label_map = {os.path.realpath(k): v for k, v in label_map.items()}
        files = list(find_image_files(folders, exclude)) if folders else []
        self.region_masks = RegionMasks(regions, folders, self.max_voxels) if regions is not None else None
        if self.region_masks is not None:  # a masks folder inside an indexed one holds no images
            files = [path for path in files if not self.region_masks.holds(path)]
        if folders and not files:
            raise LungCBIRError(f"no images found in {', '.join(folders)} "
                                f"({supported_formats()} files)")
        archives, unusable = [], []
        for url in urls:  # every archive is asked before anything is written: one unreachable fails the run
            source = DicomwebSource(url, cache_dir=cache_dir)
            series, rejected = source.find_series(study, since)
            archives.append((source, series))
            unusable += rejected
        model, store = self.model, self.store
        store.check_model(model.model_id, model.dimension)
        if self.regions_wanted:
            store.database.regions.check_model(region_model_id(model.model_id),
                                               region_dimension(model.settings.unet.bottleneck_channels))
        identities = IdentityResolver(folders, files, pattern)
        report = IndexReport()
        report.failures += [ReadFailure(error.path, error.reason) for error in unusable]
        found = {os.path.realpath(path) for path in files}
        report.unmatched_labels = sum(path not in found for path in label_map)
        batch = _Batch(self, label_map, identities, report,
                       store.contents_at([os.path.abspath(path) for path in files], model.model_id))
        progress = _Progress(on_file, on_total, len(files))
        positions = dicom_series_positions(files)
        # closing: an interrupt stops the readers too
        with closing(read_files(files, self.workers, self.max_voxels)) as file_outcomes:
            for path, outcome in file_outcomes:
                batch.take(outcome, positions.get(path))
                progress.done(path)
        batch.replace_changed(positions)
        for source, series in archives:
            self._index_archive(source, series, study, claim_timeout, batch, progress)
        store.checkpoint()  # the saved index matches what was committed (additions wait for checkpoints)
        report.seconds = time.perf_counter() - began
        return report

    def _index_archive(self, source: DicomwebSource, series: Sequence[SeriesRef], study: str | None,
                       claim_timeout: float, batch: _Batch, progress: _Progress) -> None:
        """Enqueue the series found in an archive, then claim and index series until none is left.

        The queue lives in the database (:class:`~lungcbir.work_queue.WorkQueue`), so concurrent runs, on
        this machine or others, each take different series; this run also finishes series of
        the same archive and model that earlier runs left pending or whose claims expired
        (of ``study`` only, when given). An interrupted run gives its series back at once.
        """
        store, model_id = self.store, self.model.model_id
        store.queue.enqueue_series(source.root, [(s.study_uid, s.series_uid) for s in series], model_id)
        claimer = claimer_name()
        while (claim := store.queue.claim_series(source.root, model_id, claimer, claim_timeout, study)) is not None:
            try:
                error = self._index_claimed(source, claim, claim_timeout, batch, progress)
            except BaseException:
                with suppress(LungCBIRError):  # the claim expires anyway if this cannot be written
                    store.queue.release_claim(claim)
                raise
            if error is not _LOST:
                store.queue.finish_claim(claim, error)

    def _index_claimed(self, source: DicomwebSource, claim: SeriesClaim, claim_timeout: float, batch: _Batch,
                       progress: _Progress):
        """Index one claimed series; returns None (done), an error text (failed) or ``_LOST``
        (the claim expired and another run took the series over: this run stops on it)."""
        from .dicomweb import SeriesRef

        store, report = self.store, batch.report
        series = SeriesRef(claim.study_uid, claim.series_uid)
        series_url = source.series_url(series)
        try:
            refs, rejected = source.instances(series)
        except DicomwebError as error:
            reason = str(error).removeprefix(f"{source.root}: ").removeprefix(f"{series_url}: ")
            report.failures.append(ReadFailure(series_url, reason))
            return reason
        report.failures += [ReadFailure(error.path, error.reason) for error in rejected]
        known = store.known_sop_uids(claim.model_id, claim.series_uid)
        report.skipped += sum(1 for ref in refs if ref.sop_uid in known)
        todo = [ref for ref in refs if ref.sop_uid not in known]
        progress.add(len(todo))
        failed_before = len(report.failures)
        renewed = time.monotonic()
        for ref, outcome in source.read_many(todo):
            batch.take(outcome if isinstance(outcome, ReadError) else [outcome])
            progress.done(ref.url)
            if time.monotonic() - renewed > claim_timeout / CLAIM_RENEWALS_PER_TIMEOUT:
                if not store.queue.renew_claim(claim):
                    batch.commit()
                    return _LOST
                renewed = time.monotonic()
        batch.commit()  # the rows are in before the series is marked done
        failed = len(report.failures) - failed_before + len(rejected)
        return f"{failed} of {len(todo) + len(rejected)} instances could not be read" if failed else None

    def store_slices(self, slices: list[CTSlice], label_map: dict[str, dict], identities: IdentityResolver,
                     marked: dict[tuple[str, int], np.ndarray] | None = None
                     ) -> tuple[int, list[tuple[str, str]], int]:
        """Segment and store slices with their regions (``marked``: region masks by (path,
        frame), and the lesions found when :attr:`lesion_regions`): how many rows were added,
        (path, reason) of each slice that cannot be stored (:func:`~lungcbir.database.unstorable`),
        so that it fails alone, and how many regions were stored."""
        if not slices:
            return 0, [], 0
        wanted = self.regions_wanted
        results = self.model.segment(slices, self.batch_size, keep_maps=wanted)
        records, vectors, refused, regions = [], [], [], []
        for item, result in zip(slices, results):
            labels = label_map.get(os.path.realpath(item.path), {})
            record = self._record(item, result, *identities.resolve(item, labels))
            if (problem := unstorable(record)) is not None:
                refused.append((item.path, problem))
            else:
                records.append(record)
                vectors.append(result.vector)
                if wanted:
                    regions.append(self._regions(item, result, (marked or {}).get((item.path, item.frame))))
        if not records:
            return 0, refused, 0
        # regions go in with their rows only: a row stored meanwhile by another run keeps its own
        ids, stored_regions = self.store.add_slices(records, np.stack(vectors), regions if wanted else None,
                                                    region_model_id(self.model.model_id))
        return len(ids), refused, stored_regions

    def _regions(self, item: CTSlice, result: Segmentation, marked: np.ndarray | None) -> list[NewRegion]:
        """The regions of one slice: the connected parts of its region mask, then the lesions found."""
        return slice_regions(self.model, result, (item.shape[0], item.shape[1]),
                             connected_regions(marked) if marked is not None else [], self.lesion_regions)

    def _record(self, item: CTSlice, result: Segmentation, identity: Identity, labels: dict) -> ImageRecord:
        spacing = item.pixel_spacing or (None, None)
        return ImageRecord(path=_stored_path(item.path), sha256=item.sha256, frame=item.frame, sop_uid=item.sop_uid,
                           source_format=str(item.source_format), width=item.shape[1], height=item.shape[0],
                           patient_id=identity.patient_id, study_uid=item.study_uid, series_uid=identity.series_uid,
                           identity_source=identity.source.value,
                           instance_number=item.instance_number, slice_location=item.slice_location,
                           study_date=(item.study_date or "")[:16] or None,
                           series_description=(item.series_description or "")[:128] or None,
                           slice_index=item.slice_index, pixel_spacing_row=spacing[0],
                           pixel_spacing_col=spacing[1], labels=labels, lung_fraction=result.lung_fraction,
                           model_id=self.model.model_id, mask_png=encode_mask(result.mask))
