"""fcot.apply_fcot on transformers' native InternVLForConditionalGeneration: revert is exact,
``none`` is the unpatched model, token counts per compressor and ratio, processor sync, the
mismatch error, generate with mixed tile counts and the KV cache, save/load, backends, isolation."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("transformers")

import fcot  # noqa: E402
from fcot import FcotError  # noqa: E402
from fcot_kernels.testing import runnable_backends  # noqa: E402

from ...conftest import DEVICE  # noqa: E402
from ..tiny_internvl import random_images, tiny_config, tiny_model, tiny_processor, tiny_tokenizer  # noqa: E402

KERNEL = (runnable_backends(DEVICE, has_cuda=False) or ["reference"])[-1]
CASES = [("none", 0.5), *[(c, r) for c in ("avg", "dwconv", "conv", "tome", "prune") for r in (0.5, 0.75)]]
PROMPTS = ["<IMG_CONTEXT> w1 w2", "w3 <IMG_CONTEXT> w4 w5 w6 w7"]


def _features(model, pixel_values):
    cfg = model.config
    out = model.model.get_image_features(
        pixel_values=pixel_values, vision_feature_layer=cfg.vision_feature_layer,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy,
    )
    return out.pooler_output if hasattr(out, "pooler_output") else out


def _inputs(processor, sizes=((64, 64), (128, 64)), prompts=PROMPTS, seed=0):
    images = random_images(sizes, seed=seed)
    batch = processor(images=[[im] for im in images], text=list(prompts), return_tensors="pt", padding=True)
    return {k: v.to(DEVICE) for k, v in batch.items()}


@pytest.fixture(scope="module")
def tiny():
    cfg = tiny_config()
    return cfg, tiny_model(cfg).to(DEVICE), tiny_processor(cfg)


def _perturb(model):
    """Move the learnable merge off avg so that a checkpoint or backend test is not trivial."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".compressor." in name:
                p.add_(torch.randn_like(p) * 0.02)


def test_apply_then_revert_is_bit_identical(tiny):
    cfg, model, processor = tiny
    inputs = _inputs(processor)
    before = model(**inputs).logits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    config, projector, seq = model.config, model.model.multi_modal_projector, processor.image_seq_length
    lm_config = model.model.language_model.config
    fcot.apply_fcot(model, processor, compressor="conv", ratio=0.75, proportional_attention=True)
    assert model.config is not config and model.config.image_seq_length == 4 and processor.image_seq_length == 4
    assert model.config.fcot["compressor"] == "conv" and model.config.fcot["ratio"] == 0.75
    assert not hasattr(config, "fcot") and config.image_seq_length == 16, "the original config object was mutated"
    model(**_inputs(processor))
    fcot.revert_fcot(model)
    assert model.config is config and model.model.multi_modal_projector is projector
    assert model.model.language_model.config is lm_config
    assert processor.image_seq_length == seq and "pixel_shuffle" not in vars(model.model)
    assert not fcot.is_patched(model)
    after = model.state_dict()
    assert state.keys() == after.keys() and all(torch.equal(state[k], after[k]) for k in state)
    assert torch.equal(model(**inputs).logits, before)


def test_none_equals_unpatched(tiny):
    cfg, model, processor = tiny
    inputs = _inputs(processor)
    before = model(**inputs).logits
    fcot.apply_fcot(model, processor, compressor="none", fused=False)
    try:
        torch.testing.assert_close(model(**inputs).logits, before, atol=1e-5, rtol=1e-5)
    finally:
        fcot.revert_fcot(model)


@pytest.mark.parametrize("compressor,ratio", CASES)
def test_tokens_per_tile_real_grid(compressor, ratio):
    # InternVL's real tile: 448 px, 14 px patches -> 32x32 ViT tokens -> 256 after the shuffle.
    cfg = tiny_config(image_size=448, patch_size=14)
    model, processor = tiny_model(cfg).to(DEVICE), tiny_processor(cfg)
    expected = {"none": 256, 0.5: 128, 0.75: 64}["none" if compressor == "none" else ratio]
    fcot.apply_fcot(model, processor, compressor=compressor, ratio=ratio)
    assert model.config.image_seq_length == expected and processor.image_seq_length == expected
    pixel_values = torch.randn(3, 3, 448, 448, device=DEVICE)
    with torch.no_grad():
        feats = _features(model, pixel_values)
    assert feats.shape == (3, expected, cfg.text_config.hidden_size)
    assert torch.isfinite(feats).all()


