"""The decode engine: one batch object, one loop. `generate`, `stream` and the server all run on it.

A `DecodeBatch` (after TGI's `CausalLMBatch`) owns its rows and their `XLoraCache`:

    batch, first = DecodeBatch.prefill(model, rows)   # the prompts, together; every row's first token
    batch.concatenate([other])                        # newcomers join a running batch
    out = batch.step()                                # one token for every row
    out = batch.step(joining=rows)                    # the same, newcomers prefilled in the same forward
    batch.filter(keep)                                # rows leave (a client went away)

Rows with the same prompt and routing in one `prefill` (the n choices of one request) share it: the prompt
runs once and its cache rows are copied. A row that asks for its prompt's log probabilities
(`SamplingParams.prompt_logprobs`) gets them from `prefill` (so it does not join in a `step`); a row with
max_new_tokens 0 finishes there without a token.

Rows that finish leave the batch by themselves at the end of `prefill` or `step`. Each row brings its
own `RowDecoder` (sampling, stopping, text) and `Routing` (top-k, global weight, freeze_after); a row
whose routing freezes is frozen in the cache right after the step that produced its token
`freeze_after`, and from then on skips the scaling pass.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .cache import XLoraCache
from .classifier import Routing
from .config import ConstraintError
from .sampling import RowDecoder, TokenLogprob, token_logprobs

if TYPE_CHECKING:
    from .model import XLoraModel


@dataclass
class BatchRow:
    """One request in a batch. `owner` is the caller's handle (the server's job); the engine never reads it."""

    decoder: RowDecoder
    routing: Routing
    owner: Any = None
    next_token: int = -1  # chosen, not yet fed to the model
    scalings: list[torch.Tensor] = field(default_factory=list)  # [positions, layers, experts] pieces, float32 CPU

    @property
    def prompt_ids(self) -> list[int]:
        return self.decoder.prompt_ids

    def all_scalings(self) -> torch.Tensor:
        """[positions processed, layers, experts]: the prompt's, then one per token fed back."""
        return torch.cat(self.scalings, dim=0)

    def frozen_from(self) -> int | None:
        """The first position whose scalings are the frozen ones, if this row froze before it finished."""
        k = self.routing.freeze_after
        if k is None or len(self.decoder.completion_ids) <= k + 1:
            return None
        return len(self.prompt_ids) + k


@dataclass
class Generated:
    """What one step gave one row: its token, the text it adds, and the scalings of the position that
    produced it [layers, experts]. finish_reason is set on a row's last token. token_id is None only for a
    row that generates nothing (max_new_tokens 0); logprob is set when the row asked for log probabilities.
    `error`: the row's constraint could not go on (no token, no text); the row has left the batch, and the
    other rows are unaffected."""

    row: BatchRow
    token_id: int | None
    text: str
    finish_reason: str | None
    scalings: torch.Tensor
    logprob: TokenLogprob | None = None
    error: ConstraintError | None = None


