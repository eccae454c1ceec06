"""OpenAI request and response shapes for /v1 (completions, chat completions, models).

Unsupported OpenAI parameters (n > 1, logprobs, tools, penalties, ...) are accepted as fields only so
that setting them is refused with a message naming them, rather than silently ignored. X-LoRA
extensions are extra body fields: `xlora_routing` and `xlora_return_scalings`.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from server.schemas import (
    PromptInput,
    RoutingSettings,
    RoutingUpdate,
    TokenScalings,
    Usage,
    sampling_params,
    stop_list,
)
from xlora_core import ConstraintSpec, SamplingParams

FinishReason = Literal["stop", "length"]


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
    seed: int | None = Field(None, ge=0, lt=2**63)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Accepted by vLLM and others as extensions; harmless to support.
    top_k: int = Field(0, ge=0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=100.0, allow_inf_nan=False)
    # Refused unless left at their neutral value.
    logprobs: bool | int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    response_format: ResponseFormat | None = Field(None, description="structured output (json_object, json_schema)")
    # X-LoRA extensions.
    xlora_routing: RoutingUpdate | None = None
    xlora_return_scalings: bool = False

    @field_validator("n")
    @classmethod
    def _one_choice(cls, value: int) -> int:
        if value != 1:
            raise _refuse("n", "must be 1 (one choice per request)")
        return value

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value: bool | int | None) -> bool | int | None:
        if value:
            raise _refuse("logprobs")
        return value

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, value: float | None) -> float | None:
        if value:
            raise _refuse("presence_penalty / frequency_penalty", "are not supported; use repetition_penalty")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value:
            raise _refuse("logit_bias")
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

    # ---- GenerationRequest (server.schemas) ----
    def token_limit(self) -> int | None:
        return self.max_tokens

    def to_sampling_params(self, default_max_new_tokens: int) -> SamplingParams:
        return sampling_params(self, self.token_limit() or default_max_new_tokens)

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
    prompt: str | list[str]
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and len(value) != 1:
            raise ValueError("give one prompt (a string or a list of one string)")
        return value

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, value: bool) -> bool:
        if value:
            raise _refuse("echo")
        return value

    @field_validator("best_of")
    @classmethod
    def _no_best_of(cls, value: int | None) -> int | None:
        if value not in (None, 1):
            raise _refuse("best_of", "must be 1")
        return value

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: str | None) -> str | None:
        if value:
            raise _refuse("suffix")
        return value

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def prompt_input(self) -> PromptInput:
        return PromptInput(self.prompt_text(), None, "prompt")

    def to_sampling_params(self, default_max_new_tokens: int) -> SamplingParams:
        return super().to_sampling_params(16)  # OpenAI's default for completions is 16 tokens

    def logged_prompt(self) -> str:
        return self.prompt_text()


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatCompletionMessage(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_Common):
    messages: list[ChatCompletionMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    top_logprobs: int | None = None

    @field_validator("tools", "functions")
    @classmethod
    def _no_tools(cls, value: list[Any] | None) -> list[Any] | None:
        if value:
            raise _refuse("tools / functions", "(function calling) are not supported by this server")
        return value

    @field_validator("tool_choice", "function_call")
    @classmethod
    def _no_tool_choice(cls, value: Any) -> Any:
        if value not in (None, "none"):
            raise _refuse("tool_choice / function_call")
        return value

    @field_validator("top_logprobs")
    @classmethod
    def _no_top_logprobs(cls, value: int | None) -> int | None:
        if value:
            raise _refuse("top_logprobs")
        return value

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def param_name(self, sampling_field: str) -> str:
        if sampling_field == "max_new_tokens" and self.max_completion_tokens is not None:
            return "max_completion_tokens"
        return super().param_name(sampling_field)

    def chat_messages(self) -> list[dict]:
        # "developer" is OpenAI's newer name for "system"; chat templates know only the latter.
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]

    def prompt_input(self) -> PromptInput:
        return PromptInput(None, self.chat_messages(), "messages")

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
    logprobs: None = None


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
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: None = None


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


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    finish_reason: FinishReason | None = None
    logprobs: None = None


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


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
