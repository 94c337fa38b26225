"""Tiny test fixtures built in code (no downloads): a byte-level tokenizer with InternVL's tokens."""

from __future__ import annotations

from functools import lru_cache

SPECIAL = ["<pad>", "<s>", "<img>", "</img>", "<IMG_CONTEXT>", "<|im_start|>", "<|im_end|>", "<|user|>",
           "<|assistant|>", "<|system|>", "<|end|>"]


@lru_cache(maxsize=None)
def _tokenizer_object():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    # Byte-level BPE without merges: every byte is a token, so any text round-trips exactly.
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok.to_str()


def tiny_tokenizer(bos: bool = True, image_tokens: bool = True):
    """A PreTrainedTokenizerFast over bytes with <img>, </img>, <IMG_CONTEXT> (unless image_tokens=False)
    and the chat markers."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tokenizer_object()), pad_token="<pad>",
                                  bos_token="<s>" if bos else None)
    skip = {"<pad>", "<s>"} | (set() if image_tokens else {"<img>", "</img>", "<IMG_CONTEXT>"})
    tok.add_special_tokens({"additional_special_tokens": [t for t in SPECIAL if t not in skip]})
    return tok
