"""Two replicas of the tiny model on a real local Ray cluster, behind Ray Serve's HTTP proxy (issue 21).

One cluster for the whole module (about 30 s to start): `start_local_cluster`, the function `xlora-serve
--replicas` uses, so every Ray address is on 127.0.0.1 (checked below); the module ends with serve.shutdown()
and ray.shutdown(), and checks that no Ray process it started is left.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import psutil
import pytest
import ray
from ray import serve

from server.ray_app import DEPLOYMENT, start_local_cluster, xlora_application
from server.settings import load_settings

from .conftest import free_port, server_config, write_config

LOG_SIZE = 6  # small, so a handful of requests shows the shared log stays bounded
REPLICA, VERSION = "x-xlora-replica", "x-xlora-routing-version"


def _ray_processes(before: set[int]) -> list[psutil.Process]:
    """Processes started under this one since `before` (the Ray ones: GCS, raylet, workers, agents)."""
    return [p for p in psutil.Process().children(recursive=True) if p.pid not in before]


@pytest.fixture(scope="module")
def ray_url(world, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ray")
    # compile false: replicas do not get the suite's XLORA_COMPILE=false (conftest's servers), and with `auto`
    # each would build a compiled step beside the tests, into the user's cache.
    config = server_config(world, model={"compile": False},
                           server={"scalings_log_size": LOG_SIZE, "max_batch_size": 4})  # fmt: skip
    settings = load_settings(write_config(folder, config))
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    start_local_cluster(num_cpus=2)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = xlora_application(settings, num_replicas=2, ray_actor_options={"num_cpus": 0.5})
        serve.run(app, name="xlora", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        _wait_for_replicas(url, 2)
        yield url, before
    finally:
        serve.shutdown()
        ray.shutdown()
    deadline = time.monotonic() + 30
    while (left := [p for p in _ray_processes(before) if p.is_running() and p.status() != "zombie"]) and \
            time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"Ray processes outlived the tests: {[(p.pid, p.name()) for p in left]}"


def _wait_for_replicas(url: str, count: int, timeout: float = 120) -> set[str]:
    """Until requests have been answered by `count` different replicas; returns their names."""
    seen: set[str] = set()
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=url, timeout=30) as c:
        while len(seen) < count:
            assert time.monotonic() < deadline, f"only replicas {seen} answered"
            with ThreadPoolExecutor(4) as pool:
                for r in pool.map(lambda _: c.get("/routing"), range(8)):
                    if r.status_code == 200:
                        seen.add(r.headers[REPLICA])
    return seen


def _generate_on_every_replica(url: str, body: dict, replicas: int = 2, timeout: float = 60) -> dict[str, list]:
    """POST /generate concurrently until `replicas` replicas have answered; replica -> [responses]."""
    answers: dict[str, list] = {}
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=url, timeout=60) as c:
        while len(answers) < replicas:
            assert time.monotonic() < deadline, f"only {set(answers)} answered"
            with ThreadPoolExecutor(4) as pool:
                for r in pool.map(lambda _: c.post("/generate", json=body), range(4)):
                    assert r.status_code == 200, r.text
                    answers.setdefault(r.headers[REPLICA], []).append(r)
    return answers


@pytest.fixture()
def client(ray_url):
    with httpx.Client(base_url=ray_url[0], timeout=60) as c:
        yield c


@pytest.fixture()
def restore_routing(client):
    before = {k: v for k, v in client.get("/routing").json().items() if k != "version"}
    yield
    client.patch("/routing", json=before).raise_for_status()


# -----------------------------------------------------------------------------


def test_every_ray_address_is_on_loopback(ray_url):
    """Every socket a Ray process listens on is bound to 127.0.0.1 (no wildcard, no interface address)."""
    _, before = ray_url
    listening = []
    for proc in _ray_processes(before):
        try:
            conns = proc.net_connections(kind="inet")
        except psutil.NoSuchProcess:
            continue
        listening += [(proc.name(), c.laddr) for c in conns if c.status == psutil.CONN_LISTEN]
    assert len(listening) > 5, listening  # GCS, raylet, workers, agents, the HTTP proxy: they were all seen
    outside = [(name, addr) for name, addr in listening if addr.ip not in ("127.0.0.1", "::ffff:127.0.0.1", "::1")]
    assert not outside, f"Ray listens beyond loopback: {outside}"


def test_requests_spread_over_both_replicas(client):
    answers = _generate_on_every_replica(str(client.base_url), {"prompt": "add 2 and 3", "max_new_tokens": 8})
    assert len(answers) == 2
    texts = {r.json()["text"] for rs in answers.values() for r in rs}
    assert len(texts) == 1  # the same model, greedy: the same answer from either replica
    version = client.get("/routing").json()["version"]
    for rs in answers.values():
        assert all(r.headers[VERSION] == str(version) for r in rs)


def test_patch_through_one_replica_is_in_force_on_both(client, restore_routing):
    before = client.get("/routing").json()
    r = client.patch("/routing", json={"top_k": 1, "global_scaling_weight": 0.5})
    assert r.status_code == 200, r.text
    patched = {"top_k": 1, "global_scaling_weight": 0.5, "freeze_after": None}
    assert r.json() == {**patched, "version": before["version"] + 1}
    patched_by = r.headers[REPLICA]
    # The next requests, on both replicas (so also on the one that did not take the PATCH), run with it.
    answers = _generate_on_every_replica(str(client.base_url), {"prompt": "route me", "max_new_tokens": 6})
    assert patched_by in answers and len(answers) == 2
    for rs in answers.values():
        for r in rs:
            assert r.json()["routing"] == {"top_k": 1, "global_scaling_weight": 0.5, "freeze_after": None}
            assert r.headers[VERSION] == str(before["version"] + 1)
    # and GET /routing says so on both
    with ThreadPoolExecutor(4) as pool:
        states = {r.headers[REPLICA]: r.json() for r in pool.map(lambda _: client.get("/routing"), range(12))}
    assert all(s["version"] == before["version"] + 1 and s["top_k"] == 1 for s in states.values()), states


def test_concurrent_patches_through_two_replicas_keep_both_fields(client, restore_routing):
    """Compare-and-set: two PATCHes of different fields at once both land, each as its own version."""
    version = client.get("/routing").json()["version"]
    start = threading.Barrier(2)

    def patch(body: dict) -> httpx.Response:
        with httpx.Client(base_url=client.base_url, timeout=60) as c:
            start.wait()
            return c.patch("/routing", json=body)

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(patch, [{"top_k": 2}, {"global_scaling_weight": 0.25}]))
    assert sorted(r.json()["version"] for r in results) == [version + 1, version + 2]
    both = {"top_k": 2, "global_scaling_weight": 0.25, "freeze_after": None}
    assert client.get("/routing").json() == {**both, "version": version + 2}


def test_scalings_log_is_the_deployments(client):
    client.delete("/scalings").raise_for_status()
    answers = _generate_on_every_replica(str(client.base_url), {"prompt": "sort 3 1 2", "max_new_tokens": 4})
    served = {r.json()["id"]: replica for replica, rs in answers.items() for r in rs}
    log = client.get("/scalings").json()
    assert log["capacity"] == LOG_SIZE and len(log["entries"]) == min(LOG_SIZE, len(served))
    assert {e["replica"] for e in log["entries"]} <= set(answers)
    for entry in log["entries"]:
        assert served[entry["id"]] == entry["replica"]  # each entry names the replica that served it
    # every logged request is found by id, whichever replica receives the lookup
    for entry in log["entries"]:
        for _ in range(3):
            r = client.get(f"/scalings/{entry['id']}")
            assert r.status_code == 200 and r.json()["replica"] == entry["replica"], r.text
    # a request's scalings are there right after its answer, even when asked through the other replica
    with httpx.Client(base_url=client.base_url, timeout=60) as other:
        for _ in range(6):
            out = client.post("/generate", json={"prompt": "x", "max_new_tokens": 2})
            found = other.get(f"/scalings/{out.json()['id']}")
            assert found.status_code == 200, (out.headers[REPLICA], found.headers[REPLICA], found.text)
            assert found.json()["replica"] == out.headers[REPLICA]
    latest = client.get("/scalings/latest").json()
    assert latest["id"] == out.json()["id"]
    buckets = client.get("/scalings", params={"bucketed": True}).json()["buckets"]
    assert sum(len(b["ids"]) for b in buckets) == LOG_SIZE  # bounded: the oldest went
    assert client.delete("/scalings").json() == {"cleared": LOG_SIZE}
    assert client.get("/scalings").json()["entries"] == []
    assert client.get("/scalings/latest").status_code == 404


def test_stream_through_ray_carries_the_headers(client):
    with client.stream("POST", "/generate", json={"prompt": "stream me", "max_new_tokens": 12, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        assert r.headers[REPLICA] and r.headers[VERSION].isdigit()
        events = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:")]
    plain = client.post("/generate", json={"prompt": "stream me", "max_new_tokens": 12}).json()
    assert "".join(e["text"] for e in events if "token_id" in e) == plain["text"]
    assert events[-1]["usage"] == plain["usage"]


def test_openai_client_through_ray(ray_url):
    oa = openai.OpenAI(base_url=ray_url[0] + "/v1", api_key="unused", max_retries=0)
    raw = oa.chat.completions.with_raw_response.create(
        model="tiny-xlora", messages=[{"role": "user", "content": "sort 3 1 2"}], max_tokens=6
    )
    assert raw.headers[REPLICA] and raw.headers[VERSION].isdigit()
    chat = raw.parse()
    assert chat.choices[0].message.content is not None and chat.usage.completion_tokens >= 1
    stream = oa.completions.create(model="tiny-xlora", prompt="add 2 and 3", max_tokens=6, temperature=0, stream=True)
    text = "".join(chunk.choices[0].text for chunk in stream if chunk.choices)
    plain = oa.completions.create(model="tiny-xlora", prompt="add 2 and 3", max_tokens=6, temperature=0)
    assert text == plain.choices[0].text


def test_metrics_carry_the_replica(client):
    r = client.get("/metrics")
    assert r.status_code == 200
    replica = r.headers[REPLICA]
    lines = [line for line in r.text.splitlines() if line.startswith("xlora_model_loaded")]
    assert lines == [f'xlora_model_loaded{{replica="{replica}"}} 1.0'], lines


def test_ray_exports_every_replicas_metrics(ray_url):
    """Ray's metrics agent (the node's metrics export port, what Prometheus scrapes) has both replicas' samples."""
    replicas = _wait_for_replicas(ray_url[0], 2)
    (node,) = ray.nodes()
    url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    deadline = time.monotonic() + 90  # Ray's agent reports every few seconds
    while True:
        text = httpx.get(url, timeout=10).text
        loaded = {line.split('replica="')[1].split('"')[0] for line in text.splitlines()
                  if line.startswith("ray_xlora_model_loaded{") and line.endswith(" 1.0")}
        if replicas <= loaded:
            break
        assert time.monotonic() < deadline, f"replicas {replicas}, exported: {loaded}"
        time.sleep(2)
    assert "ray_xlora_generated_tokens_total{" in text


