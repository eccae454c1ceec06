"""The Ray Serve application: replicas of the same FastAPI app behind one endpoint (README: "Scaling out").

    xlora-serve --config configs/default.yaml --replicas 2     # a local Ray cluster on 127.0.0.1 (run_local)
    serve run configs/ray-serve.yaml                            # any Ray cluster (build_app, from a Serve config)

Each replica (`XLoraReplica`, a Serve deployment with `@serve.ingress`) loads its own model and runs its own
batching scheduler; every route, schema, stream and `/v1` endpoint is the single-process server's. What the
replicas share lives in two deployment-scoped actors, which the Serve controller starts before the replicas,
keeps while any replica comes and goes, health-checks, and removes with the deployment:

- `routing_state` (`RoutingStateActor`): the routing in force and its version. Every request reads it once,
  so a `PATCH /routing` through any replica is in force on all of them for the requests that start after it,
  and a replica that Ray restarts comes back with the current routing. With `server.state_file` the actor
  also keeps it in that file (on the actor's node), so it survives the actor's own restart.
- `scalings_log` (`SharedScalingsLog`): the deployment's one bounded scalings log; entries name their replica.

Metrics: each replica's samples carry `replica="<id>"`; `RayMetricsExporter` copies them into Ray's metrics
every few seconds, so Ray's metrics agent exports every replica's on its node's metrics port (as `ray_xlora_...`),
where Prometheus finds them through Ray's service discovery file (README: "Scaling out").

A replica takes traffic only once its model is loaded: its ASGI start-up waits for the loader, and Serve
routes to a replica only after that start-up has finished; `check_health` fails if its model worker died.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import time
from collections import deque
from pathlib import Path
from typing import Any

import ray
from ray import serve
from ray.serve.config import DeploymentActorConfig

from server.app import create_app
from server.observability.metrics import Metrics
from server.observability.scalings_log import ScalingsEntry
from server.observability.scalings_store import SharedScalingsLog
from server.serving.manager import ModelManager
from server.serving.routing_state import (
    RoutingSnapshot,
    StoredRouting,
    config_routing,
    routing_from_dict,
)
from server.settings import AuthSettings, Settings, load_settings

log = logging.getLogger("xlora.ray")

DEPLOYMENT = "XLoraReplica"
ROUTING_ACTOR = "routing_state"
SCALINGS_ACTOR = "scalings_log"
PROJECT_ROOT = Path(__file__).resolve().parent.parent
# Ray's single-machine setting: every Ray process (GCS, raylet, workers, agents) on the loopback address. Ray
# reads it when `ray` is first imported, so it must be in the environment before that (xlora-serve and
# tests/conftest.py set it first thing); start_local_cluster refuses to start without it.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
_ACTOR_TIMEOUT_S = 10.0  # a state actor that does not answer in this long is treated as away (503)


# -----------------------------------------------------------------------------
# the shared state's actors and the replicas' handles to them


class RoutingStateActor:
    """The deployment's routing: (fields, version), compare-and-set, optionally kept in a state file."""

    def __init__(self, initial: dict[str, Any], state_file: str | None) -> None:
        self.stored = StoredRouting(initial, state_file)

    def get(self) -> tuple[dict[str, Any], int]:
        return self.stored.get()

    def compare_and_set(self, expected_version: int, routing: dict[str, Any]) -> tuple[dict[str, Any], int] | None:
        return self.stored.compare_and_set(expected_version, routing)


class _DeploymentActor:
    """A deployment-scoped actor by name. The controller may replace the actor (health checks): a call that
    meets a dead actor looks the name up again and retries, until `_ACTOR_TIMEOUT_S` has passed."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._handle = None

    def _lookup(self, deadline: float):
        while True:
            try:
                self._handle = serve.get_deployment_actor(self.name)
                return self._handle
            except ValueError:  # not (re)created yet
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    async def call(self, method: str, *args: Any) -> Any:
        deadline = time.monotonic() + _ACTOR_TIMEOUT_S
        while True:
            handle = self._handle or await asyncio.to_thread(self._lookup, deadline)
            try:
                remaining = max(0.1, deadline - time.monotonic())
                return await asyncio.wait_for(getattr(handle, method).remote(*args), remaining)
            except ray.exceptions.RayActorError:
                self._handle = None
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)

    def call_sync(self, method: str, *args: Any) -> Any:
        """From a plain thread (the scheduler's worker)."""
        deadline = time.monotonic() + _ACTOR_TIMEOUT_S
        while True:
            handle = self._handle or self._lookup(deadline)
            try:
                return ray.get(getattr(handle, method).remote(*args), timeout=max(0.1, deadline - time.monotonic()))
            except ray.exceptions.RayActorError:
                self._handle = None
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)


