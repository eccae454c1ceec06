"""The server's scheduler in-process, on the tiny model: jobs join and leave the running batch, a cancelled
job leaves it, a job past its deadline times out, and a request that breaks the model fails alone."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from server.observability.metrics import Metrics
from server.observability.scalings_log import RequestScalingsLog
from server.serving.jobs import DoneEvent, ErrorEvent, GenerationJob, TokenEvent
from server.serving.scheduler import Scheduler
from xlora_core import PrefixCache, Routing, RowDecoder, SamplingParams, XLoraConfig, XLoraModel

from .tiny_world import VOCAB, build_world, load_base, make_tiny_tokenizer

POISON = VOCAB + 5  # past the embedding table: the model itself fails on it


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base, experts = build_world(tmp_path_factory.mktemp("sched"))
    torch.manual_seed(3)
    model = XLoraModel(load_base(base), XLoraConfig(hidden_size=32, adapters=experts, xlora_depth=2, xlora_size=16))
    return model, make_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def prompt(seed: int, n: int = 6) -> list[int]:
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def alone(model: XLoraModel, ids: list[int], n: int, routing: Routing | None = None) -> list[int]:
    return model.generate(torch.tensor([ids]), max_new_tokens=n, routing=routing)[0, len(ids) :].tolist()


class Harness:
    def __init__(
        self, model: XLoraModel, tokenizer, max_batch_size: int = 4, max_step_tokens: int | None = None,
        prefix_cache: PrefixCache | None = None,
    ) -> None:  # fmt: skip
        self.metrics = Metrics()
        self.log = RequestScalingsLog(32)
        self.scheduler = Scheduler(model, tokenizer, max_batch_size=max_batch_size, max_queue=16,
                                   metrics=self.metrics, scalings_log=self.log,
                                   max_step_tokens=max_step_tokens, prefix_cache=prefix_cache)  # fmt: skip
        self.tokenizer = tokenizer

    def job(self, ids: list[int], n: int, routing: Routing | None = None, timeout: float = 60) -> GenerationJob:
        # No tokenizer: no eos either, as model.generate on this base (its generation config has none).
        decoder = RowDecoder(SamplingParams(max_new_tokens=n), None, ids)
        return GenerationJob(id=f"job-{len(ids)}-{time.monotonic_ns()}", decoder=decoder, routing=routing or Routing(),
                             deadline=time.monotonic() + timeout, loop=asyncio.get_running_loop())  # fmt: skip

    def sample(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0


async def events(job: GenerationJob, until: int | None = None) -> list:
    """The job's events up to Done/Error (or the first `until` tokens)."""
    out = []
    while True:
        event = await asyncio.wait_for(job.events.get(), 60)
        out.append(event)
        if isinstance(event, DoneEvent | ErrorEvent) or (until is not None and len(out) == until):
            return out


def tokens(evs: list) -> list[int]:
    return [e.token_id for e in evs if isinstance(e, TokenEvent)]


def test_jobs_join_and_leave_the_running_batch(world):
    model, tokenizer = world

    async def main():
        h = Harness(model, tokenizer)
        h.scheduler.start()
        try:
            first = h.job(prompt(1), 30)
            h.scheduler.submit(first)
            head = await events(first, until=3)  # running alone
            late = [h.job(prompt(2, 9), 6), h.job(prompt(3, 4), 12, Routing(freeze_after=0))]
            for job in late:
                h.scheduler.submit(job)
            rest = await asyncio.gather(events(first), *(events(job) for job in late))
        finally:
            h.scheduler.stop()
        return h, head + rest[0], rest[1:], [first, *late]

    h, first_events, late_events, jobs = asyncio.run(main())
    assert tokens(first_events) == alone(model, prompt(1), 30)
    assert tokens(late_events[0]) == alone(model, prompt(2, 9), 6)
    assert tokens(late_events[1]) == alone(model, prompt(3, 4), 12, Routing(freeze_after=0))
    assert isinstance(late_events[1][-1], DoneEvent) and late_events[1][-1].frozen_from == 4
    # They shared decode steps: some steps ran 3 rows, and rows left as they finished.
    steps = h.sample("xlora_batch_size_count", phase="decode")
    single = h.sample("xlora_batch_size_bucket", phase="decode", le="1.0")
    assert h.sample("xlora_batch_size_bucket", phase="decode", le="2.0") < steps and single > 0
    assert h.scheduler.in_flight == 0 and h.sample("xlora_running_requests") == 0
    assert {e.id for e in h.log.entries()} == {job.id for job in jobs}


