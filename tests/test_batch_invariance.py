"""A row's answer does not depend on what else is in its batch (README "Batch invariance"): at temperature
0 the same tokens alone, prefilled together with 7 others, joining a running batch mid-step, prefilled in
chunks under a token budget shared with the running rows, and from a prefix cache filled by other requests,
in the default dtype (bfloat16 on CPUs with native bf16, where this is exact; float32 elsewhere).

The model is a random Llama wide enough (hidden 256) for bfloat16 rounding to change tokens when a kernel's
order of additions changes with the batch: before xlora_core/batch_invariant.py, 3 of these 8 rows changed.
It runs on its float weights, on its weights quantized to int8 and int4 (xlora_core/quantize.py), and as a
Llama with a bias on every linear layer (Qwen2's q, k and v have them; the compiled step adds them in its
joint matmuls).
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile

import pytest
import torch
from torch.nn import functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from xlora_core import (
    BatchRow,
    DecodeBatch,
    Routing,
    RowDecoder,
    SamplingParams,
    XLoraConfig,
    XLoraModel,
    compiled_step,
    native,
)
from xlora_core.base_model import resolve_dtype
from xlora_core.batch_invariant import (
    ROWS_PER_CALL,
    least_rows,
    left_padded_spans,
    linear,
    one_query_attention,
    probe_inputs,
    ragged_spans,
    rows_fixed,
)
from xlora_core.prefix_cache import PrefixCache
from xlora_core.quantize import quantize_base

from .tiny_world import VOCAB, save_expert

NEW_TOKENS = 12


@pytest.fixture(scope="module", params=["none", "int8", "int4", "bias"])
def model(tmp_path_factory, request) -> XLoraModel:
    root = tmp_path_factory.mktemp("invariance")
    torch.manual_seed(0)
    bias = request.param == "bias"
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        attention_bias=bias, mlp_bias=bias,
    )  # fmt: skip
    llama = LlamaForCausalLM(config)
    with torch.no_grad():
        for module in llama.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_(std=0.1)  # transformers initializes them to 0
    llama.save_pretrained(root / "base")
    targets = [["q_proj", "v_proj", "gate_proj"], ["k_proj", "o_proj", "up_proj"], ["down_proj", "q_proj"]]
    experts = {
        f"e{i}": str(save_expert(root / "base", root / f"e{i}", seed=20 + i, gain=2.0, r=8, lora_alpha=16,
                                 target_modules=t))
        for i, t in enumerate(targets)
    }  # fmt: skip
    dtype = resolve_dtype("auto", "cpu")  # the default dtype on this CPU
    quantize = "none" if bias else request.param
    base = quantize_base(LlamaForCausalLM.from_pretrained(root / "base", dtype=dtype).eval(), quantize)
    base.generation_config.eos_token_id = None  # random weights: every row runs its full length
    torch.manual_seed(1)
    return XLoraModel(base, XLoraConfig(hidden_size=256, adapters=experts, xlora_depth=2, xlora_size=64))


def requests() -> list[tuple[list[int], Routing]]:
    """8 prompts of 3 to 90 tokens; granular, frozen and top-k rows."""
    g = torch.Generator().manual_seed(7)
    lengths = [9, 3, 90, 17, 5, 26, 11, 33]
    routings = [Routing(), Routing(freeze_after=0), Routing(), Routing(top_k=1), Routing(freeze_after=3),
                Routing(), Routing(global_scaling_weight=0.5), Routing()]  # fmt: skip
    return [(torch.randint(3, VOCAB, (n,), generator=g).tolist(), r) for n, r in zip(lengths, routings, strict=True)]


def rows() -> list[BatchRow]:
    params = SamplingParams(max_new_tokens=NEW_TOKENS)
    return [BatchRow(RowDecoder(params, None, prompt), routing) for prompt, routing in requests()]


def finish(batch: DecodeBatch, max_tokens: int | None = None) -> None:
    while batch:
        batch.step(max_tokens=max_tokens)


def from_prefix_cache(
    model: XLoraModel, max_tokens: int | None = None, same: int = 2
) -> tuple[list[BatchRow], PrefixCache]:
    """Other prompts that begin as these do (all but their last `same` tokens) fill a prefix cache; then these
    join a running batch from it."""
    prefix_cache = PrefixCache(1 << 30)
    batch = DecodeBatch(model, [], None, prefix_cache)
    batch.step(joining=[BatchRow(RowDecoder(SamplingParams(max_new_tokens=1), None, p[:-same] + [4]), r)
                        for p, r in requests()])  # fmt: skip
    finish(batch)
    cached = rows()
    batch = DecodeBatch(model, [], None, prefix_cache)
    batch.step(joining=cached[:2])
    batch.step(joining=cached[2:], max_tokens=max_tokens)
    finish(batch, max_tokens=max_tokens)
    return cached, prefix_cache


def test_a_row_gets_the_same_tokens_alone_together_joining_mid_step_in_chunks_and_from_the_prefix_cache(model):
    with torch.inference_mode():
        alone = []
        for row in rows():
            batch, _ = DecodeBatch.prefill(model, [row])
            finish(batch)
            alone.append(row)

        together = rows()
        batch, _ = DecodeBatch.prefill(model, together)
        finish(batch)

        joining = rows()
        batch, _ = DecodeBatch.prefill(model, joining[:2])
        batch.step()
        batch.step(joining=joining[2:5])  # newcomers in the running rows' step
        batch.step()
        late, _ = DecodeBatch.prefill(model, joining[5:])  # prefilled apart, then concatenated
        batch.concatenate([late])
        finish(batch)

        chunked = rows()  # at most 7 tokens a step: long prompts in chunks, beside running rows
        batch = DecodeBatch(model, [], None)
        batch.step(joining=chunked[:3], max_tokens=7)
        batch.step(max_tokens=7)
        batch.step(joining=chunked[3:], max_tokens=7)
        finish(batch, max_tokens=7)

        lone = rows()  # each alone, 16 tokens a step: its cache grows in place
        for row in lone:
            batch = DecodeBatch(model, [], None)
            batch.step(joining=[row], max_tokens=16)
            finish(batch, max_tokens=16)

        cached, prefix_cache = from_prefix_cache(model, max_tokens=40)

    assert max(row.chunks for row in chunked) > 3 and prefix_cache.hits == 3
    assert max(row.chunks for row in lone) == 6  # 90 tokens
    for i, (a, t, j, c, p, n) in enumerate(zip(alone, together, joining, chunked, cached, lone, strict=True)):
        assert t.decoder.completion_ids == a.decoder.completion_ids, f"row {i} together"
        assert j.decoder.completion_ids == a.decoder.completion_ids, f"row {i} joining"
        assert c.decoder.completion_ids == a.decoder.completion_ids, f"row {i} in chunks"
        assert p.decoder.completion_ids == a.decoder.completion_ids, f"row {i} from the prefix cache"
        assert n.decoder.completion_ids == a.decoder.completion_ids, f"row {i} alone in chunks"
        for other in (t, j, c, p, n):
            assert (other.all_scalings() - a.all_scalings()).abs().max() <= 1e-3, f"row {i} scalings"


def test_with_the_compiled_step_prompts_fed_a_token_a_row_get_the_same_tokens_in_any_batch(model, tmp_path_factory):
    """With the packaged compiled step, prompts go into the running rows' steps a token a row
    (XLoraModel.decode_rows): each of the 8 rows alone, all together, joining a running batch at three steps, 7
    tokens a step, and from a prefix cache that other prompts filled (their full blocks, or all but the last
    token: tails): the same tokens and scalings. The package is built as the default builds it (AUTOTUNE), with
    its weights frozen, and with only inductor's C++ GEMM (the default with AMX) it holds each joint weight once."""
    if reason := compiled_step.supported(model):
        pytest.skip(reason)
    if not native.load():
        pytest.skip("the C++ attention kernel cannot be built here")
    path = compiled_step.package_path(model, tmp_path_factory.mktemp("compiled"))
    compiled_step.build_package_once(model, path)
    step = compiled_step.load_package(path)
    if compiled_step.AUTOTUNE == "none":
        # Weights frozen into the package (inductor freezes them only when built without grad): every matmul is
        # oneDNN's on a packed constant, none aten's on a weight as exported; 4 a layer (q, k and v one matmul,
        # o, gate and up one, down: compiled_step.joint_weights).
        with zipfile.ZipFile(path) as archive:
            code = "".join(archive.read(n).decode() for n in archive.namelist() if n.endswith(".wrapper.cpp"))
        assert "aoti_torch_cpu_mm_out(" not in code and "aoti_torch_cpu_addmm_out(" not in code
        assert code.count("aoti_torch_cpu__linear_pointwise(") == 4 * model.base.config.num_hidden_layers
    if compiled_step.AUTOTUNE == "CPP":  # with ATEN too, a matmul oneDNN wins keeps its weight as stored, once
        # A layer's base weight and experts' A are one matmul's weight (compiled_step.joint_weights), which the
        # C++ GEMM packs; the package keeps only the packed copy (batch_invariant.frozen_linear says why).
        for runner in step.runners:
            constants = runner.get_constant_fqns()
            stored = [name for name in constants if name.startswith("_tensor_constant")]  # joint weights as stored
            assert not stored and any(name.startswith("constant") for name in constants), sorted(constants)
    model.use_packaged_step(step)
    try:
        with torch.inference_mode():
            alone = []
            for row in rows():
                batch = DecodeBatch(model, [], None)
                batch.step(joining=[row])
                finish(batch)
                alone.append(row)

            together = rows()
            batch = DecodeBatch(model, [], None)
            batch.step(joining=together)
            finish(batch)

            joining = rows()
            batch = DecodeBatch(model, [], None)
            batch.step(joining=joining[:2])
            batch.step()
            batch.step(joining=joining[2:5])
            batch.step()
            batch.step(joining=joining[5:])
            finish(batch)

            budget = rows()
            batch = DecodeBatch(model, [], None)
            batch.step(joining=budget[:3], max_tokens=7)
            batch.step(max_tokens=7)
            batch.step(joining=budget[3:], max_tokens=7)
            finish(batch, max_tokens=7)

            cached, prefix_cache = from_prefix_cache(model)
            tailed, tail_cache = from_prefix_cache(model, same=1)  # prompts that differ in their last token only
    finally:
        model.use_packaged_step(None)

    # The 90-token prompt alone took 6 steps of 16 tokens; with 7 tokens a step, more (an eager prefill: 1).
    assert alone[2].chunks == 6 and budget[2].chunks > 6 and prefix_cache.hits == 3
    assert tail_cache.hits == 8 and [row.reused_tokens for row in tailed] == [len(p) - 1 for p, _ in requests()]
    assert all(row.chunks == 1 for row in tailed)
    others = (("together", together), ("joining", joining), ("7 a step", budget), ("prefix", cached), ("tail", tailed))
    for i, a in enumerate(alone):
        for name, other in others:
            assert other[i].decoder.completion_ids == a.decoder.completion_ids, f"row {i} {name}"
            assert torch.equal(other[i].all_scalings(), a.all_scalings()), f"row {i} {name} scalings"


