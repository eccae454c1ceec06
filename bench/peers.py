"""Per-token speed against mistral.rs, the one other engine with X-LoRA, side by side in one run.

Both engines run the embedded default (SmolLM2-135M-Instruct, the three experts on all 7 linear
modules = 210 LoRA layers, the trained router), greedy, exactly --new-tokens new tokens from a
--prompt-tokens prompt (1 by default: mistral.rs 0.9.5's X-LoRA fails on longer prompts on CPU).
mistral.rs runs first, in its own venv (`../shared/peers/mistralrs/setup.sh build/peers` makes it),
then ours in this process: the base model alone (transformers' generate with its KV cache, the
anchor), X-LoRA granular, and X-LoRA with frozen scalings (freeze_after 0), per dtype, each eagerly and
as `xlora-serve` runs by default: with the compiled decode step (the package from the cache, built first
if it is missing; docs/compiled-decoding.md).

    python -m bench.peers                                   # make bench-peers: the defaults (dtype, threads)
    python -m bench.peers --threads 1 --dtypes float32,bfloat16
    python -m bench.peers --no-mistralrs --eager-only       # ours only, eager only
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from xlora_core import Routing, XLoraModel
from xlora_core.base_model import load_base_model, resolve_dtype
from xlora_core.compiled_step import build_package_once, load_package, package_path, supported

from .report import machine

PEERS = Path(__file__).resolve().parents[1].parent / "shared" / "peers" / "mistralrs"


def mistralrs_tok_per_s(args: argparse.Namespace) -> dict[str, float]:
    """mode -> tok/s of bench_mrs.py (base-1tok, xlora-1tok), best of --repeats; {} when not set up."""
    peers_dir = Path(args.peers_dir).resolve()  # its ordering file names the base model by absolute path
    python = peers_dir / "venv-mistralrs" / "bin" / "python"
    script = Path(args.peers_source) / "bench_mrs.py"
    if not python.is_file() or not script.is_file():
        print(f"mistral.rs skipped: {python} or {script} missing (run {Path(args.peers_source) / 'setup.sh'} "
              f"{args.peers_dir})", file=sys.stderr)  # fmt: skip
        return {}
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cmd = [str(python), str(script), "--base", str(peers_dir / "smollm2"), "--xlora-dir",
               str(peers_dir / "xlora_mrs"), "--prompt-tokens", str(args.prompt_tokens), "--new-tokens",
               str(args.new_tokens), "--modes", "base-1tok,xlora-1tok" if args.prompt_tokens == 1 else "base,xlora",
               "--repeats", str(args.repeats), "--threads", str(args.threads), "--json", out.name]  # fmt: skip
        subprocess.run(cmd, check=True)
        results = json.load(open(out.name))["results"]
    return {r["mode"].removesuffix("-1tok"): r["tok_per_s"] for r in results if "error" not in r}


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def ours_tok_per_s(args: argparse.Namespace, dtype: str) -> dict[str, float]:
    """name -> tok/s: the base model alone, X-LoRA granular and frozen (freeze_after 0) eagerly, and unless
    --eager-only also with the packaged decode step ("granular compiled", "frozen compiled"; "build s": what
    building it took, 0 when it was in the cache)."""
    base, _ = load_base_model(args.base, device="cpu", dtype=dtype)
    model = XLoraModel.from_pretrained(load_base_model(args.base, device="cpu", dtype=dtype)[0], args.checkpoint)
    n = args.new_tokens
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(100, base.config.vocab_size, (1, args.prompt_tokens), generator=g)
    kwargs = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False)
    runs = {
        "base": lambda: base.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), **kwargs),
        "granular": lambda: model.generate(prompt, **kwargs),
        "frozen": lambda: model.generate(prompt, routing=Routing(freeze_after=0), **kwargs),
    }
    out = {}
    with torch.inference_mode():
        for name, fn in runs.items():
            fn()  # warm-up
            out[name] = n / best_time(fn, args.repeats)
            print(f"ours {dtype} {name}: {out[name]:.2f} tok/s", file=sys.stderr, flush=True)
    if args.eager_only or supported(model) is not None:
        return out
    path = package_path(model)
    start = time.perf_counter()
    built = build_package_once(model, path)
    out["build s"] = time.perf_counter() - start if built else 0.0
    model.use_packaged_step(load_package(path))
    with torch.inference_mode():
        for name in ("granular", "frozen"):
            runs[name]()  # warm-up
            out[f"{name} compiled"] = n / best_time(runs[name], args.repeats)
            print(f"ours {dtype} {name} compiled: {out[f'{name} compiled']:.2f} tok/s", file=sys.stderr, flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="default")
    parser.add_argument("--checkpoint", default="checkpoints/default")
    parser.add_argument("--prompt-tokens", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per engine; the best is reported")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="default: torch's, as xlora-serve")
    parser.add_argument("--dtypes", default="auto", help="comma-separated; auto: what xlora-serve picks here")
    parser.add_argument("--eager-only", action="store_true", help="skip the compiled decode step")
    parser.add_argument("--peers-dir", default="build/peers", help="where setup.sh put mistral.rs' venv and model")
    parser.add_argument("--peers-source", default=str(PEERS), help="the folder of bench_mrs.py and setup.sh")
    parser.add_argument("--no-mistralrs", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the tok/s here (bench.report plots them)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    peer = {} if args.no_mistralrs else mistralrs_tok_per_s(args)
    dtypes = [str(resolve_dtype(d)).removeprefix("torch.") if d == "auto" else d for d in args.dtypes.split(",")]
    ours = {dtype: ours_tok_per_s(args, dtype) for dtype in dtypes}

    print(f"\nmachine: {machine()}, {args.threads} thread(s), torch "
          f"{torch.__version__}; {args.new_tokens} new tokens from a {args.prompt_tokens}-token prompt, greedy; "
          f"tok/s (best of {args.repeats}); X-LoRA ratios to mistral.rs's X-LoRA in brackets")  # fmt: skip
    mrs = peer.get("xlora")

    def vs(x: float) -> str:
        return f"{x:.1f} ({x / mrs:.2f}x)" if mrs else f"{x:.1f}"

    print("| engine | base alone | X-LoRA granular | X-LoRA frozen | granular / own base | frozen / own base |")
    print("|---|---:|---:|---:|---:|---:|")
    if peer:
        print(f"| mistral.rs (fp32) | {peer.get('base', float('nan')):.1f} | {mrs:.1f} (1.00x) | - | "
              f"{mrs / peer['base']:.2f}x | - |")  # fmt: skip
    for dtype, r in ours.items():
        for suffix in ("", " compiled") if "granular compiled" in r else ("",):
            granular, frozen = r[f"granular{suffix}"], r[f"frozen{suffix}"]
            print(f"| xlora_core ({dtype}{suffix or ' eager'}) | {r['base']:.1f} | {vs(granular)} | {vs(frozen)} | "
                  f"{granular / r['base']:.2f}x | {frozen / r['base']:.2f}x |")  # fmt: skip
    for dtype, r in ours.items():
        if "build s" in r:
            built = f"built in {r['build s']:.0f} s" if r["build s"] else "loaded from the cache"
            print(f"{dtype}: the compiled decode step was {built}")
    if args.json:
        args.json.write_text(json.dumps({"mistralrs": peer, "ours": ours, "new_tokens": args.new_tokens}, indent=1))


if __name__ == "__main__":
    main()
