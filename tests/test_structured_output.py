"""Structured output over HTTP: `response_format` on /v1 (through the official `openai` client) and
`constraint` on /generate, against a real server whose tiny model has random weights: only the mask keeps
its answers in shape.

This world's tokenizer spells all of printable ASCII (the shared server's cannot produce `{` or `}`)."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Literal

import httpx
import jsonschema
import openai
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from pydantic import BaseModel, Field

from .test_server import metric
from .test_xlora_constraints import DEAD_AFTER_ONE, PERSON
from .tiny_world import build_world, make_tiny_tokenizer, save_checkpoint

MODEL = "tiny-ascii"


class Person(BaseModel):
    name: Annotated[str, Field(max_length=6)]
    age: Annotated[int, Field(ge=0, le=120)]
    city: Literal["Paris", "Oslo", "Lima"]


def ascii_config(root, **server) -> dict:
    base, experts = build_world(root)
    make_tiny_tokenizer(base)
    return {
        "model": {"base": str(base), "device": "cpu", "dtype": "float32", "name": MODEL, "torch_threads": 1},
        "xlora": {"checkpoint": str(save_checkpoint(base, experts, root / "checkpoint"))},
        "server": {"max_batch_size": 4, "max_new_tokens": 256, "request_timeout_s": 60, **server},
        "logging": {"level": "info"},
    }


@pytest.fixture(scope="module")
def ascii_server(tmp_path_factory, start_server):
    return start_server(ascii_config(tmp_path_factory.mktemp("ascii")))


@pytest.fixture()
def oai(ascii_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=ascii_server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture()
def client(ascii_server) -> httpx.Client:
    with httpx.Client(base_url=ascii_server.url, timeout=60) as c:
        yield c


def chat(oai: openai.OpenAI, content: str = "who is it?", **kwargs):
    return oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], **kwargs)


# -----------------------------------------------------------------------------
# /v1 response_format


def test_openai_parse_with_a_pydantic_model_gets_a_valid_record(oai):
    """The client's own structured-output helper: it sends a strict json_schema and parses the answer."""
    out = oai.chat.completions.parse(model=MODEL, messages=[{"role": "user", "content": "record"}],
                                     response_format=Person, max_tokens=200, temperature=0)  # fmt: skip
    choice = out.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    assert isinstance(choice.message.parsed, Person)
    assert out.model_extra["xlora"]["constraint"] == "json_schema"


@pytest.mark.parametrize("temperature", [0, 1.2])
def test_strict_json_schema_answers_validate(oai, temperature):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    for prompt in ("a", "tell me about someone"):
        out = chat(oai, prompt, response_format=fmt, max_tokens=200, temperature=temperature, seed=7)
        assert out.choices[0].finish_reason == "stop", out.choices[0].message.content
        jsonschema.validate(json.loads(out.choices[0].message.content), PERSON)


def test_completions_take_response_format_too(oai):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    out = oai.completions.create(model=MODEL, prompt="person:", max_tokens=200, temperature=0,
                                 extra_body={"response_format": fmt})  # fmt: skip
    assert out.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(out.choices[0].text), PERSON)


def test_a_token_limit_first_is_length_and_the_text_may_be_cut(oai):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    out = chat(oai, response_format=fmt, max_tokens=6, temperature=0)  # the shortest valid answer is longer
    assert out.choices[0].finish_reason == "length"
    assert out.choices[0].message.content.startswith("{") and out.usage.completion_tokens == 6


def test_json_object_and_text(oai):
    out = chat(oai, response_format={"type": "json_object"}, max_tokens=100, temperature=0)
    assert out.model_extra["xlora"]["constraint"] == "json_object"
    content = out.choices[0].message.content
    assert content.startswith("{")
    if out.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(content), dict)
    text = chat(oai, response_format={"type": "text"}, max_tokens=6, temperature=0)  # "text": no constraint
    assert text.model_extra["xlora"]["constraint"] is None


