"""What compiling the decode step costs and gives, per inductor setting: the first compiled generation's
seconds (the compilation) and tok/s after it, against eager, in one process.

    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) python -m bench.compile_time --autotune CPP  # docs/benchmarks.md
    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) python -m bench.compile_time --autotune none

The embedded default in float32, greedy, --new-tokens from a 1-token prompt (prefill included), 1 thread.
Without --autotune, what `XLoraModel.compile()` does on this CPU (`CPP,ATEN` with AMX, else `none`); `CPP`
takes inductor's C++ GEMMs, `CPP,ATEN` benchmarks them against aten's matmuls, `none` freezes the weights for
oneDNN's packed matmuls. An empty cache dir times a cold compilation.
"""

from __future__ import annotations

import argparse
import time

import torch

from xlora_core import XLoraModel
from xlora_core.base_model import load_base_model
from xlora_core.compiled_step import inductor_configs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="default")
    parser.add_argument("--checkpoint", default="checkpoints/default")
    parser.add_argument("--autotune", help="GEMM backends to autotune among, or none (default: compile()'s)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = XLoraModel.from_pretrained(load_base_model(args.base, device="cpu", dtype="float32")[0], args.checkpoint)
    prompt = torch.randint(100, 40000, (1, 1), generator=torch.Generator().manual_seed(0))
    n = args.new_tokens

    def run() -> tuple[float, torch.Tensor]:
        start = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return time.perf_counter() - start, out

    with torch.inference_mode():
        run()
        eager_s, eager_ids = run()
        print(f"eager: {n / eager_s:.1f} tok/s", flush=True)
        model.compile()
        if args.autotune is not None:  # the variant's settings instead of compile()'s
            model._inductor_config = inductor_configs(model, args.autotune)
        setting = args.autotune or model._inductor_config.get("max_autotune_gemm_backends", "none")
        first_s, ids = run()
        print(f"first compiled generation: {first_s:.0f} s", flush=True)
        best = min(run()[0] for _ in range(3))
        print(f"compiled ({setting}): {n / best:.1f} tok/s, {eager_s / best:.2f}x eager; "
              f"same tokens as eager: {torch.equal(ids, eager_ids)}")  # fmt: skip


if __name__ == "__main__":
    main()
