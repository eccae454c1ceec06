"""POST /generate: text or chat in, completion out; optionally streamed as server-sent events."""

from __future__ import annotations

import json

from fastapi import APIRouter, Depends, Request
from sse_starlette import EventSourceResponse, ServerSentEvent

from server.deps import ready_manager
from server.errors import error_body
from server.logs import note_generation, note_request
from server.manager import ModelManager, sampling_settings
from server.scheduler import DoneEvent, ErrorEvent, GenerationJob, TokenEvent, routing_dict
from server.schemas import (
    GenerateRequest,
    GenerateResponse,
    StreamDone,
    StreamToken,
    TokenScalings,
    Usage,
    error_responses,
    sse_doc,
)
from server.streaming import events_from, first_event, wait_done

router = APIRouter(tags=["generation"])

_STREAM_DOC = sse_doc(
    "With `stream: true`: server-sent events. `event: token` (StreamToken) per token, then "
    "`event: done` (StreamDone), or `event: error` ({error: {...}}) if the request fails midway.",
    events=["token", "done", "error"],
)


@router.post(
    "/generate",
    response_model=GenerateResponse,
    responses={200: _STREAM_DOC, **error_responses(400, 401, 413, 422, 429, 500, 503, 504)},
)
async def generate(
    body: GenerateRequest, request: Request, manager: ModelManager = Depends(ready_manager)
):
    """Generate from `prompt` or `messages`. `routing` applies to this request only."""
    prompt_param = "prompt" if body.prompt is not None else "messages"
    messages = [m.model_dump() for m in body.messages] if body.messages is not None else None
    prompt_ids = await manager.tokenize(body.prompt, messages, prompt_param)
    max_new = body.max_new_tokens or manager.settings.server.default_max_new_tokens
    manager.check_lengths(len(prompt_ids), max_new, "max_new_tokens", prompt_param)
    routing = manager.merge_routing(body.routing)
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    sampling = sampling_settings(body, max_new, stop)
    job = await manager.submit(prompt_ids, sampling, routing, prefix="gen")
    if body.stream:
        first = await first_event(job, request)
        return EventSourceResponse(_sse(job, first, manager, body.return_scalings, _prompt(body)), ping=15)
    done = await wait_done(job, request)
    note_generation(done, _prompt(body), manager.settings.logging.log_prompts)
    return GenerateResponse(
        id=job.id,
        text=done.text,
        finish_reason=done.finish_reason,
        usage=_usage(done),
        routing=routing_dict(done.routing),
        scalings=_scalings(done, manager) if body.return_scalings else None,
    )


def _prompt(body: GenerateRequest):
    """What the summary log line shows as the prompt (only with logging.log_prompts)."""
    return body.prompt if body.prompt is not None else [m.model_dump() for m in body.messages or []]


async def _sse(job: GenerationJob, first, manager: ModelManager, return_scalings: bool, prompt):
    async for event in events_from(job, first):
        if isinstance(event, TokenEvent):
            token = StreamToken(id=job.id, index=event.index, token_id=event.token_id, text=event.text)
            yield ServerSentEvent(data=token.model_dump_json(), event="token")
        elif isinstance(event, DoneEvent):
            note_generation(event, prompt, manager.settings.logging.log_prompts)
            done = StreamDone(
                id=job.id,
                finish_reason=event.finish_reason,
                usage=_usage(event),
                routing=routing_dict(event.routing),
                scalings=_scalings(event, manager) if return_scalings else None,
            )
            yield ServerSentEvent(data=done.model_dump_json(), event="done")
        elif isinstance(event, ErrorEvent):
            note_request(stream_error=event.code)
            body = error_body(event.status, event.message, code=event.code)
            yield ServerSentEvent(data=json.dumps(body), event="error")


def _usage(done: DoneEvent) -> Usage:
    return Usage(
        prompt_tokens=done.prompt_tokens,
        completion_tokens=done.completion_tokens,
        total_tokens=done.prompt_tokens + done.completion_tokens,
    )


def _scalings(done: DoneEvent, manager: ModelManager) -> TokenScalings:
    prompt, completion = done.token_scalings()
    return TokenScalings(adapter_names=manager.adapter_names, prompt=prompt, completion=completion)
