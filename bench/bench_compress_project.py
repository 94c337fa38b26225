"""Benchmark of fcot_kernels.compress_project (pixel shuffle + merge + InternVL projector).

Providers: ``eager`` is what a transformers model runs today: ``InternVLModel.pixel_shuffle``,
then the merge as a separate ``avg_pool2d`` / ``conv2d``, then transformers'
``InternVLMultiModalProjector`` (LayerNorm -> Linear -> GELU -> Linear) with the same weights;
``compile`` is torch.compile of that path (default mode); ``triton`` the fused op. Every
weight and x require grad in backward/full (the re-training setting of FCoT-VL is a subset).

FLOPs count the GEMMs only: forward ``2*rows*(merge*W*W [conv] + W*H + H*O)``; backward twice
that (data and weight gradients); full three times. Run ``python -m bench.run --op
compress_project`` for CSV/JSON or ``pytest bench/bench_compress_project.py --benchmark-only``.
"""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

import fcot_kernels as fk
from fcot_kernels.reference import avg_merge_weight

from .harness import (
    MODES, REFERENCE_PROVIDERS, Case, Skip, bench_shapes, eager_and_compiled, make_mode_fn,
    run_pytest_benchmark,
)
from .models import MODELS, TILE_COUNTS, TILE_GRID

OP = "compress_project"
PROVIDERS = ("eager", "compile", "compile-max", "triton")
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


def _transformers_path(x: torch.Tensor, shape: dict, p: dict):
    """transformers' own modules and ops around the given parameters (shared, so their grads
    are what backward computes): pixel shuffle -> pooling or conv -> the InternVL projector."""
    try:
        import transformers
        from transformers.models.internvl.modeling_internvl import InternVLModel, InternVLMultiModalProjector
    except ImportError as err:
        raise Skip(f"transformers' InternVL is not importable ({err})") from err
    c, hidden, (gh, gw), kind = shape["channels"], shape["hidden"], shape["grid"], shape["mode"]
    cfg = transformers.InternVLConfig(
        vision_config=dict(hidden_size=c, intermediate_size=16, num_hidden_layers=1, num_attention_heads=1),
        text_config=dict(model_type="qwen2", hidden_size=hidden, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=1, num_key_value_heads=1),
        downsample_ratio=0.5, projector_hidden_act="gelu",
    )
    proj = InternVLMultiModalProjector(cfg).to(x.device, x.dtype)
    # The module runs on the benchmark's own tensors, so gradients land on them.
    weights = {
        "layer_norm.weight": p["ln_weight"], "layer_norm.bias": p["ln_bias"],
        "linear_1.weight": p["w1"], "linear_1.bias": p["b1"], "linear_2.weight": p["w2"], "linear_2.bias": p["b2"],
    }
    kh, kw = {1: (1, 1), 2: (1, 2), 4: (2, 2)}[shape["merge"]]
    width = 4 * c

    def forward() -> torch.Tensor:
        y = InternVLModel.pixel_shuffle(None, x.reshape(x.shape[0], gh, gw, c), scale_factor=0.5)
        y = y.permute(0, 3, 1, 2)
        if kind == "conv":
            # merge_weight's columns are the window members (row-major) concatenated: a Conv2d
            # weight [out, in, kh, kw] is the same numbers viewed differently.
            w = p["merge_weight"].view(width, kh, kw, width).permute(0, 3, 1, 2)
            y = F.conv2d(y, w, p["merge_bias"], stride=(kh, kw))
        else:
            y = F.avg_pool2d(y, (kh, kw))
        return torch.func.functional_call(proj, weights, (y.flatten(2).transpose(1, 2),))

    return forward


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
    if provider in REFERENCE_PROVIDERS:
        forward = eager_and_compiled(_transformers_path(x, shape, p), provider)
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
