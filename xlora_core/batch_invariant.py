"""Kernels that give a row the same numbers whatever else is in its batch (README "Batch invariance").

A request decoded alone, in a batch of 8, or joining a running batch mid-step must get the same tokens
at temperature 0. Two things in a plain forward break that, both in the last bits of the arithmetic,
which bfloat16 then rounds into different tokens:

- matmul kernels pick their blocking, and so their order of additions, by the number of rows M, and
  bfloat16 rounds the results: one element in a few thousand then differs between M=1 and M=8. `linear`
  (bfloat16 on CPU) calls oneDNN at most `ROWS_PER_CALL` rows at a time, on weights prepacked once, and
  pads a call with zero rows up to the fewest rows from which oneDNN gives every row the bits it gets in
  a call of ROWS_PER_CALL rows (`least_rows`, measured once per weight shape on this CPU at this number
  of threads): every row then gets the arithmetic of a full call, alone or not. On an AMD EPYC with
  AVX-512 BF16 that is 1 row for most shapes and 2 for a 1536-wide input, where a call of 16 rows costs
  twice one row's; with AMX it costs about the same. Inductor's C++ GEMM templates (the compiled step
  with AMX) are not measured: their calls keep ROWS_PER_CALL rows.
- attention over a padded batch: the padding shifts where a row's keys fall in the kernel's vector lanes.
  `row_attention` runs each row's queries over its own keys only (`left_padded_spans`, `ragged_spans`), the same call
  with the same shapes as when the row is alone. A single query (every row of a decode step) goes to our C++
  kernel (`one_query_attention`, csrc/one_query_attention.cpp), which computes each (row, head) alone in one loop
  over that row's keys; longer queries block by block through SDPA.

Elsewhere (float32, or a GPU) `linear` is plain `F.linear`: float32 kernels differ by batch size in the
last bit (about 1e-7), which has not changed a greedy token in our tests, but is not a guarantee.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.weak import WeakIdKeyDictionary
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from . import native

# The most rows of a prepacked matmul call, and the rows of every call where oneDNN's kernels were not
# measured (inductor's C++ GEMM templates; AMX tiles are 16 rows high).
ROWS_PER_CALL = 16

# False: plain F.linear and transformers' batched SDPA, for A/B benchmarks (bench.batch_invariance) only.
ENABLED = True

# weight -> (its _version when packed, the packed copy); dropped with the weight
_PACKED: WeakIdKeyDictionary = WeakIdKeyDictionary()


def rows_fixed(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `linear` runs fixed calls (at most ROWS_PER_CALL rows, at least `least_rows`): bfloat16
    inference on a CPU whose oneDNN runs bf16 natively."""
    return (
        ENABLED
        and x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.bfloat16
        and not (torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad))
        and _mkldnn_bf16()
    )


def _mkldnn_bf16() -> bool:
    global _MKLDNN_BF16
    if _MKLDNN_BF16 is None:
        _MKLDNN_BF16 = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return _MKLDNN_BF16


_MKLDNN_BF16: bool | None = None


def _packed(weight: torch.Tensor) -> torch.Tensor:
    """The weight prepacked for oneDNN calls of ROWS_PER_CALL rows, packed again if it changed since
    (loading a state dict writes in place and bumps its version)."""
    version = 0 if weight.is_inference() else weight._version  # inference tensors cannot change
    entry = _PACKED.get(weight)
    if entry is None or entry[0] != version:
        with torch.inference_mode(False), torch.no_grad():
            entry = (version, torch.ops.mkldnn._reorder_linear_weight(weight.detach(), ROWS_PER_CALL))
        _PACKED[weight] = entry
    return entry[1]


# (out features, in features) -> least_rows for that weight shape, at _PROBED_THREADS torch threads.
_LEAST_ROWS: dict[tuple[int, int], int] = {}
_PROBED_THREADS = 0


