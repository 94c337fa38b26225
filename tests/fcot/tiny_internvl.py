"""Tiny InternVL models, tokenizer and processor built in code (no downloads) for the fcot
integration tests: transformers' native ``InternVLForConditionalGeneration`` and its processor.

ViT head dim 64 and LLM head dim 64 (what ``merged_attention`` supports). ``image_size=64,
patch_size=8`` gives 8x8 patches -> 4x4 = 16 shuffled tokens per tile (fast); ``image_size=448,
patch_size=14`` gives InternVL's real 32x32 -> 256.
"""

from __future__ import annotations

import re

import torch

IMG_START, IMG_END, IMG_CONTEXT, VIDEO = "<img>", "</img>", "<IMG_CONTEXT>", "<video>"
WORDS = ["<pad>", "<unk>", "<s>", "</s>", IMG_START, IMG_END, IMG_CONTEXT, VIDEO, "<|im_end|>"] + [
    f"w{i}" for i in range(87)
]
VOCAB = len(WORDS)


def tiny_tokenizer(with_image_tokens: bool = True):
    """A word-level tokenizer (whitespace split, image tokens split out) wrapped in
    ``PreTrainedTokenizerFast``, with InternVL's multimodal special tokens."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = WORDS if with_image_tokens else [w for w in WORDS if w not in (IMG_START, IMG_END, IMG_CONTEXT, VIDEO)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"<[^>]+>"), behavior="isolated"),
        pre_tokenizers.WhitespaceSplit(),
    ])
    extra = (
        dict(start_image_token=IMG_START, end_image_token=IMG_END, context_image_token=IMG_CONTEXT, video_token=VIDEO)
        if with_image_tokens else {}
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        padding_side="left", extra_special_tokens=extra, model_input_names=["input_ids", "attention_mask"],
    )


def tiny_config(image_size: int = 64, patch_size: int = 8, text_model: str = "qwen2"):
    import transformers

    return transformers.InternVLConfig(
        vision_config=dict(
            hidden_size=128, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            image_size=[image_size, image_size], patch_size=[patch_size, patch_size], use_qk_norm=False,
        ),
        text_config=dict(
            model_type=text_model, hidden_size=128, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, vocab_size=VOCAB, max_position_embeddings=4096,
            tie_word_embeddings=False,
        ),
        image_token_id=WORDS.index(IMG_CONTEXT),
        downsample_ratio=0.5,
        projector_hidden_act="gelu",
        image_seq_length=(image_size // patch_size) ** 2 // 4,
        tie_word_embeddings=False,  # transformers 5 reads the top-level flag (default True), not text_config's
    )


def tiny_model(config=None, *, seed: int = 0, dtype=torch.float32):
    """A random-weight ``InternVLForConditionalGeneration`` (eval mode); LayerNorm affine
    parameters randomised too, so no weight is a trivial 1/0."""
    import transformers

    config = config or tiny_config()
    gen = torch.random.fork_rng()
    with gen:
        torch.manual_seed(seed)
        model = transformers.InternVLForConditionalGeneration(config)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() == 1:
                    p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "weight" in name else 0.0))
                else:
                    p.copy_(torch.randn_like(p) * 0.05)
    return model.to(dtype).eval()


def _processor_class():
    import transformers
    from transformers.processing_utils import ProcessorMixin

    class TinyInternVLProcessor(transformers.InternVLProcessor):
        """transformers' InternVLProcessor without a video processor: transformers' video
        processors need torchvision, which the test machines lack (images only here). The
        attributes InternVLProcessor.__init__ sets are set the same way."""

        attributes = ["image_processor", "tokenizer"]  # transformers 4.x reads this list

        def __init__(self, image_processor=None, tokenizer=None, image_seq_length: int = 256, chat_template=None, **kwargs):
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)
            self.image_seq_length = image_seq_length
            self.start_image_token, self.end_image_token = tokenizer.start_image_token, tokenizer.end_image_token
            self.start_image_token_id = tokenizer.convert_tokens_to_ids(self.start_image_token)
            self.end_image_token_id = tokenizer.convert_tokens_to_ids(self.end_image_token)
            self.image_token, self.video_token = tokenizer.context_image_token, tokenizer.video_token
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            pattern = f"(?P<image>{re.escape(self.image_token)})|(?P<video>{re.escape(self.video_token)})"
            self.multimodal_pattern = re.compile(pattern)

    return TinyInternVLProcessor


def tiny_processor(config=None, tokenizer=None):
    """transformers' ``InternVLProcessor`` around a ``GotOcr2ImageProcessor`` built from arguments."""
    import transformers

    config = config or tiny_config()
    size = config.vision_config.image_size[0]
    image_processor = (getattr(transformers, "GotOcr2ImageProcessorPil", None) or transformers.GotOcr2ImageProcessor)(
        size={"height": size, "width": size}, crop_to_patches=True, min_patches=1, max_patches=6,
        do_rescale=True, do_normalize=True,
    )
    return _processor_class()(
        image_processor=image_processor, tokenizer=tokenizer or tiny_tokenizer(), image_seq_length=config.image_seq_length,
    )


def random_images(sizes, seed: int = 0):
    """PIL images of the given (width, height) sizes with random pixels."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]
