"""xlora-convert: the xlora library's layout <-> ours, checked against the base model; round trips are exact."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from xlora_core import XLoraConfig, XLoraModel
from xlora_core.cli.convert import main as convert

from .tiny_world import EXPERT_SPECS, VOCAB, build_world, load_base
from .xlora_library import CURRENT, LibraryClassifier, create_ordering, library_config, save_library_checkpoint

NAMES = ["zeta", "alpha", "mid"]  # training order; not the alphabetical one
TARGETS = sorted({m for spec in EXPERT_SPECS for m in spec["target_modules"]})
EXPERT_FILES = ["adapter_config.json", "adapter_model.safetensors"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base, experts = build_world(tmp_path_factory.mktemp("convert"), names=NAMES)
    return base, {name: experts[name] for name in NAMES}


def logits(model: XLoraModel) -> torch.Tensor:
    ids = torch.arange(3, 3 + 12).view(2, 6) % VOCAB
    with torch.no_grad():
        return model(ids).logits


def library_checkpoint(folder: Path, world, *, safe: bool = True) -> Path:
    """Depth 2, layerwise, biases, in bfloat16 as the paper's classifier is."""
    base, experts = world
    n_layers = XLoraModel(load_base(base), XLoraConfig(hidden_size=32, adapters=experts)).n_lora_layers
    torch.manual_seed(5)
    classifier = LibraryClassifier(32, len(NAMES), n_layers, depth=2, size=8, layerwise=True, use_bias=True,
                                   relu_and_dropout=True).to(torch.bfloat16)  # fmt: skip
    config = library_config(CURRENT, hidden_size=32, adapters=experts, save_directory=folder, xlora_depth=2,
                            xlora_size=8, layerwise_scalings=True, base_model_id="tiny/base")  # fmt: skip
    return save_library_checkpoint(folder, base, experts, classifier, config, safe_serialization=safe)


def assert_same_files(a: Path, b: Path, config_name: str, weights_name: str) -> None:
    assert json.loads((a / config_name).read_text()) == json.loads((b / config_name).read_text())
    first, second = load_file(a / weights_name), load_file(b / weights_name)
    assert list(first) == list(second)
    for key in first:
        assert first[key].dtype == second[key].dtype and torch.equal(first[key], second[key]), key
    for name in NAMES:
        for file in EXPERT_FILES:
            assert (a / name / file).read_bytes() == (b / name / file).read_bytes(), f"{name}/{file}"


def test_library_layout_to_ours_and_back_is_exact(tmp_path, world):
    base = world[0]
    original = library_checkpoint(tmp_path / "library", world)
    ordering = tmp_path / "paper-ordering.json"
    ordering.write_text(json.dumps(create_ordering(base, TARGETS, NAMES, "tiny/base")))

    assert convert([str(original), str(tmp_path / "ours"), "--base", str(base), "--ordering", str(ordering)]) == 0
    ours = XLoraModel.from_pretrained(load_base(base), tmp_path / "ours")
    assert ours.adapter_names == NAMES and ours.config.base_model_name_or_path == "tiny/base"
    assert torch.equal(logits(ours), logits(XLoraModel.from_pretrained(load_base(base), original)))

    back = tmp_path / "library-again"
    assert convert([str(tmp_path / "ours"), str(back), "--base", str(base), "--to", "xlora"]) == 0
    assert_same_files(original, back, "xlora_config.json", "xlora_classifier.safetensors")
    assert json.loads((tmp_path / "library-again.ordering.json").read_text()) == json.loads(ordering.read_text())


def test_ours_to_library_layout_and_back_is_exact(tmp_path, world):
    base, experts = world
    torch.manual_seed(9)
    config = XLoraConfig(hidden_size=32, adapters=experts, xlora_depth=3, xlora_size=8, layerwise_scalings=True,
                         use_bias=False, top_k_lora=2, base_model_name_or_path="tiny/base")  # fmt: skip
    model = XLoraModel(load_base(base), config)
    model.save_pretrained(tmp_path / "ours")

    library, ordering = tmp_path / "library", tmp_path / "mistralrs-ordering.json"
    args = [str(tmp_path / "ours"), str(library), "--base", str(base), "--to", "xlora", "--ordering-out", str(ordering)]
    assert convert(args) == 0
    saved = json.loads((library / "xlora_config.json").read_text())
    assert saved["adapters"] == NAMES and saved["base_model_id"] == "tiny/base" and saved["use_bias"] is False
    assert sorted(load_file(library / "xlora_classifier.safetensors")) == ["inner.0.weight", "inner.3.weight",
                                                                           "last.weight"]  # fmt: skip
    # The ordering file is what mistral.rs's own script writes for these experts.
    assert json.loads(ordering.read_text()) == create_ordering(base, TARGETS, NAMES, "tiny/base")
    served = XLoraModel.from_pretrained(load_base(base), library, ordering=ordering)
    assert torch.equal(logits(model), logits(served))

    assert convert([str(library), str(tmp_path / "ours-again"), "--base", str(base), "--ordering", str(ordering)]) == 0
    assert_same_files(tmp_path / "ours", tmp_path / "ours-again", "adapter_config.json", "adapter_model.safetensors")


def test_refusals_are_reported_without_a_traceback(tmp_path, world, capsys):
    base = world[0]
    pickled = library_checkpoint(tmp_path / "pickled", world, safe=False)
    assert convert([str(pickled), str(tmp_path / "out"), "--base", str(base)]) == 1
    err = capsys.readouterr().err
    assert "xlora_classifier.pt" in err and "pickle" in err and "--allow-pickle" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()

    assert convert([str(pickled), str(tmp_path / "out"), "--base", str(base), "--allow-pickle"]) == 0
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    assert convert([str(pickled), str(tmp_path / "out"), "--base", str(base), "--allow-pickle"]) == 1
    assert "exists and is not empty" in capsys.readouterr().err

    shutil.rmtree(pickled / "mid")
    assert convert([str(pickled), str(tmp_path / "out2"), "--base", str(base), "--allow-pickle"]) == 1
    assert "no folder for expert 'mid'" in capsys.readouterr().err


def test_the_console_script_is_installed():
    script = Path(sys.executable).with_name("xlora-convert")
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--ordering" in result.stdout and "--to {ours,xlora}" in result.stdout


def test_rename_gives_experts_new_names_in_the_same_places(tmp_path, world, capsys):
    base, experts = world
    torch.manual_seed(3)
    model = XLoraModel(load_base(base), XLoraConfig(hidden_size=32, adapters=experts, xlora_depth=2, xlora_size=8))
    model.save_pretrained(tmp_path / "ours")
    args = [str(tmp_path / "ours"), str(tmp_path / "library"), "--base", str(base), "--to", "xlora"]
    assert convert([*args, "--rename", "alpha=mid"]) == 1
    assert "two experts would be named alike" in capsys.readouterr().err
    assert convert([*args, "--rename", "omega=z"]) == 1
    assert "no expert named ['omega']" in capsys.readouterr().err
    assert convert([*args, "--rename", "zeta=first", "--rename", "mid=third"]) == 0
    ordering = tmp_path / "library.ordering.json"
    assert json.loads(ordering.read_text())["order"] == ["first", "alpha", "third"]
    renamed = XLoraModel.from_pretrained(load_base(base), tmp_path / "library", ordering=ordering)
    assert renamed.adapter_names == ["first", "alpha", "third"]
    assert torch.equal(logits(model), logits(renamed))
