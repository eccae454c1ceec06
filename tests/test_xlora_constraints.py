"""Structured output in the decode engine: JSON schemas, regexes and grammars per row, inside batches.

The model has random weights: whatever it prefers, the grammar's mask must keep every answer in shape."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from xlora_core import (
    BatchRow,
    ConstraintError,
    ConstraintSpec,
    GrammarCompiler,
    ParameterError,
    Routing,
    RowDecoder,
    SamplingParams,
    XLoraConfig,
    XLoraModel,
)
from xlora_core.engine import DecodeBatch, run

from .tiny_world import VOCAB, build_world, load_base, make_tiny_tokenizer

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"type": "string", "enum": ["Paris", "Oslo", "Lima"]},
    },
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    base, experts = build_world(tmp_path_factory.mktemp("constrained"))
    torch.manual_seed(5)
    return XLoraModel(load_base(base), XLoraConfig(hidden_size=32, adapters=experts, xlora_depth=2, xlora_size=16))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def compiler(tokenizer):
    return GrammarCompiler(tokenizer, vocab_size=VOCAB, cache_size=4)


def decode_rows(model, tokenizer, specs: list[tuple[str, SamplingParams]]) -> list[RowDecoder]:
    """Run the prompts as one batch, each row with its own settings; the rows' decoders afterwards."""
    rows = [BatchRow(RowDecoder(p, tokenizer, tokenizer(prompt)["input_ids"]), Routing()) for prompt, p in specs]
    for _ in run(model, rows, pad_id=0):
        pass
    return [row.decoder for row in rows]


def params(max_new_tokens: int = 120, grammar=None, **kwargs) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, eos_token_id=2, constraint=grammar, **kwargs)


def test_json_schema_rows_validate_and_finish_when_the_object_closes(model, tokenizer, compiler):
    grammar = compiler.compile(ConstraintSpec("json_schema", json.dumps(PERSON)))
    specs = [("who?", params(grammar=grammar)), ("a longer prompt here", params(grammar=grammar))]
    rows = decode_rows(model, tokenizer, specs)
    for row in rows:
        assert row.finish_reason == "stop", row.text
        jsonschema.validate(json.loads(row.text), PERSON)
        assert row.completion_ids[-1] != 2  # finished by the grammar, not by an end-of-sequence token


def test_sampled_rows_obey_the_schema_too(model, tokenizer, compiler):
    grammar = compiler.compile(ConstraintSpec("json_schema", json.dumps(PERSON)))
    specs = [("x", params(grammar=grammar, temperature=1.5, seed=s, top_k=20)) for s in range(3)]
    for row in decode_rows(model, tokenizer, specs):
        assert row.finish_reason == "stop", row.text
        jsonschema.validate(json.loads(row.text), PERSON)


def test_free_rows_are_unchanged_by_constrained_neighbours(model, tokenizer, compiler):
    grammar = compiler.compile(ConstraintSpec("regex", r"[a-c]{2,5}(-[0-9]{2})+"))
    free = [("count: 1 2", params(max_new_tokens=24)), ("zz top", params(max_new_tokens=24, temperature=0.8, seed=3))]
    alone = decode_rows(model, tokenizer, free)
    mixed = decode_rows(model, tokenizer, [free[0], ("hi", params(max_new_tokens=24, grammar=grammar)), free[1]])
    assert [r.completion_ids for r in alone] == [mixed[0].completion_ids, mixed[2].completion_ids]
    assert mixed[1].finish_reason in ("stop", "length")
    assert re.fullmatch(r"[a-c]{2,5}(-[0-9]{2})*(-[0-9]?)?", mixed[1].text), mixed[1].text


def test_regex_and_grammar_constraints(model, tokenizer, compiler):
    regex = compiler.compile(ConstraintSpec("regex", r"[A-Z][a-z]{2,4}-[0-9]{3}"))
    lark = compiler.compile(ConstraintSpec("grammar", 'start: answer "." \nanswer: "yes" | "no" | "maybe"'))
    gbnf = compiler.compile(ConstraintSpec("grammar", 'root ::= "(" [0-9] ("+" [0-9])? ")"'))
    rows = decode_rows(model, tokenizer, [("q", params(grammar=regex)), ("q", params(grammar=lark)),
                                          ("q", params(grammar=gbnf))])  # fmt: skip
    assert all(row.finish_reason == "stop" for row in rows), [r.text for r in rows]
    assert re.fullmatch(r"[A-Z][a-z]{2,4}-[0-9]{3}", rows[0].text), rows[0].text
    assert rows[1].text in ("yes.", "no.", "maybe."), rows[1].text
    assert re.fullmatch(r"\([0-9](\+[0-9])?\)", rows[2].text), rows[2].text


def test_a_token_limit_first_is_length_and_a_prefix(model, tokenizer, compiler):
    grammar = compiler.compile(ConstraintSpec("json_schema", json.dumps(PERSON)))
    (row,) = decode_rows(model, tokenizer, [("x", params(max_new_tokens=5, grammar=grammar))])
    assert row.finish_reason == "length" and len(row.completion_ids) == 5
    assert row.text.startswith("{")


def test_generate_and_stream_take_a_constraint(model, tokenizer, compiler):
    grammar = compiler.compile(ConstraintSpec("json_object"))
    ids = tokenizer("obj", return_tensors="pt")["input_ids"]
    pieces = list(model.stream(ids, tokenizer=tokenizer, max_new_tokens=200, constraint=grammar, eos_token_id=2))
    text = "".join(p.text for p in pieces)
    assert pieces[-1].finish_reason in ("stop", "length")
    if pieces[-1].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)
    out = model.generate(ids, tokenizer=tokenizer, max_new_tokens=200, constraint=grammar, eos_token_id=2)
    assert tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).startswith(text)


