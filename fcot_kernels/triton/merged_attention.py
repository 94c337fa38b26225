"""Triton kernels for size-biased (merging-aware) flash attention, and their launchers.

Forward: one program owns BLOCK_M query rows of one (sequence, query head) and streams the
keys of that sequence in BLOCK_N blocks with an online softmax (FlashAttention-2), so memory
is O(L) and no L_q x L_k tensor exists. The per-key bias ``key_log_size`` and the causal /
length masks are applied to the logits inside the loop. Logits are kept in base 2
(``qk * scale * log2(e)``) so the exponentials are ``exp2``; the saved log-sum-exp ``lse2`` is
in the same base, fp32, one value per (query head, packed query row).

Backward (recompute, no stored P): ``delta = rowsum(dO * O)``; a dK/dV kernel where one program
owns BLOCK_N keys of one KV head and loops over the query heads of its group (the GQA
reduction happens in registers: deterministic, no atomics), also producing the gradient of the
bias; it works on transposed (keys x rows) tiles so every dot runs on wgmma, and the key bias,
the key-end mask and the causal split (only diagonal blocks masked) are decided once per
program, outside the loop. A dQ kernel where one program owns BLOCK_M query rows masks only the
diagonal and ragged key blocks, as the forward does.

Importance: one program owns BLOCK_N keys of one sequence and sums, over every query head and
every requested row, ``P = exp2(s - lse2)`` recomputed from the forward's ``lse2``: the same
normaliser as the output, cost ``H_q * R * L_k * D`` multiply-adds, no L_q x L_k matrix.

Layouts: batched ``(B, L, H, D)`` or packed varlen ``(total, H, D)`` with ``cu_seqlens``; both
go through the same kernels (``VARLEN`` picks where a sequence starts). Head dims that are
not powers of two (80, 96) run with BLOCK_D = 128 and masked loads/stores. All accumulation
(softmax statistics, O, dQ, dK, dV, dbias, importance) is fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _alloc
from .._attention import AttnGeometry
from ..dispatch import forced_gpu_configs, triton_interpreter

_LOG2E = 1.4426950408889634


# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _seq(
    b,  # sequence index
    cu_ptr,  # (B + 1,) int32 cumulative lengths; unused unless VARLEN
    seqlen,  # batched length; unused if VARLEN
    VARLEN: tl.constexpr,
):
    # (packed row of the sequence's first token, its offset along the tensor's token axis, length).
    if VARLEN:
        row0 = tl.load(cu_ptr + b)
        length = tl.load(cu_ptr + b + 1) - row0
        offset = row0
    else:
        row0 = b * seqlen
        length = seqlen + b * 0
        offset = b * 0
    return row0, offset, length


@triton.jit
def _logits(
    q,  # (BLOCK_M, BLOCK_D)
    k,  # (BLOCK_N, BLOCK_D)
    bias_ptr,  # bias of this sequence's first key; unused unless HAS_BIAS
    rows,  # (BLOCK_M,) query positions in the sequence
    cols,  # (BLOCK_N,) key positions in the sequence
    row_ok,  # (BLOCK_M,) rows that exist
    len_k,
    diag,  # L_k - L_q: causal masking aligned to the bottom-right corner
    qk_scale,  # scale * log2(e)
    HAS_BIAS: tl.constexpr,
    CAUSAL: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # Base-2 logits with -inf where a key is past the end or in the causal future.
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    col_ok = cols < len_k
    if HAS_BIAS:
        kb = tl.load(bias_ptr + cols, mask=col_ok, other=0.0)
        s += kb[None, :] * 1.4426950408889634
    valid = row_ok[:, None] & col_ok[None, :]
    if CAUSAL:
        valid = valid & (cols[None, :] <= rows[:, None] + diag)
    return tl.where(valid, s, float("-inf"))


@triton.jit
def _fwd_step(
    acc, m_i, l_i,  # running output, max and sum (online softmax)
    q, k_base, v_base, bias_base,
    rows, cols, offs_d, d_ok, row_ok,
    len_k, diag, qk_scale, stride_kn, stride_vn,
    HAS_BIAS: tl.constexpr,
    CAUSAL: tl.constexpr,
    PRECISION: tl.constexpr,
    MASKED: tl.constexpr,  # False: every key of the block exists and is visible to every row
):
    if MASKED:
        kv_mask = (cols < len_k)[:, None] & d_ok[None, :]
    else:
        kv_mask = (cols >= 0)[:, None] & d_ok[None, :]  # d_ok only (folds away when BLOCK_D == D)
    k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
    if MASKED:
        s = _logits(q, k, bias_base, rows, cols, row_ok, len_k, diag, qk_scale, HAS_BIAS, CAUSAL, PRECISION)
    else:
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if HAS_BIAS:
            s += tl.load(bias_base + cols)[None, :] * 1.4426950408889634
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    # A row with no visible key yet keeps m = -inf; subtract 0 there so exp2 gives 0, not NaN.
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def _fwd_kernel(
    q_ptr,  # (B, L_q, H_q, D) or (total_q, H_q, D)
    k_ptr,  # (B, L_k, H_kv, D) or (total_k, H_kv, D)
    v_ptr,  # like k
    bias_ptr,  # (B, L_k) or (total_k,) fp32; unused unless HAS_BIAS
    out_ptr,  # like q, contiguous
    lse_ptr,  # (H_q, total_q) fp32, base 2
    cu_q_ptr,  # (B + 1,) int32; unused unless VARLEN
    cu_k_ptr,  # (B + 1,) int32; unused unless VARLEN
    stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_ob, stride_om, stride_oh,
    stride_bias_b,  # L_k batched, 0 varlen
    seqlen_q,
    seqlen_k,
    total_q,
    heads_q,
    group,  # H_q / H_kv
    head_dim,
    qk_scale,
    HAS_BIAS: tl.constexpr,
    CAUSAL: tl.constexpr,
    VARLEN: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    if CAUSAL:
        # The last query blocks see the most keys: launch them first, so the short blocks fill
        # the tail of the schedule instead of the long ones.
        pid_m = tl.num_programs(0) - 1 - pid_m
    pid_bh = tl.program_id(1)
    b = pid_bh // heads_q
    h = pid_bh % heads_q
    hk = h // group
    q_row0, q_off, len_q = _seq(b, cu_q_ptr, seqlen_q, VARLEN)
    k_row0, k_off, len_k = _seq(b, cu_k_ptr, seqlen_k, VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= len_q:
        return
    rows = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < len_q
    d_ok = offs_d < head_dim
    b64 = b.to(tl.int64)
    q_base = q_ptr + b64 * stride_qb + q_off.to(tl.int64) * stride_qm + h * stride_qh
    k_base = k_ptr + b64 * stride_kb + k_off.to(tl.int64) * stride_kn + hk * stride_kh
    v_base = v_ptr + b64 * stride_vb + k_off.to(tl.int64) * stride_vn + hk * stride_vh
    bias_base = bias_ptr + b64 * stride_bias_b + k_off
    q = tl.load(q_base + rows[:, None] * stride_qm + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    diag = len_k - len_q
    hi = len_k
    # Key blocks [0, full) need no mask: every key exists and (causal) is visible to every row
    # of this block (key <= m0 + diag). Only the blocks from `full` on (the causal diagonal and
    # the ragged end of the keys) pay for the mask.
    full = (len_k // BLOCK_N) * BLOCK_N
    if CAUSAL:
        # Key blocks entirely in the future of every row of this block are never visited.
        hi = tl.minimum(len_k, m0 + BLOCK_M + diag)
        full = tl.minimum(full, tl.maximum(m0 + diag + 1, 0) // BLOCK_N * BLOCK_N)
    full = tl.minimum(full, hi)
    for n0 in range(0, full, BLOCK_N):
        acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, k_base, v_base, bias_base, rows, n0 + offs_n, offs_d, d_ok, row_ok,
                                  len_k, diag, qk_scale, stride_kn, stride_vn, HAS_BIAS, CAUSAL, PRECISION, False)
    for n0 in range(full, hi, BLOCK_N):
        acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, k_base, v_base, bias_base, rows, n0 + offs_n, offs_d, d_ok, row_ok,
                                  len_k, diag, qk_scale, stride_kn, stride_vn, HAS_BIAS, CAUSAL, PRECISION, True)
    # Rows that see no key at all (causal with L_q > L_k) output 0 and lse = +inf, so the
    # backward and the importance recompute P = exp2(s - inf) = 0 for them (as flash-attn).
    # Decided by position, not by l_i: a row that sees keys but whose logits are all -inf (a
    # non-finite q or k) gets 0/0 = NaN, the NaN policy of every backend.
    if CAUSAL:
        has_key = row_ok & (rows + diag >= 0) & (len_k > 0)
    else:
        has_key = row_ok & (len_k > 0)
    out = acc / tl.where(has_key, l_i, 1.0)[:, None]
    lse = tl.where(has_key, m_i + tl.math.log2(tl.where(has_key, l_i, 1.0)), float("inf"))
    o_base = out_ptr + b64 * stride_ob + q_off.to(tl.int64) * stride_om + h * stride_oh
    tl.store(o_base + rows[:, None] * stride_om + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])
    tl.store(lse_ptr + h.to(tl.int64) * total_q + q_row0 + rows, lse, mask=row_ok)


@triton.jit
def _bwd_delta_kernel(
    out_ptr,  # (B, L_q, H_q, D) or (total_q, H_q, D), contiguous
    do_ptr,  # like out, contiguous
    delta_ptr,  # (H_q, total_q) fp32
    total_q,
    heads_q,
    head_dim,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # delta = rowsum(dO * O): the softmax-gradient correction, once per (head, row).
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    h = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (rows < total_q)[:, None] & (offs_d < head_dim)[None, :]
    offs = (rows.to(tl.int64)[:, None] * heads_q + h) * head_dim + offs_d[None, :]
    o = tl.load(out_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(do_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(delta_ptr + h.to(tl.int64) * total_q + rows, tl.sum(o * do, axis=1), mask=rows < total_q)


@triton.jit
def _dkdv_step(
    dk, dv, dbias,  # (BLOCK_N, BLOCK_D) fp32 accumulators, (BLOCK_N,) fp32
    k, v,  # (BLOCK_N, BLOCK_D) this program's keys and values
    key_term,  # (BLOCK_N,) fp32: base-2 bias of each key, -inf past the end (hoisted)
    q_base, do_base, lse_ptr, delta_ptr, stat_base,
    m0,
    mid,  # causal: query blocks from here on see every key of the program (no mask)
    offs_m, offs_d, d_ok, cols, len_q, diag, qk_scale, stride_qm, stride_dom,
    BIAS_GRAD: tl.constexpr,
    CAUSAL: tl.constexpr,
    PRECISION: tl.constexpr,
):
    rows = m0 + offs_m
    row_ok = rows < len_q
    q_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(q_base + rows[:, None] * stride_qm + offs_d[None, :], mask=q_mask, other=0.0)
    do = tl.load(do_base + rows[:, None] * stride_dom + offs_d[None, :], mask=q_mask, other=0.0)
    # Rows past the end read lse = +inf, so their P is exactly 0 without a row mask.
    lse = tl.load(lse_ptr + stat_base + rows, mask=row_ok, other=float("inf"))
    delta = tl.load(delta_ptr + stat_base + rows, mask=row_ok, other=0.0)
    # Transposed (keys x rows), as the importance kernel: every dot's M is BLOCK_N keys, so all
    # four compile to wgmma whatever BLOCK_M is, and P^T / dS^T feed the dK/dV dots from
    # registers without a transpose.
    st = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale + key_term[:, None]
    if CAUSAL:
        if m0 < mid:  # the diagonal blocks only
            st = tl.where(cols[:, None] <= rows[None, :] + diag, st, float("-inf"))
    pt = tl.math.exp2(st - lse[None, :])  # (BLOCK_N, BLOCK_M); 0 where masked
    dv += tl.dot(pt.to(do.dtype), do, input_precision=PRECISION)
    dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
    dst = pt * (dpt - delta[None, :])  # gradient of the natural-base logits
    dk += tl.dot(dst.to(q.dtype), q, input_precision=PRECISION)
    if BIAS_GRAD:
        dbias += tl.sum(dst, axis=1)
    return dk, dv, dbias


@triton.jit
def _bwd_dkdv_kernel(
    q_ptr,  # (B, L_q, H_q, D) or (total_q, H_q, D)
    k_ptr,  # (B, L_k, H_kv, D) or (total_k, H_kv, D)
    v_ptr,  # like k
    bias_ptr,  # (B, L_k) or (total_k,) fp32; unused unless HAS_BIAS
    do_ptr,  # like q, contiguous
    lse_ptr,  # (H_q, total_q) fp32, base 2
    delta_ptr,  # (H_q, total_q) fp32
    dk_ptr,  # like k, contiguous
    dv_ptr,  # like k, contiguous
    dbias_ptr,  # (H_kv, total_k) fp32 partial sums; unused unless BIAS_GRAD
    cu_q_ptr,
    cu_k_ptr,
    stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_dob, stride_dom, stride_doh,
    stride_dkb, stride_dkn, stride_dkh,
    stride_bias_b,
    seqlen_q,
    seqlen_k,
    total_q,
    total_k,
    heads_kv,
    group,
    head_dim,
    scale,
    qk_scale,
    HAS_BIAS: tl.constexpr,
    BIAS_GRAD: tl.constexpr,
    CAUSAL: tl.constexpr,
    VARLEN: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // heads_kv
    hk = pid_bh % heads_kv
    q_row0, q_off, len_q = _seq(b, cu_q_ptr, seqlen_q, VARLEN)
    k_row0, k_off, len_k = _seq(b, cu_k_ptr, seqlen_k, VARLEN)
    n0 = pid_n * BLOCK_N
    if n0 >= len_k:
        return
    cols = n0 + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = cols < len_k
    d_ok = offs_d < head_dim
    kv_mask = col_ok[:, None] & d_ok[None, :]
    b64 = b.to(tl.int64)
    k_base = k_ptr + b64 * stride_kb + k_off.to(tl.int64) * stride_kn + hk * stride_kh
    v_base = v_ptr + b64 * stride_vb + k_off.to(tl.int64) * stride_vn + hk * stride_vh
    bias_base = bias_ptr + b64 * stride_bias_b + k_off
    k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
    # The key-only part of the logits, once per program instead of once per query block: the
    # base-2 bias, and -inf for keys past the end (so no key mask inside the loop).
    key_term = tl.where(col_ok, 0.0, float("-inf"))
    if HAS_BIAS:
        key_term += tl.load(bias_base + cols, mask=col_ok, other=0.0) * 1.4426950408889634
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dbias = tl.zeros([BLOCK_N], dtype=tl.float32)
    diag = len_k - len_q
    lo = 0
    mid = 0
    if CAUSAL:
        # The first query row that sees key n0 is n0 - diag; earlier query blocks are skipped.
        lo = tl.maximum(0, n0 - diag) // BLOCK_M * BLOCK_M
        # Query blocks from `mid` on see every key of this block (row m0 >= last key - diag):
        # only [lo, mid), the diagonal, pays for the causal mask.
        mid = tl.maximum(lo, tl.cdiv(tl.maximum(0, n0 + BLOCK_N - 1 - diag), BLOCK_M) * BLOCK_M)
    # GQA: every query head of this KV head's group adds into the same dK/dV registers.
    for g in range(group):
        h = hk * group + g
        q_base = q_ptr + b64 * stride_qb + q_off.to(tl.int64) * stride_qm + h * stride_qh
        do_base = do_ptr + b64 * stride_dob + q_off.to(tl.int64) * stride_dom + h * stride_doh
        stat_base = h.to(tl.int64) * total_q + q_row0
        for m0 in range(lo, len_q, BLOCK_M):
            dk, dv, dbias = _dkdv_step(dk, dv, dbias, k, v, key_term, q_base, do_base, lse_ptr, delta_ptr, stat_base,
                                       m0, mid, offs_m, offs_d, d_ok, cols, len_q, diag, qk_scale, stride_qm, stride_dom,
                                       BIAS_GRAD, CAUSAL, PRECISION)
    dk_base = dk_ptr + b64 * stride_dkb + k_off.to(tl.int64) * stride_dkn + hk * stride_dkh
    dv_base = dv_ptr + b64 * stride_dkb + k_off.to(tl.int64) * stride_dkn + hk * stride_dkh
    offs = cols[:, None] * stride_dkn + offs_d[None, :]
    tl.store(dk_base + offs, (dk * scale).to(dk_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(dv_base + offs, dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)
    if BIAS_GRAD:
        tl.store(dbias_ptr + hk.to(tl.int64) * total_k + k_row0 + cols, dbias, mask=col_ok)


@triton.jit
def _bwd_dq_kernel(
    q_ptr,  # (B, L_q, H_q, D) or (total_q, H_q, D)
    k_ptr,  # (B, L_k, H_kv, D) or (total_k, H_kv, D)
    v_ptr,  # like k
    bias_ptr,  # (B, L_k) or (total_k,) fp32; unused unless HAS_BIAS
    do_ptr,  # like q, contiguous
    lse_ptr,  # (H_q, total_q) fp32, base 2
    delta_ptr,  # (H_q, total_q) fp32
    dq_ptr,  # like do, contiguous
    cu_q_ptr,
    cu_k_ptr,
    stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_dob, stride_dom, stride_doh,
    stride_bias_b,
    seqlen_q,
    seqlen_k,
    total_q,
    heads_q,
    group,
    head_dim,
    scale,
    qk_scale,
    HAS_BIAS: tl.constexpr,
    CAUSAL: tl.constexpr,
    VARLEN: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // heads_q
    h = pid_bh % heads_q
    hk = h // group
    q_row0, q_off, len_q = _seq(b, cu_q_ptr, seqlen_q, VARLEN)
    k_row0, k_off, len_k = _seq(b, cu_k_ptr, seqlen_k, VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= len_q:
        return
    rows = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < len_q
    d_ok = offs_d < head_dim
    q_mask = row_ok[:, None] & d_ok[None, :]
    b64 = b.to(tl.int64)
    q_base = q_ptr + b64 * stride_qb + q_off.to(tl.int64) * stride_qm + h * stride_qh
    do_base = do_ptr + b64 * stride_dob + q_off.to(tl.int64) * stride_dom + h * stride_doh
    k_base = k_ptr + b64 * stride_kb + k_off.to(tl.int64) * stride_kn + hk * stride_kh
    v_base = v_ptr + b64 * stride_vb + k_off.to(tl.int64) * stride_vn + hk * stride_vh
    bias_base = bias_ptr + b64 * stride_bias_b + k_off
    q = tl.load(q_base + rows[:, None] * stride_qm + offs_d[None, :], mask=q_mask, other=0.0)
    do = tl.load(do_base + rows[:, None] * stride_dom + offs_d[None, :], mask=q_mask, other=0.0)
    stat_base = h.to(tl.int64) * total_q + q_row0
    lse = tl.load(lse_ptr + stat_base + rows, mask=row_ok, other=float("inf"))
    delta = tl.load(delta_ptr + stat_base + rows, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    diag = len_k - len_q
    hi = len_k
    if CAUSAL:
        hi = tl.minimum(len_k, m0 + BLOCK_M + diag)
    # Key blocks [0, full) need no mask (every key exists and, causal, is visible to every row
    # of this block): only the diagonal and the ragged end pay for the 2-D mask. Rows past the
    # end read lse = +inf, so their P is 0 without a row mask.
    full = (len_k // BLOCK_N) * BLOCK_N
    if CAUSAL:
        full = tl.minimum(full, tl.maximum(m0 + diag + 1, 0) // BLOCK_N * BLOCK_N)
    for n0 in range(0, hi, BLOCK_N):
        cols = n0 + offs_n
        col_ok = cols < len_k
        kv_mask = col_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if HAS_BIAS:
            s += tl.load(bias_base + cols, mask=col_ok, other=0.0)[None, :] * 1.4426950408889634
        if n0 >= full:
            valid = col_ok[None, :]
            if CAUSAL:
                valid = valid & (cols[None, :] <= rows[:, None] + diag)
            s = tl.where(valid, s, float("-inf"))
        p = tl.math.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    dq_base = dq_ptr + b64 * stride_dob + q_off.to(tl.int64) * stride_dom + h * stride_doh
    tl.store(dq_base + rows[:, None] * stride_dom + offs_d[None, :], (dq * scale).to(dq_ptr.dtype.element_ty),
             mask=q_mask)


@triton.jit
def _importance_kernel(
    q_ptr,  # (B, L_q, H_q, D) or (total_q, H_q, D)
    k_ptr,  # (B, L_k, H_kv, D) or (total_k, H_kv, D)
    bias_ptr,  # (B, L_k) or (total_k,) fp32; unused unless HAS_BIAS
    lse_ptr,  # (H_q, total_q) fp32, base 2, from the forward
    rows_ptr,  # (B, R) int32 query positions, already in [0, L_q(b))
    imp_ptr,  # (B, L_k) or (total_k,) fp32
    cu_q_ptr,
    cu_k_ptr,
    stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_bias_b,  # also the sequence stride of imp
    seqlen_q,
    seqlen_k,
    total_q,
    n_rows,  # R
    heads_kv,
    group,
    head_dim,
    qk_scale,
    inv_count,  # 1 / (H_q * R)
    HAS_BIAS: tl.constexpr,
    CAUSAL: tl.constexpr,
    VARLEN: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    b = tl.program_id(1)
    q_row0, q_off, len_q = _seq(b, cu_q_ptr, seqlen_q, VARLEN)
    k_row0, k_off, len_k = _seq(b, cu_k_ptr, seqlen_k, VARLEN)
    n0 = pid_n * BLOCK_N
    if n0 >= len_k:
        return
    cols = n0 + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = cols < len_k
    d_ok = offs_d < head_dim
    b64 = b.to(tl.int64)
    bias_base = bias_ptr + b64 * stride_bias_b + k_off
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    diag = len_k - len_q
    # One pass per (KV head, query head of its group, block of rows): the K block is loaded
    # once per KV head and the scores never leave registers.
    if HAS_BIAS:
        kb = tl.load(bias_base + cols, mask=col_ok, other=0.0)
    for hk in range(heads_kv):
        k_base = k_ptr + b64 * stride_kb + k_off.to(tl.int64) * stride_kn + hk * stride_kh
        k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :], mask=col_ok[:, None] & d_ok[None, :],
                    other=0.0)
        for g in range(group):
            h = hk * group + g
            q_base = q_ptr + b64 * stride_qb + q_off.to(tl.int64) * stride_qm + h * stride_qh
            for r0 in range(0, n_rows, BLOCK_R):
                r_ok = r0 + offs_r < n_rows
                rows = tl.load(rows_ptr + b64 * n_rows + r0 + offs_r, mask=r_ok, other=0)
                q = tl.load(q_base + rows[:, None] * stride_qm + offs_d[None, :],
                            mask=r_ok[:, None] & d_ok[None, :], other=0.0)
                lse = tl.load(lse_ptr + h.to(tl.int64) * total_q + q_row0 + rows, mask=r_ok, other=float("inf"))
                # Transposed logits (keys x rows): the dot's M is BLOCK_N = 64 keys, not the
                # 16 scored rows, so it compiles to wgmma (M >= 64) instead of mma.sync.
                st = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
                if HAS_BIAS:
                    st += kb[:, None] * 1.4426950408889634
                valid = col_ok[:, None] & r_ok[None, :]
                if CAUSAL:
                    valid = valid & (cols[:, None] <= rows[None, :] + diag)
                st = tl.where(valid, st, float("-inf"))
                acc += tl.sum(tl.math.exp2(st - lse[None, :]), axis=1)
    tl.store(imp_ptr + b64 * stride_bias_b + k_off + cols, acc * inv_count, mask=col_ok)


# ---------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _precision(x: torch.Tensor) -> str:
    # fp32 inputs: exact fp32 products (tests compare with an fp32 reference); fp16/bf16: tensor cores.
    return "ieee" if x.dtype == torch.float32 else "tf32"


def _config(kind: str, geom: AttnGeometry, dtype: torch.dtype) -> dict:
    """Block sizes per kernel (not tuned on a GPU yet: see docs/kernels.md). Under the
    interpreter: 16 (the smallest tl.dot tile), so tiny test shapes still cover several blocks
    and the masked tails."""
    if triton_interpreter() and not forced_gpu_configs():
        return dict(BLOCK_N=16) if kind == "importance" else dict(BLOCK_M=16, BLOCK_N=16)
    if kind == "importance":
        return dict(BLOCK_N=64, num_warps=8, num_stages=2)
    if dtype == torch.float32:
        # fp32 runs for tests only (IEEE dots on CUDA cores, which need many registers): 32 x 16
        # tiles, 2 cp.async stages. Forward, dQ and importance compile without spills; dK/dV
        # still spills (~370 B; allow-listed in tests/compile_triton_sm90.py).
        return dict(BLOCK_M=32, BLOCK_N=16, num_warps=8, num_stages=2)
    # Chosen so that sm_90 compiles without register spills (checked with cuobjdump -res-usage).
    wide = _block_d(geom.head_dim) > 64
    if kind == "fwd":
        # 128 query rows amortise each K/V block; 128 keys halve the loop's trips and online-
        # softmax rescales (wgmma m64n128, no spills at 255 registers, 1 block/SM, 161 KiB of
        # K/V stages). Varlen's extra sequence bookkeeping spills 8 B at 128 keys: it keeps 64.
        block_n = 64 if geom.varlen else 128
        return dict(BLOCK_M=128, BLOCK_N=block_n, num_warps=8, num_stages=2 if wide else 3)
    if kind == "dkdv":
        # dK and dV accumulators (2 x BLOCK_N x BLOCK_D fp32) live in registers for the whole
        # loop. The step computes the logits transposed (keys x rows), so each dot's M is the
        # keys: wgmma at any BLOCK_M. d > 64: 128 keys x 32 query rows, 234-254 registers
        # without spills under Triton 3.6 and 3.9 (64 x 64 spilled 4-24 B; 64 keys x 32 rows
        # split the S/dP dots over the two warpgroups as m64n16). d = 64: 64 keys, 4 warps.
        return dict(BLOCK_M=32, BLOCK_N=128 if wide else 64, num_warps=8 if wide else 4, num_stages=2)
    # dQ: 128 query rows x 64 keys (wgmma m64n64 for S/dP, m64n128 for dQ at d = 128; the
    # 64 x 32 tiles before ran n = 32/16 instructions), 210-228 registers, no spills.
    return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2)


def _strides(t: torch.Tensor, varlen: bool) -> tuple[int, int, int]:
    # (sequence, token, head) strides; a packed varlen tensor has no sequence axis.
    if varlen:
        return 0, t.stride(0), t.stride(1)
    return t.stride(0), t.stride(1), t.stride(2)


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    # The kernels take any token/head strides but need contiguous head_dim for vector loads.
    return t if t.stride(-1) == 1 else t.contiguous()


def _dummy(x: torch.Tensor) -> torch.Tensor:
    return torch.empty(1, dtype=torch.int32, device=x.device)


def _common(q, k, v, bias, cu_q, cu_k, geom: AttnGeometry):
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    has_bias = bias is not None
    bias = bias.contiguous() if has_bias else torch.empty(1, dtype=torch.float32, device=q.device)
    cu_q = cu_q.contiguous() if geom.varlen else _dummy(q)
    cu_k = cu_k.contiguous() if geom.varlen else _dummy(q)
    stride_bias_b = 0 if geom.varlen else geom.seqlen_k
    return q, k, v, bias, has_bias, cu_q, cu_k, stride_bias_b


def forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    cu_q: torch.Tensor | None,
    cu_k: torch.Tensor | None,
    geom: AttnGeometry,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``out`` (q's shape, contiguous, q.dtype) and ``lse2`` ``(H_q, total_q)`` fp32 (base 2)."""
    q, k, v, bias, has_bias, cu_q, cu_k, stride_bias_b = _common(q, k, v, bias, cu_q, cu_k, geom)
    out = _alloc.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = _alloc.empty((geom.heads_q, geom.total_q), dtype=torch.float32, device=q.device)
    cfg = _config("fwd", geom, q.dtype)
    grid = (triton.cdiv(geom.seqlen_q, cfg["BLOCK_M"]), geom.batch * geom.heads_q)
    with _alloc.device_guard(q):
        _fwd_kernel[grid](
            q, k, v, bias, out, lse, cu_q, cu_k,
            *_strides(q, geom.varlen), *_strides(k, geom.varlen), *_strides(v, geom.varlen), *_strides(out, geom.varlen),
            stride_bias_b, geom.seqlen_q, geom.seqlen_k, geom.total_q, geom.heads_q, geom.group, geom.head_dim,
            scale * _LOG2E,
            HAS_BIAS=has_bias, CAUSAL=causal, VARLEN=geom.varlen, PRECISION=_precision(q),
            BLOCK_D=_block_d(geom.head_dim), **cfg,
        )
    return out, lse


