"""What stands between the web app and the network: token, Host check, body limit, slow
clients, path scrubbing.

Everything here is plain ASGI middleware or a plain function, so it is independent of the
FastAPI version and can be tested without a model, except :class:`SlowClientProtocol`, the
uvicorn connection class ``lungcbir serve`` runs with. :func:`lungcbir.web.create_app` puts the
middleware around the app in this order (outermost first): Host check, token check, body
size limit; a refused request is answered before any of its body is read.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import os
import re
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable, Iterable, Mapping

import anyio
import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from . import config
from .errors import LungCBIRError

Scope = dict
Message = dict
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: Environment variable holding the access token (``--token-file`` takes precedence).
TOKEN_ENV = config.TOKEN_ENV
#: Shortest token accepted: a guessable token is no protection.
MIN_TOKEN_LENGTH = 16
#: Host names a local server answers to when no ``--allowed-host`` is given.
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
#: Paths anyone may fetch without a token: the page itself (it asks for the token), its static
#: files, the API description and the health check. Everything else, ``/api/...`` included,
#: needs the token, so a route added later is protected by default.
OPEN_PATHS = frozenset({"/", "/healthz", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json",
                        "/favicon.ico"})
OPEN_PREFIXES = ("/static/", "/static-docs/")
#: Seconds an idle kept-alive connection stays open between requests (uvicorn's default).
KEEP_ALIVE_SECONDS = 5


@dataclass(frozen=True)
class WebSettings:
    """How the server protects itself; the defaults suit a server on the loopback interface.

    ``token``: required as ``Authorization: Bearer <token>`` on every non-open path (None: no
    authentication). ``allowed_hosts``: accepted ``Host`` header names (``*.example.org``
    matches sub-domains). ``max_upload_bytes``: largest uploaded file; the whole request body
    may be ``form_overhead_bytes`` larger (multipart boundaries and form fields).
    ``max_decodes``: uploads or stored files decoded at the same time (each may take a few
    hundred MB while it is decoded). ``decode_wait_seconds``: how long a request waits for a
    decoding slot before it is answered 503. ``header_seconds``: how long a client may take to
    send a request's headers (:class:`SlowClientProtocol`); ``body_seconds``: how long in all
    the server may wait for a request's body (:class:`BodySizeLimit`); 408 after either.
    ``viewer_url``: a template such as
    ``https://pacs.example.org/ohif/viewer?StudyInstanceUIDs={study_uid}`` (checked by
    :func:`check_viewer_template`). ``archive_url``: a DICOMweb root the page may fetch a query
    series from (``/?study=UID&series=UID``, a viewer's launch link); None: no such launch.
    """

    token: str | None = field(default=None, repr=False)  # never shown in a log or traceback
    allowed_hosts: tuple[str, ...] = LOOPBACK_NAMES
    max_upload_bytes: int = 64 * 1024 * 1024
    form_overhead_bytes: int = 1024 * 1024
    max_decodes: int = 2
    decode_wait_seconds: float = 120.0
    header_seconds: float = 10.0
    body_seconds: float = 120.0
    #: link to open a result's study in the site's viewer (see :func:`viewer_link`); None: no link
    viewer_url: str | None = None
    #: DICOMweb root of ``/api/query-archive`` (credentials from LUNGCBIR_DICOMWEB_*); None: off
    archive_url: str | None = None

    @property
    def max_body_bytes(self) -> int:
        return self.max_upload_bytes + self.form_overhead_bytes


# ---------------------------------------------------------------------------------------------
# configuration checks, used by ``lungcbir serve``


def load_token(token_file: str | None, environ: Mapping[str, str] | None = None) -> str | None:
    """The access token from ``token_file`` or else ``$LUNGCBIR_TOKEN``; None when neither is set.

    The one place the token is read. Raises :class:`LungCBIRError` (exit status 2) for an
    unreadable file or a token that is too short or not a single printable word; the
    message never contains the token.
    """
    if token_file:
        try:
            text = Path(token_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            reason = error.strerror if isinstance(error, OSError) else "not UTF-8 text"
            raise LungCBIRError(f"{token_file}: cannot read the token file ({reason})") from None
        source = token_file
    elif (from_environment := config.Settings.from_environment(environ).token) is not None:
        text, source = from_environment, TOKEN_ENV
    else:
        return None
    token = text.strip()
    if len(token) < MIN_TOKEN_LENGTH:
        raise LungCBIRError(f"{source}: the token must be at least {MIN_TOKEN_LENGTH} characters "
                            "(make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))')")
    if not (token.isascii() and token.isprintable()) or any(c.isspace() for c in token):
        raise LungCBIRError(f"{source}: the token must be one word of printable ASCII characters")
    return token


def token_file_warning(token_file: str | None) -> str | None:
    """A one-line warning when the token file may be read by other users (it should be chmod 600)."""
    if not token_file or os.name != "posix":
        return None
    mode = os.stat(token_file).st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        return f"warning: {token_file} can be read by other users; chmod 600 it"
    return None


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, token: str | None, insecure: bool) -> None:
    """Refuse to listen beyond the loopback interface without a token (unless ``insecure``)."""
    if token is None and not insecure and not is_loopback(host):
        raise LungCBIRError(f"refusing to serve on {host} without authentication: give --token-file FILE "
                            f"(or ${TOKEN_ENV}), or --insecure to serve without it")


def default_allowed_hosts(host: str, extra: Iterable[str] = ()) -> tuple[str, ...]:
    """Host header names to accept: ``extra`` if given, else the loopback names plus ``host``.

    ``host`` is added unless it is a wildcard address (0.0.0.0, ::): the names clients use
    for such a server are not known here and must be given with ``--allowed-host``.
    """
    extra = tuple(name.strip().strip("[]").lower() for name in extra if name.strip())
    if extra:
        return extra
    names = list(LOOPBACK_NAMES)
    own = host.strip().strip("[]").lower()
    if own and own not in ("0.0.0.0", "::") and own not in names:
        names.append(own)
    return tuple(names)


# ---------------------------------------------------------------------------------------------
# middleware


async def send_json(send: Send, status: int, detail: str, headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
    """Answer with ``{"detail": ...}`` like every other error of the API."""
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"), *headers]})
    await send({"type": "http.response.body", "body": body})


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def host_name(header: str | None) -> str | None:
    """The name of a ``Host`` header without port and IPv6 brackets, lowercased; None if malformed."""
    if not header:
        return None
    header = header.strip().lower()
    if header.startswith("["):
        end = header.find("]")
        rest = header[end + 1:] if end > 0 else "x"
        if end < 0 or (rest and not re.fullmatch(r":\d{1,5}", rest)):
            return None
        return header[1:end]
    name, _, port = header.partition(":")
    if port and not port.isdigit() or not re.fullmatch(r"[a-z0-9._-]+", name):
        return None
    return name


class HostCheck:
    """Answer 400 unless the ``Host`` header names this server (defeats DNS rebinding)."""

    def __init__(self, app: ASGIApp, allowed_hosts: Iterable[str]) -> None:
        self.app = app
        self.allowed = [name.strip().strip("[]").lower() for name in allowed_hosts]

    def allows(self, name: str | None) -> bool:
        if name is None:
            return False
        return any(name == pattern or (pattern.startswith("*.") and name.endswith(pattern[1:]))
                   for pattern in self.allowed)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and not self.allows(host_name(_header(scope, b"host"))):
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
                return
            await send_json(send, 400, "invalid Host header: this server answers only to its configured "
                                       "names (see --allowed-host)")
            return
        await self.app(scope, receive, send)


class BearerAuth:
    """Answer 401 unless ``Authorization: Bearer <token>`` matches (compared in constant time)."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.token = token.encode()

    @staticmethod
    def is_open(path: str) -> bool:
        return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)

    def authorized(self, header: str | None) -> bool:
        scheme, _, given = (header or "").strip().partition(" ")
        # compare_digest on bytes of any length: its time does not depend on where they differ
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode("latin-1"), self.token)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and not self.is_open(scope["path"]) \
                and not self.authorized(_header(scope, b"authorization")):
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
                return
            await send_json(send, 401, "missing or wrong access token: send 'Authorization: Bearer <token>'",
                            [(b"www-authenticate", b"Bearer")])
            return
        await self.app(scope, receive, send)


