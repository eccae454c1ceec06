"""POST /generate: text or chat in, completion out; optionally streamed as server-sent events."""

from __future__ import annotations

import json

from fastapi import APIRouter, Depends, Request
from sse_starlette import ServerSentEvent

from server.deps import ready_manager
from server.observability.logs import note_generation
from server.protocol.errors import error_body
from server.protocol.logprobs import TokenTexts, generate_logprob, generate_logprobs
from server.protocol.schemas import (
    GenerateRequest,
    GenerateResponse,
    StreamDone,
    StreamToken,
    TokenScalings,
    Usage,
    error_responses,
    sse_doc,
)
from server.protocol.streaming import Chunk, stream_response, wait_done
from server.serving.jobs import DoneEvent, ErrorEvent, JobGroup, TokenEvent
from server.serving.manager import ModelManager

router = APIRouter(tags=["generation"])

_STREAM_DOC = sse_doc(
    "With `stream: true`: server-sent events. `event: token` (StreamToken) per token, then "
    "`event: done` (StreamDone), or `event: error` ({error: {...}}) if the request fails midway.",
    events=["token", "done", "error"],
)


@router.post(
    "/generate",
    response_model=GenerateResponse,
    responses={200: _STREAM_DOC, **error_responses(400, 401, 404, 413, 422, 429, 500, 503, 504)},
)
async def generate(
    body: GenerateRequest, request: Request, manager: ModelManager = Depends(ready_manager)
):
    """Generate from `prompt` or `messages`. `routing` applies to this request only."""
    job = await manager.start(body, id_prefix="gen")
    log_prompts = manager.settings.logging.log_prompts
    if body.stream:
        fmt = _GenerateStream(job, body.return_scalings, manager)
        return await stream_response(job, request, fmt, body.logged_prompt(), log_prompts)
    (done,) = await wait_done(job, request)
    note_generation(done, body.logged_prompt(), log_prompts)
    texts = TokenTexts(manager.tokenizer)
    return GenerateResponse(
        id=job.id,
        text=done.text,
        finish_reason=done.finish_reason,
        usage=Usage.of(done.prompt_tokens, done.completion_tokens),
        routing=done.routing.to_dict(),
        scalings=TokenScalings.of(done, manager.expert_names(done.routing)) if body.return_scalings else None,
        constraint=done.constraint,
        logprobs=generate_logprobs(done.logprobs, texts),
        prompt_logprobs=generate_logprobs(done.prompt_logprobs, texts),
    )


class _GenerateStream:
    """`event: token` per token, then `event: done` (or `event: error`)."""

    def __init__(self, job: JobGroup, return_scalings: bool, manager: ModelManager) -> None:
        self.job, self.return_scalings, self.manager = job, return_scalings, manager
        self.texts = TokenTexts(manager.tokenizer)

    def opening(self) -> list[Chunk]:
        return []

    def token(self, event: TokenEvent) -> list[Chunk]:
        logprob = generate_logprob(event.logprob, self.texts) if event.logprob is not None else None
        prompt_logprobs = generate_logprobs(event.prompt_logprobs, self.texts)
        token = StreamToken(id=self.job.id, index=event.index, token_id=event.token_id, text=event.text,
                            logprob=logprob, prompt_logprobs=prompt_logprobs,
                            scalings=event.scalings if self.return_scalings else None)  # fmt: skip
        return [ServerSentEvent(data=token.model_dump_json(), event="token")]

    def done(self, event: DoneEvent) -> list[Chunk]:
        done = StreamDone(
            id=self.job.id,
            finish_reason=event.finish_reason,
            usage=Usage.of(event.prompt_tokens, event.completion_tokens),
            routing=event.routing.to_dict(),
            scalings=TokenScalings.of(event, self.manager.expert_names(event.routing)) if self.return_scalings
            else None,
            constraint=event.constraint,
        )
        return [ServerSentEvent(data=done.model_dump_json(), event="done")]

    def error(self, event: ErrorEvent) -> list[Chunk]:
        body = error_body(event.status, event.message, event.param, event.code)
        return [ServerSentEvent(data=json.dumps(body), event="error")]

    def closing(self) -> list[Chunk]:
        return []
