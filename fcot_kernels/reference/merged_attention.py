"""Pure-PyTorch reference of size-biased (merging-aware) attention with an importance output.

Explicit: the L_q x L_k logits of each sequence are materialised, the bias and masks added, and
the softmax taken in fp32. Packed varlen inputs are handled by a loop over the sequences.
"""

from __future__ import annotations

import math

import torch


def _sequences(n_seq: int, cu: torch.Tensor | None, length: int) -> list[tuple[int, int]]:
    if cu is None:
        return [(b * length, length) for b in range(n_seq)]
    bounds = cu.tolist()
    return [(bounds[b], bounds[b + 1] - bounds[b]) for b in range(n_seq)]


def attention_probs_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    key_log_size: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """fp32 attention probabilities of ONE sequence: ``q`` ``(L_q, H_q, D)``, ``k`` ``(L_k, H_kv, D)``,
    ``key_log_size`` ``(L_k,)`` -> ``(H_q, L_q, L_k)``.

    KV head ``h // (H_q / H_kv)`` serves query head ``h`` (grouped-query attention, as in
    flash-attn). Causal masking is aligned to the bottom-right corner: query ``i`` sees key ``j``
    iff ``j <= i + L_k - L_q``. A row that sees no key gets probabilities 0 (not NaN).
    """
    return _probs(q.float(), k.float(), key_log_size, causal, scale, torch.float32)


def _probs(q, k, bias, causal, scale, dtype):
    l_q, h_q, d = q.shape
    l_k, h_kv, _ = k.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    kk = k.to(dtype).repeat_interleave(h_q // h_kv, dim=1)
    logits = torch.einsum("mhd,nhd->hmn", q.to(dtype), kk).float() * scale
    if bias is not None:
        logits = logits + bias.float()[None, None, :]
    # Rows with no visible key (causal, L_q > L_k) attend to nothing: zero probabilities. Judged
    # from the mask, not the logits: a row whose logits are all -inf or hold +inf/NaN because of
    # a non-finite q or k stays NaN, as in the kernels.
    empty = torch.zeros(l_q, 1, dtype=torch.bool, device=q.device)
    if causal:
        i = torch.arange(l_q, device=q.device)[:, None]
        j = torch.arange(l_k, device=q.device)[None, :]
        hidden = j > i + (l_k - l_q)
        logits = logits.masked_fill(hidden, float("-inf"))
        empty = hidden.all(dim=-1, keepdim=True)
    probs = torch.softmax(logits.masked_fill(empty, 0.0), dim=-1)
    return probs.masked_fill(empty, 0.0)


def merged_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    key_log_size: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    importance_rows: torch.Tensor | list[int] | None = None,
    upcast: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Reference for :func:`fcot_kernels.merged_attention` (same arguments and outputs; the
    ``max_seqlen_*`` hints are not needed).

    The two matmuls run in the input dtype like eager attention in a model, or in fp32 when
    ``upcast``; the softmax is always fp32 (its probabilities are cast to the input dtype
    before ``P @ V`` unless ``upcast``). The output is in ``q.dtype``; the importance (mean of
    the fp32 probabilities over query heads and ``importance_rows``) is fp32. Differentiable in
    ``q``, ``k``, ``v`` and ``key_log_size``. ``importance_rows`` may be negative (from the end
    of each sequence) and 1-D (the same rows in every sequence) or ``(B, R)``.
    """
    dtype = q.dtype
    compute = torch.float32 if upcast else dtype
    varlen = cu_seqlens_q is not None
    if varlen:
        n_seq = cu_seqlens_q.numel() - 1
        seq_q = _sequences(n_seq, cu_seqlens_q, 0)
        seq_k = _sequences(n_seq, cu_seqlens_k, 0)
        q_all, k_all, v_all = q, k, v
        bias_all = key_log_size
    else:
        n_seq, l_q, h_q, d = q.shape
        l_k = k.shape[1]
        seq_q = _sequences(n_seq, None, l_q)
        seq_k = _sequences(n_seq, None, l_k)
        q_all, k_all, v_all = q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1)
        bias_all = key_log_size.flatten() if key_log_size is not None else None
    rows = None
    if importance_rows is not None:
        rows = torch.as_tensor(importance_rows, dtype=torch.int64).cpu()
        rows = rows.expand(n_seq, -1) if rows.dim() == 1 else rows
    outs, imps = [], []
    for b in range(n_seq):
        (q0, lq), (k0, lk) = seq_q[b], seq_k[b]
        qb, kb, vb = q_all[q0:q0 + lq], k_all[k0:k0 + lk], v_all[k0:k0 + lk]
        bias = bias_all[k0:k0 + lk] if bias_all is not None else None
        probs = _probs(qb, kb, bias, causal, scale, compute)  # (H_q, L_q, L_k) fp32
        vv = vb.to(compute).repeat_interleave(qb.shape[1] // vb.shape[1], dim=1)
        outs.append(torch.einsum("hmn,nhd->mhd", probs.to(compute), vv).to(dtype))
        if rows is not None:
            r = rows[b] % max(lq, 1)  # negative positions count from the end of this sequence
            imps.append(probs[:, r.to(probs.device), :].float().mean(dim=(0, 1)))
    out = torch.cat(outs) if varlen else torch.stack(outs)
    if rows is None:
        return out
    imp = torch.cat(imps) if varlen else torch.stack(imps)
    return out, imp
