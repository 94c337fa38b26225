"""Proportional attention: the ``fcot_merged`` attention function against a plain softmax with
log(size) key biases (padding, GQA, decode steps, float and boolean masks), and in the patched
models (generate with and without the KV cache, text-only inputs, backends, bad setups)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("transformers")

import fcot  # noqa: E402
from fcot import FcotError  # noqa: E402
from fcot.models.attention import ATTENTION_NAME, fcot_attention_forward, register_state, unregister_state  # noqa: E402
from fcot.models.base import FcotState  # noqa: E402
from fcot_kernels.testing import runnable_backends  # noqa: E402

from ...conftest import DEVICE  # noqa: E402
from ..tiny_internvl import random_images, tiny_config, tiny_model, tiny_processor  # noqa: E402
from ..tiny_internvl_chat import tiny_chat_config, tiny_chat_model  # noqa: E402

KERNEL = (runnable_backends(DEVICE, has_cuda=False) or ["reference"])[-1]


def _reference(q, k, v, bias, allowed, scale):
    """softmax(q k^T * scale + bias, masked) v with GQA, fp64: (B, Lq, H, D)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    logits = q.double() @ k.transpose(-1, -2) * scale + bias.double()[:, None, None, :]
    logits = logits.masked_fill(~allowed[:, None], -math.inf)
    return (logits.softmax(-1) @ v).transpose(1, 2)


@pytest.mark.parametrize("float_mask", [False, True])
@pytest.mark.parametrize("backend", ["reference", KERNEL])
def test_attention_function_matches_softmax_with_bias(float_mask, backend):
    b, h, hkv, d, length = 2, 4, 2, 64, 11
    pad = torch.tensor([3, 0])  # left padding of each sequence
    keep = torch.arange(length)[None, :] >= pad[:, None]
    image = torch.zeros(b, length, dtype=torch.bool)
    image[0, 4:8], image[1, 2:6] = True, True
    sizes = torch.randint(1, 6, (8,)).float()
    state = FcotState(backend)
    state.start(image.to(DEVICE))
    state.set_sizes(sizes.to(DEVICE))
    module = SimpleNamespace(config=object(), training=False, is_causal=True)
    register_state(module.config, state)
    try:
        bias = torch.zeros(b, length)
        bias[image] = sizes.log()
        for lq, lk in ((length, length), (1, length + 2)):  # prefill, then a decode step
            kp = torch.cat([keep, torch.ones(b, lk - length, dtype=torch.bool)], 1)
            allowed = torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq)[None] & kp[:, None, :]
            mask = allowed[:, None]
            if float_mask:
                mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
            q = torch.randn(b, h, lq, d, device=DEVICE)
            k, v = torch.randn(b, hkv, lk, d, device=DEVICE), torch.randn(b, hkv, lk, d, device=DEVICE)
            out, weights = fcot_attention_forward(module, q, k, v, mask.to(DEVICE), scaling=0.1)
            assert weights is None and out.shape == (b, lq, h, d)
            full_bias = torch.nn.functional.pad(bias, (0, lk - length))
            expected = _reference(q.cpu(), k.cpu(), v.cpu(), full_bias, allowed, 0.1)
            real = kp[:, lk - lq:]  # padded query rows are never read
            torch.testing.assert_close(out.cpu().double()[real], expected[real], atol=1e-4, rtol=1e-4)
        # No mask (transformers skips it when nothing is padded): causal.
        q, k, v = (torch.randn(b, hh, length, d, device=DEVICE) for hh in (h, hkv, hkv))
        out, _ = fcot_attention_forward(module, q, k, v, None, scaling=0.1)
        causal = torch.ones(length, length, dtype=torch.bool).tril()[None].expand(b, -1, -1)
        torch.testing.assert_close(out.cpu().double(), _reference(q.cpu(), k.cpu(), v.cpu(), bias, causal, 0.1), atol=1e-4, rtol=1e-4)
        # A sliding-window mask is refused, not approximated.
        window = torch.ones(length, length, dtype=torch.bool).tril() & ~torch.ones(length, length, dtype=torch.bool).tril(-3)
        with pytest.raises(FcotError, match="causal masks with padding only"):
            fcot_attention_forward(module, q, k, v, window[None, None].expand(b, 1, -1, -1).to(DEVICE), scaling=0.1)
    finally:
        unregister_state(module.config)
    with pytest.raises(FcotError, match="runs only inside a model patched"):
        fcot_attention_forward(module, q, k, v, None)


def _inputs(processor, sizes=((64, 64), (128, 64))):
    images = random_images(sizes)
    batch = processor(images=[[im] for im in images], text=["<IMG_CONTEXT> w1 w2", "w3 <IMG_CONTEXT> w4 w5 w6 w7"][: len(images)],
                      return_tensors="pt", padding=True)
    return {k: v.to(DEVICE) for k, v in batch.items()}


