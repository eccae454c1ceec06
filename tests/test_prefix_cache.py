"""The prefix cache (xlora_core/prefix_cache.py) from the Python API, in float32: tokens and scalings with a
hit equal those without, alone and in batches; a hit never crosses routing settings, model settings or
models; the blocks held stay under the byte bound, the least recently used leaving first."""

from __future__ import annotations

import pytest
import torch

from xlora_core import PrefixCache, Routing, XLoraConfig, XLoraModel

from .tiny_world import VOCAB, build_world, load_base

SHARED = 40  # tokens every prompt begins with: two full blocks of 16 (and 8 more)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("prefix"))


def new_model(world) -> XLoraModel:
    base, experts = world
    torch.manual_seed(3)
    return XLoraModel(load_base(base), XLoraConfig(hidden_size=32, adapters=experts, xlora_depth=2, xlora_size=16))


@pytest.fixture(scope="module")
def model(world) -> XLoraModel:
    return new_model(world)


def prompts(n: int, suffix: int = 7, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    shared = torch.randint(3, VOCAB, (SHARED,), generator=g).tolist()
    return [shared + torch.randint(3, VOCAB, (suffix + i,), generator=g).tolist() for i in range(n)]


def run(model: XLoraModel, batch: list[list[int]], **kwargs) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Each prompt's new tokens and its scalings, the prompts generated together (left-padded)."""
    width = max(len(p) for p in batch)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in batch])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
    out = model.generate(ids, mask, max_new_tokens=12, **kwargs)[:, width:].tolist()
    scalings = [model.latest_scalings[i, width - len(p) :] for i, p in enumerate(batch)]
    return out, scalings


def test_tokens_and_scalings_with_a_hit_equal_those_without_alone_and_in_batches(model):
    batch = prompts(4)
    without = [run(model, [p]) for p in batch]
    cache = PrefixCache(1 << 26)
    got = {}  # (prompt, how) -> (tokens, scalings)
    tokens, scalings = run(model, batch[:1], prefix_cache=cache)  # fills the cache
    got[0, "first"] = tokens[0], scalings[0]
    assert cache.hits == 0 and len(cache) == SHARED // 16  # its full blocks (47 tokens: 2)
    tokens, scalings = run(model, batch[1:], prefix_cache=cache)  # three hits, in one batch
    got |= {(i, "batch"): (tokens[i - 1], scalings[i - 1]) for i in (1, 2, 3)}
    assert cache.hits == 3 and cache.tokens_reused == 3 * 32
    tokens, scalings = run(model, batch[:1], prefix_cache=cache)  # alone, a hit on its own prompt
    got[0, "alone"] = tokens[0], scalings[0]
    assert cache.hits == 4
    streamed = [t.token_id for t in model.stream(torch.tensor([batch[2]]), max_new_tokens=12, prefix_cache=cache)]
    assert cache.hits == 5 and streamed == without[2][0][0]

    for (i, how), (tokens, scalings) in got.items():
        (ref_tokens,), (ref_scalings,) = without[i]
        assert tokens == ref_tokens, (i, how)
        assert (scalings - ref_scalings).abs().max() <= 1e-4, (i, how)


def test_a_hit_never_crosses_routing_model_settings_or_models(model, world):
    batch = prompts(2, seed=1)
    cache = PrefixCache(1 << 26)
    run(model, batch[:1], prefix_cache=cache)
    for routing in (Routing(top_k=1), Routing(global_scaling_weight=0.5), Routing(freeze_after=2)):
        expected, _ = run(model, batch[1:], routing=routing)
        got, _ = run(model, batch[1:], routing=routing, prefix_cache=cache)
        assert cache.hits == 0 and got == expected, routing
    other = new_model(world)  # the same weights, another model object (a reload)
    run(other, batch[1:], prefix_cache=cache)
    assert cache.hits == 0
    before = model.config.scaling_pass_value
    model.set_scaling_pass_value(0.5)
    try:
        expected, _ = run(model, batch[1:])
        got, _ = run(model, batch[1:], prefix_cache=cache)
    finally:
        model.set_scaling_pass_value(before)
    assert cache.hits == 0 and got == expected
    run(model, batch[1:], prefix_cache=cache)  # as first stored: now it hits
    assert cache.hits == 1
    cache.clear()
    assert cache.nbytes == 0 and len(cache) == 0
    run(model, batch[1:], prefix_cache=cache)
    assert cache.hits == 1 and len(cache) == 3


