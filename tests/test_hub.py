"""Hugging Face Hub ids for the base, the checkpoint and the experts, read from a Hub cache laid out as
huggingface_hub lays it (tests/hub_cache.py), offline: the tests cannot reach the Hub.

In this process huggingface_hub's cache folder and offline switch are set on its `constants` (which it reads at
each call); server processes get them from their environment (HF_HOME, HF_HUB_OFFLINE), as users set them. The
embedded default served by ids is in tests/test_server_default.py (beside the server it is compared with).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx2
import pytest
import torch
import yaml
from huggingface_hub import constants
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

from server.serving.model_sources import resolve_model_source, resolve_sources
from server.settings import ConfigError, load_settings
from xlora_core import XLoraConfig, XLoraModel
from xlora_core.base_model import base_model_name, load_base_model
from xlora_core.checkpoint import read_checkpoint
from xlora_core.cli.convert import convert
from xlora_core.hub import HubError, HubId, hub_error_reason, parse_hub_id

from .conftest import REPO, server_config, write_config
from .hub_cache import add_repo, offline_env
from .test_server_config import _expect_load_failure
from .test_server_xlora_layout import ORDER, library_checkpoint


@pytest.fixture()
def hf_home(tmp_path, monkeypatch):
    """An empty Hub cache, offline, for this process's huggingface_hub."""
    home = tmp_path / "hf"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return home


# ---- what is a Hub id ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("HuggingFaceH4/zephyr-7b-beta", HubId("HuggingFaceH4/zephyr-7b-beta")),
        ("lamm-mit/x-lora@a1b2c3", HubId("lamm-mit/x-lora", revision="a1b2c3")),
        ("lamm-mit/x-lora/adapter_1", HubId("lamm-mit/x-lora", "adapter_1")),
        ("org/name@refs/pr/1", HubId("org/name", revision="refs/pr/1")),
        ("default", None),  # a bare name is never an id: ours are org/name
        ("/models/zephyr-7b-beta", None),
        ("../experts/json", None),
        ("./experts/json", None),
        ("~/models/x", None),
        ("models/base.gguf", None),
        ("a--b/c", None),  # not a valid repository name
    ],
)
def test_what_a_hub_id_is(value, expected):
    assert parse_hub_id(value) == expected


def test_a_revision_is_given_once():
    assert parse_hub_id("org/name", revision="v1") == HubId("org/name", revision="v1")
    assert parse_hub_id("org/name@v1", revision="v1") == HubId("org/name", revision="v1")
    with pytest.raises(ValueError, match="given twice"):
        parse_hub_id("org/name@v1", revision="v2")
    with pytest.raises(ValueError, match="nothing after '@'"):
        parse_hub_id("org/name@")


# ---- the Python API and xlora-convert --------------------------------------------------------------------------


def test_the_python_api_takes_hub_ids_with_the_same_results_as_local_paths(tmp_path, world, hf_home):
    """load_base_model and XLoraModel.from_pretrained by ids; the checkpoint is in the xlora library's layout (read
    as such from the cache) and exists only at revision v1."""
    folder, ordering = library_checkpoint(tmp_path, world)
    add_repo(hf_home, "tiny/base", world["base"])
    add_repo(hf_home, "tiny/x-lora", folder, revision="v1")
    base, _ = load_base_model("tiny/base", device="cpu", dtype="float32")
    local_base, _ = load_base_model(world["base"], device="cpu", dtype="float32")
    by_id = XLoraModel.from_pretrained(base, "tiny/x-lora", ordering=ordering, revision="v1")
    local = XLoraModel.from_pretrained(local_base, folder, ordering=ordering)
    assert by_id.adapter_names == local.adapter_names == ORDER
    ids = torch.tensor([[5, 17, 29, 41, 53]])
    with torch.no_grad():
        assert torch.equal(by_id(ids).logits, local(ids).logits)
    assert base_model_name("tiny/base@v1") == "base"
    # experts by ids, one as a folder of a repository, in a config built in Python
    add_repo(hf_home, "tiny/experts", world["root"])
    experts = {"json": "tiny/experts/expert-json", "sorting": world["experts"]["sorting"]}
    fresh = [load_base_model(world["base"], device="cpu", dtype="float32")[0] for _ in range(2)]  # unpatched bases
    by_id = XLoraModel(fresh[0], XLoraConfig(hidden_size=32, adapters=experts))
    local = XLoraModel(fresh[1], XLoraConfig(hidden_size=32, adapters={n: world["experts"][n] for n in experts}))
    local.classifier.load_state_dict(by_id.classifier.state_dict())
    with torch.no_grad():
        assert torch.equal(by_id(ids).logits, local(ids).logits)
    with pytest.raises(HubError, match=r"checkpoint: tiny/x-lora: revision 'main' of tiny/x-lora is not in the"):
        XLoraModel.from_pretrained(base, "tiny/x-lora")  # only v1 is cached


