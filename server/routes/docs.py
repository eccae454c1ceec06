"""/openapi.json and /docs (Swagger UI), with Swagger UI's script and style files served by the app itself.

FastAPI's own docs pages load Swagger UI and ReDoc from a CDN: a blank page on an offline machine. The files
come from the fastapi-offline package instead. These are ordinary routes, so the access policy covers them
(`server.docs_require_key`). There is no /redoc: ReDoc's bundle loads its logo from its vendor's CDN, so the
page would call outside every time it is opened.
"""

from __future__ import annotations

from pathlib import Path

import fastapi_offline
from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse

from server.protocol.errors import APIError

_ASSETS_DIR = Path(fastapi_offline.__file__).parent / "static"
# Only these files, by name: nothing else under that folder (or outside it) can be asked for.
_ASSETS = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "favicon.png": "image/png",
}

router = APIRouter(include_in_schema=False)


@router.get("/openapi.json")
async def openapi_schema(request: Request) -> JSONResponse:
    return JSONResponse(request.app.openapi())


@router.get("/docs")
async def swagger_ui(request: Request) -> HTMLResponse:
    return get_swagger_ui_html(
        openapi_url="/openapi.json",
        title=f"{request.app.title} - Swagger UI",
        swagger_js_url="/docs/assets/swagger-ui-bundle.js",
        swagger_css_url="/docs/assets/swagger-ui.css",
        swagger_favicon_url="/docs/assets/favicon.png",
        oauth2_redirect_url="/docs/oauth2-redirect",
        # No validator badge: it would send the schema to an outside service.
        swagger_ui_parameters={"validatorUrl": None},
    )


@router.get("/docs/oauth2-redirect")
async def swagger_ui_redirect() -> HTMLResponse:
    return get_swagger_ui_oauth2_redirect_html()


@router.get("/docs/assets/{name}")
async def docs_asset(name: str) -> FileResponse:
    media_type = _ASSETS.get(name)
    if media_type is None:
        raise APIError(404, f"no docs file {name!r}", param="name", code="not_found")
    return FileResponse(_ASSETS_DIR / name, media_type=media_type, headers={"Cache-Control": "public, max-age=86400"})
