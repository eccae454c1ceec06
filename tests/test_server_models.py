"""Many models over one base, over HTTP (docs/models.md), on the shared server, which serves tiny-xlora (the
xlora section), tiny-xlora-2 (a second X-LoRA checkpoint sharing two experts), json (a plain adapter) and
tiny-base (conftest.served_models)."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from server.settings import ConfigError, load_settings

from .conftest import EXPERTS, save_lora_expert, server_config

PROMPT = "sort: 3 1 2"


def generate(c: httpx.Client, **body) -> httpx.Response:
    return c.post("/generate", json={"prompt": PROMPT, "max_new_tokens": 12, "return_scalings": True, **body})


def test_models_lists_every_model_with_kind_experts_and_routing(client):
    r = client.get("/models")
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["default"] == "tiny-xlora"
    by_name = {m["name"]: m for m in data["models"]}
    assert list(by_name) == ["tiny-xlora", "tiny-xlora-2", "json", "tiny-base"]
    assert by_name["tiny-xlora"]["experts"] == EXPERTS and by_name["tiny-xlora"]["routing"]["top_k"] is None
    assert by_name["tiny-xlora-2"] == {"name": "tiny-xlora-2", "kind": "xlora", "experts": ["sorting", "json"],
                                       "routing": by_name["tiny-xlora-2"]["routing"]}  # fmt: skip
    assert by_name["json"]["kind"] == "adapter" and by_name["json"]["experts"] == ["json"]
    assert by_name["tiny-base"]["experts"] == [] and by_name["tiny-base"]["routing"] is None


def test_each_model_answers_in_a_mixed_batch_as_alone(client):
    """The four models and a mixture, sent at once (they share batches), answer as each does alone."""
    requests = [{}, {"model": "tiny-xlora-2"}, {"model": "json"}, {"model": "tiny-base"},
                {"routing": {"weights": {"json": 0.7, "sorting": 0.3}}}]  # fmt: skip
    alone = [generate(client, **body).json() for body in requests]
    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(lambda body: generate(client, **body).json(), requests * 2))
    for i, a in enumerate(alone):
        for t in (together[i], together[i + len(requests)]):
            assert t["text"] == a["text"], (requests[i], t, a)
            for part in ("prompt", "completion"):
                for x, y in zip(t["scalings"][part], a["scalings"][part], strict=True):
                    assert max((abs(p - q) for p, q in zip(x, y, strict=True)), default=0) <= 1e-4
    texts = [a["text"] for a in alone]
    assert len(set(texts)) >= 3, texts  # the models differ (the tiny models' answers are random, not equal)
    assert alone[1]["scalings"]["adapter_names"] == ["sorting", "json"]
    assert alone[1]["routing"]["model"] == "tiny-xlora-2"
    assert alone[2]["scalings"]["adapter_names"] == ["json"] and alone[2]["scalings"]["completion"][0] == [1.0]
    assert alone[3]["scalings"]["adapter_names"] == []
    mixture = alone[4]
    assert mixture["routing"]["weights"] == {"json": 0.7, "sorting": 0.3}
    assert mixture["scalings"]["completion"][0] == pytest.approx([0.0, 0.3, 0.7])  # arithmetic, sorting, json


def test_a_plain_adapter_is_the_mixture_of_its_one_expert(client):
    """model=json equals the xlora model's experts mixed as {json: 1}: the same LoRA, the same numbers."""
    adapter = generate(client, model="json").json()
    mixture = generate(client, routing={"weights": {"json": 1.0}}).json()
    assert adapter["text"] == mixture["text"]
    logged = client.get(f"/scalings/{adapter['id']}").json()  # the log and the metrics say which model
    assert logged["model"] == "json" and logged["adapter_names"] == ["json"]
    assert client.get(f"/scalings/{mixture['id']}").json()["model"] == "tiny-xlora"
    metrics = client.get("/metrics").text
    assert 'xlora_model_generations_total{model="json",outcome="length"}' in metrics


