"""Where finished requests' scalings go, and where `/scalings` reads them.

- `LocalScalingsStore`: this process's bounded log (server/observability/scalings_log.py), the single-process server's.
- `SharedScalingsStore` (server/ray_app.py): every replica of a deployment writes to one bounded log held by
  `SharedScalingsLog`, a Serve deployment-scoped actor, so `/scalings` answers for the whole deployment
  whichever replica receives it. Each replica also keeps its own entries locally, for its metrics gauge.

Writers are the scheduler's worker thread (`add`, synchronous: "log first, answer second", so a client that asks
`/scalings/{id}` right after its answer finds it, through any replica); readers are the routes (async).
Every entry names the replica that served it.
"""

from __future__ import annotations

from typing import Any, Protocol

from server.observability.scalings_log import RequestScalingsLog, ScalingsEntry


class ScalingsWriter(Protocol):
    """What the scheduler needs of a store: somewhere to put a finished request's entry."""

    def add(self, entry: ScalingsEntry) -> None: ...


class LocalScalingsStore:
    """A bounded log in this process."""

    def __init__(self, capacity: int, replica: str) -> None:
        self.log = RequestScalingsLog(capacity)
        self.replica = replica

    @property
    def capacity(self) -> int:
        return self.log.capacity

    # ---- written by the scheduler's worker thread; read by the metrics gauge --------------------
    def add(self, entry: ScalingsEntry) -> None:
        entry.replica = self.replica
        self.log.add(entry)

    def mean_of(self, adapter: int, model: str | None = None) -> float:
        return self.log.mean_of(adapter, model)

    # ---- read by the routes -------------------------------------------------------------------
    async def summaries(self) -> list[dict[str, Any]]:
        return [e.summary() for e in self.log.entries()]

    async def bucketed(self) -> list[dict[str, Any]]:
        return self.log.bucketed()

    async def detail(self, request_id: str) -> dict[str, Any] | None:
        entry = self.log.get(request_id)
        return entry.detail() if entry is not None else None

    async def latest(self) -> dict[str, Any] | None:
        entry = self.log.latest()
        return entry.detail() if entry is not None else None

    async def clear(self) -> int:
        return self.log.clear()


class SharedScalingsLog:
    """The deployment's one scalings log (a Ray actor's state): the same bounded log, whole entries in, plain
    dicts out (so a summary never carries the per-token tensors across processes)."""

    def __init__(self, capacity: int) -> None:
        self.log = RequestScalingsLog(capacity)

    def capacity(self) -> int:
        return self.log.capacity

    def add(self, entry: ScalingsEntry) -> None:
        self.log.add(entry)

    def summaries(self) -> list[dict[str, Any]]:
        return [e.summary() for e in self.log.entries()]

    def bucketed(self) -> list[dict[str, Any]]:
        return self.log.bucketed()

    def detail(self, request_id: str) -> dict[str, Any] | None:
        entry = self.log.get(request_id)
        return entry.detail() if entry is not None else None

    def latest(self) -> dict[str, Any] | None:
        entry = self.log.latest()
        return entry.detail() if entry is not None else None

    def clear(self) -> int:
        return self.log.clear()

    def __len__(self) -> int:
        return len(self.log)
