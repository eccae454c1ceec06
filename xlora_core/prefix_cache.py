"""A prefix cache: the KV caches of both passes and the scalings of prompts seen before, shared across requests.

Chat clients resend the same system prompt, few-shot block or whole conversation on every call. The keys and
values of a prompt's first tokens depend on those tokens only (attention is causal), so a request whose prompt
begins as an earlier one did can start from the earlier one's keys and values, for the scaling pass and the
real pass, and from its scalings, and compute only the rest of its prompt.

Block-wise, as vLLM's automatic prefix caching: a prompt is cut in blocks of `block_tokens` tokens; a block is
stored under a hash of every token up to its end and of `values_key` (everything else its values depend on), so
a block is found only behind the very same tokens. A lookup walks a prompt's blocks from the first until one is
missing; it never takes the last token (the request needs that position's logits). The blocks held are bounded
in bytes and evicted least recently used (a prompt's later blocks before its earlier ones).

Tails, for prompts fed a token a row in the compiled step (`XLoraModel.decode_rows`): a prompt asked again comes
back whole but its last token, where full blocks leave up to 16 tokens to compute again. A tail is a prompt's
tokens after its last full block before its last token, stored under the hash of its blocks and those tokens.
It ends off the QUERY_BLOCK grid, where an eager prefill of the rest would run other attention blocks than the
whole prompt did (other bits); a token a row gets the same bits however its prompt is split, so only rows fed
that way store tails (`insert(tail=True)`) and take them (`lookup(tail=True)`).

The cache belongs to one process and is safe to share between threads. `DecodeBatch` reads it when rows
join and fills it when a row's prompt is done; `generate(prefix_cache=...)` and the server use it alike.
"""

from __future__ import annotations

import hashlib
import itertools
import threading
from array import array
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING
from weakref import WeakKeyDictionary

import torch

from .batch_invariant import QUERY_BLOCK
from .cache import XLoraCache, _layers, growing_cache
from .classifier import Routing

if TYPE_CHECKING:
    from .model import XLoraModel

_MODEL_IDS: WeakKeyDictionary = WeakKeyDictionary()
_NEXT_ID = itertools.count(1)


def model_identity(model: XLoraModel) -> int:
    """A number for this model object, never reused in the process: blocks of one model never serve another."""
    if model not in _MODEL_IDS:
        _MODEL_IDS[model] = next(_NEXT_ID)
    return _MODEL_IDS[model]


def values_key(model: XLoraModel, routing: Routing) -> tuple:
    """Everything besides the tokens that a prompt's cached keys, values and scalings depend on.

    Which hosted model or fixed mixture serves the request (routing.model, routing.weights) picks the experts
    and the classifier. The model settings below change the scaling pass or the real pass; the routing
    fields change the real pass (top_k, the global weight) or might one day change the prompt
    (freeze_after does not today: it freezes only after generated tokens; kept for safety). Models attached
    or removed change the scalings' shape: the server clears the cache then."""
    config = model.config
    return (
        model_identity(model),
        routing.model,
        routing.weights,
        float(config.scaling_pass_value),
        bool(config.enable_softmax_topk),
        str(model.dtype),
        str(model.kv_dtype),
        routing.top_k,
        float(routing.global_scaling_weight),
        routing.freeze_after,
    )


@dataclass
class PrefixHit:
    """What a lookup found: the prompt's first `tokens` tokens' keys and values in both passes, stacked
    (`kv`: [4 (scaling keys, scaling values, real keys, real values), layers, heads, tokens, dim], the layout
    `XLoraCache.with_stacked_row` takes; read only, it may be a stored block's own tensor), and their scalings
    [tokens, layers, experts] (float32, CPU, a copy)."""

    tokens: int
    kv: torch.Tensor
    scalings: torch.Tensor

    def one_row_cache(self, model: XLoraModel) -> XLoraCache:
        """The hit as a batch-1 XLoraCache of its own (a copy of `kv`, in buffers with room to grow)."""
        config, dtype = model.base.config, model.kv_dtype
        scaling, real = growing_cache(config, dtype), growing_cache(config, dtype)
        for c, (k, v) in ((scaling, (0, 1)), (real, (2, 3))):
            for i, layer in enumerate(_layers(c)):
                layer.replace(self.kv[k, i].unsqueeze(0), self.kv[v, i].unsqueeze(0))
        mask = torch.ones((1, self.tokens), dtype=torch.long, device=self.kv.device)
        return XLoraCache(scaling, real, mask)


@dataclass
class _Block:
    kv: torch.Tensor  # [4 (scaling keys, scaling values, real keys, real values), layers, heads, tokens, dim]
    scalings: torch.Tensor  # [tokens, layers, experts], float32 CPU

    @property
    def tokens(self) -> int:
        return self.kv.shape[3]

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size() + self.scalings.numel() * self.scalings.element_size()


