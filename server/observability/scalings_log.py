"""A bounded log of recent requests' scalings (the server's `get_scalings_log`).

Each entry keeps the full [token, layer, adapter] scalings and the token ids (prompt, then completion) so
`GET /scalings/{id}` can show them; ids become text only when read, with the tokenizer. The oldest entry goes
when the log is full, so memory stays bounded by `scalings_log_size`.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch


@dataclass
class ScalingsEntry:
    id: str
    prompt_tokens: int
    completion_tokens: int
    adapter_names: list[str]
    routing: dict
    scalings: torch.Tensor  # [tokens processed, layers, adapters], float32 on the CPU
    frozen_from: int | None = None  # first position whose scalings are the frozen ones (Routing.freeze_after)
    token_ids: list[int] = field(default_factory=list)  # the prompt's, then the completion's
    constraint: str | None = None  # the kind of structured-output constraint (json_schema, regex, ...), if any
    created: float = field(default_factory=time.time)
    replica: str | None = None  # the replica (process) that served the request; set by the scalings store
    model: str | None = None  # the model that served it (docs/models.md); its experts are adapter_names
    # Per adapter, over layers and tokens (all, the prompt's, the completion's); computed once.
    mean: list[float] = field(init=False)
    prompt_mean: list[float] = field(init=False)
    completion_mean: list[float] = field(init=False)

    def __post_init__(self) -> None:
        # Position i holds prompt token i; completion token j was chosen by the mix at prompt_tokens - 1 + j
        # (as TokenScalings of /generate). Kept apart: a chat's shared system turn dominates the overall mean.
        first_choice = max(self.prompt_tokens - 1, 0)
        self.mean = self._mean_of(self.scalings)
        self.prompt_mean = self._mean_of(self.scalings[: self.prompt_tokens])
        self.completion_mean = self._mean_of(self.scalings[first_choice : first_choice + self.completion_tokens])

    def _mean_of(self, rows: torch.Tensor) -> list[float]:
        if rows.numel() == 0:
            return [0.0] * len(self.adapter_names)
        return rows.mean(dim=(0, 1)).tolist()

    def summary(self) -> dict:
        return {
            "id": self.id,
            "created": self.created,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "adapter_names": self.adapter_names,
            "mean_scalings": self.mean,
            "prompt_mean_scalings": self.prompt_mean,
            "completion_mean_scalings": self.completion_mean,
            "routing": self.routing,
            "frozen_from": self.frozen_from,
            "replica": self.replica,
            "constraint": self.constraint,
            "model": self.model,
        }

    def detail(self) -> dict:
        """The summary, the per-token scalings, and the token ids (the route turns those into text for
        admins only; the response models leave them out)."""
        return {
            **self.summary(),
            "n_layers": self.scalings.shape[1],
            "scalings": self.scalings.tolist(),
            "token_ids": self.token_ids,
        }


class RequestScalingsLog:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[str, ScalingsEntry] = OrderedDict()
        self._lock = threading.Lock()  # written by the model worker, read by the event loop

    def add(self, entry: ScalingsEntry) -> None:
        with self._lock:
            self._entries[entry.id] = entry
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

    def get(self, request_id: str) -> ScalingsEntry | None:
        with self._lock:
            return self._entries.get(request_id)

    def latest(self) -> ScalingsEntry | None:
        with self._lock:
            return next(reversed(self._entries.values()), None)

    def entries(self) -> list[ScalingsEntry]:
        with self._lock:
            return list(self._entries.values())

    def clear(self) -> int:
        with self._lock:
            count = len(self._entries)
            self._entries.clear()
            return count

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def bucketed(self) -> list[dict]:
        """Group by sequence length (prompt + completion), as peft's get_bucketed_scalings_log."""
        buckets: dict[int, dict] = {}
        for entry in self.entries():
            seq_len = entry.prompt_tokens + entry.completion_tokens
            bucket = buckets.setdefault(seq_len, {"seq_len": seq_len, "ids": [], "mean_scalings": []})
            bucket["ids"].append(entry.id)
            bucket["mean_scalings"].append(entry.mean)
        return [buckets[k] for k in sorted(buckets)]

    def mean_of(self, adapter: int, model: str | None = None) -> float:
        """Mean scaling of one adapter over the logged requests (of `model` if given; 0 when none); for the
        metrics gauge."""
        entries = [e for e in self.entries() if model is None or e.model == model]
        if not entries:
            return 0.0
        return sum(e.mean[adapter] for e in entries) / len(entries)
