"""The decode step compiled ahead of time (xlora_core/compiled_step.py) against eager, in one process: each
package's build time (export + AOTInductor), its load time and the memory (RSS) loading it adds, then greedy
tok/s, granular and frozen@0, eager and each package taking turns (so that a busy machine slows them alike).

    python -m bench.compiled_step                                   # docs/compiled-decoding.md
    python -m bench.compiled_step --package a.pt2 --package b.pt2   # packages built before (or built now)
    XLORA_COMPILE_AUTOTUNE=none python -m bench.compiled_step       # a package built without autotuning

The embedded default in the server's default dtype (bf16 on CPUs with native bf16), --new-tokens from a
1-token prompt (prefill included), 1 torch thread. An empty TORCHINDUCTOR_CACHE_DIR times a cold build.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from xlora_core import Routing, XLoraModel
from xlora_core.base_model import load_base_model
from xlora_core.compiled_step import AUTOTUNE, PackagedStep, build_package, cpu_features, load_package

from .models import rss_mib


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="default")
    parser.add_argument("--checkpoint", default="checkpoints/default")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--package", action="append", help="a package file to use, built now if missing (repeatable)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = load_base_model(args.base, device="cpu", dtype=args.dtype)[0]
    model = XLoraModel.from_pretrained(base, args.checkpoint)
    print(f"{model.dtype}, CPU {cpu_features()}, {args.threads} thread(s), torch {torch.__version__}", flush=True)
    steps: dict[str, PackagedStep | None] = {"eager": None}
    model_mib = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**20
    before_all = rss_mib()
    for path in args.package or [f"{tempfile.mkdtemp()}/step.pt2"]:
        if load_package(path) is None:
            start = time.perf_counter()
            build_package(model, path)
            print(f"{path}: built in {time.perf_counter() - start:.0f} s (autotune: {AUTOTUNE})", flush=True)
        start, before = time.perf_counter(), rss_mib()
        steps[path] = load_package(path)
        print(f"{path}: loaded in {time.perf_counter() - start:.1f} s, RSS +{rss_mib() - before:.0f} MiB "
              f"(the model: {model_mib:.0f} MiB of weights, RSS {before_all:.0f} MiB before any package)", flush=True)

    prompt = torch.randint(100, 40000, (1, 1), generator=torch.Generator().manual_seed(0))
    n = args.new_tokens
    routings = {"granular": Routing(), "frozen@0": Routing(freeze_after=0)}
    best: dict[tuple[str, str], float] = {}
    tokens: dict[tuple[str, str], torch.Tensor] = {}
    with torch.inference_mode():
        for round in range(args.rounds + 1):  # round 0 warms up
            for name, step in steps.items():
                model.use_packaged_step(step)
                for kind, routing in routings.items():
                    start = time.perf_counter()
                    out = model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, routing=routing)
                    seconds = time.perf_counter() - start
                    if round:
                        best[name, kind] = min(best.get((name, kind), seconds), seconds)
                    tokens[name, kind] = out
    for kind in routings:
        eager = n / best["eager", kind]
        print(f"{kind}: eager {eager:.1f} tok/s", flush=True)
        for name in list(steps)[1:]:
            rate = n / best[name, kind]
            same = torch.equal(tokens[name, kind], tokens["eager", kind])
            print(f"{kind}: {name} {rate:.1f} tok/s, {rate / eager:.2f}x eager; the same tokens as eager: {same}")


if __name__ == "__main__":
    main()
