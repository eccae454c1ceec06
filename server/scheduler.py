"""Continuous batching: one worker thread owns the model; requests join the running batch between steps.

The event loop only appends jobs to a bounded queue and reads their events, so it never waits on the
model. Each loop of the worker:
  1. drops rows whose client went away or whose deadline passed (their cache rows are freed);
  2. admits waiting jobs up to max_batch_size: one prefill for the newcomers, whose caches are then
     joined to the running batch's;
  3. runs one decode step for every running row, each with its own routing and sampling settings.
A failure inside the model fails only the requests it touched; the worker goes on.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase

from server.errors import APIError
from server.logs import current_request_id, note_request
from server.metrics import Metrics
from server.scalings_log import ScalingsEntry, ScalingsLog
from xlora_core import Routing, XLoraModel
from xlora_core.cache import XLoraCache
from xlora_core.generation import RowDecoder

log = logging.getLogger("xlora.scheduler")


# -----------------------------------------------------------------------------
# what flows from the worker to the waiting handler


@dataclass
class TokenEvent:
    index: int
    token_id: int
    text: str


@dataclass
class DoneEvent:
    finish_reason: str
    text: str
    prompt_tokens: int
    completion_tokens: int
    routing: Routing
    scalings: torch.Tensor  # [tokens processed, layers, adapters]: the prompt, then each token fed back

    def token_scalings(self) -> tuple[list[list[float]], list[list[float]]]:
        """Mean over layers: (one row per prompt token, one row per completion token). A completion
        token's row is the mix at the step that chose it, i.e. at the position before it."""
        rows = self.scalings.mean(dim=1)
        start = self.prompt_tokens - 1
        return rows[: self.prompt_tokens].tolist(), rows[start : start + self.completion_tokens].tolist()


@dataclass
class ErrorEvent:
    status: int
    message: str
    code: str

    def to_api_error(self) -> APIError:
        return APIError(self.status, self.message, code=self.code)


Event = TokenEvent | DoneEvent | ErrorEvent


@dataclass
class GenerationJob:
    """One request as the worker sees it; its events go back to the event loop thread-safely."""

    id: str
    prompt_ids: list[int]
    decoder: RowDecoder  # built by the route (it can refuse a request's settings: a 4xx, not a model error)
    routing: Routing
    deadline: float  # time.monotonic()
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    submitted: float = field(default_factory=time.monotonic)
    cancelled: bool = False  # set by the event loop (client gone); read by the worker between steps
    request_id: str | None = field(default_factory=current_request_id)  # the HTTP request's, for log lines
    finished: bool = False

    def post(self, event: Event) -> None:
        if isinstance(event, DoneEvent | ErrorEvent):
            self.finished = True
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def cancel(self) -> None:
        self.cancelled = True


class QueueFullError(APIError):
    def __init__(self, retry_after: int) -> None:
        super().__init__(
            429,
            "the request queue is full; retry later",
            code="queue_full",
            headers={"Retry-After": str(retry_after)},
        )


@dataclass
class _Row:
    """A job in the running batch."""

    job: GenerationJob
    decoder: RowDecoder
    next_token: int  # chosen, not yet fed to the model
    scalings: list[torch.Tensor]  # [positions, layers, adapters] pieces, on the CPU
    first_token_at: float
    last_token_at: float


# -----------------------------------------------------------------------------


