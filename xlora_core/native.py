"""Our C++ kernels (xlora_core/csrc/), built on this machine at first use and kept in the cache.

One kernel so far: `xlora_native::one_query_attention`, the attention of a decode step (one query per row), each
row on its own keys (batch_invariant.row_attention). Row by row through PyTorch's SDPA that is a Python loop of
several calls per row in every layer, and inside the compiled decode step a trip back into Python per layer:
about a tenth of a decode step's time at batch 1 by a profile, and the default decoded 1.3x as fast without it
(docs/compiled-decoding.md).

`load()` builds it once per machine (about 10 s, with the C++ compiler inductor uses too; `-march=native`, so the
build is keyed by the CPU) into <cache>/native/, and loads it. Where it cannot be built (no compiler), or with
`XLORA_NATIVE_KERNELS=false`, every attention runs through SDPA as before: slower, with the same guarantees.
The answer is decided once per process, so every step of a process uses the same arithmetic.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path

import torch

log = logging.getLogger("xlora.native")

SOURCE = Path(__file__).parent / "csrc" / "one_query_attention.cpp"
FLAGS = ["-O3", "-march=native"]

_loaded: bool | None = None  # None: not tried yet in this process


def load() -> bool:
    """Whether the C++ kernels are loaded in this process: built first if this machine has no build of them yet.
    False (with one warning) where they cannot be built; the first answer holds for the whole process."""
    global _loaded
    if _loaded is None:
        _loaded = _build_and_load()
    return _loaded


def _build_and_load() -> bool:
    if os.environ.get("XLORA_NATIVE_KERNELS", "true").strip().lower() in ("0", "false", "no", "off"):
        return False
    from torch.utils.cpp_extension import load as build

    from .base_model import default_cache_dir
    from .compiled_step import cpu_features

    key = hashlib.sha256(
        "\0".join([SOURCE.read_text(), *FLAGS, torch.__version__, cpu_features()]).encode()
    ).hexdigest()[:16]
    folder = default_cache_dir() / "native" / key
    folder.mkdir(parents=True, exist_ok=True)
    try:
        _ninja_on_path()
        build(name=f"xlora_native_{key}", sources=[str(SOURCE)], extra_cflags=FLAGS, build_directory=str(folder),
              is_python_module=False, verbose=False)  # fmt: skip
    except Exception as exc:  # no compiler, a failed build: SDPA row by row stays correct
        log.warning("the C++ attention kernel cannot be built here (%s: %s); attention runs through SDPA, slower",
                    type(exc).__name__, str(exc).strip().splitlines()[-1] if str(exc).strip() else "")  # fmt: skip
        return False

    @torch.library.register_fake("xlora_native::one_query_attention")
    def _(query, key, value, spans, scale):  # noqa: ANN001, ANN202  (shapes only, for torch.export)
        return query.new_empty(query.shape[0], query.shape[2], query.shape[1], value.shape[-1])

    return True


def _ninja_on_path() -> None:
    """torch builds with ninja, found on PATH: the `ninja` package's binary when the venv is not activated."""
    if shutil.which("ninja"):
        return
    import ninja

    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
