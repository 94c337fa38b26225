"""fcot for transformers' native InternVL (``model_type == "internvl"``):
``InternVLForConditionalGeneration`` / ``InternVLModel`` (InternVL2.5/3/3.5 ``-hf`` checkpoints).

What the patch changes on the instance (all undone by ``fcot.revert_fcot``):

* ``model.model.multi_modal_projector`` -> :class:`~fcot.models.base.FcotProjector` (the
  teacher's weights + the compressor); ``model.model.pixel_shuffle`` -> a pass-through, since
  the projector shuffles inside its kernel;
* a private copy of ``model.config`` with ``image_seq_length`` = the compressed count per tile
  and an ``fcot`` section; the processor's ``image_seq_length`` follows;
* a forward pre-hook on ``model.model`` that checks the image-token count of ``input_ids``
  before transformers' own check can fail, and starts the proportional-attention state;
* ``prune``: a forward hook on the selected ViT layer's attention recording the CLS row's
  attention; ``proportional_attention``: the text config's attention implementation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..compress import Compressor
from . import attention
from .base import FcotError, Patch, attach_cls_importance, build_projector, check_image_tokens, fcot_section
from .base import passthrough_shuffle, vit_layer_index
from .family import ChatFormat, FamilyParts, Loaded, ModelFamily, config_get, dtype_kwarg
from ..data.tiling import HFTiler, internvl_image_processor


def _pair(v: Any) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (list, tuple)) else (int(v), int(v))


def check_processor(processor: Any, image_token_id: int | None, tokens_base: int, *, default_token: str = "<IMG_CONTEXT>") -> str:
    """The processor's image token after checking that its tokenizer has it (with the model's
    id, when the model has one yet)."""
    tokenizer = getattr(processor, "tokenizer", processor)
    token = getattr(processor, "image_token", None) or default_token
    if not hasattr(tokenizer, "convert_tokens_to_ids"):
        raise FcotError(f"processor must be a transformers processor or tokenizer, got {type(processor).__name__}")
    ids = tokenizer.convert_tokens_to_ids(token)
    if ids is None or ids == getattr(tokenizer, "unk_token_id", None) or token not in tokenizer.get_vocab():
        raise FcotError(
            f"the processor's tokenizer lacks the image token {token!r}; fix the processor (its tokenizer must have "
            f"{token!r}" + (f" with id {image_token_id}, the model's image token id)" if image_token_id is not None else ")")
        )
    if image_token_id is not None and ids != image_token_id:
        raise FcotError(
            f"the processor's image token {token!r} has id {ids} but the model's image_token_id is {image_token_id}: "
            f"model and processor are from different checkpoints"
        )
    seq = getattr(processor, "image_seq_length", None)
    if seq is not None and seq != tokens_base:
        raise FcotError(
            f"processor.image_seq_length={seq} but the model's tiles give {tokens_base} visual tokens uncompressed; "
            f"fix the processor (image_seq_length={tokens_base}) before compressing"
        )
    return token


def patch_internvl(model: nn.Module, processor: Any, compressor: Compressor, patch: Patch) -> None:
    inner = model.model if hasattr(getattr(model, "model", None), "multi_modal_projector") else model
    if not hasattr(inner, "multi_modal_projector") or not hasattr(inner, "vision_tower"):
        raise FcotError(f"{type(model).__name__} has model_type 'internvl' but no multi_modal_projector/vision_tower")
    config = model.config
    vision = config.vision_config
    image, patch_size = _pair(vision.image_size), _pair(vision.patch_size)
    grid = (image[0] // patch_size[0], image[1] // patch_size[1])
    scale = float(config.downsample_ratio)
    r = round(1 / scale)
    if grid[0] % r or grid[1] % r:
        raise FcotError(f"the ViT grid {grid} is not divisible by the pixel shuffle's 1/downsample_ratio = {r}")
    shuffled = (grid[0] // r, grid[1] // r)
    compressor.check_grid(shuffled)
    base = shuffled[0] * shuffled[1]
    tokens_out = compressor.tokens_out(base)
    image_token_id = config.image_token_id
    if processor is not None:
        check_processor(processor, image_token_id, base)

    importance = None
    if compressor.name == "prune":
        layer = config.vision_feature_layer
        has_cls = config.vision_feature_select_strategy == "default" and isinstance(layer, int)
        head_dim = vision.hidden_size // vision.num_attention_heads
        if has_cls and head_dim in attention.HEAD_DIMS:
            idx = vit_layer_index(layer, len(inner.vision_tower.encoder.layer))
            attach_cls_importance(patch, inner.vision_tower.encoder.layer[idx].attention)
            importance = "cls"
        else:
            importance = "norm"
            patch.info["warn"] = (
                f"compressor='prune' ranks tokens by their L2 norm: this ViT's CLS attention is not available "
                f"(vision_feature_select_strategy={config.vision_feature_select_strategy!r}, head_dim={head_dim})"
            )

    new_config = patch.own_config()
    new_config.image_seq_length = tokens_out
    new_config.fcot = fcot_section(patch.options, tokens_out, {"image_seq_length": config.image_seq_length}, importance)

    width = vision.hidden_size * r * r
    if compressor.width is None:
        compressor.width = width
    projector = build_projector(inner.multi_modal_projector, compressor, patch, scale=scale, key_format="transformers")
    patch.setattr(inner, "multi_modal_projector", projector)
    patch.setattr(inner, "pixel_shuffle", passthrough_shuffle(patch, scale))

    fix = (
        "Fix the processor: pass it to fcot.apply_fcot(model, processor) or set "
        f"processor.image_seq_length = {tokens_out}."
    )
    state = patch.state

    def pre_forward(module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        pixel_values = kwargs.get("pixel_values", args[1] if len(args) > 1 else None)
        tiles = pixel_values.shape[0] if pixel_values is not None else None
        encoded = (kwargs.get("mm_encoder_outputs") or {}).get("image")
        if tiles is None and encoded is not None:
            # transformers >= 5 generate encodes the images before the prefill forward.
            tiles = getattr(encoded, "pooler_output", encoded).shape[0]
        if tiles is not None:
            if input_ids is None and kwargs.get("inputs_embeds") is not None:
                # Embeddings instead of ids: find the image tokens the way transformers does.
                embeds = kwargs["inputs_embeds"]
                token = module.get_input_embeddings()(torch.tensor(image_token_id, device=embeds.device))
                input_ids = torch.where((embeds == token).all(-1), image_token_id, image_token_id + 1)
            state.start(check_image_tokens(input_ids, image_token_id, tiles, tokens_out, base, fix))
            return None
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        if cache is None or (hasattr(cache, "get_seq_length") and cache.get_seq_length() == 0):
            state.start(None)  # a text-only prefill
        return None

    patch.hook(inner.register_forward_pre_hook(pre_forward, with_kwargs=True))

    if patch.options.proportional_attention:
        attention.enable(patch, inner.language_model.config, inner.language_model)

    if processor is not None and hasattr(processor, "image_seq_length"):
        patch.setattr(processor, "image_seq_length", tokens_out)
        patch.info["processor"] = processor


CHATML = ChatFormat(
    name="chatml", system="<|im_start|>system\n{content}<|im_end|>\n",
    user="<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n", stop=("<|im_end|>",),
    note="the checkpoint has no chat template (tokenizer/processor chat_template): ChatML used instead",
)
"""The prompt used when a native checkpoint carries no chat template: ChatML, the format of the
InternVL2.5/3 ``-hf`` checkpoints' LLMs (Qwen2.5 / InternLM2.5). ``note`` records the fallback."""

