"""The decode engine: one batch object, one loop. `generate`, `stream` and the server all run on it.

A `DecodeBatch` (after TGI's `CausalLMBatch`) owns its rows and their `XLoraCache`:

    batch, first = DecodeBatch.prefill(model, rows)   # the prompts, together; every row's first token
    batch.concatenate([other])                        # newcomers join a running batch
    out = batch.step()                                # one token for every row
    out = batch.step(joining=rows)                    # the same, newcomers prefilled in the same forward
    out = batch.step(joining=rows, max_tokens=256)    # ... at most 256 tokens: long prompts go in chunks
    batch.filter(keep)                                # rows leave (a client went away)

Rows with the same prompt and routing in one `prefill` (the n choices of one request) share it: the prompt
runs once and its cache rows are copied. A row that asks for its prompt's log probabilities
(`SamplingParams.prompt_logprobs`) gets them from `prefill` (so it does not join in a `step`); a row with
max_new_tokens 0 finishes there without a token.

Chunked prefill: under a token budget (`step(max_tokens=...)`), a row whose prompt does not fit is prefilled
a chunk per step, in the running rows' forwards, so that they go on getting tokens meanwhile; it chooses its
first token in the step that feeds its prompt's last chunk (`BatchRow.prefilling` until then).

With the packaged compiled step (compiled_step.py), `step` feeds prompts in the compiled step itself, a token a
row (XLoraModel.decode_rows): newcomers join with room for their prompt, and decoding rows and prompt tokens
share the step's 16 rows. A prompt then gets the same bits however it is split, and running rows never wait
for an eager prefill. The caller prefills prompts over MAX_PROMPT_IN_STEPS tokens apart.

With a `PrefixCache` (prefix_cache.py), a row that joins in a `step` starts from the stored keys, values and
scalings of the longest stored prefix of its prompt, and every row's prompt is stored once it is done.

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

from .batch_invariant import QUERY_BLOCK
from .cache import XLoraCache, growing_cache
from .classifier import Routing
from .compiled_step import MAX_BATCH
from .config import ConstraintError
from .prefix_cache import PrefixCache
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
    prefilled: int = 0  # prompt tokens in the cache
    chunks: int = 0  # forwards that fed it prompt tokens
    reused_tokens: int = 0  # prompt tokens taken from the prefix cache

    @property
    def prompt_ids(self) -> list[int]:
        return self.decoder.prompt_ids

    @property
    def prefilling(self) -> bool:
        """Whether part of its prompt is still to be fed (it has no token yet)."""
        return self.prefilled < len(self.prompt_ids)

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


# Prompts up to this many tokens go into the compiled step a token a row (`step` with the packaged step); the
# caller prefills longer ones apart (the server, `run`): 16 tokens a step, each over every key before it, is slower
# for a long prompt than an eager prefill. A rule on the prompt alone: a request goes the same way in any batch.
MAX_PROMPT_IN_STEPS = 256


class DecodeBatch:
    def __init__(
        self, model: XLoraModel, rows: list[BatchRow], cache: XLoraCache | None, prefix_cache: PrefixCache | None = None
    ) -> None:
        self.model = model
        self.rows = rows
        self.cache = cache
        self.prefix_cache = prefix_cache
        # False: prompts are fed eagerly even with the packaged step (a batch that prefills long prompts apart)
        self.prompts_in_steps = True

    def __len__(self) -> int:
        return len(self.rows)

    @classmethod
    def prefill(
        cls, model: XLoraModel, rows: list[BatchRow], pad_id: int = 0, prefix_cache: PrefixCache | None = None
    ) -> tuple[DecodeBatch, list[Generated]]:
        """Run the rows' prompts as one left-padded batch and choose each row's first token. Rows with the
        same prompt and routing share one prefill; rows asking for prompt logprobs get them here. The prompts
        are stored in `prefix_cache` (not looked up: this path computes every position)."""
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
            row.prefilled, row.chunks = len(row.prompt_ids), 1
        batch = cls(model, rows, cache, prefix_cache)
        batch._store_prompts(rows)
        return batch, batch._advance(logits, scalings[:, -1])

    def step(self, joining: list[BatchRow] | None = None, max_tokens: int | None = None) -> list[Generated]:
        """Feed every row its last token and choose the next one. Rows in `joining` (not prefilled) join the
        batch in the same forward (XLoraModel.decode_and_prefill), from their longest prefix in the prefix
        cache if there is one. `max_tokens`: the tokens this forward may feed; a decoding row takes one, rows
        being prefilled share what is left in order (`_chunk`: each at least up to its next 16-token grid
        point), the rest of their prompts waits for the next steps. Only rows that were fed their prompt's
        last token choose one. If the forward fails, the batch is as it was. Rows that ask for prompt
        logprobs come in through `prefill`. With the packaged compiled step, prompts go into it a token a row
        (`_step_token_rows`). Otherwise the joint forward is eager: with a model compiled by `compile()`,
        prefill newcomers in a batch of their own (in chunks too) and move them over with `split_off_prefilled`
        and `concatenate`, so that running rows keep the compiled kernels (the server does)."""
        joining = list(joining or [])
        assert self.rows or joining, "step() on an empty batch"
        assert not any(row.decoder.params.prompt_logprobs is not None for row in joining), "prefill them"
        if not joining and not any(row.prefilling for row in self.rows):
            tokens = torch.tensor([row.next_token for row in self.rows], dtype=torch.long)
            logits, scalings = self.model.decode(tokens, self.cache, [row.routing for row in self.rows])
            on_cpu = scalings.float().cpu()
            for i, row in enumerate(self.rows):
                row.scalings.append(self.model.own_scalings(row.routing, on_cpu[i]))
            return self._advance(logits, scalings[:, -1])

        if self.prompts_in_steps and self.model.feeds_prompts_in_steps([row.routing for row in self.rows + joining]):
            return self._step_token_rows(joining, max_tokens)

        before = len(self.rows)
        fresh = [row for row in joining if not self._join_from_prefix_cache(row)]
        try:
            left = (max_tokens if max_tokens is not None else 1 << 62) - sum(not r.prefilling for r in self.rows)
            fed, prompts = [], []
            rows = self.rows + fresh
            for i, row in enumerate(rows):
                if not row.prefilling:
                    fed.append([row.next_token])
                    continue
                n = _chunk(row.prefilled, len(row.prompt_ids), left)
                left -= n
                (fed if i < len(self.rows) else prompts).append(row.prompt_ids[row.prefilled : row.prefilled + n])
            logits, scalings, cache = self.model.decode_and_prefill(
                fed, self.cache, prompts, [row.routing for row in rows]
            )
        except BaseException:
            for row in self.rows[before:]:  # the rows that joined from the prefix cache leave again
                row.prefilled, row.scalings, row.reused_tokens = 0, [], 0
            self.filter(list(range(before)))
            raise
        done = []
        for row, part, s in zip(rows, fed + prompts, scalings, strict=True):
            row.scalings.append(self.model.own_scalings(row.routing, s.float().cpu()))
            if row.prefilling:
                row.prefilled += len(part)
                row.chunks += 1
                if not row.prefilling:
                    done.append(row)
        self.rows, self.cache = rows, cache
        self._store_prompts(done)
        return self._advance(logits, torch.stack([s[-1] for s in scalings]))

    def _step_token_rows(self, joining: list[BatchRow], max_tokens: int | None) -> list[Generated]:
        """`step` with the packaged compiled step: every token a row of its own (XLoraModel.decode_rows). The
        newcomers join with room for their whole prompt (from their longest prefix in the prefix cache if there
        is one); decoding rows take one token each, rows being prefilled share what is left of `max_tokens` and
        of the step's MAX_BATCH rows, in order, at least one token a step."""
        before = len(self.rows)
        try:
            if joining:
                self._join_with_room(joining)
            decoding = sum(not row.prefilling for row in self.rows)
            budget = min(MAX_BATCH, max_tokens if max_tokens is not None else MAX_BATCH)
            left = max(budget - decoding, 1 if decoding < MAX_BATCH else 0)
            fed, prompts = [], []
            for row in self.rows:
                if not row.prefilling:
                    fed.append([row.next_token])
                    prompts.append(None)
                    continue
                n = max(min(left, len(row.prompt_ids) - row.prefilled), 0)
                left -= n
                fed.append(row.prompt_ids[row.prefilled : row.prefilled + n])
                prompts.append(len(row.prompt_ids))
            # A row none of whose prompt is in yet has its room in the last columns: there must be enough.
            room = max((len(r.prompt_ids) for r in self.rows if r.prefilling and not r.prefilled), default=0)
            if room > self.cache.seq_len:
                self.cache = self.cache.padded(left=room - self.cache.seq_len)
            logits, scalings = self.model.decode_rows(fed, self.cache, [row.routing for row in self.rows], prompts)
        except BaseException:
            for row in self.rows[before:]:  # the newcomers leave again
                row.prefilled, row.scalings, row.reused_tokens = 0, [], 0
            self.filter(list(range(before)))
            raise
        done, last = [], torch.zeros(len(self.rows), *scalings[0].shape[1:], dtype=scalings[0].dtype)
        for i, (row, part, s) in enumerate(zip(self.rows, fed, scalings, strict=True)):
            if not part:
                continue
            row.scalings.append(self.model.own_scalings(row.routing, s.float().cpu()))
            last[i] = s[-1]
            if row.prefilling:
                row.prefilled += len(part)
                row.chunks += 1
                if not row.prefilling:
                    done.append(row)
        self._store_prompts(done, tail=True)
        return self._advance(logits, last)

    def _join_with_room(self, rows: list[BatchRow]) -> None:
        """Take these rows into the batch, each with a cache row of room for its whole prompt (for
        XLoraModel.decode_rows), holding its longest stored prefix from the prefix cache if there is one."""
        # Rows and cache rows are added together (the caches change in place): if this fails, the rows in so
        # far are the batch's, and `_step_token_rows` takes them out again.
        fresh, prefixes = [], self.prefix_cache
        for row in rows:
            hit = prefixes.lookup(self.model, row.routing, row.prompt_ids, tail=True) if prefixes else None
            if hit is None:
                fresh.append(row)
                continue
            prompt, cache = len(row.prompt_ids), self.cache
            if cache is not None and cache.seq_len < prompt:
                cache = self.cache = cache.padded(left=prompt - cache.seq_len)
            # its prefix where its prompt's room begins, written straight into the batch's free rows if it can
            joined = None if cache is None else cache.with_stacked_row(hit.kv, cache.seq_len - prompt + hit.tokens)
            if joined is None:
                room = hit.one_row_cache(self.model).padded(right=prompt - hit.tokens)
                joined = room if cache is None else XLoraCache.concat([cache, room])
            cache = joined
            row.prefilled = row.reused_tokens = hit.tokens
            row.scalings = [hit.scalings]
            self.rows, self.cache = self.rows + [row], cache
        if fresh:
            width = max(len(row.prompt_ids) for row in fresh)
            cache = self.model.rows_for_prompts([row.routing for row in fresh], width, self.cache)
            self.rows, self.cache = self.rows + fresh, cache

    def _join_from_prefix_cache(self, row: BatchRow) -> bool:
        """Take the row into the batch with its prompt's longest stored prefix as its cache row, if there is
        one; it is then a row being prefilled, the rest of its prompt to come."""
        if self.prefix_cache is None:
            return False
        hit = self.prefix_cache.lookup(self.model, row.routing, row.prompt_ids)
        if hit is None:
            return False
        row.prefilled = row.reused_tokens = hit.tokens
        row.scalings = [hit.scalings]
        self.rows = self.rows + [row]
        own = hit.one_row_cache(self.model)
        self.cache = own if self.cache is None else XLoraCache.concat([self.cache, own])
        return True

    def _store_prompts(self, rows: list[BatchRow], tail: bool = False) -> None:
        """Store these rows' prompts, just done (their cache rows hold the prompt only), in the prefix cache;
        with `tail` (fed a token a row), their tails too (prefix_cache.py)."""
        if self.prefix_cache is None:
            return
        for row in rows:
            i = next(i for i, r in enumerate(self.rows) if r is row)
            scalings = torch.cat(row.scalings)[: len(row.prompt_ids)]
            self.prefix_cache.insert(self.model, row.routing, row.prompt_ids, self.cache, i, scalings, tail=tail)

    def filter(self, keep: list[int]) -> None:
        """Keep these rows (indices into `rows`), in this order; the others' cache rows are freed."""
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        self.cache = self.cache.select(keep) if keep and self.cache is not None else None

    def split_off_prefilled(self) -> DecodeBatch:
        """The rows whose prompts are done leave this batch for a new one (their cache rows copied there):
        a batch that only prefills, in chunks, hands its rows over to the running one."""
        done = [i for i, row in enumerate(self.rows) if not row.prefilling]
        if not done:
            return DecodeBatch(self.model, [], None, self.prefix_cache)
        config, kv = self.model.base.config, self.model.kv_dtype
        cache = self.cache.copy_rows(done, lambda: growing_cache(config, kv))
        out = DecodeBatch(self.model, [self.rows[i] for i in done], cache, self.prefix_cache)
        self.filter([i for i, row in enumerate(self.rows) if row.prefilling])
        return out

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
            if row.prefilling:  # more of its prompt to come: no token yet
                keep.append(i)
                continue
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
        self.filter(_last_into_gaps(keep))
        return out


