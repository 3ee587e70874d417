"""The web page and REST API: upload a slice, see its lung mask and the most similar cases.

:func:`create_app` assembles the app: its shared state (:class:`lungcbir.views.state.WebState`),
the routes of :mod:`lungcbir.views` (each answer a pydantic model of
:mod:`lungcbir.views.schemas`, so ``/openapi.json`` documents it), exception handlers,
the page's static files and the security middleware (:mod:`lungcbir.websecurity`).

Route handlers only parse requests and format answers; the work is done by
:class:`lungcbir.retrieval.Retriever`. Stored images are served by database id only, never by
a path taken from the request; answers and error messages never contain tracebacks, server
paths (stored files are named by file name only; the CLI's JSON keeps full paths) or database
URLs.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import __version__
from .errors import LungCBIRError, NoRegionsError, ReadError, RegionError, StoreError, UploadRefused
from .io import CTSlice, decode
from .retrieval import Retriever
from .views import ROUTERS
from .views.state import WebState
from .websecurity import BearerAuth, BodySizeLimit, HostCheck, WebSettings, scrub_paths

__all__ = ["create_app"]

log = logging.getLogger("lungcbir.web")
STATIC = Path(__file__).parent / "web_static"


def _decode_upload(data: bytes, name: str, max_voxels: int | None = None,
                   frame: int | str | None = None) -> list[CTSlice]:
    """Decode an upload with this module's ``decode``, looked up at each call (so it can be
    replaced here, as the tests of bounded decoding do)."""
    return decode(data, name, max_voxels, frame)


def create_app(retriever: Retriever, settings: WebSettings | None = None) -> FastAPI:
    """The FastAPI application around one shared :class:`Retriever`.

    ``settings`` (default: no token, loopback host names only, 64 MiB uploads, 2 decodes at
    a time) says how the app protects itself; see :class:`lungcbir.websecurity.WebSettings`.

    Example:
        >>> import tempfile
        >>> from fastapi.testclient import TestClient
        >>> folder = tempfile.mkdtemp()
        >>> retriever = Retriever(db_url=f"sqlite:///{folder}/db.sqlite", index_dir=f"{folder}/index")
        >>> app = create_app(retriever, WebSettings(token="s3cret-t0ken-of-20-chars"))
        >>> client = TestClient(app, base_url="http://localhost")
        >>> client.get("/healthz").json(), client.get("/api/stats").status_code   # no token: 401
        ({'status': 'ok'}, 401)

    Serve it with ``uvicorn.run(app)``, as ``lungcbir serve`` does.
    """
    settings = settings or WebSettings()
    # Swagger UI and ReDoc from files shipped with fastapi-offline: a hospital network blocks CDNs
    app = FastAPIOffline(title="lungcbir", version=__version__, static_url="/static-docs",
                         swagger_ui_parameters={"validatorUrl": None},
                         description="Lung CT retrieval: upload a slice, get its lung mask and the most similar cases.")
    app.state.lungcbir = WebState(retriever, settings, _decode_upload)

    @app.exception_handler(LungCBIRError)
    async def our_error(_: Request, error: LungCBIRError) -> JSONResponse:
        if isinstance(error, NoRegionsError):  # the store is fine, it holds no regions: say how to make them
            return JSONResponse({"detail": error.advice}, status_code=409)
        if isinstance(error, StoreError):  # its message names files and URLs: keep it in the log
            log.error("%s", error)
            return JSONResponse({"detail": "the image database is not available; see the server log"},
                                status_code=503)
        message = error.reason if isinstance(error, ReadError) else str(error)
        # the client's file or region, not its request
        refused = isinstance(error, (ReadError, UploadRefused, RegionError))
        return JSONResponse({"detail": scrub_paths(message)}, status_code=422 if refused else 400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        detail = scrub_paths(error.detail) if isinstance(error.detail, str) else error.detail
        return JSONResponse({"detail": detail}, status_code=error.status_code, headers=error.headers)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, error: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return JSONResponse({"detail": "internal error; see the server log"}, status_code=500)

    for router in ROUTERS:
        app.include_router(router)

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
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes, max_seconds=settings.body_seconds,
                       upload_bytes=settings.max_upload_bytes)
    if settings.token:
        app.add_middleware(BearerAuth, token=settings.token)
    app.add_middleware(HostCheck, allowed_hosts=settings.allowed_hosts)
    return app


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

    app.openapi = openapi  # type: ignore[method-assign]
