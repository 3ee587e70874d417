"""The Python API: index an archive, query a slice, segment a slice.

:class:`Retriever` ties the stages together (read -> model -> store) and is what the command
line and the web app call; they add nothing but parsing and formatting.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from datetime import date
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

import numpy as np

from .config import Settings
from .database import FILTER_COLUMNS, ImageRecord, safe_url
from .errors import FilterError, LungCBIRError, ReadError, StoreError
from .focus import DEFAULT_FOCUS, Focus
from .identity import compile_case_pattern
from .indexing import FILES_PER_COMMIT, Indexer, IndexReport
from .inference import LungModel, Segmentation
from .io import CTSlice, SourceFormat, classify_intensity, dicom_series_positions, read_file
from .quality import Quality
from .store import Store
from .work_queue import DEFAULT_CLAIM_TIMEOUT_S

if TYPE_CHECKING:
    from .dicom_seg import SegWritten

#: Per-patient collapsing first looks at this many candidates per result (at least
#: MIN_CANDIDATES), four times more on each round until k cases are found or none are left.
CANDIDATES_PER_RESULT = 50
MIN_CANDIDATES = 500
#: ``query_together``: how much the mean of the ``unlike`` examples is subtracted from the
#: (unit) mean of the examples, before renormalising. 0.5: "less like that" steers the
#: answer without turning it into "the opposite of that".
UNLIKE_WEIGHT = 0.5
#: What a query answers instead of neighbours when its slice has no lungs or is not CT.
NO_LUNGS_WARNING = ("no lungs found in this picture (not a CT slice, or no lungs in view): "
                    "not searched")


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
    study_uid: str | None = None
    sop_uid: str | None = None  # DICOM SOP Instance UID, when known

    @property
    def url(self) -> str | None:
        """The WADO-RS URL of a slice indexed from a DICOMweb archive (its path), else None."""
        from .dicomweb import is_dicomweb_url

        return self.path if is_dicomweb_url(self.path) else None

    def to_json(self) -> dict:
        """The documented JSON object of ``query --json`` and the web API (``url`` only for
        slices indexed from a DICOMweb archive)."""
        url = {"url": self.url} if self.url else {}
        return {**asdict(self), "score": round(self.score, 6), **url}


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


@dataclass
class TogetherResult:
    """The answer to several examples searched together ("more like these, less like that")."""

    queries: list[CTSlice]
    unlike: list[CTSlice]
    neighbors: list[Neighbor]


def parse_filters(pairs: Iterable[str]) -> dict[str, str]:
    """``KEY=VALUE`` texts (the CLI's ``--where``, the web's comma-separated ``where``) as a
    filter for :meth:`Retriever.query`; key and value are stripped, a later key wins.

    Raises :class:`~lungcbir.errors.FilterError` for a text without ``=`` or with an empty key.

    Example:
        >>> parse_filters(["diagnosis = covid", "patient_id=P1"])
        {'diagnosis': 'covid', 'patient_id': 'P1'}
    """
    filters = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise FilterError(f"filter {pair!r}: expected KEY=VALUE")
        filters[key.strip()] = value.strip()
    return filters


def series_in_order(files: Sequence[tuple[str, Sequence[CTSlice]]]) -> list[CTSlice]:
    """The slices of one series or volume (each file with the slices read from it) in slice
    order: DICOM files by their position in the series (headers, not file names), then by frame;
    files without a position keep their order."""
    slices = [item for _, items in files for item in items]
    positions = dicom_series_positions([path for path, _ in files])
    return sorted(slices, key=lambda item: (positions.get(item.path, 0), item.frame))


def as_slice(image: str | os.PathLike | CTSlice | np.ndarray) -> CTSlice:
    """Accept a path, a :class:`CTSlice` or a 2-D array; a multi-slice file gives its first slice."""
    if isinstance(image, CTSlice):
        return image
    if isinstance(image, np.ndarray):
        if image.ndim != 2:
            raise ReadError("<array>", f"expected a 2-D array, got shape {image.shape}")
        return CTSlice(image, classify_intensity(image), "<array>", SourceFormat.ARRAY)
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
                 files_per_commit: int = FILES_PER_COMMIT, workers: int = 1,
                 settings: Settings | None = None) -> None:
        settings = Settings.from_environment() if settings is None else settings
        self.settings = settings  # the model's runtime, threads and cache too
        self.db_url = db_url or settings.db_url
        self.index_dir = index_dir or settings.index_dir
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
            self._model = LungModel.load(self.weights, self.device, settings=self.settings)
        return self._model

    def store(self, create: bool = True, read_only: bool | None = None) -> Store:
        """The store. ``create=False``: for reading; the database must exist, and the store is
        read-only (writes no index file) unless ``read_only=False`` (a server keeping its own
        index folder up to date). A writer asked for after a read-only store replaces it."""
        read_only = not create if read_only is None else read_only
        if self._store is None or (self._store.read_only and not read_only):
            self._store = Store(self.db_url, self.index_dir, create=create, read_only=read_only)
        return self._store

    def segment(self, image: str | os.PathLike | CTSlice | np.ndarray) -> np.ndarray:
        """Boolean lung mask at the image's own resolution."""
        return self.model.segment([as_slice(image)])[0].mask

    def segment_slices(self, slices: Sequence[CTSlice]) -> list[Segmentation]:
        """Masks, lung fractions and vectors for many slices (batched)."""
        return self.model.segment(slices, self.batch_size)

    def write_dicom_seg(self, slices: Sequence[CTSlice], out_path: str | os.PathLike,
                        masks: Sequence[np.ndarray] | None = None) -> SegWritten:
        """Write one DICOM series' masks as a DICOM SEG (segmenting it unless ``masks`` are given).

        See :func:`lungcbir.dicom_seg.write_dicom_seg`; raises ReadError or SegError.
        """
        from .dicom_seg import write_dicom_seg

        if masks is None:
            masks = [result.mask for result in self.segment_slices(slices)]
        return write_dicom_seg(slices, masks, out_path, self.model.model_id)

    def index_dataset(self, paths: Iterable[str | os.PathLike], labels: str | os.PathLike | dict | None = None,
                      exclude: Iterable[str] = (), wait: bool = False,
                      on_file: Callable[[str], None] | None = None,
                      on_total: Callable[[int], None] | None = None, study: str | None = None,
                      since: date | None = None, cache_dir: str | os.PathLike | None = None,
                      case_pattern: str | None = None,
                      claim_timeout: float = DEFAULT_CLAIM_TIMEOUT_S) -> IndexReport:
        """Index every image under ``paths``; already indexed files (same sha256) are skipped.

        A file whose content is no longer what its rows hold (changed, or swapped with another
        indexed file) is indexed again and its old rows are removed, the index following.

        A path starting with ``http://`` or ``https://`` is a DICOMweb service root: its CT
        series (of ``study`` only, or of studies dated ``since`` or later, when given) go into
        the database's indexing queue, and this run claims them one at a time, so runs on
        several machines against one database share the work (see :mod:`lungcbir.indexing`).
        A claimed series' instances whose SOP Instance UID is indexed with this model are not
        fetched at all; each row's path is the instance's WADO-RS URL (``cache_dir`` keeps a
        local copy of what is fetched). A series claimed by a run that stopped renewing its
        claim for ``claim_timeout`` seconds (it was killed) is taken over by another run.

        Each slice's patient and series come from DICOM, else the labels' ``patient_id`` /
        ``series_uid`` columns, else ``case_pattern`` (a regex whose first group is the
        patient, searched in the path relative to the indexed folder), else its folder when
        that holds the slices of one scan; see :mod:`lungcbir.identity`.

        Unreadable files are recorded in the report and indexing goes on. Rows are committed
        every :data:`FILES_PER_COMMIT` files, so an interrupted run keeps what it finished and
        a rerun completes it. One run at a time writes to an index folder: a second raises
        :class:`~lungcbir.errors.LockedError` or, with ``wait=True``, waits for the first.
        ``on_total`` may be called more than once: the total grows as series are claimed.
        """
        pattern = compile_case_pattern(case_pattern)  # a bad pattern fails before anything is read
        store = self.store()
        with store.write_lock(wait):
            indexer = Indexer(self.model, store, self.batch_size, self.files_per_commit, self.workers)
            return indexer.run(paths, labels, exclude, on_file, on_total, pattern, study, since, cache_dir,
                               claim_timeout)

    def query(self, image: str | os.PathLike | CTSlice | np.ndarray, k: int = 5,
              where: dict[str, str] | None = None, per_patient: int = 1,
              other_patients: bool = False, focus: Focus | str = DEFAULT_FOCUS) -> QueryResult:
        """Segment one slice and find the ``k`` most similar stored slices.

        ``where`` keeps only stored slices whose labels or metadata (``patient_id``,
        ``series_uid``, ``source_format``) equal the given values. ``per_patient`` returns at
        most that many slices of one patient (or series, or volume), so the top k are k
        different cases; 0 turns this off. ``other_patients`` drops every slice of the
        query's own patient: the patient of the stored copy of the query (same SHA-256),
        else the query's own patient id (DICOM); a query with neither drops nothing. ``focus``
        (anatomy, findings or balanced; :class:`lungcbir.focus.Focus`) says what "similar"
        means for a model whose vector has a findings part.
        """
        return self.query_slices([as_slice(image)], k, where, per_patient, other_patients, focus)[0]

    def query_together(self, examples: Sequence[str | os.PathLike | CTSlice | np.ndarray],
                       unlike: Sequence[str | os.PathLike | CTSlice | np.ndarray] = (), k: int = 5,
                       where: dict[str, str] | None = None, per_patient: int = 1, other_patients: bool = False,
                       unlike_weight: float = UNLIKE_WEIGHT, focus: Focus | str = DEFAULT_FOCUS) -> TogetherResult:
        """"More like these, less like that": one search with several examples.

        The query vector is the L2-normalised mean of the examples' vectors, minus
        ``unlike_weight`` times the L2-normalised mean of the ``unlike`` vectors, normalised
        again (:func:`together_vector`). The examples and the unlike slices themselves (when
        stored) are never returned; ``other_patients`` drops the patients of every example.
        """
        if not examples:
            raise LungCBIRError("give at least one example to search with")
        liked, disliked = [as_slice(item) for item in examples], [as_slice(item) for item in unlike]
        store = self._searchable_store()
        vectors = np.stack([r.vector for r in self.segment_slices(liked + disliked)])
        vector = together_vector(vectors[:len(liked)], vectors[len(liked):], unlike_weight)
        stored = store.records_with_content([(item.sha256, item.frame) for item in liked + disliked])
        excluded = {f"id:{record.id}" for records in stored.values() for record in records}
        if other_patients:
            for item in liked:
                excluded |= _own_cases(item, stored)
        neighbors = self._neighbors(store, vector[None], k, where, per_patient, [excluded], focus)[0]
        return TogetherResult(liked, disliked, neighbors)

    def stored_slice(self, image_id: int) -> CTSlice:
        """Read a stored image's slice back from its file (raises ReadError if it is gone)."""
        record = self.store(create=False).records([image_id]).get(image_id)
        if record is None:
            raise LungCBIRError(f"no stored image with id {image_id}")
        from .dicomweb import fetch_slice, is_dicomweb_url

        if is_dicomweb_url(record.path):  # indexed from a DICOMweb archive: fetch it from there
            return fetch_slice(record.path)
        return read_file(record.path, frame=record.frame)[0]

    def stored_masks(self, stored: Sequence[tuple[int, CTSlice]]) -> list[np.ndarray]:
        """Lung masks of stored slices, given as (row id, slice read back from its file).

        The mask kept in the row is used; the model runs (once, batched) only for rows without
        one (indexed before masks were kept) or whose file no longer has the stored size.
        """
        kept = self.store(create=False).masks([image_id for image_id, _ in stored])
        masks = [kept.get(image_id) for image_id, _ in stored]
        redo = [n for n, ((_, item), mask) in enumerate(zip(stored, masks)) if mask is None or mask.shape != item.shape]
        for n, segmentation in zip(redo, self.segment_slices([stored[n][1] for n in redo]) if redo else []):
            masks[n] = segmentation.mask
        return masks  # type: ignore[return-value]

    def neighbor_slices(self, neighbors: Sequence[Neighbor]) -> list[tuple[Neighbor, CTSlice, np.ndarray]]:
        """Each neighbour with its stored slice, read back from its file, and its lung mask
        (:meth:`stored_masks`); neighbours whose file is gone are left out."""
        found = []
        for neighbor in neighbors:
            try:
                found.append((neighbor, self.stored_slice(neighbor.id)))
            except LungCBIRError:
                continue  # the stored file is gone; the table still lists it
        masks = self.stored_masks([(neighbor.id, item) for neighbor, item in found])
        return [(neighbor, item, mask) for (neighbor, item), mask in zip(found, masks)]

    def resolve_filters(self, wanted: dict[str, list[str]]) -> dict[str, str | list[str]]:
        """Filter keys and values as typed by a person, matched to the stored ones
        case-insensitively (a value may match several stored spellings: all of them count).

        A key that is neither a stored label nor one of :data:`lungcbir.store.FILTER_COLUMNS`
        raises :class:`~lungcbir.errors.FilterError`, so a typing error does not pass for "no
        similar case". A key with one value maps to that value, with several to their sorted list.
        """
        if not wanted:
            return {}
        stored_labels = self.store(create=False).label_values()
        keys = {key.lower(): key for key in stored_labels}
        filters: dict[str, str | list[str]] = {}
        for key, values in wanted.items():
            if key.lower() in keys:
                real = keys[key.lower()]
                spellings: dict[str, list[str]] = {}
                for value in stored_labels[real]:
                    spellings.setdefault(value.lower(), []).append(value)
                matched = [s for v in values for s in spellings.get(v.lower(), [v])]
            elif key.lower() in FILTER_COLUMNS:
                real, matched = key.lower(), list(values)
            else:
                known = ", ".join([*stored_labels, *FILTER_COLUMNS])
                raise FilterError(f"unknown label key {key!r}; known keys: {known}")
            filters[real] = sorted(set(matched)) if len(set(matched)) > 1 else matched[0]
        return filters

    def query_series(self, slices: Sequence[CTSlice], k: int = 5, where: dict[str, str] | None = None,
                     pairs: int = 3, focus: Focus | str = DEFAULT_FOCUS) -> list[SeriesMatch]:
        """Rank stored cases by aggregated slice similarity to a whole query series or volume.

        For every query slice the best-matching slice of each stored case counts; a case's score
        is the mean of those best similarities over the query slices (0 where none was among
        the candidates), so cases that match along the whole series rank first.
        """
        answers = self.query_slices(slices, k=max(50, 10 * k), where=where, per_patient=0, focus=focus)
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
                     per_patient: int = 1, other_patients: bool = False,
                     focus: Focus | str = DEFAULT_FOCUS) -> list[QueryResult]:
        """:meth:`query` for many slices at once.

        A slice whose segmentation is ``no-lungs`` (not CT, or no lungs in view) is not
        searched: its result has no neighbours and a ``warning``; a confident list of
        "similar" lung slices for a screenshot would mislead.
        """
        if k < 1:
            raise LungCBIRError("k must be at least 1")
        store = self._searchable_store()
        results = self.segment_slices(slices)
        searched = [number for number, result in enumerate(results) if result.quality != Quality.NO_LUNGS]
        excluded: list[set[str]] = [set() for _ in searched]
        if other_patients and searched:
            stored = store.records_with_content([(slices[n].sha256, slices[n].frame) for n in searched])
            excluded = [_own_cases(slices[n], stored) for n in searched]
        found: dict[int, list[Neighbor]] = {}
        if searched:
            vectors = np.stack([results[n].vector for n in searched])
            found = dict(zip(searched, self._neighbors(store, vectors, k, where, per_patient, excluded, focus)))
        answers = []
        for number, (item, result) in enumerate(zip(slices, results)):
            answers.append(QueryResult(item, result.mask, result.lung_fraction, found.get(number, []),
                                       quality=result.quality, quality_score=result.quality_score,
                                       lesion_fraction=result.lesion_fraction,
                                       warning=None if number in found else NO_LUNGS_WARNING))
        return answers

    def _searchable_store(self) -> Store:
        store = self.store(create=False)
        if store.count() == 0:
            raise StoreError(f"no images are indexed in {safe_url(self.db_url)}; "
                             f"add some with `lungcbir index-dataset PATH`")
        if store.model_id not in (None, self.model.model_id):
            raise LungCBIRError(f"the database was indexed with model {store.model_id}, "
                                f"but the model in use is {self.model.model_id}: re-index the images with "
                                f"this model (`lungcbir index-dataset PATH` into a new --db and --index-dir), "
                                f"or query with the weights the database was indexed with (--weights)")
        return store

    def _neighbors(self, store: Store, vectors: np.ndarray, k: int, where: dict[str, str] | None,
                   per_patient: int, excluded: Sequence[set[str]],
                   focus: Focus | str = DEFAULT_FOCUS) -> list[list[Neighbor]]:
        """The k best stored slices per query vector (weighted for the search ``focus``) among the
        rows matching ``where`` (decided in the database), at most ``per_patient`` of one case,
        and without the rows and cases in ``excluded`` (``id:N`` and :func:`case_key` strings):
        the candidate list grows until k are found or the store is exhausted."""
        if k < 1:
            raise LungCBIRError("k must be at least 1")
        try:
            vectors = self.model.focused(vectors, focus)
        except ValueError as error:
            raise LungCBIRError(str(error)) from None
        allowed = store.ids_matching(where) if where else None
        collapsing = per_patient or any(excluded)
        fetch = max(k * CANDIDATES_PER_RESULT, MIN_CANDIDATES) if collapsing else k
        answers: list[list[Neighbor] | None] = [None] * len(vectors)
        pending = list(range(len(vectors)))
        while pending:
            scores, ids = store.search(vectors[pending], fetch, restrict_to=allowed)
            rows = store.records(np.unique(ids[ids >= 0]))
            exhausted = ids.shape[1] < fetch  # every (allowed) stored vector was a candidate
            still = []
            for number, row_scores, row_ids in zip(pending, scores, ids):
                neighbors = _collapse(row_scores, row_ids, rows, k, per_patient, excluded[number])
                if len(neighbors) == k or exhausted:
                    answers[number] = neighbors
                else:
                    still.append(number)
            pending, fetch = still, fetch * 4
        return answers  # type: ignore[return-value]


