"""Numerical parity with peft.XLoraModel (peft 0.21.2), float32, max abs diff <= 1e-4."""

from __future__ import annotations

import itertools

import pytest
import torch
from peft import XLoraConfig as PeftXLoraConfig
from peft import get_peft_model

from xlora_core import XLoraConfig, XLoraModel

from .tiny_world import VOCAB, build_world, load_base

TOL = 1e-4


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("parity"))


def build_pair(world, **config):
    """The same base, experts and classifier weights in peft's XLoraModel and ours."""
    base_folder, experts = world
    kwargs = dict(hidden_size=32, adapters=experts, xlora_size=16, **config)
    torch.manual_seed(123)
    peft_model = get_peft_model(load_base(base_folder), PeftXLoraConfig(task_type="CAUSAL_LM", **kwargs)).eval()
    ours = XLoraModel(load_base(base_folder), XLoraConfig(**kwargs))
    classifier = {
        k.split("internal_xlora_classifier.")[1]: v
        for k, v in peft_model.state_dict().items()
        if "internal_xlora_classifier" in k
    }
    ours.classifier.load_state_dict(classifier)
    return peft_model, ours


def set_switches(peft_model, ours, *, softmax, softmax_topk, top_k, pass_value, weight, temperature):
    peft_config = peft_model.base_model.xlora_config
    peft_config.enable_softmax = ours.config.enable_softmax = softmax
    peft_config.enable_softmax_topk = ours.config.enable_softmax_topk = softmax_topk
    peft_model.base_model.internal_xlora_classifier.softmax.temperature = temperature
    ours.config.softmax_temperature = temperature
    peft_model.base_model.set_topk_lora(top_k)
    ours.set_topk_lora(top_k)
    peft_model.base_model.set_scaling_pass_value(pass_value)
    ours.set_scaling_pass_value(pass_value)
    peft_model.base_model.set_global_scaling_weight(weight)
    ours.set_global_scaling_weight(weight)


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("layerwise", [False, True])
def test_logits_and_scalings_match_peft_for_every_switch(world, depth, layerwise):
    peft_model, ours = build_pair(world, xlora_depth=depth, layerwise_scalings=layerwise)
    assert ours.n_lora_layers == peft_model.base_model.internal_xlora_classifier.n_layers
    torch.manual_seed(0)
    ids = torch.randint(3, VOCAB, (2, 11))
    combos = itertools.product([True, False], [False, True], [None, 1, 2], [0.0, 0.5], [1.0, 0.7], [1.0, 0.5])
    checked = 0
    for softmax, softmax_topk, top_k, pass_value, weight, temperature in combos:
        if temperature != 1.0 and not softmax:
            continue  # temperature only acts through the softmax
        set_switches(
            peft_model, ours, softmax=softmax, softmax_topk=softmax_topk, top_k=top_k,
            pass_value=pass_value, weight=weight, temperature=temperature,
        )  # fmt: skip
        with torch.no_grad():
            expected = peft_model(input_ids=ids).logits
            got = ours(ids).logits
        label = f"softmax={softmax} softmax_topk={softmax_topk} top_k={top_k} pass={pass_value} w={weight}"
        assert (expected - got).abs().max() <= TOL, label
        assert (peft_model.get_latest_scalings() - ours.get_latest_scalings()).abs().max() <= TOL, label
        checked += 1
    assert checked == 72


def test_the_experts_change_the_output(world):
    """Guards the parity test against experts or a router that do nothing."""
    _, ours = build_pair(world, xlora_depth=2)
    ids = torch.randint(3, VOCAB, (1, 8))
    with torch.no_grad():
        routed = ours(ids).logits
        ours.set_global_scaling_weight(0.0)
        base_only = ours(ids).logits
    assert (routed - base_only).abs().max() > 1e-2


def test_greedy_generation_matches_peft_and_the_uncached_reference(world):
    peft_model, ours = build_pair(world, xlora_depth=2)
    prompt = torch.randint(3, VOCAB, (1, 7))
    expected = peft_model.generate(input_ids=prompt, max_new_tokens=64, do_sample=False)
    got = ours.generate(prompt, max_new_tokens=64)
    assert got.shape == (1, 7 + 64)
    assert got.tolist() == expected.tolist()

    # The uncached two-pass reference: both passes over the whole sequence for every new token.
    ids = prompt
    with torch.no_grad():
        for _ in range(64):
            ids = torch.cat([ids, ours(ids).logits[:, -1:].argmax(-1)], dim=1)
    assert ids.tolist() == got.tolist()
    # Scalings of the whole generation, as peft's last (uncached) forward saw them.
    assert (ours.get_latest_scalings() - peft_model.get_latest_scalings()).abs().max() <= TOL


def test_processors_match_transformers_generate(world):
    """repetition_penalty and min_new_tokens go through transformers' processors, as in peft's generate."""
    peft_model, ours = build_pair(world, xlora_depth=2)
    prompt = torch.randint(3, VOCAB, (1, 6))
    kwargs = dict(max_new_tokens=24, do_sample=False, repetition_penalty=1.5, min_new_tokens=5, eos_token_id=7)
    expected = peft_model.generate(input_ids=prompt, **kwargs)
    assert ours.generate(prompt, **kwargs).tolist() == expected.tolist()
