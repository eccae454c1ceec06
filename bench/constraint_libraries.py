"""Why llguidance: the two structured-output libraries side by side on one JSON schema, with the tests' tiny
character tokenizer and the embedded default's SmolLM2 tokenizer (49152 tokens). xgrammar is not a dependency
of ours: `pip install --no-deps xgrammar apache-tvm-ffi` to include it (its triton dependency is not needed
on CPU), else its rows are skipped.

    python -m bench.constraint_libraries

Per tokenizer: the tokenizer view (built once per server), the schema's compile time, and the per-token cost
of computing the mask along a valid answer: the library's bitmask, and the bitmask unpacked to the bool mask
the sampler applies (xlora_core.constraints.unpack_bitmask, the same for both).
"""

from __future__ import annotations

import importlib.util
import json
import platform
import statistics
import tempfile
import time

import torch
from tests.helpers import make_tiny_tokenizer

from xlora_core import ConstraintSpec, GrammarCompiler
from xlora_core.base_model import load_base_model
from xlora_core.constraints import unpack_bitmask

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "city": {"type": "string"}},
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}
ANSWER = '{"name": "Alice", "age": 31, "city": "Paris"}'


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def llguidance_row(tokenizer, vocab: int) -> tuple[float, float, list[float], list[float]]:
    compiler, t_view = timed(lambda: GrammarCompiler(tokenizer, vocab, tokenizer.eos_token_id))
    grammar, t_compile = timed(lambda: compiler.compile(ConstraintSpec("json_schema", json.dumps(SCHEMA))))
    matcher = grammar.matcher()
    bitmasks, masks = [], []
    for token in tokenizer(ANSWER, add_special_tokens=False)["input_ids"]:
        bitmasks.append(timed(matcher.bitmask)[1])
        masks.append(timed(lambda: matcher.allowed(vocab))[1])  # computed again, and unpacked
        matcher.consume(token)
    return t_view, t_compile, bitmasks, masks


def xgrammar_row(tokenizer, vocab: int) -> tuple[float, float, list[float], list[float]]:
    import xgrammar

    def view():
        info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab)
        return xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False)

    compiler, t_view = timed(view)
    compiled, t_compile = timed(lambda: compiler.compile_json_schema(json.dumps(SCHEMA)))
    matcher = xgrammar.GrammarMatcher(compiled)
    bitmask = xgrammar.allocate_token_bitmask(1, vocab)
    bitmasks, masks = [], []
    for token in tokenizer(ANSWER, add_special_tokens=False)["input_ids"]:
        bitmasks.append(timed(lambda: matcher.fill_next_token_bitmask(bitmask))[1])
        masks.append(timed(lambda: (matcher.fill_next_token_bitmask(bitmask), unpack_bitmask(bitmask[0])))[1])
        assert matcher.accept_token(token)
    return t_view, t_compile, bitmasks, masks


def main() -> None:
    torch.set_num_threads(1)
    tokenizers = {"tiny (char, 99)": make_tiny_tokenizer(tempfile.mkdtemp()),
                  "SmolLM2 (BPE, 49152)": load_base_model("default", device="cpu", dtype="float32")[1]}  # fmt: skip
    libraries = {"llguidance": llguidance_row}
    if importlib.util.find_spec("xgrammar") is not None:
        libraries["xgrammar"] = xgrammar_row
    print(f"machine: {platform.processor() or platform.machine()}, 1 thread")
    print("| library | tokenizer | tokenizer view | schema compile | bitmask per token, median / worst "
          "| bool mask (what the sampler applies), median |")
    print("|---|---|---:|---:|---:|---:|")
    for tname, tokenizer in tokenizers.items():
        for lname, row in libraries.items():
            t_view, t_compile, bitmasks, masks = row(tokenizer, len(tokenizer))
            print(f"| {lname} | {tname} | {t_view * 1e3:.1f} ms | {t_compile * 1e3:.2f} ms | "
                  f"{statistics.median(bitmasks) * 1e6:.0f} / {max(bitmasks) * 1e6:.0f} us | "
                  f"{statistics.median(masks) * 1e6:.0f} us |")  # fmt: skip


if __name__ == "__main__":
    main()
