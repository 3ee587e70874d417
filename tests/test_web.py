"""The REST API through FastAPI's test client: every endpoint and its error answers."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from fastapi.testclient import TestClient

from lungcbir.errors import LungCBIRError
from lungcbir.retrieval import Retriever
from lungcbir.web import create_app

LOCAL = "http://localhost"  # the test client's default Host, "testserver", is not an allowed name


@pytest.fixture
def retriever(phantom_dir, tiny_weights, store_paths):
    retriever = Retriever(weights=tiny_weights, **store_paths)
    retriever.index_dataset([phantom_dir / "dicom"])
    return retriever


@pytest.fixture
def client(retriever):
    return TestClient(create_app(retriever), base_url=LOCAL, raise_server_exceptions=False)


@pytest.fixture
def bundled_retriever(phantom_dir, bundled_weights, store_paths):
    """The phantom's DICOM series indexed with the bundled model: series queries pair slices by
    lung level, which needs masks that find the lungs (a random network finds none)."""
    retriever = Retriever(weights=bundled_weights, **store_paths)
    retriever.index_dataset([phantom_dir / "dicom"])
    return retriever


@pytest.fixture
def bundled_client(bundled_retriever):
    return TestClient(create_app(bundled_retriever), base_url=LOCAL, raise_server_exceptions=False)


def png_bytes(pixels=None) -> bytes:
    pixels = np.tile(np.arange(80, dtype=np.uint8), (80, 1)) if pixels is None else pixels
    return cv2.imencode(".png", pixels)[1].tobytes()


def phantom_png(phantom_dir) -> bytes:
    return (phantom_dir / "png" / "phantom01" / "phantom01_s002.png").read_bytes()


def test_health_page_and_openapi(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    page = client.get("/")
    assert page.status_code == 200 and "Find similar cases" in page.text
    assert client.get("/static/app.js").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    for path in ("/api/query", "/api/segment", "/api/images/{image_id}", "/api/images/{image_id}/thumbnail",
                 "/api/stats", "/healthz"):
        assert path in paths


#: What an answer that is not JSON may be documented as.
NOT_JSON = {"image/png", "application/octet-stream", "application/dicom"}


def test_openapi_documents_a_schema_for_every_answer(client):
    # every JSON answer and error has a response model, so /openapi.json (and
    # /docs) says what each route answers; picture and file routes say their media type
    document = client.get("/openapi.json").json()
    components = document["components"]["schemas"]

    def properties(schema: dict) -> dict:
        if "$ref" in schema:
            schema = components[schema["$ref"].rsplit("/", 1)[1]]
        return schema.get("properties", {})

    json_routes = set()
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            content = operation["responses"]["200"].get("content")
            assert content, (method, path)
            for media, body in content.items():
                if media == "application/json":
                    json_routes.add(path)
                    assert properties(body.get("schema", {})), (method, path, body)
                else:
                    assert media in NOT_JSON, (method, path, media)
            if path.startswith("/api/"):
                error = operation["responses"]["404"]["content"]["application/json"]["schema"]
                assert "detail" in properties(error), (method, path)
    assert {"/healthz", "/api/query", "/api/query-together", "/api/query-series", "/api/segment",
            "/api/images/{image_id}", "/api/images/{image_id}/series", "/api/labels", "/api/stats"} <= json_routes
    assert "neighbors" in properties(components["QueryAnswer"])
    assert components["Neighbor"].get("additionalProperties") is True  # keys added by Neighbor.to_json pass through


def test_query_returns_cli_structure_plus_urls(client, phantom_dir):
    answer = client.post("/api/query", files={"file": ("q.png", phantom_png(phantom_dir), "image/png")},
                         data={"k": "4", "per_patient": "0"}).json()
    assert {"query", "mask", "overlay", "lung_fraction", "neighbors"} <= set(answer)
    assert answer["query"] == "q.png" and len(answer["neighbors"]) == 4
    first = answer["neighbors"][0]
    assert {"rank", "id", "path", "score", "patient_id", "series_uid", "slice_index", "labels"} <= set(first)
    mask = client.get(answer["mask"])
    assert mask.headers["content-type"] == "image/png"
    assert cv2.imdecode(np.frombuffer(mask.content, np.uint8), cv2.IMREAD_UNCHANGED).shape == (96, 96)
    assert client.get(answer["overlay"]).status_code == 200
    meta = client.get(f"/api/images/{first['id']}").json()
    assert meta["patient_id"] in ("PHANTOM01", "PHANTOM02")
    thumbnail = client.get(first["thumbnail_url"])
    assert thumbnail.status_code == 200 and thumbnail.content[:4] == b"\x89PNG"
    assert client.get(first["overlay_url"]).status_code == 200


def test_query_filter(client, phantom_dir):
    answer = client.post("/api/query", files={"file": ("q.png", phantom_png(phantom_dir))},
                         data={"k": "20", "where": "patient_id=PHANTOM02", "per_patient": "0"}).json()
    assert len(answer["neighbors"]) == 6 and {n["patient_id"] for n in answer["neighbors"]} == {"PHANTOM02"}
    bad = client.post("/api/query", files={"file": ("q.png", phantom_png(phantom_dir))}, data={"where": "nokey"})
    assert bad.status_code == 422


def test_segment(client):
    answer = client.post("/api/segment", files={"file": ("s.png", png_bytes())}).json()
    assert 0 <= answer["lung_fraction"] <= 1 and answer["width"] == 80
    assert client.get(answer["mask"]).status_code == 200


def test_stats(client):
    stats = client.get("/api/stats").json()
    assert stats["images"] == 12 and stats["index_vectors"] == 12


@pytest.mark.parametrize("name,content,status,words", [
    ("notes.txt", b"hello", 415, "unsupported file type"),
    ("empty.png", b"", 422, "empty"),
    ("broken.png", b"not really a png", 422, "not a decodable image"),
    ("tiny.png", None, 422, "too small"),
])
def test_bad_uploads_get_clear_4xx(client, name, content, status, words):
    if content is None:
        content = png_bytes(np.zeros((2, 2), np.uint8))
    response = client.post("/api/query", files={"file": (name, content)})
    assert response.status_code == status
    detail = response.json()["detail"]
    assert words in detail and "/tmp" not in detail and "Traceback" not in response.text


def test_upload_too_large(retriever):
    from lungcbir.websecurity import WebSettings

    client = TestClient(create_app(retriever, WebSettings(max_upload_bytes=100)), base_url=LOCAL)
    response = client.post("/api/query", files={"file": ("big.png", png_bytes())})
    assert response.status_code == 413


def test_bad_k_and_unknown_ids(client, phantom_dir):
    assert client.post("/api/query", files={"file": ("q.png", phantom_png(phantom_dir))},
                       data={"k": "0"}).status_code == 422
    assert client.get("/api/images/999999").status_code == 404
    assert client.get("/api/images/999999/thumbnail").status_code == 404
    assert client.get("/api/images/abc").status_code == 422
    assert client.get("/api/results/nope/mask.png").status_code == 404
    assert client.get("/api/images/..%2F..%2Fetc%2Fpasswd").status_code in (404, 422)


def test_internal_errors_do_not_leak(phantom_dir, tiny_weights, tmp_path):
    # a database that does not exist: the stats call fails inside the store
    retriever = Retriever(weights=tiny_weights, db_url=f"sqlite:///{tmp_path}/none.sqlite", index_dir=tmp_path)
    client = TestClient(create_app(retriever), base_url=LOCAL, raise_server_exceptions=False)
    response = client.get("/api/stats")
    assert response.status_code == 503 and "not available" in response.json()["detail"]
    assert str(tmp_path) not in response.text


# ---------------------------------------------------------------------------------------------
# hardening: memory, body size, ids, authentication, Host header, paths, /docs

import asyncio  # noqa: E402
import gzip  # noqa: E402
import re  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402

TOKEN = "s3cret-token-0123456789abcdef"


def asgi_call(app, path: str, headers: list[tuple[bytes, bytes]], chunks, method: str = "POST") -> tuple[int, int]:
    """Drive the ASGI app by hand, feeding the body chunk by chunk: (status, chunks the app pulled)."""
    pulled = 0
    status = None
    chunks = iter(chunks)

    async def receive():
        nonlocal pulled
        try:
            chunk = next(chunks)
        except StopIteration:
            return {"type": "http.request", "body": b"", "more_body": False}
        pulled += 1
        return {"type": "http.request", "body": chunk, "more_body": True}

    async def send(message):
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"host", b"localhost"), *headers], "client": ("127.0.0.1", 1), "server": ("localhost", 80)}
    asyncio.run(app(scope, receive, send))
    return status, pulled


MULTIPART = [(b"content-type", b"multipart/form-data; boundary=XyZ")]
PART_HEAD = (b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\n'
             b"Content-Type: image/png\r\n\r\n")


# item 5: bounded decoding --------------------------------------------------------------------

def test_concurrent_uploads_are_decoded_two_at_a_time(retriever, monkeypatch):
    import lungcbir.web

    real_read = lungcbir.web.decode
    lock = threading.Lock()
    running = peak = 0

    def slow_read(path, *args, **kwargs):
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        try:
            time.sleep(0.3)  # a slow decode: overlapping uploads would all be decoding now
            return real_read(path, *args, **kwargs)
        finally:
            with lock:
                running -= 1

    monkeypatch.setattr(lungcbir.web, "decode", slow_read)
    client = TestClient(create_app(retriever), base_url=LOCAL)
    with ThreadPoolExecutor(6) as pool:
        statuses = list(pool.map(lambda _: client.post("/api/segment", files={"file": ("s.png", png_bytes())})
                                 .status_code, range(6)))
    assert statuses == [200] * 6
    assert 1 <= peak <= 2


def test_decode_slots_are_configurable_and_busy_answers_503(retriever, monkeypatch):
    import lungcbir.web
    from lungcbir.websecurity import WebSettings

    started = threading.Event()
    release = threading.Event()
    real_read = lungcbir.web.decode

    def blocking_read(path, *args, **kwargs):
        started.set()
        release.wait(10)
        return real_read(path, *args, **kwargs)

    monkeypatch.setattr(lungcbir.web, "decode", blocking_read)
    client = TestClient(create_app(retriever, WebSettings(max_decodes=1, decode_wait_seconds=0.2)), base_url=LOCAL)
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(client.post, "/api/segment", files={"file": ("a.png", png_bytes())})
        assert started.wait(10)
        second = client.post("/api/segment", files={"file": ("b.png", png_bytes())})
        release.set()
        assert first.result().status_code == 200
    assert second.status_code == 503 and "busy" in second.json()["detail"]


# item 6: body size limit before the body is read ---------------------------------------------

def test_large_content_length_is_refused_before_reading(retriever):
    status, pulled = asgi_call(create_app(retriever), "/api/query",
                               [*MULTIPART, (b"content-length", str(1500 * 2**20).encode())],
                               [PART_HEAD] + [b"\0" * 2**20] * 80)
    assert status == 413 and pulled == 0


def test_streamed_body_without_length_is_cut_off_at_the_limit(retriever):
    # 200 MiB in 1 MiB chunks, no Content-Length: refused once past 64 MiB + form overhead,
    # before the rest is read (and spooled to a temporary file by the multipart parser)
    status, pulled = asgi_call(create_app(retriever), "/api/query", MULTIPART,
                               [PART_HEAD] + [b"\0" * 2**20] * 200)
    assert status == 413 and pulled <= 64 + 1 + 2


def test_body_limit_middleware_with_a_small_limit():
    from lungcbir.websecurity import BodySizeLimit

    seen = []

    async def inner(scope, receive, send):  # reads the whole body, then answers 200
        while True:
            message = await receive()
            seen.append(len(message.get("body", b"")))
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    limited = BodySizeLimit(inner, max_bytes=1000)
    status, pulled = asgi_call(limited, "/api/query", [], [b"x" * 100] * 50)
    assert status == 413 and pulled == 11 and sum(seen) <= 1000
    seen.clear()
    assert asgi_call(limited, "/api/query", [], [b"x" * 100] * 10)[0] == 200 and sum(seen) == 1000
    seen.clear()
    assert asgi_call(limited, "/api/query", [(b"content-length", b"1001")], [b"x" * 1001]) == (413, 0)
    assert seen == []  # refused without calling the app at all
    # through a real HTTP client: a chunked body (a generator, so no Content-Length)
    client = TestClient(limited, base_url=LOCAL)
    response = client.post("/api/query", content=(b"x" * 100 for _ in range(50)))
    assert response.status_code == 413 and "larger than 1000 bytes" in response.json()["detail"]


# item 11: ids out of range -------------------------------------------------------------------

@pytest.mark.parametrize("image_id", ["9223372036854775808", "99999999999999999999999999", "-9223372036854775809",
                                      "0"])
def test_out_of_range_ids_are_404_not_500(client, image_id):
    for suffix in ("", "/thumbnail", "/overlay"):
        response = client.get(f"/api/images/{image_id}{suffix}")
        assert response.status_code == 404, (suffix, response.text)
        assert "internal error" not in response.text


# item 12: authentication ---------------------------------------------------------------------

@pytest.fixture
def secured(retriever):
    from lungcbir.websecurity import WebSettings

    return TestClient(create_app(retriever, WebSettings(token=TOKEN)), base_url=LOCAL, raise_server_exceptions=False)


def bearer(token: str = TOKEN) -> dict:
    return {"Authorization": f"Bearer {token}"}


def test_api_needs_the_token(secured, phantom_dir):
    for path in ("/api/stats", "/api/images/1", "/api/images/1/thumbnail", "/api/images/1/overlay",
                 "/api/results/abc/mask.png", "/api/seg/abc", "/api/nothing-here"):
        for headers in ({}, bearer("wrong-token-0123456789abcdef"), {"Authorization": TOKEN},
                        {"Authorization": f"Basic {TOKEN}"}, bearer(TOKEN + "x"), bearer(TOKEN[:-1])):
            response = secured.get(path, headers=headers)
            assert response.status_code == 401, (path, headers)
            assert response.headers["www-authenticate"] == "Bearer" and TOKEN not in response.text
    assert secured.get("/api/stats", headers=bearer()).json()["images"] == 12
    upload = {"file": ("q.png", phantom_png(phantom_dir))}
    assert secured.post("/api/query", files=upload).status_code == 401
    answer = secured.post("/api/query", files=upload, data={"k": "2"}, headers=bearer()).json()
    assert secured.get(answer["mask"]).status_code == 401
    assert secured.get(answer["mask"], headers=bearer()).status_code == 200
    assert secured.get(answer["neighbors"][0]["thumbnail_url"], headers=bearer()).status_code == 200


def test_open_paths_without_token(secured):
    assert secured.get("/healthz").json() == {"status": "ok"}
    assert "Find similar cases" in secured.get("/").text  # the page itself asks for the token
    assert secured.get("/static/app.js").status_code == 200
    schema = secured.get("/openapi.json").json()
    assert schema["paths"]["/api/stats"]["get"]["security"] == [{"bearer": []}]


def test_unauthenticated_upload_is_refused_unread(retriever):
    from lungcbir.websecurity import WebSettings

    status, pulled = asgi_call(create_app(retriever, WebSettings(token=TOKEN)), "/api/query", MULTIPART,
                               [PART_HEAD] + [b"\0" * 2**20] * 10)
    assert status == 401 and pulled == 0


def test_token_is_compared_in_constant_time(secured, monkeypatch):
    import hmac

    import lungcbir.websecurity

    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(lungcbir.websecurity.hmac, "compare_digest", lambda a, b: calls.append((a, b)) or real(a, b))
    assert secured.get("/api/stats", headers=bearer()).status_code == 200
    assert calls and calls[-1] == (TOKEN.encode(), TOKEN.encode())


@pytest.fixture
def cli_store(phantom_dir, tiny_weights, tmp_path):
    """``serve`` arguments for a small indexed store, and uvicorn.run replaced by a recorder."""
    store = ["--db", f"sqlite:///{tmp_path}/db.sqlite", "--index-dir", str(tmp_path / "index"),
             "--weights", tiny_weights]
    Retriever(weights=tiny_weights, db_url=store[1], index_dir=store[3]).index_dataset([phantom_dir / "png"])
    return store


@pytest.fixture
def uvicorn_runs(monkeypatch):
    import uvicorn

    runs = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: runs.append((app, options)))
    monkeypatch.delenv("LUNGCBIR_TOKEN", raising=False)
    return runs


def serve(*args, env=None):
    from click.testing import CliRunner

    from lungcbir.cli import main

    return CliRunner().invoke(main, ["serve", *args], env=env)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "cbir.example.org"])
def test_serve_refuses_exposed_host_without_token(cli_store, uvicorn_runs, host):
    result = serve("--host", host, *cli_store)
    assert result.exit_code == 2 and not uvicorn_runs
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "--token-file" in lines[0] and "--insecure" in lines[0] and "Traceback" not in lines[0]


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1"])
def test_serve_on_loopback_needs_no_token(cli_store, uvicorn_runs, host):
    assert serve("--host", host, *cli_store).exit_code == 0 and uvicorn_runs[0][1]["host"] == host


def test_serve_insecure_warns(cli_store, uvicorn_runs):
    result = serve("--host", "0.0.0.0", "--insecure", *cli_store)
    assert result.exit_code == 0 and len(uvicorn_runs) == 1 and "without authentication" in result.output


def test_serve_with_token_file_and_env(cli_store, uvicorn_runs, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    result = serve("--host", "0.0.0.0", "--token-file", str(token_file), "--allowed-host", "cbir.example.org",
                   *cli_store)
    assert result.exit_code == 0, result.output
    assert TOKEN not in result.output
    app, options = uvicorn_runs[-1]
    assert options["host"] == "0.0.0.0" and TOKEN not in repr(options)
    client = TestClient(app, base_url="http://cbir.example.org")
    assert client.get("/api/stats").status_code == 401
    assert client.get("/api/stats", headers=bearer()).status_code == 200
    assert TestClient(app, base_url=LOCAL).get("/healthz").status_code == 400  # only the names given
    # the environment variable, when no file is given
    result = serve("--host", "0.0.0.0", *cli_store, env={"LUNGCBIR_TOKEN": TOKEN})
    assert result.exit_code == 0 and TOKEN not in result.output
    client = TestClient(uvicorn_runs[-1][0], base_url=LOCAL)
    assert client.get("/api/stats", headers=bearer()).status_code == 200


def test_serve_rejects_bad_token_files(cli_store, uvicorn_runs, tmp_path):
    short = tmp_path / "short"
    short.write_text("abc123")
    result = serve("--host", "0.0.0.0", "--token-file", str(short), *cli_store)
    assert result.exit_code == 2 and "at least 16 characters" in result.output and "abc123" not in result.output
    spaced = tmp_path / "spaced"
    spaced.write_text("two words " + TOKEN)
    assert serve("--token-file", str(spaced), *cli_store).exit_code == 2
    result = serve("--token-file", str(tmp_path / "missing"), *cli_store)
    assert result.exit_code == 2 and "cannot read the token file" in result.output
    loose = tmp_path / "loose"
    loose.write_text(TOKEN)
    loose.chmod(0o644)
    result = serve("--token-file", str(loose), *cli_store)
    assert result.exit_code == 0 and "chmod 600" in result.output and TOKEN not in result.output
    assert len(uvicorn_runs) == 1  # only the last one started


def test_settings_never_show_the_token():
    from lungcbir.websecurity import WebSettings

    assert TOKEN not in repr(WebSettings(token=TOKEN)) and TOKEN not in str(WebSettings(token=TOKEN))


# item 13: Host header, paths in answers and errors -------------------------------------------

@pytest.mark.parametrize("host,status", [("localhost", 200), ("localhost:8000", 200), ("127.0.0.1:8000", 200),
                                         ("[::1]:8000", 200), ("LOCALHOST", 200), ("evil.example", 400),
                                         ("evil.example:8000", 400), ("localhost.evil.example", 400),
                                         ("127.0.0.1.nip.io", 400), ("", 400), ("[::1", 400)])
def test_host_header_is_checked(client, host, status):
    response = client.get("/healthz", headers={"host": host})
    assert response.status_code == status, response.text
    if status == 400:
        assert "Host" in response.json()["detail"]
        assert client.get("/api/stats", headers={"host": host}).status_code == 400


def test_allowed_hosts_are_configurable(retriever):
    from lungcbir.websecurity import WebSettings, default_allowed_hosts

    app = create_app(retriever, WebSettings(allowed_hosts=("cbir.example.org", "*.ward.example.org")))
    client = TestClient(app, base_url="http://cbir.example.org")
    assert client.get("/healthz").status_code == 200
    assert client.get("/healthz", headers={"host": "a.ward.example.org:443"}).status_code == 200
    assert client.get("/healthz", headers={"host": "localhost"}).status_code == 400
    assert default_allowed_hosts("0.0.0.0") == ("localhost", "127.0.0.1", "::1")
    assert default_allowed_hosts("cbir.local") == ("localhost", "127.0.0.1", "::1", "cbir.local")
    assert default_allowed_hosts("0.0.0.0", ["CBIR.example.org"]) == ("cbir.example.org",)


ROOTED = re.compile(r"(^|[\s\"'(=:])/\w")


def nifti_header_only() -> bytes:
    import nibabel as nib

    image = nib.Nifti1Image(np.zeros((4, 4, 2), np.int16), np.eye(4))
    return image.to_bytes()[:400]  # the header, the voxels cut off


@pytest.mark.parametrize("name,content", [
    ("scan.nii.gz", b"garbage " * 100),
    ("scan.nii.gz", gzip.compress(b"garbage " * 100)),
    ("scan.nii", b"garbage " * 100),
    ("scan.nii", None),
    ("scan.nii.gz", b"\x1f\x8b\x08\x00truncated"),
    ("slice.dcm", b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\x04\x00abcd" + b"\xff" * 40),
    ("slice.tif", b"II*\x00garbage"),
    ("slice.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 40),
    ("slice.jpg", b"\xff\xd8\xff\xe0" + b"\0" * 40),
    ("../../etc/slice.bmp", b"BM" + b"\0" * 40),
])
def test_broken_uploads_never_show_server_paths(client, name, content):
    if content is None:
        content = nifti_header_only()
    response = client.post("/api/segment", files={"file": (name, content)})
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    base = name.rsplit("/", 1)[-1]
    assert detail.startswith(base + ":")
    assert tempfile.gettempdir() not in response.text and "upload." not in detail
    assert not ROOTED.search(detail), detail


def test_answers_name_stored_files_without_server_paths(client, phantom_dir, store_paths):
    meta = client.get("/api/images/1").json()
    assert meta["path"].endswith(".dcm") and "/" not in meta["path"]
    answer = client.post("/api/query", files={"file": ("q.png", phantom_png(phantom_dir))},
                         data={"k": "3", "per_patient": "0"}).json()
    assert all("/" not in n["path"] and n["path"].endswith(".dcm") for n in answer["neighbors"])
    stats = client.get("/api/stats")
    assert stats.json()["database"] in ("sqlite", "postgresql")
    assert str(phantom_dir) not in stats.text + str(meta) + str(answer)
    assert store_paths["index_dir"] not in stats.text and "://" not in stats.text


def test_scrub_paths():
    from lungcbir.websecurity import scrub_paths

    assert scrub_paths('File "/tmp/a b/upload.nii.gz" is bad', {"/tmp/a b/upload.nii.gz": "x.nii.gz"}) == \
        'File "x.nii.gz" is bad'
    assert scrub_paths("cannot open /var/lib/lungcbir/index/x.faiss (denied)") == "cannot open <path> (denied)"
    assert scrub_paths("expected KEY=VALUE, 64 MiB/s, a/b") == "expected KEY=VALUE, 64 MiB/s, a/b"


# item 14: no CDN -----------------------------------------------------------------------------

@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_api_docs_load_nothing_from_other_hosts(client, page):
    html = client.get(page)
    assert html.status_code == 200
    references = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", html.text)
    assert references
    assert not re.search(r"(https?:)?//", html.text.replace("window.location.origin", "")), html.text
    for reference in references:
        assert reference.startswith("/") and client.get(reference).status_code == 200, reference
def test_stored_overlay_uses_the_mask_kept_in_the_row(client, monkeypatch):
    from lungcbir.inference import LungModel

    def no_model(*_args, **_kwargs):
        raise AssertionError("the model ran for a stored slice whose mask is kept")

    monkeypatch.setattr(LungModel, "segment", no_model)
    picture = client.get("/api/images/1/overlay")
    assert picture.status_code == 200 and picture.content[:4] == b"\x89PNG"


# ---------------------------------------------------------------------------------------------
# what the page needs from the API (pixels, masks, files, series, labels, series query)

import io  # noqa: E402
import json  # noqa: E402
import zipfile  # noqa: E402


def decode(content: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(content, np.uint8), cv2.IMREAD_UNCHANGED)


def test_stored_pixels_are_raw_hu_for_windowing(client, retriever):
    response = client.get("/api/images/1/pixels")
    assert response.status_code == 200 and response.headers["x-pixel-kind"] == "hu"
    values = decode(response.content)
    item = retriever.stored_slice(1)
    assert values.dtype == np.uint16 and values.shape == item.shape  # full resolution, 16 bits
    assert np.array_equal(values.astype(np.int32) - 1024, np.clip(np.round(item.pixels), -1024, None).astype(np.int32))


def test_query_pixels_of_an_8_bit_export_are_as_stored(client):
    pixels = np.tile(np.arange(80, dtype=np.uint8) * 3, (80, 1))
    answer = client.post("/api/query", files={"file": ("q.png", png_bytes(pixels))}, data={"k": "2"}).json()
    response = client.get(answer["pixels"])
    assert response.headers["x-pixel-kind"] == "display"
    assert np.array_equal(decode(response.content), pixels.astype(np.uint16))


def test_neighbours_identify_the_slice_as_pacs_does(client, phantom_dir, retriever):
    answer = client.post("/api/query", files={"file": ("q.png", phantom_png(phantom_dir))},
                         data={"k": "3", "per_patient": "0"}).json()
    records = retriever.store(create=False).records([n["id"] for n in answer["neighbors"]])
    for neighbor in answer["neighbors"]:
        record = records[neighbor["id"]]
        assert neighbor["instance_number"] == record.instance_number is not None
        assert neighbor["slice_location"] == record.slice_location
        assert neighbor["file_name"] == neighbor["path"] and "/" not in neighbor["file_name"]
        for key in ("pixels_url", "mask_url", "file_url", "series_url"):
            assert client.get(neighbor[key]).status_code == 200, key
    assert answer["query_tags"]["source_format"] == "png" and answer["slices_in_file"] == 1 and "note" not in answer


def test_stored_mask_file_and_series(client, retriever, phantom_dir):
    item = retriever.stored_slice(3)
    mask = decode(client.get("/api/images/3/mask.png").content)
    assert mask.shape == item.shape and set(np.unique(mask)) <= {0, 255}
    record = retriever.store(create=False).records([3])[3]
    original = client.get("/api/images/3/file")
    assert original.status_code == 200 and original.content == open(record.path, "rb").read()
    disposition = original.headers["content-disposition"]
    assert record.path.rsplit("/", 1)[-1] in disposition and str(phantom_dir) not in disposition
    series = client.get("/api/images/3/series").json()
    rows = retriever.store(create=False).records(series["ids"])
    assert len(series["ids"]) == 6 and {r.series_uid for r in rows.values()} == {record.series_uid}
    assert [rows[i].slice_index for i in series["ids"]] == sorted(r.slice_index for r in rows.values())
    assert series["ids"][series["position"]] == 3
    assert client.get("/api/images/999/series").status_code == 404
    assert client.get("/api/images/999/file").status_code == 404


def test_file_download_needs_the_token(secured):
    assert secured.get("/api/images/1/file").status_code == 401
    assert secured.get("/api/images/1/pixels").status_code == 401
    assert secured.get("/api/images/1/file", headers=bearer()).status_code == 200


def test_file_of_a_removed_file_is_410(client, retriever):
    import os

    record = retriever.store(create=False).records([2])[2]
    moved = record.path + ".gone"  # the file belongs to a fixture other tests share: put it back
    os.rename(record.path, moved)
    try:
        assert client.get("/api/images/2/file").status_code == 410
    finally:
        os.rename(moved, record.path)


@pytest.fixture
def labelled(phantom_dir, tiny_weights, store_paths, tmp_path):
    csv = tmp_path / "labels.csv"
    lines = ["path,diagnosis"]
    for n, path in enumerate(sorted((phantom_dir / "dicom").glob("*/*.dcm"))):
        lines.append(f"{path},{['COVID-19', 'Normal', 'CAP'][n % 3]}")
    csv.write_text("\n".join(lines) + "\n")
    retriever = Retriever(weights=tiny_weights, **store_paths)
    retriever.index_dataset([phantom_dir / "dicom"], labels=str(csv))
    return TestClient(create_app(retriever), base_url=LOCAL, raise_server_exceptions=False)


def test_labels_listing_and_filters(labelled, phantom_dir):
    listing = labelled.get("/api/labels").json()
    assert listing["labels"] == {"diagnosis": ["CAP", "COVID-19", "Normal"]}
    assert "patient_id" in listing["columns"]

    def diagnoses(**data):
        answer = labelled.post("/api/query", files={"file": ("q.png", phantom_png(phantom_dir))},
                               data={"k": "20", "per_patient": "0", **data})
        assert answer.status_code == 200, answer.text
        return sorted({n["labels"]["diagnosis"] for n in answer.json()["neighbors"]})

    assert diagnoses(labels=json.dumps({"diagnosis": ["covid-19", "NORMAL"]})) == ["COVID-19", "Normal"]
    assert diagnoses(where="Diagnosis=cap") == ["CAP"]
    unknown = labelled.post("/api/query", files={"file": ("q.png", phantom_png(phantom_dir))},
                            data={"where": "diagnosys=CAP"})
    assert unknown.status_code == 422 and "unknown label key 'diagnosys'" in unknown.json()["detail"]
    assert "diagnosis" in unknown.json()["detail"]
    bad = labelled.post("/api/query", files={"file": ("q.png", phantom_png(phantom_dir))}, data={"labels": "[1"})
    assert bad.status_code == 422


def nifti_volume(frames: int = 5) -> bytes:
    import nibabel as nib

    volume = np.full((64, 64, frames), -1000, np.int16)
    volume[16:48, 8:28, :] = -850
    volume[16:48, 36:56, :] = -850
    for z in range(frames):
        volume[30:34, 30:34, z] = z * 100  # each slice its own
    return nib.Nifti1Image(volume, np.eye(4)).to_bytes()


def test_volume_query_says_which_slice_was_used(client):
    answer = client.post("/api/query", files={"file": ("scan.nii", nifti_volume(5))}, data={"k": "2"}).json()
    assert answer["slices_in_file"] == 5 and answer["frame"] == 2
    assert "5 slices" in answer["note"] and "slice 3" in answer["note"] and "whole series" in answer["note"]


def test_series_query_of_files_zip_and_volume(bundled_client, phantom_dir):
    client = bundled_client
    # the whole series: levels are relative to the query's own first and last slice with lungs
    files = sorted((phantom_dir / "dicom" / "phantom01").glob("*.dcm"))
    answer = client.post("/api/query-series", files=[("files", (p.name, p.read_bytes())) for p in files],
                         data={"k": "2"})
    assert answer.status_code == 200, answer.text
    answer = answer.json()
    assert answer["slices"] == 6 and answer["failed"] == [] and len(answer["cases"]) == 2
    best = answer["cases"][0]
    assert best["patient_id"] == "PHANTOM01" and best["rank"] == 1 and best["score"] >= answer["cases"][1]["score"]
    pair = best["pairs"][0]
    assert client.get(pair["query"]["pixels"]).status_code == 200
    assert client.get(pair["query"]["mask"]).status_code == 200
    assert pair["neighbor"]["patient_id"] == "PHANTOM01" and "pixels_url" in pair["neighbor"]
    # the same files in a ZIP (with a folder inside, a README and a name trying to leave the folder)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for p in files[:5]:
            archive.writestr(f"series/{p.name}", p.read_bytes())
        archive.writestr("../../outside.dcm", files[5].read_bytes())
        archive.writestr("README.txt", "not an image")
    zipped = client.post("/api/query-series", files=[("files", ("series.zip", buffer.getvalue()))], data={"k": "2"})
    assert zipped.status_code == 200, zipped.text
    assert zipped.json()["slices"] == 6 and zipped.json()["cases"][0]["patient_id"] == "PHANTOM01"
    volume = client.post("/api/query-series", files=[("files", ("scan.nii", nifti_volume(4)))], data={"k": "1"})
    assert volume.status_code == 200 and volume.json()["slices"] == 4


def test_series_query_refuses_zip_bombs_and_too_many_files(client, monkeypatch):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("bomb.dcm", b"\0" * (50 * 2**20))  # 50 MiB of zeros: about 50 KB compressed
    response = client.post("/api/query-series", files=[("files", ("bomb.zip", buffer.getvalue()))])
    assert response.status_code == 422 and "ZIP bomb" in response.json()["detail"]
    import lungcbir.uploads

    read = []
    monkeypatch.setattr(lungcbir.uploads.zipfile.ZipExtFile, "read", lambda *a, **k: read.append(1) or b"")
    response = client.post("/api/query-series", files=[("files", ("bomb.zip", buffer.getvalue()))])
    assert response.status_code == 422 and not read  # refused from the directory, nothing unpacked
    monkeypatch.undo()
    many = io.BytesIO()
    with zipfile.ZipFile(many, "w") as archive:
        for n in range(1001):
            archive.writestr(f"{n}.dcm", b"x")
    response = client.post("/api/query-series", files=[("files", ("many.zip", many.getvalue()))])
    assert response.status_code == 422 and "at most 1000" in response.json()["detail"]
    broken = client.post("/api/query-series", files=[("files", ("a.dcm", b"nothing")), ("files", ("b.png", b"no"))])
    assert broken.status_code == 422 and "no readable slice" in broken.json()["detail"]
    assert client.post("/api/query-series", files=[("files", ("a.dcm", b"x"))], data={"k": "21"}).status_code == 422


def test_favicon_is_served(secured):
    response = secured.get("/favicon.ico")  # an open path: the browser asks without the token
    assert response.status_code == 200 and response.headers["content-type"] == "image/x-icon"
    assert response.content[:4] == b"\0\0\1\0"


def test_results_link_to_the_sites_viewer_when_configured(retriever):
    """serve --viewer-url: each DICOM result opens its study in the site's viewer (OHIF, say)."""
    from lungcbir.websecurity import WebSettings, check_viewer_template

    template = "https://pacs.example.org/ohif/viewer?StudyInstanceUIDs={study_uid}"
    client = TestClient(create_app(retriever, WebSettings(viewer_url=template)), base_url=LOCAL)
    neighbors = client.post("/api/query", files={"file": ("q.png", png_bytes())}, data={"k": "3"}).json()["neighbors"]
    assert neighbors and all(n["study_uid"] for n in neighbors)
    assert all(n["viewer_url"] == template.format(study_uid=n["study_uid"]) for n in neighbors)
    plain = TestClient(create_app(retriever), base_url=LOCAL)
    assert all("viewer_url" not in n for n in plain.post("/api/query", files={"file": ("q.png", png_bytes())},
                                                         data={"k": "3"}).json()["neighbors"])
    for bad in ("ftp://x/{study_uid}", "https://x/viewer", "https://x/{study_uid}/{path}", "https://x/{study_uid"):
        with pytest.raises(LungCBIRError):
            check_viewer_template(bad)


