"""OpenAI request and response shapes for /v1 (completions, chat completions, models).

Unsupported OpenAI parameters (penalties, suffix, ...) are accepted as fields only so that setting them
is refused with a message naming them, rather than silently ignored. X-LoRA extensions are extra body
fields: `xlora_routing` and `xlora_return_scalings`.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from server.protocol.logprobs import ChatLogprobs, CompletionLogprobs
from server.protocol.schemas import (
    PromptInput,
    RequestRouting,
    RoutingSettings,
    RoutingUpdate,
    TokenScalings,
    Usage,
    sampling_params,
    stop_list,
)
from server.protocol.tools import NamedToolChoice, Tool, ToolCall, ToolCallDelta, ToolChoice, constraint_for, mode_of
from xlora_core import ConstraintSpec, SamplingParams

FinishReason = Literal["stop", "length", "tool_calls"]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


def _refuse(name: str, why: str = "is not supported by this server") -> ValueError:
    return ValueError(f"{name} {why}")


class StreamOptions(_Request):
    include_usage: bool = False


class ResponseFormatText(_Request):
    type: Literal["text"]


class ResponseFormatJsonObject(_Request):
    """Any JSON object."""

    type: Literal["json_object"]


class JsonSchemaFormat(_Request):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema", description="the JSON schema; absent: any JSON object")
    strict: bool | None = Field(None, description="accepted; the schema is always enforced")


class ResponseFormatJsonSchema(_Request):
    type: Literal["json_schema"]
    json_schema: JsonSchemaFormat


ResponseFormat = Annotated[
    ResponseFormatText | ResponseFormatJsonObject | ResponseFormatJsonSchema, Field(discriminator="type")
]


class _Common(_Request):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False, description="0 (or below 1e-4) = greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63, description="with n > 1, choice i is seeded seed + i")
    n: int = Field(1, ge=1, le=128, description="choices per prompt; they share the prompt's prefill")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Accepted by vLLM and others as extensions; harmless to support.
    top_k: int = Field(0, ge=0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=100.0, allow_inf_nan=False)
    logit_bias: dict[str, float] | None = Field(None, description="token id -> bias added to its logit, -100..100")
    # Refused unless left at their neutral value.
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    response_format: ResponseFormat | None = Field(None, description="structured output (json_object, json_schema)")
    # X-LoRA extensions.
    xlora_routing: RequestRouting | None = None
    xlora_return_scalings: bool = False

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, value: float | None) -> float | None:
        if value:
            raise _refuse("presence_penalty / frequency_penalty", "are not supported; use repetition_penalty")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (value or {}).items():
            if not key.isdigit():
                raise ValueError(f"keys are token ids (digits), got {key!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"biases are in -100..100, got {bias} for token {key}")
        return value

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> list[str]:
        return stop_list(value, limit=4)

    @model_validator(mode="after")
    def _options_need_stream(self) -> _Common:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true")
        return self

    # ---- GenerationRequest (server.protocol.schemas) ----
    def token_limit(self) -> int | None:
        return self.max_tokens

    def samples_per_prompt(self) -> int:
        return self.n

    def requested_model(self) -> tuple[str | None, str]:
        return self.model, "model"

    def to_sampling_params(self, default_max_new_tokens: int) -> SamplingParams:
        limit = self.token_limit()
        params = sampling_params(self, limit if limit is not None else default_max_new_tokens)
        bias = {int(k): v for k, v in (self.logit_bias or {}).items()}
        return replace(params, logit_bias=bias, logprobs=self.top_logprobs_per_token())

    def top_logprobs_per_token(self) -> int | None:
        """How many alternatives to report per generated token; None: no logprobs."""
        raise NotImplementedError

    def param_name(self, sampling_field: str) -> str:
        return "max_tokens" if sampling_field == "max_new_tokens" else sampling_field

    def routing_update(self) -> tuple[RoutingUpdate | None, str]:
        return self.xlora_routing, "xlora_routing."

    def constraint_spec(self) -> tuple[ConstraintSpec | None, str]:
        fmt = self.response_format
        if isinstance(fmt, ResponseFormatJsonSchema) and fmt.json_schema.schema_ is not None:
            spec = ConstraintSpec("json_schema", json.dumps(fmt.json_schema.schema_))
            return spec, "response_format.json_schema.schema"
        if isinstance(fmt, ResponseFormatJsonSchema | ResponseFormatJsonObject):
            return ConstraintSpec("json_object"), "response_format"
        return None, "response_format"


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="a text, token ids, or a list of either: one choice (times n) per prompt"
    )
    max_tokens: int | None = Field(None, ge=0, description="0: score the prompt only (with echo and logprobs)")
    logprobs: int | None = Field(None, ge=0, le=20, description="log probabilities of the tokens, and this many "
                                 "top alternatives per token")  # fmt: skip
    echo: bool = Field(False, description="the prompt comes back before the completion, with logprobs its own")
    best_of: int | None = Field(
        None, ge=1, le=128, description="generate this many choices per prompt, return the n with the highest "
        "log probability per token",
    )
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, value: str | list[str] | list[int] | list[list[int]]) -> str | list:
        if isinstance(value, list) and (not value or any(isinstance(p, list) and not p for p in value)):
            raise ValueError("give a text, token ids, or a non-empty list of either (no empty token lists)")
        return value

    @field_validator("best_of")
    @classmethod
    def _best_of_n(cls, value: int | None, info: ValidationInfo) -> int | None:
        n = info.data.get("n", 1)
        if value is not None and value < n:
            raise ValueError(f"must be at least n ({n})")
        if value is not None and value > n and info.data.get("stream"):
            raise ValueError("above n cannot be streamed (the best are known only at the end)")
        return value

    def ranks_choices(self) -> bool:
        """Whether more choices are generated than returned (best_of > n)."""
        return self.best_of is not None and self.best_of > self.n

    def samples_per_prompt(self) -> int:
        return self.best_of or self.n

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: str | None) -> str | None:
        if value:
            raise _refuse("suffix")
        return value

    def prompts(self) -> list[str | list[int]]:
        """Each prompt: a text or token ids."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)

    def prompt_inputs(self) -> list[PromptInput]:
        single = len(self.prompts()) == 1
        return [
            PromptInput(p, None, "prompt" if single else f"prompt.{i}") if isinstance(p, str)
            else PromptInput(None, None, "prompt" if single else f"prompt.{i}", token_ids=p)
            for i, p in enumerate(self.prompts())
        ]

    def to_sampling_params(self, default_max_new_tokens: int) -> SamplingParams:
        params = super().to_sampling_params(16)  # OpenAI's default for completions is 16 tokens
        return replace(params, prompt_logprobs=self.logprobs if self.echo else None)

    def top_logprobs_per_token(self) -> int | None:
        if self.logprobs is None and self.ranks_choices():
            return 0  # best_of ranks the choices by their tokens' log probabilities
        return self.logprobs

    def logged_prompt(self) -> str | list:
        return self.prompt


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatCompletionMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = Field(None, description="null only on an assistant turn with tool_calls")
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(None, description="an assistant turn's calls")
    tool_call_id: str | None = Field(None, description="a tool turn: the call it answers")

    @model_validator(mode="after")
    def _shape(self) -> ChatCompletionMessage:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content is required (it may be null only on an assistant turn with tool_calls)")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant turns have tool_calls")
        if (self.role == "tool") != (self.tool_call_id is not None):
            raise ValueError("tool turns, and only they, have a tool_call_id")
        return self

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content or [])

    def for_template(self) -> dict[str, Any]:
        """As chat templates read it: calls with their arguments parsed (transformers' convention)."""
        # "developer" is OpenAI's newer name for "system"; chat templates know only the latter.
        out: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        if self.tool_calls:
            out["tool_calls"] = [
                {"id": c.id, "type": "function",
                 "function": {"name": c.function.name, "arguments": _parsed(c.function.arguments)}}
                for c in self.tool_calls
            ]  # fmt: skip
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


