"""Request and response bodies, one pydantic model each, so the OpenAPI schema is the contract.

Request models forbid unknown fields (a typo such as `max_tokens` on /generate is a 422 naming it)
and are strict about types (`"5"` is not a number). Floats refuse NaN and infinity.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any, Literal, NamedTuple, Protocol

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from server.protocol.logprobs import TokenLogprobInfo
from xlora_core import ConstraintSpec, SamplingParams

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


_FREEZE_AFTER_DOC = (
    "freeze the scalings after this many generated tokens: later tokens reuse the scalings of the "
    "position that produced token `freeze_after` and skip the scaling pass; null = granular (every token routed)"
)


class RoutingSettings(BaseModel):
    """Routing in force: top_k experts per token (null = dense), the global scaling weight, and
    freeze_after (null = granular)."""

    top_k: int | None = Field(None, description="experts kept per token; null = all (dense)")
    global_scaling_weight: float
    freeze_after: int | None = Field(None, description=_FREEZE_AFTER_DOC)
    # Only when set (exclude_if): the answers of a one-model server stay as they were.
    model: str | None = Field(None, exclude_if=lambda v: v is None,
                              description="the model that served the request, if not the xlora section's")
    weights: dict[str, float] | None = Field(None, exclude_if=lambda v: v is None,
                                             description="the fixed mixture it ran with, if any")


class RoutingState(RoutingSettings):
    """GET and PATCH /routing: the routing in force and its version (one more with each change). With
    replicas, every replica reads this one state; `x-xlora-routing-version` names it on each response."""

    version: int = Field(description="0 for the config's routing, one more with each PATCH")


class RoutingUpdate(_Request):
    """A partial update: only the fields sent change. `top_k: null` means dense, `freeze_after: null` granular."""

    top_k: int | None = Field(None, ge=1, description="1..number of experts, or null for dense")
    # Bounded: the experts' outputs are multiplied by it, and 1e20 turns the logits into nan (a 500 for every
    # sampled request while it is in force).
    global_scaling_weight: float | None = Field(None, ge=-100.0, le=100.0, allow_inf_nan=False)
    freeze_after: int | None = Field(None, ge=0, description=_FREEZE_AFTER_DOC)

    @field_validator("global_scaling_weight")
    @classmethod
    def _weight_not_null(cls, value: float | None) -> float:
        # Runs only when the field is sent: leaving it out is fine, sending null is not.
        if value is None:
            raise ValueError("must be a finite number, not null")
        return value


class ModelInfo(BaseModel):
    """One model served over the base."""

    name: str = Field(description="what a request's `model` names")
    kind: Literal["xlora", "adapter", "base"] = Field(
        description="xlora: experts and a router; adapter: one LoRA; base: no expert"
    )
    experts: list[str] = Field(description="its experts, in the order of its scalings (what `routing.weights` names)")
    routing: RoutingSettings | None = Field(None, description="an X-LoRA model's routing defaults")


class ModelsList(BaseModel):
    default: str = Field(description="the model of requests that name none")
    models: list[ModelInfo]


class LoadModelRequest(_Request):
    """POST /models: a name and exactly one of checkpoint (X-LoRA) or adapter (one PEFT LoRA), each a folder
    under server.model_root (relative to it, or absolute)."""

    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:/@-]*$")
    checkpoint: str | None = Field(None, min_length=1, description="an X-LoRA checkpoint folder")
    adapter: str | None = Field(None, min_length=1, description="a PEFT LoRA adapter folder")

    @model_validator(mode="after")
    def _exactly_one(self) -> LoadModelRequest:
        if (self.checkpoint is None) == (self.adapter is None):
            raise ValueError("give exactly one of checkpoint or adapter")
        return self


class UnloadedModel(BaseModel):
    name: str
    unloaded: bool = True


class RoutingPatch(RoutingUpdate):
    """PATCH /routing: a partial update of the defaults of the xlora section's model, or of another X-LoRA
    model's (`model`)."""

    model: str | None = Field(None, description="another X-LoRA model (GET /models) whose defaults change; "
                              "default: the xlora section's")


class RequestRouting(RoutingUpdate):
    """A request's routing: a partial update of its model's defaults, and optionally a fixed mixture."""

    weights: dict[str, float] | None = Field(
        None,
        description="a fixed mixture, expert name -> weight (each finite, -100..100), on every layer and position: "
        "no classifier, no scaling pass. Names are the chosen model's experts; top_k and freeze_after do not apply",
    )


