"""What structured output costs per token: decode speed of the same batch with and without a JSON schema,
side by side in one process (xlora_core's engine, greedy, llguidance's masks).

    python -m bench.structured --threads 1                 # SmolLM2-135M, 3 random r=8 experts, 64 tokens
    python -m bench.structured --batch-sizes 1 --new-tokens 16    # a quick look

Free rows generate exactly --new-tokens (min_new_tokens); constrained rows stop early only if their schema
is complete (the table says how many tokens each configuration produced). Decode tok/s excludes the
prefill; each figure is the best of --repeats runs, taken in turns.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from bench.generation import make_experts
from xlora_core import (
    BatchRow,
    ConstraintSpec,
    GrammarCompiler,
    Routing,
    RowDecoder,
    SamplingParams,
    XLoraConfig,
    XLoraModel,
)
from xlora_core.base_model import load_base_model
from xlora_core.engine import run

# Long enough that greedy rows reach the token limit before the object closes.
SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "summary": {"type": "string", "minLength": 200},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 3},
        "year": {"type": "integer"},
    },
    "required": ["title", "summary", "tags", "year"],
    "additionalProperties": False,
}
PROMPT = "Describe the book 'Moby Dick' as a JSON record with a title, a long summary, tags and the year."


def decode(model: XLoraModel, tokenizer, rows_params: list[SamplingParams], prompt: list[int]) -> tuple[int, float]:
    """(tokens produced after each row's first, seconds of decode steps) for one batch."""
    rows = [BatchRow(RowDecoder(p, tokenizer, prompt), Routing()) for p in rows_params]
    steps = run(model, rows, pad_id=tokenizer.pad_token_id or 0)
    with torch.inference_mode():
        next(steps)  # the prefill (and every row's first token)
        start = time.perf_counter()
        for _ in steps:
            pass
        seconds = time.perf_counter() - start
    return sum(len(r.decoder.completion_ids) - 1 for r in rows), seconds


def decoder_step_us(params: SamplingParams, tokenizer, prompt: list[int], vocab: int, n: int) -> float:
    """Mean microseconds of RowDecoder.step (choose, record, detokenise) on random logits: the per-token
    cost outside the model, with or without the grammar's mask."""
    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(vocab, generator=g) for _ in range(n)]
    decoder = RowDecoder(params, tokenizer, prompt)
    start = time.perf_counter()
    steps = 0
    for row in logits:
        steps += 1
        if decoder.step(row)[2] is not None:
            break
    return (time.perf_counter() - start) / steps * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="default", help="base model: default, a .gguf file or a folder")
    parser.add_argument("--experts", type=int, default=3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch-sizes", default="1,4")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    experts = make_experts(args.base, Path(tempfile.mkdtemp(prefix="xlora-bench-")), args.experts, args.rank)
    base, tokenizer = load_base_model(args.base, device="cpu", dtype="float32")
    torch.manual_seed(0)
    config = XLoraConfig(hidden_size=base.config.hidden_size, adapters=experts, xlora_depth=2, xlora_size=256)
    model = XLoraModel(base, config).eval()
    eos = base.generation_config.eos_token_id or tokenizer.eos_token_id

    started = time.perf_counter()
    compiler = GrammarCompiler(tokenizer, base.config.vocab_size, eos)
    t_tokenizer = time.perf_counter() - started
    spec = ConstraintSpec("json_schema", json.dumps(SCHEMA))
    started = time.perf_counter()
    grammar = compiler.compile(spec)
    t_compile = time.perf_counter() - started
    started = time.perf_counter()
    compiler.compile(spec)
    t_cached = time.perf_counter() - started

    n = args.new_tokens
    free = SamplingParams(max_new_tokens=n, min_new_tokens=n, eos_token_id=eos)
    constrained = SamplingParams(max_new_tokens=n, eos_token_id=eos, constraint=grammar)
    chat = [{"role": "user", "content": PROMPT}]
    prompt = tokenizer(tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True),
                       add_special_tokens=False)["input_ids"]  # fmt: skip
    decode(model, tokenizer, [free], prompt[:8])  # warm-up

    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; base {args.base}, {args.experts} experts r={args.rank}; "
          f"prompt {len(prompt)} tokens, {n} new")  # fmt: skip
    print(f"llguidance tokenizer view {t_tokenizer * 1e3:.0f} ms (once per server); schema compile "
          f"{t_compile * 1e3:.1f} ms, from the cache {t_cached * 1e6:.0f} us")  # fmt: skip
    vocab = base.config.vocab_size
    greedy = SamplingParams(max_new_tokens=n, eos_token_id=eos)
    us_free, us_schema = (decoder_step_us(p, tokenizer, prompt, vocab, n) for p in (greedy, constrained))
    print(f"RowDecoder.step outside the model (random logits, {vocab} tokens): greedy {us_free:.0f} us, "
          f"with the schema {us_schema:.0f} us per token")  # fmt: skip
    print("| batch | rows with the schema | tokens | decode tok/s | vs. no schema |")
    print("|---:|---:|---:|---:|---:|")
    for b in (int(x) for x in args.batch_sizes.split(",")):
        mixes = sorted({0, b // 2, b}) if b > 1 else [0, 1]
        best: dict[int, tuple[int, float]] = {}
        for _ in range(args.repeats):  # round-robin, so a slow spell of a shared machine hits every mix alike
            for k in mixes:
                tokens, seconds = decode(model, tokenizer, [constrained] * k + [free] * (b - k), prompt)
                if k not in best or seconds < best[k][1]:
                    best[k] = (tokens, seconds)
        baseline = best[0][0] / best[0][1]
        for k in mixes:
            tokens, seconds = best[k]
            print(f"| {b} | {k} | {tokens} | {tokens / seconds:.2f} | {tokens / seconds / baseline:.3f}x |", flush=True)


if __name__ == "__main__":
    main()
