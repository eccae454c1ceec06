"""Training the X-LoRA classifier: forward with labels returns the loss, and training lowers it."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from xlora_core import XLoraConfig, XLoraModel

from .tiny_world import EXPERT_SPECS, VOCAB, build_world, load_base, make_tiny_tokenizer, save_expert, save_tiny_llama


def test_forward_with_labels_returns_the_causal_lm_loss(tmp_path):
    base, experts = build_world(tmp_path)
    model = XLoraModel(load_base(base), XLoraConfig(hidden_size=32, adapters=experts, xlora_depth=2, xlora_size=16))
    ids = torch.randint(3, VOCAB, (2, 10))
    out = model(ids, labels=ids)
    expected = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    assert torch.allclose(out.loss, expected, atol=1e-5)


def test_only_the_classifier_trains_and_its_loss_falls(tmp_path):
    base, experts = build_world(tmp_path)
    model = XLoraModel(load_base(base), XLoraConfig(hidden_size=32, adapters=experts, xlora_depth=2, xlora_size=16))
    model.train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("classifier.") for n in trainable)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}

    # Toy task: a fixed batch of sequences the router can fit by choosing experts per token.
    torch.manual_seed(0)
    ids = torch.randint(3, VOCAB, (4, 12))
    optimizer = torch.optim.Adam(model.classifier.parameters(), lr=3e-2)
    losses = []
    for _ in range(40):
        loss = model(ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.01, losses
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_trainable_adapters(tmp_path):
    base, experts = build_world(tmp_path)
    config = XLoraConfig(hidden_size=32, adapters=experts, use_trainable_adapters=True)
    model = XLoraModel(load_base(base), config)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable) and any(n.startswith("classifier.") for n in trainable)
    assert not any("base_layer" in n or "embed_tokens" in n for n in trainable)


def _tiny_task_experts(root):
    """A tiny base in root/base and three random experts named after the tasks; returns (tokenizer,
    the --experts argument)."""
    tokenizer = make_tiny_tokenizer(root / "base")
    save_tiny_llama(root / "base", vocab_size=len(tokenizer))
    experts = {
        name: save_expert(root / "base", root / name, seed=i, **spec)
        for i, (name, spec) in enumerate(zip(["arithmetic", "sorting", "json"], EXPERT_SPECS, strict=True))
    }
    return tokenizer, ",".join(f"{n}={p}" for n, p in experts.items())


def test_train_classifier_command_writes_a_checkpoint_that_loads(tmp_path):
    tokenizer, expert_arg = _tiny_task_experts(tmp_path)
    out = tmp_path / "ckpt"
    cmd = [sys.executable, "-m", "xlora_core.cli.train", "--threads", "1", "classifier", "--base",
           str(tmp_path / "base"), "--out", str(out), "--steps", "12", "--batch-size", "6", "--size", "16",
           "--lr", "1e-2", "--log-every", "4", "--experts", expert_arg]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "step" in r]
    assert [r["step"] for r in steps] == [4, 8, 12]
    assert steps[-1]["routing_loss"] < steps[0]["routing_loss"]  # the router learns which task is which

    model = XLoraModel.from_pretrained(load_base(tmp_path / "base"), out)
    assert model.adapter_names == ["arithmetic", "sorting", "json"]
    assert model(torch.tensor([[5, 6, 7]])).logits.shape == (1, 3, len(tokenizer))


def test_prefix_expert_routes_the_prefix_every_example_shares(tmp_path):
    """--prefix-expert arithmetic: the chat header every example starts with ("<|im_start|>user\\n") goes to
    that expert (without the flag, the same run gives it 0.14 arithmetic and 0.63 json)."""
    tokenizer, expert_arg = _tiny_task_experts(tmp_path)
    out = tmp_path / "ckpt"
    cmd = [sys.executable, "-m", "xlora_core.cli.train", "--threads", "1", "classifier", "--base",
           str(tmp_path / "base"), "--out", str(out), "--steps", "40", "--batch-size", "6", "--size", "16",
           "--lr", "1e-2", "--warmup-steps", "1", "--experts", expert_arg, "--prefix-expert", "arithmetic"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((out / "train_log.jsonl").read_text().splitlines()[0])["config"]["prefix_expert"] == "arithmetic"

    model = XLoraModel.from_pretrained(load_base(tmp_path / "base"), out)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Compute: 1 + 2"}], tokenize=True,
                                        add_generation_prompt=True)["input_ids"]  # fmt: skip
    _, scalings = model.hidden_states(torch.tensor([ids]))
    header = scalings[0, :6].mean(dim=(0, 1))  # "<|im_start|>", "u", "s", "e", "r", "\n"
    assert header.argmax().item() == model.adapter_names.index("arithmetic")


def test_train_classifier_command_refuses_an_unknown_prefix_expert(tmp_path):
    cmd = [sys.executable, "-m", "xlora_core.cli.train", "classifier", "--out", str(tmp_path / "x"),
           "--experts", "a=one,b=two", "--prefix-expert", "c"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "prefix_expert 'c' is not one of the experts (a, b)" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "x").exists()


def test_train_classifier_command_refuses_the_routing_loss_without_task_experts(tmp_path):
    cmd = [sys.executable, "-m", "xlora_core.cli.train", "classifier", "--out", str(tmp_path / "x"),
           "--experts", "a=one,b=two"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "needs experts named after the tasks (arithmetic, sorting, json); got a, b" in (
        done.stderr
    )
    assert "Traceback" not in done.stderr and not (tmp_path / "x").exists()
