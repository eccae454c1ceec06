"""Generation with two KV caches: batching, joining and leaving a batch, streaming, sampling, stopping."""

from __future__ import annotations

import pytest
import torch

from xlora_core import ParameterError, Routing, RowDecoder, SamplingParams, XLoraCache, XLoraConfig, XLoraModel
from xlora_core.sampling import greedy_token

from .tiny_world import VOCAB, build_world, load_base, make_tiny_tokenizer

TOL = 1e-4


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    # Expert names other than "0", "1", ...: peft 0.21.2 fails on those in generate; ours must not.
    base, experts = build_world(tmp_path_factory.mktemp("gen"), names=["math", "code", "prose"])
    torch.manual_seed(5)
    return XLoraModel(load_base(base), XLoraConfig(hidden_size=32, adapters=experts, xlora_depth=2, xlora_size=16))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def prompts(*lengths: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (1, n), generator=g) for n in lengths]


def left_pad(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(r.shape[1] for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - r.shape[1] :] = r[0]
        mask[i, width - r.shape[1] :] = 1
    return ids, mask


def test_named_experts_and_fused_layers(model):
    assert model.adapter_names == ["math", "code", "prose"]
    q_proj = model.base.model.layers[0].self_attn.q_proj
    # Experts "math" (r=4) and "code" (r=6) target q_proj: one stacked A and one stacked B.
    assert q_proj.lora_A.shape == (4 + 6, 32) and q_proj.lora_B.shape == (32, 4 + 6)
    assert q_proj.ranks == {0: 4, 1: 6}


def test_left_padded_batch_matches_each_prompt_alone(model):
    rows = prompts(5, 9, 3)
    ids, mask = left_pad(rows)
    batch_logits, _, batch_cache = model.prefill(ids, mask)
    alone = [model.prefill(r) for r in rows]
    for i, (logits, _, _) in enumerate(alone):
        assert (batch_logits[i] - logits[0]).abs().max() <= TOL
    # Three decode steps: every row still matches its own cache.
    for step in range(3):
        tokens = torch.tensor([3 + step, 10 + step, 20 + step])
        batch_logits, _ = model.decode(tokens, batch_cache)
        for i, (_, _, cache) in enumerate(alone):
            logits, _ = model.decode(tokens[i : i + 1], cache)
            assert (batch_logits[i] - logits[0]).abs().max() <= TOL, (step, i)

    generated = model.generate(ids, attention_mask=mask, max_new_tokens=12)
    for i, r in enumerate(rows):
        assert generated[i, ids.shape[1] :].tolist() == model.generate(r, max_new_tokens=12)[0, r.shape[1] :].tolist()


def test_a_request_joins_and_leaves_a_running_batch(model):
    a, b = prompts(4, 8, seed=1)
    logits_a, _, cache = model.prefill(a)
    tokens_a = [int(logits_a.argmax())]
    for _ in range(3):  # `a` runs alone for a while
        logits_a, _ = model.decode(torch.tensor(tokens_a[-1:]), cache)
        tokens_a.append(int(logits_a.argmax()))
    logits_b, _, cache_b = model.prefill(b)
    cache = XLoraCache.concat([cache, cache_b])  # `b` joins at the next step
    tokens_b = [int(logits_b.argmax())]
    for _ in range(5):
        logits, _ = model.decode(torch.tensor([tokens_a[-1], tokens_b[-1]]), cache)
        tokens_a.append(int(logits[0].argmax()))
        tokens_b.append(int(logits[1].argmax()))
    cache = cache.select([1])  # `a` leaves; `b` goes on alone
    for _ in range(3):
        logits, _ = model.decode(torch.tensor(tokens_b[-1:]), cache)
        tokens_b.append(int(logits[0].argmax()))
    assert cache.batch_size == 1 and cache.seq_len == 8 + 8
    assert tokens_a == model.generate(a, max_new_tokens=9)[0, 4:].tolist()
    assert tokens_b == model.generate(b, max_new_tokens=9)[0, 8:].tolist()


def test_routing_per_row(model):
    """Rows of one batch can run with different routing: each equals its prompt run alone with it."""
    (p,) = prompts(6, seed=2)
    ids = torch.cat([p, p])
    settings = [Routing(top_k=1, global_scaling_weight=0.5), Routing(top_k=None, global_scaling_weight=1.0)]
    batch_logits, _, _ = model.prefill(ids, routing=settings)
    for i, routing in enumerate(settings):
        logits, _, _ = model.prefill(p, routing=routing)
        assert (batch_logits[i] - logits[0]).abs().max() <= TOL
    assert (batch_logits[0] - batch_logits[1]).abs().max() > 1e-3


def test_stream_yields_the_generated_tokens_with_their_scalings(model, tokenizer):
    (p,) = prompts(6, seed=3)
    events = list(model.stream(p, tokenizer=tokenizer, max_new_tokens=10))
    expected = model.generate(p, max_new_tokens=10)[0, 6:].tolist()
    assert [e.token_id for e in events] == expected
    assert [e.finish_reason for e in events] == [None] * 9 + ["length"]
    assert "".join(e.text for e in events) == tokenizer.decode(expected, skip_special_tokens=True)
    # The scalings that routed token t come from the position that produced it.
    scalings = model.get_latest_scalings()
    assert scalings.shape == (1, 6 + 9, model.n_lora_layers, 3)
    for t, event in enumerate(events):
        assert event.scalings.shape == (model.n_lora_layers, 3)
        assert torch.allclose(event.scalings, scalings[0, 6 + t - 1], atol=TOL)


def test_sampling_is_seeded_and_top_k_1_is_greedy(model):
    (p,) = prompts(5, seed=4)
    sample = dict(max_new_tokens=16, do_sample=True, temperature=1.5)
    first = model.generate(p, seed=7, **sample)
    assert model.generate(p, seed=7, **sample).tolist() == first.tolist()
    assert any(model.generate(p, seed=s, **sample).tolist() != first.tolist() for s in (8, 9, 10))
    greedy = model.generate(p, max_new_tokens=16)
    assert model.generate(p, seed=1, top_k=1, **sample).tolist() == greedy.tolist()


def test_greedy_token_is_torch_argmax():
    """numpy's argmax on the CPU (sampling.greedy_token) picks what torch.argmax picks: the first of equal
    maxima, a NaN before any number, in views and in float64 too."""
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 49152, generator=g)
    logits[1, 10] = logits[1, 20] = logits[1].max() + 1  # a tie: the first one
    logits[2, 300] = logits[2, 7] = float("nan")  # NaN wins, the first NaN
    logits[3] = float("-inf")
    for row in (*logits, logits[:, 5], logits[0].double(), logits[0, ::3], logits[0].bfloat16()):
        assert greedy_token(row) == int(row.argmax())
    assert [greedy_token(row) for row in logits[:3]] == [int(logits[0].argmax()), 10, 7]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_min_new_tokens_bars_eos_until_the_minimum_then_no_longer(temperature):
    """A row whose EOS always has the largest logit: with min_new_tokens 3 its first 3 tokens are others, its
    4th is EOS (greedy, and sampling with EOS all but certain); with 0 its first one is."""
    eos, vocab = 7, 64
    logits = torch.zeros(vocab)
    logits[eos], logits[11] = 100.0, 50.0
    for minimum, expected in ((3, [11, 11, 11, eos]), (0, [eos])):
        params = SamplingParams(max_new_tokens=10, min_new_tokens=minimum, temperature=temperature, seed=0,
                                eos_token_id=eos)  # fmt: skip
        dec = RowDecoder(params, None, [1, 2, 3])
        got = []
        while dec.finish_reason is None:
            token, _, _ = dec.step(logits)
            got.append(token)
        assert got == expected and dec.finish_reason == "stop"


