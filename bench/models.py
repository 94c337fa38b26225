"""InternVL2 shapes (from ../shared/MODELS.md, the published model configs): the only source of
benchmark shapes, so that every number in bench/results maps to a real model."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class InternVL2:
    name: str
    vit_hidden: int
    vit_layers: int
    vit_heads: int
    proj_in: int
    """Projector input width, 4 * vit_hidden (pixel shuffle at scale 0.5)."""
    llm_hidden: int
    llm_layers: int
    llm_heads: int
    llm_kv_heads: int
    vocab: int


MODELS = {
    m.name: m
    for m in (
        InternVL2("InternVL2-1B", 1024, 24, 16, 4096, 896, 24, 14, 2, 151_655),
        InternVL2("InternVL2-2B", 1024, 24, 16, 4096, 2048, 24, 16, 8, 92_553),
        InternVL2("InternVL2-4B", 1024, 24, 16, 4096, 3072, 32, 32, 32, 32_020),
        InternVL2("InternVL2-8B", 1024, 24, 16, 4096, 4096, 32, 32, 8, 92_553),
        InternVL2("InternVL2-26B", 3200, 45, 25, 12800, 6144, 48, 48, 8, 92_553),
        InternVL2("InternVL2-76B", 3200, 45, 25, 12800, 8192, 80, 64, 8, 128_256),
    )
}

TILE_GRID = (32, 32)
"""ViT patch grid of one 448x448 tile with 14px patches (CLS removed)."""
TILE_COUNTS = (1, 13, 104)
"""One tile, one document image (12 tiles + thumbnail), a batch of 8 such images."""
VIT_WIDTHS = {"InternViT-300M": 1024, "InternViT-6B": 3200}

DISTILL_TOKENS = (2048, 8192, 16384, 32768)
"""Answer tokens in one self-distillation batch (MODELS.md: 2k to 32k)."""
PREFILL_LENGTHS = (1024, 2048, 4096, 8192, 16384)
"""LLM prefill lengths (tokens the LLM attends over, text plus visual tokens)."""
IMAGE_MERGE_RATIOS = (0.5, 0.75)
"""Fractions of the visual tokens merged away (FCoT-VL's 50 % and 75 %)."""

FFN_WIDTHS = {"InternVL2-1B": (4096, 4864), "InternVL2-2B": (4096, 8192)}
"""(ViT MLP width, LLM MLP width) from the published configs (InternViT-300M; Qwen2-0.5B,
InternLM2-1.8B), for model-level benchmarks that build whole random-weight models."""
LLM_TYPES = {"InternVL2-1B": "qwen2", "InternVL2-2B": "llama"}
"""transformers model type of each LLM; InternLM2 (not in transformers) is a Llama-architecture
decoder with fused QKV, so a Llama of the same shape stands in for it."""


PROMPT_TEXT_TOKENS = 64
"""Text tokens beside the image in the model-level benchmarks (one question)."""
PATCH = 14
"""ViT patch size in pixels (448 px tiles: a 32 x 32 grid plus the CLS token)."""


def prefill_flops(model: str | InternVL2, tiles: int, text: int = PROMPT_TEXT_TOKENS, ratio: float | None = None,
                  ffn: tuple[int, int] | None = None) -> dict[str, float]:
    """Matmul FLOPs (2 per multiply-add) of one prefill of ``model`` (a name of :data:`MODELS`, or
    a spec with its ``ffn`` = (ViT MLP, LLM MLP) widths) on one image of ``tiles`` 448 px tiles and
    ``text`` text tokens, with a fraction ``ratio`` of the visual tokens merged away before the
    LLM (None: none), from the model tables alone:

    - ``vit``: patch embedding, then per layer the QKV/output projections (8 h^2 per token) and
      the MLP (4 h m); ``vit_attention``: attention over each tile's 1025 tokens (4 n h per token);
    - ``projector``: the MLP projector (4 h_vit -> h -> h) on every shuffled token, counted the
      same with and without compression (as if the compressor were free: the ideal is an upper
      bound on the speed-up);
    - ``llm``: per layer the projections with grouped KV heads (2 h (2 h + 2 h kv/heads)) and the
      gated MLP (6 h m), plus the LM head on the last token only (generate's prefill);
      ``llm_attention``: causal attention (the causal half of 4 n h per token).
    """
    spec = MODELS[model] if isinstance(model, str) else model
    vit_mlp, llm_mlp = FFN_WIDTHS[spec.name] if ffn is None else ffn
    per_tile = TILE_GRID[0] * TILE_GRID[1]
    n_vit = per_tile + 1
    hv = spec.vit_hidden
    visual = tiles * per_tile // 4  # pixel shuffle at scale 0.5
    h = spec.llm_hidden
    n = (visual if ratio is None else round(visual * (1 - ratio))) + text
    proj = 2 * h * (2 * h + 2 * h * spec.llm_kv_heads // spec.llm_heads)
    return {
        "vit": float(tiles * (spec.vit_layers * n_vit * (8 * hv * hv + 4 * hv * vit_mlp)
                              + 2 * per_tile * 3 * PATCH * PATCH * hv)),
        "vit_attention": float(tiles * spec.vit_layers * 4 * n_vit * n_vit * hv),
        "projector": float(visual * (2 * spec.proj_in * h + 2 * h * h)),
        "llm": float(spec.llm_layers * n * (proj + 6 * h * llm_mlp) + 2 * h * spec.vocab),
        "llm_attention": float(spec.llm_layers * 2 * n * n * h),
    }


def ideal_prefill_speedup(model: str, tiles: int, ratio: float, text: int = PROMPT_TEXT_TOKENS) -> float:
    """FLOPs of the unpatched prefill over those at ``ratio``: the speed-up a compressor could reach
    if time followed FLOPs (the ViT runs in both; only the LLM's tokens shrink)."""
    return sum(prefill_flops(model, tiles, text).values()) / sum(prefill_flops(model, tiles, text, ratio).values())


CEILINGS = {"H100": {"copy": 3.0e12, "matmul": 798e12}, "H200": {"copy": 4.3e12, "matmul": 780e12}}
"""Measured ceilings of the project's GPU machines (../shared/MODELS.md): device copy bandwidth
(bytes read + written per second) and the bf16 8192^3 matmul rate (FLOP/s; H200: the middle of
769-798). Only the ideal-ratio targets use them; every benchmark row uses the ceilings its own run
measured."""


def compress_project_traffic(model: str, tiles: int, merge: int = 2, itemsize: int = 2) -> dict[str, float]:
    """The conv compressor + projector, forward and backward, on ``tiles`` tiles of ``model``
    (``merge`` shuffled tokens merged into one), as what both eager and fcot must do and what
    only eager does, from the model table alone (docs/perf-notes.md, issue 18):

    - ``flops``: the matmuls, run unchanged on both sides: conv (merge * W -> W), the projector's
      two linears (W -> h, h -> h); backward twice the forward;
    - ``common_bytes``: the LayerNorm over the W-wide merged rows, forward (read + write) and
      backward (read x and dy, write dx), which both sides run;
    - ``eager_extra_bytes``: what fusion removes: the pixel shuffle's two permute copies of the
      ViT tokens (forward, and again for dx), the conv weight's permute copy (forward, and for its
      gradient), GELU as its own pass (read + write) and its backward (read two, write one).
    """
    spec = MODELS[model]
    w, h = spec.proj_in, spec.llm_hidden
    rows = tiles * TILE_GRID[0] * TILE_GRID[1] // 4 // merge
    x = tiles * TILE_GRID[0] * TILE_GRID[1] * spec.vit_hidden * itemsize  # the ViT tokens
    weight = merge * w * w * itemsize
    forward = 2 * rows * (merge * w * w + w * h + h * h)
    return {
        "flops": float(3 * forward),
        "common_bytes": float(5 * rows * w * itemsize),
        "eager_extra_bytes": float(2 * 2 * x + 2 * weight + 2 * rows * h * itemsize  # forward
                                   + 2 * 2 * x + 2 * weight + 3 * rows * h * itemsize),  # backward
    }


def ideal_compress_project_speedup(model: str, tiles: int, merge: int = 2, device: str = "H200") -> float:
    """Eager's time over the fused op's if both ran their matmuls at the device's measured matmul
    rate and their bytes at its copy bandwidth (:data:`CEILINGS`): the most fusing the passes
    around the GEMMs can give, since the GEMMs themselves are the same on both sides."""
    t = compress_project_traffic(model, tiles, merge)
    ceil = CEILINGS[device]
    gemm, common = t["flops"] / ceil["matmul"], t["common_bytes"] / ceil["copy"]
    return (gemm + common + t["eager_extra_bytes"] / ceil["copy"]) / (gemm + common)
