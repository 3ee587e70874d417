"""Pydantic models of every JSON answer of the web API, so ``/openapi.json`` documents them.

The keys are those the API has always answered (the page, the CLI's ``--json`` and the tests
read them). Keys shown only sometimes (``warning``, ``note``, a neighbour's ``url`` and its
stored-row fields) have defaults and are left out of an answer when not set: routes use
``response_model_exclude_unset=True``. Objects built from the core's own JSON
(:meth:`lungcbir.retrieval.Neighbor.to_json`, :class:`lungcbir.store.StoreStats`) allow extra
keys, so a field added there reaches the client without a change here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, get_type_hints

from pydantic import BaseModel, ConfigDict, Field, create_model

from .. import retrieval
from ..focus import Focus

#: How every search answer describes its ``label_summary``.
LABEL_SUMMARY = ('the neighbours\' labels counted, {key: {value: count}}, most frequent first: "6 of 8: '
                 'diagnosis COVID-19"')
#: How every search answer describes its ``focus``.
FOCUS_DESCRIPTION = ("the search focus used (anatomy, findings or balanced); with a model without a findings "
                     "part (/api/stats focus_available false) every focus gives the same answer")


class ErrorDetail(BaseModel):
    """Every error answer: one line of text (never a traceback, server path or database URL);
    FastAPI's own request validation answers a list of problems instead."""

    detail: str | list[dict[str, Any]]


#: The error answers documented on every API route.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorDetail, "description": "Bad request (a filter, a Host header)"},
    401: {"model": ErrorDetail, "description": "Missing or wrong bearer token (when the server has one)"},
    404: {"model": ErrorDetail, "description": "Unknown image id or result"},
    409: {"model": ErrorDetail, "description": "A region query on a store that holds no regions"},
    413: {"model": ErrorDetail, "description": "Upload larger than the limit"},
    415: {"model": ErrorDetail, "description": "Unsupported file type"},
    422: {"model": ErrorDetail, "description": "Unreadable file, bad parameter or unknown filter key"},
    503: {"model": ErrorDetail, "description": "Database unavailable, or too many uploads being decoded"},
}


class Health(BaseModel):
    """``/healthz``: the server answers."""

    status: str = Field(examples=["ok"])


class StoredImageLinks(BaseModel):
    """How a stored slice is named and fetched: its file name (non-DICOM) and picture/file URLs."""

    file_name: str | None
    thumbnail_url: str = Field(description="the slice in the lung window, at most 192 pixels; for a region "
                                           "neighbour with its region outlined in cyan (``?region=ID``)")
    overlay_url: str
    pixels_url: str
    mask_url: str
    lesion_url: str = Field(description="the slice's lesion map (0/255 PNG; empty without a lesion output)")
    file_url: str
    series_url: str


def core_model(name: str, core: type, exclude: tuple[str, ...] = (), **overrides: Any) -> type[BaseModel]:
    """A pydantic model of a core answer's dataclass (:mod:`lungcbir.retrieval`): its fields,
    types, defaults and descriptions (``field(metadata={"description": ...})``) are the core's,
    so the answer's shape is written once. ``overrides``: (type, Field) of fields the web shows
    otherwise (a path as a file name); ``exclude``: fields the web answers in another shape."""
    hints = get_type_hints(core)
    fields: dict[str, Any] = {}
    for item in dataclasses.fields(core):
        if item.name in exclude:
            continue
        description = item.metadata.get("description")
        if item.default is not dataclasses.MISSING:
            default = Field(item.default, description=description)
        elif item.default_factory is not dataclasses.MISSING:
            default = Field(default_factory=item.default_factory, description=description)
        else:
            default = Field(description=description)
        fields[item.name] = overrides.get(item.name, (hints[item.name], default))
    # keys the core adds to its JSON (to_json) pass through
    return create_model(name, __config__=ConfigDict(extra="allow"), **fields)


CoreNeighbor = core_model("CoreNeighbor", retrieval.Neighbor,
                          path=(str | None, Field(description="file name only, never server folders")))