def backward(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_q: torch.Tensor | None,
    cu_k: torch.Tensor | None,
    geom: AttnGeometry,
    causal: bool,
    scale: float,
    bias_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Returns ``dq``, ``dk``, ``dv`` (contiguous, input dtypes) and, when ``bias_grad``, the fp32
    gradient of the key bias in the bias layout (``(B, L_k)`` or ``(total_k,)``)."""
    q, k, v, bias, has_bias, cu_q, cu_k, stride_bias_b = _common(q, k, v, bias, cu_q, cu_k, geom)
    do = do.contiguous()
    out = out.contiguous()
    bias_grad = bias_grad and has_bias
    block_d = _block_d(geom.head_dim)
    precision = _precision(q)
    delta = torch.empty((geom.heads_q, geom.total_q), dtype=torch.float32, device=q.device)
    dm = 16 if triton_interpreter() and not forced_gpu_configs() else 64
    with _alloc.device_guard(out):
        _bwd_delta_kernel[(triton.cdiv(geom.total_q, dm), geom.heads_q)](
            out, do, delta, geom.total_q, geom.heads_q, geom.head_dim, BLOCK_M=dm, BLOCK_D=block_d,
        )
    dq = _alloc.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = _alloc.empty(k.shape, dtype=k.dtype, device=q.device)
    dv = _alloc.empty(v.shape, dtype=v.dtype, device=q.device)
    # Per-KV-head partial sums of the bias gradient (each KV-head program owns its own row).
    dbias = (_alloc.empty((geom.heads_kv, geom.total_k), dtype=torch.float32, device=q.device)
             if bias_grad else torch.empty(1, dtype=torch.float32, device=q.device))
    flags = dict(HAS_BIAS=has_bias, CAUSAL=causal, VARLEN=geom.varlen, PRECISION=precision, BLOCK_D=block_d)
    qs, ks, vs, dos = (_strides(t, geom.varlen) for t in (q, k, v, do))
    cfg = _config("dkdv", geom, q.dtype)
    with _alloc.device_guard(q):
        _bwd_dkdv_kernel[(triton.cdiv(geom.seqlen_k, cfg["BLOCK_N"]), geom.batch * geom.heads_kv)](
            q, k, v, bias, do, lse, delta, dk, dv, dbias, cu_q, cu_k,
            *qs, *ks, *vs, *dos, *_strides(dk, geom.varlen), stride_bias_b,
            geom.seqlen_q, geom.seqlen_k, geom.total_q, geom.total_k, geom.heads_kv, geom.group, geom.head_dim,
            scale, scale * _LOG2E, BIAS_GRAD=bias_grad, **flags, **cfg,
        )
    cfg = _config("dq", geom, q.dtype)
    with _alloc.device_guard(q):
        _bwd_dq_kernel[(triton.cdiv(geom.seqlen_q, cfg["BLOCK_M"]), geom.batch * geom.heads_q)](
            q, k, v, bias, do, lse, delta, dq, cu_q, cu_k,
            *qs, *ks, *vs, *dos, stride_bias_b,
            geom.seqlen_q, geom.seqlen_k, geom.total_q, geom.heads_q, geom.group, geom.head_dim,
            scale, scale * _LOG2E, **flags, **cfg,
        )
    if not bias_grad:
        return dq, dk, dv, None
    dbias = dbias.sum(0)
    return dq, dk, dv, dbias.view(geom.bias_shape)


def importance(
    q: torch.Tensor,
    k: torch.Tensor,
    bias: torch.Tensor | None,
    lse: torch.Tensor,
    rows: torch.Tensor,
    cu_q: torch.Tensor | None,
    cu_k: torch.Tensor | None,
    geom: AttnGeometry,
    causal: bool,
    scale: float,
) -> torch.Tensor:
    """Mean over query heads and the ``rows`` ``(B, R)`` (int32, in range) of the attention
    probabilities to every key; fp32 in the bias layout (``(B, L_k)`` or ``(total_k,)``)."""
    q, k, _, bias, has_bias, cu_q, cu_k, stride_bias_b = _common(q, k, k, bias, cu_q, cu_k, geom)
    rows = rows.to(torch.int32).contiguous()
    n_rows = rows.shape[1]
    imp = _alloc.empty(geom.bias_shape, dtype=torch.float32, device=q.device)
    cfg = _config("importance", geom, q.dtype)
    block_r = 16 if triton_interpreter() and not forced_gpu_configs() else min(64, max(16, triton.next_power_of_2(n_rows)))
    with _alloc.device_guard(q):
        _importance_kernel[(triton.cdiv(geom.seqlen_k, cfg["BLOCK_N"]), geom.batch)](
            q, k, bias, lse, rows, imp, cu_q, cu_k,
            *_strides(q, geom.varlen), *_strides(k, geom.varlen), stride_bias_b,
            geom.seqlen_q, geom.seqlen_k, geom.total_q, n_rows, geom.heads_kv, geom.group, geom.head_dim,
            scale * _LOG2E, 1.0 / (geom.heads_q * n_rows),
            HAS_BIAS=has_bias, CAUSAL=causal, VARLEN=geom.varlen, PRECISION=_precision(q),
            BLOCK_R=block_r, BLOCK_D=_block_d(geom.head_dim), **cfg,
        )
    return imp
