"""The web page and REST API: upload a slice, see its lung mask and the most similar cases.

Route handlers only parse requests and format answers; the work is done by
:class:`lungcbir.retrieval.Retriever`. Stored images are served by database id only, never by
a path taken from the request; answers and error messages never contain tracebacks, server
paths (stored files are named by file name only; the CLI's JSON keeps full paths) or database
URLs. Token, Host header and body size checks are in :mod:`lungcbir.websecurity`.
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
from starlette.exceptions import HTTPException as StarletteHTTPException
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline

from .dicomweb import is_dicomweb_url
from .errors import LungCBIRError, ReadError, StoreError
from .io import CTSlice, file_suffix, read_file, supported_formats, supported_suffixes
from .retrieval import QueryResult, Retriever
from .visualize import display_image, mask_png, overlay
from .websecurity import BearerAuth, BodySizeLimit, HostCheck, WebSettings, scrub_paths

log = logging.getLogger("lungcbir.web")
STATIC = Path(__file__).parent / "web_static"
#: Largest image id asked for (SQL BIGINT); larger ids are unknown (404), not a database error.
MAX_IMAGE_ID = 2**63 - 1
#: File names an upload may have: those of the readers (".gz" too, which the reader refuses with 422).
UPLOAD_SUFFIXES = {*supported_suffixes(), ".gz"}
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


def public_name(path: str | None) -> str | None:
    """What the web API shows of a stored file's path: its file name, never server folders."""
    return os.path.basename(path) if path else path


