"""The compiled decode step (XLoraModel.compile): the same greedy tokens as eager, and no new
compilation once the batch sizes a server sees have each run once, however rows join and leave."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters
from torch._inductor.utils import run_and_get_code

from xlora_core import Routing, RowDecoder, SamplingParams, XLoraConfig, XLoraModel
from xlora_core.engine import BatchRow, DecodeBatch

from .tiny_world import VOCAB, build_world, load_base


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    base, experts = build_world(tmp_path_factory.mktemp("compile"))
    config = dict(hidden_size=32, adapters=experts, xlora_depth=2, xlora_size=16)
    torch.manual_seed(5)
    eager = XLoraModel(load_base(base), XLoraConfig(**config))
    compiled = XLoraModel(load_base(base), XLoraConfig(**config))
    compiled.classifier.load_state_dict(eager.classifier.state_dict())
    compiled.compile()
    yield eager, compiled
    torch._dynamo.reset()


def prompt(n: int, seed: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def run_joining_and_leaving(model: XLoraModel, frozen_row: bool) -> list[list[int]]:
    """The engine as the server runs it: a runs alone, b joins after 3 steps, c after 5, then they
    leave as they finish (batch sizes 1, 2, 3, 2, 1). With frozen_row, b freezes after 1 token."""
    def row(i: int, n: int, routing: Routing) -> BatchRow:
        params = SamplingParams(max_new_tokens=n, min_new_tokens=n)
        return BatchRow(RowDecoder(params, None, prompt(4 + 3 * i, seed=i)[0].tolist()), routing)

    rows = [row(0, 14, Routing()), row(1, 6, Routing(freeze_after=1 if frozen_row else None)), row(2, 7, Routing())]
    batch, _ = DecodeBatch.prefill(model, rows[:1])
    for step in range(20):
        if step in (3, 5):
            newcomer, _ = DecodeBatch.prefill(model, [rows[1 if step == 3 else 2]])
            batch.concatenate([newcomer])
        if not batch:
            break
        batch.step()
    return [r.decoder.completion_ids for r in rows]


def both_runs(model: XLoraModel) -> list[list[list[int]]]:
    """run_joining_and_leaving with every row granular, then with b frozen after 1 token."""
    return [run_joining_and_leaving(model, frozen_row) for frozen_row in (False, True)]


def test_compiled_steps_give_the_eager_tokens_and_do_not_recompile(models):
    # Both runs after one compilation (each compilation takes about a minute on 2 cores).
    eager, compiled = models
    expected = both_runs(eager)
    with torch._inductor.config.patch(fx_graph_cache=False):  # compile here, not from an earlier run's cache
        got, code = run_and_get_code(both_runs, compiled)  # dynamo reset: compiles
    assert got == expected
    # The weights are frozen into every graph (what lets inductor use its C++ GEMM kernels on CPU).
    assert code and all("_frozen_param" in c for c in code)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0  # the compiled step did run
    assert both_runs(compiled) == expected
    assert counters["stats"]["unique_graphs"] == graphs  # the same sizes again: nothing recompiled


def test_generate_after_compile_matches_eager(models):
    eager, compiled = models
    ids = prompt(6, seed=9)
    for routing in (Routing(), Routing(freeze_after=0)):
        want = eager.generate(ids, max_new_tokens=8, routing=routing)
        assert torch.equal(compiled.generate(ids, max_new_tokens=8, routing=routing), want)
