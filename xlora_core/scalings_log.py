"""A bounded log of the classifier's scalings, one entry per classifier call (as peft's log_scalings)."""

from __future__ import annotations

from collections import deque

import torch


class ClassifierScalingsLog:
    """Keeps the newest `max_entries` scalings tensors [batch, seq, n_layers, n_experts] so a server
    running for weeks cannot grow without limit; older entries fall off the front."""

    def __init__(self, max_entries: int = 1024):
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self.enabled = False
        self._entries: deque[torch.Tensor] = deque(maxlen=max_entries)

    @property
    def max_entries(self) -> int:
        return self._entries.maxlen or 0

    def record(self, scalings: torch.Tensor) -> None:
        if self.enabled:
            self._entries.append(scalings.detach())

    def entries(self) -> list[torch.Tensor]:
        """A copy of the list (the tensors themselves are shared)."""
        return list(self._entries)

    def bucketed(self) -> dict[int, tuple[list[int], list[torch.Tensor]]]:
        """seq_len -> (positions in the log, tensors), as peft's get_bucketed_scalings_log."""
        buckets: dict[int, tuple[list[int], list[torch.Tensor]]] = {}
        for i, scalings in enumerate(self._entries):
            positions, tensors = buckets.setdefault(scalings.shape[1], ([], []))
            positions.append(i)
            tensors.append(scalings)
        return buckets

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
