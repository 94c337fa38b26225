"""compress_project: reference vs transformers, every backend vs the reference (forward and all
gradients, fp32 and bf16), frozen weights, gradcheck, the avg initialisers, bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fcot_kernels as fk
from fcot_kernels.reference import avg_merge_weight, compress_project_ref, pixel_shuffle_ref
from fcot_kernels.testing import assert_close, assert_matches_reference, runnable_backends

from ...conftest import DEVICE, ON_GPU

BACKENDS = runnable_backends(DEVICE, has_cuda=False)
NAMES = ("ln_weight", "ln_bias", "w1", "b1", "w2", "b2", "merge_weight", "merge_bias")
needs_backend = pytest.mark.skipif(not BACKENDS, reason="no kernel backend here (no GPU and no Triton interpreter)")


def make_inputs(
    *,
    tiles=3,
    grid=(8, 8),
    channels=12,
    hidden=40,
    out=24,
    merge=2,
    mode="conv",
    dtype=torch.float32,
    device=DEVICE,
    merge_bias=True,
    perturb=True,
):
    """Fresh random x and weights scaled like a trained projector (unit-ish activations)."""
    width = 4 * channels
    x = torch.randn(tiles, grid[0] * grid[1], channels, device=device)
    p = {
        "ln_weight": 1 + 0.2 * torch.randn(width, device=device),
        "ln_bias": 0.2 * torch.randn(width, device=device),
        "w1": torch.randn(hidden, width, device=device) / width**0.5,
        "b1": 0.2 * torch.randn(hidden, device=device),
        "w2": torch.randn(out, hidden, device=device) / hidden**0.5,
        "b2": 0.2 * torch.randn(out, device=device),
    }
    if mode != "avg":
        mw = avg_merge_weight(mode, merge, width, device=device)
        p["merge_weight"] = mw + (0.3 / merge) * torch.randn_like(mw) if perturb else mw
        if merge_bias:
            p["merge_bias"] = 0.2 * torch.randn(width, device=device)
    return x.to(dtype), {k: v.to(dtype) for k, v in p.items()}


def run(fn, x, params, *, grad_out=None, need=None, **kw):
    """Forward (+ backward when grad_out is given): output and {name: grad or None}."""
    need = set(need if need is not None else ["x", *params])
    x = x.detach().clone().requires_grad_("x" in need)
    params = {k: v.detach().clone().requires_grad_(k in need) for k, v in params.items()}
    y = fn(x, **params, **kw)
    if grad_out is None:
        return y, {}
    y.backward(grad_out)
    return y, {"x": x.grad, **{k: v.grad for k, v in params.items()}}


def check_against_reference(backend, x, params, *, need=None, **kw):
    y_ref, g_exact = None, None
    grad_out = torch.randn(x.shape[0], *_out_shape(x, params, kw), device=x.device)
    with fk.poison_outputs():
        y, grads = run(fk.compress_project, x, params, grad_out=grad_out.to(x.dtype), need=need, backend=backend, **kw)
    y_ref, g_exact = run(
        compress_project_ref, x.float(), {k: v.float() for k, v in params.items()}, grad_out=grad_out, need=need, **kw
    )
    y_eager, g_eager = (None, {})
    if x.dtype != torch.float32:
        y_eager, g_eager = run(compress_project_ref, x, params, grad_out=grad_out.to(x.dtype), need=need, **kw)
    assert y.shape == y_ref.shape and y.dtype == x.dtype
    assert_matches_reference(y, y_ref, y_eager, name="out")
    for name, g in grads.items():
        if g_exact[name] is None:
            assert g is None, f"{name} is frozen but got a gradient"
            continue
        assert g is not None and g.dtype == (x.dtype), f"{name}: missing gradient or wrong dtype"
        assert_matches_reference(g, g_exact[name], g_eager.get(name), name=f"d{name}")


def _out_shape(x, params, kw):
    merge = kw.get("merge", 1)
    gh, gw = kw["grid"]
    return (gh * gw // 4 // merge, params["w2"].shape[0])


# ----------------------------------------------------------------- reference vs transformers


def _hf_projector(vit, llm, act):
    transformers = pytest.importorskip("transformers")
    from transformers.models.internvl.modeling_internvl import InternVLMultiModalProjector

    cfg = transformers.InternVLConfig(
        vision_config=dict(hidden_size=vit, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2),
        text_config=dict(model_type="qwen2", hidden_size=llm, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1),
        downsample_ratio=0.5,
        projector_hidden_act={"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}[act],
    )
    proj = InternVLMultiModalProjector(cfg)
    with torch.no_grad():  # non-trivial LayerNorm affine (the default init is 1 / 0)
        proj.layer_norm.weight.normal_(1, 0.2)
        proj.layer_norm.bias.normal_(0, 0.2)
    return proj


def _hf_path(proj, feats, merge):
    """transformers' pixel_shuffle, then (for merge > 1) pooling on the shuffled grid, then the projector."""
    from transformers.models.internvl.modeling_internvl import InternVLModel

    y = InternVLModel.pixel_shuffle(None, feats, scale_factor=0.5)  # (T, H', W', 4C)
    if merge > 1:
        kernel = (1, 2) if merge == 2 else (2, 2)
        y = F.avg_pool2d(y.permute(0, 3, 1, 2), kernel).permute(0, 2, 3, 1)
    return proj(y.reshape(y.shape[0], -1, y.shape[-1]))


