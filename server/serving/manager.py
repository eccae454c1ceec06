"""ModelManager: loads the model in the background, then turns HTTP requests into scheduler jobs.

Loading (base model, experts, classifier) runs in a thread started by the app's lifespan, so /health
answers at once and /ready says 503 until the model serves. A load failure is fatal: the manager calls
`on_fatal`, and the process exits non-zero with the message (which names the expert or file at fault);
there is never a half-loaded model serving.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import fields, replace
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from server.observability.metrics import Metrics
from server.observability.scalings_store import LocalScalingsStore
from server.protocol.errors import APIError
from server.protocol.schemas import GenerationRequest, PromptInput, RoutingUpdate
from server.serving.compiled import StepCompiler
from server.serving.jobs import GenerationJob, JobGroup
from server.serving.routing_state import (
    LocalRoutingState,
    RoutingSnapshot,
    RoutingState,
    StateFileError,
    config_routing,
    note_new_snapshot,
    read_state_models,
    request_snapshot,
    write_state_file,
)
from server.serving.scheduler import Scheduler
from server.settings import Settings
from xlora_core import CompiledGrammar, ConstraintSpec, GrammarCompiler, ParameterError, Routing, RowDecoder
from xlora_core.hosted import ExpertLimitError, HostedModel, ModelNameTaken
from xlora_core.prefix_cache import PrefixCache

log = logging.getLogger("xlora.manager")


State = Literal["loading", "ready", "failed", "draining"]

# Weight files that unpickle (run code) when read: never loaded from a folder given at run time.
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"}


def process_replica_name() -> str:
    """The single-process server's name in x-xlora-replica and scalings entries: host and process id."""
    return f"{socket.gethostname()}-{os.getpid()}"


