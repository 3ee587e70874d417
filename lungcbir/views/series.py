"""Routes about whole series: ``/api/query-series`` (rank stored cases against an uploaded
series) and ``/api/images/{id}/series`` (the stored slices of a slice's series)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, File, Form, HTTPException, UploadFile

from ..errors import LungCBIRError
from ..focus import DEFAULT_FOCUS, Focus
from ..uploads import SeriesLimits, read_series
from ..websecurity import scrub_paths
from .schemas import ERROR_RESPONSES, SeriesAnswer, SeriesMembers
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
        slices, failures = read_series(blobs, limits)
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
    uploads = [name for name, _ in blobs]
    note = {"note": result.note} if result.note else {}
    return {"query": uploads[0] if len(uploads) == 1 else f"{len(uploads)} files", "slices": len(slices),
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
