"""Checkpoints in the original xlora library's layout and mistral.rs ordering files, loaded as they are.

Each checkpoint is written here the way the library writes it (tests/xlora_library.py) and holds the same
weights as a peft.XLoraModel, whose logits ours must match (float32, max abs diff <= 1e-4). The experts are
given to the library in an order that is not their alphabetical one, so a loader that sorted them, or
followed the folders on disk, would route to the wrong experts and fail the parity checks.
"""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from peft import XLoraConfig as PeftXLoraConfig
from peft import get_peft_model

from xlora_core import XLoraModel
from xlora_core.checkpoint import CheckpointError

from .tiny_world import EXPERT_SPECS, VOCAB, build_world, load_base
from .xlora_library import (
    CURRENT,
    DICT_OF_SAVED_PATHS,
    NESTED,
    LibraryClassifier,
    create_ordering,
    library_config,
    save_library_checkpoint,
)

TOL = 1e-4
NAMES = ["zeta", "alpha", "mid"]  # the order the experts were given in training; sorted, it is alpha, mid, zeta
TARGETS = sorted({m for spec in EXPERT_SPECS for m in spec["target_modules"]})
SIZE = 16


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base, experts = build_world(tmp_path_factory.mktemp("library"), names=NAMES)
    return base, {name: experts[name] for name in NAMES}


def peft_model_for(world, order: list[str], **config):
    """peft's XLoraModel on the same base and experts, experts in `order` (peft names them "0", "1", ...)."""
    base, experts = world
    torch.manual_seed(123)
    adapters = {str(i): experts[name] for i, name in enumerate(order)}
    xlora = PeftXLoraConfig(task_type="CAUSAL_LM", hidden_size=32, adapters=adapters, xlora_size=SIZE, **config)
    return get_peft_model(load_base(base), xlora).eval()


def peft_linears(peft_model) -> list[torch.nn.Linear]:
    layers = peft_model.base_model.internal_xlora_classifier.layers
    return [m for m in layers if isinstance(m, torch.nn.Linear)]


def classifier_from_peft(peft_model, *, depth: int, layerwise: bool, use_bias: bool) -> LibraryClassifier:
    """The library's classifier holding peft's classifier weights (peft's biases zeroed when the library's has none)."""
    n_layers = peft_model.base_model.internal_xlora_classifier.n_layers
    theirs = LibraryClassifier(32, len(NAMES), n_layers, depth=depth, size=SIZE, layerwise=layerwise,
                               use_bias=use_bias, relu_and_dropout=True)  # fmt: skip
    with torch.no_grad():
        for library_linear, peft_linear in zip(theirs.linears(), peft_linears(peft_model), strict=True):
            library_linear.weight.copy_(peft_linear.weight)
            if use_bias:
                library_linear.bias.copy_(peft_linear.bias)
            else:
                peft_linear.bias.zero_()
    return theirs


def write(tmp_path, world, classifier, era=CURRENT, order=NAMES, safe=True, name="ckpt", **fields):
    base, experts = world
    folder = tmp_path / name
    given = {n: experts[n] for n in order}
    config = library_config(era, hidden_size=32, adapters=given, save_directory=folder, xlora_size=SIZE, **fields)
    if era == NESTED:  # the paths of the machine it was trained on, which do not exist here
        config["adapters"] = {n: f"/train/run-7/experts/{n}" for n in order}
    return save_library_checkpoint(folder, base, given, classifier, config, era=era, safe_serialization=safe)


def assert_parity(peft_model, ours: XLoraModel, seed: int = 0) -> None:
    torch.manual_seed(seed)
    ids = torch.randint(3, VOCAB, (2, 11))
    with torch.no_grad():
        expected, got = peft_model(input_ids=ids).logits, ours(ids).logits
    assert (expected - got).abs().max() <= TOL
    assert (peft_model.get_latest_scalings() - ours.get_latest_scalings()).abs().max() <= TOL


def logits(model: XLoraModel) -> torch.Tensor:
    ids = torch.arange(3, 3 + 12).view(1, 12) % VOCAB
    with torch.no_grad():
        return model(ids).logits


