"""DICOMweb: index from an archive, point results back into it, store SEGs in it.

The archive tests run against a real Orthanc (``.ci/run`` starts one and sets
LUNGCBIR_TEST_DICOMWEB; see the ``dicomweb_archive`` fixture), loaded with the shared
covid-ct-md series. The others need no archive: credentials, URLs, the schema migration.
"""

from __future__ import annotations

import http.server
import io
import json
import sqlite3
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from click.testing import CliRunner
from conftest import dciodvfy
from fastapi.testclient import TestClient

from lungcbir.cli import main
from lungcbir.database import ImageRecord
from lungcbir.dicomweb import DicomwebSource, SeriesRef, display_url, is_dicomweb_url, parse_instance_url
from lungcbir.io import decode, read_dicom
from lungcbir.retrieval import Retriever
from lungcbir.store import Store
from lungcbir.web import create_app
from lungcbir.websecurity import WebSettings


def invoke(*args, env=None):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False, env=env)


def store_args(tmp_path) -> list[str]:
    return ["--db", f"sqlite:///{tmp_path / 'db.sqlite'}", "--index-dir", str(tmp_path / "index")]


def rows(tmp_path) -> list[ImageRecord]:
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}", tmp_path / "index", create=False)
    return list(store.records(range(1, store.count() + 1000)).values())


# -- no archive needed ---------------------------------------------------------------------------


def test_urls_are_shown_without_credentials():
    assert display_url("https://ann:secret@pacs.example:8443/dicom-web/?token=x#y") == \
        "https://pacs.example:8443/dicom-web"
    assert is_dicomweb_url("HTTPS://pacs/dicom-web") and not is_dicomweb_url("/data/http/scan.dcm")
    ref = parse_instance_url("http://u:p@h:1/dicom-web/studies/1.2/series/1.3/instances/1.4")
    assert (ref.root, ref.study_uid, ref.series_uid, ref.sop_uid) == ("http://h:1/dicom-web", "1.2", "1.3", "1.4")
    assert ref.url == "http://h:1/dicom-web/studies/1.2/series/1.3/instances/1.4"
    source = DicomwebSource("https://ann:secret@pacs.example/dicom-web", environ={})
    assert "secret" not in repr(source) and source.root == "https://pacs.example/dicom-web"
    assert source.client.session.auth == ("ann", "secret")  # taken as basic auth


class _Recorder(http.server.BaseHTTPRequestHandler):
    """An archive that refuses everyone, and notes the Authorization headers it was sent."""

    seen: list[str] = []

    def do_GET(self):  # noqa: N802 (http.server's name)
        self.seen.append(self.headers.get("Authorization", ""))
        self.send_response(401)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def refusing_archive():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Recorder.seen = []
    yield f"http://127.0.0.1:{server.server_address[1]}/dicom-web"
    server.shutdown()


@pytest.mark.parametrize("variables, header", [
    ({"LUNGCBIR_DICOMWEB_TOKEN": "tok-123"}, "Bearer tok-123"),
    ({"LUNGCBIR_DICOMWEB_USER": "ann", "LUNGCBIR_DICOMWEB_PASSWORD": "pw-456"}, "Basic YW5uOnB3LTQ1Ng=="),
])
def test_credentials_come_from_the_environment_and_are_never_printed(refusing_archive, tmp_path, tiny_weights,
                                                                     variables, header):
    result = invoke("index-dataset", refusing_archive, "--weights", tiny_weights, *store_args(tmp_path),
                    env=variables)
    assert result.exit_code == 2, result.output
    assert result.output.strip() == f"error: {refusing_archive}: cannot search the archive (HTTP 401 Unauthorized)"
    assert _Recorder.seen and set(_Recorder.seen) == {header}
    for secret in variables.values():
        if secret != "ann":
            assert secret not in result.output


def test_unreachable_archive_is_one_line(tmp_path, tiny_weights):
    result = invoke("index-dataset", "http://127.0.0.1:9/dicom-web", "--weights", tiny_weights, *store_args(tmp_path))
    assert result.exit_code == 2
    assert result.output.strip() == "error: http://127.0.0.1:9/dicom-web: cannot search the archive (cannot connect)"


def test_an_instance_in_memory_decodes_like_its_file(phantom_dir):
    path = next((phantom_dir / "dicom" / "phantom01").glob("*.dcm"))
    url = "http://x/instances/1.2.3"  # no file suffix: the kind says DICOM
    from_file, from_bytes = read_dicom(str(path)), decode(path.read_bytes(), url, kind="dicom")[0]
    assert np.array_equal(from_file.pixels, from_bytes.pixels) and from_bytes.path == url
    assert (from_bytes.sop_uid, from_bytes.study_uid, from_bytes.series_uid) == \
        (from_file.sop_uid, from_file.study_uid, from_file.series_uid)
    assert from_file.sop_uid == str(pydicom.dcmread(path).SOPInstanceUID)
    from lungcbir.io import file_sha256

    assert from_bytes.sha256 == file_sha256(path)


def test_an_older_database_gets_the_new_columns(tmp_path, phantom_dir, tiny_weights):
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    Retriever(url, tmp_path / "index", weights=tiny_weights).index_dataset([phantom_dir / "png"])
    with sqlite3.connect(tmp_path / "db.sqlite") as connection:  # as an older release made it
        connection.execute("DROP INDEX ix_images_sop_uid")
        connection.execute("ALTER TABLE images DROP COLUMN sop_uid")
    retriever = Retriever(url, tmp_path / "index", weights=tiny_weights)
    report = retriever.index_dataset([phantom_dir / "dicom"])
    assert report.indexed == 12 and report.failed == 0
    records = retriever.store().records(range(1, 100)).values()
    assert sorted(r.sop_uid is None for r in records) == [False] * 12 + [True] * 12  # PNG rows have none


def test_query_json_neighbours_carry_study_and_sop_uids(phantom_dir, tiny_weights, tmp_path):
    indexed = invoke("index-dataset", phantom_dir / "dicom", "--weights", tiny_weights, *store_args(tmp_path))
    assert indexed.exit_code == 0, indexed.output
    query = next((phantom_dir / "dicom" / "phantom02").glob("*.dcm"))
    result = invoke("query", query, "--json", "--out", tmp_path / "out", "--weights", tiny_weights,
                    *store_args(tmp_path))
    first = json.loads(result.output.splitlines()[0])["neighbors"][0]
    header = pydicom.dcmread(query, stop_before_pixels=True)
    assert (first["sop_uid"], first["study_uid"]) == (str(header.SOPInstanceUID), str(header.StudyInstanceUID))
    assert "url" not in first  # a local file, not a DICOMweb source


