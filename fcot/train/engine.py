"""What both training stages share below the trainer: loading the base model, the model parts
the training modules call (from the model's family, :func:`fcot.models.get_family`: no
``model_type`` branches here), the data set and collators, and ``TrainingArguments``. The
trainer itself is :mod:`fcot.train.trainer`; the run folder (config, metrics JSONL, atomic
checkpoints, resume) :mod:`fcot.train.checkpoint`, whose names are re-exported here."""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import nn

from fcot.data.records import ConversationCollator, ConversationDataset
from fcot.models import get_family
from fcot.models.base import FcotError
from fcot.models.family import dtype_kwarg
from fcot.train.checkpoint import (DATA_SUMMARY_FILE, METRICS_FILE, STAGING, AtomicCheckpoints, check_run, finish_run,
                                   last_checkpoint, metrics_callback_class, read_metrics, start_run)
from fcot.train.config import ConfigError, RunConfig

logger = logging.getLogger("fcot.train")


# ---------------------------------------------------------------------------------------------
# Model loading and the parts of each family
# ---------------------------------------------------------------------------------------------


def load_base(cfg: RunConfig, *, allow_compressed: bool) -> tuple[nn.Module, Any, Any]:
    """``(model, tokenizer, image_processor)`` of ``common.model``: ``tiny`` builds
    :func:`fcot.models.tiny.build_tiny`; a folder or hub id loads with transformers (fp32: the
    trainable weights need fp32 master copies; bf16 comes from autocast). A folder saved from a
    compressed model (``config.fcot``) loads with :func:`fcot.load_compressed` when
    ``allow_compressed``. ``image_processor`` is None for the remote-code family."""
    import transformers

    from fcot import load_compressed
    from fcot.models.tiny import TINY_NAMES, build_tiny

    name, common = cfg.common.model, cfg.common
    if name in TINY_NAMES:
        bundle = build_tiny(seed=common.seed)
        return bundle.model, bundle.tokenizer, bundle.image_processor
    trust = common.trust_remote_code
    try:
        config = transformers.AutoConfig.from_pretrained(name, trust_remote_code=trust)
    except (OSError, ValueError) as e:
        raise ConfigError(f"common.model={name!r}: cannot load its config ({e}); set a local model folder, a hub id, "
                          "or common.trust_remote_code=true for OpenGVLab's remote-code checkpoints") from None
    try:
        family = get_family(config)
    except FcotError as e:
        raise ConfigError(f"common.model={name!r}: {e}") from None
    kwargs: dict[str, Any] = dtype_kwarg(torch.float32)
    if family.needs_remote_code:
        kwargs["trust_remote_code"] = trust
    if getattr(config, "fcot", None) is not None:
        if not allow_compressed:
            raise ConfigError(f"common.model={name!r} is already compressed (saved by fcot); `fcot distill` starts "
                              "from the original model: set common.model to the uncompressed checkpoint")
        model = load_compressed(name, fused=common.fused, backend=_kernel_backend(cfg), **kwargs)
        saved = model._fcot_patch.options
        if (saved.compressor, saved.ratio) != (common.compressor, _patch_ratio(cfg)):
            raise ConfigError(f"common.model={name!r} was compressed with compressor={saved.compressor!r}, "
                              f"ratio={saved.ratio}, but the config asks for compressor={common.compressor!r}, "
                              f"ratio={common.ratio}: set common.compressor/common.ratio to the saved ones")
    elif family.needs_remote_code:  # remote code registers its class with AutoModel only
        model = transformers.AutoModel.from_pretrained(name, **kwargs)
    else:
        model = transformers.AutoModelForImageTextToText.from_pretrained(name, **kwargs)
    tokenizer = transformers.AutoTokenizer.from_pretrained(name, trust_remote_code=trust)
    image_processor = None
    if not family.needs_remote_code:  # the remote-code family tiles in fcot (its tiler takes no processor)
        image_processor = transformers.AutoImageProcessor.from_pretrained(name)
    return model, tokenizer, image_processor


def _patch_ratio(cfg: RunConfig) -> float:
    return cfg.common.ratio  # checked once, by the config (0 for compressor none)


def _kernel_backend(cfg: RunConfig) -> str | None:
    return cfg.common.backend if cfg.common.fused else None


def loss_backend(cfg: RunConfig) -> str | None:
    """The ``fused_linear_distill`` backend: ``common.backend`` when fused, else the reference.
    ``cuda`` has no kernel for this op: its Triton kernel runs (the cuda backend's GPU)."""
    if not cfg.common.fused:
        return "reference"
    return "triton" if cfg.common.backend == "cuda" else cfg.common.backend


