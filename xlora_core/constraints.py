"""Structured output: a JSON schema, any JSON object, a regex or a grammar that a row's tokens must follow.

The grammar work is llguidance's (the Rust library mistral.rs and vLLM use; README: "Structured output"
says why it and not xgrammar). This module turns a `ConstraintSpec` into a `CompiledGrammar` once per
tokenizer and spec (cached, bounded), and gives each row its own `GrammarMatcher`: the mask of the tokens
allowed next, and the token chosen.

    compiler = GrammarCompiler(tokenizer, vocab_size=model.base.config.vocab_size)
    grammar = compiler.compile(ConstraintSpec("json_schema", '{"type": "object"}'))
    model.generate(input_ids, tokenizer=tokenizer, constraint=grammar)
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal

import llguidance
import torch
from transformers import PreTrainedTokenizerBase

from .config import ConstraintError, ParameterError

log = logging.getLogger("xlora.constraints")

ConstraintKind = Literal["json_schema", "json_object", "regex", "grammar"]
KINDS: tuple[str, ...] = ("json_schema", "json_object", "regex", "grammar")

# Whitespace between JSON tokens: at most this many characters each time. llguidance's default allows any
# amount, and a weak model can then spend its whole token budget on blank lines inside an object.
JSON_WHITESPACE = r"[\x20\x0A\x0D\x09]{0,8}"
# Work limits inside llguidance (its own defaults, made explicit): a grammar past them is an error, not a hang.
LIMITS = dict(max_items_in_row=2000, initial_lexer_fuel=1_000_000, step_lexer_fuel=200_000, step_max_items=50_000,
              max_lexer_states=250_000, max_grammar_size=500_000)  # fmt: skip


# A line where llguidance echoes the grammar's source ("   1 | start: /([a-z]+/"), under its error.
_ECHO = re.compile(r"\d+ \|")

# Row b: the 8 bits of byte value b, lowest first (a bitmask to a bool mask in one lookup).
_BYTE_BITS = ((torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1).bool()


@dataclass(frozen=True)
class ConstraintSpec:
    """What a request asked for. `text`: the JSON schema (JSON text), the regex, or the grammar (Lark as
    llguidance reads it, or llama.cpp's GBNF); empty for json_object."""

    kind: ConstraintKind
    text: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ParameterError("kind", f"must be one of {', '.join(KINDS)}, got {self.kind!r}")


class CompiledGrammar:
    """A checked grammar for one tokenizer; `matcher()` gives a fresh per-row matcher (a cheap copy)."""

    def __init__(self, spec: ConstraintSpec, template: llguidance.LLMatcher, vocab_size: int, compile_s: float):
        self.spec = spec
        self._template = template
        self.vocab_size = vocab_size
        self.compile_s = compile_s

    @property
    def kind(self) -> str:
        return self.spec.kind

    def matcher(self) -> GrammarMatcher:
        return GrammarMatcher(self._template.deep_copy(), self.vocab_size, self.kind)


class GrammarMatcher:
    """One row's place in its grammar: which tokens may come next, and the tokens taken so far. When the
    grammar cannot go on (nothing may follow, or a work limit is hit), ConstraintError naming its kind."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int, kind: str) -> None:
        self._matcher = matcher
        self._bits = torch.zeros((vocab_size + 31) // 32, dtype=torch.int32)
        self.kind = kind

    def allowed(self, n: int) -> torch.Tensor:
        """Bool [n]: the tokens (of a logits row of width n) the grammar allows next. Ids past the
        tokenizer's vocabulary (a padded embedding) are never allowed."""
        bits = unpack_bitmask(self.bitmask())
        if bits.numel() >= n:
            return bits[:n]
        return torch.cat([bits, torch.zeros(n - bits.numel(), dtype=torch.bool)])

    def bitmask(self) -> torch.Tensor:
        """int32 [(vocab + 31) // 32]: bit i % 32 of word i // 32 says whether token i may come next."""
        self._matcher.unsafe_compute_mask_ptr(self._bits.data_ptr(), self._bits.numel() * 4)
        if self._matcher.is_error():
            raise _refusal(self.kind, self._matcher, at_start=False)
        return self._bits

    def consume(self, token_id: int) -> None:
        # The token came from this matcher's own mask: a refusal here is the grammar's (llguidance computes
        # what the token forces next, which is where a rule with no finite derivation runs out of work).
        if not self._matcher.consume_token(token_id):
            raise _refusal(self.kind, self._matcher, at_start=False)

    @property
    def is_complete(self) -> bool:
        """Nothing more may follow but the end of the answer: the grammar is satisfied."""
        return self._matcher.is_stopped()

    @property
    def is_accepting(self) -> bool:
        return self._matcher.is_accepting()


def unpack_bitmask(bitmask: torch.Tensor) -> torch.Tensor:
    """An int32 token bitmask (llguidance's and xgrammar's layout) as bool [32 * words]."""
    # Token i is bit i % 32 of word i // 32: on a little-endian machine, bit i % 8 of byte i // 8.
    return _BYTE_BITS.index_select(0, bitmask.view(torch.uint8).int()).flatten()


class GrammarCompiler:
    """Compiles constraints for one tokenizer, keeping the last `cache_size` compiled grammars by spec.

    Thread-safe: the server compiles in worker threads. Errors are ParameterError naming the spec's kind
    (`json_schema`, `regex`, `grammar`) with llguidance's message (which names the keyword or position),
    shortened; ConstraintError for a grammar that compiles but no answer can follow (`_check_start`)."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        vocab_size: int | None = None,
        eos_token_id: int | list[int] | None = None,
        cache_size: int = 64,
    ) -> None:
        self.vocab_size = max(len(tokenizer), vocab_size or 0)
        eos = eos_token_id if eos_token_id is not None else tokenizer.eos_token_id
        self._tokenizer = _llg_tokenizer(tokenizer, self.vocab_size, eos)
        self.cache_size = cache_size
        self._cache: OrderedDict[ConstraintSpec, CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()
        self.limits = llguidance.LLParserLimits(**LIMITS)

    def compile(self, spec: ConstraintSpec, time_limit_s: float | None = None) -> CompiledGrammar:
        """The compiled grammar of `spec` (from the cache when it was compiled before). A grammar that took
        longer than `time_limit_s` is not cached: asked again, it is refused again (by the caller's clock)."""
        with self._lock:
            cached = self._cache.get(spec)
            if cached is not None:
                self._cache.move_to_end(spec)
                return cached
        started = time.perf_counter()
        grammar = _grammar(spec)
        matcher = llguidance.LLMatcher(self._tokenizer, grammar, log_level=0, limits=self.limits)
        if matcher.is_error():
            raise _invalid(spec.kind, matcher.get_error())
        _check_start(spec.kind, matcher)
        compiled = CompiledGrammar(spec, matcher, self.vocab_size, time.perf_counter() - started)
        if time_limit_s is None or compiled.compile_s <= time_limit_s:
            with self._lock:
                self._cache[spec] = compiled
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        return compiled

    def __len__(self) -> int:
        with self._lock:
            return len(self._cache)


def _grammar(spec: ConstraintSpec) -> str:
    """The spec as an llguidance grammar definition (not yet checked)."""
    defaults = {"whitespace_pattern": JSON_WHITESPACE}
    if spec.kind == "json_object":
        return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=defaults)
    if spec.kind == "json_schema":
        try:
            schema = json.loads(spec.text)
        except json.JSONDecodeError as exc:
            raise ParameterError(spec.kind, f"not valid JSON: {exc}") from None
        if not isinstance(schema, dict):
            raise ParameterError(spec.kind, f"must be a JSON object (a schema), got {type(schema).__name__}")
        try:
            return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=defaults)
        except ValueError as exc:
            raise _invalid(spec.kind, str(exc)) from None
    if not spec.text:
        raise ParameterError(spec.kind, "must not be empty")
    if spec.kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(spec.text)
    try:
        return llguidance.grammar_from("grammar", spec.text)  # Lark, or GBNF converted to Lark
    except ValueError as exc:
        raise _invalid(spec.kind, str(exc)) from None


