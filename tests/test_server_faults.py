"""Faults: disconnects, a full queue, timeouts, a model failure, SIGTERM, and PATCH racing generations.

Each fault is provoked for real: the model failure is a prompt with a token id past the tiny model's
embedding table (see conftest), timeouts come from a server whose request timeout is shorter than a
long generation takes.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from .conftest import server_config
from .test_server import generate, metric
from .tiny_world import POISON


def wait_for(predicate, timeout: float = 10.0, every: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(every)
    return False


def read_tokens(lines, n: int) -> list[dict]:
    """Read the next n data events from an iterator over a /generate stream's lines."""
    tokens = []
    for line in lines:
        if line.startswith("data:"):
            tokens.append(json.loads(line[5:]))
            if len(tokens) == n:
                break
    return tokens


# -----------------------------------------------------------------------------
# on the shared server


def test_disconnected_stream_stops_and_frees_its_cache(client, server):
    before = client.get("/metrics").text
    other_result = {}

    def other_request() -> None:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            other_result["out"] = generate(c, prompt="bystander", max_new_tokens=200)

    body = {"prompt": "walk away", "max_new_tokens": 250, "stream": True}
    with httpx.Client(base_url=server.url, timeout=60) as gone:
        with gone.stream("POST", "/generate", json=body) as r:
            bystander = threading.Thread(target=other_request)
            bystander.start()
            assert len(read_tokens(r.iter_lines(), 3)) == 3
        # leaving both blocks closes the connection mid-generation

    def cancelled() -> bool:
        text = client.get("/metrics").text
        return metric(text, "xlora_generations_total", outcome="cancelled") > metric(
            before, "xlora_generations_total", outcome="cancelled"
        )

    assert wait_for(cancelled), "the server never noticed the client left"
    bystander.join(60)
    after = client.get("/metrics").text
    generated = metric(after, "xlora_generated_tokens_total") - metric(before, "xlora_generated_tokens_total")
    assert generated < 250 + other_result["out"]["usage"]["completion_tokens"], "generation went on to the end"
    assert wait_for(lambda: metric(client.get("/metrics").text, "xlora_kv_cache_bytes") == 0)
    assert wait_for(lambda: metric(client.get("/metrics").text, "xlora_running_requests") == 0)
    # The other request ran alongside and got the same answer as alone.
    assert other_result["out"]["text"] == generate(client, prompt="bystander", max_new_tokens=200)["text"]


def test_model_failure_fails_that_request_only(client, server):
    prompts = ["good one", f"bad {POISON} one", "good two", "good three"]
    alone = {p: generate(client, prompt=p, max_new_tokens=20)["text"] for p in prompts if POISON not in p}

    r = client.post("/generate", json={"prompt": prompts[1], "max_new_tokens": 5})
    assert r.status_code == 500
    error = r.json()["error"]
    assert error["code"] == "model_error" and "the model failed on this request" in error["message"]
    assert client.get("/ready").status_code == 200

    # Batched with good requests (one prefill), the bad one fails alone.
    start = threading.Barrier(len(prompts))

    def ask(prompt: str) -> httpx.Response:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            start.wait()
            return c.post("/generate", json={"prompt": prompt, "max_new_tokens": 20})

    with ThreadPoolExecutor(len(prompts)) as pool:
        results = dict(zip(prompts, pool.map(ask, prompts), strict=True))
    for prompt, response in results.items():
        if POISON in prompt:
            assert response.status_code == 500
        else:
            assert response.status_code == 200 and response.json()["text"] == alone[prompt]

    # Streaming: the failure comes before any token, so it still gets its status code.
    r = client.post("/generate", json={"prompt": prompts[1], "max_new_tokens": 5, "stream": True})
    assert r.status_code == 500 and r.json()["error"]["code"] == "model_error"
    assert client.get("/ready").json()["ready"] is True
    assert generate(client, prompt="after", max_new_tokens=3)["usage"]["completion_tokens"] >= 1


def test_patch_racing_twenty_generations(client, server):
    old = {"top_k": None, "global_scaling_weight": 1.0, "freeze_after": None}
    new = {"top_k": 1, "global_scaling_weight": 2.0, "freeze_after": None}
    prompt = "race"
    expected = {
        json.dumps(old): generate(client, prompt=prompt, max_new_tokens=30, routing=old)["text"],
        json.dumps(new): generate(client, prompt=prompt, max_new_tokens=30, routing=new)["text"],
    }
    assert len(set(expected.values())) == 2, "the two settings must give different answers for this test"
    start = threading.Barrier(21)

    def ask(i: int) -> dict:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            start.wait()
            time.sleep(0.005 * i)  # spread over the moment of the PATCH
            return generate(c, prompt=prompt, max_new_tokens=30)

    def patch() -> dict:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            start.wait()
            time.sleep(0.05)
            return c.patch("/routing", json=new).json()

    try:
        with ThreadPoolExecutor(21) as pool:
            patched = pool.submit(patch)
            answers = list(pool.map(ask, range(20)))
        assert {k: v for k, v in patched.result().items() if k != "version"} == new
        seen = set()
        for out in answers:
            key = json.dumps(out["routing"])
            assert key in expected, out["routing"]  # old or new, never a mix of the two
            assert out["text"] == expected[key]  # and it really ran with what it reports
            seen.add(key)
    finally:
        client.patch("/routing", json=old).raise_for_status()