# -----------------------------------------------------------------------------
# the one way from a request body to a generation (every generation endpoint's body implements it)


class PromptInput(NamedTuple):
    """Prompt text, chat messages or token ids (the others None), and the request field they came from;
    `tools`: the function definitions the chat template shows the model."""

    prompt: str | None
    messages: list[dict] | None
    param: str
    token_ids: list[int] | None = None
    tools: list[dict] | None = None


class GenerationRequest(Protocol):
    """What the model manager needs from a request body (as vLLM's protocol classes offer it)."""

    stream: bool

    def prompt_inputs(self) -> list[PromptInput]:
        """The prompts: one choice each, times samples_per_prompt."""
        ...

    def samples_per_prompt(self) -> int: ...
    def requested_model(self) -> tuple[str | None, str]:
        """The model the request names (None: the xlora section's) and the field it came from."""
        ...


    def to_sampling_params(self, default_max_new_tokens: int) -> SamplingParams:
        """Raises ParameterError naming the SamplingParams field; `param_name` maps it to the request's."""
        ...

    def param_name(self, sampling_field: str) -> str: ...

    def routing_update(self) -> tuple[RoutingUpdate | None, str]:
        """The request's routing changes and the dotted prefix of their fields in the request."""
        ...

    def constraint_spec(self) -> tuple[ConstraintSpec | None, str]:
        """The structured-output constraint asked for (None: free text) and the request field it came from."""
        ...

    def logged_prompt(self) -> str | list[dict]: ...


def sampling_params(body: Any, max_new_tokens: int) -> SamplingParams:
    """The sampling fields every generation body shares (same names on /generate and /v1)."""
    return SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        repetition_penalty=body.repetition_penalty,
        seed=body.seed,
        stop=list(body.stop or []),
    )


def stop_list(value: list[str] | str | None, limit: int) -> list[str]:
    """`stop` as every API takes it (a string, a list, or null), normalised once to a list."""
    stops = [value] if isinstance(value, str) else list(value or [])
    if len(stops) > limit or any(not s for s in stops):
        raise ValueError(f"at most {limit} non-empty strings")
    return stops


# -----------------------------------------------------------------------------
# /generate


class ChatMessage(_Request):
    role: Literal["system", "user", "assistant"]
    content: str


class Constraint(_Request):
    """The shape the answer must have: exactly one of these. The answer follows it token by token; it
    parses (JSON) or matches (regex, grammar) whenever finish_reason is "stop"."""

    json_schema: dict[str, Any] | None = Field(None, description="a JSON schema the answer validates against")
    json_object: Literal[True] | None = Field(None, description="true: any JSON object")
    regex: str | None = Field(None, min_length=1, description="the whole answer matches it (Rust regex syntax)")
    grammar: str | None = Field(
        None, min_length=1, description="a context-free grammar: Lark (llguidance's dialect) or GBNF (llama.cpp's)"
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> Constraint:
        given = [name for name in ("json_schema", "json_object", "regex", "grammar") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of json_schema, json_object, regex, grammar (got {given or 'none'})")
        return self

    def spec(self) -> tuple[ConstraintSpec, str]:
        """(the spec, the field it came from, dotted below `constraint`)."""
        if self.json_schema is not None:
            return ConstraintSpec("json_schema", json.dumps(self.json_schema)), "json_schema"
        if self.json_object:
            return ConstraintSpec("json_object"), "json_object"
        if self.regex is not None:
            return ConstraintSpec("regex", self.regex), "regex"
        return ConstraintSpec("grammar", self.grammar or ""), "grammar"


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
    routing: RequestRouting | None = Field(None, description="this request only; unset fields use the model's")
    model: str | None = Field(None, description="which served model answers (GET /models); default: the "
                              "xlora section's")
    constraint: Constraint | None = Field(None, description="structured output: the shape the answer must have")
    logprobs: int | None = Field(
        None, ge=0, le=20, description="each generated token's log probability and this many top alternatives"
    )
    prompt_logprobs: int | None = Field(
        None, ge=0, le=20, description="each prompt token's log probability (the first has none) and this many "
        "top alternatives, under the model's own distribution",
    )

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: list[str] | str | None) -> list[str]:
        return stop_list(value, limit=16)

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> GenerateRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self

    # ---- GenerationRequest ----
    def prompt_inputs(self) -> list[PromptInput]:
        if self.prompt is not None:
            return [PromptInput(self.prompt, None, "prompt")]
        return [PromptInput(None, [m.model_dump() for m in self.messages or []], "messages")]

    def samples_per_prompt(self) -> int:
        return 1

    def requested_model(self) -> tuple[str | None, str]:
        return self.model, "model"

    def to_sampling_params(self, default_max_new_tokens: int) -> SamplingParams:
        params = sampling_params(self, self.max_new_tokens or default_max_new_tokens)
        return replace(params, logprobs=self.logprobs, prompt_logprobs=self.prompt_logprobs)

    def param_name(self, sampling_field: str) -> str:
        return sampling_field

    def routing_update(self) -> tuple[RoutingUpdate | None, str]:
        return self.routing, "routing."

    def constraint_spec(self) -> tuple[ConstraintSpec | None, str]:
        if self.constraint is None:
            return None, "constraint"
        spec, field = self.constraint.spec()
        return spec, f"constraint.{field}"

    def logged_prompt(self) -> str | list[dict]:
        """What the summary log line shows as the prompt (only with logging.log_prompts)."""
        return self.prompt if self.prompt is not None else [m.model_dump() for m in self.messages or []]


_CONSTRAINT_DOC = "the structured-output constraint it ran under (json_schema, json_object, regex, grammar), or null"


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        total = prompt_tokens + completion_tokens
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=total)


