"""FastAPI dependencies: the model manager, readiness, and bearer-token auth."""

from __future__ import annotations

import hmac

from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from server.errors import APIError
from server.manager import ModelManager
from server.settings import ADMIN_TOKEN_ENV, API_KEY_ENV, AuthSettings

_bearer = HTTPBearer(auto_error=False, description=f"{API_KEY_ENV} for generation, {ADMIN_TOKEN_ENV} for admin")


def get_manager(request: Request) -> ModelManager:
    return request.app.state.manager


def ready_manager(manager: ModelManager = Depends(get_manager)) -> ModelManager:
    """The manager, once the model serves; 503 while loading or shutting down."""
    manager.require_ready()
    return manager


def _check(expected: str | None, credentials: HTTPAuthorizationCredentials | None, what: str) -> None:
    if expected is None:  # that check is off
        return
    if credentials is None:
        raise APIError(401, f"missing bearer token ({what})", code="missing_token",
                       headers={"WWW-Authenticate": "Bearer"})
    # Constant-time comparison: the time taken says nothing about how much of the token matched.
    if not hmac.compare_digest(credentials.credentials.encode(), expected.encode()):
        raise APIError(401, f"wrong bearer token ({what})", code="invalid_token",
                       headers={"WWW-Authenticate": "Bearer"})


def require_api_key(request: Request, credentials: HTTPAuthorizationCredentials | None = Security(_bearer)) -> None:
    auth: AuthSettings = request.app.state.auth
    _check(auth.api_key, credentials, f"set by {API_KEY_ENV}")


def require_admin(request: Request, credentials: HTTPAuthorizationCredentials | None = Security(_bearer)) -> None:
    auth: AuthSettings = request.app.state.auth
    _check(auth.admin_token, credentials, f"set by {ADMIN_TOKEN_ENV}")
