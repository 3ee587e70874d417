"""The web page and REST API: upload a slice, see its lung mask and the most similar cases.

Route handlers only parse requests and format answers; the work is done by
:class:`lungcbir.retrieval.Retriever`. Stored images are served by database id only, never by
a path taken from the request; answers and error messages never contain tracebacks, server
paths (stored files are named by file name only; the CLI's JSON keeps full paths) or database
URLs. Token, Host header and body size checks are in :mod:`lungcbir.websecurity`.
"""

from __future__ import annotations

import json
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
from .errors import LungCBIRError, ReadError, StoreError, UploadRefused
from .io import CTSlice, file_suffix, read_file, supported_formats, supported_suffixes
from .retrieval import Neighbor, QueryResult, Retriever
from .store import FILTER_COLUMNS
from .uploads import SeriesLimits, read_series
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
#: Raw pixels for the page's window/level: a 16-bit grey PNG of HU + HU_OFFSET for CT in
#: Hounsfield units ("hu"), or of the 8-bit display values (0-255: the stored values of an
#: 8-bit export, min-max scaled otherwise; "display"). The header says which.
PIXEL_KIND_HEADER = "X-Pixel-Kind"
HU_OFFSET = 1024
#: Most cases a whole-series query returns, and best slice pairs shown per case.
MAX_SERIES_K = 20
SERIES_PAIRS = 3
#: A series upload may unpack (ZIP) to this many times the single-upload limit.
SERIES_BYTES_FACTOR = 4


@dataclass
class RenderedResult:
    mask: bytes
    overlay: bytes
    pixels: bytes = b""
    kind: str = "display"


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


