"""Benchmark of fcot_kernels.compress_project (pixel shuffle + merge + InternVL projector).

Providers: ``eager`` is the transformers-style path (pixel shuffle, then the merge as separate
pooling / conv ops, then LayerNorm -> Linear -> GELU -> Linear as separate modules' ops: the
reference), ``compile`` is torch.compile of it (default mode), ``triton`` the fused op. Every
weight and x require grad in backward/full (the re-training setting of FCoT-VL is a subset).

FLOPs count the GEMMs only: forward ``2*rows*(merge*W*W [conv] + W*H + H*O)``; backward twice
that (data and weight gradients); full three times. Run ``python -m bench.run --op
compress_project`` for CSV/JSON or ``pytest bench/bench_compress_project.py --benchmark-only``.
"""

from __future__ import annotations

import sys

import pytest
import torch

import fcot_kernels as fk
from fcot_kernels.reference import avg_merge_weight, compress_project_ref

from .harness import Case, MODES, Skip, bench_shapes, eager_and_compiled, make_mode_fn, run_pytest_benchmark
from .models import MODELS, TILE_COUNTS, TILE_GRID

OP = "compress_project"
PROVIDERS = ("eager", "compile", "triton")
"""No CUDA C++ kernel for this op: the memory-bound prologue lives in Triton kernels."""
VARIANTS = ((1, "avg"), (2, "avg"), (2, "conv"), (4, "avg"), (4, "conv"))
SHAPES = {
    f"{name}/{tiles}t/merge{merge}/{mode}": {
        "tiles": tiles, "grid": TILE_GRID, "channels": MODELS[name].vit_hidden,
        "hidden": MODELS[name].llm_hidden, "out": MODELS[name].llm_hidden, "merge": merge, "mode": mode,
    }
    for name in ("InternVL2-1B", "InternVL2-2B", "InternVL2-8B", "InternVL2-26B")
    for tiles in TILE_COUNTS
    for merge, mode in VARIANTS
}
CPU_SHAPES = ["InternVL2-1B/1t/merge2/avg", "InternVL2-1B/1t/merge2/conv"]
"""What a CPU run times (the GPU run takes every shape)."""
TARGET_SHAPES = ["InternVL2-8B/104t/merge2/conv"]
"""The performance target of the compress-and-project issue."""


def flops(shape: dict, mode: str) -> float:
    tiles, (gh, gw), c, merge = shape["tiles"], shape["grid"], shape["channels"], shape["merge"]
    rows = tiles * gh * gw // 4 // merge
    width, hidden, out = 4 * c, shape["hidden"], shape["out"]
    fwd = 2 * rows * (width * hidden + hidden * out + (merge * width * width if shape["mode"] == "conv" else 0))
    return {"forward": fwd, "backward": 2 * fwd, "full": 3 * fwd}[mode]


def setup(shape: dict, provider: str, mode: str, dtype: torch.dtype, device: torch.device) -> Case:
    if provider == "triton" and device.type != "cuda":
        raise Skip("no GPU (interpreter timings mean nothing)")
    tiles, (gh, gw), c, merge, kind = shape["tiles"], shape["grid"], shape["channels"], shape["merge"], shape["mode"]
    width, hidden, out = 4 * c, shape["hidden"], shape["out"]
    grad = mode != "forward"

    def param(*size, std=1.0, mean=0.0):
        return (mean + std * torch.randn(*size, device=device)).to(dtype).requires_grad_(grad)

    x = torch.randn(tiles, gh * gw, c, device=device, dtype=dtype, requires_grad=grad)
    p = dict(
        ln_weight=param(width, std=0.1, mean=1.0), ln_bias=param(width, std=0.1),
        w1=param(hidden, width, std=width**-0.5), b1=param(hidden, std=0.1),
        w2=param(out, hidden, std=hidden**-0.5), b2=param(out, std=0.1),
    )
    if kind != "avg":
        mw = avg_merge_weight(kind, merge, width, device=device)
        p["merge_weight"] = (mw + 0.01 * torch.randn_like(mw)).to(dtype).requires_grad_(grad)
        p["merge_bias"] = param(width, std=0.1)
    kwargs = dict(grid=(gh, gw), scale=0.5, merge=merge, mode=kind, **p)
    if provider in ("eager", "compile"):
        ref = eager_and_compiled(compress_project_ref, provider)
        forward = lambda: ref(x, **kwargs)  # noqa: E731
    else:
        forward = lambda: fk.compress_project(x, backend=provider, **kwargs)  # noqa: E731
    weights = sum(t.numel() for t in p.values()) * x.element_size()
    rows = tiles * gh * gw // 4 // merge
    moved = x.numel() * x.element_size() + rows * out * x.element_size() + weights
    return Case(fn=make_mode_fn(forward, mode, [x, *p.values()]), bytes=moved, flops=flops(shape, mode))



@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", bench_shapes(TARGET_SHAPES, CPU_SHAPES[:1]))
def bench_compress_project(benchmark, shape, provider, mode):
    run_pytest_benchmark(benchmark, sys.modules[__name__], shape, provider, mode)