def compress(model: nn.Module, tokenizer: Any, cfg: RunConfig) -> nn.Module:
    """``fcot.apply_fcot`` with the run's options (a model that is already patched is checked
    by :func:`load_base`). A ratio the model cannot take is an error naming ``common.ratio``."""
    from fcot import apply_fcot, is_patched

    if is_patched(model):
        return model
    try:
        # compressor none takes no ratio (the config holds 0 for it, the one encoding).
        ratio = {} if cfg.common.compressor == "none" else {"ratio": cfg.common.ratio}
        return apply_fcot(model, compressor=cfg.common.compressor, fused=cfg.common.fused, backend=_kernel_backend(cfg),
                          **ratio)
    except (FcotError, ValueError) as e:
        raise ConfigError(f"common.compressor={cfg.common.compressor!r}, common.ratio={cfg.common.ratio}: {e}") from None


class ModelParts:
    """The pieces of a (patched) InternVL that the trainers call directly, so that one ViT pass
    serves both the teacher and the student: ``vit`` (patch tokens before the pixel shuffle),
    ``teacher_features`` (the original shuffle + projector), ``student_features`` (the fcot
    projector), ``embed`` (token embeddings with the visual features scattered in), ``decoder``
    (the LLM without its head) and ``head`` (the LM head)."""

    def __init__(self, model: nn.Module, tokenizer: Any = None) -> None:
        family = get_family(model)
        self.family = family.model_type
        found = family.parts(model, tokenizer)
        self.owner, self.projector_attr = found.owner, found.projector_attr
        self.vision, self.decoder, self.head = found.vision, found.decoder, found.head
        self.layer, self.drop_cls, self.image_token_id = found.layer, found.drop_cls, found.image_token_id
        if not isinstance(self.layer, int):
            raise FcotError(f"vision feature layer {self.layer!r}: fcot trains single-layer ViT features only")
        self.embeddings = self.decoder.get_input_embeddings()
        self.scale = float(model.config.downsample_ratio)

    @property
    def student_projector(self) -> nn.Module:
        return getattr(self.owner, self.projector_attr)

    def vit(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(tiles, N, C)`` ViT patch tokens (CLS dropped as the model does), without a graph."""
        dtype = next(self.vision.parameters()).dtype
        with torch.no_grad():
            out = self.vision(pixel_values=pixel_values.to(dtype), output_hidden_states=self.layer != -1, return_dict=True)
            feats = out.last_hidden_state if self.layer == -1 else out.hidden_states[self.layer]
            return feats[:, 1:] if self.drop_cls else feats

    def teacher_features(self, tokens: torch.Tensor, teacher_projector: nn.Module) -> torch.Tensor:
        """The uncompressed model's visual features: its own pixel shuffle (the class method;
        the instance's is fcot's pass-through) and the original projector."""
        t, n, c = tokens.shape
        side = math.isqrt(n)
        x = type(self.owner).pixel_shuffle(self.owner, tokens.reshape(t, side, side, c), scale_factor=self.scale)
        return teacher_projector(x.reshape(t, -1, x.shape[-1]))

    def student_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """The fcot projector, outside autocast in its weights' dtype: its fused ops take one
        dtype for inputs and weights (under bf16 autocast the ViT tokens are bf16 while the
        trainable weights are fp32 master copies)."""
        projector = self.student_projector
        dtype = projector.linear_1.weight.dtype
        with torch.autocast(tokens.device.type, enabled=False):
            return projector(tokens.to(dtype))

    def embed(self, input_ids: torch.Tensor, features: torch.Tensor | None) -> torch.Tensor:
        embeds = self.embeddings(input_ids)
        mask = input_ids == self.image_token_id
        found = int(mask.sum())
        rows = 0 if features is None else features.shape[0] * features.shape[1]
        if found != rows:
            raise FcotError(f"input_ids hold {found} image tokens but the images give {rows} visual features")
        if features is None:
            return embeds
        return embeds.masked_scatter(mask.unsqueeze(-1), features.to(embeds.dtype).reshape(-1, embeds.shape[-1]))

    def hidden(self, embeds: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Final hidden states ``(B, L, H)`` of the LLM (before the head)."""
        return self.decoder(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False, return_dict=True).last_hidden_state