@pytest.mark.skipif(
    not rows_fixed(torch.zeros(1, dtype=torch.bfloat16), torch.zeros(1, dtype=torch.bfloat16)),
    reason="this CPU has no native bfloat16: linear is F.linear",
)
def test_linear_gives_each_row_the_same_bits_for_any_number_of_rows():
    """The shapes of the embedded default's layers, LoRA matrices and classifier, 1 to 40 rows, on inputs that
    show any change in the order of a row's additions (`probe_inputs`, other seeds than least_rows measured
    with), and on plain random ones."""
    shapes = [(1536, 576), (576, 1536), (576, 24), (1536, 24), (24, 576), (24, 1536), (192, 576), (3, 256), (8, 1)]
    with torch.inference_mode():
        for seed, (out_features, in_features) in enumerate(shapes):
            sharp = probe_inputs(out_features, in_features, rows=40, seed=100 + seed)
            g = torch.Generator().manual_seed(seed)
            plain = (torch.randn(40, in_features, generator=g), torch.randn(out_features, in_features, generator=g))
            for x, weight in (sharp, tuple(t.bfloat16() for t in plain)):
                one_by_one = torch.cat([linear(x[i : i + 1], weight) for i in range(40)])
                for n in (2, 3, 8, ROWS_PER_CALL, ROWS_PER_CALL + 1, ROWS_PER_CALL + 2, 40):
                    assert torch.equal(linear(x[:n], weight), one_by_one[:n]), (out_features, in_features, n)
            assert 1 <= least_rows(out_features, in_features) <= ROWS_PER_CALL


