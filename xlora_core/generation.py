"""Generation: sampling settings, one decoder per row, and the loop over cached X-LoRA steps.

Logits processing and stopping are transformers' own (logits processors, stopping criteria); a
`RowDecoder` holds them for one request, so rows of one batch may use different settings.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from transformers import (
    EosTokenCriteria,
    LogitsProcessorList,
    MaxLengthCriteria,
    MinNewTokensLengthLogitsProcessor,
    PreTrainedTokenizerBase,
    RepetitionPenaltyLogitsProcessor,
    StopStringCriteria,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from .classifier import Routing

if TYPE_CHECKING:
    from .model import XLoraModel


# Below this a temperature samples as greedy, its limit: logits / 1e-40 overflow float32 to +-inf.
MIN_TEMPERATURE = 1e-4


@dataclass
class SamplingParams:
    """How one request picks its tokens. temperature 0 (or below MIN_TEMPERATURE) means greedy."""

    max_new_tokens: int = 64
    min_new_tokens: int = 0
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    eos_token_id: int | list[int] | None = None

    def __post_init__(self) -> None:
        def bad(name: str, rule: str) -> ValueError:
            return ValueError(f"{name} must be {rule}, got {getattr(self, name)!r}")

        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise bad("max_new_tokens", "an integer >= 1")
        if not isinstance(self.min_new_tokens, int) or not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise bad("min_new_tokens", "an integer in 0..max_new_tokens")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise bad("temperature", "a finite number >= 0")
        if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise bad("top_p", "in (0, 1]")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise bad("top_k", "an integer >= 0 (0 = off)")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise bad("repetition_penalty", "a finite number > 0")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise bad("stop", "a list of non-empty strings")

    @property
    def do_sample(self) -> bool:
        return self.temperature >= MIN_TEMPERATURE


class RowDecoder:
    """Chooses and records the tokens of one request; says when it is finished and why."""

    def __init__(self, params: SamplingParams, tokenizer: PreTrainedTokenizerBase | None, prompt_ids: list[int]):
        self.params = params
        self.tokenizer = tokenizer
        self.prompt_ids = list(prompt_ids)
        self.completion_ids: list[int] = []
        self.finish_reason: str | None = None
        eos = params.eos_token_id
        if eos is None and tokenizer is not None:
            eos = tokenizer.eos_token_id
        self.eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        n_prompt = len(self.prompt_ids)

        self.processors = LogitsProcessorList()
        if params.repetition_penalty != 1.0:
            self.processors.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
        if params.min_new_tokens > 0 and self.eos_ids:
            self.processors.append(MinNewTokensLengthLogitsProcessor(n_prompt, params.min_new_tokens, self.eos_ids))
        if params.do_sample:
            if params.temperature != 1.0:
                self.processors.append(TemperatureLogitsWarper(params.temperature))
            if params.top_k > 0:
                self.processors.append(TopKLogitsWarper(params.top_k))
            if params.top_p < 1.0:
                self.processors.append(TopPLogitsWarper(params.top_p))
            seed = params.seed if params.seed is not None else random.randrange(2**63)
            self.generator: torch.Generator | None = torch.Generator().manual_seed(seed)
        else:
            self.generator = None

        self._max_length = MaxLengthCriteria(n_prompt + params.max_new_tokens)
        self._eos = EosTokenCriteria(self.eos_ids) if self.eos_ids else None
        if params.stop and tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        self._stop = StopStringCriteria(tokenizer, params.stop) if params.stop else None
        self._emitted = 0  # characters of `text` already handed out by new_text()

    def _ids(self, device: torch.device) -> torch.Tensor:
        return torch.tensor([self.prompt_ids + self.completion_ids], device=device)

    def choose(self, logits: torch.Tensor) -> int:
        """Pick the next token from this row's logits [vocab]."""
        scores = self.processors(self._ids(logits.device), logits.view(1, -1).float())
        if self.generator is None:
            return int(scores.argmax(dim=-1))
        # Valid but extreme settings (repetition_penalty 1e-50) overflow the scores to inf, and softmax over inf
        # is nan: +inf becomes the largest float, nan becomes -inf; -inf (masked tokens) stays.
        scores = torch.nan_to_num(scores, nan=-torch.inf, posinf=torch.finfo(scores.dtype).max, neginf=-torch.inf)
        probs = torch.softmax(scores, dim=-1).cpu()
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def push(self, token_id: int) -> str | None:
        """Record a chosen token. Returns None while going on, else "stop" (eos or a stop string) or "length"."""
        self.completion_ids.append(token_id)
        ids = self._ids(torch.device("cpu"))
        if any(c is not None and bool(c(ids, None)[0]) for c in (self._eos, self._stop)):
            self.finish_reason = "stop"
        elif bool(self._max_length(ids, None)[0]):
            self.finish_reason = "length"
        return self.finish_reason

    @property
    def text(self) -> str:
        """The completion so far; once stopped by a stop string, cut where it begins (as OpenAI does)."""
        if self.tokenizer is None:
            return ""
        text = self.tokenizer.decode(self.completion_ids, skip_special_tokens=True)
        if self.finish_reason == "stop" and self.params.stop:
            cuts = [text.find(s) for s in self.params.stop if s in text]
            if cuts:
                text = text[: min(cuts)]
        return text

    def new_text(self) -> str:
        """The text added since the last call, for streaming. Holds back an unfinished UTF-8 character
        and anything that could be the start of a stop string, so nothing is sent that is later cut."""
        text = self.text
        end = len(text)
        if self.finish_reason is None:
            end -= text.endswith("\ufffd")
            held = [n for stop in self.params.stop for n in range(1, len(stop)) if text[:end].endswith(stop[:n])]
            end -= max(held, default=0)
        piece = text[self._emitted : end] if end > self._emitted else ""
        self._emitted = max(self._emitted, end)
        return piece


