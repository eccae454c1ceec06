"""Prometheus metrics, in a registry of their own (so tests and several apps in one process do not clash).

A Ray Serve replica passes its replica id: every sample it renders then carries a `replica` label.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric

if TYPE_CHECKING:
    from xlora_core import Routing

_LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_TOKEN_TIME = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
_TOKENS = (1, 4, 16, 64, 256, 1024, 4096, 16384)
_BATCH = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 128)
_CHUNKS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    def __init__(self, replica: str | None = None) -> None:
        self.replica = replica
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "xlora_requests", "HTTP requests by route and status", ["route", "method", "status"], registry=r
        )
        self.request_latency = Histogram(
            "xlora_request_latency_seconds", "Time to answer a request", ["route"], buckets=_LATENCY, registry=r
        )
        self.time_to_first_token = Histogram(
            "xlora_time_to_first_token_seconds", "From submission to first generated token", buckets=_LATENCY,
            registry=r,
        )
        self.time_per_output_token = Histogram(
            "xlora_time_per_output_token_seconds", "Mean time between generated tokens, per request",
            buckets=_TOKEN_TIME, registry=r,
        )
        self.prompt_tokens = Counter("xlora_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generated_tokens = Counter("xlora_generated_tokens", "Tokens generated", registry=r)
        self.prompt_tokens_per_request = Histogram(
            "xlora_request_prompt_tokens", "Prompt length per request", buckets=_TOKENS, registry=r
        )
        self.generated_tokens_per_request = Histogram(
            "xlora_request_generated_tokens", "Completion length per request", buckets=_TOKENS, registry=r
        )
        self.generations = Counter(
            "xlora_generations", "Finished generations by outcome", ["outcome"], registry=r
        )
        self.model_generations = Counter(  # docs/models.md
            "xlora_model_generations", "Finished generations by model and outcome", ["model", "outcome"], registry=r
        )
        self.queue_depth = Gauge("xlora_queue_depth", "Requests waiting for a batch slot", registry=r)
        self.running = Gauge("xlora_running_requests", "Requests in the running batch", registry=r)
        self.kv_cache_bytes = Gauge("xlora_kv_cache_bytes", "Memory held by the running batch's KV caches", registry=r)
        self.batch_size = Histogram(
            "xlora_batch_size", "Rows in each model step", ["phase"], buckets=_BATCH, registry=r
        )
        self.routing_top_k = Gauge(
            "xlora_routing_top_k", "Experts kept per token in force (0 = dense)", registry=r
        )
        self.routing_global_scaling_weight = Gauge(
            "xlora_routing_global_scaling_weight", "Global scaling weight in force", registry=r
        )
        self.routing_freeze_after = Gauge(
            "xlora_routing_freeze_after", "Generated tokens after which scalings freeze in force (-1 = granular)",
            registry=r,
        )
        self.frozen_rows = Gauge(
            "xlora_frozen_rows", "Rows of the running batch whose scalings are frozen (no scaling pass)", registry=r
        )
        self.mean_scaling = Gauge(
            "xlora_mean_scaling", "Mean scaling per adapter over the requests in the scalings log",
            ["adapter"], registry=r,
        )
        self.prefill_chunks = Histogram(
            "xlora_prefill_chunks", "Forwards a request's prompt was fed in (chunked prefill; 1 = whole)",
            buckets=_CHUNKS, registry=r,
        )
        self.prefix_cache_hits = Counter(
            "xlora_prefix_cache_hits", "Requests whose prompt began with a prefix found in the prefix cache", registry=r
        )
        self.prefix_cache_reused_tokens = Counter(
            "xlora_prefix_cache_reused_tokens", "Prompt tokens taken from the prefix cache, not computed", registry=r
        )
        self.prefix_cache_bytes = Gauge(
            "xlora_prefix_cache_bytes", "Memory held by the prefix cache (keys, values and scalings)", registry=r
        )
        self.model_loaded = Gauge("xlora_model_loaded", "1 once the model is loaded and serving", registry=r)
        self.decode_compiled = Gauge("xlora_decode_compiled", "1 while decode steps run the compiled step", registry=r)
        self.gc_frozen_objects = Gauge(
            "xlora_gc_frozen_objects",
            "Objects left out of Python's full garbage collections (the heap as loaded: gc.freeze)", registry=r,
        )
        self.gc_frozen_objects.set_function(gc.get_freeze_count)

    def set_routing(self, routing: Routing) -> None:
        self.routing_top_k.set(0 if routing.top_k is None else routing.top_k)
        self.routing_global_scaling_weight.set(routing.global_scaling_weight)
        self.routing_freeze_after.set(-1 if routing.freeze_after is None else routing.freeze_after)

    def watch_mean_scaling(self, adapter_names: list[str], mean_of: Callable[[int], float]) -> None:
        """Read each adapter's mean scaling from the log at scrape time (no bookkeeping per request)."""
        for index, name in enumerate(adapter_names):
            self.mean_scaling.labels(adapter=name).set_function(lambda i=index: mean_of(i))

    def collect(self) -> Iterator[Metric]:
        """Every metric, each sample labelled with the replica when there is one."""
        for metric in self.registry.collect():
            if self.replica is not None:
                metric.samples = [s._replace(labels={**s.labels, "replica": self.replica}) for s in metric.samples]
            yield metric

    def render(self) -> bytes:
        return generate_latest(self)