def test_streamed_constrained_chat_assembles_to_a_valid_answer(oai):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    plain = chat(oai, "stream it", response_format=fmt, max_tokens=200, temperature=0)
    chunks = list(chat(oai, "stream it", response_format=fmt, max_tokens=200, temperature=0, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    jsonschema.validate(json.loads(text), PERSON)


# -----------------------------------------------------------------------------
# /generate constraint


def generate(client: httpx.Client, **body) -> dict:
    r = client.post("/generate", json={"prompt": "x", "max_new_tokens": 120, **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_generate_with_regex_and_grammars(client):
    out = generate(client, constraint={"regex": r"[A-Z][a-z]{2,5} [0-9]{2}"})
    assert out["finish_reason"] == "stop" and re.fullmatch(r"[A-Z][a-z]{2,5} [0-9]{2}", out["text"]), out
    assert out["constraint"] == "regex"
    lark = generate(client, constraint={"grammar": 'start: "the answer is " ("yes" | "no")'})
    assert lark["text"] in ("the answer is yes", "the answer is no"), lark
    gbnf = generate(client, constraint={"grammar": 'root ::= [a-c]+ "=" [0-9]'}, temperature=0.9, seed=1)
    assert re.fullmatch(r"[a-c]+=[0-9]", gbnf["text"]), gbnf


def test_generate_json_schema_streamed_and_in_the_scalings_log(client):
    events = []
    body = {"prompt": "p", "max_new_tokens": 200, "constraint": {"json_schema": PERSON}, "stream": True}
    with client.stream("POST", "/generate", json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data:"):
                events.append(json.loads(line.split(":", 1)[1]))
    done = events[-1]
    assert done["finish_reason"] == "stop" and done["constraint"] == "json_schema"
    jsonschema.validate(json.loads("".join(e["text"] for e in events[:-1])), PERSON)
    logged = client.get(f"/scalings/{done['id']}").json()
    assert logged["constraint"] == "json_schema"
    free = generate(client, max_new_tokens=3)
    assert client.get(f"/scalings/{free['id']}").json()["constraint"] is None


def test_concurrent_constrained_and_free_requests(client):
    """Rows with different constraints and none share batches; each gets its own shape."""
    bodies = [{"constraint": {"json_schema": PERSON}}, {}, {"constraint": {"regex": "[0-9]{4}"}}, {"temperature": 1.0},
              {"constraint": {"grammar": 'start: "ok"'}}, {}]  # fmt: skip
    with ThreadPoolExecutor(len(bodies)) as pool:
        outs = list(pool.map(lambda b: generate(client, **b), bodies))
    jsonschema.validate(json.loads(outs[0]["text"]), PERSON)
    assert re.fullmatch("[0-9]{4}", outs[2]["text"]) and outs[4]["text"] == "ok"
    assert [o["constraint"] for o in outs] == ["json_schema", None, "regex", None, "grammar", None]


# -----------------------------------------------------------------------------
# bad input: 422 on /generate, OpenAI's 400 on /v1, naming the field and the problem


@pytest.mark.parametrize(
    ("constraint", "param", "words"),
    [
        ({"json_schema": {"type": "strin"}}, "constraint.json_schema", "strin"),
        ({"json_schema": {"type": "array", "uniqueItems": True}}, "constraint.json_schema", "uniqueItems"),
        ({"json_schema": {"$ref": "#/$defs/nowhere"}}, "constraint.json_schema", "nowhere"),
        ({"regex": "([a-z]+"}, "constraint.regex", "unclosed"),
        ({"grammar": "start: missing_rule"}, "constraint.grammar", "missing_rule"),
        ({"regex": "a", "grammar": 'start: "a"'}, "constraint", "exactly one"),
        ({}, "constraint", "exactly one"),
        ({"json_object": False}, "constraint.json_object", ""),
    ],
)
def test_generate_refuses_bad_constraints(client, constraint, param, words):
    r = client.post("/generate", json={"prompt": "x", "constraint": constraint})
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"], error


def test_stop_strings_and_constraints_do_not_mix(client, oai):
    r = client.post("/generate", json={"prompt": "x", "stop": ["}"], "constraint": {"json_object": True}})
    assert r.status_code == 422 and r.json()["error"]["param"] == "stop", r.text
    with pytest.raises(openai.BadRequestError) as info:
        chat(oai, stop=["}"], response_format={"type": "json_object"})
    assert info.value.body["param"] == "stop"


@pytest.mark.parametrize(
    ("response_format", "param", "words"),
    [
        ({"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "strin"}}},
         "response_format.json_schema.schema", "strin"),
        ({"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "object", "if": {}}}},
         "response_format.json_schema.schema", "if"),
        ({"type": "json_schema", "json_schema": {"schema": PERSON}}, "response_format", "name"),
        ({"type": "xml"}, "response_format", "xml"),
    ],
)  # fmt: skip
def test_v1_refuses_bad_response_formats_as_openai_does(oai, response_format, param, words):
    with pytest.raises(openai.BadRequestError) as info:
        chat(oai, response_format=response_format, max_tokens=4)
    error = info.value.body
    assert info.value.status_code == 400 and error["type"] == "invalid_request_error"
    assert error["param"].startswith(param) and words in error["message"], error


# -----------------------------------------------------------------------------
# constraints no answer can follow: the client's mistake, refused with a short message naming the field


def sse_events(response: httpx.Response) -> list[tuple[str, dict]]:
    """(event name, data) of each server-sent event; unnamed events (OpenAI's) are "message"; [DONE] is left out."""
    events, name = [], "message"
    for line in response.iter_lines():
        if line.startswith("event:"):
            name = line.split(":", 1)[1].strip()
        elif line.startswith("data:") and line.split(":", 1)[1].strip() != "[DONE]":
            events.append((name, json.loads(line.split(":", 1)[1])))
            name = "message"
    return events


def assert_short(message: str) -> None:
    """One line, no internal state of the grammar library."""
    assert "\n" not in message and "<state>" not in message and len(message) <= 400, message


UNSATISFIABLE = [
    ({"grammar": 'start: "a" start'}, "constraint.grammar", "constraint_too_complex"),  # no finite derivation
    ({"regex": r"[^\x00-\x{10FFFF}]"}, "constraint.regex", "constraint_unsatisfiable"),  # matches nothing
    ({"json_schema": {"$ref": "#"}}, "constraint.json_schema", "constraint_unsatisfiable"),  # refers to itself
]


@pytest.mark.parametrize(("constraint", "param", "code"), UNSATISFIABLE, ids=["endless", "empty", "self-ref"])
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_constraints_no_answer_can_follow_are_a_422_naming_the_field(client, constraint, param, code, stream):
    r = client.post("/generate", json={"prompt": "x", "constraint": constraint, "stream": stream})
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert (error["param"], error["code"], error["type"]) == (param, code, "invalid_request_error"), error
    assert error["message"].startswith(param + ": ")
    assert_short(error["message"])


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_v1_refuses_a_schema_no_answer_can_follow_with_400(oai, stream):
    fmt = {"type": "json_schema", "json_schema": {"name": "loop", "schema": {"$ref": "#"}}}
    with pytest.raises(openai.BadRequestError) as info:
        chat(oai, response_format=fmt, max_tokens=8, stream=stream)
    with pytest.raises(openai.BadRequestError) as completions:
        oai.completions.create(model=MODEL, prompt="x", max_tokens=8, stream=stream,
                               extra_body={"response_format": fmt})  # fmt: skip
    for error in (info.value, completions.value):
        assert error.status_code == 400 and error.body["code"] == "constraint_unsatisfiable", error.body
        assert error.body["param"] == "response_format.json_schema.schema"
        assert_short(error.body["message"])


def test_a_constraint_that_fails_while_decoding_is_the_clients_error(client):
    """It compiles, and its first token is fine; only then does llguidance find that no answer can end. The
    request ends with a 422 (or, once streaming has begun, an error event), and counts as refused, not failed."""
    before = client.get("/metrics").text
    constraint = {"grammar": DEAD_AFTER_ONE}
    r = client.post("/generate", json={"prompt": "x", "constraint": constraint})
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert (error["param"], error["code"]) == ("constraint.grammar", "constraint_too_complex"), error
    assert_short(error["message"])
    with client.stream("POST", "/generate", json={"prompt": "x", "constraint": constraint, "stream": True}) as r:
        assert r.status_code == 200
        events = sse_events(r)
    assert [name for name, _ in events] == ["token", "error"], events
    assert events[0][1]["text"] in ("b", "c")
    streamed = events[1][1]["error"]
    assert (streamed["param"], streamed["code"]) == ("constraint.grammar", "constraint_too_complex"), streamed
    assert_short(streamed["message"])
    after = client.get("/metrics").text
    refused = metric(after, "xlora_generations_total", outcome="refused")
    assert refused - metric(before, "xlora_generations_total", outcome="refused") == 2
    assert metric(after, "xlora_generations_total", outcome="error") == metric(before, "xlora_generations_total",
                                                                               outcome="error")  # fmt: skip
    assert metric(after, "xlora_requests_total", route="/generate", status="422") > metric(
        before, "xlora_requests_total", route="/generate", status="422")  # fmt: skip
    assert generate(client, max_new_tokens=3)["usage"]["completion_tokens"] == 3  # the worker goes on


def test_a_schema_too_slow_to_compile_is_refused_and_the_worker_goes_on(tmp_path, start_server):
    server = start_server(ascii_config(tmp_path, constraint_compile_timeout_s=0.001))
    big = {"type": "object", "required": [f"field_{i}" for i in range(300)],
           "properties": {f"field_{i}": {"type": "string", "pattern": f"^[a-z]{{{i % 7 + 1}}}[0-9]+x{i}$"}
                          for i in range(300)}}  # fmt: skip
    with httpx.Client(base_url=server.url, timeout=60) as c:
        r = c.post("/generate", json={"prompt": "x", "constraint": {"json_schema": big}})
        assert r.status_code == 422, r.text
        error = r.json()["error"]
        assert error["param"] == "constraint.json_schema" and error["code"] == "constraint_too_complex"
        assert "constraint_compile_timeout_s" in error["message"]
        free = c.post("/generate", json={"prompt": "x", "max_new_tokens": 4})
        assert free.status_code == 200 and free.json()["usage"]["completion_tokens"] == 4


# -----------------------------------------------------------------------------
# function calling: the arguments under the grammar of the tool's schema (server/protocol/tools.py)
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "the weather in a city",
        "parameters": {"type": "object", "properties": {"unit": {"enum": ["c", "f"]}, "days": {"type": "integer",
                       "minimum": 1, "maximum": 7}}, "required": ["unit", "days"], "additionalProperties": False},
    },
}  # fmt: skip
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {},
        "additionalProperties": False}}}  # fmt: skip
ASK = [{"role": "user", "content": "weather?"}]


def check_weather(arguments: str) -> None:
    args = json.loads(arguments)
    assert args["unit"] in ("c", "f") and 1 <= args["days"] <= 7 and set(args) == {"unit", "days"}


def test_a_named_tool_is_called_with_arguments_that_follow_its_schema(oai):
    choice = {"type": "function", "function": {"name": "get_weather"}}
    out = oai.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, TIME], tool_choice=choice,
                                      max_tokens=60, temperature=0)  # fmt: skip
    ChatCompletion.model_validate(out.to_dict())  # the client's own model, validating
    (c,) = out.choices
    assert c.finish_reason == "tool_calls" and c.message.content is None
    (call,) = c.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    check_weather(call.function.arguments)
    stream = oai.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, TIME], tool_choice=choice,
                                         max_tokens=60, temperature=0, stream=True)  # fmt: skip
    chunks = [ChatCompletionChunk.model_validate(chunk.to_dict()).choices[0] for chunk in stream if chunk.choices]
    assert "".join(ch.delta.content or "" for ch in chunks) == ""
    (last,) = [ch for ch in chunks if ch.delta.tool_calls]
    assert last.finish_reason == "tool_calls"
    assert last.delta.tool_calls[0].function.arguments == call.function.arguments


