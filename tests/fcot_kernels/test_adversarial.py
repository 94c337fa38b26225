"""Adversarial inputs: every public op on the reference and every kernel backend that can run.

Two parts:

* one regression test per finding of the adversarial probe (issue 9): strided/expanded tensor
  arguments the kernels read without their strides, statistics that overflowed for finite
  inputs of large magnitude, non-finite inputs, and scalar arguments that escaped validation;
* a hypothesis suite that draws layouts, dtypes, magnitudes and scalar arguments and asserts
  that the backends agree: either all raise a ``ValueError``/``TypeError`` naming the argument,
  or all return results that agree within the tolerance table (NaN in the same places).

The NaN/inf policy under test (docs/kernels.md, "Validation contract and non-finite inputs"):
non-finite values in a normalised row or an attention/loss input propagate NaN into the rows
they touch, on every backend; the ToMe ops, whose outputs are indices, reject a non-finite
metric with a ValueError.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st

import fcot_kernels as fk
from fcot.modules import CompressProjector, infer_grid
from fcot_kernels.reference import avg_merge_weight
from fcot_kernels.testing import TOLERANCES, runnable_backends

from ..conftest import DEVICE

# The Triton interpreter (numpy) warns when a NaN/inf input meets arithmetic; that is the point here.
pytestmark = pytest.mark.filterwarnings("ignore:(invalid value|divide by zero|overflow) encountered:RuntimeWarning")

KERNELS = runnable_backends(DEVICE)
"""Kernel backends that run here (triton under the interpreter on a CPU; cuda on a GPU)."""
ALL = ["reference", *KERNELS]
needs_kernel = pytest.mark.skipif(not KERNELS, reason="no kernel backend here (no GPU and no Triton interpreter)")


def _kernels(op_has_cuda: bool) -> list[str]:
    return [b for b in KERNELS if op_has_cuda or b != "cuda"]


# ----------------------------------------------------------------------------- layouts


def strided(t: torch.Tensor) -> torch.Tensor:
    """Same values, every dimension with a non-unit stride (a step-2 slice of a wider buffer)."""
    buf = torch.full((*t.shape[:-1], 2 * t.shape[-1]), float("nan") if t.is_floating_point() else -7,
                     dtype=t.dtype, device=t.device)
    buf[..., ::2] = t
    out = buf[..., ::2]
    assert not out.is_contiguous() or t.numel() <= 1
    return out


def offset(t: torch.Tensor) -> torch.Tensor:
    """Same values at a non-zero storage offset."""
    flat = torch.empty(t.numel() + 3, dtype=t.dtype, device=t.device)
    flat[3:] = t.reshape(-1)
    return flat[3:].view(t.shape)


def expanded(value: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """A one-element tensor broadcast to ``shape`` (every stride 0)."""
    return value.reshape((1,) * len(shape)).expand(shape)


# ----------------------------------------------------------------------------- findings


@needs_kernel
@pytest.mark.parametrize("layout", ["strided", "expanded", "offset"])
def test_finding_fld_labels_read_through_their_strides(layout):
    """fused_linear_distill (Triton) read ``labels`` without its stride: a wrong loss and
    wrong gradients for ``labels[::2]`` or an expanded label."""
    n, h, v = 12, 16, 10
    xs = torch.randn(n, h, device=DEVICE)
    xt = xs + 0.5 * torch.randn(n, h, device=DEVICE)
    w = torch.randn(v, h, device=DEVICE) / 4
    base = torch.randint(0, v, (n,), device=DEVICE)
    base[::3] = -100
    labels = {"strided": strided(base), "expanded": expanded(torch.tensor([3], device=DEVICE), (n,)),
              "offset": offset(base)}[layout]
    kw = dict(labels=labels, ce_weight=1.0, kl_weight=0.5)
    results = {}
    for b in ["reference", *_kernels(False)]:
        x = xs.clone().requires_grad_()
        ww = w.clone().requires_grad_()
        loss = fk.fused_linear_distill(x, xt, ww, backend=b, **kw)
        loss.backward()
        results[b] = (loss.detach(), x.grad, ww.grad)
    for b in _kernels(False):
        for got, want, name in zip(results[b], results["reference"], ("loss", "dx", "dw")):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=lambda m: f"{b} {name}: {m}")


def _cproj_params(width, hidden, out, merge, mode, dtype=torch.float32):
    p = {
        "ln_weight": 1 + 0.2 * torch.randn(width, device=DEVICE),
        "ln_bias": 0.2 * torch.randn(width, device=DEVICE),
        "w1": torch.randn(hidden, width, device=DEVICE) / width**0.5,
        "b1": 0.5 * torch.randn(hidden, device=DEVICE),
        "w2": torch.randn(out, hidden, device=DEVICE) / hidden**0.5,
        "b2": 0.2 * torch.randn(out, device=DEVICE),
    }
    if mode != "avg":
        mw = avg_merge_weight(mode, merge, width, device=DEVICE)
        p["merge_weight"] = mw + 0.1 * torch.randn_like(mw)
        p["merge_bias"] = 0.3 * torch.randn(width, device=DEVICE)
    return {k: t.to(dtype) for k, t in p.items()}


def _cproj_all(x, params, grid, merge, mode, backends):
    """Forward and every gradient of compress_project on each backend."""
    res = {}
    torch.manual_seed(1)
    gout = None
    for b in backends:
        xx = x.detach().clone().requires_grad_()
        pp = {k: t.detach().clone().requires_grad_() for k, t in params.items()}
        # The layouts under test are views of the leaves: the ops see the strided tensors.
        views = {k: _LAYOUT_OF.get(k, lambda t: t)(t) for k, t in pp.items()}
        y = fk.compress_project(xx, grid=grid, merge=merge, mode=mode, backend=b, **views)
        if gout is None:
            gout = torch.randn_like(y)
        y.backward(gout)
        res[b] = {"out": y.detach(), "x": xx.grad, **{k: t.grad for k, t in pp.items()}}
    return res


_LAYOUT_OF: dict = {}


@needs_kernel
@pytest.mark.parametrize("layout", ["strided", "expanded", "offset"])
@pytest.mark.parametrize("mode", ["dwconv", "conv"])
def test_finding_cproj_b1_and_merge_bias_read_through_their_strides(layout, mode, monkeypatch):
    """compress_project (Triton) read ``b1`` and ``merge_bias`` without their strides: errors of
    0.9 to 4.3 for a non-contiguous b1, and a stride-0 one read past its storage."""
    merge, grid, c, hidden, out = 2, (4, 4), 6, 20, 12
    width = 4 * c
    x = torch.randn(2, grid[0] * grid[1], c, device=DEVICE)
    params = _cproj_params(width, hidden, out, merge, mode)
    if layout == "expanded":
        view = lambda t: t[:1].expand(t.shape)  # noqa: E731
    else:
        view = strided if layout == "strided" else offset
    monkeypatch.setitem(_LAYOUT_OF, "b1", view)
    monkeypatch.setitem(_LAYOUT_OF, "merge_bias", view)
    res = _cproj_all(x, params, grid, merge, mode, ["reference", *_kernels(False)])
    for b in _kernels(False):
        for name, want in res["reference"].items():
            torch.testing.assert_close(res[b][name], want, atol=2e-4, rtol=2e-4, msg=lambda m: f"{b} {name}: {m}")


def _ln_rows_exact(z: torch.Tensor, w: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    z = z.double()
    mean = z.mean(-1, keepdim=True)
    var = ((z - mean) ** 2).mean(-1, keepdim=True)
    return ((z - mean) / torch.sqrt(var + eps)) * w.double() + bias.double()


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("magnitude", [1e19, 1e25, 1e34])
def test_finding_layernorm_statistics_do_not_overflow(backend, magnitude):
    """Rows with a spread of 1e19 or more overflowed the variance (Triton: output == bias,
    finite garbage; reference: NaN). Now every backend matches the exact LayerNorm."""
    grid, c = (4, 4), 8
    x = torch.randn(2, 16, c, device=DEVICE)
    x[0] *= magnitude  # tile 0: huge rows; tile 1: ordinary rows (must be unaffected)
    w = 1 + 0.2 * torch.randn(4 * c, device=DEVICE)
    bias = 0.1 * torch.randn(4 * c, device=DEVICE)
    y = fk.shuffle_merge_norm(x, grid=grid, weight=w, bias=bias, merge=2, backend=backend)
    z = fk.reference.shuffle_merge_norm.shuffle_merge_ref(x.double(), fk._validation.shuffle_geometry(x, grid, 0.5, 2))
    want = _ln_rows_exact(z, w, bias, 1e-5).float()
    torch.testing.assert_close(y, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", ["reference", *_kernels(False)])
@pytest.mark.parametrize("mode", ["avg", "conv"])
def test_finding_cproj_layernorm_does_not_overflow(backend, mode):
    """compress_project's LayerNorm (after the avg/dwconv merge or after the conv GEMM) had the
    same overflow."""
    grid, c, merge = (4, 4), 6, 2
    x = torch.randn(1, 16, c, device=DEVICE) * 1e20
    params = _cproj_params(4 * c, 16, 8, merge, mode)
    small = fk.compress_project(x / 1e20, grid=grid, merge=merge, mode=mode, backend="reference", **params)
    if "merge_bias" in params:
        params["merge_bias"] = params["merge_bias"] * 1e20  # keep the merged rows exactly x-scaled
    y = fk.compress_project(x, grid=grid, merge=merge, mode=mode, backend=backend, **params)
    # LayerNorm is scale-invariant (eps is negligible at this magnitude): same output.
    torch.testing.assert_close(y, small, atol=1e-3, rtol=1e-3)


def _int_metric(b, t, d):
    return torch.randint(-3, 4, (b, t, d), device=DEVICE).float()


@pytest.mark.parametrize("backend", ["reference", *_kernels(True)])
@pytest.mark.parametrize("magnitude", [2.0**64, 2.0**100, 2.0**-70])
def test_finding_tome_matching_is_scale_invariant(backend, magnitude):
    """A metric of magnitude 1e19+ overflowed the sum of squares: the reference failed with an
    index out of bounds, Triton scored -inf everywhere and merged other tokens. Cosine
    similarity does not depend on scale: the same matches and the same scores as unscaled."""
    metric = _int_metric(2, 21, 16)
    x = torch.randn(2, 21, 8, device=DEVICE)
    score0, index0 = fk.tome_match(metric, backend=backend)
    score, index = fk.tome_match(metric * magnitude, backend=backend)
    assert torch.equal(index, index0)
    torch.testing.assert_close(score, score0, atol=0, rtol=0)
    _, _, src0 = fk.tome_merge(x, r=7, metric=metric, backend=backend)
    _, _, src = fk.tome_merge(x, r=7, metric=metric * magnitude, backend=backend)
    assert torch.equal(src, src0)


@pytest.mark.parametrize("backend", ["reference", *_kernels(True)])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("op", ["tome_match", "tome_merge"])
def test_finding_tome_rejects_non_finite_metric(backend, bad, op):
    """NaN/inf in the metric: the reference returned an index outside [0, |B|) and Triton
    finite scores pointing at the NaN token. Every backend now raises, naming the metric."""
    metric = torch.randn(2, 9, 8, device=DEVICE)
    metric[1, 4, 2] = bad
    with pytest.raises(ValueError, match=r"metric has 1 non-finite"):
        if op == "tome_match":
            fk.tome_match(metric, backend=backend)
        else:
            fk.tome_merge(torch.randn(2, 9, 4, device=DEVICE), r=2, metric=metric, backend=backend)


@pytest.mark.parametrize("backend", ["reference", *_kernels(False)])
def test_finding_attention_scale_out_of_range(backend):
    """``scale=1e38`` gave NaN on Triton (the logits overflow): a scale is now bounded."""
    q = torch.randn(1, 8, 2, 64, device=DEVICE)
    with pytest.raises(ValueError, match=r"scale=1e\+38 .*<= 10000"):
        fk.merged_attention(q, q, q, scale=1e38, backend=backend)
    with pytest.raises(ValueError, match=r"scale=nan"):
        fk.merged_attention(q, q, q, scale=float("nan"), backend=backend)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("backend", ["reference", *_kernels(False)])
def test_suite_finding_attention_row_of_minus_inf_logits_is_nan(backend, causal):
    """Found by the hypothesis suite: a query row that sees keys but whose logits are all -inf
    (an -inf in q against positive keys) came out 0 on Triton (taken for a row with no visible
    key) and NaN on the reference; a +inf logit made the reference treat the row as empty too.
    Now both give NaN for that row only, and rows with no visible key still give 0."""
    q = torch.randn(1, 5, 1, 64, device=DEVICE)
    k = torch.randn(1, 3, 1, 64, device=DEVICE).abs()
    q[0, 3, 0, :] = 0.0
    q[0, 3, 0, 0] = -float("inf")
    q[0, 4, 0, 1] = float("inf")
    out = fk.merged_attention(q, k, torch.randn_like(k), causal=causal, backend=backend)
    nan_rows = torch.isnan(out).any(-1).flatten().tolist()
    assert nan_rows == [False, False, False, True, True]
    assert not torch.isnan(out[0, :3]).any()
    if causal:  # bottom-right aligned: rows 0 and 1 see no key
        assert torch.equal(out[0, :2], torch.zeros_like(out[0, :2]))


@pytest.mark.parametrize("backend", ["reference", *_kernels(False)])
def test_finding_max_seqlen_bounded_by_the_data(backend):
    """``max_seqlen_q=2**40`` passed validation and sized a grid of ~7e10 programs."""
    q = torch.randn(10, 2, 64, device=DEVICE)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match=r"max_seqlen_q=1099511627776 .*q.shape\[0\]=10"):
        fk.merged_attention(q, q, q, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=2**40, backend=backend)
    with pytest.raises(ValueError, match=r"max_seqlen_k=11 "):
        fk.merged_attention(q, q, q, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_k=11, backend=backend)
    # At most the packed length is fine (the grid is sized by it, not by the data).
    out = fk.merged_attention(q, q, q, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=10, backend=backend)
    assert out.shape == q.shape


def _smn(**over):
    x = torch.randn(2, 16, 8, device=DEVICE)
    kw = dict(grid=(4, 4), weight=torch.ones(32, device=DEVICE), bias=torch.zeros(32, device=DEVICE))
    kw.update(over)
    return lambda backend: fk.shuffle_merge_norm(kw.pop("x", x), backend=backend, **kw)


def _fld(**over):
    xs = torch.randn(4, 8, device=DEVICE)
    kw = dict(labels=torch.tensor([1, 2, -100, 0], device=DEVICE))
    kw.update(over)
    return lambda backend: fk.fused_linear_distill(xs, xs, torch.randn(5, 8, device=DEVICE), backend=backend, **kw)


def _attn(**over):
    q = torch.randn(1, 8, 2, 64, device=DEVICE)
    return lambda backend: fk.merged_attention(q, q, q, backend=backend, **over)


def _meta(op):
    m = torch.device("meta")
    if op == "shuffle_merge_norm":
        return lambda backend: fk.shuffle_merge_norm(torch.randn(2, 16, 8, device=m), grid=(4, 4), weight=torch.ones(32, device=m),
                                                     bias=torch.zeros(32, device=m), backend=backend)
    if op == "tome_merge":
        return lambda backend: fk.tome_merge(torch.randn(2, 9, 8, device=m), r=2, backend=backend)
    if op == "tome_match":
        return lambda backend: fk.tome_match(torch.randn(2, 9, 8, device=m), backend=backend)
    if op == "fused_linear_distill":
        return lambda backend: fk.fused_linear_distill(torch.randn(4, 8, device=m), torch.randn(4, 8, device=m),
                                                       torch.randn(5, 8, device=m), backend=backend)
    if op == "merged_attention":
        return lambda backend: fk.merged_attention(*(torch.randn(1, 8, 2, 64, device=m),) * 3, backend=backend)
    params = {k: t.to(m) for k, t in _cproj_params(32, 8, 8, 2, "avg").items()}
    return lambda backend: fk.compress_project(torch.randn(2, 16, 8, device=m), grid=(4, 4), merge=2, backend=backend, **params)


SCALAR_CASES = [
    ("smn scale=1e-310", "shuffle_merge_norm", _smn(scale=1e-310), ValueError, r"scale=1e-310"),
    ("smn scale=nan", "shuffle_merge_norm", _smn(scale=float("nan")), ValueError, r"scale=nan"),
    ("smn merge=2.0", "shuffle_merge_norm", _smn(merge=2.0), TypeError, r"merge must be an int, got float"),
    ("smn merge=True", "shuffle_merge_norm", _smn(merge=True), TypeError, r"merge must be an int, got bool"),
    ("smn eps=1e300", "shuffle_merge_norm", _smn(eps=1e300), ValueError, r"eps=1e\+300 .*<= 1"),
    ("smn eps=1e-50", "shuffle_merge_norm", _smn(eps=1e-50), ValueError, r"eps=1e-50 .*>= 1e-20"),
    ("smn grid float", "shuffle_merge_norm", _smn(grid=(4.0, 4)), TypeError, r"grid must be a pair of ints"),
    ("fld temperature=1e200", "fused_linear_distill", _fld(temperature=1e200), ValueError, r"temperature=1e\+200 .*<= 100"),
    ("fld temperature=1e-9", "fused_linear_distill", _fld(temperature=1e-9), ValueError, r"temperature=1e-09 .*>= 0.01"),
    ("fld kl_weight=1e300", "fused_linear_distill", _fld(kl_weight=1e300), ValueError, r"kl_weight=1e\+300 must be in \[0.0, 1000000.0\]"),
    ("fld ignore_index=2**70", "fused_linear_distill", _fld(ignore_index=2**70), ValueError,
     r"ignore_index=1180591620717411303424 is out of range"),
    ("fld ignore_index=1.0", "fused_linear_distill", _fld(ignore_index=-100.0), TypeError, r"ignore_index must be an int"),
    ("fld chunk_size=2**70", "fused_linear_distill", _fld(chunk_size=2**70), ValueError, r"chunk_size=.* is out of range"),
    ("attn importance_rows=[2**70]", "merged_attention", _attn(importance_rows=[2**70]), ValueError,
     r"importance_rows has position 1180591620717411303424"),
    ("attn importance_rows=[-2**70]", "merged_attention", _attn(importance_rows=[-(2**70)]), ValueError,
     r"importance_rows has position -1180591620717411303424"),
    ("attn scale=1e-310", "merged_attention", _attn(scale=1e-310), ValueError, r"scale=1e-310 .*>= 1e-30"),
    *[(f"{op} meta", op, _meta(op), ValueError, r"is a meta tensor")
      for op in ("shuffle_merge_norm", "compress_project", "tome_merge", "tome_match", "fused_linear_distill", "merged_attention")],
]


@pytest.mark.parametrize("case", SCALAR_CASES, ids=[c[0] for c in SCALAR_CASES])
def test_finding_clear_errors_on_every_backend(case):
    """Each of these gave an OverflowError, a torch schema or index error from deep inside, or
    was accepted by one backend and rejected by another. Now every backend raises the same
    ValueError/TypeError naming the argument, before dispatch."""
    _, op, call, exc, match = case
    for backend in ["reference", *_kernels(op in ("shuffle_merge_norm", "tome_merge", "tome_match"))]:
        with pytest.raises(exc, match=match):
            call(backend)


@pytest.mark.parametrize(
    "kw,exc,match",
    [
        (dict(scale=0), ValueError, r"scale=0 .*> 0"),
        (dict(scale="0.5"), TypeError, r"scale must be a float like 0.5, got str"),
        (dict(scale=0.3), ValueError, r"scale=0.3 is not supported"),
        (dict(merge=2.0), TypeError, r"merge must be an int, got float"),
        (dict(merge=3), ValueError, r"merge=3 is not supported"),
        (dict(in_features=-8), ValueError, r"in_features=-8 is out of range"),
        (dict(out_features=0), ValueError, r"out_features=0 is out of range"),
        (dict(hidden_features=-1), ValueError, r"hidden_features=-1 is out of range"),
        (dict(in_features=8.0), TypeError, r"in_features must be an int"),
        (dict(eps=float("inf")), ValueError, r"eps=inf"),
    ],
)
def test_finding_compress_projector_arguments(kw, exc, match):
    """CompressProjector with scale=0 (ZeroDivisionError), scale="0.5" (a TypeError from
    torch), a float merge or a negative width (a negative-dimension RuntimeError)."""
    args = dict(in_features=8, out_features=16)
    args.update(kw)
    with pytest.raises(exc, match=match):
        CompressProjector(**args)


def test_finding_grid_is_not_truncated():
    """``grid=(4.9, 4.2)`` was silently truncated to (4, 4)."""
    x = torch.randn(1, 16, 8, device=DEVICE)
    with pytest.raises(TypeError, match=r"grid must be a pair of ints"):
        infer_grid(x, (4.9, 4.2), identity_ok=False)
    proj = CompressProjector(8, 16, device=DEVICE)
    with pytest.raises(TypeError, match=r"grid must be a pair of ints"):
        proj(x, grid=(4.9, 4.2))
    assert infer_grid(x, (4, 4), identity_ok=False)[1] == (4, 4)


# ----------------------------------------------------------------------------- the hypothesis suite
#
# Each test draws a case (layouts of every tensor argument, dtype, magnitude, a non-finite
# injection, and at most one scalar argument from a list of invalid values; valid values
# otherwise), runs the public op on the reference and every kernel backend, and asserts that
# they agree: all raise the same ValueError/TypeError (same message: validation runs before
# dispatch), or all return results that agree within the tolerance table, with NaN in the same
# places. Anything else (another exception type, one backend raising and another not) fails.
# ``event`` records what each example exercised (pytest --hypothesis-show-statistics).

ADV_EXAMPLES = int(os.environ.get("FCOT_ADVERSARIAL_EXAMPLES", "25"))
"""Examples per op: 25 in CI (about a minute in all under the interpreter); set
FCOT_ADVERSARIAL_EXAMPLES for a deeper run."""
ADV_SETTINGS = settings(
    max_examples=ADV_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],  # no explain phase: slow under the interpreter
)

LAYOUT = st.sampled_from(["contiguous", "strided", "offset", "transposed", "expanded"])
POW2 = st.sampled_from([2.0**-60, 2.0**-12, 1.0, 1.0, 2.0**12, 2.0**64, 2.0**100])
"""Magnitudes: powers of two keep integer-valued inputs exact at every scale."""
NONFINITE = st.sampled_from([None, None, None, None, float("nan"), float("inf"), -float("inf")])
BAD_FLOAT = [0.0, -1.0, float("nan"), float("inf"), -float("inf"), 1e300, 1e-310, True, "0.5", None, 2**1100]
BAD_INT = [-1, 2.0, True, "2", 2**70, -(2**70), None, float("nan")]


def scalars(data, valid: dict, bad: dict) -> dict:
    """``valid`` values (each a list to draw from), with one argument (or none, half of the
    time) replaced by a value drawn from its ``bad`` list."""
    out = {k: data.draw(st.sampled_from(v), label=k) for k, v in valid.items()}
    which = data.draw(st.sampled_from([None] * len(bad) + list(bad)), label="bad argument")
    if which is not None:
        out[which] = data.draw(st.sampled_from(bad[which]), label=f"bad {which}")
    return out


def as_layout_(t, layout):
    from fcot_kernels.testing import as_layout

    return as_layout(t, layout)


def _outcome(call):
    try:
        return "ok", call()
    except (ValueError, TypeError) as e:
        return "error", (type(e), str(e))


def _flat(result) -> list[torch.Tensor]:
    if isinstance(result, torch.Tensor):
        return [result]
    return [t for t in result if isinstance(t, torch.Tensor)]


def assert_backends_agree(call, backends: list[str], dtype: torch.dtype, *, scale_tol: float = 1.0, floor: float = 1e-300):
    """``call(backend)`` on each backend: the same error everywhere, or results that agree
    (relative to the larger of the output's magnitude and ``floor``)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no-op flags warn; the interpreter warns on inf - inf
        outcomes = {b: _outcome(lambda b=b: call(b)) for b in backends}
    kinds = {b: o[0] for b, o in outcomes.items()}
    first = backends[0]
    if len(set(kinds.values())) != 1:
        raise AssertionError(f"backends disagree on accepting the input: {outcomes}")
    if kinds[first] == "error":
        errors = {b: o[1] for b, o in outcomes.items()}
        assert len(set(errors.values())) == 1, f"backends raise different errors: {errors}"
        _, msg = errors[first]
        event(f"rejected: {msg.split('=')[0].split(' ')[0]}")
        assert "=" in msg or " must " in msg or "expected" in msg, f"unclear error message: {msg!r}"
        return
    ref = _flat(outcomes[first][1])
    nan_out = any(t.is_floating_point() and bool(torch.isnan(t).any()) for t in ref)
    event("ran, NaN propagated" if nan_out else "ran, finite")
    tol = TOLERANCES[dtype]
    for b in backends[1:]:
        got = _flat(outcomes[b][1])
        assert len(got) == len(ref)
        for i, (g, r) in enumerate(zip(got, ref)):
            assert g.shape == r.shape and g.dtype == r.dtype, f"{b} output {i}: {g.shape} {g.dtype} vs {r.shape} {r.dtype}"
            if not g.is_floating_point():
                assert torch.equal(g, r), f"{b} output {i} (integers) differs from the reference"
                continue
            g, r = g.detach().double(), r.detach().double()
            assert torch.equal(torch.isnan(g), torch.isnan(r)), (
                f"{b} output {i}: NaN at {torch.isnan(g).sum()} places, the reference at {torch.isnan(r).sum()}"
            )
            inf = torch.isinf(r)
            assert torch.equal(g[inf], r[inf]) and not torch.isinf(g[~inf]).any(), f"{b} output {i}: infinities differ"
            fin = torch.isfinite(r)
            if fin.any():
                # Relative to the output's own magnitude (inputs span 2**-60 .. 2**100).
                mag = r[fin].abs().max().clamp_min(floor)
                torch.testing.assert_close(
                    g[fin] / mag, r[fin] / mag, atol=tol["atol"] * scale_tol, rtol=tol["rtol"] * scale_tol,
                    msg=lambda m: f"{b} output {i} vs reference: {m}",
                )


def _inject(t: torch.Tensor, value, index) -> torch.Tensor:
    if value is not None:
        t = t.clone()
        t.view(-1)[index % t.numel()] = value
    return t


@pytest.mark.slow
@ADV_SETTINGS
@given(
    data=st.data(),
    seed=st.integers(0, 2**31 - 1),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    magnitude=POW2, nonfinite=NONFINITE, pos=st.integers(0, 10**6),
    layouts=st.tuples(LAYOUT, LAYOUT, LAYOUT),
)
def test_adversarial_shuffle_merge_norm(data, seed, dtype, magnitude, nonfinite, pos, layouts):
    torch.manual_seed(seed)  # tensors drawn from the example: a failure replays exactly
    kw = scalars(
        data,
        valid=dict(merge=[1, 2, 4], scale=[0.5, 1.0], eps=[1e-5, 1e-6, 1.0, 1e-20], grid=[(4, 4)]),
        bad=dict(merge=[3, 0, 2.0, True, "2", None], scale=[0.25, 0.3, 2.0, *BAD_FLOAT], eps=BAD_FLOAT,
                 grid=[(4.0, 4), (16,), (0, 16), (2, 8), (8, 2), "4x4", None, (2**70, 4)]),
    )
    # (2, 16, 6) tokens on the (4, 4) grid: shuffle 0.5 -> (2, 2) x 24, all three merges.
    x = _inject((torch.randn(2, 16, 6, device=DEVICE) * magnitude).to(dtype), nonfinite, pos)
    width = 24 if kw["scale"] == 0.5 else 6
    vals = (x, 1 + 0.2 * torch.randn(width, device=DEVICE), 0.2 * torch.randn(width, device=DEVICE))
    x, w, b = (as_layout_(t, lay) for t, lay in zip(vals, layouts))
    assert_backends_agree(lambda backend: fk.shuffle_merge_norm(x, weight=w, bias=b, backend=backend, **kw), ALL, dtype)


@pytest.mark.slow
@ADV_SETTINGS
@given(
    data=st.data(),
    seed=st.integers(0, 2**31 - 1),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    magnitude=POW2, nonfinite=NONFINITE, pos=st.integers(0, 10**6),
    mode=st.sampled_from(["avg", "dwconv", "conv"]),
    merge=st.sampled_from([1, 2, 4]),
    layouts=st.lists(LAYOUT, min_size=9, max_size=9),
)
def test_adversarial_compress_project(data, seed, dtype, magnitude, nonfinite, pos, mode, merge, layouts):
    torch.manual_seed(seed)  # tensors drawn from the example: a failure replays exactly
    kw = scalars(
        data,
        valid=dict(act=["gelu", "gelu_tanh"], eps=[1e-5]),
        bad=dict(act=["relu", None, 1], eps=BAD_FLOAT, scale=[0.3, *BAD_FLOAT], merge=[3, 2.0, True],
                 mode=["max", None], grid=[(4.5, 4), (16,)]),
    )
    # Past 2**64 the first Linear's products overflow fp32 (inf - inf in the GELU): a magnitude
    # beyond what LayerNorm statistics are about; LayerNorm itself is covered up to 2**100 above.
    magnitude = min(magnitude, 2.0**64)
    params = _cproj_params(24, 16, 8, merge, mode, dtype)
    if "merge_bias" in params:
        params["merge_bias"] = params["merge_bias"] * magnitude
    x = _inject((torch.randn(2, 16, 6, device=DEVICE) * magnitude).to(dtype), nonfinite, pos)
    vals = {"x": x, **params}
    args = {k: as_layout_(v, lay) for (k, v), lay in zip(vals.items(), layouts)}
    kw = {"grid": (4, 4), "merge": merge, "mode": mode, **kw}

    def call(backend):
        return fk.compress_project(backend=backend, **args, **kw)

    # bf16: the reference's GEMMs round to bf16 between layers, the kernel's do not.
    assert_backends_agree(call, ["reference", *_kernels(False)], dtype, scale_tol=2.0)


@pytest.mark.slow
@ADV_SETTINGS
@given(
    data=st.data(),
    seed=st.integers(0, 2**31 - 1),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    magnitude=POW2, nonfinite=NONFINITE, nonfinite_in=st.sampled_from(["metric", "x"]), pos=st.integers(0, 10**6),
    layouts=st.tuples(LAYOUT, LAYOUT, LAYOUT),
    tokens=st.integers(2, 24),
    own_metric=st.booleans(),
)
def test_adversarial_tome(data, seed, dtype, magnitude, nonfinite, nonfinite_in, pos, layouts, tokens, own_metric):
    torch.manual_seed(seed)  # tensors drawn from the example: a failure replays exactly
    kw = scalars(data, valid=dict(protected=[0, 1], r=[0, 1, 3]),
                 bad=dict(protected=[-1, 1.0, True, 2**70, tokens + 1], r=[-1, 2.0, True, 2**70, tokens]))
    if dtype == torch.float16:
        magnitude = min(magnitude, 2.0**12)  # beyond is inf in fp16: covered by the non-finite draws
    x = torch.randn(2, tokens, 5, device=DEVICE).to(dtype)
    metric = (_int_metric(2, tokens, 6) * magnitude).to(dtype)
    if nonfinite_in == "metric":
        metric = _inject(metric, nonfinite, pos)
    else:
        x = _inject(x, nonfinite, pos)
    size = torch.randint(1, 4, (2, tokens), device=DEVICE).float()
    x, metric, size = (as_layout_(t, lay) for t, lay in zip((x, metric, size), layouts))
    backends = ["reference", *_kernels(True)]
    assert_backends_agree(
        lambda backend: fk.tome_merge(x, metric=metric if own_metric else None, size=size, backend=backend, **kw), backends, dtype
    )
    assert_backends_agree(lambda backend: fk.tome_match(metric, protected=kw["protected"], backend=backend), backends, torch.float32)


@pytest.mark.slow
@ADV_SETTINGS
@given(
    data=st.data(),
    seed=st.integers(0, 2**31 - 1),
    dtype=st.sampled_from([torch.float32, torch.float16]),  # the interpreter's bf16 tl.dot is wrong
    magnitude=st.sampled_from([2.0**-20, 1.0, 2.0**4]),
    nonfinite=NONFINITE, pos=st.integers(0, 10**6),
    layouts=st.lists(LAYOUT, min_size=4, max_size=4),
    varlen=st.booleans(), causal=st.booleans(),
)
def test_adversarial_merged_attention(data, seed, dtype, magnitude, nonfinite, pos, layouts, varlen, causal):
    torch.manual_seed(seed)  # tensors drawn from the example: a failure replays exactly
    kw = scalars(
        data,
        valid=dict(scale=[None, 0.125, 1e-3, 100.0, 1e4, 1e-30], importance_rows=[None, [0], [-1, 2]]),
        bad=dict(scale=[1e5, 1e38, *[v for v in BAD_FLOAT if v is not None]], causal=[1, None, "yes"],
                 importance_rows=[[2**70], [-(2**70)], [5 if not varlen else 9], [-10], [1.0], "x", []],
                 **({"max_seqlen_q": [2**40, 15, 3, 9.0, True], "max_seqlen_k": [2**40, 4, -1]} if varlen else {})),
    )
    if varlen:
        shape_q, shape_k, bias_shape = (14, 2, 64), (14, 1, 64), (14,)
        cu = torch.tensor([0, 5, 14], dtype=torch.int32, device=DEVICE)
        kw.update(cu_seqlens_q=cu, cu_seqlens_k=cu)
    else:
        shape_q, shape_k, bias_shape = (2, 7, 2, 64), (2, 7, 1, 64), (2, 7)
    kw.setdefault("causal", causal)
    q = _inject((torch.randn(shape_q, device=DEVICE) * magnitude).to(dtype), nonfinite, pos)
    k = (torch.randn(shape_k, device=DEVICE) * magnitude).to(dtype)
    v = torch.randn(shape_k, device=DEVICE).to(dtype)
    bias = torch.rand(bias_shape, device=DEVICE)
    q, k, v, bias = (as_layout_(t, lay) for t, lay in zip((q, k, v, bias), layouts))
    assert_backends_agree(
        lambda backend: fk.merged_attention(q, k, v, key_log_size=bias, backend=backend, **kw), ["reference", *_kernels(False)], dtype
    )


@pytest.mark.slow
@ADV_SETTINGS
@given(
    data=st.data(),
    seed=st.integers(0, 2**31 - 1),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    magnitude=st.sampled_from([2.0**-30, 1.0, 2.0**6]),
    nonfinite=NONFINITE, nonfinite_in=st.sampled_from(["student", "teacher"]), pos=st.integers(0, 10**6),
    layouts=st.lists(LAYOUT, min_size=5, max_size=5),
    labels_kind=st.sampled_from(["some", "some", "none", "all_ignored"]),
)
def test_adversarial_fused_linear_distill(data, seed, dtype, magnitude, nonfinite, nonfinite_in, pos, layouts, labels_kind):
    torch.manual_seed(seed)  # tensors drawn from the example: a failure replays exactly
    kw = scalars(
        data,
        valid=dict(divergence=["forward_kl", "reverse_kl", "jsd"], temperature=[1.0, 2.0, 0.5, 1e-2, 20.0],
                   kl_weight=[1.0, 0.0, 2.5], ce_weight=[0.0, 1.0], reduction=["mean", "sum"]),
        bad=dict(temperature=[1e200, 1e-9, 1e-3, 1e3, *BAD_FLOAT], kl_weight=[1e300, -1.0, *BAD_FLOAT[2:]], ce_weight=[-0.5, *BAD_FLOAT[2:]],
                 beta=[1.5, -0.1, *BAD_FLOAT[2:]], ignore_index=[2**70, -(2**70), -100.0, True, None],
                 divergence=["kl", None], reduction=["none", None], labels=["out_of_range"]),
    )
    if kw["ce_weight"] and labels_kind == "none":
        labels_kind = "some"
    n, h, v = 9, 16, 12
    xs = torch.randn(n, h, device=DEVICE) * magnitude
    xt = xs + 0.5 * torch.randn(n, h, device=DEVICE) * magnitude
    if nonfinite_in == "student":
        xs = _inject(xs, nonfinite, pos)
    else:
        xt = _inject(xt, nonfinite, pos)
    w, b = torch.randn(v, h, device=DEVICE) / 4, 0.1 * torch.randn(v, device=DEVICE)
    labels = None
    if labels_kind != "none" or kw.get("labels"):
        labels = torch.randint(0, v, (n,), device=DEVICE)
        labels[::3] = -100
        if labels_kind == "all_ignored":
            labels[:] = -100
        if kw.pop("labels", None) == "out_of_range":
            labels[1] = v
    vals = [xs.to(dtype), xt.to(dtype), w.to(dtype), b.to(dtype), labels]
    xs, xt, w, b, labels = (as_layout_(t, lay) if t is not None else None for t, lay in zip(vals, layouts))
    assert_backends_agree(
        lambda backend: fk.fused_linear_distill(xs, xt, w, b, labels=labels, backend=backend, **kw),
        # floor 1: a loss that cancels to ~0 (e.g. identical student/teacher logits) is compared
        # absolutely, not relative to its rounding noise.
        ["reference", *_kernels(False)], dtype, scale_tol=2.0, floor=1.0,
    )
