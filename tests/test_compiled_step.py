"""The decode step compiled ahead of time (xlora_core/compiled_step.py, server/serving/compiled.py): a server with
`model.compile: auto` serves eagerly at once, builds the package in a background process, and switches to it
once no request is running (holding new ones back if need be), none dropped or changed; the package lands in the
cache, where another process finds it under the same key and decodes the same greedy tokens with it; a restart
loads it instead of compiling; a model pickles for the part compilers; a corrupt package is ignored with a
warning; a cache folder keeps the packages used last; a server stopped mid-build ends the build and the process
compiling a part beside it.

One package is built for the whole module (the tiny world's model, float32: about a minute on 2 cores)."""

from __future__ import annotations

import fcntl
import logging
import os
import pickle
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from server.serving.manager import build_model
from server.settings import load_settings
from xlora_core import compiled_step
from xlora_core.base_model import default_cache_dir
from xlora_core.compiled_step import load_package, package_key, package_path

from .conftest import server_config, write_config
from .test_compile import run_joining_and_leaving

PROMPT = "sort: d b c a"


def generate(url: str) -> tuple[int, str]:
    r = httpx.post(url + "/generate", json={"prompt": PROMPT, "max_new_tokens": 200, "temperature": 0}, timeout=60)
    return r.status_code, r.json().get("text", r.text)


def decode_step(url: str) -> str:
    return httpx.get(url + "/ready", timeout=10).json()["decode_step"]


@pytest.fixture(scope="module")
def compiling(start_server, world, tmp_path_factory):
    """A server that starts with an empty compile cache (`model.compile: auto`), and its cache folder."""
    cache = tmp_path_factory.mktemp("compile-cache")
    config = server_config(world, model={"compile": "auto"})
    proc = start_server(config, env=env(cache))
    return proc, config, cache


def env(cache: Path) -> dict[str, str]:
    # The C++ attention kernel that the install built for this machine, linked in as bench.startup does:
    # building it again for each fresh cache took 20 s.
    built = default_cache_dir() / "native"
    if built.is_dir() and not (cache / "native").exists():
        cache.mkdir(parents=True, exist_ok=True)
        (cache / "native").symlink_to(built, target_is_directory=True)
    # XLORA_COMPILE: the suite's servers have false. No autotuning: 44 s to build instead of 64 with inductor's C++
    # GEMM (test_batch_invariance builds with that).
    return {"XLORA_CACHE_DIR": str(cache), "XLORA_COMPILE": "auto", "XLORA_COMPILE_AUTOTUNE": AUTOTUNE}


AUTOTUNE = "none"


def test_the_server_serves_eagerly_then_switches_to_the_compiled_step_with_requests_running(compiling):
    proc, _, _ = compiling
    assert decode_step(proc.url) == "compiling"
    eager = generate(proc.url)
    assert eager[0] == 200

    # Three clients back to back, staggered, while the package builds: rows are running when it is handed over,
    # and the batch seldom empties by itself.
    answers: list[tuple[int, str]] = []
    done = threading.Event()

    def client() -> None:
        while not done.is_set():
            answers.append(generate(proc.url))

    threads = [threading.Thread(target=client) for _ in range(3)]
    for t in threads:
        t.start()
        time.sleep(0.2)
    deadline = time.monotonic() + 600
    try:
        while decode_step(proc.url) != "compiled":
            assert time.monotonic() < deadline, proc.log()
            time.sleep(0.5)
        time.sleep(1)  # some requests wholly after the switch
    finally:
        done.set()
        for t in threads:
            t.join()
    assert answers and all(a == eager for a in answers)  # none dropped, none changed
    assert generate(proc.url) == eager
    log = proc.log()
    lines = log.splitlines()
    ready = [i for i, line in enumerate(lines) if "switching to it once no request is running" in line]
    switched = [i for i, line in enumerate(lines) if "decode steps run compiled from now on" in line]
    assert len(ready) == 1 and len(switched) == 1 and ready[0] < switched[0], log
    held = [line for line in lines[ready[0]:switched[0]] if "new requests wait until" in line]
    print("held back new requests before the switch:", held)  # the batch did not empty by itself within 5 s
    assert "xlora_decode_compiled 1.0" in httpx.get(proc.url + "/metrics").text