class Neighbor(StoredImageLinks, CoreNeighbor):  # type: ignore[misc,valid-type]
    """One stored slice found for a query: the core's neighbour (:meth:`lungcbir.retrieval.Neighbor.to_json`,
    as ``query --json`` prints it, paths as file names), what a reader needs to identify the slice
    and the URLs of its pictures, file and series."""

    model_config = ConfigDict(extra="allow")  # keys added by Neighbor.to_json pass through

    url: str | None = Field(None, description="WADO-RS URL; only for slices indexed from a DICOMweb archive")
    # of the stored row; absent if the row was removed meanwhile
    instance_number: int | None = None
    slice_location: float | None = None
    study_date: str | None = None
    series_description: str | None = None
    identity_source: str | None = Field(None, description="where patient_id came from: dicom, labels, pattern, "
                                                          "folder or none (null: indexed before it was recorded)")
    source_format: str | None = None
    frame: int | None = None
    stored_lung_fraction: float | None = None
    width: int | None = None
    height: int | None = None
    viewer_url: str | None = Field(None, description="the study in the site's viewer (serve --viewer-url); "
                                                     "only when configured and the slice has a study")


class QueryTags(BaseModel):
    """What the query file itself says about where it comes from (None when unknown)."""

    source_format: str | None
    patient_id: str | None
    study_uid: str | None
    series_uid: str | None
    instance_number: int | None
    slice_location: float | None
    study_date: str | None
    series_description: str | None


class Segmented(BaseModel):
    """The picture URLs and segmentation of one uploaded slice."""

    query: str = Field(description="the uploaded file's name")
    mask: str = Field(description="URL of the lung mask PNG (0/255)")
    overlay: str = Field(description="URL of the slice with its lung contour and lesion map (red)")
    pixels: str = Field(description="URL of the 16-bit pixel PNG for windowing (header X-Pixel-Kind)")
    lesion: str = Field(description="URL of the lesion map PNG (0/255; empty without a lesion output or lungs)")
    lung_fraction: float
    lesion_fraction: float | None
    quality: str = Field(description='"ok", "doubtful" or "no-lungs"')
    quality_score: float
    width: int
    height: int
    frame: int = Field(description="the slice's frame in its file (a volume's middle slice)")
    slices_in_file: int


class SegOffer(BaseModel):
    """Whether the query's masks can be had as a DICOM SEG (segments "Lung" and, with a lesion
    output, "Lesion") and stored back in the archive, and if not, why."""

    download: str | None = Field(None, description="URL of the query series' DICOM SEG; null: not offered")
    store: str | None = Field(None, description="URL to POST to store the SEG in the server's archive (STOW-RS); "
                                                "null: not offered")
    reason: str | None = Field(None, description="why there is no SEG or no store-back (an uploaded query)")


class SegStored(BaseModel):
    """``POST /api/seg/{token}/stow``: the SEG now stored in the server's archive."""

    sop_instance_uid: str
    series_instance_uid: str = Field(description="the SEG's own series")
    study_uid: str
    referenced_series_uid: str = Field(description="the CT series it segments")
    frames: int
    segments: list[str] = Field(examples=[["Lung", "Lesion"]])


class QueryRegion(BaseModel):
    """The region a region query searched with, in pixels of the uploaded slice."""

    bbox: list[int] = Field(description="[x0, y0, x1, y1], x1 and y1 exclusive")
    area: int = Field(description="pixels")


class QueryAnswer(Segmented):
    """``/api/query``: the query's segmentation and its nearest stored slices."""

    warning: str | None = Field(None, description="only when the slice was not searched (no lungs)")
    note: str | None = Field(None, description="only when there is something to say: fewer than k results and "
                                                "why, which slice of a volume was queried, slices whose regions "
                                                "an unfinished `rebuild-regions` has not made again")
    query_tags: QueryTags
    focus: Focus = Field(description=FOCUS_DESCRIPTION)
    label_summary: dict[str, dict[str, int]] = Field(default_factory=dict, description=LABEL_SUMMARY)
    seg: SegOffer | None = None
    region: QueryRegion | None = Field(None, description="only for a region query: the query region; the "
                                                         "neighbours are then stored regions (their ``region``)")
    neighbors: list[Neighbor]


class SegmentAnswer(Segmented):
    """``/api/segment``: the slice's segmentation only."""


class TogetherAnswer(BaseModel):
    """``/api/query-together``: one search with several examples (and counter-examples)."""

    queries: list[str]
    unlike: list[str]
    focus: Focus = Field(description=FOCUS_DESCRIPTION)
    label_summary: dict[str, dict[str, int]] = Field(default_factory=dict, description=LABEL_SUMMARY)
    neighbors: list[Neighbor]


class SeriesQuerySlice(BaseModel):
    """A slice of the uploaded series that took part in a shown pair, with its picture URLs."""

    query_slice: int = Field(description="the slice's number in the uploaded series (slice order)")
    name: str
    frame: int
    instance_number: int | None
    lung_fraction: float
    level: float | None = Field(None, description="relative lung level (0 first slice with lungs, 1 last); null: "
                                                  "no lungs, left out of matching")
    mask: str
    overlay: str
    pixels: str
    lesion: str | None = None