class _BodyRefused(Exception):
    pass


def _size(count: int) -> str:
    """A byte count as people write limits: whole MiB when it is one, else bytes."""
    return f"{count // 2**20} MiB" if count >= 2**20 and count % 2**20 == 0 else f"{count} bytes"


class BodySizeLimit:
    """Answer 413 for a request body over ``max_bytes``, before it is parsed or spooled to disk,
    and 408 for one the client takes longer than ``max_seconds`` in all to send.

    A ``Content-Length`` over the limit is refused before a byte of the body is read. A body
    without one (chunked) is counted as it arrives; once past the limit the app gets no more
    of it (its parser fails), whatever the app answers is dropped and the client gets 413.
    Only the time spent waiting for the client's bytes counts towards ``max_seconds``, not
    the time the app takes between reads, so a busy server does not time out a fast client.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, max_seconds: float | None = None,
                 upload_bytes: int | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.max_seconds = max_seconds
        # the limit people are told: the upload's (the body may be a little larger: form fields),
        # so the page and the README say the same number
        self.upload_bytes = upload_bytes

    def message(self) -> str:
        if self.upload_bytes is not None:
            return f"the upload is larger than {_size(self.upload_bytes)}"
        return f"request body is larger than {_size(self.max_bytes)}"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = _header(scope, b"content-length")
        if length is not None and (not length.strip().isdigit() or int(length) > self.max_bytes):
            await send_json(send, 413 if length.strip().isdigit() else 400,
                            self.message() if length.strip().isdigit() else "malformed Content-Length")
            return
        received = 0
        waited = 0.0
        complete = False
        refusal: tuple[int, str] | None = None
        started = False

        async def limited_receive() -> Message:
            nonlocal received, waited, complete, refusal
            if refusal is not None:
                raise _BodyRefused
            if complete:  # a later call waits for the client to disconnect, not for its body
                return await receive()
            began = time.monotonic()
            message = None
            with anyio.move_on_after(None if self.max_seconds is None else self.max_seconds - waited):
                message = await receive()
            waited += time.monotonic() - began
            if message is None:
                refusal = (408, f"request body not received within {self.max_seconds:g} s")
                raise _BodyRefused
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                complete = not message.get("more_body", False)
                if received > self.max_bytes:
                    refusal = (413, self.message())
                    raise _BodyRefused
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refusal is not None:  # the app's answer to a body it could not read: ours goes out instead
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if refusal is None or started:
                raise
        if refusal is not None and not started:
            await send_json(send, *refusal)


class SlowClientProtocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a deadline for a request's headers.

    uvicorn's keep-alive timer closes a connection idle between requests, but stops at the
    next request's first byte and has no other, so a client sending its headers a byte at a
    time (slowloris), or nothing at all on a new connection, held it for ever. Here a
    request's headers must be complete within :attr:`header_seconds` of the connection
    opening or of the request's first byte; else the client gets 408 and the connection is
    closed. So is one whose client still trickles a body the server has already answered.
    """

    header_seconds: float = WebSettings.header_seconds
    _header_timer: asyncio.TimerHandle | None = None

    @classmethod
    def with_deadline(cls, header_seconds: float) -> type[SlowClientProtocol]:
        """This protocol with another deadline (uvicorn takes a class and makes one per connection)."""
        return type(cls.__name__, (cls,), {"header_seconds": header_seconds})

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_deadline()

    def data_received(self, data: bytes) -> None:
        if self.timeout_keep_alive_task is not None:  # idle until now: this is a new request's first byte
            self._arm_header_deadline()
        super().data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        super().connection_lost(exc)

    def _arm_header_deadline(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        self._header_timer = self.loop.call_later(self.header_seconds, self._header_deadline)

    def _header_deadline(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        if self.conn.their_state is h11.IDLE:
            if self.timeout_keep_alive_task is not None:
                return  # answered and idle since: the keep-alive timer closes it
            if self.conn.trailing_data[0]:  # part of a request came: say why it is closed
                detail = json.dumps({"detail": f"request headers not received within {self.header_seconds:g} s"})
                self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                                     b"content-length: %d\r\nconnection: close\r\n\r\n%s"
                                     % (len(detail), detail.encode()))
            self.transport.close()
        elif self.conn.our_state in (h11.DONE, h11.MUST_CLOSE):
            self.transport.close()  # answered, and the client still sends a body nobody reads
        # else a request is being answered: its body's deadline is BodySizeLimit's


# ---------------------------------------------------------------------------------------------
# answers

_ROOTED_PATH = re.compile(r"(?<![\w.~/-])/[^\s\"'<>()\[\]{},;]+")


def scrub_paths(text: str, replacements: Mapping[str, str] | None = None) -> str:
    """``text`` without server paths: each key of ``replacements`` (longest first) becomes its
    value, then any remaining '/'-rooted path becomes ``<path>``."""
    replacements = replacements or {}
    for key in sorted(replacements, key=len, reverse=True):
        if key:
            text = text.replace(key, replacements[key])
    return _ROOTED_PATH.sub("<path>", text)


__all__ = ["WebSettings", "load_token", "token_file_warning", "is_loopback", "check_exposure",
           "default_allowed_hosts", "HostCheck", "BearerAuth", "BodySizeLimit", "SlowClientProtocol", "scrub_paths",
           "host_name"]


# ---------------------------------------------------------------------------------------------
# links into the site's own viewer (OHIF, a PACS web viewer)

#: What a viewer link template may name, from the result's stored slice.
VIEWER_FIELDS = ("study_uid", "series_uid", "sop_uid", "patient_id")


def check_viewer_template(template: str) -> str:
    """``template`` if it is an http(s) URL naming ``{study_uid}`` and only :data:`VIEWER_FIELDS`,
    as plain ``{name}`` fields.

    Example:
        >>> check_viewer_template("https://pacs/ohif/viewer?StudyInstanceUIDs={study_uid}")
        'https://pacs/ohif/viewer?StudyInstanceUIDs={study_uid}'
    """
    import string

    if not re.match(r"https?://", template):
        raise LungCBIRError(f"viewer URL {template!r}: must start with http:// or https://")
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as error:
        raise LungCBIRError(f"viewer URL {template!r}: {error}") from None
    named = {name for _, name, _, _ in parts if name is not None}
    # rebuilt from plain {name} fields, a template with a conversion (!r), a format spec or a
    # field nested in one differs: those would fail or misbehave at every request, not here
    plain = "".join(text.replace("{", "{{").replace("}", "}}") + ("" if name is None else "{" + name + "}")
                    for text, name, _, _ in parts)
    if plain != template:
        raise LungCBIRError(f"viewer URL {template!r}: use plain {{name}} fields only "
                            "(no !conversion, :format or nested fields)")
    unknown = named - set(VIEWER_FIELDS)
    if unknown or "study_uid" not in named:
        raise LungCBIRError(f"viewer URL {template!r}: name {{study_uid}} and only "
                            f"{', '.join('{' + f + '}' for f in VIEWER_FIELDS)}")
    return template


def viewer_link(template: str | None, values: Mapping[str, str | None]) -> str | None:
    """The viewer URL for a result (each value URL-quoted), or None when there is no template or
    the result has no study (a non-DICOM file) or lacks another field the template names.

    Example:
        >>> viewer_link("https://pacs/v?StudyInstanceUIDs={study_uid}", {"study_uid": "1.2.3"})
        'https://pacs/v?StudyInstanceUIDs=1.2.3'
        >>> viewer_link("https://pacs/v?StudyInstanceUIDs={study_uid}", {"study_uid": None}) is None
        True
    """
    from urllib.parse import quote

    if template is None:
        return None
    fields = {name: values.get(name) for name in VIEWER_FIELDS}
    if any(not fields[name] for name in VIEWER_FIELDS if "{" + name + "}" in template):
        return None
    return template.format(**{name: quote(str(value), safe="") if value else "" for name, value in fields.items()})