# -----------------------------------------------------------------------------
# servers of their own


@pytest.fixture(scope="module")
def small_queue_server(start_server, world):
    proc = start_server(server_config(world, server={"max_batch_size": 1, "max_queue": 1, "max_new_tokens": 500}))
    yield proc
    proc.stop()


def test_full_queue_is_429_with_retry_after_then_succeeds(small_queue_server):
    url = small_queue_server.url
    long_body = {"prompt": "busy", "max_new_tokens": 480}
    with httpx.Client(base_url=url, timeout=120) as c, ThreadPoolExecutor(2) as pool:
        load = [pool.submit(c.post, "/generate", json=long_body)]
        assert wait_for(lambda: metric(c.get("/metrics").text, "xlora_running_requests") == 1)
        load.append(pool.submit(c.post, "/generate", json=long_body))
        assert wait_for(lambda: metric(c.get("/metrics").text, "xlora_queue_depth") == 1)

        r = c.post("/generate", json={"prompt": "me too", "max_new_tokens": 5})
        assert r.status_code == 429
        assert int(r.headers["Retry-After"]) >= 1
        assert r.json()["error"]["type"] == "rate_limit_error"

        assert all(f.result().status_code == 200 for f in load)  # the load itself is served in full
        r = c.post("/generate", json={"prompt": "me too", "max_new_tokens": 5})
        assert r.status_code == 200


@pytest.fixture(scope="module")
def impatient_server(start_server, world):
    proc = start_server(server_config(world, server={"request_timeout_s": 0.3, "max_new_tokens": 500}))
    yield proc
    proc.stop()


def test_timeout_is_504_and_the_worker_goes_on(impatient_server):
    with httpx.Client(base_url=impatient_server.url, timeout=60) as c:
        started = time.monotonic()
        r = c.post("/generate", json={"prompt": "slow", "max_new_tokens": 500})
        assert r.status_code == 504, r.text
        assert time.monotonic() - started < 5
        assert "timed out" in r.json()["error"]["message"]

        # Streaming: tokens flow, then an error event says why it ended.
        with c.stream("POST", "/generate", json={"prompt": "slow", "max_new_tokens": 500, "stream": True}) as s:
            assert s.status_code == 200
            lines = [line for line in s.iter_lines() if line.startswith(("event:", "data:"))]
        assert "event: token" in lines and lines[-2] == "event: error"
        assert json.loads(lines[-1][5:])["error"]["code"] == "timeout"

        assert c.post("/generate", json={"prompt": "quick", "max_new_tokens": 3}).status_code == 200
        assert c.get("/ready").status_code == 200
        text = c.get("/metrics").text
        assert metric(text, "xlora_generations_total", outcome="timeout") >= 2
        # The worker updates the gauge just after it answers: give it a moment.
        assert wait_for(lambda: metric(c.get("/metrics").text, "xlora_kv_cache_bytes") == 0)


def test_sigterm_drains_in_flight_requests_then_exits_zero(start_server, world):
    proc = start_server(server_config(world, server={"shutdown_grace_s": 30, "max_new_tokens": 500}))
    with httpx.Client(base_url=proc.url, timeout=60) as c:
        with c.stream("POST", "/generate", json={"prompt": "finish me", "max_new_tokens": 300, "stream": True}) as r:
            lines = r.iter_lines()  # one iterator: httpx cannot restart a stream's iteration
            first = read_tokens(lines, 1)
            proc.proc.send_signal(signal.SIGTERM)
            # Draining: no longer ready, new work refused with 503, but still answering.
            assert wait_for(lambda: c.get("/ready").status_code == 503, timeout=5)
            refused = c.post("/generate", json={"prompt": "too late", "max_new_tokens": 2})
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
            rest = [json.loads(line[5:]) for line in lines if line.startswith("data:")]
    done = rest[-1]
    assert done["finish_reason"] in ("stop", "length")
    assert len(first) + len(rest) - 1 == done["usage"]["completion_tokens"]  # every token arrived
    assert proc.wait_exit(30) == 0, proc.log()