def test_segment_from_a_url_needs_a_study_and_stow_needs_a_seg(tmp_path, tiny_weights):
    no_study = invoke("segment", "http://127.0.0.1:9/dicom-web", "--out", tmp_path, "--weights", tiny_weights)
    assert no_study.exit_code == 2 and "a DICOMweb URL input needs --study UID" in no_study.output
    png_stow = invoke("segment", "http://127.0.0.1:9/dicom-web", "--study", "1.2", "--stow", "--out", tmp_path,
                      "--weights", tiny_weights)
    assert png_stow.exit_code == 2 and "--stow needs --format dicom-seg" in png_stow.output


# -- a hostile archive (a fake one on loopback) ------------------------------------------------------


def _element(vr: str, *values) -> dict:
    return {"vr": vr, "Value": list(values)}


class HostileArchive:
    """A DICOMweb archive served from the test, holding one CT series (the phantom's), whose
    answers the test makes hostile: ``listing`` replaces the instances' QIDO answer, ``served``
    maps SOP UIDs to the bytes sent for them (the first file for unknown ones), ``slow_bytes``
    first bytes of every answer (``slow_part``: "head" or "body") trickle in 0.2 s apart,
    ``ignore_offset`` and ``page_of_one`` break paging, ``studies_body`` replaces the studies
    answer, ``redirect_to`` sends every request elsewhere. What is stored (STOW-RS) lands in
    ``stored`` (the request bodies), or is refused with ``store_status``."""

    def __init__(self, files: list[Path]):
        datasets = [pydicom.dcmread(path) for path in files]
        self.study, self.series = str(datasets[0].StudyInstanceUID), str(datasets[0].SeriesInstanceUID)
        self.served = {str(d.SOPInstanceUID): path.read_bytes() for d, path in zip(datasets, files)}
        self.listing = [{"00080018": _element("UI", str(d.SOPInstanceUID)),
                         "00200032": _element("DS", *map(float, d.ImagePositionPatient)),
                         "00200013": _element("IS", int(d.InstanceNumber))} for d in datasets]
        self.slow_bytes, self.slow_part = 0, "body"
        self.ignore_offset = self.page_of_one = False
        self.studies_body: bytes | None = None
        self.redirect_to: str | None = None
        self.requests: list[str] = []
        self.stored: list[bytes] = []
        self.store_status = 200
        self.url = ""

    def answer(self, path: str, query: dict) -> tuple[int, dict, bytes]:
        if self.redirect_to:
            return 302, {"Location": self.redirect_to + path}, b""
        if path.endswith("/studies"):
            if self.studies_body is not None:
                return 200, {"Content-Type": "application/dicom+json"}, self.studies_body
            if self.page_of_one:  # honours offset, ignores limit: study after study, without end
                return self.json([{"0020000D": _element("UI", f"1.2.{len(self.requests)}")}], {})
            items = [{"0020000D": _element("UI", self.study), "00080020": _element("DA", "20200101")}]
        elif path.endswith("/series"):
            items = [{"0020000E": _element("UI", self.series), "00080060": _element("CS", "CT")}]
        elif path.endswith("/instances"):
            items = self.listing
        else:
            data = self.served.get(path.rsplit("/", 1)[-1], next(iter(self.served.values())))
            return 200, {"Content-Type": "application/dicom"}, data
        return self.json(items, query)

    def json(self, items: list, query: dict) -> tuple[int, dict, bytes]:
        offset = 0 if self.ignore_offset else int(query.get("offset", ["0"])[0])
        limit = int(query.get("limit", [str(len(items))])[0])
        if len(self.requests) > 50:  # an old client paging an archive that ignores offset would never stop
            items = []
        return 200, {"Content-Type": "application/dicom+json"}, json.dumps(items[offset:offset + limit]).encode()


class _HostileHandler(http.server.BaseHTTPRequestHandler):
    archive: HostileArchive

    def do_GET(self):  # noqa: N802 (http.server's name)
        from urllib.parse import parse_qs, urlsplit

        archive = self.server.archive
        archive.requests.append(self.path)
        parts = urlsplit(self.path)
        status, headers, body = archive.answer(parts.path, parse_qs(parts.query))
        head = f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\nConnection: close\r\n" + "".join(
            f"{key}: {value}\r\n" for key, value in headers.items()) + "\r\n"
        message = head.encode() + body
        slow_from = 0 if archive.slow_part == "head" else len(head)
        slow_to = slow_from + archive.slow_bytes
        try:
            self.wfile.write(message[:slow_from])
            for index in range(slow_from, min(slow_to, len(message))):
                self.wfile.flush()
                self.wfile.write(message[index:index + 1])
                time.sleep(0.2)
            self.wfile.write(message[slow_to:])
        except OSError:
            pass  # the client hung up on a trickle

    def do_POST(self):  # noqa: N802 (http.server's name)
        archive = self.server.archive
        archive.requests.append("POST " + self.path)
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        if archive.store_status == 200:
            archive.stored.append(body)
        answer = b"{}"
        self.send_response(archive.store_status)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args):
        pass


def _serve(archive) -> http.server.ThreadingHTTPServer:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HostileHandler)
    server.archive = archive
    threading.Thread(target=server.serve_forever, daemon=True).start()
    archive.url = f"http://127.0.0.1:{server.server_address[1]}/dicom-web"
    return server


@pytest.fixture
def hostile_archive(phantom_dir):
    archive = HostileArchive(sorted((phantom_dir / "dicom" / "phantom01").glob("*.dcm")))
    server = _serve(archive)
    yield archive
    server.shutdown()
    server.server_close()


def index_archive(archive, tmp_path, tiny_weights, *extra, env=None):
    return invoke("index-dataset", archive.url, "--weights", tiny_weights, *store_args(tmp_path), *extra, env=env)


