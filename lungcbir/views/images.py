"""Routes of one stored slice, by database id only (never a path from the request): its
metadata, thumbnail, overlay, pixels, mask and original file."""

from __future__ import annotations

import hashlib
import math
import os
from typing import Annotated, Any
from urllib.parse import quote

import cv2
import numpy as np
from fastapi import APIRouter, HTTPException, Query
from fastapi.responses import Response

from ..dicomweb import is_dicomweb_url
from ..errors import ReadError
from ..io import read_bytes
from ..visualize import display_image, mask_png, outline_region, overlay
from ..websecurity import viewer_link
from .schemas import ERROR_RESPONSES, ImageMetadata
from .state import (
    MAX_IMAGE_ID,
    PIXEL_KIND_HEADER,
    THUMBNAIL_SIDE,
    AppState,
    image_urls,
    pixel_png,
    png,
    public_name,
)

router = APIRouter(responses=ERROR_RESPONSES)
#: The OpenAPI description of a PNG answer.
PNG_RESPONSE: dict[int | str, dict[str, Any]] = {200: {"content": {"image/png": {}}, "description": "A PNG picture"}}


@router.get("/api/images/{image_id}", response_model=ImageMetadata)
def image_metadata(web: AppState, image_id: int) -> dict[str, Any]:
    """Metadata of one stored slice."""
    record = web.stored(image_id)
    return {"id": record.id, "path": public_name(record.path), "source_format": record.source_format,
            "width": record.width, "height": record.height, "patient_id": record.patient_id,
            "study_uid": record.study_uid, "series_uid": record.series_uid, "sop_uid": record.sop_uid,
            "url": record.path if is_dicomweb_url(record.path) else None,
            "instance_number": record.instance_number, "slice_location": record.slice_location,
            "study_date": record.study_date, "series_description": record.series_description,
            "identity_source": record.identity_source,
            "slice_index": record.slice_index, "frame": record.frame, "labels": record.labels,
            "lung_fraction": record.lung_fraction, "model_id": record.model_id,
            "indexed_at": record.indexed_at.isoformat() if record.indexed_at else None,
            "file_name": public_name(record.path), **image_urls(record.id),
            "viewer_url": viewer_link(web.settings.viewer_url, {
                "study_uid": record.study_uid, "series_uid": record.series_uid, "sop_uid": record.sop_uid,
                "patient_id": record.patient_id})}


@router.get("/api/images/{image_id}/thumbnail", response_class=Response, responses=PNG_RESPONSE)
def thumbnail(web: AppState, image_id: int,
              region: Annotated[int | None, Query(ge=1, le=MAX_IMAGE_ID)] = None) -> Response:
    """The stored slice in the lung window, at most 192 pixels wide; with ``region`` (the id of
    one of its stored regions, a region neighbour's ``region.id``) that region outlined in cyan."""
    item = web.stored_slice(image_id)
    picture = display_image(item)
    scale = min(1.0, THUMBNAIL_SIDE / max(picture.shape))
    if region is not None:
        found = web.retriever.stored_region(region)
        if found is None or found[0].image_id != image_id:
            raise HTTPException(404, f"image {image_id} has no stored region {region}")
        stored, mask = found
        picture = cv2.cvtColor(picture, cv2.COLOR_GRAY2BGR)
        # drawn before shrinking, thick enough to stay a visible line at the thumbnail's size
        outline_region(picture, stored.bbox, mask, thickness=max(1, math.ceil(1.5 / scale)))
    if scale < 1:
        picture = cv2.resize(picture, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    return Response(png(picture), media_type="image/png")


@router.get("/api/images/{image_id}/overlay", response_class=Response, responses=PNG_RESPONSE)
def stored_overlay(web: AppState, image_id: int) -> Response:
    """The stored slice with its own lung contour."""
    item = web.stored_slice(image_id)
    with web.model_lock:
        mask = web.retriever.stored_masks([(image_id, item)])[0]  # kept in the row; the model only for old rows
    return Response(png(overlay(item, mask)), media_type="image/png")


@router.get("/api/images/{image_id}/pixels", response_class=Response, responses=PNG_RESPONSE)
def stored_pixels(web: AppState, image_id: int) -> Response:
    """The stored slice at full resolution as a 16-bit grey PNG for windowing: HU + 1024 when
    the header X-Pixel-Kind is "hu", 8-bit display values (0-255) when it is "display"."""
    data, kind = pixel_png(web.stored_slice(image_id))
    return Response(data, media_type="image/png", headers={PIXEL_KIND_HEADER: kind})


@router.get("/api/images/{image_id}/mask.png", response_class=Response, responses=PNG_RESPONSE)
def stored_mask(web: AppState, image_id: int) -> Response:
    """The stored slice's lung mask (0/255, the slice's own size)."""
    item = web.stored_slice(image_id)
    with web.model_lock:
        mask = web.retriever.stored_masks([(image_id, item)])[0]
    return Response(png(mask_png(mask)), media_type="image/png")


@router.get("/api/images/{image_id}/lesion.png", response_class=Response, responses=PNG_RESPONSE)
def stored_lesion(web: AppState, image_id: int) -> Response:
    """The stored slice's lesion map (0/255, the slice's own size; empty for a model without a
    lesion output). Rows keep no lesion map: the model runs on the slice."""
    item = web.stored_slice(image_id)
    with web.model_lock:
        lesion = web.retriever.lesion_masks([item])[0]
    return Response(png(mask_png(lesion if lesion is not None else np.zeros(item.shape, bool))),
                    media_type="image/png")


@router.get("/api/images/{image_id}/file", response_class=Response,
            responses={200: {"content": {"application/octet-stream": {}}, "description": "The original file"}})
def stored_file(web: AppState, image_id: int) -> Response:
    """The stored slice's original file, named by its file name only (an archive's
    instances are not served here: open their ``url`` in the archive). 410 when the file is
    gone, is no longer the bytes indexed, or is a link out of the folder it was indexed in."""
    record = web.stored(image_id)
    if is_dicomweb_url(record.path):
        raise HTTPException(404, f"image {image_id} is stored in a DICOMweb archive; open its url there")
    gone = HTTPException(410, f"the file of image {image_id} is no longer the file indexed")
    # a link may move the file within its folder, not swap in one from elsewhere (a system file)
    real, folder = os.path.realpath(record.path), os.path.realpath(os.path.dirname(record.path))
    if os.path.commonpath([real, folder]) != folder:
        raise gone
    try:
        with web.decoding():  # the whole file is held in memory: as many at once as decodes
            data = read_bytes(real)
    except ReadError:
        raise gone from None
    # the bytes sent are the bytes hashed: one read, so nothing can be swapped in between
    if hashlib.sha256(data).hexdigest() != record.sha256:
        raise gone
    return Response(data, media_type="application/octet-stream",
                    headers={"content-disposition": attachment(public_name(record.path) or "file")})


def attachment(filename: str) -> str:
    """A Content-Disposition header naming ``filename`` (RFC 6266, as Starlette's FileResponse does)."""
    quoted = quote(filename)
    return f'attachment; filename="{filename}"' if quoted == filename else f"attachment; filename*=utf-8''{quoted}"
