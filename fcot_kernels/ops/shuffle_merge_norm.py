"""``shuffle_merge_norm``: pixel shuffle + token merge + LayerNorm as one fused op.

The forward and backward are registered as ``torch.library`` custom ops (``fcot::smn_fwd``,
``fcot::smn_bwd``) so that torch.compile treats them as opaque nodes with known output
shapes, and autograd runs the fused backward.
"""

from __future__ import annotations

import importlib

import torch

from .._validation import ShuffleGeometry, check_eps, check_tensor, shuffle_geometry
from ..dispatch import resolve
from ..reference.shuffle_merge_norm import shuffle_merge_norm_ref


# The CUDA kernels hold a row in registers, at most 32 vectors per thread at 512 threads (16,384
# elements on the scalar, unaligned path). This bound comes from the former shared-memory
# kernels (3 fp32 rows in 163 KiB) and stays below that; raising it waits for a GPU run of the
# register-resident kernels. Checked at forward time so that auto never picks a forward whose
# backward cannot run.
CUDA_MAX_WIDTH = (163 * 1024 // 4 - 32) // 3


def _impl(backend: str):
    return importlib.import_module(f"fcot_kernels.{backend}.shuffle_merge_norm")


def _geom(x: torch.Tensor, grid_h: int, grid_w: int, r: int, merge: int) -> ShuffleGeometry:
    return ShuffleGeometry(x.shape[0], grid_h, grid_w, x.shape[2], r, merge)


@torch.library.custom_op("fcot::smn_fwd", mutates_args=())
def _smn_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    grid_h: int,
    grid_w: int,
    r: int,
    merge: int,
    eps: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _impl(backend).forward(x, weight, bias, _geom(x, grid_h, grid_w, r, merge), eps)


@_smn_fwd.register_fake
def _(x, weight, bias, grid_h, grid_w, r, merge, eps, backend):
    geom = _geom(x, grid_h, grid_w, r, merge)
    out = x.new_empty((geom.tiles, geom.tokens_out, geom.width))
    stats = x.new_empty((geom.rows,), dtype=torch.float32)
    return out, stats, torch.empty_like(stats)


@torch.library.custom_op("fcot::smn_bwd", mutates_args=())
def _smn_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    grid_h: int,
    grid_w: int,
    r: int,
    merge: int,
    backend: str,
    compute_dx: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    geom = _geom(x, grid_h, grid_w, r, merge)
    dx, dw, db = _impl(backend).backward(dy, x, weight, mean, rstd, geom, compute_dx)
    return (dx if dx is not None else x.new_empty(0)), dw, db


@_smn_bwd.register_fake
def _(dy, x, weight, mean, rstd, grid_h, grid_w, r, merge, backend, compute_dx):
    dx = x.new_empty(x.shape if compute_dx else (0,))
    dw = weight.new_empty(weight.shape, dtype=torch.float32)
    return dx, dw, torch.empty_like(dw)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, grid_h, grid_w, r, merge, _eps, backend = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.args = (grid_h, grid_w, r, merge, backend)


def _backward(ctx, dy, _dmean, _drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    dx, dw, db = _smn_bwd(dy, x, weight, mean, rstd, *ctx.args, need_x)
    return (
        dx if need_x else None,
        dw.to(weight.dtype) if need_w else None,
        db.to(weight.dtype) if need_b else None,
        None, None, None, None, None, None,
    )


_smn_fwd.register_autograd(_backward, setup_context=_setup_context)


def shuffle_merge_norm(
    x: torch.Tensor,
    *,
    grid: tuple[int, int],
    weight: torch.Tensor,
    bias: torch.Tensor,
    scale: float = 0.5,
    merge: int = 1,
    eps: float = 1e-5,
    backend: str | None = None,
) -> torch.Tensor:
    """Pixel shuffle + token merge + LayerNorm, fused: ViT patch tokens in, normalised
    (compressed) visual tokens out, ready for the projector's first Linear.

    Args:
        x: ``(tiles, grid_h*grid_w, C)`` ViT patch tokens without the CLS token, row-major
            over the patch grid; fp32, fp16 or bf16; any strides.
        grid: ``(grid_h, grid_w)``, e.g. ``(32, 32)`` for 448px tiles and 14px patches.
        weight, bias: LayerNorm affine parameters, ``(C / scale**2,)``, on ``x``'s device;
            fp32, fp16 or bf16 (need not match ``x``: fp32 parameters with bf16 activations
            are fine).
        scale: pixel-shuffle scale ``1/r`` (0.5 in InternVL): the grid shrinks by ``r`` in
            each direction and the channels grow by ``r*r``, exactly as transformers'
            ``InternVLModel.pixel_shuffle`` lays them out.
        merge: tokens averaged on the shuffled grid: 1 (none), 2 (1x2 windows along the last
            grid axis) or 4 (2x2 windows).
        eps: LayerNorm epsilon, in ``[1e-20, 1]``. Statistics are fp32 and do not overflow for
            finite rows of any magnitude; a row holding NaN/inf comes out all NaN.
        backend: ``None`` (process default), ``"auto"``, ``"reference"``, ``"triton"`` or
            ``"cuda"``; see :mod:`fcot_kernels.dispatch`.

    Returns:
        ``(tiles, grid_h*grid_w*scale**2/merge, C/scale**2)`` in ``x.dtype``, tokens row-major
        over the merged grid.

    The kernels read ``x`` once and write the output once (no shuffled or merged tensor in
    between), keep per-row mean/rstd in fp32 for the backward, and accumulate in fp32. The
    backward returns gradients for ``x``, ``weight`` and ``bias`` (each only when required;
    a frozen ``x`` skips writing ``dx``).
    """
    geom = shuffle_geometry(x, grid, scale, merge)  # also checks x's rank and dtype
    check_tensor("weight", weight, shape=(geom.width,), device=x.device)
    check_tensor("bias", bias, shape=(geom.width,), device=x.device)
    eps = check_eps(eps)
    unfit = None
    if geom.width > CUDA_MAX_WIDTH:
        unfit = f"row width C/scale**2={geom.width} exceeds the CUDA kernel's {CUDA_MAX_WIDTH} (shared memory); use 'triton'"
    name = resolve("shuffle_merge_norm", backend, x, has_cuda=True, cuda_unfit=unfit)
    if name == "reference":
        return shuffle_merge_norm_ref(x, grid=grid, weight=weight, bias=bias, scale=scale, merge=merge, eps=eps)
    out, _, _ = _smn_fwd(x, weight, bias, geom.grid_h, geom.grid_w, geom.r, geom.merge, eps, name)
    return out