def test_serve_refuses_a_bad_viewer_template(tmp_path):
    from click.testing import CliRunner

    from lungcbir.cli import main

    result = CliRunner().invoke(main, ["serve", "--viewer-url", "https://x/viewer", "--db",
                                       f"sqlite:///{tmp_path}/none.sqlite"])
    assert result.exit_code == 2 and "viewer URL" in result.output and "Traceback" not in result.output


def test_results_say_study_date_and_series_description(client):
    """What PACS lists a study by: the DICOM StudyDate and SeriesDescription of every stored slice."""
    neighbors = client.post("/api/query", files={"file": ("q.png", png_bytes())}, data={"k": "3"}).json()["neighbors"]
    assert neighbors and all(n["study_date"] == "20000101" for n in neighbors)  # as the phantom writes them
    assert all(n["series_description"] == "SYNTHETIC PHANTOM - NOT PATIENT DATA" for n in neighbors)
    metadata = client.get(f"/api/images/{neighbors[0]['id']}").json()
    assert metadata["study_date"] == "20000101" and metadata["series_description"].startswith("SYNTHETIC")


# ---------------------------------------------------------------------------------------------
# the search focus: every search route takes it, answers echo it, and
# /api/stats says whether the model's vectors have a findings part to weigh



@pytest.fixture
def findings_client(phantom_dir, findings_weights, tmp_path):
    folder = tmp_path / "findings-store"  # its own store: a store holds the vectors of one model
    retriever = Retriever(weights=findings_weights, db_url=f"sqlite:///{folder}.sqlite", index_dir=folder)
    retriever.index_dataset([phantom_dir / "dicom"])
    return TestClient(create_app(retriever), base_url=LOCAL, raise_server_exceptions=False)


