"""``merged_attention``: flash attention with a per-key log-size bias (ToMe's proportional
attention), grouped-query heads, causal and packed varlen layouts, and an optional importance
side-output (the attention a set of query rows pays to every key).

The forward, backward and importance passes are ``torch.library`` custom ops
(``fcot::mattn_fwd``, ``fcot::mattn_bwd``, ``fcot::mattn_importance``), so torch.compile treats
them as opaque nodes with known output shapes and autograd runs the Triton backward. There is
no CUDA C++ kernel for this op: ``backend="cuda"`` raises.
"""

from __future__ import annotations

import importlib
from typing import Optional

import torch

from .._attention import AttnGeometry, attention_geometry, attention_scale, importance_row_index, query_lengths
from ..dispatch import resolve
from ..reference.merged_attention import merged_attention_ref


def _impl(backend: str):
    return importlib.import_module(f"fcot_kernels.{backend}.merged_attention")


def _geom(q: torch.Tensor, k: torch.Tensor, cu_q: Optional[torch.Tensor], max_q: int, max_k: int) -> AttnGeometry:
    # Rebuilt from shapes inside the custom ops (their schema carries tensors and scalars only).
    if cu_q is not None:
        return AttnGeometry(cu_q.shape[0] - 1, q.shape[1], k.shape[1], q.shape[2], max_q, max_k, True,
                            q.shape[0], k.shape[0])
    b, l_q, h_q, d = q.shape
    return AttnGeometry(b, h_q, k.shape[2], d, l_q, k.shape[1], False, b * l_q, b * k.shape[1])


@torch.library.custom_op("fcot::mattn_fwd", mutates_args=())
def _mattn_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: Optional[torch.Tensor],
    cu_q: Optional[torch.Tensor],
    cu_k: Optional[torch.Tensor],
    max_q: int,
    max_k: int,
    causal: bool,
    scale: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    geom = _geom(q, k, cu_q, max_q, max_k)
    return _impl(backend).forward(q, k, v, bias, cu_q, cu_k, geom, causal, scale)


@_mattn_fwd.register_fake
def _(q, k, v, bias, cu_q, cu_k, max_q, max_k, causal, scale, backend):
    geom = _geom(q, k, cu_q, max_q, max_k)
    return q.new_empty(q.shape), q.new_empty((geom.heads_q, geom.total_q), dtype=torch.float32)


@torch.library.custom_op("fcot::mattn_bwd", mutates_args=())
def _mattn_bwd(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: Optional[torch.Tensor],
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_q: Optional[torch.Tensor],
    cu_k: Optional[torch.Tensor],
    max_q: int,
    max_k: int,
    causal: bool,
    scale: float,
    backend: str,
    bias_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    geom = _geom(q, k, cu_q, max_q, max_k)
    dq, dk, dv, dbias = _impl(backend).backward(do, q, k, v, bias, out, lse, cu_q, cu_k, geom, causal, scale, bias_grad)
    return dq, dk, dv, (dbias if dbias is not None else q.new_empty(0, dtype=torch.float32))


@_mattn_bwd.register_fake
def _(do, q, k, v, bias, out, lse, cu_q, cu_k, max_q, max_k, causal, scale, backend, bias_grad):
    dbias = bias.new_empty(bias.shape) if (bias_grad and bias is not None) else q.new_empty(0, dtype=torch.float32)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dbias


@torch.library.custom_op("fcot::mattn_importance", mutates_args=())
def _mattn_importance(
    q: torch.Tensor,
    k: torch.Tensor,
    bias: Optional[torch.Tensor],
    lse: torch.Tensor,
    rows: torch.Tensor,
    cu_q: Optional[torch.Tensor],
    cu_k: Optional[torch.Tensor],
    max_q: int,
    max_k: int,
    causal: bool,
    scale: float,
    backend: str,
) -> torch.Tensor:
    geom = _geom(q, k, cu_q, max_q, max_k)
    return _impl(backend).importance(q, k, bias, lse, rows, cu_q, cu_k, geom, causal, scale)


@_mattn_importance.register_fake
def _(q, k, bias, lse, rows, cu_q, cu_k, max_q, max_k, causal, scale, backend):
    geom = _geom(q, k, cu_q, max_q, max_k)
    return q.new_empty(geom.bias_shape, dtype=torch.float32)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, bias, cu_q, cu_k, max_q, max_k, causal, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, bias, out, lse, cu_q, cu_k)
    ctx.args = (max_q, max_k, causal, scale, backend)


