"""Continuous batching: one worker thread owns the model; requests join the running batch between steps.

The decoding itself is the engine's (`xlora_core.engine.DecodeBatch`); this file is the server's part:
the bounded queue, admission, cancellation and deadlines, failure isolation, events and metrics.
The event loop only appends jobs to the queue and reads their events, so it never waits on the model.
Each loop of the worker:
  1. drops rows whose client went away or whose deadline passed (their cache rows are freed);
  2. admits waiting jobs up to max_batch_size;
  3. runs one decode step for every running row, each with its own routing and sampling settings; the
     newcomers join in it, their prompts in the same forward, from their longest prefix in the prefix cache
     (xlora_core/prefix_cache.py), under a budget of `max_step_tokens` tokens per step: a long prompt is fed
     a chunk per step and the running rows get a token every step meanwhile (chunked prefill).
A failure inside the model fails only the requests it touched; the worker goes on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from transformers import PreTrainedTokenizerBase

from server.observability.logs import note_request
from server.observability.metrics import Metrics
from server.observability.scalings_log import ScalingsEntry
from server.observability.scalings_store import ScalingsWriter
from server.protocol.errors import APIError
from server.serving.jobs import DoneEvent, ErrorEvent, GenerationJob, QueueFullError, TokenEvent
from xlora_core import BatchRow, ConstraintError, DecodeBatch, Generated, XLoraModel
from xlora_core.compiled_step import MAX_BATCH
from xlora_core.engine import MAX_PROMPT_IN_STEPS
from xlora_core.prefix_cache import PrefixCache

log = logging.getLogger("xlora.scheduler")

# How long a compiled step that is ready waits for the batch to empty by itself before new requests are held
# back so that it empties (Scheduler.use_packaged_step).
SWITCH_WAIT_S = 5.0


class Scheduler:
    def __init__(
        self,
        model: XLoraModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        max_batch_size: int,
        max_queue: int,
        metrics: Metrics,
        scalings_log: ScalingsWriter,
        max_step_tokens: int | None = None,
        prefix_cache: PrefixCache | None = None,
    ) -> None:
        self.model = model
        self.max_step_tokens = max_step_tokens  # None: no budget, every prompt whole
        self.prefix_cache = prefix_cache
        # Prefill newcomers in forwards of their own, not in the running rows' step, when the model is compiled
        # but cannot feed prompts in its compiled step (`_feeds_prompts_in_steps`): its joint step is eager, and
        # running rows would get their tokens from other kernels than alone.
        self.separate_prefill = model.compiled
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.metrics = metrics
        self.scalings_log = scalings_log
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

        self._pending: deque[GenerationJob] = deque()
        self._tasks: deque[tuple[Callable[[list[DecodeBatch]], object], Future]] = deque()  # between_steps
        self._cond = threading.Condition()
        self._stopping = False
        self._running = 0  # rows in the batch; read by the event loop for draining
        self._thread = threading.Thread(target=self._work, name="xlora-worker", daemon=True)
        self.on_fatal: Callable[[BaseException], None] | None = None
        self._next_step: Any = None  # a compiled decode step to switch to once no row is running
        self._next_step_since = 0.0
        self._draining = False  # admissions held so that the running rows finish and the switch can happen
        self.on_switched: Callable[[], None] | None = None

    # ---- event-loop side -------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def submit(self, *jobs: GenerationJob) -> None:
        """Queue one request's jobs (one per choice), side by side so that they are admitted together and
        share their prompt's prefill; or raise QueueFullError (429) at once. Never waits on the model."""
        with self._cond:
            if self._stopping:
                raise APIError(503, "the server is shutting down", code="shutting_down")
            if len(self._pending) + len(jobs) > self.max_queue:
                raise QueueFullError(retry_after=1)
            try:  # unloaded since the request resolved it (DELETE /models checks under this lock too)
                self.model.hosted_model(jobs[0].routing.model)
            except KeyError:
                raise APIError(404, f"the model {jobs[0].routing.model!r} was unloaded", param="model",
                               code="model_not_found") from None  # fmt: skip
            self._pending.extend(jobs)
            self.metrics.queue_depth.set(len(self._pending))
            self._cond.notify()
        note_request(generation_id=jobs[0].id)

    def between_steps(self, task: Callable[[list[DecodeBatch]], object]) -> Future:
        """Run `task(batches)` (the running batch and the one being prefilled) on the worker between two steps,
        holding the queue's lock (so no job is admitted meanwhile): how models are attached and removed while
        others decode. Its result or exception comes back through the returned future."""
        future: Future = Future()
        with self._cond:
            if self._stopping:
                raise APIError(503, "the server is shutting down", code="shutting_down")
            self._tasks.append((task, future))
            self._cond.notify()
        return future

    def rows_of_model(self, batches: list[DecodeBatch], name: str) -> int:
        """Requests of this model running or waiting (call with the lock held: from a between_steps task)."""
        waiting = sum(1 for job in self._pending if not job.cancelled and job.routing.model == name)
        return waiting + sum(1 for batch in batches for row in batch.rows if row.routing.model == name)

    def use_packaged_step(self, step: Any) -> None:
        """Decode with `step` (a compiled_step.PackagedStep) as soon as no row is running. Its kernels round
        differently from eager ones (bfloat16), so a row switched halfway could end with other tokens than
        it would have alone: rows that started eagerly finish eagerly. If the batch does not empty by itself
        within SWITCH_WAIT_S, new requests wait in the queue until the running ones finish."""
        with self._cond:
            self._next_step, self._next_step_since = step, time.monotonic()
            self._cond.notify()

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
        batch = DecodeBatch(self.model, [], None, self.prefix_cache)
        # Newcomers with long prompts (with `separate_prefill`, every one; with prompts in the compiled step,
        # those over MAX_PROMPT_IN_STEPS) are prefilled in a batch of their own, eagerly, in chunks, and join the
        # running batch once their prompt is done.
        filling = DecodeBatch(self.model, [], None, self.prefix_cache)
        filling.prompts_in_steps = False
        try:
            while True:
                admitted = self._wait_for_work([batch, filling])
                if admitted is None:
                    break
                if self._next_step is not None and not (batch or filling):  # the admitted have not started
                    self.model.use_packaged_step(self._next_step)
                    self._next_step, self._draining = None, False
                    self.separate_prefill = self.separate_prefill or self.model.compiled  # keep running rows compiled
                    log.info("decode steps run compiled from now on (%d requests start with it)", len(admitted))
                    if self.on_switched is not None:
                        self.on_switched()
                self._drop_gone(batch)
                self._drop_gone(filling)
                in_steps = self._feeds_prompts_in_steps(batch, admitted)
                if in_steps:  # only the prompts to score: the others go the same way whoever comes with them
                    apart = [j for j in admitted if j.decoder.params.prompt_logprobs is not None]
                else:
                    apart = admitted if admitted and _prefill_apart(admitted) else []
                if apart:
                    batch.concatenate(self._prefill(apart))
                    admitted = [j for j in admitted if not any(j is other for other in apart)]
                # Under the budget, prompts that fit in what the running rows leave of it join their step;
                # longer ones are fed in chunks, in forwards of their own (a lone long prompt's cache then
                # grows in place, where a joint step would copy every row's cache every step). No running
                # rows: nothing to stall, every prompt goes whole.
                budget = self.max_step_tokens
                room = max(budget - len(batch), 1) if budget and batch else None
                if in_steps:  # every prompt in the running rows' compiled step, but the longest
                    long = [j for j in admitted if len(j.prompt_ids) > MAX_PROMPT_IN_STEPS]
                else:
                    long = [j for j in admitted if self.separate_prefill or (room and len(j.prompt_ids) > room)]
                short = [j for j in admitted if not any(j is other for other in long)]
                if filling or long:
                    self._step(filling, long, room)
                    batch.concatenate([filling.split_off_prefilled()])
                if batch or short:
                    self._step(batch, short, budget)
                self._running = len(batch) + len(filling)
                self.metrics.running.set(self._running)
                self.metrics.kv_cache_bytes.set(sum(b.cache.nbytes() for b in (batch, filling) if b.cache is not None))
                self.metrics.frozen_rows.set(len(batch) - len(batch.cache.granular_rows()) if batch.cache else 0)
        except BaseException as exc:  # a bug in the loop itself: fail everyone rather than hang them
            log.exception("scheduler worker died")
            for row in batch.rows + filling.rows:
                row.owner.post(ErrorEvent(500, f"the model worker failed: {exc}", "worker_failed"))
            if self.on_fatal is not None:
                self.on_fatal(exc)
        finally:
            self._fail_pending(503, "the server is shutting down", "shutting_down")
            with self._cond:
                while self._tasks:
                    self._tasks.popleft()[1].set_exception(APIError(503, "the server is shutting down",
                                                                    code="shutting_down"))  # fmt: skip
            gone = ErrorEvent(503, "the server shut down before this request finished", "shutting_down")
            for row in batch.rows + filling.rows:
                if not row.owner.finished:
                    row.owner.post(gone)
            self._running = 0

    def _wait_for_work(self, batches: list[DecodeBatch]) -> list[GenerationJob] | None:
        """Run the between_steps tasks, then take waiting jobs that fit in the batch; block while there is
        nothing to do. None = stop."""
        running = sum(len(b) for b in batches)
        with self._cond:
            while not (running or self._pending or self._tasks or self._stopping or self._next_step is not None):
                self._cond.wait()
            if self._stopping:
                return None
            while self._tasks:
                task, future = self._tasks.popleft()
                try:
                    future.set_result(task(batches))
                except Exception as exc:  # the task's caller answers for it; the worker goes on
                    future.set_exception(exc)
            admitted = []
            now = time.monotonic()
            if running and self._next_step is not None and now - self._next_step_since > SWITCH_WAIT_S:
                if not self._draining:
                    log.info("the compiled decode step is ready: new requests wait until the %d running finish",
                             running)  # fmt: skip
                self._draining = True
            while self._pending and running + len(admitted) < self.max_batch_size and not self._draining:
                job = self._pending.popleft()
                if job.cancelled:
                    continue
                if now > job.deadline:  # timed out while waiting in the queue
                    self.metrics.generations.labels(outcome="timeout").inc()
                    job.post(_timeout(job, 0))
                    continue
                admitted.append(job)
            self._running = running + len(admitted)  # counted before the lock is let go: drain sees them
            self.metrics.queue_depth.set(len(self._pending))
            return admitted

    def _fail_pending(self, status: int, message: str, code: str) -> None:
        with self._cond:
            while self._pending:
                self._pending.popleft().post(ErrorEvent(status, message, code))
            self.metrics.queue_depth.set(0)

    def _drop_gone(self, batch: DecodeBatch) -> None:
        """Remove rows whose client disconnected or whose time is up; free their cache rows."""
        now = time.monotonic()
        keep = []
        for i, row in enumerate(batch.rows):
            job: GenerationJob = row.owner
            if job.cancelled:
                self.metrics.generations.labels(outcome="cancelled").inc()
            elif now > job.deadline:
                self.metrics.generations.labels(outcome="timeout").inc()  # counted before the client hears
                job.post(_timeout(job, len(job.decoder.completion_ids)))
            else:
                keep.append(i)
        batch.filter(keep)

    # ---- model steps -------------------------------------------------------------------------
    def _feeds_prompts_in_steps(self, batch: DecodeBatch, admitted: list[GenerationJob]) -> bool:
        """Whether newcomers' prompts go into the running rows' compiled step, a token a row
        (XLoraModel.decode_rows): the packaged step is loaded, every row fits in it, and the rows are the
        X-LoRA model's alone. A token then gets the same bits alone, together or joining, and the running rows
        do not wait for an eager prefill."""
        routing = [row.routing for row in batch.rows] + [job.routing for job in admitted]
        return self.max_batch_size <= MAX_BATCH and self.model.feeds_prompts_in_steps(routing)

    def _prefill(self, jobs: list[GenerationJob]) -> list[DecodeBatch]:
        """Prefill the newcomers together; if that fails, alone, so one bad request fails alone."""
        try:
            return [self._prefill_batch(jobs)]
        except Exception as exc:
            if len(jobs) == 1:
                self._fail(jobs[0], exc)
                return []
        batches = []
        for job in jobs:
            try:
                batches.append(self._prefill_batch([job]))
            except Exception as exc:
                self._fail(job, exc)
        return batches

    def _prefill_batch(self, jobs: list[GenerationJob]) -> DecodeBatch:
        self.metrics.batch_size.labels(phase="prefill").observe(len(jobs))
        rows = [BatchRow(job.decoder, job.routing, owner=job) for job in jobs]
        batch, out = DecodeBatch.prefill(self.model, rows, self.pad_id, self.prefix_cache)
        self._emit(out)
        return batch

    def _started(self, row: BatchRow, now: float) -> None:
        """The row's prompt is done and its first token chosen."""
        job: GenerationJob = row.owner
        job.first_token_at = now
        self.metrics.prompt_tokens.inc(len(job.prompt_ids))
        self.metrics.time_to_first_token.observe(now - job.submitted)
        self.metrics.prefill_chunks.observe(row.chunks)
        if row.reused_tokens:
            self.metrics.prefix_cache_hits.inc()
            self.metrics.prefix_cache_reused_tokens.inc(row.reused_tokens)

    def _step(
        self, batch: DecodeBatch, joining: list[GenerationJob] | None = None, max_tokens: int | None = None
    ) -> None:
        """One decode step; the `joining` jobs are prefilled in the same forward and join the batch; prompts
        are fed at most `max_tokens` tokens (with the running rows' tokens) in it."""
        self.metrics.batch_size.labels(phase="decode").observe(len(batch))
        rows = [BatchRow(job.decoder, job.routing, owner=job) for job in joining or []]
        try:
            out = batch.step(rows, max_tokens)
        except Exception as exc:
            if rows and not any(row is rows[0] for row in batch.rows):
                # The joint forward failed and left the batch as it was: prefill the newcomers apart (one
                # that breaks the model then fails alone), and step again.
                batch.concatenate(self._prefill(joining))
                if batch:
                    self._step(batch, max_tokens=max_tokens)
                return
            # The cache may be half-updated: every row in it fails, the worker carries on empty.
            for row in batch.rows:
                self._fail(row.owner, exc)
            batch.filter([])
            return
        if rows:
            self.metrics.batch_size.labels(phase="prefill").observe(len(rows))
        self._emit(out)

    def _emit(self, out: list[Generated]) -> None:
        """Send each row's new token to its client; finish the rows that are done."""
        now = time.monotonic()
        for g in out:
            job: GenerationJob = g.row.owner
            if g.error is not None:
                self._refuse(job, g.error)
                continue
            job.last_token_at = now
            if job.first_token_at is None:
                self._started(g.row, now)
            if g.token_id is not None:  # None: a prompt only scored (max_new_tokens 0)
                index = len(job.decoder.completion_ids) - 1
                prompt_logprobs = job.decoder.prompt_logprobs if index == 0 else None
                job.post(TokenEvent(index, g.token_id, g.text, g.logprob, prompt_logprobs,
                                    scalings=g.scalings.mean(0).tolist()))
                self.metrics.generated_tokens.inc()
            if g.finish_reason is not None:
                self._finish(g.row, g.finish_reason)

    def _finish(self, row: BatchRow, finish_reason: str) -> None:
        job: GenerationJob = row.owner
        dec = job.decoder
        n_prompt, n_out = len(dec.prompt_ids), len(dec.completion_ids)
        scalings = row.all_scalings()
        frozen_from = row.frozen_from()
        constraint = dec.params.constraint.kind if dec.params.constraint is not None else None
        # Log first, answer second: a client that asks /scalings/{id} right after its answer finds it.
        self.scalings_log.add(
            ScalingsEntry(
                id=job.id,
                prompt_tokens=n_prompt,
                completion_tokens=n_out,
                adapter_names=self.model.hosted_model(job.routing.model).expert_names,
                routing=job.routing.to_dict(),
                scalings=scalings,
                frozen_from=frozen_from,
                token_ids=list(job.prompt_ids) + list(dec.completion_ids),
                constraint=constraint,
                model=job.routing.model or self.model.name,
            )
        )
        self.metrics.model_generations.labels(model=job.routing.model or self.model.name, outcome=finish_reason).inc()
        self.metrics.generations.labels(outcome=finish_reason).inc()
        self.metrics.prompt_tokens_per_request.observe(n_prompt)
        self.metrics.generated_tokens_per_request.observe(n_out)
        if n_out > 1:
            self.metrics.time_per_output_token.observe((job.last_token_at - job.first_token_at) / (n_out - 1))
        job.post(DoneEvent(
            finish_reason, dec.text, n_prompt, n_out, job.routing, scalings, frozen_from, constraint,
            prompt_ids=list(dec.prompt_ids), completion_ids=list(dec.completion_ids),
            logprobs=list(dec.logprobs) if dec.params.logprobs is not None else None,
            prompt_logprobs=dec.prompt_logprobs,
        ))

    def _refuse(self, job: GenerationJob, exc: ConstraintError) -> None:
        """The request's constraint cannot go on (found while decoding; its row has left the batch): the
        client's mistake, a 422 (400 on /v1) naming the field, or an error event once streaming has begun."""
        log.info(
            "generation %s refused while decoding: %s", job.id, exc,
            extra={"request_id": job.request_id, "generation_id": job.id},
        )
        self.metrics.generations.labels(outcome="refused").inc()
        message = str(exc).removeprefix(exc.parameter).strip()
        param = job.constraint_param
        job.post(ErrorEvent(422, f"{param}: {message}" if param else message, exc.code, param))

    def _fail(self, job: GenerationJob, exc: Exception) -> None:
        log.error(
            "generation %s failed inside the model: %s: %s", job.id, type(exc).__name__, exc,
            extra={"request_id": job.request_id, "generation_id": job.id},
        )
        self.metrics.generations.labels(outcome="error").inc()
        job.post(ErrorEvent(500, f"the model failed on this request: {type(exc).__name__}: {exc}", "model_error"))


def _prefill_apart(jobs: list[GenerationJob]) -> bool:
    """Whether newcomers are prefilled whole, on their own, rather than in the steps: prompts to score (only a
    prefill gives every position's logits) and prompts shared by several choices (their prefill runs once,
    DecodeBatch.prefill)."""
    return (
        any(j.decoder.params.prompt_logprobs is not None for j in jobs)
        or len({tuple(j.prompt_ids) for j in jobs}) < len(jobs)
    )


def _timeout(job: GenerationJob, generated: int) -> ErrorEvent:
    waited = time.monotonic() - job.submitted
    return ErrorEvent(
        504, f"request timed out after {waited:.1f} s ({generated} tokens generated); nothing more will come",
        "timeout",
    )
