"""Benchmark of fcot_kernels.merged_attention (size-biased flash attention) at LLM prefill shapes.

One prompt of L tokens: a text prefix, the (already merged) visual tokens, a text suffix. With a
fraction ``m`` of the visual tokens merged away, every remaining visual token stands for
``1/(1-m)`` originals, so ``key_log_size = log(2)`` (50 %) or ``log(4)`` (75 %) on the image
span and 0 on the text. Causal, grouped-query heads of the model's LLM.

Providers:
    eager / compile: the explicit reference (materialises L x L logits per head; skipped when
        it runs out of memory).
    triton: fcot's kernel with the key bias. tr_nobias: the same kernel without a bias
        (isolates the cost of the bias). tr_imp: forward plus the importance
        side-output for the last query row (FastV's choice), forward mode only.
    sdpa_fa: SDPA's flash backend without a bias (the speed to match).
    sdpa_cudnn, sdpa_eff: SDPA's cuDNN and memory-efficient backends without a bias.
    sdpa_mask: SDPA with the key bias as a dense (L, L) additive mask including the causal
        -inf (the efficient or math backend: what PyTorch users do today).
    flashattn: flash_attn_func without a bias, when flash-attn is importable.
    cuda: no CUDA C++ kernel for this op (always skipped).

FLOPs: causal attention does half of 4*L*L*D multiply-adds per head forward (QK^T and PV),
2.5x that backward (S recomputed, dV, dP, dQ, dK). Bytes at least: q, k, v, bias read and out
written (forward); q, k, v, out, dout read and dq, dk, dv written (backward).
``python -m bench.run --op merged_attention`` writes CSV/JSON.
"""

from __future__ import annotations

import sys

import math

import pytest
import torch
import torch.nn.functional as F

import fcot_kernels as fk
from fcot_kernels.reference import merged_attention_ref

from .harness import (
    BASE_PROVIDERS, MODES, REFERENCE_PROVIDERS, Case, Missing, Skip, bench_shapes,
    eager_and_compiled, make_mode_fn, run_pytest_benchmark,
)
from .models import IMAGE_MERGE_RATIOS, MODELS, PREFILL_LENGTHS

OP = "merged_attention"
PROVIDERS = (*BASE_PROVIDERS, "tr_nobias", "tr_imp", "sdpa_fa", "sdpa_cudnn", "sdpa_eff", "sdpa_mask", "flashattn")
TEXT_PREFIX = 32
"""System prompt and image-start tokens before the visual span."""
SHAPES = {
    f"{name}/L{length}/merge{round(100 * m)}": {
        "length": length,
        "heads": MODELS[name].llm_heads,
        "kv_heads": MODELS[name].llm_kv_heads,
        "head_dim": MODELS[name].llm_hidden // MODELS[name].llm_heads,
        "merged": m,
    }
    for name in ("InternVL2-8B", "InternVL2-1B")
    for length in PREFILL_LENGTHS
    for m in IMAGE_MERGE_RATIOS
}
CPU_SHAPES = ["InternVL2-1B/L1024/merge50"]
"""What a CPU run times (the GPU run takes every shape)."""
TARGET_SHAPES = ["InternVL2-8B/L8192/merge50", "InternVL2-8B/L8192/merge75"]
"""The issue's target: bf16, L=8192, d=128, causal, GQA 32/8."""


def key_log_size(length: int, merged: float, device: torch.device) -> torch.Tensor:
    """``(1, L)`` fp32: log(1/(1-merged)) on the visual span, 0 on the text around it."""
    bias = torch.zeros(1, length, device=device)
    image_end = length - length // 16  # the question and answer prompt after the image
    bias[:, TEXT_PREFIX:image_end] = math.log(1.0 / (1.0 - merged))
    return bias


def _flops(shape: dict, mode: str) -> float:
    fwd = 4.0 * shape["heads"] * shape["length"] ** 2 * shape["head_dim"] / 2  # causal: half the pairs
    return {"forward": fwd, "backward": 2.5 * fwd, "full": 3.5 * fwd}[mode]


def _bytes(q: torch.Tensor, k: torch.Tensor, mode: str) -> float:
    nq, nk = q.numel() * q.element_size(), k.numel() * k.element_size()
    fwd = 2 * nq + 2 * nk  # q read, out written, k and v read
    bwd = 4 * nq + 4 * nk  # q, out, dout read, dq written; k, v read, dk, dv written
    return {"forward": fwd, "backward": bwd, "full": fwd + bwd}[mode]


