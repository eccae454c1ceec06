"""Training: one LoRA expert per task, and the X-LoRA classifier (the router) over frozen experts.

An expert is a plain PEFT LoRA adapter on the base model, trained on one synthetic task with loss on the
answer tokens only. It is saved in PEFT's layout (adapter_config.json + adapter_model.safetensors) with a
train_log.jsonl beside it. The classifier learns from the LM loss of the answer tokens plus a routing loss
(see xlora_losses) and is saved as an X-LoRA checkpoint, again with its train_log.jsonl.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from tqdm import tqdm

from xlora_core.base_model import base_model_name, load_base_model
from xlora_core.config import ADAPTER_CONFIG
from xlora_core.recipe.tasks import (
    IGNORE_INDEX,
    TASKS,
    Example,
    collate,
    encode_example,
    exact_match,
    make_examples,
    make_mixed,
    prompt_ids,
)

DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass
class ExpertTrainConfig:
    task: str
    out: str
    base: str = "default"
    steps: int = 300
    batch_size: int = 16
    lr: float = 1e-3
    warmup_steps: int = 20
    weight_decay: float = 0.0
    rank: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] = field(default=DEFAULT_TARGET_MODULES)
    init_from: str | None = None  # continue training this PEFT adapter (its rank, alpha and targets are kept)
    pseudo_words: float = 0.0  # sorting: fraction of made-up training words (see tasks.make_examples)
    seed: int = 0
    log_every: int = 10
    eval_n: int = 0  # after training, score this many eval-split examples (0: skip)
    device: str = "auto"
    dtype: str = "auto"
    cache_dir: str | None = None


def lr_at(step: int, cfg: ExpertTrainConfig | ClassifierTrainConfig) -> float:
    """Linear warmup, then cosine decay to 10% of the peak: stable start, gentle finish."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: list[str], max_new_tokens: int = 48, batch_size: int = 16) -> list[str]:
    """Greedy answers for chat prompts, batched with left padding."""
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id
    answers = []
    for i in range(0, len(prompts), batch_size):
        batch = collate(
            [{"input_ids": prompt_ids(tokenizer, p)} for p in prompts[i : i + batch_size]],
            pad_id,
            padding_side="left",
        )
        out = model.generate(
            input_ids=batch["input_ids"].to(device),
            attention_mask=batch["attention_mask"].to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
        )
        new = out[:, batch["input_ids"].shape[1] :]
        answers += tokenizer.batch_decode(new, skip_special_tokens=True)
    return answers


def accuracy(model, tokenizer, examples: list[Example], batch_size: int = 16) -> float:
    """Exact-match accuracy of greedy answers on `examples`."""
    was_training = model.training
    model.eval()
    predictions = generate_answers(model, tokenizer, [e.prompt for e in examples], batch_size=batch_size)
    model.train(was_training)
    return sum(exact_match(p, e.answer) for p, e in zip(predictions, examples, strict=True)) / len(examples)


def shared_prefix_len(batch: dict[str, torch.Tensor]) -> int:
    """Tokens every row starts with that are all prompt (the chat template's system turn and user header)."""
    ids, labels = batch["input_ids"], batch["labels"]
    same = (ids == ids[:1]).all(dim=0).long().cumprod(0).sum()
    first_label = (labels != IGNORE_INDEX).long().argmax(dim=1).min()
    return int(min(same, first_label - 1))  # keep >= 1 prompt token in the second pass for the first target


