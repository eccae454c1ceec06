"""The HTTP API against one real server process (tiny random X-LoRA model, batching on)."""

from __future__ import annotations

import json
import math
import re
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from transformers import AutoTokenizer

from .conftest import EXPERTS


@pytest.fixture()
def restore_routing(client):
    """Tests that PATCH the shared server put its routing back afterwards."""
    before = settings_of(client.get("/routing").json())
    yield
    client.patch("/routing", json=before).raise_for_status()


def settings_of(state: dict) -> dict:
    """GET/PATCH /routing's body without its version: the fields a PATCH sends."""
    return {k: v for k, v in state.items() if k != "version"}


def generate(client: httpx.Client, **body) -> dict:
    r = client.post("/generate", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def stream_events(client: httpx.Client, **body) -> list[tuple[str, dict]]:
    """POST /generate with stream: true; returns [(event name, data)]."""
    events = []
    with client.stream("POST", "/generate", json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in r.iter_lines():
            if line.startswith("event:"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("data:"):
                events.append((name, json.loads(line.split(":", 1)[1])))
    return events


def metric(text: str, name: str, **labels) -> float:
    """The sum of the samples of `name` that have these labels, in Prometheus text (0 if none)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            sample, value = line.rsplit(" ", 1)
            if all(f'{k}="{v}"' in sample for k, v in labels.items()):
                total += float(value)
    return total


@pytest.fixture(scope="module", autouse=True)
def errors_before(server) -> float:
    """500s the shared server answered before this module: other modules' fault tests use it too."""
    return metric(httpx.get(server.url + "/metrics").text, "xlora_requests_total", status="500")


# -----------------------------------------------------------------------------
# health, readiness, schema


def test_health_ready_and_openapi(client):
    assert client.get("/health").json() == {"status": "ok"}
    ready = client.get("/ready").json()
    assert ready["ready"] is True and ready["state"] == "ready"
    assert sorted(ready["adapters"]) == sorted(EXPERTS)

    schema = client.get("/openapi.json").json()
    for path, method in [("/generate", "post"), ("/routing", "patch"), ("/scalings/{request_id}", "get"),
                         ("/v1/chat/completions", "post"), ("/v1/completions", "post")]:
        op = schema["paths"][path][method]
        assert "200" in op["responses"], path
        assert any(code.startswith("4") for code in op["responses"]), f"{path}: no documented error"
    assert "GenerateRequest" in schema["components"]["schemas"]
    assert schema["components"]["schemas"]["GenerateRequest"]["additionalProperties"] is False


def test_the_heap_as_loaded_is_left_out_of_full_garbage_collections(client):
    """Once loaded, the server freezes its heap (gc.freeze, as vLLM does): a full collection walked torch,
    transformers and the model (460k objects with the embedded default, 0.2 s holding the GIL, a stalled
    decode step); now it skips them."""
    assert metric(client.get("/metrics").text, "xlora_gc_frozen_objects") > 100_000


# -----------------------------------------------------------------------------
# /generate


def test_generate_prompt_greedy_is_repeatable(client):
    a = generate(client, prompt="add 2 and 3", max_new_tokens=12)
    b = generate(client, prompt="add 2 and 3", max_new_tokens=12)
    assert a["text"] == b["text"] and a["id"] != b["id"]
    assert a["id"].startswith("gen-")
    assert a["finish_reason"] in ("stop", "length")
    usage = a["usage"]
    assert usage["prompt_tokens"] == 1 + len("add 2 and 3")  # character tokenizer + <s>
    assert 1 <= usage["completion_tokens"] <= 12
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert a["routing"] == {"top_k": None, "global_scaling_weight": 1.0, "freeze_after": None}
    assert a["scalings"] is None


def test_generate_messages_go_through_the_chat_template(client, world):
    tok = AutoTokenizer.from_pretrained(world["base"])
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "sort 3 1 2"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    out = generate(client, messages=messages, max_new_tokens=5)
    assert out["usage"]["prompt_tokens"] == len(tok(text, add_special_tokens=False)["input_ids"])


def test_seeded_sampling_is_repeatable(client):
    body = dict(prompt="a b c", max_new_tokens=16, temperature=1.5, top_p=0.9, top_k=20, seed=7)
    assert generate(client, **body)["text"] == generate(client, **body)["text"]


def test_stop_string_ends_the_completion(client):
    full = generate(client, prompt="hello there", max_new_tokens=20)["text"]
    stop = full[3:5]
    assert stop and stop not in full[:3]
    out = generate(client, prompt="hello there", max_new_tokens=20, stop=[stop])
    assert out["finish_reason"] == "stop"
    assert out["text"] == full[: full.index(stop)]


def test_stream_gives_one_event_per_token_then_done(client):
    plain = generate(client, prompt="stream me", max_new_tokens=15)
    events = stream_events(client, prompt="stream me", max_new_tokens=15)
    tokens = [data for name, data in events if name == "token"]
    name, done = events[-1]
    assert name == "done"
    assert [t["index"] for t in tokens] == list(range(len(tokens)))
    assert len(tokens) == done["usage"]["completion_tokens"] == plain["usage"]["completion_tokens"]
    assert "".join(t["text"] for t in tokens) == plain["text"]
    assert done["finish_reason"] == plain["finish_reason"]
    assert done["routing"] == plain["routing"]


def test_return_scalings_per_token(client):
    out = generate(client, prompt="scale", max_new_tokens=6, return_scalings=True)
    s = out["scalings"]
    assert sorted(s["adapter_names"]) == sorted(EXPERTS)
    assert len(s["prompt"]) == out["usage"]["prompt_tokens"]
    assert len(s["completion"]) == out["usage"]["completion_tokens"]
    assert s["completion"][0] == s["prompt"][-1]  # the mix at the last prompt position chose token 0
    for row in s["prompt"] + s["completion"]:
        assert len(row) == len(EXPERTS)
        assert math.isclose(sum(row), 1.0, abs_tol=1e-4)  # softmax over experts


def test_per_request_routing_applies_to_that_request_only(client):
    dense = generate(client, prompt="route me", max_new_tokens=10)
    top1 = generate(client, prompt="route me", max_new_tokens=10, routing={"top_k": 1})
    assert top1["routing"] == {"top_k": 1, "global_scaling_weight": 1.0, "freeze_after": None}
    off = generate(client, prompt="route me", max_new_tokens=10, routing={"global_scaling_weight": 0.0})
    assert off["routing"] == {"top_k": None, "global_scaling_weight": 0.0, "freeze_after": None}
    assert len({dense["text"], top1["text"], off["text"]}) > 1  # routing changes what the model says
    dense_settings = {"top_k": None, "global_scaling_weight": 1.0, "freeze_after": None}
    assert settings_of(client.get("/routing").json()) == dense_settings


# -----------------------------------------------------------------------------
# /routing


def test_patch_routing(client, restore_routing):
    version = client.get("/routing").json()["version"]
    r = client.patch("/routing", json={"top_k": 2})
    assert r.status_code == 200 and r.json() == {
        "top_k": 2, "global_scaling_weight": 1.0, "freeze_after": None, "version": version + 1
    }
    assert r.headers["x-xlora-routing-version"] == str(version + 1)
    r = client.patch("/routing", json={"global_scaling_weight": 0.5})
    # unsent fields keep their value; each change is a new version
    expected = {"top_k": 2, "global_scaling_weight": 0.5, "freeze_after": None}
    assert r.json() == {**expected, "version": version + 2}
    assert client.get("/routing").json() == {**expected, "version": version + 2}
    r = client.post("/generate", json={"prompt": "x", "max_new_tokens": 2})
    assert r.json()["routing"] == expected
    assert r.headers["x-xlora-routing-version"] == str(version + 2) and r.headers["x-xlora-replica"]
    r = client.patch("/routing", json={"top_k": None})
    assert r.json()["top_k"] is None  # null = dense
    assert "xlora_routing_global_scaling_weight 0.5" in client.get("/metrics").text


def test_a_repeated_prompt_hits_the_prefix_cache_and_a_patch_empties_it(client, restore_routing):
    """The shared server's prefix cache (server.prefix_cache_bytes): the same 60-token prompt again takes its
    first 48 tokens from the cache and says the same; a PATCH /routing drops every block."""
    body = {"prompt": "The prefix cache keeps keys and values of prompts it has seen." [:60], "max_new_tokens": 8}

    def metrics() -> tuple[float, float, float]:
        text = client.get("/metrics").text
        names = ("xlora_prefix_cache_hits_total", "xlora_prefix_cache_reused_tokens_total", "xlora_prefix_cache_bytes")
        return tuple(metric(text, name) for name in names)

    first = generate(client, **body)
    hits, reused, held = metrics()
    assert held > 0
    again = generate(client, **body)
    assert again["text"] == first["text"] and again["usage"] == first["usage"]
    assert metrics()[:2] == (hits + 1, reused + 48)
    client.patch("/routing", json={"top_k": 1}).raise_for_status()
    assert metrics()[2] == 0
    generate(client, **body)  # under the new routing: a miss, stored again
    assert metrics()[:2] == (hits + 1, reused + 48)


def test_patch_during_a_running_generation(client, restore_routing, server):
    """The request in flight keeps the routing it started with; the next one gets the new one."""
    old = generate(client, prompt="long one", max_new_tokens=250)
    patched, running = {}, 0
    with client.stream("POST", "/generate", json={"prompt": "long one", "max_new_tokens": 250, "stream": True}) as r:
        assert r.status_code == 200
        texts, done = [], None
        for line in r.iter_lines():
            if not line.startswith("data:"):
                continue
            data = json.loads(line[5:])
            if "text" in data:
                texts.append(data["text"])
                if len(texts) == 3:  # mid-generation: change the server's routing
                    with httpx.Client(base_url=server.url) as other:
                        patched = other.patch("/routing", json={"top_k": 1, "global_scaling_weight": 3.0}).json()
                        running = metric(other.get("/metrics").text, "xlora_running_requests")
            else:
                done = data
    assert settings_of(patched) == {"top_k": 1, "global_scaling_weight": 3.0, "freeze_after": None}
    assert running == 1, "the generation had already finished when the PATCH returned"
    assert done["usage"]["completion_tokens"] > 3
    assert done["routing"] == {"top_k": None, "global_scaling_weight": 1.0, "freeze_after": None}
    assert "".join(texts) == old["text"]  # unchanged by the PATCH, token for token
    after = generate(client, prompt="long one", max_new_tokens=250)
    assert after["routing"] == {"top_k": 1, "global_scaling_weight": 3.0, "freeze_after": None}
    assert after["text"] != old["text"]


def test_frozen_scalings_per_request_and_as_the_server_default(client, restore_routing):
    """freeze_after: the scalings after the freeze point are those of position P-1+k, in the answer and in
    the log; the server-wide default comes from PATCH /routing and shows in GET /routing and /metrics."""
    body = dict(prompt="freeze me", max_new_tokens=12, return_scalings=True)
    granular = generate(client, **body)
    frozen = generate(client, **body, routing={"freeze_after": 2})
    assert frozen["routing"] == {"top_k": None, "global_scaling_weight": 1.0, "freeze_after": 2}
    n = frozen["usage"]["completion_tokens"]
    assert n > 4, "the test needs more tokens than the freeze point"
    completion = frozen["scalings"]["completion"]
    assert all(row == completion[2] for row in completion[3:])  # the rows that chose tokens 3.. are frozen
    assert completion[:3] == granular["scalings"]["completion"][:3]  # routed as usual up to the freeze point
    logged = client.get(f"/scalings/{frozen['id']}").json()
    assert logged["frozen_from"] == frozen["usage"]["prompt_tokens"] + 2
    assert logged["routing"]["freeze_after"] == 2
    assert client.get(f"/scalings/{granular['id']}").json()["frozen_from"] is None

    r = client.patch("/routing", json={"freeze_after": 0})
    assert r.status_code == 200 and r.json()["freeze_after"] == 0
    assert client.get("/routing").json()["freeze_after"] == 0
    assert "xlora_routing_freeze_after 0.0" in client.get("/metrics").text
    default = generate(client, **body)
    assert default["routing"]["freeze_after"] == 0
    assert all(row == default["scalings"]["completion"][0] for row in default["scalings"]["completion"])
    r = client.patch("/routing", json={"freeze_after": -1})
    assert r.status_code == 422 and r.json()["error"]["param"] == "freeze_after"
    assert client.patch("/routing", json={"freeze_after": None}).json()["freeze_after"] is None


# -----------------------------------------------------------------------------
# batching


def test_concurrent_requests_are_batched_and_match_sequential(client, server):
    prompts = ["one", "two two", "three three three", "four"]
    sequential = [generate(client, prompt=p, max_new_tokens=40)["text"] for p in prompts]
    before = client.get("/metrics").text
    start = threading.Barrier(len(prompts))

    def ask(prompt: str) -> str:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            start.wait()
            return generate(c, prompt=prompt, max_new_tokens=40)["text"]

    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(ask, prompts))
    after = client.get("/metrics").text
    assert together == sequential  # batching (left padding, joined caches) changes no token

    def steps_over_one(text: str) -> float:
        total = metric(text, "xlora_batch_size_count", phase="decode")
        return total - metric(text, "xlora_batch_size_bucket", phase="decode", le="1.0")

    assert steps_over_one(after) - steps_over_one(before) >= 10, "no decode step ran more than one row"


# -----------------------------------------------------------------------------
# /scalings and /metrics


def test_scalings_log_endpoints(client):
    out = generate(client, prompt="log me", max_new_tokens=4)
    rid = out["id"]
    log = client.get("/scalings").json()
    assert log["capacity"] >= 1
    entry = next(e for e in log["entries"] if e["id"] == rid)
    assert entry["prompt_tokens"] == out["usage"]["prompt_tokens"]
    assert entry["completion_tokens"] == out["usage"]["completion_tokens"]
    assert len(entry["mean_scalings"]) == len(EXPERTS) == len(entry["adapter_names"])

    detail = client.get(f"/scalings/{rid}").json()
    n_positions = out["usage"]["prompt_tokens"] + out["usage"]["completion_tokens"] - 1
    assert len(detail["scalings"]) == n_positions
    assert detail["tokens"] is None  # token texts only with include_text=true
    # Prompt and completion shares kept apart: the prompt's positions, then the positions that chose each token.
    n_prompt = out["usage"]["prompt_tokens"]
    for key, rows in [("prompt_mean_scalings", detail["scalings"][:n_prompt]),
                      ("completion_mean_scalings", detail["scalings"][n_prompt - 1 :])]:  # fmt: skip
        expected = [sum(layer[a] for token in rows for layer in token) / (len(rows) * detail["n_layers"])
                    for a in range(len(EXPERTS))]  # fmt: skip
        assert entry[key] == pytest.approx(expected, abs=1e-5), key
    assert all(len(layer) == len(EXPERTS) for token in detail["scalings"] for layer in token)
    assert len(detail["scalings"][0]) == detail["n_layers"] >= 1
    assert client.get("/scalings/latest").json()["id"] == rid

    bucketed = client.get("/scalings", params={"bucketed": "true"}).json()
    seq_len = out["usage"]["total_tokens"]
    assert any(b["seq_len"] == seq_len and rid in b["ids"] for b in bucketed["buckets"])

    r = client.get("/scalings/no-such-id")
    assert r.status_code == 404 and r.json()["error"]["param"] == "request_id"
    cleared = client.delete("/scalings").json()["cleared"]
    assert cleared >= 1
    assert client.get("/scalings").json()["entries"] == []
    assert client.get("/scalings/latest").status_code == 404


def test_metrics_follow_prometheus_conventions(client):
    generate(client, prompt="metrics", max_new_tokens=5)
    stream_events(client, prompt="metrics", max_new_tokens=5)
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert metric(text, "xlora_requests_total", route="/generate", status="200") >= 2
    for name in [
        "xlora_request_latency_seconds_count", "xlora_time_to_first_token_seconds_count",
        "xlora_time_per_output_token_seconds_count", "xlora_prompt_tokens_total", "xlora_generated_tokens_total",
        "xlora_batch_size_count", "xlora_queue_depth", "xlora_routing_top_k",
        "xlora_routing_global_scaling_weight",
    ]:
        assert re.search(rf"^{name}(\{{|\s)", text, re.M), name
    for adapter in EXPERTS:
        assert f'xlora_mean_scaling{{adapter="{adapter}"}}' in text
    client.get("/no/such/path")
    assert 'route="unmatched"' in client.get("/metrics").text


# -----------------------------------------------------------------------------
# bad input: always a 4xx naming the field, never a 500, and the server keeps serving

BAD_BODIES = [
    ({"prompt": "x", "max_tokens": 5}, 422, "max_tokens"),
    ({"prompt": 5}, 422, "prompt"),
    ({"prompt": "x", "max_new_tokens": "5"}, 422, "max_new_tokens"),
    ({"prompt": "x", "max_new_tokens": 0}, 422, "max_new_tokens"),
    ({"prompt": "x", "max_new_tokens": 10**9}, 422, "max_new_tokens"),
    ({"prompt": "x", "max_new_tokens": 1.5}, 422, "max_new_tokens"),
    ({"prompt": "x", "temperature": -1}, 422, "temperature"),
    ({"prompt": "x", "top_p": 0}, 422, "top_p"),
    ({"prompt": "x", "top_k": -3}, 422, "top_k"),
    ({"prompt": "x", "repetition_penalty": 0}, 422, "repetition_penalty"),
    ({"prompt": "x", "seed": -1}, 422, "seed"),
    ({"prompt": "x", "stream": "yes"}, 422, "stream"),
    ({"prompt": "x", "stop": [1]}, 422, "stop"),
    ({"prompt": "x", "routing": {"top_k": 4}}, 422, "routing.top_k"),
    ({"prompt": "x", "routing": {"top_k": 0}}, 422, "routing.top_k"),
    ({"prompt": "x", "routing": {"topk": 1}}, 422, "routing.topk"),
    ({"prompt": "x", "routing": {"global_scaling_weight": "big"}}, 422, "routing.global_scaling_weight"),
    ({"prompt": "x", "routing": {"freeze_after": -1}}, 422, "routing.freeze_after"),
    ({"prompt": "x", "routing": {"freeze_after": 2.5}}, 422, "routing.freeze_after"),
    ({"prompt": "x", "routing": {"freeze_after": "3"}}, 422, "routing.freeze_after"),
    ({"prompt": "x", "messages": [{"role": "user", "content": "y"}]}, 422, None),
    ({}, 422, None),
    ({"messages": []}, 422, "messages"),
    ({"messages": [{"role": "robot", "content": "y"}]}, 422, "messages.0.role"),
    ({"prompt": "x", "stop": ["a", ""]}, 422, "stop"),
    ({"prompt": "x", "stop": ["\u2603"]}, 422, "stop"),  # no token of this tokenizer can spell it
    ({"prompt": "x" * 600}, 422, "prompt"),  # longer than the model's 512-token context
    ({"prompt": "x" * 400, "max_new_tokens": 200}, 422, "max_new_tokens"),  # does not fit the context
]


@pytest.mark.parametrize(("body", "status", "param"), BAD_BODIES, ids=[str(b)[:60] for b, _, _ in BAD_BODIES])
def test_bad_generate_bodies_are_4xx_naming_the_field(client, body, status, param):
    r = client.post("/generate", json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param or error["param"].startswith(param + "."), error
        assert param.split(".")[-1] in error["message"]


RAW_BODIES = [
    (b'{"prompt": "x", "max_new_tokens": ', "malformed JSON"),
    (b'{"prompt": "x", "routing": {"global_scaling_weight": NaN}}', "NaN"),
    (b'{"prompt": "x", "temperature": Infinity}', "infinity"),
    (b'{"prompt": "\xff\xfe bad utf-8"}', "invalid UTF-8"),
    (b"[" * 100_000 + b"]" * 100_000, "deeply nested"),
    (b'["a list"]', "not an object"),
    (b"", "empty body"),
]


@pytest.mark.parametrize(("raw", "what"), RAW_BODIES, ids=[w for _, w in RAW_BODIES])
def test_hostile_raw_bodies_are_4xx(client, raw, what):
    r = client.post("/generate", content=raw, headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500, (what, r.status_code, r.text)
    assert r.json()["error"]["message"]


def test_bad_routing_patches_are_422_and_change_nothing(client, restore_routing):
    before = client.get("/routing").json()
    for body, param in [
        ({"top_k": 4}, "top_k"),
        ({"top_k": 0}, "top_k"),
        ({"top_k": "2"}, "top_k"),
        ({"global_scaling_weight": None}, "global_scaling_weight"),
        ({"global_scaling_weight": "1"}, "global_scaling_weight"),
        ({"top_k": 1, "global_scaling_weight": 1e400}, "global_scaling_weight"),  # JSON 1e400 = inf
        ({"top_k": 1, "weight": 1.0}, "weight"),
    ]:
        raw = json.dumps(body).replace("Infinity", "1e400").encode()
        r = client.patch("/routing", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 422, (body, r.text)
        assert r.json()["error"]["param"] == param, (body, r.json())
    nan = b'{"global_scaling_weight": NaN}'
    r = client.patch("/routing", content=nan, headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["param"] == "global_scaling_weight"
    assert client.get("/routing").json() == before


def test_huge_body_is_413(client):
    r = client.post("/generate", json={"prompt": "x" * 10_000_000})
    assert r.status_code == 413
    assert r.json()["error"]["param"] == "body"
    # Without Content-Length (chunked), the limit still holds.
    r = client.post("/generate", content=iter([b'{"prompt": "', b"x" * 3_000_000, b'"}']),
                    headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_server_still_serves_after_all_that(client, errors_before):
    assert generate(client, prompt="still here", max_new_tokens=3)["usage"]["completion_tokens"] >= 1
    text = client.get("/metrics").text
    assert metric(text, "xlora_requests_total", status="500") == errors_before  # none from this module