class RayRoutingState:
    """A replica's view of `RoutingStateActor` (the RoutingState protocol of server/serving/routing_state.py)."""

    def __init__(self, actor: _DeploymentActor) -> None:
        self.actor = actor
        self.source = f"the deployment's routing state (actor {actor.name!r})"
        self._last: RoutingSnapshot | None = None

    async def connect(self) -> None:
        await self.current()

    def _seen(self, routing: dict[str, Any], version: int) -> RoutingSnapshot:
        snapshot = RoutingSnapshot(routing_from_dict(routing, self.source), version)
        if self._last is None or version >= self._last.version:
            self._last = snapshot
        return snapshot

    async def current(self) -> RoutingSnapshot:
        return self._seen(*await self.actor.call("get"))

    async def compare_and_set(self, expected_version: int, routing) -> RoutingSnapshot | None:
        stored = await self.actor.call("compare_and_set", expected_version, routing.to_dict())
        return None if stored is None else self._seen(*stored)

    def last_seen(self) -> RoutingSnapshot:
        assert self._last is not None, "connect() first"
        return self._last


class SharedScalingsStore:
    """A replica's side of `SharedScalingsLog`: the scalings store interface of observability/scalings_store.py."""

    def __init__(self, actor: _DeploymentActor, capacity: int, replica: str) -> None:
        self.actor = actor
        self.capacity = capacity
        self.replica = replica
        # This replica's own recent means, for its xlora_mean_scaling gauge (the tensors stay in the shared log).
        self._means: deque[tuple[str | None, list[float]]] = deque(maxlen=capacity)  # (model, mean)

    def add(self, entry: ScalingsEntry) -> None:
        entry.replica = self.replica
        self._means.append((entry.model, entry.mean))
        try:  # before the answer goes out, so /scalings/{id} finds it through any replica
            self.actor.call_sync("add", entry)
        except Exception as exc:  # the log is for looking, not for serving: never fail a request over it
            log.warning("scalings of %s not logged: %s: %s", entry.id, type(exc).__name__, exc)

    def mean_of(self, adapter: int, model: str | None = None) -> float:
        means = [m for name, m in self._means if model is None or name == model]
        return sum(m[adapter] for m in means) / len(means) if means else 0.0

    async def summaries(self) -> list[dict[str, Any]]:
        return await self.actor.call("summaries")

    async def bucketed(self) -> list[dict[str, Any]]:
        return await self.actor.call("bucketed")

    async def detail(self, request_id: str) -> dict[str, Any] | None:
        return await self.actor.call("detail", request_id)

    async def latest(self) -> dict[str, Any] | None:
        return await self.actor.call("latest")

    async def clear(self) -> int:
        return await self.actor.call("clear")


class RayMetricsExporter:
    """Copies one replica's Prometheus samples into Ray's own metrics (ray.util.metrics), each sample a gauge with
    the same name and labels (counters and histogram buckets included: their values are cumulative), so Ray's
    metrics agent exports them with the node's other metrics."""

    def __init__(self, metrics: Metrics, period_s: float = 5.0) -> None:
        self.metrics = metrics
        self.period_s = period_s
        self._gauges: dict[tuple[str, tuple[str, ...]], Any] = {}

    def export_once(self) -> None:
        from ray.util.metrics import Gauge

        for metric in self.metrics.collect():
            for sample in metric.samples:
                if sample.name.endswith("_created"):  # creation timestamps: not worth a series each
                    continue
                keys = tuple(sorted(sample.labels))
                gauge = self._gauges.get((sample.name, keys))
                if gauge is None:
                    gauge = Gauge(sample.name, description=metric.documentation or sample.name, tag_keys=keys)
                    self._gauges[(sample.name, keys)] = gauge
                gauge.set(sample.value, tags=dict(sample.labels))

    async def run(self) -> None:
        while True:
            try:
                self.export_once()
            except Exception as exc:  # noqa: BLE001 - metrics must never take a replica down
                log.warning("exporting metrics to Ray failed: %s: %s", type(exc).__name__, exc)
            await asyncio.sleep(self.period_s)


# -----------------------------------------------------------------------------
# the replica


