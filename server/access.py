"""Who may call what: one table of every route's access level, enforced by one dependency on every route.

Levels, each including the one before:
- public: anyone (probes, the dashboard's page and the docs' own script files, which hold no data);
- client: the API key (`XLORA_API_KEY`) when it is set: generation, /v1, reading routing and scalings numbers;
- admin: the admin token (`XLORA_ADMIN_TOKEN`) when it is set: changing routing, deleting the scalings log,
  reading the token texts of the log. While no admin token is set, admin actions are open at client level.

The admin token also grants client level; the API key never grants admin level. `check_routes` stops the app
from starting when a route has no level here (or a level names a route that does not exist).
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from enum import Enum
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute, iter_route_contexts

from server.protocol.errors import APIError
from server.settings import ADMIN_TOKEN_ENV, API_KEY_ENV, AuthSettings, ServerSection


class Level(str, Enum):
    PUBLIC = "public"
    CLIENT = "client"
    ADMIN = "admin"


PUBLIC, CLIENT, ADMIN = Level.PUBLIC, Level.CLIENT, Level.ADMIN

# Reading other requests' token texts (GET /scalings/{id}?include_text=true): their prompts and answers.
TOKEN_TEXT = ADMIN


def route_levels(server: ServerSection) -> dict[tuple[str, str], Level]:
    """(method, path template) -> level, for every route of the app."""
    metrics = CLIENT if server.metrics_require_key else PUBLIC
    docs = CLIENT if server.docs_require_key else PUBLIC
    return {
        ("GET", "/health"): PUBLIC,
        ("GET", "/ready"): PUBLIC,
        ("GET", "/metrics"): metrics,
        ("GET", "/access"): PUBLIC,  # which secrets are set, so the dashboard knows what to ask for
        ("POST", "/generate"): CLIENT,
        ("GET", "/v1/models"): CLIENT,
        ("GET", "/models"): CLIENT,
        ("POST", "/models"): ADMIN,  # reads folders under server.model_root
        ("DELETE", "/models/{name}"): ADMIN,
        ("POST", "/v1/completions"): CLIENT,
        ("POST", "/v1/chat/completions"): CLIENT,
        ("GET", "/routing"): CLIENT,
        ("PATCH", "/routing"): ADMIN,
        ("GET", "/scalings"): CLIENT,
        ("GET", "/scalings/latest"): CLIENT,  # token texts: TOKEN_TEXT
        ("GET", "/scalings/{request_id}"): CLIENT,  # token texts: TOKEN_TEXT
        ("DELETE", "/scalings"): ADMIN,
        ("GET", "/openapi.json"): docs,
        ("GET", "/docs"): docs,
        ("GET", "/docs/oauth2-redirect"): docs,
        ("GET", "/docs/assets/{name}"): PUBLIC,  # Swagger UI's own files
        ("GET", "/dashboard"): PUBLIC,  # the page only: its data comes from the routes above, at their levels
        ("GET", "/dashboard/assets/{name}"): PUBLIC,
    }


@dataclass(frozen=True)
class Caller:
    """What the request's bearer token proved."""

    sent_token: bool
    is_client: bool  # the API key
    is_admin: bool  # the admin token


def identify(auth: AuthSettings, authorization: str | None) -> Caller:
    scheme, _, token = (authorization or "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return Caller(sent_token=False, is_client=False, is_admin=False)
    # Constant-time comparisons, both always made: the time taken says nothing about the token.
    is_client = _same(token, auth.api_key)
    is_admin = _same(token, auth.admin_token)
    return Caller(sent_token=True, is_client=is_client, is_admin=is_admin)


def _same(given: str, expected: str | None) -> bool:
    if expected is None:
        hmac.compare_digest(given.encode(), given.encode())
        return False
    return hmac.compare_digest(given.encode(), expected.encode())


def allows(level: Level, caller: Caller, auth: AuthSettings) -> bool:
    if level is PUBLIC:
        return True
    if level is ADMIN and auth.admin_token is not None:
        return caller.is_admin
    # Client level, and admin level while no admin token is set.
    return auth.api_key is None or caller.is_client or caller.is_admin


def refusal(level: Level, caller: Caller, auth: AuthSettings, what: str) -> APIError:
    """The 401 for `what` (e.g. "PATCH /routing"); names the secret needed, never the one sent."""
    if level is ADMIN and auth.admin_token is not None:
        needed = f"the admin token ({ADMIN_TOKEN_ENV}); the API key does not grant it"
    else:
        needed = f"the API key ({API_KEY_ENV}) or the admin token"
    if caller.sent_token:
        message, code = f"wrong bearer token: {what} needs {needed}", "invalid_token"
    else:
        message, code = f"missing bearer token: {what} needs {needed}", "missing_token"
    return APIError(401, message, code=code, headers={"WWW-Authenticate": "Bearer"})


def require(request: Request, level: Level, what: str) -> Caller:
    """Raise the 401 unless this request's caller has `level`; return the caller."""
    auth: AuthSettings = request.app.state.auth
    caller = identify(auth, request.headers.get("authorization"))
    if not allows(level, caller, auth):
        raise refusal(level, caller, auth, what)
    return caller


async def enforce_access(request: Request) -> None:
    """The app-wide dependency: the matched route's level from the table, checked before anything else."""
    method = "GET" if request.method == "HEAD" else request.method
    path, level = request.app.state.route_access[id(request.scope["route"])][method]
    require(request, level, f"{method} {path}")


def check_routes(app: FastAPI, levels: dict[tuple[str, str], Level]) -> dict[int, dict[str, tuple[str, Level]]]:
    """Every route of the app has a level and is an APIRoute (so the app's dependencies run); every level names
    a route. Else RuntimeError. Returns, per route object (by id), method -> (path, level) for enforce_access."""
    access: dict[int, dict[str, tuple[str, Level]]] = {}
    problems: list[str] = []
    for context in iter_route_contexts(app.routes):
        route, path = context.original_route, context.path
        if not isinstance(route, APIRoute):  # a mount or a plain Starlette route would skip the dependency
            problems.append(f"{path!r} is not an APIRoute, so no access check would run")
            continue
        for method in sorted(context.methods or ()):
            if (method, path) in levels:
                access.setdefault(id(route), {})[method] = (path, levels[(method, path)])
            else:
                problems.append(f"{method} {path} has no access level in server/access.py")
    seen = {(method, path) for methods in access.values() for method, (path, _) in methods.items()}
    problems += [f"{m} {p} has an access level but no route" for m, p in sorted(set(levels) - seen)]
    if problems:
        raise RuntimeError("access policy: " + "; ".join(problems))
    return access


def install_openapi(app: FastAPI, levels: dict[tuple[str, str], Level]) -> None:
    """The OpenAPI schema states each operation's level: a bearer `security` and a 401 for client and admin."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title, version=app.version, summary=app.summary, description=app.description, routes=app.routes
        )
        schemes = schema.setdefault("components", {}).setdefault("securitySchemes", {})
        schemes["bearer"] = {
            "type": "http",
            "scheme": "bearer",
            "description": f"{API_KEY_ENV} for client routes, {ADMIN_TOKEN_ENV} for admin routes (and client ones)",
        }
        for path, operations in schema.get("paths", {}).items():
            for method, operation in operations.items():
                level = levels[(method.upper(), path)]
                operation["x-access-level"] = level.value
                if level is PUBLIC:
                    continue
                operation["security"] = [{"bearer": []}]
                operation["responses"].setdefault(
                    "401",
                    {
                        "description": "Missing or wrong bearer token",
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
                    },
                )
        app.openapi_schema = schema
        return schema

    app.openapi = openapi
