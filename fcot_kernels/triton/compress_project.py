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
from ..dispatch import forced_gpu_configs, triton_interpreter
from .shuffle_merge_norm import _u_col_off, _u_row_off, identity_geometry, merge_ln_backward, merge_ln_forward  # noqa: F401

ACT_NONE, ACT_GELU, ACT_GELU_TANH = 0, 1, 2
ACT_CODES = {"gelu": ACT_GELU, "gelu_tanh": ACT_GELU_TANH}


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
def _gather_cols(
    col0,  # first column of the block (scalar)
    cols,  # (BLOCK,) the block's columns of U
    C,
    W,
    grid_w,
    stride_n,
    stride_c,
    R: tl.constexpr,
    MW: tl.constexpr,
    SEG_BLOCKS: tl.constexpr,
    U_ALIGN: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # x offsets of U's columns. When a block never crosses a channel segment (C a multiple of
    # the block), the offset is one scalar plus the contiguous channel index: Triton sees the
    # contiguity, so the loads/stores are 16-byte vectors and cp.async can pipeline them.
    # Otherwise every column divides by the runtime C and W (2-byte accesses).
    if SEG_BLOCKS:
        off = _u_col_off(col0, C, W, grid_w, stride_n, stride_c, R, MW)
        if U_ALIGN > 1:
            # The launcher checked stride_c == 1 and that C, stride_n and x's address are
            # 16-byte multiples: say so, as the divides above hide it from the compiler
            # (Triton 3.6 then falls back to 2-byte loads and no cp.async).
            off = tl.multiple_of(off, U_ALIGN) + tl.arange(0, BLOCK).to(tl.int64)
            return tl.max_contiguous(tl.multiple_of(off, U_ALIGN), BLOCK)
        return off + tl.arange(0, BLOCK).to(tl.int64) * stride_c
    else:
        return _u_col_off(cols, C, W, grid_w, stride_n, stride_c, R, MW)


@triton.jit
def _gather_rows(
    rows,  # (BLOCK,) int64 output tokens (rows of U)
    tokens_out,
    out_w,
    grid_w,
    stride_t,
    stride_n,
    R: tl.constexpr,
    MH: tl.constexpr,
    MW: tl.constexpr,
    U_ALIGN: tl.constexpr,
):
    off = _u_row_off(rows, tokens_out, out_w, grid_w, stride_t, stride_n, R, MH, MW)
    if U_ALIGN > 1:
        off = tl.multiple_of(off, U_ALIGN)  # stride_t, stride_n 16-byte multiples (launcher-checked)
    return off


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
    SEG_BLOCKS: tl.constexpr,  # C % BLOCK_K == C % BLOCK_N == 0: a block of U's columns lies in one segment
    U_ALIGN: tl.constexpr,  # > 1: U's offsets are multiples of this many elements (16 B); 1: unknown
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
        a_row = _gather_rows(rm, tokens_out, out_w, grid_w, stride_ut, stride_un, R, MH, MW, U_ALIGN)
    else:
        a_row = rm * stride_am
    if B_GATHER:
        b_col = _gather_cols(pid_n * BLOCK_N, rn, C, W, grid_w, stride_un, stride_uc, R, MW, SEG_BLOCKS, U_ALIGN, BLOCK_N)
    else:
        b_col = rn * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        mask_k = rk < K
        # The gather is the GEMM's prologue: U's addresses are a row part plus a column part.
        if A_GATHER:
            a_col = _gather_cols(k0, rk, C, W, grid_w, stride_un, stride_uc, R, MW, SEG_BLOCKS, U_ALIGN, BLOCK_K)
        else:
            a_col = rk.to(tl.int64) * stride_ak
        if B_GATHER:
            b_row = _gather_rows(rk.to(tl.int64), tokens_out, out_w, grid_w, stride_ut, stride_un, R, MH, MW, U_ALIGN)
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
        c_off = _gather_rows(rm, tokens_out, out_w, grid_w, stride_ut, stride_un, R, MH, MW, U_ALIGN)[:, None] + _gather_cols(
            pid_n * BLOCK_N, rn, C, W, grid_w, stride_un, stride_uc, R, MW, SEG_BLOCKS, U_ALIGN, BLOCK_N
        )[None, :]
    else:
        c_off = rm[:, None] * stride_cm + rn[None, :] * stride_cn
    tl.store(c_ptr + c_off, acc.to(c_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launchers


def _gemm_config(M: int, N: int, K: int, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> dict:
    if (device.type != "cuda" or triton_interpreter()) and not forced_gpu_configs():
        # Interpreter: big blocks mean fewer interpreted steps (numpy does the tile math);
        # 16 is tl.dot's minimum.
        bm = min(256, max(16, triton.next_power_of_2(M)))
        bn = min(256, max(16, triton.next_power_of_2(N)))
        bk = min(256, max(16, triton.next_power_of_2(K)))
        return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=4)
    if dtype == torch.float32:
        # fp32 is the exact (IEEE, CUDA-core FMA) path the tests compare with, not a speed
        # target: 64 x 64 tiles keep the FMA operands and the accumulator in registers
        # (128 x 128 spilled 12-5564 B under Triton 3.6).
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=2)
    if M <= 64 or N <= 64:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)


def gemm_blocks_per_sm(dtype: torch.dtype, act_epilogue: bool) -> int:
    """Programs per H100 SM that ``_gemm_config``'s tiles are sized for (checked against the
    compiled kernel by ``tests/compile_triton_sm90.py``). The conv GEMMs (gathered/scattered U,
    16-bit): 128 x 128 x 64 at 3 stages is 96 KiB of shared memory and <= 128 registers at
    8 warps, so two programs share an SM and one's prologue/epilogue overlaps the other's main
    loop. The GELU epilogues (erf/exp on the 128 x 128 fp32 tile) need more registers: 1.
    fp32 (the exact CUDA-core path the tests use) is not a speed target: 1."""
    return 1 if dtype == torch.float32 or act_epilogue else 2


def _u_align(u: torch.Tensor | None, strides: tuple[int, int, int], geom: ShuffleGeometry) -> int:
    """Elements per 16 bytes when every offset of the gathered/scattered U is provably a
    16-byte multiple (unit channel stride; C, the token and tile strides and the address
    16-byte multiples), else 1: the kernel's alignment hints are only given when they are true
    (an unaligned x, e.g. a view at an odd offset, keeps the plain path and stays correct)."""
    if u is None:
        return 1
    vec = 16 // u.element_size()
    stride_t, stride_n, stride_c = strides
    aligned = (stride_c == 1 and stride_n % vec == 0 and stride_t % vec == 0 and geom.channels % vec == 0
               and u.data_ptr() % 16 == 0)
    return vec if aligned else 1


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
    # The epilogue reads the bias at unit stride: a strided or expanded (stride-0) bias (b1,
    # merge_bias) is made contiguous here, once (N elements).
    bias = bias.contiguous() if bias is not None else None
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
    cfg = _gemm_config(M, N, K, out.device, dtype_src.dtype)
    seg_blocks = geom is not None and geom.channels % cfg["BLOCK_K"] == 0 and geom.channels % cfg["BLOCK_N"] == 0
    u_tensor = x if gather is not None else (out if scatter else None)
    u_align = _u_align(u_tensor, us, geom) if seg_blocks else 1
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    with _alloc.device_guard(a):
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
            SEG_BLOCKS=seg_blocks, U_ALIGN=u_align,
            **cfg,
        )
    return out


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
