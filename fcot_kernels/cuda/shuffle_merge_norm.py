"""Launchers of the CUDA C++ shuffle_merge_norm kernels: allocate, pass pointers/strides/stream."""

from __future__ import annotations

import torch

from .. import _alloc
from .._validation import ShuffleGeometry
from . import dtype_code, load, stream_handle


def _x_for_kernel(x: torch.Tensor) -> torch.Tensor:
    # The kernel takes tile/token strides but needs unit channel stride for vector loads.
    return x if x.stride(2) == 1 else x.contiguous()


def _shape_args(x: torch.Tensor, geom: ShuffleGeometry) -> tuple:
    return (dtype_code(x.dtype), geom.tiles, geom.grid_h, geom.grid_w, geom.channels, geom.r,
            geom.merge, x.stride(0), x.stride(1))


def forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, geom: ShuffleGeometry, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ext = load()
    x = _x_for_kernel(x)
    w = weight.to(torch.float32).contiguous()
    b = bias.to(torch.float32).contiguous()
    out = _alloc.empty((geom.tiles, geom.tokens_out, geom.width), dtype=x.dtype, device=x.device)
    mean = _alloc.empty((geom.rows,), dtype=torch.float32, device=x.device)
    rstd = _alloc.empty((geom.rows,), dtype=torch.float32, device=x.device)
    with _alloc.device_guard(x):
        ext.shuffle_merge_norm_fwd(
            *_shape_args(x, geom), x.data_ptr(), w.data_ptr(), b.data_ptr(), out.data_ptr(),
            mean.data_ptr(), rstd.data_ptr(), eps, stream_handle(x.device),
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
    ext = load()
    x = _x_for_kernel(x)
    dy = dy.contiguous()
    w = weight.to(torch.float32).contiguous()
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    # The kernel's launch bounds give 2 resident blocks per SM for 16-bit inputs, 1 for fp32
    # (tests/compile_triton_sm90.py checks the compiled registers against this).
    blocks = max(1, min(geom.rows, (2 if x.element_size() == 2 else 1) * sms))
    dx = _alloc.empty(x.shape, dtype=x.dtype, device=x.device) if compute_dx else None
    dw = _alloc.empty((blocks, geom.width), dtype=torch.float32, device=x.device)
    db = _alloc.empty((blocks, geom.width), dtype=torch.float32, device=x.device)
    with _alloc.device_guard(x):
        ext.shuffle_merge_norm_bwd(
            *_shape_args(x, geom), x.data_ptr(), w.data_ptr(), dy.data_ptr(), mean.data_ptr(),
            rstd.data_ptr(), dx.data_ptr() if dx is not None else 0, dw.data_ptr(), db.data_ptr(),
            blocks, stream_handle(x.device),
        )
    return dx, dw.sum(0), db.sum(0)
