"""The server's compiled decode step: loaded from the cache, or built off the request path, then handed over.

`model.compile`:
- `auto` (the default): if the cache (~/.cache/xlora-server/compiled) has this model's package, load it
  before serving (seconds). Otherwise serve eagerly at once and build the package in a separate process
  (`xlora-serve --config FILE --precompile --exit-with-parent PID`, at nice 19: a thread of this process would
  starve the eager worker of the GIL; it stops if this process dies), then load it and switch to it once no
  request is running (Scheduler.use_packaged_step).
- `true`: the same, but a missing package is built before serving (start-up waits for it).
- `false`: eager, nothing compiled.

`XLORA_COMPILE` in the environment (auto, true or false) overrides `model.compile`: the test suite sets false,
so that its many short-lived servers compile nothing.

A model the package cannot run (not on CPU) falls back to `XLoraModel.compile()` with `true`, and stays eager
with `auto`. Building or loading failures are never fatal: eager decoding is correct, only slower.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch

from server.settings import Settings
from xlora_core import compiled_step
from xlora_core.compiled_step import PackagedStep

log = logging.getLogger("xlora.compiled")

DecodeStep = Literal["eager", "compiling", "compiled"]

COMPILE_ENV = "XLORA_COMPILE"
_COMPILE_VALUES = {"auto": "auto", "true": True, "false": False}


def compile_setting(settings: Settings) -> Literal["auto"] | bool:
    """`model.compile`, unless XLORA_COMPILE says otherwise."""
    value = os.environ.get(COMPILE_ENV) or None  # set but empty: unset
    if value is None:
        return settings.model.compile
    if value.lower() not in _COMPILE_VALUES:
        raise ValueError(f"{COMPILE_ENV}={value!r} in the environment: expected auto, true or false")
    return _COMPILE_VALUES[value.lower()]


class StepCompiler:
    """Gets `model` its packaged decode step as `settings.model.compile` says; `hand_over(step)` is called with
    a step built in the background (the scheduler switches to it between two steps)."""

    def __init__(self, settings: Settings, model) -> None:
        self.settings = settings
        self.model = model
        self.path: Path | None = None
        self.process: subprocess.Popen | None = None
        self.building = False  # a background build is running or its step is being handed over
        self.built_in_s: float | None = None

    @property
    def state(self) -> DecodeStep:
        if self.model.compiled:
            return "compiled"
        return "compiling" if self.building else "eager"

    def prepare(self) -> bool:
        """Before serving: load the cached package, or build it now (`true`). True if a background build
        should start once the server serves (`auto` with no package)."""
        setting = compile_setting(self.settings)
        if setting is False:
            return False
        reason = compiled_step.supported(self.model)
        if reason is not None:
            if setting is True:  # torch.compile, at start-up (cached only within this process)
                started = time.monotonic()
                self.model.compile()
                self.model.generate(torch.zeros(1, 1, dtype=torch.long), max_new_tokens=3)  # compiles batch 1
                log.info("decode step compiled with torch.compile in %.1f s (no package: %s)",
                         time.monotonic() - started, reason)  # fmt: skip
            else:
                log.info("decoding eagerly: %s", reason)
            return False
        started = time.monotonic()
        self.path = compiled_step.package_path(self.model, self.settings.model.cache_dir)
        step = compiled_step.load_package(self.path)
        if step is None and setting is True:
            log.info("compiling the decode step into %s before serving (once per model and machine)", self.path)
            compiled_step.build_package_once(self.model, self.path)
            step = compiled_step.load_package(self.path)
        if step is not None:
            self.model.use_packaged_step(step)
            log.info("decode step compiled: loaded %s in %.1f s", self.path, time.monotonic() - started)
            return False
        return setting == "auto"

    def start_background_build(self, hand_over: Callable[[PackagedStep], None]) -> None:
        """Build the package in a niced process of `xlora-serve --precompile`; when it is done, load
        it and call `hand_over` with it. The process's output goes to <package>.log."""
        if self.settings.source is None:
            log.info("decoding eagerly: no config file to give a compile process")
            return
        assert self.path is not None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        log_path = self.path.with_suffix(".log")
        # The same torch threads as this process (the package's GEMM kernels are built for a thread count);
        # one inductor compile worker, and nice 19: the eager worker goes first.
        env = {**os.environ, "TORCHINDUCTOR_COMPILE_THREADS": "1"}
        command = [sys.executable, "-m", "server", "--config", str(self.settings.source), "--precompile",
                   "--exit-with-parent", str(os.getpid())]  # fmt: skip
        with open(log_path, "wb") as out:
            # A session of its own: stop() ends it with the processes it spawns to compile parts side by side.
            self.process = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, env=env, preexec_fn=lambda: os.nice(19),
                start_new_session=True,
            )  # fmt: skip
        self.building = True
        log.info("serving eagerly; compiling the decode step in the background (process %d, log %s)",
                 self.process.pid, log_path)  # fmt: skip
        waiter = threading.Thread(target=self._await_build, args=(hand_over, log_path), daemon=True)
        waiter.start()

    def _await_build(self, hand_over: Callable[[PackagedStep], None], log_path: Path) -> None:
        started = time.monotonic()
        code = self.process.wait()
        step = compiled_step.load_package(self.path) if code == 0 else None
        if step is None:
            self.building = False
            if code < 0:  # stopped (the server is shutting down)
                return
            tail = log_path.read_text(errors="replace").strip().splitlines()[-5:] if log_path.exists() else []
            log.warning("compiling the decode step failed (exit code %s); decoding stays eager. %s: %s",
                        code, log_path, " | ".join(tail))  # fmt: skip
            return
        self.built_in_s = time.monotonic() - started
        log.info("decode step compiled in the background in %.0f s; switching to it once no request is running",
                 self.built_in_s)  # fmt: skip
        hand_over(step)

    def switched(self) -> None:
        """The scheduler now runs the compiled step."""
        self.building = False

    def stop(self) -> None:
        """End the background build, if one is running (at shutdown)."""
        if self.process is not None and self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)  # the build and its part compilers
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:  # it ended meanwhile
                pass


def precompile(settings: Settings, model) -> int:
    """`xlora-serve --precompile`: fill the cache with `model`'s package, whatever `model.compile` says (exit 0;
    nothing to build if it is there already)."""
    reason = compiled_step.supported(model)
    if reason is not None:
        print(f"xlora-serve: cannot precompile: {reason}", file=sys.stderr)
        return 1
    started = time.monotonic()
    path = compiled_step.package_path(model, settings.model.cache_dir)
    built = compiled_step.build_package_once(model, path)
    print(f"compiled decode step {'built' if built else 'already in the cache'}: {path} "
          f"({time.monotonic() - started:.0f} s)", flush=True)  # fmt: skip
    return 0
