"""XLoraModel: a Hugging Face causal LM, its LoRA experts, and the classifier that routes between them.

Every step is two passes of the same backbone:
  1. scaling pass: every expert weighted by `scaling_pass_value` (0: experts off), hidden states only;
  2. the classifier turns those hidden states into scalings [batch, seq, n_lora_layers, n_experts];
  3. real pass: the experts weighted by the scalings (after top-k and the global weight), then the LM head.
For generation each pass keeps its own KV cache (`XLoraCache`), so a new token costs two one-token passes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .batch_invariant import ROW_SDPA, left_padded_spans, ragged_spans, use_row_invariant_linears
from .cache import RaggedRows, XLoraCache, growing_cache
from .classifier import Routing, XLoraClassifier, expert_weights
from .config import XLoraConfig, check_freeze_after, check_global_scaling_weight, check_top_k
from .lora import ExpertWeightsSlot, FusedLoraLinear, attach_experts, read_expert
from .scalings_log import ClassifierScalingsLog


class XLoraModel(nn.Module):
    def __init__(self, base: PreTrainedModel, config: XLoraConfig, scalings_log_size: int = 1024):
        super().__init__()
        if not isinstance(config, XLoraConfig):
            raise TypeError(f"config must be an XLoraConfig, got {type(config).__name__}")
        base_hidden = getattr(base.config, "hidden_size", config.hidden_size)
        if base_hidden != config.hidden_size:
            raise ValueError(f"hidden_size is {config.hidden_size} but the base model's is {base_hidden}")
        self.config = config
        self.base = base
        if base.config._attn_implementation == "sdpa":  # the same, row by row in cached steps, wider KV caches
            base.set_attn_implementation(ROW_SDPA)
        self.slot = ExpertWeightsSlot()
        experts = [read_expert(name, folder) for name, folder in config.adapters.items()]
        # A plain list: the fused layers are already registered as submodules of `base`.
        self._lora_layers: list[FusedLoraLinear] = attach_experts(base, experts, self.slot)
        # The rank columns of every fused layer, layer after layer: which layer, expert and scale each is.
        layers = self._lora_layers
        for name, parts in (
            ("layer_of_column", [torch.full_like(la.expert_of_column, la.layer_index) for la in layers]),
            ("expert_of_column", [la.expert_of_column for la in layers]),
            ("scale_of_column", [la.scale_of_column for la in layers]),
        ):
            self.register_buffer(name, torch.cat(parts), persistent=False)
        ref = next(base.parameters())
        self.classifier = XLoraClassifier(config, len(self._lora_layers), len(experts)).to(ref.device, ref.dtype)
        # Every matmul computes each row alike for any number of rows (batch_invariant.py).
        use_row_invariant_linears(self.base, self.slot)
        use_row_invariant_linears(self.classifier, self.slot)
        self.scalings_log = ClassifierScalingsLog(scalings_log_size)
        # Scalings of the latest forward, prefill or whole generate: [batch, seq, layers, experts].
        self.latest_scalings: torch.Tensor | None = None
        self.freeze_after: int | None = None  # the default Routing.freeze_after (None = granular)
        self._compiled_step = None  # compile(): the one-token pass, compiled
        self._packaged_step = None  # use_packaged_step(): the one-token pass compiled ahead of time
        self._inductor_config: dict[str, Any] = {}
        self.freeze_experts()
        self.eval()

    # ---- what the model is -------------------------------------------------------------------
    @property
    def adapter_names(self) -> list[str]:
        return list(self.config.adapters)

    @property
    def n_lora_layers(self) -> int:
        return len(self._lora_layers)

    @property
    def lora_layers(self) -> list[FusedLoraLinear]:
        return list(self._lora_layers)

    @property
    def device(self) -> torch.device:
        return next(self.classifier.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.classifier.parameters()).dtype

    @property
    def kv_dtype(self) -> torch.dtype:
        """The dtype of the KV caches: float32 on CPU (torch's CPU attention is much slower in bf16 or
        fp16 at decode), the model's elsewhere or when the base model's attention cannot read it."""
        if self.device.type == "cpu" and self.base.config._attn_implementation == ROW_SDPA:
            return torch.float32
        return self.dtype

    @property
    def routing(self) -> Routing:
        """The default routing of requests that bring none."""
        return Routing(self.config.top_k_lora, self.config.global_scaling_weight, self.freeze_after)

    def freeze_experts(self) -> None:
        """Only the classifier trains, unless use_trainable_adapters (then the experts too)."""
        for param in self.base.parameters():
            param.requires_grad = False
        for layer in self._lora_layers:
            layer.lora_A.requires_grad = layer.lora_B.requires_grad = self.config.use_trainable_adapters

    # ---- run-time settings (as peft's XLoraModel) ----------------------------------------------
    def set_topk_lora(self, value: int | None) -> None:
        check_top_k(value, self.config.n_adapters)
        self.config.top_k_lora = value

    def set_global_scaling_weight(self, weight: float) -> None:
        check_global_scaling_weight(weight)
        self.config.global_scaling_weight = float(weight)

    def set_freeze_after(self, value: int | None) -> None:
        """Default for generation: freeze the scalings after this many generated tokens (None = granular)."""
        check_freeze_after(value)
        self.freeze_after = value

    def get_global_scaling_weight(self) -> float:
        return self.config.global_scaling_weight

    def set_scaling_pass_value(self, value: float | None) -> None:
        """None means 1 / n_experts, as in peft."""
        self.config.scaling_pass_value = 1 / self.config.n_adapters if value is None else float(value)
        self.config.validate()

    @property
    def compiled(self) -> bool:
        """Whether decode steps run the compiled one-token pass (compile() or use_packaged_step())."""
        return self._compiled_step is not None or self._packaged_step is not None

    def use_packaged_step(self, step: Any) -> None:
        """Run decode steps with a `compiled_step.PackagedStep` (the one-token pass compiled ahead of time;
        None: eager again). Steps it does not run (larger batches) stay eager."""
        self._packaged_step = step

    def compile(self, enabled: bool = True) -> None:
        """Compile the one-token pass that every decode step runs (both passes use it), with inductor.

        The weights are frozen into the graph; on CPU the matmuls use inductor's autotuned C++ GEMM
        kernels, which stream a step's weights faster than eager torch's GEMV. Prefill and training stay
        eager. The compilation itself happens on the first steps, and again for a new batch size until
        torch treats the size as dynamic (README "Compiled decoding"). `enabled=False`: eager again."""
        if not enabled:
            self._compiled_step = None
            return
        import torch._inductor.config  # noqa: F401  (makes torch._inductor.config reachable in _backbone)

        self._inductor_config = {"freezing": True}
        if self.device.type == "cpu":
            self._inductor_config |= {"max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"}
        self._compiled_step = torch.compile(self._one_token_pass)

    # ---- scalings inspection -------------------------------------------------------------------
    def get_latest_scalings(self) -> torch.Tensor | None:
        """Scalings of the latest forward, prefill or whole generate: [batch, seq, layers, experts]."""
        return self.latest_scalings

    def enable_scalings_logging(self) -> None:
        self.scalings_log.enabled = True

    def disable_scalings_logging(self) -> None:
        self.scalings_log.enabled = False

    def get_scalings_log(self) -> list[torch.Tensor]:
        return self.scalings_log.entries()

    def get_bucketed_scalings_log(self) -> dict[int, tuple[list[int], list[torch.Tensor]]]:
        return self.scalings_log.bucketed()

    def clear_scalings_log(self) -> None:
        self.scalings_log.clear()

    # ---- the two passes ------------------------------------------------------------------------
    def _backbone(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        cache: DynamicCache | None,
        weights: torch.Tensor | None,
        spans: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden states after the final norm, with the experts weighted by `weights` (None: off). `spans`
        (batch_invariant's row spans) has attention run row by row, as for each row alone (cached steps)."""
        # A one-token step: every layer's rank-column weights in one gather (ExpertWeightsSlot.columns).
        # Longer passes gather per layer, so no [batch, seq, all columns] tensor is ever held.
        if input_ids.shape[1] == 1:
            columns = None
            if weights is not None:
                columns = weights[:, :, self.layer_of_column, self.expert_of_column] * self.scale_of_column
            packaged = self._packaged_step is not None and cache is not None and spans is not None
            if packaged and attention_mask is not None and not torch.is_grad_enabled():
                if columns is None:  # experts off: adding exact zeros gives the same numbers, in the same graph
                    columns = input_ids.new_zeros(*input_ids.shape, self.layer_of_column.numel(), dtype=self.dtype)
                hidden = self._packaged_step(input_ids, attention_mask, position_ids, cache, columns, spans)
                if hidden is not None:
                    return hidden
                columns = None if weights is None else columns
            if self._compiled_step is not None and not torch.is_grad_enabled():
                # Inductor's settings as a patch around the call (where compilation happens): torch 2.13
                # ignores `freezing` given as torch.compile(options=...), and unfrozen weights get no
                # C++ GEMM kernels.
                self.slot.inductor = True
                try:
                    with torch._inductor.config.patch(self._inductor_config):
                        return self._compiled_step(input_ids, attention_mask, position_ids, cache, columns, spans)
                finally:
                    self.slot.inductor = False
            return self._one_token_pass(input_ids, attention_mask, position_ids, cache, columns, spans)
        return self._per_token_pass(input_ids, attention_mask, position_ids, cache, weights, spans)

    def _per_token_pass(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        cache: DynamicCache | None,
        weights: torch.Tensor | None,
        spans: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The backbone with the experts weighted per token by `weights` [batch, seq, layers, experts]
        (None: off), each fused layer gathering its own columns: every pass but the one-token step."""
        self.slot.weights = weights
        try:
            return self._decoder(input_ids, attention_mask, position_ids, cache, spans)
        finally:
            self.slot.weights = None

    def _one_token_pass(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: DynamicCache | None,
        columns: torch.Tensor | None,
        spans: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One token per row through the backbone, the experts weighted by `columns` [batch, 1, all
        rank columns] (None: off). This is the step `compile()` compiles."""
        self.slot.columns = columns
        try:
            return self._decoder(input_ids, attention_mask, position_ids, cache, spans)
        finally:
            self.slot.columns = None

    def _decoder(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        cache: DynamicCache | None,
        spans: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The base model's decoder stack, with whatever expert weights the slot holds."""
        by_rows = {} if spans is None else {"row_spans": spans}  # read by batch_invariant.row_attention
        out = self.base.get_decoder()(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=cache is not None,
            **by_rows,
        )
        return out.last_hidden_state

    def _scaling_pass_weights(self, batch: int, seq: int, routing: Routing | list[Routing]) -> torch.Tensor | None:
        if self.config.scaling_pass_value == 0:
            return None  # every expert at 0 contributes exactly nothing: skip the LoRA matmuls
        dummy = self.classifier.dummy_scalings(batch, seq, self.device, self.dtype)
        return expert_weights(dummy, routing, self.config.enable_softmax_topk)

    def _resolve(self, routing: Routing | list[Routing] | None) -> Routing | list[Routing]:
        """The request's routing (or the model's default), checked against the number of experts."""
        routing = self.routing if routing is None else routing
        for r in routing if isinstance(routing, list) else [routing]:
            if not isinstance(r, Routing):
                raise TypeError(f"routing must be a Routing or a list of them, got {type(r).__name__}")
            r.validate(self.config.n_adapters)
        return routing

    def predict_scalings(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        routing: Routing | list[Routing] | None = None,
        cache: DynamicCache | None = None,
        spans: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Scaling pass, then the classifier: scalings [batch, seq, n_lora_layers, n_experts].
        The routing matters only when scaling_pass_value is not 0 (top-k and the global weight apply
        to the scaling pass's experts too, as in peft)."""
        batch, seq = input_ids.shape
        with torch.no_grad():  # as peft: the classifier learns through the real pass only
            dummy = self._scaling_pass_weights(batch, seq, self.routing if routing is None else routing)
            hidden = self._backbone(input_ids, attention_mask, position_ids, cache, dummy, spans)
        scalings = self.classifier(hidden)
        self.scalings_log.record(scalings)
        return scalings

    def real_pass(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        scalings: torch.Tensor,
        routing: Routing | list[Routing],
        cache: DynamicCache | None = None,
        spans: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The backbone with the experts mixed by `scalings` (after top-k and the global weight)."""
        weights = expert_weights(scalings, routing, self.config.enable_softmax_topk)
        return self._backbone(input_ids, attention_mask, position_ids, cache, weights, spans)

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        routing: Routing | list[Routing] | None = None,
        scalings: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Both passes over the whole sequence, no cache, no LM head: (hidden states, scalings).
        Given `scalings`, the scaling pass is skipped and those are applied. Training uses it to run
        the LM head only where there are labels."""
        routing = self._resolve(routing)
        if scalings is None:
            scalings = self.predict_scalings(input_ids, attention_mask, position_ids, routing)
        hidden = self.real_pass(input_ids, attention_mask, position_ids, scalings, routing)
        self.latest_scalings = scalings
        return hidden, scalings

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        routing: Routing | list[Routing] | None = None,
        scalings: torch.Tensor | None = None,
        **_: Any,
    ) -> CausalLMOutputWithPast:
        """Both passes over the whole sequence, no cache; logits for every position, loss with labels.
        `scalings` [batch, seq, layers, experts], if given, replace the classifier's."""
        hidden, _ = self.hidden_states(input_ids, attention_mask, position_ids, routing, scalings)
        logits = self.base.get_output_embeddings()(hidden)
        loss = None
        if labels is not None:
            loss = self.base.loss_function(logits=logits, labels=labels, vocab_size=logits.shape[-1])
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    # ---- cached steps, for the decode engine (engine.DecodeBatch) ------------------------------
    @torch.inference_mode()
    def prefill(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        routing: Routing | list[Routing] | None = None,
        all_positions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, XLoraCache]:
        """Run a (left-padded) prompt batch. Returns (next-token logits [batch, vocab] in float32,
        scalings [batch, seq, layers, experts], the new cache, every row granular). With `all_positions`,
        the logits are every position's [batch, seq, vocab] (to score the prompt itself)."""
        routing = self._resolve(routing)
        input_ids = input_ids.to(self.device)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(self.device)
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        config = self.base.config
        kv = self.kv_dtype
        cache = XLoraCache(growing_cache(config, kv), growing_cache(config, kv), mask.long())
        spans = left_padded_spans(mask, input_ids.shape[1])
        scalings = self.predict_scalings(input_ids, cache.attention_mask, positions, routing, cache.scaling, spans)
        hidden = self.real_pass(input_ids, cache.attention_mask, positions, scalings, routing, cache.real, spans)
        logits = self.base.get_output_embeddings()(hidden if all_positions else hidden[:, -1]).float()
        self.latest_scalings = scalings
        return logits, scalings, cache

    @torch.inference_mode()
    def decode(
        self, next_tokens: torch.Tensor, cache: XLoraCache, routing: Routing | list[Routing] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One new token per row ([batch]); extends `cache` in place. Granular rows run the scaling pass
        (on their own scaling-cache rows); frozen rows reuse their frozen scalings and skip it.
        Returns (logits [batch, vocab], scalings [batch, 1, layers, experts]). The routing is not checked
        again here: prefill checked it."""
        routing = self.routing if routing is None else routing
        positions = cache.next_positions()
        cache.reserve(1)  # any reallocation happens here, so the step itself only writes in place
        ones = torch.ones_like(cache.attention_mask[:, :1])
        cache.attention_mask = torch.cat([cache.attention_mask, ones], dim=1)
        tokens = next_tokens.to(self.device).view(-1, 1)
        spans = left_padded_spans(cache.attention_mask, 1)
        scalings = self._step_scalings(tokens, positions, cache, routing, spans)
        hidden = self.real_pass(tokens, cache.attention_mask, positions, scalings, routing, cache.real, spans)
        logits = self.base.get_output_embeddings()(hidden[:, -1]).float()
        return logits, scalings

    @torch.inference_mode()
    def decode_and_prefill(
        self, next_tokens: torch.Tensor, cache: XLoraCache, prompts: list[list[int]], routing: list[Routing]
    ) -> tuple[torch.Tensor, list[torch.Tensor], XLoraCache]:
        """One decode step for the rows of `cache` and the prefill of new rows (`prompts`) in the same two
        passes, all new tokens in one ragged row (`cache.RaggedRows`). `routing`: one per row, the cache's
        rows first. Returns (logits [rows, vocab] in float32, each row's scalings [its new tokens, layers,
        experts], a new cache of every row: the cache's, then the newcomers). `cache` is only read, so
        if this fails the batch can go on without the newcomers."""
        routing = self._resolve(routing)
        device, old = self.device, cache.batch_size
        new = [1] * old + [len(p) for p in prompts]
        cached = cache.attention_mask.sum(dim=1).tolist() + [0] * len(prompts)
        ids = torch.tensor([*next_tokens.tolist(), *(t for p in prompts for t in p)], device=device).view(1, -1)
        starts = [cache.next_positions().view(-1), *(torch.arange(len(p), device=device) for p in prompts)]
        positions = torch.cat(starts).view(1, -1)
        real = RaggedRows(cached, new, device)
        config, kv = self.base.config, self.kv_dtype
        width = max(c + n for c, n in zip(cached, new, strict=True))

        # Scaling pass: the granular rows, the newcomers among them; frozen rows keep their scalings.
        frozen = cache.frozen + [None] * len(prompts)
        granular = [r for r, f in enumerate(frozen) if f is None]
        shape = (1, ids.shape[1], self.n_lora_layers, self.config.n_adapters)
        scalings = torch.zeros(shape, device=device, dtype=self.dtype)
        for r, f in enumerate(frozen):
            if f is not None:
                scalings[0, real.token_row == r] = f
        scaling_cache = None
        if granular:
            sub = RaggedRows([cached[r] for r in granular], [new[r] for r in granular], device)
            take = torch.isin(real.token_row, torch.tensor(granular, device=device))
            flat = sub.flatten(cache.scaling, cache.attention_mask[cache.granular_rows()], growing_cache(config, kv))
            dummy = None
            if self.config.scaling_pass_value != 0:
                dummy = self.classifier.dummy_scalings(1, int(take.sum()), device, self.dtype)
                dummy = self._ragged_weights(dummy, sub, [routing[r] for r in granular])
            # Not _backbone: a ragged row of one token is no one-token step (its mask is 4D, its cache batch 1).
            spans = ragged_spans(sub.cached, sub.new)
            hidden = self._per_token_pass(ids[:, take], sub.attention_mask(), positions[:, take], flat, dummy, spans)
            scalings[:, take] = self.classifier(hidden)
            self.scalings_log.record(scalings[:, take])
            scaling_cache = growing_cache(config, kv)
            sub.unflatten(flat, scaling_cache, width)

        # Real pass: every row.
        flat = real.flatten(cache.real, cache.attention_mask, growing_cache(config, kv))
        weights = self._ragged_weights(scalings, real, routing)
        spans = ragged_spans(real.cached, real.new)
        hidden = self._per_token_pass(ids, real.attention_mask(), positions, flat, weights, spans)
        last = torch.tensor(new, device=device).cumsum(0) - 1
        logits = self.base.get_output_embeddings()(hidden[0, last]).float()
        real_cache = growing_cache(config, kv)
        mask = real.unflatten(flat, real_cache, width)
        joined = XLoraCache(scaling_cache, real_cache, mask, frozen)
        return logits, list(scalings[0].split(new)), joined

    def _ragged_weights(self, scalings: torch.Tensor, rows: RaggedRows, routing: list[Routing]) -> torch.Tensor:
        """expert_weights for a ragged row [1, tokens, layers, experts]: each row's tokens with its routing."""
        parts = scalings.split(rows.new, dim=1)
        softmax = self.config.enable_softmax_topk
        return torch.cat([expert_weights(p, r, softmax) for p, r in zip(parts, routing, strict=True)], dim=1)

    def _step_scalings(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        cache: XLoraCache,
        routing: Routing | list[Routing],
        spans: torch.Tensor,
    ) -> torch.Tensor:
        """Scalings [batch, 1, layers, experts] of one decode step: the classifier's for the granular rows
        (a scaling pass over their own scaling-cache rows), the frozen ones for the others. `spans`: the
        step's row spans, of every row."""
        granular = cache.granular_rows()
        if len(granular) == cache.batch_size:
            return self.predict_scalings(tokens, cache.attention_mask, positions, routing, cache.scaling, spans)
        shape = (self.n_lora_layers, self.config.n_adapters)
        none = torch.zeros(shape, device=self.device, dtype=self.dtype)
        scalings = torch.stack([none if f is None else f for f in cache.frozen]).unsqueeze(1)
        if granular:
            index = torch.tensor(granular, device=self.device)
            subset = [routing[i] for i in granular] if isinstance(routing, list) else routing
            mask = cache.attention_mask[index]
            sub_spans = left_padded_spans(mask, 1)
            scalings[index] = self.predict_scalings(
                tokens[index], mask, positions[index], subset, cache.scaling, sub_spans
            )
        return scalings

    # ---- generation and checkpoints live in their own modules ----------------------------------
    def generate(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any
    ) -> torch.Tensor:
        """Token ids like transformers' generate: each prompt followed by its new tokens (see generation.generate)."""
        from .generation import generate

        return generate(self, input_ids, attention_mask, **kwargs)

    def stream(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any):
        """Yield each new token with its scalings as it is produced (see generation.stream)."""
        from .generation import stream

        return stream(self, input_ids, attention_mask, **kwargs)

    def save_pretrained(self, folder: str | Path) -> None:
        from .checkpoint import save_checkpoint

        save_checkpoint(self, folder)

    @classmethod
    def from_pretrained(
        cls,
        base: PreTrainedModel,
        folder: str | Path,
        adapters: dict[str, str] | None = None,
        ordering: str | Path | None = None,
        allow_pickle: bool = False,
        revision: str | None = None,
        **overrides: Any,
    ) -> XLoraModel:
        """Load a checkpoint as save_pretrained (ours or peft's) or the xlora library wrote it (detected).
        `folder` and `adapters`' folders may be Hugging Face Hub ids (`org/name[@revision]`; `revision` is the
        checkpoint's); `adapters` overrides the experts' folders; `ordering` is a mistral.rs ordering file the
        checkpoint must agree with; `allow_pickle` reads the library's xlora_classifier.pt (see checkpoint.py)."""
        from .checkpoint import load_checkpoint

        return load_checkpoint(
            cls, base, folder, adapters=adapters, ordering=ordering, allow_pickle=allow_pickle, revision=revision,
            **overrides,
        )
