"""xlora-convert: rewrite an X-LoRA checkpoint in another layout, checked against its base model.

    xlora-convert /models/x-lora checkpoints/paper --base /models/zephyr-7b-beta \\
        --ordering xlora-paper-ordering.json                       # the xlora library's layout -> ours
    xlora-convert checkpoints/default out/default-xlora --base default --to xlora
                                                                   # ours -> the library's, + ordering file
    xlora-convert lamm-mit/x-lora checkpoints/paper --base HuggingFaceH4/zephyr-7b-beta
                                                                   # Hub ids (only the base's config is fetched)

The source may be in our (= peft's) layout or the xlora library's (detected). `--to xlora` also writes a
mistral.rs ordering file (default: beside the output folder, <out>.ordering.json), so the router runs on
mistral.rs too (`--rename json=json_expert` gives an expert a name mistral.rs can tell from its file
names). Only the base model's config is read (no weights), to know its LoRA modules and their order.
The experts' files are copied byte for byte and the classifier's tensors keep their values and dtype,
so converting back gives the same files.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from xlora_core.base_model import resolve_model_folder
from xlora_core.checkpoint import check_against_model, lora_module_names, read_checkpoint, write_checkpoint
from xlora_core.config import XLoraConfig
from xlora_core.hub import HubError, hub_folder
from xlora_core.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, ExpertError
from xlora_core.model import XLoraModel
from xlora_core.ordering import write_ordering
from xlora_core.stored import CheckpointError, StoredCheckpoint
from xlora_core.xlora_layout import CLASSIFIER_SAFETENSORS, XLORA_CONFIG, write_xlora_layout

log = logging.getLogger("xlora_core.convert")


def meta_base_model(spec: str, cache_dir: str | None = None) -> PreTrainedModel:
    """The base model's modules without its weights (on the meta device): its config.json is all that is read
    (and all that is fetched of a Hugging Face Hub id)."""
    config = AutoConfig.from_pretrained(resolve_model_folder(str(hub_folder(spec, "--base", files=["*.json"])),
                                                             cache_dir))  # fmt: skip
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def convert(
    source: str | Path,
    target: str | Path,
    *,
    base: str,
    to: str = "ours",
    ordering: str | Path | None = None,
    ordering_out: str | Path | None = None,
    base_model_id: str | None = None,
    allow_pickle: bool = False,
    rename: dict[str, str] | None = None,
    overwrite: bool = False,
    cache_dir: str | None = None,
) -> StoredCheckpoint:
    """Read `source` (any layout), check it against the base model's modules, write `target` in `to`'s layout."""
    source, target = hub_folder(source, "checkpoint"), Path(target)
    if to not in ("ours", "xlora"):
        raise ValueError(f"to must be 'ours' or 'xlora', got {to!r}")
    if target.resolve() == source.resolve():
        raise ValueError(f"{target}: the output folder must not be the checkpoint being converted")
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise ValueError(f"{target}: exists and is not empty (--overwrite replaces it)")
    stored = read_checkpoint(source, ordering=ordering, allow_pickle=allow_pickle)
    model = XLoraModel(meta_base_model(base, cache_dir), stored.config)
    check_against_model(stored, model)
    modules = lora_module_names(model)
    log.info("read %s (%s layout): experts %s, %d LoRA layers", source, stored.layout, list(stored.config.adapters),
             len(modules))  # fmt: skip
    if rename:
        stored.config = _renamed(stored.config, rename)
    if to == "ours":
        write_checkpoint(stored, target)
        log.info("wrote %s (xlora-server's layout; serve it with xlora.checkpoint: %s)", target, target)
        return stored
    model_id = base_model_id or stored.config.base_model_name_or_path or _experts_base_model(stored)
    if not model_id:
        raise ValueError(
            "the xlora library's layout and mistral.rs need the base model's id (base_model_id), and neither the "
            "checkpoint nor its experts name one: pass --base-model-id (e.g. HuggingFaceH4/zephyr-7b-beta)"
        )
    _warn_about_mistralrs_names(list(stored.config.adapters))
    stored.config.base_model_name_or_path = model_id
    write_xlora_layout(stored, target, model_id)
    ordering_path = Path(ordering_out) if ordering_out else target.with_name(target.name + ".ordering.json")
    write_ordering(ordering_path, list(stored.config.adapters), modules, model_id)
    log.info("wrote %s (the xlora library's layout) and its ordering file %s", target, ordering_path)
    return stored


def _renamed(config: XLoraConfig, rename: dict[str, str]) -> XLoraConfig:
    """The same experts in the same order, some under new names."""
    unknown = sorted(set(rename) - set(config.adapters))
    if unknown:
        raise ValueError(f"--rename: no expert named {unknown} (the experts are {list(config.adapters)})")
    adapters = {rename.get(name, name): folder for name, folder in config.adapters.items()}
    if len(adapters) != len(config.adapters):
        raise ValueError(f"--rename: two experts would be named alike ({list(adapters)})")
    return XLoraConfig.from_dict({**config.to_dict(), "adapters": adapters})


def _experts_base_model(stored: StoredCheckpoint) -> str | None:
    """The base model the experts' adapter_config.json files all name, if they agree."""
    found = set()
    for folder in stored.config.adapters.values():
        try:
            found.add(json.loads((Path(folder) / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path"))
        except (OSError, ValueError):
            return None
    return found.pop() if len(found) == 1 else None


def _warn_about_mistralrs_names(names: list[str]) -> None:
    # mistral.rs finds an expert's files by looking for its name inside each file's path.
    for name in names:
        clashes = [n for n in names if n != name and name in n]
        clashes += [f for f in (XLORA_CONFIG, CLASSIFIER_SAFETENSORS, ADAPTER_CONFIG, ADAPTER_WEIGHTS) if name in f]
        if clashes:
            log.warning(
                "expert %r: mistral.rs takes a file whose path contains an expert's name for that expert's, and "
                "%r is part of %s; give it another name for mistral.rs (--rename %s=NEW)", name, name, clashes, name,
            )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="xlora-convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("source", help="checkpoint folder (xlora-server's/peft's layout or the xlora library's) or "
                        "Hugging Face Hub id (org/name[@revision])")  # fmt: skip
    parser.add_argument("target", help="output folder")
    parser.add_argument("--base", required=True, help="the base model: 'default', a .gguf file, a transformers "
                        "folder or a Hugging Face Hub id (only its config is read)")  # fmt: skip
    parser.add_argument("--to", choices=["ours", "xlora"], default="ours",
                        help="ours (default): xlora-server's layout; xlora: the xlora library's, with a mistral.rs "
                        "ordering file")  # fmt: skip
    parser.add_argument("--ordering", help="a mistral.rs ordering file the source must agree with (and that gives "
                        "the expert order of an old checkpoint whose experts are a JSON object)")  # fmt: skip
    parser.add_argument("--ordering-out", help="where --to xlora writes the ordering file "
                        "(default: <target>.ordering.json)")  # fmt: skip
    parser.add_argument("--base-model-id", help="the base model's hub id, for --to xlora (default: the checkpoint's "
                        "or its experts' base_model_name_or_path)")  # fmt: skip
    parser.add_argument("--allow-pickle", action="store_true", help="read a classifier saved as xlora_classifier.pt "
                        "(a pickle: only for files you trust)")  # fmt: skip
    parser.add_argument("--rename", action="append", default=[], metavar="OLD=NEW",
                        help="give an expert another name in the output (repeatable); its place stays the same")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    parser.add_argument("--cache-dir", help="where a .gguf base model is converted once")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="xlora-convert: %(message)s")
    rename = dict(pair.split("=", 1) for pair in args.rename if "=" in pair)
    if len(rename) != len(args.rename) or not all(rename.values()):
        parser.error("--rename takes OLD=NEW")
    try:
        convert(args.source, args.target, base=args.base, to=args.to, ordering=args.ordering,
                ordering_out=args.ordering_out, base_model_id=args.base_model_id, allow_pickle=args.allow_pickle,
                rename=rename, overwrite=args.overwrite, cache_dir=args.cache_dir)  # fmt: skip
    except (CheckpointError, ExpertError, HubError, ValueError, FileNotFoundError) as e:
        print(f"xlora-convert: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
