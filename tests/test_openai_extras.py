"""logprobs, echo, n, several prompts and logit_bias on /v1 and /generate, through the official `openai` client
(its own models parse the answers) against the shared live server, checked against the model itself: the
same checkpoint loaded here and run as one full forward."""

from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from transformers import AutoTokenizer

from xlora_core import XLoraModel

from .tiny_world import load_base

MODEL = "tiny-xlora"
TOL = 1e-4


@pytest.fixture()
def oai(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference(world):
    """The served model, here: log_softmax of a full uncached forward of a token sequence."""
    model = XLoraModel.from_pretrained(load_base(world["base"]), world["checkpoint"]).eval()

    def logprobs(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)

    return logprobs


@pytest.fixture(scope="module")
def tok(world):
    return AutoTokenizer.from_pretrained(world["base"])


def test_completion_logprobs_are_the_models(oai, tok, reference):
    out = oai.completions.create(model=MODEL, prompt="count: 1 2", max_tokens=6, temperature=0, logprobs=3)
    Completion.model_validate(out.to_dict())  # the client's own model, validating (it only constructs by default)
    choice = out.choices[0]
    lp = choice.logprobs
    n = out.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    assert "".join(lp.tokens) == choice.text
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(n)]
    prompt = tok("count: 1 2")["input_ids"]
    completion = tok.convert_tokens_to_ids(lp.tokens)  # one character (or special), one token
    full = reference(prompt + completion)
    for i, (token, value, top) in enumerate(zip(completion, lp.token_logprobs, lp.top_logprobs, strict=True)):
        at = full[len(prompt) - 1 + i]
        assert abs(value - at[token].item()) <= TOL
        assert len(top) == 3 and max(top.values()) == value  # greedy: the chosen one is the best
        assert sorted(top.values(), reverse=True) == pytest.approx(at.topk(3).values.tolist(), abs=TOL)


def test_echo_scores_a_prompt_of_token_ids_as_lm_eval_asks(server, tok, reference):
    """lm-eval's local-completions log-likelihood request, verbatim: token ids, echo, logprobs 1, max_tokens 1;
    it sums token_logprobs[ctxlen:-1] and calls it greedy if each is the best of its top_logprobs."""
    context, continuation = tok("Q: 2+2\nA:")["input_ids"], tok(" 4", add_special_tokens=False)["input_ids"]
    ids = context + continuation
    body = {"model": MODEL, "prompt": [ids], "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234,
            "echo": True}
    out = httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()
    (choice,) = out["choices"]
    lp = choice["logprobs"]
    assert len(lp["token_logprobs"]) == len(ids) + 1 and lp["token_logprobs"][0] is None
    assert lp["top_logprobs"][0] is None and choice["text"].startswith(tok.decode(ids))
    full = reference(ids)
    want = [full[i - 1, ids[i]].item() for i in range(1, len(ids))]
    assert max(abs(a - b) for a, b in zip(lp["token_logprobs"][1 : len(ids)], want, strict=True)) <= TOL
    ctxlen = len(context)
    score = sum(lp["token_logprobs"][ctxlen:-1])
    assert abs(score - sum(want[ctxlen - 1 :])) <= TOL * len(continuation)
    scored = zip(lp["token_logprobs"][ctxlen:-1], lp["top_logprobs"][ctxlen:-1], strict=True)
    greedy = all(t == max(top.values()) for t, top in scored)
    assert greedy == all(full[i - 1].argmax().item() == ids[i] for i in range(ctxlen, len(ids)))


def test_echo_with_max_tokens_0_scores_only(oai, tok, reference):
    out = oai.completions.create(model=MODEL, prompt="abc def", max_tokens=0, echo=True, logprobs=2,
                                 extra_body={"xlora_return_scalings": True})  # fmt: skip
    choice = out.choices[0]
    assert choice.text == "abc def" and choice.finish_reason == "length"
    assert out.usage.completion_tokens == 0
    ids = tok("abc def")["input_ids"]
    full = reference(ids)
    assert choice.logprobs.tokens == [tok.decode([i]) for i in ids]
    for i in range(1, len(ids)):
        assert abs(choice.logprobs.token_logprobs[i] - full[i - 1, ids[i]].item()) <= TOL
    assert len(out.model_extra["xlora"]["scalings"]["prompt"]) == len(ids)
    streamed = list(oai.completions.create(model=MODEL, prompt="abc def", max_tokens=0, echo=True, logprobs=2,
                                           stream=True))  # fmt: skip
    echoed = [c.choices[0] for c in streamed if c.choices and c.choices[0].text]
    assert [c.text for c in echoed] == ["abc def"]
    assert echoed[0].logprobs.token_logprobs == choice.logprobs.token_logprobs


