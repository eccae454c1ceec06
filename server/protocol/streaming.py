"""Waiting on a job's events from a route, for plain and streamed answers alike.

Every way a handler can stop waiting (client gone, deadline, the handler task cancelled) cancels the
job, so the worker drops its row and frees its cache at the next step. Streams of every API go through
one renderer (`stream_response`); each API only says how its events look (a `StreamFormat`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Protocol

from fastapi import Request
from sse_starlette import EventSourceResponse, ServerSentEvent

from server.observability.logs import note_generation, note_request
from server.protocol.errors import APIError
from server.serving.jobs import DoneEvent, ErrorEvent, Event, JobGroup, TokenEvent

_POLL_S = 0.25  # how often a plain (non-streamed) request checks whether its client is still there
_BACKSTOP_S = 2.0  # the worker enforces deadlines; this only covers a worker stuck in one long step


class ClientGone(APIError):
    """The client closed the connection before its answer (nginx's 499); nobody reads this response."""

    def __init__(self) -> None:
        super().__init__(499, "client closed the request", code="client_closed")


async def next_event(job: JobGroup, request: Request | None) -> Event:
    """The job's next event; cancels the job and raises if the client left or time ran out.
    `request` None: do not poll for a disconnect (sse-starlette already listens for it)."""
    try:
        while True:
            remaining = job.deadline + _BACKSTOP_S - time.monotonic()
            if remaining <= 0:
                job.cancel()
                raise APIError(504, "request timed out waiting for the model", code="timeout")
            try:
                return await asyncio.wait_for(job.events.get(), min(_POLL_S, remaining))
            except asyncio.TimeoutError:
                if request is not None and await request.is_disconnected():
                    job.cancel()
                    raise ClientGone() from None
    except asyncio.CancelledError:
        job.cancel()
        raise


async def wait_done(job: JobGroup, request: Request) -> list[DoneEvent]:
    """Wait for the whole answer: every choice's DoneEvent, in choice order. An ErrorEvent of any choice
    cancels the others and becomes the APIError it describes."""
    done: dict[int, DoneEvent] = {}
    while len(done) < job.choices:
        event = await next_event(job, request)
        if isinstance(event, ErrorEvent):
            job.cancel()
            raise event.to_api_error()
        if isinstance(event, DoneEvent):
            done[event.choice] = event
    return [done[i] for i in range(job.choices)]


async def first_event(job: JobGroup, request: Request) -> Event:
    """Wait for the first event before committing to a 200 stream, so that an error that comes before
    any token (model failure, timeout in the queue) still gets its real status code."""
    event = await next_event(job, request)
    if isinstance(event, ErrorEvent):
        raise event.to_api_error()
    return event


async def events_from(job: JobGroup, first: Event) -> AsyncIterator[Event]:
    """Yield `first`, then every event up to and including the last choice's Done, or the first Error.
    Cancels the job if the consumer stops early (sse-starlette cancels the generator when the client
    disconnects)."""
    try:
        event, done = first, 0
        while True:
            yield event
            done += isinstance(event, DoneEvent)
            if isinstance(event, ErrorEvent) or done == job.choices:
                return
            try:
                event = await next_event(job, None)
            except APIError as exc:
                yield ErrorEvent(exc.status, exc.message, exc.code or "error")
                return
    finally:
        if not job.finished:
            job.cancel()


Chunk = str | ServerSentEvent


class StreamFormat(Protocol):
    """How one API writes a generation's events as server-sent events."""

    def opening(self) -> list[Chunk]: ...

    def token(self, event: TokenEvent) -> list[Chunk]: ...

    def done(self, event: DoneEvent) -> list[Chunk]: ...

    def error(self, event: ErrorEvent) -> list[Chunk]: ...

    def closing(self) -> list[Chunk]: ...


async def stream_response(
    job: JobGroup, request: Request, fmt: StreamFormat, prompt: object, log_prompts: bool
) -> EventSourceResponse:
    """The 200 stream of a job, once its first event shows it did not fail before any token.
    `prompt` is what the summary log line shows (only with log_prompts)."""
    first = await first_event(job, request)

    async def chunks() -> AsyncIterator[Chunk]:
        for chunk in fmt.opening():
            yield chunk
        async for event in events_from(job, first):
            if isinstance(event, TokenEvent):
                out = fmt.token(event)
            elif isinstance(event, DoneEvent):
                note_generation(event, prompt, log_prompts)
                out = fmt.done(event)
            else:
                note_request(stream_error=event.code)
                out = fmt.error(event)
            for chunk in out:
                yield chunk
        for chunk in fmt.closing():
            yield chunk

    return EventSourceResponse(chunks(), ping=15)
