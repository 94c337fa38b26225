"""merged_attention kernels vs the fp32 reference (and vs SDPA without a bias): forward, the
gradients of q, k, v and key_log_size, the importance side-output, and bad inputs.

Under the Triton interpreter (no GPU) shapes stay tiny (L <= 40) and dtypes are fp32 and fp16
(the interpreter's bf16 tl.dot is wrong, so bf16 runs on a GPU only); the block size there is
16, so L in 17..40 still covers several blocks and their masked tails.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import fcot_kernels as fk
from fcot_kernels.reference import attention_probs_ref, merged_attention_ref
from fcot_kernels.testing import assert_close, assert_matches_reference, runnable_backends

from ...conftest import DEVICE, ON_GPU

BACKENDS = runnable_backends(DEVICE, has_cuda=False)
pytestmark = pytest.mark.skipif(not BACKENDS, reason="no Triton backend: no GPU and TRITON_INTERPRET unset")
LOW = [torch.float16, torch.bfloat16] if ON_GPU else [torch.float16]
"""Low-precision dtypes checked here: bf16 needs a GPU (the interpreter's bf16 tl.dot is wrong)."""


def _cu(lengths: list[int]) -> torch.Tensor:
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=torch.int32, device=DEVICE)


def _make(q_shape, kv_shape, dtype, bias_shape=None, merged=True):
    """Fresh random q, k, v (leaf tensors needing grad) and a key_log_size of log(sizes)."""
    q = torch.randn(q_shape, device=DEVICE, dtype=dtype).requires_grad_()
    k = torch.randn(kv_shape, device=DEVICE, dtype=dtype).requires_grad_()
    v = torch.randn(kv_shape, device=DEVICE, dtype=dtype).requires_grad_()
    bias = None
    if bias_shape is not None:
        # log of merged-token sizes 1..4, plus noise so every key has a distinct bias.
        sizes = torch.randint(1, 5, bias_shape, device=DEVICE).float() if merged else torch.ones(bias_shape, device=DEVICE)
        bias = (sizes.log() + 0.1 * torch.rand(bias_shape, device=DEVICE)).requires_grad_()
    return q, k, v, bias


def _grads(out, inputs, dout):
    leaves = [t for t in inputs if t is not None]
    return torch.autograd.grad(out, leaves, dout)


def _check_against_reference(q, k, v, bias, *, backend="triton", **kw):
    """Kernel forward + every gradient vs the fp32 reference; low precision: <= 2x eager error."""
    with fk.poison_outputs():
        out = fk.merged_attention(q, k, v, key_log_size=bias, backend=backend, **kw)
        dout = torch.randn_like(out)
        got = _grads(out, (q, k, v, bias), dout)
    f32 = [t.detach().float().requires_grad_() if t is not None else None for t in (q, k, v)]
    b32 = bias.detach().clone().requires_grad_() if bias is not None else None
    exact = merged_attention_ref(*f32, key_log_size=b32, upcast=True, **kw)
    exact_g = _grads(exact, (*f32, b32), dout.float())
    eager = eager_g = None
    if q.dtype != torch.float32:
        eager = merged_attention_ref(q, k, v, key_log_size=bias, **kw)
        eager_g = _grads(eager, (q, k, v, bias), dout)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert_matches_reference(out, exact, eager, name="out")
    names = ["dq", "dk", "dv", "dkey_log_size"]
    for i, (g, e) in enumerate(zip(got, exact_g)):
        ea = eager_g[i] if eager_g else None
        if ea is not None and g.dtype == torch.float32:
            # The fp32 bias gradient of low-precision inputs: judge it by the eager rule of q.dtype.
            g, ea = g.to(q.dtype), ea.to(q.dtype)
        assert_matches_reference(g, e, ea, name=names[i])
    return out


# --- batched layout -------------------------------------------------------------------------

