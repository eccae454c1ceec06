"""The benchmark plots of the docs (docs/bench-report.md): quick runs of the benchmarks, then matplotlib PNGs.

    python -m bench.report                 # quick runs into build/bench/*.json, then the plots (make bench-report)
    python -m bench.report --plot-only     # redraw from the saved JSON, running nothing

Three plots, each from one JSON file per kind, and each says the machine, the date and the command:
- docs/bench-load.png: tok/s against concurrent clients, batched and one at a time (bench.load);
- docs/bench-decode.png: decode tok/s of the base model, X-LoRA granular and frozen, eager and compiled,
  and mistral.rs' X-LoRA (bench.peers);
- docs/bench-length.png: time against new tokens (bench.generation).

A kind's data comes from build/bench/<kind>.json (a run of this command) when there is one, else from
bench/results/<kind>.json: the runs recorded in docs/benchmarks.md, with their machine, date and command.
bench.peers runs only where mistral.rs is set up (make bench-peers does it once) and with --peers: it
compiles for many minutes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECORDED = REPO / "bench" / "results"
KINDS = ("load", "decode", "length")


def machine() -> str:
    """CPU model, cores and the flags that decide speed here (AMX, AVX-512 BF16, AVX-512, AVX2)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    named = [("amx_bf16", "AMX"), ("avx512_bf16", "AVX-512 BF16"), ("avx512f", "AVX-512"), ("avx2", "AVX2")]
    shown = [label for flag, label in named if flag in flags]
    return f"{model}, {os.cpu_count()} CPUs" + (f", {', '.join(shown)}" if shown else "")


def meta(command: list[str], note: str) -> dict:
    """Where, when and how a run was made; the load average, since a busy machine's numbers do not compare."""
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return {"machine": machine(), "date": datetime.date.today().isoformat(), "command": shlex.join(command),
            "note": f"{note}; load average {load} after it"}  # fmt: skip


# -----------------------------------------------------------------------------
# quick runs