def search_routes(phantom_dir) -> dict[str, dict]:
    """One request for each search route: its path and the files it uploads."""
    query = ("q.png", phantom_png(phantom_dir), "image/png")
    series = sorted((phantom_dir / "dicom" / "phantom01").glob("*.dcm"))[:3]
    return {"/api/query": {"file": query},
            "/api/query-together": [("files", query), ("unlike", ("u.png", png_bytes(), "image/png"))],
            "/api/query-series": [("files", (p.name, p.read_bytes())) for p in series]}


@pytest.fixture
def focus_spy(monkeypatch) -> list:
    """The focus each Retriever search is called with (the calls still happen)."""
    seen = []
    for name in ("query_slices", "query_together", "query_series"):
        original = getattr(Retriever, name)

        def spy(self, *args, _original=original, _name=name, **kwargs):
            seen.append((_name, kwargs.get("focus", args[-1] if _name != "query_series" else None)))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(Retriever, name, spy)
    return seen


@pytest.mark.parametrize("focus", ["anatomy", "findings", "balanced", "", None])
def test_every_search_route_passes_the_focus_and_echoes_it(client, phantom_dir, focus_spy, focus):
    data = {"k": "2"} if focus is None else {"k": "2", "focus": focus}
    expected = focus or "balanced"  # the default (an empty field is a missing one, as for every form field)
    for path, files in search_routes(phantom_dir).items():
        focus_spy.clear()
        response = client.post(path, files=files, data=data)
        assert response.status_code == 200, (path, response.text)
        assert response.json()["focus"] == expected, path
        # the route's own Retriever call got it (query_series calls query_slices in turn)
        assert focus_spy and all(seen == expected for _, seen in focus_spy), (path, focus_spy)


