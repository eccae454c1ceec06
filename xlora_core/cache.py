"""What X-LoRA generation keeps between steps: two KV caches, their attention mask, frozen scalings.

The scaling pass and the real pass run the same backbone with different expert weights, so they see
different keys and values: each keeps its own transformers `DynamicCache`. A row whose scalings are
frozen (`Routing.freeze_after`) needs no scaling pass any more: it keeps its frozen scalings here and
leaves the scaling cache, which therefore holds only the granular rows, in batch order. Both caches
always have the same number of columns, so they share the attention mask.

Rows can be selected (drop finished requests) and caches of different lengths joined (a request joins
a running batch): the shorter ones are left-padded, which the attention mask hides.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


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
        The tensors are re-sliced in place: use the returned cache, not this one, afterwards."""
        device = self.attention_mask.device
        index = torch.tensor(rows, dtype=torch.long, device=device)
        mask = self.attention_mask[index]
        used = mask.any(dim=0).nonzero()
        start = int(used[0]) if len(used) else mask.shape[1]
        position_in_scaling = {row: i for i, row in enumerate(self.granular_rows())}
        scaling_rows = [position_in_scaling[r] for r in rows if r in position_in_scaling]
        scaling = None
        if scaling_rows and self.scaling is not None:
            scaling_index = torch.tensor(scaling_rows, dtype=torch.long, device=device)
            scaling = _map_layers(self.scaling, lambda t: t[scaling_index, :, start:])
        return XLoraCache(
            scaling=scaling,
            real=_map_layers(self.real, lambda t: t[index, :, start:]),
            attention_mask=mask[:, start:],
            frozen=[self.frozen[r] for r in rows],
        )

    @staticmethod
    def concat(caches: list[XLoraCache]) -> XLoraCache:
        """Join the rows of several caches into one batch, left-padding the shorter ones.
        The inputs are consumed: use only the returned cache afterwards."""
        length = max(c.seq_len for c in caches)
        masks = [torch.nn.functional.pad(c.attention_mask, (length - c.seq_len, 0)) for c in caches]
        scaling = [c.scaling for c in caches if c.scaling is not None]
        return XLoraCache(
            scaling=_concat_layers(scaling, length) if scaling else None,
            real=_concat_layers([c.real for c in caches], length),
            attention_mask=torch.cat(masks),
            frozen=[f for c in caches for f in c.frozen],
        )

    def nbytes(self) -> int:
        """Memory held by the keys and values of both caches."""
        caches = [c for c in (self.scaling, self.real) if c is not None]
        return sum(t.numel() * t.element_size() for cache in caches for t in _tensors(cache))


def _layers(cache: DynamicCache) -> list[DynamicLayer]:
    for layer in cache.layers:
        if type(layer) is not DynamicLayer:
            raise NotImplementedError(f"joining or selecting rows of a {type(layer).__name__} is not supported")
    return cache.layers


def _tensors(cache: DynamicCache) -> Iterator[torch.Tensor]:
    for layer in cache.layers:
        if layer.is_initialized:
            yield layer.keys
            yield layer.values


def _map_layers(cache: DynamicCache, fn: Callable[[torch.Tensor], torch.Tensor]) -> DynamicCache:
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
