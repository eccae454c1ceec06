"""Log probabilities, prompt scoring, logit_bias and shared prefills in the decode engine, against full
forwards of the same sequences (no cache, float32)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from xlora_core import BatchRow, ParameterError, RowDecoder, SamplingParams, XLoraConfig, XLoraModel
from xlora_core.engine import run

from .tiny_world import VOCAB, build_world, load_base

TOL = 1e-4


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    base, experts = build_world(tmp_path_factory.mktemp("logprobs"))
    torch.manual_seed(7)
    return XLoraModel(load_base(base), XLoraConfig(hidden_size=32, adapters=experts, xlora_depth=2, xlora_size=16))


def prompt(n: int, seed: int) -> list[int]:
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def generate(model, prompts: list[list[int]], params: SamplingParams, routing=None) -> list[BatchRow]:
    rows = [BatchRow(RowDecoder(params, None, p), routing or model.routing) for p in prompts]
    for _ in run(model, rows):
        pass
    return rows


def full_logprobs(model, ids: list[int], routing=None) -> torch.Tensor:
    """log_softmax of a full uncached forward: [positions, vocab]."""
    with torch.no_grad():
        logits = model(torch.tensor([ids]), routing=routing or model.routing).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def test_greedy_logprobs_are_the_full_forwards(model):
    params = SamplingParams(max_new_tokens=6, logprobs=3)
    rows = generate(model, [prompt(5, 0), prompt(9, 1)], params)  # a left-padded batch of two
    for row in rows:
        dec = row.decoder
        assert len(dec.logprobs) == len(dec.completion_ids) == 6
        reference = full_logprobs(model, dec.prompt_ids + dec.completion_ids)
        for j, lp in enumerate(dec.logprobs):
            at = reference[len(dec.prompt_ids) - 1 + j]
            assert lp.token_id == dec.completion_ids[j]
            assert abs(lp.logprob - at[lp.token_id].item()) <= TOL
            values, ids = at.topk(3)
            assert [i for i, _ in lp.top] == ids.tolist()  # greedy: the chosen token is the best
            assert max(abs(v - w) for (_, v), w in zip(lp.top, values.tolist(), strict=True)) <= TOL


def test_sampled_logprobs_are_of_the_tempered_distribution(model):
    params = SamplingParams(max_new_tokens=5, temperature=0.7, seed=3, logprobs=0)
    (row,) = generate(model, [prompt(6, 2)], params)
    dec = row.decoder
    logits = full_logprobs(model, dec.prompt_ids + dec.completion_ids)  # log_softmax(x / t) = log_softmax of ...
    tempered = torch.log_softmax(logits / 0.7, dim=-1)  # ... log_softmax(x) / t, renormalised
    for j, lp in enumerate(dec.logprobs):
        assert lp.top == []
        assert abs(lp.logprob - tempered[len(dec.prompt_ids) - 1 + j, lp.token_id].item()) <= TOL


def test_prompt_logprobs_without_generating(model):
    ids = prompt(8, 4)
    params = SamplingParams(max_new_tokens=0, prompt_logprobs=2)
    (row,) = generate(model, [ids], params)
    dec = row.decoder
    assert dec.completion_ids == [] and dec.finish_reason == "length"
    reference = full_logprobs(model, ids)
    assert dec.prompt_logprobs[0] is None and len(dec.prompt_logprobs) == len(ids)
    for i, lp in enumerate(dec.prompt_logprobs[1:], start=1):
        assert lp.token_id == ids[i]
        assert abs(lp.logprob - reference[i - 1, ids[i]].item()) <= TOL
        assert [t for t, _ in lp.top] == reference[i - 1].topk(2).indices.tolist()


def test_prompt_logprobs_in_a_batch_with_frozen_routing_and_generation(model):
    routing = replace(model.routing, freeze_after=1, top_k=2)
    short, long = prompt(4, 5), prompt(10, 6)
    params = SamplingParams(max_new_tokens=4, prompt_logprobs=0, logprobs=0)
    rows = generate(model, [short, long], params, routing)
    for row in rows:
        reference = full_logprobs(model, row.prompt_ids, routing)
        got = torch.tensor([lp.logprob for lp in row.decoder.prompt_logprobs[1:]])
        want = reference[:-1].gather(1, torch.tensor(row.prompt_ids[1:]).view(-1, 1)).view(-1)
        assert (got - want).abs().max() <= TOL
        assert len(row.decoder.logprobs) == len(row.decoder.completion_ids) == 4


def test_rows_sharing_a_prompt_share_its_prefill_and_each_samples_its_own(model):
    shared, other = prompt(7, 8), prompt(3, 9)
    make = [SamplingParams(max_new_tokens=5, temperature=1.0, seed=s, logprobs=1) for s in (1, 2, 3)]
    rows = [BatchRow(RowDecoder(p, None, shared), model.routing) for p in make]
    rows.append(BatchRow(RowDecoder(SamplingParams(max_new_tokens=5), None, other), model.routing))
    for _ in run(model, rows):
        pass
    assert model.latest_scalings.shape[0] == 2  # two distinct prompts, one prefill of two rows
    for row, params in zip(rows, [*make, SamplingParams(max_new_tokens=5)], strict=True):
        (alone,) = generate(model, [row.prompt_ids], params)
        assert alone.decoder.completion_ids == row.decoder.completion_ids
    assert len({tuple(r.decoder.completion_ids) for r in rows[:3]}) > 1  # the seeds differ, so do the answers


def test_logit_bias(model):
    ids = prompt(6, 10)
    (plain,) = generate(model, [ids], SamplingParams(max_new_tokens=3))
    best = plain.decoder.completion_ids[0]
    (banned,) = generate(model, [ids], SamplingParams(max_new_tokens=3, logit_bias={best: -100}, logprobs=0))
    assert best not in banned.decoder.completion_ids[:1]
    (forced,) = generate(model, [ids], SamplingParams(max_new_tokens=3, logit_bias={5: 100}, logprobs=0))
    assert forced.decoder.completion_ids == [5, 5, 5]
    assert forced.decoder.logprobs[0].logprob > -1e-3  # logprobs are of the biased distribution


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"logprobs": 21}, "logprobs"), ({"prompt_logprobs": -1}, "prompt_logprobs"),
     ({"logit_bias": {3: 101}}, "logit_bias"), ({"max_new_tokens": -1}, "max_new_tokens")],
)
def test_bad_settings_name_their_field(kwargs, field):
    with pytest.raises(ParameterError) as info:
        SamplingParams(**kwargs)
    assert info.value.parameter == field
