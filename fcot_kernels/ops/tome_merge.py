"""``tome_merge``: one round of ToMe bipartite soft matching, with spatial order kept.

Pipeline of the kernel backends (``triton``, ``cuda``), for ``x`` of shape ``(B, T, C)``:

1. **match** (kernel): the best B match of every A token and its cosine similarity, fused
   normalise + dot + running row argmax; the ``|A| x |B|`` score matrix is never written.
2. **plan** (torch ops, here): the ``r`` best-scoring A tokens (a stable sort over ``|A|``
   scores), the group each token lands in, the output order (a scatter-min and a cumsum) and
   the members of every output token in CSR form (a stable argsort). These are integer
   bookkeeping on ``B*T`` elements; a custom kernel would not move fewer bytes.
3. **merge** (kernel): size-weighted average of each output token's members, sizes summed,
   fp32 accumulation, members summed in original order (deterministic, no atomics).

The forward and backward are ``torch.library`` custom ops (``fcot::tome_match``,
``fcot::tome_merge_fwd``, ``fcot::tome_merge_bwd``) so torch.compile sees opaque nodes.
"""

from __future__ import annotations

import importlib

import torch

from .._validation import check_finite_values, check_int_range, check_tensor
from ..dispatch import resolve
from ..reference.tome_merge import EPS, tome_match_ref, tome_max_r, tome_merge_ref, tome_split, unit_scale_rows


def _impl(backend: str):
    return importlib.import_module(f"fcot_kernels.{backend}.tome_merge")


def _scaled_for(backend: str, metric: torch.Tensor) -> torch.Tensor:
    """The metric as ``backend``'s match takes it: the Triton match scales the rows itself
    (in-kernel, one pass); the CUDA one takes them already scaled by ``unit_scale_rows``."""
    return metric if backend == "triton" else unit_scale_rows(metric)


def _plan(score: torch.Tensor, index: torch.Tensor, r: int, tokens: int, protected: int):
    """``(source (B, T), order (B, T), offsets (B, T-r+1))``, all int64: each token's output
    index, the tokens grouped by output index (original order within a group), group starts."""
    batch = score.shape[0]
    device = score.device
    pos = torch.arange(tokens, device=device).expand(batch, tokens)
    src = torch.sort(score, dim=1, descending=True, stable=True).indices[:, :r]
    a_tok = protected + 2 * src
    b_tok = protected + 1 + 2 * index.gather(1, src)
    dst = pos.clone().scatter_(1, a_tok, b_tok)
    # head[d]: the smallest original index in the group of destination d.
    head = pos.clone().scatter_reduce_(1, b_tok, a_tok, reduce="amin")
    group_head = head.gather(1, dst)
    rank = (group_head == pos).cumsum(1) - 1
    source = rank.gather(1, group_head)
    order = torch.argsort(source, dim=1, stable=True)
    offsets = torch.zeros(batch, tokens - r + 1, dtype=torch.int64, device=device)
    offsets[:, 1:].scatter_add_(1, source, torch.ones_like(source))
    return source, order, offsets.cumsum_(1)