def test_a_killed_replica_is_replaced_with_the_current_routing(ray_url, client, restore_routing):
    """ray.kill one replica while streams run on both: the streams on the other finish, requests that start
    after the kill all succeed (none gets a 503 while the replacement loads), and the replacement serves the
    routing patched before it existed."""
    url = ray_url[0]
    patched = client.patch("/routing", json={"top_k": 2, "global_scaling_weight": 0.75}).json()
    original = _wait_for_replicas(url, 2)
    victim = sorted(original)[0]
    actors = [a for a in ray.util.list_named_actors(all_namespaces=True) if DEPLOYMENT in a["name"]
              and a["name"].endswith(victim)]
    assert len(actors) == 1, ray.util.list_named_actors(all_namespaces=True)
    handle = ray.get_actor(actors[0]["name"], namespace=actors[0]["namespace"])

    killed_at: list[float] = []
    results: list[dict] = []  # one per request: started, replica (None if no response started), ok, error
    stop = threading.Event()

    def stream_loop() -> None:
        with httpx.Client(base_url=url, timeout=60) as c:
            while not stop.is_set():
                started, replica = time.monotonic(), None
                try:
                    body = {"prompt": "long one", "max_new_tokens": 120, "stream": True}
                    with c.stream("POST", "/generate", json=body) as r:
                        replica = r.headers.get(REPLICA)
                        assert r.status_code == 200, r.read()
                        events = [line for line in r.iter_lines() if line.startswith("event:")]
                        assert events[-1] == "event: done", events[-3:]
                    results.append({"started": started, "replica": replica, "ok": True})
                except Exception as exc:  # noqa: BLE001 - recorded and judged below
                    results.append({"started": started, "replica": replica, "ok": False, "error": repr(exc)})

    threads = [threading.Thread(target=stream_loop) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(2.0)  # streams running on both replicas
    killed_at.append(time.monotonic())
    ray.kill(handle, no_restart=True)
    time.sleep(1.0)
    stop.set()
    for t in threads:
        t.join(120)

    # Requests that started after the kill, and requests already answering from the survivor, all succeeded.
    for res in results:
        if not res["ok"]:
            assert res["started"] < killed_at[0], res
            assert res["replica"] in (None, victim), res
    assert any(r["ok"] and r["started"] > killed_at[0] for r in results), results

    # Ray starts a replacement; it comes back with the routing patched before it was born.
    deadline = time.monotonic() + 120
    replacement = None
    with httpx.Client(base_url=url, timeout=60) as c:
        while replacement is None:
            assert time.monotonic() < deadline, "no replacement replica answered"
            with ThreadPoolExecutor(4) as pool:
                for r in pool.map(lambda _: c.post("/generate", json={"prompt": "x", "max_new_tokens": 2}), range(4)):
                    assert r.status_code == 200, r.text  # never a 503 while the replacement loads
                    if r.headers[REPLICA] not in original:
                        replacement = r
    assert replacement.json()["routing"] == {"top_k": 2, "global_scaling_weight": 0.75, "freeze_after": None}
    assert replacement.headers[VERSION] == str(patched["version"])
