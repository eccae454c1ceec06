"""Per-token speed against mistral.rs, the one other engine with X-LoRA, side by side in one run.

Both engines run the embedded default (SmolLM2-135M-Instruct, the three experts on all 7 linear
modules = 210 LoRA layers, the trained router), greedy, exactly --new-tokens new tokens from a
--prompt-tokens prompt (1 by default: mistral.rs 0.9.5's X-LoRA fails on longer prompts on CPU).
mistral.rs runs first, in its own venv (`../shared/peers/mistralrs/setup.sh build/peers` makes it),
then ours in this process: the base model alone (transformers' generate with its KV cache, the
anchor), X-LoRA granular, and X-LoRA with frozen scalings (freeze_after 0), per dtype.

    python -m bench.peers --threads 1 --compile            # make bench-peers (eager and compiled)
    python -m bench.peers --no-mistralrs --dtypes bfloat16 # ours only
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from xlora_core import Routing, XLoraModel
from xlora_core.base_model import load_base_model

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
    """name -> tok/s: the base model alone, X-LoRA granular and frozen (freeze_after 0), eager; with
    --compile also both compiled ("granular compiled", "frozen compiled") and "compile s", the first
    compiled generation's seconds."""
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
        if args.compile:
            model.compile()
            out["compile s"] = best_time(runs["granular"], 1)  # the first steps compile
            runs["frozen"]()
            for name in ("granular", "frozen"):
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
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--compile", action="store_true", help="also time ours after XLoraModel.compile()")
    parser.add_argument("--peers-dir", default="build/peers", help="where setup.sh put mistral.rs' venv and model")
    parser.add_argument("--peers-source", default=str(PEERS), help="the folder of bench_mrs.py and setup.sh")
    parser.add_argument("--no-mistralrs", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the tok/s here (bench.report plots them)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    peer = {} if args.no_mistralrs else mistralrs_tok_per_s(args)
    ours = {dtype: ours_tok_per_s(args, dtype) for dtype in args.dtypes.split(",")}

    print(f"\nmachine: {platform.processor() or platform.machine()}, {args.threads} thread(s), torch "
          f"{torch.__version__}; {args.new_tokens} new tokens from a {args.prompt_tokens}-token prompt, greedy; "
          f"tok/s (best of {args.repeats}); X-LoRA ratios to mistral.rs's X-LoRA in brackets")  # fmt: skip
    mrs = peer.get("xlora")

    def vs(x: float) -> str:
        return f"{x:.1f} ({x / mrs:.2f}x)" if mrs else f"{x:.1f}"

    print("| engine | base alone | X-LoRA granular | X-LoRA frozen | granular / own base |")
    print("|---|---:|---:|---:|---:|")
    if peer:
        print(f"| mistral.rs (fp32) | {peer.get('base', float('nan')):.1f} | {mrs:.1f} (1.00x) | - | "
              f"{mrs / peer['base']:.2f}x |")  # fmt: skip
    for dtype, r in ours.items():
        for suffix in ("", " compiled") if args.compile else ("",):
            granular, frozen = r[f"granular{suffix}"], r[f"frozen{suffix}"]
            print(f"| xlora_core ({dtype}{suffix}) | {r['base']:.1f} | {vs(granular)} | {vs(frozen)} | "
                  f"{granular / r['base']:.2f}x |")  # fmt: skip
    for dtype, r in ours.items():
        if args.compile:
            print(f"{dtype}: the first compiled generation took {r['compile s']:.0f} s (compilation included)")
    if args.json:
        args.json.write_text(json.dumps({"mistralrs": peer, "ours": ours, "new_tokens": args.new_tokens}, indent=1))


if __name__ == "__main__":
    main()
