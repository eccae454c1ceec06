"""What passes between the routes and the model worker: a job, and the events it sends back.

The route builds a `GenerationJob` and queues it; the worker (scheduler.py) posts `TokenEvent`s, then
one `DoneEvent` or `ErrorEvent`, onto the job's asyncio queue from its own thread. A request with several
choices (OpenAI's `n`, several prompts) is a `JobGroup`: one job per choice, one queue, each event tagged
with its choice.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import torch

from server.observability.logs import current_request_id
from server.protocol.errors import APIError
from xlora_core import Routing, RowDecoder
from xlora_core.sampling import TokenLogprob


@dataclass
class TokenEvent:
    index: int
    token_id: int
    text: str
    logprob: TokenLogprob | None = None  # with SamplingParams.logprobs
    prompt_logprobs: list[TokenLogprob | None] | None = None  # on a choice's first token, if asked for
    choice: int = 0
    scalings: list[float] | None = None  # the mix that chose this token, one per adapter (mean over layers)


@dataclass
class DoneEvent:
    finish_reason: str
    text: str
    prompt_tokens: int
    completion_tokens: int
    routing: Routing
    scalings: torch.Tensor  # [tokens processed, layers, adapters]: the prompt, then each token fed back
    frozen_from: int | None = None  # first position whose scalings are the frozen ones (Routing.freeze_after)
    constraint: str | None = None  # the kind of structured-output constraint it ran under
    prompt_ids: list[int] = field(default_factory=list)
    completion_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None  # one per completion token, with SamplingParams.logprobs
    prompt_logprobs: list[TokenLogprob | None] | None = None  # one per prompt token (the first None)
    choice: int = 0

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
    param: str | None = None  # the request field at fault, for a client error found while decoding
    choice: int = 0

    def to_api_error(self) -> APIError:
        return APIError(self.status, self.message, param=self.param, code=self.code)


Event = TokenEvent | DoneEvent | ErrorEvent


@dataclass
class GenerationJob:
    """One request as the worker sees it; its events go back to the event loop thread-safely."""

    id: str
    decoder: RowDecoder  # built by the manager (it can refuse a request's settings: a 4xx, not a model error)
    routing: Routing
    deadline: float  # time.monotonic()
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    submitted: float = field(default_factory=time.monotonic)
    cancelled: bool = False  # set by the event loop (client gone); read by the worker between steps
    request_id: str | None = field(default_factory=current_request_id)  # the HTTP request's, for log lines
    constraint_param: str | None = None  # the request field its constraint came from (a 422 names it)
    finished: bool = False
    first_token_at: float | None = None  # set by the worker
    last_token_at: float | None = None
    choice: int = 0  # its index among its group's choices

    @property
    def prompt_ids(self) -> list[int]:
        return self.decoder.prompt_ids

    def post(self, event: Event) -> None:
        event.choice = self.choice
        if isinstance(event, DoneEvent | ErrorEvent):
            self.finished = True
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class JobGroup:
    """One request's jobs, one per choice, posting onto one queue; what the routes wait on (server.protocol.streaming).
    A request with one choice is a group of one."""

    id: str
    jobs: list[GenerationJob]
    events: asyncio.Queue

    @property
    def choices(self) -> int:
        return len(self.jobs)

    @property
    def deadline(self) -> float:
        return min(job.deadline for job in self.jobs)

    @property
    def finished(self) -> bool:
        return all(job.finished for job in self.jobs)

    def cancel(self) -> None:
        for job in self.jobs:
            job.cancel()


class QueueFullError(APIError):
    def __init__(self, retry_after: int) -> None:
        super().__init__(
            429,
            "the request queue is full; retry later",
            code="queue_full",
            headers={"Retry-After": str(retry_after)},
        )
