"""The server's YAML configuration, validated by pydantic.

Sections: model, xlora, routing, server, logging. An unknown key or a bad value stops start-up with a
message that names the file and the key (`ConfigError`). Auth tokens never come from the file: they are
read from the environment (XLORA_ADMIN_TOKEN, XLORA_API_KEY) by `AuthSettings.from_env`.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

ADMIN_TOKEN_ENV = "XLORA_ADMIN_TOKEN"
API_KEY_ENV = "XLORA_API_KEY"

_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
_SECRET_KEYS = {"admin_token", "api_key", "token", "tokens"}


class ConfigError(Exception):
    """A config file that cannot be used; the message names the file and the key."""


class _Section(BaseModel):
    # A field's docstring is its description: the configuration reference of the docs is rendered from them.
    model_config = ConfigDict(extra="forbid", validate_default=True, use_attribute_docstrings=True)


class ModelSection(_Section):
    base: str = Field(
        "default",
        description="'default' (embedded SmolLM2), a .gguf file, a transformers folder or a Hugging Face Hub id "
        "(org/name[@revision])",
    )
    revision: str | None = Field(None, description="the branch, tag or commit of a Hub id base (as base: org/name@rev)")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """auto: bf16 on CUDA and on CPUs with native bf16 (AVX-512 BF16 or AMX), float32 on other CPUs. On CPU
    the KV caches stay float32 whatever the model's dtype"""
    cache_dir: str | None = Field(None, description="where converted GGUF models are cached")
    name: str | None = Field(None, description="model id shown by /v1/models (default: derived from base)")
    compile: Literal["auto", True, False] = Field(
        "auto",
        description="the compiled decode step (docs/compiled-decoding.md): auto = from the cache, else eager while it "
        "builds in the background; true = build before serving; false = eager",
    )
    torch_threads: int | None = Field(
        None, ge=1, description="CPU threads for torch (default: torch's); 1 is fastest for tiny models on busy CPUs"
    )
    quantize: Literal["none", "int8", "int4"] = Field(
        "none",
        description="keep the base model's linear weights as int8 or int4 (weight-only; the experts and the "
        "classifier stay at full precision): docs/quantization.md",
    )

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not _DEVICE.match(value):
            raise ValueError("expected auto, cpu, mps, cuda or cuda:N")
        return value

    @model_validator(mode="after")
    def _check_revision(self) -> ModelSection:
        if self.revision is not None and self.base == "default":
            raise ValueError("revision applies to a Hugging Face Hub id base (org/name), not to 'default'")
        _check_hub_id(self.base, self.revision)
        return self

    @model_validator(mode="after")
    def _check_quantize(self) -> ModelSection:
        # xlora_core.quantize.check_quantize's rules, without importing torch; auto is checked once resolved
        if self.quantize == "none":
            return self
        if self.device == "mps":
            raise ValueError(f"quantize {self.quantize!r} has kernels on cpu and cuda, not on mps")
        if self.device.startswith("cuda") and self.dtype not in ("auto", "bfloat16"):
            raise ValueError(f"quantize {self.quantize!r} on cuda needs dtype bfloat16, not {self.dtype}")
        if self.device in ("cpu", "auto") and self.dtype == "float16":
            raise ValueError(f"quantize {self.quantize!r} needs dtype bfloat16 or float32 on cpu, not float16")
        return self


class XLoraSection(_Section):
    # Any XLoraConfig field is also allowed here; `_check_xlora_fields` rejects the rest by name.
    model_config = ConfigDict(extra="allow", validate_default=True)

    checkpoint: str | None = Field(
        None,
        description="checkpoint folder or Hugging Face Hub id: xlora-server's and peft's layout, or the xlora "
        "library's (detected)",
    )
    revision: str | None = Field(None, description="the branch, tag or commit of a Hub id checkpoint")
    adapters: dict[str, str] | None = Field(
        None, description="expert name -> PEFT adapter folder or Hugging Face Hub id (org/name[/folder][@revision])"
    )
    ordering: str | None = Field(None, description="a mistral.rs ordering file the checkpoint must agree with")
    allow_pickle: bool = Field(
        False, description="read an xlora library checkpoint's xlora_classifier.pt (a pickle: only files you trust)"
    )

    @model_validator(mode="after")
    def _check_xlora_fields(self) -> XLoraSection:
        if self.ordering is not None and self.checkpoint is None:
            raise ValueError("ordering describes a checkpoint's experts and layers: set xlora.checkpoint too")
        if self.revision is not None and self.checkpoint is None:
            raise ValueError("revision is the revision of a Hub id checkpoint: set xlora.checkpoint too")
        if self.checkpoint is not None:
            _check_hub_id(self.checkpoint, self.revision)
        for folder in (self.adapters or {}).values():
            _check_hub_id(folder)
        extra = dict(self.model_extra or {})
        if not extra:
            return self
        allowed = xlora_config_fields()
        for key in extra:
            if key not in allowed:
                raise ValueError(f"unknown key {key!r} (not an XLoraConfig field)")
        return self

    def config_overrides(self) -> dict[str, Any]:
        """The XLoraConfig fields set in the file (everything but checkpoint and adapters)."""
        return dict(self.model_extra or {})