def run_load(out: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "load.json"
        cmd = [sys.executable, "-m", "bench.load", "--config", "configs/default.yaml", "--concurrency", "1,4,8",
               "--requests", "2", "--max-new-tokens", "16", "--torch-threads", "1", "--json", str(raw)]  # fmt: skip
        subprocess.run(cmd, cwd=REPO, check=True)
        rounds = {mode: [{"concurrency": r["concurrency"], "tok_s": r["tokens"] / r["wall"]} for r in runs]
                  for mode, runs in json.loads(raw.read_text()).items()}  # fmt: skip
    cmd[0] = "python"
    out.write_text(json.dumps({"meta": meta(cmd[:-2], "a quick run"), "rounds": rounds}, indent=1))


def run_length(out: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "generation.json"
        cmd = [sys.executable, "-m", "bench.generation", "--threads", "1", "--prompt-lens", "16", "--new-tokens",
               "16,32,64", "--peft-max-new", "16", "--freeze-after", "0", "--json", str(raw)]  # fmt: skip
        subprocess.run(cmd, cwd=REPO, check=True)
        rows = json.loads(raw.read_text())["rows"]
    cmd[0] = "python"
    out.write_text(json.dumps({"meta": meta(cmd[:-2], "a quick run"), "rows": rows}, indent=1))


def run_decode(out: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "peers.json"
        cmd = [sys.executable, "-m", "bench.peers", "--new-tokens", "64", "--repeats", "1", "--json", str(raw)]
        subprocess.run(cmd, cwd=REPO, check=True)
        data = json.loads(raw.read_text())
    cmd[0] = "python"
    out.write_text(json.dumps({"meta": meta(cmd[:-2], "a quick run"), **data}, indent=1))


# -----------------------------------------------------------------------------
# plots


def _footer(fig, info: dict) -> None:
    note = f" ({info['note']})" if info.get("note") else ""
    lines = textwrap.wrap(f"{info['machine']}; {info['date']}{note}", 125)
    lines += textwrap.wrap(f"$ {info['command']}", 125, subsequent_indent="  ")
    fig.text(0.01, 0.01, "\n".join(lines), fontsize=7, family="monospace", va="bottom")


def plot_load(data: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    fig.subplots_adjust(bottom=0.24)
    labels = {"batched": "batched (max_batch_size 8)", "single": "one at a time (max_batch_size 1)"}
    for mode, rounds in data["rounds"].items():
        xs = [r["concurrency"] for r in rounds]
        ys = [r["tok_s"] for r in rounds]
        ax.plot(xs, ys, marker="o", label=labels.get(mode, mode))
    if {"batched", "single"} <= set(data["rounds"]):
        single = {r["concurrency"]: r["tok_s"] for r in data["rounds"]["single"]}
        for r in data["rounds"]["batched"]:
            if r["concurrency"] in single:
                ax.annotate(f"{r['tok_s'] / single[r['concurrency']]:.2f}x", (r["concurrency"], r["tok_s"]),
                            textcoords="offset points", xytext=(0, 8), ha="center", fontsize=8)  # fmt: skip
    top = max(r["tok_s"] for rounds in data["rounds"].values() for r in rounds)
    ax.set(xlabel="concurrent clients", ylabel="generated tokens/s (all clients)", ylim=(0, top * 1.15),
           title="Serving the embedded default: tokens/s against concurrent clients")  # fmt: skip
    ax.set_xticks(sorted({r["concurrency"] for rounds in data["rounds"].values() for r in rounds}))
    ax.grid(alpha=0.3)
    ax.legend(loc="center right")
    _footer(fig, data["meta"])
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_decode(data: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    bars: list[tuple[str, float, str]] = []  # label, tok/s, colour
    mrs = data.get("mistralrs") or {}
    if mrs:
        bars += [("mistral.rs base alone", mrs["base"], "#999999"), ("mistral.rs X-LoRA", mrs["xlora"], "#555555")]
    colours = {"base": "#8fbc8f", "granular": "#4169e1", "frozen": "#ff8c00"}
    for dtype, r in data["ours"].items():
        short = {"float32": "fp32", "bfloat16": "bf16"}.get(dtype, dtype)
        bars.append((f"ours {short} base alone", r["base"], colours["base"]))
        for suffix in ("", " compiled"):
            for kind in ("granular", "frozen"):
                if f"{kind}{suffix}" in r:
                    bars.append((f"ours {short} X-LoRA {kind}{suffix or ' eager'}", r[f"{kind}{suffix}"],
                                 colours[kind]))  # fmt: skip
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(bars) + 2.2))
    fig.subplots_adjust(left=0.36, bottom=0.8 / (0.32 * len(bars) + 2.2) + 0.08)
    ys = range(len(bars))[::-1]
    ax.barh(list(ys), [b[1] for b in bars], color=[b[2] for b in bars])
    ax.set_yticks(list(ys), [b[0] for b in bars], fontsize=8)
    for y, (_, value, _) in zip(ys, bars, strict=True):
        vs = f"  {value:.1f}" + (f" ({value / mrs['xlora']:.2f}x mistral.rs X-LoRA)" if mrs else "")
        ax.text(value, y, vs, va="center", fontsize=7)
    ax.set(xlabel="decode tokens/s (one stream, greedy)", title="Decode speed: ours against mistral.rs")
    ax.set_xlim(0, max(b[1] for b in bars) * 1.45)
    ax.grid(axis="x", alpha=0.3)
    _footer(fig, data["meta"])
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_length(data: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    prompts = sorted({r["prompt"] for r in data["rows"]})
    fig, axes = plt.subplots(1, len(prompts), figsize=(max(8, 4.5 * len(prompts) + 1), 5), sharey=True, squeeze=False)
    fig.subplots_adjust(bottom=0.26, wspace=0.08)
    names = {"base": "base model alone", "ours": "X-LoRA granular (ours)", "peft": "peft.XLoraModel"}
    engines = sorted({e for r in data["rows"] for e in r["seconds"]}, key=lambda e: (e != "base", e != "ours", e))
    colours = dict(zip(engines, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))
    for ax, prompt in zip(axes[0], prompts, strict=True):
        rows = sorted((r for r in data["rows"] if r["prompt"] == prompt), key=lambda r: r["new"])
        for engine in engines:
            points = [(r["new"], r["seconds"][engine]) for r in rows if engine in r["seconds"]]
            if points:
                label = names.get(engine, f"X-LoRA {engine.replace('@', ' after ')} tokens")
                ax.plot(*zip(*points, strict=True), marker="o", color=colours[engine], label=label)
        ax.set(xlabel="new tokens", title=f"{prompt}-token prompt", ylim=(0, None))
        ax.set_xticks([r["new"] for r in rows])
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("seconds (prefill included)")
    handles = {h.get_label(): h for ax in axes[0] for h in ax.get_legend_handles_labels()[0]}
    axes[0][-1].legend(handles.values(), handles.keys(), fontsize=8)
    fig.suptitle("Time against new tokens: X-LoRA's cost per token stays flat")
    _footer(fig, data["meta"])
    fig.savefig(path, dpi=110)
    plt.close(fig)


PLOTS = {"load": plot_load, "decode": plot_decode, "length": plot_length}
RUNS = {"load": run_load, "decode": run_decode, "length": run_length}


def source(kind: str, data_dir: Path) -> Path:
    fresh = data_dir / f"{kind}.json"
    return fresh if fresh.is_file() else RECORDED / f"{kind}.json"


def draw(data_dir: Path, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    written = []
    for kind in KINDS:
        path = source(kind, data_dir)
        out = out_dir / f"bench-{kind}.png"
        PLOTS[kind](json.loads(path.read_text()), out)
        print(f"{out.relative_to(REPO) if out.is_relative_to(REPO) else out}: from {path}", flush=True)
        written.append(out)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO / "build" / "bench", help="where runs write their JSON")
    parser.add_argument("--out", type=Path, default=REPO / "docs", help="where the PNGs go")
    parser.add_argument("--plot-only", action="store_true", help="draw from the saved JSON, run nothing")
    parser.add_argument("--runs", default="load,length", help="the quick runs to make (load, length, decode)")
    parser.add_argument("--peers", action="store_true", help="also run bench.peers (decode; compiles for minutes)")
    args = parser.parse_args(argv)
    if not args.plot_only:
        args.data.mkdir(parents=True, exist_ok=True)
        runs = [r for r in args.runs.split(",") if r] + (["decode"] if args.peers else [])
        for kind in runs:
            print(f"# {kind}", flush=True)
            RUNS[kind](args.data / f"{kind}.json")
    draw(args.data, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
