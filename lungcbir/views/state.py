"""What the web routes share: one :class:`WebState` per app (the retriever, the model lock, the
decode slots, recent result pictures) and the helpers that turn uploads into slices and core
answers into JSON. Nothing here is global: :func:`lungcbir.web.create_app` makes the state and
routes get it with ``Depends(web_state)``.
"""

from __future__ import annotations

import json
import os
import secrets
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Generic, TypeVar

import cv2
import numpy as np
from fastapi import Depends, HTTPException, Request, UploadFile

from ..dicom_seg import SegWritten, dicom_headers
from ..errors import FilterError, LungCBIRError, ReadError
from ..inference import Segmentation
from ..io import MASK_FORMATS, MIDDLE, CTSlice, decode_region_mask, file_suffix, supported_formats, supported_suffixes
from ..quality import Quality
from ..regions import region_bbox
from ..retrieval import Neighbor, Retriever, parse_filters
from ..visualize import display_image, mask_png, outline_region, overlay
from ..websecurity import WebSettings, viewer_link

#: Largest image id asked for (SQL BIGINT); larger ids are unknown (404), not a database error.
MAX_IMAGE_ID = 2**63 - 1
#: File names an upload may have: those of the readers (".gz" too, which the reader refuses with 422).
UPLOAD_SUFFIXES = {*supported_suffixes(), ".gz"}
THUMBNAIL_SIDE = 192
#: Query pictures kept for the page to fetch (the most recent ones).
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
#: Most neighbours one slice query returns.
MAX_K = 100
#: Archive query series kept for their DICOM SEG (the most recent ones): each holds its slices.
KEPT_SERIES = 8


@dataclass
class RenderedResult:
    """A query slice's pictures, made when first asked for (a series keeps every slice, the page
    fetches few): its mask (0/255), its overlay (lung contour and lesion map), its raw pixels
    (:func:`pixel_png`) and its lesion map (0/255; empty without a lesion output); a region
    query's overlay outlines its region."""

    item: CTSlice
    mask_array: np.ndarray
    lesion_array: np.ndarray | None = None
    region_array: np.ndarray | None = None
    _made: dict[str, bytes] = field(default_factory=dict)
    kind: str = field(init=False)

    def __post_init__(self) -> None:
        self.kind = "hu" if self.item.intensity == "hu" else "display"

    def picture(self, name: str) -> bytes:
        """The PNG ``name`` (mask, overlay, pixels or lesion)."""
        if name not in self._made:
            lesion = self.lesion_array
            self._made[name] = {
                "mask": lambda: png(mask_png(self.mask_array)),
                "overlay": lambda: png(self._overlay()),
                "pixels": lambda: pixel_png(self.item)[0],
                "lesion": lambda: png(mask_png(lesion if lesion is not None else np.zeros_like(self.mask_array))),
            }[name]()
        return self._made[name]

    def _overlay(self) -> np.ndarray:
        picture = overlay(self.item, self.mask_array, self.lesion_array)
        if self.region_array is not None and self.region_array.any():
            x0, y0, x1, y1 = region_bbox(self.region_array)
            outline_region(picture, (x0, y0, x1, y1), self.region_array[y0:y1, x0:x1])
        return picture


@dataclass
class QuerySeries:
    """A DICOM query (a series, or one slice) kept for its DICOM SEG: its slices, the model's
    lung and lesion masks, the slices' DICOM headers (None for a series fetched from the
    server's archive, ``from_archive``: they are fetched again when the SEG is made) and the
    SEG once made (a download and a store-back make it once)."""

    slices: list[CTSlice]
    masks: list[np.ndarray]
    lesions: list[np.ndarray | None]
    headers: list | None
    from_archive: bool
    seg: bytes | None = None
    written: SegWritten | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


T = TypeVar("T")


