"""Many models over one base (xlora_core/hosted.py, docs/models.md): X-LoRA models, a plain PEFT adapter, the
base and fixed mixtures, chosen per row and decoded in one batch, each row as it is alone (float32).

The world: the tiny base and experts of tests/tiny_world.py. Model A routes experts 0 and 1; model B shares
expert 1 (the same matrices: loaded once) and adds expert 2 (modules A does not have); the adapter "solo"
targets up_proj, which no other expert does.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from xlora_core import BatchRow, DecodeBatch, ParameterError, Routing, RowDecoder, SamplingParams, XLoraModel

from .tiny_world import VOCAB, build_world, load_base, save_checkpoint

NEW_TOKENS = 8


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("models")
    base, experts = build_world(root)
    a = save_checkpoint(base, {"0": experts["0"], "1": experts["1"]}, root / "model-a")
    b = save_checkpoint(base, {"1": experts["1"], "2": experts["2"]}, root / "model-b")
    torch.manual_seed(5)
    solo = get_peft_model(load_base(base), LoraConfig(r=3, lora_alpha=6, target_modules=["up_proj"],
                                                      init_lora_weights=False))  # fmt: skip
    solo.save_pretrained(root / "solo")
    return {"base": base, "experts": experts, "a": a, "b": b, "solo": root / "solo"}


@pytest.fixture(scope="module")
def host(world) -> XLoraModel:
    model = XLoraModel.from_pretrained(load_base(world["base"]), world["a"])
    model.name = "A"
    model.add_xlora("B", world["b"])
    model.add_adapter("solo", world["solo"])
    model.add_base("base")
    return model


def requests() -> list[tuple[list[int], Routing]]:
    g = torch.Generator().manual_seed(3)
    routings = [
        Routing(), Routing(model="B"), Routing(model="solo"), Routing(model="base"),
        Routing(weights={"0": 0.7, "1": 0.3}), Routing(model="A", top_k=1), Routing(model="B", freeze_after=1),
        Routing(model="B", weights={"2": 1.5}, global_scaling_weight=0.5),
    ]  # fmt: skip
    lengths = [7, 3, 12, 5, 9, 4, 10, 6]
    return [(torch.randint(3, VOCAB, (n,), generator=g).tolist(), r) for n, r in zip(lengths, routings, strict=True)]


def rows() -> list[BatchRow]:
    params = SamplingParams(max_new_tokens=NEW_TOKENS)
    return [BatchRow(RowDecoder(params, None, prompt), routing) for prompt, routing in requests()]


def finish(batch: DecodeBatch) -> None:
    while batch:
        batch.step()


def test_models_experts_are_loaded_once_and_each_sees_its_own(host):
    assert [m.name for m in host.models()] == ["A", "B", "solo", "base"]
    assert host.n_experts_loaded == 4  # 0, 1, 2 and solo: B's expert 1 is A's
    b = host.hosted_model("B")
    assert b.experts == [1, 2] and b.expert_names == ["1", "2"]
    assert [m.kind for m in host.models()] == ["xlora", "xlora", "adapter", "base"]


def test_a_mixed_batch_gives_every_row_what_it_gets_alone(host):
    with torch.inference_mode():
        alone = []
        for row in rows():
            batch, _ = DecodeBatch.prefill(host, [row])
            finish(batch)
            alone.append(row)
        together = rows()
        batch, _ = DecodeBatch.prefill(host, together)
        finish(batch)
        joining = rows()
        batch, _ = DecodeBatch.prefill(host, joining[:3])
        batch.step()
        batch.step(joining=joining[3:6])  # newcomers of other models in the running rows' step
        late, _ = DecodeBatch.prefill(host, joining[6:])
        batch.concatenate([late])
        finish(batch)
    for i, (a, t, j) in enumerate(zip(alone, together, joining, strict=True)):
        assert len(a.decoder.completion_ids) == NEW_TOKENS
        assert t.decoder.completion_ids == a.decoder.completion_ids, f"row {i} together"
        assert j.decoder.completion_ids == a.decoder.completion_ids, f"row {i} joining"
        for other in (t, j):
            assert other.all_scalings().shape == a.all_scalings().shape
            diff = (other.all_scalings() - a.all_scalings()).abs()
            assert diff.numel() == 0 or diff.max() <= 1e-4, f"row {i} scalings"


def test_each_model_equals_its_own_single_model_server(host, world):
    """Model A and model B in the host give the tokens and scalings of an XLoraModel of that checkpoint alone."""
    prompt = torch.tensor([[5, 17, 33, 8, 61, 2, 40]])
    for name, folder in (("A", world["a"]), ("B", world["b"])):
        single = XLoraModel.from_pretrained(load_base(world["base"]), folder)
        want = single.generate(prompt, max_new_tokens=NEW_TOKENS)
        want_scalings = single.latest_scalings
        got = host.generate(prompt, max_new_tokens=NEW_TOKENS, model=name)
        assert torch.equal(got, want), name
        assert (host.latest_scalings - want_scalings).abs().max() <= 1e-4, name


def test_a_plain_adapter_equals_peft(host, world):
    ids = torch.randint(3, VOCAB, (2, 11), generator=torch.Generator().manual_seed(9))
    peft_model = PeftModel.from_pretrained(load_base(world["base"]), world["solo"]).eval()
    with torch.no_grad():
        want = peft_model(input_ids=ids).logits
        got = host(ids, routing=Routing(model="solo")).logits
        base = host(ids, routing=Routing(model="base")).logits
        plain = load_base(world["base"])(input_ids=ids).logits
    assert (got - want).abs().max() <= 1e-4
    assert (got - base).abs().max() > 1e-2  # the adapter changes the output
    assert (base - plain).abs().max() <= 1e-4


def test_a_mixture_is_xlora_with_the_classifier_output_replaced(host, world):
    ids = torch.randint(3, VOCAB, (1, 9), generator=torch.Generator().manual_seed(4))
    single = XLoraModel.from_pretrained(load_base(world["base"]), world["a"])
    fixed = torch.zeros(1, 9, single.n_lora_layers, 2)
    fixed[..., 0], fixed[..., 1] = 0.7, 0.3
    with torch.no_grad():
        want = single(ids, scalings=fixed).logits
        got = host(ids, routing=Routing(weights={"0": 0.7, "1": 0.3})).logits
    assert (got - want).abs().max() <= 1e-4


def test_routing_refusals_name_the_field(host):
    with pytest.raises(ParameterError) as e:
        host.generate(torch.tensor([[5, 6]]), max_new_tokens=1, routing=Routing(model="nope"))
    assert e.value.parameter == "model"
    with pytest.raises(ParameterError) as e:
        host.generate(torch.tensor([[5, 6]]), max_new_tokens=1, routing=Routing(weights={"2": 1.0}))
    assert e.value.parameter == "weights.2"  # expert 2 is B's, not A's
    for bad, field in (({"0": float("nan")}, "weights.0"), ({"0": 1e9}, "weights.0"), ({}, "weights")):
        with pytest.raises(ParameterError) as e:
            Routing(weights=bad)
        assert e.value.parameter == field
    with pytest.raises(ParameterError) as e:
        Routing(weights={"0": 1.0}, top_k=1)
    assert e.value.parameter == "top_k"


def test_removing_a_model_frees_its_own_experts_and_layers_only(world):
    host = XLoraModel.from_pretrained(load_base(world["base"]), world["a"])
    prompt = torch.tensor([[5, 17, 33, 8, 61, 2, 40]])
    want_a = host.generate(prompt, max_new_tokens=NEW_TOKENS)
    host.add_xlora("B", world["b"])
    host.add_adapter("solo", world["solo"])
    want_b = host.generate(prompt, max_new_tokens=NEW_TOKENS, model="B")
    want_solo = host.generate(prompt, max_new_tokens=NEW_TOKENS, model="solo")
    layers = host.n_lora_layers
    kept_layers, kept_experts = host.remove("B")  # expert 2 and its gate/down layers go; expert 1 is A's too
    assert kept_experts == [0, 1, 3] and host.n_experts_loaded == 3
    assert len(kept_layers) == host.n_lora_layers < layers
    assert torch.equal(host.generate(prompt, max_new_tokens=NEW_TOKENS), want_a)
    assert torch.equal(host.generate(prompt, max_new_tokens=NEW_TOKENS, model="solo"), want_solo)
    host.remove("solo")
    assert host.n_experts_loaded == 2 and host.n_lora_layers == len(host.primary.layers)
    assert torch.equal(host.generate(prompt, max_new_tokens=NEW_TOKENS), want_a)
    host.add_xlora("B", world["b"])  # loaded again, it answers as before
    assert torch.equal(host.generate(prompt, max_new_tokens=NEW_TOKENS, model="B"), want_b)
