"""fused_linear_distill: loss and every gradient against the full-logits reference, memory
(no (N, V) tensor), edge cases and bad input. Triton runs under the interpreter on a CPU."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import fcot_kernels as fk
from fcot_kernels.reference import divergence_ref, fused_linear_distill_ref
from fcot_kernels.testing import assert_close, assert_matches_reference, runnable_backends

from ...conftest import DEVICE, ON_GPU

BACKENDS = runnable_backends(DEVICE, has_cuda=False)
needs_triton = pytest.mark.skipif(not BACKENDS, reason="triton can run neither on a GPU nor under the interpreter here")
IGNORE = -100


def make_inputs(n, h, v, dtype, *, bias=True, trainable=True, ignore_every=3, h_teacher=None, seed_labels=True):
    """Correlated student/teacher hidden states (like a student distilled from its teacher), a
    head whose logits have a spread of a few units, and labels with every ``ignore_every``-th
    token ignored (0: none)."""
    xs = torch.randn(n, h, device=DEVICE)
    if h_teacher is None:
        xt = xs + 0.7 * torch.randn(n, h, device=DEVICE)
    else:
        xt = torch.randn(n, h_teacher, device=DEVICE)
    w = 2.0 * torch.randn(v, h, device=DEVICE) / math.sqrt(h)
    b = 0.5 * torch.randn(v, device=DEVICE) if bias else None
    labels = torch.randint(0, v, (n,), device=DEVICE) if seed_labels else None
    if labels is not None and ignore_every:
        labels[::ignore_every] = IGNORE
    xs = xs.to(dtype).requires_grad_()
    w = w.to(dtype).requires_grad_(trainable)
    b = b.to(dtype).requires_grad_(trainable) if b is not None else None
    return xs, xt.to(dtype), w, b, labels


def loss_and_grads(fn, xs, xt, w, b, *, upstream=1.0, **kw):
    """The loss and the gradients of every input that requires grad (None for the others)."""
    loss = fn(xs, xt, w, b, **kw)
    params = [t for t in (xs, w, b) if t is not None and t.requires_grad]
    grads = iter(torch.autograd.grad(loss, params, torch.tensor(upstream, device=loss.device))) if params else iter(())
    return loss.detach(), [next(grads) if t is not None and t.requires_grad else None for t in (xs, w, b)]


def kernel(backend, chunk_size):
    def fn(*args, **kw):
        with fk.poison_outputs():
            return fk.fused_linear_distill(*args, chunk_size=chunk_size, backend=backend, **kw)
    return fn


def fp32_copy(*tensors):
    return [None if t is None else t.detach().float().requires_grad_(t.requires_grad) for t in tensors]


def check_loss(loss, exact_loss, eager_loss, dtype):
    """The loss is fp32 whatever the inputs: judge it by the input dtype's rule (tight for fp32,
    at most 2x eager's error plus an ulp for fp16/bf16)."""
    if dtype == torch.float32:
        assert_close(loss, exact_loss, name="loss")
        return
    err, eager_err = (loss - exact_loss).abs().item(), (eager_loss - exact_loss).abs().item()
    ulp = torch.finfo(dtype).eps * max(exact_loss.abs().item(), 1e-6)
    assert err <= 2 * eager_err + ulp, f"loss: error {err:.3e} > 2x eager {dtype} error {eager_err:.3e} + {ulp:.3e}"


def check_against_reference(backend, chunk, xs, xt, w, b, *, names=("student_hidden", "weight", "bias"), **kw):
    """fp32: tight against the fp32 reference; fp16/bf16: at most 2x the error of eager
    PyTorch in the same dtype (both against the reference on fp32 copies of the inputs)."""
    loss, grads = loss_and_grads(kernel(backend, chunk), xs, xt, w, b, **kw)
    exact_loss, exact_grads = loss_and_grads(fused_linear_distill_ref, *fp32_copy(xs, xt, w, b), upcast=True, **kw)
    eager_loss, eager_grads = (None, [None] * 3)
    if xs.dtype != torch.float32:
        eager_loss, eager_grads = loss_and_grads(fused_linear_distill_ref, xs, xt, w, b, **kw)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    check_loss(loss, exact_loss, eager_loss, xs.dtype)
    for name, g, ge, gx, t in zip(names, grads, exact_grads, eager_grads, (xs, w, b)):
        if t is None or not t.requires_grad:
            assert g is None
            continue
        assert g.dtype == t.dtype and g.shape == t.shape, name
        assert_matches_reference(g, ge.to(g.dtype) if g.dtype == torch.float32 else ge, gx, name=f"d{name}")
    return loss, grads