def pixel_png(item: CTSlice) -> tuple[bytes, str]:
    """The slice's values as a lossless 16-bit PNG for client-side windowing, and their kind
    (see :data:`PIXEL_KIND_HEADER`)."""
    if item.intensity == "hu":
        values = np.clip(np.round(item.pixels.astype(np.float32) + HU_OFFSET), 0, 65535).astype(np.uint16)
        return _png(values), "hu"
    return _png(display_image(item).astype(np.uint16)), "display"


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
        refused = isinstance(error, (ReadError, UploadRefused))  # the client's file, not its request
        return JSONResponse({"detail": scrub_paths(message)}, status_code=422 if refused else 400)

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

    def read_upload(upload: UploadFile) -> list[CTSlice]:
        """Every slice of one uploaded file (a NIfTI volume has many), named by its file name."""
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
                    items = read_file(path)
                except ReadError as error:
                    # readers quote the file they failed on: that is our temporary file, not the client's
                    reason = scrub_paths(error.reason, {path: filename, folder: "", tempfile.gettempdir(): ""})
                    raise HTTPException(422, f"{filename}: {reason}") from None
        for item in items:
            item.path = filename
        return items

    def render(result: QueryResult) -> str:
        pixels, kind = pixel_png(result.query)
        return results.put(RenderedResult(_png(mask_png(result.mask)), _png(overlay(result.query, result.mask)),
                                          pixels, kind))

    def result_urls(token: str) -> dict:
        return {"mask": f"/api/results/{token}/mask.png", "overlay": f"/api/results/{token}/overlay.png",
                "pixels": f"/api/results/{token}/pixels.png"}

    def neighbors_json(neighbors: list[Neighbor]) -> list[dict]:
        """The CLI's neighbour objects plus what a reader of the page needs to identify the slice
        (InstanceNumber, slice location, file name, stored lung fraction) and the URLs of its
        pictures, file and series; keys added by the core (``to_json``) pass through."""
        rows = retriever.store(create=False).records([n.id for n in neighbors]) if neighbors else {}
        out = []
        for neighbor in neighbors:
            record = rows.get(neighbor.id)
            base = f"/api/images/{neighbor.id}"
            extra = {} if record is None else {
                "instance_number": record.instance_number, "slice_location": record.slice_location,
                "source_format": record.source_format, "frame": record.frame,
                "stored_lung_fraction": round(record.lung_fraction, 6), "width": record.width,
                "height": record.height}
            out.append({**extra, **neighbor.to_json(), "path": public_name(neighbor.path),
                        "file_name": public_name(neighbor.path), "thumbnail_url": f"{base}/thumbnail",
                        "overlay_url": f"{base}/overlay", "pixels_url": f"{base}/pixels",
                        "mask_url": f"{base}/mask.png", "file_url": f"{base}/file", "series_url": f"{base}/series"})
        return out

    def filters_from(where: str, labels: str) -> dict:
        """``where`` (KEY=VALUE,...) and ``labels`` (JSON: key to list of values) as one filter.

        Keys and values are matched to the stored ones case-insensitively (a value may match
        several stored spellings); a key that is neither a stored label nor a metadata column
        is refused (422), so a typing error does not pass for "no similar case".
        """
        wanted: dict[str, list[str]] = {key: [value] for key, value in parse_where(where).items()}
        if labels.strip():
            try:
                chosen = json.loads(labels)
            except ValueError:
                raise HTTPException(422, "labels: expected a JSON object of key: [values]") from None
            if not isinstance(chosen, dict):
                raise HTTPException(422, "labels: expected a JSON object of key: [values]")
            for key, values in chosen.items():
                values = values if isinstance(values, list) else [values]
                if values:
                    wanted.setdefault(str(key), []).extend(str(v) for v in values)
        if not wanted:
            return {}
        stored_labels = retriever.store(create=False).label_values()
        keys = {key.lower(): key for key in stored_labels}
        filters: dict = {}
        for key, values in wanted.items():
            if key.lower() in keys:
                real = keys[key.lower()]
                spellings: dict[str, list[str]] = {}
                for value in stored_labels[real]:
                    spellings.setdefault(value.lower(), []).append(value)
                matched = [s for v in values for s in spellings.get(v.lower(), [v])]
            elif key.lower() in FILTER_COLUMNS:
                real, matched = key.lower(), values
            else:
                known = ", ".join([*stored_labels, *FILTER_COLUMNS])
                raise HTTPException(422, f"unknown label key {key!r}; known keys: {known}")
            filters[real] = sorted(set(matched)) if len(set(matched)) > 1 else matched[0]
        return filters

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
                  per_patient: int = Form(1), other_patients: bool = Form(False), labels: str = Form("")) -> dict:
        """Upload a slice; get its lung fraction, mask and overlay URLs and the k nearest stored slices.

        A volume (NIfTI) is queried by its middle slice, and the answer says so (``frame``,
        ``slices_in_file``, ``note``); ``/api/query-series`` queries the whole volume.
        ``labels`` (JSON ``{"key": ["value", ...]}``) filters like ``where``, several values
        per key, case-insensitive. ``other_patients``: leave out the query's own patient (of its
        stored copy, or its DICOM PatientID).
        """
        if not 1 <= k <= 100:
            raise HTTPException(422, "k must be between 1 and 100")
        filters = filters_from(where, labels)
        items = read_upload(file)
        item = items[len(items) // 2]
        with model_lock:
            result = retriever.query_slices([item], k, filters, max(0, per_patient), other_patients)[0]
        token = render(result)
        volume = {}
        if len(items) > 1:
            volume = {"note": f"{item.path} is a volume of {len(items)} slices: slice {item.frame + 1} (the middle "
                              "one) was queried; query the whole series to use them all"}
        return {"query": item.path, **result_urls(token), **result.summary_json(),
                "width": item.shape[1], "height": item.shape[0], "frame": item.frame,
                "slices_in_file": len(items), **volume, "query_tags": query_tags(item),
                "neighbors": neighbors_json(result.neighbors)}

    def query_tags(item: CTSlice) -> dict:
        """What the query file itself says about where it comes from (DICOM tags; None when unknown)."""
        return {"source_format": item.source_format, "patient_id": item.patient_id, "study_uid": item.study_uid,
                "series_uid": item.series_uid, "instance_number": item.instance_number,
                "slice_location": item.slice_location}

    @app.post("/api/query-series")
    def api_query_series(files: list[UploadFile] = File(...), k: int = Form(5), where: str = Form(""),
                               labels: str = Form("")) -> dict:
        """Upload a whole series (several files, a ZIP of them, or a NIfTI volume); get stored
        cases ranked as ``query --by-series`` ranks them, each with its best-matching slice pairs.

        Bounded: at most :data:`lungcbir.uploads.MAX_SERIES_FILES` files and 4x the upload
        limit once unpacked; ZIP sizes are checked before anything is extracted.
        """
        if not 1 <= k <= MAX_SERIES_K:
            raise HTTPException(422, f"k must be between 1 and {MAX_SERIES_K} for a series")
        filters = filters_from(where, labels)
        limits = SeriesLimits(max_bytes=SERIES_BYTES_FACTOR * settings.max_upload_bytes)
        with decoding():
            blobs, used = [], 0
            for upload in files:
                name = os.path.basename((upload.filename or "upload").replace("\\", "/")) or "upload"
                data = upload.file.read(settings.max_upload_bytes + 1)
                used += len(data)
                if used > settings.max_upload_bytes:
                    raise HTTPException(413, f"the upload is larger than {settings.max_upload_bytes // 2**20} MiB")
                blobs.append((name, data))
            slices, failures = read_series(blobs, limits)
        with model_lock:
            matches = retriever.query_series(slices, k, filters, pairs=SERIES_PAIRS)
            used_slices = sorted({number for match in matches for number, _ in match.pairs})
            segmentations = retriever.segment_slices([slices[n] for n in used_slices]) if used_slices else []
        rendered = {}
        for number, segmentation in zip(used_slices, segmentations):
            item = slices[number]
            rendered[number] = {"query_slice": number, "name": item.path, "frame": item.frame,
                                "instance_number": item.instance_number,
                                "lung_fraction": round(segmentation.lung_fraction, 6),
                                **result_urls(render(QueryResult(item, segmentation.mask,
                                                                 segmentation.lung_fraction, [])))}
        pairs = neighbors_json([n for match in matches for _, n in match.pairs])
        cases, at = [], 0
        for match in matches:
            shown = []
            for number, _ in match.pairs:
                shown.append({"query": rendered[number], "neighbor": pairs[at]})
                at += 1
            cases.append({"rank": match.rank, "case": match.case, "patient_id": match.patient_id,
                          "series_uid": match.series_uid, "score": round(match.score, 6), "pairs": shown})
        names = sorted({item.path for item in slices})
        return {"query": names[0] if len(names) == 1 else f"{len(names)} files", "slices": len(slices),
                "failed": [{"file": f.path, "reason": scrub_paths(f.reason)} for f in failures], "cases": cases}

    @app.post("/api/query-together")
    def api_query_together(files: list[UploadFile] = File(...), unlike: list[UploadFile] = File([]),
                           k: int = Form(5), where: str = Form(""), per_patient: int = Form(1),
                           other_patients: bool = Form(False)) -> dict:
        """Upload several slices (``files``) and optionally ``unlike`` ones; one search with the mean
        of their vectors ("more like these, less like that"). The examples themselves are never returned."""
        if not 1 <= k <= 100:
            raise HTTPException(422, "k must be between 1 and 100")
        filters = filters_from(where, "")

        def middle(upload: UploadFile) -> CTSlice:  # a volume takes part by its middle slice, as in /api/query
            items = read_upload(upload)
            return items[len(items) // 2]

        examples, disliked = [middle(f) for f in files], [middle(f) for f in unlike]
        with model_lock:
            result = retriever.query_together(examples, disliked, k, filters, max(0, per_patient), other_patients)
        return {"queries": [item.path for item in examples], "unlike": [item.path for item in disliked],
                "neighbors": neighbors_json(result.neighbors)}

    @app.post("/api/segment")
    def api_segment(file: UploadFile = File(...)) -> dict:
        """Upload a slice; get its lung fraction and mask and overlay URLs."""
        items = read_upload(file)
        item = items[len(items) // 2]
        with model_lock:
            segmentation = retriever.segment_slices([item])[0]
        token = render(QueryResult(item, segmentation.mask, segmentation.lung_fraction, []))
        return {"query": item.path, **result_urls(token), "frame": item.frame, "slices_in_file": len(items),
                **segmentation.summary_json(),
                "width": item.shape[1], "height": item.shape[0]}

    @app.get("/api/results/{token}/{kind}.png", include_in_schema=False)
    def result_picture(token: str, kind: str) -> Response:
        rendered = results.get(token)
        if rendered is None or kind not in ("mask", "overlay", "pixels"):
            raise HTTPException(404, "result not found (results are kept for the most recent queries only)")
        headers = {PIXEL_KIND_HEADER: rendered.kind} if kind == "pixels" else None
        return Response(getattr(rendered, kind), media_type="image/png", headers=headers)

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
                "file_name": public_name(record.path),
                "thumbnail_url": f"/api/images/{record.id}/thumbnail",
                "overlay_url": f"/api/images/{record.id}/overlay", "pixels_url": f"/api/images/{record.id}/pixels",
                "mask_url": f"/api/images/{record.id}/mask.png", "file_url": f"/api/images/{record.id}/file",
                "series_url": f"/api/images/{record.id}/series"}

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

    @app.get("/api/images/{image_id}/pixels", responses={200: {"content": {"image/png": {}}}})
    def stored_pixels(image_id: int) -> Response:
        """The stored slice at full resolution as a 16-bit grey PNG for windowing: HU + 1024 when
        the header X-Pixel-Kind is "hu", 8-bit display values (0-255) when it is "display"."""
        data, kind = pixel_png(stored_slice(image_id))
        return Response(data, media_type="image/png", headers={PIXEL_KIND_HEADER: kind})

    @app.get("/api/images/{image_id}/mask.png", responses={200: {"content": {"image/png": {}}}})
    def stored_mask(image_id: int) -> Response:
        """The stored slice's lung mask (0/255, the slice's own size)."""
        item = stored_slice(image_id)
        with model_lock:
            mask = retriever.stored_masks([(image_id, item)])[0]
        return Response(_png(mask_png(mask)), media_type="image/png")

    @app.get("/api/images/{image_id}/file")
    def stored_file(image_id: int) -> Response:
        """The stored slice's original file, named by its file name only (an archive's
        instances are not served here: open their ``url`` in the archive)."""
        record = stored(image_id)
        if is_dicomweb_url(record.path):
            raise HTTPException(404, f"image {image_id} is stored in a DICOMweb archive; open its url there")
        if not os.path.isfile(record.path):
            raise HTTPException(410, f"the file of image {image_id} is no longer readable")
        return FileResponse(record.path, filename=public_name(record.path), media_type="application/octet-stream")

    @app.get("/api/images/{image_id}/series")
    def stored_series(image_id: int) -> dict:
        """The ids of the stored slices of this slice's series (or volume), in slice order."""
        stored(image_id)
        ids = retriever.store(create=False).series_members(image_id)
        return {"id": image_id, "ids": ids, "position": ids.index(image_id) if image_id in ids else None}

    @app.get("/api/labels")
    def stored_labels() -> dict:
        """Stored label keys with their values (for filter drop-downs) and the metadata columns a
        filter may also name."""
        return {"labels": retriever.store(create=False).label_values(), "columns": list(FILTER_COLUMNS)}

    @app.get("/api/stats")
    def stats() -> dict:
        """What is in the database and the index (the database by kind only, never its URL)."""
        from dataclasses import asdict

        answer = asdict(retriever.store(create=False).stats())
        answer["database"] = str(answer.get("database") or "").split(":", 1)[0].split("+", 1)[0] or None
        return answer

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> FileResponse:
        return FileResponse(STATIC / "favicon.ico", media_type="image/x-icon")

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