BATCHED = [
    # (B, L_q, L_k, H_q, H_kv, D)
    (1, 1, 1, 1, 1, 64),
    (2, 17, 17, 2, 1, 64),
    (1, 23, 37, 4, 2, 80),  # L_q < L_k: causal aligned bottom-right
    (2, 31, 19, 3, 3, 96),  # L_q > L_k: causal leaves the first rows with no key
    (1, 40, 33, 2, 2, 128),
]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", BATCHED, ids=lambda s: "x".join(map(str, s)))
def test_batched_matches_reference(shape, causal):
    b, lq, lk, hq, hkv, d = shape
    q, k, v, bias = _make((b, lq, hq, d), (b, lk, hkv, d), torch.float32, (b, lk))
    _check_against_reference(q, k, v, bias, causal=causal)


@pytest.mark.parametrize("head_dim", [64, 80, 96, 128])
def test_head_dims(head_dim):
    q, k, v, bias = _make((1, 19, 2, head_dim), (1, 21, 1, head_dim), torch.float32, (1, 21))
    _check_against_reference(q, k, v, bias, causal=True)


@pytest.mark.parametrize("ratio", [1, 2, 4, 7])
def test_gqa_ratios(ratio):
    hkv = 2 if ratio <= 2 else 1
    q, k, v, bias = _make((2, 18, ratio * hkv, 64), (2, 18, hkv, 64), torch.float32, (2, 18))
    _check_against_reference(q, k, v, bias, causal=True)


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_low_precision(dtype, causal):
    q, k, v, bias = _make((2, 29, 4, 64), (2, 29, 2, 64), dtype, (2, 29))
    _check_against_reference(q, k, v, bias, causal=causal)


@pytest.mark.slow
@pytest.mark.parametrize(
    "model,hq,hkv,d",
    [("InternVL2-1B", 14, 2, 64), ("InternVL2-4B", 32, 32, 96), ("InternVL2-8B", 32, 8, 128)],
)
def test_real_model_heads(model, hq, hkv, d):
    # Real head counts and head dims at a tiny token count (the interpreter is slow).
    q, k, v, bias = _make((1, 9, hq, d), (1, 9, hkv, d), torch.float32, (1, 9))
    _check_against_reference(q, k, v, bias, causal=True)


def test_bias_without_grad_and_partial_grads():
    q, k, v, bias = _make((1, 20, 2, 64), (1, 20, 1, 64), torch.float32, (1, 20))
    bias = bias.detach()
    k.requires_grad_(False)
    with fk.poison_outputs():
        out = fk.merged_attention(q, k, v, key_log_size=bias, causal=True, backend="triton")
        dq, dv = torch.autograd.grad(out, (q, v), torch.ones_like(out))
    exact = merged_attention_ref(q, k, v, key_log_size=bias, causal=True, upcast=True)
    eq, ev = torch.autograd.grad(exact, (q, v), torch.ones_like(exact))
    assert_close(dq, eq, name="dq")
    assert_close(dv, ev, name="dv")


def test_non_contiguous_inputs():
    # q/k/v as slices of a fused qkv projection: token/head strides are not the contiguous ones.
    qkv = torch.randn(2, 21, 4 + 2 + 2, 64, device=DEVICE)
    q, k, v = qkv[:, :, :4], qkv[:, :, 4:6], qkv[:, :, 6:]
    bias = torch.rand(2, 21, device=DEVICE)
    with fk.poison_outputs():
        out = fk.merged_attention(q, k, v, key_log_size=bias, causal=True, backend="triton")
    assert_close(out, merged_attention_ref(q, k, v, key_log_size=bias, causal=True, upcast=True))


