"""xlora-train: train LoRA experts and the X-LoRA classifier.

xlora-train expert --task arithmetic --base default --out experts/arithmetic
xlora-train classifier --out checkpoints/default   (experts: experts/arithmetic, sorting, json)
"""

from __future__ import annotations

import argparse
import json

import torch

from xlora_core.recipe.tasks import TASKS
from xlora_core.training import (
    DEFAULT_TARGET_MODULES,
    ClassifierTrainConfig,
    ExpertTrainConfig,
    train_classifier,
    train_expert,
)


def add_run_args(p: argparse.ArgumentParser, *, steps: int, batch_size: int, warmup_steps: int) -> None:
    """Options both subcommands share: the base model, the optimisation schedule, logging, device."""
    p.add_argument("--base", default="default", help="'default', a .gguf file, a transformers folder or a Hub id")
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-steps", type=int, default=warmup_steps)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--eval-n", type=int, default=0, help="score this many eval examples after training")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--cache-dir", default=None, help="where converted GGUF models are cached")


def run_kwargs(args: argparse.Namespace) -> dict:
    """The shared options as config fields."""
    return dict(
        base=args.base,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_steps=min(args.warmup_steps, args.steps),
        seed=args.seed,
        log_every=args.log_every,
        eval_n=args.eval_n,
        device=args.device,
        dtype=args.dtype,
        cache_dir=args.cache_dir,
    )


def add_expert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--out", required=True, help="folder for the adapter (PEFT layout) and train_log.jsonl")
    add_run_args(p, steps=300, batch_size=16, warmup_steps=20)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=int, default=16)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument(
        "--target-modules",
        default=",".join(DEFAULT_TARGET_MODULES),
        help="comma-separated module names to put LoRA on",
    )
    p.add_argument(
        "--init-from",
        default=None,
        help="continue training this PEFT adapter folder (its rank, alpha and targets are kept)",
    )
    p.add_argument(
        "--pseudo-words",
        type=float,
        default=0.0,
        help="sorting: fraction of the training words that are made up (0..1), read by their letters",
    )


def run_expert(args: argparse.Namespace) -> None:
    if not 0.0 <= args.pseudo_words <= 1.0 or (args.pseudo_words and args.task != "sorting"):
        raise SystemExit(f"--pseudo-words: a fraction in [0, 1], for --task sorting only; got {args.pseudo_words}")
    cfg = ExpertTrainConfig(
        task=args.task,
        out=args.out,
        rank=args.rank,
        alpha=args.alpha,
        dropout=args.dropout,
        target_modules=tuple(m.strip() for m in args.target_modules.split(",") if m.strip()),
        init_from=args.init_from,
        pseudo_words=args.pseudo_words,
        **run_kwargs(args),
    )
    summary = train_expert(cfg)
    print(json.dumps(summary))


def add_classifier_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--experts",
        default="arithmetic=experts/arithmetic,sorting=experts/sorting,json=experts/json",
        help="comma-separated name=folder of PEFT LoRA experts, in expert order",
    )
    p.add_argument("--out", required=True, help="folder for the X-LoRA checkpoint (classifier + experts)")
    add_run_args(p, steps=150, batch_size=8, warmup_steps=10)
    p.add_argument("--depth", type=int, default=2, help="xlora_depth of the classifier")
    p.add_argument("--size", type=int, default=256, help="xlora_size (hidden width) of the classifier")
    p.add_argument("--layerwise", action="store_true", help="one scaling per LoRA layer (layerwise_scalings)")
    p.add_argument("--routing-loss-weight", type=float, default=2.0,
                   help="auxiliary loss on the task of each token (0 = LM loss alone, as the paper)")  # fmt: skip
    p.add_argument("--prefix-expert", default=None,
                   help="the expert the routing loss sends the prompt prefix every example shares to "
                        "(the chat template's system turn); default: leave it to the LM loss")  # fmt: skip


def parse_experts(text: str) -> dict[str, str]:
    experts = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise SystemExit(f"--experts: expected name=folder, got {item!r}")
        experts[name] = folder
    return experts


def run_classifier(args: argparse.Namespace) -> None:
    try:
        cfg = ClassifierTrainConfig(
            experts=parse_experts(args.experts),
            out=args.out,
            xlora_depth=args.depth,
            xlora_size=args.size,
            layerwise_scalings=args.layerwise,
            routing_loss_weight=args.routing_loss_weight,
            prefix_expert=args.prefix_expert,
            **run_kwargs(args),
        )
    except ValueError as e:  # the config's own checks; the flags are the fields with dashes
        raise SystemExit(f"xlora-train classifier: {e}") from None
    print(json.dumps(train_classifier(cfg)))


# ---------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="xlora-train", description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    sub = parser.add_subparsers(dest="command", required=True)
    add_expert_args(sub.add_parser("expert", help="train one LoRA expert on a synthetic task"))
    add_classifier_args(sub.add_parser("classifier", help="train the X-LoRA classifier with the experts frozen"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    {"expert": run_expert, "classifier": run_classifier}[args.command](args)


if __name__ == "__main__":
    main()
