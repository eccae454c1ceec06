"""OpenAI-compatible API: /v1/models, /v1/completions, /v1/chat/completions (streaming included).

Same scheduler, limits, metrics and auth as /generate. X-LoRA extensions: `xlora_routing` and
`xlora_return_scalings` in the request; the `xlora` field in the response.
"""

from __future__ import annotations

import json
import time

from fastapi import APIRouter, Depends, Request
from sse_starlette import EventSourceResponse

from server.deps import get_manager, ready_manager
from server.errors import APIError, error_body
from server.logs import note_generation, note_request
from server.manager import ModelManager, sampling_settings
from server.openai_schemas import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    XLoraInfo,
)
from server.scheduler import DoneEvent, ErrorEvent, GenerationJob, TokenEvent, routing_dict
from server.schemas import TokenScalings, Usage, error_responses, sse_doc
from server.streaming import events_from, first_event, wait_done

router = APIRouter(prefix="/v1", tags=["openai"])

_ERRORS = error_responses(400, 401, 404, 413, 429, 500, 503, 504)
_STREAM_DOC = sse_doc(
    "With `stream: true`: OpenAI chunks (JSON) as server-sent events, ending with `data: [DONE]`.", json_data=False
)
_STARTED = int(time.time())


@router.get("/models", response_model=ModelList, responses=error_responses(401))
async def list_models(manager: ModelManager = Depends(get_manager)) -> ModelList:
    return ModelList(data=[ModelCard(id=manager.model_name, created=_STARTED, xlora_adapters=manager.adapter_names)])


@router.post("/completions", response_model=CompletionResponse, responses={200: _STREAM_DOC, **_ERRORS})
async def completions(body: CompletionRequest, request: Request, manager: ModelManager = Depends(ready_manager)):
    _check_model(body.model, manager)
    ids = await manager.tokenize(body.prompt_text(), None, "prompt")
    # OpenAI's default for completions is 16 tokens.
    job, created = await _submit(manager, body, ids, body.max_tokens or 16, "max_tokens", "prompt", "cmpl")
    if body.stream:
        first = await first_event(job, request)
        return EventSourceResponse(_completion_chunks(job, first, body, manager, created), ping=15)
    done = await wait_done(job, request)
    note_generation(done, _prompt(body), manager.settings.logging.log_prompts)
    return CompletionResponse(
        id=job.id,
        created=created,
        model=manager.model_name,
        choices=[CompletionChoice(index=0, text=done.text, finish_reason=done.finish_reason)],
        usage=_usage(done),
        xlora=_xlora(done, body.xlora_return_scalings, manager),
    )


