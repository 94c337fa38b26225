"""fcot_kernels.tome_match / tome_merge against the PyTorch reference (and the reference
against a brute-force reading of the spec).

Matching decisions are compared exactly: metrics are small integers, so every dot product and
squared norm is exact in fp32 and the kernels' scores are bit-identical to the reference's.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fcot_kernels as fk
from fcot_kernels.reference import tome_match_ref, tome_merge_ref
from fcot_kernels.reference.tome_merge import inverse_norm_ref
from fcot_kernels.testing import assert_close, assert_matches_reference, runnable_backends

from ...conftest import DEVICE, ON_GPU

BACKENDS = ["triton", "cuda"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (B, T, C): 1, primes, near powers of two, a tile's 256 tokens, the ViT and projector widths.
SHAPES = [(1, 2, 1), (2, 37, 24), (3, 64, 33), (1, 65, 7), (1, 257, 8), (2, 20, 1024), (1, 9, 4096)]
GPU_SHAPES = [(13, 256, 4096), (104, 1024, 1024)]


def _backend(name: str) -> str:
    if name not in runnable_backends(DEVICE):
        pytest.skip(f"backend {name!r} cannot run here: {fk.backends()[name].reason}")
    return name


def _int_metric(b: int, t: int, c: int, dtype=torch.float32, lo: int = -3, hi: int = 4) -> torch.Tensor:
    # Small integers: exact in every dtype and every summation order.
    return torch.randint(lo, hi, (b, t, c), device=DEVICE).to(dtype)


def _sizes(b: int, t: int) -> torch.Tensor:
    return torch.randint(1, 6, (b, t), device=DEVICE).float()


def _spec_merge(x, metric, size, r, protected):
    """Brute force, straight from the issue text: Python loops over tokens, fp64 merging.

    Scores are the documented fp32 cosine, ``(dot * (1/|a|)) * (1/|b|)`` with correctly
    rounded inverse norms, so mathematically equal cosines tie (or not) exactly as they do in
    the kernels; an fp64 cosine would break some of those ties by rounding noise instead."""
    batch, tokens, _ = x.shape
    outs, sizes, sources = [], [], []
    for bi in range(batch):
        a_idx = list(range(protected, tokens, 2))
        b_idx = list(range(protected + 1, tokens, 2))
        m = metric[bi].float()
        inv = inverse_norm_ref(m[None])[0]
        best = []
        for a in a_idx:
            sims = [float((m[a] @ m[b]) * inv[a] * inv[b]) for b in b_idx]
            j = max(range(len(b_idx)), key=lambda k: (sims[k], -k))  # highest, lowest index on ties
            best.append((sims[j], b_idx[j]))
        chosen = sorted(range(len(a_idx)), key=lambda k: (-best[k][0], k))[:r]
        groups = {i: [i] for i in range(tokens)}
        for k in chosen:
            groups[best[k][1]].append(a_idx[k])
            del groups[a_idx[k]]
        heads = sorted(groups.values(), key=min)
        src = [0] * tokens
        for o, members in enumerate(heads):
            for i in members:
                src[i] = o
        s = size[bi].double()
        outs.append(torch.stack([(s[g, None] * x[bi, g].double()).sum(0) / s[g].sum() for g in heads]))
        sizes.append(torch.stack([s[g].sum() for g in heads]))
        sources.append(torch.tensor(src))
    return torch.stack(outs), torch.stack(sizes), torch.stack(sources)


@pytest.mark.parametrize("protected", [0, 1, 3])
def test_reference_matches_spec(protected):
    # Well-separated float metric (integers) keeps the fp64 spec and the fp32 reference on the same ties.
    x = torch.randn(2, 23, 5, device=DEVICE)
    metric = _int_metric(2, 23, 6)
    size = _sizes(2, 23)
    for r in (0, 1, 5, (23 - protected + 1) // 2):
        merged, msize, source = tome_merge_ref(x, r=r, metric=metric, size=size, protected=protected)
        e_merged, e_size, e_source = _spec_merge(x.cpu(), metric.cpu(), size.cpu(), r, protected)
        assert torch.equal(source.cpu(), e_source), f"r={r}"
        assert torch.equal(msize.cpu().double(), e_size), f"r={r}"
        torch.testing.assert_close(merged.cpu().double(), e_merged, atol=1e-5, rtol=1e-5)


def test_reference_properties():
    x = torch.randn(3, 30, 4, device=DEVICE)
    merged, msize, source = tome_merge_ref(x, r=12, protected=2)
    assert merged.shape == (3, 18, 4) and msize.shape == (3, 18) and source.shape == (3, 30)
    assert torch.equal(msize.sum(1), torch.full((3,), 30.0, device=DEVICE))
    assert torch.equal(source[:, :2], torch.arange(2, device=DEVICE).expand(3, 2))  # protected stay in front
    # Output o holds a token at position o or later, and output order follows first members.
    first = torch.full((3, 18), 10**9, device=DEVICE).scatter_reduce(1, source, torch.arange(30, device=DEVICE).expand(3, 30), "amin")
    assert bool((first[:, 1:] > first[:, :-1]).all())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_match_exact(backend, shape, dtype):
    backend = _backend(backend)
    b, t, c = shape
    for protected in sorted({0, 1, max(0, t - 3)}):
        if t - protected < 2:
            continue
        metric = _int_metric(b, t, c, dtype)
        with fk.poison_outputs():
            score, index = fk.tome_match(metric, protected=protected, backend=backend)
        e_score, e_index = tome_match_ref(metric, protected=protected)
        assert index.dtype == torch.int64 and score.dtype == torch.float32
        assert torch.equal(index, e_index), f"protected={protected}"
        assert torch.equal(score, e_score), f"protected={protected}: scores differ"


@pytest.mark.parametrize("backend", BACKENDS)
def test_match_ties_pick_lowest_index(backend):
    backend = _backend(backend)
    # Every B token identical: each A row ties across all of B (several B tiles) -> index 0.
    metric = _int_metric(2, 71, 5)
    metric[:, 1::2] = metric[:, 1:2]
    score, index = fk.tome_match(metric, backend=backend)
    assert torch.equal(index, torch.zeros_like(index))
    e_score, _ = tome_match_ref(metric)
    assert torch.equal(score, e_score)
    # All A tokens identical too: every score ties, so the lowest A indices merge first (into B token 1).
    metric[:, 0::2] = metric[:, 0:1]
    x = torch.randn(2, 71, 3, device=DEVICE)
    _, _, source = fk.tome_merge(x, r=5, metric=metric, backend=backend)
    _, _, e_source = tome_merge_ref(x, r=5, metric=metric)
    assert torch.equal(source, e_source)
    assert bool((source[:, 0:10:2] == source[:, 1:2]).all())


def _check_merge(backend, x, metric, size, r, protected):
    with fk.poison_outputs():
        merged, msize, source = fk.tome_merge(x, r=r, metric=metric, size=size, protected=protected, backend=backend)
    e_merged, e_size, e_source = tome_merge_ref(x.float(), r=r, metric=metric, size=size, protected=protected)
    eager, _, _ = tome_merge_ref(x, r=r, metric=metric, size=size, protected=protected)
    assert torch.equal(source, e_source), f"r={r} protected={protected}: source maps differ"
    assert merged.dtype == x.dtype and msize.dtype == torch.float32
    # Integer sizes: the sums are exact whatever the order.
    assert torch.equal(msize, e_size), f"r={r}: merged sizes differ"
    assert_matches_reference(merged, e_merged, eager, name=f"merged (r={r}, protected={protected})")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_merge_vs_reference(backend, shape, dtype):
    backend = _backend(backend)
    b, t, c = shape
    x = torch.randn(b, t, c, device=DEVICE, dtype=dtype)
    metric = _int_metric(b, t, min(c, 16))
    size = _sizes(b, t)
    # r at its maximum without protected tokens; a partial round behind one protected token.
    # (r = 0 and other mixes are covered by test_r_limits and the fuzz test.)
    cases = [(0, (t + 1) // 2)] + ([(1, max(1, t // 4))] if t >= 3 else [])
    for protected, r in cases:
        _check_merge(backend, x, metric, size, r, protected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_metric_and_size(backend):
    backend = _backend(backend)
    x = _int_metric(3, 33, 12)  # x is its own metric: integer-valued for exact matches
    merged, msize, source = fk.tome_merge(x, r=17, backend=backend)
    e_merged, e_size, e_source = tome_merge_ref(x, r=17)
    assert torch.equal(source, e_source) and torch.equal(msize, e_size)
    assert_close(merged, e_merged)
    assert torch.equal(msize.sum(1), torch.full((3,), 33.0, device=DEVICE))


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs(backend):
    backend = _backend(backend)
    base = torch.randn(40, 3, 18, device=DEVICE)
    x = base.transpose(0, 1)[:, :, ::2]  # (3, 40, 9), no unit stride anywhere
    metric = _int_metric(40, 3, 12).transpose(0, 1)
    _check_merge(backend, x, metric, None, 13, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_vs_reference(backend, dtype):
    backend = _backend(backend)
    x = torch.randn(2, 29, 40, device=DEVICE, dtype=dtype)
    metric = _int_metric(2, 29, 8).requires_grad_()
    size = _sizes(2, 29)
    dy = torch.randn(2, 29 - 11, 40, device=DEVICE, dtype=dtype)
    x_k = x.detach().clone().requires_grad_()
    with fk.poison_outputs():
        merged, _, _ = fk.tome_merge(x_k, r=11, metric=metric, size=size, protected=1, backend=backend)
        merged.backward(dy)
    x_e = x.detach().float().clone().requires_grad_()
    tome_merge_ref(x_e, r=11, metric=metric, size=size, protected=1)[0].backward(dy.float())
    x_l = x.detach().clone().requires_grad_()
    tome_merge_ref(x_l, r=11, metric=metric, size=size, protected=1)[0].backward(dy)
    assert_matches_reference(x_k.grad, x_e.grad, x_l.grad, name="dx")
    assert metric.grad is None, "metric only picks indices: it must get no gradient"


@pytest.mark.parametrize("backend", BACKENDS)
def test_outputs_without_grad_and_frozen_x(backend):
    backend = _backend(backend)
    x = torch.randn(1, 12, 4, device=DEVICE)
    merged, msize, source = fk.tome_merge(x, r=3, backend=backend)
    assert not merged.requires_grad and not msize.requires_grad
    xg = x.clone().requires_grad_()
    merged, msize, source = fk.tome_merge(xg, r=3, backend=backend)
    assert merged.requires_grad and not msize.requires_grad and not source.is_floating_point()


def test_custom_op_registration():
    from fcot_kernels.ops.tome_merge import _tome_match, _tome_merge_fwd

    backend = _backend("triton")
    x = torch.randn(2, 11, 5, device=DEVICE, requires_grad=True)
    metric = _int_metric(2, 11, 4)
    size = _sizes(2, 11)
    torch.library.opcheck(_tome_merge_fwd, (x, metric, size, 4, 1, backend),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    torch.library.opcheck(_tome_match, (metric, 1, backend), test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_r_limits(backend):
    backend = _backend(backend)
    x = torch.randn(2, 10, 3, device=DEVICE)
    merged, _, source = fk.tome_merge(x, r=5, backend=backend)  # |A| = 5: everything in A merges
    assert merged.shape == (2, 5, 3)
    with pytest.raises(ValueError, match=r"r=6 .*\[0, 5\].*at most \|A\| = 5"):
        fk.tome_merge(x, r=6, backend=backend)
    with pytest.raises(ValueError, match=r"r=5 .*\[0, 4\]"):
        fk.tome_merge(x, r=5, protected=3, backend=backend)  # 7 unprotected tokens: |A| = 4
    # One unprotected token: no B set, so nothing can merge; r=0 is the identity.
    merged, msize, source = fk.tome_merge(x, r=0, protected=9, backend=backend)
    assert torch.equal(merged, x) and torch.equal(source, torch.arange(10, device=DEVICE).expand(2, 10))
    with pytest.raises(ValueError, match=r"r=1 .*\[0, 0\]"):
        fk.tome_merge(x, r=1, protected=9, backend=backend)


def test_bad_inputs():
    x = torch.randn(2, 10, 3, device=DEVICE)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        fk.tome_merge(x.tolist(), r=1)
    with pytest.raises(ValueError, match=r"x must have 3 dimensions, got shape \(10, 3\)"):
        fk.tome_merge(x[0], r=1)
    with pytest.raises(TypeError, match="x has dtype torch.int64"):
        fk.tome_merge(x.long(), r=1)
    with pytest.raises(ValueError, match=r"x must have non-empty dimensions"):
        fk.tome_merge(x[:, :0], r=0)
    with pytest.raises(TypeError, match=r"r must be an int, got bool"):
        fk.tome_merge(x, r=True)
    with pytest.raises(TypeError, match=r"r must be an int, got float"):
        fk.tome_merge(x, r=2.0)
    with pytest.raises(ValueError, match=r"r=-1 is out of range"):
        fk.tome_merge(x, r=-1)
    with pytest.raises(ValueError, match=r"protected=11 is out of range; expected \[0, 10\]"):
        fk.tome_merge(x, r=0, protected=11)
    with pytest.raises(ValueError, match=r"metric must have shape \(2, 10, D\).*got \(2, 9, 3\)"):
        fk.tome_merge(x, r=1, metric=x[:, :9])
    with pytest.raises(TypeError, match="metric has dtype torch.int64"):
        fk.tome_merge(x, r=1, metric=x.long())
    with pytest.raises(ValueError, match=r"size must have shape \(2, 10\), got \(2, 10, 1\)"):
        fk.tome_merge(x, r=1, size=torch.ones(2, 10, 1, device=DEVICE))
    with pytest.raises(ValueError, match=r"backend='fast' is not a backend"):
        fk.tome_merge(x, r=1, backend="fast")
    with pytest.raises(ValueError, match=r"tome_match needs at least 2 tokens.*protected=9"):
        fk.tome_match(x, protected=9)
    if not ON_GPU:
        with pytest.raises(fk.BackendUnavailableError, match="tome_merge: backend='cuda'"):
            fk.tome_merge(x, r=1, backend="cuda")


@pytest.mark.slow
@settings(max_examples=12, deadline=None)
@given(
    b=st.integers(1, 3),
    t=st.integers(1, 30),
    c=st.integers(1, 40),
    data=st.data(),
)
def test_fuzz_vs_reference(b, t, c, data):
    backend = runnable_backends(DEVICE)[0]
    protected = data.draw(st.integers(0, t), label="protected")
    max_r = (t - protected + 1) // 2 if t - protected >= 2 else 0
    r = data.draw(st.integers(0, max_r), label="r")
    x = torch.randn(b, t, c, device=DEVICE)
    metric = _int_metric(b, t, c)
    size = _sizes(b, t) if data.draw(st.booleans(), label="sizes") else None
    _check_merge(backend, x, metric, size, r, protected)


@pytest.mark.slow
@pytest.mark.skipif(not ON_GPU, reason="real tile batches (13x256x4096, 104x1024x1024) take minutes under the Triton interpreter")
@pytest.mark.parametrize("shape", GPU_SHAPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_real_shapes_gpu(backend, shape):
    backend = _backend(backend)
    b, t, c = shape
    x = torch.randn(b, t, c, device=DEVICE, dtype=torch.bfloat16)
    metric = _int_metric(b, t, c, torch.bfloat16, -2, 3)
    _check_merge(backend, x, metric, None, t // 2, 0)


def _ext():
    from fcot_kernels import cuda as ext

    built, reason = ext.status()
    if not built:
        pytest.skip(f"extension not built: {reason}")
    return ext.load()


@pytest.mark.parametrize(
    "op, change, match",
    [
        ("tome_match", dict(dtype=5), "dtype code 5"),
        ("tome_match", dict(tokens=0), "tome_match: sizes must be positive"),
        ("tome_match", dict(protected_tokens=7), r"protected=7 must be in \[0, tokens - 2\] \(tokens=8\)"),
        ("tome_match", dict(batch=70000), "batch=70000 exceeds the grid's y limit"),
        ("tome_match", dict(metric=0), "metric is a null pointer"),
        ("tome_match", dict(eps=1e-50), "must be > 0 in fp32"),
        ("tome_match", dict(stride_t=-1), "negative strides"),
        ("tome_merge_fwd", dict(tokens_out=9), r"tokens_out=9 must be in \[1, tokens=8\]"),
        ("tome_merge_fwd", dict(channels=1 << 40), "exceeds the kernel's int32 indexing"),
        ("tome_merge_fwd", dict(offsets=0), "offsets is a null pointer"),
        ("tome_merge_bwd", dict(tokens_out=0), r"tokens_out=0 must be in \[1, tokens=8\]"),
        ("tome_merge_bwd", dict(source=0), "source is a null pointer"),
    ],
)
def test_cuda_bindings_validate(op, change, match):
    # The pybind11 boundary checks everything before any CUDA call: testable without a GPU.
    mod = _ext()
    ptr = 1 << 20
    args = {
        "tome_match": dict(dtype=0, batch=2, tokens=8, channels=4, protected_tokens=1, stride_b=32, stride_t=4,
                           metric=ptr, score=ptr, index=ptr, eps=1e-12, stream=0),
        "tome_merge_fwd": dict(dtype=2, batch=2, tokens=8, tokens_out=5, channels=4, stride_b=32, stride_t=4,
                               x=ptr, size=ptr, order=ptr, offsets=ptr, out=ptr, out_size=ptr, stream=0),
        "tome_merge_bwd": dict(dtype=1, batch=2, tokens=8, tokens_out=5, channels=4, dy=ptr, size=ptr,
                               out_size=ptr, source=ptr, dx=ptr, stream=0),
    }[op]
    args.update(change)
    with pytest.raises(ValueError, match=match):
        getattr(mod, op)(**args)


# ----------------------------------------------------------------------------- real-valued near ties (issue 13)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_real_valued_near_ties_follow_the_match_contract(backend, dtype):
    """Real-valued metrics (not integers): scores differ between backends by summation order
    only, so every backend meets the one contract of ``score_tolerance``: scores within the
    tolerance, near-ties resolved to a candidate tied up to it, clear winners picked exactly."""
    backend = _backend(backend)
    from fcot_kernels.testing import assert_match_contract

    g = torch.Generator(device="cpu").manual_seed(13)
    base = torch.randn(2, 8, 96, generator=g)
    # Each base vector appears several times with a tiny perturbation: the A tokens' best B
    # candidates are near-ties (cosines 1e-7..1e-5 apart); the other rows are random (clear).
    metric = torch.randn(2, 121, 96, generator=g)
    for t in range(1, 81):
        metric[:, t] = base[:, t % 8] * (1 + 0.1 * (t % 3)) + 1e-4 * torch.randn(2, 96, generator=g)
    metric = metric.to(DEVICE).to(dtype)
    score, index = fk.tome_match(metric, protected=1, backend=backend)
    counts = assert_match_contract(score, index, metric, protected=1)
    assert counts["clear"] > 0 and counts["near_ties"] > 0, counts  # both kinds of row were exercised
    ref_score, ref_index = fk.tome_match(metric, protected=1, backend="reference")
    assert_match_contract(ref_score, ref_index, metric, protected=1)


# --- every tensor argument in every layout (issue 9) ------------------------------------------


@pytest.mark.parametrize("layout", ["strided", "offset", "transposed", "expanded"])
@pytest.mark.parametrize("arg", ["x", "metric", "size"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_tensor_argument_in_every_layout(backend, arg, layout):
    """x, metric and size as non-contiguous, offset, column-major or stride-0 views: the same
    matching (exactly), merge and gradient as the reference on the same views; tome_match too."""
    from fcot_kernels.testing import as_layout

    backend = _backend(backend)
    values = {"x": torch.randn(2, 21, 8, device=DEVICE), "metric": _int_metric(2, 21, 6), "size": _sizes(2, 21)}
    res = {}
    dy = None
    for name in ("reference", backend):
        args = {k: as_layout(v, layout if k == arg else "contiguous") for k, v in values.items()}
        args["x"].requires_grad_()
        with fk.poison_outputs():
            merged, msize, source = fk.tome_merge(args["x"], r=7, metric=args["metric"], size=args["size"], protected=1, backend=name)
            score, index = fk.tome_match(args["metric"], protected=1, backend=name)
        dy = torch.randn_like(merged) if dy is None else dy
        merged.backward(dy)
        res[name] = (merged.detach(), msize, source, score, index, args["x"].grad)
    ref = res["reference"]
    assert torch.equal(res[backend][2], ref[2]) and torch.equal(res[backend][4], ref[4]), "matching differs"
    assert torch.equal(res[backend][3], ref[3]), "scores differ"
    for got, want, what in zip(res[backend], ref, ("merged", "merged_size", "source", "score", "index", "dx")):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_row_power_of_two_scales_change_nothing(backend, dtype):
    # Each row scaled by its own power of two from 2**-120 to 2**120 (the Triton match finds
    # each row's scale in-kernel; the CUDA one gets unit_scale_rows' copy): cosine similarity is
    # per-row scale invariant and the scaling exact, so matches and scores equal the unscaled
    # integer metric's bit for bit. Includes an all-zero row (scores 0 against everything).
    _backend(backend)
    metric = _int_metric(2, 41, 24, dtype=torch.float32)
    metric[1, 5] = 0
    powers = torch.randint(-120, 121, (2, 41, 1), device=DEVICE).float()
    scaled = (metric * torch.exp2(powers)).to(dtype)
    assert torch.equal(scaled.float() * torch.exp2(-powers), metric)  # exactly representable
    score0, index0 = tome_match_ref(metric, protected=1)
    score, index = fk.tome_match(scaled, protected=1, backend=backend)
    assert torch.equal(index, index0)
    torch.testing.assert_close(score, score0, atol=0, rtol=0)