def test_eos_and_stop_strings_end_generation(model, tokenizer):
    (p,) = prompts(5, seed=5)
    free = model.generate(p, max_new_tokens=20)[0, 5:].tolist()
    eos = free[6]
    stopped = model.generate(p, max_new_tokens=20, eos_token_id=eos)[0, 5:].tolist()
    assert stopped[: free.index(eos) + 1] == free[: free.index(eos) + 1]
    assert len(stopped) == free.index(eos) + 1

    text = tokenizer.decode(free, skip_special_tokens=True)
    stop = text[8:10]
    dec = RowDecoder(SamplingParams(max_new_tokens=20, stop=[stop]), tokenizer, p[0].tolist())
    streamed = ""
    for token in free:
        piece, finish = dec.accept(token)
        streamed += piece
        if finish:
            break
    assert dec.finish_reason == "stop"
    assert dec.text == text[: text.index(stop)]
    assert streamed == dec.text  # nothing of the stop string was streamed before it was recognised


def test_scalings_log_is_bounded_and_bucketed(model):
    model.clear_scalings_log()
    model.enable_scalings_logging()
    (p,) = prompts(7, seed=6)
    model.generate(p, max_new_tokens=4)
    log = model.get_scalings_log()
    assert [s.shape[1] for s in log] == [7, 1, 1, 1]  # the prompt, then one entry per cached step
    buckets = model.get_bucketed_scalings_log()
    assert buckets[7][0] == [0] and buckets[1][0] == [1, 2, 3]
    for _ in range(model.scalings_log.max_entries + 10):
        model.decode(torch.tensor([3]), model.prefill(p)[2])
    assert len(model.get_scalings_log()) == model.scalings_log.max_entries
    model.disable_scalings_logging()
    model.clear_scalings_log()
    model.generate(p, max_new_tokens=2)
    assert model.get_scalings_log() == []