class PrefixCache:
    """Blocks of prompts' keys, values and scalings, bounded by `max_bytes` (0: the cache holds nothing).
    `hits`, `misses` (lookups that found no block) and `tokens_reused` count since creation."""

    def __init__(self, max_bytes: int, block_tokens: int = QUERY_BLOCK) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        if block_tokens < 1 or block_tokens % QUERY_BLOCK:
            # A hit then ends on the grid of a prompt's attention blocks: its row gets the same bits as without.
            raise ValueError(f"block_tokens must be a positive multiple of {QUERY_BLOCK}, got {block_tokens}")
        self.max_bytes = max_bytes
        self.block_tokens = block_tokens
        self._blocks: OrderedDict[bytes, _Block] = OrderedDict()  # least recently used first
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = self.tokens_reused = 0

    @property
    def nbytes(self) -> int:
        """Bytes held by the blocks (keys, values and scalings)."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._blocks)

    def clear(self) -> None:
        """Drop every block (the model's weights changed, or its routing defaults: nothing held is valid)."""
        with self._lock:
            self._blocks.clear()
            self._bytes = 0

    def _hashes(self, key: tuple, prompt: list[int], blocks: int) -> list[bytes]:
        """The hash of `key` alone, then of each of the prompt's first `blocks` blocks: of `key` and every token
        up to its end."""
        digest = hashlib.blake2b(repr(key).encode(), digest_size=16).digest()
        out, b = [digest], self.block_tokens
        for i in range(blocks):
            chunk = array("q", prompt[i * b : (i + 1) * b]).tobytes()
            digest = hashlib.blake2b(digest + chunk, digest_size=16).digest()
            out.append(digest)
        return out

    def _tail_hash(self, chain: list[bytes], prompt: list[int]) -> bytes | None:
        """The hash of the prompt's tail (`chain`: `_hashes` up to its last full block before its last token),
        or None if it has none (its last token begins a block)."""
        tail = prompt[(len(chain) - 1) * self.block_tokens : len(prompt) - 1]
        if not tail:
            return None
        return hashlib.blake2b(chain[-1] + b"tail" + array("q", tail).tobytes(), digest_size=16).digest()

    def lookup(
        self, model: XLoraModel, routing: Routing, prompt: list[int], tail: bool = False
    ) -> PrefixHit | None:
        """The longest run of stored blocks this prompt begins with (its last token is never taken), or None.
        With `tail`, a run of every block before its last token goes on with its stored tail, if there is one:
        the hit is then the whole prompt but its last token."""
        if self.max_bytes == 0:
            return None
        chain = self._hashes(values_key(model, routing), prompt, (len(prompt) - 1) // self.block_tokens)
        hashes = chain[1:]
        if tail and (tail_hash := self._tail_hash(chain, prompt)) is not None:
            hashes.append(tail_hash)
        with self._lock:
            found = []
            for h in hashes:
                block = self._blocks.get(h)
                if block is None:
                    break
                found.append(block)
            if not found:
                self.misses += 1
                return None
            for h in reversed(hashes[: len(found)]):  # the first block ends most recent: evicted last
                self._blocks.move_to_end(h)
            tokens = sum(block.tokens for block in found)
            self.hits += 1
            self.tokens_reused += tokens
        kv = torch.cat([block.kv for block in found], dim=3) if len(found) > 1 else found[0].kv
        scalings = torch.cat([block.scalings for block in found])
        return PrefixHit(tokens, kv, scalings)

    def insert(
        self,
        model: XLoraModel,
        routing: Routing,
        prompt: list[int],
        cache: XLoraCache,
        row: int,
        scalings: torch.Tensor,
        tail: bool = False,
    ) -> None:
        """Store the full blocks of `prompt`, whose keys and values are row `row` of `cache` (the prompt and
        nothing after it yet; the row granular) and whose scalings are `scalings` [prompt, layers, experts];
        with `tail` (the prompt was fed a token a row), its tail too."""
        if self.max_bytes == 0 or cache.scaling is None:
            return
        b = self.block_tokens
        blocks, before_last = len(prompt) // b, (len(prompt) - 1) // b
        chain = self._hashes(values_key(model, routing), prompt, blocks)
        hashes = chain[1:]
        tail_hash = self._tail_hash(chain[: before_last + 1], prompt) if tail else None
        with self._lock:
            first = next((i for i, h in enumerate(hashes) if h not in self._blocks), blocks)
            new_tail = tail_hash is not None and tail_hash not in self._blocks
        scalings = scalings.float().cpu()
        parts = {}  # hash -> (begin, end) of the prompt's tokens to store under it
        for i in range(first, blocks):
            parts[hashes[i]] = (i * b, (i + 1) * b)
        if new_tail:
            parts[tail_hash] = (before_last * b, len(prompt) - 1)
        if not parts:
            return
        begin = min(start for start, _ in parts.values())
        kv = _row_kv(cache, row, len(prompt), begin, max(end for _, end in parts.values()))
        if kv is None:
            return
        with self._lock:
            for h, (start, end) in parts.items():
                if h in self._blocks:
                    continue
                block = _Block(kv[:, :, :, start - begin : end - begin].clone(), scalings[start:end].clone())
                self._blocks[h] = block
                self._bytes += block.nbytes
            # Later blocks are evicted first: put this prompt's tail, then its blocks most recent, its first one
            # last of all.
            for h in [tail_hash, *hashes[::-1]]:
                if h in self._blocks:  # (another thread's insert may have evicted it meanwhile)
                    self._blocks.move_to_end(h)
            while self._bytes > self.max_bytes and self._blocks:
                _, block = self._blocks.popitem(last=False)
                self._bytes -= block.nbytes


def _row_kv(cache: XLoraCache, row: int, prompt_len: int, begin: int, end: int) -> torch.Tensor | None:
    """Tokens begin..end of row `row`'s prompt (which it holds and nothing after) in both caches, stacked:
    [4, layers, heads, end - begin, dim]; None when the layers differ in shape (then nothing is stored)."""
    valid = cache.attention_mask[row].nonzero()
    start = int(valid[0]) if len(valid) else 0
    assert int(cache.attention_mask[row].sum()) == prompt_len, "the row holds more than its prompt"
    scaling_row = cache.granular_rows().index(row)
    parts = []
    for layers, r in ((_layers(cache.scaling), scaling_row), (_layers(cache.real), row)):
        for name in ("keys", "values"):
            tensors = [getattr(layer, name)[r, :, start + begin : start + end] for layer in layers]
            if len({t.shape for t in tensors}) != 1:
                return None
            parts.append(torch.stack(tensors))
    return torch.stack(parts)

