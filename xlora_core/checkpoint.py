"""Checkpoints: reading every X-LoRA layout, loading one onto a base model, and writing ours.

Ours is PEFT's X-LoRA layout:

    folder/adapter_config.json          peft_type "XLORA" and every XLoraConfig field
    folder/adapter_model.safetensors    internal_xlora_classifier.layers.{i}.weight|bias
    folder/<expert>/                    one PEFT LoRA adapter per expert

peft names the expert subfolders "0", "1", ... and prefixes tensor names with "base_model."; both
are read. The original xlora library's layout (xlora_config.json + xlora_classifier.safetensors) is
read by xlora_layout.py; `read_checkpoint` tells the two apart by their config files. A classifier
tensor that is missing or misshapen is an error naming it, never a silent random init (peft 0.21.2
drops `layers.0` when it saves).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import ADAPTER_CONFIG, ADAPTER_WEIGHTS, XLoraConfig
from .hub import hub_folder
from .ordering import check_layers, read_ordering, resolve_order
from .stored import (
    CheckpointError,
    StoredCheckpoint,
    check_classifier,
    check_folder_names,
    copy_expert_files,
    write_folder_atomically,
)
from .xlora_layout import is_xlora_layout, read_xlora_layout

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

    from .model import XLoraModel

__all__ = ["CheckpointError", "load_checkpoint", "read_checkpoint", "save_checkpoint", "write_checkpoint"]

CLASSIFIER_PREFIX = "internal_xlora_classifier."


# ---- writing ours ------------------------------------------------------------------------------------------


def save_checkpoint(model: XLoraModel, folder: str | Path) -> None:
    """Write the config, the classifier and every expert (as currently held, trained or not)."""
    check_folder_names(model.adapter_names)

    def fill(tmp: Path) -> None:
        config = XLoraConfig.from_dict({**model.config.to_dict(), "adapters": {n: n for n in model.adapter_names}})
        config.save(tmp)
        state = {CLASSIFIER_PREFIX + k: v.detach().cpu().contiguous() for k, v in model.classifier.state_dict().items()}
        save_file(state, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        for index, (name, source) in enumerate(model.config.adapters.items()):
            _save_expert(model, index, hub_folder(source, f"expert {name!r}"), tmp / name)

    write_folder_atomically(folder, fill)


def write_checkpoint(stored: StoredCheckpoint, folder: str | Path) -> None:
    """Write a checkpoint read from any layout in ours, without a model: the classifier's tensors as they
    are, the experts' files copied byte for byte."""
    names = list(stored.config.adapters)
    check_folder_names(names)

    def fill(tmp: Path) -> None:
        XLoraConfig.from_dict({**stored.config.to_dict(), "adapters": {n: n for n in names}}).save(tmp)
        state = {CLASSIFIER_PREFIX + k: v.contiguous() for k, v in stored.classifier.items()}
        save_file(state, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        for name, source in stored.config.adapters.items():
            copy_expert_files(Path(source), tmp / name)

    write_folder_atomically(folder, fill)


def _save_expert(model: XLoraModel, index: int, source: Path, target: Path) -> None:
    target.mkdir()
    source_config = source / ADAPTER_CONFIG
    if source_config.resolve() != (target / ADAPTER_CONFIG).resolve():
        shutil.copyfile(source_config, target / ADAPTER_CONFIG)
    tensors = {}
    module_names = lora_module_names(model)
    for layer, module in zip(model.lora_layers, module_names, strict=True):
        if index not in layer.ranks:
            continue
        a, b = layer.expert_matrices(index)
        tensors[f"base_model.model.{module}.lora_A.weight"] = a.detach().cpu().contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = b.detach().cpu().contiguous()
    save_file(tensors, str(target / ADAPTER_WEIGHTS), metadata={"format": "pt"})


def lora_module_names(model: XLoraModel) -> list[str]:
    """The base model's names of the fused LoRA layers, in layer order (the classifier's layerwise outputs)."""
    names = {id(module): name for name, module in model.base.named_modules()}
    return [names[id(layer)] for layer in model.lora_layers]


# ---- reading any layout -------------------------------------------------------------------------------------


def read_checkpoint(
    folder: str | Path,
    adapters: dict[str, str] | None = None,
    ordering: str | Path | None = None,
    allow_pickle: bool = False,
    revision: str | None = None,
    **overrides: Any,
) -> StoredCheckpoint:
    """Read a checkpoint in our (= peft's) layout or the xlora library's, detected from its config file.

    folder and adapters' folders: local paths or Hugging Face Hub ids (hub.py); `revision` is the checkpoint's.
    adapters: expert name -> folder, instead of the checkpoint's copies (the same names).
    ordering: a mistral.rs ordering file the checkpoint must agree with (see ordering.py).
    allow_pickle: read the library's xlora_classifier.pt (torch.save); off, it is refused.
    overrides: XLoraConfig fields that replace the checkpoint's.
    """
    folder = hub_folder(folder, "checkpoint", revision)
    if adapters is not None:
        adapters = {name: str(hub_folder(source, f"expert {name!r}")) for name, source in adapters.items()}
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: checkpoint folder not found")
    ordering_file = read_ordering(ordering) if ordering is not None else None
    if _is_peft_xlora(folder / ADAPTER_CONFIG) or not is_xlora_layout(folder):
        stored = _read_ours(folder, adapters, overrides)
        if ordering_file is not None:
            resolve_order(ordering_file, list(stored.config.adapters), True, stored.config_path)
    else:
        stored = read_xlora_layout(folder, adapters, ordering_file, allow_pickle, overrides)
    stored.ordering = ordering_file
    return stored


def _is_peft_xlora(config_path: Path) -> bool:
    try:
        return json.loads(config_path.read_text()).get("peft_type") == "XLORA"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return False


def _read_ours(folder: Path, adapters: dict[str, str] | None, overrides: dict[str, Any]) -> StoredCheckpoint:
    config_path = folder / ADAPTER_CONFIG
    try:
        data = json.loads(config_path.read_text())
    except FileNotFoundError:
        raise CheckpointError(
            f"{folder}: no X-LoRA checkpoint here: neither {ADAPTER_CONFIG} (xlora-server's and peft's layout) "
            "nor xlora_config.json (the xlora library's) was found"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{config_path}: not valid JSON ({e})") from None
    if data.get("peft_type") != "XLORA":
        raise CheckpointError(f"{config_path}: peft_type is {data.get('peft_type')!r}, expected 'XLORA'")
    saved_names = list(data.get("adapters") or {})
    if adapters is not None:
        experts = {name: str(folder) for name, folder in given_experts(adapters, saved_names, config_path).items()}
    else:
        experts = {name: str(_expert_folder(folder, i, name)) for i, name in enumerate(saved_names)}
    try:
        config = XLoraConfig.from_dict({**data, **overrides, "adapters": experts})
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{config_path}: {e}") from None

    weights_path = folder / ADAPTER_WEIGHTS
    try:
        tensors = load_file(str(weights_path))
    except FileNotFoundError:
        raise CheckpointError(f"{weights_path}: not found (the classifier's weights)") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights_path}: cannot read ({e})") from None
    state = {}
    for key, tensor in tensors.items():
        if CLASSIFIER_PREFIX in key:
            state[key[key.index(CLASSIFIER_PREFIX) + len(CLASSIFIER_PREFIX) :]] = tensor
    return StoredCheckpoint(
        layout="xlora-server",
        folder=folder,
        config_path=config_path,
        weights_path=weights_path,
        config=config,
        classifier=state,
        tensor_name=lambda key: CLASSIFIER_PREFIX + key,
    )


def given_experts(adapters: dict[str, str], saved_names: list[str], config_path: Path) -> dict[str, str]:
    """`adapters=` replaces the checkpoint's expert folders, name for name; the order stays the checkpoint's."""
    if set(adapters) != set(saved_names):
        raise CheckpointError(
            f"{config_path}: adapters {sorted(adapters)} do not match the checkpoint's experts {saved_names}; "
            "the classifier was trained for exactly those"
        )
    return {name: str(adapters[name]) for name in saved_names}


def _expert_folder(folder: Path, index: int, name: str) -> Path:
    for candidate in (folder / name, folder / str(index)):
        if (candidate / ADAPTER_CONFIG).is_file():
            return candidate
    raise CheckpointError(f"{folder}: no folder for expert {name!r} (looked for {name}/ and {index}/)")


# ---- loading onto a base model ------------------------------------------------------------------------------


def load_checkpoint(
    cls: type[XLoraModel],
    base: PreTrainedModel,
    folder: str | Path,
    adapters: dict[str, str] | None = None,
    ordering: str | Path | None = None,
    allow_pickle: bool = False,
    revision: str | None = None,
    **overrides: Any,
) -> XLoraModel:
    stored = read_checkpoint(
        folder, adapters=adapters, ordering=ordering, allow_pickle=allow_pickle, revision=revision, **overrides
    )
    model = cls(base, stored.config)
    check_against_model(stored, model)
    model.classifier.load_state_dict({k: v.to(model.dtype) for k, v in stored.classifier.items()})
    return model


def check_against_model(stored: StoredCheckpoint, model: XLoraModel) -> None:
    """What only the experts on a base model can tell: the classifier's shapes, and the ordering file's
    layers (the LoRA modules, in the base model's order)."""
    expected: dict[str, torch.Tensor] = model.classifier.state_dict()
    check_classifier(stored, expected, model.n_lora_layers)
    if stored.ordering is not None:
        check_layers(stored.ordering, lora_module_names(model))