CASES = [
    (div, temp, beta)
    for div in ("forward_kl", "reverse_kl", "jsd")
    for temp in (1.0, 2.0)
    for beta in ((0.1, 0.5) if div == "jsd" else (0.5,))
]


@needs_triton
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("div,temperature,beta", CASES)
def test_matches_reference(backend, dtype, div, temperature, beta):
    # N = 37 is not a multiple of the chunk (16); V = 1000 is not a power of two nor of the block.
    xs, xt, w, b, labels = make_inputs(37, 24, 1000, dtype)
    check_against_reference(
        backend, 16, xs, xt, w, b, labels=labels, temperature=temperature, divergence=div, beta=beta,
        kl_weight=1.5, ce_weight=0.7,
    )


@needs_triton
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("div", ["forward_kl", "jsd"])
def test_frozen_head_and_separate_teacher_head(backend, dtype, div):
    """A frozen head gives only d(student_hidden); the teacher has its own head and width."""
    xs, xt, w, b, labels = make_inputs(29, 16, 333, dtype, trainable=False, h_teacher=40)
    tw = (2.0 * torch.randn(333, 40, device=DEVICE) / math.sqrt(40)).to(dtype)
    tb = torch.randn(333, device=DEVICE).to(dtype)
    _, grads = check_against_reference(
        backend, 8, xs, xt, w, b, labels=labels, teacher_weight=tw, teacher_bias=tb, temperature=2.0,
        divergence=div, ce_weight=0.3,
    )
    assert grads[1] is None and grads[2] is None


@needs_triton
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_no_labels_no_bias_sum_and_upstream_gradient(backend, reduction):
    """All tokens count without labels; the upstream gradient scales every gradient."""
    xs, xt, w, _, _ = make_inputs(21, 16, 517, torch.float32, bias=False, seed_labels=False)
    check_against_reference(
        backend, 5, xs, xt, w, None, reduction=reduction, divergence="reverse_kl", temperature=1.5, upstream=-2.5,
    )


@needs_triton
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("div", ["forward_kl", "reverse_kl", "jsd"])
def test_all_tokens_ignored_gives_zero_not_nan(backend, reduction, div):
    xs, xt, w, b, labels = make_inputs(19, 8, 130, torch.float32)
    labels.fill_(IGNORE)
    loss, grads = loss_and_grads(
        kernel(backend, 7), xs, xt, w, b, labels=labels, divergence=div, ce_weight=1.0, reduction=reduction
    )
    ref_loss, _ = loss_and_grads(fused_linear_distill_ref, xs, xt, w, b, labels=labels, divergence=div, ce_weight=1.0)
    assert loss.item() == 0.0 and ref_loss.item() == 0.0
    for g in grads:
        assert torch.equal(g, torch.zeros_like(g))


@needs_triton
@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_rows_get_zero_gradient_and_do_not_count(backend):
    """Mean over counted tokens only: appending ignored rows changes neither the loss nor the
    gradients of the counted rows; the ignored rows' gradients are exactly zero."""
    xs, xt, w, b, labels = make_inputs(23, 16, 257, torch.float32, ignore_every=0)
    extra = make_inputs(9, 16, 257, torch.float32)[:2]
    kw = dict(divergence="jsd", beta=0.1, ce_weight=0.5)
    loss, grads = loss_and_grads(kernel(backend, 6), xs, xt, w, b, labels=labels, **kw)
    xs2 = torch.cat([xs.detach(), extra[0].detach()]).requires_grad_()
    labels2 = torch.cat([labels, torch.full((9,), IGNORE, device=DEVICE)])
    loss2, grads2 = loss_and_grads(kernel(backend, 6), xs2, torch.cat([xt, extra[1]]), w, b, labels=labels2, **kw)
    assert_close(loss2, loss, name="loss")
    assert_close(grads2[0][:23], grads[0], name="dstudent_hidden")
    assert torch.equal(grads2[0][23:], torch.zeros_like(grads2[0][23:]))
    assert_close(grads2[1], grads[1], name="dweight")