IMAGE = "<image>"


@dataclass(frozen=True)
class TemplateChat(ChatFormat):
    """The checkpoint's own Jinja chat template, applied as transformers' ``InternVLProcessor``
    does: ``apply_chat_template`` on one user message whose content is one ``{"type": "image"}``
    per image followed by ``{"type": "text", "text": question}``, with the generation prompt. The
    template writes the processor's image token (``placeholder``, ``<IMG_CONTEXT>``) per image,
    which the caller expands to ``<img>`` + context tokens + ``</img>`` as the processor does."""

    template: str = ""
    tokenizer: Any = field(default=None, repr=False, compare=False)

    def messages(self, question: str, system_message: str | None = None) -> list[dict[str, Any]]:
        images = question.count(IMAGE)
        content = [{"type": "image"}] * images + [{"type": "text", "text": question.replace(IMAGE, "").strip()}]
        system = [{"role": "system", "content": [{"type": "text", "text": system_message}]}] if system_message else []
        return system + [{"role": "user", "content": content}]

    def prompt(self, question: str, system_message: str | None = None) -> str:
        return self.tokenizer.apply_chat_template(self.messages(question, system_message), chat_template=self.template,
                                                  tokenize=False, add_generation_prompt=True)

    def tokenize_kwargs(self, text: str, tokenizer: Any) -> dict[str, Any]:
        # InternVLProcessor.apply_chat_template: no second BOS when the template writes one.
        bos = getattr(tokenizer, "bos_token", None)
        return {"add_special_tokens": False} if bos and text.startswith(bos) else {}


