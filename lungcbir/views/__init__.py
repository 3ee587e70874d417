"""The web API's routes (one module per kind of answer), their response models (``schemas``)
and the state they share (``state``); :func:`lungcbir.web.create_app` assembles them.

Where a new route goes: a handler in the module of its kind (or a new module added to
:data:`ROUTERS`) that parses the request, calls :class:`lungcbir.retrieval.Retriever` and
formats the answer as a model of :mod:`lungcbir.views.schemas`.
"""

from __future__ import annotations

from fastapi import APIRouter

from . import images, query, seg, series, stats

#: Every router of the API, in the order their routes are matched.
ROUTERS: tuple[APIRouter, ...] = (stats.router, query.router, series.router, seg.router, images.router)
