"""XLoraModel: a Hugging Face causal LM, its LoRA experts, and the classifier that routes between them.

Every step is two passes of the same backbone:
  1. scaling pass: every expert weighted by `scaling_pass_value` (0: experts off), hidden states only;
  2. the classifier turns those hidden states into scalings [batch, seq, n_lora_layers, n_experts];
  3. real pass: the experts weighted by the scalings (after top-k and the global weight), then the LM head.
For generation each pass keeps its own KV cache (`XLoraCache`), so a new token costs two one-token passes.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from . import batch_invariant, native
from .batch_invariant import ROW_SDPA, left_padded_spans, ragged_spans, use_row_invariant_linears
from .cache import RaggedRows, XLoraCache, growing_cache
from .classifier import Routing, XLoraClassifier, expert_weights
from .config import ParameterError, XLoraConfig, check_freeze_after, check_global_scaling_weight, check_top_k
from .hosted import ExpertLimitError, HostedModel, Kind, ModelNameTaken, PendingModel
from .lora import (
    ExpertWeightsSlot,
    FusedLoraLinear,
    attach_experts,
    check_experts_fit,
    expert_identity,
    extend_experts,
    number_columns,
    read_expert,
)
from .quantize import QuantizedLinear
from .scalings_log import ClassifierScalingsLog

log = logging.getLogger("xlora.model")


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
            if base.device.type == "cpu":
                native.load()  # its C++ kernel for decode steps: built now (once per machine), not in a request
        self.slot = ExpertWeightsSlot()
        experts = [read_expert(name, folder) for name, folder in config.adapters.items()]
        # A plain list: the fused layers are already registered as submodules of `base`.
        self._lora_layers: list[FusedLoraLinear] = attach_experts(base, experts, self.slot)
        self._index_columns()
        ref = next(base.parameters())
        self.classifier = XLoraClassifier(config, len(self._lora_layers), len(experts)).to(ref.device, ref.dtype)
        # The models served over this base (hosted.py): this X-LoRA model, named `name`, and any added.
        self.name = "default"
        self._expert_files = [expert_identity(e) for e in experts]  # every expert loaded, by global index
        n_layers = len(self._lora_layers)
        self.primary = HostedModel(self.name, "xlora", list(config.adapters), list(range(len(experts))),
                                   list(range(n_layers)), self.classifier, config)  # fmt: skip
        self.hosted: dict[str, HostedModel] = {}
        self._routers = nn.ModuleDict()  # the added X-LoRA models' classifiers (moved with .to())
        # Held while the module tree changes (attach, remove) or is read off the model thread (read_model).
        self._structure = threading.Lock()
        # Every matmul computes each row alike for any number of rows (batch_invariant.py).
        use_row_invariant_linears(self.base, self.slot)
        use_row_invariant_linears(self.classifier, self.slot)
        for layer in self.base.modules():  # a quantized base (quantize.py): its layers read the slot too
            if isinstance(layer, QuantizedLinear):
                layer.slot = self.slot
        self.scalings_log = ClassifierScalingsLog(scalings_log_size)
        # Scalings of the latest forward, prefill or whole generate: [batch, seq, layers, experts].
        self.latest_scalings: torch.Tensor | None = None
        self.freeze_after: int | None = None  # the default Routing.freeze_after (None = granular)
        self._compiled_step = None  # compile(): the one-token pass, compiled
        self._packaged_step = None  # use_packaged_step(): the one-token pass compiled ahead of time
        self._experts_changed = False  # since construction (add_*, remove): no package fits any more
        self._inductor_config: dict[str, Any] = {}
        self.freeze_experts()
        self.eval()

    def __getstate__(self) -> dict[str, Any]:
        """What pickling keeps: all but the lock and the compiled steps, which cannot be pickled (the package
        build hands the model to its part compilers this way: compiled_step.PartCompiler)."""
        return {**self.__dict__, "_structure": None, "_compiled_step": None, "_packaged_step": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._structure = threading.Lock()

    def _index_columns(self) -> None:
        """The rank columns of every fused layer, layer after layer: which layer, expert and scale each is."""
        layers = self._lora_layers
        for name, parts in (
            ("layer_of_column", [torch.full_like(la.expert_of_column, la.layer_index) for la in layers]),
            ("expert_of_column", [la.expert_of_column for la in layers]),
            ("scale_of_column", [la.scale_of_column for la in layers]),
        ):
            self.register_buffer(name, torch.cat(parts), persistent=False)

    # ---- the models served over this base (hosted.py) ----------------------------------------
    def models(self) -> list[HostedModel]:
        """Every model requests may name: this X-LoRA model first, then the added ones in order."""
        self.primary.name = self.name
        return [self.primary, *self.hosted.values()]

    def hosted_model(self, name: str | None) -> HostedModel:
        """The model of this name (None: this X-LoRA model); KeyError if none."""
        if name is None or name == self.name:
            return self.primary
        return self.hosted[name]

    def routing_of(self, name: str | None) -> Routing:
        """The default routing of a model's requests."""
        model = self.hosted_model(name)
        return self.routing if model is self.primary else model.routing()

    @property
    def n_experts_loaded(self) -> int:
        return len(self._expert_files)

    def add_xlora(
        self, name: str, folder: str | Path, adapters: dict[str, str] | None = None, max_experts: int | None = None
    ) -> HostedModel:
        """Serve another X-LoRA checkpoint over this base, as `name`; an expert it shares with a model loaded
        already (the same matrices, expert_identity) is not loaded again."""
        return self.attach(self.read_model(name, "xlora", folder, adapters), max_experts)

    def add_adapter(self, name: str, folder: str | Path, max_experts: int | None = None) -> HostedModel:
        """Serve a plain PEFT LoRA adapter over this base, as `name` (the mixture {name: 1})."""
        return self.attach(self.read_model(name, "adapter", folder), max_experts)

    def add_base(self, name: str) -> HostedModel:
        """Serve the base model itself, no expert, as `name`."""
        return self.attach(self.read_model(name, "base"))

    def read_model(
        self, name: str, kind: Kind, folder: str | Path | None = None, adapters: dict[str, str] | None = None
    ) -> PendingModel:
        """Read a model's files and check them against the base, changing nothing (a server does this off its
        model thread, then `attach`es between steps). Raises ExpertError, CheckpointError or ValueError."""
        from .checkpoint import read_checkpoint
        from .stored import check_classifier

        self._check_new_name(name)
        if kind == "base":
            return PendingModel(name, kind, [])
        if kind == "adapter":
            experts = [read_expert(name, folder)]
            with self._structure:
                check_experts_fit(self.base, experts)
            return PendingModel(name, kind, experts)
        stored = read_checkpoint(folder, adapters=adapters)
        if stored.config.hidden_size != self.config.hidden_size:
            raise ValueError(f"{stored.config_path}: hidden_size is {stored.config.hidden_size}, the base's "
                             f"{self.config.hidden_size}")  # fmt: skip
        experts = [read_expert(n, f) for n, f in stored.config.adapters.items()]
        with self._structure:
            n_layers = len(check_experts_fit(self.base, experts))  # as peft: one LoRA layer per targeted module
        classifier = XLoraClassifier(stored.config, n_layers, len(experts))
        check_classifier(stored, classifier.state_dict(), n_layers)
        classifier.load_state_dict(stored.classifier)
        return PendingModel(name, kind, experts, classifier.eval(), stored.config)

    def attach(self, pending: PendingModel, max_experts: int | None = None) -> HostedModel:
        """Serve a model read by `read_model` (between steps: the fused layers change). Its experts already
        loaded (the same matrices) are shared; ExpertLimitError if more than `max_experts` would be loaded."""
        with self._structure:
            return self._attach(pending, max_experts)

    def _attach(self, pending: PendingModel, max_experts: int | None) -> HostedModel:
        self._check_new_name(pending.name)
        indices, new = [], []
        for expert in pending.experts:
            identity = expert_identity(expert)
            known = [i for i, f in enumerate(self._expert_files) if f == identity]
            indices.append(known[0] if known else self.n_experts_loaded + len(new))
            if not known:
                new.append(expert)
        if max_experts is not None and self.n_experts_loaded + len(new) > max_experts:
            raise ExpertLimitError(f"{pending.name!r} would load {len(new)} more expert(s) onto "
                                   f"{self.n_experts_loaded}; at most {max_experts} may be loaded")  # fmt: skip
        if new:
            self._weights_changed("experts were added")
            first = self.n_experts_loaded
            self._lora_layers = extend_experts(self.base, self._lora_layers, list(enumerate(new, first)), self.slot)
            self._expert_files += [expert_identity(e) for e in new]
            self._index_columns()
            self.freeze_experts()
        classifier = pending.classifier
        if classifier is not None:
            classifier.to(self.device, self.dtype)
            use_row_invariant_linears(classifier, self.slot)
            self._routers[pending.name] = classifier
        names = [e.name for e in pending.experts]
        model = HostedModel(pending.name, pending.kind, names, indices, self._layers_of(indices), classifier,
                            pending.config)  # fmt: skip
        self.hosted[pending.name] = model
        return model

    def remove(self, name: str) -> tuple[list[int], list[int]]:
        """Stop serving a model added to this one (between steps, no row of it running) and free its experts
        that no other model uses, and fused layers left without columns. Returns the (layers, experts) kept, by
        their old global index, for scalings held elsewhere (XLoraCache.frozen) to follow."""
        with self._structure:
            return self._remove(name)

    def _remove(self, name: str) -> tuple[list[int], list[int]]:
        if name not in self.hosted:
            raise KeyError(name)
        del self.hosted[name]
        if name in self._routers:
            del self._routers[name]
        used = set(self.primary.experts).union(*(m.experts for m in self.hosted.values()))
        experts = [e for e in range(self.n_experts_loaded) if e in used]
        if len(experts) < self.n_experts_loaded:
            self._weights_changed("experts were removed")
        renumber = {old: new for new, old in enumerate(experts)}
        for layer in self._lora_layers:
            layer.keep_experts(renumber)
        layers = [i for i, la in enumerate(self._lora_layers) if la.lora_A.shape[0] > 0]
        for i, layer in enumerate(self._lora_layers):
            if i not in layers:  # no expert left here: the plain Linear again
                parent_name, _, attr = self._module_name(layer).rpartition(".")
                setattr(self.base.get_submodule(parent_name) if parent_name else self.base, attr, layer.base_layer)
        self._lora_layers = [self._lora_layers[i] for i in layers]
        for new_index, layer in enumerate(self._lora_layers):
            layer.layer_index = new_index
        number_columns(self._lora_layers)
        self._expert_files = [self._expert_files[e] for e in experts]
        self._index_columns()
        layer_number = {old: new for new, old in enumerate(layers)}
        for model in [self.primary, *self.hosted.values()]:
            model.experts = [renumber[e] for e in model.experts]
            model.layers = [layer_number[i] for i in model.layers]
        return layers, experts

    def _module_name(self, module: nn.Module) -> str:
        return next(name for name, m in self.base.named_modules() if m is module)

    def _check_new_name(self, name: str) -> None:
        if not name or name == self.name or name in self.hosted:
            raise ModelNameTaken(f"the model name {name!r} is taken")

    def _layers_of(self, experts: list[int]) -> list[int]:
        """The global LoRA layers that these experts target, in the base's module order (peft's numbering)."""
        order = {id(m): i for i, m in enumerate(self.base.modules())}
        layers = [la for la in self._lora_layers if any(e in la.ranks for e in experts)]
        return [la.layer_index for la in sorted(layers, key=lambda la: order[id(la)])]

    def _plain(self, rows: list[Routing]) -> bool:
        """Whether these rows are this X-LoRA model's alone, with nothing else loaded: the single-model path."""
        return (
            not self.hosted or self.n_experts_loaded == self.config.n_adapters
            and len(self._lora_layers) == len(self.primary.layers)
        ) and all(r.weights is None and (r.model is None or r.model == self.name) for r in rows)

    def _fixed_scalings(self, routing: Routing) -> torch.Tensor | None:
        """The scalings [layers, experts] of a row that no classifier routes (its fixed weights), else None."""
        weights = self.hosted_model(routing.model).fixed(routing)
        if weights is None:
            return None
        out = torch.zeros(len(self._lora_layers), self.n_experts_loaded, device=self.device, dtype=self.dtype)
        for expert, w in weights.items():
            out[:, expert] = w
        return out

    def own_scalings(self, routing: Routing, scalings: torch.Tensor) -> torch.Tensor:
        """A row's scalings [..., layers, experts] as its model sees them (its layers and experts)."""
        if self._plain([routing]):
            return scalings
        return self.hosted_model(routing.model).own(scalings)

    def _by_model(self, rows: list[Routing]) -> dict[int, tuple[HostedModel, bool, list[int]]]:
        """Rows grouped by model and by whether a classifier routes them: id -> (model, fixed, row indices)."""
        groups: dict = {}
        for i, r in enumerate(rows):
            model = self.hosted_model(r.model)
            fixed = model.fixed(r) is not None
            groups.setdefault((id(model), fixed), (model, fixed, []))[2].append(i)
        return groups

    def _groups(
        self, rows: list[Routing], token_rows: torch.Tensor | None = None, scaling_pass: bool = False
    ) -> list[tuple[torch.Tensor | None, tuple[int, ...]]] | None:
        """ExpertWeightsSlot.groups for these rows: None on the single-model path. `token_rows`: the row of
        each token of a ragged pass (batch 1)."""
        if self._plain(rows):
            return None
        sets = [self.hosted_model(r.model).expert_set(r, scaling_pass) for r in rows]
        groups = []
        for experts in sorted(set(sets) - {()}):
            member = torch.tensor([s == experts for s in sets], device=self.device)
            if bool(member.all()):
                groups.append((None, experts))
                continue
            mask = member[token_rows].view(1, -1, 1) if token_rows is not None else member.view(-1, 1, 1)
            groups.append((mask.to(self.dtype), experts))
        return groups

    def _weights(self, scalings: torch.Tensor, routing: Routing | list[Routing], scaling_pass: bool = False):
        """expert_weights for rows of any models, on global scalings [batch, seq, layers, experts]: each
        model's rows with its own top-k and softmax over its own experts; fixed rows as they are (times the
        global weight)."""
        rows = routing if isinstance(routing, list) else [routing] * scalings.shape[0]
        if self._plain(rows):
            return expert_weights(scalings, routing, self.config.enable_softmax_topk)
        weights = torch.zeros_like(scalings)
        for model, fixed, idx in self._by_model(rows).values():
            subset = [rows[i] for i in idx]
            if fixed:
                weights[idx] = expert_weights(scalings[idx], subset, False)
            elif model.layers:
                own = expert_weights(model.own(scalings[idx]), subset, model.config.enable_softmax_topk)
                weights[idx] = model.to_global(own, *scalings.shape[2:])
        return weights

    def _classify(self, hidden: torch.Tensor, rows: list[Routing], token_rows: torch.Tensor | None = None):
        """Global scalings [batch, seq, layers, experts] from the scaling pass's hidden states: each row by
        its model's classifier, fixed rows their fixed scalings. `token_rows` as in `_groups`."""
        if self._plain(rows):
            scalings = self.classifier(hidden)
            self.scalings_log.record(scalings)
            return scalings
        batch, seq = hidden.shape[:2]
        shape = (len(self._lora_layers), self.n_experts_loaded)
        scalings = hidden.new_zeros(batch, seq, *shape)
        for model, fixed, idx in self._by_model(rows).values():
            member = torch.zeros(len(rows), dtype=torch.bool, device=hidden.device)
            member[idx] = True
            where = member[token_rows].view(1, -1) if token_rows is not None else member.view(-1, 1).expand(batch, seq)
            if fixed:
                for i in idx:
                    if token_rows is None:
                        scalings[i] = self._fixed_scalings(rows[i])
                    else:
                        scalings[0, token_rows == i] = self._fixed_scalings(rows[i])
                continue
            own = model.classifier(hidden[where].unsqueeze(0))
            if model is self.primary:
                self.scalings_log.record(own)
            scalings[where] = model.to_global(own, *shape)[0]
        return scalings

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
        None: eager again). Steps it does not run (larger batches) stay eager. A package holds the experts
        of when it was built: once experts are added or removed (add_*, remove), none is taken any more."""
        if step is not None and self._experts_changed:
            log.warning("not switching to the compiled decode step: experts were added or removed since it was built")
            return
        self._packaged_step = step

    def _weights_changed(self, why: str) -> None:
        """The fused layers' experts change: a package (its weights frozen in) no longer fits."""
        self._experts_changed = True
        if self._packaged_step is not None:
            log.warning("decoding eagerly from now on: %s, and the compiled decode step holds the old ones", why)
            self._packaged_step = None

    def compile(self, enabled: bool = True, mode: str | None = None) -> None:
        """Compile the one-token pass that every decode step runs (both passes use it), with inductor.

        The weights are frozen into the graph; on CPU the matmuls use the kernels the packaged step uses
        (`compiled_step.AUTOTUNE`: inductor's C++ GEMMs with AMX, benchmarked against aten's matmul, which
        takes the matmuls their template cannot, as a quantized base's; oneDNN's packed ones elsewhere), which
        stream a step's weights faster than eager torch's GEMV. Prefill and training stay
        eager. The compilation itself happens on the first steps, and again for a new batch size until
        torch treats the size as dynamic (README "Compiled decoding"). `enabled=False`: eager again.
        `mode`: torch.compile's (None: its default; "reduce-overhead" adds CUDA graphs on a GPU, measured by
        bench.cuda_check, not yet tried on one)."""
        if not enabled:
            self._compiled_step = None
            return
        import torch._inductor.config  # noqa: F401  (makes torch._inductor.config reachable in _backbone)

        from . import compiled_step

        # The package's kernels; with AMX aten's matmul beside the C++ GEMM, for any graph (a quantized base).
        autotune = "CPP,ATEN" if compiled_step.AUTOTUNE == "CPP" else compiled_step.AUTOTUNE
        self._inductor_config = compiled_step.inductor_configs(self, autotune)
        batch_invariant.measure_rows(list(self.parameters()))  # what the traced calls read (batch_invariant.linear)
        self._compiled_step = torch.compile(self._one_token_pass, mode=mode)

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
        groups: list | None = None,
    ) -> torch.Tensor:
        """Hidden states after the final norm, with the experts weighted by `weights` (None: off). `spans`
        (batch_invariant's row spans) has attention run row by row, as for each row alone (cached steps).
        `groups`: ExpertWeightsSlot.groups (rows of several models; such a step runs eagerly)."""
        self.slot.groups = groups
        try:
            return self._backbone_pass(input_ids, attention_mask, position_ids, cache, weights, spans)
        finally:
            self.slot.groups = None

    def _backbone_pass(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        cache: DynamicCache | None,
        weights: torch.Tensor | None,
        spans: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # A one-token step: every layer's rank-column weights in one gather (ExpertWeightsSlot.columns).
        # Longer passes gather per layer, so no [batch, seq, all columns] tensor is ever held.
        if input_ids.shape[1] == 1:
            columns = None
            if weights is not None:
                columns = weights[:, :, self.layer_of_column, self.expert_of_column] * self.scale_of_column
            packaged = self._packaged_step is not None and cache is not None and spans is not None
            packaged = packaged and self.slot.groups is None  # rows of several models: eager (groups)
            if packaged and attention_mask is not None and not torch.is_grad_enabled():
                if columns is None:  # experts off: adding exact zeros gives the same numbers, in the same graph
                    columns = input_ids.new_zeros(*input_ids.shape, self.layer_of_column.numel(), dtype=self.dtype)
                hidden = self._packaged_step(input_ids, attention_mask, position_ids, cache, columns, spans)
                if hidden is not None:
                    return hidden
                columns = None if weights is None else columns
            if self._compiled_step is not None and not torch.is_grad_enabled() and self.slot.groups is None:
                # Inductor's settings as a patch around the call (where compilation happens): torch 2.13
                # ignores `freezing` given as torch.compile(options=...), and unfrozen weights get no
                # C++ GEMM kernels.
                self.slot.inductor, self.slot.cpp_gemm = True, "max_autotune" in self._inductor_config
                try:
                    with torch._inductor.config.patch(self._inductor_config):
                        return self._compiled_step(input_ids, attention_mask, position_ids, cache, columns, spans)
                finally:
                    self.slot.inductor, self.slot.cpp_gemm = False, False
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
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: DynamicCache | None,
        columns: torch.Tensor | None,
        spans: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One token per row through the backbone, the experts weighted by `columns` [batch, 1, all
        rank columns] (None: off). This is the step `compile()` compiles. `inputs_embeds` instead of
        `input_ids`: hidden states to start from (a compiled_step part after the first)."""
        self.slot.columns = columns
        try:
            return self._decoder(input_ids, attention_mask, position_ids, cache, spans, inputs_embeds)
        finally:
            self.slot.columns = None

    def _decoder(
        self,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        cache: DynamicCache | None,
        spans: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The base model's decoder stack, with whatever expert weights the slot holds."""
        by_rows = {} if spans is None else {"row_spans": spans}  # read by batch_invariant.row_attention
        out = self.base.get_decoder()(
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=cache is not None,
            **by_rows,
        )
        return out.last_hidden_state

    def _scaling_pass_weights(self, batch: int, seq: int, routing: Routing | list[Routing]) -> torch.Tensor | None:
        rows = routing if isinstance(routing, list) else [routing] * batch
        if self._plain(rows):
            if self.config.scaling_pass_value == 0:
                return None  # every expert at 0 contributes exactly nothing: skip the LoRA matmuls
            dummy = self.classifier.dummy_scalings(batch, seq, self.device, self.dtype)
            return expert_weights(dummy, routing, self.config.enable_softmax_topk)
        models = [self.hosted_model(r.model) for r in rows]
        if all(m.kind != "xlora" or m.config.scaling_pass_value == 0 for m in models):
            return None
        dummy = torch.zeros(batch, seq, len(self._lora_layers), self.n_experts_loaded, device=self.device,
                            dtype=self.dtype)  # fmt: skip
        for i, (m, r) in enumerate(zip(models, rows, strict=True)):
            if m.kind == "xlora" and m.config.scaling_pass_value != 0:
                own = m.classifier.dummy_scalings(1, seq, self.device, self.dtype)
                dummy[i] = m.to_global(expert_weights(own, r, m.config.enable_softmax_topk), *dummy.shape[2:])[0]
        return dummy

    def _resolve(self, routing: Routing | list[Routing] | None) -> Routing | list[Routing]:
        """The request's routing (or the model's default), checked against the number of experts."""
        routing = self.routing if routing is None else routing
        for r in routing if isinstance(routing, list) else [routing]:
            self.check_routing(r)
        return routing

    def check_routing(self, routing: Routing) -> Routing:
        """Raise ParameterError naming the field if this routing does not fit its model; return it."""
        if not isinstance(routing, Routing):
            raise TypeError(f"routing must be a Routing or a list of them, got {type(routing).__name__}")
        try:
            model = self.hosted_model(routing.model)
        except KeyError:
            raise ParameterError("model", f"{routing.model!r} is not served here (models: "
                                 f"{', '.join(m.name for m in self.models())})") from None  # fmt: skip
        if model.kind != "xlora":
            for field_name in ("top_k", "freeze_after"):
                if getattr(routing, field_name) is not None:
                    raise ParameterError(field_name, f"does not apply to {model.name!r}, a {model.kind} with no router")
        return routing.validate(len(model.experts), model.expert_names)

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
        routing = self.routing if routing is None else routing
        rows = routing if isinstance(routing, list) else [routing] * batch
        with torch.no_grad():  # as peft: the classifier learns through the real pass only
            dummy = self._scaling_pass_weights(batch, seq, routing)
            groups = self._groups(rows, scaling_pass=True)
            hidden = self._backbone(input_ids, attention_mask, position_ids, cache, dummy, spans, groups)
        return self._classify(hidden, rows)

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
        weights = self._weights(scalings, routing)
        rows = routing if isinstance(routing, list) else [routing] * input_ids.shape[0]
        return self._backbone(input_ids, attention_mask, position_ids, cache, weights, spans, self._groups(rows))

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
        rows = routing if isinstance(routing, list) else [routing] * input_ids.shape[0]
        fixed = [self._fixed_scalings(r) for r in rows]  # rows no classifier routes: frozen from the start
        scaling_cache = growing_cache(config, kv) if any(f is None for f in fixed) else None
        cache = XLoraCache(scaling_cache, growing_cache(config, kv), mask.long(), fixed)
        spans = left_padded_spans(mask, input_ids.shape[1])
        scalings = self._step_scalings(input_ids, positions, cache, routing, spans)
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
        self, fed: list[list[int]], cache: XLoraCache | None, prompts: list[list[int]], routing: list[Routing]
    ) -> tuple[torch.Tensor, list[torch.Tensor], XLoraCache]:
        """One forward for rows that each add their own number of tokens, all new tokens in one ragged row
        (`cache.RaggedRows`), in the same two passes: the rows of `cache` add `fed` (one per row: a decoding
        row its last token, a row being prefilled in chunks the next chunk of its prompt), new rows begin
        with `prompts` (their whole prompt or its first chunk). `routing`: one per row, the cache's rows
        first. Returns (logits of each row's last new token [rows, vocab] in float32, each row's scalings [its
        new tokens, layers, experts], a new cache of every row: the cache's, then the new ones). `cache` (None:
        no rows yet) is only read, so if this fails the batch can go on as it was (but for one row alone,
        extended in place)."""
        routing = self._resolve(routing)
        device = self.device
        new = [len(f) for f in fed] + [len(p) for p in prompts]
        cached = ([] if cache is None else cache.attention_mask.sum(dim=1).tolist()) + [0] * len(prompts)
        ids = torch.tensor([t for part in (*fed, *prompts) for t in part], device=device).view(1, -1)
        positions = torch.cat([torch.arange(c, c + n) for c, n in zip(cached, new, strict=True)]).to(device)
        positions = positions.view(1, -1)
        real = RaggedRows(cached, new, device)
        config, kv = self.base.config, self.kv_dtype
        width = max(c + n for c, n in zip(cached, new, strict=True))

        # One granular row without padding (a long prompt fed chunk after chunk on its own): its cache already
        # has the ragged layout, and the forward extends it in place rather than copying it twice. Then a
        # failed forward leaves the row's cache half-extended: the row fails.
        in_place = (cache is None and len(prompts) == 1) or (
            cache is not None and not prompts and cache.batch_size == 1 and cache.frozen[0] is None
            and bool(cache.attention_mask.all())
        )  # fmt: skip

        # Scaling pass: the granular rows, the newcomers among them; frozen rows keep their scalings.
        frozen = ([] if cache is None else cache.frozen) + [self._fixed_scalings(r) for r in routing[len(fed) :]]
        granular = [r for r, f in enumerate(frozen) if f is None]
        shape = (1, ids.shape[1], self.n_lora_layers, self.n_experts_loaded)
        scalings = torch.zeros(shape, device=device, dtype=self.dtype)
        for r, f in enumerate(frozen):
            if f is not None:
                scalings[0, real.token_row == r] = f
        scaling_cache = None
        if granular:
            sub = RaggedRows([cached[r] for r in granular], [new[r] for r in granular], device)
            take = torch.isin(real.token_row, torch.tensor(granular, device=device))
            flat = cache.scaling if in_place and cache is not None else growing_cache(config, kv)
            if cache is not None and not in_place:
                sub.flatten(cache.scaling, cache.attention_mask[cache.granular_rows()], flat)
            sub_routing = [routing[r] for r in granular]
            dummy = None
            if self.config.scaling_pass_value != 0 or not self._plain(sub_routing):
                dummy = self._ragged_weights(None, sub, sub_routing, scaling_pass=True)
            # Not _backbone: a ragged row of one token is no one-token step (its mask is 4D, its cache batch 1).
            spans = ragged_spans(sub.cached, sub.new)
            self.slot.groups = self._groups(sub_routing, sub.token_row, scaling_pass=True)
            try:
                tokens = ids[:, take]
                hidden = self._per_token_pass(tokens, sub.attention_mask(), positions[:, take], flat, dummy, spans)
            finally:
                self.slot.groups = None
            scalings[:, take] = self._classify(hidden, sub_routing, sub.token_row)
            scaling_cache = flat if in_place else growing_cache(config, kv)
            if not in_place:
                sub.unflatten(flat, scaling_cache, width)

        # Real pass: every row.
        flat = cache.real if in_place and cache is not None else growing_cache(config, kv)
        if cache is not None and not in_place:
            real.flatten(cache.real, cache.attention_mask, flat)
        weights = self._ragged_weights(scalings, real, routing)
        spans = ragged_spans(real.cached, real.new)
        self.slot.groups = self._groups(routing, real.token_row)
        try:
            hidden = self._per_token_pass(ids, real.attention_mask(), positions, flat, weights, spans)
        finally:
            self.slot.groups = None
        last = torch.tensor(new, device=device).cumsum(0) - 1
        logits = self.base.get_output_embeddings()(hidden[0, last]).float()
        if in_place:
            mask = torch.ones((1, width), dtype=torch.long, device=device)
            return logits, [scalings[0]], XLoraCache(scaling_cache, flat, mask, frozen)
        real_cache = growing_cache(config, kv)
        mask = real.unflatten(flat, real_cache, width)
        joined = XLoraCache(scaling_cache, real_cache, mask, frozen)
        return logits, list(scalings[0].split(new)), joined

    def feeds_prompts_in_steps(self, routing: list[Routing]) -> bool:
        """Whether rows with this routing take their prompts in compiled steps (`decode_rows`): the packaged
        step is loaded, with our attention kernel, and the rows are this X-LoRA model's alone."""
        return self._packaged_step is not None and batch_invariant.ENABLED and native.load() and self._plain(routing)

    def rows_for_prompts(self, routing: list[Routing], width: int, cache: XLoraCache | None = None) -> XLoraCache:
        """Empty cache rows for prompts that `decode_rows` feeds, `width` columns of room each, a scaling-cache
        row for each row a classifier routes: `cache` with them added (consumed), or a cache of them alone."""
        frozen = [self._fixed_scalings(r) for r in self._resolve(routing)]
        if cache is not None:
            if width > cache.seq_len:
                cache = cache.padded(left=width - cache.seq_len)
            joined = cache.with_empty_rows(frozen)  # in the free rows of its buffers: no copy of its rows
            if joined is not None:
                return joined
        rows = XLoraCache.for_prompts(self.base.config, self.kv_dtype, self.device, width, frozen)
        return rows if cache is None else XLoraCache.concat([cache, rows])

    @torch.inference_mode()
    def decode_rows(
        self, fed: list[list[int]], cache: XLoraCache, routing: list[Routing], prompts: list[int | None]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One compiled step in which every token is a row of its own: each row of `cache` adds the tokens
        `fed[r]` (none, one or several). A decoding row (`prompts[r]` None) adds its last token at a new
        column, as in `decode`. A row being prefilled (`prompts[r]`: its prompt's length) adds the next tokens
        of its prompt in the columns before that one, which its prompt fills in order: its cache row holds its
        whole prompt's room, ending at the column where it will decode (`XLoraCache.for_prompts`; the gap
        between is padding). A token attends to its row's keys, its own prompt's written in the same step
        included, in the same C++ kernel call as a decode step: so it gets the same bits however its prompt is
        split over steps and whatever else is in the step, and the tokens of a batch's prompts ride in the
        running rows' compiled step instead of stopping them for an eager prefill. At most
        compiled_step.MAX_BATCH tokens in all (`feeds_prompts_in_steps` must hold). Returns (logits of each
        row's last token [rows, vocab] in float32, zeros for a row fed nothing; each row's scalings [its
        tokens, layers, experts]). If the step fails, the cache still holds what it held."""
        from .compiled_step import MAX_BATCH

        device, width = self.device, cache.seq_len
        mask = cache.attention_mask
        cached = mask.sum(dim=1).tolist()
        decoding = torch.tensor([p is None for p in prompts], dtype=mask.dtype, device=mask.device)
        new_mask = torch.cat([mask, decoding[:, None]], dim=1)
        row_spans = left_padded_spans(new_mask, 1)  # [3]: each row's first key
        token_row, token_column, token_start, positions, ids = [], [], [], [], []
        for r, (tokens, prompt) in enumerate(zip(fed, prompts, strict=True)):
            if prompt is None:  # decoding: at the new column, over every key of its row
                assert len(tokens) == 1, "a decoding row adds one token"
                begin, columns = None, [width]
            else:  # its prompt's room ends at the new column
                begin = int(row_spans[r, 3]) if cached[r] else width - prompt
                columns = list(range(begin + cached[r], begin + cached[r] + len(tokens)))
                assert not columns or columns[-1] < width, "the row has no room for its prompt"
            for i, (token, column) in enumerate(zip(tokens, columns, strict=True)):
                token_row.append(r)
                token_column.append(column)
                token_start.append(begin)  # None: the row's spans from its mask
                positions.append(cached[r] + i)
                ids.append(token)
        n = len(ids)
        if not 0 < n <= MAX_BATCH:
            raise ValueError(f"a step feeds 1 to {MAX_BATCH} tokens, not {n}")

        spans = []
        for r, column, begin in zip(token_row, token_column, token_start, strict=True):
            end = column + 1
            spans.append(row_spans[r].tolist() if begin is None else [r, 0, 1, begin, end, end, end])
        spans = torch.tensor(spans, dtype=torch.long)
        slots = torch.tensor([token_row, token_column], dtype=torch.long, device=device).T.contiguous()
        ids = torch.tensor(ids, dtype=torch.long, device=device).view(-1, 1)
        positions = torch.tensor(positions, dtype=torch.long, device=device).view(-1, 1)
        rows = [routing[r] for r in token_row]
        ones = torch.ones((n, width + 1), dtype=torch.long, device=device)  # read for its width only
        cache.reserve(1)

        # Scaling pass: the tokens of granular rows, on their rows of the scaling cache.
        shape = (n, 1, self.n_lora_layers, self.n_experts_loaded)
        scalings = torch.zeros(shape, device=device, dtype=self.dtype)
        in_scaling = {row: i for i, row in enumerate(cache.granular_rows())}
        granular = [i for i, r in enumerate(token_row) if r in in_scaling]
        for i, r in enumerate(token_row):
            if r not in in_scaling:
                scalings[i, 0] = cache.frozen[r]
        if granular:
            index = torch.tensor(granular, device=device)
            to_scaling = torch.tensor([in_scaling[token_row[i]] for i in granular])
            sub_spans = spans[granular].clone()
            sub_spans[:, 0] = to_scaling
            sub_slots = slots[index].clone()
            sub_slots[:, 0] = to_scaling.to(device)
            sub_rows = [rows[i] for i in granular]
            dummy = self._scaling_pass_weights(len(granular), 1, sub_rows)
            hidden = self._packaged_pass(ids[index], ones[index], positions[index], cache.scaling, dummy, sub_spans,
                                         sub_slots)  # fmt: skip
            scalings[index] = self._classify(hidden, sub_rows)

        # Real pass: every token. If it fails, the scaling cache forgets this step's column again.
        try:
            hidden = self._packaged_pass(ids, ones, positions, cache.real, self._weights(scalings, rows), spans,
                                         slots)  # fmt: skip
        except BaseException:
            for layer in cache.scaling.layers if granular else []:
                layer.length, layer.keys, layer.values = width, layer.keys[:, :, :width], layer.values[:, :, :width]
            raise
        counts = [len(tokens) for tokens in fed]
        last = [max(sum(counts[: r + 1]) - 1, 0) for r in range(len(fed))]
        logits = self.base.get_output_embeddings()(hidden[last, -1]).float()
        for r, count in enumerate(counts):
            if not count:
                logits[r] = 0
        prompt_columns = [(r, c) for r, c, b in zip(token_row, token_column, token_start, strict=True) if b is not None]
        if prompt_columns:
            where = torch.tensor(prompt_columns, dtype=torch.long, device=mask.device)
            new_mask[where[:, 0], where[:, 1]] = 1
        cache.attention_mask = new_mask
        return logits, list(scalings[:, 0].split(counts))

    def _packaged_pass(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        cache: DynamicCache,
        weights: torch.Tensor | None,
        spans: torch.Tensor,
        slots: torch.Tensor,
    ) -> torch.Tensor:
        """One pass of `decode_rows` through the packaged step: the experts weighted by `weights` [tokens, 1,
        layers, experts] (None: off, exact zeros)."""
        if weights is None:
            columns = ids.new_zeros(*ids.shape, self.layer_of_column.numel(), dtype=self.dtype)
        else:
            columns = weights[:, :, self.layer_of_column, self.expert_of_column] * self.scale_of_column
        hidden = self._packaged_step(ids, mask, positions, cache, columns, spans, slots)
        if hidden is None:
            raise RuntimeError("the compiled decode step cannot run this step (its cache is not in step)")
        return hidden

    def _ragged_weights(
        self, scalings: torch.Tensor | None, rows: RaggedRows, routing: list[Routing], scaling_pass: bool = False
    ) -> torch.Tensor:
        """expert_weights for a ragged row [1, tokens, layers, experts]: each row's tokens with its routing.
        With `scaling_pass`, those of the scaling pass (the rows' dummy scalings)."""
        if scaling_pass:
            parts = [self._scaling_pass_weights(1, n, r) for n, r in zip(rows.new, routing, strict=True)]
            shape = (len(self._lora_layers), self.n_experts_loaded)
            zeros = [torch.zeros(1, n, *shape, device=self.device, dtype=self.dtype) for n in rows.new]
            return torch.cat([z if p is None else p for p, z in zip(parts, zeros, strict=True)], dim=1)
        parts = scalings.split(rows.new, dim=1)
        return torch.cat([self._weights(p, r) for p, r in zip(parts, routing, strict=True)], dim=1)

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
        shape = (self.n_lora_layers, self.n_experts_loaded)
        none = torch.zeros(shape, device=self.device, dtype=self.dtype)
        new = tokens.shape[1]  # 1 at decode, the prompts' width at prefill
        scalings = torch.stack([none if f is None else f for f in cache.frozen]).unsqueeze(1).repeat(1, new, 1, 1)
        if granular:
            index = torch.tensor(granular, device=self.device)
            subset = [routing[i] for i in granular] if isinstance(routing, list) else routing
            mask = cache.attention_mask[index]
            sub_spans = left_padded_spans(mask, new)
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

        return generate(self, input_ids, attention_mask, **self._model_kwarg(kwargs))

    def stream(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any):
        """Yield each new token with its scalings as it is produced (see generation.stream)."""
        from .generation import stream

        return stream(self, input_ids, attention_mask, **self._model_kwarg(kwargs))

    def _model_kwarg(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """generate(..., model=name): that hosted model's rows (its default routing unless `routing` says)."""
        name = kwargs.pop("model", None)
        if name is None:
            return kwargs
        routing = kwargs.get("routing")
        if isinstance(routing, list):
            kwargs["routing"] = [dataclasses.replace(r, model=name) for r in routing]
        else:
            kwargs["routing"] = dataclasses.replace(routing or self.routing_of(name), model=name)
        return kwargs

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
