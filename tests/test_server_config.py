"""Start-up: bad configs and bad experts stop the server with a message naming the culprit; auth tokens."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import httpx
import openai
import pytest
from transformers import LlamaConfig, LlamaForCausalLM

from .conftest import ADMIN_TOKEN as ADMIN
from .conftest import (
    API_KEY,
    REPO,
    ServerProcess,
    bearer,
    save_lora_expert,
    server_config,
    write_config,
)
from .tiny_world import save_char_tokenizer


def run_server(config_path, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `python -m server` to its end (it is expected to refuse to start)."""
    return subprocess.run(
        [sys.executable, "-m", "server", "--config", str(config_path), "--port", "0"],
        cwd=REPO, capture_output=True, text=True, timeout=timeout,
    )


@pytest.mark.parametrize(
    ("section", "values", "named"),
    [
        ("server", {"max_batch_siz": 4}, "server.max_batch_siz: unknown key"),
        ("server", {"max_batch_size": 0}, "server.max_batch_size"),
        ("server", {"port": "eighty"}, "server.port"),
        ("model", {"dtype": "float8"}, "model.dtype"),
        ("model", {"device": "gpu"}, "model.device"),
        ("model", {"compile": "fast"}, "model.compile"),
        ("routing", {"top_k": 0}, "routing.top_k"),
        ("routing", {"global_scaling_weight": float("nan")}, "routing.global_scaling_weight"),
        ("xlora", {"softmax_temprature": 2.0}, "softmax_temprature"),
        ("logging", {"format": "xml"}, "logging.format"),
        ("server", {"api_key": "secret"}, "XLORA_API_KEY"),
        ("tokenizer", {"x": 1}, "tokenizer: unknown key"),
    ],
)
def test_bad_config_stops_startup_naming_key_and_file(tmp_path, world, section, values, named):
    path = write_config(tmp_path, server_config(world, **{section: values}))
    result = run_server(path, timeout=60)
    assert result.returncode == 2, result.stderr
    assert named in result.stderr and str(path) in result.stderr, result.stderr


def test_missing_config_file(tmp_path):
    result = run_server(tmp_path / "nope.yaml", timeout=60)
    assert result.returncode == 2 and "nope.yaml" in result.stderr


def _expect_load_failure(config: dict, tmp_path, *needles: str, env: dict[str, str] | None = None) -> str:
    proc = ServerProcess(write_config(tmp_path, config), env)
    ready_seen = False
    while proc.proc.poll() is None:  # it may answer /health while loading, but never /ready 200
        try:
            ready_seen |= httpx.get(proc.url + "/ready", timeout=1).status_code == 200
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    code = proc.wait_exit(60)
    log = proc.log()
    assert code == 1, log
    assert not ready_seen, "a model that failed to load was reported ready"
    for needle in needles:
        assert needle in log, log
    return log


def test_missing_expert_is_named(tmp_path, world):
    adapters = {**world["experts"], "sorting": str(tmp_path / "no-such-expert")}
    config = server_config(world, xlora={"adapters": adapters})
    _expect_load_failure(config, tmp_path, "cannot start", "expert 'sorting'", "no-such-expert")


def test_corrupt_safetensors_is_named(tmp_path, world):
    broken = tmp_path / "json-broken"
    shutil.copytree(world["experts"]["json"], broken)
    weights = broken / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated
    adapters = {**world["experts"], "json": str(broken)}
    _expect_load_failure(server_config(world, xlora={"adapters": adapters}), tmp_path, "expert 'json'", str(weights))


def test_incompatible_expert_is_named(tmp_path, world):
    wide_base = tmp_path / "wide-base"
    LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(wide_base)
    save_char_tokenizer(wide_base)
    wide = save_lora_expert(wide_base, tmp_path / "wide-expert", seed=3, target_modules=["q_proj", "v_proj"])
    adapters = {**world["experts"], "arithmetic": str(wide)}
    _expect_load_failure(server_config(world, xlora={"adapters": adapters}), tmp_path, "expert 'arithmetic'")


def test_routing_top_k_above_the_number_of_experts(tmp_path, world):
    config = server_config(world, routing={"top_k": 4})
    _expect_load_failure(config, tmp_path, "routing", "top_k", "1..3", "server.yaml")


# -----------------------------------------------------------------------------
# auth: tokens from the environment only


@pytest.fixture()
def auth_server(secured_server):
    return secured_server


def test_generation_needs_the_api_key(auth_server):
    body = {"prompt": "x", "max_new_tokens": 2}
    with httpx.Client(base_url=auth_server.url, timeout=60) as c:
        for headers in [{}, bearer("wrong"), {"Authorization": API_KEY}, {"Authorization": f"Basic {API_KEY}"}]:
            r = c.post("/generate", json=body, headers=headers)
            assert r.status_code == 401, headers
            assert r.json()["error"]["type"] == "authentication_error"
            assert r.headers["WWW-Authenticate"] == "Bearer"
        assert c.post("/generate", json=body, headers=bearer(API_KEY)).status_code == 200
        assert c.post("/generate", json=body, headers=bearer(ADMIN)).status_code == 200  # admin includes client
        # Probes stay open; reading routing and scalings needs the key (tests/test_access.py covers every route).
        for path in ["/health", "/ready", "/metrics"]:
            assert c.get(path).status_code == 200, path
        for path in ["/routing", "/scalings"]:
            assert c.get(path).status_code == 401, path
            assert c.get(path, headers=bearer(API_KEY)).status_code == 200, path


def test_admin_routes_need_the_admin_token(auth_server):
    with httpx.Client(base_url=auth_server.url, timeout=60) as c:
        for headers in [{}, bearer(API_KEY)]:
            assert c.patch("/routing", json={"top_k": 1}, headers=headers).status_code == 401
            assert c.delete("/scalings", headers=headers).status_code == 401
        assert c.get("/routing", headers=bearer(API_KEY)).json()["top_k"] is None  # refused PATCHes changed nothing
        assert c.patch("/routing", json={"top_k": 1}, headers=bearer(ADMIN)).json()["top_k"] == 1
        assert c.patch("/routing", json={"top_k": None}, headers=bearer(ADMIN)).status_code == 200
        assert c.delete("/scalings", headers=bearer(ADMIN)).status_code == 200


def test_openai_client_with_wrong_and_right_key(auth_server):
    wrong = openai.OpenAI(base_url=auth_server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        wrong.completions.create(model="tiny-xlora", prompt="x", max_tokens=2)
    assert info.value.body["type"] == "authentication_error"
    right = openai.OpenAI(base_url=auth_server.url + "/v1", api_key=API_KEY, max_retries=0)
    out = right.completions.create(model="tiny-xlora", prompt="x", max_tokens=2, temperature=0)
    assert out.usage.completion_tokens >= 1


def test_json_logs_are_one_object_per_line_without_secrets(auth_server):
    entries = [json.loads(line) for line in auth_server.log().splitlines() if line.startswith("{")]
    assert any(e["logger"] == "xlora.manager" and "model ready" in e["message"] for e in entries)
    assert all({"time", "level", "logger", "message"} <= set(e) for e in entries)
    assert API_KEY not in auth_server.log() and ADMIN not in auth_server.log()