def test_extreme_but_valid_sampling_settings_still_sample(model):
    (p,) = prompts(5, seed=7)
    greedy = model.generate(p, max_new_tokens=6)
    # A vanishing temperature is greedy, its limit (dividing by it would overflow to inf).
    assert model.generate(p, max_new_tokens=6, do_sample=True, temperature=1e-30).tolist() == greedy.tolist()
    # Scores that overflow to inf or nan still give a token, not an error.
    out = model.generate(p, max_new_tokens=6, do_sample=True, repetition_penalty=1e-45, seed=3)
    assert out.shape == (1, 11) and int(out.min()) >= 0


# -----------------------------------------------------------------------------
# frozen (non-granular) scalings: Routing.freeze_after


@torch.no_grad()
def frozen_reference(model: XLoraModel, prompt: torch.Tensor, k: int, new_tokens: int) -> list[int]:
    """Greedy tokens without any cache: both passes over the whole sequence at every step, with the scalings
    of every position after P-1+k replaced by those of position P-1+k."""
    ids, last = prompt, prompt.shape[1] - 1 + k
    for _ in range(new_tokens):
        scalings = model.predict_scalings(ids)
        if ids.shape[1] - 1 > last:
            scalings[:, last + 1 :] = scalings[:, last : last + 1]
        logits = model(ids, scalings=scalings).logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, prompt.shape[1] :].tolist()


@pytest.mark.parametrize("k", [0, 3])
def test_frozen_generation_equals_the_uncached_reference(model, k):
    (p,) = prompts(7, seed=12)
    frozen = model.generate(p, max_new_tokens=12, routing=Routing(freeze_after=k))[0, 7:].tolist()
    scalings = model.get_latest_scalings()[0]
    assert frozen == frozen_reference(model, p, k, 12)
    assert frozen != model.generate(p, max_new_tokens=12)[0, 7:].tolist(), "freezing must change this answer"
    # The scalings reported for frozen positions are the ones applied: those of position P-1+k.
    for position in range(7 + k, scalings.shape[0]):
        assert torch.equal(scalings[position], scalings[7 - 1 + k])
    assert not torch.equal(scalings[7 - 2 + k], scalings[7 - 1 + k])


def test_freeze_after_at_least_the_new_tokens_is_granular(model):
    (p,) = prompts(6, seed=12)
    granular = model.generate(p, max_new_tokens=8)
    assert model.generate(p, max_new_tokens=8, routing=Routing(freeze_after=8)).tolist() == granular.tolist()
    assert model.generate(p, max_new_tokens=8, routing=Routing(freeze_after=7)).tolist() == granular.tolist()
    model.set_freeze_after(0)  # the model's default routing, as set_topk_lora
    try:
        assert model.routing.freeze_after == 0
        assert model.generate(p, max_new_tokens=8)[0, 6:].tolist() == frozen_reference(model, p, 0, 8)
    finally:
        model.set_freeze_after(None)


def test_a_batch_mixing_frozen_and_granular_rows_gives_each_row_what_it_gives_alone(model):
    rows = prompts(5, 9, 3, 6, seed=13)
    routings = [Routing(freeze_after=0), Routing(), Routing(top_k=1, freeze_after=2), Routing(freeze_after=5)]
    ids, mask = left_pad(rows)
    together = model.generate(ids, attention_mask=mask, max_new_tokens=10, routing=routings)
    for i, (r, routing) in enumerate(zip(rows, routings, strict=True)):
        alone = model.generate(r, max_new_tokens=10, routing=routing)[0, r.shape[1] :]
        assert together[i, ids.shape[1] :].tolist() == alone.tolist(), i