def test_a_bad_focus_is_a_clear_422_before_any_search(client, phantom_dir, focus_spy):
    for path, files in search_routes(phantom_dir).items():
        for bad in ("lesions", "Anatomy", " balanced"):
            response = client.post(path, files=files, data={"focus": bad})
            assert response.status_code == 422, (path, bad, response.text)
            problem = response.json()["detail"][0]
            assert problem["loc"] == ["body", "focus"], problem
            assert all(name in problem["msg"] for name in ("anatomy", "findings", "balanced")), problem
            assert "Traceback" not in response.text
    assert focus_spy == []  # refused before the model or the index is touched


def test_openapi_documents_the_focus(client):
    document = client.get("/openapi.json").json()
    components = document["components"]["schemas"]
    assert components["Focus"]["enum"] == ["anatomy", "findings", "balanced"]
    for answer in ("QueryAnswer", "TogetherAnswer", "SeriesAnswer"):
        assert "focus" in components[answer]["properties"], answer
    assert {"vector_parts", "focus_available"} <= set(components["Stats"]["properties"])


def test_stats_say_whether_the_focus_changes_anything(client, findings_client):
    plain = client.get("/api/stats").json()
    assert plain["vector_parts"] == ["anatomy"] and plain["focus_available"] is False
    findings = findings_client.get("/api/stats").json()
    assert findings["vector_parts"] == ["anatomy", "findings"] and findings["focus_available"] is True


