"""Pure-PyTorch reference of the fused linear distillation loss: full logits, ``log_softmax``,
``kl_div`` and ``cross_entropy``. It materialises every ``(N, V)`` tensor; the kernels must not."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
REDUCTIONS = ("mean", "sum")


def divergence_ref(log_p: torch.Tensor, log_q: torch.Tensor, divergence: str, beta: float) -> torch.Tensor:
    """Per-row divergence between teacher log-probs ``log_p`` and student log-probs ``log_q``
    (both ``(N, V)``): forward KL(p||q), reverse KL(q||p), or the beta-JSD
    ``beta*KL(p||m) + (1-beta)*KL(q||m)`` with ``m = beta*p + (1-beta)*q``."""
    if divergence == "forward_kl":
        return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)
    if divergence == "reverse_kl":
        return F.kl_div(log_p, log_q, reduction="none", log_target=True).sum(-1)
    if divergence != "jsd":
        raise ValueError(f"divergence={divergence!r} is not supported; expected one of {DIVERGENCES}")
    # log m in log space: beta = 0 or 1 gives log(0) = -inf on one side, which logsumexp absorbs.
    log_b = math.log(beta) if beta > 0 else -math.inf
    log_1b = math.log1p(-beta) if beta < 1 else -math.inf
    log_m = torch.logsumexp(torch.stack([log_p + log_b, log_q + log_1b]), dim=0)
    kl_pm = F.kl_div(log_m, log_p, reduction="none", log_target=True).sum(-1)
    kl_qm = F.kl_div(log_m, log_q, reduction="none", log_target=True).sum(-1)
    return beta * kl_pm + (1 - beta) * kl_qm


def fused_linear_distill_ref(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    teacher_weight: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    temperature: float = 1.0,
    kl_weight: float = 1.0,
    ce_weight: float = 0.0,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    ignore_index: int = -100,
    reduction: str = "mean",
    upcast: bool = False,
) -> torch.Tensor:
    """Reference for :func:`fcot_kernels.fused_linear_distill` (same arguments, no validation
    beyond what PyTorch does). Computes in the input dtype like eager PyTorch would, or in fp32
    when ``upcast``; returns a 0-dim fp32 loss either way. The teacher side is detached (also
    when it shares ``weight``), so gradients reach only ``student_hidden``, ``weight`` and ``bias``.
    With ``kl_weight == 0`` (cross-entropy only) the teacher side is not computed at all, and
    ``teacher_hidden`` may be None.
    """
    compute = torch.float32 if upcast else student_hidden.dtype
    t_weight, t_bias = (weight, bias) if teacher_weight is None else (teacher_weight, teacher_bias)
    z_s = F.linear(student_hidden.to(compute), weight.to(compute), None if bias is None else bias.to(compute))
    n = z_s.shape[0]
    if kl_weight != 0:
        with torch.no_grad():
            z_t = F.linear(teacher_hidden.to(compute), t_weight.to(compute), None if t_bias is None else t_bias.to(compute))
        log_q = F.log_softmax(z_s / temperature, dim=-1)
        log_p = F.log_softmax(z_t / temperature, dim=-1)
        div = divergence_ref(log_p, log_q, divergence, beta)
    else:
        div = z_s.new_zeros(n)
    counted = torch.ones(n, dtype=torch.bool, device=z_s.device) if labels is None else labels != ignore_index
    div = torch.where(counted, div, torch.zeros_like(div))
    if ce_weight != 0:
        ce = F.cross_entropy(z_s, labels.long(), ignore_index=ignore_index, reduction="none")
    else:
        ce = torch.zeros_like(div)
    if reduction == "mean":
        # Zero counted tokens: divide by 1 so the loss is 0 with zero gradients, not 0/0.
        denom = counted.sum().clamp(min=1).to(div.dtype)
        div_r, ce_r = div.sum() / denom, ce.sum() / denom
    elif reduction == "sum":
        div_r, ce_r = div.sum(), ce.sum()
    else:
        raise ValueError(f"reduction={reduction!r} is not supported; expected one of {REDUCTIONS}")
    loss = kl_weight * temperature**2 * div_r + ce_weight * ce_r
    return loss.float()
