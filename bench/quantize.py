"""A quantized base (model.quantize, docs/quantization.md) against the full-precision one, side by side in one run.

The embedded default (SmolLM2-135M-Instruct, three experts on all 7 linear modules, the trained router) in
the default dtype, its base at none / int8 / int4: greedy tok/s of X-LoRA granular and frozen at 0 (exactly
--new-tokens from a --prompt-tokens prompt), the timed runs interleaved across the modes so that a busy
machine slows them alike (compare the ratios); the weight bytes held; and each mode's process RSS after
loading, measured in a fresh process of its own.

    python -m bench.quantize --threads 1                 # eager
    python -m bench.quantize --threads 1 --compile       # the compiled decode step (minutes of compiling)
    python -m bench.quantize --eval 20 --no-speed        # exact-match accuracy, X-LoRA dense, 20 held-out per task

The accuracy is make eval's (xlora_core/recipe/evaluation.py) X-LoRA dense row on a subset: each task's
first --eval held-out examples (the eval split's seed 2024).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time

import torch

from xlora_core import Routing, XLoraModel
from xlora_core.base_model import load_base_model
from xlora_core.quantize import weight_bytes
from xlora_core.recipe.tasks import TASKS, make_examples
from xlora_core.training import accuracy

MODES = ("none", "int8", "int4")


def load(args: argparse.Namespace, mode: str) -> XLoraModel:
    base, _ = load_base_model(args.base, device="cpu", dtype=args.dtype, quantize=mode)
    return XLoraModel.from_pretrained(base, args.checkpoint)


def rss_after_load(args: argparse.Namespace, mode: str) -> dict[str, float]:
    """Peak RSS (MB) of a fresh process that loads the model at `mode`, and its weight bytes (MB)."""
    code = (
        "import json, resource, sys, torch; from bench.quantize import load, weight_bytes; import argparse; "
        f"a = argparse.Namespace(**{vars(args)!r}); m = load(a, {mode!r}); "
        "print(json.dumps({'rss': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "
        "'weights': weight_bytes(m) / 1e6}))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="default")
    parser.add_argument("--checkpoint", default="checkpoints/default")
    parser.add_argument("--dtype", default="auto", help="auto = bfloat16 on CPUs with native bf16")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--prompt-tokens", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per mode, interleaved; the best is kept")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--compile", action="store_true", help="time the compiled decode step instead of eager")
    parser.add_argument("--no-rss", action="store_true", help="skip the fresh processes that measure RSS")
    parser.add_argument("--eval", type=int, default=0, help="also the accuracy on this many held-out examples a task")
    parser.add_argument("--no-speed", action="store_true", help="skip the timed generations")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    modes = args.modes.split(",")

    memory = {} if args.no_rss else {mode: rss_after_load(args, mode) for mode in modes}
    models = {mode: load(args, mode) for mode in modes}
    if args.eval:
        report_accuracy(args, models)
    if not args.no_speed:
        report_speed(args, models, memory)


def report_accuracy(args: argparse.Namespace, models: dict[str, XLoraModel]) -> None:
    _, tokenizer = load_base_model(args.base, device="cpu", dtype=args.dtype)
    examples = {task: make_examples(task, args.eval, 2024, split="eval") for task in TASKS}
    print(f"\nexact match, X-LoRA dense, {args.eval} held-out examples a task, dtype {args.dtype}")
    print("| quantize | " + " | ".join(TASKS) + " |")
    print("|---|" + "---:|" * len(TASKS))
    for mode, model in models.items():
        scores = [accuracy(model, tokenizer, examples[task]) for task in TASKS]
        print(f"| {mode} | " + " | ".join(f"{100 * s:.0f}%" for s in scores) + " |", flush=True)


def report_speed(args: argparse.Namespace, models: dict[str, XLoraModel], memory: dict[str, dict[str, float]]) -> None:
    modes = list(models)
    n = args.new_tokens
    vocab = models[modes[0]].base.config.vocab_size
    prompt = torch.randint(100, vocab, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
    kwargs = dict(max_new_tokens=n, min_new_tokens=n)
    routings = {"granular": Routing(), "frozen@0": Routing(freeze_after=0)}
    best: dict[tuple[str, str], float] = {}
    tokens: dict[tuple[str, str], list[int]] = {}
    with torch.inference_mode():
        for mode, model in models.items():
            if args.compile:
                model.compile()
            started = time.perf_counter()
            for name, routing in routings.items():  # warm-up (and compilation)
                tokens[mode, name] = model.generate(prompt, routing=routing, **kwargs)[0].tolist()
            print(f"{mode}: warm-up {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
        for _ in range(args.repeats):
            for mode, model in models.items():
                for name, routing in routings.items():
                    start = time.perf_counter()
                    model.generate(prompt, routing=routing, **kwargs)
                    seconds = time.perf_counter() - start
                    best[mode, name] = min(best.get((mode, name), float("inf")), seconds)

    cpu = platform.processor() or platform.machine()
    print(f"\nmachine: {cpu}, {args.threads} thread(s), torch {torch.__version__}, dtype {args.dtype}, "
          f"{'compiled' if args.compile else 'eager'}; {n} new tokens from a {args.prompt_tokens}-token prompt, "
          f"greedy; tok/s (best of {args.repeats}), ratio to none in brackets")  # fmt: skip
    print("| quantize | granular tok/s | frozen@0 tok/s | weights MB | RSS MB | tokens as none's (granular) |")
    print("|---|---:|---:|---:|---:|---:|")
    for mode in modes:
        cells = []
        for name in routings:
            tps, ref = n / best[mode, name], n / best[modes[0], name]
            cells.append(f"{tps:.1f} ({tps / ref:.2f}x)")
        mem = memory.get(mode, {})
        ref_tokens, own = tokens[modes[0], "granular"], tokens[mode, "granular"]
        pairs = list(zip(own, ref_tokens, strict=True))[args.prompt_tokens :]
        same = next((i for i, (a, b) in enumerate(pairs) if a != b), n)  # tokens before the first difference
        print(f"| {mode} | {cells[0]} | {cells[1]} | {weight_bytes(models[mode]) / 1e6:.0f} | "
              f"{mem.get('rss', float('nan')):.0f} | {same}/{n} |")  # fmt: skip
    print(f"peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