def test_processor_placeholders_and_generate_mixed_tiles(tiny):
    cfg, model, processor = tiny
    fcot.apply_fcot(model, processor, compressor="tome", ratio=0.5)
    try:
        # Sample 0: two images (1 tile; 2 tiles + thumbnail); sample 1: one image of 3 tiles.
        small, wide = random_images([(64, 64), (128, 64)])
        batch = processor(images=[[small, wide], [wide]], text=["<IMG_CONTEXT> w1 <IMG_CONTEXT> w2", "w3 <IMG_CONTEXT> w4 w5"],
                          return_tensors="pt", padding=True)
        inputs = {k: v.to(DEVICE) for k, v in batch.items()}
        tiles = inputs["pixel_values"].shape[0]
        assert tiles == 7
        per_sample = (inputs["input_ids"] == cfg.image_token_id).sum(1).tolist()
        assert per_sample == [4 * 8, 3 * 8], "the processor must emit 8 placeholders per tile"
        kw = dict(max_new_tokens=4, do_sample=False)
        cached = model.generate(**inputs, **kw)
        uncached = model.generate(**inputs, use_cache=False, **kw)
        assert cached.shape == (2, inputs["input_ids"].shape[1] + 4)
        assert torch.equal(cached, uncached), "the KV cache changed the greedy tokens"
        # The first new token is the argmax of the patched forward's last logits.
        first = model(**inputs).logits[:, -1].argmax(-1)
        assert torch.equal(cached[:, inputs["input_ids"].shape[1]], first)
    finally:
        fcot.revert_fcot(model)


def test_generate_bf16():
    cfg = tiny_config()
    model, processor = tiny_model(cfg, dtype=torch.bfloat16).to(DEVICE), tiny_processor(cfg)
    fcot.apply_fcot(model, processor, compressor="conv", ratio=0.5)
    inputs = _inputs(processor)
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape == (2, inputs["input_ids"].shape[1] + 3)
    assert model.model.multi_modal_projector.linear_1.weight.dtype == torch.bfloat16


def test_mismatch_error_names_the_processor(tiny):
    cfg, model, processor = tiny
    stale = _inputs(processor)  # made for 16 tokens per tile
    fcot.apply_fcot(model, compressor="avg", ratio=0.5)  # processor not passed: not synced
    try:
        with pytest.raises(FcotError, match=r"16 image tokens per tile .* takes 8 per tile.*Fix the processor"):
            model(**stale)
        with pytest.raises(FcotError, match="Fix the processor"):
            model.generate(**stale, max_new_tokens=2)
        bad = dict(stale, pixel_values=stale["pixel_values"][:3])
        with pytest.raises(FcotError, match=r"hold 64 image tokens but pixel_values' 3 tiles give 24"):
            model(**bad)
    finally:
        fcot.revert_fcot(model)


def test_save_load_round_trip(tiny, tmp_path):
    cfg, model, processor = tiny
    fcot.apply_fcot(model, processor, compressor="conv", ratio=0.5)
    try:
        _perturb(model)
        inputs = _inputs(processor)
        expected = model(**inputs).logits
        model.save_pretrained(tmp_path)
    finally:
        fcot.revert_fcot(model)
    assert not [f for f in os.listdir(tmp_path) if f.endswith((".bin", ".pt", ".pkl"))]
    processor.image_seq_length = 16
    loaded = fcot.load_compressed(tmp_path, processor).to(DEVICE).eval()
    assert fcot.is_patched(loaded) and loaded.config.fcot["compressor"] == "conv"
    assert processor.image_seq_length == 8
    torch.testing.assert_close(loaded(**inputs).logits, expected, atol=1e-5, rtol=1e-5)
    fcot.revert_fcot(loaded)
    processor.image_seq_length = 16
    with pytest.raises(FcotError, match="load_compressed"):
        import transformers

        fcot.apply_fcot(transformers.InternVLForConditionalGeneration.from_pretrained(tmp_path))


