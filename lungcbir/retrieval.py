"""The Python API: index an archive, query a slice, segment a slice.

:class:`Retriever` ties the stages together (read -> model -> store) and is what the command
line and the web app call; they add nothing but parsing and formatting.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field
from datetime import date
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from .config import Settings
from .database import (
    FILTER_COLUMNS,
    ImageRecord,
    NeighborRow,
    StoredRegion,
    decode_vector,
    other_regions_message,
    safe_url,
)
from .errors import FilterError, LungCBIRError, NoRegionsError, ReadError, StoreError
from .focus import DEFAULT_FOCUS, Focus
from .identity import compile_case_pattern
from .indexing import FILES_PER_COMMIT, Indexer, IndexReport
from .inference import LungModel, Segmentation
from .io import CTSlice, SourceFormat, classify_intensity, dicom_series_positions, read_file
from .quality import Quality
from .regions import Region, region_bbox, region_model_id, region_of, region_vector
from .store import Store
from .work_queue import DEFAULT_CLAIM_TIMEOUT_S

if TYPE_CHECKING:
    from .dicom_seg import SegWritten
    from .region_rebuild import RegionRebuildReport

#: Per-patient collapsing first looks at this many candidates per result (at least
#: MIN_CANDIDATES), four times more on each round until k cases are found or none are left.
CANDIDATES_PER_RESULT = 50
MIN_CANDIDATES = 500
#: ``query_together``: how much the mean of the ``unlike`` examples is subtracted from the
#: (unit) mean of the examples, before renormalising. 0.5: "less like that" steers the
#: answer without turning it into "the opposite of that".
UNLIKE_WEIGHT = 0.5
#: A slice has a lung level (:func:`lung_levels`) when its lung area is at least this share of
#: the largest of its series: the apex and base slivers and the slices below the lungs have none.
LUNG_LEVEL_SHARE = 0.1
#: ... and at least this share of the slice (a series without lungs has no levels at all).
MIN_LUNG_FRACTION = 0.005
#: A query slice's pair in a case is the most similar of the case's slices within this much
#: relative lung level of it (the nearest in level when none is that near).
LEVEL_WINDOW = 0.06
#: A series query scores this many times k cases by aligned pairs: the best by the index's
#: candidates (the sum of each query slice's best similarity in the case).
CASES_SCORED_PER_RESULT = 4
#: Score percentiles (``Neighbor.percentile``) are taken among the pairs of at most this many
#: stored slices (a sample spread over the store).
PERCENTILE_SAMPLE = 1000
#: ... taken from at most this many rows (the first by id).
PERCENTILE_READ_LIMIT = 50_000

#: What a query answers instead of neighbours when its slice has no lungs or is not CT.
NO_LUNGS_WARNING = ("no lungs found in this picture (not a CT slice, or no lungs in view): "
                    "not searched")


@dataclass
class Neighbor:
    """One stored slice returned for a query."""

    rank: int
    id: int
    path: str
    score: float = field(metadata={"description": "cosine similarity to the query"})
    patient_id: str | None
    series_uid: str | None
    slice_index: int | None
    labels: dict[str, Any]
    study_uid: str | None = None
    sop_uid: str | None = field(default=None, metadata={"description": "DICOM SOP Instance UID, when known"})
    anatomy_score: float | None = field(default=None, metadata={
        "description": "cosine similarity of the anatomy parts (lung level, body shape); null: a model "
                       "without a findings part, whose score is all anatomy"})
    findings_score: float | None = field(default=None, metadata={
        "description": "cosine similarity of the findings parts (kind and amount of disease); null: a model "
                       "without a findings part"})
    percentile: float | None = field(default=None, metadata={
        "description": "0-100: the share of pairs of stored slices (a sample) less similar than this pair, "
                       "with the same focus: 99 = among the 1 % most alike; region queries: of pairs of "
                       "stored regions, as a region's score runs otherwise"})
    level: float | None = field(default=None, metadata={
        "description": "relative lung level of the stored slice in its series (0 = first slice with lungs, "
                       "1 = last; series order); null when unknown or outside the lungs"})
    copies: list[dict[str, Any]] = field(default_factory=list, metadata={
        "description": "other stored files of the same pixels (same vector): [{id, path}]; they are not "
                       "listed again; region queries: the slices (id, path) holding the same region of "
                       "those pixels (same box, same region vector)"})
    region: dict[str, Any] | None = field(default=None, metadata={
        "description": "region queries: the stored region that matched, {id, bbox: [x0, y0, x1, y1] (pixels of "
                       "the stored slice, x1 and y1 exclusive), area (pixels), source: mask or lesion}; "
                       "absent for slice queries"})

    @property
    def url(self) -> str | None:
        """The WADO-RS URL of a slice indexed from a DICOMweb archive (its path), else None."""
        from .dicomweb import is_dicomweb_url

        return self.path if is_dicomweb_url(self.path) else None

    def to_json(self) -> dict:
        """The documented JSON object of ``query --json`` and the web API (``url`` only for
        slices indexed from a DICOMweb archive)."""
        url = {"url": self.url} if self.url else {}
        fields = asdict(self)
        if fields["region"] is None:
            del fields["region"]
        for key in ("anatomy_score", "findings_score", "level"):
            fields[key] = None if fields[key] is None else round(fields[key], 4)
        if self.percentile is not None:
            fields["percentile"] = round(self.percentile, 1)
        return {**fields, "score": round(self.score, 6), **url}


@dataclass
class SeriesPair:
    """A query slice and the stored slice of a case that matched it best."""

    query_slice: int  # the query slice's number in the series (slice order)
    query_path: str
    neighbor: Neighbor  # its ``level``: the stored slice's
    query_level: float | None = None  # relative lung level of the query slice (lung_levels)

    @property
    def level_difference(self) -> float | None:
        """Stored minus query level; None when either is unknown."""
        level = self.neighbor.level
        return None if level is None or self.query_level is None else level - self.query_level

    def to_json(self) -> dict:
        """A pair of ``query --by-series --json``: the query slice, then the neighbour's fields."""
        difference = self.level_difference
        return {"query_slice": self.query_slice, "query_path": self.query_path,
                "query_level": None if self.query_level is None else round(self.query_level, 4),
                "level_difference": None if difference is None else round(difference, 4), **self.neighbor.to_json()}


