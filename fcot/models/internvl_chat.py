"""fcot for OpenGVLab's remote-code ``InternVLChatModel`` (``model_type == "internvl_chat"``:
InternVL2/2.5 checkpoints loaded with ``trust_remote_code=True``; the FCoT-VL paper's models).

The contract read from the model: ``vision_model`` (InternViT: ``encoder.layers[i].attn``),
``mlp1`` = Sequential(LayerNorm, Linear, GELU, Linear), ``language_model``,
``num_image_token``, ``downsample_ratio``, ``ps_version``, ``select_layer``,
``img_context_token_id``, ``extract_feature`` (which calls ``self.pixel_shuffle`` then
``self.mlp1``), ``forward`` and ``generate`` (which embed the ``IMG_CONTEXT`` tokens), and
``chat``/``batch_chat`` (which build prompts with ``num_image_token`` per tile).

What the patch changes on the instance (undone by ``fcot.revert_fcot``): ``mlp1`` ->
:class:`~fcot.models.base.FcotProjector` (its state dict keeps the ``mlp1.0/1/3`` names, the
compressor under ``mlp1.compressor.``), ``pixel_shuffle`` -> a pass-through,
``num_image_token`` -> the compressed count, a private config copy with an ``fcot`` section,
a forward pre-hook and an instance-level ``generate`` that check the ``IMG_CONTEXT`` count
before the model embeds the features, and the prune / proportional-attention hooks.
"""

from __future__ import annotations

import functools
from typing import Any

from torch import nn

from ..compress import Compressor
from . import attention
from .base import FcotError, Patch, attach_cls_importance, build_projector, check_image_tokens, fcot_section
from .base import passthrough_shuffle, vit_layer_index
from .internvl import check_processor

CONTRACT = ("vision_model", "mlp1", "language_model", "num_image_token", "downsample_ratio", "extract_feature", "pixel_shuffle")


def patch_internvl_chat(model: nn.Module, processor: Any, compressor: Compressor, patch: Patch) -> None:
    missing = [name for name in CONTRACT if not hasattr(model, name)]
    if missing:
        raise FcotError(f"{type(model).__name__} has model_type 'internvl_chat' but lacks {missing} of InternVLChatModel's contract")
    if getattr(model, "ps_version", "v2") == "v1":
        raise FcotError("ps_version='v1' (a transposed pixel shuffle) is not supported; fcot's fused shuffle is ps_version 'v2'")
    config = model.config
    vision = config.vision_config
    image = getattr(config, "force_image_size", None) or vision.image_size
    side = int(image) // int(vision.patch_size)
    scale = float(model.downsample_ratio)
    r = round(1 / scale)
    if side % r:
        raise FcotError(f"the ViT grid {side}x{side} is not divisible by the pixel shuffle's 1/downsample_ratio = {r}")
    shuffled = (side // r, side // r)
    compressor.check_grid(shuffled)
    base = int(model.num_image_token)
    if base != shuffled[0] * shuffled[1]:
        raise FcotError(f"num_image_token={base} but the ViT grid gives {shuffled[0] * shuffled[1]} tokens per tile")
    tokens_out = compressor.tokens_out(base)
    if processor is not None:  # the tokenizer (or a processor holding it) that chat/batch_chat get
        check_processor(processor, model.img_context_token_id, base)

    importance = None
    if compressor.name == "prune":
        head_dim = vision.hidden_size // vision.num_attention_heads
        if head_dim in attention.HEAD_DIMS:
            layers = model.vision_model.encoder.layers
            idx = vit_layer_index(int(getattr(model, "select_layer", -1)), len(layers))
            attach_cls_importance(patch, layers[idx].attn)
            importance = "cls"
        else:
            importance = "norm"
            patch.info["warn"] = f"compressor='prune' ranks tokens by their L2 norm: merged_attention has no head_dim {head_dim}"

    new_config = patch.own_config()
    new_config.fcot = fcot_section(patch.options, tokens_out, {}, importance)
    if compressor.width is None:
        compressor.width = vision.hidden_size * r * r
    projector = build_projector(model.mlp1, compressor, patch, scale=scale, key_format="mlp1")
    patch.setattr(model, "mlp1", projector)
    patch.setattr(model, "pixel_shuffle", passthrough_shuffle(patch, scale))
    patch.setattr(model, "num_image_token", tokens_out)

    fix = (
        f"Build the prompts with model.num_image_token = {tokens_out} IMG_CONTEXT tokens per tile (chat/batch_chat do), "
        f"not with the uncompressed {base}."
    )
    state = patch.state

    def check(input_ids, tiles, tile_keep=None):
        token_id = model.img_context_token_id
        if token_id is None:
            raise FcotError("model.img_context_token_id is None: set it to the tokenizer's IMG_CONTEXT id (chat/batch_chat do)")
        state.start(check_image_tokens(input_ids, token_id, tiles, tokens_out, base, fix), tile_keep)

    def pre_forward(module, args, kwargs):
        pixel_values = kwargs.get("pixel_values", args[0] if args else None)
        input_ids = kwargs.get("input_ids", args[1] if len(args) > 1 else None)
        flags = kwargs.get("image_flags")
        keep = None if flags is None else flags.reshape(-1) == 1  # forward drops the features of flagged-out tiles
        tiles = None if pixel_values is None else int(keep.sum()) if keep is not None else pixel_values.shape[0]
        check(input_ids, tiles, keep)

    patch.hook(model.register_forward_pre_hook(pre_forward, with_kwargs=True))

    original_generate = model.generate

    @functools.wraps(original_generate)
    def generate(pixel_values=None, input_ids=None, attention_mask=None, visual_features=None, **kwargs):
        tiles = None
        if pixel_values is not None:
            tiles = visual_features.shape[0] if visual_features is not None else pixel_values.shape[0]
        check(input_ids, tiles)
        return original_generate(
            pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask, visual_features=visual_features, **kwargs
        )

    patch.setattr(model, "generate", generate)

    if patch.options.proportional_attention:
        attention.enable(patch, model.language_model.config, model.language_model)

    if processor is not None and hasattr(processor, "image_seq_length"):
        patch.setattr(processor, "image_seq_length", tokens_out)