@pytest.mark.parametrize("hostile_uid", ["../../../escaped", "ABSOLUTE"])
def test_an_archive_uid_cannot_write_outside_the_cache(hostile_archive, tmp_path, tiny_weights, hostile_uid):
    """A SOP Instance UID that climbs out of the cache or is an absolute path
    is refused before it is used in a URL or a file name; the other instances are indexed."""
    hostile_uid = str(tmp_path / "absolute") if hostile_uid == "ABSOLUTE" else hostile_uid
    hostile_archive.listing[0]["00080018"] = _element("UI", hostile_uid)
    cache = tmp_path / "a" / "b" / "cache"
    result = index_archive(hostile_archive, tmp_path, tiny_weights, "--cache", cache)
    written = {str(path.relative_to(tmp_path)) for path in tmp_path.rglob("*.dcm*")}
    assert written and all(path.startswith("a/b/cache/") for path in written), written
    assert len(written) == len(hostile_archive.listing) - 1
    series_url = f"{hostile_archive.url}/studies/{hostile_archive.study}/series/{hostile_archive.series}"
    assert result.exit_code == 1, result.output
    assert f"failed: {series_url}: an instance's SOP Instance UID is not a DICOM UID ({hostile_uid!r})" \
        in result.output
    assert "indexed 5, skipped 0 (already indexed), failed 1" in result.output
    assert not any(hostile_uid in request for request in hostile_archive.requests)


def test_uids_that_are_not_text_are_refused_too(hostile_archive):
    listing = hostile_archive.listing
    listing[0]["00080018"] = _element("UI", ["1.2"])
    listing[1]["00080018"] = _element("UI", {"a": 1})
    listing.append(listing[2])  # listed twice: indexed once
    refs, rejected = DicomwebSource(hostile_archive.url).instances(
        SeriesRef(hostile_archive.study, hostile_archive.series))
    assert len(refs) == 4 and len({ref.sop_uid for ref in refs}) == 4
    assert [error.reason for error in rejected] == [
        "an instance's SOP Instance UID is not a DICOM UID (\"['1.2']\")",
        "an instance's SOP Instance UID is not a DICOM UID (\"{'a': 1}\")"]


def test_only_uids_of_digits_and_dots_are_used():
    from lungcbir.dicomweb import is_uid

    assert is_uid("1.2.840.10008.5.1.4.1.1.2") and is_uid("0")
    for bad in ("", ".", "..", "1..2", ".1", "1.", "1.2/3", "/etc/x", "1.2\n", "1" * 65, "1.2.3-a", None, 12):
        assert not is_uid(bad), bad
    with pytest.raises(Exception, match="not a DICOMweb instance URL"):
        parse_instance_url("http://h/dicom-web/studies/1.2/series/../instances/1.4")


@pytest.mark.parametrize("slow_part", ["head", "body"])
def test_a_trickling_answer_is_cut_off_at_the_response_bound(hostile_archive, tmp_path, tiny_weights, slow_part):
    """A byte every 0.2 s never trips the per-read timeout; the whole answer
    (headers or body) is bounded by LUNGCBIR_DICOMWEB_RESPONSE_SECONDS."""
    hostile_archive.slow_bytes, hostile_archive.slow_part = 20, slow_part  # 4 s of trickle
    began = time.monotonic()
    result = index_archive(hostile_archive, tmp_path, tiny_weights,
                           env={"LUNGCBIR_DICOMWEB_RESPONSE_SECONDS": "1"})
    assert time.monotonic() - began < 3.5
    assert result.exit_code == 2
    assert result.output.strip() == (f"error: {hostile_archive.url}: cannot search the archive (no complete answer "
                                     f"within 1 s (LUNGCBIR_DICOMWEB_RESPONSE_SECONDS))")


def test_a_trickling_instance_fails_alone(hostile_archive, tmp_path, tiny_weights):
    """An instance whose answer takes too long is one `failed:` line; the run goes on."""
    slow = "".join(hostile_archive.listing[2]["00080018"]["Value"])
    original = hostile_archive.answer

    def slow_instance(path, query):
        hostile_archive.slow_bytes = 20 if path.endswith(slow) else 0
        return original(path, query)

    hostile_archive.answer = slow_instance
    result = index_archive(hostile_archive, tmp_path, tiny_weights, env={"LUNGCBIR_DICOMWEB_RESPONSE_SECONDS": "1"})
    assert result.exit_code == 1, result.output
    url = f"{hostile_archive.url}/studies/{hostile_archive.study}/series/{hostile_archive.series}/instances/{slow}"
    assert f"failed: {url}: cannot fetch the instance (no complete answer within 1 s" in result.output
    assert "indexed 5, skipped 0 (already indexed), failed 1" in result.output


def test_an_archive_that_ignores_offset_is_not_paged_forever(hostile_archive, tmp_path, tiny_weights):
    hostile_archive.ignore_offset = True
    result = index_archive(hostile_archive, tmp_path, tiny_weights)
    assert result.exit_code == 2
    assert result.output.strip() == (f"error: {hostile_archive.url}: cannot search the archive (the archive ignores "
                                     f"offset (it sent the same page of studies twice))")
    assert len(hostile_archive.requests) == 2


def test_a_search_reads_at_most_max_pages(hostile_archive, tmp_path, tiny_weights):
    hostile_archive.page_of_one = True
    result = index_archive(hostile_archive, tmp_path, tiny_weights, env={"LUNGCBIR_DICOMWEB_MAX_PAGES": "5"})
    assert result.exit_code == 2
    assert result.output.strip() == (f"error: {hostile_archive.url}: cannot search the archive (more than 5 pages "
                                     f"of 1000 studies (LUNGCBIR_DICOMWEB_MAX_PAGES))")
    assert len(hostile_archive.requests) == 5


def test_malformed_positions_and_numbers_are_unknown(hostile_archive, tmp_path, tiny_weights):
    """QIDO attributes are read like local files' tags: a value that is not a
    finite number counts as unknown; it neither aborts the run nor decides the order."""
    listing = hostile_archive.listing
    listing[0]["00200032"] = _element("DS", "a", "b", "c")
    listing[1]["00200032"] = _element("DS", 0, 0, "NaN")
    listing[1]["00200013"] = _element("IS", "x")
    listing[2]["00200032"] = _element("DS", 0, 0, "1e999")
    listing[2]["00200013"] = _element("IS", [3])
    listing[3]["00200032"] = {"vr": "DS", "Value": "not a list"}
    listing[3]["00200013"] = _element("IS", "9" * 5000)
    sops = [item["00080018"]["Value"][0] for item in listing]
    series = SeriesRef(hostile_archive.study, hostile_archive.series)
    refs, rejected = DicomwebSource(hostile_archive.url).instances(series)
    assert rejected == []
    # the two with positions first (superior first), then by Instance Number, unknown as 0
    z = {sops[i]: listing[i]["00200032"]["Value"][2] for i in (4, 5)}
    assert listing[0]["00200013"]["Value"][0] > 0  # the one valid Instance Number orders after the unknown (0)
    assert [ref.sop_uid for ref in refs] == sorted(z, key=lambda sop: -z[sop]) + sorted(sops[1:4]) + [sops[0]]
    result = index_archive(hostile_archive, tmp_path, tiny_weights)
    assert result.exit_code == 0 and "indexed 6, skipped 0 (already indexed), failed 0" in result.output


