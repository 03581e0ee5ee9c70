"""Batch-invariant kernels: a token's numerics never depend on what else shares its step.

Two library kernels give a row different bits depending on its neighbours:
  * fp32 GEMM (MKL): rows of an M-row product are computed by a microkernel plus a tail path,
    so a row's result changes with M (measured here: M = 1, 2–3, 5–7 differ from M = 4, 8, …).
    Padding M up to a multiple of the microkernel's rows makes every row take the same path;
    `gemm_row_multiple` finds that multiple on this CPU at first use (4 with AVX-512 MKL).
    Faster where it holds: oneDNN's linear over a weight prepacked once (`PackedLinear`) gives
    every row the same bits for any M (probed at first use by `onednn_rows_invariant`), and
    reads the weight about 2× faster than MKL at decode sizes (M = 4–32: the cost of a step).
  * SDPA: its blocking over queries and keys depends on the query count and the key length,
    and a padded key range changes the result even when masked. `attend_rows` computes every
    token's attention as its own problem (one query row over exactly its visible keys), the same
    call whether the token is decoded, prefilled in a chunk of any size, or follows a cached
    prefix.
INT8 linears need neither: `serve.int8` accumulates exactly in int32.

Written here because no library offers batch-invariant CPU kernels.
"""

from __future__ import annotations

import functools
import logging
import threading
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from serve import paged_attention

if TYPE_CHECKING:
    from serve.llama import AttentionBatch

log = logging.getLogger(__name__)


@functools.cache
def gemm_row_multiple() -> int:
    """Smallest row count m such that an fp32 GEMM row's bits are the same for any M that is
    a multiple of m, wherever the row sits (probed on this CPU's BLAS; 1 if none found)."""
    g = torch.Generator().manual_seed(0)
    k, n = 256, 384
    w, v = torch.randn(n, k, generator=g), torch.randn(k, generator=g)
    for m in (4, 8, 6, 12, 16):
        ref = None
        ok = True
        for rows in (m, 2 * m, 5 * m, 16 * m):
            for pos in (0, rows - 1):
                x = torch.randn(rows, k, generator=g)
                x[pos] = v
                out = F.linear(x, w)[pos]
                ref = out if ref is None else ref
                ok = ok and torch.equal(out, ref)
        if ok:
            log.info("fp32 GEMM rows are batch-invariant at multiples of %d rows", m)
            return m
    log.warning("fp32 GEMM rows are not batch-invariant on this CPU; fp32 logprobs may vary")
    return 1


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """F.linear on x [N, in] with N padded to `gemm_row_multiple()` rows → [N, out]."""
    n, m = x.shape[0], gemm_row_multiple()
    if n % m:
        x = torch.cat((x, x.new_zeros(m - n % m, x.shape[1])))
    return F.linear(x, weight, bias)[:n]


# oneDNN reorders a weight for an expected row count; the probe below checks that the rows'
# bits then do not depend on the actual count. 8 measured as fast as 32 for M = 1..256.
_PACK_ROWS = 8


def _packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None):
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


