"""The web page and REST API: upload a slice, see its lung mask and the most similar cases.

Route handlers only parse requests and format answers; the work is done by
:class:`lungcbir.retrieval.Retriever`. Stored images are served by database id only, never by
a path taken from the request; error answers never contain tracebacks or file system paths.
"""

from __future__ import annotations

import logging
import os
import secrets
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

from .errors import LungCBIRError, ReadError, StoreError
from .io import CTSlice, RASTER_SUFFIXES, read_file
from .retrieval import QueryResult, Retriever
from .visualize import display_image, mask_png, overlay

log = logging.getLogger("lungcbir.web")
STATIC = Path(__file__).parent / "web_static"
MAX_UPLOAD_BYTES = 64 * 1024 * 1024
UPLOAD_SUFFIXES = {*RASTER_SUFFIXES, ".dcm", ".dicom", ".ima", ".nii", ".gz"}
THUMBNAIL_SIDE = 192
KEPT_RESULTS = 256


@dataclass
class RenderedResult:
    mask: bytes
    overlay: bytes


class ResultCache:
    """Recent query pictures by random token, so the page can fetch them as URLs."""

    def __init__(self, size: int = KEPT_RESULTS) -> None:
        self._items: OrderedDict[str, RenderedResult] = OrderedDict()
        self._lock = threading.Lock()
        self._size = size

    def put(self, item: RenderedResult) -> str:
        token = secrets.token_urlsafe(12)
        with self._lock:
            self._items[token] = item
            while len(self._items) > self._size:
                self._items.popitem(last=False)
        return token

    def get(self, token: str) -> RenderedResult | None:
        with self._lock:
            return self._items.get(token)


def _png(pixels: np.ndarray) -> bytes:
    ok, encoded = cv2.imencode(".png", pixels)
    if not ok:
        raise LungCBIRError("could not encode picture")
    return encoded.tobytes()


def _suffix(filename: str) -> str:
    name = filename.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else os.path.splitext(name)[1]