def test_another_process_finds_the_package_under_the_same_key_and_decodes_the_same_tokens(
    compiling, tmp_path, monkeypatch
):
    _, config, cache = compiling
    monkeypatch.setattr(compiled_step, "AUTOTUNE", AUTOTUNE)
    threads = torch.get_num_threads()
    try:
        model, _, _ = build_model(load_settings(write_config(tmp_path, config)))  # sets the config's 1 thread
        path = package_path(model, cache)
        assert path.is_file(), list(cache.rglob("*"))  # built by the server's compile process
        expected = {flag: run_joining_and_leaving(model, flag) for flag in (False, True)}
        assert compiled_step.split_faithfully(model, compiled_step.PARTS)
        os.utime(path, (time.time() - 3600, time.time() - 3600))
        step = load_package(path)
        assert step is not None and len(step.runners) == compiled_step.PARTS  # one layer each, built side by side
        assert time.time() - path.stat().st_mtime < 600  # used now: prune_packages keeps it
        model.use_packaged_step(step)
        for frozen_row in (False, True):  # batch sizes 1, 2, 3, 2, 1, rows joining and leaving
            assert run_joining_and_leaving(model, frozen_row) == expected[frozen_row]
        key = package_key(model)
        with torch.no_grad():
            model.classifier.layers[0].weight[0, 0] += 1  # other weights: another package
        assert package_key(model) != key
    finally:
        torch.set_num_threads(threads)


def test_a_restart_loads_the_package_instead_of_compiling(compiling, start_server):
    proc, config, cache = compiling
    again = start_server(config, env=env(cache))
    assert decode_step(again.url) == "compiled"
    assert generate(again.url) == generate(proc.url)
    log = again.log()
    assert "decode step compiled: loaded" in log and "in the background" not in log, log


def test_a_model_pickles_for_the_part_compilers_and_one_that_cannot_is_compiled_as_one_graph(world, tmp_path, caplog):
    """build_package hands the model to its part compilers pickled: the copy has the same package key (the same
    weights, experts and config), and a lock of its own. A model that cannot be pickled (an attribute a user
    attached, say) is compiled as one graph, with a warning."""
    model, _, _ = build_model(load_settings(write_config(tmp_path, server_config(world))))
    copy = pickle.loads(pickle.dumps(model))
    assert package_key(copy) == package_key(model)
    assert copy._structure is not model._structure and copy._structure.acquire(blocking=False)
    model.callback = lambda: None
    with caplog.at_level(logging.WARNING, logger="xlora.compiled_step"):
        assert not compiled_step._pickled(model, tmp_path / "model.pickle")
    assert "compiling the decode step as one graph: the model cannot be pickled" in caplog.text


def test_a_corrupt_package_is_ignored_with_a_warning_and_removed(tmp_path, caplog):
    bad = tmp_path / "step-0.pt2"
    bad.write_bytes(b"not a package")
    with caplog.at_level(logging.WARNING, logger="xlora.compiled_step"):
        assert load_package(bad) is None
    assert "ignoring the compiled decode step" in caplog.text and not bad.exists()


def test_a_cache_folder_keeps_the_packages_used_last_and_drops_what_killed_builders_left(tmp_path):
    """prune_packages (after every build): the KEEP_PACKAGES packages used last stay, older ones go with their
    lock and log files; a killed builder's partial file goes, one whose builder holds its lock stays."""
    now = time.time()
    keys = [f"{i:024x}" for i in range(compiled_step.KEEP_PACKAGES + 2)]
    for age, key in enumerate(keys):  # keys[0] used last
        for suffix in (".pt2", ".lock", ".log"):
            (tmp_path / f"step-{key}{suffix}").write_bytes(b"x")
        os.utime(tmp_path / f"step-{key}.pt2", (now - 60 * age, now - 60 * age))
    killed, building = tmp_path / "step-dead.partial-1.pt2", tmp_path / "step-busy.partial-2.pt2"
    killed.write_bytes(b"x")
    building.write_bytes(b"x")
    with open(tmp_path / "step-busy.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a builder at work (another open file: flock conflicts in-process too)
        removed = compiled_step.prune_packages(tmp_path)
    old = [tmp_path / f"step-{k}{x}" for k in keys[compiled_step.KEEP_PACKAGES :] for x in (".pt2", ".lock", ".log")]
    assert sorted(removed) == sorted([killed, *old])
    assert all((tmp_path / f"step-{key}.pt2").is_file() for key in keys[: compiled_step.KEEP_PACKAGES])
    assert building.is_file() and compiled_step.prune_packages(tmp_path) == [building]


def _processes() -> list[tuple[int, int, str]]:
    """(pid, session id, command line) of every process that runs (zombies waiting to be reaped do not), from
    procfs."""
    processes = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state, *fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, ValueError, IndexError):  # not a process, or it ended meanwhile
            continue
        if state != "Z":
            processes.append((int(entry.name), int(fields[2]), cmdline))  # ppid, pgrp, session
    return processes