@dataclass
class SeriesMatch:
    """A stored case ranked by how well its slices match a query series."""

    rank: int
    case: str  # patient, series or volume
    patient_id: str | None
    series_uid: str | None
    score: float = field(metadata={"description": "mean over the query slices with lungs of their level-aligned "
                                                  "pair's similarity in this case"})
    pairs: list[SeriesPair]  # best first
    aligned: list[SeriesPair] = field(default_factory=list)  # every query slice with lungs, in slice order
    labels: dict[str, Any] = field(default_factory=dict)  # of the case's best pair

    def to_json(self) -> dict:
        """A case of ``query --by-series --json`` and of the web API (``aligned``: query slice
        number to the id of its stored slice, for viewers that scroll both series together)."""
        return {"rank": self.rank, "case": self.case, "patient_id": self.patient_id, "series_uid": self.series_uid,
                "score": round(self.score, 6), "labels": self.labels,
                "pairs": [pair.to_json() for pair in self.pairs],
                "aligned": [{"query_slice": pair.query_slice, "id": pair.neighbor.id,
                             "query_level": None if pair.query_level is None else round(pair.query_level, 4),
                             "level": None if pair.neighbor.level is None else round(pair.neighbor.level, 4)}
                            for pair in self.aligned]}


@dataclass
class SeriesResult:
    """The answer to a whole query series: each slice's segmentation and level, the ranked cases."""

    slices: list[QueryResult]  # in slice order; no neighbours (the cases hold the pairs)
    levels: list[float | None]  # relative lung level of each query slice (lung_levels)
    matches: list[SeriesMatch]
    note: str | None = None  # why fewer than k cases, or why nothing was searched

    def label_summary(self) -> dict[str, dict[str, int]]:
        """The cases' labels counted (:func:`label_summary` of each case's best pair)."""
        return label_summary([match.labels for match in self.matches])


@dataclass
class QueryResult:
    """The answer to one query slice."""

    query: CTSlice
    segmentation: Segmentation  # of the query slice (mask, lung and lesion fractions, quality)
    neighbors: list[Neighbor]
    warning: str | None = None  # set when the query was not searched (quality no-lungs)
    #: set when fewer than k neighbours came back, and why; for a region query also when an
    #: unfinished rebuild-regions leaves slices whose regions are not searched
    note: str | None = None
    region: np.ndarray | None = None  # a region query's region (bool, the slice's size); neighbours are regions

    @property
    def mask(self) -> np.ndarray:
        return self.segmentation.mask

    @property
    def lung_fraction(self) -> float:
        return self.segmentation.lung_fraction

    @property
    def lesion_fraction(self) -> float | None:
        return self.segmentation.lesion_fraction

    @property
    def quality(self) -> Quality:
        return self.segmentation.quality

    @property
    def quality_score(self) -> float:
        return self.segmentation.quality_score

    def summary_json(self) -> dict:
        """The per-query fields of ``query --json`` and the web API: the segmentation's
        (:meth:`Segmentation.summary_json`) and ``warning`` only when set."""
        fields = self.segmentation.summary_json()
        if self.region is not None:
            fields["region"] = {"bbox": list(region_bbox(self.region)), "area": int(self.region.sum())}
        if self.warning:
            fields["warning"] = self.warning
        if self.note:
            fields["note"] = self.note
        return {**fields, "label_summary": self.label_summary()}

    def label_summary(self) -> dict[str, dict[str, int]]:
        """The neighbours' labels counted (:func:`label_summary`)."""
        return label_summary([neighbor.labels for neighbor in self.neighbors])


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


