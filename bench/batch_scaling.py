"""How a decode step's cost grows with the batch: the ceiling batching can reach on this machine.

    python -m bench.batch_scaling --threads 1        # docs/benchmarks.md, "Serving under load"
    python -m bench.batch_scaling --threads 1 --package a.pt2 --package b.pt2   # compiled steps too

For each batch size, side by side in one process:
- the granular X-LoRA decode step of the embedded default (eager, both passes, LM head), after a prefill
  of --context tokens per row and two warm-up steps;
- the matmuls alone: the model's own linear layers (every layer's base weights twice, one per pass, and
  the LM head once) applied in a step's order to [batch, 1, in] inputs, so that the weights stream from
  memory as in a real step.
Tokens/s at batch b over tokens/s at batch 1 is the most that b clients can get from batching; if the
matmuls alone already cost much more at b than at 1, the rest of the step is not what limits it.
With --package, the same step through each compiled-step package (xlora_core/compiled_step.py; built first
if the file is missing), in the same process, after the eager one.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
import torch.nn.functional as F

from bench.kv_dtype import step_ms  # the same granular decode step, timed after a prefill
from xlora_core import XLoraModel
from xlora_core.base_model import load_base_model
from xlora_core.compiled_step import build_package, load_package


def matmuls_ms(weights: list[torch.Tensor], head: torch.Tensor, batch: int, steps: int) -> float:
    """One step's matmuls: every base weight twice (scaling pass, real pass), then the LM head."""
    dtype = head.dtype
    inputs = {w.shape[1]: torch.randn(batch, 1, w.shape[1], dtype=dtype) for w in [*weights, head]}

    def once() -> None:
        for _ in range(2):
            for w in weights:
                F.linear(inputs[w.shape[1]], w)
        F.linear(inputs[head.shape[1]], head)

    for _ in range(2):
        once()
    start = time.perf_counter()
    for _ in range(steps):
        once()
    return (time.perf_counter() - start) / steps * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="default")
    parser.add_argument("--checkpoint", default="checkpoints/default")
    parser.add_argument("--dtype", default="auto", help="the model's dtype, as model.dtype in the YAML")
    parser.add_argument("--batch-sizes", default="1,2,4,8")
    parser.add_argument("--context", type=int, default=32, help="prompt tokens per row before the timed steps")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--package", action="append", default=[], help="a compiled-step package (repeatable)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base, _ = load_base_model(args.base, device="cpu", dtype=args.dtype)
    model = XLoraModel.from_pretrained(base, args.checkpoint)
    packages = {}
    for path in args.package:
        if load_package(path) is None:
            build_package(model, path)
        packages[path] = load_package(path)
    head = base.get_output_embeddings().weight
    # The decoder's own linear layers (inside the fused LoRA layers), in the order a pass runs them.
    weights = [m.weight for m in base.modules() if isinstance(m, torch.nn.Linear) and m.weight is not head]

    print(f"machine: {platform.processor() or platform.machine()}, {args.threads} thread(s), "
          f"torch {torch.__version__}, {head.dtype}; {len(weights)} linear layers + LM head, "
          f"context {args.context}")  # fmt: skip
    compiled = "".join(f" {path}: step (ms) | tok/s vs batch 1 |" for path in packages)
    print("| batch | X-LoRA step (ms) | tok/s | tok/s vs batch 1 | matmuls alone (ms) | matmuls vs batch 1 "
          f"| rest of the step (ms) |{compiled}")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|" + "---:|---:|" * len(packages))
    with torch.inference_mode():
        first: dict[str, float] = {}
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            step = step_ms(model, batch, args.context, args.steps)
            mm = matmuls_ms(weights, head, batch, args.steps)
            row = {"eager": batch / step * 1000, "matmuls": mm}
            cells = ""
            for path, package in packages.items():
                model.use_packaged_step(package)
                try:
                    package_step = step_ms(model, batch, args.context, args.steps)
                finally:
                    model.use_packaged_step(None)
                row[path] = batch / package_step * 1000
                first.setdefault(path, row[path])
                cells += f" {package_step:.1f} | {row[path] / first[path]:.2f}x |"
            first.setdefault("eager", row["eager"])
            first.setdefault("matmuls", mm)
            print(f"| {batch} | {step:.1f} | {row['eager']:.1f} | {row['eager'] / first['eager']:.2f}x | {mm:.1f} | "
                  f"{mm / first['matmuls']:.2f}x | {step - mm:.1f} |{cells}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
