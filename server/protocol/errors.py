"""One error shape for every route: OpenAI's `{"error": {"message", "type", "param", "code"}}`.

`param` names the request field at fault (dotted, e.g. `routing.top_k`), so a client can tell which
of its inputs was refused. Validation errors are 422 on the native API and 400 on /v1, as OpenAI does.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("xlora.server")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
    504: "timeout_error",
}


class APIError(Exception):
    """An error answered to the client; raise it anywhere below a route."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        if param and not message.startswith(param):
            message = f"{param}: {message}"  # the message alone names the field too
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": _TYPES.get(status, "error"), "param": param, "code": code}}


def error_response(
    status: int,
    message: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def _field(loc: tuple[Any, ...] | list[Any]) -> str | None:
    """`("body", "routing", "top_k")` -> "routing.top_k"; pydantic's union branch names are dropped."""
    parts = [str(p) for p in loc if p != "body"]
    # Union members show up as e.g. "list[str]" or "function-after[...]": not field names.
    parts = [p for p in parts if "[" not in p and p not in {"str", "int", "float", "bool"}]
    return ".".join(parts) or None


def describe_validation(exc: RequestValidationError) -> tuple[str, str | None]:
    """A readable message listing every problem, and the first field at fault."""
    problems, first = [], None
    for err in exc.errors():
        field = _field(err.get("loc", ()))
        if err.get("type") == "extra_forbidden":
            msg = "unknown field (not accepted by this endpoint)"
        elif err.get("type") == "json_invalid":
            field, msg = "body", f"malformed JSON: {err.get('ctx', {}).get('error', err.get('msg'))}"
        else:
            msg = err.get("msg", "invalid")
            if msg.startswith("Value error, "):
                msg = msg[len("Value error, "):]
        first = first or field
        problems.append(f"{field}: {msg}" if field else msg)
    return "; ".join(problems) or "invalid request", first


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        status = exc.status
        if status == 422 and request.url.path.startswith("/v1/"):
            status = 400  # OpenAI answers every invalid parameter with 400
        return error_response(status, exc.message, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, field = describe_validation(exc)
        status = 400 if request.url.path.startswith("/v1/") else 422
        return error_response(status, message, field, "invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        param = "body" if exc.status_code == 400 else None
        return error_response(exc.status_code, message, param, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # A bug of ours, not the client's: say so without leaking internals, and log the trace.
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, f"internal error: {type(exc).__name__}", code="internal_error")
