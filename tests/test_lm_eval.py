"""EleutherAI's lm-evaluation-harness (its own package, offline) against the shared live server: a local
multiple-choice task through `local-completions` (log-likelihoods: token-id prompts, `echo`, `logprobs`) and a
local generation task through `local-chat-completions`. The scores it reads back are checked against the
model itself (the same checkpoint, one full forward here)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer

from xlora_core import XLoraModel

from .tiny_world import load_base

MODEL = "tiny-xlora"
MC_DOCS = [
    {"question": "2 + 2 =", "choices": ["4", "5", "22"], "answer": 0},
    {"question": "sort: b a", "choices": ["a b", "b a"], "answer": 0},
    {"question": "color of sky:", "choices": ["blue", "green", "red"], "answer": 0},
    {"question": "1 2 3", "choices": ["4", "x"], "answer": 0},
]
GEN_DOCS = [{"question": "Compute: 12 + 30", "answer": "42"}, {"question": "sort 3 1 2", "answer": "1 2 3"}]


def write_tasks(folder) -> None:
    """Two tasks as users write them: YAML, the data in local JSON lines files."""
    for name, docs in (("mc", MC_DOCS), ("gen", GEN_DOCS)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    common = "dataset_path: json\ntest_split: train\ndoc_to_text: '{{question}}'\n"
    (folder / "xlora_mc.yaml").write_text(
        f"task: xlora_mc\n{common}dataset_kwargs:\n  data_files: {folder / 'mc.jsonl'}\n"
        "output_type: multiple_choice\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\n"
        "metric_list:\n  - metric: acc\n"
    )
    (folder / "xlora_gen.yaml").write_text(
        f"task: xlora_gen\n{common}dataset_kwargs:\n  data_files: {folder / 'gen.jsonl'}\n"
        "output_type: generate_until\ndoc_to_target: '{{answer}}'\n"
        "generation_kwargs:\n  until: ['\\n']\n  max_gen_toks: 8\n  do_sample: false\n  temperature: 0\n"
        "metric_list:\n  - metric: exact_match\n"
    )


@pytest.fixture(scope="module")
def lm_eval(tmp_path_factory):
    """lm_eval, offline, caching into a temporary folder, with the two tasks (and not its built-in ones)."""
    folder = tmp_path_factory.mktemp("lm-eval")
    with pytest.MonkeyPatch.context() as env:
        for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
            env.setenv(name, "1")
        env.setenv("HF_HOME", str(folder / "hf"))
        import lm_eval
        from lm_eval.tasks import TaskManager

        write_tasks(folder)
        yield lm_eval, TaskManager(include_path=str(folder), include_defaults=False)


def test_multiple_choice_by_log_likelihood_through_local_completions(lm_eval, server, world):
    lm_eval, tasks = lm_eval
    args = (f"model={MODEL},base_url={server.url}/v1/completions,tokenizer={world['base']},"
            "tokenizer_backend=huggingface,num_concurrent=1,max_retries=1")  # fmt: skip
    out = lm_eval.simple_evaluate(model="local-completions", model_args=args, tasks=["xlora_mc"],
                                  task_manager=tasks, log_samples=True, bootstrap_iters=0)  # fmt: skip
    samples = out["samples"]["xlora_mc"]
    assert len(samples) == len(MC_DOCS)

    model = XLoraModel.from_pretrained(load_base(world["base"]), world["checkpoint"]).eval()
    tok = AutoTokenizer.from_pretrained(world["base"])
    correct = 0
    for sample in samples:
        scores = []
        for (context, continuation), (logprob, _greedy) in zip(
            [a for a in sample["arguments"]], [r[0] for r in sample["resps"]], strict=True
        ):
            ctx = tok(context, add_special_tokens=False)["input_ids"]
            cont = tok(context + continuation, add_special_tokens=False)["input_ids"][len(ctx) :]
            with torch.no_grad():
                full = torch.log_softmax(model(torch.tensor([ctx + cont])).logits[0], dim=-1)
            want = sum(full[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))
            assert abs(logprob - want) <= 1e-4 * len(cont)
            scores.append(want)
        correct += int(max(range(len(scores)), key=scores.__getitem__) == sample["target"])
    assert out["results"]["xlora_mc"]["acc,none"] == pytest.approx(correct / len(MC_DOCS))


def test_generation_through_local_chat_completions(lm_eval, server):
    lm_eval, tasks = lm_eval
    import openai

    args = f"model={MODEL},base_url={server.url}/v1/chat/completions,num_concurrent=1,max_retries=1"
    out = lm_eval.simple_evaluate(model="local-chat-completions", model_args=args, tasks=["xlora_gen"],
                                  task_manager=tasks, apply_chat_template=True, log_samples=True,
                                  bootstrap_iters=0)  # fmt: skip
    samples = out["samples"]["xlora_gen"]
    assert "exact_match,none" in out["results"]["xlora_gen"]
    oai = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    for sample in samples:
        question = sample["doc"]["question"]
        plain = oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": question}],
                                            max_tokens=8, temperature=0, stop=["\n"])  # fmt: skip
        assert sample["resps"][0][0] == plain.choices[0].message.content
