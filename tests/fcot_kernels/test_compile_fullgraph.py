"""Every public op under ``torch.compile(fullgraph=True)``, forward and backward: a graph break
(a host sync such as ``.item()``/``.tolist()``/``bool(tensor)`` on a value, or an untraceable
call) fails the compile. Runs each kernel backend this machine has (the Triton interpreter on a
CPU) and the reference, and compares with eager. Value checks that would read a tensor on the
host run on the device under torch.compile (``torch._assert_async``)."""

from __future__ import annotations

import pytest
import torch

import fcot_kernels as fk
from fcot_kernels.testing import runnable_backends

from ..conftest import DEVICE

BACKENDS = ["reference", *runnable_backends(DEVICE, has_cuda=False)]


def _compiled(fn):
    torch._dynamo.reset()
    return torch.compile(fn, backend="aot_eager", fullgraph=True)


def _check(fn, inputs, backend):
    """fn(*inputs, backend) compiled with fullgraph: same outputs and input gradients as eager."""
    results = []
    for f in (fn, _compiled(fn)):
        leaves = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
        out = f(*leaves, backend)
        outs = out if isinstance(out, tuple) else (out,)
        loss = sum((o.float() * torch.linspace(0.5, 1.5, o.numel(), device=o.device).view_as(o)).sum()
                   for o in outs if o.is_floating_point() and o.requires_grad)
        grads = torch.autograd.grad(loss, [t for t in leaves if t.requires_grad]) if torch.is_tensor(loss) else ()
        results.append((outs, grads))
    (o_e, g_e), (o_c, g_c) = results
    for a, b in zip(o_c, o_e):
        torch.testing.assert_close(a, b)
    assert len(g_c) == len(g_e)
    for a, b in zip(g_c, g_e):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_shuffle_merge_norm(backend):
    x = torch.randn(2, 16, 8, device=DEVICE, requires_grad=True)
    w = torch.randn(32, device=DEVICE, requires_grad=True)
    b = torch.randn(32, device=DEVICE, requires_grad=True)
    _check(lambda x, w, b, be: fk.shuffle_merge_norm(x, grid=(4, 4), weight=w, bias=b, merge=2, backend=be),
           (x, w, b), backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("varlen", [False, True])
def test_merged_attention(backend, varlen):
    h_q, h_kv, d = 4, 2, 64
    if varlen:
        cu = torch.tensor([0, 5, 12], dtype=torch.int32, device=DEVICE)
        q = torch.randn(12, h_q, d, device=DEVICE, requires_grad=True)
        k = torch.randn(12, h_kv, d, device=DEVICE, requires_grad=True)
        v = torch.randn(12, h_kv, d, device=DEVICE, requires_grad=True)
        bias = torch.randn(12, device=DEVICE, requires_grad=True)
        kw = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=7, max_seqlen_k=7)
    else:
        q = torch.randn(2, 9, h_q, d, device=DEVICE, requires_grad=True)
        k = torch.randn(2, 9, h_kv, d, device=DEVICE, requires_grad=True)
        v = torch.randn(2, 9, h_kv, d, device=DEVICE, requires_grad=True)
        bias = torch.randn(2, 9, device=DEVICE, requires_grad=True)
        kw = {}
    _check(lambda q, k, v, s, be: fk.merged_attention(q, k, v, key_log_size=s, causal=True, backend=be, **kw),
           (q, k, v, bias), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tome_match_and_merge(backend):
    x = torch.randn(2, 10, 8, device=DEVICE, requires_grad=True)
    metric = torch.randn(2, 10, 8, device=DEVICE)

    def fn(x, m, be):
        score, index = fk.tome_match(m, protected=1, backend=be)
        merged, size, source = fk.tome_merge(x, r=2, metric=m, protected=1, backend=be)
        return score, index, merged, size

    _check(fn, (x, metric), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_linear_distill(backend):
    n, h, v = 6, 8, 37
    xs = torch.randn(n, h, device=DEVICE, requires_grad=True)
    xt = torch.randn(n, h, device=DEVICE)
    w = torch.randn(v, h, device=DEVICE, requires_grad=True)
    labels = torch.tensor([1, -100, 5, 36, 0, 2], device=DEVICE)
    _check(lambda xs, xt, w, be: fk.fused_linear_distill(xs, xt, w, labels=labels, ce_weight=0.5, temperature=2.0,
                                                         backend=be),
           (xs, xt, w), backend)


def test_device_side_checks_still_catch_bad_values_under_compile():
    """Under torch.compile the value checks run on the device: a bad label still fails."""
    xs = torch.randn(4, 8, device=DEVICE)
    w = torch.randn(5, 8, device=DEVICE)
    labels = torch.tensor([0, 1, 7, 2], device=DEVICE)  # 7 >= V = 5
    fn = _compiled(lambda xs, w, labels: fk.fused_linear_distill(xs, xs, w, labels=labels, ce_weight=1.0,
                                                                  backend="reference"))
    with pytest.raises(RuntimeError, match="labels outside"):
        fn(xs, w, labels)
    cu = torch.tensor([0, 3, 2, 4], dtype=torch.int32, device=DEVICE)  # decreasing
    q = torch.randn(4, 2, 64, device=DEVICE)
    att = _compiled(lambda q, cu: fk.merged_attention(q, q, q, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=4,
                                                      max_seqlen_k=4, backend="reference"))
    with pytest.raises(RuntimeError, match="non-decreasing"):
        att(q, cu)
