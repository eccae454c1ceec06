"""xlora-eval: accuracy tables and the routing matrix for a trained X-LoRA checkpoint.

    xlora-eval --checkpoint checkpoints/default            # the embedded default
"""

from __future__ import annotations

import argparse

import torch

from xlora_core.recipe.evaluation import evaluate


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="xlora-eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--checkpoint", default="checkpoints/default", help="X-LoRA checkpoint folder or Hub id")
    parser.add_argument("--base", default="default", help="base model: default, a .gguf file, a folder or a Hub id")
    parser.add_argument("--n", type=int, default=50, help="held-out examples per task")
    parser.add_argument("--seed", type=int, default=2024, help="seed of the held-out examples")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--dtype", default="auto", help="auto, float32 or bfloat16 (model.dtype's values)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    report = evaluate(args.checkpoint, base=args.base, n_per_task=args.n, seed=args.seed, batch_size=args.batch_size,
                      dtype=args.dtype)
    print(f"Exact match on {args.n} held-out examples per task (seed {args.seed}).")
    print("Routing: mean dense scaling at the positions that produce the answer.")
    print(report.markdown())


if __name__ == "__main__":
    main()