def test_chat_logprobs_plain_and_streamed(oai):
    messages = [{"role": "user", "content": "sort 3 1 2"}]
    routing = {"xlora_routing": {"top_k": 2, "freeze_after": 1}}
    out = oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0, logprobs=True,
                                      top_logprobs=2, extra_body=routing)  # fmt: skip
    ChatCompletion.model_validate(out.to_dict())
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    assert "".join(c.token for c in content) == out.choices[0].message.content
    for c in content:
        assert c.logprob <= 0 and len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob == c.logprob
        assert bytes(c.bytes).decode() == c.token
    stream = oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0, logprobs=True,
                                         top_logprobs=2, stream=True, extra_body=routing)  # fmt: skip
    chunks = [ChatCompletionChunk.model_validate(chunk.to_dict()) for chunk in stream]
    streamed = [e for chunk in chunks if chunk.choices and chunk.choices[0].logprobs
                for e in chunk.choices[0].logprobs.content]  # fmt: skip
    assert [(e.token, e.logprob) for e in streamed] == [(c.token, c.logprob) for c in content]
    plain = oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0)
    assert plain.choices[0].logprobs is None


def test_sampled_logprobs_are_of_the_tempered_distribution(oai, tok, reference):
    out = oai.completions.create(model=MODEL, prompt="xyz", max_tokens=4, temperature=0.5, seed=11, logprobs=0)
    prompt = tok("xyz")["input_ids"]
    completion = tok.convert_tokens_to_ids(out.choices[0].logprobs.tokens)  # one character (or special), one token
    full = torch.log_softmax(reference(prompt + completion) / 0.5, dim=-1)  # log_softmax(x) / t, renormalised
    for i, value in enumerate(out.choices[0].logprobs.token_logprobs):
        assert abs(value - full[len(prompt) - 1 + i, completion[i]].item()) <= TOL


def test_n_choices_with_their_own_seeds(oai):
    kwargs = dict(model=MODEL, prompt="abc", max_tokens=8, temperature=1.0, seed=5)
    out = oai.completions.create(n=3, **kwargs)
    assert [c.index for c in out.choices] == [0, 1, 2]
    for i, choice in enumerate(out.choices):  # choice i is the request seeded seed + i
        alone = oai.completions.create(**{**kwargs, "seed": 5 + i})
        assert choice.text == alone.choices[0].text
    assert len({c.text for c in out.choices}) > 1
    assert out.usage.prompt_tokens == 4  # the prompt once: the choices share it
    stream = oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], n=2,
                                         max_tokens=6, temperature=1.0, seed=3, stream=True)  # fmt: skip
    texts, finishes = ["", ""], [None, None]
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            finishes[c.index] = c.finish_reason or finishes[c.index]
    plain = oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], n=2,
                                        max_tokens=6, temperature=1.0, seed=3)  # fmt: skip
    assert texts == [c.message.content for c in plain.choices]
    assert finishes == [c.finish_reason for c in plain.choices]


def test_several_prompts_give_one_choice_each(oai):
    out = oai.completions.create(model=MODEL, prompt=["one", "two 2"], max_tokens=5, temperature=0)
    alone = [oai.completions.create(model=MODEL, prompt=p, max_tokens=5, temperature=0) for p in ["one", "two 2"]]
    assert [c.text for c in out.choices] == [a.choices[0].text for a in alone]
    assert out.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)


def test_logit_bias(oai, tok):
    x = tok("x", add_special_tokens=False)["input_ids"][0]
    out = oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                      temperature=0, logit_bias={str(x): 100})  # fmt: skip
    assert out.choices[0].message.content == "xxxxx"


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"logit_bias": {"abc": 5}}, "logit_bias"),
        ({"logit_bias": {"5": 200}}, "logit_bias"),
        ({"logit_bias": {"100000": 5}}, "logit_bias"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"n": 0}, "n"),
        ({"n": 9}, "n"),
    ],
)
def test_bad_values_name_their_field(oai, kwargs, param):
    with pytest.raises(openai.BadRequestError) as info:
        oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=2, **kwargs)
    assert info.value.body["param"] == param, info.value.body