class SeriesPair(BaseModel):
    """One best-matching pair: a query slice and a stored slice of the case."""

    query: SeriesQuerySlice
    neighbor: Neighbor


class AlignedSlice(BaseModel):
    """A query slice with lungs and the stored slice of the case at its lung level."""

    query_slice: int
    id: int = Field(description="the stored slice's image id")
    query_level: float | None
    level: float | None


CoreSeriesCase = core_model(
    "CoreSeriesCase", retrieval.SeriesMatch, exclude=("pairs",),
    aligned=(list[AlignedSlice], Field(default_factory=list, description="every query slice with lungs and its "
                                                                       "level-aligned stored slice, in slice order")),
    case=(str, Field(description="patient:ID, else series:UID, else file:NAME (a file name, never a server path)")))


class SeriesCase(CoreSeriesCase):  # type: ignore[misc,valid-type]
    """One stored case ranked for a whole query series (:meth:`lungcbir.retrieval.SeriesMatch.to_json`),
    each pair with its query slice's pictures."""

    pairs: list[SeriesPair]


class FailedFile(BaseModel):
    """A file of an upload that could not be read, and why."""

    file: str
    reason: str


class SeriesAnswer(BaseModel):
    """``/api/query-series``: stored cases ranked against a whole uploaded series."""

    query: str = Field(description='the uploaded file\'s name (a ZIP\'s, a volume\'s), or "N files"')
    slices: int
    failed: list[FailedFile]
    focus: Focus = Field(description=FOCUS_DESCRIPTION)
    note: str | None = Field(None, description="only when fewer than k cases came back (why), or nothing was "
                                                "searched (no slice with lungs)")
    label_summary: dict[str, dict[str, int]] = Field(default_factory=dict,
                                                     description=LABEL_SUMMARY + " (of each case's best pair)")
    query_slices: list[SeriesQuerySlice] = Field(default_factory=list, description="every query slice with lungs "
                                                  "(slice order), for viewers that step through the query series")
    seg: SegOffer | None = None
    cases: list[SeriesCase]


class ImageMetadata(StoredImageLinks):
    """``/api/images/{id}``: one stored slice's row (file name only, never server folders)."""

    id: int
    path: str | None
    source_format: str | None
    width: int
    height: int
    patient_id: str | None
    study_uid: str | None
    series_uid: str | None
    sop_uid: str | None
    url: str | None = Field(description="WADO-RS URL of an archive's instance, else null")
    instance_number: int | None
    slice_location: float | None
    study_date: str | None
    series_description: str | None
    slice_index: int | None
    frame: int
    labels: dict[str, Any]
    lung_fraction: float
    model_id: str
    indexed_at: str | None = Field(description="ISO 8601")
    viewer_url: str | None = Field(None, description="the study in the site's viewer (serve --viewer-url)")
    identity_source: str | None = None


class SeriesMembers(BaseModel):
    """``/api/images/{id}/series``: the stored slices of the slice's series, in slice order."""

    id: int
    ids: list[int]
    position: int | None = Field(description="where ``id`` is in ``ids``")
    levels: list[float | None] = Field(default_factory=list, description="relative lung level of each of ``ids`` "
                                                                         "(null: no lungs)")


class Labels(BaseModel):
    """``/api/labels``: stored label keys with their values, and the metadata columns a filter may name."""

    labels: dict[str, list[str]]
    columns: list[str]


class IdentityCount(BaseModel):
    """Patients and slices whose identity came from one source."""

    model_config = ConfigDict(extra="allow")

    patients: int
    slices: int


class Stats(BaseModel):
    """``/api/stats``: what is in the database and the index (the database by kind only)."""

    model_config = ConfigDict(extra="allow")  # fields added to StoreStats pass through

    images: int
    patients: int
    series: int
    identity: dict[str, IdentityCount] = Field(description="how identity was found, by source")
    model_id: str | None
    dimension: int | None
    index_vectors: int
    index_kind: str
    database: str | None = Field(description='"sqlite" or "postgresql", never the URL')
    database_bytes: int | None
    index_bytes: int | None
    vector_parts: list[str] = Field(description='the parts of the model\'s vectors: ["anatomy"] or '
                                                '["anatomy", "findings"]', examples=[["anatomy", "findings"]])
    focus_available: bool = Field(description="whether the search focus (anatomy, findings, balanced) changes "
                                              "anything: only a model with a findings part weighs the parts")
