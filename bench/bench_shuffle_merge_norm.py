"""Benchmark of fcot_kernels.shuffle_merge_norm (pixel shuffle + merge + LayerNorm).

Bytes moved at least: x read once, the output written once (forward); x and dy read, dx
written (backward). Run ``python -m bench.run --op shuffle_merge_norm`` for CSV/JSON, or
``pytest bench/bench_shuffle_merge_norm.py --benchmark-only`` for pytest-benchmark.
"""

from __future__ import annotations

import sys

import pytest
import torch

import fcot_kernels as fk
from fcot_kernels.reference import shuffle_merge_norm_ref

from .harness import (
    BASE_PROVIDERS, MODES, REFERENCE_PROVIDERS, Case, Skip, bench_shapes, eager_and_compiled,
    make_mode_fn, run_pytest_benchmark,
)
from .models import TILE_COUNTS, TILE_GRID, VIT_WIDTHS

OP = "shuffle_merge_norm"
PROVIDERS = BASE_PROVIDERS
SHAPES = {
    f"{vit}/{tiles}t/merge{merge}": {"tiles": tiles, "grid": TILE_GRID, "channels": c, "merge": merge}
    for vit, c in VIT_WIDTHS.items()
    for tiles in TILE_COUNTS
    for merge in (1, 2, 4)
}
CPU_SHAPES = ["InternViT-300M/1t/merge1", "InternViT-300M/1t/merge2", "InternViT-6B/1t/merge4"]
"""What a CPU run times (the GPU run takes every shape)."""
TARGET_SHAPES = ["InternViT-300M/104t/merge2", "InternViT-6B/104t/merge4"]
"""Shapes named in the performance target of the foundation issue."""


def setup(shape: dict, provider: str, mode: str, dtype: torch.dtype, device: torch.device) -> Case:
    if provider in ("triton", "cuda") and device.type != "cuda":
        raise Skip("no GPU (interpreter timings mean nothing)")
    if provider == "cuda" and not fk.backends()["cuda"].available:
        raise Skip(fk.backends()["cuda"].reason)
    tiles, (gh, gw), c, merge = shape["tiles"], shape["grid"], shape["channels"], shape["merge"]
    width = 4 * c
    x = torch.randn(tiles, gh * gw, c, device=device, dtype=dtype, requires_grad=mode != "forward")
    w = (1 + 0.1 * torch.randn(width, device=device)).requires_grad_(mode != "forward")
    b = (0.1 * torch.randn(width, device=device)).requires_grad_(mode != "forward")
    kwargs = dict(grid=(gh, gw), weight=w, bias=b, scale=0.5, merge=merge)
    if provider in REFERENCE_PROVIDERS:
        ref = eager_and_compiled(shuffle_merge_norm_ref, provider)
        forward = lambda: ref(x, **kwargs)  # noqa: E731
    else:
        forward = lambda: fk.shuffle_merge_norm(x, backend=provider, **kwargs)  # noqa: E731
    n_in = x.numel() * x.element_size()
    n_out = n_in // merge
    moved = {"forward": n_in + n_out, "backward": 2 * n_in + n_out, "full": 3 * n_in + 2 * n_out}[mode]
    return Case(fn=make_mode_fn(forward, mode, [x, w, b]), bytes=moved)



@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", bench_shapes(TARGET_SHAPES, CPU_SHAPES[:1]))
def bench_shuffle_merge_norm(benchmark, shape, provider, mode):
    run_pytest_benchmark(benchmark, sys.modules[__name__], shape, provider, mode)
