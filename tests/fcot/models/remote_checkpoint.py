"""Tiny random-weight OpenGVLab-style remote-code checkpoints on disk (see remote_code/README.md):
the stand-in's ``.py`` files, a ``config.json`` with ``auto_map``, a byte-level tokenizer and
``model.safetensors``, so ``AutoModel.from_pretrained(path, trust_remote_code=True)`` loads
them through transformers' dynamic-module machinery as it loads a real InternVL2 checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

CODE = Path(__file__).parent / "remote_code"
LLMS = {"qwen2": ("Qwen2ForCausalLM", "Hermes-2"), "internlm2": ("InternLM2ForCausalLM", "internlm2-chat")}
"""Stand-in LLM -> (architecture, template): InternVL2-1B (Qwen2, Hermes-2), InternVL2-2B/8B (InternLM2, internlm2-chat)."""


def write_remote_checkpoint(folder, *, llm: str = "qwen2", seed: int = 0, image_size: int = 64, patch_size: int = 8,
                            vit_layers: int = 2, llm_layers: int = 2) -> Path:
    from safetensors.torch import save_file
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    from fcot.models.tiny import tiny_tokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for f in CODE.glob("*.py"):
        shutil.copy(f, folder / f.name)
    tokenizer = tiny_tokenizer()
    arch, template = LLMS[llm]
    ids = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    config = {
        "model_type": "internvl_chat", "architectures": ["InternVLChatModel"],
        "auto_map": {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
                     "AutoModel": "modeling_internvl_chat.InternVLChatModel",
                     "AutoModelForCausalLM": "modeling_internvl_chat.InternVLChatModel"},
        "vision_config": dict(hidden_size=128, num_attention_heads=2, intermediate_size=256, num_hidden_layers=vit_layers,
                              image_size=image_size, patch_size=patch_size, qk_normalization=False, architectures=["InternVisionModel"]),
        "llm_config": dict(architectures=[arch], hidden_size=128, intermediate_size=256, num_hidden_layers=llm_layers,
                           num_attention_heads=2, num_key_value_heads=1, vocab_size=len(tokenizer),
                           max_position_embeddings=4096, tie_word_embeddings=False, **ids),
        "downsample_ratio": 0.5, "ps_version": "v2", "select_layer": -1, "template": template,
        "force_image_size": image_size, "use_thumbnail": True, "dynamic_image_size": True, "max_dynamic_patch": 6,
        "torch_dtype": "float32",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(folder)
    cfg_cls = get_class_from_dynamic_module("configuration_internvl_chat.InternVLChatConfig", str(folder))
    model_cls = get_class_from_dynamic_module("modeling_internvl_chat.InternVLChatModel", str(folder))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = model_cls(cfg_cls.from_pretrained(str(folder)))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() == 1:
                    p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "weight" in name or "ls" in name else 0.0))
                else:
                    p.copy_(torch.randn_like(p) * 0.05)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    return folder


def load_remote(folder, **kwargs):
    """``AutoModel.from_pretrained(folder, trust_remote_code=True)`` and its tokenizer, as the
    evaluation harnesses load InternVL2."""
    import transformers

    from fcot.models.family import dtype_kwarg

    model = transformers.AutoModel.from_pretrained(str(folder), trust_remote_code=True, **dtype_kwarg(torch.float32),
                                                   **kwargs).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), trust_remote_code=True)
    return model, tokenizer
