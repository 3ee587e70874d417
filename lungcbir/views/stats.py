"""Routes about the server, the model and the database as a whole: ``/healthz``, ``/api/labels``,
``/api/stats``."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from fastapi import APIRouter

from ..database import FILTER_COLUMNS
from ..focus import VECTOR_PARTS
from .schemas import ERROR_RESPONSES, Health, Labels, Stats
from .state import AppState

router = APIRouter()


@router.get("/healthz", response_model=Health)
async def healthz() -> dict[str, str]:
    """Liveness. Answered on the event loop, not in the worker threads that queries fill while
    they wait for the model, so it answers at once however long the queue."""
    return {"status": "ok"}


@router.get("/api/labels", response_model=Labels, responses=ERROR_RESPONSES)
def stored_labels(web: AppState) -> dict[str, Any]:
    """Stored label keys with their values (for filter drop-downs) and the metadata columns a
    filter may also name."""
    return {"labels": web.retriever.store(create=False).label_values(), "columns": list(FILTER_COLUMNS)}


@router.get("/api/stats", response_model=Stats, responses=ERROR_RESPONSES)
def stats(web: AppState) -> dict[str, Any]:
    """What is in the database and the index (the database by kind only, never its URL), and the
    parts of the model's vectors: ``focus_available`` says whether a search focus changes anything."""
    answer = asdict(web.retriever.store(create=False).stats())
    answer["database"] = str(answer.get("database") or "").split(":", 1)[0].split("+", 1)[0] or None
    # the model is loaded before the server starts (serve), so this reads what is already there
    parts = VECTOR_PARTS[:len(web.retriever.model.parts)]
    answer["vector_parts"] = list(parts)
    answer["focus_available"] = len(parts) > 1
    return answer
