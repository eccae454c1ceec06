"""create_app: the FastAPI application, its lifespan (model loading) and its middleware."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.access import check_routes, enforce_access, install_openapi, route_levels
from server.observability.logs import RequestIdMiddleware
from server.observability.metrics import Metrics
from server.protocol.errors import error_body, install_error_handlers
from server.routes import dashboard, docs, generate, health, models, openai, routing, scalings
from server.serving.manager import ModelManager
from server.serving.routing_state import RoutingSnapshotMiddleware
from server.settings import AuthSettings, Settings

log = logging.getLogger("xlora.server")


def create_app(
    settings: Settings,
    auth: AuthSettings | None = None,
    on_fatal: Callable[[str], None] | None = None,
    manager: ModelManager | None = None,
    load_before_serving: bool = False,
) -> FastAPI:
    """The app for one config. `on_fatal(message)` is called if the model cannot be loaded (the
    command line uses it to stop the server with a non-zero exit code). A Ray Serve replica passes its own
    `manager` (shared routing state and scalings log) and `load_before_serving`: its start-up ends only once
    the model is loaded, so Serve sends it no traffic before then."""
    manager = manager or ModelManager(settings, Metrics())
    metrics = manager.metrics
    manager.on_fatal = on_fatal

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        manager.start_loading()  # in a thread: /health answers while the model loads
        if load_before_serving:
            await asyncio.to_thread(manager.wait_loaded)
            if manager.state != "ready":
                raise RuntimeError(f"the model failed to load: {manager.error}")
        yield
        manager.begin_draining()
        await asyncio.to_thread(manager.shutdown)

    app = FastAPI(
        title="xlora-server",
        version="0.1.0",
        summary="X-LoRA (a mixture of LoRA experts with a learned per-token router) over HTTP",
        lifespan=lifespan,
        # The docs routes are ours (server/routes/docs.py): offline files, and under the access policy.
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        # Every route's level comes from server/access.py; check_routes below refuses a route without one.
        dependencies=[Depends(enforce_access)],
    )
    app.state.settings = settings
    app.state.auth = auth if auth is not None else AuthSettings.from_env()
    app.state.metrics = metrics
    app.state.manager = manager
    app.state.route_levels = route_levels(settings.server)

    install_error_handlers(app)
    for module in (health, generate, models, routing, scalings, openai, dashboard, docs):
        app.include_router(module.router)
    app.state.route_access = check_routes(app, app.state.route_levels)
    install_openapi(app, app.state.route_levels)
    # Last added is outermost: metrics see every answer, including 413s from the body limit; the request id
    # (and the summary log line) cover everything.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.server.max_body_bytes)
    # Every request reads the routing state once; every response names the replica and the routing version.
    app.add_middleware(
        RoutingSnapshotMiddleware, state=manager.routing_state, replica=manager.replica,
        on_new_snapshot=manager.note_routing,
    )
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.add_middleware(RequestIdMiddleware)
    return app


class MetricsMiddleware:
    """Counts requests by route template and status, and times them (streams: until the last byte)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            route = scope.get("route")
            # Unknown paths share one label, so random URLs cannot blow up the metric's cardinality.
            name = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(route=name, method=scope["method"], status=str(status)).inc()
            self.metrics.request_latency.labels(route=name).observe(time.perf_counter() - started)


class BodyLimitMiddleware:
    """Refuses bodies over `max_bytes` with 413 before anything parses them (Content-Length or not)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send)
            return
        # Read the (bounded) body here, then hand it on; later receive() calls go to the client
        # so that disconnects are still seen.
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send: Send) -> None:
        payload = json.dumps(
            error_body(413, f"request body larger than {self.max_bytes} bytes", param="body", code="body_too_large")
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"connection", b"close")],
            }
        )
        await send({"type": "http.response.body", "body": payload})
