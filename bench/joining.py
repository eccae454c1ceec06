"""What a newcomer costs the running batch: prefilled on its own and then joined (the engine before), or
prefilled in the running rows' decode step (`DecodeBatch.step(joining=...)`, one ragged forward).

    python -m bench.joining --threads 1             # docs/benchmarks.md, "Serving under load"

Side by side in one process, on the embedded default (granular X-LoRA): a batch of R running rows
(--context tokens each, two steps in), one newcomer with a P-token prompt. Each way is timed from the
batch before the newcomer to every row (the newcomer included) having its next token; best of
--repeats, taken in turns. The running rows' decode step alone is timed the same way, so what the
newcomer adds is the difference.
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable

import torch

from xlora_core import BatchRow, DecodeBatch, Routing, RowDecoder, SamplingParams, XLoraModel
from xlora_core.base_model import load_base_model


def rows(n: int, length: int, seed: int) -> list[BatchRow]:
    ids = torch.randint(100, 1000, (n, length), generator=torch.Generator().manual_seed(seed))
    params = SamplingParams(max_new_tokens=64, min_new_tokens=64)
    return [BatchRow(RowDecoder(params, None, row.tolist()), Routing()) for row in ids]


def timed(model: XLoraModel, running: int, context: int, prompt: int, way: Callable[..., object]) -> float:
    """ms of `way(model, batch, newcomer)` on a fresh batch of `running` rows two steps in."""
    batch, _ = DecodeBatch.prefill(model, rows(running, context, seed=1))
    batch.step()
    batch.step()
    newcomer = rows(1, prompt, seed=2)[0]
    start = time.perf_counter()
    way(model, batch, newcomer)
    return (time.perf_counter() - start) * 1000


def step_only(model: XLoraModel, batch: DecodeBatch, newcomer: BatchRow) -> None:
    batch.step()


def apart(model: XLoraModel, batch: DecodeBatch, newcomer: BatchRow) -> None:
    alone, _ = DecodeBatch.prefill(model, [newcomer])
    batch.step()  # the running rows' token, while the newcomer waits with its first
    batch.concatenate([alone])


def together(model: XLoraModel, batch: DecodeBatch, newcomer: BatchRow) -> None:
    batch.step(joining=[newcomer])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="default")
    parser.add_argument("--checkpoint", default="checkpoints/default")
    parser.add_argument("--dtype", default="auto", help="the model's dtype, as model.dtype in the YAML")
    parser.add_argument("--shapes", default="1x9,7x9,7x32", help="running rows x newcomer's prompt tokens")
    parser.add_argument("--context", type=int, default=24, help="tokens each running row has when the newcomer comes")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base, _ = load_base_model(args.base, device="cpu", dtype=args.dtype)
    model = XLoraModel.from_pretrained(base, args.checkpoint)
    print(f"machine: {platform.processor() or platform.machine()}, {args.threads} thread(s), torch "
          f"{torch.__version__}, {model.dtype}; running rows have {args.context} tokens; "
          f"ms, best of {args.repeats}")  # fmt: skip
    print("| running rows x prompt | decode step alone | prefill apart, then join | joining in the step | "
          "newcomer's cost apart | in the step |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|")
    ways = {"step": step_only, "apart": apart, "together": together}
    with torch.inference_mode():
        for shape in args.shapes.split(","):
            running, prompt = (int(x) for x in shape.split("x"))
            best = {name: float("inf") for name in ways}
            for _ in range(args.repeats):
                for name, way in ways.items():
                    best[name] = min(best[name], timed(model, running, args.context, prompt, way))
            step, apart_ms, together_ms = best["step"], best["apart"], best["together"]
            print(f"| {running} x {prompt} | {step:.1f} | {apart_ms:.1f} | {together_ms:.1f} | "
                  f"{apart_ms - step:.1f} | {together_ms - step:.1f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