def test_xlora_convert_takes_hub_ids(tmp_path, world, hf_home):
    folder, _ = library_checkpoint(tmp_path, world)
    add_repo(hf_home, "tiny/base", world["base"])
    add_repo(hf_home, "tiny/x-lora", folder)
    convert("tiny/x-lora", tmp_path / "ours", base="tiny/base")
    converted, original = read_checkpoint(tmp_path / "ours"), read_checkpoint(folder)
    assert list(converted.config.adapters) == ORDER
    assert all(torch.equal(converted.classifier[k], original.classifier[k]) for k in original.classifier)


# ---- the server's resolver -------------------------------------------------------------------------------------


def test_runtime_loading_takes_hub_ids_only_when_allowed(world, hf_home):
    add_repo(hf_home, "tiny/base", world["base"])
    with pytest.raises(HubError, match=r"models\[0\]\.base: 'tiny/base' is a Hugging Face Hub id.*"
                                       r"server\.allow_hub_downloads: true"):  # fmt: skip
        resolve_model_source("tiny/base", "models[0].base", allow_hub=False)
    assert resolve_model_source(world["base"], "models[0].base", allow_hub=False) == world["base"]
    folder = resolve_model_source("tiny/base", "models[0].base", allow_hub=True, base_model=True)
    assert Path(folder).parent == hf_home / "hub" / "models--tiny--base" / "snapshots"
    assert load_settings(write_config(hf_home.parent, {})).server.allow_hub_downloads is False


def test_the_config_names_the_key_and_the_id_of_a_revision_not_in_the_cache(tmp_path, world, hf_home):
    add_repo(hf_home, "tiny/router", world["checkpoint"])
    config = server_config(world, xlora={"checkpoint": "tiny/router", "revision": "v2"})
    settings = load_settings(write_config(tmp_path, config))
    with pytest.raises(HubError) as caught:
        resolve_sources(settings)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{tmp_path / 'server.yaml'}: xlora.checkpoint: tiny/router@v2: revision 'v2' of "
                              f"tiny/router is not in the Hugging Face cache ({hf_home / 'hub'})")  # fmt: skip
    assert "HF_HUB_OFFLINE is set" in message


def test_a_local_folder_wins_over_a_hub_id_of_the_same_name(tmp_path, world, hf_home):
    shutil.copytree(world["checkpoint"], tmp_path / "tiny" / "router")
    settings = load_settings(write_config(tmp_path, server_config(world, xlora={"checkpoint": "tiny/router"})))
    assert settings.checkpoint_dir() == str(tmp_path / "tiny" / "router")
    assert resolve_sources(settings).checkpoint == str(tmp_path / "tiny" / "router")  # nothing fetched
    settings = load_settings(write_config(tmp_path, server_config(world, xlora={"checkpoint": "tiny/elsewhere"})))
    assert settings.checkpoint_dir() == "tiny/elsewhere"


@pytest.mark.parametrize(
    ("section", "values", "named"),
    [
        ("model", {"base": "default", "revision": "v1"}, "model: Value error, revision applies to a Hugging Face"),
        ("model", {"base": "org/name@"}, "model: Value error, 'org/name@': nothing after '@'"),
        ("model", {"base": "org/name@v1", "revision": "v2"}, "the revision is given twice"),
        ("xlora", {"checkpoint": None, "adapters": {"a": "org/a"}, "revision": "v1"}, "set xlora.checkpoint too"),
        ("xlora", {"adapters": {"a": "org/a@"}}, "'org/a@': nothing after '@'"),
    ],
)
def test_bad_hub_ids_are_config_errors_naming_the_key(tmp_path, world, section, values, named):
    path = write_config(tmp_path, server_config(world, **{section: values}))
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert named in str(caught.value) and str(path) in str(caught.value)


