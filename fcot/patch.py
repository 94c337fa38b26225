"""``fcot.apply_fcot`` / ``fcot.revert_fcot`` / ``fcot.load_compressed``: find the model's family
(:func:`fcot.models.get_family`), validate the options, patch the one instance.

Idempotence policy: ``apply_fcot`` on an instance that is already patched raises
:class:`~fcot.models.FcotError` (call ``revert_fcot`` first, then apply with the new options);
a model loaded with plain ``from_pretrained`` from an fcot checkpoint (its config has an
``fcot`` section but nothing is patched) also raises, naming ``fcot.load_compressed``.
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any

from torch import nn

from .compress import COMPRESSORS, get_compressor
from .models import get_family
from .models.autoload import bind_save, resolve_model_class
from .models.base import FcotError, FcotOptions, Patch

_OPTIONS = ("compressor", "ratio", "fused", "backend", "proportional_attention")
_BACKENDS = (None, "auto", "reference", "triton", "cuda")


def _check_options(compressor: Any, ratio: Any, fused: Any, backend: Any, proportional_attention: Any) -> FcotOptions:
    cls = get_compressor(compressor)
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
        raise TypeError(f"ratio must be a float (the fraction of visual tokens removed), got {type(ratio).__name__} ({ratio!r})")
    if not isinstance(fused, bool):
        raise TypeError(f"fused must be a bool, got {type(fused).__name__} ({fused!r})")
    if not isinstance(proportional_attention, bool):
        raise TypeError(f"proportional_attention must be a bool, got {type(proportional_attention).__name__}")
    if backend not in _BACKENDS:
        raise ValueError(f"backend={backend!r} is not supported; expected one of {_BACKENDS}")
    ratio = float(ratio)
    if compressor == "none":
        if ratio != 0.5:
            warnings.warn(f"ratio={ratio} has no effect with compressor='none' (every visual token is kept)", stacklevel=3)
        ratio = 0.0
    elif cls.ratios is not None and ratio not in cls.ratios:
        raise ValueError(
            f"compressor={compressor!r} does not support ratio={ratio}; supported ratios: {list(cls.ratios)} "
            f"(the fraction of visual tokens removed: 0.5 keeps 128 of 256 per tile, 0.75 keeps 64)"
        )
    if not fused and backend is not None:
        warnings.warn(f"backend={backend!r} has no effect with fused=False (the PyTorch references run)", stacklevel=3)
        backend = None
    if proportional_attention and cls.unit_sizes:
        warnings.warn(
            f"proportional_attention=True has no effect with compressor={compressor!r}: every token it keeps stands "
            f"for one input token (log(1) = 0); left off",
            stacklevel=3,
        )
        proportional_attention = False
    return FcotOptions(compressor, ratio, fused, backend, proportional_attention)


def apply_fcot(
    model: nn.Module,
    processor: Any = None,
    *,
    compressor: str = "conv",
    ratio: float = 0.5,
    fused: bool = True,
    backend: str | None = None,
    proportional_attention: bool = False,
    **unknown: Any,
) -> nn.Module:
    """Turn FCoT-VL visual-token compression on for one InternVL model instance; returns it.

    Args:
        model: transformers' ``InternVLForConditionalGeneration``/``InternVLModel``
            (``model_type="internvl"``) or OpenGVLab's remote-code ``InternVLChatModel``
            (``"internvl_chat"``).
        processor: the model's processor (or, for ``internvl_chat``, its tokenizer). Checked
            against the model, and its ``image_seq_length`` set to the compressed count.
        compressor: a registered name (:data:`fcot.compress.COMPRESSORS`): ``none``, ``avg``,
            ``dwconv``, ``conv`` (learnable, starts equal to avg), ``tome``, ``prune``.
        ratio: fraction of the visual tokens removed per tile: 0.5 (256 -> 128) or 0.75
            (256 -> 64); ``tome``/``prune`` take any ratio in [0, 1).
        fused: image path through the fcot_kernels ops; ``False`` runs the PyTorch references.
        backend: fcot_kernels backend for the fused ops (None: the process default).
        proportional_attention: add log(size) of each visual token to its attention logits in
            the LLM (through ``merged_attention`` registered with transformers' AttentionInterface).

    Unknown keyword arguments raise ``TypeError`` listing the accepted ones; a flag that changes
    nothing on this model warns. See :func:`revert_fcot` to undo.
    """
    if unknown:
        raise TypeError(f"apply_fcot() got unexpected keyword arguments {sorted(unknown)}; accepted: {list(_OPTIONS)}")
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise TypeError(f"model must be a transformers model (nn.Module with .config), got {type(model).__name__}")
    family = get_family(model)
    if getattr(model, "_fcot_patch", None) is not None:
        raise FcotError(
            f"this model is already patched by fcot ({model._fcot_patch.options}); call fcot.revert_fcot(model) first "
            f"to apply other options"
        )
    if getattr(model.config, "fcot", None) is not None:
        raise FcotError(
            "this model's config has an fcot section but the model is not patched: it was loaded from an fcot "
            "checkpoint with plain from_pretrained; load it with fcot.load_compressed(path) instead"
        )
    options = _check_options(compressor, ratio, fused, backend, proportional_attention)
    comp = get_compressor(options.compressor)(options.ratio, backend=options.kernel_backend, width=_vit_width(model))
    patch = Patch(model, options, family.model_type)
    try:
        family.patch(model, processor, comp, patch)
        bind_save(patch, model)  # save_pretrained keeps the code and maps the auto classes to fcot's loader
    except BaseException:
        patch.revert()
        raise
    if "warn" in patch.info:
        warnings.warn(patch.info["warn"], stacklevel=2)
    model._fcot_patch = patch
    return model


def _vit_width(model: nn.Module) -> int | None:
    cfg = model.config
    vision = getattr(cfg, "vision_config", None)
    ratio = getattr(cfg, "downsample_ratio", None)
    if vision is None or ratio is None:
        return None
    r = round(1 / ratio)
    return int(vision.hidden_size) * r * r


def revert_fcot(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_fcot` on ``model`` (and its processor): the original modules, config
    object and processor values come back, bit for bit. Raises if the model is not patched."""
    patch = getattr(model, "_fcot_patch", None)
    if patch is None:
        raise FcotError(f"{type(model).__name__} is not patched by fcot.apply_fcot; nothing to revert")
    patch.revert()
    del model._fcot_patch
    return model


def is_patched(model: nn.Module) -> bool:
    """Whether ``model`` is currently patched by :func:`apply_fcot`."""
    return getattr(model, "_fcot_patch", None) is not None


def _compressor_key(name: str) -> str:
    """``"a.b.mlp1.compressor.merge_weight"`` -> ``"mlp1.compressor.merge_weight"``."""
    head, tail = f".{name}".split(".compressor.", 1)
    return f"{head.rsplit('.', 1)[-1]}.compressor.{tail}"


def load_compressed(
    path: str | os.PathLike,
    processor: Any = None,
    *,
    fused: bool = True,
    backend: str | None = None,
    model_class: type | None = None,
    **from_pretrained_kwargs: Any,
) -> nn.Module:
    """Load a model saved with ``save_pretrained`` after :func:`apply_fcot`: the base model is
    built with ``from_pretrained(path, use_safetensors=True, **from_pretrained_kwargs)``, patched
    with the saved compressor/ratio/proportional_attention, and the compressor's weights are
    loaded from the checkpoint's safetensors files. Remote code runs only when the caller passes
    ``trust_remote_code=True``. ``processor`` (optional) is synced as in :func:`apply_fcot`.

    The base model's class is ``model_class`` when given, else the one the checkpoint's
    ``fcot.model_class`` names (written by ``save_pretrained``), else its ``architectures``.
    A compressed checkpoint also loads through ``AutoModel.from_pretrained(path,
    trust_remote_code=True)``, which calls this function (:mod:`fcot.models.autoload`)."""
    import torch
    import transformers
    from safetensors import safe_open

    path = os.fspath(path)
    if from_pretrained_kwargs.get("use_safetensors") is False:
        raise ValueError("load_compressed reads safetensors only (use_safetensors=False is not supported)")
    from_pretrained_kwargs["use_safetensors"] = True
    trust = bool(from_pretrained_kwargs.get("trust_remote_code", False))
    config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=trust)
    section = getattr(config, "fcot", None)
    if not isinstance(section, dict):
        raise FcotError(f"{path} has no fcot section in its config: it was not saved from a model patched by fcot.apply_fcot")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):  # sharded: the files the index names
        with open(index) as fh:
            files = sorted({os.path.join(path, f) for f in json.load(fh)["weight_map"].values()})
    else:
        files = [f for f in [os.path.join(path, "model.safetensors")] if os.path.exists(f)]
    if not files:
        raise FcotError(f"{path} has no .safetensors weights; fcot loads safetensors only (save with safe_serialization=True)")
    del config.fcot
    for key, value in section.get("base", {}).items():
        setattr(config, key, value)
    from_pretrained_kwargs.pop("config", None)
    cls = model_class
    if cls is None and section.get("model_class"):
        cls = resolve_model_class(path, section["model_class"], trust)
    if cls is None:
        arch = (getattr(config, "architectures", None) or [None])[0]
        cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        cls = transformers.AutoModel
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the compressor's keys are reported unexpected; loaded below
    try:
        model = cls.from_pretrained(path, config=config, **from_pretrained_kwargs)
    finally:
        transformers.logging.set_verbosity(verbosity)
    apply_fcot(
        model, processor, compressor=section["compressor"], ratio=section["ratio"] if section["compressor"] != "none" else 0.5,
        fused=fused, backend=backend, proportional_attention=section.get("proportional_attention", False),
    )
    # Compressor tensors are matched on "<projector>.compressor.<name>": the prefix before the
    # projector differs between transformers versions (4.x saves without "model.").
    wanted = {_compressor_key(n): t for n, t in [*model.named_parameters(), *model.named_buffers()] if ".compressor." in n}
    found: set[str] = set()
    with torch.no_grad():
        for file in files:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    if ".compressor." not in f".{key}":
                        continue
                    target = wanted.get(_compressor_key(key))
                    if target is None:
                        raise FcotError(f"{file} holds {key!r}, which the patched model has no tensor for")
                    tensor = f.get_tensor(key)
                    if tensor.shape != target.shape:
                        raise FcotError(f"{key!r} has shape {tuple(tensor.shape)} in {file}, the model expects {tuple(target.shape)}")
                    target.copy_(tensor)
                    found.add(_compressor_key(key))
    missing = sorted(set(wanted) - found)
    if missing:
        raise FcotError(f"{path} lacks the compressor weights {missing}")
    return model


__all__ = ["apply_fcot", "revert_fcot", "load_compressed", "is_patched", "FcotError", "COMPRESSORS"]