def test_required_makes_one_call_of_any_tool_and_history_with_calls_is_accepted(oai):
    out = oai.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, TIME], tool_choice="required",
                                      parallel_tool_calls=False, max_tokens=200, temperature=0)  # fmt: skip
    (c,) = out.choices
    assert c.finish_reason == "tool_calls"
    (call,) = c.message.tool_calls
    if call.function.name == "get_weather":
        check_weather(call.function.arguments)
    else:
        assert call.function.name == "get_time" and json.loads(call.function.arguments) == {}
    history = [*ASK, c.message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]  # fmt: skip
    answer = oai.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER, TIME], tool_choice="none",
                                         max_tokens=5, temperature=0)  # fmt: skip
    assert answer.choices[0].message.tool_calls is None and isinstance(answer.choices[0].message.content, str)


def test_auto_answers_text_or_calls(oai):
    out = oai.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], max_tokens=30, temperature=1.0,
                                      seed=2, n=3)  # fmt: skip
    for c in out.choices:
        if c.finish_reason == "tool_calls":
            for call in c.message.tool_calls:
                check_weather(call.function.arguments)
        else:
            assert not c.message.content.startswith("<tool_call>")


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [WEATHER, WEATHER]}, "tools"),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}],
          "tool_choice": "required"}, "tools"),
        ({"functions": [{"name": "f"}]}, "functions"),
    ],
)
def test_bad_tools_name_their_field(oai, kwargs, param):
    with pytest.raises(openai.BadRequestError) as info:
        oai.chat.completions.create(model=MODEL, messages=ASK, max_tokens=2, **kwargs)
    assert info.value.body["param"] == param or info.value.body["param"].startswith(param + "."), info.value.body