@pytest.mark.parametrize("act", ["gelu", "gelu_tanh"])
@pytest.mark.parametrize("merge,grid", [(1, (8, 8)), (1, (8, 12)), (2, (8, 12)), (4, (8, 8))])
def test_reference_matches_transformers(act, merge, grid):
    proj = _hf_projector(12, 40, act)
    feats = torch.randn(3, grid[0], grid[1], 12)
    with torch.no_grad():
        expected = _hf_path(proj, feats, merge)
        got = compress_project_ref(
            feats.reshape(3, -1, 12), grid=grid, merge=merge, act=act,
            ln_weight=proj.layer_norm.weight, ln_bias=proj.layer_norm.bias,
            w1=proj.linear_1.weight, b1=proj.linear_1.bias, w2=proj.linear_2.weight, b2=proj.linear_2.bias,
        )
    # merge=1 is the unmodified model: equal up to fp32 rounding.
    torch.testing.assert_close(got, expected, atol=2e-6, rtol=2e-6)


def test_reference_conv_is_conv2d_and_dwconv_is_weighted_sum():
    x, p = make_inputs(tiles=2, grid=(8, 8), channels=4, merge=4, mode="conv", device="cpu")
    width = 16
    y = pixel_shuffle_ref(x.reshape(2, 8, 8, 4), 2).permute(0, 3, 1, 2)  # (T, W', 4, 4)
    kernel = p["merge_weight"].reshape(width, 2, 2, width).permute(0, 3, 1, 2)  # member k = di*2 + dj
    z = F.conv2d(y, kernel, p["merge_bias"], stride=2).permute(0, 2, 3, 1).reshape(2, 4, width)
    common = {k: p[k] for k in NAMES[:6]}
    expected = F.linear(F.gelu(F.linear(F.layer_norm(z, (width,), p["ln_weight"], p["ln_bias"]), p["w1"], p["b1"])), p["w2"], p["b2"])
    got = compress_project_ref(x, grid=(8, 8), merge=4, mode="conv", merge_weight=p["merge_weight"], merge_bias=p["merge_bias"], **common)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)

    mw = torch.randn(2, width)
    members = pixel_shuffle_ref(x.reshape(2, 8, 8, 4), 2).reshape(2, 4, 2, 2, width)  # 1x2 windows
    z = members[:, :, :, 0] * mw[0] + members[:, :, :, 1] * mw[1]
    expected = F.linear(F.gelu(F.linear(F.layer_norm(z.reshape(2, 8, width), (width,), p["ln_weight"], p["ln_bias"]), p["w1"], p["b1"])), p["w2"], p["b2"])
    got = compress_project_ref(x, grid=(8, 8), merge=2, mode="dwconv", merge_weight=mw, **common)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------- backends vs the reference


