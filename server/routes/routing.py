"""GET/PATCH /routing: the top_k, global scaling weight and freeze_after that new requests start with."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query

from server.deps import ready_manager
from server.protocol.schemas import RoutingPatch, RoutingState, error_responses
from server.serving.manager import ModelManager
from server.serving.routing_state import RoutingSnapshot

router = APIRouter(tags=["routing"])


def _state(snapshot: RoutingSnapshot) -> RoutingState:
    return RoutingState(**snapshot.routing.to_dict(), version=snapshot.version)


@router.get("/routing", response_model=RoutingState, responses=error_responses(404, 503))
async def get_routing(
    manager: ModelManager = Depends(ready_manager),
    model: str | None = Query(None, description="another X-LoRA model's defaults (GET /models)"),
) -> RoutingState:
    snapshot = manager.routing_snapshot()
    if model is None or manager.resolve_model(model) is manager.model.primary:
        return _state(snapshot)
    return RoutingState(**manager.model.routing_of(model).to_dict(), version=snapshot.version)


@router.patch(
    "/routing",
    response_model=RoutingState,
    responses=error_responses(400, 401, 404, 422, 503),
)
async def patch_routing(update: RoutingPatch, manager: ModelManager = Depends(ready_manager)) -> RoutingState:
    """Change the defaults for requests that start after this returns (on every replica); requests in flight
    keep theirs. Send only the fields to change; `top_k: null` means dense, `freeze_after: null` granular.
    The version goes up by one. With `model` (another X-LoRA model): that model's defaults, in this process
    only (not versioned, not kept in server.state_file; docs/models.md)."""
    if update.model is not None and manager.resolve_model(update.model) is not manager.model.primary:
        routing = manager.set_model_routing(update)
        return RoutingState(**routing.to_dict(), version=manager.routing_snapshot().version)
    return _state(await manager.set_routing(update))
