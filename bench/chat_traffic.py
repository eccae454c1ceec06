"""Chat traffic on live servers: the prefix cache and chunked prefill, each against the server without it, side
by side in one run (docs/prefix-caching.md).

    python -m bench.chat_traffic                       # the embedded default, 8 clients, 1 torch thread
    python -m bench.chat_traffic --clients 4 --turns 2 --long-prompt-words 800

Three servers of the same config (--config) are started on 127.0.0.1 and are up for the whole run, each
idle while another is measured:
  cache    as configured (prefix cache on, chunked prefill under server.max_step_tokens);
  no-cache server.prefix_cache_bytes 0 (chunked prefill still on);
  whole    server.prefix_cache_bytes 0 and a max_step_tokens larger than any prompt: no chunks (as before).

1. Chat (cache vs no-cache vs whole): --clients clients, each a conversation of --turns turns through streamed
   /v1/chat/completions, every one beginning with the same ~200-token system prompt; a follow-up resends the
   whole conversation, the answers included. One request with the system prompt runs first on each server,
   so the measured requests find it in the cache. Reports TTFT p50/p90 (first content chunk), aggregate
   completion tok/s, the prefix cache's hits and reused tokens (from /metrics), and whether both servers'
   answers are the same (greedy: they must be).
2. Stall (cache vs whole): --streams streams of /generate run; once each has 20 tokens a --long-prompt-words
   prompt (about a token a word, a new one on each server) arrives. Reports each stream's median gap
   between two tokens before it arrived, its median, p90 and longest gap while it was prefilled, and the ratios
   of the longest and the p90 to the median before (goal <= 3).

The machine's load average is printed with the numbers: on a busy machine compare the ratios, not the times.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.load import REPO, Server, config_copy, machine
from bench.soak import metric

SYSTEM = (
    "You are Atlas, the support assistant of Northwind Outfitters, a shop that sells hiking, climbing and camping "
    "gear online and in twelve stores. Answer in a friendly, concise way, in at most three sentences unless the "
    "customer asks for detail. Our return policy: unused items can be returned within 60 days with the receipt; "
    "worn footwear within 14 days if it does not fit; sale items are final. Shipping is free above 50 euros and "
    "takes two to four working days; express delivery costs 9 euros and arrives the next working day when "
    "ordered before 2 pm. Members of the Trail Club get 10 percent off full-price items, early access to sales "
    "and free repairs of tents and backpacks bought from us. Never promise a refund or a discount that these "
    "rules do not allow, never ask for card numbers, and when you do not know an answer, say so and offer to "
    "connect the customer to a human colleague during opening hours, 9 am to 6 pm, Monday to Saturday."
)

QUESTIONS = [
    ["Can I return boots I wore once on a hike?", "What if they are too small?", "And if I bought them on sale?"],
    ["How long does shipping take?", "Is express delivery available on Sundays?", "How much does it cost?"],
    ["What does the Trail Club give me?", "Does the discount apply to sale items?", "Can my tent be repaired?"],
    ["I want to return a jacket after 70 days.", "It still has its tags.", "Can I talk to someone?"],
    ["Do you sell climbing ropes?", "Which one for a beginner?", "Can I pick it up in a store?"],
    ["My order has not arrived after five days.", "I ordered on a Friday.", "What can you do about it?"],
    ["Is there a discount for students?", "What about the Trail Club?", "How do I join?"],
    ["Can I pay with my card number here?", "Then how do I pay?", "Is shipping free for 45 euros?"],
]

COUNTING = "Count from {start} to 9999, one number after another, separated by commas: {start}, {next},"


@dataclass
class Chat:
    ttfts: list[float] = field(default_factory=list)
    tokens: int = 0
    answers: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


async def chat_turn(client: httpx.AsyncClient, messages: list[dict], max_tokens: int, out: Chat) -> str:
    body = {"model": client.headers["x-bench-model"], "messages": messages, "max_tokens": max_tokens,
            "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    start, first, text = time.perf_counter(), None, []
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            out.errors.append(f"{r.status_code}: {(await r.aread()).decode()[:200]}")
            return ""
        async for line in r.aiter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            data = json.loads(line[5:])
            if data.get("usage"):
                out.tokens += data["usage"]["completion_tokens"]
            for choice in data.get("choices", []):
                content = choice.get("delta", {}).get("content")
                if content:
                    first = first or time.perf_counter()
                    text.append(content)
    if first is not None:
        out.ttfts.append(first - start)
    answer = "".join(text)
    out.answers.append(answer)
    return answer


async def conversation(client: httpx.AsyncClient, questions: list[str], turns: int, max_tokens: int, out: Chat):
    messages = [{"role": "system", "content": SYSTEM}]
    for question in questions[:turns]:
        messages.append({"role": "user", "content": question})
        answer = await chat_turn(client, messages, max_tokens, out)
        messages.append({"role": "assistant", "content": answer})


def model_client(url: str) -> httpx.AsyncClient:
    """A client of the server at `url`, the id of the model it serves in its x-bench-model header (for /v1)."""
    name = httpx.get(url + "/v1/models").json()["data"][0]["id"]
    return httpx.AsyncClient(base_url=url, timeout=600, headers={"x-bench-model": name})


async def chat_round(url: str, clients: int, turns: int, max_tokens: int) -> tuple[Chat, float]:
    out = Chat()
    async with model_client(url) as client:
        started = time.perf_counter()
        await asyncio.gather(*(
            conversation(client, QUESTIONS[i % len(QUESTIONS)], turns, max_tokens, out) for i in range(clients)
        ))  # fmt: skip
        return out, time.perf_counter() - started


def long_prompt(words: int, seed: int) -> str:
    rng = random.Random(seed)
    vocabulary = ("river stone lantern harbor meadow copper violet thunder orchard signal ladder glacier "
                  "candle market feather compass pepper island silver garden winter basket").split()  # fmt: skip
    return "Summarize this list in one word: " + " ".join(rng.choice(vocabulary) for _ in range(words))


async def stream_times(client: httpx.AsyncClient, prompt: str, max_new: int, times: list[float]) -> None:
    body = {"prompt": prompt, "max_new_tokens": max_new, "temperature": 0.0, "stream": True}
    async with client.stream("POST", "/generate", json=body) as r:
        async for line in r.aiter_lines():
            if line.startswith("event:") and line.split(":", 1)[1].strip() == "token":
                times.append(time.perf_counter())


async def stall_round(url: str, streams: int, words: int, seed: int, max_new: int) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        times: list[list[float]] = [[] for _ in range(streams)]
        prompts = [COUNTING.format(start=100 * (i + 1), next=100 * (i + 1) + 1) for i in range(streams)]
        tasks = [asyncio.create_task(stream_times(client, p, max_new, times[i])) for i, p in enumerate(prompts)]
        while any(len(t) < 20 and not task.done() for t, task in zip(times, tasks, strict=True)):
            await asyncio.sleep(0.01)
        sent = time.perf_counter()
        r = await client.post("/generate", json={"prompt": long_prompt(words, seed), "max_new_tokens": 1})
        done = time.perf_counter()
        body = r.json()
        await asyncio.gather(*tasks)
    rows = []
    for t in times:
        gaps_before = [b - a for a, b in zip(t, t[1:], strict=False) if b <= sent]
        during = [b - a for a, b in zip(t, t[1:], strict=False) if b > sent and a < done]
        ended_early = not t or t[-1] < done
        rows.append({"median_gap_before": statistics.median(gaps_before) if gaps_before else float("nan"),
                     "median_gap_during": p(during, 50), "p90_gap_during": p(during, 90),
                     "max_gap_during": max(during) if during else float("nan"), "gaps_during": len(during),
                     "tokens": len(t), "ended_before_the_prompt_was_done": ended_early})  # fmt: skip
    usage = body.get("usage", {})
    return {"prompt_tokens": usage.get("prompt_tokens"), "prefill_s": done - sent, "streams": rows,
            "status": r.status_code}  # fmt: skip


def warm(url: str, max_tokens: int) -> None:
    """One request with the system prompt (stored in the prefix cache where there is one), one plain."""
    out = Chat()
    asyncio.run(chat_round_single(url, max_tokens, out))
    with httpx.Client(base_url=url, timeout=600) as c:
        c.post("/generate", json={"prompt": "Hello", "max_new_tokens": 4})


async def chat_round_single(url: str, max_tokens: int, out: Chat) -> None:
    async with model_client(url) as client:
        await chat_turn(client, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi!"}],
                        max_tokens, out)  # fmt: skip


def p(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "default.yaml")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=24, help="per chat answer")
    parser.add_argument("--streams", type=int, default=2)
    parser.add_argument("--stream-tokens", type=int, default=300, help="max_new_tokens of each running stream")
    parser.add_argument("--long-prompt-words", type=int, default=2000, help="about a token a word")
    parser.add_argument("--threads", type=int, default=1, help="model.torch_threads of every server")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: chat, stall")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    args = parser.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))

    log_dir = REPO / "runs"
    log_dir.mkdir(exist_ok=True)
    report: dict = {"machine": machine()}
    print(report["machine"], flush=True)
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        model = {"torch_threads": args.threads}
        overrides = {
            "cache": {},
            "no-cache": {"prefix_cache_bytes": 0},
            "whole": {"prefix_cache_bytes": 0, "max_step_tokens": 1 << 20},
        }
        servers = {}
        for mode, server in overrides.items():
            if mode == "no-cache" and "chat" in skip:
                continue
            config = config_copy(args.config, Path(tmp), {"model": model, "server": server}, name=f"{mode}.yaml")
            servers[mode] = stack.enter_context(Server(config, log_dir / f"chat-traffic-{mode}-server.log"))
        for mode, server in servers.items():
            server.wait_ready(600)
            warm(server.url, args.max_tokens)
            print(f"{mode}: ready (pid {server.pid})", flush=True)

        if "chat" not in skip:
            chats = {}
            for mode in ("cache", "no-cache", "whole"):
                before = httpx.get(servers[mode].url + "/metrics").text
                chat, wall = asyncio.run(chat_round(servers[mode].url, args.clients, args.turns, args.max_tokens))
                after = httpx.get(servers[mode].url + "/metrics").text
                hits = (metric(after, "xlora_prefix_cache_hits_total") or 0) - (
                    metric(before, "xlora_prefix_cache_hits_total") or 0)
                reused = (metric(after, "xlora_prefix_cache_reused_tokens_total") or 0) - (
                    metric(before, "xlora_prefix_cache_reused_tokens_total") or 0)
                chats[mode] = chat
                report[f"chat {mode}"] = {
                    "requests": len(chat.ttfts), "ttft_p50": p(chat.ttfts, 50), "ttft_p90": p(chat.ttfts, 90),
                    "tok_per_s": chat.tokens / wall, "wall_s": wall, "prefix_cache_hits": hits,
                    "tokens_reused": reused, "errors": chat.errors,
                }  # fmt: skip
                print(f"chat {mode}: {json.dumps(report[f'chat {mode}'])}", flush=True)
            on, off, whole = report["chat cache"], report["chat no-cache"], report["chat whole"]
            report["chat ratios"] = {
                "ttft_p50 no-cache / cache": off["ttft_p50"] / on["ttft_p50"],
                "ttft_p50 whole / cache": whole["ttft_p50"] / on["ttft_p50"],
                "tok/s cache / no-cache": on["tok_per_s"] / off["tok_per_s"],
                "tok/s cache / whole": on["tok_per_s"] / whole["tok_per_s"],
                "same answers": sorted(chats["cache"].answers) == sorted(chats["no-cache"].answers)
                == sorted(chats["whole"].answers),
            }
            print(f"chat ratios: {json.dumps(report['chat ratios'])}", flush=True)

        if "stall" not in skip:
            for i, mode in enumerate(("cache", "whole")):
                result = asyncio.run(stall_round(servers[mode].url, args.streams, args.long_prompt_words, 100 + i,
                                                 args.stream_tokens))  # fmt: skip
                for row in result["streams"]:
                    row["ratio max/median"] = row["max_gap_during"] / row["median_gap_before"]
                    row["ratio p90/median"] = row["p90_gap_during"] / row["median_gap_before"]
                report[f"stall {mode}"] = result
                print(f"stall {mode}: {json.dumps(result)}", flush=True)
    report["machine after"] = machine()
    print(report["machine after"], flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
