"""Weight-only quantization of the base model's linear layers (docs/quantization.md).

`quantize_base(model, "int8" | "int4")` replaces every nn.Linear of a causal LM by a `QuantizedLinear`: the
weight is kept as integers and multiplied by torch's weight-only kernels, the activations stay in the
model's dtype. The LoRA experts and the classifier are added later (XLoraModel) and stay at full precision:
a `FusedLoraLinear` wraps a QuantizedLinear as it wraps an nn.Linear.

- int8: one scale per output channel, symmetric (w = q * scale), `torch._weight_int8pack_mm`.
- int4: groups of 32 inputs, asymmetric (w = (q - 8) * scale + zero, q in 0..15, as GGUF's Q4_1 with
  zero = min + 8 * scale), `torch._weight_int4pack_mm_for_cpu` (CPU) or `torch._weight_int4pack_mm`
  (CUDA, bfloat16). The LM head stays at int8, as llama.cpp keeps its output tensor at 8 bits (the
  embedded default's GGUF ships it as Q8_0): 4 bits there cost the most quality for the least memory.
- an LM head tied to the embedding table (the embedded default's) is held once, at int8, for both.

These are the kernels torchao wraps; torchao 0.18 itself (the release pip resolves with torch 2.13) ran
int8 weight-only about 8x slower than `_weight_int8pack_mm` on a 1-row CPU call and no longer has a CPU
int4 layout, so it is not used.

Batch invariance (batch_invariant.py): the eager CPU kernels compute each row on its own, so a row gets the
same bits for any number of rows (tests/test_quantize.py checks 1 to 40 rows); they are called with the rows
as they are. In a compiled pass inductor picks its GEMM blocking by the number of rows, so there the calls
have exactly ROWS_PER_CALL rows, as for bf16 weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .batch_invariant import ROWS_PER_CALL

QUANTIZE_MODES = ("none", "int8", "int4")
INT4_GROUP_SIZE = 32  # GGUF's Q4_0 / Q4_1 block


class QuantizeError(ValueError):
    """A quantize setting that cannot be served on this device and dtype; the message says which."""


def check_quantize(quantize: str, device: torch.device | str, dtype: torch.dtype) -> None:
    """Refuse a mode, device or dtype without a kernel here."""
    if quantize not in QUANTIZE_MODES:
        raise QuantizeError(f"unknown quantize {quantize!r}; expected one of {', '.join(QUANTIZE_MODES)}")
    if quantize == "none":
        return
    kind = torch.device(device).type
    if kind not in ("cpu", "cuda"):
        raise QuantizeError(f"quantize {quantize!r} has kernels on cpu and cuda, not on {kind}")
    if kind == "cuda" and dtype != torch.bfloat16:
        raise QuantizeError(f"quantize {quantize!r} on cuda needs dtype bfloat16 (torch's kernels), not {dtype}")
    if kind == "cpu" and dtype == torch.float16:
        raise QuantizeError(f"quantize {quantize!r} on cpu needs dtype bfloat16 or float32, not float16")


# -----------------------------------------------------------------------------
# integers from float weights


def int8_per_channel(weight: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [out, in], scales [out] in `dtype`) with weight ~ q * scales[:, None]. The scales are rounded
    to `dtype` first, so that q * scales is exactly what the kernel computes with."""
    w = weight.detach().float()
    scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-12).to(dtype)
    q = (w / scales.float()[:, None]).round().clamp(-128, 127).to(torch.int8)
    return q, scales


def int4_fits(in_features: int, out_features: int, device: torch.device | str = "cpu") -> bool:
    """Whether the int4 kernels take this shape: whole groups of inputs and outputs in 16s (CPU packing);
    on CUDA (tinygemm, 8 inner k-tiles) inputs in 128s and outputs in 8s."""
    if torch.device(device).type == "cuda":
        return in_features % 128 == 0 and out_features % 8 == 0
    return in_features % INT4_GROUP_SIZE == 0 and out_features % 16 == 0


