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

import dataclasses
import functools
from typing import Any

import torch
from torch import nn

from ..compress import Compressor
from . import attention
from .base import FcotError, Patch, attach_cls_importance, build_projector, check_image_tokens, fcot_section
from .base import passthrough_shuffle, vit_layer_index
from .family import ChatFormat, FamilyParts, Loaded, ModelFamily, config_get, dtype_kwarg
from .internvl import check_processor
from ..data.tiling import InternVLChatTiler

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


def _mpt(name: str, system: str, user: str, assistant: str, sep: str, message: str) -> ChatFormat:
    # OpenGVLab's MPT separator style: system turn + sep, then role + message + sep per turn; the
    # open assistant turn is its role alone. The system turn is emitted even with an empty message.
    return ChatFormat(name=name, system=system + "{content}" + sep, user=user + "{content}" + sep + assistant,
                      stop=(sep.strip(),), system_message=message, always_system=True)


_INTERNVL_SYSTEM = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
TEMPLATES: dict[str, ChatFormat] = {
    # InternVL2-1B (Qwen2-0.5B) and InternVL2-40B/76B: "Hermes-2".
    "Hermes-2": _mpt("Hermes-2", "<|im_start|>system\n", "<|im_start|>user\n", "<|im_start|>assistant\n", "<|im_end|>",
                     _INTERNVL_SYSTEM),
    # InternVL2-2B/8B/26B (InternLM2): "internlm2-chat".
    "internlm2-chat": _mpt("internlm2-chat", "<|im_start|>system\n", "<|im_start|>user\n", "<|im_start|>assistant\n",
                           "<|im_end|>", _INTERNVL_SYSTEM),
    # InternVL2-4B (Phi-3-mini): "phi3-chat".
    "phi3-chat": _mpt("phi3-chat", "<|system|>\n", "<|user|>\n", "<|assistant|>\n", "<|end|>", _INTERNVL_SYSTEM),
    # InternVL2.5 / 3 remote code: "internvl2_5" (ChatML with a newline after each <|im_end|>).
    "internvl2_5": _mpt("internvl2_5", "<|im_start|>system\n", "<|im_start|>user\n", "<|im_start|>assistant\n",
                        "<|im_end|>\n", "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"),
}
"""OpenGVLab's conversation templates (``config.template``) that InternVL2/2.5 checkpoints use,
as the prompt their ``chat()`` builds: ``get_conv_template(config.template)`` with the model's
``system_message``, the question (``<image>\\n`` prepended when it has no placeholder) as the
user turn, and the assistant's turn left open; the answer stops at ``sep.strip()``."""


