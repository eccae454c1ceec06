"""/health (the process answers), /ready (the model serves), /metrics (Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from server.deps import get_manager
from server.protocol.schemas import Health, Readiness
from server.serving.manager import ModelManager

router = APIRouter(tags=["health"])


@router.get("/health", response_model=Health)
async def health() -> Health:
    """Answers as soon as the process does, loading or not."""
    return Health(status="ok")


@router.get("/ready", response_model=Readiness, responses={503: {"model": Readiness, "description": "Not ready"}})
async def ready(manager: ModelManager = Depends(get_manager)) -> JSONResponse:
    """200 once the model is loaded and serving; 503 while loading, after a failure, or while draining."""
    body = Readiness(**manager.readiness())
    return JSONResponse(body.model_dump(), status_code=200 if body.ready else 503)


@router.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