def ranking(client, phantom_dir, focus: str) -> dict[int, float]:
    answer = client.post("/api/query", files={"file": ("q.png", phantom_png(phantom_dir))},
                         data={"k": "12", "per_patient": "0", "focus": focus}).json()
    assert answer["focus"] == focus
    return {n["id"]: n["score"] for n in answer["neighbors"]}


def test_without_a_findings_part_every_focus_ranks_alike(client, phantom_dir):
    anatomy = ranking(client, phantom_dir, "anatomy")
    assert ranking(client, phantom_dir, "findings") == anatomy == ranking(client, phantom_dir, "balanced")


def test_with_a_findings_part_the_focus_changes_the_ranking(findings_client, phantom_dir):
    anatomy, findings, balanced = (ranking(findings_client, phantom_dir, focus)
                                   for focus in ("anatomy", "findings", "balanced"))
    assert len(anatomy) == len(findings) == len(balanced) == 12  # every stored slice, ranked each way
    assert list(anatomy) != list(findings)
    # balanced (the fixture's anatomy weight 0.4) weighs the two parts' cosines, slice by slice
    for image_id, score in balanced.items():
        assert score == pytest.approx(0.4 * anatomy[image_id] + 0.6 * findings[image_id], abs=1e-4), image_id


@pytest.mark.parametrize("template", ["https://x/{study_uid:{study_uid}}", "https://x/{study_uid!r}",
                                      "https://x/{study_uid:>80}", "https://x/{study_uid:}",
                                      "https://x/?s={study_uid}&p={patient_id!s:{series_uid}}"])
