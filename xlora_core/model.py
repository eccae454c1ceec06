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

from .cache import XLoraCache
from .classifier import Routing, XLoraClassifier, expert_weights
from .config import XLoraConfig, check_global_scaling_weight, check_top_k
from .lora import ExpertWeightsSlot, FusedLoraLinear, attach_experts, read_expert
from .scalings_log import ScalingsLog


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
        self.slot = ExpertWeightsSlot()
        experts = [read_expert(name, folder) for name, folder in config.adapters.items()]
        # A plain list: the fused layers are already registered as submodules of `base`.
        self._lora_layers: list[FusedLoraLinear] = attach_experts(base, experts, self.slot)
        ref = next(base.parameters())
        self.classifier = XLoraClassifier(config, len(self._lora_layers), len(experts)).to(ref.device, ref.dtype)
        self.scalings_log = ScalingsLog(scalings_log_size)
        self._latest_scalings: torch.Tensor | None = None
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
    def routing(self) -> Routing:
        return Routing(self.config.top_k_lora, self.config.global_scaling_weight)

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

    def get_global_scaling_weight(self) -> float:
        return self.config.global_scaling_weight

    def set_scaling_pass_value(self, value: float | None) -> None:
        """None means 1 / n_experts, as in peft."""
        self.config.scaling_pass_value = 1 / self.config.n_adapters if value is None else float(value)
        self.config.validate()

    # ---- scalings inspection -------------------------------------------------------------------
    def get_latest_scalings(self) -> torch.Tensor | None:
        """Scalings of the latest forward (or of the whole latest generate): [batch, seq, layers, experts]."""
        return self._latest_scalings

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
    ) -> torch.Tensor:
        """Hidden states after the final norm, with the experts weighted by `weights` (None: off)."""
        self.slot.weights = weights
        try:
            out = self.base.get_decoder()(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache,
                use_cache=cache is not None,
            )
        finally:
            self.slot.weights = None
        return out.last_hidden_state

    def _scaling_pass_weights(self, batch: int, seq: int, routing: Routing | list[Routing]) -> torch.Tensor | None:
        if self.config.scaling_pass_value == 0:
            return None  # every expert at 0 contributes exactly nothing: skip the LoRA matmuls
        dummy = self.classifier.dummy_scalings(batch, seq, self.device, self.dtype)
        return expert_weights(dummy, routing, self.config.enable_softmax_topk)

    def _two_passes(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        routing: Routing | list[Routing] | None,
        cache: XLoraCache | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scaling pass, classifier, real pass. Returns (hidden states of the real pass, scalings)."""
        routing = self.routing if routing is None else routing
        batch, seq = input_ids.shape
        with torch.no_grad():  # as peft: the classifier learns through the real pass only
            dummy = self._scaling_pass_weights(batch, seq, routing)
            hidden = self._backbone(input_ids, attention_mask, position_ids, cache.scaling if cache else None, dummy)
        scalings = self.classifier(hidden)
        self.scalings_log.record(scalings)
        weights = expert_weights(scalings, routing, self.config.enable_softmax_topk)
        hidden = self._backbone(input_ids, attention_mask, position_ids, cache.real if cache else None, weights)
        return hidden, scalings

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        routing: Routing | list[Routing] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Both passes over the whole sequence, no cache, no LM head: (hidden states, scalings).
        Training uses it to run the LM head only where there are labels."""
        hidden, scalings = self._two_passes(input_ids, attention_mask, position_ids, routing, cache=None)
        self._latest_scalings = scalings
        return hidden, scalings

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        routing: Routing | list[Routing] | None = None,
        **_: Any,
    ) -> CausalLMOutputWithPast:
        """Both passes over the whole sequence, no cache; logits for every position, loss with labels."""
        hidden, _ = self.hidden_states(input_ids, attention_mask, position_ids, routing)
        logits = self.base.get_output_embeddings()(hidden)
        loss = None
        if labels is not None:
            loss = self.base.loss_function(logits=logits, labels=labels, vocab_size=logits.shape[-1])
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    # ---- cached steps, for generation and the server's scheduler -------------------------------
    @torch.inference_mode()
    def prefill(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        routing: Routing | list[Routing] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, XLoraCache]:
        """Run a (left-padded) prompt batch. Returns (next-token logits [batch, vocab] in float32,
        scalings [batch, seq, layers, experts], the new cache)."""
        input_ids = input_ids.to(self.device)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(self.device)
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        config = self.base.config
        cache = XLoraCache(DynamicCache(config=config), DynamicCache(config=config), mask.long())
        hidden, scalings = self._two_passes(input_ids, cache.attention_mask, positions, routing, cache)
        logits = self.base.get_output_embeddings()(hidden[:, -1]).float()
        self._latest_scalings = scalings
        return logits, scalings, cache

    @torch.inference_mode()
    def decode(
        self, next_tokens: torch.Tensor, cache: XLoraCache, routing: Routing | list[Routing] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One new token per row ([batch]); extends `cache` in place. Returns (logits [batch, vocab], scalings
        [batch, 1, layers, experts])."""
        positions = cache.next_positions()
        ones = torch.ones_like(cache.attention_mask[:, :1])
        cache.attention_mask = torch.cat([cache.attention_mask, ones], dim=1)
        tokens = next_tokens.to(self.device).view(-1, 1)
        hidden, scalings = self._two_passes(tokens, cache.attention_mask, positions, routing, cache)
        logits = self.base.get_output_embeddings()(hidden[:, -1]).float()
        return logits, scalings

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
        **overrides: Any,
    ) -> XLoraModel:
        """Load a checkpoint as save_pretrained (ours or peft's) or the xlora library wrote it (detected).
        `adapters` overrides the experts' folders; `ordering` is a mistral.rs ordering file the checkpoint
        must agree with; `allow_pickle` reads the library's xlora_classifier.pt (see checkpoint.py)."""
        from .checkpoint import load_checkpoint

        return load_checkpoint(
            cls, base, folder, adapters=adapters, ordering=ordering, allow_pickle=allow_pickle, **overrides
        )