def test_frozen_rows_leave_the_scaling_cache_and_rows_can_join_and_leave(model):
    from xlora_core import BatchRow, DecodeBatch, RowDecoder, SamplingParams

    a, b, c = prompts(4, 6, 5, seed=14)

    def row(p: torch.Tensor, routing: Routing) -> BatchRow:
        return BatchRow(RowDecoder(SamplingParams(max_new_tokens=8), None, p[0].tolist()), routing)

    rows = [row(a, Routing(freeze_after=0)), row(b, Routing(freeze_after=2)), row(c, Routing())]
    batch, _ = DecodeBatch.prefill(model, rows[:2])
    assert batch.cache.granular_rows() == [1]  # a froze on its prompt's last token: it left the scaling cache
    assert batch.cache.scaling.layers[0].keys.shape[0] == 1
    batch.step()
    batch.step()  # b produced its token 2: frozen too
    assert batch.cache.granular_rows() == [] and batch.cache.scaling is None
    newcomer, _ = DecodeBatch.prefill(model, rows[2:])
    batch.concatenate([newcomer])  # a granular row joins a frozen batch
    assert batch.cache.granular_rows() == [2] and batch.cache.scaling.layers[0].keys.shape[0] == 1
    batch.filter([1, 2])  # a leaves early
    assert batch.cache.granular_rows() == [1]
    while batch:
        batch.step()
    assert rows[0].decoder.completion_ids == frozen_reference(model, a, 0, 8)[:3]
    assert rows[1].decoder.completion_ids == frozen_reference(model, b, 2, 8)
    assert rows[2].decoder.completion_ids == model.generate(c, max_new_tokens=8)[0, 5:].tolist()


def test_rows_joining_in_the_decode_step_give_what_they_give_alone(model):
    """Newcomers prefilled in the same forward as the running rows' decode step (one ragged row): each row
    gets the tokens and scalings it gets alone, frozen and top-k rows included, whether the newcomer's
    prompt is shorter or longer than what the batch has cached, and the caches go on from there."""
    from xlora_core import BatchRow, DecodeBatch, RowDecoder, SamplingParams

    a, b, c, d = prompts(4, 1, 17, 2, seed=17)
    routings = [
        Routing(freeze_after=0), Routing(), Routing(top_k=1), Routing(freeze_after=1, global_scaling_weight=0.5)
    ]

    def row(p: torch.Tensor, routing: Routing) -> BatchRow:
        return BatchRow(RowDecoder(SamplingParams(max_new_tokens=9), None, p[0].tolist()), routing)

    rows = [row(p, r) for p, r in zip((a, b, c, d), routings, strict=True)]
    batch, _ = DecodeBatch.prefill(model, rows[:1])  # a: frozen from its first token, no scaling-cache row
    batch.step(joining=rows[1:2])  # b joins a frozen batch: the only granular row, one token in the scaling pass
    assert batch.cache.granular_rows() == [1] and batch.cache.scaling.layers[0].keys.shape[0] == 1
    batch.step()
    out = batch.step(joining=rows[2:])  # c's prompt is longer than anything cached; d's is shorter
    assert len(out) == 4 and all(g.row is r for g, r in zip(out, rows, strict=True)) and batch.cache.batch_size == 4
    assert batch.cache.attention_mask.sum(dim=1).tolist() == [4 + 3, 1 + 2, 17, 2]  # every row's tokens, left-padded
    while batch:
        batch.step()
    for r, p, routing in zip(rows, (a, b, c, d), routings, strict=True):
        n = p.shape[1]
        alone = model.generate(p, max_new_tokens=9, routing=routing)
        assert r.decoder.completion_ids == alone[0, n:].tolist()
        assert (r.all_scalings()[: n + 8] - model.get_latest_scalings()[0]).abs().max() <= TOL


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: Routing(freeze_after=-1), "freeze_after"),
        (lambda: Routing(freeze_after=1.5), "freeze_after"),
        (lambda: Routing(freeze_after=True), "freeze_after"),
        (lambda: Routing(global_scaling_weight=float("nan")), "global_scaling_weight"),
        (lambda: Routing(top_k=0), "top_k"),
        (lambda: SamplingParams(top_p=0), "top_p"),
        (lambda: SamplingParams(max_new_tokens=-1), "max_new_tokens"),
        (lambda: SamplingParams(temperature=float("nan")), "temperature"),
    ],
)
def test_bad_settings_name_their_field(make, field):
    with pytest.raises(ParameterError) as info:
        make()
    assert info.value.parameter == field and str(info.value).startswith(field)


