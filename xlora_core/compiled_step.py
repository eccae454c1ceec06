"""The decode step compiled ahead of time: an AOTInductor package, built once, loaded in seconds.

Every decode step runs the one-token pass (`XLoraModel._one_token_pass`) once or twice. Here that pass is
exported (`torch.export`) as a function of plain tensors:

    hidden = step(input_ids, attention_mask, position_ids, spans, columns, keys, values)

with the KV caches as one key and one value buffer per layer ([batch, heads, capacity, head_dim], the
`cache.GrowingLayer` buffers themselves), into which the step writes its token in place at column
`attention_mask.shape[1] - 1`; the row spans bound the keys each row reads, so the room beyond is never
read. Batch (1 to `MAX_BATCH`), sequence length and capacity are dynamic: one graph serves every step.
`columns` always holds the experts' rank-column weights; a pass with the experts off gives zeros (adding
an exact 0, the same numbers as skipping them), so the scaling and real passes share the graph.

AOTInductor compiles it with the weights frozen (on CPU: oneDNN-packed constants and inductor's autotuned C++
GEMM kernels, what makes `XLoraModel.compile()` fast) into a .pt2 package that holds the kernels and the
constants. Unlike inductor's FX graph cache, which cannot keep frozen graphs, the package is a file:
`package_path` keys it by everything that changes the compiled code (torch, transformers and this
package's sources, the CPU's instruction set, torch's threads, dtypes, the model's config and a digest of
its weights), so a later start loads it instead of compiling (docs/compiled-decoding.md).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from .batch_invariant import ROWS_PER_CALL
from .cache import GrowingLayer
from .quantize import QuantizedLinear

if TYPE_CHECKING:
    from .model import XLoraModel

log = logging.getLogger("xlora.compiled_step")

# The largest batch the package runs (bfloat16 linears on CPU are one call of exactly this many rows;
# batch_invariant.linear). Larger batches run eagerly.
MAX_BATCH = ROWS_PER_CALL

# Bump when the exported function's inputs or outputs change: older packages are then not loaded.
FORMAT = 1

# The sources whose code is traced into the package.
_SOURCES = ("model.py", "lora.py", "batch_invariant.py", "cache.py", "compiled_step.py", "classifier.py")


class BufferLayer(DynamicLayer):
    """A cache layer over given key and value buffers that hold `length` tokens: `update` writes the new
    token in place at column `length` and returns the whole buffers (the row spans bound what is read)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int) -> None:
        super().__init__()
        self.keys, self.values, self.length = keys, values, length
        self.is_initialized, self.device = True, keys.device

    def get_seq_length(self) -> int:
        return self.length

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        column = torch.arange(self.length, self.length + 1, device=self.keys.device)
        self.keys.index_copy_(2, column, key_states.to(self.keys.dtype))
        self.values.index_copy_(2, column, value_states.to(self.values.dtype))
        return self.keys, self.values


class OneTokenStep(nn.Module):
    """The one-token pass of `model` as a function of plain tensors (what is exported)."""

    def __init__(self, model: XLoraModel) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        spans: torch.Tensor,
        columns: torch.Tensor,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
    ) -> torch.Tensor:
        cache = DynamicCache(config=self.model.base.config)
        length = attention_mask.shape[1] - 1  # the new token's column
        cache.layers = [BufferLayer(k, v, length) for k, v in zip(keys, values, strict=True)]
        self.model.slot.inductor = True  # the matmuls as inductor should see them (batch_invariant.linear)
        try:
            return self.model._one_token_pass(input_ids, attention_mask, position_ids, cache, columns, spans)
        finally:
            self.model.slot.inductor = False


def supported(model: XLoraModel) -> str | None:
    """Why `model`'s decode step cannot be packaged here, or None if it can."""
    if model.device.type != "cpu":
        return f"the package is built for CPU only (the model is on {model.device.type})"
    if any(type(layer) is not DynamicLayer for layer in DynamicCache(config=model.base.config).layers):
        return "the base model has sliding-window or other non-global attention layers"
    if any(isinstance(m, QuantizedLinear) for m in model.base.modules()):
        return "the base model is quantized (model.quantize): not packaged yet"
    return None


def example_inputs(model: XLoraModel, batch: int = 2, width: int = 5, capacity: int = 9) -> tuple[Any, ...]:
    """Inputs of `OneTokenStep` for tracing: `batch` rows, `width` mask columns, buffers of `capacity`."""
    config = model.base.config
    heads = config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    mask = torch.ones(batch, width, dtype=torch.long)
    mask[0, :2] = 0  # a left-padded row
    from .batch_invariant import left_padded_spans

    kv = dict(dtype=model.kv_dtype, device=model.device)
    layers = config.num_hidden_layers
    return (
        torch.ones(batch, 1, dtype=torch.long, device=model.device),
        mask.to(model.device),
        (mask.sum(dim=1, keepdim=True) - 1).to(model.device),
        left_padded_spans(mask, 1),
        torch.zeros(batch, 1, model.layer_of_column.numel(), dtype=model.dtype, device=model.device),
        [torch.zeros(batch, heads, capacity, head_dim, **kv) for _ in range(layers)],
        [torch.zeros(batch, heads, capacity, head_dim, **kv) for _ in range(layers)],
    )


