"""Shared fixtures for the server tests: a tiny random X-LoRA model on disk and real server processes.

The world (built once per session, from tests/tiny_world.py): a tiny random Llama with a character-level
tokenizer, three PEFT LoRA experts (arithmetic, sorting, json) and an X-LoRA checkpoint written by
xlora_core. Servers are real `python -m server --config <yaml>` processes on 127.0.0.1, on a free port.

The tokenizer knows 100 symbols but the model's embedding has only 96 rows: a prompt containing
one of `{ | } ~` makes the model itself fail (an index error in the embedding), the genuine fault path
the fault tests use. Other prompts never meet those ids (the model cannot generate them either).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from .tiny_world import save_checkpoint, save_expert, save_server_base

REPO = Path(__file__).resolve().parent.parent
EXPERTS = ["arithmetic", "sorting", "json"]


# -----------------------------------------------------------------------------
# the tiny world (tests/tiny_world.py builds it)


def save_lora_expert(base_folder: Path, folder: Path, seed: int, target_modules: list[str]) -> Path:
    """The server world's experts: r=4, alpha 8, weights x3 so they change what the tiny model says."""
    return save_expert(base_folder, folder, seed, gain=3.0, r=4, lora_alpha=8, target_modules=target_modules)


# -----------------------------------------------------------------------------
# the tiny world


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("world")
    base = save_server_base(root / "base")
    targets = [["q_proj", "v_proj"], ["k_proj", "o_proj"], ["gate_proj", "down_proj"]]
    experts = {
        name: str(save_lora_expert(base, root / f"expert-{name}", seed=10 + i, target_modules=t))
        for i, (name, t) in enumerate(zip(EXPERTS, targets, strict=True))
    }
    checkpoint = save_checkpoint(base, experts, root / "checkpoint")
    # A second X-LoRA model over the same base, sharing two experts (the shared server serves it: SERVED_MODELS)
    second = save_checkpoint(base, {k: experts[k] for k in ("sorting", "json")}, root / "checkpoint-2")
    return {"root": root, "base": str(base), "experts": experts, "checkpoint": str(checkpoint),
            "checkpoint_2": str(second)}  # fmt: skip


def server_config(world: dict, **sections) -> dict:
    """A config dict for the tiny world; `sections` are merged into its sections."""
    config = {
        "model": {"base": world["base"], "device": "cpu", "dtype": "float32", "name": "tiny-xlora",
                  "torch_threads": 1},
        "xlora": {"checkpoint": world["checkpoint"]},
        "routing": {"top_k": None, "global_scaling_weight": 1.0},
        "server": {"max_batch_size": 4, "max_queue": 32, "max_new_tokens": 256, "request_timeout_s": 60},
        "logging": {"level": "info", "format": "text"},
    }
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    return config


def write_config(folder: Path, config: dict, name: str = "server.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(config))
    return path


# -----------------------------------------------------------------------------
# server processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m server --config FILE` on a free port; stderr goes to a file the tests can read."""

    def __init__(self, config_path: Path, env: dict[str, str] | None = None, log_path: Path | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path or config_path.with_suffix(".log")
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("XLORA_")}
        # XLORA_COMPILE=false: no server here builds a compiled decode step (minutes of CPU) unless a test asks.
        full_env.update({"PYTHONUNBUFFERED": "1", "XLORA_COMPILE": "false", **(env or {})})
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "server", "--config", str(config_path), "--port", str(self.port)],
            cwd=REPO, env=full_env, stdout=self._log, stderr=subprocess.STDOUT,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 120.0) -> ServerProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/ready", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"server not ready after {timeout} s:\n{self.log()}")

    def wait_exit(self, timeout: float = 60.0) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            if not self._log.closed:
                self._log.close()

    def stop(self) -> None:
        """SIGTERM and wait (a no-op once stopped)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if not self._log.closed:
            self._log.close()


@pytest.fixture(scope="session")
def start_server(tmp_path_factory, world):
    """Factory: start_server(config_dict, env=None, ready=True) -> ServerProcess, stopped at the end."""
    started: list[ServerProcess] = []

    def start(config: dict, env: dict[str, str] | None = None, ready: bool = True) -> ServerProcess:
        folder = tmp_path_factory.mktemp("server")
        proc = ServerProcess(write_config(folder, config), env)
        started.append(proc)
        return proc.wait_ready() if ready else proc

    yield start
    for proc in started:
        proc.stop()


def served_models(world: dict) -> list[dict]:
    """The shared server's `models:` besides the xlora section's tiny-xlora (docs/models.md)."""
    return [
        {"name": "tiny-xlora-2", "checkpoint": world["checkpoint_2"]},
        {"name": "json", "adapter": world["experts"]["json"]},
        {"name": "tiny-base", "base": True},
    ]


@pytest.fixture(scope="session")
def server(start_server, world) -> ServerProcess:
    """The shared server: batching on (4 rows), no auth; it serves more models over its base (served_models), and
    loads more at run time from the world's folder (at most 4 experts: its models share 3)."""
    runtime = {"model_root": str(world["root"]), "max_loaded_experts": 4,
               "state_file": str(world["root"] / "state.json")}  # fmt: skip
    return start_server({**server_config(world, server=runtime), "models": served_models(world)})


@pytest.fixture(scope="session")
def default_server(tmp_path_factory) -> ServerProcess:
    """configs/default.yaml (the embedded default) served as `make serve` serves it; shared by
    tests/test_server_default.py and the docs' examples (tests/test_docs_examples.py)."""
    proc = ServerProcess(REPO / "configs" / "default.yaml", log_path=tmp_path_factory.mktemp("default") / "server.log")
    try:
        proc.wait_ready(timeout=600)  # the first run converts the GGUF file (cached afterwards)
        yield proc
    finally:
        proc.stop()


API_KEY, ADMIN_TOKEN = "api-secret-3f9c", "admin-secret-7d21"


@pytest.fixture(scope="session")
def secured_server(start_server, world) -> ServerProcess:
    """A server with both secrets set (XLORA_API_KEY, XLORA_ADMIN_TOKEN) and JSON logs; shared by the auth,
    access and dashboard tests. Tests that change its routing or clear its log put things back or don't rely
    on what others left."""
    config = server_config(world, logging={"format": "json"}, server={"model_root": str(world["root"])})
    return start_server(config, env={"XLORA_API_KEY": API_KEY, "XLORA_ADMIN_TOKEN": ADMIN_TOKEN})


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture()
def client(server) -> httpx.Client:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c
