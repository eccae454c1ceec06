"""Load on a live server: C concurrent clients, batching on and one-at-a-time, side by side in one run.

    python -m bench.load --config configs/default.yaml                  # C = 1,4,8,16; 4 requests per client
    python -m bench.load --config X.yaml --concurrency 1,4,8 --requests 2 --max-new-tokens 32
    python -m bench.load --concurrency 1,8 --torch-threads 1 --compiled  # both servers on the compiled step

Starts `python -m server --config X` on 127.0.0.1 (a free port), waits for /ready, runs each C in turn
(every client sends --requests requests one after another; half of them streamed, alternating, unless
--stream says otherwise) against it and against a second server with `server.max_batch_size: 1` (a
temporary copy of the config with its paths made absolute), in turn. Both servers are up for the whole
run and idle while the other is measured. Greedy, fixed prompts, fixed max_new_tokens. Server logs go
to runs/load-<mode>-server.log. Both servers decode eagerly (a compiled step built in the background would take
the other core while measuring); with --compiled, the compiled decode step is built first (`xlora-serve
--precompile` on the batched config, kept in the cache: minutes the first time on a machine, seconds after) and
both servers load it at start, and each must say `decode_step: compiled` on /ready.

Reports per C and mode: aggregate generated tokens/s (sum of completion_tokens / wall time of the round),
p50/p99 latency, p50/p99 time to first token (streamed requests), and every error (status + body). One
markdown table at the end with both modes, the ratio batched / one-at-a-time, and both modes' token
counts: greedy requests get the same tokens in any batch (docs/batch-invariance.md), so they match.
With --repeat N every C runs N times in each mode, the modes taking turns; the table then gives each mode's
median tok/s, the median of the N ratios (each batched round over the one-at-a-time round right after it:
a 2-core VM's speed drifts by several percent between runs), and the latencies over all rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml

REPO = Path(__file__).resolve().parent.parent

PROMPTS = [
    "Compute: 12 + 30",
    "Sort alphabetically: pear, apple, fig",
    "Extract as JSON: name is Alice, age is 31, city is Paris",
    "Write a short story about a lighthouse keeper who finds a message in a bottle on a stormy night, "
    "and what she decides to do about it the next morning.",
]


# -----------------------------------------------------------------------------
# the server process (also used by bench.soak)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config_copy(config: Path, folder: Path, overrides: dict[str, dict] | None = None, name: str = "bench.yaml") -> Path:
    """The config, its relative paths made absolute (against its own folder), `overrides` merged per section,
    written to folder/name."""
    data = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
    base_dir = config.resolve().parent

    def absolute(value: str) -> str:
        path = Path(value).expanduser()
        return str(path if path.is_absolute() else (base_dir / path).resolve())

    model = data.get("model") or {}
    if model.get("base") not in (None, "default"):
        model["base"] = absolute(model["base"])
    if model.get("cache_dir"):
        model["cache_dir"] = absolute(model["cache_dir"])
    xlora = data.get("xlora") or {}
    if xlora.get("checkpoint"):
        xlora["checkpoint"] = absolute(xlora["checkpoint"])
    if xlora.get("adapters"):
        xlora["adapters"] = {k: absolute(v) for k, v in xlora["adapters"].items()}
    for section, values in (overrides or {}).items():
        data.setdefault(section, {})
        data[section] = {**(data[section] or {}), **values}
    out = folder / name
    out.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return out


class Server:
    """`python -m server --config X --host 127.0.0.1 --port P`, output to a log file; SIGTERM (then kill) on stop."""

    def __init__(
        self, config: Path, log_path: Path, extra_args: list[str] | None = None, compile_mode: str | None = None
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        env = {k: v for k, v in os.environ.items() if not k.startswith("XLORA_")}  # no auth for the bench
        env["PYTHONUNBUFFERED"] = "1"
        # No compiled step built in the background while measuring (it would take the other core): eager,
        # unless `compile_mode` (--compiled: "auto", the package built before) or XLORA_COMPILE says otherwise.
        env["XLORA_COMPILE"] = compile_mode or os.environ.get("XLORA_COMPILE", "false")
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "server", "--config", str(config), "--host", "127.0.0.1", "--port", str(self.port),
             *(extra_args or [])],
            cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT,
        )  # fmt: skip

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"server not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, n: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-n:]

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if not self._log.closed:
            self._log.close()
        return self.proc.returncode

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# -----------------------------------------------------------------------------
# one request


@dataclass
class Result:
    stream: bool
    latency: float = math.nan
    ttft: float | None = None
    completion_tokens: int = 0
    error: str | None = None


async def one_request(client: httpx.AsyncClient, prompt: str, max_new: int, stream: bool) -> Result:
    body = {"prompt": prompt, "max_new_tokens": max_new, "temperature": 0.0, "stream": stream}
    result = Result(stream=stream)
    start = time.perf_counter()
    try:
        if not stream:
            r = await client.post("/generate", json=body)
            if r.status_code != 200:
                result.error = f"{r.status_code} {r.text[:500]}"
            else:
                result.completion_tokens = r.json()["usage"]["completion_tokens"]
        else:
            async with client.stream("POST", "/generate", json=body) as r:
                if r.status_code != 200:
                    result.error = f"{r.status_code} {(await r.aread()).decode(errors='replace')[:500]}"
                else:
                    event = None
                    async for line in r.aiter_lines():
                        if line.startswith("event:"):
                            event = line.split(":", 1)[1].strip()
                        elif line.startswith("data:"):
                            if event == "token" and result.ttft is None:
                                result.ttft = time.perf_counter() - start
                            elif event == "done":
                                result.completion_tokens = json.loads(line.split(":", 1)[1])["usage"][
                                    "completion_tokens"
                                ]
                            elif event == "error":
                                result.error = f"200 stream error event: {line[5:].strip()[:500]}"
                    if result.error is None and event != "done":
                        result.error = "200 stream ended without a done event"
    except httpx.HTTPError as exc:
        result.error = f"transport {type(exc).__name__}: {exc}"
    result.latency = time.perf_counter() - start
    return result


# -----------------------------------------------------------------------------
# one round: C clients


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); nan for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass
class Round:
    mode: str
    concurrency: int
    wall: float
    results: list[Result] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return sum(r.completion_tokens for r in self.results)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall if self.wall > 0 else math.nan

    @property
    def errors(self) -> list[str]:
        return [r.error for r in self.results if r.error]

    def latency(self, q: float) -> float:
        return percentile([r.latency for r in self.results if not r.error], q)

    def ttft(self, q: float) -> float:
        return percentile([r.ttft for r in self.results if r.ttft is not None and not r.error], q)


def stream_choice(mode: str, client_index: int, request_index: int) -> bool:
    if mode == "both":
        return (client_index + request_index) % 2 == 1
    return mode == "on"


async def run_round(url: str, concurrency: int, requests: int, max_new: int, stream_mode: str,
                    timeout: float, mode: str) -> Round:  # fmt: skip
    limits = httpx.Limits(max_connections=concurrency + 2, max_keepalive_connections=concurrency + 2)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:

        async def one_client(c: int) -> list[Result]:
            out = []
            for i in range(requests):
                prompt = PROMPTS[(c + i) % len(PROMPTS)]
                out.append(await one_request(client, prompt, max_new, stream_choice(stream_mode, c, i)))
            return out

        start = time.perf_counter()
        per_client = await asyncio.gather(*(one_client(c) for c in range(concurrency)))
        wall = time.perf_counter() - start
    return Round(mode=mode, concurrency=concurrency, wall=wall, results=[r for rs in per_client for r in rs])


def warm_up(url: str, max_new: int, timeout: float) -> None:
    with httpx.Client(base_url=url, timeout=timeout) as c:
        for prompt in PROMPTS[:2]:
            c.post("/generate", json={"prompt": prompt, "max_new_tokens": max_new, "temperature": 0.0})


def run_all(configs: dict[str, Path], args, log_dir: Path) -> dict[str, list[Round]]:
    """One server per mode, all started before the first round; each C runs in every mode in turn, so a change
    in the machine's other load during the run touches both modes alike. The servers are idle when not measured."""
    results: dict[str, list[Round]] = {mode: [] for mode in configs}
    with contextlib.ExitStack() as stack:
        servers = {}
        for mode, config in configs.items():
            log_path = log_dir / f"load-{mode}-server.log"
            compile_mode = "auto" if args.compiled else None
            servers[mode] = stack.enter_context(Server(config, log_path, compile_mode=compile_mode))
            t0 = time.perf_counter()
            servers[mode].wait_ready(args.ready_timeout)
            step = httpx.get(servers[mode].url + "/ready", timeout=5).json().get("decode_step")
            print(f"{mode}: ready after {time.perf_counter() - t0:.1f} s, decode step {step} (pid {servers[mode].pid}, "
                  f"log {log_path})", flush=True)  # fmt: skip
            if args.compiled and step != "compiled":
                raise RuntimeError(f"{mode}: --compiled, but the server decodes {step} (log {log_path})")
            warm_up(servers[mode].url, args.max_new_tokens, args.timeout)
        for c in args.concurrency:
            for _, (mode, server) in itertools.product(range(args.repeat), servers.items()):
                rnd = asyncio.run(run_round(server.url, c, args.requests, args.max_new_tokens, args.stream,
                                            args.timeout, mode))  # fmt: skip
                results[mode].append(rnd)
                print(f"{mode} C={c}: {len(rnd.results)} requests, {rnd.tokens} tokens in {rnd.wall:.1f} s = "
                      f"{rnd.tokens_per_s:.1f} tok/s; latency p50 {rnd.latency(50):.2f} s p99 {rnd.latency(99):.2f} s; "
                      f"TTFT p50 {rnd.ttft(50):.2f} s p99 {rnd.ttft(99):.2f} s; errors {len(rnd.errors)}", flush=True)
                for err in rnd.errors:
                    print(f"  error: {err}", flush=True)
    return results


