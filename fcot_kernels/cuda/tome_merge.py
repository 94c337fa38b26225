"""Launchers of the CUDA C++ ToMe kernels (match, merge, unmerge): allocate, pass
pointers/sizes/strides and the current stream. Same contract as ``fcot_kernels.triton.tome_merge``."""

from __future__ import annotations

import torch

from .. import _alloc
from . import dtype_code, load, stream_handle


def _unit_channel_stride(t: torch.Tensor) -> torch.Tensor:
    # The kernels take batch/token strides but read channels contiguously.
    return t if t.stride(2) == 1 else t.contiguous()


def match(metric: torch.Tensor, protected: int, n_a: int, n_b: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(score (batch, n_a) fp32, index (batch, n_a) int64)``; needs ``n_b >= 1``."""
    ext = load()
    metric = _unit_channel_stride(metric)
    batch, tokens, channels = metric.shape
    score = _alloc.empty((batch, n_a), dtype=torch.float32, device=metric.device)
    index = _alloc.empty((batch, n_a), dtype=torch.int64, device=metric.device)
    with _alloc.device_guard(metric):
        ext.tome_match(
            dtype_code(metric.dtype), batch, tokens, channels, protected, metric.stride(0), metric.stride(1),
            metric.data_ptr(), score.data_ptr(), index.data_ptr(), eps, stream_handle(metric.device),
        )
    return score, index


def merge(
    x: torch.Tensor, size: torch.Tensor, order: torch.Tensor, offsets: torch.Tensor, tokens_out: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(merged (batch, tokens_out, C) in x.dtype, merged_size (batch, tokens_out) fp32)``."""
    ext = load()
    x = _unit_channel_stride(x)
    batch, tokens, channels = x.shape
    size, order, offsets = size.contiguous(), order.contiguous(), offsets.contiguous()
    out = _alloc.empty((batch, tokens_out, channels), dtype=x.dtype, device=x.device)
    out_size = _alloc.empty((batch, tokens_out), dtype=torch.float32, device=x.device)
    with _alloc.device_guard(x):
        ext.tome_merge_fwd(
            dtype_code(x.dtype), batch, tokens, tokens_out, channels, x.stride(0), x.stride(1),
            x.data_ptr(), size.data_ptr(), order.data_ptr(), offsets.data_ptr(), out.data_ptr(),
            out_size.data_ptr(), stream_handle(x.device),
        )
    return out, out_size


def unmerge(dy: torch.Tensor, size: torch.Tensor, out_size: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """``dx (batch, tokens, C)`` in dy.dtype: the gradient of the merge with respect to x."""
    ext = load()
    dy = dy.contiguous()
    batch, tokens_out, channels = dy.shape
    tokens = source.shape[1]
    size, out_size, source = size.contiguous(), out_size.contiguous(), source.contiguous()
    dx = _alloc.empty((batch, tokens, channels), dtype=dy.dtype, device=dy.device)
    with _alloc.device_guard(dy):
        ext.tome_merge_bwd(
            dtype_code(dy.dtype), batch, tokens, tokens_out, channels, dy.data_ptr(), size.data_ptr(),
            out_size.data_ptr(), source.data_ptr(), dx.data_ptr(), stream_handle(dy.device),
        )
    return dx