def test_patch_routing_of_another_xlora_model(client):
    r = client.patch("/routing", json={"model": "tiny-xlora-2", "top_k": 1})
    assert r.status_code == 200, r.text
    try:
        assert r.json()["top_k"] == 1 and r.json()["model"] == "tiny-xlora-2"
        assert client.get("/routing", params={"model": "tiny-xlora-2"}).json()["top_k"] == 1
        assert client.get("/routing").json()["top_k"] is None  # the xlora section's model keeps its own
        assert generate(client, model="tiny-xlora-2").json()["routing"]["top_k"] == 1
        assert generate(client).json()["routing"]["top_k"] is None
        for body, status, param in (({"model": "json", "top_k": 1}, 422, "model"), ({"model": "nope"}, 404, "model"),
                                    ({"model": "tiny-xlora-2", "top_k": 3}, 422, "top_k")):  # fmt: skip
            r = client.patch("/routing", json=body)
            assert r.status_code == status and r.json()["error"]["param"] == param, r.text
    finally:
        assert client.patch("/routing", json={"model": "tiny-xlora-2", "top_k": None}).status_code == 200


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": "nope"}, 404, "model"),
        ({"routing": {"weights": {"nope": 1.0}}}, 422, "routing.weights.nope"),
        ({"routing": {"weights": {"json": 1e9}}}, 422, "routing.weights.json"),
        ({"routing": {"weights": {}}}, 422, "routing.weights"),
        ({"routing": {"weights": {"json": 1.0}, "top_k": 1}}, 422, "routing.top_k"),
        ({"model": "json", "routing": {"top_k": 1}}, 422, "routing.top_k"),
        ({"model": "tiny-base", "routing": {"weights": {"json": 1.0}}}, 422, "routing.weights.json"),
    ],
)
def test_refusals_name_the_field(client, body, status, param):
    r = generate(client, **body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param, error
    if status == 404:
        assert error["code"] == "model_not_found" and "tiny-xlora-2" in error["message"]


def test_openai_client_chooses_the_model(server):
    oai = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    out = oai.completions.create(model="json", prompt=PROMPT, max_tokens=12, temperature=0)
    assert out.model == "json"
    assert out.choices[0].text == generate(httpx.Client(base_url=server.url, timeout=60), model="json").json()["text"]
    chat = oai.chat.completions.create(model="tiny-xlora-2", messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=4, temperature=0, extra_body={"xlora_return_scalings": True})
    assert chat.model == "tiny-xlora-2"
    assert chat.model_extra["xlora"]["scalings"]["adapter_names"] == ["sorting", "json"]
    mixed = oai.completions.create(model="tiny-xlora", prompt=PROMPT, max_tokens=4, temperature=0,
                                   extra_body={"xlora_routing": {"weights": {"json": 0.5}}})
    assert mixed.model_extra["xlora"]["routing"]["weights"] == {"json": 0.5}
    with pytest.raises(openai.NotFoundError) as e:
        oai.completions.create(model="nope", prompt=PROMPT, max_tokens=2)
    assert e.value.code == "model_not_found" and e.value.param == "model"
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model="tiny-xlora", prompt=PROMPT, max_tokens=2,
                               extra_body={"xlora_routing": {"weights": {"nope": 1}}})
    assert e.value.param == "xlora_routing.weights.nope"


def test_a_models_entry_needs_exactly_one_source_and_a_name(tmp_path, world):
    for entry, message in (
        ({"name": "x"}, "models.0: Value error, give exactly one of checkpoint, adapter or base: true"),
        ({"adapter": world["experts"]["json"]}, "models.0: Value error, name is required"),
        ({"name": "x", "adapter": "a", "base": True}, "give exactly one of"),
    ):
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump({**server_config(world), "models": [entry]}))
        with pytest.raises(ConfigError, match=message) as e:
            load_settings(path)
        assert str(path) in str(e.value)


def test_a_models_entry_that_does_not_fit_stops_the_server_naming_it(start_server, world, tmp_path):
    bad = tmp_path / "not-an-adapter"
    bad.mkdir()
    proc = start_server({**server_config(world), "models": [{"name": "broken", "adapter": str(bad)}]}, ready=False)
    assert proc.wait_exit(120) != 0
    assert "models[0] (broken)" in proc.log() and "adapter_config.json" in proc.log()


# -----------------------------------------------------------------------------
# loading and unloading at run time (POST and DELETE /models)


def fresh_adapter(world: dict, name: str, seed: int) -> str:
    """A new PEFT adapter folder under the shared server's model_root (the world's folder)."""
    save_lora_expert(Path(world["base"]), world["root"] / name, seed=seed, target_modules=["up_proj"])
    return name


