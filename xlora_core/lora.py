"""LoRA experts: reading PEFT adapters, and the fused layer that runs every expert of a module at once.

A `FusedLoraLinear` replaces one `nn.Linear` of the base model. The A matrices of all experts that
target it are stacked into one [sum of ranks, in] matrix and the B matrices into one [out, sum of
ranks] matrix, so a forward costs two matmuls whatever the number of experts. Each rank column
knows its expert, so the per-token expert weights scale the columns between the two matmuls.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils.other import get_pattern_key
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from .batch_invariant import frozen_linear, linear
from .config import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from .hub import hub_folder
from .quantize import QuantizedLinear

# LoRA variants and extras that change the computation: refused rather than silently ignored.
UNSUPPORTED_OPTIONS = {
    "use_dora": "DoRA",
    "use_qalora": "QA-LoRA",
    "lora_bias": "LoRA bias",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D layers)",
    "modules_to_save": "modules_to_save",
    "target_parameters": "target_parameters",
    "layer_replication": "layer_replication",
    "alora_invocation_tokens": "aLoRA",
    "arrow_config": "Arrow",
    "use_bdlora": "BD-LoRA",
    "trainable_token_indices": "trainable tokens",
    "monteclora_config": "MonteCLoRA",
}


class ExpertError(ValueError):
    """An expert that cannot be used with this base model; the message names the expert and module."""


@dataclass
class LoraExpert:
    """One PEFT LoRA adapter read from disk: per module name, A [r, in], B [out, r] and the scale."""

    name: str
    folder: Path
    modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]]
    lora_config: LoraConfig


def read_expert(name: str, folder: str | Path) -> LoraExpert:
    """Read a PEFT LoRA directory (adapter_config.json + adapter_model.safetensors), local or a Hub id (hub.py)."""
    folder = hub_folder(folder, f"expert {name!r}")
    config_path, weights_path = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    for path in (config_path, weights_path):
        if not path.is_file():
            raise ExpertError(f"expert {name!r}: {path} not found")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExpertError(f"expert {name!r}: {config_path} is not valid JSON ({e})") from None
    if config.get("peft_type") != "LORA":
        raise ExpertError(f"expert {name!r}: peft_type is {config.get('peft_type')!r}; only LORA is supported")
    for key, label in UNSUPPORTED_OPTIONS.items():
        if config.get(key):
            raise ExpertError(f"expert {name!r}: {label} ({key}) is not supported")
    if config.get("bias", "none") != "none":
        raise ExpertError(f"expert {name!r}: bias={config['bias']!r} is not supported (only 'none')")
    try:
        lora_config = LoraConfig.from_pretrained(str(folder))
    except (TypeError, ValueError) as e:
        raise ExpertError(f"expert {name!r}: {config_path}: {e}") from None
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ExpertError(f"expert {name!r}: cannot read {weights_path}: {e}") from None

    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        module, part = _split_key(key)
        if not part:
            continue  # not a LoRA tensor: peft's X-LoRA save writes base and classifier weights here too
        if part not in ("lora_A", "lora_B"):
            what = "DoRA" if part == "lora_magnitude_vector" else f"the tensor {key!r}"
            raise ExpertError(f"expert {name!r}: {what} is not supported (only Linear lora_A/lora_B)")
        pairs.setdefault(module, {})[part] = tensor
    if not pairs:
        raise ExpertError(f"expert {name!r}: {weights_path} holds no LoRA tensors")

    r_default, alpha_default = config.get("r", 8), config.get("lora_alpha", 8)
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    modules = {}
    for module, ab in pairs.items():
        if set(ab) != {"lora_A", "lora_B"}:
            raise ExpertError(f"expert {name!r}: module {module!r} lacks {({'lora_A', 'lora_B'} - set(ab)).pop()}")
        a, b = ab["lora_A"], ab["lora_B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise ExpertError(f"expert {name!r}: module {module!r} has A {tuple(a.shape)} and B {tuple(b.shape)}")
        r = rank_pattern.get(get_pattern_key(rank_pattern.keys(), module), r_default)
        alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), alpha_default)
        if r != a.shape[0]:
            raise ExpertError(f"expert {name!r}: module {module!r} has rank {a.shape[0]}, config says {r}")
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        modules[module] = (a, b, float(scale))
    return LoraExpert(name=name, folder=folder, modules=modules, lora_config=lora_config)


def expert_identity(expert: LoraExpert) -> str:
    """What makes two experts the same: their modules, matrices and scales (a checkpoint holds copies of its
    experts, written anew, so neither folders nor file bytes would find an expert shared by two models)."""
    digest = hashlib.sha256()
    for module in sorted(expert.modules):
        a, b, scale = expert.modules[module]
        digest.update(f"{module}:{tuple(a.shape)}:{tuple(b.shape)}:{a.dtype}:{scale!r}".encode())
        for t in (a, b):
            digest.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _split_key(key: str) -> tuple[str, str]:
    """'base_model.model.model.layers.0.q_proj.lora_A.weight' -> ('model.layers.0.q_proj', 'lora_A').

    The module path is relative to the causal LM: PEFT's wrappers (`base_model.`, the X-LoRA
    `lora_model.`, and the LoraModel's `model.`) are stripped. Non-LoRA tensors give part ''.
    """
    parts = key.split(".")
    for wrapper in ("base_model", "lora_model", "model"):
        if parts and parts[0] == wrapper:
            parts = parts[1:]
    if parts and parts[-1] == "weight":
        parts = parts[:-1]
    for i, p in enumerate(parts):
        if p.startswith("lora_"):
            return ".".join(parts[:i]), p
    return ".".join(parts), ""


class ExpertWeightsSlot:
    """The per-token expert weights [batch, seq, n_lora_layers, n_experts] of the pass being run.

    transformers' decoder layers call `q_proj(x)` with no room for more arguments, so the model puts
    the weights here right before running the backbone and takes them out after; every fused layer
    reads its own layer's slice. None means the experts are off (a scaling pass at value 0).

    For a one-token step (decoding) the model puts every layer's rank-column weights here instead, at
    once (`columns`, [batch, 1, all columns], layer after layer): one gather per pass instead of one
    per layer. Each layer then reads its own slice. Both None: the experts are off.

    `inductor` is True while the compiled step runs: the matmuls then go to inductor (batch_invariant.linear);
    `cpp_gemm` says that inductor's C++ GEMM templates take them (compiled_step.AUTOTUNE with AMX).

    `groups` (several models in one batch, XLoraModel.hosted): None runs every rank column for every row, as
    one model does. Otherwise one (mask, experts) per distinct set of experts the rows use: each set's columns
    run apart, for its rows only (`mask` [batch, seq, 1] of 0/1, None: every row), punica's gather per row.
    A row then gets the same arithmetic as alone, and a step costs the columns its rows use, not every
    expert loaded.
    """

    def __init__(self) -> None:
        self.weights: torch.Tensor | None = None
        self.columns: torch.Tensor | None = None
        self.groups: list[tuple[torch.Tensor | None, tuple[int, ...]]] | None = None
        self.inductor = False
        self.cpp_gemm = False


class JointMatmul:
    """One matmul of the compiled step for fused layers that a decoder layer calls one after the other on the
    same input (attention's q, k and v; the MLP's gate and up), or for one layer alone: their base weights and
    experts' A stacked into one weight (compiled_step.joint_weights), [sum of outs and ranks, in], or [in, that]
    if `transposed` (batch_invariant.frozen_linear), and their base biases (zeros for the ranks) if any has one.
    The first layer called multiplies its input; the next ones, given the same input tensor, take their columns
    of that result. Given another, they multiply it again: the same numbers, only slower."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> None:
        self.weight, self.bias, self.transposed = weight, bias, transposed
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None  # (input, output)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._last is None or self._last[0] is not x:
            if self.transposed:
                out = frozen_linear(x, self.weight)
                out = out if self.bias is None else out + self.bias
            else:
                out = linear(x, self.weight, self.bias, inductor=True)
            self._last = (x, out)
        return self._last[1]


