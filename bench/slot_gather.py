"""What KV slots per batch row would cost a decode step on CPU, where torch's attention takes a step's rows
as one tensor: gathering every row's keys and values out of per-slot buffers, per layer and pass.

    python -m bench.slot_gather --threads 1          # docs/benchmarks.md, "Against mistral.rs" (what is not built)

The buffers have the embedded default's shapes (its layers, KV heads and head size, float32 as on CPU),
for both passes, 8 slots with 256 tokens of room; the rows sit in scattered slots, as after some have
left. The mean of --steps gathers is printed per rows x context.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from xlora_core.base_model import load_base_model


def gather(buffers: list[torch.Tensor], slots: torch.Tensor, context: int) -> None:
    """Every row's first `context` tokens out of its slot, one tensor per buffer, as attention would read them."""
    for b in buffers:
        b[:, :, :context].index_select(0, slots)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="default")
    parser.add_argument("--shapes", default="4x64,8x64,8x256,8x1024", help="rows x context, comma-separated")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = load_base_model(args.base, device="cpu", dtype="float32")[0].config
    layers, heads = config.num_hidden_layers, config.num_key_value_heads
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    print(f"machine: {platform.processor() or platform.machine()}, {args.threads} thread(s), "
          f"torch {torch.__version__}; "
          f"{layers} layers x 2 passes x keys and values, {heads} KV heads of {dim}, float32")  # fmt: skip
    print("| rows x context | ms per step | MiB gathered |")
    print("|---|---:|---:|")
    for shape in args.shapes.split(","):
        rows, context = (int(x) for x in shape.split("x"))
        buffers = [torch.randn(8, heads, context + 256, dim) for _ in range(layers * 2 * 2)]
        slots = torch.randperm(8, generator=torch.Generator().manual_seed(0))[:rows]
        gather(buffers, slots, context)
        start = time.perf_counter()
        for _ in range(args.steps):
            gather(buffers, slots, context)
        ms = (time.perf_counter() - start) / args.steps * 1000
        mib = len(buffers) * rows * heads * context * dim * 4 / 2**20
        print(f"| {rows} x {context} | {ms:.1f} | {mib:.0f} |", flush=True)


if __name__ == "__main__":
    main()
