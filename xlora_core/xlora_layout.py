"""The original xlora library's checkpoint layout (EricLBuehler/xlora, 2024), read as it is and written.

    folder/xlora_config.json             its xLoRAConfig's fields (json.dump, `device` left out). `adapters`
                                         lists the experts' names in the order they were given in training;
                                         until March 2024 it was a JSON object of paths, with fields since
                                         dropped (stop_token_id) and no base_model_id.
    folder/xlora_classifier.safetensors  inner.{i}.weight|bias (Linear layers; ReLU and Dropout take indices
                                         too) and last.weight|bias. Or xlora_classifier.pt (torch.save: pickle).
    folder/<expert>/                     each expert as peft saves several adapters; before 23 February 2024
                                         under folder/adapters/<expert>/.

The classifier's Linear layers map onto ours in order (`library_linear_names`). Where we run it differently
from the library, and why:
  - the library never put its classifier in eval mode, so its dropout also ran at inference; we run the
    classifier in eval mode (no dropout), as peft does;
  - with enable_softmax_topk the library applied one softmax over every kept scaling of the whole batch at
    once; we apply peft's per-token softmax over the kept experts;
  - before 11 April 2024 the library's scaling pass ran with the experts off whatever scaling_pass_value was;
    the same for the default value 0, which is what its checkpoints use.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .classifier import XLoraClassifier
from .config import XLoraConfig
from .lora import ADAPTER_CONFIG
from .ordering import Ordering, check_base_model_id, resolve_order
from .stored import CheckpointError, StoredCheckpoint, check_folder_names, copy_expert_files, write_folder_atomically

log = logging.getLogger("xlora_core.checkpoint")

XLORA_CONFIG = "xlora_config.json"
CLASSIFIER_SAFETENSORS = "xlora_classifier.safetensors"
CLASSIFIER_PICKLE = "xlora_classifier.pt"

# xLoRAConfig's fields in the order the library's dataclass declares (and json.dump writes) them.
LIBRARY_FIELDS = [
    "hidden_size", "base_model_id", "adapters", "enable_softmax", "enable_softmax_topk", "layerwise_scalings",
    "xlora_depth", "xlora_size", "enable_relu_and_dropout", "use_bias", "xlora_dropout_p", "use_trainable_adapters",
    "softmax_temperature", "top_k_lora", "scaling_pass_value", "global_scaling_weight",
]  # fmt: skip


def is_xlora_layout(folder: Path) -> bool:
    return (folder / XLORA_CONFIG).is_file()


def library_linear_names(config: XLoraConfig) -> list[str]:
    """The library's names of the classifier's Linear layers, input to output."""
    if config.xlora_depth == 1:
        return ["last"]
    # Each hidden layer is inner.{i} = Linear, then ReLU and Dropout (always both, whatever the dropout) if enabled.
    step = 3 if config.enable_relu_and_dropout else 1
    return [f"inner.{i * step}" for i in range(config.xlora_depth - 1)] + ["last"]


def _our_names_of_library_tensors(config: XLoraConfig) -> dict[str, str]:
    """Library tensor name -> our parameter name, for every tensor this config's classifier has."""
    with torch.device("meta"):  # only the structure is wanted: no memory, no init
        ours = XLoraClassifier(config, n_layers=1, n_classes=1).linear_names()
    suffixes = ["weight", "bias"] if config.use_bias else ["weight"]
    return {
        f"{theirs}.{suffix}": f"{mine}.{suffix}"
        for theirs, mine in zip(library_linear_names(config), ours, strict=True)
        for suffix in suffixes
    }


# ---- reading ------------------------------------------------------------------------------------------------


