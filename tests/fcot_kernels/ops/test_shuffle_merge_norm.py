"""shuffle_merge_norm: reference vs transformers, every kernel backend vs the reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import fcot_kernels as fk
from fcot_kernels.reference import pixel_shuffle_ref, shuffle_merge_norm_ref
from fcot_kernels.testing import assert_matches_reference, runnable_backends

from ...conftest import DEVICE, ON_GPU

BACKENDS = runnable_backends(DEVICE)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# (tiles, grid, C, merge, scale): odd tile counts and widths, non-square grids, channel counts
# that do (48, 1000, 1024) and do not (45) allow 16-byte vector access, the two real ViT
# widths; every merge window.
CASES = [
    (1, (8, 8), 48, 1, 0.5),
    (3, (8, 12), 48, 2, 0.5),
    (13, (4, 4), 40, 4, 0.5),
    (3, (8, 8), 45, 2, 0.5),
    (1, (8, 12), 1000, 4, 0.5),
    (2, (8, 8), 16, 2, 0.25),
    (1, (6, 6), 7, 1, 1.0),
    (1, (4, 8), 1024, 2, 0.5),
    (1, (4, 4), 3200, 4, 0.5),
]
if ON_GPU:
    CASES += [(13, (32, 32), 1024, 2, 0.5), (3, (32, 32), 3200, 4, 0.5), (104, (32, 32), 1024, 1, 0.5)]


def _inputs(tiles, grid, c, scale, dtype, *, requires_grad=True):
    width = round(c / scale**2)
    x = torch.randn(tiles, grid[0] * grid[1], c, device=DEVICE, dtype=dtype) * 2 + 0.5
    w = 1 + 0.5 * torch.randn(width, device=DEVICE)
    b = 0.5 * torch.randn(width, device=DEVICE)
    return x.requires_grad_(requires_grad), w.requires_grad_(requires_grad), b.requires_grad_(requires_grad)


def _case_id(case):
    tiles, grid, c, merge, scale = case
    return f"t{tiles}-g{grid[0]}x{grid[1]}-c{c}-m{merge}-s{scale}"


# --- the reference against transformers ------------------------------------------------------


@pytest.mark.parametrize("grid", [(32, 32), (16, 16), (8, 12)])
@pytest.mark.parametrize("scale", [0.5, 0.25])
def test_pixel_shuffle_ref_matches_transformers(grid, scale):
    internvl = pytest.importorskip("transformers.models.internvl.modeling_internvl")
    feats = torch.randn(3, grid[0], grid[1], 8)
    expected = internvl.InternVLModel.pixel_shuffle(None, feats, scale_factor=scale)
    torch.testing.assert_close(pixel_shuffle_ref(feats, round(1 / scale)), expected, rtol=0, atol=0)


@pytest.mark.parametrize("grid", [(32, 32), (8, 12)])
@pytest.mark.parametrize("merge", [1, 2, 4])
def test_reference_matches_transformers_shuffle_pool_layernorm(grid, merge):
    internvl = pytest.importorskip("transformers.models.internvl.modeling_internvl")
    c = 24
    x = torch.randn(3, grid[0] * grid[1], c)
    ln = torch.nn.LayerNorm(4 * c, eps=1e-6)
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    y = internvl.InternVLModel.pixel_shuffle(None, x.reshape(3, *grid, c), scale_factor=0.5)
    # Independent formulation of the merge: average pooling with kernel = stride = window.
    kernel = {1: (1, 1), 2: (1, 2), 4: (2, 2)}[merge]
    y = F.avg_pool2d(y.permute(0, 3, 1, 2), kernel).permute(0, 2, 3, 1).reshape(3, -1, 4 * c)
    expected = ln(y)
    got = shuffle_merge_norm_ref(x, grid=grid, weight=ln.weight, bias=ln.bias, merge=merge, eps=1e-6)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# --- kernels against the reference --------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_forward_and_grads_match_reference(backend, dtype, case):
    tiles, grid, c, merge, scale = case
    if dtype != torch.float32 and c > 1024 and not ON_GPU:
        pytest.skip("low-precision at the 6B width is covered on the GPU; fp32 covers it under the interpreter")
    x, w, b = _inputs(tiles, grid, c, scale, dtype)
    kw = dict(grid=grid, scale=scale, merge=merge)
    with fk.poison_outputs():
        out = fk.shuffle_merge_norm(x, weight=w, bias=b, backend=backend, **kw)
        dy = torch.randn_like(out)
        grads = torch.autograd.grad(out, (x, w, b), dy)
    assert out.dtype == dtype and out.shape == (tiles, grid[0] * grid[1] * scale**2 // merge, round(c / scale**2))

    # fp32 truth from the same (rounded) inputs, and plain PyTorch in the low precision.
    xe, we, be = (t.detach().float().requires_grad_() for t in (x, w, b))
    exact = shuffle_merge_norm_ref(xe, weight=we, bias=be, **kw)
    exact_grads = torch.autograd.grad(exact, (xe, we, be), dy.float())
    eager = eager_grads = None
    if dtype != torch.float32:
        xl, wl, bl = (t.detach().clone().requires_grad_() for t in (x, w, b))
        eager = shuffle_merge_norm_ref(xl, weight=wl.to(dtype), bias=bl.to(dtype), **kw)
        eager_grads = torch.autograd.grad(eager, (xl, wl, bl), dy)
    assert_matches_reference(out, exact, eager, name="out")
    for name, g, ge, gl in zip(("dx", "dweight", "dbias"), grads, exact_grads, eager_grads or (None,) * 3):
        assert g.dtype == (x.dtype if name == "dx" else w.dtype)
        assert_matches_reference(g, ge.to(g.dtype) if g.dtype == torch.float32 else ge, gl, name=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_input(backend):
    tiles, grid, c = 2, (8, 8), 32
    base = torch.randn(tiles, c, grid[0] * grid[1] + 3, device=DEVICE)
    x = base[:, :, 3:].transpose(1, 2).requires_grad_()  # channel stride != 1, token offset
    assert not x.is_contiguous()
    _, w, b = _inputs(tiles, grid, c, 0.5, torch.float32)
    kw = dict(grid=grid, weight=w, bias=b, merge=2)
    with fk.poison_outputs():
        out = fk.shuffle_merge_norm(x, backend=backend, **kw)
        (dx,) = torch.autograd.grad(out, (x,), torch.ones_like(out) + torch.randn_like(out))
    ref = shuffle_merge_norm_ref(x.detach().contiguous(), **kw)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert dx.shape == x.shape and torch.isfinite(dx).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_parameters(backend):
    x, _, _ = _inputs(2, (8, 8), 24, 0.5, torch.float32)
    w = torch.randn(2 * 96, device=DEVICE)[::2].requires_grad_()
    b = torch.randn(96, 3, device=DEVICE)[:, 1].requires_grad_()
    assert not w.is_contiguous() and not b.is_contiguous()
    kw = dict(grid=(8, 8), weight=w, bias=b, merge=2)
    out = fk.shuffle_merge_norm(x, backend=backend, **kw)
    dy = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, w, b), dy)
    ref = shuffle_merge_norm_ref(x, **kw)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    for g, e in zip(got, torch.autograd.grad(ref, (x, w, b), dy)):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=2e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_input_gives_only_parameter_grads(backend):
    x, w, b = _inputs(3, (8, 8), 24, 0.5, torch.float32)
    x.requires_grad_(False)
    out = fk.shuffle_merge_norm(x, grid=(8, 8), weight=w, bias=b, merge=4, backend=backend)
    out.sum().backward()
    assert x.grad is None
    ref_w, ref_b = w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    shuffle_merge_norm_ref(x, grid=(8, 8), weight=ref_w, bias=ref_b, merge=4).sum().backward()
    torch.testing.assert_close(w.grad, ref_w.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(b.grad, ref_b.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_activations_with_fp32_parameters(backend):
    x, w, b = _inputs(2, (8, 8), 40, 0.5, torch.bfloat16)
    out = fk.shuffle_merge_norm(x, grid=(8, 8), weight=w, bias=b, merge=2, backend=backend)
    dw, db = torch.autograd.grad(out.float().sum(), (w, b))
    assert out.dtype == torch.bfloat16 and dw.dtype == db.dtype == torch.float32
    exact = shuffle_merge_norm_ref(x.detach().float(), grid=(8, 8), weight=w, bias=b, merge=2)
    eager = shuffle_merge_norm_ref(x.detach(), grid=(8, 8), weight=w, bias=b, merge=2)
    assert_matches_reference(out, exact, eager)


@pytest.mark.slow
@pytest.mark.skipif(not BACKENDS, reason="no kernel backend can run here")
@settings(max_examples=25, deadline=None)
@given(
    tiles=st.integers(1, 3),
    cells=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    c=st.integers(1, 70),
    merge=st.sampled_from([1, 2, 4]),
    r=st.sampled_from([1, 2]),
)
def test_fuzz_shapes_against_reference(tiles, cells, c, merge, r):
    mh, mw = {1: (1, 1), 2: (1, 2), 4: (2, 2)}[merge]
    grid = (cells[0] * r * mh, cells[1] * r * mw)
    x, w, b = _inputs(tiles, grid, c, 1 / r, torch.float32)
    kw = dict(grid=grid, weight=w, bias=b, scale=1 / r, merge=merge)
    with fk.poison_outputs():
        out = fk.shuffle_merge_norm(x, backend=BACKENDS[0], **kw)
        dy = torch.randn_like(out)
        got = torch.autograd.grad(out, (x, w, b), dy)
    ref = shuffle_merge_norm_ref(x, **kw)
    want = torch.autograd.grad(ref, (x, w, b), dy)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=2e-4)


@pytest.mark.skipif(not BACKENDS, reason="no kernel backend can run here")
def test_custom_op_registration_passes_opcheck():
    from fcot_kernels.ops.shuffle_merge_norm import _smn_fwd

    x, w, b = _inputs(1, (4, 4), 8, 0.5, torch.float32)
    torch.library.opcheck(_smn_fwd, (x, w, b, 4, 4, 2, 2, 1e-5, BACKENDS[0]))


# --- bad input ----------------------------------------------------------------------------------


def _good():
    x = torch.randn(2, 64, 8)
    return dict(x=x, grid=(8, 8), weight=torch.ones(32), bias=torch.zeros(32), merge=1)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(x=torch.randn(64, 8)), ValueError, "x must have 3 dimensions"),
        (dict(x=[[1.0]]), TypeError, "x must be a torch.Tensor"),
        (dict(x=torch.randint(0, 3, (2, 64, 8))), TypeError, "x has dtype torch.int64"),
        (dict(grid=(8, 4)), ValueError, "grid=.8, 4. has 32 cells but x has 64 tokens"),
        (dict(grid=8), TypeError, "grid must be a pair of ints"),
        (dict(x=torch.randn(2, 63, 8), grid=(7, 9)), ValueError, "divisible by 1/scale=2"),
        (dict(scale=0.3), ValueError, "scale=0.3 is not supported"),
        (dict(scale=2.0), ValueError, "scale=2.0 is not supported"),
        (dict(merge=3), ValueError, "merge=3 is not supported"),
        (dict(x=torch.randn(2, 48, 8), grid=(6, 8), merge=4), ValueError, "merge=4 needs the shuffled grid .3, 4."),
        (dict(x=torch.randn(2, 24, 8), grid=(4, 6), merge=2), ValueError, "merge=2 needs the shuffled grid .2, 3."),
        (dict(weight=torch.ones(8)), ValueError, r"weight must have shape \(32,\), got \(8,\)"),
        (dict(bias=torch.zeros(32, 1)), ValueError, r"bias must have shape \(32,\)"),
        (dict(weight=torch.ones(32, dtype=torch.int32)), TypeError, "weight has dtype torch.int32"),
        (dict(eps=0.0), ValueError, "eps=0.0 must be > 0"),
        (dict(backend="cudnn"), ValueError, "backend='cudnn' is not a backend"),
    ],
)
def test_bad_input_is_rejected_with_a_clear_error(change, error, match):
    args = {**_good(), **change}
    x = args.pop("x")
    with pytest.raises(error, match=match):
        fk.shuffle_merge_norm(x, **args)


@pytest.mark.skipif(ON_GPU, reason="needs a machine without a GPU")
def test_weight_on_another_device_is_rejected():
    args = _good()
    args["weight"] = torch.ones(32, device="meta")
    with pytest.raises(ValueError, match="weight is a meta tensor"):  # meta is rejected before the device check
        fk.shuffle_merge_norm(args.pop("x"), **args)


# --- every tensor argument in every layout (issue 9) ------------------------------------------


@pytest.mark.parametrize("layout", ["strided", "offset", "transposed", "expanded"])
@pytest.mark.parametrize("arg", ["x", "weight", "bias"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_tensor_argument_in_every_layout(backend, arg, layout):
    """Each tensor argument as a non-contiguous, offset, column-major or stride-0 view (the
    others contiguous): forward and every gradient equal the reference's on the same view."""
    from fcot_kernels.testing import as_layout

    x, w, b = _inputs(3, (4, 8), 6, 0.5, torch.float32, requires_grad=False)
    values = {"x": x, "weight": w, "bias": b}
    outs = {}
    dy = None
    for name in ("reference", backend):
        args = {k: as_layout(v, layout if k == arg else "contiguous", requires_grad=True) for k, v in values.items()}
        with fk.poison_outputs():
            y = fk.shuffle_merge_norm(args["x"], grid=(4, 8), weight=args["weight"], bias=args["bias"], merge=2, backend=name)
        dy = torch.randn_like(y) if dy is None else dy
        y.backward(dy)
        outs[name] = [y.detach()] + [args[k].grad for k in ("x", "weight", "bias")]
    for got, want, what in zip(outs[backend], outs["reference"], ("out", "dx", "dweight", "dbias")):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=lambda m: f"{what}: {m}")