def shifted(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token alignment: the state at ``i`` predicts ``labels[i + 1]``."""
    return hidden[:, :-1], labels[:, 1:]


def head_weights(head: nn.Module, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The LM head's weight and bias in the hidden states' dtype (a differentiable cast)."""
    w = head.weight.to(dtype)
    b = head.bias.to(dtype) if getattr(head, "bias", None) is not None else None
    return w, b


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def build_dataset(cfg: RunConfig, model: nn.Module, tokenizer: Any, image_processor: Any, *, tokens_per_tile: int,
                  skip_log_dir: str | None = None) -> ConversationDataset:
    family = get_family(model)
    if cfg.data.family not in ("auto", family.model_type):
        raise ConfigError(f"data.family={cfg.data.family!r} but the model is {family.model_type!r}: set data.family=auto")
    tiler = family.tiler(model.config, None if family.needs_remote_code else image_processor)
    return ConversationDataset(cfg.data.jsonl, tokenizer, tiler, image_root=cfg.data.image_root, max_tiles=cfg.data.max_tiles,
                               tokens_per_tile=tokens_per_tile, max_length=cfg.data.max_length, template=cfg.data.template,
                               system_message=cfg.data.system_message, skip_log_dir=skip_log_dir)


def visual_tokens_per_tile(model: nn.Module) -> tuple[int, int]:
    """``(uncompressed, compressed)`` visual tokens per tile of a patched model."""
    return get_family(model).base_tokens(model.config), int(model.config.fcot["tokens_per_tile"])


def pad_token_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ConfigError("the tokenizer has neither a pad nor an eos token: give it a pad_token")
    return int(pad)


class ResizeImageTokens:
    """Rewrites a sequence laid out with ``tokens_in`` visual tokens per tile to ``tokens_out``
    (each run of ``image_token_id`` of length ``k * tokens_in`` becomes ``k * tokens_out``):
    the teacher's sequence to the student's, with the same text and labels."""

    def __init__(self, image_token_id: int, tokens_in: int, tokens_out: int) -> None:
        self.image_token_id, self.tokens_in, self.tokens_out = image_token_id, tokens_in, tokens_out

    def __call__(self, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        is_img = input_ids == self.image_token_id
        keep = torch.ones_like(is_img)
        idx = is_img.nonzero().flatten().tolist()
        start = 0
        while start < len(idx):  # each run of consecutive image tokens
            end = start
            while end + 1 < len(idx) and idx[end + 1] == idx[end] + 1:
                end += 1
            length = end - start + 1
            if length % self.tokens_in:
                raise FcotError(f"a run of {length} image tokens is not a multiple of {self.tokens_in} per tile")
            drop = length // self.tokens_in * (self.tokens_in - self.tokens_out)
            keep[idx[end] - drop + 1: idx[end] + 1] = False
            start = end + 1
        return input_ids[keep], labels[keep]


class DistillCollator:
    """Batches teacher sequences (``input_ids``/``attention_mask``/``labels``, ``tokens_in``
    visual tokens per tile) and the student's (``student_*``, ``tokens_out`` per tile), with
    ``pixel_values`` once."""

    def __init__(self, pad_token_id: int, resize: ResizeImageTokens) -> None:
        self.collate, self.resize = ConversationCollator(pad_token_id), resize

    def __call__(self, features):
        teacher = self.collate(features)
        student_features = []
        for f in features:
            ids, labels = self.resize(f["input_ids"], f["labels"])
            student_features.append({**f, "input_ids": ids, "labels": labels})
        student = self.collate(student_features)
        for key in ("input_ids", "attention_mask", "labels"):
            teacher[f"student_{key}"] = student[key]
        return teacher


# ---------------------------------------------------------------------------------------------
# Checkpoint weights and TrainingArguments
# ---------------------------------------------------------------------------------------------


def load_weights_into(model: nn.Module, checkpoint: str, cfg: RunConfig) -> None:
    """Copy a checkpoint written by :class:`FcotTrainer` into ``model`` (same structure): it is
    rebuilt by :func:`fcot.load_compressed` (which maps the saved key names) and its state dict
    copied over, every key checked."""
    from fcot import load_compressed

    kwargs: dict[str, Any] = dtype_kwarg(next(model.parameters()).dtype)
    if get_family(model).needs_remote_code:
        kwargs["trust_remote_code"] = cfg.common.trust_remote_code
    fresh = load_compressed(checkpoint, fused=cfg.common.fused, backend=_kernel_backend(cfg), **kwargs)
    missing, unexpected = model.load_state_dict(fresh.state_dict(), strict=False)
    if missing or unexpected:
        raise FcotError(f"checkpoint {checkpoint} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    del fresh


def training_arguments(cfg: RunConfig, **defaults: Any):
    """TrainingArguments from the config, with fcot's defaults for what the user did not set:
    bf16 autocast on a GPU that has it, no external loggers, tqdm bars, the collated extra
    columns kept."""
    extra: dict[str, Any] = {"remove_unused_columns": False}
    if "report_to" not in cfg.training:
        extra["report_to"] = []
    if "bf16" not in cfg.training and "fp16" not in cfg.training and torch.cuda.is_available() \
            and torch.cuda.is_bf16_supported():
        extra["bf16"] = True
    for key, value in defaults.items():
        if key not in cfg.training:
            extra[key] = value
    return cfg.training_arguments(**extra)


__all__ = ["AtomicCheckpoints", "DATA_SUMMARY_FILE", "METRICS_FILE", "STAGING", "DistillCollator", "ModelParts",
           "ResizeImageTokens", "build_dataset", "check_run", "compress", "dtype_kwarg", "finish_run", "last_checkpoint",
           "load_base", "loss_backend", "metrics_callback_class", "pad_token_id", "read_metrics", "start_run",
           "training_arguments"]


def finish_distributed() -> None:
    """End a torchrun job cleanly: wait for every rank, then destroy the process group (a rank
    that exits with gloo's threads still alive can abort with 'terminate called without an
    active exception'). A no-op in a single process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