def test_save_load_proportional_attention(tiny, tmp_path):
    cfg, model, processor = tiny
    fcot.apply_fcot(model, processor, compressor="tome", ratio=0.75, proportional_attention=True)
    try:
        inputs = _inputs(processor)
        expected = model(**inputs).logits
        model.save_pretrained(tmp_path)
    finally:
        fcot.revert_fcot(model)
    loaded = fcot.load_compressed(tmp_path).to(DEVICE).eval()
    assert loaded.config.fcot["proportional_attention"] is True
    assert loaded.model.language_model.config._attn_implementation == "fcot_merged"
    torch.testing.assert_close(loaded(**inputs).logits, expected, atol=1e-5, rtol=1e-5)


def test_load_rejects_non_fcot_and_pickle(tiny, tmp_path):
    cfg, model, processor = tiny
    model.save_pretrained(tmp_path / "plain")
    with pytest.raises(FcotError, match="no fcot section"):
        fcot.load_compressed(tmp_path / "plain")
    with pytest.raises(ValueError, match="safetensors only"):
        fcot.load_compressed(tmp_path / "plain", use_safetensors=False)


@pytest.mark.parametrize("compressor", ["none", "conv", "tome"])
def test_fused_and_reference_agree(compressor):
    cfg = tiny_config()
    model, processor = tiny_model(cfg).to(DEVICE), tiny_processor(cfg)
    fcot.apply_fcot(model, processor, compressor=compressor, fused=False)
    inputs = _inputs(processor, sizes=((64, 64),), prompts=["<IMG_CONTEXT> w1"])
    _perturb(model)
    merge = {k: v.clone() for k, v in model.state_dict().items() if ".compressor." in k}
    reference = model(**inputs).logits
    fcot.revert_fcot(model)
    fcot.apply_fcot(model, processor, compressor=compressor, fused=True, backend=KERNEL)
    model.load_state_dict(merge, strict=False)
    torch.testing.assert_close(model(**inputs).logits, reference, atol=2e-4, rtol=2e-4)


def test_second_instance_untouched():
    cfg = tiny_config()
    a, b = tiny_model(cfg).to(DEVICE), tiny_model(cfg, seed=1).to(DEVICE)
    processor = tiny_processor(cfg)
    inputs = _inputs(processor)
    before = b(**inputs).logits
    fcot.apply_fcot(a, tiny_processor(cfg), compressor="avg", ratio=0.75)
    assert not fcot.is_patched(b) and not hasattr(b.config, "fcot") and b.config.image_seq_length == 16
    assert not hasattr(cfg, "fcot") and cfg.image_seq_length == 16
    assert type(b.model.multi_modal_projector).__name__ == "InternVLMultiModalProjector"
    assert torch.equal(b(**inputs).logits, before)


