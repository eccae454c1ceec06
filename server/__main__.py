"""`xlora-serve --config FILE [--host H] [--port P]` (also `python -m server`).

Exit codes: 0 after a clean (signalled) shutdown, 2 for a bad config, 1 if the model cannot be loaded.
SIGTERM or SIGINT drains: /ready and new generations answer 503, requests in flight finish (up to
server.shutdown_grace_s), then the process exits 0. A second signal stops at once.
"""

from __future__ import annotations

import argparse
import logging
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
    args = parser.parse_args(argv)

    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"xlora-serve: bad config\n{exc}", file=sys.stderr)
        return 2
    if args.host:
        settings.server.host = args.host
    if args.port is not None:
        settings.server.port = args.port

    from sse_starlette.sse import AppStatus

    from server.app import create_app
    from server.logs import setup_logging

    setup_logging(settings.logging.level, settings.logging.format)
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
    app = create_app(settings, AuthSettings.from_env(), on_fatal=server.stop_fatal)
    server.manager = app.state.manager
    config.app = app
    server.run()
    AppStatus.should_exit = True
    if server.fatal is not None:
        print(f"xlora-serve: cannot start: {server.fatal}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
