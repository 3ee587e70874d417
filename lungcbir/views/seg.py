"""The query's DICOM SEG: ``GET /api/seg/{token}`` (download it) and ``POST /api/seg/{token}/stow``
(store it in the server's archive). Offered for a query series fetched from the archive
(``/api/query-archive``, a viewer's launch link), whose instances the SEG refers to; the
answer to an upload says why not (:func:`upload_offer`)."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fastapi import APIRouter, HTTPException
from fastapi.responses import Response

from ..dicom_seg import SegWritten
from ..dicomweb import DicomwebSource
from ..errors import DicomwebError, ReadError, SegError
from ..io import CTSlice
from ..retrieval import SeriesResult
from ..websecurity import scrub_paths
from .schemas import ERROR_RESPONSES, ErrorDetail, SegStored
from .state import AppState, QuerySeries, WebState

router = APIRouter(responses=ERROR_RESPONSES)

#: Why an uploaded query gets no SEG: a picture has nothing a SEG could refer to ...
NOT_DICOM = ("No DICOM SEG: this query is an uploaded picture without DICOM source UIDs, and a SEG must "
             "refer to the DICOM instances it segments.")
#: ... and an uploaded DICOM slice or series may not be in the archive a SEG would be stored in.
UPLOADED = ("No DICOM SEG here: this query was uploaded, not fetched from the archive. A SEG, and storing it "
            "back, is offered for a series the page fetched from the server's archive (a viewer's launch link, "
            "/?study=UID&series=UID), whose instances it refers to; `lungcbir segment --format dicom-seg` "
            "writes one for DICOM files.")

_ARCHIVE_FAILED: dict[int | str, dict[str, Any]] = {
    502: {"model": ErrorDetail, "description": "The archive did not give the query's headers, or refused the SEG"}}


def upload_offer(slices: Sequence[CTSlice]) -> dict[str, Any]:
    """The ``seg`` of an uploaded query's answer: none, and why."""
    dicom = bool(slices) and all(item.source_format == "dicom" for item in slices)
    return {"download": None, "store": None, "reason": UPLOADED if dicom else NOT_DICOM}


def archive_offer(web: WebState, result: SeriesResult) -> dict[str, Any]:
    """The ``seg`` of an archive query's answer: the series kept (the SEG is made when first
    asked for) and the URLs to download it and to store it back."""
    answers = result.slices
    token = web.series.put(QuerySeries([answer.query for answer in answers],
                                       [answer.segmentation.mask for answer in answers],
                                       [answer.segmentation.lesion_mask for answer in answers]))
    return {"download": f"/api/seg/{token}", "store": f"/api/seg/{token}/stow", "reason": None}


def _archive(web: WebState) -> DicomwebSource:
    if web.settings.archive_url is None:
        raise HTTPException(404, "this server has no DICOMweb archive (serve --archive URL)")
    return DicomwebSource(web.settings.archive_url)


def _kept(web: WebState, token: str) -> QuerySeries:
    series = web.series.get(token)
    if series is None:
        raise HTTPException(404, "SEG not found (kept for the most recent archive queries only; query again)")
    return series


def _said(error: Exception, source: DicomwebSource) -> str:
    """An error as the client may read it: the archive named as such, never by its address."""
    return scrub_paths(str(error), {source.root: "the archive"})


def _made(web: WebState, series: QuerySeries, source: DicomwebSource) -> tuple[bytes, SegWritten]:
    """The series' SEG, made once: the headers fetched again from the archive (the query kept
    pixels only), the masks those of the query's answer."""
    with series.lock:
        if series.seg is None or series.written is None:
            with web.decoding(), tempfile.TemporaryDirectory(prefix="lungcbir-seg-") as folder:
                try:
                    headers = source.headers([item.path for item in series.slices])
                    written = web.retriever.write_dicom_seg(series.slices, Path(folder) / "seg.dcm", series.masks,
                                                            series.lesions, headers)
                except ReadError as error:
                    raise HTTPException(502, f"cannot make the SEG: {_said(error, source)}") from None
                except SegError as error:
                    raise HTTPException(422, f"cannot make the SEG: {_said(error, source)}") from None
                series.seg, series.written = written.path.read_bytes(), written
        return series.seg, series.written


@router.get("/api/seg/{token}", response_class=Response, responses={
    200: {"content": {"application/dicom": {}}, "description": "the query series' DICOM SEG"}, **_ARCHIVE_FAILED})
def query_seg(web: AppState, token: str) -> Response:
    """The DICOM SEG of an archive query series (``seg.download`` of its answer): one frame per
    slice and segment, "Lung" and, with a model with a lesion output, "Lesion"."""
    source = _archive(web)
    data, written = _made(web, _kept(web, token), source)
    name = f"{written.referenced_series_uid}_seg.dcm"  # a UID: digits and dots only
    return Response(data, media_type="application/dicom",
                    headers={"Content-Disposition": f'attachment; filename="{name}"'})


@router.post("/api/seg/{token}/stow", response_model=SegStored, responses=_ARCHIVE_FAILED)
def store_seg(web: AppState, token: str) -> dict[str, Any]:
    """Store the SEG of an archive query series (``seg.store`` of its answer) in that archive
    (STOW-RS), beside the series it segments. Storing it again stores the same instance."""
    source = _archive(web)
    series = _kept(web, token)
    data, written = _made(web, series, source)
    with tempfile.TemporaryDirectory(prefix="lungcbir-seg-") as folder:
        path = Path(folder) / "seg.dcm"
        path.write_bytes(data)
        try:
            source.store([path])
        except DicomwebError as error:
            raise HTTPException(502, _said(error, source)) from None
    return {"sop_instance_uid": written.sop_instance_uid, "series_instance_uid": written.series_instance_uid,
            "study_uid": series.slices[0].study_uid or "", "referenced_series_uid": written.referenced_series_uid,
            "frames": written.frames, "segments": written.segments}