@dataclass
class TokenEvent:
    """One streamed token: its id, the text it adds, its scalings [n_lora_layers, n_experts], and
    finish_reason once it is the last."""

    token_id: int
    text: str
    scalings: torch.Tensor
    finish_reason: str | None


def _sampling_params(kwargs: dict) -> SamplingParams:
    """transformers' generate argument names -> SamplingParams."""
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
    )
    if kwargs:
        raise TypeError(f"unsupported generation arguments: {sorted(kwargs)}")
    return params


def _prompt_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[list[int]]:
    if attention_mask is None:
        return input_ids.tolist()
    return [row[mask.bool()].tolist() for row, mask in zip(input_ids.cpu(), attention_mask.cpu(), strict=True)]


@torch.inference_mode()
def generate(
    model: XLoraModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    routing: Routing | list[Routing] | None = None,
    pad_token_id: int | None = None,
    **generation_kwargs,
) -> torch.Tensor:
    """Batched generation with both KV caches. Returns [batch, prompt + new] token ids; rows that finish
    early are padded with pad_token_id (default: the eos token), as transformers does."""
    params = _sampling_params(dict(generation_kwargs))
    if params.eos_token_id is None:
        params.eos_token_id = model.base.generation_config.eos_token_id
    decoders = [RowDecoder(params, tokenizer, row) for row in _prompt_rows(input_ids, attention_mask)]
    pad = pad_token_id if pad_token_id is not None else (decoders[0].eos_ids or [0])[0]

    logits, scalings, cache = model.prefill(input_ids, attention_mask, routing)
    all_scalings = [scalings]
    while True:
        tokens = []
        for row, dec in enumerate(decoders):
            if dec.finish_reason is None:
                dec.push(dec.choose(logits[row]))
            tokens.append(dec.completion_ids[-1] if dec.finish_reason is None else pad)
        if all(dec.finish_reason for dec in decoders):
            break
        logits, scalings = model.decode(torch.tensor(tokens), cache, routing)
        all_scalings.append(scalings)
    model._latest_scalings = torch.cat(all_scalings, dim=1)

    longest = max(len(dec.completion_ids) for dec in decoders)
    new = [dec.completion_ids + [pad] * (longest - len(dec.completion_ids)) for dec in decoders]
    return torch.cat([input_ids.to(model.device), torch.tensor(new, device=model.device)], dim=1)


def stream(
    model: XLoraModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    routing: Routing | None = None,
    **generation_kwargs,
) -> Iterator[TokenEvent]:
    """Generate for one prompt, yielding each token with its scalings as soon as it is chosen."""
    if input_ids.shape[0] != 1:
        raise ValueError(f"stream takes one prompt, got a batch of {input_ids.shape[0]}")
    params = _sampling_params(dict(generation_kwargs))
    if params.eos_token_id is None:
        params.eos_token_id = model.base.generation_config.eos_token_id
    dec = RowDecoder(params, tokenizer, _prompt_rows(input_ids, attention_mask)[0])
    with torch.inference_mode():
        logits, scalings, cache = model.prefill(input_ids, attention_mask, routing)
    token_scalings = scalings[0, -1]
    while True:
        token = dec.choose(logits[0])
        finish = dec.push(token)
        yield TokenEvent(token, dec.new_text(), token_scalings, finish)
        if finish:
            return
        with torch.inference_mode():
            logits, scalings = model.decode(torch.tensor([token]), cache, routing)
        token_scalings = scalings[0, -1]