# ---- parity with peft ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("layerwise", [False, True])
@pytest.mark.parametrize("depth", [1, 2])
def test_logits_match_peft(tmp_path, world, depth, layerwise, use_bias):
    peft_model = peft_model_for(world, NAMES, xlora_depth=depth, layerwise_scalings=layerwise)
    classifier = classifier_from_peft(peft_model, depth=depth, layerwise=layerwise, use_bias=use_bias)
    folder = write(tmp_path, world, classifier, xlora_depth=depth, layerwise_scalings=layerwise, use_bias=use_bias)
    ours = XLoraModel.from_pretrained(load_base(world[0]), folder)
    assert ours.adapter_names == NAMES and ours.config.use_bias is use_bias
    assert not ours.classifier.training  # the library never switched its dropout off; we run in eval mode
    assert_parity(peft_model, ours)


def test_a_deeper_classifier_keeps_the_librarys_layer_indices(tmp_path, world):
    # depth 3 with ReLU and dropout: the library's Linear layers are inner.0, inner.3 and last.
    peft_model = peft_model_for(world, NAMES, xlora_depth=3, layerwise_scalings=True)
    classifier = classifier_from_peft(peft_model, depth=3, layerwise=True, use_bias=True)
    folder = write(tmp_path, world, classifier, xlora_depth=3, layerwise_scalings=True)
    ours = XLoraModel.from_pretrained(load_base(world[0]), folder)
    assert_parity(peft_model, ours)


@pytest.mark.parametrize("depth", [2, 3])
def test_without_relu_and_dropout_the_classifier_is_a_stack_of_linear_layers(tmp_path, world, depth):
    # peft cannot leave the ReLU out, but Linear layers with nothing between them are one Linear layer:
    # peft's depth-1 classifier holding the product of the library's weights is the reference.
    peft_model = peft_model_for(world, NAMES, xlora_depth=1, layerwise_scalings=True)
    n_layers = peft_model.base_model.internal_xlora_classifier.n_layers
    torch.manual_seed(depth)
    theirs = LibraryClassifier(32, len(NAMES), n_layers, depth=depth, size=SIZE, layerwise=True, use_bias=True,
                               relu_and_dropout=False)  # fmt: skip
    weight, bias = torch.eye(32), torch.zeros(32)
    for linear in theirs.linears():
        weight, bias = linear.weight @ weight, linear.weight @ bias + linear.bias
    with torch.no_grad():
        peft_linears(peft_model)[0].weight.copy_(weight)
        peft_linears(peft_model)[0].bias.copy_(bias)
    folder = write(tmp_path, world, theirs, xlora_depth=depth, layerwise_scalings=True, enable_relu_and_dropout=False)
    ours = XLoraModel.from_pretrained(load_base(world[0]), folder)
    assert ours.config.enable_relu_and_dropout is False
    assert_parity(peft_model, ours)


def test_greedy_generation_matches_peft(tmp_path, world):
    peft_model = peft_model_for(world, NAMES, xlora_depth=2, layerwise_scalings=True)
    classifier = classifier_from_peft(peft_model, depth=2, layerwise=True, use_bias=False)
    folder = write(tmp_path, world, classifier, xlora_depth=2, layerwise_scalings=True, use_bias=False)
    ours = XLoraModel.from_pretrained(load_base(world[0]), folder)
    prompt = torch.randint(3, VOCAB, (1, 7))
    expected = peft_model.generate(input_ids=prompt, max_new_tokens=32, do_sample=False)
    assert ours.generate(prompt, max_new_tokens=32).tolist() == expected.tolist()


# ---- the library's older layouts ----------------------------------------------------------------------------


@pytest.mark.parametrize("era", [DICT_OF_SAVED_PATHS, NESTED])
def test_older_layouts_load_and_say_which_order_they_assumed(tmp_path, world, era, caplog):
    peft_model = peft_model_for(world, NAMES, xlora_depth=1, layerwise_scalings=True)
    classifier = classifier_from_peft(peft_model, depth=1, layerwise=True, use_bias=True)
    folder = write(tmp_path, world, classifier, era=era, layerwise_scalings=True)
    saved = json.loads((folder / "xlora_config.json").read_text())
    assert isinstance(saved["adapters"], dict) and "stop_token_id" in saved and "base_model_id" not in saved
    with caplog.at_level(logging.WARNING, logger="xlora_core.checkpoint"):
        ours = XLoraModel.from_pretrained(load_base(world[0]), folder)
    assert ours.adapter_names == NAMES
    assert_parity(peft_model, ours)
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert "assumed the order" in warning and str(NAMES) in warning and "ordering" in warning


