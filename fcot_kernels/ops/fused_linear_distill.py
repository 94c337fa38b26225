"""``fused_linear_distill``: LM head + teacher/student divergence + cross-entropy, chunked over
tokens so that the ``(N, V)`` logits never exist.

The forward is a ``torch.library`` custom op (``fcot::fld_fwd``) that returns the loss together
with the finished gradients (computed chunk by chunk while the logits are at hand, as in
Liger-Kernel's fused linear losses); the registered backward only scales them by the upstream
gradient. torch.compile sees one opaque node with known output shapes.
"""

from __future__ import annotations

import importlib
import warnings

import torch

from .._validation import (
    FLOAT_DTYPES,
    check_choice,
    check_finite,
    check_int,
    check_positive_float,
    check_real,
    check_same,
    check_tensor,
    debug_finite,
    host_value_checks,
)
from ..dispatch import resolve
from ..reference.fused_linear_distill import DIVERGENCES, REDUCTIONS, fused_linear_distill_ref

LABEL_DTYPES = (torch.int64, torch.int32)
TEMPERATURE_RANGE = (1e-2, 1e2)
"""Allowed temperatures. The logits are divided by T and the divergence multiplied by T**2 in
fp32; at large T the divergence is a tiny difference of nearly equal log-probabilities times
T**2, so fp32 cancellation grows like T**2 (at T = 1000 the backends' losses differ by tens of
percent, both equally wrong). Distillation uses T of 1 to about 20."""
MAX_LOSS_WEIGHT = 1e6
"""Upper bound of ``kl_weight`` and ``ce_weight`` (``kl_weight * T**2`` stays finite in fp32)."""


def _impl(backend: str):
    return importlib.import_module(f"fcot_kernels.{backend}.fused_linear_distill")


@torch.compiler.assume_constant_result
def _default_chunk(backend: str, n: int, v: int) -> int:
    # A pure function of ints: torch.compile evaluates it once while tracing (the module lookup
    # inside is not traceable and would break the graph).
    return _impl(backend).default_chunk(n, v)


