"""Hostile input from the OpenAPI schema: schemathesis fuzzes every operation of a live server.

The server is a real `python -m server` process with a tiny random model whose embedding covers every
token of its tokenizer (unlike the shared test world, where `~` makes the model fail on purpose: here
any string must be servable). Generation is capped at a few tokens so each example is quick.

Per operation: valid and invalid (negative) examples, with the right bearer token (auth is on) unless a
negative case leaves it out on purpose. Checks: no 5xx, every response conforms to the schema (status code
documented, content type, body), invalid input rejected. Afterwards /health is 200 and the server serves.
"""

from __future__ import annotations

import collections
import json
import os
import time
from pathlib import Path

import httpx
import pytest
import schemathesis
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)
from transformers import LlamaConfig, LlamaForCausalLM

from .conftest import EXPERTS, ServerProcess, save_lora_expert, server_config
from .tiny_world import save_char_tokenizer, save_checkpoint

MAX_EXAMPLES = int(os.environ.get("FUZZ_MAX_EXAMPLES", "25"))  # per operation and mode
DERANDOMIZE = os.environ.get("FUZZ_RANDOM") != "1"  # CI: the same examples every run; FUZZ_RANDOM=1 to explore
API_KEY, ADMIN = "fuzz-api-key", "fuzz-admin-token"
CHECKS = [
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
    content_type_conformance,
    negative_data_rejection,
]