def test_an_ordering_file_gives_an_old_checkpoint_its_training_order(tmp_path, world, caplog):
    # An old dict written in another order than training's (as a hand-edited or re-serialized config may be):
    # the ordering file says which classifier output is which expert.
    peft_model = peft_model_for(world, NAMES, xlora_depth=1, layerwise_scalings=True)
    classifier = classifier_from_peft(peft_model, depth=1, layerwise=True, use_bias=True)
    folder = write(tmp_path, world, classifier, era=DICT_OF_SAVED_PATHS, order=sorted(NAMES), layerwise_scalings=True)
    guessed = XLoraModel.from_pretrained(load_base(world[0]), folder)
    assert guessed.adapter_names == sorted(NAMES)
    with torch.no_grad():
        ids = torch.randint(3, VOCAB, (2, 11))
        assert (peft_model(input_ids=ids).logits - guessed(ids).logits).abs().max() > 10 * TOL

    ordering = tmp_path / "ordering.json"
    ordering.write_text(json.dumps(create_ordering(world[0], TARGETS, NAMES, "tiny/base")))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="xlora_core.checkpoint"):
        ours = XLoraModel.from_pretrained(load_base(world[0]), folder, ordering=ordering)
    assert ours.adapter_names == NAMES and not caplog.records
    assert_parity(peft_model, ours)


# ---- mistral.rs ordering files ------------------------------------------------------------------------------


def test_an_ordering_file_that_agrees_is_accepted(tmp_path, world):
    peft_model = peft_model_for(world, NAMES, xlora_depth=2, layerwise_scalings=True)
    folder = write(tmp_path, world, classifier_from_peft(peft_model, depth=2, layerwise=True, use_bias=True),
                   xlora_depth=2, layerwise_scalings=True)  # fmt: skip
    ordering = tmp_path / "ordering.json"
    ordering.write_text(json.dumps(create_ordering(world[0], TARGETS, NAMES, "tiny/base")))
    ours = XLoraModel.from_pretrained(load_base(world[0]), folder, ordering=ordering)
    assert_parity(peft_model, ours)


def test_ordering_files_that_disagree_are_refused_naming_the_difference(tmp_path, world):
    peft_model = peft_model_for(world, NAMES, xlora_depth=1)
    folder = write(tmp_path, world, classifier_from_peft(peft_model, depth=1, layerwise=False, use_bias=True))
    base = world[0]

    def refused(ordering: dict, *needles: str) -> None:
        path = tmp_path / "ordering.json"
        path.write_text(json.dumps(ordering))
        with pytest.raises(CheckpointError) as e:
            XLoraModel.from_pretrained(load_base(base), folder, ordering=path)
        for needle in (str(path), *needles):
            assert needle in str(e.value), str(e.value)

    refused(create_ordering(base, TARGETS, sorted(NAMES), "tiny/base"),
            "differs from the order", str(NAMES), "output 0", "'zeta' there and 'alpha' here")  # fmt: skip
    refused(create_ordering(base, TARGETS, ["zeta", "alpha"], "tiny/base"), "in the checkpoint only: mid")
    refused(create_ordering(base, ["q_proj", "v_proj"], NAMES, "tiny/base"),
            "other LoRA modules", "targeted but not listed", "k_proj")  # fmt: skip
    moved = create_ordering(base, TARGETS, NAMES, "tiny/base")
    first, second = list(moved["layers"])[:2]
    moved["layers"][first], moved["layers"][second] = 1, 0
    refused(moved, f"layers puts {first} at 1", "output for it is 0")
    refused(create_ordering(base, TARGETS, NAMES, "other/base"), "base_model_id 'other/base'", "'tiny/base'")
    lora_only = create_ordering(base, TARGETS, NAMES, "tiny/base")
    del lora_only["order"]
    refused(lora_only, "no `order`", "not for X-LoRA")