@torch.library.custom_op("fcot::fld_fwd", mutates_args=())
def _fld_fwd(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    teacher_weight: torch.Tensor | None,
    teacher_bias: torch.Tensor | None,
    labels: torch.Tensor | None,
    temperature: float,
    kl_weight: float,
    ce_weight: float,
    divergence: str,
    beta: float,
    ignore_index: int,
    mean: bool,
    chunk: int,
    compute_dx: bool,
    compute_dw: bool,
    compute_db: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    t_weight, t_bias = (weight, bias) if teacher_weight is None else (teacher_weight, teacher_bias)
    loss, dx, dw, db = _impl(backend).forward(
        student_hidden, teacher_hidden, weight, bias, t_weight, t_bias, labels,
        temperature=temperature, kl_weight=kl_weight, ce_weight=ce_weight, divergence=divergence,
        beta=beta, ignore_index=ignore_index, mean=mean, chunk=chunk,
        compute_dx=compute_dx, compute_dw=compute_dw, compute_db=compute_db,
    )
    # Custom ops return tensors, not None: an unrequested gradient is an empty placeholder.
    # Each placeholder is its own tensor: custom-op outputs must not alias one another.
    def empty(dtype):
        return student_hidden.new_empty(0, dtype=dtype)

    return (
        loss,
        dx if dx is not None else empty(student_hidden.dtype),
        dw if dw is not None else empty(torch.float32),
        db if db is not None else empty(torch.float32),
    )


@_fld_fwd.register_fake
def _(student_hidden, teacher_hidden, weight, bias, teacher_weight, teacher_bias, labels, temperature, kl_weight,
      ce_weight, divergence, beta, ignore_index, mean, chunk, compute_dx, compute_dw, compute_db, backend):
    loss = student_hidden.new_empty((), dtype=torch.float32)
    dx = student_hidden.new_empty(student_hidden.shape if compute_dx else (0,))
    dw = weight.new_empty(weight.shape if compute_dw else (0,), dtype=torch.float32)
    db = weight.new_empty((weight.shape[0],) if compute_db else (0,), dtype=torch.float32)
    return loss, dx, dw, db


def _setup_context(ctx, inputs, output) -> None:
    student_hidden, _, weight, bias = inputs[:4]
    _, dx, dw, db = output
    ctx.save_for_backward(dx, dw, db)
    ctx.dtypes = (student_hidden.dtype, weight.dtype, None if bias is None else bias.dtype)


def _backward(ctx, dloss, _ddx, _ddw, _ddb):
    dx, dw, db = ctx.saved_tensors
    need_x, _, need_w, need_b = ctx.needs_input_grad[:4]
    _, w_dtype, b_dtype = ctx.dtypes
    # The gradients were finished in the forward; the chain rule only scales them. Each is
    # computed in fp32 and rounded once into its output dtype, with no fp32 temporary.
    g = dloss.float()
    return (
        dx * g if need_x else None,
        None,
        torch.mul(dw, g, out=torch.empty_like(dw, dtype=w_dtype)) if need_w else None,
        torch.mul(db, g, out=torch.empty_like(db, dtype=b_dtype)) if need_b else None,
        *([None] * 15),
    )


_fld_fwd.register_autograd(_backward, setup_context=_setup_context)


def _validate(student_hidden, teacher_hidden, weight, bias, teacher_weight, teacher_bias, labels, ignore_index):
    check_tensor("student_hidden", student_hidden, ndim=2, dtypes=FLOAT_DTYPES)
    n, h = student_hidden.shape
    if teacher_hidden is None:
        for name, value in (("teacher_weight", teacher_weight), ("teacher_bias", teacher_bias)):
            if value is not None:
                raise ValueError(f"{name} was given without teacher_hidden; pass teacher_hidden or drop {name}")
    else:
        _validate_teacher(teacher_hidden, teacher_weight, teacher_bias, student_hidden)
    check_tensor("weight", weight, ndim=2, dtypes=FLOAT_DTYPES)
    check_same("weight", weight, student_hidden, "student_hidden")
    v = weight.shape[0]
    if weight.shape[1] != h:
        raise ValueError(f"weight has shape {tuple(weight.shape)}; expected (V, H={h}) to match student_hidden's width")
    if v < 1:
        raise ValueError(f"weight has shape {tuple(weight.shape)}; the vocabulary must not be empty")
    if bias is not None:
        check_tensor("bias", bias, shape=(v,))
        check_same("bias", bias, weight, "weight")
    if teacher_hidden is not None:
        _validate_teacher_head(teacher_hidden, teacher_weight, teacher_bias, h, v)
    if labels is not None:
        check_tensor("labels", labels, shape=(n,), dtypes=LABEL_DTYPES)
        if labels.device != student_hidden.device:
            raise ValueError(f"labels is on {labels.device} but student_hidden is on {student_hidden.device}")
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= v))
        if host_value_checks(labels):
            if bool(bad.any()):
                i = int(bad.nonzero()[0, 0])
                raise ValueError(
                    f"labels[{i}]={int(labels[i])} is outside [0, V={v}) and is not ignore_index={ignore_index}"
                )
        else:  # on a GPU / under torch.compile: checked on the device, no host sync
            torch._assert_async(~bad.any(), f"labels outside [0, V={v}) that are not ignore_index={ignore_index}")
    if debug_finite():
        check_finite("student_hidden", student_hidden)
        if teacher_hidden is not None:
            check_finite("teacher_hidden", teacher_hidden)


def _validate_teacher(teacher_hidden, teacher_weight, teacher_bias, student_hidden):
    n = student_hidden.shape[0]
    check_tensor("teacher_hidden", teacher_hidden, ndim=2, dtypes=FLOAT_DTYPES)
    check_same("teacher_hidden", teacher_hidden, student_hidden, "student_hidden")
    if teacher_hidden.shape[0] != n:
        raise ValueError(
            f"teacher_hidden has {teacher_hidden.shape[0]} rows but student_hidden has {n}: both must hold "
            "the same (paired) tokens; see fcot.distill.pair_answer_tokens"
        )


