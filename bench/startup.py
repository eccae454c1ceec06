"""From process start to compiled speed: `xlora-serve` as a user starts it (`model.compile: auto`), timed.

Each run starts the server on a config, polls GET /ready every 0.2 s, and notes when it answered ready
(eager decoding) and when its `decode_step` said `compiled`; then it times one greedy request.

- `cold`: empty compile caches (a fresh `XLORA_CACHE_DIR` whose converted base models and C++ kernel, built by
  the install (`native/`), are the user's, linked, but with no `compiled/` packages; a fresh
  `TORCHINDUCTOR_CACHE_DIR`). The server builds the package in the background, then switches to it.
- `warm`: a restart over what the cold run left: the server loads the package before serving.

    python -m bench.startup                         # cold, then warm, on configs/default.yaml
    python -m bench.startup --runs warm             # the user's own cache, as it is

The machine should be otherwise idle: the build shares its 2 cores with nothing else.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from xlora_core.base_model import default_cache_dir

from .report import machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fresh_caches(root: Path) -> dict[str, str]:
    """An XLORA_CACHE_DIR with the user's converted models but no compiled packages, and an empty inductor cache."""
    cache = root / "xlora-cache"
    cache.mkdir()
    user = default_cache_dir()
    if user.is_dir():
        for entry in user.iterdir():
            if entry.name != "compiled":
                (cache / entry.name).symlink_to(entry)
    (root / "inductor").mkdir()
    return {"XLORA_CACHE_DIR": str(cache), "TORCHINDUCTOR_CACHE_DIR": str(root / "inductor")}


def run(config: str, env: dict[str, str], timeout: float, new_tokens: int) -> dict[str, float]:
    """Start a server, wait for /ready and for the compiled step; seconds since the start, and tok/s after."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tempfile.NamedTemporaryFile(prefix="startup-", suffix=".log", delete=False)
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "server", "--config", config, "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env, "XLORA_COMPILE": "auto"},
    )  # fmt: skip
    out: dict[str, float] = {}
    try:
        while "compiled s" not in out:
            if proc.poll() is not None or time.monotonic() - started > timeout:
                raise RuntimeError(f"the server exited or took over {timeout:.0f} s; its log: {log.name}")
            try:
                ready = httpx.get(url + "/ready", timeout=5).json()
            except httpx.HTTPError:
                ready = {}
            now = time.monotonic() - started
            if ready.get("ready") and "ready s" not in out:
                out["ready s"] = now
            if ready.get("ready") and ready.get("decode_step") == "compiled":
                out["compiled s"] = now
            time.sleep(0.2)
        body = {"prompt": "sort: d b c a", "max_new_tokens": new_tokens, "temperature": 0, "stop": []}
        httpx.post(url + "/generate", json=body, timeout=300).raise_for_status()  # warm-up
        start = time.monotonic()
        answer = httpx.post(url + "/generate", json=body, timeout=300).json()
        out["tok/s"] = answer["usage"]["completion_tokens"] / (time.monotonic() - start)
    finally:
        proc.terminate()
        proc.wait(30)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--runs", default="cold,warm", help="cold and/or warm, in this order")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=1800)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="xlora-startup-"))
    env: dict[str, str] = {}
    results = {}
    try:
        for kind in args.runs.split(","):
            if kind == "cold":
                env = fresh_caches(root)
            results[kind] = run(args.config, env, args.timeout, args.new_tokens)
            print(f"{kind}: {results[kind]}", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"\n{args.config} on {machine()}; seconds from process start")
    print("| start | /ready | compiled step | tok/s after (greedy, one request) |")
    print("|---|---:|---:|---:|")
    for kind, r in results.items():
        print(f"| {kind} | {r['ready s']:.1f} | {r['compiled s']:.1f} | {r['tok/s']:.1f} |")


if __name__ == "__main__":
    main()