def _collapse(scores: np.ndarray, ids: np.ndarray, rows: dict[int, ImageRecord], k: int,
              per_patient: int, leave_out: set[str]) -> list[Neighbor]:
    """The first k candidates (best first) with at most ``per_patient`` of one case (0: any),
    none of the rows or cases in ``leave_out``."""
    neighbors: list[Neighbor] = []
    per_case: dict[str, int] = {}
    for score, identifier in zip(scores, ids):
        record = rows.get(int(identifier))
        if record is None:
            continue  # removed since the index was read
        if leave_out and (f"id:{record.id}" in leave_out or case_key(record) in leave_out):
            continue
        if len(neighbors) == k:
            break
        if per_patient:
            case = case_key(record)
            if per_case.get(case, 0) >= per_patient:
                continue
            per_case[case] = per_case.get(case, 0) + 1
        # a score is a (weighted) cosine; float16 vectors and float32 sums overshoot 1 slightly
        neighbors.append(Neighbor(rank=len(neighbors) + 1, id=record.id, path=record.path,
                                  score=float(np.clip(score, -1.0, 1.0)),
                                  patient_id=record.patient_id, series_uid=record.series_uid,
                                  slice_index=record.slice_index, labels=dict(record.labels or {}),
                                  study_uid=record.study_uid, sop_uid=record.sop_uid))
    return neighbors