@pytest.mark.slow
@needs_triton
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("v,dtype", [(92553, torch.float32), (151655, torch.float32), (92553, torch.bfloat16)])
def test_real_vocab_sizes(backend, v, dtype):
    """The InternLM2 and Qwen2 vocabularies at tiny N and H: many vocab blocks, a ragged last
    one; in bf16 the d(weight) accumulation goes through several vocab-blocked temporaries."""
    xs, xt, w, b, labels = make_inputs(5, 4, v, dtype, ignore_every=4)
    check_against_reference(backend, 2, xs, xt, w, b, labels=labels, divergence="jsd", temperature=2.0, ce_weight=1.0)


@needs_triton
@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_forward_and_default_chunk(backend):
    """Under no_grad no gradient is computed and the loss is the same; default chunk size;
    int32 labels."""
    xs, xt, w, b, labels = make_inputs(40, 16, 300, torch.float32)
    labels = labels.int()
    kw = dict(labels=labels, divergence="reverse_kl", ce_weight=0.4)
    with torch.no_grad(), fk.poison_outputs():
        loss = fk.fused_linear_distill(xs, xt, w, b, backend=backend, **kw)
    assert not loss.requires_grad
    assert_close(loss, fused_linear_distill_ref(xs, xt, w, b, **kw), name="loss")


@needs_triton
@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    xs, xt, w, b, labels = make_inputs(0, 8, 50, torch.float32)
    loss, grads = loss_and_grads(kernel(backend, 4), xs, xt, w, b, labels=labels, ce_weight=1.0)
    assert loss.item() == 0.0
    assert grads[0].shape == (0, 8) and torch.equal(grads[1], torch.zeros_like(grads[1]))


@pytest.mark.slow
@needs_triton
@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=12, deadline=None)
@given(
    n=st.integers(1, 40),
    h=st.integers(1, 20),
    v=st.integers(1, 1100),
    chunk=st.integers(1, 48),
    div=st.sampled_from(["forward_kl", "reverse_kl", "jsd"]),
    temperature=st.sampled_from([0.5, 1.0, 2.0, 3.7]),
    beta=st.floats(0.0, 1.0),
    ce_weight=st.sampled_from([0.0, 1.0]),
    ignore_every=st.sampled_from([0, 1, 2, 5]),
    bias=st.booleans(),
)
def test_fuzz_shapes(backend, n, h, v, chunk, div, temperature, beta, ce_weight, ignore_every, bias):
    xs, xt, w, b, labels = make_inputs(n, h, v, torch.float32, bias=bias, ignore_every=ignore_every)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # beta/jsd no-op warnings are tested elsewhere
        check_against_reference(
            backend, chunk, xs, xt, w, b, labels=labels, divergence=div, temperature=temperature,
            beta=beta, ce_weight=ce_weight,
        )