def save_clean_llama(folder: Path) -> Path:
    """Like conftest's tiny Llama, but with an embedding row for every one of the tokenizer's 100 ids."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)
    save_char_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    base = save_clean_llama(root / "base")
    targets = [["q_proj", "v_proj"], ["k_proj", "o_proj"], ["gate_proj", "down_proj"]]
    experts = {
        name: str(save_lora_expert(base, root / f"expert-{name}", seed=10 + i, target_modules=t))
        for i, (name, t) in enumerate(zip(EXPERTS, targets, strict=True))
    }
    world = {"base": str(base), "checkpoint": str(save_checkpoint(base, experts, root / "checkpoint"))}
    config = server_config(
        world,
        server={"max_batch_size": 4, "max_queue": 32, "max_new_tokens": 8, "default_max_new_tokens": 4,
                "max_prompt_tokens": 256, "request_timeout_s": 30, "scalings_log_size": 16},
    )  # fmt: skip
    path = root / "server.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = ServerProcess(path, env={"XLORA_API_KEY": API_KEY, "XLORA_ADMIN_TOKEN": ADMIN}).wait_ready()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def api_schema(fuzz_server):
    schema = schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")

    @schema.auth()
    class Bearer:
        """The right token for each operation (admin for PATCH /routing and DELETE /scalings); cases where
        schemathesis leaves the token out on purpose (negative mode) go without, and must get a 401."""

        def get(self, case, context) -> str:
            return ADMIN if case.method.upper() in ("PATCH", "DELETE") else API_KEY

        def set(self, case, data: str, context) -> None:
            case.headers = {**(case.headers or {}), "Authorization": f"Bearer {data}"}

    return schema


# Refused unless neutral (the schema cannot say so): dropped from every other valid generation body, so that
# half the valid examples reach the model instead of all stopping at a 400/422. Constraints too: a random
# schema or regex mostly does not compile (422), and this world's model cannot produce `{`, which a JSON
# object needs (tests/test_structured_output.py has its own world for them).
_REFUSED = ("n", "logprobs", "presence_penalty", "frequency_penalty", "logit_bias", "echo", "best_of", "suffix",
            "tools", "tool_choice", "functions", "function_call", "response_format", "top_logprobs",
            "constraint")  # fmt: skip
_TOKEN_CHARS = set("\n") | {chr(c) for c in range(32, 127)}


def servable(path: str, body: dict) -> dict:
    """A valid generation body made servable: one of prompt/messages, the served model, few new tokens,
    stop strings the tokenizer can spell, a routing top_k within the 3 experts. Every other field as generated."""
    body = {k: v for k, v in body.items() if k not in _REFUSED}
    for key in ("max_new_tokens", "max_tokens", "max_completion_tokens"):
        if isinstance(body.get(key), int):
            body[key] = 1 + body[key] % 8
    stop = body.get("stop")
    if stop is not None:
        stops = [x for x in ([stop] if isinstance(stop, str) else stop) if x and set(x) <= _TOKEN_CHARS]
        body["stop"] = stops[:4] or None
    routing = body.get("routing") or body.get("xlora_routing")
    if isinstance(routing, dict) and isinstance(routing.get("top_k"), int):
        routing["top_k"] = 1 + routing["top_k"] % 3
    if path == "/generate":
        if body.get("prompt") is None and not body.get("messages"):
            body["prompt"] = "hello"
        if body.get("prompt") is not None:
            body.pop("messages", None)
    else:
        body["model"] = "tiny-xlora"
        if isinstance(body.get("prompt"), list):
            body["prompt"] = (body["prompt"] or ["hello"])[:1]
        if body.get("stream_options") is not None and not body.get("stream"):
            body["stream"] = True
    return body


def fuzz_operation(operation, mode: GenerationMode, url: str) -> list[int]:
    """Up to MAX_EXAMPLES cases of one operation in one mode, every check run on each response; the statuses."""
    statuses = []

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
              derandomize=DERANDOMIZE, database=None)  # fmt: skip
    def run(case) -> None:
        if mode == GenerationMode.POSITIVE and isinstance(case.body, dict) and len(statuses) % 2 == 0:
            if operation.path in ("/generate", "/v1/completions", "/v1/chat/completions"):
                case.body = servable(operation.path, case.body)
        statuses.append(case.call_and_validate(base_url=url, checks=CHECKS, timeout=60).status_code)

    run()
    return statuses


# schemathesis' own pytest plugin (schema.parametrize) does not work with pytest 9, so each mode is one test
# that goes through every operation and reports every operation that failed.
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=str)
def test_every_operation_conforms_to_its_schema(api_schema, fuzz_server, mode):
    operations = [result.ok() for result in api_schema.get_all_operations()]
    labels = {f"{op.method.upper()} {op.path}" for op in operations}
    assert {"POST /generate", "PATCH /routing", "GET /scalings/{request_id}", "POST /v1/chat/completions",
            "POST /v1/completions", "GET /metrics"} <= labels, labels  # fmt: skip
    failures, fuzzed = [], []
    for operation in operations:
        label = f"{operation.method.upper()} {operation.path}"
        statuses = []
        start = time.perf_counter()
        try:
            statuses = fuzz_operation(operation, mode, fuzz_server.url)
            fuzzed.append(label)
        except Unsatisfiable:  # negative mode: nothing in the operation can be made invalid (no parameters)
            pass
        except BaseException as exc:  # a FailureGroup is a BaseExceptionGroup; all operations reported at once
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            failures.append(f"{label} ({mode}):\n{exc}")
        print(f"{label} ({mode}): {time.perf_counter() - start:.1f} s, statuses {sorted(statuses)}")
    assert not failures, "\n\n".join(failures)
    assert "POST /generate" in fuzzed and "PATCH /routing" in fuzzed, fuzzed


# Found by the fuzzing above: valid but extreme sampling settings overflowed the scores to inf, softmax gave nan,
# and the request failed with a 500 (temperature > 0 samples; 0 is greedy).
EXTREME = [
    {"temperature": 1e-300},
    {"temperature": 5e-324, "repetition_penalty": 29.5},
    {"temperature": 2.9e-197, "repetition_penalty": 67.8},
    {"temperature": 1e-4, "repetition_penalty": 100.0},
    {"temperature": 0.5, "repetition_penalty": 1e-50},
    {"temperature": 1e-30, "repetition_penalty": 1e-50, "top_p": 1e-9},
    {"repetition_penalty": 1e-50},
    {"temperature": 100.0, "repetition_penalty": 100.0, "top_k": 10**30},
]


@pytest.mark.parametrize("sampling", EXTREME, ids=str)
def test_extreme_sampling_settings_are_served(fuzz_server, sampling):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=fuzz_server.url, timeout=30, headers=headers) as c:
        r = c.post("/generate", json={"prompt": "Compute: 12 + 30", "max_new_tokens": 4, "seed": 1, **sampling})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] >= 1
        body = {"model": "tiny-xlora", "prompt": "x", "max_tokens": 2, "seed": 1, **sampling}
        r = c.post("/v1/completions", json={k: v for k, v in body.items() if k != "temperature" or v <= 2})
        assert r.status_code == 200, r.text


def test_a_routing_weight_that_would_break_the_model_is_422(fuzz_server):
    # Found by the fuzzing above (FUZZ_RANDOM=1): PATCH /routing accepted global_scaling_weight 1e20, after which
    # the logits were nan and every sampled request failed with a 500.
    admin = {"Authorization": f"Bearer {ADMIN}"}
    with httpx.Client(base_url=fuzz_server.url, timeout=30) as c:
        before = c.get("/routing").json()
        for weight in (1e20, -1e300, 100.5):
            r = c.patch("/routing", json={"global_scaling_weight": weight}, headers=admin)
            assert r.status_code == 422 and r.json()["error"]["param"] == "global_scaling_weight", r.text
            r = c.post("/generate", json={"prompt": "x", "routing": {"global_scaling_weight": weight}},
                       headers={"Authorization": f"Bearer {API_KEY}"})
            assert r.status_code == 422 and r.json()["error"]["param"] == "routing.global_scaling_weight", r.text
        assert c.get("/routing").json() == before
        r = c.post("/generate", json={"prompt": "x", "temperature": 1.0, "max_new_tokens": 3,
                                      "routing": {"global_scaling_weight": 100.0}},
                   headers={"Authorization": f"Bearer {API_KEY}"})  # fmt: skip
        assert r.status_code == 200, r.text


def test_streams_are_documented_event_by_event(fuzz_server):
    schema = httpx.get(fuzz_server.url + "/openapi.json").json()
    for path in ("/generate", "/v1/completions", "/v1/chat/completions"):
        event = schema["paths"][path]["post"]["responses"]["200"]["content"]["text/event-stream"]["schema"]
        assert event["type"] == "object" and "data" in event["required"], (path, event)
    generate = schema["paths"]["/generate"]["post"]["responses"]["200"]["content"]["text/event-stream"]["schema"]
    assert generate["properties"]["event"]["enum"] == ["token", "done", "error"]


# Hostile constraints: regexes, Lark grammars and JSON schemas drawn from small pieces that include what no answer can
# follow (a class that matches nothing, a rule with no finite derivation, a `$ref` to itself or to nowhere, bounds
# that cross). Each is served (200) or refused as the client's mistake (422 on /generate, 400 on /v1), streamed
# or not, the refusal naming the field in one short line; never a 5xx.
CONSTRAINT_EXAMPLES = int(os.environ.get("FUZZ_CONSTRAINT_EXAMPLES", "50"))  # per kind

_REGEX_PIECES = ["a", "b", "[a-c]", "[0-9]", ".", r"\d", r"[^\x00-\x{10FFFF}]", "(a|b)", "é", "(", "[z-a]", "x{2,1}"]
_REPEATS = ["*", "+", "?", "{3}", "{0,2}", "{2,1}", "{40}"]
regexes = st.recursive(
    st.sampled_from(_REGEX_PIECES),
    lambda inner: st.one_of(
        st.tuples(inner, inner).map("".join),
        st.tuples(inner, inner).map(lambda pair: f"({pair[0]}|{pair[1]})"),
        st.tuples(inner, st.sampled_from(_REPEATS)).map(lambda pair: f"({pair[0]}){pair[1]}"),
    ),
    max_leaves=5,
)
_SYMBOLS = ['"a"', '"b"', '""', "/[0-9]/", r"/[^\x00-\x{10FFFF}]/", "r0", "r1", "r2", "nowhere"]
_rule = st.lists(st.lists(st.sampled_from(_SYMBOLS), min_size=1, max_size=3).map(" ".join), min_size=1, max_size=3)
grammars = st.tuples(_rule, _rule, _rule).map(
    lambda rules: "start: r0\n" + "\n".join(f"r{i}: {' | '.join(body)}" for i, body in enumerate(rules))
)
_SCHEMA_LEAVES = [
    {"type": "string"}, {"type": "integer"}, {"type": "boolean"}, {}, {"const": "x"}, {"enum": []}, {"not": {}},
    {"$ref": "#"}, {"$ref": "#/$defs/d"}, {"$ref": "#/$defs/nowhere"}, {"type": "strin"},
    {"type": "string", "minLength": 3, "maxLength": 1}, {"type": "integer", "minimum": 5, "maximum": 1},
    {"type": "string", "pattern": r"[^\x00-\x{10FFFF}]"},
]  # fmt: skip
_schemas = st.recursive(
    st.sampled_from(_SCHEMA_LEAVES),
    lambda inner: st.one_of(
        st.builds(lambda props, n: {"type": "object", "properties": props, "required": sorted(props)[:n]},
                  st.dictionaries(st.sampled_from("abc"), inner, max_size=2), st.integers(0, 2)),
        st.builds(lambda items, n: {"type": "array", "items": items, "minItems": n}, inner, st.integers(0, 2)),
        st.lists(inner, min_size=1, max_size=2).map(lambda parts: {"anyOf": parts}),
        st.lists(inner, min_size=1, max_size=2).map(lambda parts: {"allOf": parts}),
    ),
    max_leaves=4,
)  # fmt: skip
json_schemas = st.builds(lambda schema, d: {**schema, "$defs": {"d": d}}, _schemas, _schemas)


def served_or_refused(c: httpx.Client, path: str, body: dict, param: str) -> str:
    """Send it; a refusal (before or during a stream) names a field below `param` in one short line. The status
    and the refusal's code."""
    refused = 400 if path.startswith("/v1/") else 422
    with c.stream("POST", path, json=body) as r:
        if r.status_code != 200:
            r.read()
            errors = [r.json()["error"]]
        elif body.get("stream"):  # a refusal found while decoding, after the first tokens: an error event
            data = [line.split(":", 1)[1].strip() for line in r.iter_lines() if line.startswith("data:")]
            errors = [event["error"] for event in map(json.loads, data[:-1] if path.startswith("/v1/") else data)
                      if "error" in event]  # fmt: skip
            assert all(error["type"] == "invalid_request_error" for error in errors), errors
        else:
            errors = []
    assert r.status_code in (200, refused), (r.status_code, body, errors)
    for error in errors:
        assert error["param"].startswith(param) and error["code"], (body, error)
        message = error["message"]
        assert "\n" not in message and "<state>" not in message and len(message) <= 400, message
    return " ".join([str(r.status_code), *(error["code"] for error in errors)])