class ResultCache(Generic[T]):
    """Recent query answers (pictures, series) by random token, so the page can fetch them as URLs."""

    def __init__(self, size: int = KEPT_RESULTS) -> None:
        self._items: OrderedDict[str, T] = OrderedDict()
        self._lock = threading.Lock()
        self._size = size

    def put(self, item: T) -> str:
        token = secrets.token_urlsafe(12)
        with self._lock:
            self._items[token] = item
            while len(self._items) > self._size:
                self._items.popitem(last=False)
        return token

    def get(self, token: str) -> T | None:
        with self._lock:
            return self._items.get(token)


def png(pixels: np.ndarray) -> bytes:
    """A picture as PNG bytes."""
    ok, encoded = cv2.imencode(".png", pixels)
    if not ok:
        raise LungCBIRError("could not encode picture")
    return encoded.tobytes()


def pixel_png(item: CTSlice) -> tuple[bytes, str]:
    """The slice's values as a lossless 16-bit PNG for client-side windowing, and their kind
    (see :data:`PIXEL_KIND_HEADER`)."""
    if item.intensity == "hu":
        values = np.clip(np.round(item.pixels.astype(np.float32) + HU_OFFSET), 0, 65535).astype(np.uint16)
        return png(values), "hu"
    return png(display_image(item).astype(np.uint16)), "display"


def public_name(path: str | None) -> str | None:
    """What the web API shows of a stored file's path: its file name, never server folders."""
    return os.path.basename(path) if path else path


def public_case(case: str) -> str:
    """What the web API shows of a case key (:func:`lungcbir.retrieval.case_key`): a case of
    one file, which has no patient or series, by its file name like the neighbours."""
    kind, _, path = case.partition(":")
    return f"file:{public_name(path)}" if kind == "file" else case


#: Keys of the core's JSON (``to_json`` of :mod:`lungcbir.retrieval`'s answers) that hold a
#: server path or name one, and what the web shows instead.
_PATH_KEYS: dict[str, Callable[[str], str | None]] = {"path": public_name, "query_path": public_name,
                                                      "case": public_case}


def public_json(value: Any) -> Any:
    """The core's JSON as the web shows it: every server path replaced by its public name (the
    one place that does it, so a field added to the core cannot leak a server folder)."""
    if isinstance(value, dict):
        return {key: _PATH_KEYS[key](item) if key in _PATH_KEYS and isinstance(item, str) else public_json(item)
                for key, item in value.items()}
    if isinstance(value, list):
        return [public_json(item) for item in value]
    return value


def upload_name(upload: UploadFile) -> str:
    """An upload's file name without any folders the client sent."""
    return os.path.basename((upload.filename or "upload").replace("\\", "/")) or "upload"


def image_urls(image_id: int) -> dict[str, str]:
    """The URLs of a stored slice's pictures, file and series."""
    base = f"/api/images/{image_id}"
    return {"thumbnail_url": f"{base}/thumbnail", "overlay_url": f"{base}/overlay", "pixels_url": f"{base}/pixels",
            "mask_url": f"{base}/mask.png", "lesion_url": f"{base}/lesion.png", "file_url": f"{base}/file",
            "series_url": f"{base}/series"}


def result_urls(token: str) -> dict[str, str]:
    """The URLs of a query's pictures kept under ``token``."""
    return {"mask": f"/api/results/{token}/mask.png", "overlay": f"/api/results/{token}/overlay.png",
            "pixels": f"/api/results/{token}/pixels.png", "lesion": f"/api/results/{token}/lesion.png"}


def check_k(k: int, most: int = MAX_K, what: str = "") -> None:
    """422 unless 1 <= k <= most."""
    if not 1 <= k <= most:
        raise HTTPException(422, f"k must be between 1 and {most}{what}")


class _Release:
    """Releases a semaphore already acquired, as a ``with`` block."""

    def __init__(self, semaphore: threading.BoundedSemaphore) -> None:
        self._semaphore = semaphore

    def __enter__(self) -> None:
        return None

    def __exit__(self, *_: object) -> None:
        self._semaphore.release()


