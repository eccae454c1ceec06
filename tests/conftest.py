"""Shared fixtures for the server tests: a tiny random X-LoRA model on disk and real server processes.

The world (built once per session): a tiny random Llama with a character-level tokenizer, three PEFT
LoRA experts (arithmetic, sorting, json) and an X-LoRA checkpoint written by xlora_core. Servers are
real `python -m server --config <yaml>` processes on 127.0.0.1, on a free port.

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
import torch
import yaml
from peft import LoraConfig, get_peft_model
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from .helpers import tiny_llama_config

REPO = Path(__file__).resolve().parent.parent
MODEL_VOCAB = 96
POISON = "~"  # a character whose token id is past the model's embedding table
EXPERTS = ["arithmetic", "sorting", "json"]
_SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
_CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>: {% endif %}"
)


# -----------------------------------------------------------------------------
# the tiny world


def save_char_tokenizer(folder: Path) -> PreTrainedTokenizerFast:
    """Character-level: specials, newline, ' '..'z' (ids 0..95), then '{', '|', '}', '~' (96..99)."""
    chars = ["\n"] + [chr(c) for c in range(32, 123)] + ["{", "|", "}", "~"]
    vocab = {tok: i for i, tok in enumerate(_SPECIALS + chars)}
    assert vocab["z"] == MODEL_VOCAB - 1 and vocab[POISON] >= MODEL_VOCAB
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.chat_template = _CHAT_TEMPLATE
    fast.save_pretrained(folder)
    return fast


def save_tiny_llama(folder: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(MODEL_VOCAB))
    model.save_pretrained(folder)
    save_char_tokenizer(folder)
    return folder


def save_lora_expert(base_folder: Path, folder: Path, seed: int, target_modules: list[str]) -> Path:
    torch.manual_seed(seed)
    base = LlamaForCausalLM.from_pretrained(base_folder, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=target_modules,
                                            init_lora_weights=False))
    with torch.no_grad():  # peft's random init is tiny; make the experts change the output
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.mul_(3.0)
    model.save_pretrained(folder)
    return folder


def save_checkpoint(base_folder: Path, experts: dict[str, str], folder: Path) -> Path:
    from xlora_core import XLoraConfig, XLoraModel

    torch.manual_seed(1)
    base = LlamaForCausalLM.from_pretrained(base_folder, dtype=torch.float32)
    config = XLoraConfig(hidden_size=32, adapters=experts, xlora_depth=2, xlora_size=16)
    XLoraModel(base, config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("world")
    base = save_tiny_llama(root / "base")
    targets = [["q_proj", "v_proj"], ["k_proj", "o_proj"], ["gate_proj", "down_proj"]]
    experts = {
        name: str(save_lora_expert(base, root / f"expert-{name}", seed=10 + i, target_modules=t))
        for i, (name, t) in enumerate(zip(EXPERTS, targets, strict=True))
    }
    checkpoint = save_checkpoint(base, experts, root / "checkpoint")
    return {"root": root, "base": str(base), "experts": experts, "checkpoint": str(checkpoint)}


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
        full_env.update({"PYTHONUNBUFFERED": "1", **(env or {})})
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


@pytest.fixture(scope="session")
def server(start_server, world) -> ServerProcess:
    """The shared server: batching on (4 rows), no auth."""
    return start_server(server_config(world))


API_KEY, ADMIN_TOKEN = "api-secret-3f9c", "admin-secret-7d21"


@pytest.fixture(scope="session")
def secured_server(start_server, world) -> ServerProcess:
    """A server with both secrets set (XLORA_API_KEY, XLORA_ADMIN_TOKEN) and JSON logs; shared by the auth,
    access and dashboard tests. Tests that change its routing or clear its log put things back or don't rely
    on what others left."""
    config = server_config(world, logging={"format": "json"})
    return start_server(config, env={"XLORA_API_KEY": API_KEY, "XLORA_ADMIN_TOKEN": ADMIN_TOKEN})


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture()
def client(server) -> httpx.Client:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c