def _backward(ctx, dout, _dlse):
    q, k, v, bias, out, lse, cu_q, cu_k = ctx.saved_tensors
    need_q, need_k, need_v, need_bias = ctx.needs_input_grad[:4]
    dq, dk, dv, dbias = _mattn_bwd(dout, q, k, v, bias, out, lse, cu_q, cu_k, *ctx.args, bool(need_bias))
    return (
        dq if need_q else None,
        dk if need_k else None,
        dv if need_v else None,
        dbias if need_bias else None,
        None, None, None, None, None, None, None,
    )


_mattn_fwd.register_autograd(_backward, setup_context=_setup_context)


def merged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    key_log_size: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    importance_rows: torch.Tensor | list[int] | None = None,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention where every key carries an additive log-size bias: the attention of an
    LLM (or ViT) over text plus merged visual tokens, without leaving the flash path.

    ``softmax(q k^T * scale + key_log_size) v`` per head. A merged token standing for ``n``
    original tokens gets ``key_log_size = log(n)``, so it draws the attention its ``n`` members
    would have drawn together (ToMe's proportional attention); text tokens get 0.

    Args:
        q: batched ``(B, L_q, H_q, D)`` or packed varlen ``(total_q, H_q, D)``; fp16/bf16 on a
            GPU (fp32 also runs: exact fp32 products, for tests). ``D`` in 64, 80, 96, 128.
        k, v: ``(B, L_k, H_kv, D)`` or ``(total_k, H_kv, D)``, q's dtype and device. Grouped-query
            attention: ``H_q`` must be a multiple of ``H_kv``; query head ``h`` uses KV head
            ``h // (H_q / H_kv)`` (as flash-attn and SDPA's ``enable_gqa``).
        key_log_size: fp32 additive bias per key, ``(B, L_k)`` or ``(total_k,)``, finite; 0 for
            unmerged tokens, ``log(size)`` for merged ones. Differentiable (its gradient is the
            sum over heads and queries of the logits' gradient).
        causal: mask keys in each query's future, aligned to the bottom-right corner when
            ``L_q != L_k`` (query ``i`` sees key ``j`` iff ``j <= i + L_k - L_q``, as flash-attn
            >= 2.1). Query rows that see no key at all output 0.
        scale: logit scale in ``[1e-30, 1e4]``, default ``1/sqrt(D)``.
        cu_seqlens_q, cu_seqlens_k: int32 ``(B + 1,)`` cumulative sequence lengths of the
            packed varlen layout (both or neither); sequences never attend across each other.
        max_seqlen_q, max_seqlen_k: longest sequence (varlen only; computed from
            ``cu_seqlens_*`` when omitted, warned about and ignored for batched inputs); at least
            the longest sequence and at most the packed length.
        importance_rows: query positions within each sequence (a list of ints or an integer
            tensor ``(R,)`` shared by every sequence, or ``(B, R)``; negative values count from
            the end of each sequence, e.g. ``[-1]`` for the last token as FastV uses). When given,
            also returns the attention these rows pay to every key, averaged over query heads
            and rows, computed from the forward's own log-sum-exp by a second pass over K
            (no ``L_q x L_k`` matrix; cost ``H_q * R * L_k * D``). Not differentiable.
        backend: ``None`` (process default), ``"auto"``, ``"reference"`` or ``"triton"``
            (``"cuda"`` raises: no CUDA C++ kernel); see :mod:`fcot_kernels.dispatch`.

    Returns:
        ``out`` with q's shape and dtype; with ``importance_rows`` also ``importance``, fp32,
        ``(B, L_k)`` or ``(total_k,)``: for each sequence, every key's mean attention
        probability (a row-stochastic average, so it sums to 1 over the keys a row can see).

    The Triton kernels use an online softmax (FlashAttention-2) with the bias and masks applied
    inside the kernel; memory beyond the inputs and outputs is the fp32 log-sum-exp per (head,
    query row), O(L). The backward recomputes the probabilities from it and reduces dK/dV over
    each KV head's query group in registers. Softmax statistics and all accumulations are fp32.
    No host sync on a GPU when ``max_seqlen_q/k`` are given (varlen) and ``importance_rows`` is
    not: the values of ``cu_seqlens_*`` and ``key_log_size`` are then checked on the device
    (``FCOT_DEBUG_FINITE=1`` checks them on the host, with precise messages); see
    ``fcot_kernels/_attention.py``.
    """
    geom, lengths_q = attention_geometry(
        q, k, v, key_log_size, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k
    )
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__} ({causal!r})")
    scale = attention_scale(scale, geom.head_dim)
    if importance_rows is not None and lengths_q is None:
        lengths_q = query_lengths(cu_seqlens_q)  # importance rows are validated per sequence length
    rows = importance_row_index(importance_rows, lengths_q, q.device) if importance_rows is not None else None
    name = resolve("merged_attention", backend, q, has_cuda=False)
    if name == "reference":
        return merged_attention_ref(
            q, k, v, key_log_size=key_log_size, causal=causal, scale=scale, cu_seqlens_q=cu_seqlens_q,
            cu_seqlens_k=cu_seqlens_k, importance_rows=rows,
        )
    out, lse = _mattn_fwd(
        q, k, v, key_log_size, cu_seqlens_q, cu_seqlens_k, geom.seqlen_q, geom.seqlen_k, causal, scale, name
    )
    if rows is None:
        return out
    detached = key_log_size.detach() if key_log_size is not None else None
    imp = _mattn_importance(
        q.detach(), k.detach(), detached, lse.detach(), rows, cu_seqlens_q, cu_seqlens_k,
        geom.seqlen_q, geom.seqlen_k, causal, scale, name,
    )
    return out, _nan_where_rows_are_nan(imp, lse.detach(), rows, cu_seqlens_q, cu_seqlens_k, geom, causal)


def _nan_where_rows_are_nan(imp, lse, rows, cu_q, cu_k, geom, causal) -> torch.Tensor:
    """The NaN policy for the importance side-output: a selected query row whose log-sum-exp is
    NaN or +inf (a NaN/inf in its q or in a key it sees) makes its sequence's importance NaN,
    as in the reference, whose average includes that row's NaN probabilities. Rows that see no
    key at all (causal, L_q > L_k) also store lse = +inf; they are told apart by position.
    No host sync."""
    device = lse.device
    rows = rows.long()
    if geom.varlen:
        start = cu_q[:-1].long()
        len_q, len_k = torch.diff(cu_q.long()), torch.diff(cu_k.long())
    else:
        start = torch.arange(geom.batch, device=device) * geom.seqlen_q
        len_q = torch.full((geom.batch,), geom.seqlen_q, device=device)
        len_k = torch.full((geom.batch,), geom.seqlen_k, device=device)
    no_key = (rows < (len_q - len_k)[:, None]) if causal else torch.zeros_like(rows, dtype=torch.bool)
    sel = lse[:, (start[:, None] + rows).reshape(-1)].reshape(geom.heads_q, geom.batch, -1)  # (H_q, B, R)
    bad = (torch.isnan(sel) | ((sel == float("inf")) & ~no_key)).any(2).any(0)  # (B,)
    if geom.varlen:
        bad = bad.repeat_interleave(len_k, output_size=geom.total_k)
    else:
        bad = bad[:, None]
    return torch.where(bad, torch.full_like(imp, float("nan")), imp)
