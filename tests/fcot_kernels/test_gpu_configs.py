"""``FCOT_GPU_CONFIGS=1``: the Triton launchers pick the launch configurations they use on a GPU
(128-wide attention and GEMM blocks, 4096-wide vocabulary blocks, the persistent backward grid,
the 16-byte-aligned gather path of the GEMMs) while the kernels run under the interpreter, so
every GPU configuration path executes here on small shapes (fp32 and fp16), compared with the
reference: multi-block causal bounds with and without masks, multi-step K loops, ragged tails."""

from __future__ import annotations

import pytest
import torch

import fcot_kernels as fk
from fcot_kernels.dispatch import triton_interpreter
from fcot_kernels.testing import assert_close

from ..conftest import DEVICE

pytestmark = pytest.mark.skipif(not triton_interpreter() or DEVICE.type != "cpu",
                                reason="the switch is for the Triton interpreter (a GPU runs these configurations anyway)")
DTYPES = [torch.float32, torch.float16]


@pytest.fixture(autouse=True)
def gpu_configs(monkeypatch):
    monkeypatch.setenv("FCOT_GPU_CONFIGS", "1")


def _compare(fn, inputs, dtype, *, scale=2.0, fp32_inputs=()):
    """fn(backend, *inputs): Triton at ``dtype`` against the reference in fp32 on the same
    (rounded) values; outputs and the gradients of every input that requires one. Inputs at the
    positions ``fp32_inputs`` stay fp32 (e.g. ``key_log_size``)."""
    results = []
    for backend, dt in (("triton", dtype), ("reference", torch.float32)):
        leaves = [t.detach().to(dtype if i not in fp32_inputs else torch.float32).to(
                      dt if i not in fp32_inputs else torch.float32).requires_grad_(t.requires_grad)
                  if t.is_floating_point() else t for i, t in enumerate(inputs)]
        out = fn(backend, *leaves)
        outs = out if isinstance(out, tuple) else (out,)
        weights = [torch.linspace(-1, 1, o.numel(), device=o.device).view_as(o) for o in outs]
        loss = sum((o.float() * w).sum() for o, w in zip(outs, weights) if o.is_floating_point() and o.requires_grad)
        grads = torch.autograd.grad(loss, [t for t in leaves if t.requires_grad]) if torch.is_tensor(loss) else ()
        results.append((outs, grads))
    (o_k, g_k), (o_r, g_r) = results
    for i, (a, b) in enumerate(zip(o_k, o_r)):
        if a.is_floating_point():
            assert_close(a.float(), b, dtype=dtype, name=f"output {i}", scale=scale)
        else:
            torch.testing.assert_close(a, b)
    for i, (a, b) in enumerate(zip(g_k, g_r)):
        assert_close(a.float(), b, dtype=dtype, name=f"grad {i}", scale=scale)


def test_the_switch_selects_the_gpu_configurations():
    from fcot_kernels._attention import AttnGeometry
    from fcot_kernels.triton import compress_project, fused_linear_distill, merged_attention, tome_merge

    geom = AttnGeometry(1, 2, 1, 64, 200, 200, False, 200, 200)
    assert merged_attention._config("fwd", geom, torch.float16)["BLOCK_N"] == 128
    assert compress_project._gemm_config(256, 256, 1024, torch.device("cpu"))["BLOCK_K"] == 64
    assert fused_linear_distill._meta(5000, torch.device("cpu"))["BLOCK_V"] == 4096
    assert tome_merge._match_meta(torch.empty(1, 2, 3))["BLOCK_A"] == 64


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("merge", [1, 2])
def test_shuffle_merge_norm(dtype, merge):
    x = torch.randn(2, 64, 64, device=DEVICE, requires_grad=True)
    w = (1 + 0.2 * torch.randn(256, device=DEVICE)).requires_grad_()
    b = (0.2 * torch.randn(256, device=DEVICE)).requires_grad_()
    _compare(lambda be, x, w, b: fk.shuffle_merge_norm(x, grid=(8, 8), weight=w, bias=b, merge=merge, backend=be),
             (x, w, b), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["conv", "dwconv"])
def test_compress_project(dtype, mode):
    # C = 128: every 64-wide K block and 64/128-wide N block lies in one channel segment, so the
    # GEMMs take the aligned gather path (SEG_BLOCKS); K = merge * W = 1024: 16 K steps.
    c, width, hidden, merge = 128, 512, 96, 2
    x = torch.randn(2, 64, c, device=DEVICE, requires_grad=True)
    p = dict(ln_weight=1 + 0.2 * torch.randn(width), ln_bias=0.2 * torch.randn(width),
             w1=torch.randn(hidden, width) / width**0.5, b1=0.2 * torch.randn(hidden),
             w2=torch.randn(80, hidden) / hidden**0.5, b2=0.2 * torch.randn(80))
    if mode == "conv":
        p["merge_weight"] = torch.randn(width, merge * width) / (merge * width) ** 0.5
    else:
        p["merge_weight"] = 0.5 + 0.1 * torch.randn(merge, width)
    p["merge_bias"] = 0.1 * torch.randn(width)
    names = list(p)
    tensors = [t.to(DEVICE).requires_grad_() for t in p.values()]

    def fn(be, x, *ws):
        return fk.compress_project(x, grid=(8, 8), merge=merge, mode=mode, backend=be, **dict(zip(names, ws)))

    _compare(fn, (x, *tensors), dtype, scale=4.0)