def test_compiled_grammars_are_cached_by_spec_and_bounded(tokenizer):
    compiler = GrammarCompiler(tokenizer, vocab_size=VOCAB, cache_size=2)
    first = compiler.compile(ConstraintSpec("regex", "a+"))
    assert compiler.compile(ConstraintSpec("regex", "a+")) is first
    compiler.compile(ConstraintSpec("regex", "b+"))
    compiler.compile(ConstraintSpec("regex", "c+"))
    assert len(compiler) == 2
    assert compiler.compile(ConstraintSpec("regex", "a+")) is not first  # evicted, compiled again
    slow = compiler.compile(ConstraintSpec("regex", "d+"), time_limit_s=0.0)  # over its limit: not kept
    assert compiler.compile(ConstraintSpec("regex", "d+")) is not slow


@pytest.mark.parametrize(
    ("spec", "kind", "words"),
    [
        (ConstraintSpec("json_schema", "{not json"), "json_schema", "not valid JSON"),
        (ConstraintSpec("json_schema", "[1, 2]"), "json_schema", "must be a JSON object"),
        (ConstraintSpec("json_schema", '{"type": "strin"}'), "json_schema", "strin"),
        (ConstraintSpec("json_schema", '{"type": "array", "uniqueItems": true}'), "json_schema", "uniqueItems"),
        (ConstraintSpec("json_schema", '{"$ref": "#/$defs/missing"}'), "json_schema", "missing"),
        (ConstraintSpec("regex", "(unclosed"), "regex", "unclosed"),
        (ConstraintSpec("regex", ""), "regex", "empty"),
        (ConstraintSpec("grammar", "start: undefined_rule"), "grammar", "undefined_rule"),
        (ConstraintSpec("grammar", "root ::= ("), "grammar", ""),
    ],
)
def test_bad_constraints_name_what_is_wrong(compiler, spec, kind, words):
    with pytest.raises(ParameterError) as info:
        compiler.compile(spec)
    assert info.value.parameter == kind
    assert words in str(info.value), str(info.value)


def test_stop_strings_and_a_constraint_do_not_mix(compiler):
    grammar = compiler.compile(ConstraintSpec("json_object"))
    with pytest.raises(ParameterError) as info:
        SamplingParams(stop=["}"], constraint=grammar)
    assert info.value.parameter == "stop"


# -----------------------------------------------------------------------------
# constraints no answer can follow: refused, as the request's fault, never a model failure


@pytest.mark.parametrize(
    ("spec", "code"),
    [
        (ConstraintSpec("grammar", 'start: "a" start'), "constraint_too_complex"),  # no finite derivation
        (ConstraintSpec("grammar", 'start: "x" y\ny: "y" y'), "constraint_too_complex"),
        (ConstraintSpec("regex", r"[^\x00-\x{10FFFF}]"), "constraint_unsatisfiable"),  # matches nothing
        (ConstraintSpec("json_schema", '{"$ref": "#"}'), "constraint_unsatisfiable"),  # refers to itself
        (ConstraintSpec("json_schema", '{"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}'),
         "constraint_unsatisfiable"),
    ],
)  # fmt: skip
def test_constraints_no_answer_can_follow_are_refused_at_compile_time(compiler, spec, code):
    with pytest.raises(ConstraintError) as info:
        compiler.compile(spec)
    assert info.value.parameter == spec.kind and info.value.code == code
    message = str(info.value)
    assert "<state>" not in message and "\n" not in message and len(message) < 300, message
    assert len(compiler) == 0 or spec not in compiler._cache  # nothing refused is kept


DEAD_AFTER_ONE = 'start: ("b" | "c") y\ny: "y" y'  # compiles; whichever token comes first, no answer can end


def test_a_constraint_that_fails_while_decoding_fails_its_row_alone(model, tokenizer, compiler):
    grammar = compiler.compile(ConstraintSpec("grammar", DEAD_AFTER_ONE))
    free = ("count: 1 2", params(max_new_tokens=12))
    (alone,) = decode_rows(model, tokenizer, [free])
    rows = [BatchRow(RowDecoder(p, tokenizer, tokenizer(text)["input_ids"]), Routing())
            for text, p in (free, ("q", params(grammar=grammar)))]  # fmt: skip
    batch, out = DecodeBatch.prefill(model, rows)
    assert [g.error for g in out] == [None, None] and rows[1].decoder.text in ("b", "c")
    out = batch.step()  # llguidance finds the endless "yyy..." once the first token is in
    assert out[0].error is None and isinstance(out[1].error, ConstraintError)
    assert out[1].error.parameter == "grammar" and out[1].error.code == "constraint_too_complex"
    assert "<state>" not in str(out[1].error)
    assert batch.rows == rows[:1]  # the failed row left; its neighbour decodes on as if alone
    while batch:
        batch.step()
    assert rows[0].decoder.completion_ids == alone.completion_ids
    with pytest.raises(ConstraintError):  # generate/stream (engine.run) raise it
        decode_rows(model, tokenizer, [("q", params(grammar=grammar))])


@pytest.mark.parametrize("temperature", [0, 1.0])
def test_min_new_tokens_that_bars_the_only_ending_is_the_requests_fault(model, tokenizer, compiler, temperature):
    grammar = compiler.compile(ConstraintSpec("grammar", 'start: ""'))  # the empty answer: only the end may come
    barred = params(grammar=grammar, min_new_tokens=5, temperature=temperature, seed=1)
    with pytest.raises(ConstraintError) as info:
        decode_rows(model, tokenizer, [("q", barred)])
    assert "min_new_tokens" in str(info.value)