def least_rows(out_features: int, in_features: int) -> int:
    """The fewest rows a oneDNN call on a bf16 weight of this shape needs for each of its rows to get the same
    bits as in a call of ROWS_PER_CALL rows, whatever else is in it (1 to ROWS_PER_CALL). Measured once per
    shape and number of torch threads (`_measure_least_rows`: tens of ms, 1.5 s for a 49152-row LM head)."""
    global _PROBED_THREADS
    threads = torch.get_num_threads()
    if threads != _PROBED_THREADS:  # oneDNN splits work among threads: another count, other kernels
        _LEAST_ROWS.clear()
        _PROBED_THREADS = threads
    key = (out_features, in_features)
    if key not in _LEAST_ROWS:
        _LEAST_ROWS[key] = _measure_least_rows(out_features, in_features)
    return _LEAST_ROWS[key]


def measure_rows(weights: list[torch.Tensor]) -> None:
    """least_rows for the shape of every bf16 matrix in `weights`, ahead of compiling a pass that calls
    `linear` on them: a compiled call reads the measurement and cannot make it (it pads to ROWS_PER_CALL
    rows for a shape not measured)."""
    for weight in weights:
        if weight.dim() == 2 and weight.dtype == torch.bfloat16 and weight.device.type == "cpu":
            least_rows(*weight.shape)