def _parsed(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except json.JSONDecodeError:
        return arguments


class ChatCompletionRequest(_Common):
    messages: list[ChatCompletionMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: ToolChoice | None = Field(None, description="default: auto with tools, none without")
    parallel_tool_calls: bool = Field(True, description="with auto or required: several calls may come")
    functions: list[Any] | None = None
    function_call: Any = None
    logprobs: bool | None = Field(None, description="each generated token's log probability")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="alternatives per token (needs logprobs)")

    @field_validator("functions", "function_call")
    @classmethod
    def _no_functions(cls, value: Any) -> Any:
        if value is not None:
            raise _refuse("functions / function_call", "(deprecated by OpenAI) are not supported; use tools")
        return value

    @field_validator("tool_choice")
    @classmethod
    def _choice_among_tools(cls, value: ToolChoice | None, info: ValidationInfo) -> ToolChoice | None:
        names = [t.function.name for t in info.data.get("tools") or []]
        if value is not None and value != "none" and not names:
            raise ValueError("needs tools")
        if isinstance(value, NamedToolChoice) and value.function.name not in names:
            raise ValueError(f"names {value.function.name!r}, which is not among the tools ({', '.join(names)})")
        return value

    @field_validator("tools")
    @classmethod
    def _distinct_names(cls, value: list[Tool] | None) -> list[Tool] | None:
        names = [t.function.name for t in value or []]
        if len(set(names)) < len(names):
            raise ValueError("function names must be distinct")
        return value

    @model_validator(mode="after")
    def _tools_or_response_format(self) -> ChatCompletionRequest:
        if self.response_format is not None and self.tool_mode() not in (None, "none"):
            raise ValueError("response_format cannot be combined with tools (the tools' grammar shapes the answer)")
        return self

    def tool_mode(self) -> str | NamedToolChoice | None:
        return mode_of(self.tools, self.tool_choice)

    def constraint_spec(self) -> tuple[ConstraintSpec | None, str]:
        mode = self.tool_mode()
        if mode is None:
            return super().constraint_spec()
        return constraint_for(self.tools or [], mode, self.parallel_tool_calls), "tools"

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_need_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and not info.data.get("logprobs"):
            raise ValueError("needs logprobs: true")
        return value

    def top_logprobs_per_token(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def param_name(self, sampling_field: str) -> str:
        if sampling_field == "max_new_tokens" and self.max_completion_tokens is not None:
            return "max_completion_tokens"
        return super().param_name(sampling_field)

    def chat_messages(self) -> list[dict]:
        return [m.for_template() for m in self.messages]

    def prompt_inputs(self) -> list[PromptInput]:
        tools = [t.model_dump(exclude_none=True) for t in self.tools] if self.tools else None
        return [PromptInput(None, self.chat_messages(), "messages", tools=tools)]

    def logged_prompt(self) -> list[dict]:
        return self.chat_messages()


# -----------------------------------------------------------------------------
# responses


class XLoraInfo(BaseModel):
    """Extension field `xlora` on responses: the routing used, and scalings when asked for."""

    routing: RoutingSettings
    scalings: TokenScalings | None = None
    constraint: str | None = Field(
        None, description="the structured-output constraint it ran under (json_schema, json_object); null if none"
    )


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: FinishReason | None
    logprobs: CompletionLogprobs | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    xlora: XLoraInfo | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: ChatLogprobs | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    xlora: XLoraInfo | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    finish_reason: FinishReason | None = None
    logprobs: ChatLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    xlora: XLoraInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "xlora-server"
    xlora_adapters: list[str] = []
    xlora_kind: str = Field("xlora", description="xlora (experts and a router), adapter (one LoRA) or base")
    xlora_routing: dict | None = Field(None, description="an X-LoRA model's routing defaults")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
