"""The REST API through FastAPI's test client: every endpoint and its error answers."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from fastapi.testclient import TestClient

from lungcbir.retrieval import Retriever
from lungcbir.web import create_app


@pytest.fixture
def client(phantom_dir, tiny_weights, store_paths):
    retriever = Retriever(weights=tiny_weights, **store_paths)
    retriever.index_dataset([phantom_dir / "dicom"])
    return TestClient(create_app(retriever), raise_server_exceptions=False)


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


def test_upload_too_large(client, monkeypatch):
    import lungcbir.web

    monkeypatch.setattr(lungcbir.web, "MAX_UPLOAD_BYTES", 100)
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
    client = TestClient(create_app(retriever), raise_server_exceptions=False)
    response = client.get("/api/stats")
    assert response.status_code == 503 and "not available" in response.json()["detail"]
    assert str(tmp_path) not in response.text


def test_stored_overlay_uses_the_mask_kept_in_the_row(client, monkeypatch):
    from lungcbir.inference import LungModel

    def no_model(*_args, **_kwargs):
        raise AssertionError("the model ran for a stored slice whose mask is kept")

    monkeypatch.setattr(LungModel, "segment", no_model)
    picture = client.get("/api/images/1/overlay")
    assert picture.status_code == 200 and picture.content[:4] == b"\x89PNG"
