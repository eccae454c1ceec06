"""The models one XLoraModel serves over its base: X-LoRA models, plain LoRA adapters and the base itself.

Every expert of every model lives once in the base's fused layers (lora.FusedLoraLinear), numbered in the
order it was loaded; an expert that two models share (the same matrices, expert_identity) is loaded once.
Inside a forward, scalings and expert weights are "global" tensors [batch, seq, every LoRA layer, every
expert loaded]; a model sees its own part of them: its layers (those its experts target, in module order,
as peft numbers them) and its experts (in its own order). Rows that a model's classifier does not route (a
plain adapter, the base, a fixed mixture) have fixed scalings, like frozen rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from .classifier import Routing, XLoraClassifier
from .config import XLoraConfig
from .lora import LoraExpert

Kind = Literal["xlora", "adapter", "base"]


class ModelNameTaken(ValueError):
    """A model of that name is served already."""


class ExpertLimitError(ValueError):
    """Loading the model would hold more experts than allowed (the message says how many)."""


@dataclass
class PendingModel:
    """A model read from disk and checked against the base, not served yet (XLoraModel.read_model, attach)."""

    name: str
    kind: Kind
    experts: list[LoraExpert]
    classifier: XLoraClassifier | None = None
    config: XLoraConfig | None = None


@dataclass
class HostedModel:
    name: str
    kind: Kind
    expert_names: list[str]
    experts: list[int]  # the global index of each of its experts, in its order
    layers: list[int] = field(default_factory=list)  # the global LoRA layer of each of its layers
    classifier: XLoraClassifier | None = None  # X-LoRA models only
    config: XLoraConfig | None = None  # X-LoRA models only: routing defaults, softmax, scaling_pass_value
    freeze_after: int | None = None  # X-LoRA models only: the default Routing.freeze_after

    def routing(self) -> Routing:
        """The default routing of its requests (a plain adapter is the mixture {name: 1}, the base none)."""
        if self.kind == "xlora":
            return Routing(self.config.top_k_lora, self.config.global_scaling_weight, self.freeze_after,
                           model=self.name)  # fmt: skip
        return Routing(model=self.name)

    def fixed(self, routing: Routing) -> dict[int, float] | None:
        """Global expert -> weight of a row that no classifier routes; None for a row the classifier routes."""
        if self.kind == "base":
            return {}
        if self.kind == "adapter" and routing.weights is None:
            return {self.experts[0]: 1.0}
        if routing.weights is None:
            return None
        index = dict(zip(self.expert_names, self.experts, strict=True))
        return {index[name]: w for name, w in routing.weights if w != 0}

    def expert_set(self, routing: Routing, scaling_pass: bool = False) -> tuple[int, ...]:
        """The experts whose columns a row of this model runs (in the scaling pass: none at value 0)."""
        if scaling_pass:
            value = self.config.scaling_pass_value if self.kind == "xlora" else 0
            return tuple(sorted(self.experts)) if value != 0 else ()
        fixed = self.fixed(routing)
        return tuple(sorted(self.experts if fixed is None else fixed))

    def own(self, scalings: torch.Tensor) -> torch.Tensor:
        """Global scalings [..., layers, experts] -> this model's [..., its layers, its experts]."""
        return scalings[..., self.layers, :][..., self.experts]

    def to_global(self, own: torch.Tensor, layers: int, experts: int) -> torch.Tensor:
        """This model's scalings [n, seq, its layers, its experts] -> global ones, zero elsewhere."""
        out = own.new_zeros(*own.shape[:2], layers, experts)
        rows = torch.tensor(self.layers, device=own.device)[:, None]
        out[:, :, rows, torch.tensor(self.experts, device=own.device)[None, :]] = own
        return out

    def describe(self) -> dict:
        """What /models says of it."""
        data: dict = {"name": self.name, "kind": self.kind, "experts": list(self.expert_names)}
        if self.kind == "xlora":
            data["routing"] = {k: v for k, v in self.routing().to_dict().items() if k != "model"}
        return data
