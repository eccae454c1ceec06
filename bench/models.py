"""Many models on one base (docs/models.md): decode speed of a batch whose rows use different models, against a
batch of the X-LoRA model alone, side by side in one run, in-process (the engine, no HTTP).

    python -m bench.models --threads 1                 # make bench-models

The embedded default (SmolLM2-135M and its three experts) is loaded once as an X-LoRA model; its three experts
are added as plain adapters (the same tensors: no expert is loaded twice) and the base itself. Three batches of
--rows rows decode --new-tokens tokens each, greedy, eos off:
- single: the X-LoRA model in a server that serves nothing else (XLoraModel as before: every row, every column);
- xlora: the X-LoRA model's rows alone, in the server that hosts the others too;
- mixed: the rows spread over the X-LoRA model, each expert alone, a mixture and the base.
Each is run --repeats times, alternating, and its best decode tok/s is reported with the ratio to `single`.
Also: the time and RSS delta of adding one more X-LoRA model (a copy of the default checkpoint with its
experts re-saved under new names: new experts) as POST /models would.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from xlora_core import BatchRow, DecodeBatch, Routing, RowDecoder, SamplingParams, XLoraModel
from xlora_core.base_model import load_base_model

REPO = Path(__file__).resolve().parent.parent
EXPERTS = ["arithmetic", "sorting", "json"]
PROMPTS = [
    "Compute: 12 + 30",
    "Sort alphabetically: pear, apple, fig",
    "Extract as JSON: name is Alice, age is 31, city is Paris",
    "Write a short story about a lighthouse keeper.",
]
MIXED = [Routing(), Routing(model="arithmetic"), Routing(model="sorting"), Routing(model="json"),
         Routing(weights={"json": 0.7, "sorting": 0.3}), Routing(model="base"), Routing(), Routing()]  # fmt: skip


def load(dtype: str) -> tuple[XLoraModel, object]:
    base, tokenizer = load_base_model("default", "cpu", dtype)
    adapters = {name: str(REPO / "experts" / name) for name in EXPERTS}
    return XLoraModel.from_pretrained(base, REPO / "checkpoints" / "default", adapters=adapters).eval(), tokenizer


def decode_tok_s(model: XLoraModel, tokenizer, routings: list[Routing], new_tokens: int) -> float:
    params = SamplingParams(max_new_tokens=new_tokens)
    params.eos_token_id = None
    rows = [BatchRow(RowDecoder(params, tokenizer, tokenizer(PROMPTS[i % len(PROMPTS)])["input_ids"]), r)
            for i, r in enumerate(routings)]  # fmt: skip
    with torch.inference_mode():
        batch, _ = DecodeBatch.prefill(model, rows)
        start, steps = time.perf_counter(), 0
        while batch:
            batch.step()
            steps += 1
    return steps * len(rows) / (time.perf_counter() - start)


def lora_mib(model: XLoraModel) -> float:
    return sum(t.numel() * t.element_size() for la in model.lora_layers for t in (la.lora_A, la.lora_B)) / 2**20


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    single, tokenizer = load(args.dtype)
    host, _ = load(args.dtype)
    host.name = "xlora"
    for name in EXPERTS:
        host.add_adapter(name, REPO / "experts" / name)
    host.add_base("base")
    assert host.n_experts_loaded == len(EXPERTS), "the adapters are the checkpoint's experts: loaded once"
    mixed = [MIXED[i % len(MIXED)] for i in range(args.rows)]
    runs = {"single": (single, [Routing()] * args.rows), "xlora": (host, [Routing()] * args.rows),
            "mixed": (host, mixed)}  # fmt: skip
    best = {name: 0.0 for name in runs}
    decode_tok_s(single, tokenizer, [Routing()], 2)  # warm-up
    for _ in range(args.repeats):
        for name, (model, routings) in runs.items():
            best[name] = max(best[name], decode_tok_s(model, tokenizer, routings, args.new_tokens))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {args.threads} torch "
          f"thread(s), torch {torch.__version__}, {args.dtype}; {args.rows} rows x {args.new_tokens} tokens, best "
          f"of {args.repeats}")  # fmt: skip
    print("| batch | decode tok/s | vs single |")
    print("|---|---:|---:|")
    for name, tok_s in best.items():
        print(f"| {name} | {tok_s:.1f} | {tok_s / best['single']:.2f}x |")

    with tempfile.TemporaryDirectory() as tmp:  # one more X-LoRA model with new experts, as POST /models loads it
        copy = Path(tmp) / "second"
        shutil.copytree(REPO / "checkpoints" / "default", copy)
        for name in EXPERTS:  # other numbers: new experts, not shared ones
            from safetensors.torch import load_file, save_file

            path = copy / name / "adapter_model.safetensors"
            save_file({k: v * 1.01 for k, v in load_file(path).items()}, path)
        before, lora_before, start = rss_mib(), lora_mib(host), time.perf_counter()
        host.attach(host.read_model("second", "xlora", copy))
        print(f"adding an X-LoRA model of {len(EXPERTS)} new experts: {time.perf_counter() - start:.2f} s, "
              f"LoRA weights +{lora_mib(host) - lora_before:.1f} MiB, RSS +{rss_mib() - before:.0f} MiB")


if __name__ == "__main__":
    main()
