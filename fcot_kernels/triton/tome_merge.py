"""Triton kernels for ToMe bipartite merging, and their launchers.

* ``_tome_rows_kernel``: every token's row times the power of two that brings its largest entry
  into [1, 2) (``reference.unit_scale_rows``, exact) and the inverse norm of that row, in one
  pass over the metric (the torch version took five passes and a copy).
* ``_tome_match_kernel``: one program owns BLOCK_A tokens of set A of one tile and walks set B
  in BLOCK_B tiles, accumulating ``a . b`` over channel chunks with ``tl.dot``, scaling by the
  precomputed inverse norms, then keeps a running (max, argmax) per A row. The ``|A| x |B|``
  score matrix exists only one register tile at a time; the kernel writes ``2 * |A|`` numbers
  per tile.
* ``_tome_merge_kernel``: one program per (output token, channel block) sums its members'
  size-weighted rows in fp32 (members listed CSR-style, in original order, so the sum is
  deterministic and needs no atomics) and divides by their total size.
* ``_tome_unmerge_kernel``: the backward, ``dx_i = size_i / merged_size_o * dy_o``, a gather.

Top-r selection and the output order (a stable sort, a scatter and a cumsum over at most a few
thousand integers per tile) run as torch ops in the launcher, where they are already optimal.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _alloc
from ..dispatch import forced_gpu_configs, triton_interpreter


@triton.jit
def _tome_rows_kernel(
    m_ptr,  # (batch, tokens, C) metric, any strides
    ms_ptr,  # (batch, tokens, C) contiguous, out: every row times its power-of-two scale
    inv_ptr,  # (batch, tokens) fp32, out: 1 / max(|scaled row|, eps)
    stride_mb,
    stride_mt,
    stride_mc,
    tokens,
    C,
    eps,
    SCALE: tl.constexpr,  # False for fp16 metrics (unit_scale_rows leaves them as they are)
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # unit_scale_rows + the inverse norms in one pass over the metric (the second sweep over a
    # row block hits L1/L2): the match then reads scaled rows and one norm per token instead of
    # every program recomputing |b| for every B tile.
    pid = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    rt = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = rt < tokens
    cc = tl.arange(0, BLOCK_C)
    rows = m_ptr + batch * stride_mb + rt.to(tl.int64)[:, None] * stride_mt
    out = ms_ptr + (batch * tokens + rt.to(tl.int64))[:, None] * C
    scale = tl.full((BLOCK_T,), 1.0, tl.float32)
    if SCALE:
        amax = tl.zeros((BLOCK_T,), dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            mask = mask_t[:, None] & (c0 + cc < C)[None, :]
            x = tl.load(rows + (c0 + cc)[None, :] * stride_mc, mask=mask, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
        # 2**(1 - frexp exponent) = 2**(127 - biased exponent), clamped to a normal power of
        # two as unit_scale_rows does (a zero or subnormal max gives 2**126: still exact).
        biased = (amax.to(tl.int32, bitcast=True) >> 23) & 0xFF
        k = tl.minimum(tl.maximum(127 - biased, -126), 126)
        scale = ((k + 127) << 23).to(tl.float32, bitcast=True)
    sq = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        mask = mask_t[:, None] & (c0 + cc < C)[None, :]
        x = tl.load(rows + (c0 + cc)[None, :] * stride_mc, mask=mask, other=0.0).to(tl.float32)
        # Exact (a power of two) then rounded to the metric's dtype, as the reference's multiply.
        xs = (x * scale[:, None]).to(ms_ptr.dtype.element_ty)
        tl.store(out + (c0 + cc)[None, :], xs, mask=mask)
        xf = xs.to(tl.float32)
        sq += tl.sum(xf * xf, axis=1)
    # IEEE sqrt and division: the reference computes the same numbers bit for bit on exact inputs.
    inv = tl.math.div_rn(tl.full((BLOCK_T,), 1.0, tl.float32), tl.maximum(tl.sqrt_rn(sq), eps))
    tl.store(inv_ptr + batch * tokens + rt, inv, mask=mask_t)


@triton.jit
def _tome_match_kernel(
    m_ptr,  # (batch, tokens, C) contiguous, rows scaled by _tome_rows_kernel
    inv_ptr,  # (batch, tokens) fp32 inverse norms of those rows
    score_ptr,  # (batch, n_a) fp32: best cosine similarity of each A token
    index_ptr,  # (batch, n_a) int64: its B-set index
    tokens,
    protected,
    n_a,
    n_b,
    C,
    BLOCK_A: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
    NATIVE_DOT: tl.constexpr,  # fp16/bf16 operands straight into tl.dot (exact products, fp32 sum)
):
    pid_a = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    ra = pid_a * BLOCK_A + tl.arange(0, BLOCK_A)
    mask_a = ra < n_a
    cc = tl.arange(0, BLOCK_C)
    tok_a = (protected + 2 * ra).to(tl.int64)
    a_rows = m_ptr + (batch * tokens + tok_a)[:, None] * C
    inv_a = tl.load(inv_ptr + batch * tokens + tok_a, mask=mask_a, other=0.0)

    best = tl.full((BLOCK_A,), float("-inf"), dtype=tl.float32)
    best_idx = tl.zeros((BLOCK_A,), dtype=tl.int32)
    for b0 in range(0, n_b, BLOCK_B):
        rb = b0 + tl.arange(0, BLOCK_B)
        mask_b = rb < n_b
        tok_b = (protected + 2 * rb + 1).to(tl.int64)
        b_rows = m_ptr + (batch * tokens + tok_b)[:, None] * C
        dot = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            mc = (c0 + cc < C)[None, :]
            a = tl.load(a_rows + (c0 + cc)[None, :], mask=mask_a[:, None] & mc, other=0.0)
            b = tl.load(b_rows + (c0 + cc)[None, :], mask=mask_b[:, None] & mc, other=0.0)
            if NATIVE_DOT:
                dot += tl.dot(a, tl.trans(b))
            else:
                # fp32 operands: "ieee" keeps full precision (TF32 would change the matches).
                dot += tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)), input_precision="ieee")
        inv_b = tl.load(inv_ptr + batch * tokens + tok_b, mask=mask_b, other=0.0)
        s = dot * inv_a[:, None] * inv_b[None, :]
        s = tl.where(mask_b[None, :], s, float("-inf"))
        tile_best = tl.max(s, axis=1)
        tile_idx = tl.argmax(s, axis=1, tie_break_left=True)
        # Strictly greater: on a tie the earlier B tile (the lower index) keeps the match.
        better = tile_best > best
        best = tl.where(better, tile_best, best)
        best_idx = tl.where(better, tile_idx.to(tl.int32) + b0, best_idx)
    tl.store(score_ptr + batch * n_a + ra, best, mask=mask_a)
    tl.store(index_ptr + batch * n_a + ra, best_idx.to(tl.int64), mask=mask_a)


@triton.jit
def _tome_merge_kernel(
    x_ptr,  # (batch, tokens, C), any strides
    size_ptr,  # (batch, tokens) fp32 contiguous
    order_ptr,  # (batch, tokens) int64: input tokens grouped by output token, original order within
    offsets_ptr,  # (batch, tokens_out + 1) int64: where each output token's members start in order
    out_ptr,  # (batch, tokens_out, C) contiguous
    out_size_ptr,  # (batch, tokens_out) fp32
    stride_xb,
    stride_xt,
    stride_xc,
    tokens,
    tokens_out,
    C,
    BLOCK_C: tl.constexpr,
):
    o = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    pid_c = tl.program_id(2)
    cc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = cc < C
    start = tl.load(offsets_ptr + batch * (tokens_out + 1) + o)
    end = tl.load(offsets_ptr + batch * (tokens_out + 1) + o + 1)
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    total = 0.0
    for k in range(start, end):
        i = tl.load(order_ptr + batch * tokens + k)
        s = tl.load(size_ptr + batch * tokens + i)
        row = tl.load(x_ptr + batch * stride_xb + i * stride_xt + cc * stride_xc, mask=mask_c, other=0.0)
        acc += s * row.to(tl.float32)
        total += s
    tl.store(out_ptr + (batch * tokens_out + o) * C + cc, (acc / total).to(out_ptr.dtype.element_ty), mask=mask_c)
    if pid_c == 0:
        tl.store(out_size_ptr + batch * tokens_out + o, total)


@triton.jit
def _tome_unmerge_kernel(
    dy_ptr,  # (batch, tokens_out, C) contiguous
    size_ptr,  # (batch, tokens) fp32
    out_size_ptr,  # (batch, tokens_out) fp32
    source_ptr,  # (batch, tokens) int64
    dx_ptr,  # (batch, tokens, C) contiguous
    tokens,
    tokens_out,
    C,
    BLOCK_C: tl.constexpr,
):
    i = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    cc = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = cc < C
    o = tl.load(source_ptr + batch * tokens + i)
    # The merge is linear given the matching: member i contributes size_i / merged_size_o of it.
    w = tl.load(size_ptr + batch * tokens + i) / tl.load(out_size_ptr + batch * tokens_out + o)
    dy = tl.load(dy_ptr + (batch * tokens_out + o) * C + cc, mask=mask_c, other=0.0).to(tl.float32)
    tl.store(dx_ptr + (batch * tokens + i) * C + cc, (w * dy).to(dx_ptr.dtype.element_ty), mask=mask_c)


def _match_meta(metric: torch.Tensor) -> dict:
    if metric.device.type != "cuda" and not forced_gpu_configs():
        # Interpreter: tl.dot needs >= 16 per dimension; keep tiles small, it is slow.
        return dict(BLOCK_A=16, BLOCK_B=16, BLOCK_C=32, NATIVE_DOT=False, num_warps=1)
    native = metric.dtype != torch.float32 and not triton_interpreter()
    if not native:
        # fp32 (IEEE FMA dots on CUDA cores) is the exact path, not a speed target.
        return dict(BLOCK_A=64, BLOCK_B=64, BLOCK_C=32, NATIVE_DOT=False, num_warps=4)
    # 128 x 128 score tiles: each A chunk fetched from L2 serves 128 B tokens (64 before), so
    # the A re-reads per B sweep halve; wgmma m64n128, fp32 scores in 64 registers per thread.
    return dict(BLOCK_A=128, BLOCK_B=128, BLOCK_C=64, NATIVE_DOT=native, num_warps=8)


def _rows_meta(metric: torch.Tensor) -> dict:
    if metric.device.type != "cuda" and not forced_gpu_configs():
        return dict(BLOCK_T=16, BLOCK_C=32, num_warps=1)
    return dict(BLOCK_T=8, BLOCK_C=256, num_warps=4)


def match(metric: torch.Tensor, protected: int, n_a: int, n_b: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(score (batch, n_a) fp32, index (batch, n_a) int64)``; needs ``n_b >= 1``. Takes the
    metric as it is: the rows are scaled by their power of two (``unit_scale_rows``) and
    normalised by ``_tome_rows_kernel``, not by torch passes."""
    batch, tokens, channels = metric.shape
    scaled = _alloc.empty((batch, tokens, channels), dtype=metric.dtype, device=metric.device)
    inv = _alloc.empty((batch, tokens), dtype=torch.float32, device=metric.device)
    score = _alloc.empty((batch, n_a), dtype=torch.float32, device=metric.device)
    index = _alloc.empty((batch, n_a), dtype=torch.int64, device=metric.device)
    rows_meta = _rows_meta(metric)
    meta = _match_meta(metric)
    with _alloc.device_guard(metric):
        _tome_rows_kernel[(triton.cdiv(tokens, rows_meta["BLOCK_T"]), batch)](
            metric, scaled, inv,
            metric.stride(0), metric.stride(1), metric.stride(2),
            tokens, channels, eps,
            SCALE=metric.dtype != torch.float16, **rows_meta,
        )
        _tome_match_kernel[(triton.cdiv(n_a, meta["BLOCK_A"]), batch)](
            scaled, inv, score, index,
            tokens, protected, n_a, n_b, channels,
            **meta,
        )
    return score, index