def _check_hub_id(value: str, revision: str | None = None) -> None:
    """Refuse a Hub id whose revision is empty or given twice (org/name@a with revision: b)."""
    if "@" not in value or (revision is None and not value.endswith("@")):
        return  # nothing to refuse: and a bad config stays quick to report (xlora_core imports torch)
    from xlora_core.hub import parse_hub_id

    parse_hub_id(value, revision)


class RoutingSection(_Section):
    top_k: int | None = Field(None, ge=1, description="experts per token; null = dense")
    global_scaling_weight: float = Field(1.0, ge=-100.0, le=100.0, allow_inf_nan=False)  # as PATCH /routing
    """multiplies every expert's output (-100..100)"""
    freeze_after: int | None = Field(None, ge=0, description="freeze scalings after this many tokens; null = granular")


class ServerSection(_Section):
    host: str = "127.0.0.1"
    """where to listen (--host overrides)"""
    port: int = Field(8000, ge=0, le=65535)
    """where to listen (--port overrides)"""
    max_batch_size: int = Field(8, ge=1, le=1024)
    """rows generated together; new requests join the running batch"""
    max_queue: int = Field(64, ge=1, description="requests waiting for a batch slot before 429")
    max_new_tokens: int = Field(512, ge=1, description="upper limit a request may ask for")
    default_max_new_tokens: int = Field(128, ge=1, description="used when a request does not say")
    max_prompt_tokens: int = Field(2048, ge=1)
    """longer prompts are a 422"""
    max_step_tokens: int = Field(
        32, ge=1, description="tokens one decode step may feed: a longer prompt is prefilled in chunks across steps "
        "while running requests go on getting tokens (docs/prefix-caching.md)"
    )
    prefix_cache_bytes: int = Field(
        1 << 30, ge=0, description="memory for the prefix cache of prompts' keys, values and scalings, "
        "least recently used evicted first; 0 = off (docs/prefix-caching.md)"
    )
    request_timeout_s: float = Field(120.0, gt=0, allow_inf_nan=False)
    """a request past this is stopped (504)"""
    scalings_log_size: int = Field(128, ge=1)
    """requests kept for GET /scalings"""
    max_body_bytes: int = Field(1_000_000, ge=1024)
    """larger bodies are a 413"""
    shutdown_grace_s: float = Field(30.0, ge=0, allow_inf_nan=False)
    """on SIGTERM, finish requests in flight for up to this long, then exit 0"""
    state_file: str | None = Field(
        None, description="JSON file keeping PATCH /routing across restarts (written atomically); null = not kept"
    )
    metrics_require_key: bool = Field(False, description="/metrics at client level (XLORA_API_KEY) instead of public")
    docs_require_key: bool = Field(False, description="/docs and /openapi.json at client level")
    constraint_compile_timeout_s: float = Field(
        5.0, gt=0, le=600, allow_inf_nan=False,
        description="a JSON schema, regex or grammar that takes longer to compile is refused (422; 400 on /v1)",
    )
    constraint_cache_size: int = Field(64, ge=1, description="compiled constraints kept (by their text)")
    model_root: str | None = Field(
        None, description="POST /models (admin) loads models from folders under this one only; null = run-time "
        "loading is off (docs/models.md)",
    )
    max_loaded_experts: int | None = Field(
        None, ge=1, description="experts held at once, every model's together (shared ones once); a load that "
        "would hold more is refused; null = no bound",
    )
    allow_hub_downloads: bool = Field(
        False,
        description="models loaded at run time (admin) may be Hugging Face Hub ids, fetched by the server; the "
        "config's own ids are always fetched at start-up",
    )

    @model_validator(mode="after")
    def _defaults_within_limits(self) -> ServerSection:
        if self.default_max_new_tokens > self.max_new_tokens:
            raise ValueError("default_max_new_tokens must not exceed max_new_tokens")
        return self


