"""/scalings: the router's expert mix for recent requests (a bounded log; with replicas, the deployment's)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query

from server.deps import get_manager, require_admin
from server.errors import APIError
from server.manager import ModelManager
from server.schemas import (
    BucketedScalingsLog,
    Cleared,
    ScalingsDetail,
    ScalingsLogResponse,
    error_responses,
)

router = APIRouter(tags=["scalings"])


@router.get("/scalings", response_model=ScalingsLogResponse | BucketedScalingsLog, responses=error_responses(422))
async def list_scalings(
    bucketed: bool = Query(False, description="group by sequence length, as peft's get_bucketed_scalings_log"),
    manager: ModelManager = Depends(get_manager),
) -> ScalingsLogResponse | BucketedScalingsLog:
    """Recent requests, oldest first: token counts and mean scaling per adapter."""
    log = manager.scalings_log
    if bucketed:
        return BucketedScalingsLog(capacity=log.capacity, buckets=await log.bucketed())
    return ScalingsLogResponse(capacity=log.capacity, entries=await log.summaries())


@router.get("/scalings/latest", response_model=ScalingsDetail, responses=error_responses(404))
async def latest_scalings(manager: ModelManager = Depends(get_manager)) -> ScalingsDetail:
    entry = await manager.scalings_log.latest()
    if entry is None:
        raise APIError(404, "no request has finished yet (or the log was cleared)", code="not_found")
    return ScalingsDetail(**entry)


@router.get("/scalings/{request_id}", response_model=ScalingsDetail, responses=error_responses(404))
async def one_request_scalings(request_id: str, manager: ModelManager = Depends(get_manager)) -> ScalingsDetail:
    """Per-token, per-layer scalings of one request (while it is still in the log)."""
    entry = await manager.scalings_log.detail(request_id)
    if entry is None:
        raise APIError(404, f"no request {request_id!r} in the scalings log", param="request_id", code="not_found")
    return ScalingsDetail(**entry)


@router.delete(
    "/scalings", response_model=Cleared, dependencies=[Depends(require_admin)], responses=error_responses(401)
)
async def clear_scalings(manager: ModelManager = Depends(get_manager)) -> Cleared:
    return Cleared(cleared=await manager.scalings_log.clear())