@needs_backend
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("act", ["gelu", "gelu_tanh"])
@pytest.mark.parametrize("mode", ["avg", "dwconv", "conv"])
@pytest.mark.parametrize("merge", [1, 2, 4])
def test_matches_reference(backend, dtype, act, mode, merge):
    x, p = make_inputs(tiles=3, grid=(8, 8), channels=12, hidden=40, out=24, merge=merge, mode=mode, dtype=dtype)
    check_against_reference(backend, x, p, grid=(8, 8), merge=merge, mode=mode, act=act)


REAL_WIDTHS = [
    # (C_vit, hidden, out, merge, mode, dtype): the InternVL2 projector widths at one tile.
    (1024, 4096, 4096, 1, "avg", torch.float32),  # 8B, the unmodified projector
    (1024, 896, 896, 2, "conv", torch.float32),  # 1B
    (1024, 2048, 2048, 4, "dwconv", torch.bfloat16),  # 2B
    (3200, 6144, 6144, 4, "avg", torch.float32),  # 26B
]


@pytest.mark.slow
@needs_backend
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", REAL_WIDTHS, ids=lambda c: f"{4 * c[0]}-{c[1]}-{c[2]}-m{c[3]}-{c[4]}-{str(c[5])[6:]}")
def test_real_model_widths(backend, case):
    vit, hidden, out, merge, mode, dtype = case
    # One tile of a 4x4 patch grid keeps the interpreter quick at the real widths.
    x, p = make_inputs(tiles=1, grid=(4, 4), channels=vit, hidden=hidden, out=out, merge=merge, mode=mode, dtype=dtype)
    check_against_reference(backend, x, p, grid=(4, 4), merge=merge, mode=mode, act="gelu")


@needs_backend
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "mode,need",
    [
        ("conv", ["x"]),  # frozen projector and compressor, gradient for the ViT only
        ("conv", ["merge_weight", "merge_bias"]),  # FCoT-VL stage 1: compressor only ...
        ("dwconv", ["merge_weight", "merge_bias", "ln_weight", "ln_bias", "w1", "b1", "w2", "b2"]),  # ... + projector
        ("dwconv", ["merge_weight"]),
        ("avg", ["w2", "b2"]),
        ("avg", ["ln_weight", "b1"]),
        ("conv", ["x", "ln_bias", "w1"]),
    ],
)
def test_frozen_and_trainable(backend, mode, need):
    x, p = make_inputs(tiles=1, grid=(4, 8), channels=12, merge=2, mode=mode)
    check_against_reference(backend, x, p, grid=(4, 8), merge=2, mode=mode, need=need)


@needs_backend
def test_frozen_weights_cost_nothing(monkeypatch):
    """With only linear_2 trainable, the backward runs no GEMM below it."""
    impl = pytest.importorskip("fcot_kernels.triton.compress_project")

    def forbidden(*args, **kwargs):
        raise AssertionError("a GEMM below linear_2 ran although nothing below it needs a gradient")

    x, p = make_inputs(tiles=1, grid=(4, 4), merge=2, mode="conv")
    monkeypatch.setattr(impl, "linear_act_grad", forbidden)
    monkeypatch.setattr(impl, "conv_backward", forbidden)
    monkeypatch.setattr(impl, "merge_ln_backward", forbidden)
    _, grads = run(fk.compress_project, x, p, grad_out=torch.randn(1, 2, 24, device=DEVICE), need=["w2", "b2"],
                   grid=(4, 4), merge=2, mode="conv", backend=BACKENDS[0])
    assert grads["w2"] is not None and grads["x"] is None and grads["w1"] is None


@needs_backend
def test_non_contiguous_x_and_odd_tiles():
    x, p = make_inputs(tiles=5, grid=(8, 12), channels=12, merge=4, mode="dwconv")
    x = x.transpose(0, 1).contiguous().transpose(0, 1)  # same values, tiles not outermost in memory
    assert not x.is_contiguous()
    check_against_reference(BACKENDS[0], x, p, grid=(8, 12), merge=4, mode="dwconv")


