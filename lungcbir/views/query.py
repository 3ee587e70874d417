"""Routes that search or segment uploaded slices: ``/api/query``, ``/api/query-together``,
``/api/segment`` and the pictures of their answers (``/api/results/...``)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, File, Form, HTTPException, UploadFile
from fastapi.responses import Response

from ..errors import RegionError
from ..focus import DEFAULT_FOCUS, Focus
from ..io import CTSlice
from ..regions import Region, RegionBox
from ..retrieval import label_summary
from .schemas import ERROR_RESPONSES, QueryAnswer, SegmentAnswer, TogetherAnswer
from .seg import upload_offer
from .state import PIXEL_KIND_HEADER, AppState, check_k, result_urls

router = APIRouter(responses=ERROR_RESPONSES)
#: Longest ``region`` text taken ("X0,Y0,X1,Y1": four numbers of a few digits); more is refused unread.
MAX_REGION_TEXT = 64


def query_tags(item: CTSlice) -> dict[str, Any]:
    """What the query file itself says about where it comes from (DICOM tags; None when unknown)."""
    return {"source_format": item.source_format, "patient_id": item.patient_id, "study_uid": item.study_uid,
            "series_uid": item.series_uid, "instance_number": item.instance_number,
            "slice_location": item.slice_location, "study_date": item.study_date,
            "series_description": item.series_description}


def query_region(web: AppState, box: str, mask: UploadFile | None) -> Region | None:
    """The query region of ``/api/query``: ``region`` text "X0,Y0,X1,Y1" or a ``region_mask``
    upload (read with the same limits as any upload; non-zero pixels are the region)."""
    if box and mask is not None:
        raise RegionError("give region or region_mask, not both")
    if box:
        if len(box) > MAX_REGION_TEXT:
            raise RegionError("a region box is X0,Y0,X1,Y1 (four integers, pixels of the image)")
        return RegionBox.parse(box)
    if mask is not None:
        planes = web.read_mask_upload(mask)
        if len(planes) != 1:
            raise RegionError(f"the region mask has {len(planes)} planes; send one plane (PNG, TIFF)")
        return planes[0]
    return None


@router.post("/api/query", response_model=QueryAnswer, response_model_exclude_unset=True)
def api_query(web: AppState, file: Annotated[UploadFile, File()], k: Annotated[int, Form()] = 5,
              where: Annotated[str, Form()] = "", per_patient: Annotated[int, Form()] = 1,
              other_patients: Annotated[bool, Form()] = False, labels: Annotated[str, Form()] = "",
              focus: Annotated[Focus, Form()] = DEFAULT_FOCUS, region: Annotated[str, Form()] = "",
              region_mask: Annotated[UploadFile | None, File()] = None) -> dict[str, Any]:
    """Upload a slice; get its lung fraction, mask and overlay URLs and the k nearest stored slices.

    A volume (NIfTI) is queried by its middle slice, and the answer says so (``frame``,
    ``slices_in_file``, ``note``); ``/api/query-series`` queries the whole volume.
    ``labels`` (JSON ``{"key": ["value", ...]}``) filters like ``where``, several values
    per key, case-insensitive. ``other_patients``: leave out the query's own patient (of its
    stored copy, or its DICOM PatientID). ``focus`` (anatomy, findings or balanced): what
    "similar" means (:class:`lungcbir.focus.Focus`); a model without a findings part
    (``/api/stats``: ``focus_available`` false) gives the same answer whatever the focus.

    ``region`` ("X0,Y0,X1,Y1", pixels of the uploaded slice, X1 and Y1 exclusive) or
    ``region_mask`` (an upload of the slice's size, non-zero = region) searches the stored
    regions instead (:meth:`lungcbir.retrieval.Retriever.query_region`): each neighbour has
    ``region`` {id, bbox, area, source} and the answer the query's ``region`` {bbox, area};
    ``focus`` does not apply. A box outside the slice or empty, or a mask of another size or
    empty: 422.
    """
    check_k(k)
    filters = web.filters(where, labels)
    wanted = query_region(web, region, region_mask)
    item, count, headers = web.middle_slice_and_header(file)
    with web.model_lock:
        if wanted is not None:
            result = web.retriever.query_region(item, wanted, k, filters, max(0, per_patient), other_patients)
        else:
            result = web.retriever.query_slices([item], k, filters, max(0, per_patient), other_patients, focus)[0]
    token = web.render(item, result.segmentation, result.region)
    summary = result.summary_json()
    if count > 1:  # one note: which slice of the volume, then the core's (fewer results, and why)
        summary["note"] = " ".join(filter(None, [
            f"{item.path} is a volume of {count} slices: slice {item.frame + 1} (the middle one) was queried; "
            "query the whole series to use them all.", result.note]))
    return {"query": item.path, **result_urls(token), **summary,
            "width": item.shape[1], "height": item.shape[0], "frame": item.frame,
            "slices_in_file": count, "query_tags": query_tags(item), "focus": focus.value,
            "seg": upload_offer(web, [item], [result.segmentation], headers),
            "neighbors": web.neighbors_json(result.neighbors)}


@router.post("/api/query-together", response_model=TogetherAnswer, response_model_exclude_unset=True)
def api_query_together(web: AppState, files: Annotated[list[UploadFile], File()],
                       unlike: Annotated[list[UploadFile] | None, File()] = None, k: Annotated[int, Form()] = 5,
                       where: Annotated[str, Form()] = "", per_patient: Annotated[int, Form()] = 1,
                       other_patients: Annotated[bool, Form()] = False,
                       focus: Annotated[Focus, Form()] = DEFAULT_FOCUS) -> dict[str, Any]:
    """Upload several slices (``files``) and optionally ``unlike`` ones; one search with the mean
    of their vectors ("more like these, less like that"). The examples themselves are never
    returned. ``focus`` as in ``/api/query``."""
    check_k(k)
    filters = web.filters(where, "")
    # a volume takes part by its middle slice, as in /api/query
    examples = [web.middle_slice(f)[0] for f in files]
    disliked = [web.middle_slice(f)[0] for f in unlike or []]
    with web.model_lock:
        result = web.retriever.query_together(examples, disliked, k, filters, max(0, per_patient), other_patients,
                                              focus=focus)
    return {"queries": [item.path for item in examples], "unlike": [item.path for item in disliked],
            "focus": focus.value, "label_summary": label_summary([n.labels for n in result.neighbors]),
            "neighbors": web.neighbors_json(result.neighbors)}


@router.post("/api/segment", response_model=SegmentAnswer, response_model_exclude_unset=True)
def api_segment(web: AppState, file: Annotated[UploadFile, File()]) -> dict[str, Any]:
    """Upload a slice; get its lung fraction and mask and overlay URLs."""
    item, count = web.middle_slice(file)
    with web.model_lock:
        segmentation = web.retriever.segment_slices([item])[0]
    token = web.render(item, segmentation)
    return {"query": item.path, **result_urls(token), "frame": item.frame, "slices_in_file": count,
            **segmentation.summary_json(), "width": item.shape[1], "height": item.shape[0]}


@router.get("/api/results/{token}/{kind}.png", include_in_schema=False)
def result_picture(web: AppState, token: str, kind: str) -> Response:
    rendered = web.results.get(token)
    if rendered is None or kind not in ("mask", "overlay", "pixels", "lesion"):
        raise HTTPException(404, "result not found (results are kept for the most recent queries only)")
    headers = {PIXEL_KIND_HEADER: rendered.kind} if kind == "pixels" else None
    return Response(rendered.picture(kind), media_type="image/png", headers=headers)