def test_hub_errors_that_need_the_network_are_one_line_naming_what_to_do():
    """The Hub's own answers (a missing or gated repository, a missing revision, a failure) cannot be had offline:
    huggingface_hub's real exception classes, as it raises them, give these lines."""
    hub_id = HubId("org/name", revision="v3")
    request = httpx2.Request("GET", "https://huggingface.co/api/models/org/name")
    response = httpx2.Response(404, request=request)
    cases = [
        (RepositoryNotFoundError("404 Client Error.\n\nRepository Not Found", response=response),
         "not a local path, and no repository of that name on the Hugging Face Hub (if it is private, set HF_TOKEN)"),
        (GatedRepoError("403 Client Error.\n\nCannot access gated repo", response=response),
         "org/name is a gated repository on the Hugging Face Hub: accept its conditions on "
         "https://huggingface.co/org/name and set HF_TOKEN"),
        (RevisionNotFoundError("404 Client Error.\n\nRevision Not Found", response=response),
         "the Hugging Face Hub repository org/name has no revision 'v3'"),
        (HfHubHTTPError("500 Server Error\n\nInternal Error", response=httpx2.Response(500, request=request)),
         "the Hugging Face Hub answered HTTP 500 (500 Server Error)"),
        (HfHubHTTPError("401 Client Error\n\nInvalid credentials", response=httpx2.Response(401, request=request)),
         "the Hugging Face Hub refused the token (HTTP 401): set HF_TOKEN to a valid one"),
    ]  # fmt: skip
    for exc, expected in cases:
        reason = hub_error_reason(exc, hub_id)
        assert reason.startswith(expected), reason
        assert "\n" not in reason


# ---- a server process, and xlora-serve --download-only ----------------------------------------------------------


def test_a_missing_hub_id_stops_startup_with_one_line_naming_key_and_id(tmp_path, world):
    """No network and an empty cache: never ready, exit 1, one line with the file, the key and the id."""
    config = server_config(world, model={"base": "nobody/no-such-model"})
    log = _expect_load_failure(config, tmp_path, env=offline_env(tmp_path / "hf"))
    line = next(line for line in log.splitlines() if line.startswith("xlora-serve: cannot start:"))
    assert line == (f"xlora-serve: cannot start: {tmp_path / 'server.yaml'}: model.base: nobody/no-such-model: not a "
                    f"local path, and not in the Hugging Face cache ({tmp_path / 'hf' / 'hub'}), and HF_HUB_OFFLINE is "
                    "set (fill the cache first: xlora-serve --download-only on a machine online)")  # fmt: skip


def test_download_only_fills_the_cache_and_says_where_each_model_is(tmp_path, world):
    """Offline here, so it finds what is cached; online, the same call downloads (snapshot_download)."""
    hf_home = tmp_path / "hf"
    base = add_repo(hf_home, "tiny/base", world["base"])
    expert = add_repo(hf_home, "tiny/experts", world["experts"]["json"], revision="v1")
    config = server_config(world, model={"base": "tiny/base"},
                           xlora={"adapters": {"json": "tiny/experts@v1", "sorting": world["experts"]["sorting"]}})
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("HF_", "XLORA_"))}, **offline_env(hf_home)}
    result = subprocess.run(
        [sys.executable, "-m", "server", "--config", str(write_config(tmp_path, config)), "--download-only"],
        cwd=REPO, capture_output=True, text=True, timeout=120, env=env,
    )
    assert result.returncode == 0, result.stderr
    printed = yaml.safe_load(result.stdout)
    assert printed == {"model.base": str(base), "xlora.checkpoint": world["checkpoint"],
                       "xlora.adapters.json": str(expert), "xlora.adapters.sorting": world["experts"]["sorting"]}