@router.post("/chat/completions", response_model=ChatCompletionResponse, responses={200: _STREAM_DOC, **_ERRORS})
async def chat_completions(
    body: ChatCompletionRequest, request: Request, manager: ModelManager = Depends(ready_manager)
):
    _check_model(body.model, manager)
    # "developer" is OpenAI's newer name for "system"; chat templates know only the latter.
    messages = [
        {"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages
    ]
    ids = await manager.tokenize(None, messages, "messages")
    limit = body.token_limit() or manager.settings.server.default_max_new_tokens
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    job, created = await _submit(manager, body, ids, limit, param, "messages", "chatcmpl")
    if body.stream:
        first = await first_event(job, request)
        return EventSourceResponse(_chat_chunks(job, first, body, manager, created), ping=15)
    done = await wait_done(job, request)
    note_generation(done, _prompt(body), manager.settings.logging.log_prompts)
    return ChatCompletionResponse(
        id=job.id,
        created=created,
        model=manager.model_name,
        choices=[ChatChoice(index=0, message=AssistantMessage(content=done.text), finish_reason=done.finish_reason)],
        usage=_usage(done),
        xlora=_xlora(done, body.xlora_return_scalings, manager),
    )


# -----------------------------------------------------------------------------


def _check_model(name: str, manager: ModelManager) -> None:
    if name != manager.model_name:
        raise APIError(404, f"the model {name!r} does not exist; this server serves {manager.model_name!r}",
                       param="model", code="model_not_found")


async def _submit(manager, body, ids: list[int], max_new: int, param: str, prompt_param: str, prefix: str):
    manager.check_lengths(len(ids), max_new, param, prompt_param)
    routing = manager.merge_routing(body.xlora_routing, param_prefix="xlora_routing.")
    sampling = sampling_settings(body, max_new, body.stop_list())
    job = await manager.submit(ids, sampling, routing, prefix=prefix, names={"max_new_tokens": param})
    return job, int(time.time())


def _usage(done: DoneEvent) -> Usage:
    return Usage(
        prompt_tokens=done.prompt_tokens,
        completion_tokens=done.completion_tokens,
        total_tokens=done.prompt_tokens + done.completion_tokens,
    )


def _xlora(done: DoneEvent, with_scalings: bool, manager: ModelManager) -> XLoraInfo:
    scalings = None
    if with_scalings:
        prompt, completion = done.token_scalings()
        scalings = TokenScalings(adapter_names=manager.adapter_names, prompt=prompt, completion=completion)
    return XLoraInfo(routing=routing_dict(done.routing), scalings=scalings)


def _prompt(body) -> str | list[dict]:
    """What the summary log line shows as the prompt (only with logging.log_prompts)."""
    if isinstance(body, CompletionRequest):
        return body.prompt_text()
    return [{"role": m.role, "content": m.text()} for m in body.messages]


def _include_usage(body) -> bool:
    return body.stream_options is not None and body.stream_options.include_usage


def _error_chunk(event: ErrorEvent) -> str:
    return json.dumps(error_body(event.status, event.message, code=event.code))


async def _chat_chunks(job: GenerationJob, first, body: ChatCompletionRequest, manager: ModelManager, created: int):
    def chunk(delta: ChatDelta, finish=None, **extra) -> str:
        choices = [ChatChunkChoice(index=0, delta=delta, finish_reason=finish)]
        return ChatCompletionChunk(
            id=job.id, created=created, model=manager.model_name, choices=choices, **extra
        ).model_dump_json()

    yield chunk(ChatDelta(role="assistant", content=""))
    async for event in events_from(job, first):
        if isinstance(event, TokenEvent) and event.text:
            yield chunk(ChatDelta(content=event.text))
        elif isinstance(event, DoneEvent):
            note_generation(event, _prompt(body), manager.settings.logging.log_prompts)
            yield chunk(ChatDelta(), event.finish_reason, xlora=_xlora(event, body.xlora_return_scalings, manager))
            if _include_usage(body):
                yield ChatCompletionChunk(
                    id=job.id, created=created, model=manager.model_name, choices=[], usage=_usage(event)
                ).model_dump_json()
        elif isinstance(event, ErrorEvent):
            note_request(stream_error=event.code)
            yield _error_chunk(event)
    yield "[DONE]"


async def _completion_chunks(job: GenerationJob, first, body: CompletionRequest, manager: ModelManager, created: int):
    def chunk(text: str, finish=None, **extra) -> str:
        choices = [CompletionChoice(index=0, text=text, finish_reason=finish)]
        return CompletionResponse(
            id=job.id, created=created, model=manager.model_name, choices=choices, **extra
        ).model_dump_json()

    async for event in events_from(job, first):
        if isinstance(event, TokenEvent) and event.text:
            yield chunk(event.text)
        elif isinstance(event, DoneEvent):
            note_generation(event, _prompt(body), manager.settings.logging.log_prompts)
            yield chunk("", event.finish_reason, xlora=_xlora(event, body.xlora_return_scalings, manager))
            if _include_usage(body):
                yield CompletionResponse(
                    id=job.id, created=created, model=manager.model_name, choices=[], usage=_usage(event)
                ).model_dump_json()
        elif isinstance(event, ErrorEvent):
            note_request(stream_error=event.code)
            yield _error_chunk(event)
    yield "[DONE]"
