"""One request's decoding: its sampling settings, and the `RowDecoder` that picks, records and
detokenises its tokens.

Logits processing and stopping are transformers' own (logits processors, stopping criteria); a
`RowDecoder` holds them for one request, so rows of one batch may use different settings. Text is
detokenised incrementally (TGI's prefix/read offsets), so a token costs the same at the end of a long
answer as at its start.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from transformers import (
    EosTokenCriteria,
    LogitsProcessor,
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

from .config import ConstraintError, ParameterError

if TYPE_CHECKING:
    from .constraints import CompiledGrammar

# Below this a temperature samples as greedy, its limit: logits / 1e-40 overflow float32 to +-inf.
MIN_TEMPERATURE = 1e-4
MAX_LOGPROBS = 20  # top alternatives per token, at most (OpenAI's limit for top_logprobs)
# What a token the distribution rules out (a grammar, top_p or top_k masked it) reports: JSON has no -inf,
# and OpenAI reports -9999.0 for such tokens too.
MASKED_LOGPROB = -9999.0


@dataclass
class TokenLogprob:
    """A token's log probability, and the `top` most likely tokens at its position (id, logprob), best first."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


def token_logprobs(logprobs: torch.Tensor, tokens: torch.Tensor, top: int) -> list[TokenLogprob]:
    """Per position: the log probability of `tokens[i]` in `logprobs[i]` ([positions, vocab]) and the `top`
    most likely tokens there."""
    chosen = logprobs.gather(1, tokens.view(-1, 1)).view(-1).tolist()
    if top > 0:
        values, ids = logprobs.topk(top, dim=-1)
        alternatives = [list(zip(i, v, strict=True)) for i, v in zip(ids.tolist(), values.tolist(), strict=True)]
    else:
        alternatives = [[] for _ in chosen]
    return [
        TokenLogprob(t, _finite(c), [(i, _finite(v)) for i, v in alt])
        for t, c, alt in zip(tokens.tolist(), chosen, alternatives, strict=True)
    ]


def _finite(logprob: float) -> float:
    return logprob if logprob > MASKED_LOGPROB else MASKED_LOGPROB


class LogitBiasProcessor(LogitsProcessor):
    """OpenAI's logit_bias: adds a bias to chosen tokens' logits (-100 bans a token, 100 all but forces it)."""

    def __init__(self, bias: dict[int, float]) -> None:
        self.ids = torch.tensor(list(bias), dtype=torch.long)
        self.values = torch.tensor(list(bias.values()), dtype=torch.float32)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.clone()
        scores[:, self.ids.to(scores.device)] += self.values.to(scores.device, scores.dtype)
        return scores


@dataclass
class SamplingParams:
    """How one request picks its tokens. temperature 0 (or below MIN_TEMPERATURE) means greedy.
    An out-of-range field raises ParameterError naming it."""

    max_new_tokens: int = 64
    min_new_tokens: int = 0
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    eos_token_id: int | list[int] | None = None
    constraint: CompiledGrammar | None = None  # the shape the answer must have (xlora_core.constraints)
    # Log probabilities: None = off; k >= 0 = each token's own and its position's top k alternatives.
    logprobs: int | None = None  # of the chosen tokens, under the distribution they were chosen from
    prompt_logprobs: int | None = None  # of the prompt's tokens, under the model's own distribution
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> bias added to its logit

    def __post_init__(self) -> None:
        def bad(name: str, rule: str) -> ParameterError:
            return ParameterError(name, f"must be {rule}, got {getattr(self, name)!r}")

        # 0: the prompt is only scored (prompt_logprobs), nothing generated.
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 0:
            raise bad("max_new_tokens", "an integer >= 0")
        if not _is_int(self.min_new_tokens) or not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise bad("min_new_tokens", "an integer in 0..max_new_tokens")
        if not (_is_number(self.temperature) and self.temperature >= 0):
            raise bad("temperature", "a finite number >= 0")
        if not (_is_number(self.top_p) and 0 < self.top_p <= 1):
            raise bad("top_p", "in (0, 1]")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise bad("top_k", "an integer >= 0 (0 = off)")
        if not (_is_number(self.repetition_penalty) and self.repetition_penalty > 0):
            raise bad("repetition_penalty", "a finite number > 0")
        if self.seed is not None and not _is_int(self.seed):
            raise bad("seed", "an integer or null")
        if not isinstance(self.stop, list) or any(not isinstance(s, str) or not s for s in self.stop):
            raise bad("stop", "a list of non-empty strings")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not (_is_int(value) and 0 <= value <= MAX_LOGPROBS):
                raise bad(name, f"null or an integer in 0..{MAX_LOGPROBS}")
        if not isinstance(self.logit_bias, dict) or any(
            not _is_int(k) or k < 0 or not (_is_number(v) and -100 <= v <= 100) for k, v in self.logit_bias.items()
        ):
            raise bad("logit_bias", "a map of token ids to numbers in -100..100")
        if self.constraint is not None and self.stop:
            # A stop string would cut a structured answer mid-way; the grammar says where it ends.
            raise ParameterError("stop", "cannot be combined with a constraint (the grammar decides where it ends)")

    @property
    def do_sample(self) -> bool:
        return self.temperature >= MIN_TEMPERATURE