def test_native_proportional_generate_and_text_only():
    cfg = tiny_config()
    model, processor = tiny_model(cfg).to(DEVICE), tiny_processor(cfg)
    fcot.apply_fcot(model, processor, compressor="tome", ratio=0.5)
    inputs = _inputs(processor)
    plain = model(**inputs).logits
    text = {k: v.to(DEVICE) for k, v in processor.tokenizer(["w1 w2 w3"], return_tensors="pt").items()}
    text_plain = model(**text).logits
    fcot.revert_fcot(model)
    fcot.apply_fcot(model, processor, compressor="tome", ratio=0.5, proportional_attention=True)
    assert model.model.language_model.config._attn_implementation == ATTENTION_NAME
    assert model.model.vision_tower.config._attn_implementation != ATTENTION_NAME
    proportional = model(**inputs).logits
    assert (proportional - plain).abs().max() > 1e-3, "log(size) biases changed nothing"
    kw = dict(max_new_tokens=4, do_sample=False)
    assert torch.equal(model.generate(**inputs, **kw), model.generate(**inputs, use_cache=False, **kw))
    torch.testing.assert_close(model(**text).logits, text_plain, atol=1e-5, rtol=1e-5)
    fcot.revert_fcot(model)
    assert model.model.language_model.config._attn_implementation != ATTENTION_NAME


def test_native_proportional_backends_agree():
    cfg = tiny_config()
    model, processor = tiny_model(cfg).to(DEVICE), tiny_processor(cfg)
    fcot.apply_fcot(model, processor, compressor="avg", ratio=0.75, proportional_attention=True, fused=False)
    inputs = _inputs(processor, sizes=((64, 64),))
    reference = model(**inputs).logits
    fcot.revert_fcot(model)
    fcot.apply_fcot(model, processor, compressor="avg", ratio=0.75, proportional_attention=True, backend=KERNEL)
    torch.testing.assert_close(model(**inputs).logits, reference, atol=2e-4, rtol=2e-4)


def test_chat_proportional_batch_chat():
    from ..tiny_internvl import tiny_tokenizer

    model, tok = tiny_chat_model().to(DEVICE), tiny_tokenizer()
    fcot.apply_fcot(model, tok, compressor="tome", ratio=0.75, proportional_attention=True)
    replies = model.batch_chat(tok, torch.randn(3, 3, 64, 64, device=DEVICE), ["w1", "w2 w3"],
                               dict(max_new_tokens=3, do_sample=False), num_patches_list=[2, 1])
    assert len(replies) == 2
    assert model.language_model.config._attn_implementation == ATTENTION_NAME


def test_proportional_bad_setups():
    wide = tiny_config()
    wide.text_config.num_attention_heads, wide.text_config.head_dim = 4, 32  # head_dim 32
    with pytest.raises(FcotError, match=r"head_dim in \(64, 80, 96, 128\); the LLM has 32"):
        fcot.apply_fcot(tiny_model(wide), compressor="tome", proportional_attention=True)
    model = tiny_chat_model(tiny_chat_config())

    class NoBackend(type(model.language_model)):
        _supports_attention_backend = False

    model.language_model.__class__ = NoBackend
    with pytest.raises(FcotError, match="AttentionInterface; NoBackend does not"):
        fcot.apply_fcot(model, compressor="tome", proportional_attention=True)
    assert not fcot.is_patched(model) and type(model.mlp1).__name__ == "Sequential"


def test_chat_forward_image_flags_with_proportional_attention():
    # OpenGVLab's forward drops the features of tiles with image_flags == 0; the log-size biases must follow.
    from ..tiny_internvl import IMG_CONTEXT, tiny_tokenizer

    model, tok = tiny_chat_model().to(DEVICE), tiny_tokenizer()
    fcot.apply_fcot(model, compressor="tome", ratio=0.5, proportional_attention=True)
    model.img_context_token_id = tok.convert_tokens_to_ids(IMG_CONTEXT)
    ids = tok([f"<s> {' '.join([IMG_CONTEXT] * 16)} w1"], return_tensors="pt")["input_ids"].to(DEVICE)
    pv = torch.randn(3, 3, 64, 64, device=DEVICE)
    flags = torch.tensor([[1], [0], [1]], device=DEVICE)
    out = model(pixel_values=pv, input_ids=ids, image_flags=flags).logits
    # Same as running the two kept tiles alone.
    alone = model(pixel_values=pv[[0, 2]], input_ids=ids, image_flags=torch.ones(2, 1, dtype=torch.long, device=DEVICE)).logits
    torch.testing.assert_close(out, alone, atol=1e-5, rtol=1e-5)
    with pytest.raises(FcotError, match="pixel_values' 3 tiles give 24"):
        model(pixel_values=pv, input_ids=ids, image_flags=torch.ones(3, 1, dtype=torch.long, device=DEVICE))
