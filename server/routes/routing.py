"""GET/PATCH /routing: the top_k, global scaling weight and freeze_after that new requests start with."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from server.deps import ready_manager
from server.manager import ModelManager
from server.routing_state import RoutingSnapshot
from server.schemas import RoutingState, RoutingUpdate, error_responses

router = APIRouter(tags=["routing"])


def _state(snapshot: RoutingSnapshot) -> RoutingState:
    return RoutingState(**snapshot.routing.to_dict(), version=snapshot.version)


@router.get("/routing", response_model=RoutingState, responses=error_responses(503))
async def get_routing(manager: ModelManager = Depends(ready_manager)) -> RoutingState:
    return _state(manager.routing_snapshot())


@router.patch(
    "/routing",
    response_model=RoutingState,
    responses=error_responses(400, 401, 422, 503),
)
async def patch_routing(update: RoutingUpdate, manager: ModelManager = Depends(ready_manager)) -> RoutingState:
    """Change the defaults for requests that start after this returns (on every replica); requests in flight
    keep theirs. Send only the fields to change; `top_k: null` means dense, `freeze_after: null` granular.
    The version goes up by one."""
    return _state(await manager.set_routing(update))