class ModelEntry(_Section):
    """One more model served over the base (docs/models.md): an X-LoRA checkpoint, a plain PEFT LoRA adapter
    folder, or the base itself (`base: true`). Requests choose it by `model`."""

    name: str | None = Field(None, min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:/@-]*$",
                             description="what requests name it by (default for the base: the base's name)")
    checkpoint: str | None = Field(None, description="an X-LoRA checkpoint folder (any layout xlora.checkpoint reads)")
    adapter: str | None = Field(None, description="a PEFT LoRA adapter folder (adapter_config.json + safetensors)")
    base: bool = Field(False, description="the base model itself, no expert")

    @model_validator(mode="after")
    def _exactly_one(self) -> ModelEntry:
        given = [k for k in ("checkpoint", "adapter") if getattr(self, k) is not None] + (["base"] if self.base else [])
        if len(given) != 1:
            raise ValueError(f"give exactly one of checkpoint, adapter or base: true (got {given or 'none'})")
        if self.name is None and not self.base:
            raise ValueError("name is required (requests choose the model by it)")
        return self

    @property
    def kind(self) -> str:
        return "xlora" if self.checkpoint is not None else "adapter" if self.adapter is not None else "base"


class LoggingSection(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    """the log level"""
    format: Literal["text", "json"] = "text"
    """json: one JSON object a line, with the request id"""
    log_prompts: bool = Field(False, description="put prompt and completion text in each request's summary line")


class Settings(_Section):
    model: ModelSection = Field(default_factory=ModelSection)
    xlora: XLoraSection = Field(default_factory=XLoraSection)
    routing: RoutingSection = Field(default_factory=RoutingSection)
    server: ServerSection = Field(default_factory=ServerSection)
    logging: LoggingSection = Field(default_factory=LoggingSection)
    models: list[ModelEntry] = Field(
        default_factory=list, description="more models over the same base, after the xlora section's (docs/models.md)"
    )

    # Where the file was; relative paths inside it are resolved against its folder.
    source: Path | None = Field(None, exclude=True)

    def resolve_path(self, value: str) -> str:
        """A path from the file, relative to the file's folder (so configs work from any cwd)."""
        path = Path(value).expanduser()
        if not path.is_absolute() and self.source is not None:
            path = (self.source.parent / path).resolve()
        return str(path)

    def model_ref(self, value: str) -> str:
        """A model from the file: a path relative to the file's folder if one is there or `value` cannot be a
        Hugging Face Hub id, else the id as it is (fetched at start-up: server/serving/model_sources.py)."""
        from xlora_core.hub import parse_hub_id

        path = self.resolve_path(value)
        return value if not Path(path).exists() and parse_hub_id(value) is not None else path

    def base_spec(self) -> str:
        base = self.model.base
        return base if base == "default" else self.model_ref(base)

    def checkpoint_dir(self) -> str | None:
        return None if self.xlora.checkpoint is None else self.model_ref(self.xlora.checkpoint)

    def ordering_path(self) -> str | None:
        return None if self.xlora.ordering is None else self.resolve_path(self.xlora.ordering)
    def state_file_path(self) -> str | None:
        return None if self.server.state_file is None else self.resolve_path(self.server.state_file)

    def model_root_path(self) -> Path | None:
        return None if self.server.model_root is None else Path(self.resolve_path(self.server.model_root))

    def adapter_dirs(self) -> dict[str, str] | None:
        if self.xlora.adapters is None:
            return None
        return {name: self.model_ref(folder) for name, folder in self.xlora.adapters.items()}


def xlora_config_fields() -> set[str]:
    """Field names of xlora_core's XLoraConfig (dataclass or pydantic model)."""
    from xlora_core import XLoraConfig

    if dataclasses.is_dataclass(XLoraConfig):
        names = {f.name for f in dataclasses.fields(XLoraConfig)}
    else:
        names = set(getattr(XLoraConfig, "model_fields", {}))
    # hidden_size comes from the base model; base_model_name_or_path only records where the experts came from
    return names - {"adapters", "hidden_size", "base_model_name_or_path"}


def _where(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc) or "(top level)"


def load_settings(path: str | os.PathLike) -> Settings:
    """Read and validate a YAML config; raise ConfigError naming the file and the offending key."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror or exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (model, xlora, routing, server, logging)")
    _reject_secrets(data, path)
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            problems.append(f"{path}: {_where(err['loc'])}: {msg}")
        raise ConfigError("\n".join(problems)) from None
    settings.source = path.resolve()
    return settings


def _reject_secrets(data: dict[str, Any], path: Path) -> None:
    # Tokens in a config file end up in git and in logs; say where they belong instead.
    for section, body in data.items():
        if isinstance(body, dict):
            for key in body:
                if key in _SECRET_KEYS:
                    raise ConfigError(
                        f"{path}: {section}.{key}: tokens are not read from the config file; "
                        f"set {ADMIN_TOKEN_ENV} / {API_KEY_ENV} in the environment"
                    )


@dataclasses.dataclass(frozen=True)
class AuthSettings:
    """Bearer tokens, from the environment only. None = that check is off."""

    admin_token: str | None = None
    api_key: str | None = None

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> AuthSettings:
        env = os.environ if environ is None else environ
        return cls(admin_token=env.get(ADMIN_TOKEN_ENV) or None, api_key=env.get(API_KEY_ENV) or None)