def _invalid(kind: str, message: str) -> ParameterError:
    """llguidance's refusal of a constraint's text, as the client sees it: shortened (the whole text, which
    can hold the parser's state and the whole grammar, goes to the debug log)."""
    log.debug("%s constraint refused by llguidance: %s", kind, message)
    return ParameterError(kind, _short(message))


def _check_start(kind: str, template: llguidance.LLMatcher) -> None:
    """Refuse a grammar that compiles but that no answer can follow, as llguidance sees its start (on a copy):
    the mask of the first token is empty (the language is empty: a regex that matches nothing, a `$ref` to
    itself; or it needs text this vocabulary cannot spell), or the text that every answer must begin with
    never ends (a rule with no finite derivation, `start: "a" start`: taking its first forced token runs
    into llguidance's work limits). What only shows later fails the row while it decodes (GrammarMatcher)."""
    probe = template.deep_copy()
    forced = probe.compute_ff_tokens()
    if forced:
        probe.consume_token(forced[0])
    if not probe.is_error():
        probe.compute_bitmask()
    if probe.is_error():
        raise _refusal(kind, probe, at_start=True)


def _refusal(kind: str, matcher: llguidance.LLMatcher, at_start: bool) -> ConstraintError:
    """Why llguidance stopped a matcher, as the client's error: a short message (the full text, with the
    parser's state, goes to the debug log)."""
    error, reason = matcher.get_error() or "", matcher.stop_reason()
    log.debug("%s constraint stopped by llguidance (%s): %s", kind, reason, error)
    if reason == "NoExtensionBias" or error.startswith("NoExtensionBias"):  # no token may come next
        if at_start:
            why = "matches nothing: no answer can begin (its language is empty, or needs text this model cannot spell)"
        else:
            why = "cannot be continued: no token this model can produce follows the answer so far"
        return ConstraintError(kind, why)
    if reason in ("ParserTooComplex", "LexerTooComplex") or "limit" in error:
        where = "before any answer can end" if at_start else "while decoding"
        return ConstraintError(
            kind, f"runs past the grammar engine's work limits {where} (a rule with no finite derivation, like "
            f'start: "a" start, does): {_short(error)}', code="constraint_too_complex",
        )
    return ConstraintError(kind, f"cannot be followed: {_short(error)}", code="invalid_constraint")


