"""`xlora-serve --config FILE [--host H] [--port P] [--replicas N]` (also `python -m server`).

With --replicas N: N replicas on Ray Serve behind one endpoint (server/ray_app.py), on a local Ray cluster
this command starts on 127.0.0.1 (or joins the one at --ray-address); it stops them on SIGTERM or SIGINT.

With --precompile: build the config model's compiled decode step into the cache (~/.cache/xlora-server/compiled)
and exit, serving nothing; a server started later loads it in seconds (docs/compiled-decoding.md).

With --download-only: fetch the config's Hugging Face Hub ids into huggingface_hub's cache (HF_HOME) and exit,
loading nothing (for machines that serve offline, HF_HUB_OFFLINE=1, and for image builds).

Exit codes: 0 after a clean (signalled) shutdown, 2 for a bad config, 1 if the model cannot be loaded.
SIGTERM or SIGINT drains: /ready and new generations answer 503, requests in flight finish (up to
server.shutdown_grace_s), then the process exits 0. A second signal stops at once.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import sys
import time
from types import FrameType

import uvicorn

from server.settings import AuthSettings, ConfigError, load_settings

log = logging.getLogger("xlora.server")


class DrainingServer(uvicorn.Server):
    """uvicorn, with a drain phase before its own shutdown, and exit 0 after a handled signal."""

    def __init__(self, config: uvicorn.Config, grace_s: float) -> None:
        super().__init__(config)
        self.grace_s = grace_s
        self.manager = None  # set once the app exists
        self.drain_started: float | None = None
        self.fatal: str | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not uvicorn's: it would re-raise the signal after shutting down, and the exit code would say
        # "killed by SIGTERM" even though everything ended cleanly.
        if self.drain_started is None:
            log.info("signal %s: draining (up to %.0f s), then exiting", signal.Signals(sig).name, self.grace_s)
            self.drain_started = time.monotonic()
            if self.manager is not None:
                self.manager.begin_draining()
        else:
            log.warning("second signal: stopping now")
            self.should_exit = True
            self.force_exit = True

    async def on_tick(self, counter: int) -> bool:
        should_exit = await super().on_tick(counter)
        if self.drain_started is not None and not self.should_exit:
            idle = self.manager is None or self.manager.in_flight == 0
            if idle or time.monotonic() - self.drain_started > self.grace_s:
                self.should_exit = True
        return should_exit or self.should_exit

    def stop_fatal(self, message: str) -> None:
        """Called from the loader thread when the model cannot be loaded."""
        self.fatal = message
        self.should_exit = True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="xlora-serve", description="Serve an X-LoRA model over HTTP.")
    parser.add_argument("--config", required=True, help="YAML config file (see configs/default.yaml)")
    parser.add_argument("--host", help="overrides server.host")
    parser.add_argument("--port", type=int, help="overrides server.port")
    parser.add_argument("--replicas", type=int,
                        help="serve with N replicas on Ray Serve (needs pip install 'xlora-server[ray]')")
    parser.add_argument("--ray-address",
                        help="with --replicas: join this Ray cluster (e.g. auto) instead of starting one on 127.0.0.1")
    parser.add_argument("--download-only", action="store_true",
                        help="fetch the config's Hugging Face Hub ids into the cache (HF_HOME), then exit")
    parser.add_argument("--precompile", action="store_true",
                        help="build the compiled decode step into the cache (once per model and machine), then exit")
    parser.add_argument("--exit-with-parent", type=int, metavar="PID",
                        help="with --precompile: stop building once process PID, which started this one, has ended "
                             "(a server's background build)")
    args = parser.parse_args(argv)
    if args.replicas is not None and args.replicas < 1:
        parser.error("--replicas must be at least 1")
    if args.exit_with_parent is not None and not args.precompile:
        parser.error("--exit-with-parent goes with --precompile")

    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"xlora-serve: bad config\n{exc}", file=sys.stderr)
        return 2
    if args.host:
        settings.server.host = args.host
    if args.port is not None:
        settings.server.port = args.port

    from server.observability.logs import setup_logging

    setup_logging(settings.logging.level, settings.logging.format)
    if args.download_only:
        return _download_only(settings)
    if args.precompile:
        return _precompile(settings, args.exit_with_parent)
    if args.replicas is not None:
        return _serve_on_ray(settings, args.replicas, args.ray_address)

    from sse_starlette.sse import AppStatus

    from server.app import create_app
    from server.serving.routing_state import StateFileError
    # sse-starlette would end every stream at the first signal; we drain them instead.
    AppStatus.disable_automatic_graceful_drain()

    config = uvicorn.Config(
        None,  # set below: the app needs the server for its fatal-error callback
        host=settings.server.host,
        port=settings.server.port,
        log_config=None,
        timeout_graceful_shutdown=5,
        access_log=settings.logging.level == "debug",
    )
    server = DrainingServer(config, settings.server.shutdown_grace_s)
    try:
        app = create_app(settings, AuthSettings.from_env(), on_fatal=server.stop_fatal)
    except StateFileError as exc:
        print(f"xlora-serve: cannot start: {exc}", file=sys.stderr)
        return 1
    server.manager = app.state.manager
    config.app = app
    server.run()
    AppStatus.should_exit = True
    if server.fatal is not None:
        print(f"xlora-serve: cannot start: {server.fatal}", file=sys.stderr)
        return 1
    return 0


def _download_only(settings) -> int:
    """Resolve every model of the config (fetching Hub ids, with huggingface_hub's progress bars) and say where
    each one is; load none."""
    from server.serving.model_sources import resolve_sources
    from xlora_core.hub import HubError

    try:
        sources = resolve_sources(settings)
    except HubError as exc:
        print(f"xlora-serve: cannot download: {exc}", file=sys.stderr)
        return 1
    print(f"model.base: {sources.base}")
    if sources.checkpoint is not None:
        print(f"xlora.checkpoint: {sources.checkpoint}")
    for name, folder in (sources.adapters or {}).items():
        print(f"xlora.adapters.{name}: {folder}")
    return 0


def _precompile(settings, parent: int | None) -> int:
    """Load the config's model and build its compiled decode step into the cache (server/serving/compiled.py)."""
    from server.serving.compiled import precompile
    from server.serving.manager import build_model
    from xlora_core import compiled_step

    if parent is not None:
        compiled_step.exit_with_parent(parent)

    try:
        model, _, _ = build_model(settings)
    except Exception as exc:
        print(f"xlora-serve: cannot load the model: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    # Neither collect nor tear down what the build leaves (millions of the compiler's objects) before exiting:
    # seconds that a server waiting for this process (serving/compiled.py) would wait too.
    gc.disable()
    code = precompile(settings, model)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _serve_on_ray(settings, replicas: int, ray_address: str | None) -> int:
    """Start (or join) a Ray cluster, run the Serve application, wait for a signal, stop what was started."""
    if ray_address is None:
        # Ray's single-machine setting: read when ray is first imported, so before the import below.
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    try:
        import ray
        from ray import serve

        from server.ray_app import start_local_cluster, xlora_application
    except ImportError as exc:
        print(f"xlora-serve: --replicas needs Ray Serve: pip install 'xlora-server[ray]' ({exc})", file=sys.stderr)
        return 2

    stop = {"signal": None}

    def on_signal(sig: int, frame: FrameType | None) -> None:
        stop["signal"] = sig

    if ray_address is None:
        start_local_cluster()
    else:
        ray.init(address=ray_address)
    try:
        serve.start(http_options={"host": settings.server.host, "port": settings.server.port})
        app = xlora_application(settings, num_replicas=replicas,
                                ray_actor_options={"num_cpus": settings.model.torch_threads or 1})
        serve.run(app, name="xlora", route_prefix="/")  # returns once every replica has loaded its model
        log.info("%d replicas serving on http://%s:%d", replicas, settings.server.host, settings.server.port)
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        while stop["signal"] is None:
            time.sleep(0.5)
        log.info("signal %s: stopping the replicas", signal.Signals(stop["signal"]).name)
    except Exception as exc:  # noqa: BLE001 - a deployment that cannot start: say why, exit non-zero
        print(f"xlora-serve: cannot start: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
