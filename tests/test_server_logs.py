"""Logs of a real server process: one JSON object a line, the request id on every line about a request, one
summary line per request, and no prompt text unless `logging.log_prompts` says so."""

from __future__ import annotations

import json
import logging
import re
import time

import httpx
import pytest

from server.observability.logs import JsonFormatter, RequestIdFilter, TextFormatter

from .conftest import server_config
from .tiny_world import POISON

SECRET_PROMPT = "quokka marmalade 4711 zebra"


def json_lines(server) -> list[dict]:
    """Every line of the server's log, each parsed as one JSON object (fails on any other line)."""
    lines = [line for line in server.log().splitlines() if line.strip()]
    parsed = []
    for line in lines:
        entry = json.loads(line)
        assert isinstance(entry, dict), line
        assert {"time", "level", "logger", "message"} <= entry.keys(), line
        parsed.append(entry)
    return parsed


def wait_for_summary(server, request_id: str, timeout: float = 10.0) -> dict:
    """The summary line of that request (written once the response is complete, maybe after the client has it)."""
    deadline = time.monotonic() + timeout
    while True:
        found = [e for e in json_lines(server) if e["logger"] == "xlora.request" and e.get("request_id") == request_id]
        if found or time.monotonic() > deadline:
            assert len(found) == 1, f"expected one summary line for {request_id}, got {found}"
            return found[0]
        time.sleep(0.05)


@pytest.fixture(scope="module")
def json_server(start_server, world):
    return start_server(server_config(world, logging={"level": "info", "format": "json"}))


@pytest.fixture(scope="module")
def prompts_server(start_server, world):
    return start_server(server_config(world, logging={"level": "info", "format": "json", "log_prompts": True}))


def test_generate_is_logged_with_its_request_id_and_no_prompt(json_server):
    with httpx.Client(base_url=json_server.url, timeout=60) as client:
        r = client.post("/generate", json={"prompt": SECRET_PROMPT, "max_new_tokens": 5},
                        headers={"X-Request-ID": "test-req.1"})
    assert r.status_code == 200, r.text
    assert r.headers["x-request-id"] == "test-req.1"
    body = r.json()

    summary = wait_for_summary(json_server, "test-req.1")
    assert summary["level"] == "info"
    assert summary["method"] == "POST" and summary["path"] == "/generate" and summary["status"] == 200
    assert isinstance(summary["duration_ms"], int | float) and summary["duration_ms"] >= 0
    assert summary["generation_id"] == body["id"]
    assert summary["prompt_tokens"] == body["usage"]["prompt_tokens"] > 0
    assert summary["completion_tokens"] == body["usage"]["completion_tokens"] > 0
    assert summary["finish_reason"] == body["finish_reason"]
    assert "prompt" not in summary and "completion" not in summary

    entries = json_lines(json_server)  # every line is JSON, start-up lines included
    about = [e for e in entries if body["id"] in e["message"] or e.get("generation_id") == body["id"]]
    assert about and all(e.get("request_id") == "test-req.1" for e in about)
    assert SECRET_PROMPT not in json_server.log()
    assert "quokka" not in json_server.log()


def test_stream_summary_comes_when_the_stream_ends(json_server):
    with httpx.Client(base_url=json_server.url, timeout=60) as client:
        with client.stream("POST", "/generate", json={"prompt": SECRET_PROMPT, "max_new_tokens": 4, "stream": True},
                           headers={"X-Request-ID": "stream-1"}) as r:
            assert r.status_code == 200
            assert r.headers["x-request-id"] == "stream-1"
            done = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:") and "usage" in line]
    summary = wait_for_summary(json_server, "stream-1")
    assert summary["status"] == 200
    assert summary["completion_tokens"] == done[-1]["usage"]["completion_tokens"]
    assert summary["finish_reason"] == done[-1]["finish_reason"]
    assert "quokka" not in json_server.log()


@pytest.mark.parametrize("sent", [None, "has spaces", "x" * 129, "semi;colon"])
def test_missing_or_unsafe_request_id_is_replaced(json_server, sent):
    headers = {} if sent is None else {"X-Request-ID": sent}
    r = httpx.get(json_server.url + "/v1/models", headers=headers, timeout=30)
    assert r.status_code == 200
    made = r.headers["x-request-id"]
    assert made != sent and re.fullmatch(r"[0-9a-f]{32}", made)
    assert wait_for_summary(json_server, made)["path"] == "/v1/models"


def test_errors_and_model_failures_carry_the_request_id(json_server):
    with httpx.Client(base_url=json_server.url, timeout=60) as client:
        bad = client.post("/generate", json={"prompt": "x", "max_new_tokens": 0}, headers={"X-Request-ID": "bad-1"})
        assert bad.status_code == 422 and bad.headers["x-request-id"] == "bad-1"
        failed = client.post("/generate", json={"prompt": f"a {POISON} b", "max_new_tokens": 3},
                             headers={"X-Request-ID": "poison-1"})
        assert failed.status_code == 500 and failed.headers["x-request-id"] == "poison-1"
    assert wait_for_summary(json_server, "bad-1")["status"] == 422
    summary = wait_for_summary(json_server, "poison-1")
    assert summary["status"] == 500
    # The model worker thread's line about the failure names the request it failed.
    worker = [e for e in json_lines(json_server) if e["logger"] == "xlora.scheduler" and "failed" in e["message"]]
    assert worker and worker[-1]["request_id"] == "poison-1"
    assert worker[-1]["generation_id"] == summary["generation_id"]


def test_log_prompts_puts_prompt_and_completion_in_the_summary(prompts_server):
    with httpx.Client(base_url=prompts_server.url, timeout=60) as client:
        r = client.post("/generate", json={"prompt": SECRET_PROMPT, "max_new_tokens": 5},
                        headers={"X-Request-ID": "with-prompt"})
        assert r.status_code == 200
        chat = client.post("/v1/chat/completions", headers={"X-Request-ID": "chat-1"},
                           json={"model": "tiny-xlora", "max_tokens": 3,
                                 "messages": [{"role": "user", "content": "marmalade please"}]})
        assert chat.status_code == 200, chat.text
    summary = wait_for_summary(prompts_server, "with-prompt")
    assert summary["prompt"] == SECRET_PROMPT
    assert summary["completion"] == r.json()["text"]
    chat_summary = wait_for_summary(prompts_server, "chat-1")
    assert chat_summary["prompt"] == [{"role": "user", "content": "marmalade please"}]
    assert chat_summary["completion"] == chat.json()["choices"][0]["message"]["content"]
    assert chat_summary["generation_id"] == chat.json()["id"]


def _record(**extra) -> logging.LogRecord:
    record = logging.LogRecord("xlora.test", logging.INFO, __file__, 1, "hello %s", ("there",), None)
    for key, value in extra.items():
        setattr(record, key, value)
    RequestIdFilter().filter(record)
    return record


def test_formatters_show_extra_fields():
    record = _record(request_id="r-1", status=200, prompt="two words")
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "hello there" and entry["request_id"] == "r-1" and entry["status"] == 200
    assert entry["prompt"] == "two words"
    text = TextFormatter().format(record)
    assert text.endswith('INFO xlora.test: hello there [request_id=r-1 status=200 prompt="two words"]')
    plain = _record()  # outside a request: no request id, nothing appended
    assert "request_id" not in json.loads(JsonFormatter().format(plain))
    assert TextFormatter().format(plain).endswith("hello there")
