"""The decode step compiled ahead of time (xlora_core/compiled_step.py) against eager, in one process: the
package's build time (export + AOTInductor), its load time, and greedy tok/s after, granular and frozen@0.

    python -m bench.compiled_step                       # docs/compiled-decoding.md; builds into a temp dir
    python -m bench.compiled_step --torch-compile       # also XLoraModel.compile() (minutes more)

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
from xlora_core.compiled_step import build_package, load_package


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="default")
    parser.add_argument("--checkpoint", default="checkpoints/default")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--package", help="use (or build) this package file instead of a temporary one")
    parser.add_argument("--torch-compile", action="store_true", help="also time XLoraModel.compile()")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = load_base_model(args.base, device="cpu", dtype=args.dtype)[0]
    model = XLoraModel.from_pretrained(base, args.checkpoint)
    print(f"dtype {model.dtype}, ISA {torch.backends.cpu.get_cpu_capability()}, {args.threads} thread(s)", flush=True)
    prompt = torch.randint(100, 40000, (1, 1), generator=torch.Generator().manual_seed(0))
    n = args.new_tokens
    routings = {"granular": Routing(), "frozen@0": Routing(freeze_after=0)}

    def run(routing: Routing) -> tuple[float, torch.Tensor]:
        start = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, routing=routing)
        return time.perf_counter() - start, out

    def measure(label: str) -> dict[str, tuple[float, torch.Tensor]]:
        results = {}
        for name, routing in routings.items():
            run(routing)
            best, ids = min(run(routing) for _ in range(2))
            results[name] = (n / best, ids)
            print(f"{label} {name}: {n / best:.1f} tok/s", flush=True)
        return results

    with torch.inference_mode():
        eager = measure("eager")
    path = args.package or f"{tempfile.mkdtemp()}/step.pt2"
    step = load_package(path)
    if step is None:
        start = time.perf_counter()
        build_package(model, path)
        print(f"package built in {time.perf_counter() - start:.0f} s", flush=True)
    start = time.perf_counter()
    step = load_package(path)
    print(f"package loaded in {time.perf_counter() - start:.1f} s", flush=True)
    model.use_packaged_step(step)
    with torch.inference_mode():
        packaged = measure("package")
    for name in routings:
        same = torch.equal(packaged[name][1], eager[name][1])
        print(f"{name}: package {packaged[name][0] / eager[name][0]:.2f}x eager; same tokens as eager: {same}")
    if args.torch_compile:
        model.use_packaged_step(None)
        model.compile()
        with torch.inference_mode():
            start = time.perf_counter()
            run(Routing())
            print(f"XLoraModel.compile(): first generation {time.perf_counter() - start:.0f} s", flush=True)
            compiled = measure("torch.compile")
        for name in routings:
            print(f"{name}: torch.compile {compiled[name][0] / eager[name][0]:.2f}x eager")


if __name__ == "__main__":
    main()
