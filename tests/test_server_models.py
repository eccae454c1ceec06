"""Many models over one base, over HTTP (docs/models.md), on the shared server, which serves tiny-xlora (the
xlora section), tiny-xlora-2 (a second X-LoRA checkpoint sharing two experts), json (a plain adapter) and
tiny-base (conftest.served_models)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import yaml

from server.settings import ConfigError, load_settings

from .conftest import EXPERTS, server_config

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
