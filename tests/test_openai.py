"""The OpenAI-compatible API, through the official `openai` client against the shared live server."""

from __future__ import annotations

import httpx
import openai
import pytest

from .conftest import EXPERTS

MODEL = "tiny-xlora"


@pytest.fixture()
def oai(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_models_lists_the_served_models(oai):
    models = oai.models.list().data
    assert [m.id for m in models] == [MODEL, "tiny-xlora-2", "json", "tiny-base"]  # conftest.served_models
    assert sorted(models[0].model_extra["xlora_adapters"]) == sorted(EXPERTS)
    assert [m.model_extra["xlora_kind"] for m in models] == ["xlora", "xlora", "adapter", "base"]


def test_completion(oai):
    out = oai.completions.create(model=MODEL, prompt="count: 1 2 3", max_tokens=8, temperature=0)
    assert out.object == "text_completion" and out.id.startswith("cmpl-")
    choice = out.choices[0]
    assert choice.finish_reason in ("stop", "length") and isinstance(choice.text, str)
    assert out.usage.prompt_tokens == 1 + len("count: 1 2 3")
    assert 1 <= out.usage.completion_tokens <= 8
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    again = oai.completions.create(model=MODEL, prompt="count: 1 2 3", max_tokens=8, temperature=0)
    assert again.choices[0].text == choice.text


def test_completion_default_max_tokens_is_openais_16(oai):
    out = oai.completions.create(model=MODEL, prompt="go", temperature=0)
    assert out.usage.completion_tokens <= 16


def test_chat_completion(oai):
    out = oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "sort 3 1 2"}], max_tokens=10, temperature=0
    )
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-")
    assert out.choices[0].message.role == "assistant"
    assert isinstance(out.choices[0].message.content, str)
    assert out.choices[0].finish_reason in ("stop", "length")
    assert out.usage.completion_tokens <= 10


def test_streaming_chat_assembles_to_the_greedy_answer(oai):
    messages = [{"role": "system", "content": "be exact"}, {"role": "user", "content": "add 12 and 30"}]
    plain = oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=30, temperature=0)
    stream = oai.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=30, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [plain.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert all(c.id == chunks[0].id for c in chunks)


def test_streaming_completion_ends_with_done(server):
    body = {"model": MODEL, "prompt": "abc", "max_tokens": 5, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data:")]
    assert lines[-1] == "data: [DONE]"
    assert '"text_completion"' in lines[0]


def test_xlora_extensions_through_extra_body(oai):
    out = oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "route"}], max_tokens=4, temperature=0,
        extra_body={"xlora_routing": {"top_k": 1, "global_scaling_weight": 0.5}, "xlora_return_scalings": True},
    )
    xlora = out.model_extra["xlora"]
    assert xlora["routing"] == {"top_k": 1, "global_scaling_weight": 0.5, "freeze_after": None}
    scalings = xlora["scalings"]
    assert sorted(scalings["adapter_names"]) == sorted(EXPERTS)
    assert len(scalings["prompt"]) == out.usage.prompt_tokens
    assert len(scalings["completion"]) == out.usage.completion_tokens
    # Without the extensions, the server's routing in force is reported and no scalings come back.
    plain = oai.completions.create(model=MODEL, prompt="route", max_tokens=2, temperature=0)
    dense = {"top_k": None, "global_scaling_weight": 1.0, "freeze_after": None}
    assert plain.model_extra["xlora"] == {"routing": dense, "scalings": None, "constraint": None}


def test_frozen_scalings_through_extra_body(oai):
    out = oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "freeze"}], max_tokens=6, temperature=0,
        extra_body={"xlora_routing": {"freeze_after": 1}, "xlora_return_scalings": True},
    )
    xlora = out.model_extra["xlora"]
    assert xlora["routing"]["freeze_after"] == 1
    completion = xlora["scalings"]["completion"]
    assert len(completion) == out.usage.completion_tokens > 2
    assert all(row == completion[1] for row in completion[2:])
    with pytest.raises(openai.BadRequestError) as info:
        oai.completions.create(
            model=MODEL, prompt="x", max_tokens=2, extra_body={"xlora_routing": {"freeze_after": -3}}
        )
    assert info.value.body["param"] == "xlora_routing.freeze_after"


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"n": 0}, "n"),
        ({"top_logprobs": 30}, "top_logprobs"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"temperature": 5}, "temperature"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 100_000}, "max_tokens"),
        ({"extra_body": {"xlora_routing": {"top_k": 9}}}, "xlora_routing.top_k"),
        ({"extra_body": {"xlora_bogus": 1}}, "xlora_bogus"),
        ({"response_format": {"type": "yaml"}}, "response_format"),
    ],
)
def test_unsupported_or_bad_parameters_raise_bad_request(oai, kwargs, param):
    with pytest.raises(openai.BadRequestError) as info:
        oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], **kwargs)
    error = info.value.body
    assert info.value.status_code == 400
    assert set(error) >= {"message", "type", "param", "code"}  # the client unwraps {"error": {...}}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param or error["param"].startswith(param + "."), error


def test_unknown_model_is_not_found(oai):
    with pytest.raises(openai.NotFoundError) as info:
        oai.completions.create(model="gpt-4", prompt="x", max_tokens=2)
    assert info.value.body["param"] == "model" and "tiny-xlora" in info.value.body["message"]
