"""Pure-PyTorch reference of one round of ToMe bipartite soft matching (the spec of
:func:`fcot_kernels.tome_merge` and :func:`fcot_kernels.tome_match`).

Written like ToMe's ``merge.py`` (vectorised over the batch, no Python loops over tokens), so
that it is also a fair eager baseline for the benchmark. The similarity is always computed in
fp32 as ``(a . b) * (1/|a|) * (1/|b|)``, in that order, with ``1/|v| = 1 / max(sqrt(v . v), eps)``:
discrete decisions must not depend on the input dtype, and the kernels evaluate the same
expression, so on integer-valued metrics (exact dot products) every score is bit-identical.
"""

from __future__ import annotations

import torch

EPS = 1e-12
"""Lower bound on a metric row's norm: an all-zero row has cosine similarity 0 to everything."""


def score_tolerance(channels: int) -> float:
    """How far a backend's match score may be from :func:`tome_match_ref`'s on real-valued metrics.

    The score is the fp32 expression ``(a . b) * (1/|a|) * (1/|b|)``, but the order in which
    ``a . b`` is summed is the backend's own (torch's matmul, Triton's channel tiles and
    tensor-core ``wgmma``, which truncates, or the CUDA kernel's FMA chunks). Summing ``C``
    products in any order in fp32 errs by at most ``C * 2u * sum|a_i b_i|`` (u = 2^-24; 2u covers
    truncating accumulators), and ``sum|a_i b_i| <= |a| |b|`` (Cauchy-Schwarz), so after the
    normalisation the cosine errs by at most ``2u * C`` plus a few roundings of the products and
    the inverse norms: ``2u * (C + 4)``. On integer metrics every sum is exact and the scores are
    bit-identical. The contract every backend is tested against
    (``fcot_kernels.testing.assert_match_contract``):

    * every score is within this tolerance of the reference's;
    * the chosen B token's reference score is within twice it of the row's best reference score
      (a near-tie may go to any of the candidates that are tied up to summation order);
    * where the best reference candidate beats every other by more than twice it, every backend
      chooses it; among exactly equal scores (of its own), each backend takes the lowest index.
    """
    return 2.0 * (channels + 4) * 2.0**-24


def tome_split(tokens: int, protected: int) -> tuple[int, int]:
    """Sizes ``(|A|, |B|)`` of the bipartite sets: the tokens after the first ``protected``
    alternate A, B, A, ... (A at even offsets from ``protected``, B at odd ones)."""
    rest = tokens - protected
    return (rest + 1) // 2, rest // 2


def tome_max_r(tokens: int, protected: int) -> int:
    """The largest ``r`` one round can merge: every A token, provided B is not empty."""
    n_a, n_b = tome_split(tokens, protected)
    return n_a if n_b > 0 else 0


def unit_scale_rows(metric: torch.Tensor) -> torch.Tensor:
    """``metric`` with every row (last dimension) multiplied by the power of two that brings its
    largest magnitude into ``[1, 2)``; all-zero rows stay zero. Every backend matches on this.

    Power-of-two scaling is exact, so the cosine scores are bit-identical to the unscaled
    formula wherever that one neither overflows nor underflows, and the squared norms and dot
    products cannot overflow for a finite metric of any magnitude (1e19 used to overflow them).
    fp16 metrics are returned as they are: their squares and products can neither overflow nor
    underflow fp32, and scaling a row down could make its small entries fp16-subnormal."""
    if metric.dtype == torch.float16:
        return metric
    amax = metric.detach().abs().amax(-1, keepdim=True).float()
    _, exp = torch.frexp(amax)  # amax = mantissa * 2**exp, mantissa in [0.5, 1)
    # 2**(1 - exp), kept a normal fp32/bf16 number (beyond that the scaled max is in [2, 4)).
    scale = torch.ldexp(torch.ones_like(amax), (1 - exp).clamp(-126, 126))
    return metric * scale.to(metric.dtype)


def inverse_norm_ref(m: torch.Tensor) -> torch.Tensor:
    """``1 / max(|m|, eps)`` over the last dimension, in fp32."""
    m = m.float()
    # sqrt and the division in fp64, rounded once to fp32: the correctly rounded fp32 results
    # (what IEEE sqrt/div in the kernels give). torch's fp32 sqrt on CPU is not always.
    norm = torch.sqrt((m * m).sum(-1).double()).float().clamp_min(EPS)
    return (1.0 / norm.double()).float()