def read_xlora_layout(
    folder: Path,
    adapters: dict[str, str] | None,
    ordering: Ordering | None,
    allow_pickle: bool,
    overrides: dict[str, Any],
) -> StoredCheckpoint:
    config_path = folder / XLORA_CONFIG
    try:
        data = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{config_path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{config_path}: expected a JSON object of xLoRAConfig fields")
    if ordering is not None:
        check_base_model_id(ordering, data.get("base_model_id"), config_path)
    names, path_hints = _expert_names(data.get("adapters"), config_path, adapters, ordering)
    if adapters is not None:
        experts = {name: str(adapters[name]) for name in names}
    else:
        experts = {name: str(_expert_folder(folder, name, path_hints.get(name))) for name in names}

    depth = overrides.get("xlora_depth", data.get("xlora_depth", 1))
    if "enable_relu_and_dropout" not in data and "enable_relu_and_dropout" not in overrides and depth != 1:
        raise CheckpointError(
            f"{config_path}: enable_relu_and_dropout is not set and xlora_depth is {depth}; the library's default "
            "was false until April 2024 and true after, so say which it was trained with: add it to the file, or "
            "pass enable_relu_and_dropout= (Python) or xlora.enable_relu_and_dropout (YAML)"
        )
    fields = {k: v for k, v in data.items() if k not in ("adapters", "base_model_id")}
    if isinstance(data.get("base_model_id"), str):
        fields["base_model_name_or_path"] = data["base_model_id"]
    try:
        config = XLoraConfig.from_dict({**fields, **overrides, "adapters": experts})
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{config_path}: {e}") from None

    weights_path, tensors = _read_classifier(folder, allow_pickle)
    ours_of = _our_names_of_library_tensors(config)
    unexpected = [key for key in tensors if key not in ours_of]
    if unexpected:
        raise CheckpointError(
            f"{weights_path}: unexpected tensor(s) {unexpected}: with xlora_depth={config.xlora_depth}, "
            f"enable_relu_and_dropout={config.enable_relu_and_dropout} and use_bias={config.use_bias} the library's "
            f"classifier has {list(ours_of)}"
        )
    theirs_of = {mine: theirs for theirs, mine in ours_of.items()}
    _say_how_it_runs(config)
    return StoredCheckpoint(
        layout="xlora",
        folder=folder,
        config_path=config_path,
        weights_path=weights_path,
        config=config,
        classifier={ours_of[key]: tensor for key, tensor in tensors.items()},
        tensor_name=lambda key: theirs_of.get(key, key),
    )


def _expert_names(
    raw: Any, config_path: Path, adapters: dict[str, str] | None, ordering: Ordering | None
) -> tuple[list[str], dict[str, Any]]:
    """The experts' names in classifier order, and any paths the file gives for them."""
    path_hints: dict[str, Any] = {}
    if isinstance(raw, list):
        names, order_is_known = list(raw), True
    elif isinstance(raw, dict):
        names, order_is_known, path_hints = list(raw), False, dict(raw)
    elif raw is None and ordering is not None:
        names, order_is_known = list(ordering.order), True
    elif raw is None and adapters is not None:
        names, order_is_known = list(adapters), False
    elif raw is None:
        raise CheckpointError(
            f"{config_path}: names no experts (adapters is missing); give them in the order they were trained "
            "with: an ordering file (ordering= / xlora.ordering) or adapters= (xlora.adapters) in that order"
        )
    else:
        raise CheckpointError(f"{config_path}: adapters must be a list of expert names, got {raw!r}")
    if not names or not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
        raise CheckpointError(f"{config_path}: adapters must name each expert once, got {names!r}")
    if adapters is not None and set(adapters) != set(names):
        raise CheckpointError(
            f"{config_path}: adapters {sorted(adapters)} do not match the checkpoint's experts {names}; "
            "the classifier was trained for exactly those"
        )
    if ordering is not None:
        return resolve_order(ordering, names, order_is_known, config_path), path_hints
    if not order_is_known:
        source = "are a JSON object (as the library wrote them before March 2024)" if raw is not None else (
            "are not named in it, so they come from the adapters you gave")
        log.warning(
            "%s: the experts %s, which does not say which classifier output is which; assumed the order they "
            "are written in: %s. If training gave them in another order, pass an ordering file whose `order` "
            "lists them as trained (ordering= in Python, xlora.ordering in YAML), or convert the checkpoint "
            "once with xlora-convert --ordering FILE",
            config_path, source, names,
        )  # fmt: skip
    return names, path_hints


def _expert_folder(folder: Path, name: str, hint: Any) -> Path:
    candidates = [folder / name, folder / "adapters" / name]
    if name == "default":  # peft saves an adapter named "default" at the top of the folder
        candidates.insert(0, folder)
    if isinstance(hint, str) and hint:  # a path from an old config: absolute, or relative to the checkpoint
        hinted = Path(hint).expanduser()
        candidates.append(hinted if hinted.is_absolute() else folder / hinted)
    for candidate in candidates:
        if (candidate / ADAPTER_CONFIG).is_file():
            return candidate
    looked = ", ".join(str(c) for c in dict.fromkeys(candidates))
    raise CheckpointError(f"{folder}: no folder for expert {name!r} (looked for {ADAPTER_CONFIG} in {looked})")


def _read_classifier(folder: Path, allow_pickle: bool) -> tuple[Path, dict[str, torch.Tensor]]:
    safetensors_path, pickle_path = folder / CLASSIFIER_SAFETENSORS, folder / CLASSIFIER_PICKLE
    if safetensors_path.is_file():
        try:
            return safetensors_path, load_file(str(safetensors_path))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{safetensors_path}: cannot read ({e})") from None
    if not pickle_path.is_file():
        raise CheckpointError(
            f"{folder}: no classifier weights (expected {CLASSIFIER_SAFETENSORS} or {CLASSIFIER_PICKLE})"
        )
    if not allow_pickle:
        raise CheckpointError(
            f"{pickle_path}: the classifier was saved with torch.save, a pickle, and unpickling a file can run "
            "code it carries, so it is not read unless you opt in: allow_pickle=True (Python), "
            "xlora.allow_pickle: true (YAML), or xlora-convert --allow-pickle once to make a safetensors copy"
        )
    try:
        # Even when allowed, only tensors and plain containers are unpickled (weights_only).
        state = torch.load(pickle_path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several unpickling error types
        raise CheckpointError(f"{pickle_path}: cannot read ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{pickle_path}: expected a state dict of tensors")
    return pickle_path, dict(state)


def _say_how_it_runs(config: XLoraConfig) -> None:
    if config.xlora_depth > 1 and config.enable_relu_and_dropout and config.xlora_dropout_p > 0:
        log.info(
            "the xlora library left its classifier's dropout (p=%s) on at inference; it runs in eval mode here "
            "(no dropout), as in peft", config.xlora_dropout_p,
        )  # fmt: skip
    if config.enable_softmax_topk:
        log.warning(
            "enable_softmax_topk: the xlora library took one softmax over the kept scalings of the whole batch; "
            "here it is peft's softmax over each token's kept experts"
        )


# ---- writing ------------------------------------------------------------------------------------------------


def write_xlora_layout(stored: StoredCheckpoint, folder: str | Path, base_model_id: str) -> None:
    """Write a checkpoint in the library's current layout (what mistral.rs reads with an ordering file)."""
    config = stored.config
    names = list(config.adapters)
    check_folder_names(names)
    values = {**config.to_dict(), "base_model_id": base_model_id, "adapters": names}
    library_config = {name: values[name] for name in LIBRARY_FIELDS}
    ours_of = _our_names_of_library_tensors(config)
    tensors = {theirs: stored.classifier[mine].contiguous() for theirs, mine in ours_of.items()}

    def fill(tmp: Path) -> None:
        (tmp / XLORA_CONFIG).write_text(json.dumps(library_config))
        save_file(tensors, str(tmp / CLASSIFIER_SAFETENSORS), metadata={"format": "pt"})
        for name, source in config.adapters.items():
            copy_expert_files(Path(source), tmp / name)

    write_folder_atomically(folder, fill)
