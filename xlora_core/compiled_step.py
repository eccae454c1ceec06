"""The decode step compiled ahead of time: an AOTInductor package, built once, loaded in seconds.

Every decode step runs the one-token pass (`XLoraModel._one_token_pass`) once or twice. Here that pass is
exported (`torch.export`) as a function of plain tensors:

    hidden = step(input_ids, attention_mask, position_ids, spans, columns, slots, keys, values)

with the KV caches as one key and one value buffer per layer ([cache rows, heads, capacity, head_dim], the
`cache.GrowingLayer` buffers themselves). Each input row is one token; the step writes its key and value in
place at its slot (cache row, column), and it attends to the keys its span bounds in that cache row, so the
room beyond is never read. A decode step has one input row per cache row, each writing at column
`attention_mask.shape[1] - 1`; a step that also feeds prompts gives each prompt token an input row of its
own, writing into its prompt's cache row (`XLoraModel.decode_rows`). Input rows (1 to `MAX_BATCH`), cache
rows, sequence length and capacity are dynamic: one graph serves every step.
`columns` always holds the experts' rank-column weights; a pass with the experts off gives zeros (adding
an exact 0, the same numbers as skipping them), so the scaling and real passes share the graph. The step is
exported as `PARTS` graphs of consecutive layers (the second starts from the first's hidden states), compiled
side by side in as many processes: compiling is single-threaded, so that halves a cold build on 2 cores.

AOTInductor compiles it with the weights frozen (on CPU: oneDNN-packed constants and inductor's autotuned C++
GEMM kernels, what makes `XLoraModel.compile()` fast) into a .pt2 package that holds the kernels and the
constants. Unlike inductor's FX graph cache, which cannot keep frozen graphs, the package is a file:
`package_path` keys it by everything that changes the compiled code (torch, transformers and this
package's sources, the CPU's instruction set, torch's threads, dtypes, the model's config and a digest of
its weights), so a later start loads it instead of compiling (docs/compiled-decoding.md).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import gc
import hashlib
import json
import logging
import multiprocessing
import os
import pickle
import sys
import tempfile
import threading
import time
import traceback
import zipfile
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from . import batch_invariant, native
from .batch_invariant import ROWS_PER_CALL
from .cache import GrowingLayer
from .lora import FusedLoraLinear, JointMatmul
from .quantize import QuantizedLinear

if TYPE_CHECKING:
    from .model import XLoraModel

log = logging.getLogger("xlora.compiled_step")

# The largest batch the package runs (bfloat16 linears on CPU are one call of exactly this many rows;
# batch_invariant.linear). Larger batches run eagerly.
MAX_BATCH = ROWS_PER_CALL

# Bump when the exported function's inputs or outputs change: older packages are then not loaded.
FORMAT = 3

# The step's layers are compiled as this many graphs, each in a process of its own at the same time: a cold
# build takes about the time of one part (docs/compiled-decoding.md). A constant, not the machine's cores, so
# that a package built ahead (a Docker build) is found where it runs.
PARTS = 2

# The sources whose code is traced into the package.
_SOURCES = ("model.py", "lora.py", "batch_invariant.py", "cache.py", "compiled_step.py", "classifier.py", "native.py",
            "csrc/one_query_attention.cpp")


class BufferLayer(DynamicLayer):
    """A cache layer over given key and value buffers that hold `length` columns: `update` writes each input
    row's key and value in place at its slot [rows, 2] (cache row, column) and returns the whole buffers (the
    row spans bound what is read)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int, slots: torch.Tensor) -> None:
        super().__init__()
        self.keys, self.values, self.length, self.slots = keys, values, length, slots
        self.is_initialized, self.device = True, keys.device

    def get_seq_length(self) -> int:
        return self.length

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rows, columns = self.slots[:, 0], self.slots[:, 1]
        self.keys[rows, :, columns] = key_states[:, :, 0].to(self.keys.dtype)
        self.values[rows, :, columns] = value_states[:, :, 0].to(self.values.dtype)
        return self.keys, self.values