class FusedLoraLinear(nn.Module):
    """base(x) + sum over experts e of w_e(token) * scale_e * B_e A_e x, as two matmuls."""

    def __init__(
        self,
        base_layer: nn.Linear | QuantizedLinear,
        layer_index: int,
        experts: list[tuple[int, torch.Tensor, torch.Tensor, float]],
        slot: ExpertWeightsSlot,
    ):
        super().__init__()
        self.base_layer = base_layer
        self.layer_index = layer_index
        self.slot = slot
        ref = base_layer.scales if isinstance(base_layer, QuantizedLinear) else base_layer.weight  # device, dtype
        self.lora_A = nn.Parameter(torch.cat([a for _, a, _, _ in experts]).to(ref.device, ref.dtype))
        self.lora_B = nn.Parameter(torch.cat([b for _, _, b, _ in experts], dim=1).to(ref.device, ref.dtype))
        expert_of_column = [e for e, a, _, _ in experts for _ in range(a.shape[0])]
        scale_of_column = [s for _, a, _, s in experts for _ in range(a.shape[0])]
        self.register_buffer("expert_of_column", torch.tensor(expert_of_column, device=ref.device), persistent=False)
        self.register_buffer(
            "scale_of_column", torch.tensor(scale_of_column, device=ref.device, dtype=ref.dtype), persistent=False
        )
        self.ranks = {e: a.shape[0] for e, a, _, _ in experts}
        self.first_column = 0  # where this layer's columns start in slot.columns (set by attach_experts)
        # Only while the compiled step is exported (compiled_step.joint_weights): the matmul whose weight holds
        # this layer's [base weight; A] (a constant of the package, not a second copy of the weights in the
        # model) and its base bias, the first of its output columns that are this layer's, and B transposed
        # ([ranks, out]; None where inductor's C++ GEMM multiplies by B).
        self.joint: tuple[JointMatmul, int, torch.Tensor | None] | None = None
        self._runs: dict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor, int, int]]] = {}

    def add_experts(self, experts: list[tuple[int, torch.Tensor, torch.Tensor, float]]) -> None:
        """Append more experts' columns (a model loaded next to the others); the stacked weights are rebuilt."""
        ref = self.lora_A
        a = torch.cat([self.lora_A.detach(), *(a.to(ref.device, ref.dtype) for _, a, _, _ in experts)])
        b = torch.cat([self.lora_B.detach(), *(b.to(ref.device, ref.dtype) for _, _, b, _ in experts)], dim=1)
        self.lora_A, self.lora_B = nn.Parameter(a, requires_grad=False), nn.Parameter(b, requires_grad=False)
        new_experts = torch.tensor([e for e, a, _, _ in experts for _ in range(a.shape[0])], device=ref.device)
        new_scales = torch.tensor([s for _, a, _, s in experts for _ in range(a.shape[0])], device=ref.device)
        self.expert_of_column = torch.cat([self.expert_of_column, new_experts])
        self.scale_of_column = torch.cat([self.scale_of_column, new_scales.to(ref.dtype)])
        self.ranks |= {e: a.shape[0] for e, a, _, _ in experts}
        self._runs = {}

    def keep_experts(self, renumber: dict[int, int]) -> None:
        """Keep only the columns of the experts in `renumber` (old index -> new index); the others are freed."""
        keep = torch.tensor([int(e) in renumber for e in self.expert_of_column.tolist()], device=self.lora_A.device)
        self.lora_A = nn.Parameter(self.lora_A.detach()[keep], requires_grad=False)
        self.lora_B = nn.Parameter(self.lora_B.detach()[:, keep], requires_grad=False)
        kept = [renumber[int(e)] for e in self.expert_of_column[keep].tolist()]
        self.expert_of_column = torch.tensor(kept, dtype=self.expert_of_column.dtype, device=self.lora_A.device)
        self.scale_of_column = self.scale_of_column[keep]
        self.ranks = {renumber[e]: r for e, r in self.ranks.items() if e in renumber}
        self._runs = {}

    def runs(self, experts: tuple[int, ...]) -> list[tuple[torch.Tensor, torch.Tensor, int, int]]:
        """(A, B, first, end column) of each contiguous run of these experts' columns in this layer. All the
        columns: the stacked matrices themselves; a part: copies made once (a prepacked weight is kept per
        tensor), so a group's matmuls cost its own columns."""
        if experts not in self._runs:
            used = torch.isin(self.expert_of_column, torch.tensor(experts, device=self.expert_of_column.device))
            runs, n = [], len(used)
            columns = used.nonzero().flatten().tolist()
            for c in columns:
                if runs and runs[-1][1] == c:
                    runs[-1][1] = c + 1
                else:
                    runs.append([c, c + 1])
            if runs == [[0, n]]:
                self._runs[experts] = [(self.lora_A, self.lora_B, 0, n)]
            else:
                self._runs[experts] = [
                    (self.lora_A[lo:hi].detach().clone(), self.lora_B[:, lo:hi].detach().contiguous(), lo, hi)
                    for lo, hi in runs
                ]
        return self._runs[experts]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.slot.columns is not None:  # a one-token step: gathered for every layer at once
            column_weights = self.slot.columns[:, :, self.first_column : self.first_column + self.lora_A.shape[0]]
            if self.joint is not None and self.slot.inductor and self.slot.groups is None:
                return self._joint(x, column_weights)
        elif self.slot.weights is not None:  # [batch, seq, n_experts] -> one weight per rank column
            column_weights = self.slot.weights[:, :, self.layer_index, self.expert_of_column] * self.scale_of_column
        else:  # the experts are off (a scaling pass at value 0)
            return self.base_layer(x)
        result = self.base_layer(x)
        if self.slot.groups is not None:  # several models in the batch: each set of experts for its own rows
            for mask, experts in self.slot.groups:
                for a, b, lo, hi in self.runs(experts):
                    weights = column_weights[:, :, lo:hi] if mask is None else column_weights[:, :, lo:hi] * mask
                    hidden = linear(x, a, None, self.slot.inductor, self.slot.cpp_gemm) * weights.to(x.dtype)
                    result = result + linear(hidden, b, None, self.slot.inductor, self.slot.cpp_gemm)
            return result
        hidden = linear(x, self.lora_A, None, self.slot.inductor, self.slot.cpp_gemm) * column_weights.to(x.dtype)
        return result + linear(hidden, self.lora_B, None, self.slot.inductor, self.slot.cpp_gemm)

    def _joint(self, x: torch.Tensor, column_weights: torch.Tensor) -> torch.Tensor:
        """The same for the compiled step: the base weight and the experts' A in one matmul (`joint`, shared with
        the layers called on the same input), so `x` is read, padded and multiplied once."""
        matmul, first, b_t = self.joint
        out = self.base_layer.weight.shape[0]
        both = matmul(x)[..., first : first + out + self.lora_A.shape[0]]
        hidden = both[..., out:] * column_weights.to(x.dtype)
        if b_t is None:  # inductor's C++ GEMM takes B too
            return both[..., :out] + linear(hidden, self.lora_B, None, True, True)
        # B has as many columns as the experts have ranks (24 for the embedded default): too small a matmul to be
        # worth a oneDNN call (about 13 µs each, 7 a layer). A sum over the ranks, which inductor fuses into the
        # add, computes each output alone, whatever the rows beside it; over B transposed ([ranks, out]), so
        # that its vectors run along the outputs, with no sum across a vector's lanes per output.
        return both[..., :out] + (hidden.unsqueeze(-1) * b_t).sum(-2)

    def expert_matrices(self, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This module's (A, B) of one expert, as stored by PEFT (for saving and inspection)."""
        columns = (self.expert_of_column == expert).nonzero().flatten()
        return self.lora_A[columns], self.lora_B[:, columns]

    def extra_repr(self) -> str:
        return f"layer_index={self.layer_index}, ranks={self.ranks}"


def attach_experts(base: nn.Module, experts: list[LoraExpert], slot: ExpertWeightsSlot) -> list[FusedLoraLinear]:
    """Replace every nn.Linear that some expert targets by a FusedLoraLinear.

    LoRA layers are numbered in module order, as peft numbers them, so scalings tensors of both
    implementations index the same modules.
    """
    return extend_experts(base, [], list(enumerate(experts)), slot)


def extend_experts(
    base: nn.Module, layers: list[FusedLoraLinear], experts: list[tuple[int, LoraExpert]], slot: ExpertWeightsSlot
) -> list[FusedLoraLinear]:
    """Add experts (numbered by the caller) to a base whose `layers` are fused already: a module fused
    already gets their columns appended, a new one becomes a FusedLoraLinear numbered after the others (in
    module order among the new ones). Returns every fused layer, old then new. Nothing changes if an
    expert does not fit (ExpertError naming it)."""
    targeted = check_experts_fit(base, [e for _, e in experts])
    named = _linear_modules(base)
    fused_names = {id(module): name for name, module in base.named_modules()}
    by_name = {fused_names[id(layer)]: layer for layer in layers}
    layers = list(layers)
    for module_name in [n for n in named if n in targeted]:
        parts = [(i, *e.modules[module_name]) for i, e in experts if module_name in e.modules]
        if module_name in by_name:
            by_name[module_name].add_experts(parts)
            continue
        parent_name, _, attr = module_name.rpartition(".")
        fused = FusedLoraLinear(named[module_name], len(layers), parts, slot)
        setattr(base.get_submodule(parent_name) if parent_name else base, attr, fused)
        layers.append(fused)
    number_columns(layers)
    return layers


def number_columns(layers: list[FusedLoraLinear]) -> None:
    """Where each layer's columns start in ExpertWeightsSlot.columns: layer after layer."""
    first = 0
    for layer in layers:
        layer.first_column, first = first, first + layer.lora_A.shape[0]


def check_experts_fit(base: nn.Module, experts: list[LoraExpert]) -> set[str]:
    """The modules these experts target; ExpertError naming the expert and module if one does not fit the base
    (no such module, not a Linear, other shapes, a targeted module without weights). Changes nothing."""
    named = _linear_modules(base)
    targeted: set[str] = set()
    for expert in experts:
        for module, (a, b, _) in expert.modules.items():
            target = named.get(module)
            if target is None:
                raise ExpertError(f"expert {expert.name!r}: module {module!r} does not exist in the base model")
            if not isinstance(target, (nn.Linear, QuantizedLinear)):
                raise ExpertError(
                    f"expert {expert.name!r}: module {module!r} is a {type(target).__name__}; "
                    "only nn.Linear targets are supported"
                )
            if a.shape[1] != target.in_features or b.shape[0] != target.out_features:
                raise ExpertError(
                    f"expert {expert.name!r}: module {module!r} is {target.in_features}->{target.out_features} "
                    f"in the base model but the expert has A {tuple(a.shape)}, B {tuple(b.shape)}"
                )
            targeted.add(module)
        _check_every_target_has_weights(expert, named)
    return targeted


def _linear_modules(base: nn.Module) -> dict[str, nn.Module]:
    """The base model's modules by name, a fused layer standing for the nn.Linear it wraps."""
    named = {}
    for name, module in base.named_modules():
        if name.endswith(".base_layer") and isinstance(base.get_submodule(name.rpartition(".")[0]), FusedLoraLinear):
            continue
        named[name] = module.base_layer if isinstance(module, FusedLoraLinear) else module
    return named


def _check_every_target_has_weights(expert: LoraExpert, named: dict[str, nn.Module]) -> None:
    """A module that the expert's config targets but that has no weights means a damaged adapter
    (peft 0.21.2's X-LoRA save_pretrained writes such expert folders); refuse it by name."""
    if isinstance(expert.lora_config.target_modules, str) and expert.lora_config.target_modules == "all-linear":
        return  # peft expands this at injection time; nothing exact to check against
    for module_name, module in named.items():
        if not isinstance(module, (nn.Linear, QuantizedLinear)) or module_name in expert.modules:
            continue
        if check_target_module_exists(expert.lora_config, module_name):
            raise ExpertError(
                f"expert {expert.name!r}: its adapter_config.json targets module {module_name!r} "
                f"but {expert.folder / ADAPTER_WEIGHTS} has no weights for it"
            )
