"""A tiny random-weight transformers-native InternVL, built in code (no download), for tests,
``fcot distill --model tiny`` and the demo.

It has InternVL's layout (``InternVLForConditionalGeneration``: InternViT-style ViT, pixel
shuffle, MLP projector, Qwen2 LLM) at toy sizes: 64px tiles of 8px patches, so a tile gives
8x8 patches -> 16 visual tokens after the pixel shuffle (8 at ratio 0.5, 4 at 0.75); head
dims 64 (what ``merged_attention`` supports). The tokenizer is byte-level (every byte is a
token, so any text round-trips) with InternVL's image tokens and the chat markers; the image
processor is transformers' tiling one at 64px.
"""

from __future__ import annotations

import zlib
from functools import lru_cache
from typing import Any, NamedTuple

import torch
from torch import nn

TINY_NAMES = ("tiny",)
"""Values of ``common.model`` that build this model instead of loading one."""

SPECIAL = ["<pad>", "<s>", "</s>", "<img>", "</img>", "<IMG_CONTEXT>", "<|im_start|>", "<|im_end|>", "<|user|>",
           "<|assistant|>", "<|system|>", "<|end|>"]


class TinyBundle(NamedTuple):
    """What a training run needs besides the data: model, tokenizer and image processor."""

    model: Any
    tokenizer: Any
    image_processor: Any


@lru_cache(maxsize=None)
def _byte_tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))  # no merges: one token per byte
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok.to_str()


def tiny_tokenizer():
    """A byte-level ``PreTrainedTokenizerFast`` with ``<img>``, ``</img>``, ``<IMG_CONTEXT>``,
    ChatML/phi3 markers, ``<pad>``, ``<s>`` (bos) and ``</s>`` (eos)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_byte_tokenizer_json()), pad_token="<pad>",
                                  bos_token="<s>", eos_token="</s>")
    tok.add_special_tokens({"additional_special_tokens": [t for t in SPECIAL if t not in ("<pad>", "<s>", "</s>")]})
    return tok


def tiny_image_processor(tile_size: int = 64, max_tiles: int = 12):
    """transformers' tiling image processor (the one ``InternVLProcessor`` uses) at ``tile_size``."""
    from fcot.data.tiling import internvl_image_processor

    return internvl_image_processor(tile_size, max_tiles)


def tiny_config(vocab_size: int, image_token_id: int, *, image_size: int = 64, patch_size: int = 8, width: int = 128,
                layers: int = 2):
    import transformers

    return transformers.InternVLConfig(
        vision_config=dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                           num_attention_heads=width // 64, image_size=[image_size, image_size],
                           patch_size=[patch_size, patch_size], use_qk_norm=False),
        text_config=dict(model_type="qwen2", hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                         num_attention_heads=width // 64, num_key_value_heads=1, vocab_size=vocab_size,
                         max_position_embeddings=8192, tie_word_embeddings=False),
        image_token_id=image_token_id, downsample_ratio=0.5, projector_hidden_act="gelu",
        image_seq_length=(image_size // patch_size) ** 2 // 4,
        # Untied head, said on the top-level config as well as in text_config: transformers 5
        # reads the top-level flag (whose default is True) and would tie lm_head to the embeddings.
        tie_word_embeddings=False,
    )


def param_seed(seed: int, name: str) -> int:
    """The seed of parameter ``name``'s values in :func:`build_tiny`: a function of the run seed and
    the parameter's name only (not of the order parameters are created or visited, nor of the
    random numbers transformers' own init draws)."""
    return zlib.crc32(f"{seed}:{name}".encode())


def init_value(seed: int, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The fp32 value :func:`build_tiny` gives parameter ``name``: 1-D weights (norms, layer scales)
    ``1 + 0.1 z``, 1-D biases and tokens ``0.1 z``, matrices ``0.05 z``, with ``z`` standard
    normal from a CPU generator seeded by :func:`param_seed`."""
    z = torch.randn(shape, generator=torch.Generator().manual_seed(param_seed(seed, name)))
    if len(shape) == 1:
        return z * 0.1 + (1.0 if name.endswith("weight") else 0.0)
    return z * 0.05


def untie_head(model: nn.Module) -> None:
    """Give the LM head its own weight if it shares the input embeddings' (whatever the installed
    transformers did with ``tie_word_embeddings``), and record the model as untied."""
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if head.weight.untyped_storage().data_ptr() == embed.weight.untyped_storage().data_ptr():
        head.weight = nn.Parameter(embed.weight.detach().clone())
    for cfg in (model.config, getattr(model.config, "text_config", None)):
        if cfg is not None:
            cfg.tie_word_embeddings = False


def build_tiny(seed: int = 0, *, dtype: torch.dtype = torch.float32, **config_kwargs: Any) -> TinyBundle:
    """A random-weight tiny ``InternVLForConditionalGeneration`` (eval mode), its byte-level
    tokenizer and its 64px image processor. Its LM head is NOT tied to the embeddings. Every
    parameter is set by :func:`init_value` from ``seed`` and its name, so the same ``seed`` gives
    the same weights on any machine and any transformers version with the same parameter names
    (transformers' own init, whose draws differ between versions, is overwritten)."""
    import transformers

    tokenizer = tiny_tokenizer()
    config = tiny_config(len(tokenizer), tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"), **config_kwargs)
    with torch.random.fork_rng():  # transformers' init draws from the global RNG: leave it as it was
        model = transformers.InternVLForConditionalGeneration(config)
    untie_head(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(init_value(seed, name, tuple(p.shape)))
    ids = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
           "eos_token_id": tokenizer.eos_token_id}
    for cfg in (model.config, model.config.text_config, model.generation_config):
        for key, value in ids.items():
            setattr(cfg, key, value)
    size = config.vision_config.image_size[0]
    return TinyBundle(model.to(dtype).eval(), tokenizer, tiny_image_processor(size))


__all__ = ["TINY_NAMES", "TinyBundle", "build_tiny", "init_value", "param_seed", "tiny_config", "tiny_image_processor",
           "tiny_tokenizer", "untie_head"]