def test_rows_without_keys_are_zero_and_unseen_keys_get_zero_grad():
    # Causal with L_q > L_k: the first L_q - L_k rows see no key (flash-attn gives 0 there),
    # so their outputs and dq are exactly 0 even though the outputs were poisoned with NaN.
    q, k, v, bias = _make((1, 30, 2, 64), (1, 12, 1, 64), torch.float32, (1, 12))
    with fk.poison_outputs():
        out = fk.merged_attention(q, k, v, key_log_size=bias, causal=True, backend="triton")
        dq, dk, db = torch.autograd.grad(out, (q, k, bias), torch.randn_like(out))
    assert torch.equal(out[:, :18], torch.zeros_like(out[:, :18]))
    assert torch.equal(dq[:, :18], torch.zeros_like(dq[:, :18]))
    assert torch.isfinite(dk).all() and torch.isfinite(db).all()
    assert out[:, 18:].abs().sum() > 0


# --- packed varlen layout -------------------------------------------------------------------

VARLEN = [
    # (query lengths, key lengths)
    ([1, 7, 13, 29], [1, 7, 13, 29]),  # packed self-attention of odd lengths
    ([5, 17, 3], [11, 17, 31]),  # L_q <= L_k per sequence (prefill continuation)
    ([9, 0, 21], [4, 6, 21]),  # an empty query sequence and L_q > L_k
]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lengths", VARLEN, ids=lambda x: "-".join(map(str, x[0])) + "_" + "-".join(map(str, x[1])))
def test_varlen_matches_reference(lengths, causal):
    lq, lk = lengths
    hq, hkv, d = 4, 2, 64
    q, k, v, bias = _make((sum(lq), hq, d), (sum(lk), hkv, d), torch.float32, (sum(lk),))
    _check_against_reference(q, k, v, bias, causal=causal, cu_seqlens_q=_cu(lq), cu_seqlens_k=_cu(lk))


def test_varlen_equals_batched_per_sequence():
    # Sequences never attend across each other: each packed sequence equals its own batched call.
    # max_seqlen over-estimates the longest sequences (19, 23), up to the packed lengths (25, 33).
    lq, lk = [6, 19], [10, 23]
    q, k, v, bias = _make((sum(lq), 2, 80), (sum(lk), 1, 80), torch.float32, (sum(lk),))
    with fk.poison_outputs():
        packed = fk.merged_attention(q, k, v, key_log_size=bias, causal=True, cu_seqlens_q=_cu(lq),
                                     cu_seqlens_k=_cu(lk), max_seqlen_q=25, max_seqlen_k=33, backend="triton")
    q0 = k0 = 0
    for a, c in zip(lq, lk):
        one = fk.merged_attention(q[None, q0:q0 + a], k[None, k0:k0 + c], v[None, k0:k0 + c],
                                  key_log_size=bias[None, k0:k0 + c], causal=True, backend="triton")
        assert_close(packed[q0:q0 + a], one[0], name=f"sequence of length {a}")
        q0, k0 = q0 + a, k0 + c


@pytest.mark.slow
@settings(max_examples=6, deadline=None)
@given(
    lengths=st.lists(st.tuples(st.integers(1, 24), st.integers(1, 24)), min_size=1, max_size=3),
    causal=st.booleans(),
    ratio=st.sampled_from([1, 3]),
)
def test_varlen_fuzz(lengths, causal, ratio):
    lq, lk = [a for a, _ in lengths], [c for _, c in lengths]
    q, k, v, bias = _make((sum(lq), ratio, 64), (sum(lk), 1, 64), torch.float32, (sum(lk),))
    _check_against_reference(q, k, v, bias, causal=causal, cu_seqlens_q=_cu(lq), cu_seqlens_k=_cu(lk))


# --- vs PyTorch SDPA (no bias) ----------------------------------------------------------------


def _sdpa(q, k, v, causal):
    # SDPA takes (B, H, L, D); GQA by repeating KV heads; causal bottom-right via an explicit mask.
    g = q.shape[2] // k.shape[2]
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k.repeat_interleave(g, 2), v.repeat_interleave(g, 2)))
    mask = None
    if causal:
        lq, lk = q.shape[1], k.shape[1]
        mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(lk - lq)
    return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask).transpose(1, 2)


