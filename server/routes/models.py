"""The models served over the base (docs/models.md): GET /models lists them; POST /models loads one from a folder
under server.model_root and DELETE /models/{name} unloads one, at run time (admin level)."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from server.deps import ready_manager
from server.protocol.schemas import LoadModelRequest, ModelInfo, ModelsList, UnloadedModel, error_responses
from server.serving.manager import ModelManager
from xlora_core.hosted import HostedModel

router = APIRouter(tags=["models"])


def _info(model: HostedModel, manager: ModelManager) -> ModelInfo:
    routing = manager.model_routing(model) if model.kind == "xlora" else None
    return ModelInfo(name=model.name, kind=model.kind, experts=list(model.expert_names), routing=routing)


@router.get("/models", response_model=ModelsList, responses=error_responses(401, 503))
async def list_models(manager: ModelManager = Depends(ready_manager)) -> ModelsList:
    """The xlora section's model first, then the config's `models:`, then those loaded at run time. A request
    names one by `model`."""
    return ModelsList(default=manager.model_name, models=[_info(m, manager) for m in manager.models()])


@router.post("/models", response_model=ModelInfo, responses=error_responses(400, 401, 403, 409, 422, 503))
async def load_model(body: LoadModelRequest, manager: ModelManager = Depends(ready_manager)) -> ModelInfo:
    """Load an X-LoRA checkpoint or a PEFT LoRA adapter from a folder under server.model_root (safetensors only),
    off the model thread; it joins between decode steps, and requests in flight go on. Kept in
    server.state_file across restarts."""
    kind, field = ("xlora", "checkpoint") if body.checkpoint is not None else ("adapter", "adapter")
    model = await manager.load_model(body.name, kind, getattr(body, field), field)
    return _info(model, manager)


@router.delete("/models/{name}", response_model=UnloadedModel, responses=error_responses(401, 404, 409, 503))
async def unload_model(name: str, manager: ModelManager = Depends(ready_manager)) -> UnloadedModel:
    """Stop serving a model and free its experts that no other model uses. Refused (409) while requests of it
    run or wait: it does not drain them; retry when they are done."""
    await manager.unload_model(name)
    return UnloadedModel(name=name)