def test_a_tail_gives_back_the_whole_prompt_but_its_last_token(model):
    """insert(tail=True) also stores a prompt's tokens after its last full block before its last token (what
    rows fed a token a row store); lookup(tail=True) then finds the whole prompt but its last token, with the
    keys, values and scalings its row held. A plain lookup, another last-but-one token or an evicted tail stop
    at the full blocks; the tail is evicted before its blocks."""
    prompt = prompts(1, seed=5)[0]  # 47 tokens: 2 full blocks, then a tail of 14 before the last token
    _, scalings, cache = model.prefill(torch.tensor([prompt]))
    store = PrefixCache(1 << 26)
    store.insert(model, model.routing, prompt, cache, 0, scalings[0], tail=True)
    assert len(store) == 3
    hit = store.lookup(model, model.routing, prompt, tail=True)
    assert hit.tokens == len(prompt) - 1 == 46 and store.tokens_reused == 46
    own = hit.one_row_cache(model)
    for got, held in ((own.scaling, cache.scaling), (own.real, cache.real)):
        for a, b in zip(got.layers, held.layers, strict=True):
            assert torch.equal(a.keys[0], b.keys[0, :, :46]) and torch.equal(a.values[0], b.values[0, :, :46])
    assert torch.equal(hit.scalings, scalings[0, :46].float())
    assert store.lookup(model, model.routing, prompt[:-1] + [3], tail=True).tokens == 46  # any last token
    assert store.lookup(model, model.routing, prompt).tokens == 32  # no tail asked: the full blocks
    assert store.lookup(model, model.routing, prompt[:-2] + [3, prompt[-1]], tail=True).tokens == 32
    assert store.lookup(model, model.routing, prompt + [3], tail=True).tokens == 32  # a tail of 15: not stored

    plain = PrefixCache(1 << 26)
    plain.insert(model, model.routing, prompt, cache, 0, scalings[0])
    assert len(plain) == 2 and plain.lookup(model, model.routing, prompt, tail=True).tokens == 32
    small = PrefixCache(store.nbytes - 1)  # room for the blocks, not the tail too
    small.insert(model, model.routing, prompt, cache, 0, scalings[0], tail=True)
    assert len(small) == 2 and small.lookup(model, model.routing, prompt, tail=True).tokens == 32


def test_a_hit_goes_straight_into_a_running_batchs_free_rows(model):
    """XLoraCache.with_stacked_row (how a row joins the compiled step from a hit): the hit's keys and values
    land in a new last row, in both passes, at the columns it is told, zeros around them; the running rows and
    their mask are as they were. Columns that cannot hold the hit are refused, the cache untouched."""
    prompt = prompts(1, seed=5)[0]
    _, scalings, held = model.prefill(torch.tensor([prompt]))
    store = PrefixCache(1 << 26)
    store.insert(model, model.routing, prompt, held, 0, scalings[0], tail=True)
    hit = store.lookup(model, model.routing, prompt, tail=True)
    running = prompts(2, suffix=20, seed=6)  # 60 and 61 tokens
    width = max(len(p) for p in running)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in running])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in running])
    _, _, batch = model.prefill(ids, mask)
    before = [(layer.keys.clone(), layer.values.clone()) for c in (batch.scaling, batch.real) for layer in c.layers]
    old_mask = batch.attention_mask.clone()
    end = width - 5
    joined = batch.with_stacked_row(hit.kv, end)
    assert joined is not None and joined.batch_size == 3 and joined.seq_len == width
    assert torch.equal(joined.attention_mask[:2], old_mask)
    assert joined.attention_mask[2].tolist() == [0] * (end - 46) + [1] * 46 + [0] * (width - end)
    after = [(layer.keys, layer.values) for c in (joined.scaling, joined.real) for layer in c.layers]
    heldkv = [(layer.keys, layer.values) for c in (held.scaling, held.real) for layer in c.layers]
    for (k0, v0), (k, v), (hk, hv) in zip(before, after, heldkv, strict=True):
        assert torch.equal(k[:2], k0) and torch.equal(v[:2], v0)
        for t, h in ((k, hk), (v, hv)):
            assert torch.equal(t[2, :, end - 46 : end], h[0, :, :46])
            assert not t[2, :, : end - 46].any() and not t[2, :, end:].any()
    assert joined.with_stacked_row(hit.kv, 45) is None and joined.with_stacked_row(hit.kv, width + 1) is None
    assert joined.batch_size == 3


def test_the_cache_stays_under_its_byte_bound_evicting_the_least_recently_used(model):
    a, b, c = prompts(3, suffix=1, seed=2)[0], prompts(1, seed=3)[0], prompts(1, seed=4)[0]
    probe = PrefixCache(1 << 26)
    run(model, [a], prefix_cache=probe)
    per_block = probe.nbytes // len(probe)
    assert probe.nbytes == 2 * per_block > 0
    cache = PrefixCache(4 * per_block)  # room for two prompts' blocks, not three
    run(model, [a], prefix_cache=cache)
    run(model, [b], prefix_cache=cache)
    run(model, [a], prefix_cache=cache)  # a is used again: b is now the least recently used
    assert cache.hits == 1
    run(model, [c], prefix_cache=cache)
    assert cache.nbytes <= 4 * per_block and len(cache) == 4
    hits = cache.hits
    run(model, [b], prefix_cache=cache)  # evicted: a miss (and stored again, evicting a's)
    assert cache.hits == hits
    run(model, [c], prefix_cache=cache)
    assert cache.hits == hits + 1 and cache.nbytes <= 4 * per_block

    nothing = PrefixCache(0)
    run(model, [a], prefix_cache=nothing)
    run(model, [a], prefix_cache=nothing)
    assert nothing.nbytes == 0 and nothing.hits == 0
    with pytest.raises(ValueError, match="multiple of 16"):
        PrefixCache(1 << 20, block_tokens=10)
