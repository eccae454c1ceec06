"""Checkpoints in PEFT's X-LoRA layout.

    folder/adapter_config.json          peft_type "XLORA" and every XLoraConfig field
    folder/adapter_model.safetensors    internal_xlora_classifier.layers.{i}.weight|bias
    folder/<expert>/                    one PEFT LoRA adapter per expert

peft names the expert subfolders "0", "1", ... and prefixes tensor names with "base_model."; both
are read. A classifier tensor that is missing or misshapen is an error naming it, never a silent
random init (peft 0.21.2 drops `layers.0` when it saves).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import CONFIG_NAME, XLoraConfig
from .lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from .model import XLoraModel

WEIGHTS_NAME = "adapter_model.safetensors"
CLASSIFIER_PREFIX = "internal_xlora_classifier."
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as it is; the message names the file and what is wrong."""


def save_checkpoint(model: XLoraModel, folder: str | Path) -> None:
    """Write the config, the classifier and every expert (as currently held, trained or not).
    Written to a temporary folder first, so an interrupted save never leaves a half checkpoint."""
    folder = Path(folder)
    for name in model.adapter_names:
        if not _SAFE_NAME.match(name):
            raise ValueError(f"expert name {name!r} cannot be a folder name; use letters, digits, '_', '.', '-'")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        config = XLoraConfig.from_dict({**model.config.to_dict(), "adapters": {n: n for n in model.adapter_names}})
        config.save(tmp)
        state = {CLASSIFIER_PREFIX + k: v.detach().cpu().contiguous() for k, v in model.classifier.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        for index, (name, source) in enumerate(model.config.adapters.items()):
            _save_expert(model, index, Path(source), tmp / name)
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _save_expert(model: XLoraModel, index: int, source: Path, target: Path) -> None:
    target.mkdir()
    source_config = source / ADAPTER_CONFIG
    if source_config.resolve() != (target / ADAPTER_CONFIG).resolve():
        shutil.copyfile(source_config, target / ADAPTER_CONFIG)
    tensors = {}
    for layer in model.lora_layers:
        if index not in layer.ranks:
            continue
        module = _module_name(model, layer)
        a, b = layer.expert_matrices(index)
        tensors[f"base_model.model.{module}.lora_A.weight"] = a.detach().cpu().contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = b.detach().cpu().contiguous()
    save_file(tensors, str(target / ADAPTER_WEIGHTS), metadata={"format": "pt"})


def _module_name(model: XLoraModel, layer: torch.nn.Module) -> str:
    for name, module in model.base.named_modules():
        if module is layer:
            return name
    raise RuntimeError("fused layer not found in the base model")


def load_checkpoint(
    cls: type[XLoraModel],
    base: PreTrainedModel,
    folder: str | Path,
    adapters: dict[str, str] | None = None,
    **overrides: Any,
) -> XLoraModel:
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: checkpoint folder not found")
    config_path = folder / CONFIG_NAME
    try:
        data = json.loads(config_path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{config_path}: not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{config_path}: not valid JSON ({e})") from None
    if data.get("peft_type") != "XLORA":
        raise CheckpointError(f"{config_path}: peft_type is {data.get('peft_type')!r}, expected 'XLORA'")
    saved_names = list(data.get("adapters") or {})
    if adapters is not None:
        if set(adapters) != set(saved_names):
            raise CheckpointError(
                f"{config_path}: adapters {sorted(adapters)} do not match the checkpoint's experts {saved_names}; "
                "the classifier was trained for exactly those"
            )
        experts = {name: str(adapters[name]) for name in saved_names}
    else:
        experts = {name: str(_expert_folder(folder, i, name)) for i, name in enumerate(saved_names)}
    try:
        config = XLoraConfig.from_dict({**data, **overrides, "adapters": experts})
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{config_path}: {e}") from None

    weights_path = folder / WEIGHTS_NAME
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

    model = cls(base, config)
    expected = model.classifier.state_dict()
    missing = [CLASSIFIER_PREFIX + k for k in expected if k not in state]
    if missing:
        raise CheckpointError(f"{weights_path}: missing classifier tensor(s) {missing}")
    unexpected = [CLASSIFIER_PREFIX + k for k in state if k not in expected]
    if unexpected:
        raise CheckpointError(f"{weights_path}: unexpected tensor(s) {unexpected} for this config")
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise CheckpointError(
                f"{weights_path}: {CLASSIFIER_PREFIX + key} has shape {tuple(tensor.shape)}, "
                f"expected {tuple(expected[key].shape)}"
            )
    model.classifier.load_state_dict({k: v.to(model.dtype) for k, v in state.items()})
    return model


def _expert_folder(folder: Path, index: int, name: str) -> Path:
    for candidate in (folder / name, folder / str(index)):
        if (candidate / ADAPTER_CONFIG).is_file():
            return candidate
    raise CheckpointError(f"{folder}: no folder for expert {name!r} (looked for {name}/ and {index}/)")