def _last_into_gaps(keep: list[int]) -> list[int]:
    """The rows `keep` (in increasing order), the last ones moved into the places of those that left: the cache
    then copies one row per row that left, where keeping the order would move every row after it."""
    kept, tail = set(keep), [row for row in keep if row >= len(keep)]
    return [row if row in kept else tail.pop() for row in range(len(keep))]


def _chunk(done: int, prompt: int, budget: int) -> int:
    """How many prompt tokens a row being prefilled takes in a step: what the budget leaves, cut to end on
    batch_invariant's QUERY_BLOCK grid (so chunking does not change its bits), at least up to the next grid
    point, at most the rest of its prompt."""
    end = done + max(budget, 1)
    if end < prompt:
        end = max(end // QUERY_BLOCK * QUERY_BLOCK, (done // QUERY_BLOCK + 1) * QUERY_BLOCK)
    return min(end, prompt) - done


def _prompt_logprobs(logits: torch.Tensor, row: BatchRow) -> list[TokenLogprob | None]:
    """The log probability of each prompt token after the ones before it, under the model's own distribution
    (no processors), from the prefill's logits of this row [width, vocab]; the first token has none."""
    n = len(row.prompt_ids)
    logprobs = torch.log_softmax(logits[logits.shape[0] - n : -1], dim=-1)
    tokens = torch.tensor(row.prompt_ids[1:], dtype=torch.long, device=logprobs.device)
    return [None, *token_logprobs(logprobs, tokens, row.decoder.params.prompt_logprobs or 0)]


def run(
    model: XLoraModel, rows: list[BatchRow], pad_id: int = 0, prefix_cache: PrefixCache | None = None
) -> Iterator[list[Generated]]:
    """The decode loop of a fixed set of rows: what each step gave, until every row has finished. A row's
    constraint that cannot go on raises its ConstraintError. With a prefix cache the prompts start from their
    stored prefixes (rows asking for prompt logprobs: every position is computed, and stored)."""
    scored = any(row.decoder.params.prompt_logprobs is not None for row in rows)
    in_steps = model.feeds_prompts_in_steps([row.routing for row in rows]) and all(
        len(row.prompt_ids) <= MAX_PROMPT_IN_STEPS for row in rows
    )
    if scored or (prefix_cache is None and not in_steps):
        batch, out = DecodeBatch.prefill(model, rows, pad_id, prefix_cache)
    else:
        batch = DecodeBatch(model, [], None, prefix_cache)
        out = batch.step(joining=rows)  # no budget: every prompt in this one forward (compiled: in steps)
    while True:
        for generated in out:
            if generated.error is not None:
                raise generated.error
        if out:  # a step that only fed prompts gave nothing yet
            yield out
        if not batch:
            return
        out = batch.step()
