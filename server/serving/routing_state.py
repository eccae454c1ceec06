"""The routing in force and its version: one place every request reads and `PATCH /routing` writes.

- `LocalRoutingState`: in this process (the single-process server). With `server.state_file` every change is
  written to that file atomically (a temporary file, fsync, rename) and the file is read at start-up, so a
  PATCH survives a restart.
- `RayRoutingState` (server/ray_app.py): a handle to `RoutingStateActor`, the Serve deployment-scoped actor that
  holds the routing of every replica of a deployment (README: "Scaling out").

A snapshot is (routing, version); the version goes up by one with each change. Writers compare and set: a PATCH
merges its fields into the snapshot it read and stores the result only if the version is still the one it
read (else it reads again), so two PATCHes sent to two replicas at once cannot lose one another's fields.

Each HTTP request reads the snapshot once, at its start (`RoutingSnapshotMiddleware`): everything the request
does (merging its own routing fields, the `x-xlora-routing-version` header) uses that one snapshot, and a
request that starts after a PATCH returned sees the PATCH, whichever replica it reaches.

Routings are stored as the dict of the `xlora_core.Routing` dataclass's fields (whatever fields it has), so
this module never imports torch: the Ray actor that holds the state stays a small process.
"""

from __future__ import annotations

import contextvars
import dataclasses
import json
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from starlette.types import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:
    from xlora_core import Routing

log = logging.getLogger("xlora.routing_state")

REPLICA_HEADER = "x-xlora-replica"
VERSION_HEADER = "x-xlora-routing-version"


class StateFileError(ValueError):
    """A state file that cannot be read or written; the message names the file."""


@dataclass(frozen=True)
class RoutingSnapshot:
    routing: Routing
    version: int


