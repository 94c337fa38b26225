"""Stage 1 of FCoT-VL, ``fcot distill``: re-align the compressed student to the uncompressed
teacher by self-distillation.

One copy of the base weights serves both: :class:`DistillModule` holds the model patched by
:func:`fcot.apply_fcot` (the student: compressor V_c + projector A_s, initialised from the
teacher's projector by ``apply_fcot``) and the model's original projector (the teacher's,
frozen). Per batch the frozen ViT runs once, without a graph; the teacher path (original pixel
shuffle + projector, LLM) runs under ``torch.no_grad``; the student path (fcot projector, the
same LLM with a graph) gives the student's hidden states. The answer tokens of the two
sequences (the teacher's has more image tokens) are paired by
:func:`fcot.distill.pair_answer_tokens`, and the module's forward computes the loss through the
LM head with :func:`fcot_kernels.fused_linear_distill` (its fused backend when
``common.fused``, the reference otherwise). Only V_c and A_s have ``requires_grad``; everything
else stays in eval mode while training (:class:`fcot.train.trainer.TrainModule`).

On the steps the trainer logs, the forward also returns, without a graph, the parts of the loss
on the answer tokens: ``kl`` (the divergence at temperature T, before ``T**2`` and weights),
``ce`` (the student's cross-entropy) and ``agreement`` (the fraction of answer tokens where the
student's top token is the teacher's); they go to ``metrics.jsonl`` next to the loss.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import fcot_kernels as fk
from fcot.distill import pair_answer_tokens
from fcot.models import get_family
from fcot.models.base import FcotError
from fcot.train.config import RunConfig
from fcot.train.engine import DistillCollator, ResizeImageTokens, compress, head_weights, loss_backend, pad_token_id, shifted
from fcot.train.trainer import PART_PREFIX, FcotTrainer, Stage, TrainModule, build_trainer, run

AGREEMENT_CHUNK = 1024
"""Rows per chunk of the logged top-token agreement (two ``(chunk, V)`` logits at a time)."""


class DistillModule(TrainModule):
    """Teacher and student on one set of base weights. ``model`` must not be patched yet: the
    original projector is kept as ``teacher_projector`` and ``model`` is patched with ``cfg``'s
    compressor. Everything but the student projector (``V_c`` + ``A_s``) is frozen."""

    def __init__(self, model: nn.Module, tokenizer: Any, cfg: RunConfig) -> None:
        from fcot import is_patched

        if is_patched(model):
            raise FcotError("DistillModule needs the uncompressed model (the teacher); got one already patched by "
                            "fcot.apply_fcot: pass the original model, or fcot.revert_fcot(model) first")
        owner, attr = get_family(model).projector_slot(model)
        teacher_projector = getattr(owner, attr)
        compress(model, tokenizer, cfg)
        super().__init__(model, tokenizer, cfg)
        self.teacher_projector = teacher_projector
        for p in self.parameters():
            p.requires_grad_(False)
        for p in self.parts.student_projector.parameters():
            p.requires_grad_(True)
        if cfg.distill.gradient_checkpointing:
            self.gradient_checkpointing()

    def trainable_names(self) -> list[str]:
        return [n for n, p in self.named_parameters() if p.requires_grad]

    def rows(self, input_ids, attention_mask, labels, student_input_ids, student_attention_mask, student_labels,
             pixel_values=None, num_tiles=None) -> dict[str, torch.Tensor]:
        """``{"student_hidden", "teacher_hidden", "labels"}``: the paired answer rows."""
        parts = self.parts
        tokens = parts.vit(pixel_values) if pixel_values is not None else None
        with torch.no_grad():
            t_feats = parts.teacher_features(tokens, self.teacher_projector) if tokens is not None else None
            t_hidden = parts.hidden(parts.embed(input_ids, t_feats), attention_mask)
        s_feats = parts.student_features(tokens) if tokens is not None else None
        s_hidden = parts.hidden(parts.embed(student_input_ids, s_feats), student_attention_mask)
        paired = pair_answer_tokens(*shifted(t_hidden, labels), *shifted(s_hidden, student_labels))
        return {"student_hidden": paired.student_hidden, "teacher_hidden": paired.teacher_hidden, "labels": paired.labels}

    def loss_sums(self, **inputs: Any) -> dict[str, torch.Tensor]:
        out = self.rows(**inputs)
        out["loss_sum"] = distill_loss(out, self.parts.head, self.cfg, reduction="sum")
        out["tokens"] = torch.tensor(out["labels"].shape[0], device=out["loss_sum"].device)
        if self.log_parts:
            out.update(distill_parts(out, self.parts.head, self.cfg))
        return out


def distill_loss(out: dict[str, torch.Tensor], head: nn.Module, cfg: RunConfig, *, reduction: str = "mean") -> torch.Tensor:
    """The stage-1 loss on paired rows: ``kl_weight * T^2 * divergence + ce_weight * CE`` through
    the LM head, by :func:`fcot_kernels.fused_linear_distill` (reference backend unless fused),
    averaged (``"mean"``) or summed (``"sum"``) over the answer tokens."""
    d = cfg.distill
    s, t = out["student_hidden"], out["teacher_hidden"]
    w, b = head_weights(head, s.dtype)
    # Outside autocast: both backends then compute in the hidden states' dtype (the reference's
    # F.linear would otherwise run in the autocast dtype while the fused op does not).
    kl = d.kl_weight != 0  # without KL the op does no teacher work; T and the divergence do not apply
    with torch.autocast(s.device.type, enabled=False):
        return fk.fused_linear_distill(
            s, t.to(s.dtype) if kl else None, w, b, labels=out["labels"], temperature=d.temperature if kl else 1.0,
            kl_weight=d.kl_weight, ce_weight=d.ce_weight, divergence=d.divergence if kl else "forward_kl",
            beta=d.beta if d.divergence == "jsd" and kl else 0.5, reduction=reduction, backend=loss_backend(cfg),
        )


@torch.no_grad()
def distill_parts(out: dict[str, torch.Tensor], head: nn.Module, cfg: RunConfig) -> dict[str, torch.Tensor]:
    """Summed over the answer rows, without a graph: the divergence at T (no ``T**2``, no
    weight), the student's cross-entropy, and the count of rows whose top token the student and
    the teacher share (``sum_kl``, ``sum_ce``, ``sum_agreement``, ``sum_tokens``)."""
    d = cfg.distill
    s, t, labels = out["student_hidden"].detach(), out["teacher_hidden"], out["labels"]
    w, b = head_weights(head, s.dtype)
    w, b = w.detach(), None if b is None else b.detach()
    backend = loss_backend(cfg)
    with torch.autocast(s.device.type, enabled=False):
        kl = fk.fused_linear_distill(s, t.to(s.dtype), w, b, labels=labels, temperature=d.temperature,
                                     divergence=d.divergence, beta=d.beta if d.divergence == "jsd" else 0.5,
                                     reduction="sum", backend=backend) / d.temperature**2
        ce = fk.fused_linear_distill(s, None, w, b, labels=labels, kl_weight=0.0, ce_weight=1.0, reduction="sum",
                                     backend=backend)
        agree = s.new_zeros((), dtype=torch.float32)
        for start in range(0, s.shape[0], AGREEMENT_CHUNK):
            rows = slice(start, start + AGREEMENT_CHUNK)
            same = F.linear(s[rows], w, b).argmax(-1) == F.linear(t[rows].to(s.dtype), w, b).argmax(-1)
            agree += same.sum()
    return {f"{PART_PREFIX}kl": kl, f"{PART_PREFIX}ce": ce, f"{PART_PREFIX}agreement": agree,
            f"{PART_PREFIX}tokens": torch.tensor(float(s.shape[0]), device=s.device)}


def _collator(module: TrainModule, tokenizer: Any, base: int, out: int) -> DistillCollator:
    return DistillCollator(pad_token_id(tokenizer), ResizeImageTokens(module.parts.image_token_id, base, out))


STAGE = Stage(name="distill", make_module=DistillModule, allow_compressed=False,
              data_tokens=lambda base, out: base,  # the teacher's layout; the collator derives the student's
              make_collator=_collator)


def build_distill_trainer(cfg: RunConfig, **kwargs: Any) -> FcotTrainer:
    """:func:`fcot.train.trainer.build_trainer` for a ``distill`` config."""
    _check_stage(cfg)
    return build_trainer(cfg, **kwargs)


def run_distill(cfg: RunConfig, *, resume: bool = False, **kwargs: Any) -> FcotTrainer:
    """:func:`fcot.train.trainer.run` for a ``distill`` config."""
    _check_stage(cfg)
    return run(cfg, resume=resume, **kwargs)


def _check_stage(cfg: RunConfig) -> None:
    from fcot.train.config import ConfigError

    if cfg.stage != "distill":
        raise ConfigError(f"stage={cfg.stage!r}: this needs a distill config")


__all__ = ["DistillModule", "STAGE", "build_distill_trainer", "distill_loss", "distill_parts", "run_distill"]
