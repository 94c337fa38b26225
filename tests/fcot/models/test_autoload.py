"""Compressed checkpoints load as the compressed model through plain transformers auto classes,
the way lmms-eval / VLMEvalKit / OpenGVLab's scripts call them, for both families; saving keeps
the remote code; without fcot the error names `pip install fcot-vl`."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers

import fcot

from .remote_checkpoint import load_remote, write_remote_checkpoint

HAS_NATIVE = hasattr(transformers, "InternVLForConditionalGeneration")


def _perturb_compressor(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".compressor." in name:
                p.add_(torch.randn_like(p) * 0.05)


def _chat_inputs(model, tok, tiles=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    ctx = tok.convert_tokens_to_ids("<IMG_CONTEXT>")
    text = tok("<|im_start|>user\nwhat is it<|im_end|><|im_start|>assistant\n")["input_ids"]
    ids = torch.tensor([text[:3] + [ctx] * (model.num_image_token * tiles) + text[3:]])
    return dict(pixel_values=torch.randn(tiles, 3, 64, 64, generator=g), input_ids=ids, attention_mask=torch.ones_like(ids),
                image_flags=torch.ones(tiles, 1, dtype=torch.long))


@pytest.mark.parametrize("llm", ["qwen2", "internlm2"])
def test_remote_code_checkpoint_loads_compressed_through_automodel(llm, tmp_path):
    teacher = write_remote_checkpoint(tmp_path / f"teacher_{llm}", llm=llm, seed=2)
    model, tok = load_remote(teacher)
    fcot.apply_fcot(model, tok, compressor="conv", ratio=0.5)
    _perturb_compressor(model)
    out = tmp_path / f"student_{llm}"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    # the folder is self-contained: the model's code (all of it, not only configuration_*.py) and fcot's loader
    for name in ("modeling_internvl_chat.py", "modeling_intern_vit.py", "modeling_internlm2.py", "conversation.py",
                 "configuration_internvl_chat.py", "fcot_autoload.py"):
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "fcot_autoload.FcotInternVLChatModel"
    assert config["auto_map"]["AutoConfig"] == "configuration_internvl_chat.InternVLChatConfig"

    plain = transformers.AutoModel.from_pretrained(str(out), trust_remote_code=True).eval()
    assert fcot.is_patched(plain) and plain.num_image_token == 8
    loaded = fcot.load_compressed(out, trust_remote_code=True).eval()
    inputs = _chat_inputs(model, tok)
    for m in (model, plain, loaded):  # what chat()/batch_chat() set before a forward
        m.img_context_token_id = tok.convert_tokens_to_ids("<IMG_CONTEXT>")
    with torch.no_grad():
        got = plain(**inputs).logits
        torch.testing.assert_close(got, loaded(**inputs).logits, rtol=0, atol=0)  # the same model, bit for bit
        # and the model that was saved (transformers 4.x may pick another attention kernel on reload: fp32 rounding)
        torch.testing.assert_close(got, model(**inputs).logits, rtol=1e-5, atol=1e-5)
    # the uncompressed layout is refused with fcot's message before the model embeds anything
    with pytest.raises(fcot.FcotError, match="made for the uncompressed model"):
        plain(**_chat_inputs(fcot.revert_fcot(model), tok))


def test_missing_fcot_names_the_package(tmp_path):
    teacher = write_remote_checkpoint(tmp_path / "t", llm="qwen2")
    model, tok = load_remote(teacher)
    fcot.apply_fcot(model, tok, compressor="avg", ratio=0.5)
    model.save_pretrained(tmp_path / "s")
    code = textwrap.dedent(f"""
        import sys
        sys.modules["fcot"] = None  # fcot not installed
        import transformers
        try:
            transformers.AutoModel.from_pretrained({str(tmp_path / "s")!r}, trust_remote_code=True)
        except ImportError as e:
            print("ERR", e)
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert "ERR" in run.stdout and "pip install fcot-vl" in run.stdout, run.stdout + run.stderr[-2000:]


@pytest.mark.skipif(not HAS_NATIVE, reason=f"transformers {transformers.__version__} has no native InternVL (4.52+)")
def test_native_checkpoint_loads_compressed_through_auto_classes(tmp_path):
    from fcot.models.tiny import build_tiny

    bundle = build_tiny(seed=3)
    model, tok = bundle.model, bundle.tokenizer
    fcot.apply_fcot(model, compressor="conv", ratio=0.75)
    _perturb_compressor(model)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["image_seq_length"] == 16 and config["fcot"]["tokens_per_tile"] == 4
    assert config["auto_map"]["AutoModelForImageTextToText"] == "fcot_autoload.FcotInternVLForConditionalGeneration"

    ctx = tok.convert_tokens_to_ids("<IMG_CONTEXT>")
    text = tok("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")["input_ids"]

    def inputs(per_tile, tiles=3):
        ids = torch.tensor([text[:2] + [ctx] * (per_tile * tiles) + text[2:]])
        pv = torch.randn(tiles, 3, 64, 64, generator=torch.Generator().manual_seed(1))
        return dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pv)

    for auto in (transformers.AutoModelForImageTextToText, transformers.AutoModel):
        auto_loaded = auto.from_pretrained(str(tmp_path), trust_remote_code=True).eval()
        assert fcot.is_patched(auto_loaded) and auto_loaded.config.image_seq_length == 4
    loaded = fcot.load_compressed(tmp_path).eval()
    with torch.no_grad():
        got = auto_loaded(**inputs(4)).logits
        torch.testing.assert_close(got, loaded(**inputs(4)).logits, rtol=0, atol=0)
        torch.testing.assert_close(got, model(**inputs(4)).logits, rtol=1e-5, atol=1e-5)
    # plain, untrusted from_pretrained: the uncompressed model with the uncompressed token count,
    # consistent with itself (no "Image features and image tokens do not match"), and fcot refuses to re-patch it
    plain = transformers.AutoModelForImageTextToText.from_pretrained(str(tmp_path)).eval()
    assert not fcot.is_patched(plain) and plain.config.image_seq_length == 16
    with torch.no_grad():
        assert torch.isfinite(plain(**inputs(16)).logits).all()
    with pytest.raises(fcot.FcotError, match="load it with fcot.load_compressed"):
        fcot.apply_fcot(plain)