def probe_inputs(
    out_features: int, in_features: int, rows: int = ROWS_PER_CALL, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 inputs [rows, in] and weight [out, in] on which any change in the order of a row's additions shows
    in its bf16 result: pairs of input columns hold +B and -B (B up to 2^15) over equal weight columns, so
    the partial sums are large while the result stays small, and where those terms are added among the
    others decides its last bits. Plain random inputs hide most such changes (the real down_proj of the
    embedded default showed one that randn data did not)."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=g)
    x = torch.randn(rows, in_features, generator=g)
    pairs = max(1, in_features // 16) if in_features > 1 else 0  # one input column: one addition, no order
    a, b = torch.randperm(in_features, generator=g)[: 2 * pairs].view(2, -1)
    weight[:, b] = weight[:, a]
    big = 2.0 ** torch.randint(8, 16, (a.numel(),), generator=g)
    x[:, a], x[:, b] = big, -big
    return x.bfloat16(), weight.bfloat16()


def _measure_least_rows(out_features: int, in_features: int, seeds: int = 3) -> int:
    """least_rows, measured: every call of M rows (M from ROWS_PER_CALL - 1 down) against a full call, on
    `probe_inputs`, for oneDNN's packed matmul (what `linear` calls eagerly), with and without a bias, and
    F.linear's (what inductor may keep), all of which a compiled pass may run."""
    least = 1
    with torch.inference_mode():
        for seed in range(seeds):
            x, weight = probe_inputs(out_features, in_features, seed=seed)
            bias = torch.randn(out_features, generator=torch.Generator().manual_seed(seed)).to(weight.dtype)
            packed = torch.ops.mkldnn._reorder_linear_weight(weight, ROWS_PER_CALL)
            calls = (
                lambda rows: torch.ops.mkldnn._linear_pointwise(rows, packed, None, "none", [], ""),  # noqa: B023
                lambda rows: torch.ops.mkldnn._linear_pointwise(rows, packed, bias, "none", [], ""),  # noqa: B023
                lambda rows: F.linear(rows, weight),  # noqa: B023
            )
            for call in calls:
                full = call(x)
                for m in range(ROWS_PER_CALL - 1, least - 1, -1):
                    if not torch.equal(call(x[:m]), full[:m]):
                        least = m + 1
                        break
    return least


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    inductor: bool = False,
    cpp_gemm: bool = False,
) -> torch.Tensor:
    """F.linear; for bf16 inference on CPU, calls of at most ROWS_PER_CALL rows, each padded with zero rows to
    at least `least_rows`, so each row's result is the same for any number of rows. Eagerly on a prepacked
    weight; with `inductor` (the pass is being compiled) through F.linear, whose weight inductor's freezing
    packs, reading least_rows as measured before (`measure_rows`); with `cpp_gemm` (inductor's C++ GEMM
    templates take the matmul) always ROWS_PER_CALL rows. (Not torch.compiler.is_compiling(): that flag is
    process-wide, and another thread may be compiling while this one runs eagerly.)"""
    if not rows_fixed(x, weight):
        return F.linear(x, weight, bias)
    rows = x.reshape(-1, x.shape[-1])
    n = rows.shape[0]
    if inductor:
        least = ROWS_PER_CALL if cpp_gemm else _LEAST_ROWS.get((weight.shape[0], weight.shape[1]), ROWS_PER_CALL)
    else:
        least = least_rows(weight.shape[0], weight.shape[1])
    if inductor and n <= ROWS_PER_CALL:
        # One call with no branch on the number of rows: a step exported for any batch up to ROWS_PER_CALL
        # (compiled_step.py) keeps that as one graph.
        at = torch.arange(n, device=x.device)
        if least == 1:
            out = F.linear(rows, weight, bias)
        elif least == ROWS_PER_CALL:
            out = F.linear(rows.new_zeros(ROWS_PER_CALL, rows.shape[1]).index_copy(0, at, rows), weight, bias)[:n]
        else:  # index_select, not [:n]: export cannot tell that n <= max(n, least)
            padded = rows.new_zeros(torch.sym_max(n, least), rows.shape[1]).index_copy(0, at, rows)
            out = F.linear(padded, weight, bias).index_select(0, at)
        return out.view(*x.shape[:-1], weight.shape[0])
    if 0 < n % ROWS_PER_CALL < least:
        rows = torch.cat([rows, rows.new_zeros(least - n % ROWS_PER_CALL, rows.shape[1])])
    if inductor:
        parts = [F.linear(part, weight, bias) for part in rows.split(ROWS_PER_CALL)]
    else:
        packed = _packed(weight)
        parts = [
            torch.ops.mkldnn._linear_pointwise(part, packed, bias, "none", [], "")
            for part in rows.split(ROWS_PER_CALL)
        ]
    out = parts[0] if len(parts) == 1 else torch.cat(parts)
    return out[:n].view(*x.shape[:-1], weight.shape[0])


def frozen_linear(x: torch.Tensor, weight_t: torch.Tensor) -> torch.Tensor:
    """`linear(x, weight_t.T, inductor=True)` for a constant of a graph compiled with frozen weights and
    inductor's C++ GEMM, stored transposed ([in, out]: compiled_step.joint_weights). F.linear would transpose
    an [out, in] weight inside the graph; inductor packs that view for its GEMM but then keeps the unpacked
    constant in the package as well (torch 2.13 drops only weights used as stored): 110 MB more a part for the
    embedded default. The packed weight and the results are the same bits."""
    rows = x.reshape(-1, x.shape[-1])
    n = rows.shape[0]
    if not rows_fixed(x, weight_t):
        out = torch.mm(rows, weight_t)
    elif n <= ROWS_PER_CALL:  # the compiled step's case: one call of ROWS_PER_CALL rows, as `linear`
        padded = rows.new_zeros(ROWS_PER_CALL, rows.shape[1]).index_copy(0, torch.arange(n, device=x.device), rows)
        out = torch.mm(padded, weight_t)[:n]
    else:
        padded = torch.cat([rows, rows.new_zeros(-n % ROWS_PER_CALL, rows.shape[1])])
        out = torch.cat([torch.mm(part, weight_t) for part in padded.split(ROWS_PER_CALL)])[:n]
    return out.view(*x.shape[:-1], weight_t.shape[1])


class RowInvariantLinear(nn.Linear):
    """An nn.Linear (same parameters, same state-dict keys) whose forward is `linear`. `slot` is its model's
    `lora.ExpertWeightsSlot`, whose `inductor` says whether the pass running is being compiled."""

    slot: Any

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.slot.inductor, self.slot.cpp_gemm)