def test_a_cancelled_job_leaves_and_the_others_go_on(world):
    model, tokenizer = world

    async def main():
        h = Harness(model, tokenizer)
        h.scheduler.start()
        try:
            doomed, kept = h.job(prompt(4), 40), h.job(prompt(5), 20)
            h.scheduler.submit(doomed)
            h.scheduler.submit(kept)
            await events(doomed, until=2)
            doomed.cancel()  # as the event loop does when the client goes away
            kept_events = await events(kept)
        finally:
            h.scheduler.stop()
        return h, doomed, kept_events

    h, doomed, kept_events = asyncio.run(main())
    assert tokens(kept_events) == alone(model, prompt(5), 20)
    assert h.sample("xlora_generations_total", outcome="cancelled") == 1
    assert not doomed.finished and h.log.get(doomed.id) is None


@pytest.mark.parametrize("separate_prefill", [False, True], ids=["in-the-step", "separate"])
def test_long_prompts_are_prefilled_in_chunks_while_running_rows_get_tokens_and_a_cancel_mid_chunk_frees_rows(
    world, separate_prefill
):
    """max_step_tokens 16: two 300-token prompts arrive beside a running row; it gets a token every step
    while they are fed 16 tokens a step; one is cancelled mid-prefill and leaves, the other's tokens are
    those of its unchunked prefill. In the running rows' step (eager), or in forwards of their own
    (`separate_prefill`, as with a compiled model)."""
    model, tokenizer = world

    async def main():
        h = Harness(model, tokenizer, max_step_tokens=16)
        h.scheduler.separate_prefill = separate_prefill
        h.scheduler.start()
        try:
            running = h.job(prompt(10), 60)
            h.scheduler.submit(running)
            head = await events(running, until=2)
            long, doomed = h.job(prompt(11, 300), 5), h.job(prompt(12, 300), 5)
            h.scheduler.submit(long, doomed)
            meanwhile = await events(running, until=6)  # the newcomers are still being prefilled
            assert long.events.empty() and doomed.events.empty()
            doomed.cancel()  # its client went away mid-prefill
            rest = await asyncio.gather(events(running), events(long))
            return h, head + meanwhile + rest[0], rest[1], doomed
        finally:
            h.scheduler.stop()

    h, running, long, doomed = asyncio.run(main())
    assert tokens(running) == alone(model, prompt(10), 60)
    assert tokens(long) == alone(model, prompt(11, 300), 5)  # unchunked: one prefill
    assert h.sample("xlora_generations_total", outcome="cancelled") == 1 and h.log.get(doomed.id) is None
    assert h.sample("xlora_prefill_chunks_count") == 2  # the running row's prompt and the long one's
    assert h.sample("xlora_prefill_chunks_bucket", le="8.0") == 1  # 300 tokens at <= 16 a step: 19 or more
    assert h.scheduler.in_flight == 0 and h.sample("xlora_running_requests") == 0