@pytest.mark.parametrize("shape,causal", [((2, 33, 33, 4, 1), True), ((1, 17, 35, 2, 2), False), ((1, 12, 26, 4, 2), True)])
def test_matches_sdpa_without_bias(shape, causal):
    b, lq, lk, hq, hkv = shape
    q, k, v, _ = _make((b, lq, hq, 64), (b, lk, hkv, 64), torch.float32)
    with fk.poison_outputs():
        out = fk.merged_attention(q, k, v, causal=causal, backend="triton")
        dout = torch.randn_like(out)
        got = torch.autograd.grad(out, (q, k, v), dout)
    ref = _sdpa(q, k, v, causal)
    want = torch.autograd.grad(ref, (q, k, v), dout)
    assert_close(out, ref, name="out vs SDPA")
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        assert_close(g, w, name=f"{name} vs SDPA")


def test_zero_bias_equals_no_bias_and_log_size_equals_duplicated_keys():
    # key_log_size = log(n) on a key is exactly attention over n copies of that key.
    q, k, v, _ = _make((1, 18, 2, 64), (1, 20, 1, 64), torch.float32)
    sizes = torch.randint(1, 4, (20,), device=DEVICE)
    with fk.poison_outputs():
        biased = fk.merged_attention(q, k, v, key_log_size=sizes.float().log()[None], backend="triton")
        plain = fk.merged_attention(q, k, v, key_log_size=torch.zeros(1, 20, device=DEVICE), backend="triton")
        unbiased = fk.merged_attention(q, k, v, backend="triton")
    dup = _sdpa(q, k.repeat_interleave(sizes, 1), v.repeat_interleave(sizes, 1), causal=False)
    assert_close(biased, dup, name="log-size bias vs duplicated keys")
    assert_close(plain, unbiased, name="zero bias vs no bias")


# --- importance side-output ------------------------------------------------------------------


def _importance_ref(q, k, bias, rows, lengths_q, lengths_k, causal):
    """Mean over heads and rows of the explicit fp32 probabilities, sequence by sequence."""
    out, q0, k0 = [], 0, 0
    for b, (a, c) in enumerate(zip(lengths_q, lengths_k)):
        probs = attention_probs_ref(q[q0:q0 + a], k[k0:k0 + c], key_log_size=bias[k0:k0 + c], causal=causal)
        r = torch.as_tensor(rows[b] if isinstance(rows[0], list) else rows) % a
        out.append(probs[:, r].mean(dim=(0, 1)))
        q0, k0 = q0 + a, k0 + c
    return torch.cat(out)


@pytest.mark.parametrize("causal", [False, True])
def test_importance_batched(causal):
    b, lq, lk, hq, hkv = 2, 21, 34, 4, 2
    q, k, v, bias = _make((b, lq, hq, 64), (b, lk, hkv, 64), torch.float32, (b, lk))
    rows = [0, 20, -1, 7, -14]  # duplicates (-1 == 20) count twice, as in the reference
    with fk.poison_outputs():
        out, imp = fk.merged_attention(q, k, v, key_log_size=bias, causal=causal, importance_rows=rows, backend="triton")
    assert imp.shape == (b, lk) and imp.dtype == torch.float32 and not imp.requires_grad
    want = _importance_ref(q.detach().flatten(0, 1), k.detach().flatten(0, 1), bias.detach().flatten(), rows,
                           [lq] * b, [lk] * b, causal)
    assert_close(imp.flatten(), want, name="importance")
    # Every requested row sees at least one key here, so each row's probabilities sum to 1.
    torch.testing.assert_close(imp.sum(-1), torch.ones(b, device=DEVICE))
    ref_out, ref_imp = merged_attention_ref(q, k, v, key_log_size=bias, causal=causal, importance_rows=rows, upcast=True)
    assert_close(out, ref_out)
    assert_close(imp, ref_imp, name="importance vs merged_attention_ref")


