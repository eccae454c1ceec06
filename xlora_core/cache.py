"""What X-LoRA generation keeps between steps: two KV caches, their attention mask, frozen scalings.

The scaling pass and the real pass run the same backbone with different expert weights, so they see
different keys and values: each keeps its own transformers `DynamicCache`. A row whose scalings are
frozen (`Routing.freeze_after`) needs no scaling pass any more: it keeps its frozen scalings here and
leaves the scaling cache, which therefore holds only the granular rows, in batch order. Both caches
always have the same number of columns, so they share the attention mask.

Rows can be selected (drop finished requests) and caches of different lengths joined (a request joins
a running batch): the shorter ones are left-padded, which the attention mask hides.

The layers of both caches are `GrowingLayer`s: keys and values live in a buffer with room to grow, so a
decode step writes its token in place. transformers' `DynamicLayer` concatenates instead, which copies
the whole cache every step: a cost per token that grows with the sequence.

A cache may hold a wider dtype than the model: on CPU a bfloat16 model keeps float32 keys and values,
because torch's CPU attention kernels are much slower in bfloat16 at decode (README "Long sequences").
The attention function `batch_invariant.ROW_SDPA` casts the query up to the cache's dtype and the output back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, PretrainedConfig
from transformers.cache_utils import DynamicLayer

# Tokens of room a layer's buffer gets whenever it is (re)allocated: one copy of the cache every ROOM
# tokens instead of one every token.
ROOM = 256


class GrowingLayer(DynamicLayer):
    """A `DynamicLayer` whose keys and values are views of buffers [batch, heads, capacity, head_dim]
    with room for more tokens: `update` writes new tokens into the room; only a full buffer is copied,
    into a new one with `ROOM` tokens of room again."""

    def __init__(self, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.dtype = dtype  # None: the model's
        self.buffers: tuple[torch.Tensor, torch.Tensor] | None = None
        # The allocation the buffers are the first rows of: rows that left leave room for rows that join.
        self._storage: tuple[torch.Tensor, torch.Tensor] | None = None
        self.length = 0

    @property
    def capacity(self) -> int:
        return 0 if self.buffers is None else self.buffers[0].shape[2]

    def get_seq_length(self) -> int:
        # Not from self.keys: a compiled step must not read the view besides its buffer (aliased inputs).
        return self.length

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.dtype is not None:
            key_states, value_states = key_states.to(self.dtype), value_states.to(self.dtype)
        new = key_states.shape[2]
        if self.length + new > self.capacity:
            self._reallocate(key_states, value_states, self.length + new)
        keys, values = self.buffers
        # index_copy_ on the whole buffer, as transformers' StaticLayer: torch.compile cannot trace a write
        # into a slice of a buffer whose length is dynamic.
        columns = torch.arange(self.length, self.length + new, device=keys.device)
        keys.index_copy_(2, columns, key_states)
        values.index_copy_(2, columns, value_states)
        self.length += new
        self.keys, self.values = keys[:, :, : self.length], values[:, :, : self.length]
        return self.keys, self.values

    def reserve(self, tokens: int) -> None:
        """Make room for `tokens` more tokens now, so that the next `update` writes in place."""
        if self.buffers is not None and self.length + tokens > self.capacity:
            self._reallocate(self.keys, self.values, self.length + tokens)

    def replace(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Hold these keys and values instead (rows selected or joined), with fresh room. One plain copy
        (not update's index_copy_, several times slower on CPU: a ragged step replaces whole caches)."""
        if not self.is_initialized:
            self.lazy_initialization(keys, values)
        if self.dtype is not None:
            keys, values = keys.to(self.dtype), values.to(self.dtype)
        self.buffers, self.length = None, 0
        n = keys.shape[2]
        self._reallocate(keys, values, n)
        self.buffers[0][:, :, :n] = keys
        self.buffers[1][:, :, :n] = values
        self.length = n
        self.keys, self.values = self.buffers[0][:, :, :n], self.buffers[1][:, :, :n]

    def _reallocate(self, keys_like: torch.Tensor, values_like: torch.Tensor, needed: int) -> None:
        """New buffers of capacity `needed + ROOM`, holding the tokens stored so far."""
        batch, heads, _, dim = keys_like.shape
        kwargs = dict(dtype=keys_like.dtype, device=keys_like.device)
        keys = torch.empty(batch, heads, needed + ROOM, dim, **kwargs)
        values = torch.empty(batch, heads, needed + ROOM, values_like.shape[-1], **kwargs)
        if self.length:
            keys[:, :, : self.length] = self.keys
            values[:, :, : self.length] = self.values
        self.buffers = self._storage = (keys, values)

    def keep_rows(self, rows: list[int]) -> None:
        """Keep these rows, in place: each moves to its new index, one after the other (`_moves_in_place`: none
        reads a row already written); the rows that stay where they are are not copied."""
        keys, values = self.buffers
        n = self.length
        with torch.inference_mode():  # the buffers are inference tensors; the server's worker is not in that mode
            for new, old in enumerate(rows):
                if new != old:
                    keys[new, :, :n] = keys[old, :, :n]
                    values[new, :, :n] = values[old, :, :n]
        self._set_rows(len(rows))

    def add_rows(
        self, keys: torch.Tensor | None, values: torch.Tensor | None, count: int = 0, end: int | None = None
    ) -> None:
        """Append these rows [rows, heads, columns, dim], their columns ending at column `end` (None: `length`;
        zeros around them), or `count` rows of zeros if they are None, into the storage's free rows; without
        enough of them, into a new storage with room for as many more."""
        if keys is not None and self.dtype is not None:
            keys, values = keys.to(self.dtype), values.to(self.dtype)
        new = count if keys is None else keys.shape[0]
        have, n, width = self.buffers[0].shape[0], self.length, 0 if keys is None else keys.shape[2]
        with torch.inference_mode():  # as keep_rows
            if self._storage[0].shape[0] < have + new:
                shape = (2 * (have + new),) + self._storage[0].shape[1:]
                storage = tuple(torch.empty(shape, dtype=t.dtype, device=t.device) for t in self._storage)
                for target, source in zip(storage, self.buffers, strict=True):
                    target[:have, :, :n] = source[:, :, :n]
                self._storage = storage
            end = n if end is None else end
            for target, source in zip(self._storage, (keys, values), strict=True):
                target[have : have + new, :, :n] = 0
                if source is not None:
                    target[have : have + new, :, end - width : end] = source
        self._set_rows(have + new)

    def _set_rows(self, rows: int) -> None:
        self.buffers = (self._storage[0][:rows], self._storage[1][:rows])
        self.keys, self.values = self.buffers[0][:, :, : self.length], self.buffers[1][:, :, : self.length]

    def nbytes(self) -> int:
        """Memory held, the room and the free rows included."""
        return sum(t.numel() * t.element_size() for t in self._storage) if self._storage is not None else 0


