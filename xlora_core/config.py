"""X-LoRA configuration: the same fields, defaults and meaning as `peft.XLoraConfig`, validated, plus the two
classifier switches of the original xlora library (`use_bias`, `enable_relu_and_dropout`) that peft lacks."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

# PEFT's file names, for an expert and for an X-LoRA checkpoint alike.
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass
class XLoraConfig:
    """Hyper-parameters of the X-LoRA router (see `peft.XLoraConfig` for the reference semantics).

    hidden_size: hidden size of the base model (the classifier's input).
    adapters: expert name -> folder of a PEFT LoRA adapter; order defines the expert index.
    enable_softmax: softmax (with softmax_temperature) over experts on the classifier's output.
    enable_softmax_topk: after the top-k mask, a softmax over the kept experts only.
    layerwise_scalings: one scaling per expert *and* LoRA layer instead of one broadcast to every layer.
    xlora_depth / xlora_size / xlora_dropout_p: depth, hidden width and dropout of the classifier MLP.
    use_bias: the classifier's Linear layers have biases (the xlora library's switch; peft's always do).
    enable_relu_and_dropout: ReLU (and dropout) between the classifier's Linear layers (the xlora library's
        switch; peft's always has them). Off, a deep classifier is a stack of Linear layers.
    use_trainable_adapters: train the experts together with the classifier.
    softmax_temperature: lower is sharper.
    top_k_lora: keep the k largest scalings per token and layer (None = dense).
    scaling_pass_value: the value every scaling takes in the scaling pass.
    global_scaling_weight: multiplies every expert's output.
    base_model_name_or_path: the base model the experts were trained on (peft's field; the xlora library's
        `base_model_id`); informational, kept so conversions between layouts lose nothing.
    """

    hidden_size: int
    adapters: dict[str, str] = field(default_factory=dict)
    enable_softmax: bool = True
    enable_softmax_topk: bool = False
    layerwise_scalings: bool = False
    xlora_depth: int = 1
    xlora_size: int = 2048
    xlora_dropout_p: float = 0.2
    use_bias: bool = True
    enable_relu_and_dropout: bool = True
    use_trainable_adapters: bool = False
    softmax_temperature: float = 1.0
    top_k_lora: int | None = None
    scaling_pass_value: float = 0.0
    global_scaling_weight: float = 1.0
    base_model_name_or_path: str | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first field that is out of range."""
        if not isinstance(self.hidden_size, int) or isinstance(self.hidden_size, bool) or self.hidden_size < 1:
            raise ValueError(f"hidden_size must be a positive integer, got {self.hidden_size!r}")
        if not isinstance(self.adapters, dict) or not self.adapters:
            raise ValueError("adapters must name at least one LoRA expert (name -> folder)")
        for name in self.adapters:
            if not isinstance(name, str) or not name:
                raise ValueError(f"adapters: expert names must be non-empty strings, got {name!r}")
        _check_int("xlora_depth", self.xlora_depth, minimum=1)
        _check_int("xlora_size", self.xlora_size, minimum=1)
        if not (_finite(self.xlora_dropout_p) and 0.0 <= self.xlora_dropout_p < 1.0):
            raise ValueError(f"xlora_dropout_p must be in [0, 1), got {self.xlora_dropout_p!r}")
        if not (_finite(self.softmax_temperature) and self.softmax_temperature > 0):
            raise ValueError(f"softmax_temperature must be a finite number > 0, got {self.softmax_temperature!r}")
        check_top_k(self.top_k_lora, len(self.adapters))
        if not _finite(self.scaling_pass_value):
            raise ValueError(f"scaling_pass_value must be a finite number, got {self.scaling_pass_value!r}")
        check_global_scaling_weight(self.global_scaling_weight)
        for name in ("use_bias", "enable_relu_and_dropout"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.base_model_name_or_path is not None and not isinstance(self.base_model_name_or_path, str):
            raise ValueError(f"base_model_name_or_path must be a string, got {self.base_model_name_or_path!r}")

    @property
    def n_adapters(self) -> int:
        return len(self.adapters)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> XLoraConfig:
        """Build from a dict such as peft's adapter_config.json; keys that are not X-LoRA fields are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def save(self, folder: str | Path) -> None:
        data = {"peft_type": "XLORA", **self.to_dict()}
        # The library's switches are written only when they differ from peft's classifier, so peft reads
        # every checkpoint it can run without warning about keys it does not know.
        for name in ("use_bias", "enable_relu_and_dropout"):
            if data[name] is True:
                del data[name]
        # Not sort_keys: the order of `adapters` is the expert index.
        Path(folder, ADAPTER_CONFIG).write_text(json.dumps(data, indent=2) + "\n")


class ParameterError(ValueError):
    """A setting out of range. `parameter` names it, so a server can report the request's field
    without parsing the message (as vLLM's VLLMValidationError)."""

    def __init__(self, parameter: str, message: str) -> None:
        super().__init__(f"{parameter} {message}")
        self.parameter = parameter


class ConstraintError(ParameterError):
    """A structured-output constraint that cannot be followed: no answer satisfies it (or none this vocabulary
    can spell), or it runs past the grammar engine's work limits. The request's mistake, found when it is
    compiled or while its row decodes. `parameter` is the constraint's kind; `code` says which of the two."""

    def __init__(self, parameter: str, message: str, code: str = "constraint_unsatisfiable") -> None:
        super().__init__(parameter, message)
        self.code = code


def check_top_k(top_k: int | None, n_adapters: int | None, parameter: str = "top_k_lora") -> None:
    """None (dense) or 1..n_adapters; with n_adapters None, only the type and the lower bound."""
    if top_k is None:
        return
    upper = n_adapters if n_adapters is not None else float("inf")
    if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= upper:
        rule = f"in 1..{n_adapters}" if n_adapters is not None else ">= 1"
        raise ParameterError(parameter, f"must be null (dense) or an integer {rule}, got {top_k!r}")


def check_global_scaling_weight(weight: float, parameter: str = "global_scaling_weight") -> None:
    if isinstance(weight, bool) or not _finite(weight):
        raise ParameterError(parameter, f"must be a finite number, got {weight!r}")


def check_freeze_after(freeze_after: int | None, parameter: str = "freeze_after") -> None:
    """None (granular: new scalings for every token) or the number of generated tokens after which
    the scalings are frozen (an integer >= 0)."""
    if freeze_after is None:
        return
    if not isinstance(freeze_after, int) or isinstance(freeze_after, bool) or freeze_after < 0:
        raise ParameterError(parameter, f"must be null (granular) or an integer >= 0, got {freeze_after!r}")


def _check_int(name: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
