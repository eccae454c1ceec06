"""`generate` and `stream`: the Python API's two ways to run the decode engine (engine.run).

    model.generate(input_ids, max_new_tokens=32)                      # like transformers' generate
    model.generate(input_ids, tokenizer=tok, constraint=grammar)      # structured output (constraints.py)
    model.generate(input_ids, prefix_cache=PrefixCache(1 << 30))      # reuse prompt prefixes across calls
    for token in model.stream(input_ids, tokenizer=tok): print(token.text, end="")
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from transformers import PreTrainedTokenizerBase

from .classifier import Routing
from .engine import BatchRow, run
from .prefix_cache import PrefixCache
from .sampling import RowDecoder, SamplingParams

if TYPE_CHECKING:
    from .model import XLoraModel


@dataclass
class StreamedToken:
    """One token from `stream`: its id, the text it adds, the scalings of the position that produced
    it [n_lora_layers, n_experts], and finish_reason once it is the last."""

    token_id: int
    text: str
    scalings: torch.Tensor
    finish_reason: str | None


def sampling_params(kwargs: dict[str, Any]) -> SamplingParams:
    """transformers' generate argument names -> SamplingParams; unknown names are a TypeError.
    `constraint` (a CompiledGrammar from xlora_core.constraints) is ours: every row follows it."""
    kwargs = dict(kwargs)
    do_sample = kwargs.pop("do_sample", False)
    temperature = kwargs.pop("temperature", 1.0)
    stop = kwargs.pop("stop_strings", None) or []
    params = SamplingParams(
        max_new_tokens=kwargs.pop("max_new_tokens", 20),
        min_new_tokens=kwargs.pop("min_new_tokens", 0) or 0,
        temperature=(temperature if temperature is not None else 1.0) if do_sample else 0.0,
        top_p=kwargs.pop("top_p", None) or 1.0,
        top_k=kwargs.pop("top_k", None) or 0,
        repetition_penalty=kwargs.pop("repetition_penalty", None) or 1.0,
        seed=kwargs.pop("seed", None),
        stop=[stop] if isinstance(stop, str) else list(stop),
        eos_token_id=kwargs.pop("eos_token_id", None),
        constraint=kwargs.pop("constraint", None),
    )
    if kwargs:
        raise TypeError(f"unsupported generation arguments: {sorted(kwargs)}")
    return params


def _rows(
    model: XLoraModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    tokenizer: PreTrainedTokenizerBase | None,
    routing: Routing | list[Routing] | None,
    kwargs: dict[str, Any],
) -> list[BatchRow]:
    params = sampling_params(kwargs)
    if params.eos_token_id is None:
        params.eos_token_id = model.base.generation_config.eos_token_id
    if attention_mask is None:
        prompts = input_ids.tolist()
    else:
        prompts = [row[mask.bool()].tolist() for row, mask in zip(input_ids.cpu(), attention_mask.cpu(), strict=True)]
    routings = routing if isinstance(routing, list) else [routing or model.routing] * len(prompts)
    if len(routings) != len(prompts):
        raise ValueError(f"routing has {len(routings)} entries for a batch of {len(prompts)}")
    return [
        BatchRow(RowDecoder(params, tokenizer, ids), r, owner=i)
        for i, (ids, r) in enumerate(zip(prompts, routings, strict=True))
    ]


def generate(
    model: XLoraModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    routing: Routing | list[Routing] | None = None,
    pad_token_id: int | None = None,
    prefix_cache: PrefixCache | None = None,
    **generation_kwargs: Any,
) -> torch.Tensor:
    """Batched generation with both KV caches. Returns [batch, prompt + new] token ids; rows that finish
    early are padded with pad_token_id (default: the eos token), as transformers does. Afterwards
    `model.latest_scalings` holds [batch, prompt + new - 1, layers, experts] (zeros where a row has no
    position: its left padding, or after it finished). `prefix_cache`: prompts start from the longest
    prefix stored there by earlier calls, and are stored (docs/prefix-caching.md)."""
    rows = _rows(model, input_ids, attention_mask, tokenizer, routing, generation_kwargs)
    pad = pad_token_id if pad_token_id is not None else (rows[0].decoder.eos_ids or [0])[0]
    for _ in run(model, rows, pad_id=pad, prefix_cache=prefix_cache):
        pass

    longest = max(len(row.decoder.completion_ids) for row in rows)
    new = [row.decoder.completion_ids + [pad] * (longest - len(row.decoder.completion_ids)) for row in rows]
    model.latest_scalings = _padded_scalings(rows, input_ids.shape[1], longest)
    return torch.cat([input_ids.to(model.device), torch.tensor(new, device=model.device)], dim=1)


def stream(
    model: XLoraModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    routing: Routing | None = None,
    prefix_cache: PrefixCache | None = None,
    **generation_kwargs: Any,
) -> Iterator[StreamedToken]:
    """Generate for one prompt, yielding each token with its scalings as soon as it is chosen (`prefix_cache`
    as for generate)."""
    if input_ids.shape[0] != 1:
        raise ValueError(f"stream takes one prompt, got a batch of {input_ids.shape[0]}")
    rows = _rows(model, input_ids, attention_mask, tokenizer, routing, generation_kwargs)
    for (out,) in run(model, rows, prefix_cache=prefix_cache):
        if out.token_id is None:  # max_new_tokens 0: nothing generated
            return
        yield StreamedToken(out.token_id, out.text, out.scalings, out.finish_reason)


def _padded_scalings(rows: list[BatchRow], width: int, longest: int) -> torch.Tensor | None:
    """Each row's scalings placed as its tokens are in the output: prompts right-aligned at `width`."""
    first = rows[0].scalings[0]
    if any(row.scalings[0].shape[1:] != first.shape[1:] for row in rows):
        return None  # rows of models with different layers or experts (XLoraModel.hosted): no one tensor
    out = torch.zeros((len(rows), width + longest - 1, *first.shape[1:]), dtype=first.dtype)
    for i, row in enumerate(rows):
        scalings = row.all_scalings()
        n_prompt = len(row.prompt_ids)
        out[i, width - n_prompt : width - n_prompt + scalings.shape[0]] = scalings
    return out