@pytest.mark.slow
@needs_backend
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    tiles=st.integers(1, 3),
    gh=st.sampled_from([4, 8, 12]),
    gw=st.sampled_from([4, 8, 12]),
    channels=st.sampled_from([4, 12, 20]),
    hidden=st.sampled_from([16, 40]),
    merge=st.sampled_from([1, 2, 4]),
    mode=st.sampled_from(["avg", "dwconv", "conv"]),
    bias=st.booleans(),
)
def test_fuzz_shapes(tiles, gh, gw, channels, hidden, merge, mode, bias):
    x, p = make_inputs(tiles=tiles, grid=(gh, gw), channels=channels, hidden=hidden, out=24, merge=merge, mode=mode, merge_bias=bias)
    check_against_reference(BACKENDS[0], x, p, grid=(gh, gw), merge=merge, mode=mode)


# ----------------------------------------------------------------- gradcheck


def _packed(mode, merge, dtype, device, act):
    x, p = make_inputs(tiles=1, grid=(4, 4), channels=4, hidden=8, out=6, merge=merge, mode=mode, dtype=dtype, device=device)
    names = list(p)

    def fn(backend):
        def f(x, *weights):
            kw = dict(zip(names, weights))
            if backend == "reference":
                return compress_project_ref(x, grid=(4, 4), merge=merge, mode=mode, act=act, **kw)
            return fk.compress_project(x, grid=(4, 4), merge=merge, mode=mode, act=act, backend=backend, **kw)
        return f

    inputs = [x.requires_grad_(), *(v.requires_grad_() for v in p.values())]
    return fn, inputs


@pytest.mark.parametrize("mode,merge,act", [("avg", 2, "gelu"), ("dwconv", 4, "gelu_tanh"), ("conv", 2, "gelu"), ("conv", 1, "gelu_tanh")])
def test_gradcheck_reference_fp64(mode, merge, act):
    fn, inputs = _packed(mode, merge, torch.float64, "cpu", act)
    assert torch.autograd.gradcheck(fn("reference"), inputs)


@needs_backend
@pytest.mark.filterwarnings("ignore:Input #.* is not a double precision:UserWarning")  # fp32 on purpose: no fp64 kernel
@pytest.mark.parametrize("mode,merge,act", [("avg", 4, "gelu"), ("dwconv", 2, "gelu_tanh"), ("conv", 2, "gelu")])
def test_gradcheck_kernel_fp32(mode, merge, act):
    """The op takes fp32/fp16/bf16 only (no fp64 kernels), so the kernel's own backward is checked
    against finite differences of its own fp32 forward, with fp32-sized tolerances."""
    fn, inputs = _packed(mode, merge, torch.float32, DEVICE, act)
    assert torch.autograd.gradcheck(fn(BACKENDS[0] if BACKENDS else "reference"), inputs, eps=2e-3, atol=2e-3, rtol=2e-2, fast_mode=True)


# ----------------------------------------------------------------- torch.library and torch.compile


@needs_backend
@pytest.mark.parametrize("mode,merge", [("avg", 2), ("dwconv", 4), ("conv", 2)])
def test_custom_op_registration_passes_opcheck(mode, merge):
    """Schema, fake (meta) kernels and autograd registration of fcot::cproj_fwd (and, through
    the autograd checks, fcot::cproj_bwd) agree with the real op."""
    from fcot_kernels.ops.compress_project import _cproj_fwd

    x, p = make_inputs(tiles=1, grid=(4, 4), channels=4, hidden=8, out=6, merge=merge, mode=mode)
    x.requires_grad_()
    weights = [p.get(k) for k in NAMES]
    for w in weights:
        if w is not None:
            w.requires_grad_()
    torch.library.opcheck(_cproj_fwd, (x, *weights, 4, 4, 2, merge, mode, 1e-5, "gelu", BACKENDS[0], True))