class _RecordNumel(TorchDispatchMode):
    """Records the largest number of elements of any tensor an aten op produces."""

    def __init__(self):
        super().__init__()
        self.largest = (0, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.numel() > self.largest[0]:
                self.largest = (t.numel(), (str(func), tuple(t.shape)))
        return out


@needs_triton
@pytest.mark.parametrize("backend", BACKENDS)
def test_never_allocates_full_logits(backend):
    """Forward + backward with a trainable head: no tensor of N * V elements is ever produced
    (every aten op's outputs are recorded); the reference, recorded the same way, does."""
    n, h, v, chunk = 384, 16, 1000, 32
    xs, xt, w, b, labels = make_inputs(n, h, v, torch.float32)
    kw = dict(labels=labels, divergence="jsd", ce_weight=1.0, temperature=2.0)
    with _RecordNumel() as rec:
        loss_and_grads(kernel(backend, chunk), xs, xt, w, b, **kw)
    assert rec.largest[0] < n * v // 4, f"largest tensor {rec.largest} for N*V={n * v}"
    assert rec.largest[0] <= max(chunk * v, v * h, n * h), rec.largest
    with _RecordNumel() as ref_rec:
        loss_and_grads(fused_linear_distill_ref, xs, xt, w, b, **kw)
    assert ref_rec.largest[0] >= n * v, "the recorder missed the reference's full logits"


@pytest.mark.skipif(not ON_GPU, reason="measures CUDA peak memory, which only a GPU run has")
@pytest.mark.parametrize("v", [92553, 151655])
def test_gpu_peak_memory_follows_the_formula(v):
    """On a GPU at a moderate size: the loss and gradients match the reference, and the peak
    memory of forward + backward stays within the documented formula, far below one (N, V)."""
    n, h, chunk, b = 4096, 256, 256, 2
    xs, xt, w, bias, labels = make_inputs(n, h, v, torch.bfloat16)
    kw = dict(labels=labels, divergence="jsd", ce_weight=1.0, temperature=2.0)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    loss, grads = loss_and_grads(kernel("triton", chunk), xs, xt, w, bias, **kw)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    formula = 2 * chunk * v * b + n * h * b + 4 * v * h + 4 * v + min(v, 16384) * h * b + 4 * n
    # Slack for the returned gradients in the weight dtype and cuBLAS workspaces.
    assert peak <= 1.2 * formula + v * h * b + (32 << 20), f"peak {peak / 2**20:.0f} MiB vs formula {formula / 2**20:.0f} MiB"
    assert peak < n * v * b / 4, f"peak {peak / 2**20:.0f} MiB is not far below one (N, V) bf16 tensor"
    exact_loss, exact_grads = loss_and_grads(fused_linear_distill_ref, *fp32_copy(xs, xt, w, bias), upcast=True, **kw)
    eager_loss, eager_grads = loss_and_grads(fused_linear_distill_ref, xs, xt, w, bias, **kw)
    check_loss(loss, exact_loss, eager_loss, torch.bfloat16)
    for name, g, ge, gx in zip(("dstudent_hidden", "dweight", "dbias"), grads, exact_grads, eager_grads):
        assert_matches_reference(g, ge, gx, name=name)


@needs_triton
@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_op_registration(backend):
    """Schema, fake (meta) implementation and autograd registration agree with the real op."""
    from fcot_kernels.ops.fused_linear_distill import _fld_fwd

    xs, xt, w, b, labels = make_inputs(11, 8, 70, torch.float32)
    args = (xs, xt, w, b, None, None, labels, 2.0, 1.0, 0.5, "jsd", 0.3, IGNORE, True, 4, True, True, True, backend)
    torch.library.opcheck(_fld_fwd, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_reference_matches_the_definitions():
    """The reference against the formulas of the issue written out by hand, on probabilities."""
    z_s, z_t = torch.randn(6, 40, dtype=torch.float64), torch.randn(6, 40, dtype=torch.float64)
    p, q = F.softmax(z_t, -1), F.softmax(z_s, -1)
    beta = 0.3
    m = beta * p + (1 - beta) * q
    expect = {
        "forward_kl": (p * (p / q).log()).sum(-1),
        "reverse_kl": (q * (q / p).log()).sum(-1),
        "jsd": beta * (p * (p / m).log()).sum(-1) + (1 - beta) * (q * (q / m).log()).sum(-1),
    }
    for div, value in expect.items():
        torch.testing.assert_close(divergence_ref(p.log(), q.log(), div, beta), value)
    # Weights, temperature scaling and the mean over counted tokens, with an identity head.
    labels = torch.tensor([1, IGNORE, 3, 0, IGNORE, 7])
    loss = fused_linear_distill_ref(
        z_s * 2, z_t * 2, torch.eye(40, dtype=torch.float64), labels=labels, temperature=2.0, kl_weight=0.5,
        ce_weight=0.25,
    )
    counted = labels != IGNORE
    kl = expect["forward_kl"][counted].mean()
    ce = F.cross_entropy(z_s[counted] * 2, labels[counted])
    torch.testing.assert_close(loss, (0.5 * 4 * kl + 0.25 * ce).float())


def _call(**overrides):
    xs, xt, w, b, labels = make_inputs(6, 8, 20, torch.float32)
    kw = dict(student_hidden=xs, teacher_hidden=xt, weight=w, bias=b, labels=labels, backend="reference")
    kw.update(overrides)
    return fk.fused_linear_distill(kw.pop("student_hidden"), kw.pop("teacher_hidden"), kw.pop("weight"), kw.pop("bias"), **kw)


@pytest.mark.parametrize(
    "overrides,error,match",
    [
        (dict(teacher_hidden=torch.randn(5, 8)), ValueError, r"teacher_hidden has 5 rows but student_hidden has 6"),
        (dict(teacher_hidden=torch.randn(6, 9)), ValueError, r"teacher_hidden has width 9 but weight expects H=8"),
        (dict(weight=torch.randn(20, 7)), ValueError, r"weight has shape \(20, 7\); expected \(V, H=8\)"),
        (dict(bias=torch.randn(21)), ValueError, r"bias must have shape \(20,\)"),
        (dict(labels=torch.tensor([0, 1, 20, 3, 4, 5])), ValueError, r"labels\[2\]=20 is outside \[0, V=20\)"),
        (dict(labels=torch.tensor([0, 1, 2, -1, 4, 5])), ValueError, r"labels\[3\]=-1 is outside"),
        (dict(labels=torch.zeros(6)), TypeError, r"labels has dtype torch.float32"),
        (dict(labels=torch.zeros(5, dtype=torch.long)), ValueError, r"labels must have shape \(6,\)"),
        (dict(temperature=0.0), ValueError, r"temperature=0.0 must be > 0"),
        (dict(temperature=-1), ValueError, r"temperature=-1 must be > 0"),
        (dict(beta=1.5, divergence="jsd"), ValueError, r"beta=1.5 must be in \[0.0, 1.0\]"),
        (dict(beta=-0.1, divergence="jsd"), ValueError, r"beta=-0.1 must be in"),
        (dict(divergence="kl"), ValueError, r"divergence='kl' is not supported"),
        (dict(reduction="none"), ValueError, r"reduction='none' is not supported"),
        (dict(kl_weight=-1.0), ValueError, r"kl_weight=-1.0 must be in"),
        (dict(ce_weight=1.0, labels=None), ValueError, r"ce_weight=1.0 needs labels"),
        (dict(chunk_size=0), ValueError, r"chunk_size=0 must be >= 1"),
        (dict(teacher_hidden=torch.randn(6, 8, dtype=torch.float64)), TypeError, r"teacher_hidden has dtype torch.float64"),
        (dict(weight=torch.randn(20, 8, dtype=torch.bfloat16)), TypeError, r"weight has dtype torch.bfloat16 but student_hidden has torch.float32"),
        (dict(teacher_bias=torch.randn(20)), ValueError, r"teacher_bias was given without teacher_weight"),
        (dict(teacher_weight=torch.randn(20, 5)), ValueError, r"teacher_weight must have shape \(20, 8\)"),
        (dict(student_hidden=torch.randn(6)), ValueError, r"student_hidden must have 2 dimensions"),
        (dict(backend="cuda"), fk.BackendUnavailableError, r"fused_linear_distill: has no CUDA C\+\+ kernel"),
    ],
)
def test_bad_input(overrides, error, match):
    with pytest.raises(error, match=match):
        _call(**overrides)


@pytest.mark.skipif(not ON_GPU, reason="a device mismatch needs a second device (a GPU)")
def test_device_mismatch():
    with pytest.raises(ValueError, match=r"teacher_hidden is on cpu but student_hidden is on cuda"):
        _call(teacher_hidden=torch.randn(6, 8))


def test_no_op_flags_warn():
    with pytest.warns(UserWarning, match=r"beta=0.2 has no effect unless divergence='jsd'"):
        _call(beta=0.2)
    with pytest.warns(UserWarning, match=r"divergence='jsd' with beta=0.0 is identically 0"):
        _call(beta=0.0, divergence="jsd")
    with pytest.warns(UserWarning, match=r"ignore_index=-1 has no effect without labels"):
        _call(labels=None, ignore_index=-1)
    with pytest.warns(UserWarning, match=r"chunk_size has no effect on the reference backend"):
        _call(chunk_size=4)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf inputs under the interpreter
@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_debug_finite_flag(backend, monkeypatch):
    xs, xt, w, b, labels = make_inputs(6, 8, 20, torch.float32)
    xt = xt.clone()
    xt[4, 2] = float("inf")
    monkeypatch.delenv("FCOT_DEBUG_FINITE", raising=False)
    fk.fused_linear_distill(xs, xt, w, b, labels=labels, backend=backend)  # off by default: no check
    monkeypatch.setenv("FCOT_DEBUG_FINITE", "1")
    with pytest.raises(ValueError, match=r"teacher_hidden has 1 non-finite element\(s\) \(first at index \(4, 2\)"):
        fk.fused_linear_distill(xs, xt, w, b, labels=labels, backend=backend)
    fk.fused_linear_distill(xs, xt.nan_to_num(posinf=0.0), w, b, labels=labels, backend=backend)


# ----------------------------------------------------------------------------- compiled-code fixes (issue 13)


def test_dw_accumulates_the_product_without_rounding_it():
    """d(weight) chunks are summed in fp32 without rounding each chunk's product to bf16 first."""
    from fcot_kernels.triton.fused_linear_distill import _accumulate_dw

    g = torch.Generator().manual_seed(0)
    dz = torch.randn(64, 48, generator=g).to(torch.bfloat16)
    x = torch.randn(64, 32, generator=g).to(torch.bfloat16)
    exact = dz.double().t() @ x.double()
    acc = torch.zeros(48, 32)
    _accumulate_dw(acc, dz, x, block=16)
    rounded = (dz.t() @ x).float()  # what a bf16 product accumulated in fp32 gives
    err = (acc.double() - exact).abs().max().item()
    err_rounded = (rounded.double() - exact).abs().max().item()
    assert err < 1e-4, err
    assert err_rounded > 20 * err, (err, err_rounded)  # the check can tell the two apart


@needs_triton
@pytest.mark.parametrize("div", ["forward_kl", "jsd"])
def test_padded_logits_rows_match_contiguous_and_ignore_the_padding(div):
    """The kernel on (R, V) views of (R, padded) buffers (the launcher's 16-byte-aligned rows, V
    odd) gives the same loss and gradient as on contiguous rows; NaN in the padding never leaks."""
    from fcot_kernels.triton import fused_linear_distill as T

    r, v = 5, 75
    vp = T.padded_width(v)
    assert vp % 64 == 0 and vp >= v
    zs = torch.randn(r, v, device=DEVICE)
    zt = torch.randn(r, v, device=DEVICE)
    labels = torch.randint(0, v, (r,), device=DEVICE)
    outs = []
    for padded in (False, True):
        if padded:
            bs = torch.full((r, vp), float("nan"), device=DEVICE)
            bt = torch.full((r, vp), float("nan"), device=DEVICE)
            s, t = bs[:, :v], bt[:, :v]
            s.copy_(zs)
            t.copy_(zt)
        else:
            s, t = zs.clone(), zt.clone()
        loss = torch.empty(r, device=DEVICE)
        count = torch.full((1,), r, dtype=torch.int64, device=DEVICE)
        T.logits_pass(s, t, labels, count, loss, temperature=2.0, kl_weight=1.0, ce_weight=0.5, divergence=div,
                      beta=0.5, ignore_index=IGNORE, mean=True, compute_grad=True)
        outs.append((loss, s.clone()))
    assert torch.isfinite(outs[1][0]).all() and torch.isfinite(outs[1][1]).all()
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(outs[1][1], outs[0][1], rtol=1e-6, atol=1e-6)


# --- every tensor argument in every layout (issue 9) ------------------------------------------


@needs_triton
@pytest.mark.parametrize("layout", ["strided", "offset", "transposed", "expanded"])
@pytest.mark.parametrize("arg", ["student_hidden", "teacher_hidden", "weight", "bias", "teacher_weight", "teacher_bias", "labels"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_tensor_argument_in_every_layout(backend, arg, layout):
    """Each tensor argument as a non-contiguous, offset, column-major or stride-0 view (labels
    were read without their stride: labels[::2] or an expanded label gave a wrong loss): the
    loss and every gradient equal the reference's on the same views."""
    from fcot_kernels.testing import as_layout

    xs, xt, w, b, labels = make_inputs(12, 16, 24, torch.float32)
    values = {"student_hidden": xs, "teacher_hidden": xt, "weight": w, "bias": b, "labels": labels,
              "teacher_weight": w + 0.1 * torch.randn_like(w), "teacher_bias": b + 0.1}
    res = {}
    for name in ("reference", backend):
        a = {k: as_layout(v, layout if k == arg else "contiguous") for k, v in values.items()}
        leaves = [a[k].requires_grad_() for k in ("student_hidden", "weight", "bias")]
        with fk.poison_outputs():
            loss = fk.fused_linear_distill(
                *leaves[:1], a["teacher_hidden"], *leaves[1:], teacher_weight=a["teacher_weight"], teacher_bias=a["teacher_bias"],
                labels=a["labels"], ce_weight=0.5, divergence="jsd", temperature=2.0, backend=name,
                **({"chunk_size": 5} if name != "reference" else {}),
            )
        res[name] = [loss.detach(), *torch.autograd.grad(loss, leaves)]
    for got, want, what in zip(res[backend], res["reference"], ("loss", "dstudent_hidden", "dweight", "dbias")):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=lambda m: f"{what}: {m}")


# --- cross-entropy only (kl_weight=0, issue 19): no teacher work, forward or backward ----------


class _TeacherTouches(TorchDispatchMode):
    """Records every aten op that reads the storage of one of the watched tensors."""

    def __init__(self, *watched):
        super().__init__()
        self.storages = {t.untyped_storage().data_ptr() for t in watched if t is not None}
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        flat = [*args, *(kwargs or {}).values()]
        if any(isinstance(a, torch.Tensor) and a.untyped_storage().data_ptr() in self.storages for a in flat):
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _ce_oracle(xs, w, b, labels, reduction):
    """Plain PyTorch cross-entropy on fp32 full logits: an oracle independent of both backends."""
    z = F.linear(xs.detach().double(), w.detach().double(), None if b is None else b.detach().double())
    return F.cross_entropy(z, labels.long(), ignore_index=IGNORE, reduction=reduction).float()


@needs_triton
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("teacher", ["none", "given"])
def test_ce_only_matches_reference(backend, dtype, reduction, teacher):
    """kl_weight=0: loss and every gradient against the reference (fp32 tight, low precision at
    most 2x eager's error), and the loss against cross_entropy written out in float64; with or
    without a teacher the result is the same."""
    xs, xt, w, b, labels = make_inputs(37, 24, 1000, dtype)
    xt = None if teacher == "none" else xt
    loss, _ = check_against_reference(backend, 16, xs, xt, w, b, labels=labels, kl_weight=0.0, ce_weight=0.8,
                                      reduction=reduction)
    oracle = 0.8 * _ce_oracle(xs, w, b, labels, reduction)
    tol = 1e-5 if dtype == torch.float32 else 8 * torch.finfo(dtype).eps
    torch.testing.assert_close(loss, oracle, rtol=tol, atol=tol)


@needs_triton
@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_ce_only_does_no_teacher_work(backend):
    """With kl_weight=0 no aten op reads the teacher's hidden states or head (the recorder sees
    them being read when kl_weight > 0), and a NaN teacher changes nothing: 0 * NaN would be NaN
    if the divergence were computed and multiplied by 0."""
    xs, xt, w, b, labels = make_inputs(21, 16, 300, torch.float32)
    tw = torch.full_like(w.detach(), float("nan"))
    xt = torch.full_like(xt, float("nan"))
    chunk = {} if backend == "reference" else {"chunk_size": 8}
    kw = dict(labels=labels, teacher_weight=tw, ce_weight=1.0, backend=backend, **chunk)
    with _TeacherTouches(xt, tw) as rec:
        loss = fk.fused_linear_distill(xs, xt, w, b, kl_weight=0.0, **kw)
        grads = torch.autograd.grad(loss, [xs, w, b])
    assert rec.ops == [], rec.ops
    with torch.no_grad():
        clean = fk.fused_linear_distill(xs, None, w, b, labels=labels, kl_weight=0.0, ce_weight=1.0, backend=backend,
                                        **chunk)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
    assert_close(loss.detach(), clean, name="loss")
    with _TeacherTouches(xt, tw) as rec_kl, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fk.fused_linear_distill(xs, xt, w, b, kl_weight=1e-3, **kw)
    assert rec_kl.ops, "the recorder did not see the teacher being read with kl_weight > 0"


@needs_triton
def test_ce_only_kernel_never_reads_the_teacher_logits():
    """The kernel specialised for kl_weight=0 gives the same rows and gradient whether the
    teacher logits are NaN or absent (a kernel reading them would turn its log-sum-exp NaN)."""
    from fcot_kernels.triton import fused_linear_distill as T

    r, v = 7, 90
    zs = torch.randn(r, v, device=DEVICE)
    labels = torch.randint(0, v, (r,), device=DEVICE)
    labels[2] = IGNORE
    count = (labels != IGNORE).sum().reshape(1)
    outs = []
    for zt in (None, torch.full((r, v), float("nan"), device=DEVICE)):
        s, loss = zs.clone(), torch.empty(r, device=DEVICE)
        T.logits_pass(s, zt, labels, count, loss, temperature=2.0, kl_weight=0.0, ce_weight=1.0, divergence="jsd",
                      beta=0.5, ignore_index=IGNORE, mean=True, compute_grad=True)
        outs.append((loss, s))
    for got, want in zip(outs[1], outs[0]):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    counted = labels != IGNORE
    ce = F.cross_entropy(zs[counted], labels[counted], reduction="none") / counted.sum()
    torch.testing.assert_close(outs[0][0][counted], ce, rtol=1e-5, atol=1e-6)
    assert torch.equal(outs[0][0][~counted], torch.zeros(1, device=DEVICE))
    with pytest.raises(ValueError, match=r"zt=None needs kl_weight=0"):
        T.logits_pass(zs.clone(), None, labels, count, torch.empty(r, device=DEVICE), temperature=1.0, kl_weight=1.0,
                      ce_weight=1.0, divergence="forward_kl", beta=0.5, ignore_index=IGNORE, mean=True,
                      compute_grad=False)


@needs_triton
@pytest.mark.parametrize("layout", ["strided", "offset", "transposed", "expanded"])
@pytest.mark.parametrize("arg", ["student_hidden", "weight", "bias", "labels"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_ce_only_every_tensor_argument_in_every_layout(backend, arg, layout):
    """Cross-entropy only, with no teacher: every argument as a view gives the reference's loss
    and gradients on the same views."""
    from fcot_kernels.testing import as_layout

    xs, _, w, b, labels = make_inputs(12, 16, 24, torch.float32)
    values = {"student_hidden": xs, "weight": w, "bias": b, "labels": labels}
    res = {}
    for name in ("reference", backend):
        a = {k: as_layout(v, layout if k == arg else "contiguous") for k, v in values.items()}
        leaves = [a[k].requires_grad_() for k in ("student_hidden", "weight", "bias")]
        with fk.poison_outputs():
            loss = fk.fused_linear_distill(leaves[0], None, *leaves[1:], labels=a["labels"], kl_weight=0.0,
                                           ce_weight=1.0, backend=name,
                                           **({"chunk_size": 5} if name != "reference" else {}))
        res[name] = [loss.detach(), *torch.autograd.grad(loss, leaves)]
    for got, want, what in zip(res[backend], res["reference"], ("loss", "dstudent_hidden", "dweight", "dbias")):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=lambda m: f"{what}: {m}")


@needs_triton
@pytest.mark.parametrize("backend", BACKENDS)
def test_ce_only_custom_op_registration(backend):
    from fcot_kernels.ops.fused_linear_distill import _fld_fwd

    xs, _, w, b, labels = make_inputs(11, 8, 70, torch.float32)
    args = (xs, None, w, b, None, None, labels, 1.0, 0.0, 1.0, "forward_kl", 0.5, IGNORE, True, 4, True, True, True,
            backend)
    torch.library.opcheck(_fld_fwd, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(teacher_hidden=None), r"teacher_hidden=None needs kl_weight=0 \(cross-entropy only\), got kl_weight=1.0"),
        (dict(teacher_hidden=None, kl_weight=0.0, ce_weight=1.0, teacher_weight=torch.randn(20, 8)),
         r"teacher_weight was given without teacher_hidden"),
        (dict(teacher_hidden=None, kl_weight=0.0, ce_weight=1.0, teacher_bias=torch.randn(20)),
         r"teacher_bias was given without teacher_hidden"),
    ],
)
def test_ce_only_bad_input(overrides, match):
    with pytest.raises(ValueError, match=match):
        _call(**overrides)


def test_ce_only_no_op_flags_warn():
    with pytest.warns(UserWarning, match=r"temperature=2.0 and divergence='forward_kl' have no effect with kl_weight=0"):
        _call(teacher_hidden=None, kl_weight=0.0, ce_weight=1.0, temperature=2.0)


@needs_triton
@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_ce_only_under_torch_compile_fullgraph(backend):
    """The CE-only call (no teacher) traces as one graph, forward and backward, and gives the
    eager values."""
    xs, _, w, b, labels = make_inputs(6, 8, 37, torch.float32)
    kw = dict(labels=labels, kl_weight=0.0, ce_weight=1.0, backend=backend)

    def fn(xs, w, b):
        return fk.fused_linear_distill(xs, None, w, b, **kw)

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    got = compiled(xs, w, b)
    got_grads = torch.autograd.grad(got, [xs, w, b])
    want = fn(xs, w, b)
    want_grads = torch.autograd.grad(want, [xs, w, b])
    assert_close(got.detach(), want.detach(), name="loss")
    for g, e, name in zip(got_grads, want_grads, ("dstudent_hidden", "dweight", "dbias")):
        assert_close(g, e, name=name)
