"""What batch invariance costs and gives: the same greedy tokens alone, together and joining mid-step.

    python -m bench.batch_invariance --threads 1        # docs/batch-invariance.md

The embedded default in the default dtype (`--dtype auto`: bf16 on CPUs with native bf16), side by side in
one process, with xlora_core/batch_invariant.py's kernels (prepacked matmuls padded to the rows oneDNN
needs, `least_rows`; attention row by row) and without them (plain F.linear, transformers' batched SDPA):
- how many of 8 prompts (bench.load's, and 4 more) get other greedy tokens when prefilled together, or
  when joining a running batch mid-step, than alone (--new-tokens each);
- ms per granular decode step at batch 1 and 8 (bench.kv_dtype's step, after a 32-token prefill).
A last row does the same for the model in float32 (where the kernels are torch's plain ones either way),
for the choice `dtype: auto` makes.
"""

from __future__ import annotations

import argparse
import platform

import torch

from bench.kv_dtype import step_ms
from bench.load import PROMPTS
from xlora_core import BatchRow, DecodeBatch, Routing, RowDecoder, SamplingParams, XLoraModel, batch_invariant
from xlora_core.base_model import load_base_model
from xlora_core.compiled_step import load_package

EXTRA_PROMPTS = ["Tell me about cats", "Tell me about the sea", "Tell me about Paris", "Tell me about rain"]


def differing_rows(model: XLoraModel, prompts: list[list[int]], new_tokens: int) -> tuple[int, int]:
    """(rows whose tokens differ from alone when prefilled together, ... when joining mid-step)."""

    def rows() -> list[BatchRow]:
        params = SamplingParams(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        return [BatchRow(RowDecoder(params, None, p), Routing()) for p in prompts]

    def finish(batch: DecodeBatch) -> None:
        while batch:
            batch.step()

    alone = []
    for row in rows():
        finish(DecodeBatch.prefill(model, [row])[0])
        alone.append(row.decoder.completion_ids)
    together = rows()
    finish(DecodeBatch.prefill(model, together)[0])
    joining = rows()
    batch, _ = DecodeBatch.prefill(model, joining[:1])
    batch.step()
    batch.step(joining=joining[1:4])
    batch.step(joining=joining[4:])
    finish(batch)
    differ = [sum(r.decoder.completion_ids != a for r, a in zip(rs, alone, strict=True)) for rs in (together, joining)]
    return differ[0], differ[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="default")
    parser.add_argument("--checkpoint", default="checkpoints/default")
    parser.add_argument("--dtype", default="auto", help="the model's dtype, as model.dtype in the YAML")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--package", help="also the compiled decode step of this package (docs/compiled-decoding.md)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base, tokenizer = load_base_model(args.base, device="cpu", dtype=args.dtype)
    model = XLoraModel.from_pretrained(base, args.checkpoint)
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS + EXTRA_PROMPTS]
    machine = platform.processor() or platform.machine()
    print(f"machine: {machine}, {args.threads} thread(s), torch {torch.__version__}, {model.dtype}, "
          f"{args.new_tokens} new tokens per prompt")  # fmt: skip
    print("| kernels | rows differing together | rows differing joining | step ms, batch 1 | step ms, batch 8 |")
    print("|---|---:|---:|---:|---:|")
    fp32 = XLoraModel.from_pretrained(load_base_model(args.base, device="cpu", dtype="float32")[0], args.checkpoint)
    runs = [(f"{model.dtype}, plain", model, False), (f"{model.dtype}, batch-invariant", model, True)]
    if model.dtype != torch.float32:
        runs.append(("torch.float32", fp32, True))
    if args.package:
        runs.append((f"{model.dtype}, batch-invariant, compiled (package)", model, True))
    with torch.inference_mode():
        for name, m, enabled in runs:
            if "package" in name:
                m.use_packaged_step(load_package(args.package))
            batch_invariant.ENABLED = enabled
            together, joining = differing_rows(m, prompts, args.new_tokens)
            one, eight = (step_ms(m, b, 32, args.steps) for b in (1, 8))
            print(f"| {name} | {together} of 8 | {joining} of 8 | {one:.1f} | {eight:.1f} |", flush=True)
    batch_invariant.ENABLED = True


if __name__ == "__main__":
    main()
