"""Checkpoints in the original xlora library's layout, written the way that library writes them.

Written from its source (EricLBuehler/xlora: xlora_insertion.py `save_pretrained`, xlora_classifier.py,
xlora_config.py and their history), not from our loader, so the tests check our reading against the
library's writing:

- the experts: the library loads them into one PeftModel (`PeftModel.from_pretrained` for the first,
  `load_adapter` for the others, each under its name) and calls peft's own `save_pretrained`, which
  writes every adapter into `<folder>/<name>/`; before 23 February 2024 into `<folder>/adapters/<name>/`;
- `xlora_config.json`: `json.dump` of the config dataclass's `__dict__` without `device`, fields in
  declaration order; `adapters` becomes the list of names (since 9 March 2024); before, a dict: of
  `os.path.join(save_directory, name)` (23 February - 9 March) or of the paths the user gave (earlier);
  `stop_token_id` until 4 March 2024, `base_model_id` from 9 March 2024;
- the classifier: `inner` (a ModuleList: per hidden layer a Linear, then ReLU and Dropout if
  enable_relu_and_dropout) and `last`, saved with `safetensors.torch.save_model`, or its state dict
  with `torch.save` to `xlora_classifier.pt` when safe_serialization is off.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import save_model
from torch import nn

from .tiny_world import load_base

# Eras of the library's save_pretrained, by the date its writing changed.
CURRENT = "2024-03-09"  # adapters: list of names; base_model_id
DICT_OF_SAVED_PATHS = "2024-02-23"  # adapters: {name: <save_directory>/<name>}; stop_token_id; no base_model_id
NESTED = "2024-02-10"  # experts under adapters/; adapters: the paths the user gave


class LibraryClassifier(nn.Module):
    """The parameters of the library's xLoRAClassifier, built as its __init__ builds them."""

    def __init__(self, hidden_size: int, n_classes: int, n_layers: int, *, depth: int, size: int,
                 layerwise: bool, use_bias: bool, relu_and_dropout: bool, dropout_p: float = 0.2):  # fmt: skip
        super().__init__()
        out = n_classes * n_layers if layerwise else n_classes
        self.inner = nn.ModuleList([])
        width = hidden_size
        for _ in range(depth - 1):
            self.inner.append(nn.Linear(width, size, bias=use_bias))
            if relu_and_dropout:
                self.inner.append(nn.ReLU())
                self.inner.append(nn.Dropout(p=dropout_p))
            width = size
        self.last = nn.Linear(width, out, bias=use_bias)

    def linears(self) -> list[nn.Linear]:
        return [m for m in self.inner if isinstance(m, nn.Linear)] + [self.last]


def library_config(era: str, *, hidden_size: int, adapters: dict[str, str], save_directory: Path,
                   base_model_id: str = "tiny/base", **fields) -> dict:  # fmt: skip
    """The dict the library's save_pretrained dumps, in its dataclass's field order for `era`."""
    defaults = dict(
        enable_softmax=True, enable_softmax_topk=False, layerwise_scalings=False, xlora_depth=1, xlora_size=2048,
        # the default was False until 11 April 2024; save_pretrained writes the value either way
        enable_relu_and_dropout=era == CURRENT, use_bias=True, xlora_dropout_p=0.2,
    )  # fmt: skip
    defaults.update({k: v for k, v in fields.items() if k in defaults})
    rest = dict(use_trainable_adapters=False, softmax_temperature=1.0, top_k_lora=None, scaling_pass_value=0.0,
                global_scaling_weight=1.0)  # fmt: skip
    rest.update({k: v for k, v in fields.items() if k in rest})
    if era == CURRENT:
        return {"hidden_size": hidden_size, "base_model_id": base_model_id, "adapters": list(adapters),
                **defaults, **rest}  # fmt: skip
    if era == DICT_OF_SAVED_PATHS:
        saved = {name: os.path.join(str(save_directory), name) for name in adapters}
    else:
        saved = dict(adapters)  # the user's paths, as given to add_xlora_to_model
    return {"hidden_size": hidden_size, "adapters": saved, **defaults, "stop_token_id": None, **rest}


def save_library_checkpoint(folder: Path, base_folder: Path, experts: dict[str, str], classifier: LibraryClassifier,
                            config: dict, era: str = CURRENT, safe_serialization: bool = True) -> Path:  # fmt: skip
    """Write `folder` as the library's save_pretrained would, for a model built from `experts` (name -> PEFT
    adapter folder, in the order given to the library)."""
    items = list(experts.items())
    peft_model = PeftModel.from_pretrained(load_base(base_folder), items[0][1], adapter_name=items[0][0])
    for name, path in items[1:]:
        peft_model.load_adapter(path, adapter_name=name)
    experts_dir = folder / "adapters" if era == NESTED else folder
    experts_dir.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(experts_dir))  # every adapter, each in <experts_dir>/<name>/
    with open(folder / "xlora_config.json", "w") as f:
        json.dump(config, f)
    if safe_serialization:
        save_model(classifier, str(folder / "xlora_classifier.safetensors"))
    else:
        torch.save(classifier.state_dict(), folder / "xlora_classifier.pt")
    return folder


def create_ordering(base_folder: Path, target_modules: list[str], adapters: list[str], base_model_id: str) -> dict:
    """An ordering file as mistral.rs's scripts/create_ordering.py makes it: a LoRA adapter with the target
    modules is added to the base model, and its LoRA layers are numbered in named_modules order. (The script
    calls transformers' `add_adapter`, which injects with peft's `inject_adapter_in_model`; that needs a newer
    peft than ours, so the injection is called directly.)"""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners import lora

    model = inject_adapter_in_model(LoraConfig(target_modules=target_modules, init_lora_weights=False),
                                    load_base(base_folder), "default")  # fmt: skip
    layers, count = {}, 0
    for name, module in model.named_modules():
        if isinstance(module, lora.Linear):
            layers[name.split("lora_A.")[0]] = count
            count += 1
    return {"order": adapters, "layers": layers, "base_model_id": base_model_id}
