"""What an X-LoRA checkpoint folder holds, whatever its layout.

Each layout has its reader (checkpoint.py: ours, which is peft's; xlora_layout.py: the original xlora
library's). A reader returns a `StoredCheckpoint`: the config, the classifier's tensors under our
parameter names, and each expert's folder, in expert index order. Loading a model and converting
between layouts both start from one, so a checkpoint is checked the same way whatever is done with it.
The layouts' writers share the file plumbing at the end (expert copies, atomic replacement).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .config import XLoraConfig
from .lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS

if TYPE_CHECKING:
    import torch

    from .ordering import Ordering


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as it is; the message names the file and what is wrong."""


@dataclass
class StoredCheckpoint:
    """A checkpoint as read from disk, not yet attached to a base model.

    config: adapters maps each expert's name to its folder, in the order of the classifier's outputs.
    classifier: tensors under `XLoraClassifier.state_dict()` names ('layers.0.weight', ...).
    tensor_name: our parameter name -> the name that tensor has (or would have) in `weights_path`, so a
        message names what the user can find in the file.
    ordering: the mistral.rs ordering file it was checked against, if any (its layers are checked
        once the base model says which LoRA modules there are).
    """

    layout: str
    folder: Path
    config_path: Path
    weights_path: Path
    config: XLoraConfig
    classifier: dict[str, torch.Tensor]
    tensor_name: Callable[[str], str]
    ordering: Ordering | None = None


def check_classifier(stored: StoredCheckpoint, expected: dict[str, torch.Tensor], n_layers: int) -> None:
    """Refuse classifier tensors that are missing, unexpected or misshapen for the experts, naming each by its
    name in the file and giving both shapes. `expected` is the state dict of a classifier built for the
    experts (its tensors may live on the meta device: only shapes are read)."""
    path = stored.weights_path
    missing = [stored.tensor_name(k) for k in expected if k not in stored.classifier]
    if missing:
        raise CheckpointError(f"{path}: missing classifier tensor(s) {missing}")
    unexpected = [stored.tensor_name(k) for k in stored.classifier if k not in expected]
    if unexpected:
        raise CheckpointError(f"{path}: unexpected tensor(s) {unexpected} for this config")
    n_experts = stored.config.n_adapters
    for key in expected:  # the classifier's order: a weight before its bias
        tensor, want = stored.classifier[key], tuple(expected[key].shape)
        if tuple(tensor.shape) != want:
            raise CheckpointError(
                f"{path}: {stored.tensor_name(key)} has shape {tuple(tensor.shape)}, but {n_experts} experts with "
                f"{n_layers} LoRA layers (xlora_depth={stored.config.xlora_depth}, xlora_size="
                f"{stored.config.xlora_size}, layerwise_scalings={stored.config.layerwise_scalings}) need {want}"
            )


# ---- writing, shared by the layouts' writers -----------------------------------------------------------------

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def check_folder_names(names: list[str]) -> None:
    """Expert names become folder names; refuse any that cannot be one."""
    for name in names:
        if not _SAFE_NAME.match(name):
            raise ValueError(f"expert name {name!r} cannot be a folder name; use letters, digits, '_', '.', '-'")


def copy_expert_files(source: Path, target: Path) -> None:
    """Copy one PEFT LoRA expert (its config and weights, nothing else) into a new folder."""
    target.mkdir()
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        shutil.copyfile(source / name, target / name)


def write_folder_atomically(folder: str | Path, fill: Callable[[Path], None]) -> None:
    """Let `fill` write into a temporary folder beside `folder`, then put it in place of `folder`, so an
    interrupted write never leaves a half checkpoint (nor destroys the previous one)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        fill(tmp)
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
