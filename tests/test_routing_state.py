"""The routing state of the single-process server: versions, compare-and-set, and server.state_file."""

from __future__ import annotations

import json

import httpx
import pytest

from server.serving.routing_state import StateFileError, StoredRouting

from .conftest import ServerProcess, server_config, write_config


def test_compare_and_set_writes_the_state_file_atomically(tmp_path):
    path = tmp_path / "state" / "routing.json"
    stored = StoredRouting({"top_k": None, "global_scaling_weight": 1.0}, str(path))
    assert stored.get() == ({"top_k": None, "global_scaling_weight": 1.0}, 0) and not path.exists()
    assert stored.compare_and_set(0, {"top_k": 2, "global_scaling_weight": 0.5}) == (
        {"top_k": 2, "global_scaling_weight": 0.5}, 1)
    assert stored.compare_and_set(0, {"top_k": 1, "global_scaling_weight": 1.0}) is None  # a stale writer
    assert json.loads(path.read_text()) == {"version": 1, "routing": {"top_k": 2, "global_scaling_weight": 0.5}}
    assert [p.name for p in path.parent.iterdir()] == ["routing.json"]  # no temporary file left behind
    again = StoredRouting({"top_k": None, "global_scaling_weight": 1.0}, str(path))
    assert again.get() == ({"top_k": 2, "global_scaling_weight": 0.5}, 1) and again.from_file


@pytest.mark.parametrize("content, says", [
    ("{not json", "not valid JSON"),
    ('{"routing": {"top_k": 1}}', "expected"),
    ('{"version": -1, "routing": {}}', "expected"),
])
def test_a_bad_state_file_names_itself(tmp_path, content, says):
    path = tmp_path / "routing.json"
    path.write_text(content)
    with pytest.raises(StateFileError) as err:
        StoredRouting({"top_k": None}, str(path))
    assert str(path) in str(err.value) and says in str(err.value)


def test_patch_survives_a_restart_with_a_state_file(world, tmp_path):
    state = tmp_path / "routing-state.json"
    config = write_config(tmp_path, server_config(world, server={"state_file": str(state)}))
    first = ServerProcess(config).wait_ready()
    try:
        with httpx.Client(base_url=first.url, timeout=60) as c:
            dense = {"top_k": None, "global_scaling_weight": 1.0, "freeze_after": None}
            assert c.get("/routing").json() == {**dense, "version": 0}
            c.patch("/routing", json={"top_k": 1}).raise_for_status()
            r = c.patch("/routing", json={"global_scaling_weight": 0.25})
            assert r.json() == {"top_k": 1, "global_scaling_weight": 0.25, "freeze_after": None, "version": 2}
    finally:
        first.stop()
    second = ServerProcess(config).wait_ready()
    try:
        with httpx.Client(base_url=second.url, timeout=60) as c:
            kept = {"top_k": 1, "global_scaling_weight": 0.25, "freeze_after": None}
            assert c.get("/routing").json() == {**kept, "version": 2}
            r = c.post("/generate", json={"prompt": "x", "max_new_tokens": 2})
            assert r.json()["routing"] == {"top_k": 1, "global_scaling_weight": 0.25, "freeze_after": None}
            assert r.headers["x-xlora-routing-version"] == "2"
    finally:
        second.stop()
    assert "routing version 2 read from" in second.log()


def test_a_state_file_routing_the_model_cannot_run_stops_start_up(world, tmp_path):
    state = tmp_path / "routing-state.json"
    state.write_text(json.dumps({"version": 4, "routing": {"top_k": 7, "global_scaling_weight": 1.0}}))
    config = write_config(tmp_path, server_config(world, server={"state_file": str(state)}))
    proc = ServerProcess(config)
    assert proc.wait_exit(120) == 1
    assert f"server.state_file {state}" in proc.log() and "top_k" in proc.log()


def test_a_corrupt_state_file_stops_start_up_naming_it(world, tmp_path):
    state = tmp_path / "routing-state.json"
    state.write_text("{half a file")
    config = write_config(tmp_path, server_config(world, server={"state_file": str(state)}))
    proc = ServerProcess(config)
    assert proc.wait_exit(60) == 1
    assert f"server.state_file {state}: not valid JSON" in proc.log()