def together_vector(examples: np.ndarray, unlike: np.ndarray | None = None,
                    unlike_weight: float = UNLIKE_WEIGHT) -> np.ndarray:
    """normalise(normalise(mean(examples)) - unlike_weight * normalise(mean(unlike))).

    Example:
        >>> [round(float(v), 3) for v in together_vector(np.array([[1.0, 0.0], [0.0, 1.0]]))]
        [0.707, 0.707]
        >>> [round(float(v), 3) for v in together_vector(np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([[0.0, 1.0]]))]
        [0.96, 0.281]
    """
    def unit(vector: np.ndarray) -> np.ndarray:
        return vector / max(float(np.linalg.norm(vector)), 1e-8)

    vector = unit(np.asarray(examples, np.float32).mean(0))
    if unlike is not None and len(unlike):
        vector = unit(vector - unlike_weight * unit(np.asarray(unlike, np.float32).mean(0)))
    return vector.astype(np.float32)


def _own_cases(item: CTSlice, stored: dict[tuple[str, int], list[ImageRecord]]) -> set[str]:
    """The cases (:func:`case_key`) a query slice belongs to: those of its stored copies, else
    its own patient id; empty when neither is known."""
    copies = stored.get((item.sha256, item.frame), []) if item.sha256 else []  # none stored without one
    if copies:
        return {case_key(record) for record in copies}
    return {f"patient:{item.patient_id}"} if item.patient_id else set()


def case_key(record: ImageRecord | Neighbor) -> str:
    """What counts as one case: the patient, else the series, else the file (a NIfTI volume)."""
    if record.patient_id:
        return f"patient:{record.patient_id}"
    if record.series_uid:
        return f"series:{record.series_uid}"
    return f"file:{record.path}"