def precompile(config: Path, log_path: Path) -> None:
    """`xlora-serve --config config --precompile`: the config's compiled decode step into the cache (built once per
    machine, threads and model; found at once after). The servers' configs differ only in what the step does not
    depend on (the batch size), so both load it."""
    started = time.perf_counter()
    env = {k: v for k, v in os.environ.items() if not k.startswith("XLORA_")}  # as the servers get it (Server)
    with open(log_path, "wb") as log:
        done = subprocess.run([sys.executable, "-m", "server", "--config", str(config), "--precompile"],
                              cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, check=False)  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"xlora-serve --precompile failed (exit {done.returncode}), log {log_path}")
    print(f"compiled decode step ready after {time.perf_counter() - started:.0f} s (log {log_path})", flush=True)


# -----------------------------------------------------------------------------
# report


def fmt(x: float, digits: int = 2) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def table(batched: list[Round], single: list[Round], batch_size: int) -> str:
    """One row per C: each mode's median tok/s over its rounds at that C, the median of the paired ratios (the
    i-th batched round over the i-th one-at-a-time round), latencies over every round's requests."""
    head = (f"| C | requests | tok/s batched (max_batch_size {batch_size}) | tok/s one-at-a-time | ratio "
            "| latency p50/p99 batched (s) | latency p50/p99 one-at-a-time (s) "
            "| TTFT p50/p99 batched (s) | TTFT p50/p99 one-at-a-time (s) | tokens b/1 | errors b/1 |")  # fmt: skip
    lines = [head, "|" + "---|" * (head.count("|") - 1)]

    def by_c(rounds: list[Round]) -> dict[int, list[Round]]:
        out: dict[int, list[Round]] = {}
        for r in rounds:
            out.setdefault(r.concurrency, []).append(r)
        return out

    def pooled(rounds: list[Round] | None, what: str) -> str:
        if not rounds:
            return "-"
        pool = Round(mode=rounds[0].mode, concurrency=rounds[0].concurrency, wall=0.0,
                     results=[x for r in rounds for x in r.results])  # fmt: skip
        get = getattr(pool, what)
        return f"{fmt(get(50))} / {fmt(get(99))}"

    def tokens(rounds: list[Round] | None) -> str:
        counts = sorted({r.tokens for r in rounds or []})
        return ", ".join(str(n) for n in counts) or "-"

    singles = by_c(single)
    for c, b in by_c(batched).items():
        s = singles.get(c)
        ratios = [x.tokens_per_s / y.tokens_per_s for x, y in zip(b, s or [], strict=False) if y.tokens_per_s]
        ratio = statistics.median(ratios) if ratios else math.nan
        b_tok = statistics.median(r.tokens_per_s for r in b)
        s_tok = fmt(statistics.median(r.tokens_per_s for r in s), 1) if s else "-"
        lines.append(
            f"| {c} | {len(b[0].results)} | {fmt(b_tok, 1)} | {s_tok} | {fmt(ratio)}x | {pooled(b, 'latency')} "
            f"| {pooled(s, 'latency')} | {pooled(b, 'ttft')} | {pooled(s, 'ttft')} | {tokens(b)} / {tokens(s)} "
            f"| {sum(len(r.errors) for r in b)} / {sum(len(r.errors) for r in s) if s else '-'} |"
        )
    return "\n".join(lines)


