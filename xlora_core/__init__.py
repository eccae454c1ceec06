"""xlora_core: X-LoRA (a mixture of LoRA experts with a learned per-token router), faithful to peft,
generating with a KV cache for each of its two passes."""

from .cache import XLoraCache
from .classifier import Routing
from .config import ConstraintError, ParameterError, XLoraConfig
from .constraints import CompiledGrammar, ConstraintSpec, GrammarCompiler
from .engine import BatchRow, DecodeBatch, Generated
from .generation import StreamedToken
from .hosted import HostedModel
from .model import XLoraModel
from .prefix_cache import PrefixCache
from .sampling import RowDecoder, SamplingParams

__all__ = [
    "BatchRow",
    "CompiledGrammar",
    "ConstraintError",
    "ConstraintSpec",
    "DecodeBatch",
    "Generated",
    "GrammarCompiler",
    "HostedModel",
    "ParameterError",
    "PrefixCache",
    "Routing",
    "RowDecoder",
    "SamplingParams",
    "StreamedToken",
    "XLoraCache",
    "XLoraConfig",
    "XLoraModel",
]