def test_bad_inputs():
    cfg = tiny_config()
    model, processor = tiny_model(cfg), tiny_processor(cfg)
    with pytest.raises(ValueError, match=r"does not support ratio=0.6; supported ratios: \[0.5, 0.75\]"):
        fcot.apply_fcot(model, compressor="conv", ratio=0.6)
    with pytest.raises(ValueError, match=r"compressor='bogus' is not registered; registered compressors: \['avg', 'conv'"):
        fcot.apply_fcot(model, compressor="bogus")
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['rato'\]; accepted: \['compressor', 'ratio'"):
        fcot.apply_fcot(model, rato=0.5)
    with pytest.raises(TypeError, match="fused must be a bool"):
        fcot.apply_fcot(model, fused="yes")
    import transformers

    llm = transformers.Qwen2ForCausalLM(cfg.text_config)
    with pytest.raises(FcotError, match=r"model_type 'qwen2' .* supported model types: \['internvl'"):
        fcot.apply_fcot(llm)
    # A tokenizer without the image token.
    processor.tokenizer = tiny_tokenizer(with_image_tokens=False)
    with pytest.raises(FcotError, match="tokenizer lacks the image token '<IMG_CONTEXT>'"):
        fcot.apply_fcot(model, processor)
    assert not fcot.is_patched(model) and model.config is not None and not hasattr(model.config, "fcot")
    # A 3x3 shuffled grid (48 px tiles, 8 px patches): 1x2 windows do not divide it; tome does.
    odd = tiny_model(tiny_config(image_size=48, patch_size=8))
    with pytest.raises(ValueError, match=r"merges 1x2 windows, which do not divide the 3x3 grid"):
        fcot.apply_fcot(odd, compressor="avg", ratio=0.5)
    fcot.apply_fcot(odd, compressor="tome", ratio=0.5)
    assert odd.config.image_seq_length == 5  # 9 - round(4.5)
    with pytest.raises(FcotError, match="already patched"):
        fcot.apply_fcot(odd, compressor="tome", ratio=0.5)
    fcot.revert_fcot(odd)
    with pytest.raises(FcotError, match="not patched"):
        fcot.revert_fcot(odd)


def test_flags_that_change_nothing_warn():
    model = tiny_model()
    with pytest.warns(UserWarning, match="ratio=0.75 has no effect with compressor='none'"):
        fcot.apply_fcot(model, compressor="none", ratio=0.75)
    fcot.revert_fcot(model)
    with pytest.warns(UserWarning, match="backend='triton' has no effect with fused=False"):
        fcot.apply_fcot(model, compressor="avg", fused=False, backend="triton")
    fcot.revert_fcot(model)
    with pytest.warns(UserWarning, match="proportional_attention=True has no effect with compressor='none'"):
        fcot.apply_fcot(model, compressor="none", proportional_attention=True)
    assert model.model.language_model.config._attn_implementation != "fcot_merged"
    fcot.revert_fcot(model)
    with pytest.warns(UserWarning, match="proportional_attention=True has no effect with compressor='prune'"):
        fcot.apply_fcot(model, compressor="prune", proportional_attention=True)
    assert model.config.fcot["proportional_attention"] is False and model.config.fcot["importance"] == "cls"


def test_compressor_trains_through_the_patched_model():
    # Stage 1 of FCoT-VL trains the compressor and projector: gradients reach them, fused = reference.
    cfg = tiny_config()
    model, processor = tiny_model(cfg).to(DEVICE), tiny_processor(cfg)
    grads = {}
    for fused, backend in ((False, None), (True, KERNEL)):
        fcot.apply_fcot(model, processor, compressor="conv", ratio=0.75, fused=fused, backend=backend)
        inputs = _inputs(processor, sizes=((64, 64),), prompts=["<IMG_CONTEXT> w1"])
        proj = model.model.multi_modal_projector
        model(**inputs).logits[:, -1].square().sum().backward()
        grads[fused] = [p.grad.clone() for p in (proj.compressor.merge_weight, proj.compressor.merge_bias, proj.linear_1.weight)]
        model.zero_grad(set_to_none=True)
        fcot.revert_fcot(model)
    assert all(bool(g.abs().sum() > 0) and bool(torch.isfinite(g).all()) for g in grads[False])
    for got, want in zip(grads[True], grads[False]):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-3)


CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<IMG_CONTEXT>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_chat_format_is_the_checkpoints_chat_template(tiny):
    """The native family's prompt comes from the processor's / tokenizer's chat_template; its
    image tokens, expanded as the family does, give the processor's own ids; ChatML only without one."""
    from fcot.models import get_family
    from fcot.models.internvl import CHATML, TemplateChat

    cfg, model, processor = tiny
    family = get_family(model)
    assert family.chat_for(cfg, model, None) is CHATML and family.chat_for(cfg, model, tiny_tokenizer()) is CHATML
    assert CHATML.note  # the fallback says why
    processor = tiny_processor(cfg)
    processor.chat_template = CHATML_TEMPLATE
    fmt = family.chat_for(cfg, model, processor)
    assert isinstance(fmt, TemplateChat) and fmt.stop == ("<|im_end|>",) and fmt.placeholder == "<IMG_CONTEXT>"
    text = fmt.prompt("<image>\nw1 w2")
    assert text == "<|im_start|>user\n<IMG_CONTEXT>\nw1 w2<|im_end|>\n<|im_start|>assistant\n"
    image = random_images([(128, 64)])[0]
    ref = processor(text=[text], images=[[image]], return_tensors="pt")
    tiles = ref["pixel_values"].shape[0]
    expanded = text.replace(fmt.placeholder, fmt.image.format(context="<IMG_CONTEXT>" * (cfg.image_seq_length * tiles)))
    tok = processor.tokenizer
    assert tok(expanded, **fmt.tokenize_kwargs(expanded, tok))["input_ids"] == ref["input_ids"][0].tolist()
    # a template with a system turn: the system message goes in as its own message
    assert fmt.prompt("w1", "w3").startswith("<|im_start|>system\nw3<|im_end|>\n<|im_start|>user\nw1")
