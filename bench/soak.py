"""Soak: N requests from a few concurrent clients against one live server; does anything grow?

    python -m bench.soak --config configs/default.yaml --requests 1000      # 4 clients, 16 new tokens

Starts `python -m server --config X` on 127.0.0.1 (a free port; see bench.load). Runs the first
--warm requests (100), waits until the server is idle, samples the server process's resident memory
(psutil, else /proc/PID/status VmRSS), runs the rest, waits until idle, samples again. Requests vary:
the fixed prompts of bench.load, streamed and plain alternating, every third with return_scalings, every
fifth through /v1/chat/completions. Every --sample-every requests it also reads `GET /scalings`,
`xlora_kv_cache_bytes` from /metrics and the resident memory (mid-run, with requests in flight: a leak
climbs from sample to sample, warm-up levels off).

Checks (exit code 1 if one fails): zero errors; RSS at the end within --max-growth (5%) of RSS after the
warm-up; `GET /scalings` never holds more than `server.scalings_log_size` entries and reports that
capacity; once the requests end, /metrics shows no KV cache held (`xlora_kv_cache_bytes` 0), no running
and no queued request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.load import PROMPTS, REPO, Server, config_copy, machine
from server.settings import load_settings


def rss_bytes(pid: int) -> int:
    try:
        import psutil
    except ImportError:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no psutil and no /proc/PID/status VmRSS") from None
    return psutil.Process(pid).memory_info().rss


def metric(text: str, name: str) -> float | None:
    """An unlabelled sample's value from Prometheus text (None if absent)."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


async def one(client: httpx.AsyncClient, i: int, max_new: int, model: str) -> str | None:
    """Request number i; None or an error (status + body)."""
    prompt = PROMPTS[i % len(PROMPTS)]
    try:
        if i % 5 == 4:
            body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_new,
                    "temperature": 0, "stream": i % 2 == 1}  # fmt: skip
            path = "/v1/chat/completions"
        else:
            body = {"prompt": prompt, "max_new_tokens": max_new, "temperature": 0.0, "stream": i % 2 == 1,
                    "return_scalings": i % 3 == 0}  # fmt: skip
            path = "/generate"
        if not body["stream"]:
            r = await client.post(path, json=body)
            return None if r.status_code == 200 else f"{path} {r.status_code} {r.text[:300]}"
        async with client.stream("POST", path, json=body) as r:
            text = (await r.aread()).decode(errors="replace")
        if r.status_code != 200:
            return f"{path} stream {r.status_code} {text[:300]}"
        if "event: error" in text or '"error"' in text:
            return f"{path} stream error: {text[-300:]}"
        if path == "/generate" and "event: done" not in text or path != "/generate" and "[DONE]" not in text:
            return f"{path} stream ended early: {text[-300:]}"
        return None
    except httpx.HTTPError as exc:
        return f"{path} transport {type(exc).__name__}: {exc}"


class Soak:
    def __init__(self, url: str, pid: int, clients: int, max_new: int, capacity: int, sample_every: int) -> None:
        self.url, self.pid, self.clients, self.max_new = url, pid, clients, max_new
        self.model = httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]
        self.capacity, self.sample_every = capacity, sample_every
        self.errors: list[str] = []
        self.done = 0
        self.samples: list[dict] = []  # every sample_every requests: scalings log size, cache bytes, RSS

    async def run(self, start: int, stop: int) -> None:
        next_i = start
        limits = httpx.Limits(max_connections=self.clients + 2)
        async with httpx.AsyncClient(base_url=self.url, timeout=300, limits=limits) as client:

            async def worker() -> None:
                nonlocal next_i
                while next_i < stop:
                    i, next_i = next_i, next_i + 1
                    error = await one(client, i, self.max_new, self.model)
                    if error:
                        self.errors.append(f"request {i}: {error}")
                    self.done += 1
                    if self.done % self.sample_every == 0:
                        await self.sample(client)

            await asyncio.gather(*(worker() for _ in range(self.clients)))

    async def sample(self, client: httpx.AsyncClient) -> None:
        log = (await client.get("/scalings")).json()
        cache = metric((await client.get("/metrics")).text, "xlora_kv_cache_bytes")
        rss = rss_bytes(self.pid)  # mid-run, requests in flight: the trend tells a leak from warm-up
        self.samples.append({"requests": self.done, "scalings_entries": len(log["entries"]),
                             "scalings_capacity": log["capacity"], "kv_cache_bytes": cache,
                             "rss_bytes": rss})  # fmt: skip
        print(f"  {self.done} requests: /scalings {len(log['entries'])}/{log['capacity']} entries, "
              f"kv cache {cache:.0f} B, RSS {mib(rss)}, errors {len(self.errors)}", flush=True)