def test_an_instance_of_another_modality_in_a_ct_series_is_not_indexed(hostile_archive, tmp_path, tiny_weights):
    """The modality is checked per instance, from the file itself."""
    sop = next(iter(hostile_archive.served))
    dataset = pydicom.dcmread(io.BytesIO(hostile_archive.served[sop]))
    dataset.Modality = "MR"
    buffer = io.BytesIO()
    dataset.save_as(buffer)
    hostile_archive.served[sop] = buffer.getvalue()
    result = index_archive(hostile_archive, tmp_path, tiny_weights, "--cache", tmp_path / "cache")
    url = f"{hostile_archive.url}/studies/{hostile_archive.study}/series/{hostile_archive.series}/instances/{sop}"
    assert result.exit_code == 1, result.output
    assert f"failed: {url}: not a CT instance (Modality 'MR')" in result.output
    assert sop not in {row.sop_uid for row in rows(tmp_path)} and len(rows(tmp_path)) == 5
    assert not list((tmp_path / "cache").rglob(f"{sop}.dcm"))  # not kept either


@pytest.mark.parametrize("same_host", [False, True])
def test_a_redirect_to_another_host_is_not_followed(hostile_archive, phantom_dir, tmp_path, tiny_weights, same_host):
    """Redirects on the archive's own host are followed, others refused."""
    from urllib.parse import urlencode

    elsewhere = HostileArchive(sorted((phantom_dir / "dicom" / "phantom01").glob("*.dcm")))
    server = _serve(elsewhere)
    try:
        target = elsewhere.url.replace("127.0.0.1", "localhost")  # another host name, another port
        if same_host:  # the archive moved to another path of the same host: fine
            hostile_archive.redirect_to = None
            original = hostile_archive.answer
            hostile_archive.answer = lambda path, query: (
                (302, {"Location": f"/moved{path}?{urlencode(query, doseq=True)}"}, b"")
                if path.startswith("/dicom-web") else original(path.removeprefix("/moved"), query))
        else:
            hostile_archive.redirect_to = target.removesuffix("/dicom-web")
        result = index_archive(hostile_archive, tmp_path, tiny_weights)
    finally:
        server.shutdown()
        server.server_close()
    if same_host:
        assert result.exit_code == 0 and "indexed 6, skipped 0" in result.output, result.output
        return
    assert result.exit_code == 2
    assert result.output.strip() == (f"error: {hostile_archive.url}: cannot search the archive (redirected to "
                                     f"{target}/studies, another host: not followed)")
    assert elsewhere.requests == []


def test_an_answer_that_is_not_json_is_named(hostile_archive, tmp_path, tiny_weights):
    """A reason says what was wrong, not only an exception's name."""
    hostile_archive.studies_body = b"<html>maintenance</html>"
    result = index_archive(hostile_archive, tmp_path, tiny_weights)
    assert result.exit_code == 2
    assert result.output.strip() == f"error: {hostile_archive.url}: cannot search the archive (the archive's answer " \
                                    f"is not JSON)"


def test_segment_names_what_failed_by_its_url_not_a_temporary_folder(hostile_archive, tmp_path, tiny_weights):
    """`segment URL` failures name the instance URL; nothing that could not
    be read is kept, and no message names the temporary folder."""
    sop = next(iter(hostile_archive.served))
    hostile_archive.served[sop] = b"not DICOM at all"
    result = invoke("segment", hostile_archive.url, "--study", hostile_archive.study, "--format", "dicom-seg",
                    "--out", tmp_path / "seg", "--weights", tiny_weights)
    url = f"{hostile_archive.url}/studies/{hostile_archive.study}/series/{hostile_archive.series}/instances/{sop}"
    assert result.exit_code == 1, result.output
    assert f"failed: {url}: " in result.output
    assert "lungcbir-dicomweb-" not in result.output
    series_url = url.rsplit("/instances/", 1)[0]
    assert f"{series_url} -> " in result.output and "(5 frames)" in result.output


def test_cached_files_are_named_by_their_url(tmp_path):
    source = DicomwebSource("http://h:1/dicom-web", environ={}, cache_dir=tmp_path / "c")
    assert source.cached_url(tmp_path / "c" / "1.2" / "1.3") == "http://h:1/dicom-web/studies/1.2/series/1.3"
    assert source.cached_url(str(tmp_path / "c" / "1.2" / "1.3" / "1.4.dcm")) == \
        "http://h:1/dicom-web/studies/1.2/series/1.3/instances/1.4"
    assert source.cached_url(tmp_path / "elsewhere" / "1.2" / "1.3") is None
    assert source.cached_url(tmp_path / "c" / "x" / "1.3") is None


# -- against a real archive (Orthanc) --------------------------------------------------------------


@pytest.mark.realdata
def test_cache_keeps_a_copy_and_rows_still_point_at_the_archive(dicomweb_archive, tiny_weights, tmp_path):
    study = next(iter(dicomweb_archive["studies"]))
    local = {sop: path for path, sop in dicomweb_archive["files"].items()
             if dicomweb_archive["study_of"][path] == study}
    result = invoke("index-dataset", dicomweb_archive["url"], "--study", study, "--cache", tmp_path / "cache",
                    "--weights", tiny_weights, *store_args(tmp_path))
    assert result.exit_code == 0, result.output
    cached = {path.stem: path for path in (tmp_path / "cache").rglob("*.dcm")}
    assert set(cached) == set(local)
    for sop, path in cached.items():
        assert np.array_equal(read_dicom(str(path)).pixels, read_dicom(local[sop]).pixels)
    assert all(is_dicomweb_url(row.path) for row in rows(tmp_path))


def archive_rows(tmp_path) -> list[ImageRecord]:
    return [row for row in rows(tmp_path) if is_dicomweb_url(row.path)]