def _dense_mask(bias: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(1, 1, L, L)`` additive mask: the key bias on every row plus -inf above the diagonal."""
    length = bias.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=bias.device).tril()
    mask = bias[:, None, None, :].expand(1, 1, length, length).masked_fill(~causal, float("-inf"))
    return mask.to(dtype)


def _sdpa(q, k, v, mask, backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    pick = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION, "eff": SDPBackend.EFFICIENT_ATTENTION,
            "dense": [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]}[backend]
    with sdpa_kernel(pick):
        if mask is None:
            out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=kt.shape[1] != qt.shape[1])
        else:
            out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask)
    return out.transpose(1, 2)


def _build(forward, mode: str, params: list[torch.Tensor]):
    """The timed callable, run once untimed (compiles kernels); out-of-memory or a backend that
    cannot take these inputs becomes a skip with the reason."""
    try:
        fn = make_mode_fn(forward, mode, params)
        fn()
    except torch.cuda.OutOfMemoryError as err:
        torch.cuda.empty_cache()
        raise Skip(f"out of memory ({str(err).splitlines()[0][:80]})") from None
    except (RuntimeError, TypeError) as err:
        raise Skip(f"{type(err).__name__}: {str(err).splitlines()[0][:120]}") from None
    return fn


def setup(shape: dict, provider: str, mode: str, dtype: torch.dtype, device: torch.device) -> Case:
    on_gpu = device.type == "cuda"
    if provider == "cuda":
        raise Skip("merged_attention has no CUDA C++ kernel (Triton only)")
    if provider in ("triton", "tr_nobias", "tr_imp") and not on_gpu:
        raise Skip("no GPU (interpreter timings mean nothing)")
    if provider == "tr_imp" and mode != "forward":
        raise Skip("the importance side-output has no backward; see the triton rows")
    if provider == "flashattn":
        try:
            from flash_attn import flash_attn_func
        except ImportError as err:
            raise Missing(f"flash_attn is not importable ({err})") from None
    if provider in ("sdpa_fa", "sdpa_cudnn", "sdpa_eff", "flashattn") and not on_gpu:
        raise Skip("this attention backend needs a GPU")
    length, hq, hkv, d = shape["length"], shape["heads"], shape["kv_heads"], shape["head_dim"]
    grad = mode != "forward"
    q = torch.randn(1, length, hq, d, device=device, dtype=dtype, requires_grad=grad)
    k = torch.randn(1, length, hkv, d, device=device, dtype=dtype, requires_grad=grad)
    v = torch.randn(1, length, hkv, d, device=device, dtype=dtype, requires_grad=grad)
    bias = key_log_size(length, shape["merged"], device)
    params = [q, k, v]
    if provider in REFERENCE_PROVIDERS:
        ref = eager_and_compiled(merged_attention_ref, provider)
        forward = lambda: ref(q, k, v, key_log_size=bias, causal=True)  # noqa: E731
    elif provider in ("triton", "tr_nobias"):
        b = bias if provider == "triton" else None
        forward = lambda: fk.merged_attention(q, k, v, key_log_size=b, causal=True, backend="triton")  # noqa: E731
    elif provider == "tr_imp":
        forward = lambda: fk.merged_attention(  # noqa: E731
            q, k, v, key_log_size=bias, causal=True, importance_rows=[-1], backend="triton")[0]
    elif provider in ("sdpa_fa", "sdpa_cudnn", "sdpa_eff"):
        backend = {"sdpa_fa": "flash", "sdpa_cudnn": "cudnn", "sdpa_eff": "eff"}[provider]
        forward = lambda: _sdpa(q, k, v, None, backend)  # noqa: E731
    elif provider == "sdpa_mask":
        # The efficient and math backends take no GQA: repeat the KV heads once, outside the timing.
        kx = k.detach().repeat_interleave(hq // hkv, 2).requires_grad_(grad)
        vx = v.detach().repeat_interleave(hq // hkv, 2).requires_grad_(grad)
        params = [q, kx, vx]
        mask = _dense_mask(bias, dtype)
        forward = lambda: _sdpa(q, kx, vx, mask, "dense")  # noqa: E731
    elif provider == "flashattn":
        forward = lambda: flash_attn_func(q, k, v, causal=True)  # noqa: E731
    else:
        raise ValueError(f"unknown provider {provider!r}")
    return Case(fn=_build(forward, mode, params), bytes=_bytes(q, k, mode), flops=_flops(shape, mode))



@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", bench_shapes(TARGET_SHAPES, CPU_SHAPES[:1]))
def bench_merged_attention(benchmark, shape, provider, mode):
    run_pytest_benchmark(benchmark, sys.modules[__name__], shape, provider, mode)