def routing_from_dict(data: dict[str, Any], where: str) -> Routing:
    """A Routing from stored fields; unknown fields are refused naming `where` (missing ones take defaults)."""
    from xlora_core import Routing

    known = {f.name for f in dataclasses.fields(Routing)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise StateFileError(f"{where}: unknown routing field(s) {', '.join(unknown)}")
    return Routing(**data)


def config_routing(routing_section: Any) -> Routing:
    """The config file's `routing:` section as a Routing (every Routing field the section has)."""
    from xlora_core import Routing

    return Routing(**{f.name: getattr(routing_section, f.name) for f in dataclasses.fields(Routing)
                      if hasattr(routing_section, f.name)})


# -----------------------------------------------------------------------------
# the state file


def read_state_file(path: Path) -> tuple[dict[str, Any], int] | None:
    """(routing fields, version) from `path`, or None if there is no such file yet."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateFileError(f"server.state_file {path}: cannot read it: {exc.strerror or exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise StateFileError(f"server.state_file {path}: not valid JSON: {exc}") from None
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("routing"), dict)
        or not isinstance(data.get("version"), int)
        or data["version"] < 0
    ):
        raise StateFileError(
            f"server.state_file {path}: expected {{\"version\": <int >= 0>, \"routing\": {{...}}}}, got {text[:200]!r}"
        )
    return data["routing"], data["version"]


def read_state_models(path: Path) -> list[dict[str, Any]]:
    """The models loaded at run time that `path` keeps (server/serving/manager.py), [] if none or no file."""
    if read_state_file(path) is None:
        return []
    models = json.loads(path.read_text(encoding="utf-8")).get("models", [])
    if not isinstance(models, list) or not all(isinstance(m, dict) for m in models):
        raise StateFileError(f"server.state_file {path}: models must be a list of objects")
    return models


def write_state_file(path: Path, routing: dict[str, Any], version: int, models: list | None = None) -> None:
    """Replace `path` atomically: a reader (or a crash) sees the old file or the new one, never half of one.
    `models` (None: the file's, kept as they are): the models loaded at run time."""
    if models is None:
        models = read_state_models(path) if path.exists() else []
    data: dict[str, Any] = {"version": version, "routing": routing}
    if models:
        data["models"] = models
    payload = json.dumps(data, indent=2) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class StoredRouting:
    """(routing fields, version), optionally backed by a state file. Plain dicts: no torch here."""

    def __init__(self, initial: dict[str, Any], state_file: str | None) -> None:
        self.state_file = Path(state_file) if state_file else None
        self.routing, self.version = dict(initial), 0
        self.from_file = False
        if self.state_file is not None:
            stored = read_state_file(self.state_file)
            if stored is not None:
                self.routing, self.version = stored
                self.from_file = True

    def get(self) -> tuple[dict[str, Any], int]:
        return dict(self.routing), self.version

    def compare_and_set(self, expected_version: int, routing: dict[str, Any]) -> tuple[dict[str, Any], int] | None:
        """Store `routing` as version+1 if the version is still `expected_version`; else None (read again)."""
        if expected_version != self.version:
            return None
        version = self.version + 1
        if self.state_file is not None:  # file first: a change that could not be kept is not made
            try:
                write_state_file(self.state_file, routing, version)
            except OSError as exc:
                raise StateFileError(
                    f"server.state_file {self.state_file}: cannot write it: {exc.strerror or exc}"
                ) from None
        self.routing, self.version = dict(routing), version
        return self.get()


# -----------------------------------------------------------------------------
# the stores


class RoutingState(Protocol):
    """Where a process reads and changes the routing in force."""

    source: str  # what the routing came from, for error messages (a config file, a state file, an actor)

    async def current(self) -> RoutingSnapshot:
        """The snapshot in force now (may ask another process)."""

    async def compare_and_set(self, expected_version: int, routing: Routing) -> RoutingSnapshot | None:
        """Store `routing` if the version is still `expected_version`; None if another change came first."""

    def last_seen(self) -> RoutingSnapshot:
        """The newest snapshot this process has seen, without asking anyone (for /health, /metrics)."""


class LocalRoutingState:
    """The single-process server's routing state (optionally kept in `server.state_file`)."""

    def __init__(self, initial: Routing, state_file: str | None, config_source: str) -> None:
        self._stored = StoredRouting(initial.to_dict(), state_file)
        self.source = f"server.state_file {state_file}" if self._stored.from_file else config_source
        routing, version = self._stored.get()
        self._snapshot = RoutingSnapshot(routing_from_dict(routing, self.source), version)
        if self._stored.from_file:
            log.info("routing version %d read from %s: %s", version, state_file, routing)

    async def current(self) -> RoutingSnapshot:
        return self._snapshot

    async def compare_and_set(self, expected_version: int, routing: Routing) -> RoutingSnapshot | None:
        stored = self._stored.compare_and_set(expected_version, routing.to_dict())
        if stored is None:
            return None
        self._snapshot = RoutingSnapshot(routing, stored[1])
        return self._snapshot

    def last_seen(self) -> RoutingSnapshot:
        return self._snapshot


# -----------------------------------------------------------------------------
# the snapshot of one HTTP request


@dataclass
class _RequestRouting:
    snapshot: RoutingSnapshot  # replaced by a PATCH, so its response carries the new version


_request_routing: contextvars.ContextVar[_RequestRouting | None] = contextvars.ContextVar(
    "xlora_request_routing", default=None
)


def request_snapshot() -> RoutingSnapshot | None:
    """The snapshot the current HTTP request started with (None outside a request)."""
    holder = _request_routing.get()
    return holder.snapshot if holder is not None else None


def note_new_snapshot(snapshot: RoutingSnapshot) -> None:
    """After a PATCH: the rest of this request (and its response headers) use the new snapshot."""
    holder = _request_routing.get()
    if holder is not None:
        holder.snapshot = snapshot


# Paths that answer from what this process has seen, so they never wait on another process (liveness, scrapes).
_LOCAL_PATHS = {"/health", "/ready", "/metrics"}


class RoutingSnapshotMiddleware:
    """Reads the routing snapshot once per request and names the replica and routing version in every
    response's headers (x-xlora-replica, x-xlora-routing-version)."""

    def __init__(
        self,
        app: ASGIApp,
        state: RoutingState,
        replica: str,
        on_new_snapshot: Callable[[RoutingSnapshot], None] | None = None,
    ) -> None:
        self.app = app
        self.state = state
        self.replica = replica.encode()
        self.on_new_snapshot = on_new_snapshot

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = self.state
        seen = state.last_seen()
        if scope["path"] in _LOCAL_PATHS:
            snapshot = seen
        else:
            try:
                snapshot = await state.current()
            except Exception as exc:  # the state's holder is away (restarting): say so, do not guess
                await self._refuse(send, exc)
                return
        if snapshot.version != seen.version and self.on_new_snapshot is not None:
            self.on_new_snapshot(snapshot)
        holder = _RequestRouting(snapshot)
        token = _request_routing.set(holder)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers.append((REPLICA_HEADER.encode(), self.replica))
                headers.append((VERSION_HEADER.encode(), str(holder.snapshot.version).encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            _request_routing.reset(token)

    async def _refuse(self, send: Send, exc: Exception) -> None:
        from server.protocol.errors import error_body

        log.warning("routing state unavailable: %s: %s", type(exc).__name__, exc)
        body = json.dumps(
            error_body(503, "the shared routing state is unavailable; retry shortly", code="routing_state_unavailable")
        ).encode()
        await send({
            "type": "http.response.start",
            "status": 503,
            "headers": [(b"content-type", b"application/json"), (b"retry-after", b"1"),
                        (REPLICA_HEADER.encode(), self.replica)],
        })
        await send({"type": "http.response.body", "body": body})