def _block_c(x: torch.Tensor, channels: int) -> int:
    cap = 1024 if x.device.type == "cuda" or forced_gpu_configs() else 256
    return min(cap, triton.next_power_of_2(channels))


def merge(
    x: torch.Tensor, size: torch.Tensor, order: torch.Tensor, offsets: torch.Tensor, tokens_out: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(merged (batch, tokens_out, C) in x.dtype, merged_size (batch, tokens_out) fp32)``."""
    batch, tokens, channels = x.shape
    out = _alloc.empty((batch, tokens_out, channels), dtype=x.dtype, device=x.device)
    out_size = _alloc.empty((batch, tokens_out), dtype=torch.float32, device=x.device)
    block_c = _block_c(x, channels)
    grid = (tokens_out, batch, triton.cdiv(channels, block_c))
    with _alloc.device_guard(x):
        _tome_merge_kernel[grid](
            x, size, order, offsets, out, out_size,
            x.stride(0), x.stride(1), x.stride(2),
            tokens, tokens_out, channels,
            BLOCK_C=block_c, num_warps=4 if block_c >= 512 else 1,
        )
    return out, out_size


def unmerge(dy: torch.Tensor, size: torch.Tensor, out_size: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """``dx (batch, tokens, C)`` in dy.dtype: the gradient of the merge with respect to x."""
    dy = dy.contiguous()
    batch, tokens_out, channels = dy.shape
    tokens = source.shape[1]
    dx = _alloc.empty((batch, tokens, channels), dtype=dy.dtype, device=dy.device)
    block_c = _block_c(dy, channels)
    grid = (tokens, batch, triton.cdiv(channels, block_c))
    with _alloc.device_guard(dy):
        _tome_unmerge_kernel[grid](
            dy, size, out_size, source, dx,
            tokens, tokens_out, channels,
            BLOCK_C=block_c, num_warps=4 if block_c >= 512 else 1,
        )
    return dx
