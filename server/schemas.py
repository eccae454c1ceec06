"""Request and response bodies, one pydantic model each, so the OpenAPI schema is the contract.

Request models forbid unknown fields (a typo such as `max_tokens` on /generate is a 422 naming it)
and are strict about types (`"5"` is not a number). Floats refuse NaN and infinity.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

FinishReason = Literal["stop", "length"]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


# -----------------------------------------------------------------------------
# errors


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = Field(None, description="the request field at fault, dotted (e.g. routing.top_k)")
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every error, on every route, has this shape (OpenAI's)."""

    error: ErrorInfo


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` entries documenting the error statuses of a route."""
    text = {
        400: "Malformed request",
        401: "Missing or wrong bearer token",
        404: "Unknown id",
        413: "Body too large",
        422: "Invalid field (named in error.param)",
        429: "Queue full; see Retry-After",
        500: "The model failed on this request",
        503: "Model not loaded yet, or server shutting down",
        504: "Request timed out",
    }
    return {code: {"model": ErrorResponse, "description": text.get(code, "Error")} for code in codes}


def sse_doc(description: str, events: list[str] | None = None, json_data: bool = True) -> dict[str, Any]:
    """OpenAPI `responses=` entry of a 200 that may be server-sent events; `schema` describes one event (as
    OpenAPI 3.1 tools read text/event-stream). `events`: the `event:` names, if any; `json_data`: every
    event's `data` is a JSON text."""
    data: dict[str, Any] = {"type": "string"}
    if json_data:
        data["contentMediaType"] = "application/json"
    properties: dict[str, Any] = {"data": data}
    if events:
        properties["event"] = {"type": "string", "enum": events}
    schema = {"type": "object", "properties": properties, "required": ["data", *(["event"] if events else [])]}
    return {"description": description, "content": {"text/event-stream": {"schema": schema}}}


# -----------------------------------------------------------------------------
# routing


class RoutingSettings(BaseModel):
    """Routing in force: top_k experts per token (null = dense) and the global scaling weight."""

    top_k: int | None = Field(None, description="experts kept per token; null = all (dense)")
    global_scaling_weight: float


class RoutingUpdate(_Request):
    """A partial update: only the fields sent change. `top_k: null` means dense."""

    top_k: int | None = Field(None, ge=1, description="1..number of experts, or null for dense")
    # Bounded: the experts' outputs are multiplied by it, and 1e20 turns the logits into nan (a 500 for every
    # sampled request while it is in force).
    global_scaling_weight: float | None = Field(None, ge=-100.0, le=100.0, allow_inf_nan=False)

    @field_validator("global_scaling_weight")
    @classmethod
    def _weight_not_null(cls, value: float | None) -> float:
        # Runs only when the field is sent: leaving it out is fine, sending null is not.
        if value is None:
            raise ValueError("must be a finite number, not null")
        return value


# -----------------------------------------------------------------------------
# /generate


class ChatMessage(_Request):
    role: Literal["system", "user", "assistant"]
    content: str


class GenerateRequest(_Request):
    """Exactly one of `prompt` (text) or `messages` (chat, through the model's chat template)."""

    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    max_new_tokens: int | None = Field(None, ge=1, description="default and upper limit come from the config")
    temperature: float = Field(
        0.0, ge=0.0, le=100.0, allow_inf_nan=False, description="0 = greedy (so is anything below 1e-4)"
    )
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int = Field(0, ge=0, description="0 = off")
    repetition_penalty: float = Field(1.0, gt=0.0, le=100.0, allow_inf_nan=False)
    stop: list[str] | str | None = Field(None, description="stop strings (up to 16)")
    seed: int | None = Field(None, ge=0, lt=2**63)
    stream: bool = False
    return_scalings: bool = False
    routing: RoutingUpdate | None = Field(None, description="this request only; unset fields use the server's")

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: list[str] | str | None) -> list[str] | str | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > 16 or any(not s for s in stops):
            raise ValueError("at most 16 non-empty strings")
        return value

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> GenerateRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TokenScalings(BaseModel):
    """Per-token scalings, averaged over layers: one list of n_adapters floats per token."""

    adapter_names: list[str]
    prompt: list[list[float]] = Field(description="one row per prompt token")
    completion: list[list[float]] = Field(
        description="one row per completion token: the mix at the step that chose it"
    )


class GenerateResponse(BaseModel):
    id: str
    text: str
    finish_reason: FinishReason
    usage: Usage
    routing: RoutingSettings = Field(description="the routing this request ran with")
    scalings: TokenScalings | None = None


class StreamToken(BaseModel):
    """`event: token` of a /generate stream: one per generated token."""

    id: str
    index: int
    token_id: int
    text: str = Field(description="text added by this token (may be empty while a character is incomplete)")


class StreamDone(BaseModel):
    """`event: done`, the last event of a /generate stream."""

    id: str
    finish_reason: FinishReason
    usage: Usage
    routing: RoutingSettings
    scalings: TokenScalings | None = None


# -----------------------------------------------------------------------------
# /scalings


class ScalingsSummary(BaseModel):
    id: str
    created: float
    prompt_tokens: int
    completion_tokens: int
    adapter_names: list[str]
    mean_scalings: list[float] = Field(description="mean over tokens and layers, one per adapter")
    prompt_mean_scalings: list[float] = Field(description="mean over the prompt's tokens and all layers")
    completion_mean_scalings: list[float] = Field(
        description="mean over the completion's tokens (the mix that chose each) and all layers"
    )
    routing: RoutingSettings


class ScalingsLog(BaseModel):
    capacity: int
    entries: list[ScalingsSummary]


class ScalingsBucket(BaseModel):
    seq_len: int = Field(description="prompt + completion tokens")
    ids: list[str]
    mean_scalings: list[list[float]] = Field(description="one row per request, one float per adapter")


class BucketedScalingsLog(BaseModel):
    capacity: int
    buckets: list[ScalingsBucket]


class TokenText(BaseModel):
    text: str = Field(description="the token alone, decoded (a piece of a character may show as U+FFFD)")
    special: bool = Field(description="a special token of the tokenizer (e.g. the chat template's markers)")


class ScalingsDetail(ScalingsSummary):
    n_layers: int
    scalings: list[list[list[float]]] = Field(
        description="[position][layer][adapter] for each processed position: prompt token i at i, completion "
        "token j chosen by the mix at prompt_tokens - 1 + j (the last token is never processed)"
    )
    tokens: list[TokenText] | None = Field(
        None,
        description="with include_text=true only (admin level): the prompt's tokens, then the completion's",
    )


class Cleared(BaseModel):
    cleared: int


# -----------------------------------------------------------------------------
# access


class AccessInfo(BaseModel):
    """Which secrets this server asks for (never the secrets), so a client such as the dashboard knows."""

    api_key_required: bool = Field(description="client routes need XLORA_API_KEY as a bearer token")
    admin_token_required: bool = Field(description="admin routes and token texts need XLORA_ADMIN_TOKEN")
    levels: dict[str, Literal["public", "client", "admin"]] = Field(
        description="each route's level, keyed 'METHOD /path'"
    )


# -----------------------------------------------------------------------------
# health


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    ready: bool
    state: Literal["loading", "ready", "failed", "draining"]
    model: str | None = None
    adapters: list[str] = []
    detail: str | None = None
