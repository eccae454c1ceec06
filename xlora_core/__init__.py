"""xlora_core: X-LoRA (a mixture of LoRA experts with a learned per-token router), faithful to peft,
generating with a KV cache for each of its two passes."""

from .cache import XLoraCache
from .classifier import Routing
from .config import XLoraConfig
from .generation import RowDecoder, SamplingParams
from .model import XLoraModel

__all__ = ["Routing", "RowDecoder", "SamplingParams", "XLoraCache", "XLoraConfig", "XLoraModel"]