class OneTokenStep(nn.Module):
    """Layers [first, end) of `model`'s one-token pass as a function of plain tensors (what is exported). The
    first part takes the token ids, a later one the hidden states of the part before it (`inputs`); only the
    last applies the final norm. `keys` and `values` are the buffers of its own layers."""

    def __init__(self, model: XLoraModel, first: int = 0, end: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.first, self.end = first, model.base.config.num_hidden_layers if end is None else end

    def forward(
        self,
        inputs: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        spans: torch.Tensor,
        columns: torch.Tensor,
        slots: torch.Tensor,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
    ) -> torch.Tensor:
        length = attention_mask.shape[1] - 1  # the columns before this step's
        own = [BufferLayer(k, v, length, slots) for k, v in zip(keys, values, strict=True)]
        # The decoder layers index the cache by their own numbers; the entries of other parts' layers are
        # never updated, only asked the length (for the mask).
        cache = DynamicCache(config=self.model.base.config)
        cache.layers = [own[i - self.first] if self.first <= i < self.end else own[0] for i in range(len(cache.layers))]
        ids, embeds = (inputs, None) if self.first == 0 else (None, inputs)
        slot = self.model.slot
        # the matmuls as inductor should see them (batch_invariant.linear)
        slot.inductor, slot.cpp_gemm = True, "max_autotune" in inductor_configs(self.model)
        try:
            with _only_layers(self.model.base.get_decoder(), self.first, self.end):
                return self.model._one_token_pass(ids, attention_mask, position_ids, cache, columns, spans, embeds)
        finally:
            slot.inductor, slot.cpp_gemm = False, False


@contextlib.contextmanager
def _only_layers(decoder: nn.Module, first: int, end: int) -> Iterator[None]:
    """The decoder with only its layers [first, end), and no final norm unless `end` is its last layer."""
    layers, norm = decoder.layers, decoder.norm
    if (first, end) != (0, len(layers)):
        decoder.layers = nn.ModuleList(layers[first:end])
        if end < len(layers):
            decoder.norm = nn.Identity()
    try:
        yield
    finally:
        decoder.layers, decoder.norm = layers, norm


def part_bounds(layers: int, parts: int) -> list[tuple[int, int]]:
    """The layers of each of `parts` parts: [first, end) ranges as even as can be."""
    cuts = [round(i * layers / parts) for i in range(parts + 1)]
    return list(zip(cuts[:-1], cuts[1:], strict=True))


def supported(model: XLoraModel) -> str | None:
    """Why `model`'s decode step cannot be packaged here, or None if it can."""
    if model.device.type != "cpu":
        return f"the package is built for CPU only (the model is on {model.device.type})"
    if any(type(layer) is not DynamicLayer for layer in DynamicCache(config=model.base.config).layers):
        return "the base model has sliding-window or other non-global attention layers"
    if any(isinstance(m, QuantizedLinear) for m in model.base.modules()):
        return "the base model is quantized (model.quantize): not packaged yet"
    decoder = model.base.get_decoder()
    if not (isinstance(getattr(decoder, "layers", None), nn.ModuleList) and hasattr(decoder, "norm")):
        return f"the base model's decoder ({type(decoder).__name__}) has no `layers` list and `norm`"
    return None


def example_inputs(
    model: XLoraModel, first: int = 0, end: int | None = None, batch: int = 3, width: int = 5, capacity: int = 9
) -> tuple[Any, ...]:
    """Inputs of `OneTokenStep(model, first, end)` for tracing: `batch` input rows (the last two tokens of the
    last cache row's prompt), `width` mask columns, `batch - 1` cache rows with buffers of `capacity`."""
    config = model.base.config
    end = config.num_hidden_layers if end is None else end
    heads = config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rows = batch - 1
    mask = torch.ones(batch, width, dtype=torch.long)
    mask[0, :2] = 0  # a left-padded row
    # Each input row's cache row and the columns it writes and reads: the first rows decode (the new column),
    # the last two are tokens of one prompt in the last cache row's earlier columns.
    cache_row = torch.tensor([*range(rows - 1), rows - 1, rows - 1])
    column = torch.tensor([width - 1] * (rows - 1) + [width - 3, width - 2])
    start = torch.tensor([2] + [0] * (rows - 2) + [0, 0])
    slots = torch.stack([cache_row, column], dim=1)
    spans = torch.stack([cache_row, 0 * column, 0 * column + 1, start, column + 1, column + 1, column + 1], dim=1)
    kv = dict(dtype=model.kv_dtype, device=model.device)
    if first == 0:
        inputs = torch.ones(batch, 1, dtype=torch.long, device=model.device)
    else:
        hidden = torch.randn(batch, 1, config.hidden_size, generator=torch.Generator().manual_seed(0))
        inputs = hidden.to(model.device, model.dtype)
    return (
        inputs,
        mask.to(model.device),
        (column - start).view(-1, 1).to(model.device),
        spans,
        torch.zeros(batch, 1, model.layer_of_column.numel(), dtype=model.dtype, device=model.device),
        slots.to(model.device),
        [torch.zeros(rows, heads, capacity, head_dim, **kv) for _ in range(first, end)],
        [torch.zeros(rows, heads, capacity, head_dim, **kv) for _ in range(first, end)],
    )


def export_step(model: XLoraModel, first: int = 0, end: int | None = None) -> torch.export.ExportedProgram:
    """Layers [first, end) of `model`'s one-token pass, exported with dynamic numbers of input rows and cache
    rows, sequence length and cache capacity."""
    step = OneTokenStep(model, first, end)
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    rows = torch.export.Dim("rows", min=1, max=1 << 16)
    width = torch.export.Dim("width", min=2, max=1 << 20)
    capacity = torch.export.Dim("capacity", min=2, max=1 << 20)
    kv = [{0: rows, 2: capacity}] * (step.end - step.first)
    dynamic = ({0: batch}, {0: batch, 1: width}, {0: batch}, {0: batch}, {0: batch}, {0: batch}, kv, kv)
    with torch.inference_mode(False), torch.no_grad(), joint_weights(model) as joint:
        batch_invariant.measure_rows([*model.parameters(), *joint])  # what the traced calls read
        return torch.export.export(step, example_inputs(model, first, end), dynamic_shapes=dynamic, strict=False)


# Fused layers that transformers' decoder layers (Llama, Mistral, Qwen, ...) call one after the other on the
# same input, by name: one matmul for each such group of siblings (lora.JointMatmul).
SHARED_INPUT = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


@contextlib.contextmanager
def joint_weights(model: XLoraModel) -> Iterator[list[torch.Tensor]]:
    """Each fused layer over a plain linear gets its base weight and its experts' A stacked into one matmul (with its
    base bias, zeros for the ranks) while this lasts (`FusedLoraLinear.joint`), and so do sibling layers that take
    the same input (SHARED_INPUT): the exported step then reads, pads and multiplies an input once for all of
    them, 4 oneDNN calls a Llama layer instead of 7, each call costing some 13 µs more than its weight's bytes (a
    constant concatenation inside the graph would not get inductor's C++ GEMM: its weight must be a constant).
    Stored transposed for the C++ GEMM (batch_invariant.frozen_linear); as it is for oneDNN's packed matmuls
    (AUTOTUNE "none"), which inductor makes of F.linear only; there each layer also gets its B transposed, for the
    sum over the ranks that replaces B's matmul (FusedLoraLinear._joint). Yields the joint weights whose
    least_rows a traced call reads (none with the C++ GEMM)."""
    siblings: dict[str, dict[str, FusedLoraLinear]] = {}
    for name, m in model.base.named_modules():
        if isinstance(m, FusedLoraLinear) and isinstance(m.base_layer, nn.Linear):
            parent, _, attr = name.rpartition(".")
            siblings.setdefault(parent, {})[attr] = m
    groups: list[list[FusedLoraLinear]] = []
    for layers in siblings.values():
        for names in SHARED_INPUT:
            group = [layers.pop(n) for n in names if n in layers]
            if len({m.base_layer.in_features for m in group}) == 1:
                groups.append(group)
            else:
                groups += [[m] for m in group]
        groups += [[m] for m in layers.values()]
    transposed = "max_autotune" in inductor_configs(model)
    weights = []
    for group in groups:
        weight = torch.cat([w for m in group for w in (m.base_layer.weight, m.lora_A)]).detach()
        bias = None
        if any(m.base_layer.bias is not None for m in group):
            bias = torch.cat([
                b for m in group for b in (
                    m.base_layer.weight.new_zeros(m.base_layer.out_features) if m.base_layer.bias is None
                    else m.base_layer.bias, m.lora_A.new_zeros(m.lora_A.shape[0]),
                )
            ]).detach()  # fmt: skip
        matmul = JointMatmul(weight.t().contiguous() if transposed else weight, bias, transposed)
        first = 0
        for m in group:
            m.joint = (matmul, first, None if transposed else m.lora_B.detach().t().contiguous())
            first += m.base_layer.out_features + m.lora_A.shape[0]
        if not transposed:  # the C++ GEMM's calls keep ROWS_PER_CALL rows: nothing to measure
            weights.append(weight)
    try:
        yield weights
    finally:
        for group in groups:
            for m in group:
                m.joint = None


def split_faithfully(model: XLoraModel, parts: int) -> bool:
    """Whether the pass run as `parts` parts one after the other gives exactly the whole pass's hidden states
    and caches, eagerly (a decoder that does more than embed, run its layers and norm would not)."""
    whole = example_inputs(model)
    chained = copy.deepcopy(whole)
    with torch.inference_mode(False), torch.no_grad():
        expected = OneTokenStep(model)(*whole)
        hidden = chained[0]
        for first, end in part_bounds(model.base.config.num_hidden_layers, parts):
            own = [buffers[first:end] for buffers in chained[6:]]
            hidden = OneTokenStep(model, first, end)(hidden, *chained[1:6], *own)
    return torch.equal(hidden, expected) and all(
        torch.equal(a, b) for a, b in zip(whole[6] + whole[7], chained[6] + chained[7], strict=True)
    )


def default_autotune() -> str:
    """The GEMM kernels inductor uses. With AMX, inductor's C++ micro-GEMMs beat oneDNN's (ATEN) on every
    matmul shape of the step, 4 to 10x (docs/compiled-decoding.md), so they are taken without benchmarking.
    Without AMX they multiply bf16 in fp32 vector code: on an AMD EPYC with AVX-512 BF16 the step on oneDNN's
    packed matmuls (`none`, the C++ templates never tried) ran 1.8x as fast as with both benchmarked per matmul
    (`CPP,ATEN`, which kept the templates in 4 of the 7 choices it logged), and built in less time."""
    import torch.cpu

    return "CPP" if torch.cpu._is_amx_tile_supported() else "none"


# "CPP", "CPP,ATEN" (both benchmarked for each matmul) or "none": frozen weights with oneDNN's packed
# matmuls, no C++ GEMM kernels.
AUTOTUNE = os.environ.get("XLORA_COMPILE_AUTOTUNE") or default_autotune()


def inductor_configs(model: XLoraModel, autotune: str | None = None) -> dict[str, Any]:
    """Frozen weights, and on CPU the GEMM kernels that `autotune` (default: AUTOTUNE) says."""
    autotune = autotune or AUTOTUNE
    configs: dict[str, Any] = {"freezing": True}
    if model.device.type == "cpu" and autotune != "none":
        configs |= {"max_autotune": True, "max_autotune_gemm_backends": autotune}
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
        "parts": PARTS,
        "native": native.load(),  # the decode step's attention: our C++ kernel, or SDPA where it cannot be built
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
    file appears whole or not at all (written beside it, then renamed).

    The step is exported as PARTS graphs of consecutive layers (one if splitting would change its numbers).
    A process of its own per part but the last loads the model (pickled into a file) and exports and
    compiles its layers while this one does the last part; one package holds them."""
    from torch._inductor.package import package_aoti

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    layers = model.base.config.num_hidden_layers
    parts = PARTS if PARTS > 1 and layers >= PARTS and split_faithfully(model, PARTS) else 1
    configs = {**inductor_configs(model), "aot_inductor.package": True}
    fd, tmp = tempfile.mkstemp(prefix=path.stem + ".partial-", suffix=".pt2", dir=path.parent)
    os.close(fd)
    compilers: list[PartCompiler] = []
    try:
        with tempfile.TemporaryDirectory() as folder, _no_gc():
            model_file = Path(folder) / "model.pickle"
            if parts > 1 and not _pickled(model, model_file):
                parts = 1
            bounds = part_bounds(layers, parts)
            compilers = [PartCompiler(model_file, first, end, configs) for first, end in bounds[:-1]]
            last = _compile(export_step(model, *bounds[-1]), configs, f"layers [{bounds[-1][0]}, {bounds[-1][1]})")
            files = [compiler.result(model) for compiler in compilers] + [last]
            package_aoti(tmp, {f"part{i}": part_files for i, part_files in enumerate(files)})
        os.replace(tmp, path)
    finally:
        for compiler in compilers:
            compiler.stop()
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _pickled(model: XLoraModel, file: Path) -> bool:
    """Write `model` to `file` for the part compilers (half a second for the embedded default; saving its
    exported part and loading that there took 10 s); False if it cannot be pickled (one part is compiled)."""
    try:
        with open(file, "wb") as out:
            pickle.dump(model, out, protocol=pickle.HIGHEST_PROTOCOL)
    except (pickle.PicklingError, TypeError, AttributeError) as exc:
        log.warning("compiling the decode step as one graph: the model cannot be pickled for a second process (%s)",
                    exc)  # fmt: skip
        return False
    return True


class PartCompiler:
    """A process that exports and compiles layers [first, end) of the model pickled in `model_file`, as
    `build_package` does the last part (spawned: a fresh interpreter, as fork and torch's threads do not
    mix). Compiling is single-threaded, so two parts on two cores take about the time of one."""

    def __init__(self, model_file: Path, first: int, end: int, configs: dict[str, Any]) -> None:
        self.first, self.end, self.configs = first, end, configs
        context = multiprocessing.get_context("spawn")
        self.results, sender = context.Pipe(duplex=False)
        self.process = context.Process(
            target=_compile_part,
            args=(sender, str(model_file), first, end, configs, torch.get_num_threads(), os.getpid()),
            name=f"xlora-compile-layers-{first}-{end}",
        )  # fmt: skip
        self.process.start()
        sender.close()

    def result(self, model: XLoraModel) -> list[str]:
        """The part's files, once compiled; if its process failed, the part compiled here instead."""
        try:
            kind, value = self.results.recv()
        except EOFError:  # it died without a word (killed, out of memory)
            kind, value = "error", None
        self.process.join()
        if kind == "files":
            return value
        log.warning("compiling layers [%d, %d) failed in a process of its own (exit code %s); compiling them here. %s",
                    self.first, self.end, self.process.exitcode, value or "")  # fmt: skip
        return _compile(export_step(model, self.first, self.end), self.configs, f"layers [{self.first}, {self.end})")

    def stop(self) -> None:
        """End the process if it still runs (the build failed or was interrupted)."""
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


def _compile_part(
    results: Connection, model_file: str, first: int, end: int, configs: dict[str, Any], threads: int, builder: int
) -> None:
    """A PartCompiler's process: load the model, export and compile its layers, send back their files (or the
    error), and exit at once: tearing down the compiler's millions of objects would take seconds the build
    waits for."""
    code = 0
    exit_with_parent(builder)  # a builder killed outright (SIGKILL) would otherwise leave this compiling for nobody
    try:
        torch.set_num_threads(threads)  # the GEMM kernels are built for the serving process's thread count
        with open(model_file, "rb") as file, _no_gc():
            model = pickle.load(file)
            results.send(("files", _compile(export_step(model, first, end), configs, f"layers [{first}, {end})")))
    except BaseException:  # noqa: BLE001 - whatever it is, the builder says it and compiles the part itself
        code = 1
        results.send(("error", traceback.format_exc()))
    finally:
        results.close()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def exit_with_parent(parent: int, poll_s: float = 0.5) -> None:
    """End this process (exit code 1, at once) when process `parent`, which started it, has ended. Linux tells
    a child nothing when its parent dies, and a build runs for minutes: a part compiler whose builder was
    killed, or a server's background build whose server was killed (SIGKILL, out of memory, a Ray replica
    killed), would compile on for nobody, on the cores the next server needs. The parent's pid is given, not
    read here: one that died while this process was still starting would not be missed."""

    def watch() -> None:
        while os.getppid() == parent:  # an orphan is handed to init (or a subreaper): another parent
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _compile(program: torch.export.ExportedProgram, configs: dict[str, Any], name: str) -> list[str]:
    """AOTInductor's files for one part."""
    started = time.monotonic()
    # No grad: inductor freezes the weights (oneDNN-packed constants, the C++ GEMMs) only then, and ignores
    # `freezing` silently otherwise.
    with _templates_parsed_once(), torch.no_grad():
        args, kwargs = program.example_inputs
        files = torch._inductor.aot_compile(program.module(check_guards=False), args, kwargs, options=configs)
    print(f"compiled {name} in {time.monotonic() - started:.0f} s", flush=True)
    return files


@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    """Python's collector off while inductor builds millions of short-lived objects: 5% of a cold build. Once,
    around the whole build, and left off if it was off: the first collection after it walks every object
    still alive (2 to 4 s), which a process that exits right after skips (a part compiler, and
    `xlora-serve --precompile`, which turns the collector off for good)."""
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@contextlib.contextmanager
def _templates_parsed_once() -> Iterator[None]:
    """Inductor parses its jinja GEMM template again for each of the step's hundreds of matmuls (torch 2.13:
    `KernelTemplate._template_from_string`, uncached): a quarter of a cold build. A template is the same for
    the same text, so each text is parsed once while this lasts; the generated code is the same."""
    from torch._inductor.codegen.common import KernelTemplate

    original = KernelTemplate.__dict__.get("_template_from_string")
    if not isinstance(original, staticmethod):  # another torch: leave it be
        yield
        return
    KernelTemplate._template_from_string = staticmethod(functools.lru_cache(maxsize=None)(original.__func__))
    try:
        yield
    finally:
        KernelTemplate._template_from_string = original


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
        for partial in path.parent.glob(path.stem + ".partial-*"):  # left by a builder that was killed
            partial.unlink(missing_ok=True)
        build_package(model, path)
    prune_packages(path.parent)
    return True


# Packages a cache folder keeps: the ones used last (built or loaded). Each holds its model's weights (about 530
# MB for the embedded default), and any change to the step's code gives them other keys: without a bound every
# upgrade would leave one behind.
KEEP_PACKAGES = 4


def prune_packages(folder: str | os.PathLike, keep: int = KEEP_PACKAGES) -> list[Path]:
    """Remove the packages in `folder` beyond the `keep` used last (by modification time: `load_package` touches
    what it loads) with their lock and log files, and what killed builders left (`.partial-*` files whose lock
    no builder holds). Returns the files removed."""
    import fcntl

    folder = Path(folder)

    def used(path: Path) -> float:
        try:
            return path.stat().st_mtime
        except FileNotFoundError:  # removed meanwhile by another process
            return 0.0

    packages = sorted((p for p in folder.glob("step-*.pt2") if ".partial-" not in p.name), key=used, reverse=True)
    doomed = [p.with_suffix(suffix) for p in packages[keep:] for suffix in (".pt2", ".lock", ".log")]
    for partial in folder.glob("step-*.partial-*"):
        with open(folder / (partial.name.split(".partial-")[0] + ".lock"), "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # its builder is at work
                continue
            doomed.append(partial)
    removed = []
    for path in doomed:
        if path.exists():
            path.unlink(missing_ok=True)
            removed.append(path)
    if removed:
        log.info("removed %d old files from the compiled decode step cache %s", len(removed), folder)
    return removed


class PackagedStep:
    """A loaded package, called where `XLoraModel._backbone` would run the one-token pass: its parts one after
    the other, each on its own layers' caches."""

    def __init__(self, path: str | os.PathLike) -> None:
        from torch._inductor.package import load_package as load_part

        self.path = Path(path)
        native.load()  # the step calls our C++ attention kernel, which must be registered before loading
        with zipfile.ZipFile(self.path) as archive:  # the parts' names: <archive>/data/aotinductor/<part>/...
            names = {Path(n).parts[3] for n in archive.namelist() if Path(n).parts[1:3] == ("data", "aotinductor")}
        parts = [f"part{i}" for i in range(len(names))]
        if not names or names != set(parts):
            raise ValueError(f"expected models part0, part1, ... in the package, found {sorted(names)}")
        self.runners = [load_part(str(self.path), name) for name in parts]
        self.bounds: list[tuple[int, int]] = []  # each part's layers, known at the first call

    def __call__(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: DynamicCache,
        columns: torch.Tensor,
        spans: torch.Tensor,
        slots: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """The hidden states of the step, its tokens written into `cache` at their `slots` [rows, 2] (cache
        row, column; None: a decode step, row i at column width - 1 of cache row i); None if this step is not
        one the package runs (over MAX_BATCH tokens, a cache not of buffers in step with the mask): run it
        eagerly."""
        batch, width = attention_mask.shape
        layers = cache.layers
        if batch > MAX_BATCH or not all(
            isinstance(layer, GrowingLayer) and layer.buffers is not None and layer.length == width - 1
            and layer.capacity >= width for layer in layers
        ):  # fmt: skip
            return None
        keys = [layer.buffers[0] for layer in layers]
        values = [layer.buffers[1] for layer in layers]
        if slots is None:
            rows = torch.arange(batch, device=input_ids.device)
            slots = torch.stack([rows, torch.full_like(rows, width - 1)], dim=1)
        if not self.bounds:
            self.bounds = part_bounds(len(layers), len(self.runners))
        hidden = input_ids
        for runner, (first, end) in zip(self.runners, self.bounds, strict=True):
            hidden = runner(hidden, attention_mask, position_ids, spans, columns, slots, keys[first:end],
                            values[first:end])  # fmt: skip
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
        step = PackagedStep(path)
    except Exception as exc:  # any failure to load means: not usable; eager decoding stays correct
        log.warning("ignoring the compiled decode step %s (cannot load it: %s: %s); it will be built again",
                    path, type(exc).__name__, exc)  # fmt: skip
        path.unlink(missing_ok=True)
        return None
    with contextlib.suppress(OSError):  # used now: kept by prune_packages (a read-only cache keeps its own)
        os.utime(path)
    return step
