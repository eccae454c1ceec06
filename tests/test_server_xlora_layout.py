"""xlora-serve serves a checkpoint in the original xlora library's layout as it is, with its ordering file."""

from __future__ import annotations

import json

import httpx
import pytest

from server.settings import ConfigError, load_settings
from xlora_core import XLoraConfig, XLoraModel

from .conftest import server_config
from .test_server_config import _expect_load_failure
from .tiny_world import load_base
from .xlora_library import CURRENT, LibraryClassifier, create_ordering, library_config, save_library_checkpoint

ORDER = ["sorting", "json", "arithmetic"]  # the order given in training; neither alphabetical nor the world's
TARGETS = ["q_proj", "v_proj", "k_proj", "o_proj", "gate_proj", "down_proj"]  # the world's experts, together


def library_checkpoint(tmp_path, world) -> tuple[str, str]:
    base, experts = world["base"], {name: world["experts"][name] for name in ORDER}
    n_layers = XLoraModel(load_base(base), XLoraConfig(hidden_size=32, adapters=experts)).n_lora_layers
    classifier = LibraryClassifier(32, len(ORDER), n_layers, depth=2, size=16, layerwise=True, use_bias=True,
                                   relu_and_dropout=True)  # fmt: skip
    folder = tmp_path / "x-lora"
    config = library_config(CURRENT, hidden_size=32, adapters=experts, save_directory=folder, xlora_depth=2,
                            xlora_size=16, layerwise_scalings=True, base_model_id="tiny/llama")  # fmt: skip
    save_library_checkpoint(folder, base, experts, classifier, config)
    ordering = tmp_path / "x-lora-ordering.json"
    ordering.write_text(json.dumps(create_ordering(base, TARGETS, ORDER, "tiny/llama")))
    return str(folder), str(ordering)


def test_a_library_checkpoint_serves_as_it_is(tmp_path, world, start_server):
    folder, ordering = library_checkpoint(tmp_path, world)
    server = start_server(server_config(world, xlora={"checkpoint": folder, "ordering": ordering}))
    body = {"prompt": "12+30=", "max_new_tokens": 4, "temperature": 0, "return_scalings": True}
    response = httpx.post(server.url + "/generate", json=body, timeout=60)
    assert response.status_code == 200, response.text
    scalings = response.json()["scalings"]
    assert scalings["adapter_names"] == ORDER
    assert scalings["completion"] and all(len(row) == len(ORDER) for row in scalings["completion"])
    assert abs(sum(scalings["completion"][0]) - 1) < 1e-3  # the classifier's softmax over the three experts


def test_an_ordering_file_that_is_not_there_is_named_with_its_key(tmp_path, world):
    folder, _ = library_checkpoint(tmp_path, world)
    config = server_config(world, xlora={"checkpoint": folder, "ordering": str(tmp_path / "missing.json")})
    _expect_load_failure(config, tmp_path, "xlora.ordering", "missing.json", "server.yaml")


def test_the_new_keys_are_checked_with_the_rest_of_the_file(tmp_path):
    path = tmp_path / "server.yaml"
    path.write_text("xlora:\n  adapters: {a: a}\n  ordering: ordering.json\n")
    with pytest.raises(ConfigError, match=r"server\.yaml: xlora: .*ordering describes a checkpoint.*xlora\.checkpoint"):
        load_settings(path)
    path.write_text("xlora:\n  checkpoint: x-lora\n  allow_pickle: perhaps\n")
    with pytest.raises(ConfigError, match=r"server\.yaml: xlora\.allow_pickle"):
        load_settings(path)
    path.write_text("xlora:\n  checkpoint: x-lora\n  ordering: o.json\n  enable_relu_and_dropout: false\n")
    settings = load_settings(path)
    assert settings.ordering_path() == str(tmp_path / "o.json")
    assert settings.xlora.config_overrides() == {"enable_relu_and_dropout": False}