class ModelManager:
    """`routing_state` and `scalings_log` default to this process's own (single-process server); the Ray
    Serve replicas (server/ray_app.py) pass the deployment's shared ones."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        routing_state: RoutingState | None = None,
        scalings_log: LocalScalingsStore | None = None,
        replica: str | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.replica = replica or process_replica_name()
        self.scalings_log = scalings_log or LocalScalingsStore(settings.server.scalings_log_size, self.replica)
        # The routing in force and its version; a PATCH replaces it whole (xlora_core.Routing is frozen).
        self.routing_state: RoutingState = routing_state or LocalRoutingState(
            config_routing(settings.routing), settings.state_file_path(), f"{settings.source}: routing"
        )
        self.state: State = "loading"
        self.error: str | None = None
        self.model = None
        self.tokenizer = None
        self.scheduler: Scheduler | None = None
        self.model_name = settings.model.name or _default_name(settings)
        self.context_length: int | None = None
        self.vocab_size: int | None = None  # the model's (its LM head's rows): token ids in requests stay below
        self.eos_token_id: int | list[int] | None = None
        self.grammars: GrammarCompiler | None = None  # structured output; None if this tokenizer cannot have it
        self.grammars_error: str | None = None
        self.on_fatal: Callable[[str], None] | None = None
        self._thread: threading.Thread | None = None
        self.runtime_models: list[dict] = []  # loaded through POST /models: {name, kind, folder}
        self.replicated = routing_state is not None  # a Ray Serve replica: the state is the deployment's
        self.step_compiler: StepCompiler | None = None  # the compiled decode step (server/serving/compiled.py)

    # ---- lifecycle -------------------------------------------------------------------------
    def start_loading(self) -> None:
        self._thread = threading.Thread(target=self._load, name="xlora-loader", daemon=True)
        self._thread.start()

    def wait_loaded(self) -> None:
        """Block until loading has ended (ready or failed)."""
        if self._thread is not None:
            self._thread.join()

    def _load(self) -> None:
        try:
            self._load_model()
        except Exception as exc:  # every failure is fatal: say what and where, then stop the server
            self.error = f"{type(exc).__name__}: {exc}" if not _names_itself(exc) else str(exc)
            self.state = "failed"
            log.error("loading the model failed: %s", self.error)
            if self.on_fatal is not None:
                self.on_fatal(self.error)
            return
        if self.state == "loading":
            freeze_heap()
            self.state = "ready"
            self.metrics.model_loaded.set(1)
            log.info("model ready: %s with experts %s", self.model_name, ", ".join(self.model.adapter_names))

    def _load_model(self) -> None:
        s = self.settings
        started = time.monotonic()
        model, base, tokenizer = build_model(s)
        self.step_compiler = StepCompiler(s, model)
        build_in_background = self.step_compiler.prepare()
        self._add_saved_models(model)  # after the package: one of the config's model only (--precompile's)
        routing = self.routing_state.last_seen().routing  # the config's, or the state file's, or the deployment's
        try:
            routing.validate(len(model.adapter_names))
        except ParameterError as exc:
            raise ValueError(f"{self.routing_state.source}.{exc}") from None

        self.model, self.tokenizer = model, tokenizer
        self.context_length = getattr(base.config, "max_position_embeddings", None)
        self.vocab_size = base.get_output_embeddings().out_features  # nn.Linear or quantize.QuantizedLinear
        self.metrics.set_routing(routing)
        # the xlora section's model's experts (requests of other models have other experts)
        self.metrics.watch_mean_scaling(model.adapter_names, lambda i: self.scalings_log.mean_of(i, self.model_name))
        eos = getattr(base.generation_config, "eos_token_id", None) if base.generation_config else None
        self.eos_token_id = eos if eos is not None else tokenizer.eos_token_id
        self._load_grammar_compiler(tokenizer, getattr(base.config, "vocab_size", None))
        self.scheduler = Scheduler(
            model,
            tokenizer,
            max_batch_size=s.server.max_batch_size,
            max_queue=s.server.max_queue,
            metrics=self.metrics,
            scalings_log=self.scalings_log,
            max_step_tokens=s.server.max_step_tokens,
            prefix_cache=PrefixCache(s.server.prefix_cache_bytes),
        )
        self.metrics.prefix_cache_bytes.set_function(lambda cache=self.scheduler.prefix_cache: cache.nbytes)
        self.scheduler.on_fatal = lambda exc: self.on_fatal and self.on_fatal(f"model worker died: {exc}")
        self.scheduler.on_switched = self._switched_to_compiled
        self.metrics.decode_compiled.set(int(model.compiled))
        self.scheduler.start()
        if build_in_background:
            self.step_compiler.start_background_build(self.scheduler.use_packaged_step)
        log.info("loaded in %.1f s", time.monotonic() - started)

    def _add_saved_models(self, model) -> None:
        """The models loaded at run time before a restart (server.state_file's `models`)."""
        path = self.settings.state_file_path()
        for entry in read_state_models(Path(path)) if path else []:
            try:
                pending = model.read_model(entry["name"], entry["kind"], entry.get("folder"))
                model.attach(pending, self.settings.server.max_loaded_experts)
            except (ValueError, OSError, KeyError, TypeError) as exc:
                raise ValueError(f"server.state_file {path}: models: {entry!r}: {exc}") from None
            self.runtime_models.append(entry)
            log.info("serving model %s (%s), loaded before the restart", entry["name"], entry["kind"])

    # ---- models loaded and unloaded at run time (POST and DELETE /models, admin) -------------------
    async def load_model(self, name: str, kind: str, value: str, field: str) -> HostedModel:
        """Read a model from a folder under server.model_root off the model thread, attach it between steps,
        and keep it in server.state_file. Every refusal names the field (or the setting) at fault."""
        self._refuse_on_replicas()
        folder = self._folder_under_root(value, field)
        try:
            pending = await asyncio.to_thread(self.model.read_model, name, kind, folder)
        except ModelNameTaken as exc:
            raise APIError(409, str(exc), param="name", code="model_exists") from None
        except (ValueError, OSError) as exc:  # ExpertError, CheckpointError: the file or module at fault
            raise APIError(422, str(exc), param=field, code="invalid_model") from None
        limit = self.settings.server.max_loaded_experts
        def attach(batches) -> HostedModel:
            model = self.model.attach(pending, limit)
            layers, experts = self.model.n_lora_layers, self.model.n_experts_loaded
            for batch in batches:
                if batch.cache is not None:  # frozen rows hold scalings of every layer and expert: room for the new
                    batch.cache.frozen = [
                        None if f is None else F.pad(f, (0, experts - f.shape[1], 0, layers - f.shape[0]))
                        for f in batch.cache.frozen
                    ]
            self._clear_prefix_cache()  # its scalings have the old shape
            return model

        future = self.scheduler.between_steps(attach)
        try:
            model = await asyncio.wrap_future(future)
        except ModelNameTaken as exc:
            raise APIError(409, str(exc), param="name", code="model_exists") from None
        except ExpertLimitError as exc:
            raise APIError(409, f"{exc} (server.max_loaded_experts)", code="too_many_experts") from None
        self.runtime_models.append({"name": name, "kind": kind, "folder": str(folder)})
        self._save_models()
        log.info("model %s (%s) loaded from %s", name, kind, folder)
        return model

    async def unload_model(self, name: str) -> None:
        """Stop serving a model (one loaded at run time or from the config's models:), between steps. Refused
        with 409 while requests of it run or wait: it does not drain them."""
        self._refuse_on_replicas()
        if name == self.model.name:
            raise APIError(409, "the xlora section's model is served for the server's life; it cannot be unloaded",
                           code="model_required")  # fmt: skip
        self.resolve_model(name, param="name")

        def remove(batches) -> None:
            using = self.scheduler.rows_of_model(batches, name)
            if using:
                raise APIError(409, f"{using} request(s) of {name!r} are running or waiting; unload it when they "
                               "are done", code="model_in_use")  # fmt: skip
            layers, experts = self.model.remove(name)
            for batch in batches:
                if batch.cache is not None:  # frozen rows of the other models hold scalings of every expert
                    batch.cache.frozen = [None if f is None else f[layers][:, experts] for f in batch.cache.frozen]
            self._clear_prefix_cache()  # a name loaded again later may be other weights

        try:
            await asyncio.wrap_future(self.scheduler.between_steps(remove))
        except KeyError:
            raise APIError(404, f"the model {name!r} does not exist", param="name", code="model_not_found") from None
        self.runtime_models = [e for e in self.runtime_models if e["name"] != name]
        self._save_models()
        # Its objects were frozen with the heap: reference counting frees most, a full collection the cycles.
        gc.unfreeze()
        freeze_heap()
        log.info("model %s unloaded", name)

    def _refuse_on_replicas(self) -> None:
        if self.replicated:  # one replica would serve a model the others do not know (docs/models.md "Limits")
            raise APIError(501, "loading and unloading models at run time is not supported with Ray Serve replicas; "
                           "list the models in the config's models:", code="not_supported")  # fmt: skip

    def _folder_under_root(self, value: str, field: str) -> Path:
        """The folder `value` (relative to server.model_root, or absolute) if it is really inside the root:
        no symlink out of it, and no pickle weights in it (only safetensors are read at run time)."""
        root = self.settings.model_root_path()
        if root is None:
            raise APIError(403, "loading models at run time is off: set server.model_root", param=field,
                           code="model_root_unset")  # fmt: skip
        root = root.resolve()
        try:
            folder = (root / value).resolve(strict=True)
        except (OSError, RuntimeError):
            raise APIError(422, f"{value!r} is not a folder under server.model_root", param=field,
                           code="invalid_model") from None  # fmt: skip
        if not folder.is_relative_to(root) or not folder.is_dir():
            raise APIError(422, f"{value!r} is not a folder under server.model_root ({root})", param=field,
                           code="invalid_model")  # fmt: skip
        for path in sorted(folder.rglob("*")):
            shown = path.relative_to(folder)
            if not path.resolve().is_relative_to(root):
                raise APIError(422, f"{shown} links outside server.model_root", param=field, code="invalid_model")
            if path.suffix in PICKLE_SUFFIXES:
                raise APIError(422, f"{shown}: only safetensors weights are loaded at run time, not pickles",
                               param=field, code="invalid_model")  # fmt: skip
        return folder

    def _save_models(self) -> None:
        """Keep the models loaded at run time in server.state_file, for the next start."""
        path = self.settings.state_file_path()
        if path is None:
            return
        snapshot = self.routing_state.last_seen()
        try:
            write_state_file(Path(path), snapshot.routing.to_dict(), snapshot.version, models=self.runtime_models)
        except OSError as exc:
            raise APIError(500, f"server.state_file {path}: cannot write it: {exc.strerror or exc}",
                           code="state_file_error") from None  # fmt: skip

    def _switched_to_compiled(self) -> None:
        self.step_compiler.switched()
        self.metrics.decode_compiled.set(1)

    def _load_grammar_compiler(self, tokenizer, vocab_size: int | None) -> None:
        """Structured output's view of the tokenizer (once: about a second for a 49k vocabulary). A tokenizer
        it cannot read leaves the server serving, with constrained requests refused (and the reason said)."""
        try:
            self.grammars = GrammarCompiler(tokenizer, vocab_size, self.eos_token_id,
                                            cache_size=self.settings.server.constraint_cache_size)  # fmt: skip
        except Exception as exc:
            self.grammars_error = f"{type(exc).__name__}: {exc}"
            log.warning("structured output is off: this tokenizer cannot be used for it: %s", self.grammars_error)

    def begin_draining(self) -> None:
        if self.state in ("ready", "loading"):
            self.state = "draining"
            self.metrics.model_loaded.set(0)

    @property
    def in_flight(self) -> int:
        return self.scheduler.in_flight if self.scheduler is not None else 0

    def shutdown(self) -> None:
        if self.step_compiler is not None:
            self.step_compiler.stop()
        if self.scheduler is not None:
            self.scheduler.stop()

    # ---- serving ---------------------------------------------------------------------------
    def require_ready(self) -> None:
        if self.state == "ready":
            return
        if self.state == "draining":
            raise APIError(503, "the server is shutting down", code="shutting_down")
        if self.state == "failed":
            raise APIError(503, f"the model failed to load: {self.error}", code="load_failed")
        raise APIError(503, "the model is still loading; retry when /ready says ready", code="loading",
                       headers={"Retry-After": "5"})

    @property
    def adapter_names(self) -> list[str]:
        return list(self.model.adapter_names) if self.model is not None else []

    @property
    def routing(self):
        """The routing in force for this request: the snapshot it started with (server/serving/routing_state.py)."""
        return self.routing_snapshot().routing

    def routing_snapshot(self) -> RoutingSnapshot:
        """This request's snapshot; outside a request, the newest this process has seen."""
        return request_snapshot() or self.routing_state.last_seen()

    def note_routing(self, snapshot: RoutingSnapshot) -> None:
        """A newer routing was seen (a PATCH here or through another replica): the gauges follow it, and the
        prefix cache starts afresh (its blocks are keyed by routing already; nothing outlives a change)."""
        self.metrics.set_routing(snapshot.routing)
        self._clear_prefix_cache()

    def _clear_prefix_cache(self) -> None:
        if self.scheduler is not None and self.scheduler.prefix_cache is not None:
            self.scheduler.prefix_cache.clear()

    async def set_routing(self, update: RoutingUpdate) -> RoutingSnapshot:
        """Apply a PATCH: merge it into the newest snapshot, validate, and store it if no other change came
        in between (else merge again into that one); the new snapshot is returned and in force for every
        request that starts after this returns, on every replica."""
        if "model" in update.model_fields_set:  # the xlora section's model, named: the update without the name
            update = RoutingUpdate(**update.model_dump(include=update.model_fields_set - {"model"}))
        while True:
            current = await self.routing_state.current()
            note_new_snapshot(current)  # merge_routing reads the request's snapshot
            new = self.merge_routing(update, param_prefix="")
            try:
                stored = await self.routing_state.compare_and_set(current.version, new)
            except StateFileError as exc:  # the change is not made: a restart would lose it
                raise APIError(500, str(exc), code="state_file_error") from None
            if stored is not None:
                note_new_snapshot(stored)
                self.note_routing(stored)
                return stored

    def merge_routing(
        self, update: RoutingUpdate | None, param_prefix: str = "routing.", model: HostedModel | None = None
    ) -> Routing:
        """The routing in force for `model` (None: the X-LoRA model of the xlora section, whose defaults PATCH
        /routing sets; another model's come from its checkpoint) with the fields the request set; 422 naming
        the field if invalid."""
        primary = model is None or model is self.model.primary
        default = self.routing if primary else self.model.routing_of(model.name)
        if update is None:
            return default
        changes = {f.name: getattr(update, f.name) for f in fields(Routing) if f.name in update.model_fields_set}
        if changes.get("weights") is not None:  # a fixed mixture: the defaults' top_k and freeze_after do not apply
            default = replace(default, top_k=None, freeze_after=None)
        try:
            return self.model.check_routing(replace(default, **changes))
        except ParameterError as exc:
            raise APIError(422, str(exc), param=param_prefix + exc.parameter, code="invalid_value") from None

    def set_model_routing(self, update: RoutingUpdate) -> Routing:
        """PATCH /routing with `model`: another X-LoRA model's defaults, in this process (its config's fields)."""
        model = self.resolve_model(update.model)
        if model.kind != "xlora":
            raise APIError(422, f"{model.name!r} is a {model.kind}: it has no routing defaults", param="model",
                           code="invalid_value")  # fmt: skip
        changes = {f.name: getattr(update, f.name) for f in fields(Routing) if f.name in update.model_fields_set
                   and f.name != "model"}  # fmt: skip
        try:
            routing = self.model.check_routing(replace(self.model.routing_of(model.name), **changes))
        except ParameterError as exc:
            raise APIError(422, str(exc), param=exc.parameter, code="invalid_value") from None
        model.config.top_k_lora, model.config.global_scaling_weight = routing.top_k, routing.global_scaling_weight
        model.freeze_after = routing.freeze_after
        return routing

    def resolve_model(self, name: str | None, param: str = "model") -> HostedModel:
        """The model a request names (None: the xlora section's); 404 naming the field if none is served."""
        try:
            return self.model.hosted_model(name)
        except KeyError:
            served = ", ".join(m.name for m in self.model.models())
            raise APIError(404, f"the model {name!r} does not exist; this server serves: {served}", param=param,
                           code="model_not_found") from None  # fmt: skip

    def expert_names(self, routing: Routing) -> list[str]:
        """The experts a row's scalings are about (its model's)."""
        return list(self.model.hosted_model(routing.model).expert_names)

    def models(self) -> list[HostedModel]:
        return self.model.models() if self.model is not None else []

    def model_routing(self, model: HostedModel) -> dict:
        """An X-LoRA model's routing defaults (the xlora section's: the routing in force, PATCH /routing's)."""
        routing = self.routing if model is self.model.primary else self.model.routing_of(model.name)
        return {k: v for k, v in routing.to_dict().items() if k != "model"}

    async def tokenize(
        self, prompt: str | None, messages: list[dict] | None, param: str, token_ids: list[int] | None = None,
        tools: list[dict] | None = None,
    ) -> list[int]:
        """Prompt text, chat messages (with the tools they may call) or token ids -> token ids, off the event
        loop; 422 naming `param` if unusable."""
        return await asyncio.to_thread(self._tokenize, prompt, messages, param, token_ids, tools)

    def _tokenize(
        self, prompt: str | None, messages: list[dict] | None, param: str, token_ids: list[int] | None = None,
        tools: list[dict] | None = None,
    ) -> list[int]:
        tok = self.tokenizer
        if token_ids is not None:
            bad = [t for t in token_ids if not 0 <= t < (self.vocab_size or 0)]
            if bad:
                raise APIError(422, f"token ids must be in 0..{self.vocab_size - 1}, got {bad[0]}", param=param,
                               code="invalid_value")  # fmt: skip
            ids = list(token_ids)
        elif messages is not None:
            if not getattr(tok, "chat_template", None):
                raise APIError(422, "this model has no chat template; send a prompt instead", param=param)
            try:
                text = tok.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
            except Exception as exc:  # a template may reject a role order (e.g. two system messages)
                raise APIError(422, f"the chat template refused these messages: {exc}", param=param) from None
            ids = tok(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tok(prompt)["input_ids"]
        if not ids:
            raise APIError(422, "the prompt is empty (no tokens)", param=param, code="empty_prompt")
        limit = self.settings.server.max_prompt_tokens
        if len(ids) > limit:
            raise APIError(
                422, f"the prompt has {len(ids)} tokens; this server takes at most {limit}", param=param,
                code="prompt_too_long",
            )
        return list(ids)

    def check_lengths(self, prompt_tokens: int, max_new_tokens: int, param: str, prompt_param: str) -> None:
        limit = self.settings.server.max_new_tokens
        if max_new_tokens > limit:
            raise APIError(422, f"must be at most {limit} on this server, got {max_new_tokens}", param=param,
                           code="invalid_value")
        if self.context_length and prompt_tokens + max_new_tokens > self.context_length:
            at_fault = prompt_param if prompt_tokens >= self.context_length else param
            raise APIError(
                422,
                f"the model's context is {self.context_length} tokens; the prompt ({prompt_tokens}) plus "
                f"{max_new_tokens} new tokens does not fit",
                param=at_fault, code="context_length_exceeded",
            )

    async def compile_constraint(self, spec: ConstraintSpec, param: str) -> CompiledGrammar:
        """The compiled grammar of a request's constraint, off the event loop and within the configured time
        (server.constraint_compile_timeout_s); 422 naming `param` if it is invalid, unsupported or too slow.
        The time limit ends the wait, not the compiling thread: llguidance's own work limits end that."""
        if self.grammars is None:
            why = f"structured output is not available with this model's tokenizer ({self.grammars_error})"
            raise APIError(422, why, param=param, code="constraint_unavailable")
        limit = self.settings.server.constraint_compile_timeout_s
        try:
            return await asyncio.wait_for(asyncio.to_thread(self.grammars.compile, spec, limit), limit)
        except asyncio.TimeoutError:
            raise APIError(
                422, f"took longer than {limit:g} s to compile (server.constraint_compile_timeout_s); simplify it",
                param=param, code="constraint_too_complex",
            ) from None
        except ParameterError as exc:  # a ConstraintError (it compiles, but no answer can follow it) has a code
            message = str(exc).removeprefix(exc.parameter).strip()
            raise APIError(422, message, param=param, code=getattr(exc, "code", "invalid_constraint")) from None

    async def start(self, body: GenerationRequest, id_prefix: str) -> JobGroup:
        """The one way in for every generation endpoint: tokenize, check lengths, merge the routing, compile
        the constraint, build the rows' decoders and queue the jobs, one per choice (each prompt, n times;
        the n choices of a prompt seeded seed, seed + 1, ...). Every refusal is a 4xx naming the request's
        field, before anything reaches the model worker."""
        self.require_ready()
        hosted = self.resolve_model(*body.requested_model())
        inputs: list[PromptInput] = body.prompt_inputs()
        prompts = [await self.tokenize(p.prompt, p.messages, p.param, p.token_ids, p.tools) for p in inputs]
        try:
            params = body.to_sampling_params(self.settings.server.default_max_new_tokens)
        except ParameterError as exc:
            raise APIError(422, str(exc), param=body.param_name(exc.parameter), code="invalid_value") from None
        params.eos_token_id = self.eos_token_id
        unknown = [t for t in params.logit_bias if t >= (self.vocab_size or 0)]
        if unknown:
            raise APIError(422, f"token id {unknown[0]} is not in this model's vocabulary (0..{self.vocab_size - 1})",
                           param=body.param_name("logit_bias"), code="invalid_value")  # fmt: skip
        for ids, p in zip(prompts, inputs, strict=True):
            self.check_lengths(len(ids), params.max_new_tokens, body.param_name("max_new_tokens"), p.param)
        update, routing_prefix = body.routing_update()
        routing = self.merge_routing(update, routing_prefix, hosted)
        spec, spec_param = body.constraint_spec()
        if spec is not None:
            grammar = await self.compile_constraint(spec, spec_param)
            try:
                params = replace(params, constraint=grammar)
            except ParameterError as exc:  # e.g. stop strings, which would cut the structured answer
                raise APIError(422, str(exc), param=body.param_name(exc.parameter), code="invalid_value") from None
        n = body.samples_per_prompt()
        choices = [(ids, j) for ids in prompts for j in range(n)]
        if len(choices) > self.settings.server.max_batch_size:  # the choices of a request share one batch
            raise APIError(422, f"{len(choices)} choices (prompts x n); this server runs at most "
                           f"{self.settings.server.max_batch_size} (server.max_batch_size)", param=body.param_name("n"),
                           code="invalid_value")  # fmt: skip
        group_id = f"{id_prefix}-{uuid.uuid4().hex[:24]}"
        events: asyncio.Queue = asyncio.Queue()
        deadline = time.monotonic() + self.settings.server.request_timeout_s
        jobs = []
        for choice, (ids, j) in enumerate(choices):
            own = params if j == 0 or params.seed is None else replace(params, seed=(params.seed + j) % 2**63)
            try:
                # Off the event loop: stop strings are preprocessed against the whole vocabulary.
                decoder = await asyncio.to_thread(RowDecoder, own, self.tokenizer, ids)
            except ParameterError as exc:
                raise APIError(422, str(exc), param=body.param_name(exc.parameter), code="invalid_value") from None
            job_id = group_id if len(choices) == 1 else f"{group_id}-{choice}"  # each choice's /scalings entry
            jobs.append(GenerationJob(id=job_id, decoder=decoder, routing=routing, deadline=deadline,
                                      loop=asyncio.get_running_loop(), events=events, choice=choice,
                                      constraint_param=spec_param if spec is not None else None))  # fmt: skip
        self.scheduler.submit(*jobs)
        return JobGroup(group_id, jobs, events)

    def readiness(self) -> dict:
        return {
            "ready": self.state == "ready",
            "state": self.state,
            "model": self.model_name,
            "adapters": self.adapter_names,
            "detail": self.error,
            "decode_step": self.step_compiler.state if self.step_compiler is not None else None,
        }


def freeze_heap() -> None:
    """Leave every object alive now out of Python's full garbage collections, as vLLM does after start-up.
    torch, transformers and the model are some 460k objects: a full collection walked them all, holding the
    GIL, and stalled the model worker for 0.2 to 0.4 s every few seconds under load (225 ms a collection here;
    none after the freeze). Frozen objects are still freed when nothing refers to them; only reference cycles
    among them wait for `gc.unfreeze()` (a model unloaded at run time)."""
    gc.collect()
    gc.freeze()


def build_model(s: Settings):
    """The config's model: (XLoraModel, base model, tokenizer), in eval mode; raises what loading raises."""
    from server.serving.model_sources import resolve_sources
    from xlora_core import XLoraConfig, XLoraModel
    from xlora_core.base_model import load_base_model
    from xlora_core.quantize import QuantizeError, weight_bytes

    if s.model.torch_threads is not None:
        torch.set_num_threads(s.model.torch_threads)
    sources = resolve_sources(s)  # Hub ids -> folders in huggingface_hub's cache, fetched now (before /ready)
    try:
        base, tokenizer = load_base_model(
            sources.base, s.model.device, s.model.dtype, s.model.cache_dir, quantize=s.model.quantize
        )
    except QuantizeError as exc:  # what device or dtype auto resolved to has no kernel for it
        raise ValueError(f"{s.source}: model.quantize: {exc} (model.device {s.model.device!r}, "
                         f"model.dtype {s.model.dtype!r})") from None  # fmt: skip
    if s.model.quantize != "none":
        log.info("base weights quantized: %s, %.1f MB held", s.model.quantize, weight_bytes(base) / 1e6)
    checkpoint, adapters = sources.checkpoint, sources.adapters
    overrides = s.xlora.config_overrides()
    if checkpoint is not None:
        ordering = s.ordering_path()
        if ordering is not None and not Path(ordering).is_file():
            raise FileNotFoundError(f"{s.source}: xlora.ordering: {ordering}: no such file")
        model = XLoraModel.from_pretrained(
            base, checkpoint, adapters=adapters, ordering=ordering, allow_pickle=s.xlora.allow_pickle, **overrides
        )
    elif adapters:
        log.warning("no xlora.checkpoint: the classifier is untrained (random routing)")
        config = XLoraConfig(hidden_size=base.config.hidden_size, adapters=adapters, **overrides)
        model = XLoraModel(base, config)
    else:
        raise ValueError(f"{s.source}: xlora: give a checkpoint, adapters, or both")
    model.eval()
    model.name = s.model.name or _default_name(s)
    add_config_models(model, s)
    return model, base, tokenizer


def add_config_models(model, s: Settings) -> None:
    """The config's `models:` list: more models over the base, each refused by its entry if it cannot load."""
    from xlora_core.base_model import base_model_name

    for i, entry in enumerate(s.models):
        name = entry.name or base_model_name(s.model.base)
        try:
            if entry.kind == "xlora":
                model.add_xlora(name, s.model_ref(entry.checkpoint))
            elif entry.kind == "adapter":
                model.add_adapter(name, s.model_ref(entry.adapter))
            else:
                model.add_base(name)
        except (ValueError, OSError) as exc:  # ExpertError, CheckpointError, a taken name, a missing file
            raise ValueError(f"{s.source}: models[{i}] ({name}): {exc}") from None
        log.info("serving model %s (%s)", name, entry.kind)


def _default_name(settings: Settings) -> str:
    from xlora_core.base_model import base_model_name

    return f"xlora-{base_model_name(settings.model.base)}"


def _names_itself(exc: Exception) -> bool:
    # xlora_core's load errors already say which expert or file; do not prefix the class name.
    return type(exc).__name__ in {"ExpertError", "CheckpointError", "FileNotFoundError", "HubError"}