@pytest.mark.parametrize("causal", [False, True])
def test_importance_varlen_per_sequence_rows(causal):
    lq, lk = [3, 26, 11], [7, 26, 5]
    q, k, v, bias = _make((sum(lq), 14, 64), (sum(lk), 2, 64), torch.float32, (sum(lk),))
    rows = torch.tensor([[0, -1], [25, 3], [-11, 10]])
    with fk.poison_outputs():
        _, imp = fk.merged_attention(q, k, v, key_log_size=bias, causal=causal, cu_seqlens_q=_cu(lq),
                                     cu_seqlens_k=_cu(lk), importance_rows=rows, backend="triton")
    assert imp.shape == (sum(lk),)
    want = _importance_ref(q.detach(), k.detach(), bias.detach(), rows.tolist(), lq, lk, causal)
    assert_close(imp, want, name="importance")


def test_importance_many_rows_and_reference_backend_agree():
    # More rows than one 16-row block, and the reference backend gives the same numbers.
    q, k, v, bias = _make((1, 37, 2, 96), (1, 37, 1, 96), torch.float32, (1, 37))
    rows = list(range(0, 37, 2))
    with fk.poison_outputs():
        out, imp = fk.merged_attention(q, k, v, key_log_size=bias, causal=True, importance_rows=rows, backend="triton")
    ref_out, ref_imp = fk.merged_attention(q, k, v, key_log_size=bias, causal=True, importance_rows=rows,
                                           backend="reference")
    assert_close(out, ref_out)
    assert_close(imp, ref_imp, name="importance")
    # And the output with importance requested is still differentiable.
    (dq,) = torch.autograd.grad(out.sum(), (q,))
    assert torch.isfinite(dq).all()


# --- dispatch, compile, bad inputs -------------------------------------------------------------


def test_cuda_backend_raises():
    q, k, v, _ = _make((1, 4, 1, 64), (1, 4, 1, 64), torch.float32)
    with pytest.raises(fk.BackendUnavailableError, match="no CUDA C"):
        fk.merged_attention(q, k, v, backend="cuda")