def int4_groups(weight: torch.Tensor, dtype: torch.dtype, group: int = INT4_GROUP_SIZE) -> tuple[torch.Tensor, ...]:
    """(q int32 [out, in] in 0..15, scales [out, in / group], zeros [out, in / group], both in `dtype`) with
    weight ~ (q - 8) * scale + zero per group: min..max of each group onto 0..15."""
    out_features, in_features = weight.shape
    w = weight.detach().float().view(out_features, in_features // group, group)
    low, high = w.amin(dim=-1), w.amax(dim=-1)
    scales = ((high - low) / 15).clamp(min=1e-12).to(dtype)
    zeros = (low + 8 * scales.float()).to(dtype)
    q = ((w - zeros.float()[..., None]) / scales.float()[..., None] + 8).round().clamp(0, 15).to(torch.int32)
    return q.view(out_features, in_features), scales, zeros


def dequantize_int4(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """The float32 weight [out, in] that int4 groups stand for."""
    out_features, in_features = q.shape
    groups = scales.shape[1]
    w = (q.view(out_features, groups, -1).float() - 8) * scales.float()[..., None] + zeros.float()[..., None]
    return w.view(out_features, in_features)


# -----------------------------------------------------------------------------
# the layer


class QuantizedLinear(nn.Module):
    """A linear layer whose weight is int8 (per output channel) or int4 (groups of INT4_GROUP_SIZE), computed
    in the activations' dtype. `slot` is its XLoraModel's lora.ExpertWeightsSlot (set by XLoraModel), whose
    `inductor` says whether the pass running is being compiled."""

    slot: Any = None

    def __init__(
        self,
        bits: int,
        in_features: int,
        out_features: int,
        packed: torch.Tensor,
        scales: torch.Tensor,
        bias: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.bits, self.in_features, self.out_features = bits, in_features, out_features
        self.register_buffer("packed", packed)  # int8 [out, in], or the int4 kernel's own packing
        self.register_buffer("scales", scales)  # int8: [out]; int4: scales and zeros [in / group, out, 2]
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def int8(cls, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None) -> QuantizedLinear:
        return cls(8, q.shape[1], q.shape[0], q.contiguous(), scales.contiguous(), bias)

    @classmethod
    def int4(
        cls, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bias: torch.Tensor | None = None
    ) -> QuantizedLinear:
        """From int4 groups (int4_groups' layout), packed for the kernel of q's device."""
        out_features, in_features = q.shape
        if q.device.type == "cuda":  # tinygemm's layout: two values a byte, then its tiles
            pairs = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
            packed = torch._convert_weight_to_int4pack(pairs.contiguous(), 8)
        else:
            packed = torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)
        scales_and_zeros = torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous()
        return cls(4, in_features, out_features, packed, scales_and_zeros, bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, device: torch.device | str | None = None) -> QuantizedLinear:
        """`linear` quantized on `device` (default: where it is); its dtype is the one computed in."""
        weight = linear.weight.detach().to(device)
        bias = None if linear.bias is None else linear.bias.detach().to(device)
        if bits == 8:
            return cls.int8(*int8_per_channel(weight, weight.dtype), bias)
        return cls.int4(*int4_groups(weight, weight.dtype), bias)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype it computes in (its inputs' and outputs')."""
        return self.scales.dtype

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scales))

    def _mm(self, rows: torch.Tensor) -> torch.Tensor:
        if self.bits == 8:
            if rows.device.type == "cpu":
                return torch._weight_int8pack_mm(rows, self.packed, self.scales)
            return F.linear(rows, self.packed.to(rows.dtype)) * self.scales  # CUDA: no int8 kernel in torch
        if rows.device.type == "cpu":
            return torch._weight_int4pack_mm_for_cpu(rows, self.packed, INT4_GROUP_SIZE, self.scales)
        return torch._weight_int4pack_mm(rows, self.packed, INT4_GROUP_SIZE, self.scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(self.dtype)
        n = rows.shape[0]
        if self.slot is not None and self.slot.inductor and rows.device.type == "cpu":
            if n % ROWS_PER_CALL:  # inductor blocks by rows: every call the same shape
                rows = torch.cat([rows, rows.new_zeros(ROWS_PER_CALL - n % ROWS_PER_CALL, rows.shape[1])])
            parts = [self._mm(part) for part in rows.split(ROWS_PER_CALL)]
            out = (parts[0] if len(parts) == 1 else torch.cat(parts))[:n]
        else:
            out = self._mm(rows)
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], self.out_features)

    def dequantized(self) -> torch.Tensor:
        """The float32 weight [out, in] this layer computes with (for references and tests; CPU int4 is
        unpacked by multiplying the identity)."""
        if self.bits == 8:
            return self.packed.float() * self.scales.float()[:, None]
        eye = torch.eye(self.in_features, dtype=torch.float32, device=self.device)
        with torch.no_grad():  # kernels are linear: W^T = I W^T (exact in float32 activations)
            scales = self.scales.float()
            if self.device.type == "cpu":
                w_t = torch._weight_int4pack_mm_for_cpu(eye, self.packed, INT4_GROUP_SIZE, scales)
            else:
                w_t = torch._weight_int4pack_mm(eye.bfloat16(), self.packed, INT4_GROUP_SIZE, self.scales).float()
        return w_t.t().contiguous()

    def extra_repr(self) -> str:
        return f"int{self.bits}, in_features={self.in_features}, out_features={self.out_features}"


class QuantizedEmbedding(nn.Module):
    """The embedding table of a model whose LM head is tied to it, read from the int8 LM head: row i is
    q[i] * scale[i], so the table is held once, at a byte a weight."""

    def __init__(self, head: QuantizedLinear) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features
        self.register_buffer("packed", head.packed)  # the same tensors as the head's
        self.register_buffer("scales", head.scales)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.packed[ids].to(self.scales.dtype) * self.scales[ids].unsqueeze(-1)

    def extra_repr(self) -> str:
        return f"int8 (the LM head's), {self.num_embeddings}, {self.embedding_dim}"


# -----------------------------------------------------------------------------
# int4 groups straight from a GGUF file


def gguf_int4_groups(gguf_path: str | Path, model: nn.Module) -> dict[str, tuple[torch.Tensor, ...]]:
    """Module name -> (q, scales, zeros) in float32, int4_groups' layout, for the linear layers of `model` that a
    llama GGUF file stores as Q4_0 or Q4_1: its blocks of 32 are our groups (Q4_1: w = d * q + m, so scale d and
    zero m + 8 d; Q4_0: w = d * (q - 8)), read without going through float weights. Other layers (Q8_0's
    blocks have no per-channel form) and other architectures are left out (quantize_base requantizes them).
    The q and k rows are put in transformers' order, as its GGUF loader does (LlamaTensorProcessor)."""
    from gguf import GGMLQuantizationType, GGUFReader, get_tensor_name_map
    from gguf.constants import MODEL_ARCH_NAMES

    reader = GGUFReader(str(gguf_path))
    arch = reader.fields["general.architecture"].contents()
    config = model.config
    if arch != "llama" or getattr(config, "model_type", None) != "llama":
        return {}
    arch_id = next(k for k, v in MODEL_ARCH_NAMES.items() if v == arch)
    names = get_tensor_name_map(arch_id, config.num_hidden_layers)
    tensors = {t.name: t for t in reader.tensors}
    q4 = (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1)
    found = {}
    for name, layer in model.named_modules():
        gguf_name = names.get_name(name)
        tensor = tensors.get(f"{gguf_name}.weight") if gguf_name else None
        if not isinstance(layer, nn.Linear) or tensor is None or tensor.tensor_type not in q4:
            continue
        rows, in_features = layer.out_features, layer.in_features
        q4_1 = tensor.tensor_type == GGMLQuantizationType.Q4_1
        head = 4 if q4_1 else 2  # bytes before a block's 16 bytes of nibbles: d (and m), float16
        blocks = torch.from_numpy(tensor.data.reshape(rows, in_features // 32, head + 16).copy())
        d = blocks[..., 0:2].contiguous().view(torch.float16).squeeze(-1).float()
        nibbles = blocks[..., head:].int()
        q = torch.cat([nibbles & 15, nibbles >> 4], dim=-1).reshape(rows, in_features)  # low nibbles first
        zeros = blocks[..., 2:4].contiguous().view(torch.float16).squeeze(-1).float() + 8 * d if q4_1 else 0 * d
        kind = gguf_name.rsplit(".", 1)[-1]
        heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}.get(kind)
        if heads:  # llama.cpp interleaves each head's rotary halves; transformers' loader undoes it
            order = torch.arange(rows).view(heads, rows // heads // 2, 2).transpose(1, 2).reshape(rows)
            q, d, zeros = q[order], d[order], zeros[order]
        found[name] = (q, d, zeros)
    return found


# -----------------------------------------------------------------------------
# a whole model


def quantize_base(
    model: nn.Module, quantize: str, device: torch.device | str | None = None, gguf: str | Path | None = None
) -> nn.Module:
    """Replace the nn.Linear layers of a loaded causal LM in place: int8 -> every one int8; int4 -> int4 where
    the shape fits the kernels (int4_fits), int8 for the LM head and the rest. Each layer is moved to `device`
    (default: where it is) and quantized there. With int4, the layers that `gguf` (the file the model was
    loaded from) stores as Q4_0 / Q4_1 take its own groups (gguf_int4_groups) instead of being requantized;
    `model.quantized_from_gguf` names them. A tied LM head's int8 table is the embedding table too
    (QuantizedEmbedding). Returns the model."""
    if quantize == "none":
        return model
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tied = head is not None and embedding is not None and head.weight is embedding.weight
    from_gguf = gguf_int4_groups(gguf, model) if gguf is not None and quantize == "int4" else {}
    for name, child in list(model.named_modules()):
        if type(child) is not nn.Linear:
            continue
        where = child.weight.device if device is None else device
        fits = int4_fits(child.in_features, child.out_features, where)
        bits = 4 if quantize == "int4" and child is not head and fits else 8
        if bits == 4 and name in from_gguf:
            dtype, bias = child.weight.dtype, None if child.bias is None else child.bias.detach().to(device)
            q, scales, zeros = (t.to(device) for t in from_gguf[name])
            quantized = QuantizedLinear.int4(q, scales.to(dtype), zeros.to(dtype), bias)
        else:
            quantized = QuantizedLinear.from_linear(child, bits, device)
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, quantized)
        if child is head and tied:  # one int8 table for both ends
            model.set_input_embeddings(QuantizedEmbedding(quantized))
    model.quantized_from_gguf = sorted(from_gguf)
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights as held (parameters, buffers), each tensor once."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total
