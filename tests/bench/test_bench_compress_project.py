"""The benchmark's eager provider (transformers' modules) computes what the op computes."""

from __future__ import annotations

import pytest
import torch

from bench.bench_compress_project import _transformers_path
from fcot_kernels.reference import avg_merge_weight, compress_project_ref

pytest.importorskip("transformers.models.internvl.modeling_internvl")


@pytest.mark.parametrize("merge, mode", [(1, "avg"), (2, "avg"), (4, "avg"), (2, "conv"), (4, "conv")])
def test_transformers_path_matches_the_reference(merge, mode):
    c, hidden, grid = 12, 40, (8, 8)
    width = 4 * c
    x = torch.randn(3, grid[0] * grid[1], c)
    p = dict(
        ln_weight=1 + 0.2 * torch.randn(width), ln_bias=0.2 * torch.randn(width),
        w1=torch.randn(hidden, width) / 7, b1=torch.randn(hidden), w2=torch.randn(hidden, hidden) / 6, b2=torch.randn(hidden),
    )
    if mode == "conv":
        p["merge_weight"] = avg_merge_weight(mode, merge, width) + 0.1 * torch.randn(width, merge * width)
        p["merge_bias"] = 0.1 * torch.randn(width)
    shape = {"channels": c, "hidden": hidden, "grid": grid, "mode": mode, "merge": merge}
    x.requires_grad_()
    for t in p.values():
        t.requires_grad_()
    got = _transformers_path(x, shape, p)()
    want = compress_project_ref(x, grid=grid, merge=merge, mode=mode, **p)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # Gradients reach the benchmark's own tensors (what its backward mode differentiates).
    dy = torch.randn_like(got)
    inputs = (x, *p.values())
    for g, e in zip(torch.autograd.grad(got, inputs, dy), torch.autograd.grad(want, inputs, dy)):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)
