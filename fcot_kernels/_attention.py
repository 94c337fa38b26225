"""Argument checks and geometry of :func:`fcot_kernels.merged_attention` (the attention
counterpart of ``_validation.shuffle_geometry``; generic checks come from ``_validation``).

Every check raises ``TypeError``/``ValueError`` naming the argument, the value received and
what was expected; the kernels assume these checks passed. Shapes are checked on the host.
The values of ``cu_seqlens_*`` and ``key_log_size`` are checked on the host (precise messages)
only for CPU tensors in eager mode or with ``FCOT_DEBUG_FINITE=1``; otherwise (GPU tensors, and
inside ``torch.compile``) the same checks run on the device (``torch._assert_async``: no host
sync, no graph break; a violation surfaces as a device-side assert naming the check). Varlen
calls read ``cu_seqlens_*`` on the host only when ``max_seqlen_q/k`` are not given (the grid
needs them) or when ``importance_rows`` are asked for (their range depends on each length).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from ._validation import FLOAT_DTYPES, check_int, check_positive_float, check_tensor, host_value_checks

SCALE_RANGE = (1e-30, 1e4)
"""Allowed logit ``scale``: normal in fp32, and small enough that ``q.k * scale`` of inputs of
ordinary magnitude cannot overflow fp32 (1e38 made every logit inf and the output NaN). The
default ``1/sqrt(D)`` is about 0.1; cosine attention uses up to 100."""

SUPPORTED_HEAD_DIMS = (64, 80, 96, 128)
"""Head dims of the Triton kernels (80 and 96 run in a 128-wide, masked tile)."""


@dataclass(frozen=True)
class AttnGeometry:
    """Shapes of one merged_attention call, after validation."""

    batch: int
    """Sequences: B, or len(cu_seqlens) - 1."""
    heads_q: int
    heads_kv: int
    head_dim: int
    seqlen_q: int
    """Batched: L_q. Varlen: max_seqlen_q (sizes the launch grid)."""
    seqlen_k: int
    varlen: bool
    total_q: int
    """Packed query rows: B * L_q, or total_q (the rows of the saved log-sum-exp)."""
    total_k: int

    @property
    def group(self) -> int:
        """Query heads per KV head."""
        return self.heads_q // self.heads_kv

    @property
    def bias_shape(self) -> tuple[int, ...]:
        """Shape of ``key_log_size`` and of the importance output."""
        return (self.total_k,) if self.varlen else (self.batch, self.seqlen_k)


def _cu_device_checks(name: str, cu: torch.Tensor, total: int, max_len: int, packed: str) -> None:
    """The checks of :func:`_cu_lengths` without a host sync (device-side asserts)."""
    lengths = cu[1:] - cu[:-1]
    torch._assert_async(cu[0] == 0, f"{name}[0] must be 0")
    torch._assert_async((lengths >= 0).all(), f"{name} must be non-decreasing (cumulative sequence lengths)")
    torch._assert_async(cu[-1] == total, f"{name}[-1] must equal the packed length of {packed} ({total})")
    torch._assert_async((lengths <= max_len).all(), f"a sequence in {name} is longer than max_seqlen ({max_len})")


def _cu_lengths(name: str, cu: object, total: int, device: torch.device, packed: str) -> list[int]:
    check_tensor(name, cu, ndim=1, dtypes=(torch.int32,), device=device)
    if cu.numel() < 2:
        raise ValueError(f"{name} must have at least 2 entries (B + 1 for B sequences), got {cu.numel()}")
    bounds = cu.tolist()
    if bounds[0] != 0:
        raise ValueError(f"{name}[0] must be 0, got {bounds[0]}")
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    bad = next((i for i, n in enumerate(lengths) if n < 0), None)
    if bad is not None:
        raise ValueError(
            f"{name} must be non-decreasing (cumulative sequence lengths), but {name}[{bad}]={bounds[bad]} > "
            f"{name}[{bad + 1}]={bounds[bad + 1]}"
        )
    if bounds[-1] != total:
        raise ValueError(
            f"{name}[-1]={bounds[-1]} must equal the packed length of {packed} ({packed}.shape[0]={total})"
        )
    return lengths


def _max_seqlen(name: str, value: object, lengths: list[int], cu_name: str, total: int, packed: str) -> int:
    longest = max(lengths)
    if value is None:
        return longest
    value = check_int(name, value)
    if value < longest:
        raise ValueError(f"{name}={value} is shorter than the longest sequence in {cu_name} ({longest})")
    # It sizes the launch grid: no sequence is longer than the packed tensor.
    if value > max(total, 1):
        raise ValueError(
            f"{name}={value} is longer than the packed length of {packed} ({packed}.shape[0]={total}); "
            f"expected {longest} <= {name} <= {total}"
        )
    return value


def attention_geometry(
    q: object,
    k: object,
    v: object,
    key_log_size: object,
    cu_seqlens_q: object,
    cu_seqlens_k: object,
    max_seqlen_q: object,
    max_seqlen_k: object,
) -> tuple[AttnGeometry, list[int] | None]:
    """Validate the tensors of a merged_attention call; returns the geometry and the query
    length of every sequence (None when the varlen values were checked on the device: read them
    with :func:`query_lengths` if needed)."""
    check_tensor("q", q, dtypes=FLOAT_DTYPES)
    check_tensor("k", k, dtypes=(q.dtype,), device=q.device)
    check_tensor("v", v, dtypes=(q.dtype,), device=q.device)
    if (cu_seqlens_q is None) != (cu_seqlens_k is None):
        missing = "cu_seqlens_k" if cu_seqlens_k is None else "cu_seqlens_q"
        raise ValueError(f"packed varlen inputs need both cu_seqlens_q and cu_seqlens_k; {missing} is None")
    varlen = cu_seqlens_q is not None
    layout = "(total, H, D) with cu_seqlens_q/k" if varlen else "(B, L, H, D)"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != (3 if varlen else 4):
            raise ValueError(f"{name} must be {layout}, got shape {tuple(t.shape)}")
    if tuple(k.shape) != tuple(v.shape):
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    head_dim, heads_q, heads_kv = q.shape[-1], q.shape[-2], k.shape[-2]
    if k.shape[-1] != head_dim:
        raise ValueError(f"k has head dim {k.shape[-1]} but q has {head_dim}; they must match")
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head dim {head_dim} (q.shape[-1]) is not supported; expected one of {SUPPORTED_HEAD_DIMS}")
    if heads_kv < 1 or heads_q < 1 or heads_q % heads_kv:
        raise ValueError(
            f"the query heads (q.shape[-2]={heads_q}) must be a positive multiple of the key/value heads "
            f"(k.shape[-2]={heads_kv}) for grouped-query attention"
        )
    if varlen and max_seqlen_q is not None and max_seqlen_k is not None and not host_value_checks(q):
        # No host sync: the geometry comes from the shapes and max_seqlen_*, the values of
        # cu_seqlens_* are checked on the device.
        for name, cu, total, packed, longest in (("cu_seqlens_q", cu_seqlens_q, q.shape[0], "q", max_seqlen_q),
                                                 ("cu_seqlens_k", cu_seqlens_k, k.shape[0], "k", max_seqlen_k)):
            check_tensor(name, cu, ndim=1, dtypes=(torch.int32,), device=q.device)
            if cu.numel() < 2:
                raise ValueError(f"{name} must have at least 2 entries (B + 1 for B sequences), got {cu.numel()}")
            longest = check_int(f"max_seqlen_{packed}", longest)
            if not 1 <= longest <= total:
                # It sizes the launch grid: no sequence is longer than the packed tensor.
                raise ValueError(
                    f"max_seqlen_{packed}={longest} is out of range; expected 1 <= max_seqlen_{packed} <= "
                    f"{packed}.shape[0]={total}"
                )
            _cu_device_checks(name, cu, total, longest, packed)
        if cu_seqlens_q.numel() != cu_seqlens_k.numel():
            raise ValueError(
                f"cu_seqlens_q has {cu_seqlens_q.numel() - 1} sequences but cu_seqlens_k has "
                f"{cu_seqlens_k.numel() - 1}; they must match"
            )
        batch, seqlen_q, seqlen_k = cu_seqlens_q.numel() - 1, max_seqlen_q, max_seqlen_k
        total_q, total_k = q.shape[0], k.shape[0]
        lengths_q = None  # read on the host only if importance_rows need them
    elif varlen:
        lengths_q = _cu_lengths("cu_seqlens_q", cu_seqlens_q, q.shape[0], q.device, "q")
        lengths_k = _cu_lengths("cu_seqlens_k", cu_seqlens_k, k.shape[0], q.device, "k")
        if len(lengths_q) != len(lengths_k):
            raise ValueError(
                f"cu_seqlens_q has {len(lengths_q)} sequences but cu_seqlens_k has {len(lengths_k)}; they must match"
            )
        batch = len(lengths_q)
        seqlen_q = _max_seqlen("max_seqlen_q", max_seqlen_q, lengths_q, "cu_seqlens_q", q.shape[0], "q")
        seqlen_k = _max_seqlen("max_seqlen_k", max_seqlen_k, lengths_k, "cu_seqlens_k", k.shape[0], "k")
        total_q, total_k = q.shape[0], k.shape[0]
    else:
        batch, seqlen_q = q.shape[0], q.shape[1]
        seqlen_k = k.shape[1]
        if k.shape[0] != batch:
            raise ValueError(f"q has batch {batch} but k has {k.shape[0]} (shapes {tuple(q.shape)}, {tuple(k.shape)})")
        if min(batch, seqlen_q, seqlen_k) < 1:
            raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} need at least one sequence and one token")
        for name, value in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
            if value is not None:
                warnings.warn(f"{name}={value!r} is ignored for batched (B, L, H, D) inputs", stacklevel=3)
        lengths_q = [seqlen_q] * batch
        total_q, total_k = batch * seqlen_q, batch * seqlen_k
    geom = AttnGeometry(batch, heads_q, heads_kv, head_dim, seqlen_q, seqlen_k, varlen, total_q, total_k)
    if key_log_size is not None:
        check_tensor("key_log_size", key_log_size, dtypes=(torch.float32,), device=q.device)
        if tuple(key_log_size.shape) != geom.bias_shape:
            raise ValueError(
                f"key_log_size must have shape {geom.bias_shape} (one value per key: "
                f"{'(total_k,)' if varlen else '(B, L_k)'}), got {tuple(key_log_size.shape)}"
            )
        if host_value_checks(key_log_size):
            bad = (~torch.isfinite(key_log_size)).sum().item()
            if bad:
                raise ValueError(f"key_log_size has {bad} non-finite values; expected finite log sizes (0 for text tokens)")
        else:
            torch._assert_async(torch.isfinite(key_log_size).all(),
                                "key_log_size has non-finite values; expected finite log sizes (0 for text tokens)")
    return geom, lengths_q


def query_lengths(cu_seqlens_q: torch.Tensor) -> list[int]:
    """The query length of every packed sequence (reads ``cu_seqlens_q`` on the host)."""
    bounds = cu_seqlens_q.tolist()
    return [b - a for a, b in zip(bounds[:-1], bounds[1:])]


def attention_scale(scale: object, head_dim: int) -> float:
    """``scale`` or the default ``1/sqrt(head_dim)``; a given scale must lie in :data:`SCALE_RANGE`."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    return check_positive_float("scale", scale, low=SCALE_RANGE[0], high=SCALE_RANGE[1])