def growing_cache(config: PretrainedConfig, dtype: torch.dtype | None = None) -> DynamicCache:
    """transformers' DynamicCache for this model, its full-attention layers `GrowingLayer`s holding
    `dtype` (None: the model's; a wider one needs the `batch_invariant.ROW_SDPA` attention)."""
    cache = DynamicCache(config=config)
    cache.layers = [GrowingLayer(dtype) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


@dataclass
class XLoraCache:
    scaling: DynamicCache | None  # rows of the granular rows only; None when every row is frozen
    real: DynamicCache
    attention_mask: torch.Tensor  # [batch, seq_len], 0 on padding
    frozen: list[torch.Tensor | None] = field(default_factory=list)  # per row: [layers, experts] or None

    def __post_init__(self) -> None:
        if not self.frozen:
            self.frozen = [None] * self.batch_size

    @property
    def batch_size(self) -> int:
        return self.attention_mask.shape[0]

    @property
    def seq_len(self) -> int:
        return self.attention_mask.shape[1]

    def granular_rows(self) -> list[int]:
        """The rows that still run the scaling pass, in the order the scaling cache holds them."""
        return [i for i, f in enumerate(self.frozen) if f is None]

    def next_positions(self) -> torch.Tensor:
        """Position id of the next token of each row: [batch, 1] (padding does not count)."""
        return self.attention_mask.sum(dim=1, keepdim=True)

    def freeze(self, rows: dict[int, torch.Tensor]) -> None:
        """Freeze these rows (row -> scalings [layers, experts]) and free their scaling-cache rows."""
        granular = self.granular_rows()
        for row, scalings in rows.items():
            if self.frozen[row] is not None:
                raise ValueError(f"row {row} is frozen already")
            self.frozen[row] = scalings
        keep = [i for i, row in enumerate(granular) if row not in rows]
        if not keep:
            self.scaling = None
        elif len(keep) < len(granular):
            index = torch.tensor(keep, dtype=torch.long, device=self.attention_mask.device)
            self.scaling = _map_layers(self.scaling, lambda t: t[index])

    def select(self, rows: list[int]) -> XLoraCache:
        """Keep these rows, in this order; drop leading columns that are now padding in every row.
        The tensors are re-sliced in place: use the returned cache, not this one, afterwards. Rows that merely
        leave (the others kept in order, or the last ones moved into their places) are dropped in place,
        without copying the others; the leading padding then stays until it is ROOM columns wide."""
        index, scaling_index, mask, start = self._rows_to_keep(rows)
        in_place = _moves_in_place(rows) and (scaling_index is None or _moves_in_place(scaling_index.tolist()))
        if start < ROOM and in_place and _all_allocated(self.scaling, self.real):
            for cache, kept in ((self.real, index), (self.scaling, scaling_index)):
                if cache is not None and kept is not None:
                    for layer in _layers(cache):
                        layer.keep_rows(kept.tolist())
            scaling = self.scaling if scaling_index is not None else None
            return XLoraCache(scaling, self.real, mask, [self.frozen[r] for r in rows])
        scaling = None
        if scaling_index is not None:
            scaling = _map_layers(self.scaling, lambda t: t[scaling_index, :, start:])
        return XLoraCache(
            scaling=scaling,
            real=_map_layers(self.real, lambda t: t[index, :, start:]),
            attention_mask=mask[:, start:],
            frozen=[self.frozen[r] for r in rows],
        )

    def copy_rows(self, rows: list[int], empty: Callable[[], DynamicCache]) -> XLoraCache:
        """A copy of these rows, in this order, in new caches made by `empty` (this cache is left as it is);
        leading columns that are padding in every one of them are dropped."""
        index, scaling_index, mask, start = self._rows_to_keep(rows)

        def copied(cache: DynamicCache, index: torch.Tensor) -> DynamicCache:
            out = empty()
            for target, layer in zip(_layers(out), _layers(cache), strict=True):
                if layer.is_initialized:
                    target.replace(layer.keys[index, :, start:], layer.values[index, :, start:])
            return out

        scaling = None if scaling_index is None else copied(self.scaling, scaling_index)
        return XLoraCache(scaling, copied(self.real, index), mask[:, start:], [self.frozen[r] for r in rows])

    def _rows_to_keep(self, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, int]:
        """For `select` and `copy_rows`: the rows' index into the real pass's cache, their index into the
        scaling pass's (granular rows only; None if none of them is there), their mask, and the first column
        that is not padding in every one of them."""
        device = self.attention_mask.device
        index = torch.tensor(rows, dtype=torch.long, device=device)
        mask = self.attention_mask[index]
        used = mask.any(dim=0).nonzero()
        start = int(used[0]) if len(used) else mask.shape[1]
        position_in_scaling = {row: i for i, row in enumerate(self.granular_rows())}
        scaling_rows = [position_in_scaling[r] for r in rows if r in position_in_scaling]
        scaling_index = None
        if scaling_rows and self.scaling is not None:
            scaling_index = torch.tensor(scaling_rows, dtype=torch.long, device=device)
        return index, scaling_index, mask, start

    @staticmethod
    def concat(caches: list[XLoraCache]) -> XLoraCache:
        """Join the rows of several caches into one batch, left-padding the shorter ones.
        The inputs are consumed: use only the returned cache afterwards. Rows no longer than the first cache's
        go into its storage's free rows (`GrowingLayer.add_rows`), without copying its rows."""
        length = max(c.seq_len for c in caches)
        joined = caches[0]
        if joined.seq_len == length and all(joined.can_take(c) for c in caches[1:]):
            for other in caches[1:]:
                joined = joined.with_rows(other, length)
            return joined
        masks = [torch.nn.functional.pad(c.attention_mask, (length - c.seq_len, 0)) for c in caches]
        scaling = [c.scaling for c in caches if c.scaling is not None]
        return XLoraCache(
            scaling=_concat_layers(scaling, length) if scaling else None,
            real=_concat_layers([c.real for c in caches], length),
            attention_mask=torch.cat(masks),
            frozen=[f for c in caches for f in c.frozen],
        )

    @staticmethod
    def for_prompts(
        config: PretrainedConfig, dtype: torch.dtype, device: torch.device, width: int,
        frozen: list[torch.Tensor | None],
    ) -> XLoraCache:  # fmt: skip
        """Rows with nothing in them yet, `width` columns of padding each (room for prompts that
        `XLoraModel.decode_rows` fills in), a scaling-cache row for each granular one (`frozen` None)."""
        heads = config.num_key_value_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

        def empty(rows: int) -> DynamicCache:
            cache = growing_cache(config, dtype)
            for layer in _layers(cache):
                layer.replace(*(torch.zeros(rows, heads, width, head_dim, dtype=dtype, device=device) for _ in "kv"))
            return cache

        granular = sum(f is None for f in frozen)
        mask = torch.zeros((len(frozen), width), dtype=torch.long, device=device)
        return XLoraCache(empty(granular) if granular else None, empty(len(frozen)), mask, list(frozen))

    def can_take(self, other: XLoraCache) -> bool:
        """Whether `with_rows` can put the rows of `other` in this cache's buffers."""
        return (
            other.seq_len <= self.seq_len and _all_allocated(self.real, other.real, self.scaling, other.scaling)
            and (self.scaling is not None or other.scaling is None)
        )  # fmt: skip

    def with_rows(self, other: XLoraCache, end: int) -> XLoraCache:
        """This cache with the rows of `other` added in its buffers' free rows (`can_take`), their columns
        ending at column `end` (padding before and after them). Both inputs are consumed."""
        for mine, theirs in ((self.real, other.real), (self.scaling, other.scaling)):
            if theirs is not None:
                for target, layer in zip(_layers(mine), _layers(theirs), strict=True):
                    target.add_rows(layer.keys, layer.values, end=end)
        mask = other.attention_mask.new_zeros(other.batch_size, self.seq_len)
        mask[:, end - other.seq_len : end] = other.attention_mask
        frozen = self.frozen + other.frozen
        return XLoraCache(self.scaling, self.real, torch.cat([self.attention_mask, mask]), frozen)

    def with_stacked_row(self, kv: torch.Tensor, end: int) -> XLoraCache | None:
        """This cache with one granular row more, in its buffers' free rows: keys and values stacked as
        [4 (scaling keys, scaling values, real keys, real values), layers, heads, tokens, dim] (a prefix cache
        hit), their columns ending at column `end`, padding around them. None if it cannot take the row so (the
        input is then untouched). `with_rows` for a row that is not a cache of its own yet: no copy in between."""
        tokens = kv.shape[3]
        if self.scaling is None or not _all_allocated(self.scaling, self.real) or not tokens <= end <= self.seq_len:
            return None
        for cache, (k, v) in ((self.scaling, (0, 1)), (self.real, (2, 3))):
            for i, layer in enumerate(_layers(cache)):
                layer.add_rows(kv[k, i].unsqueeze(0), kv[v, i].unsqueeze(0), end=end)
        mask = self.attention_mask.new_zeros(1, self.seq_len)
        mask[:, end - tokens : end] = 1
        return XLoraCache(self.scaling, self.real, torch.cat([self.attention_mask, mask]), self.frozen + [None])

    def with_empty_rows(self, frozen: list[torch.Tensor | None]) -> XLoraCache | None:
        """This cache with rows of padding added (one per `frozen`, as `for_prompts` makes them), in its buffers'
        free rows; None if it cannot take them so (the input is then untouched)."""
        granular = sum(f is None for f in frozen)
        if not _all_allocated(self.scaling, self.real) or (granular and self.scaling is None):
            return None
        for cache, count in ((self.real, len(frozen)), (self.scaling, granular)):
            if count:
                for layer in _layers(cache):
                    layer.add_rows(None, None, count)
        mask = self.attention_mask.new_zeros(len(frozen), self.seq_len)
        return XLoraCache(self.scaling, self.real, torch.cat([self.attention_mask, mask]), self.frozen + list(frozen))

    def padded(self, left: int = 0, right: int = 0) -> XLoraCache:
        """This cache with columns of padding on the left and on the right (room for the rest of a prompt whose
        beginning it holds: a prefix from the prefix cache). The input is consumed."""
        pad = lambda t: torch.nn.functional.pad(t, (0, 0, left, right))  # noqa: E731
        scaling = None if self.scaling is None else _map_layers(self.scaling, pad)
        mask = torch.nn.functional.pad(self.attention_mask, (left, right))
        return XLoraCache(scaling, _map_layers(self.real, pad), mask, self.frozen)

    def reserve(self, tokens: int) -> None:
        """Room for `tokens` more tokens in every layer of both caches, before a step writes them."""
        for cache in (self.scaling, self.real):
            if cache is not None:
                for layer in _layers(cache):
                    layer.reserve(tokens)

    def nbytes(self) -> int:
        """Memory held by the keys and values of both caches, their room included."""
        caches = [c for c in (self.scaling, self.real) if c is not None]
        return sum(layer.nbytes() for cache in caches for layer in _layers(cache))


class RaggedRows:
    """Rows that add different numbers of tokens in one forward (a decode row one, a newcomer its prompt):
    every row's cached tokens and then every row's new tokens, back to back in a single row (batch 1), with
    an attention mask that keeps each new token to its own row's keys. The matmuls then run once over all
    the new tokens, where a newcomer's prefill on its own would run them again for its prompt alone.

    `cached[r]` and `new[r]`: row r's tokens in the cache and in this forward, rows in batch order."""

    def __init__(self, cached: list[int], new: list[int], device: torch.device) -> None:
        self.cached, self.new, self.device = cached, new, device
        rows = torch.arange(len(new), device=device)
        self.token_row = rows.repeat_interleave(torch.tensor(new, device=device))  # [new tokens]
        self.key_row = torch.cat([rows.repeat_interleave(torch.tensor(cached, device=device)), self.token_row])

    def attention_mask(self) -> torch.Tensor:
        """[1, 1, new tokens, cached + new tokens], True where a query may attend: the same row's keys,
        the cached ones and the new ones up to its own (transformers takes a 4D mask as it is)."""
        n = len(self.token_row)
        old = len(self.key_row) - n
        same_row = self.token_row[:, None] == self.key_row[None, :]
        key, query = torch.arange(old + n, device=self.device), torch.arange(n, device=self.device)
        causal = key[None, :] <= old + query[:, None]
        return (same_row & causal)[None, None]

    def flatten(self, cache: DynamicCache | None, mask: torch.Tensor, into: DynamicCache) -> DynamicCache:
        """`into`, an empty cache, given the tokens of `cache` where `mask` [rows of cache, seq] is 1, row
        after row (the rows of `cache` are this layout's first rows; the newcomers have none)."""
        if cache is not None:
            valid = mask.bool()
            for target, layer in zip(_layers(into), _layers(cache), strict=True):
                if layer.is_initialized:
                    target.replace(_flat(layer.keys, valid), _flat(layer.values, valid))
        return into

    def unflatten(self, flat: DynamicCache, into: DynamicCache, width: int) -> torch.Tensor:
        """`into`, an empty cache, given one row per request again, each left-padded to `width` columns;
        returns their attention mask [rows, width]."""
        cached, new = (torch.tensor(x, device=self.device) for x in (self.cached, self.new))
        start = width - (cached + new)  # each row's first column
        # A key's rank within its row (its cached tokens, then its new ones): its index in the flat layout
        # less where its row's part of that layout begins.
        old = len(self.key_row) - len(self.token_row)
        cached_begin = (cached.cumsum(0) - cached)[self.key_row[:old]]
        new_begin = old + (new.cumsum(0) - new)[self.token_row] - cached[self.token_row]
        rank = torch.arange(len(self.key_row), device=self.device) - torch.cat([cached_begin, new_begin])
        rows, columns = self.key_row, start[self.key_row] + rank
        for target, layer in zip(_layers(into), _layers(flat), strict=True):
            target.replace(*(_unflat(t, rows, columns, len(self.new), width) for t in (layer.keys, layer.values)))
        return (torch.arange(width, device=self.device)[None, :] >= start[:, None]).long()


def _flat(t: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[rows, heads, seq, dim] -> [1, heads, valid tokens, dim], row after row."""
    return t.transpose(1, 2)[valid].transpose(0, 1).unsqueeze(0)


def _unflat(t: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor, n_rows: int, width: int) -> torch.Tensor:
    """[1, heads, tokens, dim] -> [n_rows, heads, width, dim], token i at (rows[i], columns[i]), zeros elsewhere."""
    out = t.new_zeros(n_rows, width, t.shape[1], t.shape[3])
    out[rows, columns] = t[0].transpose(0, 1)
    return out.transpose(1, 2)


def _layers(cache: DynamicCache) -> list[GrowingLayer]:
    for layer in cache.layers:
        if not isinstance(layer, GrowingLayer):
            raise NotImplementedError(f"joining or selecting rows of a {type(layer).__name__} is not supported")
    return cache.layers


def _moves_in_place(rows: list[int]) -> bool:
    """Whether copying row rows[i] to row i, for i in order, never reads a row already written."""
    written = set()
    for new, old in enumerate(rows):
        if old in written:
            return False
        if new != old:
            written.add(new)
    return len(set(rows)) == len(rows)


def _all_allocated(*caches: DynamicCache | None) -> bool:
    """Whether every layer of these caches holds buffers (an empty cache's layers may not yet)."""
    return all(
        isinstance(layer, GrowingLayer) and layer.buffers is not None
        for cache in caches if cache is not None for layer in cache.layers
    )  # fmt: skip


def _map_layers(cache: DynamicCache, fn: Callable[[torch.Tensor], torch.Tensor]) -> DynamicCache:
    for layer in _layers(cache):
        if layer.is_initialized:
            layer.replace(fn(layer.keys), fn(layer.values))
    return cache


def _concat_layers(caches: list[DynamicCache], length: int) -> DynamicCache:
    first = caches[0]
    for i, layer in enumerate(_layers(first)):
        parts = [c.layers[i] for c in caches]

        def padded(t: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.pad(t, (0, 0, length - t.shape[2], 0))

        layer.replace(torch.cat([padded(p.keys) for p in parts]), torch.cat([padded(p.values) for p in parts]))
    return first
