"""Triton kernels for pixel shuffle + token merge + LayerNorm, and their launchers.

One program owns one output row (forward) or a contiguous run of rows (backward). A row of
width W = r*r*C is held as an (r*r, C) tile: segment k = di*r + dj is channel-contiguous in
ViT patch (i*r + di, j*r + dj), so the pixel-shuffle gather is r*r contiguous loads per merge
member and x is read exactly once; the shuffled/merged tokens never touch device memory.
Statistics and accumulations are fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _alloc
from .._validation import ShuffleGeometry


@triton.jit
def _patch_offsets(
    row,  # int64 output row
    seg_i,  # (R2P,) di of each segment
    seg_j,  # (R2P,) dj of each segment
    mi,
    mj,
    tokens_out,
    out_w,
    grid_w,
    stride_t,
    stride_n,
    R: tl.constexpr,
    MH: tl.constexpr,
    MW: tl.constexpr,
):
    # Start of each segment's C channels for window member (mi, mj) of `row`.
    t = row // tokens_out
    o = row % tokens_out
    i = ((o // out_w) * MH + mi) * R + seg_i
    j = ((o % out_w) * MW + mj) * R + seg_j
    return t * stride_t + (i * grid_w + j).to(tl.int64) * stride_n


@triton.jit
def _smn_fwd_kernel(
    x_ptr,  # (tiles, grid_h*grid_w, C), any strides
    w_ptr,  # (R*R*C,)
    b_ptr,  # (R*R*C,)
    out_ptr,  # (rows, R*R*C) contiguous
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
    BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    seg = tl.arange(0, R2P)
    c = tl.arange(0, BLOCK_C)
    mask = (seg < R * R)[:, None] & (c < C)[None, :]
    acc = tl.zeros((R2P, BLOCK_C), dtype=tl.float32)
    for mi in tl.static_range(MH):
        for mj in tl.static_range(MW):
            base = _patch_offsets(row, seg // R, seg % R, mi, mj, tokens_out, out_w, grid_w,
                                  stride_xt, stride_xn, R, MH, MW)
            acc += tl.load(x_ptr + base[:, None] + c[None, :] * stride_xc, mask=mask, other=0.0).to(tl.float32)
    width = R * R * C
    z = acc / (MH * MW)
    mean = tl.sum(tl.sum(z, axis=1), axis=0) / width
    d = tl.where(mask, z - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(tl.sum(d * d, axis=1), axis=0) / width + eps)
    ch = seg[:, None] * C + c[None, :]
    w = tl.load(w_ptr + ch, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + ch, mask=mask, other=0.0).to(tl.float32)
    y = d * rstd * w + b
    tl.store(out_ptr + row * width + ch, y.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _smn_bwd_kernel(
    x_ptr,  # (tiles, grid_h*grid_w, C), any strides
    w_ptr,  # (R*R*C,)
    dy_ptr,  # (rows, R*R*C) contiguous
    mean_ptr,  # (rows,) fp32
    rstd_ptr,  # (rows,) fp32
    dx_ptr,  # (tiles, grid_h*grid_w, C) contiguous; unused unless COMPUTE_DX
    dw_ptr,  # (programs, R*R*C) fp32 partial sums
    db_ptr,  # (programs, R*R*C) fp32 partial sums
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
    BLOCK_C: tl.constexpr,
    COMPUTE_DX: tl.constexpr,
):
    pid = tl.program_id(0)
    seg = tl.arange(0, R2P)
    c = tl.arange(0, BLOCK_C)
    mask = (seg < R * R)[:, None] & (c < C)[None, :]
    width = R * R * C
    ch = seg[:, None] * C + c[None, :]
    dw = tl.zeros((R2P, BLOCK_C), dtype=tl.float32)
    db = tl.zeros((R2P, BLOCK_C), dtype=tl.float32)
    start = pid.to(tl.int64) * rows_per_program
    end = tl.minimum(start + rows_per_program, rows)
    for row in range(start, end):
        acc = tl.zeros((R2P, BLOCK_C), dtype=tl.float32)
        for mi in tl.static_range(MH):
            for mj in tl.static_range(MW):
                base = _patch_offsets(row, seg // R, seg % R, mi, mj, tokens_out, out_w, grid_w,
                                      stride_xt, stride_xn, R, MH, MW)
                acc += tl.load(x_ptr + base[:, None] + c[None, :] * stride_xc, mask=mask, other=0.0).to(tl.float32)
        xhat = (acc / (MH * MW) - tl.load(mean_ptr + row)) * tl.load(rstd_ptr + row)
        xhat = tl.where(mask, xhat, 0.0)
        dy = tl.load(dy_ptr + row * width + ch, mask=mask, other=0.0).to(tl.float32)
        dw += dy * xhat
        db += dy
        if COMPUTE_DX:
            # weight is re-read per row (an L1/L2 hit) rather than held: one row tile fewer live.
            g = dy * tl.load(w_ptr + ch, mask=mask, other=0.0).to(tl.float32)
            m1 = tl.sum(tl.sum(g, axis=1), axis=0) / width
            m2 = tl.sum(tl.sum(g * xhat, axis=1), axis=0) / width
            # Every window member receives an equal share of the merged token's gradient.
            dz = (g - m1 - xhat * m2) * tl.load(rstd_ptr + row) / (MH * MW)
            dz = dz.to(dx_ptr.dtype.element_ty)
            for mi in tl.static_range(MH):
                for mj in tl.static_range(MW):
                    base = _patch_offsets(row, seg // R, seg % R, mi, mj, tokens_out, out_w, grid_w,
                                          grid_hw * C, C, R, MH, MW)
                    tl.store(dx_ptr + base[:, None] + c[None, :], dz, mask=mask)
    tl.store(dw_ptr + pid * width + ch, dw, mask=mask)
    tl.store(db_ptr + pid * width + ch, db, mask=mask)


def _meta(geom: ShuffleGeometry) -> dict:
    block_c = triton.next_power_of_2(geom.channels)
    r2p = triton.next_power_of_2(geom.r * geom.r)
    mh, mw = geom.window
    # About 16 fp32 values per thread keeps the row tile in registers without spilling.
    num_warps = max(1, min(16, (block_c * r2p) // 512))
    return dict(R=geom.r, R2P=r2p, MH=mh, MW=mw, BLOCK_C=block_c, num_warps=num_warps)


def _num_programs(x: torch.Tensor, rows: int) -> int:
    if x.device.type == "cuda":
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count
        return max(1, min(rows, 2 * sms))  # ~127 registers/thread at 8 warps: 2 programs per SM
    return max(1, min(rows, 4))  # interpreter: few programs, same code path


def forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, geom: ShuffleGeometry, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``out (tiles, tokens_out, W)`` in x.dtype and fp32 ``mean``/``rstd`` per row."""
    out = _alloc.empty((geom.tiles, geom.tokens_out, geom.width), dtype=x.dtype, device=x.device)
    mean = _alloc.empty((geom.rows,), dtype=torch.float32, device=x.device)
    rstd = _alloc.empty((geom.rows,), dtype=torch.float32, device=x.device)
    with _alloc.device_guard(x):
        _smn_fwd_kernel[(geom.rows,)](
            x, weight.contiguous(), bias.contiguous(), out, mean, rstd,
            x.stride(0), x.stride(1), x.stride(2),
            geom.tokens_out, geom.out_grid[1], geom.grid_w, geom.channels, eps,
            **_meta(geom),
        )
    return out, mean, rstd


def backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    geom: ShuffleGeometry,
    compute_dx: bool,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Returns ``dx`` (contiguous, x.dtype; None unless ``compute_dx``) and fp32 ``dweight``/``dbias``."""
    dy = dy.contiguous()
    programs = _num_programs(x, geom.rows)
    rows_per_program = triton.cdiv(geom.rows, programs)
    programs = triton.cdiv(geom.rows, rows_per_program)
    dx = _alloc.empty(x.shape, dtype=x.dtype, device=x.device) if compute_dx else None
    dw = _alloc.empty((programs, geom.width), dtype=torch.float32, device=x.device)
    db = _alloc.empty((programs, geom.width), dtype=torch.float32, device=x.device)
    with _alloc.device_guard(x):
        _smn_bwd_kernel[(programs,)](
            x, weight.contiguous(), dy, mean, rstd, dx if compute_dx else dy, dw, db,
            x.stride(0), x.stride(1), x.stride(2),
            geom.rows, rows_per_program, geom.tokens_out, geom.out_grid[1], geom.grid_w,
            geom.grid_h * geom.grid_w, geom.channels,
            COMPUTE_DX=compute_dx, **_meta(geom),
        )
    return dx, dw.sum(0), db.sum(0)
