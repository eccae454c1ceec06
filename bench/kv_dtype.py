"""The KV caches' dtype on CPU: decode step time of the embedded default in float32, in bfloat16 with
float32 KV caches (what a bf16 model on CPU uses), and in bfloat16 with bfloat16 caches (the base model's
plain "sdpa" attention), side by side in one process, per batch size and context length.

    python -m bench.kv_dtype --threads 1            # docs/benchmarks.md, "Long sequences"

Granular X-LoRA (two passes a step); the step time is the mean of --steps decode steps after a prefill
of the given length and two warm-up steps, without the prefill.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from xlora_core import XLoraModel
from xlora_core.base_model import load_base_model
from xlora_core.batch_invariant import ROW_SDPA


def step_ms(model: XLoraModel, batch: int, context: int, steps: int) -> float:
    ids = torch.randint(100, 1000, (batch, context), generator=torch.Generator().manual_seed(context))
    logits, _, cache = model.prefill(ids)
    tokens = logits.argmax(-1)
    for _ in range(2):
        model.decode(tokens, cache)
    start = time.perf_counter()
    for _ in range(steps):
        model.decode(tokens, cache)
    return (time.perf_counter() - start) / steps * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="default")
    parser.add_argument("--checkpoint", default="checkpoints/default")
    parser.add_argument("--shapes", default="1x24,8x24,1x1024,8x512", help="batch x context, comma-separated")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    fp32 = XLoraModel.from_pretrained(load_base_model(args.base, device="cpu", dtype="float32")[0], args.checkpoint)
    bf16 = XLoraModel.from_pretrained(load_base_model(args.base, device="cpu", dtype="bfloat16")[0], args.checkpoint)
    print(f"machine: {platform.processor() or platform.machine()}, {args.threads} thread(s), torch {torch.__version__}")
    print("ms per granular decode step; in brackets the ratio to float32")
    print("| batch x context | float32 | bfloat16, float32 KV | bfloat16, bfloat16 KV |")
    print("|---|---:|---:|---:|")
    for shape in args.shapes.split(","):
        batch, context = (int(x) for x in shape.split("x"))
        base_ms = step_ms(fp32, batch, context, args.steps)
        bf16.base.set_attn_implementation(ROW_SDPA)
        wide = step_ms(bf16, batch, context, args.steps)
        bf16.base.set_attn_implementation("sdpa")  # plain SDPA: the caches hold bf16
        narrow = step_ms(bf16, batch, context, args.steps)
        print(f"| {batch} x {context} | {base_ms:.1f} | {wide:.1f} ({wide / base_ms:.2f}x) | "
              f"{narrow:.1f} ({narrow / base_ms:.2f}x) |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