def importance_row_index(rows: object, lengths_q: list[int], device: torch.device) -> torch.Tensor:
    """``importance_rows`` (ints, a 1-D integer tensor for every sequence, or ``(B, R)``) ->
    ``(B, R)`` int32 non-negative positions on ``device``; negative positions count from the end
    of each sequence."""
    if isinstance(rows, torch.Tensor):
        if rows.dtype.is_floating_point or rows.dtype.is_complex or rows.dtype == torch.bool:
            raise TypeError(f"importance_rows must hold integers, got dtype {rows.dtype}")
        idx = rows.detach().to("cpu", torch.int64)
    elif isinstance(rows, (list, tuple)) and all(isinstance(r, int) and not isinstance(r, bool) for r in rows):
        # Python ints can exceed int64: check them against the sequences before making a tensor.
        longest = max(lengths_q)
        for r in rows:
            if not -longest <= r < longest:
                raise ValueError(
                    f"importance_rows has position {r}, but the longest sequence has {longest} queries; "
                    f"expected -{longest} <= position < {longest}"
                )
        idx = torch.tensor(list(rows), dtype=torch.int64)
    else:
        raise TypeError(f"importance_rows must be a list of ints or an integer tensor, got {type(rows).__name__}")
    batch = len(lengths_q)
    if idx.dim() == 1:
        idx = idx.expand(batch, -1)
    if idx.dim() != 2 or idx.shape[0] != batch or idx.shape[1] < 1:
        raise ValueError(
            f"importance_rows must be (R,) or (B={batch}, R) with R >= 1 query positions, got shape {tuple(idx.shape)}"
        )
    lengths = torch.tensor(lengths_q, dtype=torch.int64)[:, None]
    bad = (idx < -lengths) | (idx >= lengths)
    if bad.any():
        b, r = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"importance_rows has position {int(idx[b, r])} for sequence {b}, which has {lengths_q[b]} queries; "
            f"expected -{lengths_q[b]} <= position < {lengths_q[b]}"
        )
    return torch.where(idx < 0, idx + lengths, idx).to(device=device, dtype=torch.int32)