@functools.cache
def onednn_rows_invariant() -> bool:
    """Whether oneDNN's prepacked fp32 linear gives a row the same bits for every row count and
    position (1..40, 64, 257 rows, a few weight shapes) on this CPU; False without oneDNN."""
    if not torch.backends.mkldnn.is_available():
        return False
    g = torch.Generator().manual_seed(0)
    try:
        for n, k in ((96, 64), (384, 256), (256, 1024)):
            w, v = torch.randn(n, k, generator=g), torch.randn(k, generator=g)
            packed = torch.ops.mkldnn._reorder_linear_weight(w, _PACK_ROWS)
            ref = _packed_linear(v[None], packed, None)[0]
            for rows in (*range(2, 41), 64, 257):
                for pos in {0, rows // 2, rows - 1}:
                    x = torch.randn(rows, k, generator=g)
                    x[pos] = v
                    if not torch.equal(_packed_linear(x, packed, None)[pos], ref):
                        log.info("oneDNN linear rows vary with the row count; using MKL")
                        return False
    except (RuntimeError, AttributeError, NotImplementedError) as e:  # ops missing or refusing
        log.info("oneDNN prepacked linear unavailable (%s); using MKL", e)
        return False
    log.info("fp32 linears: oneDNN prepacked weights (rows batch-invariant)")
    return True


class PackedLinear(nn.Module):
    """An fp32 CPU linear whose weight is prepacked for oneDNN once, at load.

    Built only where `onednn_rows_invariant()` holds, so a row's output never depends on the
    other rows in the call. forward(x [N, in]) → [N, out]. The packed weight is opaque (mkldnn
    layout), so it is a plain attribute: inference only, not in the state dict.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), _PACK_ROWS)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _packed_linear(x, self.packed, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, onednn"


def packable(weight: torch.Tensor) -> bool:
    """An fp32 CPU weight, on a CPU where oneDNN's prepacked linear is batch-invariant."""
    return (
        weight.dtype == torch.float32
        and weight.device.type == "cpu"
        and not weight.is_meta
        and onednn_rows_invariant()
    )


def apply(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`module(x)` for x [N, in], batch-invariant when the module is a plain nn.Linear (a
    PackedLinear or an Int8Linear is invariant already)."""
    if type(module) is torch.nn.Linear:
        return linear(x, module.weight, module.bias)
    return module(x)


_local = threading.local()


def _scratch(kv: torch.Tensor, rows: int) -> torch.Tensor:
    """A contiguous [rows, 2K, hd] view of this thread's reusable gather buffer."""
    buf = getattr(_local, "buf", None)
    # Same dtype, device and row layout, and the same inference-ness (an inference tensor
    # cannot be written outside inference mode, e.g. a direct call in a test).
    fits = buf is not None and (
        (buf.dtype, buf.device, buf.shape[1:], buf.is_inference())
        == (kv.dtype, kv.device, kv.shape[1:], torch.is_inference_mode_enabled())
    )
    if not fits or len(buf) < rows:
        size = max(rows, 2 * len(buf)) if fits else rows  # grow geometrically: few reallocations
        buf = _local.buf = kv.new_empty((size, *kv.shape[1:]))
    return buf[:rows]


def _row_ranges(batch: AttentionBatch, window: int | None):
    """(slot_ids, row_start, row_len): row n's visible keys are
    slot_ids[row_start[n] : row_start[n] + row_len[n]], in position order. Built once per
    step and window (every layer with that window reuses it)."""
    cached = batch.row_ranges.get(window)
    if cached is not None:
        return cached
    pos = batch.positions
    first = torch.zeros_like(pos) if window is None else (pos - window + 1).clamp_(min=0)
    b, offset = batch.num_decode, 0
    parts, bases = [], []
    if b:  # decode row i's slots start at i * width in the flattened table
        width = batch.decode_slots.shape[1]
        parts.append(batch.decode_slots.reshape(-1))
        bases.append(torch.arange(b) * width)
        offset = b * width
    for span in batch.prefills:
        parts.append(span.context_slots)
        bases.append(torch.full((span.num_tokens,), offset))
        offset += len(span.context_slots)
    base = torch.cat(bases)
    ranges = (torch.cat(parts), base + first, pos + 1 - first)
    batch.row_ranges[window] = ranges
    return ranges


def attend_rows(
    q: torch.Tensor, kv: torch.Tensor, batch: AttentionBatch, window: int | None = None
) -> torch.Tensor:
    """Attention of every query row over exactly the keys it sees.

    q [N, H, hd]; kv [slots, 2K, hd] one layer's pool (keys heads 0..K-1, values K..2K-1);
    `batch` says which rows decode and which prefill, and where their contexts sit. A row at
    position p sees positions max(0, p - window + 1)..p (`window` None: all of 0..p), as
    transformers' causal and sliding-window masks. Returns [N, H * hd].

    float32 on CPU goes through the compiled kernel (`serve.paged_attention`): one call for
    all rows, keys read in place, each row computed alone. Otherwise, one SDPA call per row.
    """
    n, heads, hd = q.shape
    if (
        q.dtype == torch.float32
        and kv.dtype == torch.float32
        and kv.device.type == "cpu"
        and kv.is_contiguous()
        and paged_attention.kernel() is not None
    ):
        slot_ids, start, length = _row_ranges(batch, window)
        return paged_attention.attend(q.contiguous(), kv, slot_ids, start, length).view(n, -1)
    kh = kv.shape[1] // 2
    q = q.view(n, 1, kh, heads // kh, hd)  # the heads sharing a KV head act as its query rows
    positions = batch.positions.tolist()
    outs = []

    def attend(i: int, keys_values: torch.Tensor) -> None:
        """Row i over keys_values [L, 2K, hd] (a view: the same layout for every row)."""
        kvt = keys_values.transpose(0, 1)[None]  # [1, 2K, L, hd]
        outs.append(F.scaled_dot_product_attention(q[i], kvt[:, :kh], kvt[:, kh:]))

    def first(p: int) -> int:
        return 0 if window is None else max(0, p - window + 1)

    # One call per row: SDPA's batch entries are not independent (measured: a row's bits
    # change when another sequence of the same length joins its call). A decode row's visible
    # keys are gathered into a per-thread scratch buffer reused by every row and layer: a fresh
    # [B, L, 2K, hd] gather per layer (51 MB at 32 rows of 1,016 tokens on SmolLM2) paid its
    # page faults on every call. SDPA sees the same values in the same layout, so the same bits.
    # A prefill chunk's context is gathered once; each of its rows reads a view of its prefix.
    for i in range(batch.num_decode):
        p = positions[i]
        slots = batch.decode_slots[i, first(p) : p + 1]
        attend(i, torch.index_select(kv, 0, slots, out=_scratch(kv, len(slots))))
    for span in batch.prefills:
        context = kv[span.context_slots]  # [L, 2K, hd]
        for i in range(span.token_start, span.token_start + span.num_tokens):
            attend(i, context[first(positions[i]) : positions[i] + 1])
    return torch.cat(outs).view(n, heads * hd)
