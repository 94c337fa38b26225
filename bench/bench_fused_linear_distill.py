"""Benchmark of fcot_kernels.fused_linear_distill (LM head + distillation divergence + CE).

Providers: the full-logits reference (eager and torch.compile), the fcot Triton path, and
Liger-Kernel when ``liger_kernel`` imports: ``LigerFusedLinearJSD`` for the JSD loss,
``LigerFusedLinearCrossEntropyLoss`` for the CE-only loss. Three losses per shape: ``kl+ce``
(FCoT-VL's stage-1 forward KL + CE), ``jsd`` (beta 0.5, the one Liger computes too) and ``ce``
(stage 2's SFT loss: ``kl_weight=0``, no teacher work at all). The head is trainable and shared
with the teacher, as in FCoT-VL's self-distillation.

The fused paths (fcot, Liger) do all the work in the forward, so their ``backward`` mode only
scales stored gradients; ``full`` (forward + backward) is the comparison that matters, with
its peak memory. FLOPs counted: the two logits GEMMs (forward; one for ``ce``, which has no
teacher) and d(hidden), d(weight) (backward), ``2 * N * H * V`` each; bytes: hidden states and
head read once, gradients written once. Run ``python -m bench.run --op fused_linear_distill``.
"""

from __future__ import annotations

import sys

import pytest
import torch

import fcot_kernels as fk
from fcot_kernels.reference import fused_linear_distill_ref

from .harness import (
    BASE_PROVIDERS, MODES, REFERENCE_PROVIDERS, Case, Missing, Skip, bench_shapes,
    eager_and_compiled, make_mode_fn, run_pytest_benchmark,
)
from .models import DISTILL_TOKENS, MODELS

OP = "fused_linear_distill"
PROVIDERS = (*BASE_PROVIDERS, "liger")
LOSSES = {
    "kl+ce": dict(divergence="forward_kl", kl_weight=1.0, ce_weight=1.0, temperature=1.0),
    "jsd": dict(divergence="jsd", beta=0.5, kl_weight=1.0, ce_weight=0.0, temperature=1.0),
    "ce": dict(kl_weight=0.0, ce_weight=1.0),
}
_HIDDEN = sorted({MODELS["InternVL2-2B"].llm_hidden, MODELS["InternVL2-8B"].llm_hidden})  # 2048, 4096
_VOCABS = sorted({MODELS["InternVL2-2B"].vocab, MODELS["InternVL2-1B"].vocab})  # InternLM2, Qwen2
SHAPES = {
    f"N{n}/H{h}/V{v}/{loss}": {"n": n, "h": h, "v": v, "loss": loss}
    for n in DISTILL_TOKENS
    for h in _HIDDEN
    for v in _VOCABS
    for loss in LOSSES
}
_SMALL = MODELS["InternVL2-1B"]
SHAPES[f"cpu/N16/H{_SMALL.llm_hidden}/V{_SMALL.vocab}/kl+ce"] = {
    "n": 16, "h": _SMALL.llm_hidden, "v": _SMALL.vocab, "loss": "kl+ce",
}
SHAPES[f"cpu/N16/H{_SMALL.llm_hidden}/V{_SMALL.vocab}/ce"] = {
    "n": 16, "h": _SMALL.llm_hidden, "v": _SMALL.vocab, "loss": "ce",
}
CPU_SHAPES = [f"cpu/N16/H{_SMALL.llm_hidden}/V{_SMALL.vocab}/kl+ce", f"cpu/N16/H{_SMALL.llm_hidden}/V{_SMALL.vocab}/ce"]
"""What a CPU run times: the InternVL2-1B head at a CPU-sized token count."""
TARGET_SHAPES = ["N16384/H4096/V92553/kl+ce", "N16384/H4096/V92553/jsd", "N16384/H4096/V92553/ce"]
"""The shape of the performance target of issue 5 (bf16, H100, trainable head), and stage 2's
CE-only loss at the same shape (issue 19)."""