class DecodeBatch:
    def __init__(self, model: XLoraModel, rows: list[BatchRow], cache: XLoraCache | None) -> None:
        self.model = model
        self.rows = rows
        self.cache = cache

    def __len__(self) -> int:
        return len(self.rows)

    @classmethod
    def prefill(
        cls, model: XLoraModel, rows: list[BatchRow], pad_id: int = 0
    ) -> tuple[DecodeBatch, list[Generated]]:
        """Run the rows' prompts as one left-padded batch and choose each row's first token. Rows with the
        same prompt and routing share one prefill; rows asking for prompt logprobs get them here."""
        distinct: dict[tuple, int] = {}
        source = [distinct.setdefault((tuple(row.prompt_ids), row.routing), len(distinct)) for row in rows]
        firsts = [rows[source.index(d)] for d in range(len(distinct))]
        width = max(len(row.prompt_ids) for row in firsts)
        ids = torch.full((len(firsts), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(firsts), width), dtype=torch.long)
        for i, row in enumerate(firsts):
            n = len(row.prompt_ids)
            ids[i, width - n :] = torch.tensor(row.prompt_ids, dtype=torch.long)
            mask[i, width - n :] = 1
        scored = any(row.decoder.params.prompt_logprobs is not None for row in rows)
        logits, scalings, cache = model.prefill(ids, mask, [row.routing for row in firsts], all_positions=scored)
        if scored:
            for row, d in zip(rows, source, strict=True):
                if row.decoder.params.prompt_logprobs is not None:
                    row.decoder.prompt_logprobs = _prompt_logprobs(logits[d], row)
            logits = logits[:, -1]
        if len(firsts) < len(rows):  # a copy of the shared prompt's cache row for every row that shares it
            cache = cache.select(source)
            logits, scalings = logits[source], scalings[source]
        on_cpu = scalings.float().cpu()
        for i, row in enumerate(rows):
            row.scalings.append(model.own_scalings(row.routing, on_cpu[i, width - len(row.prompt_ids) :]))
        batch = cls(model, rows, cache)
        return batch, batch._advance(logits, scalings[:, -1])

    def step(self, joining: list[BatchRow] | None = None) -> list[Generated]:
        """Feed every row its last token and choose the next one. Rows in `joining` (not prefilled) join the
        batch in the same forward and choose their first token (XLoraModel.decode_and_prefill); if the
        forward fails, the batch is as it was. Rows that ask for prompt logprobs come in through `prefill`. The
        joint forward is eager: with a compiled model, prefill newcomers apart and `concatenate` them, so that
        running rows keep the compiled kernels (the server does)."""
        assert self.cache is not None, "step() on an empty batch"
        assert not any(row.decoder.params.prompt_logprobs is not None for row in joining or []), "prefill them"
        tokens = torch.tensor([row.next_token for row in self.rows], dtype=torch.long)
        if joining:
            rows = self.rows + joining
            logits, scalings, cache = self.model.decode_and_prefill(
                tokens, self.cache, [row.prompt_ids for row in joining], [row.routing for row in rows]
            )
            self.rows, self.cache = rows, cache
            for row, s in zip(rows, scalings, strict=True):
                row.scalings.append(self.model.own_scalings(row.routing, s.float().cpu()))
            return self._advance(logits, torch.stack([s[-1] for s in scalings]))
        logits, scalings = self.model.decode(tokens, self.cache, [row.routing for row in self.rows])
        on_cpu = scalings.float().cpu()
        for i, row in enumerate(self.rows):
            row.scalings.append(self.model.own_scalings(row.routing, on_cpu[i]))
        return self._advance(logits, scalings[:, -1])

    def filter(self, keep: list[int]) -> None:
        """Keep these rows (indices into `rows`), in this order; the others' cache rows are freed."""
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        self.cache = self.cache.select(keep) if keep and self.cache is not None else None

    def concatenate(self, others: list[DecodeBatch]) -> None:
        """Take the rows of `others` (prefilled batches) into this one; they are left empty."""
        batches = [b for b in (self, *others) if b.rows]
        caches = [b.cache for b in batches]
        self.rows = [row for b in batches for row in b.rows]
        self.cache = XLoraCache.concat(caches) if len(caches) > 1 else next(iter(caches), None)
        for other in others:
            other.rows, other.cache = [], None

    def _advance(self, logits: torch.Tensor, last_scalings: torch.Tensor) -> list[Generated]:
        """Each row chooses its token; rows whose routing says so freeze; finished rows leave."""
        out, keep, freeze = [], [], {}
        for i, row in enumerate(self.rows):
            dec = row.decoder
            if dec.params.max_new_tokens == 0:  # the prompt only scored: nothing to generate
                out.append(Generated(row, None, "", dec.finish_unprompted(), row.scalings[-1][-1]))
                continue
            try:
                token, text, finish = dec.step(logits[i])
            except ConstraintError as exc:  # this row's own grammar: it alone leaves
                out.append(Generated(row, -1, "", None, row.scalings[-1][-1], error=exc))
                continue
            row.next_token = token
            logprob = dec.logprobs[-1] if dec.params.logprobs is not None else None
            out.append(Generated(row, token, text, finish, row.scalings[-1][-1], logprob))
            if finish is not None:
                continue
            keep.append(i)
            if row.routing.freezes_at(len(row.decoder.completion_ids) - 1):
                freeze[i] = last_scalings[i]
        if freeze:
            self.cache.freeze(freeze)
        self.filter(keep)
        return out


def _prompt_logprobs(logits: torch.Tensor, row: BatchRow) -> list[TokenLogprob | None]:
    """The log probability of each prompt token after the ones before it, under the model's own distribution
    (no processors), from the prefill's logits of this row [width, vocab]; the first token has none."""
    n = len(row.prompt_ids)
    logprobs = torch.log_softmax(logits[logits.shape[0] - n : -1], dim=-1)
    tokens = torch.tensor(row.prompt_ids[1:], dtype=torch.long, device=logprobs.device)
    return [None, *token_logprobs(logprobs, tokens, row.decoder.params.prompt_logprobs or 0)]


def run(model: XLoraModel, rows: list[BatchRow], pad_id: int = 0) -> Iterator[list[Generated]]:
    """The decode loop of a fixed set of rows: what each step gave, until every row has finished. A row's
    constraint that cannot go on raises its ConstraintError."""
    batch, out = DecodeBatch.prefill(model, rows, pad_id)
    while True:
        for generated in out:
            if generated.error is not None:
                raise generated.error
        yield out
        if not batch:
            return
        out = batch.step()
