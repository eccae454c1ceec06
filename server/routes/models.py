"""GET /models: every model served over the base (docs/models.md), with its kind, experts and routing defaults."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from server.deps import ready_manager
from server.manager import ModelManager
from server.schemas import ModelInfo, ModelsList, error_responses

router = APIRouter(tags=["models"])


@router.get("/models", response_model=ModelsList, responses=error_responses(401, 503))
async def list_models(manager: ModelManager = Depends(ready_manager)) -> ModelsList:
    """The xlora section's model first, then the config's `models:` in order. A request names one by `model`."""
    models = [
        ModelInfo(name=m.name, kind=m.kind, experts=list(m.expert_names),
                  routing=manager.model_routing(m) if m.kind == "xlora" else None)  # fmt: skip
        for m in manager.models()
    ]
    return ModelsList(default=manager.model_name, models=models)
