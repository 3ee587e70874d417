"""The query's DICOM SEG: ``GET /api/seg/{token}`` (download it) and ``POST /api/seg/{token}/stow``
(store it in the server's archive). A DICOM query gets a SEG (an upload's headers are kept
from its bytes; an archive series' are fetched again); only a series fetched from the archive
(``/api/query-archive``, a viewer's launch link) is stored back, since that archive holds the
instances the SEG refers to. The answer says why not, where not (``reason``)."""

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
from ..inference import Segmentation
from ..io import CTSlice
from ..websecurity import scrub_paths
from .schemas import ERROR_RESPONSES, ErrorDetail, SegStored
from .state import AppState, QuerySeries, WebState

router = APIRouter(responses=ERROR_RESPONSES)

#: Why a picture gets no SEG: it has nothing a SEG could refer to.
NOT_DICOM = ("No DICOM SEG: this query is an uploaded picture without DICOM source UIDs, and a SEG must "
             "refer to the DICOM instances it segments.")
#: Why an uploaded DICOM query's SEG is not stored back: the archive may not hold its instances.
UPLOADED = ("Not stored back in the archive: this query was uploaded, not fetched from the server's archive, "
            "which may not hold the instances its SEG refers to. Storing the SEG back is offered for a series "
            "the page fetched from the archive (a viewer's launch link, ?study=UID&series=UID).")

_ARCHIVE_FAILED: dict[int | str, dict[str, Any]] = {
    502: {"model": ErrorDetail, "description": "The archive did not give the query's headers, or refused the SEG"}}


def _keep(web: WebState, slices: Sequence[CTSlice], segmentations: Sequence[Segmentation], headers: list | None,
          from_archive: bool) -> str:
    return web.series.put(QuerySeries(list(slices), [s.mask for s in segmentations],
                                      [s.lesion_mask for s in segmentations], headers, from_archive))


def upload_offer(web: WebState, slices: Sequence[CTSlice], segmentations: Sequence[Segmentation],
                 headers: list | None) -> dict[str, Any]:
    """The ``seg`` of an uploaded query's answer: a SEG to download when it is DICOM (its
    ``headers`` read from the upload), never a store-back; and why."""
    if headers is None:
        return {"download": None, "store": None, "reason": NOT_DICOM}
    return {"download": f"/api/seg/{_keep(web, slices, segmentations, headers, False)}", "store": None,
            "reason": UPLOADED}


def archive_offer(web: WebState, slices: Sequence[CTSlice], segmentations: Sequence[Segmentation]) -> dict[str, Any]:
    """The ``seg`` of an archive query's answer: the series kept (the SEG is made when first
    asked for) and the URLs to download it and to store it back."""
    token = _keep(web, slices, segmentations, None, True)
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


def _said(error: Exception, source: DicomwebSource | None) -> str:
    """An error as the client may read it: the archive named as such, never by its address."""
    return scrub_paths(str(error), {source.root: "the archive"} if source else {})


def _made(web: WebState, series: QuerySeries) -> tuple[bytes, SegWritten]:
    """The series' SEG, made once: the masks those of the query's answer, the headers those
    kept from an upload, or fetched again from the archive (the query kept pixels only)."""
    source = _archive(web) if series.headers is None else None
    with series.lock:
        if series.seg is None or series.written is None:
            with web.decoding(), tempfile.TemporaryDirectory(prefix="lungcbir-seg-") as folder:
                try:
                    headers = series.headers if source is None else \
                        source.headers([item.path for item in series.slices])
                    written = web.retriever.write_dicom_seg(series.slices, Path(folder) / "seg.dcm", series.masks,
                                                            series.lesions, headers)
                except ReadError as error:  # the archive's fault, or an upload's
                    raise HTTPException(422 if source is None else 502,
                                        f"cannot make the SEG: {_said(error, source)}") from None
                except SegError as error:
                    raise HTTPException(422, f"cannot make the SEG: {_said(error, source)}") from None
                series.seg, series.written = written.path.read_bytes(), written
        return series.seg, series.written


@router.get("/api/seg/{token}", response_class=Response, responses={
    200: {"content": {"application/dicom": {}}, "description": "the query series' DICOM SEG"}, **_ARCHIVE_FAILED})
def query_seg(web: AppState, token: str) -> Response:
    """The DICOM SEG of a DICOM query (``seg.download`` of its answer): one frame per slice and
    segment, "Lung" and, with a model with a lesion output, "Lesion"."""
    data, written = _made(web, _kept(web, token))
    name = f"{written.referenced_series_uid}_seg.dcm"  # a UID: digits and dots only
    return Response(data, media_type="application/dicom",
                    headers={"Content-Disposition": f'attachment; filename="{name}"'})


@router.post("/api/seg/{token}/stow", response_model=SegStored, responses={
    **_ARCHIVE_FAILED, 409: {"model": ErrorDetail, "description": "An uploaded query: not stored back (why)"}})
def store_seg(web: AppState, token: str) -> dict[str, Any]:
    """Store the SEG of an archive query series (``seg.store`` of its answer) in that archive
    (STOW-RS), beside the series it segments. Storing it again stores the same instance."""
    source = _archive(web)
    series = _kept(web, token)
    if not series.from_archive:
        raise HTTPException(409, UPLOADED)
    data, written = _made(web, series)
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