@dataclass
class WebState:
    """Everything the routes of one app share.

    ``decode`` turns an uploaded file's bytes into slices, in memory; the app passes
    :func:`lungcbir.io.decode` looked up at call time.
    """

    retriever: Retriever
    settings: WebSettings
    decode: Callable[..., list[CTSlice]]  # (data, name, max_voxels, frame), as lungcbir.io.decode
    # one inference at a time: torch's CPU kernels already use every core
    model_lock: threading.Lock = field(default_factory=threading.Lock)
    results: ResultCache[RenderedResult] = field(default_factory=ResultCache)
    series: ResultCache[QuerySeries] = field(default_factory=lambda: ResultCache(KEPT_SERIES))
    decode_slots: threading.BoundedSemaphore = field(init=False)

    def __post_init__(self) -> None:
        # Decoding runs outside the model lock, and one upload may take hundreds of MB while it
        # is decoded: bound how many are decoded at once.
        self.decode_slots = threading.BoundedSemaphore(self.settings.max_decodes)

    def decoding(self) -> _Release:
        """A decoding slot, or 503 when none came free in time."""
        if not self.decode_slots.acquire(timeout=self.settings.decode_wait_seconds):
            raise HTTPException(503, "the server is busy decoding other images; try again shortly")
        return _Release(self.decode_slots)

    def read_upload(self, upload: UploadFile, frame: int | str | None = None) -> list[CTSlice]:
        """Every slice of one uploaded file (a NIfTI volume has many), or the one at ``frame``
        (as :func:`lungcbir.io.decode`), named by its file name; decoded in memory."""
        return self._read_upload(upload, frame)[0]

    def _read_upload(self, upload: UploadFile, frame: int | str | None = None) -> tuple[list[CTSlice], list | None]:
        """:meth:`read_upload`, and the slices' DICOM headers (None for another format), for a SEG."""
        filename = upload_name(upload)
        suffix = file_suffix(filename)
        if suffix not in UPLOAD_SUFFIXES:
            raise HTTPException(415, f"{filename}: unsupported file type; send {supported_formats()}")
        with self.decoding():  # the bytes too: a waiting request keeps its upload on disk, not in memory
            data = self._upload_bytes(upload, filename)
            try:
                items = self.decode(data, filename, self.retriever.settings.max_voxels, frame)
                headers = dicom_headers([(filename, data)], items)
            except ReadError as error:
                raise HTTPException(422, f"{filename}: {error.reason}") from None
            finally:
                del data
        for item in items:
            item.path = filename
        return items, headers

    def _upload_bytes(self, upload: UploadFile, filename: str) -> bytes:
        """An upload's bytes, at most the upload limit (413 above it, 422 when empty); read
        while holding a decode slot (:meth:`decoding`)."""
        limit = self.settings.max_upload_bytes
        data = upload.file.read(limit + 1)
        if len(data) > limit:
            raise HTTPException(413, f"{filename}: file is larger than {limit // 2**20} MiB")
        if not data:
            raise HTTPException(422, f"{filename}: file is empty")
        return data

    def read_mask_upload(self, upload: UploadFile) -> dict[int, np.ndarray]:
        """An uploaded region mask's planes (:func:`lungcbir.io.decode_region_mask`), read within the
        same limits as any upload (size, concurrent decodes, voxels)."""
        filename = upload_name(upload)
        if file_suffix(filename) not in MASK_FORMATS:
            raise HTTPException(415, f"{filename}: a region mask is PNG, TIFF, BMP or NIfTI")
        with self.decoding():
            data = self._upload_bytes(upload, filename)
            try:
                return decode_region_mask(data, filename, self.retriever.settings.max_voxels)
            except ReadError as error:
                raise HTTPException(422, f"{filename}: {error.reason}") from None
            finally:
                del data

    def middle_slice(self, upload: UploadFile) -> tuple[CTSlice, int]:
        """The slice a single-slice route uses of an upload (a volume's middle one) and how many
        slices the file has."""
        item, count, _ = self.middle_slice_and_header(upload)
        return item, count

    def middle_slice_and_header(self, upload: UploadFile) -> tuple[CTSlice, int, list | None]:
        """:meth:`middle_slice`, and its DICOM header in a list (None when it is not DICOM)."""
        items, headers = self._read_upload(upload, MIDDLE)  # a volume decodes only that one
        return items[0], items[0].frames_in_file, headers

    def render(self, item: CTSlice, segmentation: Segmentation, region: np.ndarray | None = None) -> str:
        """Keep a query slice's pictures for the page (made when fetched); the token of their URLs.

        A slice judged ``no-lungs`` shows no lungs and no lesions: a contour drawn around a
        cat's eyes would contradict the verdict beside it."""
        if segmentation.quality == Quality.NO_LUNGS:
            empty = np.zeros_like(segmentation.mask)
            return self.results.put(RenderedResult(item, empty, empty))
        return self.results.put(RenderedResult(item, segmentation.mask, segmentation.lesion_mask, region))

    def neighbors_json(self, neighbors: list[Neighbor]) -> list[dict[str, Any]]:
        """The CLI's neighbour objects plus what a reader of the page needs to identify the slice
        (InstanceNumber, slice location, file name, stored lung fraction) and the URLs of its
        pictures, file and series; keys added by the core (``to_json``) pass through."""
        rows = self.retriever.store(create=False).records([n.id for n in neighbors]) if neighbors else {}
        out = []
        for neighbor in neighbors:
            record = rows.get(neighbor.id)
            extra = {} if record is None else {
                "instance_number": record.instance_number, "slice_location": record.slice_location,
                "study_date": record.study_date, "series_description": record.series_description,
                "identity_source": record.identity_source,
                "source_format": record.source_format, "frame": record.frame,
                "stored_lung_fraction": round(record.lung_fraction, 6), "width": record.width,
                "height": record.height}
            link = viewer_link(self.settings.viewer_url, {"study_uid": neighbor.study_uid, "sop_uid": neighbor.sop_uid,
                                                         "series_uid": neighbor.series_uid,
                                                         "patient_id": neighbor.patient_id})
            urls = image_urls(neighbor.id)
            if neighbor.region is not None:  # the card shows which part of the slice was found
                urls["thumbnail_url"] += f"?region={int(neighbor.region['id'])}"
            out.append({**extra, **public_json(neighbor.to_json()),
                        "file_name": public_name(neighbor.path), **urls,
                        **({"viewer_url": link} if link else {})})
        return out

    def filters(self, where: str, labels: str) -> dict:
        """``where`` (KEY=VALUE,...) and ``labels`` (JSON: key to list of values) as one filter
        (:meth:`lungcbir.retrieval.Retriever.resolve_filters`: case-insensitive; an unknown
        key is refused with 422, so a typing error does not pass for "no similar case")."""
        try:
            pairs = [part.strip() for part in where.split(",") if part.strip()]
            wanted: dict[str, list[str]] = {key: [value] for key, value in parse_filters(pairs).items()}
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
            return self.retriever.resolve_filters(wanted)
        except FilterError as error:
            raise HTTPException(422, str(error)) from None

    def stored(self, image_id: int):
        """The stored row of ``image_id``, or 404."""
        # an id beyond SQL BIGINT cannot be stored: unknown, not a database error
        record = self.retriever.store(create=False).records([image_id]).get(image_id) \
            if 1 <= image_id <= MAX_IMAGE_ID else None
        if record is None:
            raise HTTPException(404, f"no stored image with id {image_id}")
        return record

    def stored_slice(self, image_id: int) -> CTSlice:
        """The stored slice of ``image_id`` read again from its file; 404 unknown, 410 unreadable."""
        self.stored(image_id)
        try:
            with self.decoding():
                return self.retriever.stored_slice(image_id)
        except ReadError:
            raise HTTPException(410, f"the file of image {image_id} is no longer readable") from None


def web_state(request: Request) -> WebState:
    """The app's shared state, for ``Depends``."""
    return request.app.state.lungcbir


#: A route's parameter of the app's shared state.
AppState = Annotated[WebState, Depends(web_state)]
