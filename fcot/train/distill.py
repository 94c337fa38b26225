"""Stage 1 of FCoT-VL, ``fcot distill``: re-align the compressed student to the uncompressed
teacher by self-distillation.

One copy of the base weights serves both: :class:`DistillModule` holds the model patched by
:func:`fcot.apply_fcot` (the student: compressor V_c + projector A_s, initialised from the
teacher's projector by ``apply_fcot``) and the model's original projector (the teacher's,
frozen). Per batch the frozen ViT runs once, without a graph; the teacher path (original pixel
shuffle + projector, LLM) runs under ``torch.no_grad``; the student path (fcot projector, the
same LLM with a graph) gives the student's hidden states. The answer tokens of the two
sequences (the teacher's has more image tokens) are paired by
:func:`fcot.distill.pair_answer_tokens`, and :class:`DistillTrainer` computes the loss through
the LM head with :func:`fcot_kernels.fused_linear_distill` (its fused backend when
``common.fused``, the reference otherwise). Only V_c and A_s have ``requires_grad``.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

import fcot_kernels as fk
from fcot.distill import pair_answer_tokens
from fcot.models.base import FcotError
from fcot.train.config import ConfigError, RunConfig
from fcot.train.engine import (DistillCollator, FcotTrainer, ResizeImageTokens, TrainModule, build_dataset, compress,
                               head_weights, load_base, load_weights_into, log_data_summary,
                               loss_backend, metrics_callback_class, pad_token_id, check_run, start_run, shifted,
                               training_arguments, visual_tokens_per_tile)

logger = logging.getLogger("fcot.train")


class DistillModule(TrainModule):
    """Teacher and student on one set of base weights. ``model`` must not be patched yet: the
    original projector is kept as ``teacher_projector`` and ``model`` is patched with ``cfg``'s
    compressor. Everything but the student projector (``V_c`` + ``A_s``) is frozen."""

    def __init__(self, model: nn.Module, tokenizer: Any, cfg: RunConfig) -> None:
        from fcot import is_patched

        if is_patched(model):
            raise FcotError("DistillModule needs the uncompressed model (the teacher); got one already patched by "
                            "fcot.apply_fcot: pass the original model, or fcot.revert_fcot(model) first")
        probe = ModelPartsProbe(model)
        teacher_projector = getattr(probe.owner, probe.projector_attr)
        compress(model, tokenizer, cfg)
        super().__init__(model, tokenizer)
        self.cfg = cfg
        self.teacher_projector = teacher_projector
        for p in self.parameters():
            p.requires_grad_(False)
        for p in self.parts.student_projector.parameters():
            p.requires_grad_(True)
        if cfg.distill.gradient_checkpointing:
            self.gradient_checkpointing()

    def trainable_names(self) -> list[str]:
        return [n for n, p in self.named_parameters() if p.requires_grad]

    def forward(self, input_ids, attention_mask, labels, student_input_ids, student_attention_mask, student_labels,
                pixel_values=None, num_tiles=None):
        """Returns ``{"student_hidden", "teacher_hidden", "labels"}``: the paired answer rows."""
        parts = self.parts
        tokens = parts.vit(pixel_values) if pixel_values is not None else None
        with torch.no_grad():
            t_feats = parts.teacher_features(tokens, self.teacher_projector) if tokens is not None else None
            t_hidden = parts.hidden(parts.embed(input_ids, t_feats), attention_mask)
        s_feats = parts.student_features(tokens) if tokens is not None else None
        s_hidden = parts.hidden(parts.embed(student_input_ids, s_feats), student_attention_mask)
        paired = pair_answer_tokens(*shifted(t_hidden, labels), *shifted(s_hidden, student_labels))
        return {"student_hidden": paired.student_hidden, "teacher_hidden": paired.teacher_hidden, "labels": paired.labels}

    def save_compressed(self, output_dir: str, state_dict: dict | None = None) -> None:
        self.model.save_pretrained(output_dir, state_dict=state_dict, safe_serialization=True)

    def load_compressed(self, checkpoint: str) -> None:
        load_weights_into(self.model, checkpoint, self.cfg)


class ModelPartsProbe:
    """Where a family keeps its projector, read before patching."""

    def __init__(self, model: nn.Module) -> None:
        family = getattr(model.config, "model_type", None)
        if family == "internvl":
            self.owner = model.model if hasattr(getattr(model, "model", None), "multi_modal_projector") else model
            self.projector_attr = "multi_modal_projector"
        elif family == "internvl_chat":
            self.owner, self.projector_attr = model, "mlp1"
        else:
            raise FcotError(f"model_type {family!r} is not an InternVL family fcot trains ('internvl', 'internvl_chat')")


def distill_loss(out: dict[str, torch.Tensor], head: nn.Module, cfg: RunConfig) -> torch.Tensor:
    """The stage-1 loss on paired rows: ``kl_weight * T^2 * divergence + ce_weight * CE`` through
    the LM head, by :func:`fcot_kernels.fused_linear_distill` (reference backend unless fused)."""
    d = cfg.distill
    s, t = out["student_hidden"], out["teacher_hidden"]
    w, b = head_weights(head, s.dtype)
    # Outside autocast: both backends then compute in the hidden states' dtype (the reference's
    # F.linear would otherwise run in the autocast dtype while the fused op does not).
    with torch.autocast(s.device.type, enabled=False):
        return fk.fused_linear_distill(
            s, t.to(s.dtype), w, b, labels=out["labels"], temperature=d.temperature, kl_weight=d.kl_weight,
            ce_weight=d.ce_weight, divergence=d.divergence, beta=d.beta if d.divergence == "jsd" else 0.5,
            backend=loss_backend(cfg),
        )


class DistillTrainer(FcotTrainer):
    """``Trainer`` whose ``compute_loss`` runs :class:`DistillModule` (through the wrapped model,
    so DDP/FSDP see the forward) and the distillation loss."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = model(**inputs)
        head = self.accelerator.unwrap_model(model).parts.head
        loss = distill_loss(out, head, self.fcot_cfg)
        return (loss, out) if return_outputs else loss