@pytest.mark.realdata
@pytest.mark.slow
def test_index_from_orthanc_then_again_finds_nothing_new(dicomweb_archive, tiny_weights, tmp_path):
    url, expected = dicomweb_archive["url"], set(dicomweb_archive["files"].values())
    result = invoke("index-dataset", url, "--weights", tiny_weights, *store_args(tmp_path), "--commit-every", "40")
    assert result.exit_code == 0, result.output
    assert f"indexed {len(expected)}, skipped 0 (already indexed), failed 0" in result.output
    stored = archive_rows(tmp_path)
    assert {row.sop_uid for row in stored} == expected and len(stored) == len(expected)
    for row in stored:
        assert row.path == f"{url}/studies/{row.study_uid}/series/{row.series_uid}/instances/{row.sop_uid}"
        assert row.source_format == "dicom" and row.slice_index is not None
    again = invoke("index-dataset", url, "--weights", tiny_weights, *store_args(tmp_path))
    assert again.exit_code == 0 and f"indexed 0, skipped {len(expected)} (already indexed)" in again.output


@pytest.mark.realdata
def test_study_and_since_select_what_is_indexed(dicomweb_archive, tiny_weights, tmp_path):
    url, files, studies = dicomweb_archive["url"], dicomweb_archive["files"], dicomweb_archive["studies"]
    study_of = dicomweb_archive["study_of"]
    dated = sorted(date for date in studies.values() if date)
    since = dated[len(dated) // 2]  # a day that splits the dated studies
    newer = {files[path] for path in files if studies[study_of[path]] >= since}
    assert 0 < len(newer) < len(files)
    result = invoke("index-dataset", url, "--since", f"{since[:4]}-{since[4:6]}-{since[6:]}",
                    "--weights", tiny_weights, *store_args(tmp_path / "since"))
    assert result.exit_code == 0, result.output
    assert {row.sop_uid for row in archive_rows(tmp_path / "since")} == newer
    study = next(uid for uid in studies if not studies[uid])  # an undated, messy one
    in_study = {files[path] for path in files if study_of[path] == study}
    result = invoke("index-dataset", url, "--study", study, "--weights", tiny_weights, *store_args(tmp_path / "one"))
    assert result.exit_code == 0, result.output
    assert {row.sop_uid for row in archive_rows(tmp_path / "one")} == in_study


@pytest.mark.realdata
@pytest.mark.slow
def test_a_killed_archive_run_resumes(dicomweb_archive, tiny_weights, tmp_path):
    url, expected = dicomweb_archive["url"], set(dicomweb_archive["files"].values())
    retriever = Retriever(f"sqlite:///{tmp_path / 'db.sqlite'}", tmp_path / "index", weights=tiny_weights,
                          files_per_commit=10)
    seen = []

    def killed_after_25(path):
        seen.append(path)
        if len(seen) == 25:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        retriever.index_dataset([url], on_file=killed_after_25)
    kept = len(archive_rows(tmp_path))
    assert 0 < kept < len(expected)
    report = Retriever(f"sqlite:///{tmp_path / 'db.sqlite'}", tmp_path / "index",
                       weights=tiny_weights).index_dataset([url])
    assert (report.indexed, report.skipped, report.failed) == (len(expected) - kept, kept, 0)
    assert sorted(row.sop_uid for row in archive_rows(tmp_path)) == sorted(expected)  # each once
    # archive rows are not local files: `check --files` must not call them missing
    assert Store(f"sqlite:///{tmp_path / 'db.sqlite'}", tmp_path / "index").check(verify_files=True) == []


@pytest.mark.realdata
def test_an_instance_that_cannot_be_read_is_listed(dicomweb_archive, tiny_weights, tmp_path):
    """A CT instance without pixel data in its own study: one `failed: URL: reason`, exit 1."""
    import requests

    clean = next(path for path in dicomweb_archive["files"] if "P001" in path)  # valid identifiers
    dataset = pydicom.dcmread(clean)
    del dataset.PixelData
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        setattr(dataset, keyword, pydicom.uid.generate_uid())
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    source = DicomwebSource(dicomweb_archive["url"])
    assert not source.client.store([dataset]).get("FailedSOPSequence")
    try:
        result = invoke("index-dataset", dicomweb_archive["url"], "--study", dataset.StudyInstanceUID,
                        "--weights", tiny_weights, *store_args(tmp_path))
        ref = f"{dicomweb_archive['url']}/studies/{dataset.StudyInstanceUID}/series/" \
              f"{dataset.SeriesInstanceUID}/instances/{dataset.SOPInstanceUID}"
        assert result.exit_code == 1, result.output
        assert f"failed: {ref}: DICOM file has no pixel data (not an image)" in result.output
        assert "indexed 0, skipped 0 (already indexed), failed 1" in result.output
    finally:
        base = dicomweb_archive["url"].rsplit("/dicom-web", 1)[0]
        found = requests.post(f"{base}/tools/lookup", data=dataset.StudyInstanceUID, timeout=30).json()
        for item in found:
            requests.delete(f"{base}{item['Path']}", timeout=30)


@pytest.mark.realdata
def test_thumbnail_of_an_archive_row_is_fetched_from_the_archive(dicomweb_archive, tiny_weights, tmp_path):
    url = dicomweb_archive["url"]
    study = next(iter(dicomweb_archive["studies"]))
    retriever = Retriever(f"sqlite:///{tmp_path / 'db.sqlite'}", tmp_path / "index", weights=tiny_weights)
    retriever.index_dataset([url], study=study)
    row = archive_rows(tmp_path)[0]
    client = TestClient(create_app(retriever), base_url="http://localhost", raise_server_exceptions=False)
    metadata = client.get(f"/api/images/{row.id}").json()
    assert metadata["sop_uid"] == row.sop_uid and metadata["url"] == row.path
    picture = client.get(f"/api/images/{row.id}/thumbnail")
    assert picture.status_code == 200 and picture.headers["content-type"] == "image/png"
    local = next(p for p, sop in dicomweb_archive["files"].items() if sop == row.sop_uid)
    from lungcbir.visualize import display_image

    expected = display_image(read_dicom(local))
    shown = cv2.imdecode(np.frombuffer(picture.content, np.uint8), cv2.IMREAD_UNCHANGED)
    scale = 192 / max(expected.shape)
    assert np.array_equal(shown, cv2.resize(expected, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA))


@pytest.mark.realdata
@pytest.mark.slow
def test_round_trip_index_query_seg_stow_fetch_back(dicomweb_archive, bundled_weights, tmp_path):
    """The whole loop against the archive with the bundled model: index a messy study (its UIDs
    were derived when it was loaded), query it, segment it to a SEG stored by STOW-RS, fetch the
    SEG back by DICOMweb, compare its frames with the PNG masks, and index again: nothing new."""
    url, files = dicomweb_archive["url"], dicomweb_archive["files"]
    study = next(uid for uid, date in dicomweb_archive["studies"].items() if not date)  # messy: derived UIDs
    local = sorted(path for path in files if dicomweb_archive["study_of"][path] == study)
    assert local
    db = store_args(tmp_path)
    indexed = invoke("index-dataset", url, "--study", study, "--weights", bundled_weights, *db)
    assert indexed.exit_code == 0 and f"indexed {len(local)}, skipped 0" in indexed.output, indexed.output

    answer = invoke("query", local[0], "--json", "--k", "1", "--out", tmp_path / "q", "--weights", bundled_weights, *db)
    neighbour = json.loads(answer.output.splitlines()[0])["neighbors"][0]
    assert neighbour["sop_uid"] == files[local[0]] and neighbour["study_uid"] == study
    assert neighbour["url"].startswith(f"{url}/studies/{study}/series/") and neighbour["url"].endswith(files[local[0]])

    segged = invoke("segment", url, "--study", study, "--format", "dicom-seg", "--stow", "--out", tmp_path / "seg",
                    "--weights", bundled_weights)
    assert segged.exit_code == 0, segged.output
    assert f"stored 1 SEG(s) in {url}" in segged.output
    written = pydicom.dcmread(next((tmp_path / "seg").glob("*_seg.dcm")))
    from dicomweb_client.api import DICOMwebClient

    archive = DICOMwebClient(url)  # checked with the library itself, not through lungcbir
    seg_series = archive.search_for_series(study, search_filters={"Modality": "SEG"})
    assert [s["0020000E"]["Value"][0] for s in seg_series] == [written.SeriesInstanceUID]
    fetched = archive.retrieve_instance(study, written.SeriesInstanceUID, written.SOPInstanceUID)
    assert invoke("segment", *local, "--format", "png", "--out", tmp_path / "png",
                  "--weights", bundled_weights).exit_code == 0
    frames = fetched.pixel_array.reshape(int(fetched.NumberOfFrames), int(fetched.Rows), int(fetched.Columns))
    by_sop = {str(item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID): frame
              for item, frame in zip(fetched.PerFrameFunctionalGroupsSequence, frames)}
    assert set(by_sop) == {files[path] for path in local}
    for path in local:
        png = cv2.imread(str(tmp_path / "png" / f"{Path(path).stem}_mask.png"), cv2.IMREAD_UNCHANGED)
        assert np.array_equal(by_sop[files[path]].astype(bool), png > 0), path
    assert any(frame.any() for frame in frames)
    fetched.save_as(tmp_path / "fetched_seg.dcm", enforce_file_format=True)
    dciodvfy(tmp_path / "fetched_seg.dcm")  # what the archive gives back is still a valid SEG

    again = invoke("index-dataset", url, "--study", study, "--weights", bundled_weights, *db)
    assert again.exit_code == 0 and f"indexed 0, skipped {len(local)}" in again.output, again.output



def test_instances_of_a_tilted_series_are_ordered_along_its_normal():
    """QIDO's Image Position and Orientation give the order (by z alone this series is reversed)."""
    import numpy as np

    from lungcbir.dicomweb import _order_key

    tilt = np.radians(30)
    column = np.array([0.0, np.cos(tilt), np.sin(tilt)])
    normal = np.cross([1.0, 0.0, 0.0], column)
    found = []
    for number in range(5):
        position = -5.0 * number * normal + 30.0 * number * column  # superior first; z grows
        found.append({"00200032": {"vr": "DS", "Value": [float(v) for v in position]},
                      "00200037": {"vr": "DS", "Value": [1.0, 0.0, 0.0, *map(float, column)]},
                      "00200013": {"vr": "IS", "Value": [5 - number]}})
    order = sorted(range(5), key=lambda number: _order_key(found[number]))
    assert order == [0, 1, 2, 3, 4]


def test_a_busy_answer_is_retried_not_a_failed_instance(hostile_archive, tmp_path, tiny_weights):
    """One 503 from a PACS under load no longer fails its instance (retries were off)."""
    busy = "".join(hostile_archive.listing[2]["00080018"]["Value"])
    original, answered = hostile_archive.answer, []

    def busy_once(path, query):
        if path.endswith(busy) and not answered:
            answered.append(path)
            return 503, {"Retry-After": "0"}, b"busy"
        return original(path, query)

    hostile_archive.answer = busy_once
    result = index_archive(hostile_archive, tmp_path, tiny_weights)
    assert answered and result.exit_code == 0, result.output
    assert "indexed 6, skipped 0 (already indexed), failed 0" in result.output


def test_a_query_is_fetched_from_the_archive_by_study_and_series(hostile_archive, phantom_dir, tmp_path,
                                                                 tiny_weights):
    """`query URL --study UID --series UID`: the query series comes from the archive, no export."""
    assert invoke("index-dataset", phantom_dir / "png", "--weights", tiny_weights, *store_args(tmp_path),
                  "--quiet").exit_code == 0
    url, study, series = hostile_archive.url, hostile_archive.study, hostile_archive.series
    result = invoke("query", url, "--study", study, "--series", series, "--json", "--k", "2", "--no-pictures",
                    "--weights", tiny_weights, *store_args(tmp_path))
    assert result.exit_code == 0, result.output
    answers = [json.loads(line) for line in result.output.splitlines()]
    assert len(answers) == len(hostile_archive.listing)  # one answer per slice of the series
    assert all(answer["query"] == f"{url}/studies/{study}/series/{series}" for answer in answers)
    assert any("/instances" in request for request in hostile_archive.requests)
    whole = invoke("query", url, "--study", study, "--by-series", "--json", "--weights", tiny_weights,
                   *store_args(tmp_path))  # the study's only CT series
    assert whole.exit_code in (0, 1), whole.output  # 1: the tiny random model may find no lungs
    assert json.loads(whole.output.splitlines()[-1])["slices"] == len(hostile_archive.listing)
    missing = invoke("query", url, "--weights", tiny_weights, *store_args(tmp_path))
    assert missing.exit_code == 2 and "needs --study" in missing.output
    other = invoke("query", url, "--study", study, "--series", "1.2.3", "--weights", tiny_weights,
                   *store_args(tmp_path))
    assert other.exit_code != 0 and f"no series 1.2.3 in study {study}" in other.output


def test_the_web_api_fetches_a_query_series_from_its_archive(hostile_archive, phantom_dir, bundled_weights,
                                                             tmp_path):
    """`/?study=UID&series=UID` (a viewer's launch link): the page asks /api/query-archive, which
    fetches the series from the server's archive: no export, no upload."""
    from fastapi.testclient import TestClient

    from lungcbir.retrieval import Retriever
    from lungcbir.websecurity import WebSettings

    retriever = Retriever(f"sqlite:///{tmp_path / 'db.sqlite'}", tmp_path / "index", weights=bundled_weights)
    retriever.index_dataset([phantom_dir / "png"])
    study, series = hostile_archive.study, hostile_archive.series
    without = TestClient(create_app(retriever), base_url="http://localhost")
    assert without.post("/api/query-archive", data={"study": study}).status_code == 404
    client = TestClient(create_app(retriever, WebSettings(archive_url=hostile_archive.url)),
                        base_url="http://localhost")
    answer = client.post("/api/query-archive", data={"study": study, "series": series, "k": 2})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["slices"] == len(hostile_archive.listing) and body["cases"]
    assert body["query"] == f"study {study}, series {series}"
    assert client.post("/api/query-archive", data={"study": study, "series": "1.2.3"}).status_code == 422
    assert client.post("/api/query-archive", data={"study": "../etc"}).status_code == 422


def stored_parts(body: bytes) -> list[pydicom.Dataset]:
    """The DICOM instances of a STOW-RS request body (multipart/related)."""
    boundary = body.lstrip(b"\r\n").split(b"\r\n", 1)[0]
    parts = [part.split(b"\r\n\r\n", 1)[1] for part in body.split(boundary)[1:-1]]
    return [pydicom.dcmread(io.BytesIO(part.removesuffix(b"\r\n"))) for part in parts]


def test_the_seg_of_an_archive_query_is_downloaded_and_stored_back(hostile_archive, phantom_dir, bundled_weights,
                                                                   tmp_path):
    """Issue 27 expectation 6: from an archive query's answer, its DICOM SEG (Lung and Lesion,
    one frame per slice each, referring to the archive's instances) can be downloaded and
    stored back in that archive; nothing the client can send names a file or reaches another
    archive, and no error names the archive's address or a server folder."""
    from lungcbir.websecurity import WebSettings

    retriever = Retriever(f"sqlite:///{tmp_path / 'db.sqlite'}", tmp_path / "index", weights=bundled_weights)
    retriever.index_dataset([phantom_dir / "png"])
    client = TestClient(create_app(retriever, WebSettings(archive_url=hostile_archive.url)),
                        base_url="http://localhost")
    study, series = hostile_archive.study, hostile_archive.series
    answer = client.post("/api/query-archive", data={"study": study, "series": series, "k": 2})
    assert answer.status_code == 200, answer.text
    offer = answer.json()["seg"]
    assert offer["download"].startswith("/api/seg/") and offer["store"] == offer["download"] + "/stow"
    assert offer["reason"] is None

    seg = client.get(offer["download"])
    assert seg.status_code == 200, seg.text
    assert seg.headers["content-type"] == "application/dicom"
    assert seg.headers["content-disposition"] == f'attachment; filename="{series}_seg.dcm"'
    written = pydicom.dcmread(io.BytesIO(seg.content))
    slices = len(hostile_archive.listing)
    assert [s.SegmentLabel for s in written.SegmentSequence] == ["Lung", "Lesion"]
    assert int(written.NumberOfFrames) == 2 * slices  # every slice, empty frames kept
    assert written.StudyInstanceUID == study
    assert written.ReferencedSeriesSequence[0].SeriesInstanceUID == series
    referenced = {str(item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
                  for item in written.PerFrameFunctionalGroupsSequence}
    assert referenced == set(hostile_archive.served)
    frames = written.pixel_array.reshape(2 * slices, int(written.Rows), int(written.Columns))
    assert frames[:slices].any()  # the bundled model finds the phantom's lungs

    stored = client.post(offer["store"])
    assert stored.status_code == 200, stored.text
    body = stored.json()
    assert body["sop_instance_uid"] == written.SOPInstanceUID and body["study_uid"] == study
    assert body["referenced_series_uid"] == series and body["segments"] == ["Lung", "Lesion"]
    assert body["frames"] == 2 * slices
    assert len(hostile_archive.stored) == 1
    [sent] = stored_parts(hostile_archive.stored[0])
    assert sent.SOPInstanceUID == written.SOPInstanceUID and sent.Modality == "SEG"

    # refused by the archive: 502, saying so without its address
    hostile_archive.store_status = 409
    refused = client.post(offer["store"])
    assert refused.status_code == 502 and "the archive" in refused.json()["detail"]
    # unknown or hostile tokens name nothing
    for token in ["x", "..%2F..%2Fetc%2Fpasswd", "a" * 300]:
        assert client.get(f"/api/seg/{token}").status_code == 404
        assert client.post(f"/api/seg/{token}/stow").status_code == 404
    # the archive sends another instance for a header: refused, not written into a SEG
    other = client.post("/api/query-archive", data={"study": study, "k": 2}).json()["seg"]
    first = next(iter(hostile_archive.served))
    hostile_archive.served = {sop: hostile_archive.served[first] for sop in hostile_archive.served}
    swapped = client.get(other["download"])
    assert swapped.status_code == 502 and "the archive sent instance" in swapped.json()["detail"]
    for text in (refused.text, swapped.text):
        assert hostile_archive.url not in text and "127.0.0.1" not in text and str(tmp_path) not in text
    # without an archive there is nothing to fetch from or store in
    without = TestClient(create_app(retriever), base_url="http://localhost")
    assert without.get(offer["download"]).status_code == 404


def test_an_uploaded_query_gets_a_seg_only_when_dicom_and_never_stores_it_back(phantom_dir, tiny_weights, tmp_path):
    """An uploaded DICOM slice or series gets its SEG (headers from the upload's own bytes) but
    no store-back, and the answer says why (the archive may not hold its instances); a picture
    gets no SEG, and the answer says why (no DICOM source UIDs)."""
    from lungcbir.views.seg import NOT_DICOM, UPLOADED

    retriever = Retriever(f"sqlite:///{tmp_path / 'db.sqlite'}", tmp_path / "index", weights=tiny_weights)
    retriever.index_dataset([phantom_dir / "png"])
    client = TestClient(create_app(retriever), base_url="http://localhost")
    png = next((phantom_dir / "png" / "phantom01").glob("*.png"))
    picture = client.post("/api/query", files={"file": (png.name, png.read_bytes())}).json()
    assert picture["seg"] == {"download": None, "store": None, "reason": NOT_DICOM}
    assert "DICOM source UIDs" in NOT_DICOM and "uploaded" in UPLOADED

    dicoms = sorted((phantom_dir / "dicom" / "phantom01").glob("*.dcm"))
    for answer, sources in [
            (client.post("/api/query", files={"file": (dicoms[2].name, dicoms[2].read_bytes())}).json(), dicoms[2:3]),
            (client.post("/api/query-series", files=[("files", (p.name, p.read_bytes())) for p in dicoms]).json(),
             dicoms)]:
        offer = answer["seg"]
        assert offer["store"] is None and offer["reason"] == UPLOADED and offer["download"].startswith("/api/seg/")
        seg = client.get(offer["download"])
        assert seg.status_code == 200, seg.text
        written = pydicom.dcmread(io.BytesIO(seg.content))
        referenced = {str(item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
                      for item in written.PerFrameFunctionalGroupsSequence}
        assert referenced == {str(pydicom.dcmread(path).SOPInstanceUID) for path in sources}
        assert int(written.NumberOfFrames) == len(sources) * len(written.SegmentSequence)
        # no archive here, and an upload is never stored back: the same reason, whatever the server
        assert client.post(offer["download"] + "/stow").status_code == 404
        stored = TestClient(create_app(retriever, WebSettings(archive_url="http://127.0.0.1:9/dicom-web")),
                            base_url="http://localhost")
        token_elsewhere = stored.post("/api/query", files={"file": (dicoms[0].name, dicoms[0].read_bytes())}).json()
        refused = stored.post(token_elsewhere["seg"]["download"] + "/stow")
        assert refused.status_code == 409 and refused.json()["detail"] == UPLOADED


@pytest.mark.realdata
@pytest.mark.slow
def test_the_page_stores_an_archive_query_seg_in_orthanc(dicomweb_archive, bundled_weights, phantom_dir, tmp_path):
    """The web's store-back against a real archive: a covid-ct-md series of Orthanc queried by
    /api/query-archive, its SEG stored by /api/seg/{token}/stow, then found there with the
    archive's own client: a SEG of that study, Lung and Lesion, referring to every instance."""
    from dicomweb_client.api import DICOMwebClient

    from lungcbir.websecurity import WebSettings

    url, files, study_of = dicomweb_archive["url"], dicomweb_archive["files"], dicomweb_archive["study_of"]
    study = next(uid for uid, date in sorted(dicomweb_archive["studies"].items()) if date)
    local = [path for path in files if study_of[path] == study]
    retriever = Retriever(f"sqlite:///{tmp_path / 'db.sqlite'}", tmp_path / "index", weights=bundled_weights)
    retriever.index_dataset([phantom_dir / "png"])
    client = TestClient(create_app(retriever, WebSettings(archive_url=url)), base_url="http://localhost")
    answer = client.post("/api/query-archive", data={"study": study, "k": 2})
    assert answer.status_code == 200, answer.text
    assert answer.json()["slices"] == len(local)
    stored = client.post(answer.json()["seg"]["store"])
    assert stored.status_code == 200, stored.text
    body = stored.json()
    assert body["study_uid"] == study and body["frames"] == 2 * len(local)
    archive = DICOMwebClient(url)  # checked with the library itself, not through lungcbir
    seg_series = archive.search_for_series(study, search_filters={"Modality": "SEG"})
    assert body["series_instance_uid"] in [s["0020000E"]["Value"][0] for s in seg_series]
    fetched = archive.retrieve_instance(study, body["series_instance_uid"], body["sop_instance_uid"])
    assert [s.SegmentLabel for s in fetched.SegmentSequence] == ["Lung", "Lesion"]
    referenced = {str(item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
                  for item in fetched.PerFrameFunctionalGroupsSequence}
    assert referenced == {files[path] for path in local}


def test_headers_are_fetched_from_this_archive_only(hostile_archive):
    """DicomwebSource.headers sends its credentials to its own archive only: a URL of another
    host is refused before any request; its own instances come back in order, without pixels."""
    from lungcbir.errors import ReadError

    source = DicomwebSource(hostile_archive.url, environ={"LUNGCBIR_DICOMWEB_TOKEN": "tok-123"})
    with pytest.raises(ReadError, match="not an instance of this archive"):
        source.headers(["http://attacker.example/dicom-web/studies/1.2/series/1.3/instances/1.4"])
    assert not hostile_archive.requests
    sops = list(hostile_archive.served)[:3]
    base = f"{hostile_archive.url}/studies/{hostile_archive.study}/series/{hostile_archive.series}/instances"
    headers = source.headers([f"{base}/{sop}" for sop in sops])
    assert [str(h.SOPInstanceUID) for h in headers] == sops and "PixelData" not in headers[0]


def test_a_query_from_the_archive_writes_its_seg_too(hostile_archive, phantom_dir, tmp_path, tiny_weights):
    """`query URL --study UID --series UID --out DIR` writes each DICOM query's SEG as for a
    file (its header fetched again from the archive); it failed, reading the URL as a path."""
    assert invoke("index-dataset", phantom_dir / "png", "--weights", tiny_weights, *store_args(tmp_path),
                  "--quiet").exit_code == 0
    url, study, series = hostile_archive.url, hostile_archive.study, hostile_archive.series
    result = invoke("query", url, "--study", study, "--series", series, "--json", "--k", "1", "--out",
                    tmp_path / "out", "--weights", tiny_weights, *store_args(tmp_path))
    assert result.exit_code == 0, result.output
    answers = [json.loads(line) for line in result.output.splitlines()]
    assert len(answers) == len(hostile_archive.listing) and all("seg" in answer for answer in answers)
    written = {str(pydicom.dcmread(answer["seg"]).ReferencedSeriesSequence[0].ReferencedInstanceSequence[0]
                   .ReferencedSOPInstanceUID) for answer in answers}
    assert written == set(hostile_archive.served)