def use_row_invariant_linears(module: nn.Module, slot: Any) -> None:
    """Replace every plain nn.Linear under `module` by a RowInvariantLinear holding the same parameters
    (tied weights stay tied: the Parameter objects are the same) and reading `slot`."""
    for name, child in list(module.named_modules()):
        if type(child) is not nn.Linear:
            continue
        new = RowInvariantLinear.__new__(RowInvariantLinear)
        nn.Module.__init__(new)
        new.in_features, new.out_features = child.in_features, child.out_features
        new.weight, new.bias, new.slot = child.weight, child.bias, slot
        new.train(child.training)
        parent_name, _, attr = name.rpartition(".")
        setattr(module.get_submodule(parent_name) if parent_name else module, attr, new)


# -----------------------------------------------------------------------------
# attention, row by row


# Row spans: where each row's queries and keys are in a forward's tensors, one int64 row per span: (batch
# index, first query, end of queries, key ranges 1 and 2 as start, end). A row's keys are its range 1 then
# its range 2 (the ragged layout keeps a row's cached keys apart from its new ones; elsewhere range 2 is
# empty). A tensor on the CPU, so that a compiled step sees a changing batch as a changing shape.


def left_padded_spans(mask: torch.Tensor, new: int) -> torch.Tensor:
    """The spans [rows, 7] of a left-padded batch (`mask` [batch, keys], 1 on real tokens) whose last `new`
    columns are this forward's queries. A row may have one gap of padding (its keys are then two ranges): a
    prompt fed token by token in the compiled step ends before the column where its row decodes
    (`XLoraModel.decode_rows`)."""
    keys = mask.shape[1]
    valid = mask.bool().cpu()
    column = torch.arange(keys)
    first = torch.where(valid, column, keys).min(dim=1).values  # leading padding of each row
    gap = torch.where(~valid & (column >= first[:, None]), column, keys).min(dim=1).values
    second = torch.where(valid & (column >= gap[:, None]), column, keys).min(dim=1).values
    rows = torch.arange(mask.shape[0])
    q_first = (first - (keys - new)).clamp(min=0)
    end, all_keys = torch.full_like(rows, new), torch.full_like(rows, keys)
    return torch.stack([rows, q_first, end, first, gap, second, all_keys], dim=1)


def ragged_spans(cached: list[int], new: list[int]) -> torch.Tensor:
    """The spans [rows, 7] of a `cache.RaggedRows` forward: every row's cached keys, then every row's new
    tokens."""
    old, spans, key_at, query_at = sum(cached), [], 0, 0
    for c, n in zip(cached, new, strict=True):
        spans.append([0, query_at, query_at + n, key_at, key_at + c, old + query_at, old + query_at + n])
        key_at, query_at = key_at + c, query_at + n
    return torch.tensor(spans, dtype=torch.long)


# A prompt's queries are attended in blocks of this many, at positions that are multiples of it in their row:
# a prompt fed whole, in chunks that end on this grid (the engine's chunked prefill), or after a prefix taken
# from the prefix cache (whose blocks are multiples of it) runs the same calls with the same shapes.
QUERY_BLOCK = 16