class TokenScalings(BaseModel):
    """Per-token scalings, averaged over layers: one list of n_adapters floats per token."""

    adapter_names: list[str]
    prompt: list[list[float]] = Field(description="one row per prompt token")
    completion: list[list[float]] = Field(
        description="one row per completion token: the mix at the step that chose it"
    )

    @classmethod
    def of(cls, done: Any, adapter_names: list[str]) -> TokenScalings:
        """From a finished job's DoneEvent (server.serving.jobs)."""
        prompt, completion = done.token_scalings()
        return cls(adapter_names=adapter_names, prompt=prompt, completion=completion)


class GenerateResponse(BaseModel):
    id: str
    text: str
    finish_reason: FinishReason
    usage: Usage
    routing: RoutingSettings = Field(description="the routing this request ran with")
    scalings: TokenScalings | None = None
    constraint: str | None = Field(None, description=_CONSTRAINT_DOC)
    logprobs: list[TokenLogprobInfo] | None = Field(None, description="with `logprobs`: one per generated token")
    prompt_logprobs: list[TokenLogprobInfo | None] | None = Field(
        None, description="with `prompt_logprobs`: one per prompt token, null for the first"
    )


class StreamToken(BaseModel):
    """`event: token` of a /generate stream: one per generated token."""

    id: str
    index: int
    token_id: int
    text: str = Field(description="text added by this token (may be empty while a character is incomplete)")
    logprob: TokenLogprobInfo | None = Field(None, description="with `logprobs`")
    prompt_logprobs: list[TokenLogprobInfo | None] | None = Field(
        None, description="with `prompt_logprobs`, on the first token: one per prompt token, null for the first"
    )
    scalings: list[float] | None = Field(
        None, description="with `return_scalings`: the mix that chose this token, one per adapter (mean over layers; "
        "the done event's scalings.completion row)"
    )


class StreamDone(BaseModel):
    """`event: done`, the last event of a /generate stream."""

    id: str
    finish_reason: FinishReason
    usage: Usage
    routing: RoutingSettings
    scalings: TokenScalings | None = None
    constraint: str | None = Field(None, description=_CONSTRAINT_DOC)


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
    frozen_from: int | None = Field(
        None, description="first position whose scalings are frozen (routing.freeze_after); null if none were"
    )
    replica: str | None = Field(None, description="the replica that served the request (x-xlora-replica)")
    model: str | None = Field(None, description="the model that served it (GET /models); adapter_names are its experts")
    constraint: str | None = Field(None, description=_CONSTRAINT_DOC)


class ScalingsLogResponse(BaseModel):
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
    layer_names: list[str] | None = Field(
        None, description="each LoRA layer's module in the base model, in the order of `scalings`' layer index "
        "(e.g. model.layers.3.self_attn.q_proj)"
    )
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
    decode_step: Literal["eager", "compiling", "compiled"] | None = Field(
        None, description="how decode steps run: eager, eager while compiling in the background, or compiled"
    )
