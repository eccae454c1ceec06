"""The X-LoRA classifier: hidden states of the scaling pass -> one weight per expert, per token and LoRA layer.

Architecture and parameter names match `peft.tuners.xlora.classifier.XLoraClassifier`
(`layers.{i}.weight|bias` in an `nn.Sequential`), so checkpoints are interchangeable. The original xlora
library's two extra switches are supported too: `use_bias=False` drops every bias, and
`enable_relu_and_dropout=False` leaves nothing between the Linear layers (its `inner.{i}` and `last`
parameters map onto our Linear layers in order; see `linear_names`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from .config import ParameterError, XLoraConfig, check_freeze_after, check_global_scaling_weight, check_top_k


@dataclass(frozen=True)
class Routing:
    """Run-time routing knobs of one request (or the default of a model or server).

    top_k: experts kept per token and layer (None = dense).
    global_scaling_weight: multiplies every expert's output.
    freeze_after: None = granular (the classifier routes every token). k >= 0 = after k generated
        tokens the scalings are frozen: positions up to P-1+k (P prompt tokens; position P-1+j
        produces generated token j) are routed as usual, every later position reuses the scalings of
        position P-1+k and skips the scaling pass (mistral.rs's non-granular index).
    model: which of the models hosted over the base (XLoraModel.models()) serves the row; None = the
        X-LoRA model the XLoraModel was built as.
    weights: a fixed mixture, expert name -> weight (a dict is taken), on every layer and position: no
        classifier and no scaling pass (times global_scaling_weight). Names are the model's experts.

    Construction checks what needs no model (types, finiteness, signs), raising ParameterError;
    `validate(n_adapters)` checks top_k against the number of experts (and the mixture's names).
    """

    top_k: int | None = None
    global_scaling_weight: float = 1.0
    freeze_after: int | None = None
    model: str | None = None
    weights: tuple[tuple[str, float], ...] | None = None

    def __post_init__(self) -> None:
        check_top_k(self.top_k, None, "top_k")
        check_global_scaling_weight(self.global_scaling_weight)
        check_freeze_after(self.freeze_after)
        if self.weights is not None:
            object.__setattr__(self, "weights", check_mixture(self.weights))
            for field_name in ("top_k", "freeze_after"):  # a fixed mixture has no classifier to keep or freeze
                if getattr(self, field_name) is not None:
                    raise ParameterError(field_name, "cannot be combined with weights (a fixed mixture)")

    def validate(self, n_adapters: int, expert_names: list[str] | None = None) -> Routing:
        """Raise ParameterError naming the field; return self so it can be chained. `expert_names`: the
        model's experts, that a mixture may name."""
        check_top_k(self.top_k, n_adapters, "top_k")
        if self.weights is not None and expert_names is not None:
            for name, _ in self.weights:
                if name not in expert_names:
                    known = ", ".join(expert_names) or "none: this model has no experts"
                    raise ParameterError(f"weights.{name}", f"is not an expert of this model (its experts: {known})")
        return self

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["global_scaling_weight"] = float(self.global_scaling_weight)
        for key in ("model", "weights"):  # only when set: routing state files and answers stay as they were
            if data[key] is None:
                del data[key]
        if self.weights is not None:
            data["weights"] = dict(self.weights)
        return data

    @property
    def mixture(self) -> dict[str, float] | None:
        return None if self.weights is None else dict(self.weights)

    def freezes_at(self, generated: int) -> bool:
        """True when the step that produced generated token number `generated` (0-based) is the last
        routed one: its scalings become the row's for good."""
        return self.freeze_after is not None and generated == self.freeze_after


# A mixture's weights: finite and within +-MAX_MIXTURE_WEIGHT (a typo like 7e9 is refused, not run).
MAX_MIXTURE_WEIGHT = 100.0


def check_mixture(weights: Any, parameter: str = "weights") -> tuple[tuple[str, float], ...]:
    """{name: weight} (or pairs) -> sorted (name, weight) pairs; ParameterError naming the entry at fault."""
    if isinstance(weights, dict):
        weights = tuple(weights.items())
    if not isinstance(weights, tuple | list) or not weights:
        raise ParameterError(parameter, f"must be a non-empty object of expert name -> weight, got {weights!r}")
    pairs = {}
    for item in weights:
        name, value = item
        if not isinstance(name, str) or not name:
            raise ParameterError(parameter, f"expert names must be non-empty strings, got {name!r}")
        where = f"{parameter}.{name}"
        check_global_scaling_weight(value, where)
        if abs(value) > MAX_MIXTURE_WEIGHT:
            bound = f"{MAX_MIXTURE_WEIGHT:g}"
            raise ParameterError(where, f"must be between -{bound} and {bound}, got {value!r}")
        pairs[name] = float(value)
    return tuple(sorted(pairs.items()))


class XLoraClassifier(nn.Module):
    def __init__(self, config: XLoraConfig, n_layers: int, n_classes: int):
        super().__init__()
        self.config = config
        self.n_layers = n_layers
        self.n_classes = n_classes
        out = n_classes * n_layers if config.layerwise_scalings else n_classes
        layers: list[nn.Module] = []
        width = config.hidden_size
        for _ in range(config.xlora_depth - 1):
            layers.append(nn.Linear(width, config.xlora_size, bias=config.use_bias))
            if config.enable_relu_and_dropout:
                layers.append(nn.ReLU())
                if config.xlora_dropout_p > 0:
                    layers.append(nn.Dropout(p=config.xlora_dropout_p))
            width = config.xlora_size
        layers.append(nn.Linear(width, out, bias=config.use_bias))
        self.layers = nn.Sequential(*layers)

    def linear_names(self) -> list[str]:
        """The Linear layers' names, input to output ('layers.0', 'layers.3', ...)."""
        return [f"layers.{i}" for i, module in enumerate(self.layers) if isinstance(module, nn.Linear)]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[batch, seq, hidden] -> scalings [batch, seq, n_layers, n_classes]."""
        batch, seq, _ = hidden_states.shape
        logits = self.layers(hidden_states)
        if not self.config.layerwise_scalings:
            logits = logits.unsqueeze(2).expand(-1, -1, self.n_layers, -1)
        scalings = logits.reshape(batch, seq, self.n_layers, self.n_classes)
        if self.config.enable_softmax:
            scalings = torch.softmax(scalings / self.config.softmax_temperature, dim=-1)
        return scalings

    def dummy_scalings(self, batch: int, seq: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The scalings of the scaling pass: every expert at scaling_pass_value."""
        shape = (batch, seq, self.n_layers, self.n_classes)
        return torch.full(shape, self.config.scaling_pass_value, device=device, dtype=dtype)


def expert_weights(scalings: torch.Tensor, routing: Routing | list[Routing], softmax_topk: bool) -> torch.Tensor:
    """What each expert's LoRA output is multiplied by: top-k mask, optional softmax over the kept
    experts, times the global scaling weight (as peft's XLoraLayer). `routing` is one setting for the
    whole batch or one per row, so requests with different settings can share a batch."""
    rows = routing if isinstance(routing, list) else [routing] * scalings.shape[0]
    if len(rows) != scalings.shape[0]:
        raise ValueError(f"routing has {len(rows)} entries for a batch of {scalings.shape[0]}")
    groups: dict[int | None, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(r.top_k, []).append(i)
    if len(groups) == 1:
        weights = _select(scalings, rows[0].top_k, softmax_topk)
    else:
        weights = torch.empty_like(scalings)
        for k, idx in groups.items():
            weights[idx] = _select(scalings[idx], k, softmax_topk)
    gsw = {r.global_scaling_weight for r in rows}
    if len(gsw) == 1:
        return weights * gsw.pop()
    per_row = torch.tensor([r.global_scaling_weight for r in rows], device=weights.device, dtype=weights.dtype)
    return weights * per_row.view(-1, 1, 1, 1)


def _select(scalings: torch.Tensor, top_k: int | None, softmax_topk: bool) -> torch.Tensor:
    if top_k is not None:
        _, indices = torch.topk(scalings, k=top_k, dim=-1)
        mask = torch.zeros_like(scalings, dtype=torch.bool).scatter_(-1, indices, True)
        scalings = scalings * mask.to(scalings.dtype)
    if softmax_topk:
        # peft applies this softmax over the non-zero experts whenever enable_softmax_topk is set.
        nonzero = scalings != 0
        scalings = torch.softmax(scalings.masked_fill(~nonzero, float("-inf")), dim=-1).masked_fill(~nonzero, 0.0)
    return scalings