# A custom op: torch.compile sees one opaque call (no graph break in the compiled step) and runs this loop as is.
@torch.library.custom_op("xlora::attention_by_rows", mutates_args=())
def attention_by_rows(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, spans: torch.Tensor, scaling: float
) -> torch.Tensor:
    """[batch, heads, queries, dim] -> [batch, queries, heads, dim], each span on its own keys (causal among
    its queries, which are its last keys), its queries QUERY_BLOCK by QUERY_BLOCK along its row's grid."""
    out = query.new_zeros(query.shape[0], query.shape[2], query.shape[1], value.shape[-1])
    gqa = key.shape[1] != query.shape[1]
    one_query = _one_query_kernel(key)
    for b, qs, qe, ks1, ke1, ks2, ke2 in spans.tolist():
        k, v = key[b : b + 1, :, ks1:ke1], value[b : b + 1, :, ks1:ke1]
        if ke2 > ks2:
            k = torch.cat([k, key[b : b + 1, :, ks2:ke2]], dim=2)
            v = torch.cat([v, value[b : b + 1, :, ks2:ke2]], dim=2)
        total = k.shape[2]
        first = total - (qe - qs)  # the position of the span's first query in its row
        begin = first
        while begin < total:  # queries begin..end: on the grid, or the span's own ends
            end = min((begin // QUERY_BLOCK + 1) * QUERY_BLOCK, total) if qe - qs > 1 else total
            n, mask = end - begin, None
            rows = slice(qs + begin - first, qs + end - first)
            if n == 1 and one_query:  # the kernel a decode step uses: the same bits for the same query and keys
                span = torch.tensor([[0, 0, 1, 0, end, 0, 0]])
                out[b, rows] = one_query_attention(query[b : b + 1, :, rows], k, v, span, scaling)[0]
                begin = end
                continue
            if n > 1:  # query i sees keys up to end - n + i
                mask = torch.ones(n, end, dtype=torch.bool, device=query.device).tril(end - n)
            o = F.scaled_dot_product_attention(
                query[b : b + 1, :, rows], k[:, :, :end], v[:, :, :end], attn_mask=mask, scale=scaling, enable_gqa=gqa
            )
            out[b, rows] = o[0].transpose(0, 1)
            begin = end
    return out


@attention_by_rows.register_fake
def _(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, spans: torch.Tensor, scaling: float) -> torch.Tensor:
    return query.new_empty(query.shape[0], query.shape[2], query.shape[1], value.shape[-1])


def _one_query_kernel(key: torch.Tensor) -> bool:
    """Whether single queries over these keys go to the C++ kernel: float32 keys on a CPU where it is built."""
    return ENABLED and key.dtype == torch.float32 and key.device.type == "cpu" and native.load()


def one_query_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, spans: torch.Tensor, scaling: float
) -> torch.Tensor:
    """attention_by_rows for spans of one query each, in C++ (native.py): [batch, heads, queries, dim] ->
    [batch, queries, heads, dim]. Each (row, head) is one loop over its row's keys, so a row's result does not
    depend on the other rows, nor on how the work is split among threads."""
    return torch.ops.xlora_native.one_query_attention(query, key, value, spans, scaling)


def row_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    row_spans: torch.Tensor | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, run in the dtype of the keys (a cache may hold a wider dtype than the
    model: on CPU bf16 models keep float32 keys and values, README "Long sequences"), and row by row when
    the model passes `row_spans` (XLoraModel's cached steps do) on a CPU. Sliding windows and soft-capping
    keep transformers' path."""
    dtype = query.dtype
    # On CUDA the batched kernel stays: cuBLAS picks kernels by shape too, so rows alone would not buy bits.
    by_rows = ENABLED and row_spans is not None and query.device.type == "cpu"
    if not by_rows or kwargs.get("sliding_window") or kwargs.get("softcap") or dropout:
        out, _ = sdpa_attention_forward(
            module, query.to(key.dtype), key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
        return out.to(dtype), None
    scaling = query.shape[-1] ** -0.5 if scaling is None else float(scaling)
    if query.shape[2] == 1 and _one_query_kernel(key):  # a decode step: every row's query in one C++ call
        return one_query_attention(query.to(key.dtype), key, value, row_spans, scaling).to(dtype), None
    return attention_by_rows(query.to(key.dtype), key, value, row_spans, scaling).to(dtype), None


# The attention implementation XLoraModel gives a base model that uses SDPA (same masks as "sdpa").
ROW_SDPA = "sdpa_by_rows"
AttentionInterface.register(ROW_SDPA, row_attention)
AttentionMaskInterface.register(ROW_SDPA, sdpa_mask)