def _liger():
    try:
        from liger_kernel.transformers import LigerFusedLinearJSD
    except ImportError as err:
        raise Missing(f"liger_kernel is not importable ({err}); pip install liger-kernel") from None
    return LigerFusedLinearJSD


def _liger_ce():
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError as err:
        raise Missing(f"liger_kernel is not importable ({err}); pip install liger-kernel") from None
    return LigerFusedLinearCrossEntropyLoss


def _oom_to_skip(fn):
    """An out-of-memory provider (the full-logits reference at large N) is a recorded skip."""
    def run():
        try:
            return fn()
        except torch.OutOfMemoryError as err:
            torch.cuda.empty_cache()
            raise Skip(f"out of memory: {str(err).splitlines()[0]}") from None
    return run


def setup(shape: dict, provider: str, mode: str, dtype: torch.dtype, device: torch.device) -> Case:
    if provider == "cuda":
        raise Skip("fused_linear_distill has no CUDA C++ kernel (GEMMs are cuBLAS, the logits pass is Triton)")
    if provider == "liger":
        _liger()  # a peer that is not installed is reported missing on every device
    if provider in ("triton", "liger") and device.type != "cuda":
        raise Skip("no GPU (interpreter timings mean nothing)")
    n, h, v, loss = shape["n"], shape["h"], shape["v"], LOSSES[shape["loss"]]
    ce_only = loss["kl_weight"] == 0
    if provider == "liger" and not ce_only and (loss["ce_weight"] != 0 or loss["divergence"] != "jsd"):
        raise Skip("Liger has no fused KL + CE: LigerFusedLinearJSD computes only the JSD")
    grad = mode != "forward"
    xs = torch.randn(n, h, device=device, dtype=dtype, requires_grad=grad)
    xt = None if ce_only else torch.randn(n, h, device=device, dtype=dtype)
    w = (torch.randn(v, h, device=device) / h**0.5).to(dtype).requires_grad_(grad)
    labels = torch.randint(0, v, (n,), device=device)
    try:
        if provider in REFERENCE_PROVIDERS:
            ref = eager_and_compiled(fused_linear_distill_ref, provider)
            forward = lambda: ref(xs, xt, w, labels=labels, **loss)  # noqa: E731
        elif provider == "liger" and ce_only:
            ce = _liger_ce()()
            forward = lambda: ce(w, xs, labels)  # noqa: E731
        elif provider == "liger":
            jsd = _liger()(jsd_beta=loss["beta"], temperature=loss["temperature"])
            w_teacher = w.detach()
            forward = lambda: jsd(xs, w, xt, w_teacher, labels)  # noqa: E731
        else:
            forward = lambda: fk.fused_linear_distill(xs, xt, w, labels=labels, backend=provider, **loss)  # noqa: E731
        fn = make_mode_fn(forward, mode, [xs, w])
    except torch.OutOfMemoryError as err:
        torch.cuda.empty_cache()
        raise Skip(f"out of memory: {str(err).splitlines()[0]}") from None
    size = dtype.itemsize if hasattr(dtype, "itemsize") else torch.finfo(dtype).bits // 8
    sides = 1 if ce_only else 2  # hidden-state inputs and logits GEMMs in the forward
    fwd_bytes, bwd_bytes = (sides * n * h + v * h) * size, (n * h + v * h) * size
    gemm = 2.0 * n * h * v
    moved = {"forward": fwd_bytes, "backward": bwd_bytes, "full": fwd_bytes + bwd_bytes}[mode]
    flops = {"forward": sides * gemm, "backward": 2 * gemm, "full": (sides + 2) * gemm}[mode]
    return Case(fn=_oom_to_skip(fn), bytes=moved, flops=flops)



@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", bench_shapes(TARGET_SHAPES, CPU_SHAPES))
def bench_fused_linear_distill(benchmark, shape, provider, mode):
    run_pytest_benchmark(benchmark, sys.modules[__name__], shape, provider, mode)