@needs_backend
def test_torch_compile_fullgraph_matches_eager():
    """fullgraph=True fails on any graph break: compiled code sees the op as opaque nodes."""
    x, p = make_inputs(tiles=2, grid=(4, 8), channels=4, hidden=8, out=6, merge=2, mode="conv")
    kw = dict(grid=(4, 8), merge=2, mode="conv", backend=BACKENDS[0])
    grad_out = torch.randn(2, 4, 6, device=DEVICE)
    compiled = torch.compile(lambda x, **w: fk.compress_project(x, **w, **kw), backend="aot_eager", fullgraph=True)
    y, grads = run(compiled, x, p, grad_out=grad_out)
    y_eager, grads_eager = run(fk.compress_project, x, p, grad_out=grad_out, **kw)
    torch.testing.assert_close(y, y_eager)
    for name, g in grads.items():
        assert g is not None, f"{name}: no gradient through the compiled graph"
        torch.testing.assert_close(g, grads_eager[name], msg=lambda m, name=name: f"d{name}: {m}")


# ----------------------------------------------------------------- avg initialisers


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
@pytest.mark.parametrize("merge", [1, 2, 4])
def test_avg_initialiser_equals_avg(backend, merge):
    # Integer-valued tokens: every product with 1/merge and every partial sum is exact, so the
    # learnable modes must equal avg bit for bit whatever the summation order.
    x, p = make_inputs(tiles=2, grid=(8, 8), merge=merge, mode="avg")
    x = torch.randint(-8, 9, x.shape, device=DEVICE).float()
    width = p["ln_weight"].shape[0]
    kw = dict(grid=(8, 8), merge=merge, backend=backend, **p)
    avg = fk.compress_project(x, mode="avg", **kw)
    for mode in ("dwconv", "conv"):
        got = fk.compress_project(x, mode=mode, merge_weight=avg_merge_weight(mode, merge, width, device=DEVICE),
                                  merge_bias=torch.zeros(width, device=DEVICE), **kw)
        if backend != "reference" and mode == "conv":
            # Merged tokens are equal, but the kernel's LayerNorm of the conv output reduces in
            # another order than the fused avg merge + LayerNorm: equal to fp32 rounding.
            torch.testing.assert_close(got, avg, atol=2e-6, rtol=2e-6)
        else:
            assert torch.equal(got, avg), f"{mode} initialiser differs from avg by {(got - avg).abs().max().item()}"
    # Random (non-integer) tokens: equal up to rounding.
    x = torch.randn_like(x)
    avg = fk.compress_project(x, mode="avg", **kw)
    got = fk.compress_project(x, mode="conv", merge_weight=avg_merge_weight("conv", merge, width, device=DEVICE), **kw)
    assert_close(got, avg, name="conv init")


# ----------------------------------------------------------------- dispatch and bad input


def test_no_cuda_kernel():
    x, p = make_inputs(tiles=1, grid=(4, 4), merge=1, mode="avg")
    with pytest.raises(fk.BackendUnavailableError, match="no CUDA C"):
        fk.compress_project(x, grid=(4, 4), backend="cuda", **p)


def test_reference_backend_on_cpu_matches_ref():
    x, p = make_inputs(tiles=1, grid=(4, 4), merge=2, mode="dwconv", device="cpu")
    got = fk.compress_project(x, grid=(4, 4), merge=2, mode="dwconv", backend="reference", **p)
    assert torch.equal(got, compress_project_ref(x, grid=(4, 4), merge=2, mode="dwconv", **p))


def _bad(**over):
    x, p = make_inputs(tiles=1, grid=(4, 4), channels=12, hidden=40, out=24, merge=2, mode="conv", device="cpu")
    kw = dict(grid=(4, 4), merge=2, mode="conv", backend="reference", **p)
    kw.update(over)
    return fk.compress_project(kw.pop("x", x), **kw)


