"""The model-family registry: everything fcot knows about one family of models, behind one object.

Each family module under ``fcot/models/`` (``internvl.py``: transformers-native InternVL;
``internvl_chat.py``: OpenGVLab's remote-code InternVL2/2.5) exports ONE :class:`ModelFamily`
instance named ``FAMILY``. :mod:`fcot.models` imports every module of the package and registers
each ``FAMILY`` it finds under its ``model_type``, so a third family (InternVL2.5/3 remote code,
a Qwen2-VL-style model) is one new file. The rest of fcot asks :func:`get_family` and never
branches on ``config.model_type``.

What a family provides:

- ``patch(model, processor, compressor, patch)``: what :func:`fcot.apply_fcot` runs;
- ``projector_slot(model)`` / ``parts(model, tokenizer)``: the modules the trainers call
  directly (ViT, projector owner + attribute, decoder, LM head, feature layer, image token);
- ``tiler(config, image_processor, tile_size)``: images -> tiles as the family's processor does;
- ``chat(config, model)``: the prompt the family's own chat code builds (:class:`ChatFormat`);
  ``chat_for(config, model, tokenizer)`` when the format lives with the tokenizer (the native
  family: the checkpoint's ``chat_template``, ChatML as a recorded fallback);
- ``load(path, ...)``: model, tokenizer and image processor from a folder (compressed or not);
- ``base_tokens(config)`` / ``tokens_per_tile(model)``: visual tokens per tile, uncompressed
  and as the (possibly patched) instance takes them;
- ``generate(model, inputs, **kwargs)``: the new tokens of a batched greedy answer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from .base import FcotError

if TYPE_CHECKING:
    from ..compress import Compressor
    from .base import Patch


@dataclass(frozen=True)
class ChatFormat:
    """The prompt of one question, as the family's own chat code builds it.

    ``system`` wraps the system message (always emitted when ``always_system``, as OpenGVLab's
    MPT-style templates do, even with an empty message); ``user`` wraps the question and opens
    the answer; ``stop`` are the strings that end an answer (their token ids stop ``generate``).
    ``image`` is the text an ``<image>`` placeholder becomes, with ``{context}`` the run of
    context tokens (``tokens_per_tile x tiles`` of them).
    """

    name: str
    system: str
    user: str
    stop: tuple[str, ...]
    system_message: str | None = None
    always_system: bool = False
    image: str = "<img>{context}</img>"
    placeholder: str = "<image>"
    """What stands for one image in :meth:`prompt`'s text (each becomes ``image``, in order)."""
    note: str = ""
    """Why this format was chosen when it is a fallback (shown in ``fcot eval``'s results), else empty."""

    def prompt(self, question: str, system_message: str | None = None) -> str:
        """The text before the answer: system turn (if any), the user turn, the assistant's opening.
        ``question`` holds one ``<image>`` per image (at the start, each on its own line)."""
        message = self.system_message if system_message is None else system_message
        head = self.system.format(content=message or "") if (message or self.always_system) else ""
        return head + self.user.format(content=question)

    def tokenize_kwargs(self, text: str, tokenizer: Any) -> dict[str, Any]:
        """Extra arguments of ``tokenizer(text)`` for a prompt built by :meth:`prompt`."""
        return {}


@dataclass
class FamilyParts:
    """The pieces of a (patched) model that the trainers call directly, so that one ViT pass
    serves both the teacher and the student."""

    owner: nn.Module
    """The module holding the projector (``projector_attr``) and the class ``pixel_shuffle``."""
    projector_attr: str
    vision: nn.Module
    """The ViT: ``vision(pixel_values=, output_hidden_states=, return_dict=True)``."""
    decoder: nn.Module
    """The LLM without its head: ``decoder(inputs_embeds=, attention_mask=, ...)``."""
    head: nn.Module
    layer: int
    """The ViT layer whose output is used (``-1``: the last)."""
    drop_cls: bool
    image_token_id: int
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Loaded:
    """What :meth:`ModelFamily.load` returns."""

    model: nn.Module
    tokenizer: Any
    image_processor: Any
    compressed: bool


