"""mistral.rs ordering files: which expert is which classifier output, and which LoRA module is which layer.

mistral.rs serves checkpoints in the xlora library's layout together with a JSON file (its
scripts/create_ordering.py writes one):

    {"order": ["adapter_1", ...],                       the experts, in the order they were given in training
     "layers": {"model.layers.0.self_attn.q_proj": 0, ...},   LoRA module -> index of the classifier's
                                                               layerwise output (modules in the base model's order)
     "base_model_id": "HuggingFaceH4/zephyr-7b-beta"}

Here an ordering file is a check, never a second source of truth: its `order` must be the checkpoint's own
(where the checkpoint keeps one) and its `layers` must be the modules the experts target, in the order the
classifier was trained with. A checkpoint whose experts are a JSON object without a trustworthy order (the
xlora library before March 2024) takes its order from the ordering file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .stored import CheckpointError

_SHOWN = 5  # names quoted in a message before "..."


@dataclass(frozen=True)
class Ordering:
    path: Path
    order: list[str]
    layers: dict[str, int] | None
    base_model_id: str | None


def read_ordering(path: str | Path) -> Ordering:
    """Read and check the shape of an ordering file; CheckpointError names the file and the field."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: ordering file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not a readable JSON ordering file ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object with order, layers and base_model_id")
    order = data.get("order")
    if order is None:
        raise CheckpointError(
            f"{path}: no `order`: this is an ordering file for plain LoRA adapters, not for X-LoRA "
            "(an X-LoRA one lists the experts in the order they were trained with)"
        )
    if not isinstance(order, list) or not order or not all(isinstance(n, str) and n for n in order):
        raise CheckpointError(f"{path}: order must be a non-empty list of expert names, got {order!r}")
    duplicates = sorted({n for n in order if order.count(n) > 1})
    if duplicates:
        raise CheckpointError(f"{path}: order names {duplicates} more than once")
    layers = data.get("layers")
    if layers is not None:
        if not isinstance(layers, dict) or not all(_is_index(v) for v in layers.values()):
            raise CheckpointError(f"{path}: layers must map module names to layer indices (0, 1, ...)")
        if sorted(layers.values()) != list(range(len(layers))):
            raise CheckpointError(f"{path}: layers must number the modules 0..{len(layers) - 1}, each once")
    base_model_id = data.get("base_model_id")
    if base_model_id is not None and not isinstance(base_model_id, str):
        raise CheckpointError(f"{path}: base_model_id must be a string, got {base_model_id!r}")
    return Ordering(path=path, order=list(order), layers=layers, base_model_id=base_model_id)


def write_ordering(path: str | Path, order: list[str], module_names: list[str], base_model_id: str) -> None:
    """Write an ordering file as mistral.rs reads it: the experts in classifier order, the LoRA modules in
    the order of the classifier's layerwise outputs."""
    data = {"order": list(order), "layers": {name: i for i, name in enumerate(module_names)},
            "base_model_id": base_model_id}  # fmt: skip
    Path(path).write_text(json.dumps(data))


def resolve_order(ordering: Ordering, names: list[str], order_is_known: bool, where: Path) -> list[str]:
    """The expert order to use. The ordering file must name exactly the checkpoint's experts; where the
    checkpoint keeps an order (`order_is_known`) it must be that order too; otherwise it supplies it."""
    if set(ordering.order) != set(names):
        raise CheckpointError(
            f"{ordering.path}: order {ordering.order} does not name the experts of {where} {names}: "
            f"{_difference(ordering.order, names, 'in the ordering file only', 'in the checkpoint only')}"
        )
    if order_is_known and ordering.order != names:
        i = next(i for i, (a, b) in enumerate(zip(ordering.order, names, strict=True)) if a != b)
        raise CheckpointError(
            f"{ordering.path}: order {ordering.order} differs from the order {where} was trained with {names}: "
            f"output {i} of the classifier is {names[i]!r} there and {ordering.order[i]!r} here"
        )
    return list(ordering.order)


def check_layers(ordering: Ordering, module_names: list[str]) -> None:
    """The ordering file's `layers` must be the LoRA modules the experts target, numbered in the order the
    classifier's layerwise outputs follow (the base model's module order)."""
    if ordering.layers is None:
        return
    if set(ordering.layers) != set(module_names):
        raise CheckpointError(
            f"{ordering.path}: this ordering file is for other LoRA modules than the experts target: "
            f"{_difference(list(ordering.layers), module_names, 'listed but not targeted', 'targeted but not listed')}"
        )
    for index, name in enumerate(module_names):
        if ordering.layers[name] != index:
            raise CheckpointError(
                f"{ordering.path}: layers puts {name} at {ordering.layers[name]}, but the classifier's output for "
                f"it is {index} (the experts' modules in the base model's order)"
            )


def check_base_model_id(ordering: Ordering, base_model_id: str | None, where: Path) -> None:
    if ordering.base_model_id and base_model_id and ordering.base_model_id != base_model_id:
        raise CheckpointError(
            f"{ordering.path}: base_model_id {ordering.base_model_id!r} differs from {base_model_id!r} in {where}"
        )


def _difference(ours: list[str], theirs: list[str], only_ours: str, only_theirs: str) -> str:
    parts = []
    for label, names in ((only_ours, [n for n in ours if n not in set(theirs)]),
                         (only_theirs, [n for n in theirs if n not in set(ours)])):  # fmt: skip
        if names:
            shown = ", ".join(names[:_SHOWN]) + (f", ... ({len(names)} in all)" if len(names) > _SHOWN else "")
            parts.append(f"{label}: {shown}")
    return "; ".join(parts)


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