def test_auto_lets_text_through_but_a_call_once_begun_follows_the_schema(tmp_path):
    from server.protocol.tools import Tool, constraint_for
    from xlora_core import GrammarCompiler

    tok = make_tiny_tokenizer(tmp_path)
    spec = constraint_for([Tool.model_validate(WEATHER)], "auto", parallel=True)
    grammar = GrammarCompiler(tok, None, tok.eos_token_id).compile(spec)

    def allowed_after(text: str) -> set[str]:
        matcher = grammar.matcher()
        for t in tok(text, add_special_tokens=False)["input_ids"]:
            matcher.consume(t)
        mask = matcher.allowed(len(tok))
        return {tok.decode([i]) for i in range(len(tok)) if mask[i]}

    assert {"<", "a", "{", tok.eos_token} <= allowed_after("")  # text, or a call
    assert tok.eos_token in allowed_after("<tool_c")  # text that only looks like the start of a call
    assert allowed_after("<tool_call>") == {"{"}  # a call: its JSON, nothing else
    call = '<tool_call>{"name": "get_weather", "arguments": {"unit": "c", "days": 3}}</tool_call>'
    assert allowed_after(call) >= {"\n", tok.eos_token}  # the end, or (parallel) another call
    assert "9" not in allowed_after(call[: call.index("3")])  # days is 1..7


class GetWeather(BaseModel):
    """The weather in a city."""

    unit: Literal["c", "f"]
    days: Annotated[int, Field(ge=1, le=7)]


def test_langchain_bind_tools_calls_a_named_tool(ascii_server):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model=MODEL, base_url=ascii_server.url + "/v1", api_key="unused", temperature=0,
                     max_tokens=120, max_retries=0)  # fmt: skip
    reply = llm.bind_tools([GetWeather], tool_choice="GetWeather").invoke("weather in Oslo?")
    (call,) = reply.tool_calls
    assert call["name"] == "GetWeather" and call["id"].startswith("call_")
    GetWeather.model_validate(call["args"])
    assert reply.response_metadata["finish_reason"] == "tool_calls"