def label_summary(labels: Iterable[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """How often each label value occurs among answers ({key: {value: count}}, most frequent
    first), so "6 of 8: diagnosis COVID-19" can be read off at once.

    Example:
        >>> label_summary([{"diagnosis": "COVID-19"}, {"diagnosis": "COVID-19"}, {"diagnosis": "normal"}, {}])
        {'diagnosis': {'COVID-19': 2, 'normal': 1}}
    """
    counts: dict[str, dict[str, int]] = {}
    for item in labels:
        for key, value in (item or {}).items():
            values = counts.setdefault(key, {})
            values[str(value)] = values.get(str(value), 0) + 1
    return {key: dict(sorted(values.items(), key=lambda pair: (-pair[1], pair[0])))
            for key, values in sorted(counts.items())}


def has_lungs(lung_fractions: Sequence[float]) -> list[bool]:
    """Which slices of one series take part in level matching: lungs at least
    :data:`LUNG_LEVEL_SHARE` of the series' largest and :data:`MIN_LUNG_FRACTION` of the slice."""
    largest = max(lung_fractions, default=0.0)
    return [fraction >= max(LUNG_LEVEL_SHARE * largest, MIN_LUNG_FRACTION) for fraction in lung_fractions]


def lung_levels(lung_fractions: Sequence[float]) -> list[float | None]:
    """The relative lung level of each slice of one series, given in slice order by its lung
    fraction: 0 at the first slice with lungs (:func:`has_lungs`), 1 at the last, by position
    in between; None for slices without lungs (below or above the lungs, or not CT) and for a
    series with fewer than two slices with lungs (no level to speak of). The levels of two
    series compare when both are in the same order (DICOM: by position along the slice normal).

    Example:
        >>> lung_levels([0.0, 0.1, 0.3, 0.2, 0.25, 0.01])
        [None, 0.0, 0.333, 0.667, 1.0, None]
    """
    lungs = has_lungs(lung_fractions)
    inside = [number for number, ok in enumerate(lungs) if ok]
    if len(inside) < 2:
        return [None] * len(lung_fractions)
    first, last = inside[0], inside[-1]
    return [round((number - first) / (last - first), 3) if ok else None for number, ok in enumerate(lungs)]


def level_pairs(query_levels: Sequence[float | None], query_lungs: Sequence[bool],
                stored_levels: Sequence[float | None], stored_lungs: Sequence[bool],
                scores: np.ndarray, window: float = LEVEL_WINDOW) -> list[int | None]:
    """For each query slice, the stored slice it is paired with (its index), or None.

    ``scores[q, s]`` is the similarity of query slice q and stored slice s. A slice without
    lungs (``*_lungs`` False, :func:`has_lungs`) is never paired. A query slice with a level is
    paired with the most similar stored slice within ``window`` of its level (the nearest in
    level when none is that near); where either side has no levels (a single slice), with the
    most similar stored slice with lungs.

    Example:
        >>> level_pairs([0.0, 0.5, None], [True, True, False], [0.0, 0.48, 1.0], [True] * 3,
        ...             np.array([[0.5, 0.9, 0.1]] * 3))
        [0, 1, None]
    """
    levelled = [s for s, level in enumerate(stored_levels) if level is not None and stored_lungs[s]]
    usable = [s for s, ok in enumerate(stored_lungs) if ok]
    answer: list[int | None] = []
    for number, (level, lungs) in enumerate(zip(query_levels, query_lungs)):
        if not lungs or not usable:
            answer.append(None)
            continue
        candidates = usable
        if level is not None and levelled:
            gaps = {s: abs(stored_levels[s] - level) for s in levelled}  # type: ignore[operator]
            candidates = [s for s in levelled if gaps[s] <= window] or [min(levelled, key=lambda s: gaps[s])]
        answer.append(max(candidates, key=lambda s: scores[number, s]))
    return answer


def series_in_order(files: Sequence[tuple[str, Sequence[CTSlice]]]) -> list[CTSlice]:
    """The slices of one series or volume (each file with the slices read from it) in slice
    order: DICOM files by their position in the series (headers, not file names), then by frame;
    files without a position keep their order."""
    slices = [item for _, items in files for item in items]
    positions = dicom_series_positions([path for path, _ in files])
    return sorted(slices, key=lambda item: (positions.get(item.path, 0), item.frame))


def as_slice(image: str | os.PathLike | CTSlice | np.ndarray, max_voxels: int | None = None) -> CTSlice:
    """Accept a path, a :class:`CTSlice` or a 2-D array; a multi-slice file gives its first slice."""
    if isinstance(image, CTSlice):
        return image
    if isinstance(image, np.ndarray):
        if image.ndim != 2:
            raise ReadError("<array>", f"expected a 2-D array, got shape {image.shape}")
        return CTSlice(image, classify_intensity(image), "<array>", SourceFormat.ARRAY)
    return read_file(image, max_voxels=max_voxels)[0]


class Retriever:
    """Index CT slices and find the most similar stored ones.

    Example:
        >>> import tempfile
        >>> from lungcbir.phantom import write_phantom
        >>> folder = tempfile.mkdtemp()
        >>> _ = write_phantom(folder, slices=4, size=64, patients=2)
        >>> retriever = Retriever(db_url=f"sqlite:///{folder}/db.sqlite", index_dir=f"{folder}/index")
        >>> report = retriever.index_dataset([f"{folder}/dicom"])
        >>> result = retriever.query(f"{folder}/png/phantom02/phantom02_s002.png", k=2)
        >>> sorted(n.patient_id for n in result.neighbors), result.mask.shape   # one slice per patient
        (['PHANTOM01', 'PHANTOM02'], (64, 64))
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
        self._pair_cache: dict[tuple, np.ndarray] = {}  # _reference's last answer of each kind

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
        return self.model.segment([as_slice(image, self.settings.max_voxels)])[0].mask

    def segment_slices(self, slices: Sequence[CTSlice]) -> list[Segmentation]:
        """Masks, lung fractions and vectors for many slices (batched)."""
        return self.model.segment(slices, self.batch_size)

    def write_dicom_seg(self, slices: Sequence[CTSlice], out_path: str | os.PathLike,
                        masks: Sequence[np.ndarray] | None = None,
                        lesions: Sequence[np.ndarray | None] | None = None,
                        headers: Sequence | None = None) -> SegWritten:
        """Write one DICOM series' masks as a DICOM SEG (segmenting it unless ``masks`` are given):
        segment "Lung" and, when ``lesions`` are given (a model with a lesion output), segment
        "Lesion" (as ``query --out`` writes it). ``headers``: the slices' DICOM headers when
        their files are not at hand; slices fetched from a DICOMweb archive (``path`` their
        WADO-RS URL) have theirs fetched again from it when not given.

        See :func:`lungcbir.dicom_seg.write_dicom_seg`; raises ReadError or SegError.
        """
        from .dicom_seg import SegmentKind, write_dicom_seg
        from .dicomweb import DicomwebSource, is_dicomweb_url, parse_instance_url

        if headers is None and slices and all(is_dicomweb_url(item.path) for item in slices):
            # in memory only (pixels): there is no file to read the headers from
            headers = DicomwebSource(parse_instance_url(slices[0].path).root).headers([item.path for item in slices])
        if masks is None:
            masks = [result.mask for result in self.segment_slices(slices)]
        if lesions is None or any(lesion is None for lesion in lesions):
            return write_dicom_seg(slices, masks, out_path, self.model.model_id, headers)
        segments = {SegmentKind.LUNG: list(masks),
                    SegmentKind.LESION: [lesion for lesion in lesions if lesion is not None]}
        return write_dicom_seg(slices, segments, out_path, self.model.model_id, headers)

    def index_dataset(self, paths: Iterable[str | os.PathLike], labels: str | os.PathLike | dict | None = None,
                      exclude: Iterable[str] = (), wait: bool = False,
                      on_file: Callable[[str], None] | None = None,
                      on_total: Callable[[int], None] | None = None, study: str | None = None,
                      since: date | None = None, cache_dir: str | os.PathLike | None = None,
                      case_pattern: str | None = None,
                      claim_timeout: float = DEFAULT_CLAIM_TIMEOUT_S,
                      regions: str | os.PathLike | None = None, lesion_regions: bool = True) -> IndexReport:
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

        ``regions``: a folder of region masks (PNG, TIFF or NIfTI; the images' paths relative to
        the folder they were found in; non-zero = region): each connected region of a slice is
        stored as a region with its own vector (:func:`lungcbir.regions.region_vector`), for
        :meth:`query` with ``region=``. An image without a mask is indexed without marked regions
        (``report.warnings``); one whose mask is unreadable or of another size is not indexed
        (``report.failures``, naming the mask). ``lesion_regions`` (on by default; a model
        with a lesion output): the lesions the model finds, of at least
        :data:`~lungcbir.regions.LESION_REGION_MIN_PIXELS` pixels at its input, are stored as
        regions too (source "lesion"), so that region queries find lesions nobody marked.
        Regions are stored with their slice: a slice indexed before is not given regions again
        (:meth:`rebuild_regions` gives every stored slice its regions again).

        Example:
            >>> import tempfile
            >>> from lungcbir.phantom import write_phantom
            >>> folder = tempfile.mkdtemp()
            >>> _ = write_phantom(folder, slices=2, size=64, patients=1)
            >>> retriever = Retriever(db_url=f"sqlite:///{folder}/db.sqlite", index_dir=f"{folder}/index")
            >>> report = retriever.index_dataset([f"{folder}/png"], regions=f"{folder}/masks")
            >>> report.indexed, report.regions > 0, report.failures
            (2, True, [])
        """
        pattern = compile_case_pattern(case_pattern)  # a bad pattern fails before anything is read
        store = self.store()
        with store.write_lock(wait):
            indexer = Indexer(self.model, store, self.batch_size, self.files_per_commit, self.workers,
                              self.settings.max_voxels, lesion_regions)
            return indexer.run(paths, labels, exclude, on_file, on_total, pattern, study, since, cache_dir,
                               claim_timeout, regions)

    def rebuild_regions(self, regions: str | os.PathLike | None = None, lesion_regions: bool = True,
                        wait: bool = False, on_slice: Callable[[str], None] | None = None,
                        on_total: Callable[[int], None] | None = None) -> RegionRebuildReport:
        """Make every stored slice's regions again with the model and region recipe in use, in
        place: the slices' rows and their index are not touched (see :mod:`lungcbir.region_rebuild`).

        What a store of regions of an earlier recipe needs before it answers region queries
        again, and how slices indexed without regions get them. Each slice is read again from
        its file (or DICOMweb archive) and must be unchanged (same SHA-256): a file gone,
        unreadable or changed is one line of ``report.warnings`` and its slices keep their
        regions when they are of the recipe in use, else lose them (they cannot be searched).
        Marked regions (source "mask") come from ``regions``, a folder of region masks as
        :meth:`index_dataset` takes it (each image's path relative to any folder above it; a
        slice without a usable mask there keeps its stored ones), else from the masks stored
        with the slices; the lesions the model finds (source "lesion") are stored unless
        ``lesion_regions`` is False. A run that stops half way leaves a store that answers from
        the slices rebuilt so far (and says so); a rerun finishes it. One run at a time writes
        to an index folder (``wait``: as :meth:`index_dataset`). Raises
        :class:`~lungcbir.errors.StoreError` when the slices were indexed with another model
        (re-index them instead) or the database does not exist.

        Example:
            >>> import tempfile
            >>> from lungcbir.phantom import write_phantom
            >>> folder = tempfile.mkdtemp()
            >>> _ = write_phantom(folder, slices=2, size=64, patients=1)
            >>> retriever = Retriever(db_url=f"sqlite:///{folder}/db.sqlite", index_dir=f"{folder}/index")
            >>> _ = retriever.index_dataset([f"{folder}/png"])   # indexed without marked regions
            >>> report = retriever.rebuild_regions(regions=f"{folder}/masks")
            >>> report.rebuilt, report.regions["mask"] > 0, report.warnings
            (2, True, [])
        """
        from .region_rebuild import RegionRebuilder

        store = self.store(create=False, read_only=False)
        with store.write_lock(wait):
            rebuilder = RegionRebuilder(self.model, store, self.batch_size, self.files_per_commit, self.workers,
                                        self.settings.max_voxels, lesion_regions)
            return rebuilder.run(regions, on_slice, on_total)

    def query(self, image: str | os.PathLike | CTSlice | np.ndarray, k: int = 5,
              where: dict[str, str] | None = None, per_patient: int = 1,
              other_patients: bool = False, focus: Focus | str = DEFAULT_FOCUS,
              region: Region | None = None) -> QueryResult:
        """Segment one slice and find the ``k`` most similar stored slices.

        ``where`` keeps only stored slices whose labels or metadata (``patient_id``,
        ``series_uid``, ``source_format``) equal the given values. ``per_patient`` returns at
        most that many slices of one patient (or series, or volume), so the top k are k
        different cases; 0 turns this off. ``other_patients`` drops every slice of the
        query's own patient: the patient of the stored copy of the query (same SHA-256),
        else the query's own patient id (DICOM); a query with neither drops nothing. ``focus``
        (anatomy, findings or balanced; :class:`lungcbir.focus.Focus`) says what "similar"
        means for a model whose vector has a findings part.

        ``region`` (a :class:`~lungcbir.regions.RegionBox` in pixels of the image, or a boolean
        mask of its size) searches the stored regions instead of the slices (see
        :meth:`query_region`); a box outside the image or empty, or a mask of another size or
        empty, raises :class:`~lungcbir.errors.RegionError`.

        Example:
            >>> import tempfile
            >>> from lungcbir.phantom import write_phantom
            >>> from lungcbir.regions import RegionBox
            >>> folder = tempfile.mkdtemp()
            >>> _ = write_phantom(folder, slices=2, size=64, patients=2)
            >>> retriever = Retriever(db_url=f"sqlite:///{folder}/db.sqlite", index_dir=f"{folder}/index")
            >>> _ = retriever.index_dataset([f"{folder}/png"], regions=f"{folder}/masks")
            >>> result = retriever.query(f"{folder}/png/phantom01/phantom01_s001.png", k=2,
            ...                          region=RegionBox(10, 15, 30, 45), per_patient=0)
            >>> [sorted(n.region) for n in result.neighbors][0]
            ['area', 'bbox', 'id', 'source']
        """
        item = as_slice(image, self.settings.max_voxels)
        if region is not None:
            return self.query_region(item, region, k, where, per_patient, other_patients)
        return self.query_slices([item], k, where, per_patient, other_patients, focus)[0]

    def query_region(self, image: str | os.PathLike | CTSlice | np.ndarray, region: Region, k: int = 5,
                     where: dict[str, str] | None = None, per_patient: int = 1,
                     other_patients: bool = False) -> QueryResult:
        """The ``k`` stored regions most like ``region`` of ``image`` (marked regions and lesions
        the model found; :meth:`index_dataset`): each neighbour is the slice holding the region,
        with the region in ``Neighbor.region``. The region is described by
        :func:`~lungcbir.regions.region_vector` from the query slice's one forward pass.
        ``where``, ``per_patient`` and ``other_patients`` are those of :meth:`query`, judged on
        the regions' slices (``per_patient``: at most that many regions of one case). As for
        slices, the same region on stored copies of the same pixels comes once (the others in
        ``Neighbor.copies``), and each neighbour has its score's ``percentile``, among pairs of
        stored regions.
        """
        if k < 1:
            raise LungCBIRError("k must be at least 1")
        item = as_slice(image, self.settings.max_voxels)
        mask = region_of(region, item.shape)  # a bad region fails before the model runs
        store = self._searchable_store()
        regions = store.database.regions
        wanted = region_model_id(self.model.model_id)
        pending = regions.pending_slices()  # slices an unfinished rebuild-regions has not reached
        if regions.is_empty():
            # the slices are stored: index-dataset would skip them as already indexed
            advice = ("give the stored slices regions with `lungcbir rebuild-regions --regions MASKS` (marked "
                      "regions; without --regions, the lesions a model with a lesion output finds)")
            if pending:
                advice = (f"the regions of {pending} slice(s) are being made again: run `lungcbir rebuild-regions` "
                          f"(again) to finish")
            raise NoRegionsError(f"no regions are stored in {safe_url(self.db_url)}; {advice}",
                                 f"no regions are stored here; {advice}")
        if regions.model_id not in (None, wanted):  # none this version can search: as if none were stored
            message = other_regions_message(regions.model_id, wanted)
            raise NoRegionsError(message, message)
        result = self.model.segment([item], self.batch_size, keep_maps=True)[0]
        if result.quality == Quality.NO_LUNGS or result.maps is None:
            return QueryResult(item, result, [], warning=NO_LUNGS_WARNING, region=mask)
        centre = self.model.settings.centre
        vector = region_vector(result.maps, mask, None if centre is None else np.asarray(centre),
                               self.model.settings.preprocess.hu_window)
        excluded: set[str] = set()
        if other_patients:
            excluded = _own_cases(item, store.records_with_content([(item.sha256, item.frame)]))
        neighbors = self._region_neighbors(store, vector, k, where, per_patient, excluded)
        note = None
        if len(neighbors) < k:
            note = (f"{len(neighbors)} of {k} results: only {len(neighbors)} "
                    f"{'cases with regions' if per_patient else 'stored regions'}"
                    f"{' match the filter' if where else ' are stored'}"
                    f"{' apart from the query patient' if other_patients else ''}"
                    f"{f' ({per_patient} region(s) per patient: per_patient 0 for more)' if per_patient else ''}")
        if pending:
            unfinished = (f"the regions of {pending} slice(s) are not searched: `lungcbir rebuild-regions` has not "
                          f"made them again yet (run it again to finish)")
            note = f"{note}; {unfinished}" if note else unfinished
        return QueryResult(item, result, neighbors, note=note, region=mask)

    def _region_neighbors(self, store: Store, vector: np.ndarray, k: int, where: dict[str, str] | None,
                          per_patient: int, excluded: set[str]) -> list[Neighbor]:
        """The k best stored regions for a region vector among the regions of the slices matching
        ``where``, at most ``per_patient`` of one case and none of the cases in ``excluded``: the
        candidate list grows until k are found or the regions are exhausted. The same region on
        stored copies of the same pixels comes once, listing the others (``copies``; see
        :func:`_region_candidates`), as a slice query's copies do; each neighbour has its score's
        percentile among pairs of stored regions."""
        regions = store.database.regions
        allowed = regions.ids_of_images(store.ids_matching(where)) if where else None
        fetch = _first_fetch(k, bool(per_patient or excluded))
        while True:
            scores, ids = store.search_regions(vector[None], fetch, restrict_to=allowed)
            hits = ids[0][ids[0] >= 0]
            found = regions.read(hits)
            vectors = {int(number): stored for numbers, chunk in regions.vectors_of(hits)
                       for number, stored in zip(numbers, chunk)}
            rows = store.neighbor_rows({region.image_id for region in found.values()})
            neighbors = _collapse(_region_candidates(scores[0], ids[0], found, vectors, rows), k, per_patient,
                                  excluded)
            if len(neighbors) == k or ids.shape[1] < fetch:
                break
            fetch *= 4
        if neighbors:
            reference = self._region_pair_scores(store)
            for neighbor in neighbors:
                neighbor.percentile = _percentile(reference, neighbor.score)
        return neighbors

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
        liked, disliked = [as_slice(item, self.settings.max_voxels) for item in examples], \
            [as_slice(item, self.settings.max_voxels) for item in unlike]
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
        return read_file(record.path, frame=record.frame, max_voxels=self.settings.max_voxels)[0]

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

    def lesion_masks(self, slices: Sequence[CTSlice]) -> list[np.ndarray | None]:
        """The lesion maps of slices (the model runs, batched: rows keep no lesion map); None for
        each without a lesion output, and no model run at all then."""
        if not slices or not self.model.has_lesion_head:
            return [None] * len(slices)
        return [result.lesion_mask for result in self.segment_slices(slices)]

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

    def stored_region(self, region_id: int) -> tuple[StoredRegion, np.ndarray | None] | None:
        """A stored region by id and its own mask inside its box (None when it has none kept);
        None when no such region is stored (or it was removed)."""
        regions = self.store(create=False).database.regions
        found = regions.read([region_id]).get(region_id)
        return None if found is None else (found, regions.masks([region_id]).get(region_id))

    def region_masks(self, neighbors: Sequence[Neighbor]) -> dict[int, np.ndarray]:
        """The stored masks (inside their boxes) of region neighbours' regions, by region id."""
        ids = [n.region["id"] for n in neighbors if n.region is not None]
        return self.store(create=False).database.regions.masks(ids) if ids else {}

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
                     pairs: int = 3, focus: Focus | str = DEFAULT_FOCUS,
                     other_patients: bool = False) -> SeriesResult:
        """Rank stored cases against a whole query series or volume (its slices in slice order),
        pairing slices by lung level.

        Each query slice with lungs has a relative lung level (:func:`lung_levels`: 0 at the
        first slice with lungs, 1 at the last); slices without lungs (below or above the lungs,
        not CT) take no part. The index proposes candidate cases (each query slice's nearest
        stored slices); in each candidate series every query slice is paired with the stored
        slice at its level (:func:`level_pairs`), and a case's score is the mean similarity of
        its aligned pairs over the query slices with lungs (its best series). ``pairs``: the
        best aligned pairs shown per case; ``other_patients`` leaves out the cases of the
        query's own patient(s) (as :meth:`query`). Raises :class:`LungCBIRError` when the
        slices are of several patients or DICOM series: they are not one series.
        """
        if k < 1:
            raise LungCBIRError("k must be at least 1")
        check_one_series(slices)
        store = self._searchable_store()
        segmentations = self.segment_slices(slices)
        fractions = [0.0 if seg.quality == Quality.NO_LUNGS else seg.lung_fraction for seg in segmentations]
        lungs, levels = has_lungs(fractions), lung_levels(fractions)
        results = [QueryResult(item, seg, [], warning=None if ok else NO_LUNGS_WARNING)
                   for item, seg, ok in zip(slices, segmentations, lungs)]
        searched = [number for number, ok in enumerate(lungs) if ok]
        if not searched:
            return SeriesResult(results, levels, [], note=f"no lungs found in any of the {len(slices)} slice(s) "
                                                         "(not CT, or no lungs in view): not searched")
        try:
            focused = self.model.focused(np.stack([segmentations[n].vector for n in searched]), focus)
        except ValueError as error:
            raise LungCBIRError(str(error)) from None
        excluded: set[str] = set()
        if other_patients:
            stored = store.records_with_content([(slices[n].sha256, slices[n].frame) for n in searched])
            for number in searched:
                excluded |= _own_cases(slices[number], stored)
        candidates = self._neighbors(store, np.stack([segmentations[n].vector for n in searched]),
                                     max(50, 10 * k), where, 0, [excluded] * len(searched), focus)
        # the cases worth aligning: those whose slices the index found nearest, summed over the query
        totals: dict[str, float] = {}
        series_of: dict[str, dict[str, int]] = {}  # case -> series key -> a member id
        for answer in candidates:
            best: dict[str, float] = {}
            for neighbor in answer:
                case = case_key(neighbor)
                best[case] = max(best.get(case, -1.0), neighbor.score)
                series_of.setdefault(case, {}).setdefault(_series_key(neighbor), neighbor.id)
            for case, score in best.items():
                totals[case] = totals.get(case, 0.0) + score
        chosen = sorted(totals, key=lambda case: -totals[case])[:CASES_SCORED_PER_RESULT * k]
        allowed = set(store.ids_matching(where).tolist()) if where else None
        members = {key: [i for i in self.series_members(first) if allowed is None or i in allowed]
                   for case in chosen for key, first in series_of[case].items()}
        rows = store.records({i for ids in members.values() for i in ids})
        scored: list[tuple[float, str, list[SeriesPair]]] = []
        for case in chosen:
            best_series: tuple[float, list[SeriesPair]] | None = None
            for key in series_of[case]:
                series_rows = [rows[i] for i in members[key] if i in rows]
                if not series_rows:
                    continue
                stored_fractions = [row.lung_fraction for row in series_rows]
                stored_lungs, stored_levels = has_lungs(stored_fractions), lung_levels(stored_fractions)
                vectors = np.stack([decode_vector(row.vector) for row in series_rows])
                similarity = np.clip(focused @ vectors.T, -1.0, 1.0)
                chosen_pairs = level_pairs([levels[n] for n in searched], [True] * len(searched),
                                           stored_levels, stored_lungs, similarity)
                aligned = []
                for row_number, (number, at) in enumerate(zip(searched, chosen_pairs)):
                    if at is None:
                        continue
                    neighbor = _neighbor(series_rows[at], float(similarity[row_number, at]), 0)
                    neighbor.level = stored_levels[at]
                    aligned.append(SeriesPair(number, slices[number].path, neighbor, levels[number]))
                total = sum(pair.neighbor.score for pair in aligned) / len(searched)
                if best_series is None or total > best_series[0]:
                    best_series = (total, aligned)
            if best_series is not None and best_series[1]:
                scored.append((best_series[0], case, best_series[1]))
        scored.sort(key=lambda item: -item[0])
        matches = []
        for rank, (score, case, aligned) in enumerate(scored[:k], 1):
            top = sorted(aligned, key=lambda pair: -pair.neighbor.score)[:pairs]
            for number, pair in enumerate(top, 1):
                pair.neighbor.rank = number
            example = top[0].neighbor
            matches.append(SeriesMatch(rank, case, example.patient_id, example.series_uid, score, top, aligned,
                                       dict(example.labels)))
        shown = [pair for match in matches for pair in match.pairs]
        self._explain(store, np.stack([segmentations[p.query_slice].vector for p in shown]) if shown
                      else np.zeros((0, 1), np.float32), [[p.neighbor] for p in shown], focus)
        note = None
        if len(matches) < k:
            note = (f"{len(matches)} of {k} cases: no other stored case "
                    f"{'matches the filter' if where else 'has slices with lungs'}"
                    f"{' (the query patient left out)' if other_patients else ''}")
        return SeriesResult(results, levels, matches, note)

    def stored_levels(self, ids: Sequence[int]) -> list[float | None]:
        """The relative lung levels (:func:`lung_levels`) of the stored slices of one series,
        given in slice order (:meth:`series_members`)."""
        rows = self.store(create=False).records(ids)
        return lung_levels([rows[i].lung_fraction if i in rows else 0.0 for i in ids])

    def series_members(self, image_id: int) -> list[int]:
        """Ids of the stored slices of ``image_id``'s series (or volume), in slice order: its
        DICOM series, else its file's frames, else, for slices whose identity gives a patient but
        no series (a ``--case-pattern`` without a series group), the patient's slices without a
        series, by slice position and then file name (numbers in names compared as numbers)."""
        store = self.store(create=False)
        ids = store.series_members(image_id)
        if len(ids) > 1:
            return ids
        record = store.records([image_id]).get(image_id)
        if record is None or record.series_uid or not record.patient_id:
            return ids
        mates = [row for row in store.records(store.ids_matching({"patient_id": record.patient_id})).values()
                 if not row.series_uid and row.model_id == record.model_id]
        mates.sort(key=lambda row: (row.slice_index is None, row.slice_index or 0, _natural(row.path), row.frame,
                                    row.id))
        return [row.id for row in mates] or ids

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
            neighbors = found.get(number, [])
            note = None
            if number in found and len(neighbors) < k:  # say why, rather than look like a short list
                note = (f"{len(neighbors)} of {k} results: only {len(neighbors)} "
                        f"{'cases' if per_patient else 'stored slices'}"
                        f"{' match the filter' if where else ' are stored'}"
                        f"{' apart from the query patient' if other_patients else ''}"
                        f"{f' ({per_patient} slice(s) per patient: per_patient 0 for more)' if per_patient else ''}")
            answers.append(QueryResult(item, result, neighbors,
                                       warning=None if number in found else NO_LUNGS_WARNING, note=note))
        return answers

    def _searchable_store(self) -> Store:
        store = self.store(create=False)
        if store.is_empty():  # not a count: that reads every row, on every query
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
        the candidate list grows until k are found or the store is exhausted. Stored copies of
        the same pixels come once, listing the others (``copies``); each neighbour has its
        parts' similarities and its score's percentile."""
        if k < 1:
            raise LungCBIRError("k must be at least 1")
        try:
            focused = self.model.focused(vectors, focus)
        except ValueError as error:
            raise LungCBIRError(str(error)) from None
        allowed = store.ids_matching(where) if where else None
        fetch = _first_fetch(k, bool(per_patient or any(excluded)))
        answers: list[list[Neighbor] | None] = [None] * len(vectors)
        pending = list(range(len(vectors)))
        while pending:
            scores, ids = store.search(focused[pending], fetch, restrict_to=allowed)
            rows = store.neighbor_rows(np.unique(ids[ids >= 0]))
            exhausted = ids.shape[1] < fetch  # every (allowed) stored vector was a candidate
            still = []
            for number, row_scores, row_ids in zip(pending, scores, ids):
                neighbors = _collapse(_slice_candidates(row_scores, row_ids, rows), k, per_patient,
                                      excluded[number])
                if len(neighbors) == k or exhausted:
                    answers[number] = neighbors
                else:
                    still.append(number)
            pending, fetch = still, fetch * 4
        found: list[list[Neighbor]] = answers  # type: ignore[assignment]
        self._explain(store, vectors, found, focus)
        return found

    def _explain(self, store: Store, vectors: np.ndarray, answers: Sequence[Sequence[Neighbor]],
                 focus: Focus | str) -> None:
        """Set each neighbour's part similarities (anatomy, findings: a model with a findings
        part) and the percentile of its score among pairs of stored slices."""
        neighbors = [n for answer in answers for n in answer]
        if not neighbors:
            return
        reference = self._pair_scores(store, focus)
        parts = self.model.parts
        stored = {row.id: decode_vector(row.vector) for row in store.neighbor_rows([n.id for n in neighbors]).values()}
        for vector, answer in zip(vectors, answers):
            for neighbor in answer:
                neighbor.percentile = _percentile(reference, neighbor.score)
                other = stored.get(neighbor.id)
                if len(parts) > 1 and other is not None:
                    # vectors are [anatomy | findings] / sqrt(2) with unit parts: 2 x a part's dot is its cosine
                    neighbor.anatomy_score = float(np.clip(2 * vector[:parts[0]] @ other[:parts[0]], -1, 1))
                    neighbor.findings_score = float(np.clip(2 * vector[parts[0]:] @ other[parts[0]:], -1, 1))

    def _pair_scores(self, store: Store, focus: Focus | str) -> np.ndarray:
        """Sorted scores of the pairs of up to :data:`PERCENTILE_SAMPLE` stored slices spread over
        the store, with this focus: what a score is compared with (kept until the store changes:
        its generation, one row read, where a count reads every row and misses a removal matched
        by as many additions)."""
        return self._reference(("slices", store.database.generation(), self.model.model_id, str(focus)),
                               store.iter_vectors,
                               lambda sample: self.model.focused(sample, focus))

    def _region_pair_scores(self, store: Store) -> np.ndarray:
        """:meth:`_pair_scores` of the stored regions: a region score is compared with pairs of
        stored regions, not of slices, as region vectors are another space (pooled features of
        a finding) whose scores run otherwise. Kept until the regions change: their generation,
        not their count, as ``rebuild-regions`` replaces every vector and may keep the count."""
        regions = store.database.regions
        return self._reference(("regions", regions.generation(), regions.model_id), regions.iter_vectors,
                               lambda sample: sample)

    def _reference(self, key: tuple, chunks: Callable[[], Iterator[tuple[np.ndarray, np.ndarray]]],
                   weigh: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        """Sorted scores of the pairs of a sample of the vectors ``chunks`` reads (the first
        :data:`PERCENTILE_READ_LIMIT`, :data:`PERCENTILE_SAMPLE` spread over them), the query
        side weighed by ``weigh`` (a focus); one answer kept per kind (``key[0]``) until its key changes."""
        cached = self._pair_cache.get(key)
        if cached is not None:
            return cached
        vectors, read = [], 0
        for _, chunk in chunks():
            vectors.append(chunk)
            read += len(chunk)
            if read >= PERCENTILE_READ_LIMIT:  # a huge store: its first rows stand for it
                break
        if not vectors:
            return np.zeros(0, np.float32)
        every = np.concatenate(vectors)
        sample = every[np.linspace(0, len(every) - 1, min(len(every), PERCENTILE_SAMPLE)).astype(int)]
        sample = np.unique(sample, axis=0)  # copies of the same pixels are not pairs
        scores = np.clip(weigh(sample) @ sample.T, -1, 1)
        upper = np.sort(scores[np.triu_indices(len(sample), 1)]).astype(np.float32)
        # replaced, not changed in place: a web server's threads read it meanwhile
        self._pair_cache = {**{other: value for other, value in self._pair_cache.items() if other[0] != key[0]},
                            key: upper}
        return upper


#: Two stored vectors this close (largest difference of a component) are copies of the same
#: pixels: the TCGA DICOMs and their TIFF exports differ by at most 6e-5 (a few float16 steps),
#: while an 8-bit PNG export of a DICOM (other pixels) differs by far more.
COPY_TOLERANCE = 2e-4


@dataclass
class _Candidate:
    """One search hit as :func:`_collapse` walks them: the stored slice, the score, and what
    says whether it is a copy of an earlier hit (:meth:`copy_of`)."""

    record: NeighborRow
    score: float
    #: compared within :data:`COPY_TOLERANCE`, component by component (empty: never a copy)
    vectors: tuple[np.ndarray, ...]
    #: must be equal as well (a region's box)
    same: tuple = ()
    #: region queries: the stored region hit
    region: StoredRegion | None = None

    def copy_of(self, other: _Candidate) -> bool:
        """Whether this hit shows the same thing as ``other``: the equal parts first (cheap)."""
        return self.same == other.same and len(self.vectors) == len(other.vectors) and all(
            len(mine) > 0 and mine.shape == theirs.shape and float(np.abs(mine - theirs).max()) <= COPY_TOLERANCE
            for mine, theirs in zip(self.vectors, other.vectors))


def _slice_candidates(scores: np.ndarray, ids: np.ndarray, rows: dict[int, NeighborRow]) -> Iterator[_Candidate]:
    """A slice search's hits, best first; rows removed since the index was read are passed
    over. A copy is a stored slice whose vector is within :data:`COPY_TOLERANCE`: the same pixels."""
    for score, identifier in zip(scores, ids):
        record = rows.get(int(identifier))
        if record is not None:
            vector = decode_vector(record.vector) if record.vector else np.zeros(0, np.float32)
            yield _Candidate(record, float(score), (vector,))


def _region_candidates(scores: np.ndarray, ids: np.ndarray, regions: dict[int, StoredRegion],
                       vectors: dict[int, np.ndarray], rows: dict[int, NeighborRow]) -> Iterator[_Candidate]:
    """A region search's hits, best first; regions or slices removed since are passed over.

    A region is a copy of an earlier one when its slice is a copy of that one's slice (slice
    vectors within :data:`COPY_TOLERANCE`, the slices' own rule), its box is the same and its
    region vector is within the same tolerance. The slice condition alone would merge the
    different regions of one slice's copies; the region vector alone could merge like findings
    of two different slices (a region vector sees only its neighbourhood); the box, exact,
    because copies of the same pixels with the same mask give the same box, while a region
    vector is pooled and could stay within the tolerance for a box one pixel off. The three
    together say: the same finding on the same pixels."""
    for score, identifier in zip(scores, ids):
        region = regions.get(int(identifier))
        record = rows.get(region.image_id) if region is not None else None
        vector = vectors.get(int(identifier))
        if region is None or record is None or vector is None:
            continue
        image = decode_vector(record.vector) if record.vector else np.zeros(0, np.float32)
        yield _Candidate(record, float(score), (image, vector), (region.bbox,), region)


@dataclass
class _Met:
    """A thing :func:`_collapse` met: its first candidate, its neighbour while listed, and the
    cases its copies are of (all count towards ``per_patient``)."""

    candidate: _Candidate
    neighbor: Neighbor | None
    cases: set[str] = field(default_factory=set)


def _collapse(candidates: Iterable[_Candidate], k: int, per_patient: int, leave_out: set[str]) -> list[Neighbor]:
    """The first k candidates (best first) with at most ``per_patient`` of one case (0: any),
    none of the rows or cases in ``leave_out``; a candidate that is a copy of one met before
    (:meth:`_Candidate.copy_of`: the same pixels; for regions, the same region of them) is listed
    in its ``copies`` (slice id and path), or left out with it, never shown twice. Slice and
    region queries walk their hits here, so both treat copies, cases and ``leave_out`` alike.

    Copies score alike, and which of them the index ranks first is chance: a copy under another
    case (a TIFF export without a patient) may come before the query's own stored slice. So the
    same pixels are one thing whichever comes first: left out when any copy is (``--other-patients``
    never shows the query's own pixels under another name), and counted against the case of
    every copy (one per patient is not one per patient plus its exports). A copy ranked after
    the k-th answer's next distinct candidate is not met; copies score within about 1e-3, so
    they come together."""
    neighbors: list[Neighbor] = []
    per_case: dict[str, int] = {}
    met: list[_Met] = []
    for candidate in candidates:
        record = candidate.record
        case = case_key(record)
        left_out = bool(leave_out) and (f"id:{record.id}" in leave_out or case in leave_out)
        original = next((item for item in met if candidate.copy_of(item.candidate)), None)
        if original is not None:
            if original.neighbor is not None and left_out:  # a copy of what is left out: left out with it
                neighbors.remove(original.neighbor)
                for other in original.cases:
                    per_case[other] -= 1
                original.neighbor = None
            elif original.neighbor is not None:
                original.neighbor.copies.append({"id": record.id, "path": record.path})
                if case not in original.cases:
                    original.cases.add(case)
                    per_case[case] = per_case.get(case, 0) + 1
            continue
        if left_out:
            met.append(_Met(candidate, None))
            continue
        if len(neighbors) == k:
            break
        neighbor = None
        if not per_patient or per_case.get(case, 0) < per_patient:
            per_case[case] = per_case.get(case, 0) + 1
            neighbor = _neighbor(record, candidate.score, 0)
            if candidate.region is not None:
                region = candidate.region
                neighbor.region = {"id": region.id, "bbox": list(region.bbox), "area": region.area,
                                   "source": region.source}
            neighbors.append(neighbor)
        met.append(_Met(candidate, neighbor, {case}))
    for rank, neighbor in enumerate(neighbors, 1):
        neighbor.rank = rank
    return neighbors


def _first_fetch(k: int, collapsing: bool) -> int:
    """How many hits a search first asks for: many when cases are collapsed or left out, else
    twice k, as copies of the same pixels among them come once (more are fetched if needed)."""
    return max(k * CANDIDATES_PER_RESULT, MIN_CANDIDATES) if collapsing else 2 * k


def _percentile(reference: np.ndarray, score: float) -> float | None:
    """The share (0-100) of the reference pairs' scores (sorted) below ``score``; None without any."""
    if not len(reference):
        return None
    return 100.0 * float(np.searchsorted(reference, score)) / len(reference)


def _neighbor(record: ImageRecord | NeighborRow, score: float, rank: int) -> Neighbor:
    """A stored row as a neighbour with this score and rank."""
    # a score is a (weighted) cosine; float16 vectors and float32 sums overshoot 1 slightly
    return Neighbor(rank=rank, id=record.id, path=record.path, score=float(np.clip(score, -1.0, 1.0)),
                    patient_id=record.patient_id, series_uid=record.series_uid, slice_index=record.slice_index,
                    labels=dict(record.labels or {}), study_uid=record.study_uid, sop_uid=record.sop_uid)


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


def check_one_series(slices: Sequence[CTSlice]) -> None:
    """Raise :class:`LungCBIRError` when slices given as one series are of several patients or
    several DICOM series (as their files say): pairing their levels would mix two scans."""
    patients = sorted({item.patient_id for item in slices if item.patient_id})
    if len(patients) > 1:
        shown = ", ".join(patients[:3]) + (", ..." if len(patients) > 3 else "")
        raise LungCBIRError(f"the slices are of {len(patients)} patients ({shown}), not one series: "
                            "query one series at a time")
    series = {item.series_uid for item in slices if item.series_uid}
    if len(series) > 1:
        raise LungCBIRError(f"the slices are of {len(series)} DICOM series, not one: query one series at a time")


def _series_key(neighbor: Neighbor) -> str:
    """Which stored series a neighbour is of (as :meth:`Retriever.series_members` groups them)."""
    if neighbor.series_uid:
        return f"series:{neighbor.series_uid}"
    return f"patient:{neighbor.patient_id}" if neighbor.patient_id else f"file:{neighbor.path}"


def _natural(text: str) -> list:
    """A sort key comparing the numbers in a text as numbers (slice_2 before slice_10)."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", text)]


def case_key(record: ImageRecord | NeighborRow | Neighbor) -> str:
    """What counts as one case: the patient, else the series, else the file (a NIfTI volume)."""
    if record.patient_id:
        return f"patient:{record.patient_id}"
    if record.series_uid:
        return f"series:{record.series_uid}"
    return f"file:{record.path}"