def answer_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over the answer tokens (right-padded batch); the same value as the model's own loss.

    Two savings that roughly halve a CPU step. The prefix all rows share (SmolLM2's default system prompt
    is ~20 of a ~45-token example) runs once, as batch 1, and its keys/values are repeated for the rows;
    gradients still flow through it, since LoRA on k/v changes it. And the 49k-wide output projection
    runs only at positions that predict answer tokens, not over every prompt position.
    """
    causal_lm = model.get_base_model()  # LoRA layers live inside it, so they still apply
    decoder, head = causal_lm.get_decoder(), causal_lm.get_output_embeddings()
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    n = shared_prefix_len(batch)
    if n > 0:
        # `cache=` is transformers >= 5.24's name for what older versions call `past_key_values`
        cache = decoder(input_ids=ids[:1, :n], use_cache=True).cache
        cache.batch_repeat_interleave(ids.shape[0])
        hidden = decoder(input_ids=ids[:, n:], attention_mask=mask, cache=cache, use_cache=True)
    else:
        hidden = decoder(input_ids=ids, attention_mask=mask)
    hidden = hidden.last_hidden_state[:, :-1]  # hidden at absolute position n+i predicts token n+i+1
    targets = labels[:, n + 1 :]
    keep = targets != IGNORE_INDEX
    return F.cross_entropy(head(hidden[keep]).float(), targets[keep])


def _clean_adapter_config(out: Path, base_name: str) -> None:
    """Replace the base model path (an absolute cache folder) by a short name, so saved files are portable."""
    path = out / ADAPTER_CONFIG
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = base_name
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    # PEFT also writes a model-card README that repeats the machine path; the adapter doesn't need it
    readme = out / "README.md"
    if readme.exists():
        readme.unlink()


def train_expert(cfg: ExpertTrainConfig) -> dict:
    """Train one LoRA expert and save it to cfg.out. Returns a summary (final loss, timings, accuracy)."""
    torch.manual_seed(cfg.seed)
    # dtype auto stays float32 on CPU for training: a pure-bf16 optimizer step loses small updates
    base, tokenizer = load_base_model(cfg.base, cfg.device, cfg.dtype, cfg.cache_dir, cpu_bf16=False)
    if cfg.init_from:
        model = PeftModel.from_pretrained(base, cfg.init_from, is_trainable=True)
        lora = model.peft_config["default"]  # the log records the shape actually trained, not the CLI defaults
        cfg = replace(cfg, rank=lora.r, alpha=lora.lora_alpha, target_modules=tuple(sorted(lora.target_modules)))
    else:
        lora = LoraConfig(
            task_type="CAUSAL_LM",
            r=cfg.rank,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            target_modules=list(cfg.target_modules),
        )
        model = get_peft_model(base, lora)
    model.train()
    device = next(model.parameters()).device

    # one fresh example per sample: steps * batch_size draws from the train split
    examples = make_examples(
        cfg.task, cfg.steps * cfg.batch_size, seed=cfg.seed, split="train", pseudo_words=cfg.pseudo_words
    )
    features = [encode_example(tokenizer, e) for e in examples]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "train_log.jsonl"
    log = log_path.open("w")
    log.write(json.dumps({"config": asdict(cfg)}) + "\n")

    t0 = time.time()
    running, seen = 0.0, 0
    bar = tqdm(range(cfg.steps), desc=f"expert {cfg.task}", dynamic_ncols=True)
    for step in bar:
        batch = collate(features[step * cfg.batch_size : (step + 1) * cfg.batch_size], tokenizer.pad_token_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        loss = answer_loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()

        running, seen = running + loss.item(), seen + 1
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            record = {
                "step": step + 1,
                "loss": round(running / seen, 5),
                "lr": lr_at(step, cfg),
                "elapsed_s": round(time.time() - t0, 2),
            }
            tqdm.write(json.dumps(record))
            log.write(json.dumps(record) + "\n")
            log.flush()
            running, seen = 0.0, 0
    train_s = time.time() - t0

    summary = {
        "task": cfg.task,
        "steps": cfg.steps,
        "train_s": round(train_s, 1),
        "step_s": round(train_s / max(1, cfg.steps), 3),
    }
    if cfg.eval_n > 0:
        eval_examples = make_examples(cfg.task, cfg.eval_n, seed=cfg.seed, split="eval")
        summary["eval_accuracy"] = accuracy(model, tokenizer, eval_examples)
        summary["eval_n"] = cfg.eval_n
    tqdm.write(json.dumps({"summary": summary}))
    log.write(json.dumps({"summary": summary}) + "\n")
    log.close()

    model.save_pretrained(out)
    _clean_adapter_config(out, base_model_name(cfg.base))
    return summary


# -----------------------------------------------------------------------------
# X-LoRA classifier training: the experts frozen, the classifier learns from a mixture of the tasks


@dataclass
class ClassifierTrainConfig:
    """The X-LoRA router, trained on a mixture of the tasks with the experts frozen."""

    experts: dict[str, str]  # name -> PEFT LoRA folder; the order is the expert index
    out: str
    base: str = "default"
    steps: int = 150
    batch_size: int = 8
    lr: float = 1e-3
    warmup_steps: int = 10
    xlora_depth: int = 2
    xlora_size: int = 256
    layerwise_scalings: bool = False
    # Weight of an auxiliary loss that tells the router which task a training example comes from
    # (cross-entropy of each token's scalings from the user's message on). 0 = the paper's LM loss alone.
    routing_loss_weight: float = 2.0
    # The expert the routing loss sends the shared prefix to (the chat template's system turn, the same in
    # every row, so it cannot tell the task). None leaves that prefix to the LM loss alone.
    prefix_expert: str | None = None
    seed: int = 0
    log_every: int = 10
    eval_n: int = 0
    device: str = "auto"
    dtype: str = "auto"
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        # checked here, before the base model loads, so a wrong name fails at once
        if self.prefix_expert is not None and self.prefix_expert not in self.experts:
            known = ", ".join(self.experts)
            raise ValueError(f"prefix_expert {self.prefix_expert!r} is not one of the experts ({known})")
        if self.prefix_expert is not None and self.routing_loss_weight <= 0:
            raise ValueError("prefix_expert needs the routing loss (routing_loss_weight > 0)")
        if self.routing_loss_weight > 0 and set(self.experts) != set(TASKS):
            names = ", ".join(self.experts)
            raise ValueError(
                f"the routing loss (routing_loss_weight > 0) needs experts named after the tasks "
                f"({', '.join(TASKS)}); got {names}"
            )


def xlora_losses(
    model, batch: dict[str, torch.Tensor], expert_of_row: torch.Tensor | None, prefix_expert: int | None = None
):
    """(answer-token cross-entropy, routing loss or None) for a right-padded batch; the LM head runs
    only where there are labels (on SmolLM2 it is a fifth of the weights). With `prefix_expert`, the
    routing loss also sends the prefix all rows share to that expert."""
    hidden, scalings = model.hidden_states(batch["input_ids"], batch["attention_mask"])
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    logits = model.base.get_output_embeddings()(hidden[:, :-1][keep]).float()
    lm_loss = F.cross_entropy(logits, targets[keep])
    if expert_of_row is None:
        return lm_loss, None
    # Every position from the user's message on goes to the row's task expert: the prompt's keys and
    # values then come from that expert, as in its own training. Per token, not per row: with a per-row
    # mean the router still sent word-like tokens of json prompts (names, colours) to the sorting expert,
    # and the json expert then miscopied them.
    # The positions before it (the shared prefix) are the same in every row, so they cannot tell the task
    # and get one mixture for all. Left to the LM loss, SmolLM2's first tokens (the attention sink) went to
    # the sorting expert; forcing json there instead took json through X-LoRA from 84% to 92% ("surgeon"
    # had come out "surg") and sorting from 76% to 75%. Hence `prefix_expert`, a choice the loss did not make.
    positions = batch["attention_mask"].clone()
    n_prefix = shared_prefix_len(batch)
    expert = expert_of_row[:, None].expand(-1, positions.shape[1]).clone()
    if prefix_expert is None:
        positions[:, :n_prefix] = 0
    else:
        expert[:, :n_prefix] = prefix_expert
    per_token = scalings.mean(dim=2)  # [batch, seq, experts], mean over LoRA layers
    expert = expert[:, :, None]
    nll = -per_token.gather(2, expert).squeeze(2).clamp(min=1e-6).log()
    routing_loss = (nll * positions).sum() / positions.sum().clamp(min=1)
    return lm_loss, routing_loss


def train_classifier(cfg: ClassifierTrainConfig) -> dict:
    """Train the classifier of an X-LoRA model on the experts in cfg.experts; save the checkpoint to cfg.out."""
    from xlora_core.config import XLoraConfig
    from xlora_core.model import XLoraModel

    torch.manual_seed(cfg.seed)
    # dtype auto stays float32 on CPU for training: a pure-bf16 optimizer step loses small updates
    base, tokenizer = load_base_model(cfg.base, cfg.device, cfg.dtype, cfg.cache_dir, cpu_bf16=False)
    config = XLoraConfig(
        hidden_size=base.config.hidden_size,
        adapters=dict(cfg.experts),
        xlora_depth=cfg.xlora_depth,
        xlora_size=cfg.xlora_size,
        layerwise_scalings=cfg.layerwise_scalings,
        xlora_dropout_p=0.0,
    )
    model = XLoraModel(base, config)
    model.train()
    device = model.device
    names = list(cfg.experts)
    supervise = cfg.routing_loss_weight > 0
    prefix_expert = None if cfg.prefix_expert is None else names.index(cfg.prefix_expert)

    examples = make_mixed(cfg.steps * cfg.batch_size, seed=cfg.seed, split="train")
    features = [encode_example(tokenizer, e) for e in examples]
    params = list(model.classifier.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr)

    log = [{"config": asdict(cfg)}]  # written into the checkpoint folder once it is saved
    t0, running, seen = time.time(), [0.0, 0.0], 0
    bar = tqdm(range(cfg.steps), desc="classifier", dynamic_ncols=True)
    for step in bar:
        rows = slice(step * cfg.batch_size, (step + 1) * cfg.batch_size)
        batch = {k: v.to(device) for k, v in collate(features[rows], tokenizer.pad_token_id).items()}
        expert_of_row = None
        if supervise:
            expert_of_row = torch.tensor([names.index(e.task) for e in examples[rows]], device=device)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        lm_loss, routing_loss = xlora_losses(model, batch, expert_of_row, prefix_expert)
        loss = lm_loss + cfg.routing_loss_weight * routing_loss if supervise else lm_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()

        running = [running[0] + lm_loss.item(), running[1] + (routing_loss.item() if supervise else 0.0)]
        seen += 1
        bar.set_postfix(loss=f"{lm_loss.item():.4f}")
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            record = {"step": step + 1, "loss": round(running[0] / seen, 5), "lr": lr_at(step, cfg),
                      "elapsed_s": round(time.time() - t0, 2)}  # fmt: skip
            if supervise:
                record["routing_loss"] = round(running[1] / seen, 5)
            tqdm.write(json.dumps(record))
            log.append(record)
            running, seen = [0.0, 0.0], 0
    model.eval()
    summary = {"steps": cfg.steps, "train_s": round(time.time() - t0, 1)}
    if cfg.eval_n > 0:
        summary["eval_accuracy"] = accuracy(model, tokenizer, make_mixed(cfg.eval_n, seed=cfg.seed, split="eval"))
    tqdm.write(json.dumps({"summary": summary}))
    log.append({"summary": summary})
    model.save_pretrained(cfg.out)
    Path(cfg.out, "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    return summary
