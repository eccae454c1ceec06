"""Checkpoints (ours and peft's layout), expert validation and config validation."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft import XLoraConfig as PeftXLoraConfig
from safetensors.torch import load_file, save_file

from xlora_core import XLoraConfig, XLoraModel
from xlora_core.checkpoint import CheckpointError
from xlora_core.lora import ExpertError

from .tiny_world import VOCAB, build_world, load_base, save_expert, save_tiny_base


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("ckpt"), names=["alpha", "beta", "gamma"])


def make_model(world, **config) -> XLoraModel:
    base, experts = world
    torch.manual_seed(9)
    return XLoraModel(load_base(base), XLoraConfig(hidden_size=32, adapters=experts, **config))


def logits(model: XLoraModel, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


IDS = torch.arange(3, 3 + 12).view(1, 12) % VOCAB


@pytest.mark.parametrize("depth", [1, 3])
def test_round_trip_is_exact(tmp_path, depth):
    # Names out of alphabetical order: the saved order is the expert index.
    world = build_world(tmp_path / "w", names=["zeta", "beta", "gamma"])
    model = make_model(world, xlora_depth=depth, xlora_size=8, layerwise_scalings=True, top_k_lora=2)
    model.save_pretrained(tmp_path / "ckpt")
    saved = json.loads((tmp_path / "ckpt" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "XLORA" and saved["top_k_lora"] == 2 and saved["xlora_depth"] == depth
    assert list(saved["adapters"].items()) == [("zeta", "zeta"), ("beta", "beta"), ("gamma", "gamma")]
    tensors = load_file(tmp_path / "ckpt" / "adapter_model.safetensors")
    assert "internal_xlora_classifier.layers.0.weight" in tensors
    for name in ("zeta", "beta", "gamma"):
        assert (tmp_path / "ckpt" / name / "adapter_model.safetensors").is_file()

    reloaded = XLoraModel.from_pretrained(load_base(world[0]), tmp_path / "ckpt")
    assert reloaded.adapter_names == model.adapter_names and reloaded.config.top_k_lora == 2
    assert torch.equal(logits(model, IDS), logits(reloaded, IDS))

    # adapters= overrides the experts' folders (here: the original ones).
    overridden = XLoraModel.from_pretrained(load_base(world[0]), tmp_path / "ckpt", adapters=world[1])
    assert torch.equal(logits(model, IDS), logits(overridden, IDS))
    with pytest.raises(CheckpointError, match="do not match"):
        XLoraModel.from_pretrained(load_base(world[0]), tmp_path / "ckpt", adapters={"zeta": world[1]["zeta"]})


def test_reads_peft_layout_and_names_what_peft_dropped(tmp_path):
    base, experts = build_world(tmp_path / "w")  # peft needs experts named "0", "1", ...
    peft_model = get_peft_model(
        load_base(base), PeftXLoraConfig(task_type="CAUSAL_LM", hidden_size=32, adapters=experts, xlora_depth=2)
    ).eval()
    peft_model.save_pretrained(tmp_path / "peft")
    # peft 0.21.2 writes expert subfolders "0", "1", ... that lack the modules of some layers.
    with pytest.raises(ExpertError, match=r"expert '\d'.*(has no weights|holds no LoRA tensors)"):
        XLoraModel.from_pretrained(load_base(base), tmp_path / "peft")
    # With the experts' own folders (as peft's from_pretrained also takes them), the tensor that
    # peft dropped from the classifier is named.
    with pytest.raises(CheckpointError, match=r"internal_xlora_classifier\.layers\.0\.weight"):
        XLoraModel.from_pretrained(load_base(base), tmp_path / "peft", adapters=experts)

    # Put back what peft dropped, under peft's own key names: then the model is peft's exactly.
    path = tmp_path / "peft" / "adapter_model.safetensors"
    tensors = load_file(path)
    for key, value in peft_model.state_dict().items():
        if "internal_xlora_classifier.layers.0" in key:
            tensors[key] = value
    save_file(tensors, path)
    ours = XLoraModel.from_pretrained(load_base(base), tmp_path / "peft", adapters=experts)
    with torch.no_grad():
        assert (peft_model(input_ids=IDS).logits - ours(IDS).logits).abs().max() <= 1e-4


def test_broken_checkpoints_are_refused_with_the_file_named(world, tmp_path):
    make_model(world, xlora_depth=2, xlora_size=8).save_pretrained(tmp_path / "ok")
    corrupt = tmp_path / "corrupt"
    shutil.copytree(tmp_path / "ok", corrupt)
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="adapter_model.safetensors"):
        XLoraModel.from_pretrained(load_base(world[0]), corrupt)

    corrupt_expert = tmp_path / "corrupt_expert"
    shutil.copytree(tmp_path / "ok", corrupt_expert)
    (corrupt_expert / "beta" / "adapter_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ExpertError, match="expert 'beta'"):
        XLoraModel.from_pretrained(load_base(world[0]), corrupt_expert)

    missing_expert = tmp_path / "missing_expert"
    shutil.copytree(tmp_path / "ok", missing_expert)
    shutil.rmtree(missing_expert / "gamma")
    with pytest.raises(CheckpointError, match="expert 'gamma'"):
        XLoraModel.from_pretrained(load_base(world[0]), missing_expert)

    with pytest.raises(CheckpointError, match="not found"):
        XLoraModel.from_pretrained(load_base(world[0]), tmp_path / "nowhere")


def test_save_overwrites_atomically(world, tmp_path):
    first = make_model(world, xlora_depth=1)
    first.save_pretrained(tmp_path / "ckpt")
    second = make_model(world, xlora_depth=2, xlora_size=4)
    second.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp folder left behind
    reloaded = XLoraModel.from_pretrained(load_base(world[0]), tmp_path / "ckpt")
    assert torch.equal(logits(second, IDS), logits(reloaded, IDS))


def test_experts_that_do_not_fit_are_refused(world, tmp_path):
    base, experts = world
    other_base = save_tiny_base(tmp_path / "wide", hidden_size=48)
    wide = save_expert(other_base, tmp_path / "wide-expert", seed=1, r=4, target_modules=["q_proj"])
    with pytest.raises(ExpertError, match=r"expert 'wide'.*model\.layers\.0\.self_attn\.q_proj"):
        XLoraModel(load_base(base), XLoraConfig(hidden_size=32, adapters={**experts, "wide": str(wide)}))

    dora = tmp_path / "dora"
    model = get_peft_model(load_base(base), LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    model.save_pretrained(dora)
    with pytest.raises(ExpertError, match="expert 'dora'.*DoRA.*not supported"):
        XLoraModel(load_base(base), XLoraConfig(hidden_size=32, adapters={"dora": str(dora)}))

    foreign = tmp_path / "foreign"
    shutil.copytree(experts["alpha"], foreign)
    tensors = load_file(foreign / "adapter_model.safetensors")
    tensors = {k.replace("self_attn.q_proj", "self_attn.qkv"): v for k, v in tensors.items()}
    save_file(tensors, foreign / "adapter_model.safetensors")
    with pytest.raises(ExpertError, match=r"expert 'foreign'.*self_attn\.qkv.*does not exist"):
        XLoraModel(load_base(base), XLoraConfig(hidden_size=32, adapters={"foreign": str(foreign)}))

    with pytest.raises(ExpertError, match="expert 'ghost'.*not found"):
        XLoraModel(load_base(base), XLoraConfig(hidden_size=32, adapters={"ghost": str(tmp_path / "none")}))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("top_k_lora", 0),
        ("top_k_lora", 4),
        ("xlora_depth", 0),
        ("softmax_temperature", 0.0),
        ("global_scaling_weight", float("nan")),
        ("global_scaling_weight", float("inf")),
        ("scaling_pass_value", float("nan")),
        ("adapters", {}),
    ],
)
def test_config_errors_name_the_field(field, value):
    adapters = {"a": "x", "b": "y", "c": "z"}
    kwargs = {"hidden_size": 32, "adapters": adapters, field: value}
    with pytest.raises(ValueError, match=field):
        XLoraConfig(**kwargs)


def test_runtime_setters_validate(world):
    model = make_model(world)
    with pytest.raises(ValueError, match="top_k"):
        model.set_topk_lora(4)
    with pytest.raises(ValueError, match="global_scaling_weight"):
        model.set_global_scaling_weight(float("inf"))
    model.set_topk_lora(1)
    model.set_global_scaling_weight(0.8)
    assert (model.routing.top_k, model.routing.global_scaling_weight) == (1, 0.8)


def test_the_xlora_library_switches_round_trip_and_stay_out_of_peft_files(world, tmp_path):
    plain = make_model(world, xlora_depth=2, xlora_size=8)
    plain.save_pretrained(tmp_path / "plain")
    saved = json.loads((tmp_path / "plain" / "adapter_config.json").read_text())
    assert "use_bias" not in saved and "enable_relu_and_dropout" not in saved  # peft's classifier: peft's keys only

    switched = make_model(world, xlora_depth=3, xlora_size=8, use_bias=False, enable_relu_and_dropout=False)
    assert all(not k.endswith("bias") for k in switched.classifier.state_dict())
    assert not any(isinstance(m, torch.nn.ReLU | torch.nn.Dropout) for m in switched.classifier.layers)
    switched.save_pretrained(tmp_path / "switched")
    saved = json.loads((tmp_path / "switched" / "adapter_config.json").read_text())
    assert saved["use_bias"] is False and saved["enable_relu_and_dropout"] is False
    reloaded = XLoraModel.from_pretrained(load_base(world[0]), tmp_path / "switched")
    assert torch.equal(logits(switched, IDS), logits(reloaded, IDS))


def test_an_ordering_file_is_checked_against_our_layout_too(world, tmp_path):
    model = make_model(world, xlora_depth=1)
    model.save_pretrained(tmp_path / "ckpt")
    modules = [n for n, m in model.base.named_modules() if m in model.lora_layers]
    ordering = tmp_path / "ordering.json"
    layers = {name: i for i, name in enumerate(modules)}
    ordering.write_text(json.dumps({"order": ["alpha", "beta", "gamma"], "layers": layers, "base_model_id": "tiny"}))
    checked = XLoraModel.from_pretrained(load_base(world[0]), tmp_path / "ckpt", ordering=ordering)
    assert torch.equal(logits(model, IDS), logits(checked, IDS))
    ordering.write_text(json.dumps({"order": ["beta", "alpha", "gamma"], "layers": None}))
    with pytest.raises(CheckpointError, match=r"ordering\.json: order .* differs from the order .*adapter_config"):
        XLoraModel.from_pretrained(load_base(world[0]), tmp_path / "ckpt", ordering=ordering)
