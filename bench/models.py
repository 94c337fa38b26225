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
