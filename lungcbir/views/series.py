"""Routes about whole series: ``/api/query-series`` (rank stored cases against an uploaded
series) and ``/api/images/{id}/series`` (the stored slices of a slice's series)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, HTTPException, UploadFile

from ..dicom_seg import dicom_headers
from ..errors import LungCBIRError, ReadError
from ..focus import DEFAULT_FOCUS, Focus
from ..io import CTSlice, ReadFailure
from ..uploads import SeriesLimits, expand, read_series
from ..websecurity import scrub_paths
from .schemas import ERROR_RESPONSES, SeriesAnswer, SeriesMembers
from .seg import archive_offer, upload_offer
from .state import (
    MAX_SERIES_K,
    SERIES_BYTES_FACTOR,
    SERIES_PAIRS,
    AppState,
    check_k,
    public_json,
    result_urls,
    upload_name,
)

router = APIRouter(responses=ERROR_RESPONSES)


@router.post("/api/query-series", response_model=SeriesAnswer, response_model_exclude_unset=True)
def api_query_series(web: AppState, files: Annotated[list[UploadFile], File()], k: Annotated[int, Form()] = 5,
                     where: Annotated[str, Form()] = "", labels: Annotated[str, Form()] = "",
                     other_patients: Annotated[bool, Form()] = False,
                     focus: Annotated[Focus, Form()] = DEFAULT_FOCUS) -> dict[str, Any]:
    """Upload a whole series (several files, a ZIP of them, or a NIfTI volume); get stored
    cases ranked as ``query --by-series`` ranks them (slices paired by lung level), each with its
    best-matching slice pairs and every level-aligned pair (``aligned``).

    ``other_patients`` and ``focus`` as in ``/api/query``. Slices of several patients or DICOM
    series are refused (422). Bounded: at most :data:`lungcbir.uploads.MAX_SERIES_FILES` files
    and 4x the upload limit once unpacked; ZIP sizes are checked before anything is extracted.
    """
    check_k(k, MAX_SERIES_K, " for a series")
    filters = web.filters(where, labels)
    most = web.settings.max_upload_bytes
    limits = SeriesLimits(max_bytes=SERIES_BYTES_FACTOR * most, max_voxels=web.retriever.settings.max_voxels)
    with web.decoding():
        blobs, used = [], 0
        for upload in files:
            data = upload.file.read(most + 1)
            used += len(data)
            if used > most:
                raise HTTPException(413, f"the upload is larger than {most // 2**20} MiB")
            blobs.append((upload_name(upload), data))
        unpacked = expand(blobs, limits)  # ZIPs unpacked once, for the slices and their DICOM headers
        slices, failures = read_series(unpacked, limits, unpacked=True)
        headers = dicom_headers(unpacked, slices)
    uploads = [name for name, _ in blobs]
    return _series_answer(web, slices, failures, uploads[0] if len(uploads) == 1 else f"{len(uploads)} files", k,
                          filters, other_patients, focus, headers=headers)


@router.post("/api/query-archive", response_model=SeriesAnswer, response_model_exclude_unset=True)
def api_query_archive(web: AppState, study: Annotated[str, Form()], series: Annotated[str, Form()] = "",
                      k: Annotated[int, Form()] = 5, where: Annotated[str, Form()] = "",
                      labels: Annotated[str, Form()] = "", other_patients: Annotated[bool, Form()] = False,
                      focus: Annotated[Focus, Form()] = DEFAULT_FOCUS) -> dict[str, Any]:
    """Rank stored cases against a series fetched from the server's DICOMweb archive (``serve
    --archive``), as ``/api/query-series`` does for an upload: what ``/?study=UID&series=UID``
    (a viewer's launch link) asks for. 404 when the server has no archive; 422 when the study
    holds no such series, or several CT series and none was chosen."""
    if web.settings.archive_url is None:
        raise HTTPException(404, "this server has no DICOMweb archive to fetch from (serve --archive URL)")
    check_k(k, MAX_SERIES_K, " for a series")
    filters = web.filters(where, labels)
    from ..dicomweb import DicomwebSource

    source = DicomwebSource(web.settings.archive_url)
    with web.decoding():
        try:
            slices, failures = source.series_slices(study, series or None)
        except LungCBIRError as error:
            raise HTTPException(422, scrub_paths(str(error))) from None
    if not slices:
        raise HTTPException(422, f"no slice of study {study} could be fetched")
    return _series_answer(web, slices, failures, f"study {study}" + (f", series {series}" if series else ""), k,
                          filters, other_patients, focus, from_archive=True)


def _series_answer(web: AppState, slices: list[CTSlice], failures: Sequence[ReadFailure | ReadError], name: str,
                   k: int, filters: dict, other_patients: bool, focus: Focus, from_archive: bool = False,
                   headers: list | None = None) -> dict[str, Any]:
    """A series query's answer, the same for an upload and an archive series (whose slices are
    named by their instance URLs, as stored archive slices are), but for its ``seg``: an
    archive series' SEG can be downloaded and stored back, a DICOM upload's (``headers``: its
    slices' DICOM headers) downloaded only, and the answer says why."""
    with web.model_lock:
        try:
            result = web.retriever.query_series(slices, k, filters, pairs=SERIES_PAIRS, focus=focus,
                                                other_patients=other_patients)
        except LungCBIRError as error:  # several patients or series: not one series
            raise HTTPException(422, str(error)) from None
    # every slice with lungs, its pictures made when the page asks for them (it steps through them)
    query_slices = {}
    for number, (answer, level) in enumerate(zip(result.slices, result.levels)):
        if answer.warning:
            continue
        item = answer.query
        query_slices[number] = {"query_slice": number, "name": item.path, "frame": item.frame,
                                "instance_number": item.instance_number, "level": level,
                                "lung_fraction": round(answer.lung_fraction, 6),
                                **result_urls(web.render(item, answer.segmentation))}
    shown = iter(web.neighbors_json([pair.neighbor for match in result.matches for pair in match.pairs]))
    # the core's case (SeriesMatch.to_json), its pairs with the query slice's pictures and the web's neighbour
    cases = [{**public_json(match.to_json()),
              "pairs": [{"query": query_slices[pair.query_slice], "neighbor": next(shown)} for pair in match.pairs]}
             for match in result.matches]
    note = {"note": result.note} if result.note else {}
    segmentations = [answer.segmentation for answer in result.slices]
    queried = [answer.query for answer in result.slices]
    seg = archive_offer(web, queried, segmentations) if from_archive else \
        upload_offer(web, queried, segmentations, headers)
    return {"query": name, "slices": len(slices), "seg": seg,
            "failed": [{"file": f.path, "reason": scrub_paths(f.reason)} for f in failures], "focus": focus.value,
            **note, "label_summary": result.label_summary(), "query_slices": list(query_slices.values()),
            "cases": cases}


@router.get("/api/images/{image_id}/series", response_model=SeriesMembers)
def stored_series(web: AppState, image_id: int) -> dict[str, Any]:
    """The ids of the stored slices of this slice's series (or volume, or, for a patient known
    without a series, of the patient's slices), in slice order, with their lung levels."""
    web.stored(image_id)
    ids = web.retriever.series_members(image_id)
    levels = web.retriever.stored_levels(ids)
    return {"id": image_id, "ids": ids, "position": ids.index(image_id) if image_id in ids else None,
            "levels": levels}
