"""Model-level benchmark of ``fcot.apply_fcot``: prefill of random-weight InternVL2-1B/2B-shaped
transformers ``InternVLForConditionalGeneration`` models, one image of 13 tiles + 64 text tokens
per sample, batch 1 and 8, for the compressors none/avg/conv/tome/prune at ratios 0.5 and 0.75.

Shapes ``<model>/b<batch>/<compressor>[@ratio]/<part>``; part ``prefill`` times the whole forward
(ViT, compressor + projector, LLM; ``logits_to_keep=1`` as generate's prefill), part ``image``
times the image path alone (ViT output -> LLM embeddings: shuffle, compress, project).
Providers: ``eager`` is the unpatched transformers model (only the ``unpatched`` shapes);
``fused`` is ``apply_fcot(fused=True)`` (fcot_kernels' default backend: Triton on a GPU, the
references on a CPU); ``reference`` is ``apply_fcot(fused=False)``. Rows report median/p20/p80,
peak memory and tokens/s (tokens the LLM prefills; visual tokens out for ``image``). Forward
only (inference): backward/full are skipped. ``smoke`` is a tiny model for the CPU run in CI.
In the ``image`` part ``prune`` ranks by token norms (its CLS attention is computed in the ViT,
which this part does not run).

``python -m bench.run --op apply_fcot [--shapes cpu|target|all]``.
"""

from __future__ import annotations

import sys

import pytest
import torch

from .harness import Case, MODES, Skip, bench_shapes, run_pytest_benchmark
from .models import FFN_WIDTHS, IMAGE_MERGE_RATIOS, LLM_TYPES, MODELS, PATCH, PROMPT_TEXT_TOKENS, TILE_COUNTS, TILE_GRID

OP = "apply_fcot"
PROVIDERS = ("eager", "reference", "fused")
"""The reference before fused: the harness counts a shape's FLOPs on its first provider."""
RUN_MODES = ("forward",)
"""Inference only: what ``fcot bench`` times (the other modes are skips)."""
TILES, TEXT = TILE_COUNTS[1], PROMPT_TEXT_TOKENS
COMPRESSORS = ("none", "avg", "conv", "tome", "prune")
SMOKE = dict(vit=(64, 1, 1, 128), llm=(64, 1, 1, 1, 128, 512), llm_type="qwen2")
"""(hidden, layers, heads, ffn) of the smoke ViT; (hidden, layers, heads, kv heads, ffn, vocab) of its LLM."""


def _variants():
    yield "unpatched", None
    yield "none", None
    for c in COMPRESSORS[1:]:
        for r in IMAGE_MERGE_RATIOS:
            yield c, r


def _name(model, batch, compressor, ratio, part):
    return f"{model}/b{batch}/{compressor}{'' if ratio is None else f'@{ratio}'}/{part}"


SHAPES = {
    _name(m, b, c, r, part): {"model": m, "batch": b, "tiles": TILES, "text": TEXT, "compressor": c, "ratio": r, "part": part}
    for m in ("InternVL2-1B", "InternVL2-2B")
    for b in (1, 8)
    for c, r in _variants()
    for part in ("prefill", "image")
}
SHAPES.update({
    _name("smoke", b, c, r, part): {"model": "smoke", "batch": b, "tiles": 2, "text": 16, "compressor": c, "ratio": r, "part": part}
    for b, c, r, part in (
        (1, "unpatched", None, "prefill"), (1, "none", None, "prefill"), (2, "conv", 0.5, "prefill"),
        (2, "tome", 0.75, "prefill"), (1, "prune", 0.5, "prefill"), (2, "unpatched", None, "image"), (2, "avg", 0.75, "image"),
    )
})
CPU_SHAPES = [name for name in SHAPES if name.startswith("smoke/")]
"""The CPU smoke size (CI): a tiny model, 2 tiles of 448 px, 16 text tokens."""
TARGET_SHAPES = [
    _name("InternVL2-2B", 1, c, r, part)
    for c, r in (("unpatched", None), ("none", None), ("conv", 0.5), ("conv", 0.75), ("tome", 0.5))
    for part in ("prefill", "image")
]
"""The issues' targets: prefill >= 0.9x the FLOP-ideal speed-up over the unpatched model at 0.5 and
0.75 (bench/targets.py); the fused image path >= 1.3x the reference one (bf16, H100, InternVL2-2B,
13 tiles)."""

