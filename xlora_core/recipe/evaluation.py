"""Exact-match accuracy of the base model, each expert alone and X-LoRA (dense and top-1) on fresh
held-out instances of the three tasks, and the routing matrix: the mean scaling of each expert on
each task's examples (at the positions that produce the answer)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from peft import PeftModel

from ..base_model import load_base_model
from ..classifier import Routing
from ..model import XLoraModel
from ..training import accuracy
from .tasks import IGNORE_INDEX, TASKS, Example, collate, encode_example, make_examples


@dataclass
class EvalReport:
    accuracy: dict[str, dict[str, float]]  # model -> task (and "mixed") -> accuracy
    routing: dict[str, dict[str, float]]  # task -> expert -> mean scaling
    n_per_task: int

    def markdown(self) -> str:
        columns = [*TASKS, "mixed"]
        lines = ["| model | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
        for model, scores in self.accuracy.items():
            lines.append(f"| {model} | " + " | ".join(f"{100 * scores[c]:.0f}%" for c in columns) + " |")
        experts = list(next(iter(self.routing.values())))
        lines += ["", "| prompts of task | " + " | ".join(experts) + " |", "|---|" + "---:|" * len(experts)]
        for task, row in self.routing.items():
            lines.append(f"| {task} | " + " | ".join(f"{row[e]:.3f}" for e in experts) + " |")
        return "\n".join(lines)


def _scores(model, tokenizer, examples: dict[str, list[Example]], batch_size: int) -> dict[str, float]:
    scores = {task: accuracy(model, tokenizer, items, batch_size=batch_size) for task, items in examples.items()}
    scores["mixed"] = sum(scores[t] * len(examples[t]) for t in examples) / sum(map(len, examples.values()))
    return scores


@torch.inference_mode()
def routing_matrix(model: XLoraModel, tokenizer, examples: dict[str, list[Example]]) -> dict[str, dict[str, float]]:
    """Mean dense scaling of each expert, per task, where it matters: at the positions that produce the
    answer (prompt + reference answer, teacher-forced), averaged over LoRA layers, tokens and examples.
    The prompt tokens are left out: they start with the same system turn for every task."""
    matrix = {}
    for task, items in examples.items():
        batch = collate([encode_example(tokenizer, e) for e in items], tokenizer.pad_token_id, padding_side="left")
        _, scalings, _ = model.prefill(batch["input_ids"], batch["attention_mask"], Routing(None, 1.0))
        # position t produces token t + 1: keep the positions whose next token is part of the answer
        answer = (batch["labels"][:, 1:] != IGNORE_INDEX).to(scalings.device, torch.float32)[:, :, None]
        per_token = scalings[:, :-1].float().mean(dim=2)  # [batch, seq - 1, experts], mean over LoRA layers
        mean = (per_token * answer).sum(dim=(0, 1)) / answer.sum()
        matrix[task] = dict(zip(model.adapter_names, mean.tolist(), strict=True))
    return matrix


def evaluate(
    checkpoint: str,
    base: str = "default",
    n_per_task: int = 50,
    seed: int = 2024,
    batch_size: int = 16,
    adapters: dict[str, str] | None = None,
    dtype: str = "auto",
) -> EvalReport:
    examples = {task: make_examples(task, n_per_task, seed, split="eval") for task in TASKS}
    results: dict[str, dict[str, float]] = {}

    base_model, tokenizer = load_base_model(base, dtype=dtype)
    results["base model"] = _scores(base_model, tokenizer, examples, batch_size)
    xlora = XLoraModel.from_pretrained(base_model, checkpoint, adapters=adapters)
    expert_folders = dict(xlora.config.adapters)

    for name, folder in expert_folders.items():
        lone_base, _ = load_base_model(base, dtype=dtype)
        alone = PeftModel.from_pretrained(lone_base, folder).eval()
        results[f"expert {name} alone"] = _scores(alone, tokenizer, examples, batch_size)

    routing = routing_matrix(xlora, tokenizer, examples)
    for label, top_k in (("X-LoRA dense", None), ("X-LoRA top-1", 1)):
        xlora.set_topk_lora(top_k)
        results[label] = _scores(xlora, tokenizer, examples, batch_size)
    return EvalReport(accuracy=results, routing=routing, n_per_task=n_per_task)
