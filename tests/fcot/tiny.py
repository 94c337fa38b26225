"""Tiny test fixtures built in code (no downloads): the package's byte-level tokenizer
(:mod:`fcot.models.tiny`) in the variants the data tests need (no bos, no image tokens)."""

from __future__ import annotations

from fcot.models.tiny import SPECIAL, _byte_tokenizer_json


def tiny_tokenizer(bos: bool = True, image_tokens: bool = True):
    """A PreTrainedTokenizerFast over bytes with <img>, </img>, <IMG_CONTEXT> (unless image_tokens=False)
    and the chat markers."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_byte_tokenizer_json()), pad_token="<pad>",
                                  bos_token="<s>" if bos else None)
    skip = {"<pad>", "<s>", "</s>"} | (set() if image_tokens else {"<img>", "</img>", "<IMG_CONTEXT>"})
    tok.add_special_tokens({"additional_special_tokens": [t for t in SPECIAL if t not in skip]})
    return tok