def tome_match_ref(metric: torch.Tensor, *, protected: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Best B match of every A token: ``(score (B, |A|) fp32, index (B, |A|) int64)``.

    ``index`` counts within set B (B token ``j`` is original token ``protected + 2*j + 1``);
    ties go to the lowest index. Materialises the full ``(B, |A|, |B|)`` score matrix. Rows are
    first scaled by :func:`unit_scale_rows` (exact; what every backend does).
    """
    m = unit_scale_rows(metric[:, protected:]).float()
    a, b = m[:, 0::2], m[:, 1::2]
    scores = (a @ b.transpose(1, 2)) * inverse_norm_ref(a)[:, :, None] * inverse_norm_ref(b)[:, None, :]
    best = scores.amax(dim=-1)
    # Lowest index among the maxima, spelled out rather than relying on argmax's tie rule.
    cols = torch.arange(b.shape[1], device=m.device)
    index = torch.where(scores == best[..., None], cols, b.shape[1]).amin(dim=-1)
    return best, index


def tome_plan_ref(score: torch.Tensor, index: torch.Tensor, *, r: int, tokens: int, protected: int) -> torch.Tensor:
    """``source (B, T) int64``: the output index of every input token after merging the ``r``
    best-scoring A tokens (ties: lower A index first) into their matches, with the outputs
    ordered by the smallest original index each contains."""
    batch, n_a = score.shape
    device = score.device
    pos = torch.arange(tokens, device=device).expand(batch, tokens)
    a_pos = protected + 2 * torch.arange(n_a, device=device)
    # The stable descending sort keeps lower A indices first among equal scores.
    src = torch.sort(score, dim=1, descending=True, stable=True).indices[:, :r]
    dst = pos.clone()  # original index of the token each token ends up in
    dst.scatter_(1, a_pos[src], protected + 2 * index.gather(1, src) + 1)
    # Each surviving token (dst == itself) is keyed by the smallest original index in its group;
    # merged-away tokens get keys past the end so they sort last and fall off.
    group_min = pos.clone().scatter_reduce(1, dst, pos, reduce="amin", include_self=True)
    key = torch.where(dst == pos, group_min, tokens + pos)
    rank = torch.empty_like(pos).scatter_(1, torch.argsort(key, dim=1), pos)
    return rank.gather(1, dst)


def tome_merge_ref(
    x: torch.Tensor,
    *,
    r: int,
    metric: torch.Tensor | None = None,
    size: torch.Tensor | None = None,
    protected: int = 0,
    upcast: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference for :func:`fcot_kernels.tome_merge`: ``(merged (B, T-r, C) in x.dtype,
    merged_size (B, T-r) fp32, source (B, T) int64)``.

    The matching is computed in fp32 from ``metric`` (default ``x``); the size-weighted
    average is computed in ``x.dtype`` like eager PyTorch would, or in fp32 when ``upcast``.
    Gradients flow to ``x`` only (``metric`` picks indices; ``size`` counts tokens).
    """
    batch, tokens, channels = x.shape
    metric = x if metric is None else metric
    size = torch.ones(batch, tokens, device=x.device) if size is None else size
    size = size.detach().float()
    if r == 0:  # nothing merges (and set B may be empty): the identity
        source = torch.arange(tokens, device=x.device).expand(batch, tokens)
    else:
        score, index = tome_match_ref(metric.detach(), protected=protected)
        source = tome_plan_ref(score, index, r=r, tokens=tokens, protected=protected)
    compute = torch.float32 if upcast else x.dtype
    out_tokens = tokens - r
    summed = torch.zeros(batch, out_tokens, channels, device=x.device, dtype=compute)
    summed = summed.scatter_add(1, source[..., None].expand(-1, -1, channels), x.to(compute) * size[..., None].to(compute))
    merged_size = torch.zeros(batch, out_tokens, device=x.device).scatter_add(1, source, size)
    merged = summed / merged_size[..., None].to(compute)
    return merged.to(x.dtype), merged_size, source