def export_step(model: XLoraModel) -> torch.export.ExportedProgram:
    """`model`'s one-token pass, exported with a dynamic batch, sequence length and cache capacity."""
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    width = torch.export.Dim("width", min=2, max=1 << 20)
    capacity = torch.export.Dim("capacity", min=2, max=1 << 20)
    layers = model.base.config.num_hidden_layers
    kv = [{0: batch, 2: capacity}] * layers
    dynamic = ({0: batch}, {0: batch, 1: width}, {0: batch}, {0: batch}, {0: batch}, kv, kv)
    with torch.inference_mode(False), torch.no_grad():
        return torch.export.export(OneTokenStep(model), example_inputs(model), dynamic_shapes=dynamic, strict=False)


# The GEMM kernels inductor autotunes among ("CPP,ATEN": what XLoraModel.compile() does), or "none": frozen
# weights with oneDNN's packed matmuls, no autotuning.
AUTOTUNE = os.environ.get("XLORA_COMPILE_AUTOTUNE", "CPP,ATEN")


def inductor_configs(model: XLoraModel) -> dict[str, Any]:
    """Frozen weights, and on CPU the GEMM kernels that AUTOTUNE says."""
    configs: dict[str, Any] = {"freezing": True}
    if model.device.type == "cpu" and AUTOTUNE != "none":
        configs |= {"max_autotune": True, "max_autotune_gemm_backends": AUTOTUNE}
    return configs


def cpu_features() -> str:
    """The instruction sets inductor compiles for: torch's CPU capability, and the bf16/AMX extensions."""
    import torch.cpu

    extras = [n.removeprefix("_is_").removesuffix("_supported") for n in sorted(dir(torch.cpu)) if n.startswith("_is_")]
    have = [name for name in extras if getattr(torch.cpu, f"_is_{name}_supported")()]
    return "+".join([torch.backends.cpu.get_cpu_capability(), *have])


def package_key(model: XLoraModel) -> str:
    """A digest of everything that changes the compiled package (and nothing else)."""
    import transformers

    h = hashlib.sha256()
    here = Path(__file__).parent
    facts = {
        "format": FORMAT,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "isa": cpu_features(),
        "threads": torch.get_num_threads(),  # the C++ GEMM kernels are blocked for this many threads
        "device": model.device.type,
        "dtype": str(model.dtype),
        "kv_dtype": str(model.kv_dtype),
        "base": model.base.config.to_json_string(use_diff=False),
        "inductor": inductor_configs(model),
        "sources": {name: hashlib.sha256((here / name).read_bytes()).hexdigest() for name in _SOURCES},
    }
    h.update(json.dumps(facts, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, tensor in sorted(model.state_dict(keep_vars=False).items()):
            h.update(name.encode())
            h.update(str((tensor.dtype, tuple(tensor.shape))).encode())
            h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    # The scales and routing of the columns are buffers too, but not in the state dict.
    for buffer in (model.layer_of_column, model.expert_of_column, model.scale_of_column):
        h.update(buffer.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:24]


def package_path(model: XLoraModel, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where `model`'s package is kept: <cache>/compiled/step-<key>.pt2 (cache: ~/.cache/xlora-server)."""
    from .base_model import default_cache_dir

    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / "compiled" / f"step-{package_key(model)}.pt2"


def build_package(model: XLoraModel, path: str | os.PathLike) -> Path:
    """Export and compile `model`'s decode step into the package at `path` (minutes for a real model). The
    file appears whole or not at all (written beside it, then renamed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    exported = export_step(model)
    fd, tmp = tempfile.mkstemp(prefix=path.stem + ".partial-", suffix=".pt2", dir=path.parent)
    os.close(fd)
    try:
        torch._inductor.aoti_compile_and_package(exported, package_path=tmp, inductor_configs=inductor_configs(model))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def build_package_once(model: XLoraModel, path: str | os.PathLike) -> bool:
    """`build_package` unless the package is there, one builder at a time (a lock file beside it: two servers
    starting together build it once). True if this call built it."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if load_package(path) is not None:
            return False
        build_package(model, path)
        return True


class PackagedStep:
    """A loaded package, called where `XLoraModel._backbone` would run the one-token pass."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.runner = torch._inductor.aoti_load_package(str(self.path))

    def __call__(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: DynamicCache,
        columns: torch.Tensor,
        spans: torch.Tensor,
    ) -> torch.Tensor | None:
        """The hidden states of the step, its token written into `cache`; None if this step is not one the
        package runs (a batch over MAX_BATCH, a cache not of buffers in step with the mask): run it eagerly."""
        batch, width = attention_mask.shape
        layers = cache.layers
        if batch > MAX_BATCH or not all(
            isinstance(layer, GrowingLayer) and layer.buffers is not None and layer.length == width - 1
            and layer.capacity >= width for layer in layers
        ):  # fmt: skip
            return None
        keys = [layer.buffers[0] for layer in layers]
        values = [layer.buffers[1] for layer in layers]
        hidden = self.runner(input_ids, attention_mask, position_ids, spans, columns, keys, values)
        for layer, k, v in zip(layers, keys, values, strict=True):
            layer.length = width
            layer.keys, layer.values = k[:, :, :width], v[:, :, :width]
        return hidden


def load_package(path: str | os.PathLike) -> PackagedStep | None:
    """The package at `path`, or None if there is none; one that cannot be loaded (corrupt, from another
    build) is ignored with a warning and removed, so that it is built again."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return PackagedStep(path)
    except Exception as exc:  # any failure to load means: not usable; eager decoding stays correct
        log.warning("ignoring the compiled decode step %s (cannot load it: %s: %s); it will be built again",
                    path, type(exc).__name__, exc)  # fmt: skip
        path.unlink(missing_ok=True)
        return None
