"""OpenAI-compatible API: /v1/models, /v1/completions, /v1/chat/completions (streaming included).

Same way in (ModelManager.start), limits, metrics and auth as /generate. X-LoRA extensions: `xlora_routing` and
`xlora_return_scalings` in the request; the `xlora` field in the response.
"""

from __future__ import annotations

import json
import time

from fastapi import APIRouter, Depends, Request

from server.deps import get_manager, ready_manager
from server.errors import APIError, error_body
from server.jobs import DoneEvent, ErrorEvent, GenerationJob, TokenEvent
from server.logs import note_generation
from server.manager import ModelManager
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
from server.schemas import TokenScalings, Usage, error_responses, sse_doc
from server.streaming import Chunk, stream_response, wait_done

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
    job = await manager.start(body, id_prefix="cmpl")
    created = int(time.time())
    log_prompts = manager.settings.logging.log_prompts
    if body.stream:
        fmt = _CompletionStream(job, body, manager, created)
        return await stream_response(job, request, fmt, body.logged_prompt(), log_prompts)
    done = await wait_done(job, request)
    note_generation(done, body.logged_prompt(), log_prompts)
    return CompletionResponse(
        id=job.id,
        created=created,
        model=manager.model_name,
        choices=[CompletionChoice(index=0, text=done.text, finish_reason=done.finish_reason)],
        usage=Usage.of(done.prompt_tokens, done.completion_tokens),
        xlora=_xlora(done, body.xlora_return_scalings, manager),
    )


@router.post("/chat/completions", response_model=ChatCompletionResponse, responses={200: _STREAM_DOC, **_ERRORS})
async def chat_completions(
    body: ChatCompletionRequest, request: Request, manager: ModelManager = Depends(ready_manager)
):
    _check_model(body.model, manager)
    job = await manager.start(body, id_prefix="chatcmpl")
    created = int(time.time())
    log_prompts = manager.settings.logging.log_prompts
    if body.stream:
        fmt = _ChatStream(job, body, manager, created)
        return await stream_response(job, request, fmt, body.logged_prompt(), log_prompts)
    done = await wait_done(job, request)
    note_generation(done, body.logged_prompt(), log_prompts)
    return ChatCompletionResponse(
        id=job.id,
        created=created,
        model=manager.model_name,
        choices=[ChatChoice(index=0, message=AssistantMessage(content=done.text), finish_reason=done.finish_reason)],
        usage=Usage.of(done.prompt_tokens, done.completion_tokens),
        xlora=_xlora(done, body.xlora_return_scalings, manager),
    )


# -----------------------------------------------------------------------------


def _check_model(name: str, manager: ModelManager) -> None:
    if name != manager.model_name:
        raise APIError(404, f"the model {name!r} does not exist; this server serves {manager.model_name!r}",
                       param="model", code="model_not_found")


def _xlora(done: DoneEvent, with_scalings: bool, manager: ModelManager) -> XLoraInfo:
    scalings = TokenScalings.of(done, manager.adapter_names) if with_scalings else None
    return XLoraInfo(routing=done.routing.to_dict(), scalings=scalings, constraint=done.constraint)


class _OpenAIStream:
    """OpenAI chunks as `data:` lines, ending with `data: [DONE]`; a usage chunk if asked for."""

    response_class: type[CompletionResponse] | type[ChatCompletionChunk]

    def __init__(self, job: GenerationJob, body: CompletionRequest | ChatCompletionRequest,
                 manager: ModelManager, created: int) -> None:  # fmt: skip
        self.job, self.body, self.manager, self.created = job, body, manager, created

    def chunk(self, choices: list, **extra) -> str:
        return self.response_class(
            id=self.job.id, created=self.created, model=self.manager.model_name, choices=choices, **extra
        ).model_dump_json()

    def choice(self, text: str | None, finish: str | None = None) -> object:
        raise NotImplementedError

    def opening(self) -> list[Chunk]:
        return []

    def token(self, event: TokenEvent) -> list[Chunk]:
        return [self.chunk([self.choice(event.text)])] if event.text else []

    def done(self, event: DoneEvent) -> list[Chunk]:
        out = [self.chunk([self.choice(None, event.finish_reason)],
                          xlora=_xlora(event, self.body.xlora_return_scalings, self.manager))]  # fmt: skip
        options = self.body.stream_options
        if options is not None and options.include_usage:
            out.append(self.chunk([], usage=Usage.of(event.prompt_tokens, event.completion_tokens)))
        return out

    def error(self, event: ErrorEvent) -> list[Chunk]:
        status = 400 if event.status == 422 else event.status  # OpenAI's status for an invalid request
        return [json.dumps(error_body(status, event.message, event.param, event.code))]

    def closing(self) -> list[Chunk]:
        return ["[DONE]"]


class _CompletionStream(_OpenAIStream):
    response_class = CompletionResponse

    def choice(self, text: str | None, finish: str | None = None) -> CompletionChoice:
        return CompletionChoice(index=0, text=text or "", finish_reason=finish)


class _ChatStream(_OpenAIStream):
    response_class = ChatCompletionChunk

    def choice(self, text: str | None, finish: str | None = None) -> ChatChunkChoice:
        delta = ChatDelta() if text is None else ChatDelta(content=text)
        return ChatChunkChoice(index=0, delta=delta, finish_reason=finish)

    def opening(self) -> list[Chunk]:
        return [self.chunk([ChatChunkChoice(index=0, delta=ChatDelta(role="assistant", content=""))])]
