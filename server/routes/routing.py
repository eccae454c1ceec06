"""GET/PATCH /routing: the top_k and global scaling weight that new requests start with."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from server.deps import ready_manager
from server.manager import ModelManager
from server.scheduler import routing_dict
from server.schemas import RoutingSettings, RoutingUpdate, error_responses

router = APIRouter(tags=["routing"])


@router.get("/routing", response_model=RoutingSettings, responses=error_responses(503))
async def get_routing(manager: ModelManager = Depends(ready_manager)) -> RoutingSettings:
    return RoutingSettings(**routing_dict(manager.routing))


@router.patch(
    "/routing",
    response_model=RoutingSettings,
    responses=error_responses(400, 401, 422, 503),
)
async def patch_routing(update: RoutingUpdate, manager: ModelManager = Depends(ready_manager)) -> RoutingSettings:
    """Change the defaults for requests that start after this returns; requests in flight keep theirs.
    Send only the fields to change; `top_k: null` means dense."""
    return RoutingSettings(**routing_dict(manager.set_routing(update)))