def test_a_model_loaded_at_run_time_serves_among_the_others_then_unloads(client, world):
    folder = fresh_adapter(world, "runtime-up", seed=40)
    # Requests in flight while it joins (a frozen-from-the-start adapter row among them) go on to the end.
    body = {"prompt": "x", "model": "json", "max_tokens": 60, "logit_bias": {"40": 100}, "temperature": 0,
            "stream": True}  # fmt: skip
    with ThreadPoolExecutor(3) as pool, client.stream("POST", "/v1/completions", json=body) as running:
        lines = running.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
        others = [pool.submit(generate, client, model=m) for m in ("tiny-xlora", "tiny-xlora-2", "tiny-xlora")]
        r = client.post("/models", json={"name": "up", "adapter": folder})
        assert r.status_code == 200, r.text
        rest = list(lines)
        assert "data: [DONE]" in rest and not any('"error"' in line for line in rest), rest[-3:]
        assert all(f.result().status_code == 200 for f in others)
    assert r.json() == {"name": "up", "kind": "adapter", "experts": ["up"], "routing": None}
    assert "up" in [m["name"] for m in client.get("/models").json()["models"]]
    up = generate(client, model="up").json()
    assert up["text"] != generate(client, model="tiny-base").json()["text"]
    assert up["text"] == generate(client, model="up").json()["text"]
    saved = json.loads((world["root"] / "state.json").read_text())
    assert saved["models"] == [{"name": "up", "kind": "adapter", "folder": str(world["root"] / folder)}]

    r = client.post("/models", json={"name": "up", "adapter": folder})
    assert r.status_code == 409 and r.json()["error"]["param"] == "name"
    r = client.post("/models", json={"name": "one-too-many", "adapter": fresh_adapter(world, "runtime-5th", 41)})
    assert r.status_code == 409 and "server.max_loaded_experts" in r.json()["error"]["message"], r.text

    with client.stream("POST", "/v1/completions", json=body) as running:  # unloaded while another row runs
        lines = running.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
        assert client.delete("/models/up").status_code == 200
        rest = list(lines)
        assert "data: [DONE]" in rest and not any('"error"' in line for line in rest), rest[-3:]
    assert generate(client, model="up").status_code == 404
    assert "models" not in json.loads((world["root"] / "state.json").read_text())
    frozen = [line for line in client.get("/metrics").text.splitlines() if line.startswith("xlora_gc_frozen_objects ")]
    assert float(frozen[0].split()[1]) > 100_000  # the heap frozen again after the unload's full collection
    r = client.delete("/models/tiny-xlora")
    assert r.status_code == 409 and r.json()["error"]["code"] == "model_required"
    assert client.delete("/models/nope").status_code == 404
    # the freed expert's room serves the next one
    assert client.post("/models", json={"name": "fifth", "adapter": "runtime-5th"}).status_code == 200
    assert client.delete("/models/fifth").status_code == 200


def test_unloading_a_model_in_use_is_refused(client, world):
    folder = fresh_adapter(world, "runtime-busy", seed=42)
    assert client.post("/models", json={"name": "busy", "adapter": folder}).status_code == 200
    body = {"prompt": "x", "model": "busy", "max_tokens": 200, "logit_bias": {"40": 100}, "temperature": 0,
            "stream": True}  # logit_bias keeps it from stopping early
    with client.stream("POST", "/v1/completions", json=body) as running:
        lines = running.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))  # its first token: it runs
        r = client.delete("/models/busy")
        assert r.status_code == 409 and r.json()["error"]["code"] == "model_in_use", r.text
        assert "data: [DONE]" in list(lines)  # and it finishes
    assert client.delete("/models/busy").status_code == 200


def test_loading_refusals_name_what(client, world, tmp_path):
    root = world["root"]
    outside = tmp_path / "outside"
    shutil.copytree(world["experts"]["json"], outside)
    (root / "escape").unlink(missing_ok=True)
    (root / "escape").symlink_to(outside)
    pickled = root / "pickled"
    shutil.copytree(world["experts"]["json"], pickled, dirs_exist_ok=True)
    (pickled / "adapter_model.bin").write_bytes(b"not read")
    misfit = root / "misfit"
    shutil.copytree(world["experts"]["json"], misfit, dirs_exist_ok=True)
    tensors = load_file(misfit / "adapter_model.safetensors")
    key = next(k for k in tensors if "lora_A" in k)
    tensors[key] = torch.zeros(tensors[key].shape[0], 7)
    save_file(tensors, misfit / "adapter_model.safetensors")
    cases = [
        ({"adapter": str(outside)}, "adapter", "not a folder under server.model_root"),
        ({"adapter": "../"}, "adapter", "not a folder under server.model_root"),
        ({"adapter": "escape"}, "adapter", "not a folder under server.model_root"),
        ({"adapter": "pickled"}, "adapter", "adapter_model.bin: only safetensors"),
        ({"adapter": "misfit"}, "adapter", "in the base model but the expert has A"),
        ({"checkpoint": "expert-json"}, "checkpoint", "peft_type"),
        ({"adapter": "no-such-folder"}, "adapter", "not a folder under server.model_root"),
    ]
    for source, param, message in cases:
        r = client.post("/models", json={"name": "refused", **source})
        assert r.status_code == 422, (source, r.text)
        error = r.json()["error"]
        assert error["param"] == param and message in error["message"], (source, error)
    r = client.post("/models", json={"name": "refused", "adapter": "a", "checkpoint": "b"})
    assert r.status_code == 422
    assert "refused" not in [m["name"] for m in client.get("/models").json()["models"]]


def test_models_loaded_at_run_time_survive_a_restart(start_server, world, tmp_path):
    state = tmp_path / "state.json"
    folder = world["root"] / "runtime-kept"
    if not folder.exists():
        fresh_adapter(world, "runtime-kept", seed=43)
    state.write_text(json.dumps({"version": 0, "routing": {"top_k": None, "global_scaling_weight": 1.0,
                                                            "freeze_after": None},
                                 "models": [{"name": "kept", "kind": "adapter", "folder": str(folder)}]}))  # fmt: skip
    proc = start_server(server_config(world, server={"state_file": str(state)}))
    models = httpx.get(proc.url + "/models", timeout=30).json()["models"]
    assert [m["name"] for m in models] == ["tiny-xlora", "kept"]
    proc.stop()
