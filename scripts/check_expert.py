"""Exact-match accuracy of one trained expert (base + that single LoRA, greedy) on eval-split examples.

.venv/bin/python scripts/check_expert.py experts/arithmetic            # task from the folder name
.venv/bin/python scripts/check_expert.py experts/json --n 100 --show 5
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import torch
from peft import PeftModel

from xlora_core.base_model import load_base_model
from xlora_core.recipe.tasks import TASKS, exact_match, make_examples
from xlora_core.training import generate_answers


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("adapter", help="expert folder (PEFT layout)")
    p.add_argument("--task", choices=TASKS, default=None, help="default: the folder's name")
    p.add_argument("--base", default="default")
    p.add_argument("--n", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default="eval", choices=["train", "eval"])
    p.add_argument("--show", type=int, default=3, help="print this many wrong answers")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    task = args.task or Path(args.adapter).name

    base, tokenizer = load_base_model(args.base)
    model = PeftModel.from_pretrained(base, args.adapter).eval()
    examples = make_examples(task, args.n, seed=args.seed, split=args.split)
    t0 = time.time()
    predictions = generate_answers(model, tokenizer, [e.prompt for e in examples])
    hits = [exact_match(p, e.answer) for p, e in zip(predictions, examples, strict=True)]
    wrong = [(e, p) for e, p, ok in zip(examples, predictions, hits, strict=True) if not ok]
    for e, pred in wrong[: args.show]:
        print(f"  WRONG {e.prompt!r}: want {e.answer!r}, got {pred!r}")
    result = {"adapter": args.adapter, "task": task, "split": args.split, "n": args.n,
              "accuracy": sum(hits) / len(hits), "eval_s": round(time.time() - t0, 1)}  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