# ---- refusals -----------------------------------------------------------------------------------------------


def test_a_classifier_for_other_experts_is_refused_naming_the_tensor_and_both_shapes(tmp_path, world):
    n_layers = peft_model_for(world, NAMES, xlora_depth=1).base_model.internal_xlora_classifier.n_layers
    two = LibraryClassifier(32, 2, n_layers, depth=2, size=SIZE, layerwise=True, use_bias=True, relu_and_dropout=True)
    folder = write(tmp_path, world, two, xlora_depth=2, layerwise_scalings=True)
    with pytest.raises(CheckpointError, match=rf"last\.weight has shape \({2 * n_layers}, {SIZE}\), but 3 experts "
                       rf"with {n_layers} LoRA layers .* need \({3 * n_layers}, {SIZE}\)"):  # fmt: skip
        XLoraModel.from_pretrained(load_base(world[0]), folder)


def test_a_classifier_of_another_structure_is_refused_naming_its_tensors(tmp_path, world):
    # Saved without ReLU and dropout (inner.0, inner.1, last) but the config says they were on.
    n_layers = peft_model_for(world, NAMES, xlora_depth=1).base_model.internal_xlora_classifier.n_layers
    plain = LibraryClassifier(32, 3, n_layers, depth=3, size=SIZE, layerwise=False, use_bias=True,
                              relu_and_dropout=False)  # fmt: skip
    folder = write(tmp_path, world, plain, xlora_depth=3, enable_relu_and_dropout=True)
    refusal = r"unexpected tensor\(s\) \[[^]]*'inner\.1\.weight'.*the library's classifier has \['inner\.0\.weight'"
    with pytest.raises(CheckpointError, match=refusal):
        XLoraModel.from_pretrained(load_base(world[0]), folder)


def test_a_missing_expert_folder_is_refused_naming_it(tmp_path, world):
    peft_model = peft_model_for(world, NAMES, xlora_depth=1)
    folder = write(tmp_path, world, classifier_from_peft(peft_model, depth=1, layerwise=False, use_bias=True))
    shutil.rmtree(folder / "mid")
    with pytest.raises(CheckpointError, match=r"no folder for expert 'mid' \(looked for adapter_config.json in .*mid"):
        XLoraModel.from_pretrained(load_base(world[0]), folder)


def test_a_pickled_classifier_needs_an_opt_in(tmp_path, world):
    peft_model = peft_model_for(world, NAMES, xlora_depth=2, layerwise_scalings=True)
    classifier = classifier_from_peft(peft_model, depth=2, layerwise=True, use_bias=True)
    folder = write(tmp_path, world, classifier, safe=False, xlora_depth=2, layerwise_scalings=True)
    assert (folder / "xlora_classifier.pt").is_file() and not (folder / "xlora_classifier.safetensors").exists()
    with pytest.raises(CheckpointError, match=r"xlora_classifier\.pt: .*pickle.*can run code.*allow_pickle=True"):
        XLoraModel.from_pretrained(load_base(world[0]), folder)
    ours = XLoraModel.from_pretrained(load_base(world[0]), folder, allow_pickle=True)
    assert_parity(peft_model, ours)


def test_an_unsaid_relu_switch_is_asked_for_where_it_matters(tmp_path, world):
    peft_model = peft_model_for(world, NAMES, xlora_depth=2, layerwise_scalings=True)
    folder = write(tmp_path, world, classifier_from_peft(peft_model, depth=2, layerwise=True, use_bias=True),
                   xlora_depth=2, layerwise_scalings=True)  # fmt: skip
    config = json.loads((folder / "xlora_config.json").read_text())
    del config["enable_relu_and_dropout"]
    (folder / "xlora_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="enable_relu_and_dropout is not set and xlora_depth is 2"):
        XLoraModel.from_pretrained(load_base(world[0]), folder)
    ours = XLoraModel.from_pretrained(load_base(world[0]), folder, enable_relu_and_dropout=True)
    assert_parity(peft_model, ours)