@pytest.mark.parametrize("kind", ["regex", "grammar", "json_schema"])
def test_random_constraints_are_served_or_refused_never_a_server_error(fuzz_server, kind):
    strategy = {"regex": regexes, "grammar": grammars, "json_schema": json_schemas}[kind]
    outcomes = collections.Counter()

    @given(constraint=strategy, stream=st.booleans())
    @settings(max_examples=CONSTRAINT_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
              derandomize=DERANDOMIZE, database=None)  # fmt: skip
    def run(constraint, stream: bool) -> None:
        body = {"prompt": "x", "max_new_tokens": 6, "stream": stream, "constraint": {kind: constraint}}
        outcomes[served_or_refused(c, "/generate", body, "constraint")] += 1
        if kind == "json_schema":
            fmt = {"type": "json_schema", "json_schema": {"name": "fuzzed", "schema": constraint}}
            body = {"model": "tiny-xlora", "messages": [{"role": "user", "content": "x"}], "max_tokens": 6,
                    "stream": stream, "response_format": fmt}  # fmt: skip
            outcomes[served_or_refused(c, "/v1/chat/completions", body, "response_format")] += 1

    with httpx.Client(base_url=fuzz_server.url, timeout=60, headers={"Authorization": f"Bearer {API_KEY}"}) as c:
        run()
        print(f"{kind}: {dict(outcomes)}")
        assert c.get("/health").status_code == 200
        assert c.post("/generate", json={"prompt": "x", "max_new_tokens": 2}).status_code == 200
    assert "failed inside the model" not in fuzz_server.log()


def test_server_alive_after_fuzzing(fuzz_server):
    with httpx.Client(base_url=fuzz_server.url, timeout=30) as c:
        assert c.get("/health").status_code == 200
        assert c.get("/ready").status_code == 200
        r = c.post("/generate", json={"prompt": "still here ~{|}", "max_new_tokens": 2},
                   headers={"Authorization": f"Bearer {API_KEY}"})
        assert r.status_code == 200, r.text
    assert fuzz_server.proc.poll() is None
    assert "Traceback" not in fuzz_server.log(), fuzz_server.log()[-3000:]
