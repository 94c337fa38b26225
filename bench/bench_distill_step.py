"""Stage-1 (self-distillation) training step of ``fcot distill`` on a random-weight
InternVL2-2B-shaped transformers model: :class:`fcot.train.distill.DistillModule` (one copy of
the weights, ViT once, teacher under no_grad) + :func:`fcot.train.distill.distill_loss` + AdamW
on V_c and A_s, broken down into its parts.

Shapes ``<model>/b<batch>/<compressor>@<ratio>/<part>``, each sample one image of ``tiles``
tiles, ``prompt`` text tokens and ``answer`` supervised tokens. Parts:

- ``step``: the whole step (forward of both paths, loss, backward, optimizer step, zero_grad);
- ``vit``: the frozen ViT forward (no graph), run once per step;
- ``teacher``: the teacher path on the ViT tokens (original shuffle + projector, LLM), no graph;
- ``student``: the student path (fcot projector, LLM with a graph) and its backward from a
  fixed gradient on the answer rows;
- ``loss``: the divergence through the LM head, forward and backward, on the paired rows;
- ``optimizer``: AdamW's step on the trainable weights (V_c, A_s).

Providers: ``fused`` (``common.fused=True``: ``compress_project`` and ``fused_linear_distill``
on fcot_kernels' default backend, Triton on a GPU) and ``reference`` (the PyTorch references,
``fused=False``). Mode ``full`` only. Rows report median/p20/p80 and peak memory above the
resident weights. ``smoke`` is the tiny model (:mod:`fcot.models.tiny`) for the CPU run in CI.

``python -m bench.run --op distill_step [--shapes cpu|target|all]``.
"""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import torch

from .harness import MODES, Case, Skip, bench_shapes, run_pytest_benchmark

OP = "distill_step"
PROVIDERS = ("reference", "fused")
"""The reference first: the harness counts a shape's FLOPs on its first provider."""
RUN_MODES = ("full",)
"""A training step: what ``fcot bench`` times."""
PARTS = ("step", "vit", "teacher", "student", "loss", "optimizer")


def _name(model, batch, compressor, ratio, part):
    return f"{model}/b{batch}/{compressor}@{ratio}/{part}"


SHAPES = {
    _name("InternVL2-2B", b, "conv", r, part): {"model": "InternVL2-2B", "batch": b, "tiles": 13, "prompt": 32,
                                                "answer": 256, "compressor": "conv", "ratio": r, "part": part}
    for b in (1, 4) for r in (0.5, 0.75) for part in PARTS
}
SHAPES.update({
    _name("smoke", 2, "conv", 0.5, part): {"model": "smoke", "batch": 2, "tiles": 2, "prompt": 8, "answer": 16,
                                           "compressor": "conv", "ratio": 0.5, "part": part}
    for part in PARTS
})
CPU_SHAPES = [name for name in SHAPES if name.startswith("smoke/")]
"""The CPU smoke size (CI): the tiny model, 2 tiles of 64 px, 24 text tokens."""
TARGET_SHAPES = [_name("InternVL2-2B", 1, "conv", 0.5, part) for part in PARTS]
"""The issue's target: the fused step >= 1.3x faster at <= 0.7x the peak memory of the reference
step (bf16, H100, InternVL2-2B, ratio 0.5)."""

_CACHE: dict = {}


def _base(name: str, dtype: torch.dtype, device: torch.device):
    """A fresh random-weight model (the DistillModule patches it) and its image token id."""
    import transformers

    if name == "smoke":
        from fcot.models.tiny import build_tiny

        model = build_tiny().model
    else:
        from .bench_apply_fcot import _config

        with torch.device(device):
            model = transformers.InternVLForConditionalGeneration(_config(name))
    return model.to(device=device, dtype=dtype)