def test_viewer_template_allows_plain_fields_only(template):
    """A conversion, format spec or nested field passed the start check and then
    made every request a 500; it is refused when the server starts."""
    from lungcbir.websecurity import check_viewer_template

    with pytest.raises(LungCBIRError, match=r"plain \{name\} fields only"):
        check_viewer_template(template)


def test_viewer_template_keeps_escaped_braces():
    from lungcbir.websecurity import check_viewer_template, viewer_link

    template = "https://x/v?q={{literal}}&s={study_uid}"
    assert check_viewer_template(template) == template
    assert viewer_link(template, {"study_uid": "1.2"}) == "https://x/v?q={literal}&s=1.2"


def test_series_query_names_cases_without_identity_by_file_name(phantom_dir, bundled_weights, tmp_path):
    """A case of slices without patient or series was named by its server path
    (``file:/srv/.../x.png``); it is named by its file name, as the neighbours are."""
    flat = tmp_path / "flat"
    flat.mkdir()
    for n, path in enumerate(sorted((phantom_dir / "png").glob("*/*.png"))[:4]):  # mixed names: no scan folder
        (flat / f"ID_000{n}_Z_01{n}{n}.png").write_bytes(path.read_bytes())
    retriever = Retriever(weights=bundled_weights, db_url=f"sqlite:///{tmp_path}/db.sqlite",
                          index_dir=str(tmp_path / "index"))
    retriever.index_dataset([flat])
    client = TestClient(create_app(retriever), base_url=LOCAL)
    answer = client.post("/api/query-series", data={"k": "3"},
                         files=[("files", ("q.png", phantom_png(phantom_dir)))])
    assert answer.status_code == 200, answer.text
    cases = answer.json()["cases"]
    assert cases and all(case["patient_id"] is None and case["series_uid"] is None for case in cases)
    assert str(tmp_path) not in answer.text
    for case in cases:
        assert case["case"] == "file:" + case["pairs"][0]["neighbor"]["file_name"]


