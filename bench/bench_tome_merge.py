"""Benchmark of fcot_kernels.tome_merge (one ToMe round, r = T/2, spatial order kept).

Shapes: 104 (also 1 and 13) tiles of ViT tokens at the InternViT-300M width C = 1024, with
256, 1024 (one 448px tile's patch grid) and 4096 tokens per tile, plus 256 tokens at the
projector input width 4096 (after the pixel shuffle). Bytes moved at least: x read once, the
merged tokens, merged sizes and the source map written once (forward); dy read and dx written
(backward). FLOPs: the similarity, ``2 * |A| * |B| * C`` per tile. The peer ``tome`` (ToMe's
``bipartite_soft_matching`` + ``merge_wavg``, output order [unmerged A, B]) runs when importable.
Run ``python -m bench.run --op tome_merge``.
"""

from __future__ import annotations

import sys

import importlib.util

import pytest
import torch

import fcot_kernels as fk
from fcot_kernels.reference import tome_merge_ref

from .harness import (
    BASE_PROVIDERS, MODES, REFERENCE_PROVIDERS, Case, Missing, Skip, bench_shapes,
    eager_and_compiled, make_mode_fn, run_pytest_benchmark,
)
from .models import MODELS, TILE_COUNTS, TILE_GRID, VIT_WIDTHS

OP = "tome_merge"
PROVIDERS = (*BASE_PROVIDERS, "tome")
_VIT_TOKENS = TILE_GRID[0] * TILE_GRID[1]  # 1024 patch tokens per tile
_TOKENS = (_VIT_TOKENS // 4, _VIT_TOKENS, _VIT_TOKENS * 4)  # 256, 1024, 4096
_PROJ_IN = MODELS["InternVL2-8B"].proj_in  # 4096: pixel-shuffled tokens entering the projector
SHAPES = {
    **{
        f"InternViT-300M/{tiles}t/T{t}": {"tiles": tiles, "tokens": t, "channels": VIT_WIDTHS["InternViT-300M"]}
        for tiles in TILE_COUNTS
        for t in _TOKENS
    },
    **{f"proj_in/{tiles}t/T256": {"tiles": tiles, "tokens": 256, "channels": _PROJ_IN} for tiles in TILE_COUNTS},
}
CPU_SHAPES = ["InternViT-300M/1t/T256", "InternViT-300M/13t/T256"]
"""What a CPU run times (the GPU run takes every shape)."""
TARGET_SHAPES = ["InternViT-300M/104t/T1024", "InternViT-300M/104t/T4096", "proj_in/104t/T256"]
"""The issue's target (1024 tokens per tile, 104 tiles) and the ends of its 256..4096 range."""


def _tome_peer():
    """ToMe's own merge (github.com/facebookresearch/ToMe), when installed."""
    if importlib.util.find_spec("tome") is None:
        raise Missing("the ToMe package (import tome, github.com/facebookresearch/ToMe) is not installed")
    from tome.merge import bipartite_soft_matching, merge_wavg

    def run(x, r):
        merge, _ = bipartite_soft_matching(x, r, class_token=False, distill_token=False)
        return merge_wavg(merge, x)[0]
    return run


def setup(shape: dict, provider: str, mode: str, dtype: torch.dtype, device: torch.device) -> Case:
    if provider == "tome":
        _tome_peer()  # a peer that is not installed is reported missing on every device
    if provider in ("triton", "cuda") and device.type != "cuda":
        raise Skip("no GPU (interpreter timings mean nothing)")
    if provider == "cuda" and not fk.backends()["cuda"].available:
        raise Skip(fk.backends()["cuda"].reason)
    tiles, t, c = shape["tiles"], shape["tokens"], shape["channels"]
    r = t // 2
    x = torch.randn(tiles, t, c, device=device, dtype=dtype, requires_grad=mode != "forward")
    if provider in REFERENCE_PROVIDERS:
        ref = eager_and_compiled(tome_merge_ref, provider)
        forward = lambda: ref(x, r=r)[0]  # noqa: E731
    elif provider == "tome":
        peer = _tome_peer()
        forward = lambda: peer(x, r)  # noqa: E731
    else:
        forward = lambda: fk.tome_merge(x, r=r, backend=provider)[0]  # noqa: E731
    n_in = x.numel() * x.element_size()
    n_out = n_in * (t - r) // t + tiles * (t - r) * 4 + tiles * t * 8
    n_dy = n_in * (t - r) // t  # backward: dy read, dx written
    moved = {"forward": n_in + n_out, "backward": n_dy + n_in, "full": 2 * n_in + n_out + n_dy}[mode]
    flops = 2 * ((t + 1) // 2) * (t // 2) * c * tiles if mode != "backward" else 0
    return Case(fn=make_mode_fn(forward, mode, [x]), bytes=moved, flops=flops)



@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", bench_shapes(TARGET_SHAPES[:1], CPU_SHAPES[:1]))
def bench_tome_merge(benchmark, shape, provider, mode):
    run_pytest_benchmark(benchmark, sys.modules[__name__], shape, provider, mode)