def chat_template_of(tokenizer: Any) -> str | None:
    """The tokenizer's (or processor's) default chat template, or None."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates: transformers applies "default"
        template = template.get("default")
    return template if isinstance(template, str) and template.strip() else None


def end_of_turn(tokenizer: Any, template: str) -> str | None:
    """The special token the template closes an assistant turn with (``<|im_end|>`` for ChatML,
    ``<|eot_id|>`` for Llama 3), found by rendering one answered turn: the first special or added
    token after the answer; None when the template closes the turn with plain text or cannot
    render an answered turn."""
    from jinja2 import TemplateError

    mark = "fcotANSWERfcot"
    conversation = [{"role": "user", "content": [{"type": "text", "text": "q"}]},
                    {"role": "assistant", "content": [{"type": "text", "text": mark}]}]
    try:
        text = tokenizer.apply_chat_template(conversation, chat_template=template, tokenize=False)
    except TemplateError:
        return None
    if mark not in text:
        return None
    rest = text[text.rindex(mark) + len(mark):].lstrip()
    specials = set(getattr(tokenizer, "all_special_tokens", [])) | set(tokenizer.get_added_vocab())
    starts = [t for t in specials if t and rest.startswith(t)]
    if starts:
        return max(starts, key=len)
    # a marker such as <|im_end|> that the vocabulary holds as one plain token
    marker = re.match(r"<[^<>\s]+>", rest)
    return marker.group(0) if marker and marker.group(0) in tokenizer.get_vocab() else None


def native_chat(tokenizer: Any) -> ChatFormat:
    """The native family's prompt for ``tokenizer`` (a tokenizer or a processor holding one): its
    chat template when it has one (:class:`TemplateChat`), else :data:`CHATML` (whose ``note``
    says so). Stops: the template's end-of-turn token; the caller adds the tokenizer's eos."""
    template = chat_template_of(tokenizer)
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    if template is None and tok is not tokenizer:
        template = chat_template_of(tok)
    if template is None:
        return CHATML
    if not hasattr(tok, "apply_chat_template"):
        raise FcotError(f"{type(tok).__name__} has a chat_template but no apply_chat_template: pass a transformers tokenizer")
    token = getattr(tokenizer, "image_token", None) or getattr(tok, "context_image_token", None) or "<IMG_CONTEXT>"
    eot = end_of_turn(tok, template)
    note = "" if eot else ("the chat template's end-of-turn token was not found (no special token follows an "
                           "answered assistant turn): answers stop at the tokenizer's eos only")
    return TemplateChat(name="chat_template", system="", user="", stop=(eot,) if eot else (), placeholder=token,
                        note=note, template=template, tokenizer=tok)


class InternVLFamily(ModelFamily):
    """transformers' native ``InternVLForConditionalGeneration`` (``model_type="internvl"``)."""

    model_type = "internvl"
    description = "transformers-native InternVL (InternVLForConditionalGeneration, -hf checkpoints)"
    auto_classes = ("AutoModel", "AutoModelForImageTextToText")

    def patch(self, model, processor, compressor, patch) -> None:
        patch_internvl(model, processor, compressor, patch)

    def projector_slot(self, model: nn.Module) -> tuple[nn.Module, str]:
        inner = model.model if hasattr(getattr(model, "model", None), "multi_modal_projector") else model
        if not hasattr(inner, "multi_modal_projector"):
            raise FcotError(f"{type(model).__name__} has model_type 'internvl' but no multi_modal_projector")
        return inner, "multi_modal_projector"

    def parts(self, model: nn.Module, tokenizer: Any = None) -> FamilyParts:
        inner, attr = self.projector_slot(model)
        if not hasattr(model, "lm_head"):
            raise FcotError(f"{type(model).__name__} has no lm_head: train InternVLForConditionalGeneration")
        return FamilyParts(
            owner=inner, projector_attr=attr, vision=inner.vision_tower, decoder=inner.language_model, head=model.lm_head,
            layer=model.config.vision_feature_layer, drop_cls=model.config.vision_feature_select_strategy == "default",
            image_token_id=int(model.config.image_token_id),
        )

    def tiler(self, config: Any = None, image_processor: Any = None, tile_size: int | None = None):
        if image_processor is None:
            if tile_size is None and config is not None:
                tile_size = _pair(config_get(config_get(config, "vision_config", {}) or {}, "image_size", 448))[0]
            return HFTiler(internvl_image_processor(tile_size or 448))
        tiler = HFTiler(image_processor)
        if tile_size is not None and tile_size != tiler.tile_size:
            raise ValueError(f"tile_size={tile_size} but image_processor tiles at {tiler.tile_size}px: drop tile_size "
                             "(the processor decides) or pass a matching processor")
        return tiler

    def chat(self, config: Any, model: nn.Module | None = None) -> ChatFormat:
        """The format without a tokenizer to read a chat template from: the ChatML fallback."""
        return CHATML

    def chat_for(self, config: Any, model: nn.Module | None = None, tokenizer: Any = None) -> ChatFormat:
        """The checkpoint's chat template (``tokenizer.chat_template``) when it has one, else ChatML
        (see :func:`native_chat`)."""
        return CHATML if tokenizer is None else native_chat(tokenizer)

    def base_tokens(self, config: Any) -> int:
        section = config_get(config, "fcot")
        if isinstance(section, dict) and "image_seq_length" in section.get("base", {}):
            return int(section["base"]["image_seq_length"])
        return int(config_get(config, "image_seq_length"))

    def tokens_per_tile(self, model: nn.Module) -> int:
        return int(model.config.image_seq_length)

    def image_token_id(self, model: nn.Module, tokenizer: Any) -> int:
        return int(model.config.image_token_id)

    def load(self, path, *, dtype=torch.float32, device="cpu", trust_remote_code=False) -> Loaded:
        import json
        import os

        import transformers

        from ..patch import load_compressed

        config = json.loads(open(os.path.join(path, "config.json"), encoding="utf-8").read())
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        legacy = os.path.join(path, "chat_template.json")  # a processor's template in the older file format
        if chat_template_of(tokenizer) is None and os.path.isfile(legacy):
            tokenizer.chat_template = json.loads(open(legacy, encoding="utf-8").read()).get("chat_template")
        try:
            image_processor = transformers.AutoImageProcessor.from_pretrained(path)
        except (OSError, ValueError):
            image_processor = None
        if "fcot" in config:
            model = load_compressed(path, **dtype_kwarg(dtype))
        else:
            model = transformers.AutoModelForImageTextToText.from_pretrained(path, **dtype_kwarg(dtype))
        return Loaded(model.to(device).eval(), tokenizer, image_processor, "fcot" in config)

    def generate(self, model: nn.Module, inputs: dict[str, torch.Tensor], **kwargs: Any) -> torch.Tensor:
        out = model.generate(**inputs, **kwargs)
        return out[:, inputs["input_ids"].shape[1]:]

    def prefill(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> Any:
        return model(**inputs, use_cache=True)


FAMILY = InternVLFamily()