def _validate_teacher_head(teacher_hidden, teacher_weight, teacher_bias, h, v):
    h_t = teacher_hidden.shape[1]
    if teacher_weight is None:
        if teacher_bias is not None:
            raise ValueError("teacher_bias was given without teacher_weight; the shared head uses bias")
        if h_t != h:
            raise ValueError(
                f"teacher_hidden has width {h_t} but weight expects H={h}; pass teacher_weight (V, {h_t}) "
                "for a teacher of another width"
            )
    else:
        check_tensor("teacher_weight", teacher_weight, shape=(v, h_t))
        check_same("teacher_weight", teacher_weight, teacher_hidden, "teacher_hidden")
        if teacher_bias is not None:
            check_tensor("teacher_bias", teacher_bias, shape=(v,))
            check_same("teacher_bias", teacher_bias, teacher_weight, "teacher_weight")


def fused_linear_distill(
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
    chunk_size: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Distillation loss through the LM head: teacher/student divergence plus cross-entropy,
    without ever forming the ``(N, V)`` logits.

    With ``z_s = student_hidden @ weight.T + bias`` and ``z_t`` likewise for the teacher (on
    ``teacher_weight``/``teacher_bias`` when given, else on the same head),
    ``p = softmax(z_t / T)`` and ``q = softmax(z_s / T)``, each token's divergence is

    - ``"forward_kl"``: ``sum_v p (log p - log q)``;
    - ``"reverse_kl"``: ``sum_v q (log q - log p)``;
    - ``"jsd"``: ``beta * KL(p || m) + (1 - beta) * KL(q || m)``, ``m = beta p + (1 - beta) q``
      (identically 0 at ``beta`` 0 or 1);

    and its cross-entropy is ``cross_entropy(z_s, label)`` at temperature 1. The tokens that
    count are those with ``label != ignore_index`` (all of them when ``labels`` is None), and

        ``loss = kl_weight * T**2 * reduce(divergence) + ce_weight * reduce(cross_entropy)``

    where ``reduce`` is the mean over the counted tokens (``"mean"``) or their sum (``"sum"``).
    No counted token gives a loss of 0 with zero gradients.

    Cross-entropy only: with ``kl_weight=0`` no teacher work is done, forward or backward (no
    teacher logits, no teacher log-sum-exp, no divergence); ``teacher_hidden`` may then be None.

    Args:
        student_hidden: ``(N, H)`` final hidden states of the student at the supervised
            positions (paired with the teacher's row by row, e.g. by
            ``fcot.distill.pair_answer_tokens``); fp32, fp16 or bf16.
        teacher_hidden: ``(N, H_t)`` teacher hidden states, same dtype and device; never
            differentiated (no graph is built on the teacher side). None is allowed (and
            ``teacher_weight``/``teacher_bias`` must then be None) only with ``kl_weight=0``.
        weight: ``(V, H)`` LM head, same dtype; ``bias``: optional ``(V,)``.
        teacher_weight, teacher_bias: the teacher's head ``(V, H_t)``, ``(V,)`` when it differs.
        labels: optional ``(N,)`` int64/int32 next-token labels in ``[0, V)`` or ``ignore_index``
            (an int64 value); required when ``ce_weight != 0``; any strides.
        temperature: ``T`` in ``[0.01, 100]`` for the divergence (the cross-entropy stays at 1).
        kl_weight, ce_weight: weights of the two terms, in ``[0, 1e6]``.
        divergence: ``"forward_kl"``, ``"reverse_kl"`` or ``"jsd"``; ``beta`` in ``[0, 1]`` for JSD.
        reduction: ``"mean"`` or ``"sum"``.
        chunk_size: tokens per chunk (default: the largest power of two with
            ``chunk * V <= 2**28``). Peak extra memory is about ``2 * chunk * V`` logits in the
            input dtype plus an fp32 ``V * H`` accumulator (trainable head); see docs/kernels.md.
        backend: ``None`` (process default), ``"auto"``, ``"reference"`` or ``"triton"`` (no
            CUDA C++ kernel); see :mod:`fcot_kernels.dispatch`. ``"auto"`` on a CPU runs the
            reference, which does materialise the logits.

    Returns:
        A 0-dim fp32 loss. Its backward gives gradients for ``student_hidden``, ``weight`` and
        ``bias`` (each when it requires grad); they are computed during the forward (the
        backward only scales them), so a forward under ``torch.no_grad`` skips them.

    Set ``FCOT_DEBUG_FINITE=1`` to check both hidden states for NaN/inf on every call (off by
    default: the check costs a pass over them and a host sync). The range of ``labels`` is
    checked on the host for CPU tensors (or with that flag), and on the device otherwise
    (a device-side assert: no host sync on a GPU, no graph break under torch.compile).
    """
    ignore_index = check_int("ignore_index", ignore_index)  # before _validate compares labels with it
    _validate(student_hidden, teacher_hidden, weight, bias, teacher_weight, teacher_bias, labels, ignore_index)
    temperature = check_positive_float("temperature", temperature, low=TEMPERATURE_RANGE[0], high=TEMPERATURE_RANGE[1])
    kl_weight = check_real("kl_weight", kl_weight, low=0.0, high=MAX_LOSS_WEIGHT)
    ce_weight = check_real("ce_weight", ce_weight, low=0.0, high=MAX_LOSS_WEIGHT)
    check_choice("divergence", divergence, DIVERGENCES)
    beta = check_real("beta", beta, low=0.0, high=1.0)
    check_choice("reduction", reduction, REDUCTIONS)
    if chunk_size is not None:
        chunk_size = check_int("chunk_size", chunk_size, low=1)
    if ce_weight != 0 and labels is None:
        raise ValueError(f"ce_weight={ce_weight} needs labels; pass labels or set ce_weight=0")
    if teacher_hidden is None and kl_weight != 0:
        raise ValueError(f"teacher_hidden=None needs kl_weight=0 (cross-entropy only), got kl_weight={kl_weight}")
    if divergence != "jsd" and beta != 0.5:
        warnings.warn(f"beta={beta} has no effect unless divergence='jsd' (got {divergence!r})", stacklevel=2)
    if divergence == "jsd" and beta in (0.0, 1.0) and kl_weight != 0:
        warnings.warn(f"divergence='jsd' with beta={beta} is identically 0 (m equals one side)", stacklevel=2)
    if kl_weight == 0 and (temperature != 1.0 or divergence != "forward_kl"):
        warnings.warn(f"temperature={temperature} and divergence={divergence!r} have no effect with kl_weight=0 "
                      "(cross-entropy only)", stacklevel=2)
    if labels is None and ignore_index != -100:
        warnings.warn(f"ignore_index={ignore_index} has no effect without labels", stacklevel=2)

    name = resolve("fused_linear_distill", backend, student_hidden, has_cuda=False)
    if kl_weight == 0:  # cross-entropy only: the teacher side goes no further than validation
        teacher_hidden = teacher_weight = teacher_bias = None
    kwargs = dict(
        teacher_weight=teacher_weight, teacher_bias=teacher_bias, labels=labels, temperature=temperature,
        kl_weight=kl_weight, ce_weight=ce_weight, divergence=divergence, beta=beta, ignore_index=ignore_index,
        reduction=reduction,
    )
    if name == "reference":
        if chunk_size is not None:
            warnings.warn("chunk_size has no effect on the reference backend (it forms the full logits)", stacklevel=2)
        return fused_linear_distill_ref(student_hidden, teacher_hidden, weight, bias, **kwargs)

    n, v = student_hidden.shape[0], weight.shape[0]
    chunk = chunk_size if chunk_size is not None else _default_chunk(name, n, v)
    grad_on = torch.is_grad_enabled()
    loss, _, _, _ = _fld_fwd(
        student_hidden, teacher_hidden, weight, bias, teacher_weight, teacher_bias, labels,
        temperature, kl_weight, ce_weight, divergence, beta, ignore_index, reduction == "mean", chunk,
        grad_on and student_hidden.requires_grad,
        grad_on and weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad,
        name,
    )
    return loss
