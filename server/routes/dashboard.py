"""GET /dashboard: a page that shows which expert carried each token, and GET /access, what it must ask for.

The page is plain HTML, CSS and JavaScript under server/static/dashboard/ (no build step, nothing from a CDN).
Its data comes from the JSON routes (/scalings, /routing, /generate), each at its own access level; the page
itself holds no data and is public.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse

from server.protocol.errors import APIError
from server.protocol.schemas import AccessInfo
from server.settings import AuthSettings

_STATIC = Path(__file__).resolve().parent.parent / "static" / "dashboard"
_ASSETS = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}

router = APIRouter()


@router.get("/access", response_model=AccessInfo, tags=["access"])
async def access(request: Request) -> AccessInfo:
    """Whether the API key and the admin token are set, and each route's level (never the secrets)."""
    auth: AuthSettings = request.app.state.auth
    levels = request.app.state.route_levels
    return AccessInfo(
        api_key_required=auth.api_key is not None,
        admin_token_required=auth.admin_token is not None,
        levels={f"{method} {path}": level.value for (method, path), level in sorted(levels.items())},
    )


@router.get("/dashboard", include_in_schema=False)
async def dashboard() -> FileResponse:
    return FileResponse(_STATIC / "index.html", media_type="text/html", headers={"Cache-Control": "no-cache"})


@router.get("/dashboard/assets/{name}", include_in_schema=False)
async def dashboard_asset(name: str) -> FileResponse:
    media_type = _ASSETS.get(name)
    if media_type is None:
        raise APIError(404, f"no dashboard file {name!r}", param="name", code="not_found")
    return FileResponse(_STATIC / name, media_type=media_type, headers={"Cache-Control": "no-cache"})