class ModelFamily:
    """Base class of a model family (see the module docstring). Subclasses set ``model_type``
    and ``description`` and implement the methods that raise ``NotImplementedError``."""

    model_type: ClassVar[str] = ""
    description: ClassVar[str] = ""
    needs_remote_code: ClassVar[bool] = False
    """Whether real checkpoints of this family load only with ``trust_remote_code=True``."""

    def patch(self, model: nn.Module, processor: Any, compressor: Compressor, patch: Patch) -> None:
        raise NotImplementedError

    def projector_slot(self, model: nn.Module) -> tuple[nn.Module, str]:
        """``(owner, attribute)`` of the model's vision-language projector (read before patching)."""
        raise NotImplementedError

    def parts(self, model: nn.Module, tokenizer: Any = None) -> FamilyParts:
        raise NotImplementedError

    def tiler(self, config: Any = None, image_processor: Any = None, tile_size: int | None = None):
        raise NotImplementedError

    def chat(self, config: Any, model: nn.Module | None = None) -> ChatFormat:
        raise NotImplementedError

    def chat_for(self, config: Any, model: nn.Module | None = None, tokenizer: Any = None) -> ChatFormat:
        """The chat format of ``model`` whose prompts ``tokenizer`` tokenizes: :meth:`chat` unless
        the family reads its format from the tokenizer (the native family's ``chat_template``)."""
        return self.chat(config, model)

    def base_tokens(self, config: Any) -> int:
        """Visual tokens per tile of the uncompressed model (also for a compressed config)."""
        raise NotImplementedError

    def tokens_per_tile(self, model: nn.Module) -> int:
        """Visual tokens per tile the instance takes now (the compressed count once patched)."""
        raise NotImplementedError

    def image_token_id(self, model: nn.Module, tokenizer: Any) -> int:
        raise NotImplementedError

    def load(self, path: str | os.PathLike, *, dtype: torch.dtype = torch.float32, device: str = "cpu",
             trust_remote_code: bool = False) -> Loaded:
        raise NotImplementedError

    def check_generate(self, model: nn.Module) -> None:
        """Raise a clear :class:`FcotError` when ``generate`` cannot run on this model here (checked
        before the first forward)."""

    def generate(self, model: nn.Module, inputs: dict[str, torch.Tensor], **kwargs: Any) -> torch.Tensor:
        """``(B, new)``: the generated tokens after the prompt (greedy unless ``kwargs`` say otherwise)."""
        raise NotImplementedError

    def prefill(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> Any:
        """One forward of a batch of prompts (``input_ids``, ``attention_mask``, optional
        ``pixel_values``), as ``generate``'s prefill runs it: what latency measurements time."""
        raise NotImplementedError

    auto_classes: ClassVar[tuple[str, ...]] = ("AutoModel",)
    """The transformers auto classes a saved compressed checkpoint maps to fcot's loader."""

    def autoload_spec(self, model: nn.Module) -> dict[str, Any]:
        """What :func:`fcot.models.autoload.finish_checkpoint` writes for ``model``'s class:
        ``imports`` (the stub's import of the class as ``_FcotBase``), ``classes`` (auto class
        -> stub class name) and ``base_ref`` (how ``load_compressed`` finds the class again)."""
        cls = type(model)
        module, name = cls.__module__, cls.__name__
        if module.startswith("transformers.") and not module.startswith("transformers_modules."):
            imports, ref = f"from transformers import {name} as _FcotBase", name
        elif module.startswith("transformers_modules."):
            last = module.rsplit(".", 1)[-1]
            imports, ref = f"from .{last} import {name} as _FcotBase", f"{last}.{name}"
        else:  # a class registered in-process from an importable package
            imports, ref = f"from {module} import {name} as _FcotBase", f"{module}:{name}"
        return {"imports": imports, "classes": {a: f"Fcot{name}" for a in self.auto_classes}, "base_ref": ref}

    def __repr__(self) -> str:
        return f"<fcot model family {self.model_type!r}: {self.description}>"


FAMILIES: dict[str, ModelFamily] = {}
"""``config.model_type`` -> its family (filled by :func:`register_family`)."""


def register_family(family: ModelFamily) -> ModelFamily:
    """Register ``family`` under its ``model_type``; a second family for one type is an error."""
    if not isinstance(family, ModelFamily):
        raise TypeError(f"family must be a fcot.models.ModelFamily, got {type(family).__name__}")
    if not family.model_type:
        raise ValueError(f"{type(family).__name__}.model_type is empty: set the config.model_type it handles")
    other = FAMILIES.get(family.model_type)
    if other is not None and other is not family:
        raise ValueError(f"model_type {family.model_type!r} is already registered to {type(other).__name__}")
    FAMILIES[family.model_type] = family
    return family


def model_type_of(obj: Any) -> Any:
    """The ``model_type`` of a model, a config, a config dict or a string."""
    if isinstance(obj, str) or obj is None:
        return obj
    if isinstance(obj, dict):
        return obj.get("model_type")
    config = getattr(obj, "config", obj)
    return getattr(config, "model_type", None)


def get_family(obj: Any) -> ModelFamily:
    """The family of a model / config / config dict / ``model_type`` string; a clear
    :class:`~fcot.models.FcotError` for a type no family handles."""
    model_type = model_type_of(obj)
    family = FAMILIES.get(model_type) if isinstance(model_type, str) else None
    if family is None:
        what = f" ({type(obj).__name__})" if not isinstance(obj, (str, dict, type(None))) else ""
        raise FcotError(
            f"model_type {model_type!r}{what} is not supported; supported model types: {sorted(FAMILIES)} "
            f"(a new family is one module under fcot/models/ exporting FAMILY = <ModelFamily subclass>())"
        )
    return family


def make_tiler(family: Any, image_processor: Any = None, tile_size: int | None = None):
    """The tiler of a model family (anything :func:`get_family` takes: a ``model_type`` such as
    ``"internvl"`` / ``"internvl_chat"``, a config or a model); see :meth:`ModelFamily.tiler`.

    ``image_processor`` (native family only) is the checkpoint's own, e.g.
    ``AutoProcessor.from_pretrained(ckpt).image_processor``; without it one is built in code.
    ``tile_size`` defaults to 448, or to the given image processor's size.
    """
    try:
        fam = get_family(family)
    except ValueError as e:
        raise ValueError(f"family={family!r}: {e}") from None
    return fam.tiler(None, image_processor, tile_size)


def dtype_kwarg(dtype: torch.dtype) -> dict[str, Any]:
    """``from_pretrained``'s dtype argument for the installed transformers: ``dtype=`` from 4.56
    on, ``torch_dtype=`` before (4.x before 4.56 rejects ``dtype=``)."""
    import transformers
    from packaging.version import Version

    return {"dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype": dtype}


def config_get(config: Any, key: str, default: Any = None) -> Any:
    """``config.key`` for a config object or a ``config.json`` dict."""
    if isinstance(config, dict):
        return config.get(key, default)
    return getattr(config, key, default)


__all__ = ["FAMILIES", "ChatFormat", "FamilyParts", "Loaded", "ModelFamily", "config_get", "dtype_kwarg", "get_family",
           "model_type_of", "register_family"]