@torch.library.custom_op("fcot::tome_match", mutates_args=())
def _tome_match(metric: torch.Tensor, protected: int, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    n_a, n_b = tome_split(metric.shape[1], protected)
    return _impl(backend).match(metric, protected, n_a, n_b, EPS)


@_tome_match.register_fake
def _(metric, protected, backend):
    n_a, _ = tome_split(metric.shape[1], protected)
    score = metric.new_empty((metric.shape[0], n_a), dtype=torch.float32)
    return score, metric.new_empty(score.shape, dtype=torch.int64)


@torch.library.custom_op("fcot::tome_merge_fwd", mutates_args=())
def _tome_merge_fwd(
    x: torch.Tensor, metric: torch.Tensor, size: torch.Tensor, r: int, protected: int, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, tokens, _ = x.shape
    impl = _impl(backend)
    if r == 0:
        # Nothing merges: skip the match, the merge kernel still copies x (a new tensor).
        source = torch.arange(tokens, device=x.device).expand(batch, tokens).contiguous()
        order, offsets = source, torch.arange(tokens + 1, device=x.device).expand(batch, tokens + 1).contiguous()
    else:
        n_a, n_b = tome_split(tokens, protected)
        score, index = impl.match(metric, protected, n_a, n_b, EPS)
        source, order, offsets = _plan(score, index, r, tokens, protected)
    merged, merged_size = impl.merge(x, size, order, offsets, tokens - r)
    return merged, merged_size, source


@_tome_merge_fwd.register_fake
def _(x, metric, size, r, protected, backend):
    batch, tokens, channels = x.shape
    merged = x.new_empty((batch, tokens - r, channels))
    return merged, x.new_empty((batch, tokens - r), dtype=torch.float32), x.new_empty((batch, tokens), dtype=torch.int64)


@torch.library.custom_op("fcot::tome_merge_bwd", mutates_args=())
def _tome_merge_bwd(
    dy: torch.Tensor, size: torch.Tensor, merged_size: torch.Tensor, source: torch.Tensor, backend: str
) -> torch.Tensor:
    return _impl(backend).unmerge(dy, size, merged_size, source)


@_tome_merge_bwd.register_fake
def _(dy, size, merged_size, source, backend):
    return dy.new_empty((dy.shape[0], source.shape[1], dy.shape[2]))


def _setup_context(ctx, inputs, output) -> None:
    _x, _metric, size, _r, _protected, backend = inputs
    _, merged_size, source = output
    ctx.save_for_backward(size, merged_size, source)
    ctx.mark_non_differentiable(merged_size, source)
    ctx.backend = backend


def _backward(ctx, dmerged, _dsize, _dsource):
    size, merged_size, source = ctx.saved_tensors
    dx = _tome_merge_bwd(dmerged, size, merged_size, source, ctx.backend) if ctx.needs_input_grad[0] else None
    return dx, None, None, None, None, None


_tome_merge_fwd.register_autograd(_backward, setup_context=_setup_context)


def _check_metric(metric: object, x: torch.Tensor) -> torch.Tensor:
    check_tensor("metric", metric, ndim=3, device=x.device)
    if metric.shape[:2] != x.shape[:2] or metric.shape[2] < 1:
        raise ValueError(
            f"metric must have shape ({x.shape[0]}, {x.shape[1]}, D) with D >= 1 to match x of shape "
            f"{tuple(x.shape)}; got {tuple(metric.shape)}"
        )
    return metric


def tome_match(
    metric: torch.Tensor, *, protected: int = 0, backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best bipartite match of every A token (the first step of :func:`tome_merge`).

    Args:
        metric: ``(B, T, D)``; fp32, fp16 or bf16; any strides.
        protected: leading tokens left out of the matching (e.g. a CLS token).
        backend: see :mod:`fcot_kernels.dispatch`.

    Returns:
        ``(score, index)``, both ``(B, |A|)``: the best cosine similarity (fp32) of A token
        ``k`` (original token ``protected + 2k``) and the B-set index ``j`` (original token
        ``protected + 2j + 1``) achieving it, the lowest ``j`` on ties. Similarities are
        ``(a . b) * (1/|a|) * (1/|b|)`` in fp32 with ``|v|`` clamped below by 1e-12, evaluated
        on each token's row scaled by a power of two that brings its largest entry into
        ``[1, 2)`` (exact, so the scores do not depend on the metric's magnitude and nothing
        overflows; an all-zero row stays zero and scores 0). Backends sum ``a . b`` in their own
        order: on real-valued metrics their scores agree within
        ``reference.tome_merge.score_tolerance(D)``, and near-ties (candidates closer than that)
        may resolve to different candidates; integer metrics agree bit for bit. A metric holding
        NaN or inf is rejected: a ``ValueError`` on CPU tensors, a device-side assert on a GPU
        and under torch.compile (no host sync).

    The kernels tile B and keep a running (max, argmax) per A row: memory ``O(B*T)``, not
    ``O(B*T^2)``. No gradient (the result is a discrete choice plus its score).
    """
    check_tensor("metric", metric, ndim=3)
    batch, tokens, dim = metric.shape
    if batch < 1 or tokens < 1 or dim < 1:
        raise ValueError(f"metric must have non-empty dimensions, got shape {tuple(metric.shape)}")
    protected = check_int_range("protected", protected, low=0, high=tokens, hint=f" (metric has {tokens} tokens)")
    if tome_split(tokens, protected)[1] == 0:
        raise ValueError(
            f"tome_match needs at least 2 tokens after the protected ones; got {tokens} tokens with protected={protected}"
        )
    check_finite_values("metric", metric)
    name = resolve("tome_match", backend, metric, has_cuda=True)
    if name == "reference":
        return tome_match_ref(metric.detach(), protected=protected)
    return _tome_match(_scaled_for(name, metric.detach()), protected, name)


def tome_merge(
    x: torch.Tensor,
    *,
    r: int,
    metric: torch.Tensor | None = None,
    size: torch.Tensor | None = None,
    protected: int = 0,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One round of ToMe bipartite soft matching that keeps the tokens' spatial order.

    The tokens after the first ``protected`` alternate into sets A (even offsets) and B (odd
    offsets). Every A token finds its most cosine-similar B token under ``metric`` (lowest B
    index on ties); the ``r`` A tokens with the highest such similarity (lower A index first
    on ties) merge into their matches. A merged token is the ``size``-weighted average of its
    members and its size is their sum. Each output token sits at the position of the smallest
    original index it contains, so the image tokens keep their spatial order.

    Args:
        x: ``(B, T, C)`` tokens; fp32, fp16 or bf16; any strides.
        r: tokens to remove, ``0 <= r <= |A| = ceil((T - protected) / 2)`` (0 when fewer than
            two tokens are unprotected); more raises, naming the maximum.
        metric: ``(B, T, D)`` features to match on (ToMe uses the attention keys); default ``x``.
        size: ``(B, T)`` positive token sizes (how many original tokens each stands for);
            default ones. Any float dtype; used in fp32.
        protected: leading tokens never merged (e.g. a CLS token); they stay in front.
        backend: ``None`` (process default), ``"auto"``, ``"reference"``, ``"triton"`` or
            ``"cuda"``; see :mod:`fcot_kernels.dispatch`.

    Returns:
        ``(merged, merged_size, source)``: ``(B, T-r, C)`` in ``x.dtype``; ``(B, T-r)`` fp32;
        ``(B, T)`` int64, the output index of every input token.

    Gradient: given the matching the merge is linear, ``merged_o = sum_i size_i x_i / size_o``,
    so ``x`` receives ``size_i / merged_size_o * dmerged_o``. ``metric`` only chooses indices
    and ``size`` counts tokens: neither receives a gradient (both are treated as constants).
    The matching is computed in fp32 for every input dtype; the average accumulates in fp32.
    Values of ``size`` are not checked (a device sync per call); non-positive sizes give
    undefined averages. A ``metric`` (or ``x`` as the metric) holding NaN or inf is rejected
    when ``r > 0`` (a ``ValueError`` on CPU, a device-side assert on a GPU: no host sync): a
    matching on NaN scores means nothing, and indices cannot carry NaN. NaN/inf in ``x`` with a finite ``metric`` propagate into the
    merged tokens that contain them.
    """
    check_tensor("x", x, ndim=3)
    batch, tokens, channels = x.shape
    if batch < 1 or tokens < 1 or channels < 1:
        raise ValueError(f"x must have non-empty dimensions (B, T, C), got shape {tuple(x.shape)}")
    protected = check_int_range("protected", protected, low=0, high=tokens, hint=f" (x has {tokens} tokens)")
    max_r = tome_max_r(tokens, protected)
    r = check_int_range(
        "r", r, low=0, high=max_r,
        hint=f": one round merges at most |A| = {max_r} of the {tokens - protected} unprotected tokens "
        f"(T={tokens}, protected={protected}); run several rounds to go further",
    )
    metric = x if metric is None else _check_metric(metric, x)
    if r > 0:  # r == 0 never reads the metric
        check_finite_values("metric", metric)
    if size is None:
        size = torch.ones(batch, tokens, device=x.device)
    else:
        check_tensor("size", size, shape=(batch, tokens), device=x.device)
    name = resolve("tome_merge", backend, x, has_cuda=True)
    if name == "reference":
        return tome_merge_ref(x, r=r, metric=metric, size=size, protected=protected)
    size = size.detach().to(torch.float32).contiguous()
    # The kernels match on the exactly rescaled rows (see tome_match); r == 0 never reads them.
    metric = _scaled_for(name, metric.detach()) if r > 0 else metric.detach()
    return _tome_merge_fwd(x, metric, size, r, protected, name)
