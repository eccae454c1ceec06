"""Scaling out: the plain server against Ray Serve with 1 and 2 replicas, each with 1 torch thread.

    python -m bench.scale --config configs/default.yaml           # what `make bench-scale` runs
    python -m bench.scale --config X.yaml --clients 8 --requests 4 --max-new-tokens 32

For each mode in turn, starts it (`python -m server --config C` and `... --replicas N`, the config copied with
model.torch_threads 1), waits for /ready, warms it up, runs C clients that each send R greedy requests one after
another (half streamed), stops it (SIGTERM: the Ray modes shut their local cluster down) and goes on. Reports
aggregate generated tokens/s, p50/p99 latency and every error per mode, and the ratios against the plain server.
Server logs go to runs/scale-<mode>-server.log.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path

from bench.load import REPO, Round, Server, config_copy, fmt, machine, run_round, warm_up

MODES = {"plain": None, "ray-1": 1, "ray-2": 2}


def run_mode(mode: str, config: Path, args, log_dir: Path) -> Round:
    replicas = MODES[mode]
    extra = [] if replicas is None else ["--replicas", str(replicas)]
    with Server(config, log_dir / f"scale-{mode}-server.log", extra) as server:
        server.wait_ready(args.start_timeout)
        warm_up(server.url, args.max_new_tokens, args.timeout)
        result = asyncio.run(run_round(server.url, args.clients, args.requests, args.max_new_tokens, "half",
                                       args.timeout, mode))  # fmt: skip
        code = server.stop()
    if code != 0:
        raise RuntimeError(f"{mode}: the server exited with {code}:\n{server.log_tail()}")
    return result


def table(rounds: dict[str, Round]) -> str:
    base = rounds["plain"].tokens_per_s
    lines = ["| mode | tokens/s | vs plain | p50 latency (s) | p99 latency (s) | errors |", "|---|---|---|---|---|---|"]
    for mode, r in rounds.items():
        lines.append(f"| {mode} | {fmt(r.tokens_per_s, 1)} | {fmt(r.tokens_per_s / base)}x | "
                     f"{fmt(r.latency(50))} | {fmt(r.latency(99))} | {len(r.errors)} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "default.yaml")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=4, help="per client, one after another")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--modes", default="plain,ray-1,ray-2", help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--start-timeout", type=float, default=600)
    args = parser.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    if "plain" not in modes or any(m not in MODES for m in modes):
        parser.error(f"--modes: plain and any of {', '.join(MODES)}")

    log_dir = REPO / "runs"
    log_dir.mkdir(exist_ok=True)
    rounds: dict[str, Round] = {}
    with tempfile.TemporaryDirectory() as tmp:
        config = config_copy(args.config, Path(tmp), {"model": {"torch_threads": 1}})
        for mode in modes:
            print(f"{mode}: starting", flush=True)
            rounds[mode] = run_mode(mode, config, args, log_dir)
            r = rounds[mode]
            print(f"{mode}: {r.tokens} tokens in {r.wall:.1f} s = {r.tokens_per_s:.1f} tokens/s, "
                  f"{len(r.errors)} errors", flush=True)  # fmt: skip
            for error in r.errors[:5]:
                print(f"  {error}")
    print()
    print(f"{args.clients} clients x {args.requests} requests, {args.max_new_tokens} new tokens each (greedy, half "
          f"streamed), 1 torch thread per server or replica; config {args.config}")  # fmt: skip
    print(f"machine: {machine()}")
    print()
    print(table(rounds))
    return 0 if all(not r.errors for r in rounds.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