def test_custom_op_registration():
    # Schema, fake (meta) kernel and autograd registration of the forward custom op.
    from fcot_kernels.ops.merged_attention import _mattn_fwd

    q, k, v, bias = _make((1, 5, 2, 64), (1, 6, 1, 64), torch.float32, (1, 6))
    torch.library.opcheck(_mattn_fwd, (q, k, v, bias, None, None, 5, 6, True, 0.125, "triton"),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def _good():
    q = torch.randn(2, 5, 4, 64, device=DEVICE)
    k = torch.randn(2, 6, 2, 64, device=DEVICE)
    return dict(q=q, k=k, v=torch.randn_like(k), key_log_size=torch.zeros(2, 6, device=DEVICE))


def _good_varlen():
    return dict(q=torch.randn(9, 4, 64, device=DEVICE), k=torch.randn(11, 2, 64, device=DEVICE),
                v=torch.randn(11, 2, 64, device=DEVICE), cu_seqlens_q=_cu([4, 5]), cu_seqlens_k=_cu([5, 6]))


BAD = [
    # (name, make kwargs, exception, message fragment)
    ("bias length", lambda: {**_good(), "key_log_size": torch.zeros(2, 5, device=DEVICE)}, ValueError, "key_log_size must have shape"),
    ("bias non-finite", lambda: {**_good(), "key_log_size": torch.tensor([[0, 1, math.inf, 0, 0, 0]] * 2, device=DEVICE)},
     ValueError, "key_log_size has 2 non-finite"),
    ("bias nan", lambda: {**_good(), "key_log_size": torch.full((2, 6), math.nan, device=DEVICE)}, ValueError, "non-finite"),
    ("bias dtype", lambda: {**_good(), "key_log_size": torch.zeros(2, 6, device=DEVICE, dtype=torch.float16)}, TypeError, "key_log_size has dtype"),
    ("varlen bias length", lambda: {**_good_varlen(), "key_log_size": torch.zeros(10, device=DEVICE)}, ValueError, r"shape \(11,\)"),
    ("heads", lambda: {**_good(), "k": torch.randn(2, 6, 3, 64, device=DEVICE), "v": torch.randn(2, 6, 3, 64, device=DEVICE)},
     ValueError, "positive multiple of the key/value heads"),
    ("head dim", lambda: {"q": torch.randn(1, 4, 2, 32, device=DEVICE), "k": torch.randn(1, 4, 2, 32, device=DEVICE),
                          "v": torch.randn(1, 4, 2, 32, device=DEVICE)}, ValueError, "head dim 32"),
    ("k head dim", lambda: {**_good(), "k": torch.randn(2, 6, 2, 80, device=DEVICE), "v": torch.randn(2, 6, 2, 80, device=DEVICE)},
     ValueError, "k has head dim 80"),
    ("kv shapes", lambda: {**_good(), "v": torch.randn(2, 7, 2, 64, device=DEVICE)}, ValueError, "k and v must have the same shape"),
    ("rank", lambda: {**_good(), "q": torch.randn(5, 4, 64, device=DEVICE)}, ValueError, r"q must be \(B, L, H, D\)"),
    ("batch", lambda: {**_good(), "q": torch.randn(3, 5, 4, 64, device=DEVICE)}, ValueError, "q has batch 3"),
    ("dtype mix", lambda: {**_good(), "k": torch.randn(2, 6, 2, 64, device=DEVICE, dtype=torch.float16)}, TypeError, "k has dtype"),
    ("q dtype", lambda: {**_good(), "q": torch.ones(2, 5, 4, 64, device=DEVICE, dtype=torch.int32)}, TypeError, "q has dtype"),
    ("cu not int32", lambda: {**_good_varlen(), "cu_seqlens_q": _cu([4, 5]).long()}, TypeError, "cu_seqlens_q has dtype"),
    ("cu decreasing", lambda: {**_good_varlen(), "cu_seqlens_k": torch.tensor([0, 7, 5, 11], dtype=torch.int32, device=DEVICE),
                               "cu_seqlens_q": _cu([4, 0, 5])}, ValueError, "cu_seqlens_k must be non-decreasing"),
    ("cu total", lambda: {**_good_varlen(), "cu_seqlens_q": _cu([4, 4])}, ValueError, r"cu_seqlens_q\[-1\]=8 must equal"),
    ("cu start", lambda: {**_good_varlen(), "cu_seqlens_k": torch.tensor([1, 5, 11], dtype=torch.int32, device=DEVICE)},
     ValueError, r"cu_seqlens_k\[0\] must be 0"),
    ("cu count", lambda: {**_good_varlen(), "cu_seqlens_k": _cu([5, 3, 3])}, ValueError, "cu_seqlens_q has 2 sequences"),
    ("cu one missing", lambda: {k: v for k, v in _good_varlen().items() if k != "cu_seqlens_k"}, ValueError, "cu_seqlens_k is None"),
    ("max_seqlen short", lambda: {**_good_varlen(), "max_seqlen_q": 4}, ValueError, "max_seqlen_q=4 is shorter"),
    ("rows range", lambda: {**_good(), "importance_rows": [0, 5]}, ValueError, "importance_rows has position 5"),
    ("rows negative range", lambda: {**_good(), "importance_rows": [-6]}, ValueError, "importance_rows has position -6"),
    ("rows varlen range", lambda: {**_good_varlen(), "importance_rows": [4]}, ValueError, "sequence 0, which has 4 queries"),
    ("rows dtype", lambda: {**_good(), "importance_rows": torch.tensor([0.0])}, TypeError, "importance_rows must hold integers"),
    ("rows empty", lambda: {**_good(), "importance_rows": []}, ValueError, "R >= 1"),
    ("rows batch", lambda: {**_good(), "importance_rows": torch.zeros(3, 1, dtype=torch.long)}, ValueError, r"\(B=2, R\)"),
    ("scale", lambda: {**_good(), "scale": -1.0}, ValueError, "scale=-1.0 must be > 0"),
    ("causal", lambda: {**_good(), "causal": 1}, TypeError, "causal must be a bool"),
    ("backend", lambda: {**_good(), "backend": "cudnn"}, ValueError, "backend='cudnn' is not a backend"),
]


@pytest.mark.parametrize("name,make,exc,match", BAD, ids=[b[0] for b in BAD])
def test_bad_inputs(name, make, exc, match):
    kwargs = make()
    q, k, v = kwargs.pop("q"), kwargs.pop("k"), kwargs.pop("v")
    with pytest.raises(exc, match=match):
        fk.merged_attention(q, k, v, backend=kwargs.pop("backend", "triton"), **kwargs)


def test_max_seqlen_on_batched_inputs_warns():
    kw = _good()
    with pytest.warns(UserWarning, match="max_seqlen_q=5 is ignored"):
        fk.merged_attention(kw["q"], kw["k"], kw["v"], max_seqlen_q=5, backend="reference")


# --- GPU only ---------------------------------------------------------------------------------


@pytest.mark.skipif(not ON_GPU, reason="needs a GPU: L=1024 with 32/8 heads takes minutes under the interpreter")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_internvl2_8b_prefill_gpu(dtype):
    # Real prefill geometry: 32 query heads, 8 KV heads, d=128, half of an image span merged.
    L, image = 1024, slice(128, 896)
    q, k, v, _ = _make((1, L, 32, 128), (1, L, 8, 128), dtype)
    bias = torch.zeros(1, L, device=DEVICE)
    bias[:, image] = math.log(2.0)
    bias.requires_grad_()
    out = _check_against_reference(q, k, v, bias, causal=True)
    assert torch.isfinite(out).all()


# --- every tensor argument in every layout (issue 9) ------------------------------------------


@pytest.mark.parametrize("layout", ["strided", "offset", "transposed", "expanded"])
@pytest.mark.parametrize("arg", ["q", "k", "v", "key_log_size", "cu_seqlens_q", "cu_seqlens_k", "importance_rows"])
def test_every_tensor_argument_in_every_layout(arg, layout):
    """Each tensor argument (varlen layout, so the cu_seqlens are tensors too) as a
    non-contiguous, offset, column-major or stride-0 view: output, importance and every
    gradient equal the reference's on the same views."""
    from fcot_kernels.testing import as_layout

    if layout == "expanded" and arg in ("cu_seqlens_q", "cu_seqlens_k"):
        pytest.skip("an expanded cu_seqlens is constant, not cumulative lengths (rejected by validation)")
    lengths = [5, 9]
    values = {
        "q": torch.randn(14, 2, 64, device=DEVICE), "k": torch.randn(14, 1, 64, device=DEVICE),
        "v": torch.randn(14, 1, 64, device=DEVICE), "key_log_size": torch.rand(14, device=DEVICE),
        "cu_seqlens_q": _cu(lengths), "cu_seqlens_k": _cu(lengths),
        "importance_rows": torch.tensor([[0, -1], [2, 3]], device=DEVICE),
    }
    res = {}
    dout = None
    for name in ("reference", "triton"):
        args = {k: as_layout(t, layout if k == arg else "contiguous") for k, t in values.items()}
        leaves = [args[k].requires_grad_() for k in ("q", "k", "v", "key_log_size")]
        with fk.poison_outputs():
            out, imp = fk.merged_attention(*leaves[:3], key_log_size=leaves[3], causal=True, backend=name,
                                           **{k: args[k] for k in ("cu_seqlens_q", "cu_seqlens_k", "importance_rows")})
        dout = torch.randn_like(out) if dout is None else dout
        res[name] = [out.detach(), imp, *_grads(out, leaves, dout)]
    for got, want, what in zip(res["triton"], res["reference"], ("out", "importance", "dq", "dk", "dv", "dkey_log_size")):
        torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4, msg=lambda m: f"{what}: {m}")