class Scheduler:
    def __init__(
        self,
        model: XLoraModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        max_batch_size: int,
        max_queue: int,
        metrics: Metrics,
        scalings_log: ScalingsLog,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.metrics = metrics
        self.scalings_log = scalings_log
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

        self._pending: deque[GenerationJob] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._running = 0  # rows in the batch; read by the event loop for draining
        self._thread = threading.Thread(target=self._work, name="xlora-worker", daemon=True)
        self.on_fatal: Callable[[BaseException], None] | None = None

    # ---- event-loop side -------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def submit(self, job: GenerationJob) -> None:
        """Queue a job, or raise QueueFullError (429) at once; never waits on the model."""
        with self._cond:
            if self._stopping:
                raise APIError(503, "the server is shutting down", code="shutting_down")
            if len(self._pending) >= self.max_queue:
                raise QueueFullError(retry_after=1)
            self._pending.append(job)
            self.metrics.queue_depth.set(len(self._pending))
            self._cond.notify()
        note_request(generation_id=job.id)

    @property
    def in_flight(self) -> int:
        """Jobs waiting or running (for graceful shutdown)."""
        return len(self._pending) + self._running

    def stop(self, timeout: float = 10.0) -> None:
        """Fail whatever is left with 503 and end the worker."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # ---- worker side -------------------------------------------------------------------------
    def _work(self) -> None:
        rows: list[_Row] = []
        cache: XLoraCache | None = None
        try:
            while True:
                admitted = self._wait_for_work(rows)
                if admitted is None:
                    break
                rows, cache = self._drop_gone(rows, cache)
                if admitted:
                    new_rows, new_cache = self._prefill(admitted)
                    if new_rows:
                        cache = new_cache if cache is None else XLoraCache.concat([cache, new_cache])
                        rows = rows + new_rows
                if rows:
                    rows, cache = self._decode(rows, cache)
                self._running = len(rows)
                self.metrics.running.set(len(rows))
                self.metrics.kv_cache_bytes.set(cache.nbytes() if cache is not None else 0)
        except BaseException as exc:  # a bug in the loop itself: fail everyone rather than hang them
            log.exception("scheduler worker died")
            for row in rows:
                row.job.post(ErrorEvent(500, f"the model worker failed: {exc}", "worker_failed"))
            if self.on_fatal is not None:
                self.on_fatal(exc)
        finally:
            self._fail_pending(503, "the server is shutting down", "shutting_down")
            for row in rows:
                if not row.job.finished:
                    row.job.post(ErrorEvent(503, "the server shut down before this request finished", "shutting_down"))
            self._running = 0

    def _wait_for_work(self, rows: list[_Row]) -> list[GenerationJob] | None:
        """Take waiting jobs that fit in the batch; block while there is nothing to do. None = stop."""
        with self._cond:
            while not rows and not self._pending and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            admitted = []
            now = time.monotonic()
            while self._pending and len(rows) + len(admitted) < self.max_batch_size:
                job = self._pending.popleft()
                if job.cancelled:
                    continue
                if now > job.deadline:  # timed out while waiting in the queue
                    self.metrics.generations.labels(outcome="timeout").inc()
                    job.post(_timeout(job, 0))
                    continue
                admitted.append(job)
            self._running = len(rows) + len(admitted)  # counted before the lock is let go: drain sees them
            self.metrics.queue_depth.set(len(self._pending))
            return admitted

    def _fail_pending(self, status: int, message: str, code: str) -> None:
        with self._cond:
            while self._pending:
                self._pending.popleft().post(ErrorEvent(status, message, code))
            self.metrics.queue_depth.set(0)

    def _drop_gone(self, rows: list[_Row], cache: XLoraCache | None) -> tuple[list[_Row], XLoraCache | None]:
        """Remove rows whose client disconnected or whose time is up; free their cache rows."""
        now = time.monotonic()
        keep = []
        for i, row in enumerate(rows):
            if row.job.cancelled:
                self.metrics.generations.labels(outcome="cancelled").inc()
            elif now > row.job.deadline:
                self.metrics.generations.labels(outcome="timeout").inc()  # counted before the client hears
                row.job.post(_timeout(row.job, len(row.decoder.completion_ids)))
            else:
                keep.append(i)
        return self._keep(rows, cache, keep)

    @staticmethod
    def _keep(rows: list[_Row], cache: XLoraCache | None, keep: list[int]) -> tuple[list[_Row], XLoraCache | None]:
        if len(keep) == len(rows):
            return rows, cache
        if not keep or cache is None:
            return [], None
        return [rows[i] for i in keep], cache.select(keep)

    # ---- model steps -------------------------------------------------------------------------
    def _prefill(self, jobs: list[GenerationJob]) -> tuple[list[_Row], XLoraCache | None]:
        """Prefill the newcomers together; if that fails, alone, so one bad request fails alone."""
        try:
            return self._prefill_batch(jobs)
        except Exception as exc:
            if len(jobs) == 1:
                self._fail(jobs[0], exc)
                return [], None
        rows, caches = [], []
        for job in jobs:
            try:
                more, cache = self._prefill_batch([job])
            except Exception as exc:
                self._fail(job, exc)
                continue
            if more:
                rows += more
                caches.append(cache)
        return rows, (XLoraCache.concat(caches) if caches else None)

    def _prefill_batch(self, jobs: list[GenerationJob]) -> tuple[list[_Row], XLoraCache | None]:
        width = max(len(job.prompt_ids) for job in jobs)
        ids = torch.full((len(jobs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(jobs), width), dtype=torch.long)
        for i, job in enumerate(jobs):
            n = len(job.prompt_ids)
            ids[i, width - n :] = torch.tensor(job.prompt_ids, dtype=torch.long)
            mask[i, width - n :] = 1
        decoders = [job.decoder for job in jobs]
        self.metrics.batch_size.labels(phase="prefill").observe(len(jobs))
        with torch.inference_mode():
            logits, scalings, cache = self.model.prefill(ids, mask, [job.routing for job in jobs])
        scalings = scalings.float().cpu()

        rows, keep = [], []
        now = time.monotonic()
        for i, (job, dec) in enumerate(zip(jobs, decoders, strict=True)):
            n = len(job.prompt_ids)
            self.metrics.prompt_tokens.inc(n)
            self.metrics.time_to_first_token.observe(now - job.submitted)
            row = _Row(job, dec, -1, [scalings[i, width - n :]], now, now)
            if not self._advance(row, logits[i]):
                rows.append(row)
                keep.append(i)
        if not keep:
            return [], None
        return rows, (cache if len(keep) == len(jobs) else cache.select(keep))

    def _decode(self, rows: list[_Row], cache: XLoraCache) -> tuple[list[_Row], XLoraCache | None]:
        tokens = torch.tensor([row.next_token for row in rows], dtype=torch.long)
        self.metrics.batch_size.labels(phase="decode").observe(len(rows))
        try:
            with torch.inference_mode():
                logits, scalings = self.model.decode(tokens, cache, [row.job.routing for row in rows])
        except Exception as exc:
            # The cache may be half-updated: every row in it fails, the worker carries on empty.
            for row in rows:
                self._fail(row.job, exc)
            return [], None
        scalings = scalings.float().cpu()
        keep = []
        for i, row in enumerate(rows):
            row.scalings.append(scalings[i])
            if not self._advance(row, logits[i]):
                keep.append(i)
        return self._keep(rows, cache, keep)

    def _advance(self, row: _Row, logits: torch.Tensor) -> bool:
        """Choose and emit one token for a row; finish it if it is done. True = finished."""
        dec = row.decoder
        token = dec.choose(logits)
        finish = dec.push(token)
        now = time.monotonic()
        row.last_token_at = now
        row.next_token = token
        row.job.post(TokenEvent(len(dec.completion_ids) - 1, token, dec.new_text()))
        self.metrics.generated_tokens.inc()
        if finish is None:
            return False
        self._finish(row, finish)
        return True

    def _finish(self, row: _Row, finish_reason: str) -> None:
        job, dec = row.job, row.decoder
        n_out = len(dec.completion_ids)
        scalings = torch.cat(row.scalings, dim=0)
        # Log first, answer second: a client that asks /scalings/{id} right after its answer finds it.
        self.scalings_log.add(
            ScalingsEntry(
                id=job.id,
                prompt_tokens=len(job.prompt_ids),
                completion_tokens=n_out,
                adapter_names=self.model.adapter_names,
                routing=routing_dict(job.routing),
                scalings=scalings,
                token_ids=list(job.prompt_ids) + list(dec.completion_ids),
            )
        )
        self.metrics.generations.labels(outcome=finish_reason).inc()
        self.metrics.prompt_tokens_per_request.observe(len(job.prompt_ids))
        self.metrics.generated_tokens_per_request.observe(n_out)
        if n_out > 1:
            self.metrics.time_per_output_token.observe((row.last_token_at - row.first_token_at) / (n_out - 1))
        job.post(DoneEvent(finish_reason, dec.text, len(job.prompt_ids), n_out, job.routing, scalings))

    def _fail(self, job: GenerationJob, exc: Exception) -> None:
        log.error(
            "generation %s failed inside the model: %s: %s", job.id, type(exc).__name__, exc,
            extra={"request_id": job.request_id, "generation_id": job.id},
        )
        self.metrics.generations.labels(outcome="error").inc()
        job.post(ErrorEvent(500, f"the model failed on this request: {type(exc).__name__}: {exc}", "model_error"))


def _timeout(job: GenerationJob, generated: int) -> ErrorEvent:
    waited = time.monotonic() - job.submitted
    return ErrorEvent(
        504, f"request timed out after {waited:.1f} s ({generated} tokens generated); nothing more will come",
        "timeout",
    )


def routing_dict(routing: Routing) -> dict:
    weight = routing.global_scaling_weight
    return {"top_k": routing.top_k, "global_scaling_weight": float(weight) if math.isfinite(weight) else weight}