@serve.ingress()
class XLoraReplica:
    """One replica: its own model and scheduler, the deployment's routing state and scalings log."""

    async def __init__(self, settings: Settings) -> None:
        _keep_replica_grpc_on_loopback()
        self.settings = settings
        self.fatal: str | None = None  # set if the model cannot load or its worker dies
        replica = serve.get_replica_context().replica_tag
        routing_state = RayRoutingState(_DeploymentActor(ROUTING_ACTOR))
        await routing_state.connect()  # the model loads with the deployment's current routing
        scalings = SharedScalingsStore(_DeploymentActor(SCALINGS_ACTOR), settings.server.scalings_log_size, replica)
        self.manager = ModelManager(settings, Metrics(replica=replica), routing_state, scalings, replica)
        self._exporter = asyncio.get_running_loop().create_task(RayMetricsExporter(self.manager.metrics).run())
        log.info("replica %s starting with routing version %d", replica, routing_state.last_seen().version)

    def __serve_build_asgi_app__(self):
        # load_before_serving: start-up (and so Serve's readiness) waits for the model.
        return create_app(self.settings, AuthSettings.from_env(), on_fatal=self._on_fatal, manager=self.manager,
                          load_before_serving=True)

    def _on_fatal(self, message: str) -> None:
        log.error("replica unusable: %s", message)
        self.fatal = message

    def check_health(self) -> None:
        """Serve's health check: a replica whose model worker died (or never loaded) is replaced."""
        if self.fatal is not None or self.manager.state not in ("ready", "draining"):
            raise RuntimeError(self.fatal or f"model {self.manager.state}: {self.manager.error}")


def xlora_deployment(settings: Settings, **options: Any) -> serve.Deployment:
    """The deployment for one config; `options` as serve.deployment's (num_replicas, ray_actor_options...)."""
    initial = config_routing(settings.routing).to_dict()
    actors = [
        DeploymentActorConfig(
            name=ROUTING_ACTOR, actor_class=ray.remote(RoutingStateActor),
            init_kwargs={"initial": initial, "state_file": settings.state_file_path()},
            actor_options={"num_cpus": 0},
        ),
        DeploymentActorConfig(
            name=SCALINGS_ACTOR, actor_class=ray.remote(SharedScalingsLog),
            init_kwargs={"capacity": settings.server.scalings_log_size}, actor_options={"num_cpus": 0},
        ),
    ]
    defaults: dict[str, Any] = {
        "name": DEPLOYMENT,
        # A replica's batch is its concurrency: more in flight than max_batch_size + max_queue would be 429s.
        "max_ongoing_requests": settings.server.max_batch_size + settings.server.max_queue,
        "graceful_shutdown_timeout_s": settings.server.shutdown_grace_s,
        "deployment_actors": actors,
    }
    return serve.deployment(XLoraReplica, **{**defaults, **options})


def xlora_application(settings: Settings, **options: Any) -> serve.Application:
    return xlora_deployment(settings, **options).bind(settings)


def build_app(args: dict[str, Any]) -> serve.Application:
    """Serve's application builder (`import_path: server.ray_app:build_app`); `args: {config: FILE}`. A relative
    config path is looked up in the working directory, then in the project folder."""
    if not isinstance(args, dict) or not isinstance(args.get("config"), str):
        raise ValueError("server.ray_app:build_app: args must be {config: <path of an xlora-serve YAML config>}")
    path = Path(args["config"]).expanduser()
    if not path.is_absolute() and not path.exists() and (PROJECT_ROOT / path).exists():
        path = PROJECT_ROOT / path
    return xlora_application(load_settings(path))


# -----------------------------------------------------------------------------
# a local cluster (xlora-serve --replicas N, and the tests)


def start_local_cluster(num_cpus: float | None = None) -> None:
    """Start a Ray cluster on this machine with every address on 127.0.0.1 (README: "Scaling out")."""
    from ray._private import ray_constants

    if any(os.environ.get(k) != v for k, v in LOOPBACK_ENV.items()) or ray_constants.ENABLE_RAY_CLUSTER:
        raise RuntimeError(
            "a local Ray cluster needs RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 in the environment before `ray` is "
            "imported (else Ray listens on every interface)"
        )
    ray.init(num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
             configure_logging=False, log_to_driver=True)


def _keep_replica_grpc_on_loopback() -> None:
    # Ray Serve 2.60 replicas open their inter-deployment gRPC server on "[::]:0" (all interfaces), whatever
    # the node's address. On a loopback-only node, bind it to the node's address instead, like every other
    # Ray process there. (On a real cluster the node address is not loopback and nothing changes.)
    node_ip = ray.util.get_node_ip_address()
    if not ipaddress.ip_address(node_ip).is_loopback:
        return
    from ray.serve._private import replica as serve_replica

    original = serve_replica.add_port_to_grpc_server
    if getattr(original, "xlora_loopback", False):
        return

    def add_port_on_node_ip(server, address: str):
        return original(server, address.replace("[::]", node_ip, 1))

    add_port_on_node_ip.xlora_loopback = True
    serve_replica.add_port_to_grpc_server = add_port_on_node_ip
