"""FastAPI dependencies: the model manager and readiness. (Auth is server/access.py's, on every route.)"""

from __future__ import annotations

from fastapi import Depends, Request

from server.serving.manager import ModelManager


def get_manager(request: Request) -> ModelManager:
    return request.app.state.manager


def ready_manager(manager: ModelManager = Depends(get_manager)) -> ModelManager:
    """The manager, once the model serves; 503 while loading or shutting down."""
    manager.require_ready()
    return manager
