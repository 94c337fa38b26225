"""Triton kernel for the fused linear distillation loss, and the chunked launcher around it.

The launcher walks the tokens in chunks of ``chunk`` rows. For each chunk it forms the student
and teacher logits with two torch matmuls into reused ``(chunk, V)`` buffers, runs ONE kernel
over them that computes the divergence, the cross-entropy and d(loss)/d(student logits)
(written over the student logits in place), then folds that gradient into d(hidden) (a matmul
into the chunk's rows), d(weight) and d(bias) (fp32 accumulators). So the forward returns the
finished gradients, the backward only scales them by the upstream gradient, and no tensor of
N * V elements ever exists.

Inside the kernel a program owns BLOCK_R rows and walks the vocabulary in BLOCK_V blocks:
pass 1 keeps an online log-sum-exp (running max and rescaled sum) for the teacher at T, the
student at T and, for cross-entropy at T != 1, the student at T = 1; pass 2 computes the row's
divergence and cross-entropy and, for the forward KL, the gradient; pass 3 (reverse KL and
JSD only, whose gradient needs a row sum of pass 2) writes the gradient. All math is fp32.

With ``kl_weight == 0`` (cross-entropy only, stage 2's SFT loss) no teacher work is done: the
launcher forms no teacher logits (no teacher GEMM, no teacher buffer) and the kernel, specialised
by ``HAS_KL``, reads no teacher row and computes only the student's T = 1 log-sum-exp, the
target logit and softmax - one-hot.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .. import _alloc
from ..dispatch import forced_gpu_configs

DIV_CODES = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2}

LOGITS_BUDGET = 1 << 28
"""Default chunk: the largest power of two with chunk * V <= this many logits per buffer. Each
chunk re-reads and re-writes the fp32 d(weight) accumulator (6 bytes per head element with a
bf16 temporary), so larger chunks amortise it: 2048 rows at V = 92553 (about 9 % of the GEMM
time at the H100's balance point, estimated), for 0.76 GB of bf16 chunk logits."""


@triton.jit
def _fld_kernel(
    zs_ptr,  # (R, V) student logits, row stride stride_s; overwritten by d(loss)/d(logits) if COMPUTE_GRAD
    zt_ptr,  # (R, V) teacher logits, row stride stride_t; unused unless HAS_KL
    labels_ptr,  # (R,) integer labels; unused unless HAS_LABELS
    count_ptr,  # (1,) int64 counted tokens in the whole batch; unused unless MEAN
    loss_ptr,  # (R,) fp32 weighted loss of each row
    R,
    V,
    VP,  # V rounded up to 16 when both row strides leave room: loads are masked by VP (16-byte vectors)
    stride_s,
    stride_t,
    inv_t,  # 1 / temperature
    kl_scale,  # kl_weight * temperature**2
    ce_scale,  # ce_weight
    beta,
    log_beta,  # log(beta), -inf at beta = 0
    log_1mbeta,  # log(1 - beta), -inf at beta = 1
    ignore_index,
    DIV: tl.constexpr,  # 0 forward KL, 1 reverse KL, 2 JSD
    HAS_KL: tl.constexpr,  # False: cross-entropy only, the teacher is never read
    HAS_LABELS: tl.constexpr,
    HAS_CE: tl.constexpr,
    CE_LSE: tl.constexpr,  # cross-entropy needs its own T = 1 log-sum-exp (temperature != 1, or no KL)
    MEAN: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    # Rows past the end re-read the last row: every load stays finite and stores are masked.
    rows_c = tl.minimum(rows, R - 1).to(tl.int64)
    cols0 = tl.arange(0, BLOCK_V)
    s_base = zs_ptr + rows_c[:, None] * stride_s
    t_base = zt_ptr + rows_c[:, None] * stride_t
    if HAS_LABELS:
        lab = tl.load(labels_ptr + rows_c).to(tl.int64)
        counted = rmask & (lab != ignore_index)
    else:
        lab = tl.zeros((BLOCK_R,), dtype=tl.int64)
        counted = rmask
    if MEAN:
        scale = 1.0 / tl.maximum(tl.load(count_ptr).to(tl.float32), 1.0)
    else:
        scale = 1.0
    w_kl = tl.where(counted, kl_scale * scale, 0.0)
    w_ce = tl.where(counted, ce_scale * scale, 0.0)

    # Pass 1: online log-sum-exp, so a row never has to fit in registers.
    m_s = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    m_t = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    m_c = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    l_s = tl.zeros((BLOCK_R,), dtype=tl.float32)
    l_t = tl.zeros((BLOCK_R,), dtype=tl.float32)
    l_c = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + cols0
        cmask = (cols < V)[None, :]
        lmask = (cols < VP)[None, :]  # the padding columns load garbage that cmask discards
        s = tl.load(s_base + cols[None, :], mask=lmask, other=0.0).to(tl.float32)
        if HAS_KL:
            t = tl.load(t_base + cols[None, :], mask=lmask, other=0.0).to(tl.float32)
            u = tl.where(cmask, s * inv_t, float("-inf"))
            w = tl.where(cmask, t * inv_t, float("-inf"))
            m_new = tl.maximum(m_s, tl.max(u, axis=1))
            l_s = l_s * tl.exp(m_s - m_new) + tl.sum(tl.exp(u - m_new[:, None]), axis=1)
            m_s = m_new
            m_new = tl.maximum(m_t, tl.max(w, axis=1))
            l_t = l_t * tl.exp(m_t - m_new) + tl.sum(tl.exp(w - m_new[:, None]), axis=1)
            m_t = m_new
        if CE_LSE:
            sc = tl.where(cmask, s, float("-inf"))
            m_new = tl.maximum(m_c, tl.max(sc, axis=1))
            l_c = l_c * tl.exp(m_c - m_new) + tl.sum(tl.exp(sc - m_new[:, None]), axis=1)
            m_c = m_new
    lse_s = m_s + tl.log(l_s)  # -inf rows (no KL) are never used
    lse_t = m_t + tl.log(l_t)
    if CE_LSE:
        lse_c = m_c + tl.log(l_c)
    else:
        lse_c = lse_s  # temperature 1: the student's own log-sum-exp

    # Pass 2: divergence and cross-entropy; the forward-KL gradient needs nothing more.
    div = tl.zeros((BLOCK_R,), dtype=tl.float32)
    row_sum = tl.zeros((BLOCK_R,), dtype=tl.float32)  # sum_v q * dDiv/dq for reverse KL / JSD
    tgt = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + cols0
        cmask = (cols < V)[None, :]
        lmask = (cols < VP)[None, :]  # the padding columns load garbage that cmask discards
        s = tl.load(s_base + cols[None, :], mask=lmask, other=0.0).to(tl.float32)
        if HAS_KL:
            t = tl.load(t_base + cols[None, :], mask=lmask, other=0.0).to(tl.float32)
            log_q = s * inv_t - lse_s[:, None]
            log_p = t * inv_t - lse_t[:, None]
            q = tl.exp(log_q)
            p = tl.exp(log_p)
            if DIV == 0:
                term = p * (log_p - log_q)
            elif DIV == 1:
                term = q * (log_q - log_p)
            else:
                # log m by log-add-exp, so beta in {0, 1} and underflowed p, q stay finite.
                a = log_p + log_beta
                b = log_q + log_1mbeta
                mx = tl.maximum(a, b)
                log_m = mx + tl.log(tl.exp(a - mx) + tl.exp(b - mx))
                term = beta * p * (log_p - log_m) + (1.0 - beta) * q * (log_q - log_m)
                row_sum += tl.sum(tl.where(cmask, q * (1.0 - beta) * (log_q - log_m), 0.0), axis=1)
            div += tl.sum(tl.where(cmask, term, 0.0), axis=1)
        if HAS_CE:
            tgt += tl.sum(tl.where(cmask & (cols[None, :] == lab[:, None]), s, 0.0), axis=1)
        if (DIV == 0 or not HAS_KL) and COMPUTE_GRAD:
            if HAS_KL:
                # d/ds of T^2 * KL(p || q) is T * (q - p).
                d = (w_kl * inv_t)[:, None] * (q - p)
            else:
                d = tl.zeros((BLOCK_R, BLOCK_V), dtype=tl.float32)
            if HAS_CE:
                sm = tl.exp(s - lse_c[:, None])
                d += w_ce[:, None] * (sm - tl.where(cols[None, :] == lab[:, None], 1.0, 0.0))
            d = tl.where(counted[:, None] & cmask, d, 0.0)  # the padding gets zeros
            tl.store(s_base + cols[None, :], d.to(zs_ptr.dtype.element_ty), mask=rmask[:, None] & lmask)
    if DIV == 1:
        row_sum = div

    if HAS_CE:
        loss = w_kl * div + w_ce * (lse_c - tgt)  # div stays 0 without KL
    else:
        loss = w_kl * div
    tl.store(loss_ptr + rows, tl.where(counted, loss, 0.0), mask=rmask)

    # Pass 3: d/du of sum_v q f(q) is q * (f' - sum_v q f'), so it waits for the row sum above.
    if DIV != 0 and HAS_KL and COMPUTE_GRAD:
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + cols0
            cmask = (cols < V)[None, :]
            lmask = (cols < VP)[None, :]
            s = tl.load(s_base + cols[None, :], mask=lmask, other=0.0).to(tl.float32)
            t = tl.load(t_base + cols[None, :], mask=lmask, other=0.0).to(tl.float32)
            log_q = s * inv_t - lse_s[:, None]
            log_p = t * inv_t - lse_t[:, None]
            q = tl.exp(log_q)
            if DIV == 1:
                g = log_q - log_p
            else:
                a = log_p + log_beta
                b = log_q + log_1mbeta
                mx = tl.maximum(a, b)
                g = (1.0 - beta) * (log_q - (mx + tl.log(tl.exp(a - mx) + tl.exp(b - mx))))
            d = (w_kl * inv_t)[:, None] * q * (g - row_sum[:, None])
            if HAS_CE:
                sm = tl.exp(s - lse_c[:, None])
                d += w_ce[:, None] * (sm - tl.where(cols[None, :] == lab[:, None], 1.0, 0.0))
            d = tl.where(counted[:, None] & cmask, d, 0.0)  # the padding gets zeros
            tl.store(s_base + cols[None, :], d.to(zs_ptr.dtype.element_ty), mask=rmask[:, None] & lmask)


def _meta(v: int, device: torch.device) -> dict:
    if device.type == "cuda" or forced_gpu_configs():
        # One row per program: a 4096-wide fp32 block of student + teacher is 32 values per thread at 8 warps.
        return dict(BLOCK_R=1, BLOCK_V=min(4096, triton.next_power_of_2(v)), num_warps=8)
    # Interpreter: each program is a Python loop, so fewer, wider programs run far faster.
    return dict(BLOCK_R=16, BLOCK_V=min(1024, triton.next_power_of_2(v)))


def padded_width(v: int, multiple: int = 64) -> int:
    """``v`` rounded up to a multiple of ``multiple``: the row stride of the chunk logits buffers."""
    return -(-v // multiple) * multiple


def default_chunk(n: int, v: int) -> int:
    """Rows per chunk: the largest power of two with ``chunk * v <= LOGITS_BUDGET`` (at least 16),
    capped at ``n``."""
    return max(1, min(n, max(16, 1 << int(math.log2(max(1, LOGITS_BUDGET // v))))))


def logits_pass(
    zs: torch.Tensor,
    zt: torch.Tensor | None,
    labels: torch.Tensor | None,
    count: torch.Tensor,
    loss_rows: torch.Tensor,
    *,
    temperature: float,
    kl_weight: float,
    ce_weight: float,
    divergence: str,
    beta: float,
    ignore_index: int,
    mean: bool,
    compute_grad: bool,
) -> None:
    """Run the kernel over one chunk: ``loss_rows`` gets each row's weighted loss and, when
    ``compute_grad``, ``zs`` is overwritten by d(loss)/d(student logits). With ``kl_weight == 0``
    the teacher logits ``zt`` are never read (they may be None)."""
    r, v = zs.shape
    has_kl = kl_weight != 0
    if has_kl and zt is None:
        raise ValueError(f"zt=None needs kl_weight=0, got kl_weight={kl_weight}")
    if not has_kl:
        zt = zs  # a valid pointer the specialised kernel never dereferences
    meta = _meta(v, zs.device)
    # Row strides padded to a multiple of 64 (forward's buffers) let the kernel mask its loads
    # and stores at a multiple of 16 columns: 16-byte vectors instead of 2-byte accesses.
    vp = padded_width(v, 16)
    if r > 1 and min(zs.stride(0), zt.stride(0)) < vp:
        vp = v
    grid = (triton.cdiv(r, meta["BLOCK_R"]),)
    with _alloc.device_guard(zs):
        _fld_kernel[grid](
            zs, zt, labels if labels is not None else loss_rows, count, loss_rows,
            r, v, vp, zs.stride(0), zt.stride(0),
            1.0 / temperature, kl_weight * temperature**2, ce_weight,
            beta, math.log(beta) if beta > 0 else -math.inf, math.log1p(-beta) if beta < 1 else -math.inf,
            ignore_index,
            # Without KL the divergence code is irrelevant: one specialisation serves them all.
            DIV=DIV_CODES[divergence] if has_kl else 0, HAS_KL=has_kl, HAS_LABELS=labels is not None,
            HAS_CE=ce_weight != 0, CE_LSE=ce_weight != 0 and (temperature != 1.0 or not has_kl), MEAN=mean,
            COMPUTE_GRAD=compute_grad,
            **meta,
        )


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    if b is None:
        return torch.mm(x, w.t(), out=out)
    return torch.addmm(b, x, w.t(), out=out)


def _accumulate_dw(acc: torch.Tensor, dz: torch.Tensor, x: torch.Tensor, block: int) -> None:
    """``acc += dz.T @ x`` with ``acc`` fp32 and no rounding of the product to dz's dtype.

    On a GPU, low-precision operands go through cuBLAS with an fp32 output written straight into
    ``acc`` (``addmm`` with ``out_dtype``, in blocks of ``block`` vocab rows). Elsewhere (the
    interpreter's CPU tensors, or a torch without ``out_dtype``) the block's operands are upcast
    to fp32 first: the same numbers, at the cost of fp32 copies of one block."""
    if dz.dtype == torch.float32:
        acc.addmm_(dz.t(), x)
        return
    native = acc.device.type == "cuda" and _HAS_OUT_DTYPE
    xf = x if native else x.float()
    for v0 in range(0, acc.shape[0], block):
        dst = acc[v0:v0 + block]
        if native:
            torch.addmm(dst, dz[:, v0:v0 + block].t(), xf, out_dtype=torch.float32, out=dst)
        else:
            dst.addmm_(dz[:, v0:v0 + block].t().float(), xf)


_HAS_OUT_DTYPE = hasattr(torch.ops.aten.addmm, "dtype_out")
"""Whether this torch has ``addmm(..., out_dtype=)`` (fp32 output of bf16/fp16 operands, CUDA)."""


DW_BLOCK = 16384
"""Vocab rows per temporary of the low-precision d(weight) accumulation."""


def forward(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    teacher_weight: torch.Tensor,
    teacher_bias: torch.Tensor | None,
    labels: torch.Tensor | None,
    *,
    temperature: float,
    kl_weight: float,
    ce_weight: float,
    divergence: str,
    beta: float,
    ignore_index: int,
    mean: bool,
    chunk: int,
    compute_dx: bool,
    compute_dw: bool,
    compute_db: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Returns the 0-dim fp32 loss, d(loss)/d(student_hidden) in its dtype, and fp32
    d(loss)/d(weight), d(loss)/d(bias) (each None unless requested). With ``kl_weight == 0`` the
    teacher side (``teacher_hidden`` may then be None) is never touched."""
    n, h = student_hidden.shape
    v = weight.shape[0]
    device = student_hidden.device
    compute_grad = compute_dx or compute_dw or compute_db
    has_kl = kl_weight != 0
    if has_kl and teacher_hidden is None:
        raise ValueError(f"teacher_hidden=None needs kl_weight=0, got kl_weight={kl_weight}")
    if labels is not None:
        # The kernel reads labels at unit stride: a strided or expanded (stride-0) labels tensor
        # is made contiguous here, once (N integers).
        labels = labels.contiguous()
        count = (labels != ignore_index).sum().reshape(1)
    else:
        count = torch.full((1,), n, dtype=torch.int64, device=device)
    loss_rows = _alloc.empty((n,), dtype=torch.float32, device=device)
    dx = _alloc.empty((n, h), dtype=student_hidden.dtype, device=device) if compute_dx else None
    # Accumulators start at zero (every chunk adds to them), so they are zeros, not poisoned.
    dw = torch.zeros((v, h), dtype=torch.float32, device=device) if compute_dw else None
    db = torch.zeros((v,), dtype=torch.float32, device=device) if compute_db else None
    chunk = max(1, min(chunk, n))
    # Row stride padded to a multiple of 64 elements: V = 92553 is odd, so unpadded rows start at
    # 2-byte alignment and the kernel could only use 2-byte accesses. The padding is never read
    # as data (the kernel masks values at V; the matmuls see the (chunk, V) views).
    vp = padded_width(v)
    zs_buf = torch.empty((chunk, vp), dtype=student_hidden.dtype, device=device)[:, :v]
    # Cross-entropy only: no teacher buffer, no teacher GEMM.
    zt_buf = torch.empty((chunk, vp), dtype=teacher_hidden.dtype, device=device)[:, :v] if has_kl else None
    for start in range(0, n, chunk):
        end = min(start + chunk, n)
        xs = student_hidden[start:end]
        zs = _linear(xs, weight, bias, zs_buf[: end - start])
        zt = _linear(teacher_hidden[start:end], teacher_weight, teacher_bias, zt_buf[: end - start]) if has_kl else None
        logits_pass(
            zs, zt, None if labels is None else labels[start:end], count, loss_rows[start:end],
            temperature=temperature, kl_weight=kl_weight, ce_weight=ce_weight, divergence=divergence,
            beta=beta, ignore_index=ignore_index, mean=mean, compute_grad=compute_grad,
        )
        if compute_dx:
            torch.mm(zs, weight, out=dx[start:end])
        if compute_dw:
            _accumulate_dw(dw, zs, xs, DW_BLOCK)
        if compute_db:
            db += zs.sum(0, dtype=torch.float32)
    return loss_rows.sum(), dx, dw, db