class InternVLChatFamily(ModelFamily):
    """OpenGVLab's remote-code ``InternVLChatModel`` (``model_type="internvl_chat"``)."""

    model_type = "internvl_chat"
    description = "OpenGVLab remote-code InternVL2/2.5 (InternVLChatModel, trust_remote_code=True)"
    needs_remote_code = True
    auto_classes = ("AutoModel", "AutoModelForCausalLM")

    def patch(self, model, processor, compressor, patch) -> None:
        patch_internvl_chat(model, processor, compressor, patch)

    def projector_slot(self, model: nn.Module) -> tuple[nn.Module, str]:
        if not hasattr(model, "mlp1"):
            raise FcotError(f"{type(model).__name__} has model_type 'internvl_chat' but no mlp1 projector")
        return model, "mlp1"

    def parts(self, model: nn.Module, tokenizer: Any = None) -> FamilyParts:
        lm = model.language_model
        decoder = lm.get_decoder() if hasattr(lm, "get_decoder") else lm.model
        return FamilyParts(
            owner=model, projector_attr="mlp1", vision=model.vision_model, decoder=decoder, head=lm.get_output_embeddings(),
            layer=int(getattr(model, "select_layer", -1)), drop_cls=True, image_token_id=self.image_token_id(model, tokenizer),
        )

    def image_token_id(self, model: nn.Module, tokenizer: Any) -> int:
        token = getattr(model, "img_context_token_id", None)
        if token is None:
            if tokenizer is None:
                raise FcotError("model.img_context_token_id is None and no tokenizer was given to read <IMG_CONTEXT> from")
            token = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
            model.img_context_token_id = token  # what chat()/batch_chat() set before generating
        return int(token)

    def tiler(self, config: Any = None, image_processor: Any = None, tile_size: int | None = None):
        if image_processor is not None:
            raise ValueError("image_processor is for family='internvl' (transformers-native); the remote-code family "
                             "tiles in fcot (InternVLChatTiler): drop image_processor or use family='internvl'")
        if tile_size is None and config is not None:
            tile_size = self._image_size(config)
        use_thumbnail = bool(config_get(config, "use_thumbnail", True)) if config is not None else True
        return InternVLChatTiler(tile_size or 448, use_thumbnail=use_thumbnail)

    @staticmethod
    def _image_size(config: Any) -> int:
        vision = config_get(config, "vision_config", {}) or {}
        return int(config_get(config, "force_image_size") or config_get(vision, "image_size", 448))

    def chat(self, config: Any, model: nn.Module | None = None) -> ChatFormat:
        name = config_get(config, "template")
        if name not in TEMPLATES:
            raise FcotError(f"config.template={name!r}: fcot knows the InternVL templates {sorted(TEMPLATES)}; "
                            "add the template's ChatFormat to fcot.models.internvl_chat.TEMPLATES")
        fmt = TEMPLATES[name]
        message = getattr(model, "system_message", None) if model is not None else None
        if message is not None and message != fmt.system_message:
            fmt = dataclasses.replace(fmt, system_message=message)
        return fmt

    def base_tokens(self, config: Any) -> int:
        vision = config_get(config, "vision_config", {}) or {}
        side = self._image_size(config) // int(config_get(vision, "patch_size"))
        return int(side * side * float(config_get(config, "downsample_ratio")) ** 2)

    def tokens_per_tile(self, model: nn.Module) -> int:
        return int(model.num_image_token)

    def load(self, path, *, dtype=torch.float32, device="cpu", trust_remote_code=False) -> Loaded:
        import json
        import os

        import transformers

        from ..patch import load_compressed

        config = json.loads(open(os.path.join(path, "config.json"), encoding="utf-8").read())
        kwargs = dict(dtype_kwarg(dtype), trust_remote_code=trust_remote_code)
        if "fcot" in config:
            model = load_compressed(path, **kwargs)
        else:
            model = transformers.AutoModel.from_pretrained(path, **kwargs)
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        return Loaded(model.to(device).eval(), tokenizer, None, "fcot" in config)

    def check_generate(self, model: nn.Module) -> None:
        """OpenGVLab's ``generate`` calls ``language_model.generate``; OpenGVLab's InternLM2 derives
        from ``PreTrainedModel`` alone, which includes ``GenerationMixin`` only on transformers < 5."""
        lm = model.language_model
        if not callable(getattr(lm, "generate", None)):
            import transformers

            raise FcotError(
                f"{type(lm).__name__} (this checkpoint's LLM, OpenGVLab remote code) has no generate() under transformers "
                f"{transformers.__version__}: its class derives from PreTrainedModel without GenerationMixin, which "
                "PreTrainedModel includes only before transformers 5. Use transformers 4.37-4.51 for OpenGVLab's InternLM2 "
                "checkpoints (InternVL2-2B/8B/26B); see the README's version table"
            )

    def generate(self, model: nn.Module, inputs: dict[str, torch.Tensor], **kwargs: Any) -> torch.Tensor:
        self.check_generate(model)
        # InternVLChatModel.generate embeds the prompt and calls the LLM's generate on
        # inputs_embeds, which returns the new tokens only.
        return model.generate(pixel_values=inputs.get("pixel_values"), input_ids=inputs["input_ids"],
                              attention_mask=inputs["attention_mask"], **kwargs)

    def prefill(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> Any:
        pixel_values = inputs.get("pixel_values")
        if pixel_values is None:  # InternVLChatModel.forward needs images: a text-only prompt is the LLM's
            return model.language_model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=True)
        flags = torch.ones(pixel_values.shape[0], 1, dtype=torch.long, device=pixel_values.device)
        return model(pixel_values=pixel_values, input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                     image_flags=flags, use_cache=True)


FAMILY = InternVLChatFamily()