def build_distill_trainer(cfg: RunConfig, *, model: nn.Module | None = None, tokenizer: Any = None,
                          image_processor: Any = None, callbacks: list | None = None) -> DistillTrainer:
    """A ready :class:`DistillTrainer` for ``cfg``. ``model``/``tokenizer``/``image_processor``
    (all three, or none) replace loading ``common.model``. Does not touch the output folder:
    :func:`run_distill` checks it first."""
    if cfg.stage != "distill":
        raise ConfigError(f"stage={cfg.stage!r}: build_distill_trainer needs a distill config")
    if model is None:
        model, tokenizer, image_processor = load_base(cfg, allow_compressed=False)
    elif tokenizer is None:
        raise ValueError("tokenizer=None: pass the model's tokenizer with model")
    module = DistillModule(model, tokenizer, cfg)
    base, out = visual_tokens_per_tile(module.model)
    dataset = build_dataset(cfg, module.model, tokenizer, image_processor, tokens_per_tile=base,
                            skip_log_dir=cfg.common.output_dir)
    collator = DistillCollator(pad_token_id(tokenizer), ResizeImageTokens(module.parts.image_token_id, base, out))
    args = training_arguments(cfg, logging_steps=1, save_strategy="steps", save_steps=500)
    trainer = DistillTrainer(model=module, args=args, train_dataset=dataset, data_collator=collator,
                             processing_class=tokenizer, callbacks=[metrics_callback_class()(), *(callbacks or [])])
    trainer.fcot_cfg = cfg
    trainer.fcot_image_processor = image_processor
    logger.info("distill: %d visual tokens per tile for the teacher, %d for the student; training %s", base, out,
                module.trainable_names())
    return trainer


def run_distill(cfg: RunConfig, *, resume: bool = False, **build_kwargs: Any) -> DistillTrainer:
    """Stage 1 end to end: check the output folder, train, save the compressed model to
    ``common.output_dir`` (loadable by :func:`fcot.load_compressed`). ``resume`` continues from
    the folder's last checkpoint."""
    checkpoint = check_run(cfg, resume=resume)
    trainer = build_distill_trainer(cfg, **build_kwargs)
    start_run(cfg)
    trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model(cfg.common.output_dir)
    trainer.fcot_data_summary = log_data_summary(trainer.train_dataset)
    return trainer


__all__ = ["DistillModule", "DistillTrainer", "build_distill_trainer", "distill_loss", "run_distill"]
