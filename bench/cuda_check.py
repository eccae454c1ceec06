"""The CUDA path in one short run, prepared for a session that is lent a GPU (docs/benchmarks.md, "On a GPU").

    python -m bench.cuda_check                        # on the GPU: a few minutes
    python -m bench.cuda_check --device cpu --modes none --new-tokens 8   # the same steps on the CPU, to check
                                                                          # the script (compiling there takes minutes)

The embedded default (SmolLM2-135M-Instruct and its three experts) in bfloat16 on the device, in one process:

- greedy tok/s from a 1-token prompt (best of --repeats): transformers' base model alone, then ours eager and
  compiled with `XLoraModel.compile(mode=...)` for each of --modes ("default": torch.compile's; "reduce-overhead":
  the same with CUDA graphs), granular and frozen@0, each after one warm-up run (which compiles);
- the peak memory of each (torch.cuda.max_memory_allocated; not measured on the CPU);
- whether each compiled mode gives eager's greedy tokens;
- of 8 prompts, how many get other greedy tokens prefilled together, and joining a running batch, than alone
  (bench.batch_invariance's check; on CUDA attention stays batched, so nothing promises 0 there).

One table at the end, with the device's name. On the CPU the compiled modes are XLoraModel.compile() as on the
GPU (not the AOTInductor package the server uses there: bench.peers measures that).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from bench.batch_invariance import EXTRA_PROMPTS, differing_rows
from bench.load import PROMPTS
from xlora_core import Routing, XLoraModel
from xlora_core.base_model import load_base_model


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_best(fn: Callable[[], torch.Tensor], device: torch.device, repeats: int) -> tuple[float, torch.Tensor]:
    """(best seconds of `repeats` runs, the last output)."""
    best, out = float("inf"), None
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        out = fn()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best, out


def peak_memory_mib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--base", default="default")
    parser.add_argument("--checkpoint", default="checkpoints/default")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", default="default,reduce-overhead",
                        help="torch.compile modes to try, comma-separated; none: eager only")  # fmt: skip
    parser.add_argument("--invariance-tokens", type=int, default=16, help="new tokens per prompt in the batch check")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here; `--device cpu` runs the same steps on the CPU")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    modes = [] if args.modes == "none" else args.modes.split(",")

    base, tokenizer = load_base_model(args.base, device=args.device, dtype="bfloat16")
    model = XLoraModel.from_pretrained(load_base_model(args.base, device=args.device, dtype="bfloat16")[0],
                                       args.checkpoint)  # fmt: skip
    print(f"{name}, torch {torch.__version__}, {model.dtype}, {args.new_tokens} new tokens from a 1-token prompt",
          flush=True)  # fmt: skip
    n = args.new_tokens
    prompt = torch.randint(100, base.config.vocab_size, (1, 1), generator=torch.Generator().manual_seed(0))
    prompt = prompt.to(device)
    kwargs = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False)
    runs: dict[str, Callable[[], torch.Tensor]] = {
        "granular": lambda: model.generate(prompt, **kwargs),
        "frozen@0": lambda: model.generate(prompt, routing=Routing(freeze_after=0), **kwargs),
    }
    rows: list[tuple[str, str, float, float | None, str]] = []  # (path, kind, tok/s, peak MiB, same tokens)
    eager_tokens: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        reset_peak(device)
        base_run = lambda: base.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), **kwargs)  # noqa: E731
        base_run()
        seconds, _ = timed_best(base_run, device, args.repeats)
        rows.append(("base model alone", "-", n / seconds, peak_memory_mib(device), "-"))
        for mode in [None, *modes]:
            model.compile(mode is not None, mode=None if mode == "default" else mode)
            path = "eager" if mode is None else f"compiled ({mode})"
            for kind, fn in runs.items():
                reset_peak(device)
                synchronize(device)
                start = time.perf_counter()
                fn()  # the warm-up; compiles on the first steps
                synchronize(device)
                if mode is not None:
                    print(f"{path} {kind}: first run (compiling) {time.perf_counter() - start:.1f} s", flush=True)
                seconds, out = timed_best(fn, device, args.repeats)
                if mode is None:
                    eager_tokens[kind] = out
                same = "-" if mode is None else str(torch.equal(out, eager_tokens[kind]))
                rows.append((path, kind, n / seconds, peak_memory_mib(device), same))
                print(f"{path} {kind}: {n / seconds:.1f} tok/s", flush=True)
        model.compile(False)
        prompts = [tokenizer(p)["input_ids"] for p in PROMPTS + EXTRA_PROMPTS]
        together, joining = differing_rows(model, prompts, args.invariance_tokens)

    print(f"\n## bench.cuda_check: {name}, torch {torch.__version__}, bf16, {n} new tokens, best of {args.repeats}\n")
    print("| decode | routing | tok/s | peak memory (MiB) | eager's tokens |")
    print("|---|---|---:|---:|---|")
    for path, kind, rate, mib, same in rows:
        print(f"| {path} | {kind} | {rate:.1f} | {'-' if mib is None else f'{mib:.0f}'} | {same} |")
    print(f"\n8 prompts, eager, {args.invariance_tokens} new tokens: {together} of 8 rows with other greedy tokens "
          f"together than alone, {joining} of 8 joining a running batch")  # fmt: skip


if __name__ == "__main__":
    main()