def _sessions_of_builds() -> dict[int, list[str]]:
    """session id -> the command lines of its processes, for every session an `xlora-serve --precompile` build
    leads."""
    processes = _processes()
    leaders = {pid for pid, sid, cmdline in processes if pid == sid and "--precompile" in cmdline}
    return {sid: [cmdline for _, s, cmdline in processes if s == sid] for sid in leaders}


@pytest.mark.parametrize(("end", "when"), [("stopped", "compiling"), ("killed", "starting"), ("killed", "compiling")])
def test_a_server_ended_mid_build_ends_the_build_and_its_part_compilers(end, when, start_server, world, tmp_path):
    """Stopped (SIGTERM): the server ends the build's session. Killed (SIGKILL: out of memory, a Ray replica
    killed): nothing of the server runs, and the build and its part compiler see that they are orphans, even
    when it happened while they were still starting (`starting`: as soon as the build's process exists;
    `compiling`: once its part compiler, a `spawn`ed process, exists too)."""
    before = set(_sessions_of_builds())
    proc = start_server(server_config(world, model={"compile": "auto"}), env=env(tmp_path / "cache"))
    deadline = time.monotonic() + 120
    while True:
        builds = {sid: cmdlines for sid, cmdlines in _sessions_of_builds().items() if sid not in before}
        part_compiler = any("spawn_main" in cmdline for cmdlines in builds.values() for cmdline in cmdlines)
        if builds and (when == "starting" or part_compiler):
            break
        assert time.monotonic() < deadline, (builds, proc.log())
        time.sleep(0.05)
    if end == "killed":
        proc.proc.kill()
        proc.proc.wait(10)
    proc.stop()
    deadline = time.monotonic() + 15  # every process of the build's session, those started after the kill too
    while left := [cmdline for _, sid, cmdline in _processes() if sid in builds]:
        assert time.monotonic() < deadline, left
        time.sleep(0.2)


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_layers_that_take_the_same_input_are_one_matmul_in_the_exported_step(tmp_path, bias):
    """compiled_step.joint_weights: a layer's base weight and its experts' A are one matmul, and so are q, k and v
    (one input) and gate with up (the world's experts leave up plain: it stays a matmul of its own). 5 matmuls a
    layer instead of 7, and the exported step gives the eager pass's hidden states and caches. With biases
    (Qwen2's q, k and v have them; here every linear layer of a Llama with attention_bias and mlp_bias), each
    joint matmul adds its layers' biases."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from xlora_core import XLoraConfig, XLoraModel

    from .tiny_world import build_world, load_base

    base, experts = build_world(tmp_path)
    if bias:
        config = LlamaConfig.from_pretrained(base)
        config.attention_bias = config.mlp_bias = True
        torch.manual_seed(3)
        biased = LlamaForCausalLM(config)
        with torch.no_grad():
            for module in biased.modules():
                if isinstance(module, torch.nn.Linear) and module.bias is not None:
                    module.bias.normal_()  # transformers initializes them to 0
        base = tmp_path / "biased"
        biased.save_pretrained(base)
    model = XLoraModel(load_base(base), XLoraConfig(hidden_size=32, adapters=experts, xlora_depth=2, xlora_size=16))
    inputs = compiled_step.example_inputs(model)
    inputs[4].copy_(torch.rand(inputs[4].shape, generator=torch.Generator().manual_seed(0)))  # the experts on
    program = compiled_step.export_step(model)
    matmuls = [node for node in program.graph.nodes if node.target == torch.ops.aten.linear.default]
    assert len(matmuls) == 5 * model.base.config.num_hidden_layers
    exported = pickle.loads(pickle.dumps(inputs))
    with torch.no_grad():
        expected = compiled_step.OneTokenStep(model)(*inputs)
        hidden = program.module()(*exported)
    torch.testing.assert_close(hidden, expected, rtol=1e-5, atol=1e-5)
    for ours, theirs in zip(inputs[6] + inputs[7], exported[6] + exported[7], strict=True):
        torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
