"""Triton kernels for the fused compress-and-project path, and their launchers.

Notation: ``x (tiles, grid_h*grid_w, C)`` ViT tokens; ``U (rows, merge*W)`` the *virtual* matrix
of merge windows (row = output token, columns = the window's pixel-shuffled tokens of width
``W = r*r*C`` concatenated in row-major member order). U is never materialised: every kernel
that needs it computes x's address of ``U[row, col]`` as ``row_off(row) + col_off(col)``
(the pixel shuffle and the window are both separable into a row part and a column part).

Kernels:
* ``_merge_ln_fwd_kernel``: gather + avg/dwconv merge + LayerNorm in one pass over x (one
  program per output row, the row tile kept in registers; fp32 statistics) -> ``h`` and
  per-row mean/rstd. With the identity geometry it is the plain LayerNorm of the conv output.
* ``_merge_ln_bwd_kernel``: LayerNorm backward fused with the merge backward: recomputes the
  merged token from x, writes dx straight to the ViT-token positions (the pixel shuffle is a
  permutation and windows do not overlap, so plain stores, no atomics) and per-program fp32
  partial sums of dgamma, dbeta, dmerge_weight, dmerge_bias.
* ``_gemm_kernel``: ``C = A @ B`` with fp32 accumulation, where A (conv forward) or B (conv
  dweight) may be the virtual U gathered from x, C may be scattered to x's layout (conv dx),
  and the epilogue adds a bias, applies GELU (exact erf or tanh) and/or multiplies by the
  GELU derivative recomputed from the saved pre-activation (backward), optionally also
  storing the pre-activation.

GEMMs with nothing to fuse (``a @ w2.T + b2``, ``du.T @ h``, ``du @ w1``, ``dy.T @ a``) go to
cuBLAS through ``torch.addmm``/``torch.mm``: its epilogue already fuses the bias, and nothing
beats it on a plain GEMM.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _alloc
from .._validation import ShuffleGeometry
from ..dispatch import triton_interpreter

ACT_NONE, ACT_GELU, ACT_GELU_TANH = 0, 1, 2
ACT_CODES = {"gelu": ACT_GELU, "gelu_tanh": ACT_GELU_TANH}
MODE_AVG, MODE_DWCONV = 0, 1


@triton.jit
def _u_row_off(
    row,  # (BLOCK,) int64 output-token indices
    tokens_out,
    out_w,
    grid_w,
    stride_t,
    stride_n,
    R: tl.constexpr,
    MH: tl.constexpr,
    MW: tl.constexpr,
):
    # x offset of the window's top-left patch: tile + merged-grid cell.
    t = row // tokens_out
    o = row % tokens_out
    return t * stride_t + (((o // out_w) * MH * R) * grid_w + (o % out_w) * MW * R).to(tl.int64) * stride_n


@triton.jit
def _u_col_off(
    col,  # (BLOCK,) column of U: member * W + segment * C + channel
    C,
    W,
    grid_w,
    stride_n,
    stride_c,
    R: tl.constexpr,
    MW: tl.constexpr,
):
    m = col // W
    kk = col % W
    seg = kk // C
    c = kk % C
    cell = ((m // MW) * R + seg // R) * grid_w + (m % MW) * R + seg % R
    return cell.to(tl.int64) * stride_n + c.to(tl.int64) * stride_c


@triton.jit
def _act(u, ACT: tl.constexpr):
    if ACT == 1:  # exact GELU
        u = 0.5 * u * (1.0 + tl.math.erf(u * 0.7071067811865476))
    elif ACT == 2:  # tanh GELU; tanh(y) = 1 - 2 / (exp(2y) + 1) (no tanh in older tl.math)
        y = 0.7978845608028654 * (u + 0.044715 * u * u * u)
        u = 0.5 * u * (2.0 - 2.0 / (tl.exp(2.0 * y) + 1.0))
    return u


@triton.jit
def _act_grad(u, ACT: tl.constexpr):
    if ACT == 1:
        d = 0.5 * (1.0 + tl.math.erf(u * 0.7071067811865476)) + u * 0.3989422804014327 * tl.exp(-0.5 * u * u)
    else:
        y = 0.7978845608028654 * (u + 0.044715 * u * u * u)
        t = 1.0 - 2.0 / (tl.exp(2.0 * y) + 1.0)
        d = 0.5 * (1.0 + t) + 0.5 * u * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * u * u)
    return d


@triton.jit
def _merge_ln_fwd_kernel(
    x_ptr,  # (tiles, grid_h*grid_w, C), any strides
    mw_ptr,  # (MH*MW, W) dwconv merge weight; unused for avg
    mb_ptr,  # (W,) merge bias; unused unless HAS_MB
    w_ptr,  # (W,) LayerNorm weight
    b_ptr,  # (W,) LayerNorm bias
    h_ptr,  # (rows, W) contiguous, normalised tokens
    mean_ptr,  # (rows,) fp32
    rstd_ptr,  # (rows,) fp32
    stride_xt,
    stride_xn,
    stride_xc,
    tokens_out,
    out_w,
    grid_w,
    C,
    eps,
    R: tl.constexpr,
    R2P: tl.constexpr,  # next power of two >= R*R
    MH: tl.constexpr,
    MW: tl.constexpr,
    MODE: tl.constexpr,  # 0 avg, 1 dwconv
    HAS_MB: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    seg = tl.arange(0, R2P)
    c = tl.arange(0, BLOCK_C)
    mask = (seg < R * R)[:, None] & (c < C)[None, :]
    width = R * R * C
    ch = seg[:, None] * C + c[None, :]
    # The row as an (R*R, C) tile: segment k is contiguous in patch (i*R + k//R, j*R + k%R).
    base = _u_row_off(row, tokens_out, out_w, grid_w, stride_xt, stride_xn, R, MH, MW)
    acc = tl.zeros((R2P, BLOCK_C), dtype=tl.float32)
    for m in tl.static_range(MH * MW):
        off = base + _u_col_off(m * width + ch, C, width, grid_w, stride_xn, stride_xc, R, MW)
        xm = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
        if MODE == 1:
            xm *= tl.load(mw_ptr + m * width + ch, mask=mask, other=0.0).to(tl.float32)
        acc += xm
    if MODE == 0:
        acc = acc / (MH * MW)
    if HAS_MB:
        acc += tl.load(mb_ptr + ch, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(tl.sum(acc, axis=1), axis=0) / width
    d = tl.where(mask, acc - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(tl.sum(d * d, axis=1), axis=0) / width + eps)
    w = tl.load(w_ptr + ch, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + ch, mask=mask, other=0.0).to(tl.float32)
    tl.store(h_ptr + row * width + ch, (d * rstd * w + b).to(h_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _merge_ln_bwd_kernel(
    x_ptr,  # (tiles, grid_h*grid_w, C), any strides
    mw_ptr,  # (MH*MW, W) dwconv merge weight; unused for avg
    mb_ptr,  # (W,) merge bias; unused unless HAS_MB
    w_ptr,  # (W,) LayerNorm weight
    dh_ptr,  # (rows, W) contiguous, gradient of the LayerNorm output
    mean_ptr,  # (rows,) fp32
    rstd_ptr,  # (rows,) fp32
    dx_ptr,  # (tiles, grid_h*grid_w, C) contiguous; unused unless COMPUTE_DX
    dw_ptr,  # (programs, W) fp32 partial sums of dgamma
    db_ptr,  # (programs, W) fp32 partial sums of dbeta
    dmw_ptr,  # (programs, MH*MW, W) fp32 partial sums; unused unless COMPUTE_DMW
    dmb_ptr,  # (programs, W) fp32 partial sums; unused unless COMPUTE_DMB
    stride_xt,
    stride_xn,
    stride_xc,
    rows,
    rows_per_program,
    tokens_out,
    out_w,
    grid_w,
    grid_hw,
    C,
    R: tl.constexpr,
    R2P: tl.constexpr,
    MH: tl.constexpr,
    MW: tl.constexpr,
    MODE: tl.constexpr,
    HAS_MB: tl.constexpr,
    BLOCK_C: tl.constexpr,
    COMPUTE_DX: tl.constexpr,
    COMPUTE_DMW: tl.constexpr,
    COMPUTE_DMB: tl.constexpr,
):
    pid = tl.program_id(0)
    seg = tl.arange(0, R2P)
    c = tl.arange(0, BLOCK_C)
    mask = (seg < R * R)[:, None] & (c < C)[None, :]
    width = R * R * C
    ch = seg[:, None] * C + c[None, :]
    w = tl.load(w_ptr + ch, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((R2P, BLOCK_C), dtype=tl.float32)
    db = tl.zeros((R2P, BLOCK_C), dtype=tl.float32)
    dmb = tl.zeros((R2P, BLOCK_C), dtype=tl.float32)
    start = pid.to(tl.int64) * rows_per_program
    end = tl.minimum(start + rows_per_program, rows)
    for row in range(start, end):
        base = _u_row_off(row, tokens_out, out_w, grid_w, stride_xt, stride_xn, R, MH, MW)
        acc = tl.zeros((R2P, BLOCK_C), dtype=tl.float32)
        for m in tl.static_range(MH * MW):
            off = base + _u_col_off(m * width + ch, C, width, grid_w, stride_xn, stride_xc, R, MW)
            xm = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
            if MODE == 1:
                xm *= tl.load(mw_ptr + m * width + ch, mask=mask, other=0.0).to(tl.float32)
            acc += xm
        if MODE == 0:
            acc = acc / (MH * MW)
        if HAS_MB:
            acc += tl.load(mb_ptr + ch, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row)
        xhat = tl.where(mask, (acc - tl.load(mean_ptr + row)) * rstd, 0.0)
        dy = tl.load(dh_ptr + row * width + ch, mask=mask, other=0.0).to(tl.float32)
        dw += dy * xhat
        db += dy
        if COMPUTE_DX or COMPUTE_DMW or COMPUTE_DMB:
            g = dy * w
            m1 = tl.sum(tl.sum(g, axis=1), axis=0) / width
            m2 = tl.sum(tl.sum(g * xhat, axis=1), axis=0) / width
            dz = tl.where(mask, (g - m1 - xhat * m2) * rstd, 0.0)
            if COMPUTE_DMB:
                dmb += dz
            if COMPUTE_DX or COMPUTE_DMW:
                dbase = _u_row_off(row, tokens_out, out_w, grid_w, grid_hw * C, C, R, MH, MW)
                for m in tl.static_range(MH * MW):
                    if COMPUTE_DMW:
                        # Re-read the member (an L1/L2 hit) instead of holding merge tiles in registers.
                        off = base + _u_col_off(m * width + ch, C, width, grid_w, stride_xn, stride_xc, R, MW)
                        xm = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
                        # This program's partial sum lives in its own slice of dmw (first row: start it).
                        prev = tl.load(dmw_ptr + (pid * MH * MW + m) * width + ch, mask=mask, other=0.0)
                        prev = tl.where(row > start, prev, 0.0)
                        tl.store(dmw_ptr + (pid * MH * MW + m) * width + ch, prev + dz * xm, mask=mask)
                    if COMPUTE_DX:
                        if MODE == 1:
                            dxm = dz * tl.load(mw_ptr + m * width + ch, mask=mask, other=0.0).to(tl.float32)
                        else:
                            dxm = dz / (MH * MW)
                        doff = dbase + _u_col_off(m * width + ch, C, width, grid_w, C, 1, R, MW)
                        tl.store(dx_ptr + doff, dxm.to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dw_ptr + pid * width + ch, dw, mask=mask)
    tl.store(db_ptr + pid * width + ch, db, mask=mask)
    if COMPUTE_DMB:
        tl.store(dmb_ptr + pid * width + ch, dmb, mask=mask)


@triton.jit
def _gemm_kernel(
    a_ptr,  # (M, K) strided, or x when A_GATHER (A = U)
    b_ptr,  # (K, N) strided, or x when B_GATHER (B = U)
    c_ptr,  # (M, N) strided, or dx (x's layout, contiguous) when C_SCATTER (C = dU)
    bias_ptr,  # (N,) added in the epilogue; unused unless HAS_BIAS
    aux_ptr,  # (M, N) contiguous pre-activation for ACT_GRAD; unused otherwise
    pre_ptr,  # (M, N) contiguous, receives the pre-activation when STORE_PRE
    M,
    N,
    K,
    stride_am,
    stride_ak,
    stride_bk,
    stride_bn,
    stride_cm,
    stride_cn,
    tokens_out,  # geometry of U (for the gather / scatter operand)
    out_w,
    grid_w,
    C,
    W,
    stride_ut,
    stride_un,
    stride_uc,
    R: tl.constexpr,
    MH: tl.constexpr,
    MW: tl.constexpr,
    A_GATHER: tl.constexpr,
    B_GATHER: tl.constexpr,
    C_SCATTER: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr,  # 0 none, 1 exact GELU, 2 tanh GELU, applied after the bias
    ACT_GRAD: tl.constexpr,  # multiply by act'(aux) instead (ACT names the activation)
    STORE_PRE: tl.constexpr,
    DOT_F32: tl.constexpr,  # fp32 dot (IEEE, not TF32): fp32 operands, or the interpreter
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Grouped launch order: GROUP_M row blocks share each B column block while it is in L2.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * num_n)
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_n)) % size_m
    pid_n = (pid % (GROUP_M * num_n)) // size_m
    rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = rm < M
    mask_n = rn < N
    if A_GATHER:
        a_row = _u_row_off(rm, tokens_out, out_w, grid_w, stride_ut, stride_un, R, MH, MW)
    else:
        a_row = rm * stride_am
    if B_GATHER:
        b_col = _u_col_off(rn, C, W, grid_w, stride_un, stride_uc, R, MW)
    else:
        b_col = rn * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        mask_k = rk < K
        # The gather is the GEMM's prologue: U's addresses are a row part plus a column part.
        if A_GATHER:
            a_col = _u_col_off(rk, C, W, grid_w, stride_un, stride_uc, R, MW)
        else:
            a_col = rk.to(tl.int64) * stride_ak
        if B_GATHER:
            b_row = _u_row_off(rk.to(tl.int64), tokens_out, out_w, grid_w, stride_ut, stride_un, R, MH, MW)
        else:
            b_row = rk.to(tl.int64) * stride_bk
        a = tl.load(a_ptr + a_row[:, None] + a_col[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_ptr + b_row[:, None] + b_col[None, :], mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if DOT_F32:
            # fp32 operands (or the interpreter, whose bf16/fp16 tl.dot is wrong): full-precision
            # dot, not TF32.
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if ACT_GRAD:
        # GELU'(u) recomputed from the saved pre-activation: cheaper than storing it.
        u = tl.load(aux_ptr + rm[:, None] * N + rn[None, :], mask=mask, other=0.0).to(tl.float32)
        acc = acc * _act_grad(u, ACT)
    else:
        if STORE_PRE:
            tl.store(pre_ptr + rm[:, None] * N + rn[None, :], acc.to(pre_ptr.dtype.element_ty), mask=mask)
        acc = _act(acc, ACT)
    if C_SCATTER:
        c_off = _u_row_off(rm, tokens_out, out_w, grid_w, stride_ut, stride_un, R, MH, MW)[:, None] + _u_col_off(
            rn, C, W, grid_w, stride_un, stride_uc, R, MW
        )[None, :]
    else:
        c_off = rm[:, None] * stride_cm + rn[None, :] * stride_cn
    tl.store(c_ptr + c_off, acc.to(c_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launchers


def _identity_geometry(rows: int, width: int) -> ShuffleGeometry:
    """A row-wise op on ``(rows, width)`` expressed as a shuffle geometry (no shuffle, no merge)."""
    return ShuffleGeometry(rows, 1, 1, width, 1, 1)


def _ln_meta(geom: ShuffleGeometry) -> dict:
    block_c = triton.next_power_of_2(geom.channels)
    r2p = triton.next_power_of_2(geom.r * geom.r)
    mh, mw = geom.window
    # About 16 fp32 values per thread keeps the row tile in registers without spilling.
    num_warps = max(1, min(16, (block_c * r2p) // 512))
    return dict(R=geom.r, R2P=r2p, MH=mh, MW=mw, BLOCK_C=block_c, num_warps=num_warps)


def _gemm_config(M: int, N: int, K: int, device: torch.device) -> dict:
    if device.type != "cuda" or triton_interpreter():
        # Interpreter: big blocks mean fewer interpreted steps (numpy does the tile math);
        # 16 is tl.dot's minimum.
        bm = min(256, max(16, triton.next_power_of_2(M)))
        bn = min(256, max(16, triton.next_power_of_2(N)))
        bk = min(256, max(16, triton.next_power_of_2(K)))
        return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=4)
    if M <= 64 or N <= 64:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)


def gemm(
    a: torch.Tensor | None,
    b: torch.Tensor | None,
    M: int,
    N: int,
    K: int,
    *,
    out: torch.Tensor,
    x: torch.Tensor | None = None,
    geom: ShuffleGeometry | None = None,
    gather: str | None = None,
    scatter: bool = False,
    bias: torch.Tensor | None = None,
    act: int = ACT_NONE,
    act_grad_of: torch.Tensor | None = None,
    pre: torch.Tensor | None = None,
) -> torch.Tensor:
    """``out = epilogue(A @ B)``; ``gather="a"|"b"`` reads that operand as U from ``x``;
    ``scatter`` writes ``out`` (x's shape, contiguous) as dU at the ViT-token positions."""
    dtype_src = x if x is not None else a
    dummy = out
    if gather == "a":
        a = x
    if gather == "b":
        b = x
    sa = (a.stride(0), a.stride(1)) if gather != "a" else (0, 0)
    sb = (b.stride(0), b.stride(1)) if gather != "b" else (0, 0)
    sc = (out.stride(0), out.stride(1)) if not scatter else (0, 0)
    if gather is not None:
        us = (x.stride(0), x.stride(1), x.stride(2))
    elif scatter:
        us = (geom.grid_h * geom.grid_w * geom.channels, geom.channels, 1)
    else:
        us = (0, 0, 0)
    if geom is not None:
        mh, mw = geom.window
        g = (geom.tokens_out, geom.out_grid[1], geom.grid_w, geom.channels, geom.width)
        r = geom.r
    else:
        mh = mw = r = 1
        g = (1, 1, 1, 1, 1)
    cfg = _gemm_config(M, N, K, out.device)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    _gemm_kernel[grid](
        a, b, out,
        bias if bias is not None else dummy,
        act_grad_of if act_grad_of is not None else dummy,
        pre if pre is not None else dummy,
        M, N, K, *sa, *sb, *sc, *g, *us,
        R=r, MH=mh, MW=mw,
        A_GATHER=gather == "a", B_GATHER=gather == "b", C_SCATTER=scatter,
        HAS_BIAS=bias is not None, ACT=act, ACT_GRAD=act_grad_of is not None, STORE_PRE=pre is not None,
        DOT_F32=dtype_src.dtype == torch.float32 or triton_interpreter(),
        **cfg,
    )
    return out


def merge_ln_forward(
    x: torch.Tensor,
    merge_weight: torch.Tensor | None,
    merge_bias: torch.Tensor | None,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    geom: ShuffleGeometry,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``h (rows, W)`` = LayerNorm(merge(shuffle(x))) in x.dtype, with fp32 per-row mean/rstd."""
    h = _alloc.empty((geom.rows, geom.width), dtype=x.dtype, device=x.device)
    mean = _alloc.empty((geom.rows,), dtype=torch.float32, device=x.device)
    rstd = _alloc.empty((geom.rows,), dtype=torch.float32, device=x.device)
    _merge_ln_fwd_kernel[(geom.rows,)](
        x,
        merge_weight if merge_weight is not None else ln_weight,
        merge_bias if merge_bias is not None else ln_weight,
        ln_weight, ln_bias, h, mean, rstd,
        x.stride(0), x.stride(1), x.stride(2),
        geom.tokens_out, geom.out_grid[1], geom.grid_w, geom.channels, eps,
        MODE=MODE_DWCONV if merge_weight is not None else MODE_AVG,
        HAS_MB=merge_bias is not None,
        **_ln_meta(geom),
    )
    return h, mean, rstd


def _num_programs(x: torch.Tensor, rows: int) -> int:
    if x.device.type == "cuda":
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count
        return max(1, min(rows, 4 * sms))
    return max(1, min(rows, 4))  # interpreter: few programs, same code path


def merge_ln_backward(
    dh: torch.Tensor,
    x: torch.Tensor,
    merge_weight: torch.Tensor | None,
    merge_bias: torch.Tensor | None,
    ln_weight: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    geom: ShuffleGeometry,
    *,
    compute_dx: bool,
    compute_dmw: bool,
    compute_dmb: bool,
) -> tuple[torch.Tensor | None, ...]:
    """``(dx, dln_weight, dln_bias, dmerge_weight, dmerge_bias)``; dx in x's shape (contiguous,
    x.dtype), the parameter gradients in fp32; entries not asked for are None."""
    programs = _num_programs(x, geom.rows)
    rows_per_program = triton.cdiv(geom.rows, programs)
    programs = triton.cdiv(geom.rows, rows_per_program)
    members = geom.merge
    f32 = dict(dtype=torch.float32, device=x.device)
    dx = _alloc.empty(x.shape, dtype=x.dtype, device=x.device) if compute_dx else None
    dw = _alloc.empty((programs, geom.width), **f32)
    db = _alloc.empty((programs, geom.width), **f32)
    dmw = _alloc.empty((programs, members, geom.width), **f32) if compute_dmw else None
    dmb = _alloc.empty((programs, geom.width), **f32) if compute_dmb else None
    _merge_ln_bwd_kernel[(programs,)](
        x,
        merge_weight if merge_weight is not None else ln_weight,
        merge_bias if merge_bias is not None else ln_weight,
        ln_weight, dh, mean, rstd,
        dx if dx is not None else dw, dw, db,
        dmw if dmw is not None else dw,
        dmb if dmb is not None else dw,
        x.stride(0), x.stride(1), x.stride(2),
        geom.rows, rows_per_program, geom.tokens_out, geom.out_grid[1], geom.grid_w,
        geom.grid_h * geom.grid_w, geom.channels,
        MODE=MODE_DWCONV if merge_weight is not None else MODE_AVG,
        HAS_MB=merge_bias is not None,
        COMPUTE_DX=compute_dx, COMPUTE_DMW=compute_dmw, COMPUTE_DMB=compute_dmb,
        **_ln_meta(geom),
    )
    return (
        dx,
        dw.sum(0),
        db.sum(0),
        dmw.sum(0) if dmw is not None else None,
        dmb.sum(0) if dmb is not None else None,
    )


def conv_forward(x: torch.Tensor, merge_weight: torch.Tensor, merge_bias: torch.Tensor | None, geom: ShuffleGeometry) -> torch.Tensor:
    """``z (rows, W) = U @ merge_weight.T + merge_bias`` with U gathered from x (GEMM prologue)."""
    z = _alloc.empty((geom.rows, geom.width), dtype=x.dtype, device=x.device)
    wt = merge_weight.t()
    return gemm(None, wt, geom.rows, geom.width, geom.merge * geom.width, out=z, x=x, geom=geom, gather="a", bias=merge_bias)


def conv_backward(
    dz: torch.Tensor,
    x: torch.Tensor,
    merge_weight: torch.Tensor,
    geom: ShuffleGeometry,
    *,
    compute_dx: bool,
    compute_dmw: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``dx`` = dz @ merge_weight scattered to x's layout; ``dmerge_weight`` = dz.T @ U (U gathered)."""
    k = geom.merge * geom.width
    dx = dmw = None
    if compute_dx:
        dx = _alloc.empty(x.shape, dtype=x.dtype, device=x.device)
        gemm(dz, merge_weight, geom.rows, k, geom.width, out=dx, geom=geom, scatter=True)
    if compute_dmw:
        dmw = _alloc.empty((geom.width, k), dtype=merge_weight.dtype, device=x.device)
        gemm(dz.t(), None, geom.width, k, geom.rows, out=dmw, x=x, geom=geom, gather="b")
    return dx, dmw


def linear_act(
    h: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, act: str, *, save_pre: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``a = act(h @ w1.T + b1)`` with bias + activation in the GEMM epilogue; also the
    pre-activation ``u`` when ``save_pre`` (the backward recomputes act'(u) from it)."""
    rows, n = h.shape[0], w1.shape[0]
    a = _alloc.empty((rows, n), dtype=h.dtype, device=h.device)
    u = _alloc.empty((rows, n), dtype=h.dtype, device=h.device) if save_pre else None
    gemm(h, w1.t(), rows, n, h.shape[1], out=a, bias=b1, act=ACT_CODES[act], pre=u)
    return a, u


def linear_act_grad(dy: torch.Tensor, w2: torch.Tensor, u: torch.Tensor, act: str) -> torch.Tensor:
    """``du = (dy @ w2) * act'(u)``: the derivative applied in the GEMM epilogue."""
    rows, n = u.shape
    du = _alloc.empty((rows, n), dtype=u.dtype, device=u.device)
    return gemm(dy, w2, rows, n, dy.shape[1], out=du, act=ACT_CODES[act], act_grad_of=u)