def _state(shape: dict, provider: str, dtype: torch.dtype, device: torch.device):
    from fcot.train.config import DistillConfig
    from fcot.train.distill import DistillModule
    from fcot.train.engine import ResizeImageTokens, visual_tokens_per_tile

    key = (shape["model"], shape["batch"], shape["ratio"], provider, dtype, device.type)
    if key in _CACHE:
        return _CACHE[key]
    _CACHE.clear()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    cfg = SimpleNamespace(common=SimpleNamespace(compressor=shape["compressor"], ratio=shape["ratio"],
                                                 fused=provider == "fused", backend=None),
                          distill=DistillConfig(temperature=1.0, kl_weight=1.0, ce_weight=0.0))
    module = DistillModule(_base(shape["model"], dtype, device), None, cfg).train()
    base, out = visual_tokens_per_tile(module.model)
    image_id = module.parts.image_token_id
    vocab = module.parts.head.weight.shape[0]
    gen = torch.Generator(device="cpu").manual_seed(0)
    b, tiles, prompt, answer = shape["batch"], shape["tiles"], shape["prompt"], shape["answer"]
    text = torch.randint(0, min(vocab, 1000), (b, prompt + answer), generator=gen)
    text[text == image_id] = 0
    ids = torch.cat([torch.full((b, tiles * base), image_id), text], 1)
    labels = torch.full_like(ids, -100)
    labels[:, -answer:] = ids[:, -answer:]
    resize = ResizeImageTokens(image_id, base, out)
    s_ids, s_labels = (torch.stack(t) for t in zip(*(resize(i, l) for i, l in zip(ids, labels))))
    size = module.model.config.vision_config.image_size
    size = size[0] if isinstance(size, (list, tuple)) else size
    batch = {
        "input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
        "student_input_ids": s_ids, "student_attention_mask": torch.ones_like(s_ids), "student_labels": s_labels,
        "pixel_values": torch.randn(b * tiles, 3, size, size, generator=gen).to(dtype),
    }
    batch = {k: v.to(device) for k, v in batch.items()}
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    state = SimpleNamespace(module=module, cfg=cfg, batch=batch, params=params, opt=opt)
    _CACHE[key] = state
    return state


def setup(shape: dict, provider: str, mode: str, dtype: torch.dtype, device: torch.device) -> Case:
    if mode != "full":
        raise Skip("a training step: mode full only")
    try:
        from fcot.train.distill import distill_loss
        from fcot.train.engine import shifted
    except ImportError as err:  # transformers missing
        raise Skip(f"fcot/transformers not importable ({err})") from err
    st = _state(shape, provider, dtype, device)
    m, parts, batch = st.module, st.module.parts, st.batch
    tokens_in = batch["input_ids"].numel() + batch["student_input_ids"].numel()
    part = shape["part"]
    if part == "step":
        def run():
            loss = m(**batch)["loss"]  # the module's forward is the whole stage-1 loss, LM head included
            loss.backward()
            st.opt.step()
            st.opt.zero_grad(set_to_none=True)
            return loss
        return Case(fn=run, tokens=tokens_in)
    tokens = parts.vit(batch["pixel_values"])
    if part == "vit":
        return Case(fn=lambda: parts.vit(batch["pixel_values"]), tokens=batch["pixel_values"].shape[0])
    if part == "teacher":
        def run():
            with torch.no_grad():
                feats = parts.teacher_features(tokens, m.teacher_projector)
                return parts.hidden(parts.embed(batch["input_ids"], feats), batch["attention_mask"])
        return Case(fn=run, tokens=batch["input_ids"].numel())
    if part == "student":
        keep = shifted(batch["student_input_ids"], batch["student_labels"])[1] != -100
        grad = torch.randn(int(keep.sum()), m.parts.head.weight.shape[1], device=device, dtype=dtype)

        def run():
            h = parts.hidden(parts.embed(batch["student_input_ids"], parts.student_features(tokens)),
                             batch["student_attention_mask"])
            rows = shifted(h, batch["student_labels"])[0][keep]
            rows.backward(grad)
            for p in st.params:
                p.grad = None
        return Case(fn=run, tokens=batch["student_input_ids"].numel())
    if part == "loss":
        with torch.no_grad():
            out = m.rows(**batch)
        s = out["student_hidden"].detach().requires_grad_()
        rows = {"student_hidden": s, "teacher_hidden": out["teacher_hidden"], "labels": out["labels"]}

        def run():
            loss = distill_loss(rows, parts.head, st.cfg)
            loss.backward()
            s.grad = None
            return loss
        return Case(fn=run, tokens=s.shape[0])
    if part == "optimizer":
        for p in st.params:
            p.grad = torch.randn_like(p) * 1e-3
        return Case(fn=st.opt.step)
    raise ValueError(f"unknown part {part!r}; expected one of {PARTS}")


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", bench_shapes(TARGET_SHAPES, CPU_SHAPES[:1]))
def bench_distill_step(benchmark, shape, provider):
    run_pytest_benchmark(benchmark, sys.modules[__name__], shape, provider, MODES[2])