def create_app(retriever: Retriever, settings: WebSettings | None = None) -> FastAPI:
    """The FastAPI application around one shared :class:`Retriever`.

    ``settings`` (default: no token, loopback host names only, 64 MiB uploads, 2 decodes at
    a time) says how the app protects itself; see :class:`lungcbir.websecurity.WebSettings`.

    Example:
        >>> app = create_app(Retriever(), WebSettings(token="..."))   # doctest: +SKIP
        >>> uvicorn.run(app)                                          # doctest: +SKIP
    """
    settings = settings or WebSettings()
    # Swagger UI and ReDoc from files shipped with fastapi-offline: a hospital network blocks CDNs
    app = FastAPIOffline(title="lungcbir", version="0.1.0", static_url="/static-docs",
                         swagger_ui_parameters={"validatorUrl": None},
                         description="Lung CT retrieval: upload a slice, get its lung mask and the most similar cases.")
    model_lock = threading.Lock()  # one inference at a time: torch's CPU kernels already use every core
    # Decoding runs outside the model lock, and one upload may take hundreds of MB while it is
    # decoded: bound how many are decoded at once.
    decode_slots = threading.BoundedSemaphore(settings.max_decodes)
    results = ResultCache()

    @app.exception_handler(LungCBIRError)
    async def our_error(_: Request, error: LungCBIRError) -> JSONResponse:
        if isinstance(error, StoreError):  # its message names files and URLs: keep it in the log
            log.error("%s", error)
            return JSONResponse({"detail": "the image database is not available; see the server log"},
                                status_code=503)
        message = error.reason if isinstance(error, ReadError) else str(error)
        return JSONResponse({"detail": scrub_paths(message)}, status_code=422 if isinstance(error, ReadError) else 400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        detail = scrub_paths(error.detail) if isinstance(error.detail, str) else error.detail
        return JSONResponse({"detail": detail}, status_code=error.status_code, headers=error.headers)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, error: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return JSONResponse({"detail": "internal error; see the server log"}, status_code=500)

    def decoding():
        """A decoding slot, or 503 when none came free in time."""
        if not decode_slots.acquire(timeout=settings.decode_wait_seconds):
            raise HTTPException(503, "the server is busy decoding other images; try again shortly")
        return _Release(decode_slots)

    def read_upload(upload: UploadFile) -> CTSlice:
        filename = os.path.basename((upload.filename or "upload").replace("\\", "/")) or "upload"
        suffix = file_suffix(filename)
        if suffix not in UPLOAD_SUFFIXES:
            raise HTTPException(415, f"{filename}: unsupported file type; send {supported_formats()}")
        limit = settings.max_upload_bytes
        with decoding():  # the bytes too: a waiting request keeps its upload on disk, not in memory
            data = upload.file.read(limit + 1)
            if len(data) > limit:
                raise HTTPException(413, f"{filename}: file is larger than {limit // 2**20} MiB")
            if not data:
                raise HTTPException(422, f"{filename}: file is empty")
            with tempfile.TemporaryDirectory() as folder:
                path = os.path.join(folder, "upload" + suffix)
                with open(path, "wb") as handle:
                    handle.write(data)
                del data
                try:
                    item = read_file(path)[0]
                except ReadError as error:
                    # readers quote the file they failed on: that is our temporary file, not the client's
                    reason = scrub_paths(error.reason, {path: filename, folder: "", tempfile.gettempdir(): ""})
                    raise HTTPException(422, f"{filename}: {reason}") from None
        item.path = filename
        return item

    def render(result: QueryResult) -> str:
        return results.put(RenderedResult(_png(mask_png(result.mask)), _png(overlay(result.query, result.mask))))

    def neighbor_json(neighbor) -> dict:
        return {**neighbor.to_json(), "path": public_name(neighbor.path),
                "thumbnail_url": f"/api/images/{neighbor.id}/thumbnail",
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
                  per_patient: int = Form(1), other_patients: bool = Form(False)) -> dict:
        """Upload a slice; get its lung fraction, mask and overlay URLs and the k nearest stored slices.

        ``other_patients``: leave out the query's own patient (of its stored copy, or its DICOM PatientID)."""
        if not 1 <= k <= 100:
            raise HTTPException(422, "k must be between 1 and 100")
        filters = parse_where(where)
        item = read_upload(file)
        with model_lock:
            result = retriever.query_slices([item], k, filters, max(0, per_patient), other_patients)[0]
        token = render(result)
        return {"query": item.path, "mask": f"/api/results/{token}/mask.png",
                "overlay": f"/api/results/{token}/overlay.png", "lung_fraction": round(result.lung_fraction, 6),
                "width": item.shape[1], "height": item.shape[0],
                "neighbors": [neighbor_json(n) for n in result.neighbors]}

    @app.post("/api/query-together")
    def api_query_together(files: list[UploadFile] = File(...), unlike: list[UploadFile] = File([]),
                           k: int = Form(5), where: str = Form(""), per_patient: int = Form(1),
                           other_patients: bool = Form(False)) -> dict:
        """Upload several slices (``files``) and optionally ``unlike`` ones; one search with the mean
        of their vectors ("more like these, less like that"). The examples themselves are never returned."""
        if not 1 <= k <= 100:
            raise HTTPException(422, "k must be between 1 and 100")
        filters = parse_where(where)
        examples, disliked = [read_upload(f) for f in files], [read_upload(f) for f in unlike]
        with model_lock:
            result = retriever.query_together(examples, disliked, k, filters, max(0, per_patient), other_patients)
        return {"queries": [item.path for item in examples], "unlike": [item.path for item in disliked],
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
                "lung_fraction": round(segmentation.lung_fraction, 6),
                "width": item.shape[1], "height": item.shape[0]}

    @app.get("/api/results/{token}/{kind}.png", include_in_schema=False)
    def result_picture(token: str, kind: str) -> Response:
        rendered = results.get(token)
        if rendered is None or kind not in ("mask", "overlay"):
            raise HTTPException(404, "result not found (results are kept for the most recent queries only)")
        return Response(getattr(rendered, kind), media_type="image/png")

    def stored(image_id: int):
        # an id beyond SQL BIGINT cannot be stored: unknown, not a database error
        record = retriever.store(create=False).records([image_id]).get(image_id) \
            if 1 <= image_id <= MAX_IMAGE_ID else None
        if record is None:
            raise HTTPException(404, f"no stored image with id {image_id}")
        return record

    def stored_slice(image_id: int) -> CTSlice:
        stored(image_id)
        try:
            with decoding():
                return retriever.stored_slice(image_id)
        except ReadError:
            raise HTTPException(410, f"the file of image {image_id} is no longer readable") from None

    @app.get("/api/images/{image_id}")
    def image_metadata(image_id: int) -> dict:
        """Metadata of one stored slice."""
        record = stored(image_id)
        return {"id": record.id, "path": public_name(record.path), "source_format": record.source_format,
                "width": record.width, "height": record.height, "patient_id": record.patient_id,
                "study_uid": record.study_uid, "series_uid": record.series_uid, "sop_uid": record.sop_uid,
                "url": record.path if is_dicomweb_url(record.path) else None,
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
            mask = retriever.stored_masks([(image_id, item)])[0]  # kept in the row; the model only for old rows
        return Response(_png(overlay(item, mask)), media_type="image/png")

    @app.get("/api/stats")
    def stats() -> dict:
        """What is in the database and the index (the database by kind only, never its URL)."""
        from dataclasses import asdict

        answer = asdict(retriever.store(create=False).stats())
        answer["database"] = str(answer.get("database") or "").split(":", 1)[0].split("+", 1)[0] or None
        return answer

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    if settings.token:
        _document_bearer(app)
    # added innermost first: the Host check runs first, then the token, then the body limit,
    # so a refused request is answered before a byte of its body is read
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    if settings.token:
        app.add_middleware(BearerAuth, token=settings.token)
    app.add_middleware(HostCheck, allowed_hosts=settings.allowed_hosts)
    return app


class _Release:
    """Releases a semaphore already acquired, as a ``with`` block."""

    def __init__(self, semaphore: threading.BoundedSemaphore) -> None:
        self._semaphore = semaphore

    def __enter__(self) -> None:
        return None

    def __exit__(self, *_) -> None:
        self._semaphore.release()


def _document_bearer(app: FastAPI) -> None:
    """Declare the bearer token in the OpenAPI description, so /docs has an Authorize button."""

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            schema.setdefault("components", {})["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            for path, operations in schema.get("paths", {}).items():
                if path.startswith("/api/"):
                    for operation in operations.values():
                        operation["security"] = [{"bearer": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
