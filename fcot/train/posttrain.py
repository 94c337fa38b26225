"""Stage 2 of FCoT-VL, ``fcot posttrain``: supervised fine-tuning of the compressed model on
the answer tokens.

:class:`PosttrainModule` holds the model patched by :func:`fcot.apply_fcot` (or loaded by
:func:`fcot.load_compressed` from a stage-1 output); the compressor, the projector and the LLM
(its head included) learn, the ViT stays frozen unless ``posttrain.train_vision``. The loss is
the cross-entropy on the answer tokens, computed through the LM head: with ``common.fused`` by
:func:`fcot_kernels.fused_linear_distill` with ``kl_weight=0, ce_weight=1`` (chunked, the
``(N, V)`` logits never exist; the op has no CE-only mode, so its teacher side is a width-1 zero
input whose matmul costs ``N * V`` multiply-adds), otherwise by PyTorch's ``cross_entropy`` on
the full logits (the reference).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import fcot_kernels as fk
from fcot.data.records import IGNORE_INDEX, ConversationCollator
from fcot.train.config import ConfigError, RunConfig
from fcot.train.engine import (FcotTrainer, TrainModule, build_dataset, compress, head_weights, last_checkpoint,
                               load_base, load_weights_into, log_data_summary, loss_backend, metrics_callback_class,
                               pad_token_id, prepare_run, shifted, training_arguments, visual_tokens_per_tile)

logger = logging.getLogger("fcot.train")


class PosttrainModule(TrainModule):
    """The compressed model for SFT: patched here with ``cfg``'s compressor unless it already is;
    the ViT frozen (unless ``posttrain.train_vision``), everything else trainable."""

    def __init__(self, model: nn.Module, tokenizer: Any, cfg: RunConfig) -> None:
        if cfg.posttrain.lora:
            raise ConfigError("posttrain.lora=true: LoRA post-training is not implemented yet; train the LLM fully "
                              "(posttrain.lora=false)")
        compress(model, tokenizer, cfg)
        super().__init__(model, tokenizer)
        self.cfg = cfg
        for p in self.parameters():
            p.requires_grad_(True)
        if not cfg.posttrain.train_vision:
            for p in self.parts.vision.parameters():
                p.requires_grad_(False)
        if cfg.posttrain.gradient_checkpointing:
            self.gradient_checkpointing()

    def forward(self, input_ids, attention_mask, labels, pixel_values=None, num_tiles=None):
        """Returns ``{"hidden": (N, H), "labels": (N,)}``: the supervised rows, next-token aligned."""
        parts = self.parts
        if pixel_values is not None:
            if self.cfg.posttrain.train_vision:
                tokens = self._vit_with_grad(pixel_values)
            else:
                tokens = parts.vit(pixel_values)
            feats = parts.student_features(tokens)
        else:
            feats = None
        hidden, labels = shifted(parts.hidden(parts.embed(input_ids, feats), attention_mask), labels)
        keep = labels != IGNORE_INDEX
        return {"hidden": hidden[keep], "labels": labels[keep]}

    def _vit_with_grad(self, pixel_values):
        parts = self.parts
        dtype = next(parts.vision.parameters()).dtype
        out = parts.vision(pixel_values=pixel_values.to(dtype), output_hidden_states=parts.layer != -1, return_dict=True)
        feats = out.last_hidden_state if parts.layer == -1 else out.hidden_states[parts.layer]
        return feats[:, 1:] if parts.drop_cls else feats

    def save_compressed(self, output_dir: str) -> None:
        self.model.save_pretrained(output_dir, safe_serialization=True)

    def load_compressed(self, checkpoint: str) -> None:
        load_weights_into(self.model, checkpoint, self.cfg)


def sft_loss(out: dict[str, torch.Tensor], head: nn.Module, cfg: RunConfig) -> torch.Tensor:
    """Mean cross-entropy of the answer rows through the LM head (fused or reference, see the module docstring)."""
    h, labels = out["hidden"], out["labels"]
    w, b = head_weights(head, h.dtype)
    backend = loss_backend(cfg)
    if backend == "reference":
        if h.shape[0] == 0:
            return (h.sum() + w.sum()) * 0.0
        return F.cross_entropy(F.linear(h, w, b).float(), labels)
    zero_h = h.new_zeros(h.shape[0], 1)
    zero_w = w.new_zeros(w.shape[0], 1)
    return fk.fused_linear_distill(h, zero_h, w, b, teacher_weight=zero_w, labels=labels, kl_weight=0.0, ce_weight=1.0,
                                   backend=backend)


class PosttrainTrainer(FcotTrainer):
    """``Trainer`` whose ``compute_loss`` runs :class:`PosttrainModule` and :func:`sft_loss`."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = model(**inputs)
        head = self.accelerator.unwrap_model(model).parts.head
        loss = sft_loss(out, head, self.fcot_cfg)
        return (loss, out) if return_outputs else loss


def build_posttrain_trainer(cfg: RunConfig, *, model: nn.Module | None = None, tokenizer: Any = None,
                            image_processor: Any = None, callbacks: list | None = None) -> PosttrainTrainer:
    """A ready :class:`PosttrainTrainer` for ``cfg`` (``model`` etc. as in
    :func:`fcot.train.distill.build_distill_trainer`; ``common.model`` may be a stage-1 output)."""
    if cfg.stage != "posttrain":
        raise ConfigError(f"stage={cfg.stage!r}: build_posttrain_trainer needs a posttrain config")
    if model is None:
        model, tokenizer, image_processor = load_base(cfg, allow_compressed=True)
    elif tokenizer is None:
        raise ValueError("tokenizer=None: pass the model's tokenizer with model")
    module = PosttrainModule(model, tokenizer, cfg)
    _, out = visual_tokens_per_tile(module.model)
    dataset = build_dataset(cfg, module.model, tokenizer, image_processor, tokens_per_tile=out,
                            skip_log_dir=cfg.common.output_dir)
    args = training_arguments(cfg, logging_steps=1, save_strategy="steps", save_steps=500)
    trainer = PosttrainTrainer(model=module, args=args, train_dataset=dataset,
                               data_collator=ConversationCollator(pad_token_id(tokenizer)), processing_class=tokenizer,
                               callbacks=[metrics_callback_class()(), *(callbacks or [])])
    trainer.fcot_cfg = cfg
    trainer.fcot_image_processor = image_processor
    return trainer


def run_posttrain(cfg: RunConfig, *, resume: bool = False, **build_kwargs: Any) -> PosttrainTrainer:
    """Stage 2 end to end (see :func:`fcot.train.distill.run_distill`)."""
    prepare_run(cfg, resume=resume)
    trainer = build_posttrain_trainer(cfg, **build_kwargs)
    checkpoint = last_checkpoint(cfg.common.output_dir) if resume else None
    trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model(cfg.common.output_dir)
    trainer.fcot_data_summary = log_data_summary(trainer.train_dataset)
    return trainer


__all__ = ["PosttrainModule", "PosttrainTrainer", "build_posttrain_trainer", "run_posttrain", "sft_loss"]