def create_app(retriever: Retriever) -> FastAPI:
    """The FastAPI application around one shared :class:`Retriever`.

    Example:
        >>> app = create_app(Retriever())   # doctest: +SKIP
        >>> uvicorn.run(app)                # doctest: +SKIP
    """
    app = FastAPI(title="lungcbir", version="0.1.0",
                  description="Lung CT retrieval: upload a slice, get its lung mask and the most similar cases.")
    model_lock = threading.Lock()  # one inference at a time: torch's CPU kernels already use every core
    results = ResultCache()

    @app.exception_handler(LungCBIRError)
    async def our_error(_: Request, error: LungCBIRError) -> JSONResponse:
        if isinstance(error, StoreError):  # its message names files and URLs: keep it in the log
            log.error("%s", error)
            return JSONResponse({"detail": "the image database is not available; see the server log"},
                                status_code=503)
        message = error.reason if isinstance(error, ReadError) else str(error)
        return JSONResponse({"detail": message}, status_code=422 if isinstance(error, ReadError) else 400)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, error: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return JSONResponse({"detail": "internal error; see the server log"}, status_code=500)

    def read_upload(upload: UploadFile) -> CTSlice:
        filename = os.path.basename(upload.filename or "upload")
        suffix = _suffix(filename)
        if suffix not in UPLOAD_SUFFIXES and suffix != ".nii.gz":
            raise HTTPException(415, f"{filename}: unsupported file type; send PNG, JPEG, BMP, TIFF, DICOM or NIfTI")
        data = upload.file.read(MAX_UPLOAD_BYTES + 1)
        if len(data) > MAX_UPLOAD_BYTES:
            raise HTTPException(413, f"{filename}: file is larger than {MAX_UPLOAD_BYTES // 2**20} MiB")
        if not data:
            raise HTTPException(422, f"{filename}: file is empty")
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "upload" + suffix)
            with open(path, "wb") as handle:
                handle.write(data)
            try:
                item = read_file(path)[0]
            except ReadError as error:
                raise HTTPException(422, f"{filename}: {error.reason}") from None
        item.path = filename
        return item

    def render(result: QueryResult) -> str:
        return results.put(RenderedResult(_png(mask_png(result.mask)), _png(overlay(result.query, result.mask))))

    def neighbor_json(neighbor) -> dict:
        return {**neighbor.to_json(), "thumbnail_url": f"/api/images/{neighbor.id}/thumbnail",
                "overlay_url": f"/api/images/{neighbor.id}/overlay"}

    def parse_where(text: str) -> dict[str, str]:
        filters = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, sep, value = part.partition("=")
            if not sep or not key.strip():
                raise HTTPException(422, f"filter {part!r}: expected KEY=VALUE")
            filters[key.strip()] = value.strip()
        return filters

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    @app.post("/api/query")
    def api_query(file: UploadFile = File(...), k: int = Form(5), where: str = Form(""),
                  per_patient: int = Form(1)) -> dict:
        """Upload a slice; get its lung fraction, mask and overlay URLs and the k nearest stored slices."""
        if not 1 <= k <= 100:
            raise HTTPException(422, "k must be between 1 and 100")
        filters = parse_where(where)
        item = read_upload(file)
        with model_lock:
            result = retriever.query_slices([item], k, filters, max(0, per_patient))[0]
        token = render(result)
        return {"query": item.path, "mask": f"/api/results/{token}/mask.png",
                "overlay": f"/api/results/{token}/overlay.png", **result.summary_json(),
                "width": item.shape[1], "height": item.shape[0],
                "neighbors": [neighbor_json(n) for n in result.neighbors]}

    @app.post("/api/segment")
    def api_segment(file: UploadFile = File(...)) -> dict:
        """Upload a slice; get its lung fraction and mask and overlay URLs."""
        item = read_upload(file)
        with model_lock:
            segmentation = retriever.segment_slices([item])[0]
        token = render(QueryResult(item, segmentation.mask, segmentation.lung_fraction, []))
        return {"query": item.path, "mask": f"/api/results/{token}/mask.png",
                "overlay": f"/api/results/{token}/overlay.png",
                **segmentation.summary_json(),
                "width": item.shape[1], "height": item.shape[0]}

    @app.get("/api/results/{token}/{kind}.png", include_in_schema=False)
    def result_picture(token: str, kind: str) -> Response:
        rendered = results.get(token)
        if rendered is None or kind not in ("mask", "overlay"):
            raise HTTPException(404, "result not found (results are kept for the most recent queries only)")
        return Response(getattr(rendered, kind), media_type="image/png")

    def stored(image_id: int):
        record = retriever.store(create=False).records([image_id]).get(image_id)
        if record is None:
            raise HTTPException(404, f"no stored image with id {image_id}")
        return record

    def stored_slice(image_id: int) -> CTSlice:
        stored(image_id)
        try:
            return retriever.stored_slice(image_id)
        except ReadError:
            raise HTTPException(410, f"the file of image {image_id} is no longer readable") from None

    @app.get("/api/images/{image_id}")
    def image_metadata(image_id: int) -> dict:
        """Metadata of one stored slice."""
        record = stored(image_id)
        return {"id": record.id, "path": record.path, "source_format": record.source_format,
                "width": record.width, "height": record.height, "patient_id": record.patient_id,
                "study_uid": record.study_uid, "series_uid": record.series_uid,
                "instance_number": record.instance_number, "slice_location": record.slice_location,
                "slice_index": record.slice_index, "frame": record.frame, "labels": record.labels,
                "lung_fraction": record.lung_fraction, "model_id": record.model_id,
                "indexed_at": record.indexed_at.isoformat() if record.indexed_at else None,
                "thumbnail_url": f"/api/images/{record.id}/thumbnail",
                "overlay_url": f"/api/images/{record.id}/overlay"}

    @app.get("/api/images/{image_id}/thumbnail", responses={200: {"content": {"image/png": {}}}})
    def thumbnail(image_id: int) -> Response:
        """The stored slice in the lung window, at most 192 pixels wide."""
        picture = display_image(stored_slice(image_id))
        scale = THUMBNAIL_SIDE / max(picture.shape)
        if scale < 1:
            picture = cv2.resize(picture, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        return Response(_png(picture), media_type="image/png")

    @app.get("/api/images/{image_id}/overlay", responses={200: {"content": {"image/png": {}}}})
    def stored_overlay(image_id: int) -> Response:
        """The stored slice with its own lung contour."""
        item = stored_slice(image_id)
        with model_lock:
            mask = retriever.segment_slices([item])[0].mask
        return Response(_png(overlay(item, mask)), media_type="image/png")

    @app.get("/api/stats")
    def stats() -> dict:
        """What is in the database and the index."""
        from dataclasses import asdict

        return asdict(retriever.store(create=False).stats())

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