@pytest.fixture
def own_files(phantom_dir, tiny_weights, tmp_path):
    """A client over copies of the phantom's DICOM files that a test may replace, and the copies."""
    import shutil

    folder = tmp_path / "indexed"
    shutil.copytree(phantom_dir / "dicom" / "phantom01", folder)
    retriever = Retriever(weights=tiny_weights, db_url=f"sqlite:///{tmp_path}/db.sqlite",
                          index_dir=str(tmp_path / "index"))
    retriever.index_dataset([folder])
    paths = {r.id: r.path for r in retriever.store(create=False).records(list(range(1, 7))).values()}
    return TestClient(create_app(retriever), base_url=LOCAL), paths


def test_file_route_refuses_a_file_replaced_by_a_link_or_other_bytes(own_files, tmp_path):
    """The file route sent whatever sat at the stored path, a link to a system
    file included; it sends the file only if its bytes are those indexed and it lies in its
    indexed folder (410 otherwise, like the picture routes)."""
    import os

    client, paths = own_files
    secret = tmp_path / "passwd"
    secret.write_text("root:x:0:0:root:/root:/bin/bash\n")
    os.replace(paths[1], tmp_path / "away.dcm")
    os.symlink(secret, paths[1])
    answer = client.get("/api/images/1/file")
    assert answer.status_code == 410 and "root:" not in answer.text and str(tmp_path) not in answer.text
    # the very bytes indexed, but through a link out of the indexed folder
    os.unlink(paths[1])
    os.symlink(tmp_path / "away.dcm", paths[1])
    assert client.get("/api/images/1/file").status_code == 410
    # other bytes at the stored path
    with open(paths[2], "r+b") as handle:
        handle.seek(-1, os.SEEK_END)
        handle.write(b"\x01" if handle.read(1) != b"\x01" else b"\x02")
    assert client.get("/api/images/2/file").status_code == 410


def test_file_route_sends_a_link_inside_its_folder(own_files):
    import os

    client, paths = own_files
    original = open(paths[3], "rb").read()
    moved = os.path.join(os.path.dirname(paths[3]), "moved.dcm")
    os.replace(paths[3], moved)
    os.symlink("moved.dcm", paths[3])
    answer = client.get("/api/images/3/file")
    assert answer.status_code == 200 and answer.content == original
    assert answer.headers["content-type"] == "application/octet-stream"
    assert answer.headers["content-disposition"] == f'attachment; filename="{os.path.basename(paths[3])}"'


# a client that sends its body slowly is answered 408 -----------------------

def slow_body_call(app, client_pause: float, chunks: int = 4, hang: bool = False) -> tuple[int | None, bytes, float]:
    """POST a multipart body to ``app`` in ``chunks`` pieces, ``client_pause`` seconds apart
    (then, with ``hang``, never the rest): (status, answer body, seconds until answered)."""
    sent = 0
    status, answer = None, b""

    async def receive():
        nonlocal sent
        if sent:
            await asyncio.sleep(client_pause)
        if hang and sent == chunks:
            await asyncio.sleep(3600)
        sent += 1
        return {"type": "http.request", "body": PART_HEAD if sent == 1 else b"\0" * 100,
                "more_body": sent <= chunks}

    async def send(message):
        nonlocal status, answer
        if message["type"] == "http.response.start":
            status = message["status"]
        else:
            answer += message.get("body", b"")

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/api/query", "raw_path": b"/api/query", "query_string": b"", "root_path": "",
             "headers": [(b"host", b"localhost"), *MULTIPART], "client": ("127.0.0.1", 1),
             "server": ("localhost", 80)}
    start = time.monotonic()
    asyncio.run(asyncio.wait_for(app(scope, receive, send), 30))
    return status, answer, time.monotonic() - start


def test_a_body_that_never_ends_is_answered_408(retriever):
    from lungcbir.websecurity import WebSettings

    app = create_app(retriever, WebSettings(body_seconds=0.5))
    status, answer, seconds = slow_body_call(app, 0.05, chunks=2, hang=True)
    assert status == 408 and seconds < 5
    assert json.loads(answer)["detail"] == "request body not received within 0.5 s"


def test_the_body_deadline_counts_the_clients_time_only():
    from lungcbir.websecurity import BodySizeLimit

    async def slow_app(scope, receive, send):  # reads the body with pauses of its own, then answers 200
        while (await receive()).get("more_body"):
            await asyncio.sleep(0.2)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    limited = BodySizeLimit(slow_app, max_bytes=10**6, max_seconds=0.5)
    assert slow_body_call(limited, 0.01, chunks=5)[0] == 200  # 1 s in all, the client's part 0.05 s
    status, _, seconds = slow_body_call(limited, 0.2, chunks=5)  # the client's part 1 s
    assert status == 408 and seconds < 3


def test_web_answers_are_the_core_json_with_public_names(bundled_client, bundled_retriever, phantom_dir):
    client, retriever = bundled_client, bundled_retriever
    # one answer shape: the web's neighbours and series cases are the core's to_json with every
    # server path replaced by its file name, in one place (views.state.public_json)
    from lungcbir.io import read_file
    from lungcbir.retrieval import series_in_order
    from lungcbir.views.state import public_json

    query = phantom_dir / "png" / "phantom01" / "phantom01_s002.png"
    core = retriever.query(query, k=3, per_patient=0).neighbors
    answer = client.post("/api/query", files={"file": ("q.png", query.read_bytes())},
                         data={"k": "3", "per_patient": "0"}).json()
    for mine, theirs in zip(core, answer["neighbors"]):
        expected = public_json(mine.to_json())
        assert {key: theirs[key] for key in expected} == expected
        assert "/" not in theirs["path"]
    series = sorted((phantom_dir / "dicom" / "phantom01").iterdir())
    matches = retriever.query_series(series_in_order([(str(p), read_file(p)) for p in series]), k=2).matches
    cases = client.post("/api/query-series", files=[("files", (p.name, p.read_bytes())) for p in series],
                        data={"k": "2"}).json()["cases"]
    for match, case in zip(matches, cases):
        core_case = public_json(match.to_json())
        assert {key: case[key] for key in core_case if key != "pairs"} == \
            {key: value for key, value in core_case.items() if key != "pairs"}
        assert [pair["neighbor"]["id"] for pair in case["pairs"]] == [pair["id"] for pair in core_case["pairs"]]


