"""Greedy generation speed, side by side in one process: the base model alone (its KV cache),
peft.XLoraModel (no cache: two full passes per token), xlora_core granular (two KV caches), and
xlora_core with frozen scalings (Routing.freeze_after 0 and 8: after that many tokens one pass per token).

    python -m bench.generation                       # SmolLM2-135M, 3 random r=8 experts on q/k/v/o
    python -m bench.generation --prompt-lens 16 --new-tokens 32 --peft-max-new 32   # a quick look

Every run generates exactly the asked number of tokens (min_new_tokens = max_new_tokens).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from peft import XLoraConfig as PeftXLoraConfig

from xlora_core import Routing, XLoraConfig, XLoraModel
from xlora_core.base_model import load_base_model


def make_experts(spec: str, folder: Path, n: int, rank: int) -> dict[str, str]:
    """Random LoRA experts (speed does not depend on what they learned). Named "0", "1", ...
    because peft 0.21.2's XLoraModel fails in generate with any other names."""
    experts = {}
    for i in range(n):
        base, _ = load_base_model(spec, device="cpu", dtype="float32")
        torch.manual_seed(i)
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                            init_lora_weights=False)  # fmt: skip
        get_peft_model(base, config).save_pretrained(folder / str(i))
        experts[str(i)] = str(folder / str(i))
    return experts


def timed(fn) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="default", help="base model: default, a .gguf file or a folder")
    parser.add_argument("--experts", type=int, default=3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--prompt-lens", default="16,256")
    parser.add_argument("--new-tokens", default="128,256")
    parser.add_argument("--peft-max-new", type=int, default=128, help="skip peft above this many new tokens")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--freeze-after", type=lambda v: [int(x) for x in v.split(",") if x], default=[0, 8],
                        help="frozen-scalings rows to add (Routing.freeze_after values; empty for none)")  # fmt: skip
    parser.add_argument("--json", type=Path, help="also write each run's seconds here (bench.report plots them)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    prompt_lens = [int(x) for x in args.prompt_lens.split(",")]
    new_tokens = [int(x) for x in args.new_tokens.split(",")]

    tmp = Path(tempfile.mkdtemp(prefix="xlora-bench-"))
    experts = make_experts(args.base, tmp, args.experts, args.rank)
    base, tokenizer = load_base_model(args.base, device="cpu", dtype="float32")
    hidden = base.config.hidden_size
    xkw = dict(hidden_size=hidden, adapters=experts, xlora_depth=2, xlora_size=256)

    peft_base, _ = load_base_model(args.base, device="cpu", dtype="float32")
    peft_base.config.use_cache = False
    torch.manual_seed(0)
    peft_model = get_peft_model(peft_base, PeftXLoraConfig(task_type="CAUSAL_LM", **xkw)).eval()
    ours = XLoraModel(load_base_model(args.base, device="cpu", dtype="float32")[0], XLoraConfig(**xkw))
    classifier = {k.split("internal_xlora_classifier.")[1]: v for k, v in peft_model.state_dict().items()
                  if "internal_xlora_classifier" in k}  # fmt: skip
    ours.classifier.load_state_dict(classifier)

    frozen = {f"frozen@{k}": Routing(freeze_after=k) for k in args.freeze_after}

    def run(name: str, prompt: torch.Tensor, n: int) -> tuple[float, torch.Tensor]:
        kwargs = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False)
        with torch.inference_mode():
            if name == "base":
                return timed(lambda: base.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), **kwargs))
            if name == "peft":
                return timed(lambda: peft_model.generate(input_ids=prompt, **kwargs))
            return timed(lambda: ours.generate(prompt, routing=frozen.get(name), **kwargs))

    engines = ["ours", *frozen]
    for name in ("base", "peft", *engines):  # warm-up
        run(name, torch.tensor([[tokenizer.bos_token_id or 1] * 8]), 4)

    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; base {args.base}, {args.experts} experts r={args.rank} on q/k/v/o")  # fmt: skip
    print("tok/s; in brackets the ratio to the base model alone in the same run")
    print("| prompt | new | base | peft | xlora_core granular | " + " | ".join(frozen) + " | core/peft |")
    print("|---:|---:|---:|---:|---:|" + "---:|" * len(frozen) + "---:|")
    seconds: dict[tuple[int, int], float] = {}
    rows: list[dict] = []  # for --json: one per prompt length x new tokens, seconds per engine
    for p in prompt_lens:
        g = torch.Generator().manual_seed(p)
        prompt = torch.randint(100, base.config.vocab_size, (1, p), generator=g)
        seconds[(p, 1)] = run("ours", prompt, 1)[0]  # the prefill and first token: the fixed cost
        for n in new_tokens:
            t_base, _ = run("base", prompt, n)
            times = {name: run(name, prompt, n) for name in engines}
            t_ours, out_ours = times["ours"]
            seconds[(p, n)] = t_ours
            peft_cell, ratio_peft = "skipped", "-"
            if n <= args.peft_max_new:
                t_peft, out_peft = run("peft", prompt, n)
                same = "" if torch.equal(out_peft, out_ours) else " (tokens differ!)"
                peft_cell, ratio_peft = f"{n / t_peft:.2f} ({t_base / t_peft:.2f}x){same}", f"{t_peft / t_ours:.1f}x"
            rows.append({"prompt": p, "new": n, "seconds": {"base": t_base, **{k: t for k, (t, _) in times.items()}}})
            if n <= args.peft_max_new:
                rows[-1]["seconds"]["peft"] = t_peft
            cells = [f"{n / t:.2f} ({t_base / t:.2f}x)" for t, _ in times.values()]
            print(f"| {p} | {n} | {n / t_base:.2f} | {peft_cell} | " + " | ".join(cells) + f" | {ratio_peft} |",
                  flush=True)  # fmt: skip
    for p in prompt_lens:
        if len(new_tokens) > 1:
            lo, hi = min(new_tokens), max(new_tokens)
            t1, t_lo, t_hi = seconds[(p, 1)], seconds[(p, lo)], seconds[(p, hi)]
            early, late = (t_lo - t1) / (lo - 1), (t_hi - t_lo) / (hi - lo)  # seconds per decode step
            print(f"prompt {p}: {hi} new tokens take {t_hi / t_lo:.2f}x the time of {lo} (granular); a decode "
                  f"step costs {1000 * early:.1f} ms for tokens 2-{lo}, {1000 * late:.1f} ms for tokens {lo + 1}-{hi} "
                  f"({late / early:.2f}x)")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"threads": args.threads, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
