"""The Python API: index an archive, query a slice, segment a slice.

:class:`Retriever` ties the stages together (read -> model -> store) and is what the command
line and the web app call; they add nothing but parsing and formatting.
"""

from __future__ import annotations

import csv
import os
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from .errors import LungCBIRError, ReadError, StoreError
from .inference import LungModel, Segmentation
from .quality import Quality
from .io import CTSlice, ReadFailure, classify_intensity, dicom_series_positions, find_image_files, read_file
from .store import DEFAULT_DB_URL, DEFAULT_INDEX_DIR, ImageRecord, Store, safe_url

#: Files read before a batch goes through the model and into the database.
FILES_PER_COMMIT = 64

#: What a query answers instead of neighbours when its slice has no lungs or is not CT.
NO_LUNGS_WARNING = ("no lungs found in this picture (not a CT slice, or no lungs in view): "
                    "not searched")


@dataclass
class IndexReport:
    """What an indexing run did."""

    indexed: int = 0
    skipped: int = 0
    failures: list[ReadFailure] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failed(self) -> int:
        return len(self.failures)


@dataclass
class Neighbor:
    """One stored slice returned for a query."""

    rank: int
    id: int
    path: str
    score: float
    patient_id: str | None
    series_uid: str | None
    slice_index: int | None
    labels: dict

    def to_json(self) -> dict:
        """The documented JSON object of ``query --json`` and the web API."""
        return {**asdict(self), "score": round(self.score, 6)}


@dataclass
class SeriesMatch:
    """A stored case ranked by how well its slices match a query series."""

    rank: int
    case: str  # patient, series or volume
    patient_id: str | None
    series_uid: str | None
    score: float  # mean over query slices of the best slice similarity in this case
    pairs: list[tuple[int, Neighbor]]  # (query slice number, best stored slice), best first


@dataclass
class QueryResult:
    """The answer to one query slice."""

    query: CTSlice
    mask: np.ndarray
    lung_fraction: float
    neighbors: list[Neighbor]
    quality: Quality = Quality.OK  # of the query's own segmentation (lungcbir.quality)
    quality_score: float = 1.0
    lesion_fraction: float | None = None  # None until the model has a lesion output
    warning: str | None = None  # set when the query was not searched (quality no-lungs)

    def summary_json(self) -> dict:
        """The per-query fields of ``query --json`` and the web API (``warning`` only when set)."""
        fields = {"lung_fraction": round(self.lung_fraction, 6), "lesion_fraction": self.lesion_fraction,
                  "quality": self.quality.value, "quality_score": round(self.quality_score, 4)}
        return {**fields, "warning": self.warning} if self.warning else fields


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


def _read_or_error(path: str) -> list[CTSlice] | ReadError:
    try:
        return read_file(path)
    except ReadError as error:
        return error


def read_files(files: Sequence[str], workers: int = 1) -> Iterator[tuple[str, list[CTSlice] | ReadError]]:
    """Read files in order, in ``workers`` processes when above 1, so decoding overlaps inference.

    At most a few files per worker are read ahead, to keep memory bounded.
    """
    if workers <= 1:
        for path in files:
            yield path, _read_or_error(path)
        return
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    window = workers * 4
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        pending = deque()
        for path in files:
            pending.append((path, pool.submit(_read_or_error, path)))
            if len(pending) >= window:
                done_path, future = pending.popleft()
                yield done_path, future.result()
        while pending:
            done_path, future = pending.popleft()
            yield done_path, future.result()


def as_slice(image: str | os.PathLike | CTSlice | np.ndarray) -> CTSlice:
    """Accept a path, a :class:`CTSlice` or a 2-D array; a multi-slice file gives its first slice."""
    if isinstance(image, CTSlice):
        return image
    if isinstance(image, np.ndarray):
        if image.ndim != 2:
            raise ReadError("<array>", f"expected a 2-D array, got shape {image.shape}")
        return CTSlice(image, classify_intensity(image), "<array>", "array")
    return read_file(image)[0]