def greedy_token(scores: torch.Tensor) -> int:
    """The index of the largest score (the first of equal ones; a NaN counts as largest), as torch.argmax gives it.
    On the CPU through numpy: torch's CPU argmax does not vectorize, and over a 49k vocabulary it took 0.1 to
    0.2 ms a row, a few percent of a batched decode step; numpy's takes 5 us."""
    if scores.device.type == "cpu" and scores.dtype in (torch.float32, torch.float64):
        return int(scores.detach().reshape(-1).numpy().argmax())
    return int(scores.argmax())


class RowDecoder:
    """Chooses and records the tokens of one request; says when it is finished and why.

    One call per token: `step(logits)` returns (token, the text it adds, finish reason or None).
    With a constraint, only the tokens its grammar allows are chosen, and the row finishes ("stop") as
    soon as the grammar is complete; a grammar that cannot go on raises ConstraintError (the request's fault).
    """

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
        # Prompt and completion in one buffer of the final size: processors and criteria read a view of it.
        self._ids = torch.zeros((1, n_prompt + params.max_new_tokens), dtype=torch.long)
        self._ids[0, :n_prompt] = torch.tensor(self.prompt_ids, dtype=torch.long)

        self.processors = LogitsProcessorList()
        if params.logit_bias:
            self.processors.append(LogitBiasProcessor(params.logit_bias))
        if params.repetition_penalty != 1.0:
            self.processors.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
        self._min_new: MinNewTokensLengthLogitsProcessor | None = None
        if params.min_new_tokens > 0 and self.eos_ids:
            self._min_new = MinNewTokensLengthLogitsProcessor(n_prompt, params.min_new_tokens, self.eos_ids)
            self.processors.append(self._min_new)
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
            raise ParameterError("stop", "needs a tokenizer")
        try:
            self._stop = StopStringCriteria(tokenizer, params.stop) if params.stop else None
        except ValueError as exc:  # e.g. a stop string no token of this vocabulary can spell
            raise ParameterError("stop", f"cannot be used with this tokenizer: {exc}") from None
        self.matcher = params.constraint.matcher() if params.constraint is not None else None
        # Incremental detokenisation over completion_ids (TGI): text of [prefix, read) is already in _decoded.
        self._prefix_offset = 0
        self._read_offset = 0
        self._decoded = ""
        self._emitted = 0  # characters of `text` already handed out
        self.logprobs: list[TokenLogprob] = []  # one per completion token, with params.logprobs
        self.prompt_logprobs: list[TokenLogprob | None] | None = None  # set by the engine; the first is None

    # ---- one call per token ----------------------------------------------------------------
    def step(self, logits: torch.Tensor) -> tuple[int, str, str | None]:
        """Choose the next token from this row's logits [vocab] and record it: (token, new text, finish)."""
        token, scores = self._choose(logits)
        if self.params.logprobs is not None:
            logprobs = torch.log_softmax(scores.view(1, -1).float(), dim=-1)
            chosen = torch.tensor([token], device=logprobs.device)
            self.logprobs.extend(token_logprobs(logprobs, chosen, self.params.logprobs))
        text, finish = self.accept(token)
        return token, text, finish

    def finish_unprompted(self) -> str:
        """End a row that may generate nothing (max_new_tokens 0) before its first token: "length"."""
        self.finish_reason = "length"
        return self.finish_reason

    def accept(self, token_id: int) -> tuple[str, str | None]:
        """Record a token (chosen by `step`, or forced): (the text it adds, finish reason or None).
        The text holds back an unfinished UTF-8 character and anything that could be the start of a
        stop string, so nothing is sent that is later cut."""
        if self.finish_reason is not None:
            raise RuntimeError("this row is finished")
        if self.matcher is not None and token_id not in self.eos_ids:
            self.matcher.consume(token_id)  # raises (nothing recorded) if the grammar does not allow it
        self._ids[0, len(self.prompt_ids) + len(self.completion_ids)] = token_id
        self.completion_ids.append(token_id)
        if self._min_new is not None and len(self.completion_ids) >= self.params.min_new_tokens:
            # Its minimum reached, transformers' processor changes nothing more, but would still build a
            # vocabulary-wide mask (isin) every step: 0.1 ms a row.
            self.processors.remove(self._min_new)
            self._min_new = None
        ids = self._ids[:, : len(self.prompt_ids) + len(self.completion_ids)]
        if any(c is not None and bool(c(ids, None)[0]) for c in (self._eos, self._stop)):
            self.finish_reason = "stop"
        elif self.matcher is not None and self.matcher.is_complete:
            self.finish_reason = "stop"
        elif bool(self._max_length(ids, None)[0]):
            self.finish_reason = "length"
        self._detokenize()
        return self._new_text(), self.finish_reason

    # ---- what it produced ------------------------------------------------------------------
    @property
    def text(self) -> str:
        """The completion so far; once stopped by a stop string, cut where it begins (as OpenAI does)."""
        text = self._decoded
        if self.finish_reason == "stop" and self.params.stop:
            cuts = [text.find(s) for s in self.params.stop if s in text]
            if cuts:
                text = text[: min(cuts)]
        return text

    # ---- internals -------------------------------------------------------------------------
    def _choose(self, logits: torch.Tensor) -> tuple[int, torch.Tensor]:
        """The token, and the scores it was chosen from (after the grammar, processors and warpers)."""
        if not self.processors and self.generator is None and self.matcher is None:
            return greedy_token(logits), logits  # plain greedy: nothing to process
        scores = logits.view(1, -1).float()
        if self.matcher is not None:  # first, so every processor sees only the tokens the grammar allows
            allowed = self.matcher.allowed(scores.shape[-1]).to(scores.device)
            scores = scores.masked_fill(~allowed, -torch.inf)  # a new tensor: the batch's logits stay as they are
        ids = self._ids[:, : len(self.prompt_ids) + len(self.completion_ids)].to(logits.device)
        scores = self.processors(ids, scores)
        if self.generator is None:
            token = greedy_token(scores)
            if self.matcher is not None and scores[0, token] == -torch.inf:
                raise self._nothing_allowed()
            return token, scores
        # Valid but extreme settings (repetition_penalty 1e-50) overflow the scores to inf, and softmax over inf
        # is nan: +inf becomes the largest float, nan becomes -inf; -inf (masked tokens) stays.
        scores = torch.nan_to_num(scores, nan=-torch.inf, posinf=torch.finfo(scores.dtype).max, neginf=-torch.inf)
        if self.matcher is not None and bool(torch.isneginf(scores).all()):
            raise self._nothing_allowed()
        probs = torch.softmax(scores, dim=-1).cpu()
        return int(torch.multinomial(probs, 1, generator=self.generator)), scores

    def _nothing_allowed(self) -> ConstraintError:
        """The grammar's tokens are all out of reach: past the model's logits, or barred by min_new_tokens."""
        why = "allows no token this model can produce next"
        if self.params.min_new_tokens > len(self.completion_ids):
            why += f" (min_new_tokens {self.params.min_new_tokens} bars ending here)"
        return ConstraintError(self.matcher.kind, why)

    def _detokenize(self) -> None:
        """Add the text of the new tokens to _decoded, decoding only from the last complete piece on
        (a token's text can depend on the one before it, so that one is decoded again as context)."""
        if self.tokenizer is None:
            return
        ids = self.completion_ids
        prefix = self.tokenizer.decode(ids[self._prefix_offset : self._read_offset], skip_special_tokens=True)
        full = self.tokenizer.decode(ids[self._prefix_offset :], skip_special_tokens=True)
        complete = not full.endswith("\ufffd")  # a UTF-8 character split over tokens is not done yet
        if len(full) > len(prefix) and (complete or self.finish_reason is not None):
            self._decoded += full[len(prefix) :]
            self._prefix_offset, self._read_offset = self._read_offset, len(ids)

    def _new_text(self) -> str:
        text = self.text
        end = len(text)
        if self.finish_reason is None:
            held = [n for stop in self.params.stop for n in range(1, len(stop)) if text.endswith(stop[:n])]
            end -= max(held, default=0)
        piece = text[self._emitted : end] if end > self._emitted else ""
        self._emitted = max(self._emitted, end)
        return piece


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
