"""The two KV caches of X-LoRA generation, kept together with the attention mask they share.

The scaling pass and the real pass run the same backbone with different expert weights, so they see
different keys and values: each keeps its own transformers `DynamicCache`. Rows can be selected
(drop finished requests) and caches of different lengths joined (a request joins a running batch):
the shorter ones are left-padded, which the attention mask hides.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


@dataclass
class XLoraCache:
    scaling: DynamicCache
    real: DynamicCache
    attention_mask: torch.Tensor  # [batch, seq_len], 0 on padding

    @property
    def batch_size(self) -> int:
        return self.attention_mask.shape[0]

    @property
    def seq_len(self) -> int:
        return self.attention_mask.shape[1]

    def next_positions(self) -> torch.Tensor:
        """Position id of the next token of each row: [batch, 1] (padding does not count)."""
        return self.attention_mask.sum(dim=1, keepdim=True)

    def select(self, rows: list[int]) -> XLoraCache:
        """Keep these rows, in this order; drop leading columns that are now padding in every row.
        The tensors are re-sliced in place: use the returned cache, not this one, afterwards."""
        index = torch.tensor(rows, dtype=torch.long, device=self.attention_mask.device)
        mask = self.attention_mask[index]
        used = mask.any(dim=0).nonzero()
        start = int(used[0]) if len(used) else mask.shape[1]
        return XLoraCache(
            scaling=_map_layers(self.scaling, lambda t: t[index, :, start:]),
            real=_map_layers(self.real, lambda t: t[index, :, start:]),
            attention_mask=mask[:, start:],
        )

    @staticmethod
    def concat(caches: list[XLoraCache]) -> XLoraCache:
        """Join the rows of several caches into one batch, left-padding the shorter ones.
        The inputs are consumed: use only the returned cache afterwards."""
        length = max(c.seq_len for c in caches)
        masks = [torch.nn.functional.pad(c.attention_mask, (length - c.seq_len, 0)) for c in caches]
        return XLoraCache(
            scaling=_concat_layers([c.scaling for c in caches], length),
            real=_concat_layers([c.real for c in caches], length),
            attention_mask=torch.cat(masks),
        )

    def nbytes(self) -> int:
        """Memory held by the keys and values of both caches."""
        return sum(t.numel() * t.element_size() for cache in (self.scaling, self.real) for t in _tensors(cache))


def _layers(cache: DynamicCache) -> list[DynamicLayer]:
    for layer in cache.layers:
        if type(layer) is not DynamicLayer:
            raise NotImplementedError(f"joining or selecting rows of a {type(layer).__name__} is not supported")
    return cache.layers


def _tensors(cache: DynamicCache):
    for layer in cache.layers:
        if layer.is_initialized:
            yield layer.keys
            yield layer.values


def _map_layers(cache: DynamicCache, fn) -> DynamicCache:
    for layer in _layers(cache):
        if layer.is_initialized:
            layer.keys, layer.values = fn(layer.keys), fn(layer.values)
    return cache


def _concat_layers(caches: list[DynamicCache], length: int) -> DynamicCache:
    first = caches[0]
    for i, layer in enumerate(_layers(first)):
        parts = [c.layers[i] for c in caches]

        def padded(t: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.pad(t, (0, 0, length - t.shape[2], 0))

        layer.keys = torch.cat([padded(p.keys) for p in parts])
        layer.values = torch.cat([padded(p.values) for p in parts])
    return first
