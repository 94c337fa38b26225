"""Pure-PyTorch reference of pixel shuffle + token merge + LayerNorm."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._validation import ShuffleGeometry, shuffle_geometry


def pixel_shuffle_ref(feats: torch.Tensor, r: int) -> torch.Tensor:
    """``(T, H, W, C) -> (T, H/r, W/r, C*r*r)`` exactly as transformers'
    ``InternVLModel.pixel_shuffle(feats, scale_factor=1/r)``: output channel block
    ``di*r + dj`` of cell (i, j) holds patch (i*r + di, j*r + dj)."""
    t, h, w, c = feats.shape
    y = feats.reshape(t, h, w // r, c * r).permute(0, 2, 1, 3)
    y = y.reshape(t, w // r, h // r, c * r * r).permute(0, 2, 1, 3)
    return y.contiguous()


def merge_windows_ref(y: torch.Tensor, geom: ShuffleGeometry) -> torch.Tensor:
    """``(T, H', W', C') -> (T, H'/mh, W'/mw, mh*mw, C')``: the members of each merge window in
    row-major order (1x1, 1x2 or 2x2 windows)."""
    t, h, w, c = y.shape
    mh, mw = geom.window
    y = y.reshape(t, h // mh, mh, w // mw, mw, c).permute(0, 1, 3, 2, 4, 5)
    return y.reshape(t, h // mh, w // mw, mh * mw, c)


def shuffle_merge_ref(x: torch.Tensor, geom: ShuffleGeometry) -> torch.Tensor:
    """Pixel shuffle then average-merge: ``(T, gh*gw, C) -> (T, tokens_out, C/scale**2)``."""
    y = pixel_shuffle_ref(x.reshape(geom.tiles, geom.grid_h, geom.grid_w, geom.channels), geom.r)
    # The mean as a sum of halves/quarters: exact scaling, so the same rounding as sum / n, and
    # finite members of any magnitude cannot overflow the sum.
    y = (merge_windows_ref(y, geom) * (1.0 / geom.merge)).sum(dim=3)
    return y.reshape(geom.tiles, geom.tokens_out, geom.width)


LARGE_ROW = 2.0**40
"""Rows whose largest magnitude reaches this are rescaled before ``F.layer_norm``."""


def layer_norm_ref(z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """``F.layer_norm`` over the last dimension that does not overflow for finite rows of any
    magnitude, with no data-dependent branch (no host sync, no graph break under torch.compile).

    Rows below :data:`LARGE_ROW` in magnitude are passed as they are (bit-identical to plain
    ``F.layer_norm``). A larger row (where ``(z - mean)**2`` summed over the row can overflow
    fp32, e.g. a spread of 1e19) is divided by the power of two that brings its largest
    magnitude into ``[2**20, 2**21)``: exact, LayerNorm is scale-invariant, and ``eps`` stays
    negligible against the variance there exactly as it is for the unscaled row (the kernels
    rescale ``eps`` instead). A row holding NaN or inf gives NaN in every element.
    """
    amax = z.detach().abs().amax(-1, keepdim=True).float()
    big = (amax >= LARGE_ROW) & torch.isfinite(amax)
    _, exp = torch.frexp(torch.where(big, amax, torch.ones_like(amax)))
    scale = torch.ldexp(torch.ones_like(amax), torch.where(big, exp - 21, torch.zeros_like(exp)))
    return F.layer_norm(z / scale.to(z.dtype), (z.shape[-1],), weight, bias, eps)


def shuffle_merge_norm_ref(
    x: torch.Tensor,
    *,
    grid: tuple[int, int],
    weight: torch.Tensor,
    bias: torch.Tensor,
    scale: float = 0.5,
    merge: int = 1,
    eps: float = 1e-5,
    upcast: bool = False,
) -> torch.Tensor:
    """Reference for :func:`fcot_kernels.shuffle_merge_norm`.

    Computes in the input dtype like eager PyTorch would, or in fp32 when ``upcast`` (the
    output is cast back to ``x.dtype`` either way).
    """
    geom = shuffle_geometry(x, grid, scale, merge)
    dtype = x.dtype
    compute = torch.float32 if upcast else dtype
    z = shuffle_merge_ref(x.to(compute), geom)
    out = layer_norm_ref(z, weight.to(compute), bias.to(compute), eps)
    return out.to(dtype)
