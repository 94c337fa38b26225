"""fcot.apply_fcot on the OpenGVLab remote-code family (a tiny InternVLChatModel with the same
contract): revert is exact, ``none`` is the unpatched model, tokens per tile, chat/batch_chat
and generate with mixed tile counts and the KV cache, the mismatch error, save/load with mlp1
keys, backends, isolation, bad input."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("transformers")

import fcot  # noqa: E402
from fcot import FcotError  # noqa: E402
from fcot_kernels.testing import runnable_backends  # noqa: E402

from ...conftest import DEVICE  # noqa: E402
from ..tiny_internvl import IMG_CONTEXT, IMG_END, IMG_START, tiny_tokenizer  # noqa: E402
from ..tiny_internvl_chat import register, tiny_chat_config, tiny_chat_model  # noqa: E402

KERNEL = (runnable_backends(DEVICE, has_cuda=False) or ["reference"])[-1]
GEN = dict(max_new_tokens=4, do_sample=False)


def _batch(model, tokenizer, tiles_per_sample, prompts=("w1 w2", "w3 w4 w5 w6"), per_tile=None):
    """input_ids/attention_mask as batch_chat builds them (left padding), IMG_CONTEXT x tiles."""
    model.img_context_token_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT)
    per_tile = per_tile or model.num_image_token
    texts = [f"<s> {IMG_START}" + f" {IMG_CONTEXT}" * per_tile * n + f" {IMG_END} {p}" for n, p in zip(tiles_per_sample, prompts)]
    tokenizer.padding_side = "left"
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    return enc["input_ids"].to(DEVICE), enc["attention_mask"].to(DEVICE)


def _forward(model, pixel_values, ids, mask):
    return model(pixel_values=pixel_values, input_ids=ids, attention_mask=mask,
                 image_flags=torch.ones(pixel_values.shape[0], 1, dtype=torch.long, device=DEVICE)).logits


@torch.no_grad()
def _greedy_without_cache(model, pv, ids, mask, steps):
    """Greedy decoding by full forwards of the language model (no cache) on the patched features."""
    emb = model.language_model.get_input_embeddings()
    x = emb(ids).clone()
    x[ids == model.img_context_token_id] = model.extract_feature(pv).reshape(-1, x.shape[-1])
    out = []
    for _ in range(steps):
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model.language_model(inputs_embeds=x, attention_mask=mask, position_ids=pos, use_cache=False).logits
        nxt = logits[:, -1].argmax(-1)
        out.append(nxt)
        x = torch.cat([x, emb(nxt)[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return torch.stack(out, 1)


@pytest.fixture(scope="module")
def chat():
    return tiny_chat_model().to(DEVICE), tiny_tokenizer()


def _perturb(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".compressor." in name:
                p.add_(torch.randn_like(p) * 0.02)


def test_apply_then_revert_is_bit_identical(chat):
    model, tok = chat
    pv = torch.randn(3, 3, 64, 64, device=DEVICE)
    ids, mask = _batch(model, tok, [1, 2])
    before = _forward(model, pv, ids, mask)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    config, mlp1, lm_config = model.config, model.mlp1, model.language_model.config
    fcot.apply_fcot(model, tok, compressor="dwconv", ratio=0.75)
    assert model.num_image_token == 4 and model.config.fcot["compressor"] == "dwconv"
    assert model.language_model.config is not lm_config and not hasattr(config, "fcot")
    _forward(model, pv, *_batch(model, tok, [1, 2]))
    fcot.revert_fcot(model)
    assert model.config is config and model.mlp1 is mlp1 and model.num_image_token == 16
    assert model.language_model.config is lm_config
    assert "generate" not in vars(model) and "pixel_shuffle" not in vars(model)
    after = model.state_dict()
    assert state.keys() == after.keys() and all(torch.equal(state[k], after[k]) for k in state)
    assert torch.equal(_forward(model, pv, ids, mask), before)


def test_none_equals_unpatched(chat):
    model, tok = chat
    pv = torch.randn(2, 3, 64, 64, device=DEVICE)
    ids, mask = _batch(model, tok, [1, 1])
    before = _forward(model, pv, ids, mask)
    fcot.apply_fcot(model, compressor="none", fused=False)
    try:
        torch.testing.assert_close(_forward(model, pv, ids, mask), before, atol=1e-5, rtol=1e-5)
    finally:
        fcot.revert_fcot(model)


@pytest.mark.parametrize("compressor,ratio", [("none", 0.5), ("conv", 0.5), ("avg", 0.75), ("tome", 0.5), ("prune", 0.75)])
def test_tokens_per_tile_real_grid(compressor, ratio):
    model = tiny_chat_model(tiny_chat_config(image_size=448, patch_size=14)).to(DEVICE)
    assert model.num_image_token == 256
    fcot.apply_fcot(model, compressor=compressor, ratio=ratio)
    expected = 256 if compressor == "none" else {0.5: 128, 0.75: 64}[ratio]
    assert model.num_image_token == expected
    with torch.no_grad():
        feats = model.extract_feature(torch.randn(2, 3, 448, 448, device=DEVICE))
    assert feats.shape == (2, expected, 128) and torch.isfinite(feats).all()


def test_chat_batch_chat_generate_mixed_tiles(chat):
    model, tok = chat
    fcot.apply_fcot(model, tok, compressor="tome", ratio=0.5)
    try:
        pv = torch.randn(4, 3, 64, 64, device=DEVICE)
        ids, mask = _batch(model, tok, [1, 3])
        assert int((ids == model.img_context_token_id).sum()) == 4 * 8
        cached = model.generate(pixel_values=pv, input_ids=ids, attention_mask=mask, **GEN)  # KV cache on
        assert cached.shape == (2, GEN["max_new_tokens"])
        assert torch.equal(cached, _greedy_without_cache(model, pv, ids, mask, GEN["max_new_tokens"]))
        replies = model.batch_chat(tok, pv, ["w1 w2", "w3"], dict(GEN), num_patches_list=[1, 3])
        assert len(replies) == 2 and all(isinstance(r, str) for r in replies)
        single = model.chat(tok, pv[:3], "w5", dict(GEN))
        assert isinstance(single, str)
    finally:
        fcot.revert_fcot(model)


def test_mismatch_error(chat):
    model, tok = chat
    pv = torch.randn(2, 3, 64, 64, device=DEVICE)
    fcot.apply_fcot(model, compressor="avg", ratio=0.5)
    try:
        ids, mask = _batch(model, tok, [1, 1], per_tile=16)  # prompts for the uncompressed model
        with pytest.raises(FcotError, match=r"16 image tokens per tile .* takes 8 per tile.*num_image_token = 8"):
            model.generate(pixel_values=pv, input_ids=ids, attention_mask=mask, **GEN)
        with pytest.raises(FcotError, match="num_image_token = 8"):
            _forward(model, pv, ids, mask)
    finally:
        fcot.revert_fcot(model)


def test_save_load_round_trip(chat, tmp_path):
    register()
    model, tok = chat
    pv = torch.randn(3, 3, 64, 64, device=DEVICE)
    fcot.apply_fcot(model, compressor="conv", ratio=0.75)
    try:
        _perturb(model)
        ids, mask = _batch(model, tok, [2, 1])
        expected = _forward(model, pv, ids, mask)
        model.save_pretrained(tmp_path, max_shard_size="200KB")  # sharded: read through the index
    finally:
        fcot.revert_fcot(model)
    assert not [f for f in os.listdir(tmp_path) if f.endswith((".bin", ".pt", ".pkl"))]
    import json

    keys = set(json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"])
    assert {"mlp1.0.weight", "mlp1.1.weight", "mlp1.3.weight", "mlp1.compressor.merge_weight"} <= keys
    loaded = fcot.load_compressed(tmp_path).to(DEVICE).eval()
    assert loaded.num_image_token == 4 and loaded.config.fcot["ratio"] == 0.75
    loaded.img_context_token_id = model.img_context_token_id
    torch.testing.assert_close(_forward(loaded, pv, ids, mask), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("compressor", ["avg", "prune"])
def test_fused_and_reference_agree(compressor):
    model, tok = tiny_chat_model(tiny_chat_config(qk_normalization=True)).to(DEVICE), tiny_tokenizer()
    pv = torch.randn(1, 3, 64, 64, device=DEVICE)
    fcot.apply_fcot(model, compressor=compressor, fused=False)
    assert model.config.fcot.get("importance", "cls") == "cls"
    ids, mask = _batch(model, tok, [1], prompts=["w1"])
    reference = _forward(model, pv, ids, mask)
    fcot.revert_fcot(model)
    fcot.apply_fcot(model, compressor=compressor, fused=True, backend=KERNEL)
    torch.testing.assert_close(_forward(model, pv, ids, mask), reference, atol=2e-4, rtol=2e-4)


def test_second_instance_untouched():
    cfg = tiny_chat_config()
    a, b = tiny_chat_model(cfg).to(DEVICE), tiny_chat_model(cfg, seed=1).to(DEVICE)
    tok = tiny_tokenizer()
    pv = torch.randn(1, 3, 64, 64, device=DEVICE)
    ids, mask = _batch(b, tok, [1])
    before = _forward(b, pv, ids, mask)
    fcot.apply_fcot(a, compressor="conv", ratio=0.5)
    assert b.num_image_token == 16 and not hasattr(b.config, "fcot") and not hasattr(cfg, "fcot")
    assert type(b.mlp1).__name__ == "Sequential" and "generate" not in vars(b)
    assert torch.equal(_forward(b, pv, ids, mask), before)


def test_bad_inputs():
    with pytest.raises(FcotError, match="ps_version='v1'"):
        fcot.apply_fcot(tiny_chat_model(tiny_chat_config(ps_version="v1")))
    model = tiny_chat_model()
    with pytest.raises(FcotError, match="tokenizer lacks the image token '<IMG_CONTEXT>'"):
        fcot.apply_fcot(model, tiny_tokenizer(with_image_tokens=False))
    with pytest.raises(ValueError, match=r"supported ratios: \[0.5, 0.75\]"):
        fcot.apply_fcot(model, compressor="dwconv", ratio=0.25)
    assert not fcot.is_patched(model) and type(model.mlp1).__name__ == "Sequential"
    model.img_context_token_id = None
    fcot.apply_fcot(model, compressor="avg")
    with pytest.raises(FcotError, match="img_context_token_id is None"):
        model.generate(pixel_values=torch.randn(1, 3, 64, 64), input_ids=torch.ones(1, 9, dtype=torch.long))


def test_batch_chat_bf16():
    model, tok = tiny_chat_model(dtype=torch.bfloat16).to(DEVICE), tiny_tokenizer()
    fcot.apply_fcot(model, tok, compressor="conv", ratio=0.5)
    pv = torch.randn(3, 3, 64, 64, device=DEVICE, dtype=torch.bfloat16)
    replies = model.batch_chat(tok, pv, ["w1", "w2 w3"], dict(GEN), num_patches_list=[2, 1])
    assert len(replies) == 2 and all(isinstance(r, str) for r in replies)
    assert model.mlp1.linear_1.weight.dtype == torch.bfloat16 and model.mlp1.compressor.merge_weight.dtype == torch.bfloat16