class Retriever:
    """Index CT slices and find the most similar stored ones.

    Example:
        >>> retriever = Retriever(db_url="sqlite:///db/lungcbir.sqlite", index_dir="index")  # doctest: +SKIP
        >>> report = retriever.index_dataset(["scans/"])                                    # doctest: +SKIP
        >>> result = retriever.query("query.png", k=5)                                      # doctest: +SKIP
        >>> result.neighbors[0].path, result.mask.shape                                     # doctest: +SKIP
    """

    def __init__(self, db_url: str | None = None, index_dir: str | os.PathLike | None = None,
                 weights: str | os.PathLike | None = None, device: str = "cpu", batch_size: int = 16,
                 files_per_commit: int = FILES_PER_COMMIT, workers: int = 1) -> None:
        self.db_url = db_url or os.environ.get("LUNGCBIR_DB") or DEFAULT_DB_URL
        self.index_dir = index_dir or os.environ.get("LUNGCBIR_INDEX_DIR") or DEFAULT_INDEX_DIR
        self.weights = weights
        self.device = device
        self.batch_size = batch_size
        self.files_per_commit = files_per_commit
        self.workers = workers
        self._model: LungModel | None = None
        self._store: Store | None = None

    @property
    def model(self) -> LungModel:
        if self._model is None:
            self._model = LungModel.load(self.weights, self.device)
        return self._model

    def store(self, create: bool = True) -> Store:
        if self._store is None:
            self._store = Store(self.db_url, self.index_dir, create=create)
        return self._store

    def segment(self, image: str | os.PathLike | CTSlice | np.ndarray) -> np.ndarray:
        """Boolean lung mask at the image's own resolution."""
        return self.model.segment([as_slice(image)])[0].mask

    def segment_slices(self, slices: Sequence[CTSlice]) -> list[Segmentation]:
        """Masks, lung fractions and vectors for many slices (batched)."""
        return self.model.segment(slices, self.batch_size)

    def index_dataset(self, paths: Iterable[str | os.PathLike], labels: str | os.PathLike | dict | None = None,
                      exclude: Iterable[str] = (), wait: bool = False,
                      on_file: Callable[[str], None] | None = None,
                      on_total: Callable[[int], None] | None = None) -> IndexReport:
        """Index every image under ``paths``; already indexed files (same sha256) are skipped.

        Unreadable files are recorded in the report and indexing goes on. Rows are committed
        every :data:`FILES_PER_COMMIT` files, so an interrupted run keeps what it finished and
        a rerun completes it. One run at a time writes to an index folder: a second raises
        :class:`~lungcbir.errors.LockedError` or, with ``wait=True``, waits for the first.
        """
        with self.store().write_lock(wait):
            return self._index_locked(paths, labels, exclude, on_file, on_total)

    def _index_locked(self, paths, labels, exclude, on_file, on_total) -> IndexReport:
        began = time.perf_counter()
        paths = [str(path) for path in paths]
        label_map = read_labels(labels) if isinstance(labels, (str, os.PathLike)) else dict(labels or {})
        label_map = {os.path.abspath(k): v for k, v in label_map.items()}
        files = list(find_image_files(paths, exclude))
        if not files:
            raise LungCBIRError(f"no images found in {', '.join(paths)} "
                                f"(PNG, JPEG, BMP, TIFF, DICOM or NIfTI files)")
        if on_total:
            on_total(len(files))
        model, store = self.model, self.store()
        store.check_model(model.model_id, model.dimension)
        known = store.known_keys(model.model_id)
        positions = dicom_series_positions(files)
        report = IndexReport()
        pending: list[CTSlice] = []
        for number, (path, outcome) in enumerate(read_files(files, self.workers), 1):
            if isinstance(outcome, ReadError):
                report.failures.append(ReadFailure(outcome.path, outcome.reason))
                slices = []
            else:
                slices = outcome
            for item in slices:
                if (item.sha256, item.frame) in known:
                    report.skipped += 1
                    continue
                known.add((item.sha256, item.frame))
                if item.slice_index is None:
                    item.slice_index = positions.get(path)
                pending.append(item)
            if on_file:
                on_file(path)
            if len(pending) >= self.files_per_commit or number == len(files):
                stored = self._store_slices(pending, label_map)
                report.indexed += stored
                report.skipped += len(pending) - stored  # stored meanwhile by a concurrent run
                pending = []
        store.index()  # make sure the saved index matches what was committed
        report.seconds = time.perf_counter() - began
        return report

    def _store_slices(self, slices: list[CTSlice], label_map: dict[str, dict]) -> int:
        if not slices:
            return 0
        results = self.segment_slices(slices)
        records = [self._record(item, result, label_map.get(os.path.abspath(item.path), {}))
                   for item, result in zip(slices, results)]
        return len(self.store().add(records, np.stack([r.vector for r in results])))

    def _record(self, item: CTSlice, result: Segmentation, labels: dict) -> ImageRecord:
        spacing = item.pixel_spacing or (None, None)
        return ImageRecord(path=os.path.abspath(item.path), sha256=item.sha256, frame=item.frame,
                           source_format=item.source_format, width=item.shape[1], height=item.shape[0],
                           patient_id=item.patient_id, study_uid=item.study_uid, series_uid=item.series_uid,
                           instance_number=item.instance_number, slice_location=item.slice_location,
                           slice_index=item.slice_index, pixel_spacing_row=spacing[0],
                           pixel_spacing_col=spacing[1], labels=labels, lung_fraction=result.lung_fraction,
                           model_id=self.model.model_id)

    def query(self, image: str | os.PathLike | CTSlice | np.ndarray, k: int = 5,
              where: dict[str, str] | None = None, per_patient: int = 1) -> QueryResult:
        """Segment one slice and find the ``k`` most similar stored slices.

        ``where`` keeps only stored slices whose labels or metadata (``patient_id``,
        ``series_uid``, ``source_format``) equal the given values. ``per_patient`` returns at
        most that many slices of one patient (or series, or volume), so the top k are k
        different cases; 0 turns this off.
        """
        return self.query_slices([as_slice(image)], k, where, per_patient)[0]

    def stored_slice(self, image_id: int) -> CTSlice:
        """Read a stored image's slice back from its file (raises ReadError if it is gone)."""
        record = self.store(create=False).records([image_id]).get(image_id)
        if record is None:
            raise LungCBIRError(f"no stored image with id {image_id}")
        slices = read_file(record.path)
        return slices[min(record.frame, len(slices) - 1)]

    def query_series(self, slices: Sequence[CTSlice], k: int = 5, where: dict[str, str] | None = None,
                     pairs: int = 3) -> list[SeriesMatch]:
        """Rank stored cases by aggregated slice similarity to a whole query series or volume.

        For every query slice the best-matching slice of each stored case counts; a case's score
        is the mean of those best similarities over the query slices (0 where none was among
        the candidates), so cases that match along the whole series rank first.
        """
        answers = self.query_slices(slices, k=max(50, 10 * k), where=where, per_patient=0)
        best: dict[str, dict[int, Neighbor]] = {}
        for number, answer in enumerate(answers):
            for neighbor in answer.neighbors:
                record_case = case_key(neighbor)
                current = best.setdefault(record_case, {}).get(number)
                if current is None or neighbor.score > current.score:
                    best[record_case][number] = neighbor
        ranked = sorted(best.items(), key=lambda item: -sum(n.score for n in item[1].values()))
        matches = []
        for rank, (case, found) in enumerate(ranked[:k], 1):
            example = next(iter(found.values()))
            top = sorted(found.items(), key=lambda item: -item[1].score)[:pairs]
            matches.append(SeriesMatch(rank, case, example.patient_id, example.series_uid,
                                       sum(n.score for n in found.values()) / len(slices), top))
        return matches

    def query_slices(self, slices: Sequence[CTSlice], k: int = 5, where: dict[str, str] | None = None,
                     per_patient: int = 1) -> list[QueryResult]:
        """:meth:`query` for many slices at once.

        A slice whose segmentation is ``no-lungs`` (not CT, or no lungs in view) is not
        searched: its result has no neighbours and a ``warning``; a confident list of
        "similar" lung slices for a screenshot would mislead.
        """
        if k < 1:
            raise LungCBIRError("k must be at least 1")
        store = self.store(create=False)
        if store.count() == 0:
            raise StoreError(f"no images are indexed in {safe_url(self.db_url)}; "
                             f"add some with `lungcbir index-dataset PATH`")
        if store.model_id not in (None, self.model.model_id):
            raise LungCBIRError(f"the database was indexed with model {store.model_id}, "
                                f"but the model in use is {self.model.model_id}")
        results = self.segment_slices(slices)
        searched = [number for number, r in enumerate(results) if r.quality != Quality.NO_LUNGS]
        # filters and per-patient collapsing work on a larger candidate list, then cut to k
        candidates = k if not (where or per_patient) else max(k * 50, 500)
        found: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        rows = {}
        if searched:
            scores, ids = store.search(np.stack([results[n].vector for n in searched]), candidates)
            found = {n: (row_scores, row_ids) for n, row_scores, row_ids in zip(searched, scores, ids)}
            rows = store.records(ids[ids >= 0].ravel())
        answers = []
        for number, (item, result) in enumerate(zip(slices, results)):
            extra = {"quality": result.quality, "quality_score": result.quality_score,
                     "lesion_fraction": result.lesion_fraction}
            if number not in found:
                answers.append(QueryResult(item, result.mask, result.lung_fraction, [], **extra,
                                           warning=NO_LUNGS_WARNING))
                continue
            row_scores, row_ids = found[number]
            neighbors = []
            per_case: dict[str, int] = {}
            for score, identifier in zip(row_scores, row_ids):
                record = rows.get(int(identifier))
                if record is None or not _matches(record, where):
                    continue  # removed since the index was read, or filtered out
                if len(neighbors) == k:
                    break
                if per_patient:
                    case = case_key(record)
                    if per_case.get(case, 0) >= per_patient:
                        continue
                    per_case[case] = per_case.get(case, 0) + 1
                neighbors.append(Neighbor(rank=len(neighbors) + 1, id=record.id, path=record.path,
                                          score=float(score), patient_id=record.patient_id,
                                          series_uid=record.series_uid, slice_index=record.slice_index,
                                          labels=dict(record.labels or {})))
            answers.append(QueryResult(item, result.mask, result.lung_fraction, neighbors, **extra))
        return answers


def case_key(record: ImageRecord | Neighbor) -> str:
    """What counts as one case: the patient, else the series, else the file (a NIfTI volume)."""
    if record.patient_id:
        return f"patient:{record.patient_id}"
    if record.series_uid:
        return f"series:{record.series_uid}"
    return f"file:{record.path}"


def _matches(record: ImageRecord, where: dict[str, str] | None) -> bool:
    for key, wanted in (where or {}).items():
        value = (record.labels or {}).get(key, getattr(record, key, None) if key in _FILTERABLE else None)
        if value is None or str(value) != str(wanted):
            return False
    return True


_FILTERABLE = {"patient_id", "series_uid", "study_uid", "source_format"}