def test_bad_completion_prompts(oai):
    for prompt, param in [([], "prompt"), ([[]], "prompt"), ([5, 10**6], "prompt")]:
        with pytest.raises(openai.BadRequestError) as info:
            oai.completions.create(model=MODEL, prompt=prompt, max_tokens=2)
        assert info.value.body["param"] == param, info.value.body


def test_generate_logprobs_and_prompt_logprobs(client, tok, reference):
    body = {"prompt": "hello", "max_new_tokens": 4, "logprobs": 2, "prompt_logprobs": 1}
    out = client.post("/generate", json=body).json()
    ids = tok("hello")["input_ids"]
    full = reference(ids)
    assert out["prompt_logprobs"][0] is None and len(out["prompt_logprobs"]) == len(ids)
    for i, entry in enumerate(out["prompt_logprobs"][1:], start=1):
        assert entry["token_id"] == ids[i] and abs(entry["logprob"] - full[i - 1, ids[i]].item()) <= TOL
        assert len(entry["top"]) == 1
    assert len(out["logprobs"]) == out["usage"]["completion_tokens"]
    assert "".join(e["token"] for e in out["logprobs"]) == out["text"]
    assert all(math.isclose(e["logprob"], e["top"][0]["logprob"]) for e in out["logprobs"])



def test_generate_streams_logprobs(server, client):
    body = {"prompt": "stream me", "max_new_tokens": 5, "logprobs": 1, "prompt_logprobs": 0}
    plain = client.post("/generate", json=body).json()
    with httpx.stream("POST", server.url + "/generate", json={**body, "stream": True}, timeout=60) as r:
        events = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:")]
    tokens = events[:-1]
    assert [t["logprob"] for t in tokens] == plain["logprobs"]
    assert tokens[0]["prompt_logprobs"] == plain["prompt_logprobs"]
    assert all(t["prompt_logprobs"] is None for t in tokens[1:])


def test_logprobs_of_requests_batched_together_are_each_their_own(oai):
    """Requests that arrive together share batches (prefilled together, or joining the running rows' step):
    each still gets what it gets alone."""
    prompts = [f"batch {i} " * (i + 1) for i in range(6)]

    def ask(prompt: str):
        out = oai.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, logprobs=2)
        return out.choices[0].text, out.choices[0].logprobs.token_logprobs

    alone = [ask(p) for p in prompts]
    with ThreadPoolExecutor(6) as pool:
        together = list(pool.map(ask, prompts))
    for (text, logprobs), (text2, logprobs2) in zip(alone, together, strict=True):
        assert text == text2 and logprobs2 == pytest.approx(logprobs, abs=TOL)


def test_each_choice_has_its_scalings_entry(oai, client):
    out = oai.completions.create(model=MODEL, prompt="route me", n=2, max_tokens=3, temperature=1.0, seed=1,
                                 extra_body={"xlora_routing": {"top_k": 1}})  # fmt: skip
    entries = [client.get(f"/scalings/{out.id}-{i}").json() for i in range(2)]
    assert sum(e["completion_tokens"] for e in entries) == out.usage.completion_tokens
    assert all(e["prompt_tokens"] == out.usage.prompt_tokens and e["routing"]["top_k"] == 1 for e in entries)


def test_best_of_returns_the_choices_with_the_highest_logprob_per_token(oai):
    kwargs = dict(model=MODEL, prompt="pick", max_tokens=6, temperature=1.0, seed=4)
    every = oai.completions.create(n=3, logprobs=0, **kwargs)  # the same three candidates, seeded 4, 5, 6
    mean = [sum(c.logprobs.token_logprobs) / len(c.logprobs.token_logprobs) for c in every.choices]
    ranked = [every.choices[i].text for i in sorted(range(3), key=lambda i: -mean[i])]
    best = oai.completions.create(n=2, best_of=3, **kwargs)
    assert [c.text for c in best.choices] == ranked[:2] and [c.index for c in best.choices] == [0, 1]
    assert all(c.logprobs is None for c in best.choices)
    assert best.usage.completion_tokens == every.usage.completion_tokens  # every candidate counts
    for bad in ({"n": 2, "best_of": 1}, {"best_of": 2, "stream": True}):
        with pytest.raises(openai.BadRequestError) as info:
            oai.completions.create(model=MODEL, prompt="x", max_tokens=2, **bad)
        assert info.value.body["param"] == "best_of"