def machine() -> str:
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",)
    return (f"{platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
            f"load average {', '.join(f'{x:.2f}' for x in load)}, Python {platform.python_version()}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "default.yaml")
    parser.add_argument("--concurrency", default="1,4,8,16", help="comma-separated client counts")
    parser.add_argument("--requests", type=int, default=4, help="requests per client, one after another")
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds per C and mode, the modes taking turns; the table gives medians")  # fmt: skip
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--stream", choices=["both", "on", "off"], default="both",
                        help="both = alternate streamed and plain requests (half each)")  # fmt: skip
    parser.add_argument("--modes", default="batched,single", help="batched (config as is), single (max_batch_size 1)")
    parser.add_argument("--timeout", type=float, default=600.0, help="client timeout per request, s")
    parser.add_argument("--ready-timeout", type=float, default=300.0)
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument("--log-dir", type=Path, default=REPO / "runs", help="where the servers' logs go")
    parser.add_argument("--torch-threads", type=int, help="override model.torch_threads in both servers")
    parser.add_argument("--compiled", action="store_true",
                        help="both servers on the compiled decode step (xlora-serve --precompile first)")  # fmt: skip
    args = parser.parse_args(argv)
    args.concurrency = [int(x) for x in args.concurrency.split(",")]
    if args.repeat < 1:
        parser.error(f"--repeat must be at least 1, got {args.repeat}")
    modes = args.modes.split(",")

    settings = yaml.safe_load(args.config.read_text(encoding="utf-8")) or {}
    batch_size = (settings.get("server") or {}).get("max_batch_size", 8)
    threads = args.torch_threads or (settings.get("model") or {}).get("torch_threads") or "torch's default"
    print(f"# bench.load: {args.config}\nmachine: {machine()}\n"
          f"C={args.concurrency}, {args.requests} requests per client, {args.repeat} round(s) per C and mode, "
          f"max_new_tokens {args.max_new_tokens}, greedy, stream={args.stream}, torch threads per server: {threads}, "
          f"decode step: {'compiled' if args.compiled else 'eager'}", flush=True)  # fmt: skip

    args.log_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="xlora-bench-load-") as tmp:
        folder = Path(tmp)
        model = {"model": {"torch_threads": args.torch_threads}} if args.torch_threads else {}
        configs = {
            "batched": config_copy(args.config, folder, model, name="batched.yaml"),
            "single": config_copy(args.config, folder, {**model, "server": {"max_batch_size": 1}}, name="single.yaml"),
        }
        if args.compiled:
            precompile(configs["batched"], args.log_dir / "load-precompile.log")
        results = run_all({mode: configs[mode] for mode in modes}, args, args.log_dir)

    batched, single = results.get("batched", []), results.get("single", [])
    print(f"\n## results ({args.config}, {args.requests} requests per client, {args.repeat} round(s) per C and "
          f"mode (medians), max_new_tokens "
          f"{args.max_new_tokens}, stream={args.stream}, torch threads {threads}, "
          f"{'compiled' if args.compiled else 'eager'} decode step)\nmachine: {machine()}\n")  # fmt: skip
    print(table(batched or single, single if batched else [], batch_size))
    errors = [e for rounds in results.values() for r in rounds for e in r.errors]
    print(f"\nerrors: {len(errors)}")
    if args.json:
        raw = {mode: [{"concurrency": r.concurrency, "wall": r.wall, "tokens": r.tokens,
                       "results": [r_.__dict__ for r_ in r.results]} for r in rounds]
               for mode, rounds in results.items()}  # fmt: skip
        args.json.write_text(json.dumps(raw, indent=1))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
