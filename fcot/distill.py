"""Self-distillation helpers: pair the teacher's and the student's answer tokens.

The teacher sees every visual token and the compressed student sees fewer, so the same answer
token sits at different positions in the two sequences. The rows to compare are paired on the
supervised tokens (``label != ignore_index``), in order, never by position.

Input format, per side (teacher and student independently):

- a padded batch: hidden states ``(B, L, H)`` and labels ``(B, L)``, or
- a list of B sequences: hidden states ``[(L_i, H), ...]`` and labels ``[(L_i,), ...]``.

Labels are the *shifted* next-token labels: ``labels[..., i]`` is the token that the hidden
state at position ``i`` predicts (with Hugging Face labels, ``labels[..., 1:]`` next to
``hidden[..., :-1, :]``), and every position that is not supervised (prompt, image tokens,
padding) holds ``ignore_index``. No attention mask is needed: padding is unsupervised.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

__all__ = ["PairedTokens", "pair_answer_tokens"]

HiddenStates = torch.Tensor | Sequence[torch.Tensor]


class PairedTokens(NamedTuple):
    """Rows of the supervised tokens, paired: row ``k`` of each tensor is the same answer token."""

    student_hidden: torch.Tensor
    """``(N, H)``, still attached to the student's graph."""
    teacher_hidden: torch.Tensor
    """``(N, H_t)``, detached: the teacher is never differentiated."""
    labels: torch.Tensor
    """``(N,)`` the labels of those tokens (equal on both sides)."""


def _select(side: str, hidden: HiddenStates, labels: HiddenStates, ignore_index: int):
    """Supervised rows, their labels and the count per sequence, for one side."""
    h_name, l_name = f"{side}_hidden", f"{side}_labels"
    if isinstance(hidden, torch.Tensor):
        if hidden.dim() != 3:
            raise ValueError(f"{h_name} must be a padded batch (B, L, H) or a list of (L_i, H), got shape {tuple(hidden.shape)}")
        if not isinstance(labels, torch.Tensor) or labels.shape != hidden.shape[:2]:
            got = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
            raise ValueError(f"{l_name} must be a tensor of shape {tuple(hidden.shape[:2])} to match {h_name}, got {got}")
        hidden_seqs, label_seqs = list(hidden.unbind(0)), list(labels.unbind(0))
    elif isinstance(hidden, (list, tuple)):
        if not isinstance(labels, (list, tuple)) or len(labels) != len(hidden):
            got = len(labels) if isinstance(labels, (list, tuple)) else type(labels).__name__
            raise ValueError(f"{l_name} must be a list of {len(hidden)} label tensors to match {h_name}, got {got}")
        hidden_seqs, label_seqs = list(hidden), list(labels)
    else:
        raise TypeError(f"{h_name} must be a (B, L, H) tensor or a list of (L_i, H) tensors, got {type(hidden).__name__}")
    if not hidden_seqs:
        raise ValueError(f"{h_name} holds no sequences")
    width = None
    for i, (h, lab) in enumerate(zip(hidden_seqs, label_seqs)):
        if not isinstance(h, torch.Tensor) or h.dim() != 2:
            raise ValueError(f"{h_name}[{i}] must be a (L_i, H) tensor, got {getattr(h, 'shape', type(h).__name__)}")
        if not isinstance(lab, torch.Tensor) or lab.shape != h.shape[:1]:
            raise ValueError(f"{l_name}[{i}] must have shape ({h.shape[0]},) to match {h_name}[{i}], got {getattr(lab, 'shape', type(lab).__name__)}")
        if lab.dtype.is_floating_point or lab.dtype == torch.bool:
            raise TypeError(f"{l_name}[{i}] must hold integer token ids, got dtype {lab.dtype}")
        if width is not None and h.shape[1] != width:
            raise ValueError(f"{h_name}[{i}] has width {h.shape[1]} but {h_name}[0] has {width}")
        width = h.shape[1]
    masks = [lab != ignore_index for lab in label_seqs]
    rows = torch.cat([h[m] for h, m in zip(hidden_seqs, masks)])
    picked = [lab[m] for lab, m in zip(label_seqs, masks)]
    return rows, picked


def pair_answer_tokens(
    teacher_hidden: HiddenStates,
    teacher_labels: HiddenStates,
    student_hidden: HiddenStates,
    student_labels: HiddenStates,
    *,
    ignore_index: int = -100,
) -> PairedTokens:
    """Pair the supervised tokens of teacher and student sequences, for
    :func:`fcot_kernels.fused_linear_distill`.

    Each side is a padded batch or a list of sequences (see the module docstring); the two
    sides may use different formats and different lengths (the student has fewer image tokens),
    but sequence ``b`` must have the same supervised tokens, in the same order, on both sides.

    Returns:
        :class:`PairedTokens` ``(student_hidden (N, H), teacher_hidden (N, H_t), labels (N,))``,
        rows in sequence order then position order; ``N`` may be 0.

    Raises:
        ValueError: the batch sizes differ, or a sequence's supervised tokens differ between
            the sides (the message names the sequence, the counts and the first differing token).
    """
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    t_rows, t_labels = _select("teacher", teacher_hidden, teacher_labels, ignore_index)
    s_rows, s_labels = _select("student", student_hidden, student_labels, ignore_index)
    if len(t_labels) != len(s_labels):
        raise ValueError(f"teacher has {len(t_labels)} sequences but student has {len(s_labels)}; they must match")
    if t_rows.device != s_rows.device:
        raise ValueError(f"teacher hidden states are on {t_rows.device} but student ones on {s_rows.device}")
    t_all, s_all = torch.cat(t_labels), torch.cat(s_labels).to(t_labels[0].device)
    # One comparison for the whole batch; the per-sequence search runs only to explain a failure.
    if t_all.shape != s_all.shape or not torch.equal(t_all, s_all.to(t_all.dtype)):
        for b, (t_lab, s_lab) in enumerate(zip(t_labels, s_labels)):
            if t_lab.numel() != s_lab.numel():
                raise ValueError(
                    f"sequence {b}: teacher has {t_lab.numel()} supervised tokens but student has {s_lab.numel()}; "
                    "the two must supervise the same answer tokens"
                )
            diff = (t_lab != s_lab.to(t_lab)).nonzero()
            if diff.numel():
                k = int(diff[0, 0])
                raise ValueError(
                    f"sequence {b}: supervised token {k} differs (teacher label {int(t_lab[k])}, student label "
                    f"{int(s_lab[k])}); the two must supervise the same answer tokens"
                )
    return PairedTokens(s_rows, t_rows.detach(), s_all)