def test_the_python_api_checks_top_k_against_the_experts(model):
    (p,) = prompts(4, seed=15)
    with pytest.raises(ParameterError) as info:
        model.generate(p, max_new_tokens=2, routing=Routing(top_k=7))
    assert info.value.parameter == "top_k" and "1..3" in str(info.value)
    with pytest.raises(ParameterError):
        model.set_freeze_after(-2)


def test_decode_writes_into_the_caches_room_and_reallocates_only_when_it_is_full(model):
    """A step writes its token in place (transformers' DynamicLayer copies the whole cache every step);
    past the room the buffers are reallocated once, and the logits still match the uncached forward."""
    from xlora_core.cache import ROOM

    rows = prompts(4, 9, seed=15)
    ids, mask = left_pad(rows)
    _, _, cache = model.prefill(ids, mask)
    layers = [cache.scaling.layers[0], cache.real.layers[-1]]
    assert [layer.capacity for layer in layers] == [9 + ROOM, 9 + ROOM]
    fed = torch.randint(3, VOCAB, (2, ROOM + 20), generator=torch.Generator().manual_seed(16))
    buffers_seen = [set(), set()]
    for t in range(fed.shape[1]):
        logits, _ = model.decode(fed[:, t], cache)
        for seen, layer in zip(buffers_seen, layers, strict=True):
            seen.add(layer.buffers[0].data_ptr())
            assert layer.keys.data_ptr() == layer.buffers[0].data_ptr()  # a view of the buffer, not a copy
    assert [len(seen) for seen in buffers_seen] == [2, 2]  # one reallocation, when the room ran out
    assert layers[1].keys.shape[2] == 9 + ROOM + 20
    with torch.no_grad():
        for i, r in enumerate(rows):
            expected = model(torch.cat([r, fed[i : i + 1]], dim=1)).logits[0, -1]
            assert (logits[i] - expected).abs().max() <= TOL, i
    # Rows that leave are dropped in place: the row kept moves up in the same buffers, nothing else is copied.
    layer = cache.real.layers[0]
    storage, kept = layer.buffers[0].data_ptr(), layer.keys[1].clone()
    cache = cache.select([1])
    layer = cache.real.layers[0]
    assert layer.buffers[0].data_ptr() == storage and layer.buffers[0].shape[0] == cache.batch_size == 1
    assert torch.equal(layer.keys[0], kept)
    # Rows out of order (or leading padding as wide as the room) are copied into fresh buffers with room again.
    cache = XLoraCache.concat([cache, model.prefill(*left_pad(prompts(1, 5, seed=19)))[2]])
    cache = cache.select([1, 0])
    assert cache.real.layers[0].capacity == cache.seq_len + ROOM


def test_a_bfloat16_model_on_cpu_keeps_float32_kv_caches_and_stays_close_to_float32(model, tmp_path):
    """torch's CPU attention is slow in bf16 at decode, so on CPU the caches hold float32 and the attention
    runs in float32; the bf16 model's logits stay within bf16's rounding of the float32 model's."""
    base, _ = build_world(tmp_path, names=["math", "code", "prose"])
    narrow = XLoraModel(load_base(base).to(torch.bfloat16), model.config)
    narrow.classifier.load_state_dict(model.classifier.state_dict())
    assert narrow.dtype == torch.bfloat16 and narrow.kv_dtype == torch.float32 and model.kv_dtype == torch.float32
    rows = prompts(4, 9, seed=17)
    ids, mask = left_pad(rows)
    fed = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(18))
    logits = {}
    for name, m in (("bf16", narrow), ("fp32", model)):
        _, _, cache = m.prefill(ids, mask)
        for t in range(fed.shape[1]):
            logits[name], _ = m.decode(fed[:, t], cache)
        layer = cache.real.layers[0]
        assert layer.buffers[0].dtype == torch.float32 and layer.keys.dtype == torch.float32
    scale = logits["fp32"].abs().max()
    assert (logits["bf16"] - logits["fp32"]).abs().max() <= 0.05 * scale