def test_series_query_takes_other_patients(bundled_client, phantom_dir):
    # /api/query-series had no other_patients field (the page's box did nothing)
    files = [("files", (p.name, p.read_bytes())) for p in sorted((phantom_dir / "dicom" / "phantom02").iterdir())]
    answer = bundled_client.post("/api/query-series", files=files, data={"k": "2", "other_patients": "1"}).json()
    assert [case["patient_id"] for case in answer["cases"]] == ["PHANTOM01"]
    case = answer["cases"][0]
    assert case["aligned"] and all(abs(a["level"] - a["query_level"]) <= 0.1 for a in case["aligned"])
    assert answer["query_slices"] and all(q["level"] is not None for q in answer["query_slices"])
    assert bundled_client.get(answer["query_slices"][0]["pixels"]).status_code == 200
    series = bundled_client.get(case["pairs"][0]["neighbor"]["series_url"]).json()
    assert len(series["levels"]) == len(series["ids"])


def test_two_patients_as_one_series_are_refused(bundled_client, phantom_dir):
    # accepted without a word
    files = [("files", (f"{p.parent.name}_{p.name}", p.read_bytes()))
             for name in ("phantom01", "phantom02") for p in sorted((phantom_dir / "dicom" / name).iterdir())[:2]]
    response = bundled_client.post("/api/query-series", files=files)
    assert response.status_code == 422 and "2 patients" in response.json()["detail"]


def test_a_zip_without_ct_says_so_and_is_named_as_uploaded(bundled_client):
    # "cat.jpg: 1 slices queried ... No stored case matches the filter"
    buffer = io.BytesIO()
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("cat.jpg", cv2.imencode(".jpg", rng.integers(0, 255, (64, 64, 3), np.uint8))[1].tobytes())
    answer = bundled_client.post("/api/query-series", files=[("files", ("pets.zip", buffer.getvalue()))]).json()
    assert answer["query"] == "pets.zip" and answer["cases"] == []
    assert "no lungs found" in answer["note"] and "filter" not in answer["note"]


def test_a_no_lungs_picture_shows_no_lungs(bundled_client):
    # contours around a cat's eyes beside "no lungs"
    picture = np.zeros((128, 128, 3), np.uint8)
    picture[:] = (40, 140, 220)  # an orange cat (colour: not CT) with two dark eyes the model calls lungs
    for x in (44, 84):
        cv2.ellipse(picture, (x, 64), (14, 22), 0, 0, 360, (10, 30, 10), -1)
    data = cv2.imencode(".png", picture)[1].tobytes()
    answer = bundled_client.post("/api/query", files={"file": ("cat.png", data)}).json()
    assert answer["quality"] == "no-lungs" and answer["neighbors"] == [] and answer["lung_fraction"] > 0
    mask = cv2.imdecode(np.frombuffer(bundled_client.get(answer["mask"]).content, np.uint8), cv2.IMREAD_UNCHANGED)
    assert not mask.any()
    overlay = cv2.imdecode(np.frombuffer(bundled_client.get(answer["overlay"]).content, np.uint8), cv2.IMREAD_COLOR)
    assert not (overlay == (0, 200, 255)).all(axis=2).any()  # no amber contour


def test_the_size_limit_is_the_upload_limit(client):
    # the page said "65 MiB" (the body limit), the README 64 MiB
    response = client.post("/api/query", content=b"x", headers={"content-length": str(70 * 2**20),
                                                                "content-type": "multipart/form-data; boundary=x"})
    assert response.status_code == 413 and "64 MiB" in response.json()["detail"]


def test_lesion_maps_of_the_query_and_neighbours(phantom_dir, findings_weights, store_paths):
    # the lesion map on the query and on every neighbour
    retriever = Retriever(weights=findings_weights, **store_paths)
    retriever.index_dataset([phantom_dir / "png"])
    client = TestClient(create_app(retriever), base_url=LOCAL)
    answer = client.post("/api/query", files={"file": ("q.png", phantom_png(phantom_dir))}, data={"k": "2"}).json()
    for url in (answer["lesion"], answer["neighbors"][0]["lesion_url"]):
        response = client.get(url)
        lesion = cv2.imdecode(np.frombuffer(response.content, np.uint8), cv2.IMREAD_UNCHANGED)
        assert response.status_code == 200 and lesion.shape == (96, 96) and lesion.any()
    assert "label_summary" in answer and answer["neighbors"][0]["percentile"] is not None


def test_a_patient_without_a_series_steps_through_the_patients_slices(phantom_dir, tiny_weights, tmp_path):
    # "no other stored slice" when the identity gives a patient but no series
    flat = tmp_path / "flat"
    flat.mkdir()
    for n, path in enumerate(sorted((phantom_dir / "png" / "phantom01").glob("*.png"))[:3]):
        (flat / f"ID_0001_Z_{n + 8}.png").write_bytes(path.read_bytes())
    retriever = Retriever(weights=tiny_weights, db_url=f"sqlite:///{tmp_path}/db.sqlite",
                          index_dir=str(tmp_path / "index"))
    retriever.index_dataset([flat], case_pattern=r"^(ID_[0-9]+)_Z")
    client = TestClient(create_app(retriever), base_url=LOCAL)
    ids = sorted(retriever.store(create=False).ids_for(under=[str(flat)]))
    series = client.get(f"/api/images/{ids[0]}/series").json()
    names = [client.get(f"/api/images/{i}").json()["file_name"] for i in series["ids"]]
    assert names == ["ID_0001_Z_8.png", "ID_0001_Z_9.png", "ID_0001_Z_10.png"]  # numbers compared as numbers


def test_healthz_answers_at_once_while_every_worker_thread_is_busy(retriever):
    """/healthz waited for a worker thread behind the queries (34-36 s under load), so a liveness
    probe would restart a healthy server. Here every worker thread is held by a query (they wait
    in their filter parsing until released), in a real server on loopback, and /healthz answers."""
    import httpx
    import uvicorn

    app = create_app(retriever)
    state = app.state.lungcbir
    real_filters, release, entered, lock = state.filters, threading.Event(), [0], threading.Lock()

    def held_filters(*args, **kwargs):
        with lock:
            entered[0] += 1
        release.wait(60)
        return real_filters(*args, **kwargs)

    state.filters = held_filters
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        url = f"http://localhost:{server.servers[0].sockets[0].getsockname()[1]}"

        def one(_: int) -> int:
            return httpx.post(f"{url}/api/query", files={"file": ("q.png", png_bytes())}, timeout=120).status_code

        with ThreadPoolExecutor(max_workers=45) as pool:
            queries = [pool.submit(one, n) for n in range(45)]
            while entered[0] < 40 and time.monotonic() < deadline:  # anyio's 40 worker threads, all held
                time.sleep(0.05)
            assert entered[0] == 40, f"{entered[0]} queries hold a worker thread"
            try:
                start = time.monotonic()
                assert httpx.get(f"{url}/healthz", timeout=5).status_code == 200
                took = time.monotonic() - start
            finally:
                release.set()
            statuses = [query.result() for query in queries]
        assert took < 1, f"/healthz took {took:.2f} s with every worker thread busy"
        assert set(statuses) == {200}, statuses
    finally:
        release.set()
        server.should_exit = True
        thread.join(10)