@pytest.mark.parametrize(
    "over,exc,match",
    [
        (dict(ln_weight=torch.randn(40)), ValueError, r"ln_weight must have shape \(48,\)"),
        (dict(ln_bias=torch.randn(48, 1)), ValueError, r"ln_bias must have shape \(48,\)"),
        (dict(w1=torch.randn(40, 12)), ValueError, r"w1 must have shape \(40, 48\)"),
        (dict(w1=torch.randn(48)), ValueError, r"w1 must be a 2-D tensor of shape \(hidden, 48\)"),
        (dict(b1=torch.randn(24)), ValueError, r"b1 must have shape \(40,\)"),
        (dict(w2=torch.randn(24, 41)), ValueError, r"w2 must have shape \(24, 40\)"),
        (dict(b2=torch.randn(40)), ValueError, r"b2 must have shape \(24,\)"),
        (dict(merge_weight=torch.randn(48, 48)), ValueError, r"merge_weight must have shape \(48, 96\)"),
        (dict(mode="dwconv"), ValueError, r"merge_weight must have shape \(2, 48\)"),
        (dict(merge_bias=torch.randn(96)), ValueError, r"merge_bias must have shape \(48,\)"),
        (dict(merge_weight=None), ValueError, r"mode='conv' needs merge_weight of shape \(48, 96\)"),
        (dict(mode="avg"), ValueError, r"mode='avg' has no parameters, but merge_weight"),
        (dict(mode="avg", merge_weight=None), ValueError, r"mode='avg' has no parameters, but merge_bias"),
        (dict(mode="pool"), ValueError, r"mode='pool' is not supported"),
        (dict(act="relu"), ValueError, r"act='relu' is not supported"),
        (dict(w1=torch.randn(40, 48, dtype=torch.bfloat16)), TypeError, r"w1 has dtype torch.bfloat16 but x has dtype torch.float32"),
        (dict(x=torch.randn(1, 16, 12, dtype=torch.float64)), TypeError, r"x has dtype torch.float64"),
        (dict(merge_weight=torch.randn(48, 96, device="meta")), ValueError, r"merge_weight is a meta tensor"),
        (dict(merge=3), ValueError, r"merge=3 is not supported"),
        (dict(grid=(4, 5)), ValueError, r"grid=\(4, 5\) has 20 cells"),
        (dict(eps=0.0), ValueError, r"eps=0.0 must be > 0"),
        (dict(backend="tpu"), ValueError, r"backend='tpu' is not a backend"),
    ],
)
def test_bad_input(over, exc, match):
    with pytest.raises(exc, match=match):
        _bad(**over)


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device to put weights and x on different devices")
def test_device_mismatch():
    with pytest.raises(ValueError, match="w2 is on cpu but must be on cuda"):
        _bad(x=torch.randn(1, 16, 12, device="cuda"), **{k: v.cuda() for k, v in make_inputs(tiles=1, grid=(4, 4), merge=2, mode="conv", device="cpu")[1].items() if k != "w2"})


# --- every tensor argument in every layout (issue 9) ------------------------------------------


@needs_backend
@pytest.mark.parametrize("layout", ["strided", "offset", "transposed", "expanded"])
@pytest.mark.parametrize("arg", ["x", *NAMES])
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_tensor_argument_in_every_layout(backend, arg, layout):
    """Each tensor argument (x and all eight weights) as a non-contiguous, offset, column-major
    or stride-0 view, in the learnable mode that reads it: forward and every gradient equal the
    reference's on the same view (b1 and merge_bias used to be read without their strides)."""
    from fcot_kernels.testing import as_layout

    mode = "dwconv" if arg == "merge_weight" and layout == "expanded" else "conv"
    x, params = make_inputs(tiles=2, grid=(4, 4), channels=6, hidden=20, out=12, merge=2, mode=mode)
    values = {"x": x, **params}
    res = {}
    grad_out = None
    for name in ("reference", backend):
        args = {k: as_layout(v, layout if k == arg else "contiguous", requires_grad=True) for k, v in values.items()}
        with fk.poison_outputs():
            y = fk.compress_project(args["x"], grid=(4, 4), merge=2, mode=mode, backend=name,
                                    **{k: v for k, v in args.items() if k != "x"})
        grad_out = torch.randn_like(y) if grad_out is None else grad_out
        y.backward(grad_out)
        res[name] = {"out": y.detach(), **{k: v.grad for k, v in args.items()}}
    for what, want in res["reference"].items():
        torch.testing.assert_close(res[backend][what], want, atol=2e-4, rtol=2e-4, msg=lambda m: f"{what}: {m}")
