"""GET/PATCH /routing: the top_k, global scaling weight and freeze_after that new requests start with."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from server.deps import ready_manager, require_admin
from server.manager import ModelManager
from server.schemas import RoutingSettings, RoutingUpdate, error_responses

router = APIRouter(tags=["routing"])


@router.get("/routing", response_model=RoutingSettings, responses=error_responses(503))
async def get_routing(manager: ModelManager = Depends(ready_manager)) -> RoutingSettings:
    return RoutingSettings(**manager.routing.to_dict())


@router.patch(
    "/routing",
    response_model=RoutingSettings,
    dependencies=[Depends(require_admin)],
    responses=error_responses(400, 401, 422, 503),
)
async def patch_routing(update: RoutingUpdate, manager: ModelManager = Depends(ready_manager)) -> RoutingSettings:
    """Change the defaults for requests that start after this returns; requests in flight keep theirs.
    Send only the fields to change; `top_k: null` means dense, `freeze_after: null` granular."""
    return RoutingSettings(**manager.set_routing(update).to_dict())
