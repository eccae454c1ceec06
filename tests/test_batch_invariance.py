"""A row's answer does not depend on what else is in its batch (README "Batch invariance"): at temperature
0 the same tokens alone, prefilled together with 7 others, joining a running batch mid-step, prefilled in
chunks under a token budget shared with the running rows, and from a prefix cache filled by other requests,
in the default dtype (bfloat16 on CPUs with native bf16, where this is exact; float32 elsewhere).

The model is a random Llama wide enough (hidden 256) for bfloat16 rounding to change tokens when a kernel's
order of additions changes with the batch: before xlora_core/batch_invariant.py, 3 of these 8 rows changed.
It runs on its float weights and on its weights quantized to int8 and int4 (xlora_core/quantize.py).
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from xlora_core import BatchRow, DecodeBatch, Routing, RowDecoder, SamplingParams, XLoraConfig, XLoraModel
from xlora_core.base_model import resolve_dtype
from xlora_core.batch_invariant import ROWS_PER_CALL, linear, rows_fixed
from xlora_core.prefix_cache import PrefixCache
from xlora_core.quantize import quantize_base

from .tiny_world import VOCAB, save_expert

NEW_TOKENS = 12


@pytest.fixture(scope="module", params=["none", "int8", "int4"])
def model(tmp_path_factory, request) -> XLoraModel:
    root = tmp_path_factory.mktemp("invariance")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(root / "base")
    targets = [["q_proj", "v_proj", "gate_proj"], ["k_proj", "o_proj", "up_proj"], ["down_proj", "q_proj"]]
    experts = {
        f"e{i}": str(save_expert(root / "base", root / f"e{i}", seed=20 + i, gain=2.0, r=8, lora_alpha=16,
                                 target_modules=t))
        for i, t in enumerate(targets)
    }  # fmt: skip
    dtype = resolve_dtype("auto", "cpu")  # the default dtype on this CPU
    base = quantize_base(LlamaForCausalLM.from_pretrained(root / "base", dtype=dtype).eval(), request.param)
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

        # Other prompts that begin as these do fill a prefix cache; then these join a running batch from it.
        prefix_cache = PrefixCache(1 << 30)
        batch = DecodeBatch(model, [], None, prefix_cache)
        batch.step(joining=[BatchRow(RowDecoder(SamplingParams(max_new_tokens=1), None, p[:-2] + [4]), r)
                            for p, r in requests()])  # fmt: skip
        finish(batch)
        cached = rows()
        batch = DecodeBatch(model, [], None, prefix_cache)
        batch.step(joining=cached[:2])
        batch.step(joining=cached[2:], max_tokens=40)
        finish(batch, max_tokens=40)

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


@pytest.mark.skipif(
    not rows_fixed(torch.zeros(1, dtype=torch.bfloat16), torch.zeros(1, dtype=torch.bfloat16)),
    reason="this CPU has no native bfloat16: linear is F.linear",
)
def test_linear_gives_each_row_the_same_bits_for_any_number_of_rows():
    """The shapes of the embedded default's layers and LoRA matrices, 1 to 40 rows."""
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for out_features, in_features in [(1536, 576), (576, 1536), (576, 24), (1536, 24), (24, 576), (192, 576)]:
            weight = torch.randn(out_features, in_features, generator=g).bfloat16()
            x = torch.randn(40, in_features, generator=g).bfloat16()
            one_by_one = torch.cat([linear(x[i : i + 1], weight) for i in range(40)])
            for n in (2, 3, 8, ROWS_PER_CALL, ROWS_PER_CALL + 1, 40):
                assert torch.equal(linear(x[:n], weight), one_by_one[:n]), (out_features, in_features, n)