_CACHE: dict = {}
"""One random-weight model at a time (building one is the slow part): key -> model."""


def _config(name: str):
    import transformers

    if name == "smoke":
        (vh, vl, vheads, vffn), (lh, ll, lheads, lkv, lffn, vocab), llm_type = SMOKE["vit"], SMOKE["llm"], SMOKE["llm_type"]
    else:
        spec = MODELS[name]
        vh, vl, vheads, lh, ll, lheads, lkv, vocab = (
            spec.vit_hidden, spec.vit_layers, spec.vit_heads, spec.llm_hidden, spec.llm_layers, spec.llm_heads,
            spec.llm_kv_heads, spec.vocab,
        )
        (vffn, lffn), llm_type = FFN_WIDTHS[name], LLM_TYPES[name]
    patch = PATCH
    image = TILE_GRID[0] * patch
    return transformers.InternVLConfig(
        vision_config=dict(hidden_size=vh, intermediate_size=vffn, num_hidden_layers=vl, num_attention_heads=vheads,
                           image_size=[image, image], patch_size=[patch, patch], use_qk_norm=False),
        text_config=dict(model_type=llm_type, hidden_size=lh, intermediate_size=lffn, num_hidden_layers=ll,
                         num_attention_heads=lheads, num_key_value_heads=lkv, vocab_size=vocab, max_position_embeddings=32768),
        image_token_id=vocab - 1, downsample_ratio=0.5, projector_hidden_act="gelu",
        image_seq_length=TILE_GRID[0] * TILE_GRID[1] // 4,
    )


def _model(name: str, dtype: torch.dtype, device: torch.device):
    import fcot
    import transformers

    key = (name, dtype, device.type)
    if key not in _CACHE:
        _CACHE.clear()
        with torch.device(device):
            model = transformers.InternVLForConditionalGeneration(_config(name))
        _CACHE[key] = model.to(dtype).eval()
    model = _CACHE[key]
    if fcot.is_patched(model):
        fcot.revert_fcot(model)
    return model


def setup(shape: dict, provider: str, mode: str, dtype: torch.dtype, device: torch.device) -> Case:
    if mode != "forward":
        raise Skip("inference benchmark: prefill only")
    try:
        import fcot
    except ImportError as err:  # transformers missing
        raise Skip(f"fcot/transformers not importable ({err})") from err
    unpatched = shape["compressor"] == "unpatched"
    if unpatched != (provider == "eager"):
        raise Skip("eager is the unpatched model" if unpatched else "the unpatched model runs as the eager provider")
    model = _model(shape["model"], dtype, device)
    if not unpatched:
        fcot.apply_fcot(model, compressor=shape["compressor"], ratio=shape["ratio"] or 0.5, fused=provider == "fused")
    cfg = model.config
    per_tile, batch, tiles = cfg.image_seq_length, shape["batch"], shape["tiles"]
    vocab = cfg.text_config.vocab_size
    gen = torch.Generator(device="cpu").manual_seed(0)
    if shape["part"] == "image":
        inner = model.model
        vit = torch.randn(batch * tiles, TILE_GRID[0] * TILE_GRID[1], cfg.vision_config.hidden_size, generator=gen)
        vit = vit.to(device, dtype)

        def image_path():
            x = vit.reshape(vit.shape[0], *TILE_GRID, -1)
            x = inner.pixel_shuffle(x, scale_factor=cfg.downsample_ratio)  # fcot's pass-through when patched
            return inner.multi_modal_projector(x.reshape(x.shape[0], -1, x.shape[-1]))

        def run():
            with torch.no_grad():
                return image_path()

        return Case(fn=run, tokens=batch * tiles * per_tile)
    text = torch.randint(0, vocab - 1, (batch, shape["text"]), generator=gen)
    image = torch.full((batch, tiles * per_tile), cfg.image_token_id)
    input_ids = torch.cat([image, text], 1).to(device)
    pixel_values = torch.randn(batch * tiles, 3, *cfg.vision_config.image_size, generator=gen).to(device, dtype)
    inputs = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), pixel_values=pixel_values)

    def run():
        with torch.no_grad():
            return model(**inputs, logits_to_keep=1)

    return Case(fn=run, tokens=input_ids.numel())


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", bench_shapes(TARGET_SHAPES, CPU_SHAPES[:3]))
def bench_apply_fcot(benchmark, shape, provider):
    run_pytest_benchmark(benchmark, sys.modules[__name__], shape, provider, MODES[0])