@pytest.mark.parametrize("separate_prefill", [False, True], ids=["in-the-step", "separate"])
def test_requests_join_a_running_batch_from_the_prefix_cache_with_the_tokens_they_get_without(world, separate_prefill):
    """A 70-token prompt fills the prefix cache; two prompts that begin with its first 64 tokens then join a
    running row from it (one short enough for the running row's step, one longer than the 80-token budget,
    in forwards of its own): the same tokens as alone."""
    model, tokenizer = world
    shared = prompt(13, 70)
    first, short, long = shared, shared[:64] + prompt(14, 3), shared[:64] + prompt(15, 40)

    async def main():
        h = Harness(model, tokenizer, max_step_tokens=80, prefix_cache=PrefixCache(1 << 26))
        h.scheduler.separate_prefill = separate_prefill
        h.scheduler.start()
        try:
            job = h.job(first, 3)
            h.scheduler.submit(job)
            await events(job)
            running = h.job(prompt(16), 30)
            h.scheduler.submit(running)
            head = await events(running, until=2)
            late = [h.job(short, 8), h.job(long, 8)]
            h.scheduler.submit(*late)
            return h, await asyncio.gather(events(running), *(events(job) for job in late)), head
        finally:
            h.scheduler.stop()

    h, (running, got_short, got_long), head = asyncio.run(main())
    assert tokens(head + running) == alone(model, prompt(16), 30)
    assert tokens(got_short) == alone(model, short, 8) and tokens(got_long) == alone(model, long, 8)
    assert h.sample("xlora_prefix_cache_hits_total") == 2
    assert h.sample("xlora_prefix_cache_reused_tokens_total") == 2 * 64


def test_a_request_that_breaks_the_model_fails_alone(world):
    model, tokenizer = world

    async def main():
        h = Harness(model, tokenizer)
        good = [h.job(prompt(6), 8), h.job(prompt(7, 3), 8)]
        bad = h.job([5, POISON, 6], 8)
        for job in (good[0], bad, good[1]):
            h.scheduler.submit(job)  # queued before the worker starts: admitted, and prefilled, together
        h.scheduler.start()
        try:
            return h, await asyncio.gather(*(events(job) for job in (good[0], bad, good[1])))
        finally:
            h.scheduler.stop()

    h, (first, broken, second) = asyncio.run(main())
    assert isinstance(broken[-1], ErrorEvent) and broken[-1].status == 500 and broken[-1].code == "model_error"
    assert tokens(first) == alone(model, prompt(6), 8)
    assert tokens(second) == alone(model, prompt(7, 3), 8)
    assert h.sample("xlora_generations_total", outcome="error") == 1


def test_a_request_that_breaks_the_model_while_joining_a_running_batch_fails_alone(world):
    """Newcomers join in the running rows' decode step; when that forward fails, the batch goes on as it
    was and the newcomers are prefilled apart, so only the bad one fails."""
    model, tokenizer = world

    async def main():
        h = Harness(model, tokenizer)
        h.scheduler.start()
        try:
            running = h.job(prompt(8), 12)
            h.scheduler.submit(running)
            head = await events(running, until=2)
            late = [h.job(prompt(9, 5), 6), h.job([7, POISON], 6)]
            for job in late:
                h.scheduler.submit(job)
            return h, await asyncio.gather(events(running), *(events(job) for job in late)), head
        finally:
            h.scheduler.stop()

    h, (running, good, broken), head = asyncio.run(main())
    assert isinstance(broken[-1], ErrorEvent) and broken[-1].code == "model_error"
    assert tokens(head + running) == alone(model, prompt(8), 12)
    assert tokens(good) == alone(model, prompt(9, 5), 6)
    assert h.sample("xlora_generations_total", outcome="error") == 1


def test_a_job_past_its_deadline_times_out(world):
    model, tokenizer = world

    async def main():
        h = Harness(model, tokenizer)
        late = h.job(prompt(8), 8, timeout=-1)
        h.scheduler.submit(late)
        h.scheduler.start()
        try:
            return h, await events(late)
        finally:
            h.scheduler.stop()

    h, evs = asyncio.run(main())
    assert isinstance(evs[-1], ErrorEvent) and evs[-1].status == 504 and evs[-1].code == "timeout"
    assert h.sample("xlora_generations_total", outcome="timeout") == 1