needs_kernel = pytest.mark.skipif(not native.load(), reason="the C++ attention kernel cannot be built here")


def sdpa_row(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """One row's one query [heads, dim] over its keys [kv heads, keys, dim], by PyTorch's SDPA."""
    out = F.scaled_dot_product_attention(query[None, :, None], key[None], value[None], scale=0.125, enable_gqa=True)
    return out[0, :, 0]


@needs_kernel
@pytest.mark.parametrize("dim", [64, 40])
def test_the_one_query_kernel_agrees_with_sdpa_and_gives_each_row_the_same_bits(dim):
    """A left-padded decode step of 8 rows (3 to 300 keys) and a ragged one (cached keys, then new ones): each
    row within 1e-5 of SDPA, and bit for bit what it gets alone, with 1 or 2 threads."""
    g = torch.Generator().manual_seed(3)
    lengths = [5, 17, 33, 64, 300, 129, 3, 77]
    width = max(lengths)
    query = torch.randn(8, 9, 1, dim, generator=g)
    key, value = torch.randn(2, 8, 3, width + 5, dim, generator=g)  # 5 columns of room, never read
    mask = torch.zeros(8, width, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, width - n :] = 1
    together = one_query_attention(query, key, value, left_padded_spans(mask, 1), 0.125)
    threads = torch.get_num_threads()
    try:
        for n_threads in (1, 2):
            torch.set_num_threads(n_threads)
            for i, n in enumerate(lengths):
                k, v = key[i : i + 1, :, width - n : width].clone(), value[i : i + 1, :, width - n : width].clone()
                alone = one_query_attention(query[i : i + 1], k, v, left_padded_spans(torch.ones(1, n), 1), 0.125)
                assert torch.equal(alone[0], together[i]), (i, n_threads)
                assert (together[i, 0] - sdpa_row(query[i, :, 0], k[0], v[0])).abs().max() < 1e-5
    finally:
        torch.set_num_threads(threads)

    # Ragged: row r's keys are its cached ones, then its new one (ragged_spans); here 3 rows, one token each.
    cached = [4, 0, 11]
    flat = torch.randn(2, 1, 3, sum(cached) + 3, dim, generator=g)
    q = torch.randn(1, 9, 3, dim, generator=g)
    out = one_query_attention(q, flat[0], flat[1], ragged_spans(cached, [1, 1, 1]), 0.125)
    at = 0
    for r, c in enumerate(cached):
        columns = [*range(at, at + c), sum(cached) + r]
        expected = sdpa_row(q[0, :, r], flat[0, 0][:, columns], flat[1, 0][:, columns])
        assert (out[0, r] - expected).abs().max() < 1e-5, r
        at += c


@needs_kernel
def test_the_one_query_kernel_gives_a_prompts_tokens_and_a_row_with_a_gap_the_bits_of_contiguous_keys():
    """What XLoraModel.decode_rows asks of it: query rows that read another cache row (a prompt's tokens, each a
    row of its own over its cache row's keys up to its own), and a row whose keys are two ranges with padding
    between (a prompt, then the tokens decoded after it): bit for bit the row alone with its keys side by side."""
    g = torch.Generator().manual_seed(5)
    key, value = torch.randn(2, 2, 3, 40, 64, generator=g)  # cache rows 0 and 1, 40 columns
    query = torch.randn(6, 9, 1, 64, generator=g)
    # Rows 0-3: tokens at columns 10..13 of cache row 1 (a prompt begun at column 10); row 4: cache row 0, keys
    # 5..20 then 30..35 (a gap of padding); row 5: cache row 0, keys 5..35 all.
    mask = torch.zeros(2, 36, dtype=torch.long)
    mask[0, 5:20] = mask[0, 30:36] = 1
    gap = left_padded_spans(mask, 1)[0].tolist()
    assert gap == [0, 0, 1, 5, 20, 30, 36]
    spans = torch.tensor([[1, 0, 1, 10, 11 + i, 11 + i, 11 + i] for i in range(4)] + [gap, [0, 0, 1, 5, 36, 36, 36]])
    out = one_query_attention(query, key, value, spans, 0.125)
    for i in range(4):
        k, v = key[1:2, :, 10 : 11 + i].clone(), value[1:2, :, 10 : 11 + i].clone()
        alone = one_query_attention(query[i : i + 1], k, v, torch.tensor([[0, 0, 1, 0, i + 1, i + 1, i + 1]]), 0.125)
        assert torch.equal(out[i], alone[0]), i
    columns = [*range(5, 20), *range(30, 36)]
    k, v = key[0:1, :, columns].clone(), value[0:1, :, columns].clone()
    alone = one_query_attention(query[4:5], k, v, torch.tensor([[0, 0, 1, 0, 21, 21, 21]]), 0.125)
    assert torch.equal(out[4], alone[0])
    assert (out[4, 0] - sdpa_row(query[4, :, 0], k[0], v[0])).abs().max() < 1e-5
    assert not torch.equal(out[4], out[5])  # the padding between was not read


@needs_kernel
def test_the_one_query_kernel_rejects_spans_it_cannot_run():
    q, k = torch.randn(1, 9, 2, 64), torch.randn(1, 3, 8, 64)
    with pytest.raises(RuntimeError, match="must hold one query"):
        one_query_attention(q, k, k, torch.tensor([[0, 0, 2, 0, 8, 8, 8]]), 0.125)
    with pytest.raises(RuntimeError, match="key ranges must lie within the 8 columns"):
        one_query_attention(q, k, k, torch.tensor([[0, 0, 1, 0, 9, 9, 9]]), 0.125)
    with pytest.raises(RuntimeError, match="float32"):
        one_query_attention(q.bfloat16(), k, k, torch.tensor([[0, 0, 1, 0, 8, 8, 8]]), 0.125)
    with pytest.raises(RuntimeError, match="one query and one cache row"):
        one_query_attention(q, k, k, torch.tensor([[1, 0, 1, 0, 8, 8, 8]]), 0.125)


def test_without_the_kernel_decode_steps_attend_through_sdpa():
    """XLORA_NATIVE_KERNELS=false (or no compiler): the decode step's attention is attention_by_rows over SDPA."""
    code = (
        "import torch\n"
        "from xlora_core import native\n"
        "from xlora_core.batch_invariant import attention_by_rows, left_padded_spans, row_attention\n"
        "q = torch.randn(2, 9, 1, 64)\n"
        "k, v = torch.randn(2, 2, 3, 9, 64).unbind(0)\n"
        "spans = left_padded_spans(torch.tensor([[0, 1, 1, 1, 1, 1, 1, 1, 1], [1] * 9]), 1)\n"
        "out, _ = row_attention(None, q, k, v, None, scaling=0.125, row_spans=spans)\n"
        "assert not native.load()\n"
        "assert torch.equal(out, attention_by_rows(q, k, v, spans, 0.125))\n"
        "print('sdpa')\n"
    )
    env = {**os.environ, "XLORA_NATIVE_KERNELS": "false"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "sdpa", done.stderr[-2000:]
