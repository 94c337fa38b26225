"""Triton kernels for pixel shuffle + token merge (avg or per-channel weighted) + LayerNorm.

The merge + LayerNorm kernels here serve two ops: ``shuffle_merge_norm`` (avg merge, the
launchers ``forward``/``backward`` at the end) and ``compress_project`` (which adds the
learnable dwconv merge and, with an identity geometry, the LayerNorm after its conv GEMM).

Addressing: ``U (rows, merge*W)`` is the *virtual* matrix of merge windows (row = output
token, columns = the window's pixel-shuffled tokens of width ``W = r*r*C`` concatenated in
row-major member order). U is never materialised: x's address of ``U[row, col]`` is
``_u_row_off(row) + _u_col_off(col)``; segment k = di*r + dj of a shuffled token is
channel-contiguous in ViT patch (i*r + di, j*r + dj), as transformers' pixel_shuffle lays it
out. One program owns one output row (forward) or a contiguous run of rows (backward), held
as an (r*r, next_pow2(C)) fp32 tile: x is read once, the output written once, statistics and
accumulations are fp32. Windows tile the grid, so the backward scatters dx without atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _alloc
from .._validation import ShuffleGeometry
from ..dispatch import forced_gpu_configs

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
def _seg_off(
    m,  # window member (a constexpr in every caller)
    seg,  # (R2P,) segment k = di*R + dj of the pixel-shuffled token
    grid_w,
    stride_n,
    R: tl.constexpr,
    MW: tl.constexpr,
):
    # x offset, from the window's top-left patch, of the patch holding segment seg of member m.
    # Kept apart from the channel so that the channel index stays contiguous (16-byte accesses).
    cell = ((m // MW) * R + seg // R) * grid_w + (m % MW) * R + seg % R
    return cell.to(tl.int64) * stride_n


@triton.jit
def _merged_row(
    x_ptr,  # (tiles, grid_h*grid_w, C), any strides
    mw_ptr,  # (MH*MW, W) dwconv merge weight; unused for avg
    mb_ptr,  # (W,) merge bias; unused unless HAS_MB
    base,  # int64 x offset of the row's window (from _u_row_off)
    seg,  # (R2P,) segment index
    c,  # (BLOCK_C,) channel index within a segment
    mask,  # (R2P, BLOCK_C)
    C,
    grid_w,
    stride_xn,
    stride_xc,
    R: tl.constexpr,
    R2P: tl.constexpr,
    MH: tl.constexpr,
    MW: tl.constexpr,
    MODE: tl.constexpr,  # 0 avg, 1 dwconv
    HAS_MB: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # The merged row as an fp32 (R*R, C) tile: segment k of each window member is contiguous
    # in patch (i*R + k//R, j*R + k%R), so each member costs R*R contiguous loads.
    width = R * R * C
    ch = seg[:, None] * C + c[None, :]
    acc = tl.zeros((R2P, BLOCK_C), dtype=tl.float32)
    for m in tl.static_range(MH * MW):
        off = base + _seg_off(m, seg, grid_w, stride_xn, R, MW)[:, None] + c[None, :].to(tl.int64) * stride_xc
        xm = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
        if MODE == 1:
            xm *= tl.load(mw_ptr + m * width + ch, mask=mask, other=0.0).to(tl.float32)
        else:
            # Average as a sum of quarters/halves: exact (a power of two), the same rounding as
            # dividing the sum, and the sum of finite members cannot overflow.
            xm *= 1.0 / (MH * MW)
        acc += xm
    if HAS_MB:
        acc += tl.load(mb_ptr + ch, mask=mask, other=0.0).to(tl.float32)
    return acc


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
    base = _u_row_off(row, tokens_out, out_w, grid_w, stride_xt, stride_xn, R, MH, MW)
    acc = _merged_row(x_ptr, mw_ptr, mb_ptr, base, seg, c, mask, C, grid_w, stride_xn, stride_xc,
                      R, R2P, MH, MW, MODE, HAS_MB, BLOCK_C)
    # Statistics of the row scaled by s = 2**floor(log2(max|row|)), clamped to [1, 2**126]: exact,
    # so rows of magnitude < 2 are untouched and larger ones give the same bits as unscaled
    # (where that did not overflow), while (x - mean)**2 of a row of any finite magnitude
    # cannot overflow. NaN/inf in the row propagate to its mean, hence to the whole row.
    amax = tl.max(tl.max(tl.abs(tl.where(mask, acc, 0.0)), axis=1), axis=0)
    s_bits = tl.minimum(tl.maximum(amax.to(tl.int32, bitcast=True) & 0x7F800000, 0x3F800000), 0x7E800000)
    s = s_bits.to(tl.float32, bitcast=True)
    inv_s = 1.0 / s
    u = acc * inv_s
    mean_u = tl.sum(tl.sum(u, axis=1), axis=0) / width
    d = tl.where(mask, u - mean_u, 0.0)
    rstd_u = 1.0 / tl.sqrt(tl.sum(tl.sum(d * d, axis=1), axis=0) / width + (eps * inv_s) * inv_s)
    w = tl.load(w_ptr + ch, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + ch, mask=mask, other=0.0).to(tl.float32)
    tl.store(h_ptr + row * width + ch, (d * rstd_u * w + b).to(h_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + row, mean_u * s)
    tl.store(rstd_ptr + row, rstd_u * inv_s)


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
    PREFETCH: tl.constexpr,  # load row i+1's x and dy while row i is reduced (avg merge)
):
    pid = tl.program_id(0)
    seg = tl.arange(0, R2P)
    c = tl.arange(0, BLOCK_C)
    mask = (seg < R * R)[:, None] & (c < C)[None, :]
    width = R * R * C
    ch = seg[:, None] * C + c[None, :]
    dw = tl.zeros((R2P, BLOCK_C), dtype=tl.float32)
    db = tl.zeros((R2P, BLOCK_C), dtype=tl.float32)
    dmb = tl.zeros((R2P, BLOCK_C), dtype=tl.float32)
    start = pid.to(tl.int64) * rows_per_program
    end = tl.minimum(start + rows_per_program, rows)
    if PREFETCH:
        # The first row's inputs; each iteration then issues the next row's loads before it
        # reduces its own, so at one 16-warp program per SM the HBM latency overlaps compute.
        # (The launcher gives every program at least one row.)
        first = _u_row_off(start, tokens_out, out_w, grid_w, stride_xt, stride_xn, R, MH, MW)
        acc_n = _merged_row(x_ptr, mw_ptr, mb_ptr, first, seg, c, mask, C, grid_w, stride_xn, stride_xc,
                            R, R2P, MH, MW, MODE, HAS_MB, BLOCK_C)
        dy_n = tl.load(dh_ptr + start * width + ch, mask=mask, other=0.0).to(tl.float32)
    for row in range(start, end):
        base = _u_row_off(row, tokens_out, out_w, grid_w, stride_xt, stride_xn, R, MH, MW)
        if PREFETCH:
            acc = acc_n
            dy = dy_n
            # The last iteration re-reads its own row (in bounds, unused): cheaper than a mask.
            nxt = tl.minimum(row + 1, end - 1)
            nbase = _u_row_off(nxt, tokens_out, out_w, grid_w, stride_xt, stride_xn, R, MH, MW)
            acc_n = _merged_row(x_ptr, mw_ptr, mb_ptr, nbase, seg, c, mask, C, grid_w, stride_xn,
                                stride_xc, R, R2P, MH, MW, MODE, HAS_MB, BLOCK_C)
            dy_n = tl.load(dh_ptr + nxt * width + ch, mask=mask, other=0.0).to(tl.float32)
        else:
            acc = _merged_row(x_ptr, mw_ptr, mb_ptr, base, seg, c, mask, C, grid_w, stride_xn, stride_xc,
                              R, R2P, MH, MW, MODE, HAS_MB, BLOCK_C)
            dy = tl.load(dh_ptr + row * width + ch, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row)
        xhat = tl.where(mask, (acc - tl.load(mean_ptr + row)) * rstd, 0.0)
        dw += dy * xhat
        db += dy
        if COMPUTE_DX or COMPUTE_DMW or COMPUTE_DMB:
            # The LayerNorm weight is re-read per row (an L1/L2 hit) rather than held: one
            # row tile fewer live, which is what keeps the 6B width from spilling.
            g = dy * tl.load(w_ptr + ch, mask=mask, other=0.0).to(tl.float32)
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
                        off = base + _seg_off(m, seg, grid_w, stride_xn, R, MW)[:, None] + c[None, :].to(tl.int64) * stride_xc
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
                        doff = dbase + _seg_off(m, seg, grid_w, C, R, MW)[:, None] + c[None, :]
                        tl.store(dx_ptr + doff, dxm.to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dw_ptr + pid * width + ch, dw, mask=mask)
    tl.store(db_ptr + pid * width + ch, db, mask=mask)
    if COMPUTE_DMB:
        tl.store(dmb_ptr + pid * width + ch, dmb, mask=mask)


# ----------------------------------------------------------------------------- launchers


def identity_geometry(rows: int, width: int) -> ShuffleGeometry:
    """A row-wise op on ``(rows, width)`` expressed as a shuffle geometry (no shuffle, no merge)."""
    return ShuffleGeometry(rows, 1, 1, width, 1, 1)


def _ln_meta(geom: ShuffleGeometry, backward: bool = False) -> dict:
    block_c = triton.next_power_of_2(geom.channels)
    r2p = triton.next_power_of_2(geom.r * geom.r)
    mh, mw = geom.window
    # About 16 fp32 values per thread keeps the forward's row tile in registers without
    # spilling; the backward holds several row tiles at once (x-hat, dy, the dgamma/dbeta
    # accumulators, ...), so it spreads them over twice the threads (8 values each).
    num_warps = max(1, min(16, (block_c * r2p) // (256 if backward else 512)))
    return dict(R=geom.r, R2P=r2p, MH=mh, MW=mw, BLOCK_C=block_c, num_warps=num_warps)


def bwd_programs_per_sm(geom: ShuffleGeometry) -> int:
    """Backward programs the grid puts on each SM. One program holds a few row tiles in
    registers (``_ln_meta``'s warps keep them near 16 fp32 values per thread); two fit an H100 SM
    when its register count is <= 128 at 8 warps (65536 registers / 256 threads / 2).
    ``tests/compile_triton_sm90.py`` checks the compiled kernel against this number."""
    return 2 if _ln_meta(geom, backward=True)["num_warps"] <= 8 else 1


def bwd_prefetch(geom: ShuffleGeometry, dwconv: bool) -> bool:
    """Whether the backward prefetches the next row (``PREFETCH``). The avg merge
    (shuffle_merge_norm, the conv path's LayerNorm) at the ViT-300M width (W = 4096: 8 fp32
    values per thread per row tile at 16 warps) runs one program per SM at 94-101 registers:
    the next row's merged x and dy fit under the 128 a 16-warp block may use (106-116 compiled),
    so their loads overlap this row's reductions. Wider rows (W = 12800: 32 values) already
    spill, and the dwconv backward with its merge-weight gradients is at 128 registers: no room."""
    meta = _ln_meta(geom, backward=True)
    return not dwconv and meta["BLOCK_C"] * meta["R2P"] <= 8 * 32 * meta["num_warps"]


H100_SMS = 132
"""SMs assumed for the GPU grid when FCOT_GPU_CONFIGS=1 runs it without a GPU."""


def _num_programs(x: torch.Tensor, geom: ShuffleGeometry) -> int:
    rows = geom.rows
    if x.device.type == "cuda" or forced_gpu_configs():
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.device.type == "cuda" else H100_SMS
        return max(1, min(rows, bwd_programs_per_sm(geom) * sms))
    return max(1, min(rows, 4))  # interpreter: few programs, same code path


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
    ln_weight, ln_bias = ln_weight.contiguous(), ln_bias.contiguous()
    merge_weight = merge_weight.contiguous() if merge_weight is not None else None
    merge_bias = merge_bias.contiguous() if merge_bias is not None else None
    with _alloc.device_guard(x):
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
    programs = _num_programs(x, geom)
    rows_per_program = triton.cdiv(geom.rows, programs)
    programs = triton.cdiv(geom.rows, rows_per_program)
    members = geom.merge
    f32 = dict(dtype=torch.float32, device=x.device)
    dx = _alloc.empty(x.shape, dtype=x.dtype, device=x.device) if compute_dx else None
    dw = _alloc.empty((programs, geom.width), **f32)
    db = _alloc.empty((programs, geom.width), **f32)
    dmw = _alloc.empty((programs, members, geom.width), **f32) if compute_dmw else None
    dmb = _alloc.empty((programs, geom.width), **f32) if compute_dmb else None
    ln_weight, dh = ln_weight.contiguous(), dh.contiguous()
    merge_weight = merge_weight.contiguous() if merge_weight is not None else None
    merge_bias = merge_bias.contiguous() if merge_bias is not None else None
    with _alloc.device_guard(x):
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
            PREFETCH=bwd_prefetch(geom, merge_weight is not None),
            **_ln_meta(geom, backward=True),
        )
    return (
        dx,
        dw.sum(0),
        db.sum(0),
        dmw.sum(0) if dmw is not None else None,
        dmb.sum(0) if dmb is not None else None,
    )


def forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, geom: ShuffleGeometry, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """shuffle_merge_norm: ``out (tiles, tokens_out, W)`` in x.dtype and fp32 ``mean``/``rstd`` per row."""
    out, mean, rstd = merge_ln_forward(x, None, None, weight, bias, geom, eps)
    return out.view(geom.tiles, geom.tokens_out, geom.width), mean, rstd


def backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    geom: ShuffleGeometry,
    compute_dx: bool,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """shuffle_merge_norm: ``dx`` (contiguous, x.dtype; None unless ``compute_dx``) and fp32 ``dweight``/``dbias``."""
    dx, dw, db, _, _ = merge_ln_backward(
        dy.reshape(geom.rows, geom.width), x, None, None, weight, mean, rstd, geom,
        compute_dx=compute_dx, compute_dmw=False, compute_dmb=False,
    )
    return dx, dw, db
