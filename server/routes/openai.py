"""OpenAI-compatible API: /v1/models, /v1/completions, /v1/chat/completions (streaming included).

Same way in (ModelManager.start), limits, metrics and auth as /generate. X-LoRA extensions: `xlora_routing` and
`xlora_return_scalings` in the request; the `xlora` field in the response (with several choices, the first's;
every choice's scalings are in /scalings/{id}-{index}).
"""

from __future__ import annotations

import json
import time
from dataclasses import replace

from fastapi import APIRouter, Depends, Request

from server.deps import get_manager, ready_manager
from server.observability.logs import note_generation
from server.protocol.errors import error_body
from server.protocol.logprobs import TokenTexts, chat_logprobs, completion_logprobs
from server.protocol.openai_schemas import (
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
from server.protocol.schemas import TokenScalings, Usage, error_responses, sse_doc
from server.protocol.streaming import Chunk, stream_response, wait_done
from server.protocol.tools import ToolCallDelta, may_begin_a_call, parse_calls
from server.serving.jobs import DoneEvent, ErrorEvent, JobGroup, TokenEvent
from server.serving.manager import ModelManager

router = APIRouter(prefix="/v1", tags=["openai"])

_ERRORS = error_responses(400, 401, 404, 413, 429, 500, 503, 504)
_STREAM_DOC = sse_doc(
    "With `stream: true`: OpenAI chunks (JSON) as server-sent events, ending with `data: [DONE]`.", json_data=False
)
_STARTED = int(time.time())


@router.get("/models", response_model=ModelList, responses=error_responses(401))
async def list_models(manager: ModelManager = Depends(get_manager)) -> ModelList:
    """Every model served over the base (docs/models.md): the xlora section's first."""
    if manager.model is None:  # still loading: the configured name, as before
        return ModelList(data=[ModelCard(id=manager.model_name, created=_STARTED)])
    cards = []
    for m in manager.models():
        info = m.describe()
        cards.append(ModelCard(id=m.name, created=_STARTED, xlora_adapters=info["experts"], xlora_kind=m.kind,
                               xlora_routing=manager.model_routing(m) if m.kind == "xlora" else None))  # fmt: skip
    return ModelList(data=cards)


@router.post("/completions", response_model=CompletionResponse, responses={200: _STREAM_DOC, **_ERRORS})
async def completions(body: CompletionRequest, request: Request, manager: ModelManager = Depends(ready_manager)):
    job = await manager.start(body, id_prefix="cmpl")
    created = int(time.time())
    log_prompts = manager.settings.logging.log_prompts
    if body.stream:
        fmt = _CompletionStream(job, body, manager, created)
        return await stream_response(job, request, fmt, body.logged_prompt(), log_prompts)
    dones = await wait_done(job, request)
    note_generation(dones[0], body.logged_prompt(), log_prompts)
    texts = TokenTexts(manager.tokenizer)
    usage = _usage(dones, body.samples_per_prompt())  # every choice generated counts, best_of's included
    if body.ranks_choices():
        dones = _best(dones, body)
    return CompletionResponse(
        id=job.id,
        created=created,
        model=body.model,
        choices=[_completion_choice(done, body, texts) for done in dones],
        usage=usage,
        xlora=_xlora(dones[0], body.xlora_return_scalings, manager),
    )


@router.post("/chat/completions", response_model=ChatCompletionResponse, responses={200: _STREAM_DOC, **_ERRORS})
async def chat_completions(
    body: ChatCompletionRequest, request: Request, manager: ModelManager = Depends(ready_manager)
):
    job = await manager.start(body, id_prefix="chatcmpl")
    created = int(time.time())
    log_prompts = manager.settings.logging.log_prompts
    if body.stream:
        fmt = _ChatStream(job, body, manager, created)
        return await stream_response(job, request, fmt, body.logged_prompt(), log_prompts)
    dones = await wait_done(job, request)
    note_generation(dones[0], body.logged_prompt(), log_prompts)
    texts = TokenTexts(manager.tokenizer)
    choices = [
        ChatChoice(
            index=done.choice,
            message=_message(done, body),
            finish_reason=_chat_finish(done, body),
            logprobs=chat_logprobs(done.logprobs, texts) if done.logprobs is not None else None,
        )
        for done in dones
    ]
    return ChatCompletionResponse(
        id=job.id,
        created=created,
        model=body.model,
        choices=choices,
        usage=_usage(dones, body.n),
        xlora=_xlora(dones[0], body.xlora_return_scalings, manager),
    )


# -----------------------------------------------------------------------------


def _message(done: DoneEvent, body: ChatCompletionRequest) -> AssistantMessage:
    """The answer as text, or as the tool calls it makes (server/protocol/tools.py)."""
    mode = body.tool_mode()
    calls = parse_calls(done.text, mode) if mode is not None and done.finish_reason == "stop" else None
    if calls:
        return AssistantMessage(content=None, tool_calls=calls)
    return AssistantMessage(content=done.text)


def _chat_finish(done: DoneEvent, body: ChatCompletionRequest) -> str:
    return "tool_calls" if _message(done, body).tool_calls else done.finish_reason


def _best(dones: list[DoneEvent], body: CompletionRequest) -> list[DoneEvent]:
    """best_of: of each prompt's choices, the n with the highest mean log probability per token, best first,
    numbered as if only they had been asked for."""
    kept = []
    for start in range(0, len(dones), body.samples_per_prompt()):
        group = dones[start : start + body.samples_per_prompt()]
        ranked = sorted(group, key=lambda d: -sum(lp.logprob for lp in d.logprobs) / max(len(d.logprobs), 1))
        kept += ranked[: body.n]
    reported = body.logprobs is not None
    return [replace(d, choice=i, logprobs=d.logprobs if reported else None) for i, d in enumerate(kept)]


def _usage(dones: list[DoneEvent], n: int) -> Usage:
    """Each prompt counted once (its n choices share it), every choice's completion."""
    prompt = sum(d.prompt_tokens for d in dones if d.choice % n == 0)
    return Usage.of(prompt, sum(d.completion_tokens for d in dones))


def _echo(body: CompletionRequest, choice: int, texts: TokenTexts) -> str:
    """The prompt of a choice as echoed: its text, or its token ids decoded."""
    prompt = body.prompts()[choice // body.n]
    return prompt if isinstance(prompt, str) else texts.tokenizer.decode(prompt)


def _completion_choice(done: DoneEvent, body: CompletionRequest, texts: TokenTexts) -> CompletionChoice:
    """A finished choice; with `echo`, the prompt (and its tokens' logprobs) first."""
    echo = _echo(body, done.choice, texts) if body.echo else ""
    logprobs = None
    if done.logprobs is not None:
        ids, items = done.completion_ids, done.logprobs
        if body.echo:
            ids, items = done.prompt_ids + ids, (done.prompt_logprobs or []) + items
        logprobs = completion_logprobs(ids, items, texts)
    return CompletionChoice(index=done.choice, text=echo + done.text, finish_reason=done.finish_reason,
                            logprobs=logprobs)  # fmt: skip


def _xlora(done: DoneEvent, with_scalings: bool, manager: ModelManager) -> XLoraInfo:
    scalings = TokenScalings.of(done, manager.expert_names(done.routing)) if with_scalings else None
    return XLoraInfo(routing=done.routing.to_dict(), scalings=scalings, constraint=done.constraint)


class _OpenAIStream:
    """OpenAI chunks as `data:` lines, ending with `data: [DONE]`; a usage chunk after the last choice's end if
    asked for. Each chunk carries one choice (its index says which)."""

    response_class: type[CompletionResponse] | type[ChatCompletionChunk]

    def __init__(self, job: JobGroup, body: CompletionRequest | ChatCompletionRequest,
                 manager: ModelManager, created: int) -> None:  # fmt: skip
        self.job, self.body, self.manager, self.created = job, body, manager, created
        self.texts = TokenTexts(manager.tokenizer)
        self.dones: list[DoneEvent] = []

    def chunk(self, choices: list, **extra) -> str:
        return self.response_class(
            id=self.job.id, created=self.created, model=self.body.model, choices=choices, **extra
        ).model_dump_json()

    def opening(self) -> list[Chunk]:
        return []

    def token(self, event: TokenEvent) -> list[Chunk]:
        raise NotImplementedError

    def finish(self, event: DoneEvent) -> object:
        raise NotImplementedError

    def done(self, event: DoneEvent) -> list[Chunk]:
        self.dones.append(event)
        out = [self.chunk([self.finish(event)], xlora=_xlora(event, self.body.xlora_return_scalings, self.manager))]
        options = self.body.stream_options
        if len(self.dones) == self.job.choices and options is not None and options.include_usage:
            out.append(self.chunk([], usage=_usage(self.dones, self.body.samples_per_prompt())))
        return out

    def error(self, event: ErrorEvent) -> list[Chunk]:
        status = 400 if event.status == 422 else event.status  # OpenAI's status for an invalid request
        return [json.dumps(error_body(status, event.message, event.param, event.code))]

    def closing(self) -> list[Chunk]:
        return ["[DONE]"]


class _CompletionStream(_OpenAIStream):
    """With `echo`, a choice's first chunk is its prompt (with logprobs, the prompt's)."""

    response_class = CompletionResponse
    body: CompletionRequest

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.echoed: set[int] = set()

    def token(self, event: TokenEvent) -> list[Chunk]:
        out = self.echo(event.choice, event.prompt_logprobs)
        if event.text or event.logprob is not None:
            logprobs = None
            if event.logprob is not None:
                logprobs = completion_logprobs([event.token_id], [event.logprob], self.texts)
            out.append(self.chunk([CompletionChoice(index=event.choice, text=event.text, finish_reason=None,
                                                    logprobs=logprobs)]))  # fmt: skip
        return out

    def finish(self, event: DoneEvent) -> CompletionChoice:
        return CompletionChoice(index=event.choice, text="", finish_reason=event.finish_reason)

    def done(self, event: DoneEvent) -> list[Chunk]:
        return self.echo(event.choice, event.prompt_logprobs) + super().done(event)

    def echo(self, choice: int, prompt_logprobs: list | None) -> list[Chunk]:
        if not self.body.echo or choice in self.echoed:
            return []
        self.echoed.add(choice)
        logprobs = None
        if self.body.logprobs is not None:
            ids = self.job.jobs[choice].prompt_ids
            logprobs = completion_logprobs(ids, prompt_logprobs or [None] * len(ids), self.texts)
        text = _echo(self.body, choice, self.texts)
        return [self.chunk([CompletionChoice(index=choice, text=text, finish_reason=None, logprobs=logprobs)])]


class _ChatStream(_OpenAIStream):
    """With tools, text that is (or may still become) a call is held back: a call comes whole, in the choice's
    last chunk, as `delta.tool_calls`."""

    response_class = ChatCompletionChunk
    body: ChatCompletionRequest

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.held: dict[int, str] = {}  # per choice: text not sent yet, while it may be a call
        self.text_only: set[int] = set()  # choices whose text can no longer be a call

    def opening(self) -> list[Chunk]:
        role = ChatDelta(role="assistant", content="")
        return [self.chunk([ChatChunkChoice(index=i, delta=role)]) for i in range(self.job.choices)]

    def token(self, event: TokenEvent) -> list[Chunk]:
        if not event.text and event.logprob is None:
            return []
        text = self.release(event.choice, event.text)
        logprobs = chat_logprobs([event.logprob], self.texts) if event.logprob is not None else None
        delta = ChatDelta(content=text)
        return [self.chunk([ChatChunkChoice(index=event.choice, delta=delta, logprobs=logprobs)])]

    def release(self, choice: int, text: str) -> str:
        """What of a token's text may be sent now."""
        mode = self.body.tool_mode()
        if mode is None or mode == "none" or choice in self.text_only:
            return text
        held = self.held.get(choice, "") + text
        if mode == "auto" and not may_begin_a_call(held):
            self.text_only.add(choice)
            self.held.pop(choice, None)
            return held
        self.held[choice] = held
        return ""

    def finish(self, event: DoneEvent) -> ChatChunkChoice:
        held = self.held.pop(event.choice, None)
        message = _message(event, self.body)
        if message.tool_calls:
            calls = [ToolCallDelta(index=i, **c.model_dump()) for i, c in enumerate(message.tool_calls)]
            delta = ChatDelta(tool_calls=calls)
        else:
            delta = ChatDelta(content=held) if held else ChatDelta()
        return ChatChunkChoice(index=event.choice, delta=delta, finish_reason=_chat_finish(event, self.body))