def _short(message: str, max_chars: int = 300) -> str:
    """llguidance's error in one line of at most `max_chars`, without its debugging dump (parser state, the
    whole grammar) or the source lines and carets it draws."""
    lines = [line.strip() for line in message.split("<state>")[0].splitlines()]
    short = " ".join(line for line in lines if line and not set(line) <= set("^~-| ") and not _ECHO.match(line))
    if len(short) > max_chars:
        short = short[: max_chars - 3].rstrip() + "..."
    return short


class _TokenBytes:
    """A tokenizer as llguidance's TokenizerWrapper reads it, for tokenizers whose decoder llguidance does
    not know (e.g. character-level ones): each token's bytes, decoded one at a time."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, eos: int | list[int]) -> None:
        specials = set(tokenizer.all_special_ids)
        self.eos_token_id = eos if isinstance(eos, int) else eos[0]
        self.bos_token_id = tokenizer.bos_token_id
        self.special_token_ids = sorted(specials)
        self.tokens = [
            b"\xff" + tokenizer.convert_ids_to_tokens(i).encode() if i in specials  # llguidance's special mark
            else tokenizer.decode([i]).encode()
            for i in range(len(tokenizer))
        ]  # fmt: skip
        self._tokenizer = tokenizer

    def __call__(self, text: str) -> list[int]:
        return self._tokenizer(text, add_special_tokens=False)["input_ids"]


def _llg_tokenizer(tokenizer: PreTrainedTokenizerBase, vocab_size: int, eos: int | list[int] | None):
    if eos is None:
        raise ValueError("structured output needs an end-of-sequence token (the tokenizer has none)")
    import llguidance.hf

    try:
        return llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=eos)
    except ValueError:  # not a fast tokenizer, or a decoder llguidance cannot read
        return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_TokenBytes(tokenizer, eos)), n_vocab=vocab_size,
                                      eos_token=eos)  # fmt: skip