def test_compress_project_unaligned_x_takes_the_unhinted_path():
    # x at a 2-byte offset (a view into a larger buffer): the launcher must not promise the
    # compiler 16-byte alignment (compress_project._u_align), and the result is still right.
    from fcot_kernels._validation import ShuffleGeometry
    from fcot_kernels.triton import compress_project

    c, width, hidden, merge = 128, 512, 64, 2
    geom = ShuffleGeometry(2, 8, 8, c, 2, merge)
    x = torch.randn(2, 64, c, device=DEVICE).half()
    shifted = torch.cat([x.new_zeros(1), x.flatten()])[1:].view_as(x)
    assert compress_project._u_align(x, x.stride(), geom) == 8
    assert compress_project._u_align(shifted, shifted.stride(), geom) == 1
    assert compress_project._u_align(x.transpose(1, 2).contiguous().transpose(1, 2), (64 * c, 1, 64), geom) == 1
    p = dict(merge_weight=torch.randn(width, merge * width) / (merge * width) ** 0.5, merge_bias=0.1 * torch.randn(width),
             ln_weight=1 + 0.2 * torch.randn(width), ln_bias=0.2 * torch.randn(width),
             w1=torch.randn(hidden, width) / width**0.5, b1=0.2 * torch.randn(hidden),
             w2=torch.randn(80, hidden) / hidden**0.5, b2=0.2 * torch.randn(80))
    names = list(p)

    def fn(be, x, *ws):
        view = torch.cat([x.new_zeros(1), x.flatten()])[1:].view_as(x)  # storage offset 1 element
        return fk.compress_project(view, grid=(8, 8), merge=merge, mode="conv", backend=be, **dict(zip(names, ws)))

    _compare(fn, (x.float().requires_grad_(), *[t.to(DEVICE).requires_grad_() for t in p.values()]), torch.float16,
             scale=4.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("varlen", [False, True])
def test_merged_attention(dtype, varlen):
    # L = 200 with 128-wide blocks: an unmasked key block, the masked causal diagonal and a
    # ragged tail; the causal order runs the longest query block first.
    h_q, h_kv, d = 2, 1, 64
    if varlen:
        cu = torch.tensor([0, 150, 330], dtype=torch.int32, device=DEVICE)
        shape_q, shape_kv, bias_shape = (330, h_q, d), (330, h_kv, d), (330,)
        kw = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=180, max_seqlen_k=180)
    else:
        shape_q, shape_kv, bias_shape = (1, 200, h_q, d), (1, 200, h_kv, d), (1, 200)
        kw = {}
    q = torch.randn(shape_q, device=DEVICE, requires_grad=True)
    k = torch.randn(shape_kv, device=DEVICE, requires_grad=True)
    v = torch.randn(shape_kv, device=DEVICE, requires_grad=True)
    s = (0.5 * torch.rand(bias_shape, device=DEVICE)).requires_grad_()
    # With importance rows: the importance kernel's transposed (keys x rows) dot and 64-key blocks.
    def fn(be, q, k, v, s):
        out, imp = fk.merged_attention(q, k, v, key_log_size=s, causal=True, importance_rows=[-1, 3, 70], backend=be, **kw)
        return out, imp.detach()  # not differentiable (the reference's would carry a graph)

    _compare(fn, (q, k, v, s), dtype, fp32_inputs=(3,))


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_linear_distill(dtype):
    # V = 5000: two 4096-wide vocabulary blocks, a ragged tail, rows padded to 5056.
    n, h, v = 3, 16, 5000
    xs = torch.randn(n, h, device=DEVICE, requires_grad=True)
    xt = xs.detach() + 0.5 * torch.randn(n, h, device=DEVICE)
    w = (torch.randn(v, h, device=DEVICE) / h**0.5).requires_grad_()
    labels = torch.tensor([3, -100, 4999], device=DEVICE)
    _compare(lambda be, xs, xt, w: fk.fused_linear_distill(xs, xt, w, labels=labels, ce_weight=0.3, temperature=2.0,
                                                           backend=be),
             (xs, xt, w), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_tome(dtype):
    # 200 tokens, 96 channels: several 64-token A/B tiles and channel chunks.
    x = torch.randn(1, 200, 96, device=DEVICE, requires_grad=True)
    metric = torch.randint(-3, 4, (1, 200, 96), device=DEVICE).float()  # integer metric: exact ties agree

    def fn(be, x, m):
        score, index = fk.tome_match(m, protected=1, backend=be)
        merged, size, _ = fk.tome_merge(x, r=40, metric=m, protected=1, backend=be)
        return score, index, merged, size

    _compare(fn, (x, metric), dtype)