def wait_idle(url: str, timeout: float = 30.0) -> dict[str, float | None]:
    """Poll /metrics until nothing runs or waits; the last gauges read."""
    deadline = time.monotonic() + timeout
    while True:
        text = httpx.get(url + "/metrics", timeout=10).text
        gauges = {name: metric(text, name) for name in
                  ("xlora_running_requests", "xlora_queue_depth", "xlora_kv_cache_bytes")}  # fmt: skip
        if not gauges["xlora_running_requests"] and not gauges["xlora_queue_depth"] or time.monotonic() > deadline:
            return gauges
        time.sleep(0.2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "default.yaml")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--warm", type=int, default=100, help="requests before the first RSS sample")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--sample-every", type=int, default=100)
    parser.add_argument("--max-growth", type=float, default=5.0, help="allowed RSS growth, percent")
    parser.add_argument("--log", type=Path, help="server log (default: runs/soak-server.log)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--torch-threads", type=int, help="override model.torch_threads")
    args = parser.parse_args(argv)
    capacity = load_settings(args.config).server.scalings_log_size
    log_path = args.log or REPO / "runs" / "soak-server.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"# bench.soak: {args.config}, {args.requests} requests, {args.clients} clients, "
          f"max_new_tokens {args.max_new_tokens}, torch threads {args.torch_threads or 'as configured'}\n"
          f"machine: {machine()}", flush=True)  # fmt: skip

    config = args.config
    if args.torch_threads:
        config = config_copy(args.config, Path(tempfile.mkdtemp(prefix="xlora-soak-")),
                             {"model": {"torch_threads": args.torch_threads}})  # fmt: skip
    with Server(config, log_path) as server:
        t0 = time.perf_counter()
        server.wait_ready(300)
        print(f"ready after {time.perf_counter() - t0:.1f} s (pid {server.pid}, log {log_path})", flush=True)
        soak = Soak(server.url, server.pid, args.clients, args.max_new_tokens, capacity, args.sample_every)
        t0 = time.perf_counter()
        asyncio.run(soak.run(0, args.warm))
        wait_idle(server.url)
        rss_first = rss_bytes(server.pid)
        print(f"after {args.warm} requests: RSS {mib(rss_first)}", flush=True)
        asyncio.run(soak.run(args.warm, args.requests))
        gauges = wait_idle(server.url)
        elapsed = time.perf_counter() - t0
        rss_end = rss_bytes(server.pid)
        final_log = httpx.get(server.url + "/scalings", timeout=10).json()
        alive = httpx.get(server.url + "/health", timeout=10).status_code == 200

    growth = (rss_end - rss_first) / rss_first * 100
    max_entries = max([s["scalings_entries"] for s in soak.samples] + [len(final_log["entries"])])
    log_ok = max_entries <= capacity and final_log["capacity"] == capacity and all(
        s["scalings_capacity"] == capacity for s in soak.samples
    )
    cache_ok = gauges["xlora_kv_cache_bytes"] == 0 and not gauges["xlora_running_requests"] and not gauges[
        "xlora_queue_depth"
    ]
    checks = {
        "zero errors": not soak.errors,
        f"RSS growth < {args.max_growth}%": growth < args.max_growth,
        "scalings log within its size": log_ok,
        "no cache left behind": cache_ok,
        "server alive": alive,
    }
    print(f"\n## soak results ({args.config}, {args.requests} requests, {args.clients} clients, "
          f"max_new_tokens {args.max_new_tokens}, {elapsed:.0f} s)\nmachine: {machine()}\n")  # fmt: skip
    print("| figure | value |\n|---|---|")
    print(f"| RSS after {args.warm} requests | {mib(rss_first)} |")
    print(f"| RSS after {args.requests} requests | {mib(rss_end)} |")
    print(f"| RSS difference | {growth:+.2f}% |")
    print(f"| /scalings entries (max seen / server.scalings_log_size) | {max_entries} / {capacity} |")
    print(f"| after the requests: xlora_kv_cache_bytes, running, queued | {gauges['xlora_kv_cache_bytes']:.0f}, "
          f"{gauges['xlora_running_requests']:.0f}, {gauges['xlora_queue_depth']:.0f} |")  # fmt: skip
    print(f"| errors | {len(soak.errors)} |")
    for error in soak.errors[:50]:
        print(f"  error: {error}")
    print()
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}: {name}")
    if args.json:
        args.json.write_text(json.dumps({"rss_first": rss_first, "rss_end": rss_end, "growth_pct": growth,
                                         "samples": soak.samples, "final_gauges": gauges, "errors": soak.errors,
                                         "checks": checks}, indent=1))  # fmt: skip
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
