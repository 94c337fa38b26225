"""fcot.compress: the training-free compressors reach exactly the target count, keep the
spatial order, and account for every input token."""

from __future__ import annotations

import pytest
import torch

import fcot_kernels as fk
from fcot.compress import Compressed, ImportancePruner, ToMeCompressor, importance_prune, target_count, tome_compress
from fcot_kernels.testing import runnable_backends

from ..conftest import DEVICE

KERNEL = runnable_backends(DEVICE)[0] if runnable_backends(DEVICE) else "reference"


def _group_means(tokens: torch.Tensor, source: torch.Tensor, count: int) -> torch.Tensor:
    """Plain mean of the original tokens behind each output (what size-weighted rounds give)."""
    tiles, _, c = tokens.shape
    keep = source >= 0
    src = source.clamp_min(0)
    summed = torch.zeros(tiles, count, c, device=tokens.device).scatter_add_(
        1, src[..., None].expand(-1, -1, c), tokens.float() * keep[..., None]
    )
    n = torch.zeros(tiles, count, device=tokens.device).scatter_add_(1, src, keep.float())
    return summed / n[..., None]


def _check_order(source: torch.Tensor, count: int) -> None:
    """Output o's smallest original index increases with o: the spatial order survives."""
    tiles, t = source.shape
    pos = torch.arange(t, device=source.device).expand(tiles, t)
    keep = source >= 0
    first = torch.full((tiles, count), t, device=source.device).scatter_reduce(
        1, source.clamp_min(0), torch.where(keep, pos, t), "amin"
    )
    assert bool((first[:, 1:] > first[:, :-1]).all()), "outputs are not in spatial order"
    assert bool((first < t).all()), "an output token has no member"


@pytest.mark.parametrize("backend", [KERNEL, "reference"])
@pytest.mark.parametrize("grid,ratio", [((16, 16), 0.5), ((16, 16), 0.75), ((16, 16), 0.7), ((7, 5), 0.75), ((3, 3), 0.0), ((1, 1), 0.5)])
def test_tome_compressor(backend, grid, ratio):
    tiles, c = 3, 8
    t = grid[0] * grid[1]
    tokens = torch.randn(tiles, t, c, device=DEVICE)
    out = ToMeCompressor(ratio, backend=backend)(tokens, grid)
    target = target_count(t, ratio)
    assert isinstance(out, Compressed)
    assert out.tokens.shape == (tiles, target, c) and out.sizes.shape == (tiles, target)
    assert out.tokens.dtype == tokens.dtype and out.source.shape == (tiles, t)
    assert torch.equal(out.sizes.sum(1), torch.full((tiles,), float(t), device=DEVICE))
    assert bool((out.source >= 0).all()) and bool((out.source < target).all())
    _check_order(out.source, target)
    counts = torch.zeros(tiles, target, device=DEVICE).scatter_add_(1, out.source, torch.ones(tiles, t, device=DEVICE))
    assert torch.equal(counts, out.sizes), "sizes must count the original tokens behind each output"
    torch.testing.assert_close(out.tokens, _group_means(tokens, out.source, target), atol=1e-5, rtol=1e-5)


def test_tome_targets_256():
    tokens = torch.randn(2, 256, 4, device=DEVICE)
    assert ToMeCompressor(0.5, backend=KERNEL)(tokens, (16, 16)).tokens.shape[1] == 128
    assert ToMeCompressor(0.75, backend=KERNEL)(tokens, (16, 16)).tokens.shape[1] == 64


def test_tome_metric_and_gradient():
    tiles, grid, c = 2, (8, 8), 6
    tokens = torch.randn(tiles, 64, c, device=DEVICE, requires_grad=True)
    metric = torch.randint(-3, 4, (tiles, 64, 5), device=DEVICE).float()
    out = tome_compress(tokens, grid, 0.75, metric=metric, backend=KERNEL)
    assert out.tokens.shape == (tiles, 16, c)
    # The first round matches on `metric`: the same as one tome_merge call with it.
    _, _, first = fk.tome_merge(tokens.detach(), r=32, metric=metric, backend="reference")
    # Tokens merged together in round one end in the same output.
    final_of_group = torch.zeros(tiles, 32, dtype=torch.int64, device=DEVICE).scatter_(1, first, out.source)
    assert torch.equal(out.source, final_of_group.gather(1, first))
    _check_order(out.source, 16)
    dy = torch.randn_like(out.tokens)
    out.tokens.backward(dy)
    # Every original token receives 1/|group| of its output's gradient.
    expected = dy.gather(1, out.source[..., None].expand(-1, -1, c)) / out.sizes.gather(1, out.source)[..., None]
    torch.testing.assert_close(tokens.grad, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("grid,ratio", [((16, 16), 0.5), ((16, 16), 0.75), ((5, 7), 0.7)])
def test_importance_pruner(grid, ratio):
    tiles, c = 3, 5
    t = grid[0] * grid[1]
    tokens = torch.randn(tiles, t, c, device=DEVICE, requires_grad=True)
    importance = torch.rand(tiles, t, device=DEVICE)
    out = ImportancePruner(ratio)(tokens, grid, importance=importance)
    target = target_count(t, ratio)
    assert out.tokens.shape == (tiles, target, c)
    keep = importance.topk(target, dim=1).indices.sort(1).values  # distinct random scores: no ties
    assert torch.equal(out.tokens, tokens.gather(1, keep[..., None].expand(-1, -1, c)))
    assert torch.equal(out.sizes, torch.ones(tiles, target, device=DEVICE))
    assert int((out.source >= 0).sum()) == tiles * target
    _check_order(out.source, target)
    out.tokens.sum().backward()
    assert torch.equal(tokens.grad.sum(-1) != 0, out.source >= 0)


def test_importance_ties_keep_lower_index():
    tokens = torch.randn(1, 6, 2, device=DEVICE)
    importance = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0, 2.0]], device=DEVICE)
    out = importance_prune(tokens, (2, 3), importance, 0.5)
    assert out.source.tolist() == [[-1, 0, 1, -1, 2, -1]]


def test_bad_inputs_and_noop_flags():
    tokens = torch.randn(2, 16, 3, device=DEVICE)
    with pytest.raises(ValueError, match=r"ratio=1 must be in \[0, 1\): the fraction of visual tokens removed"):
        ToMeCompressor(1)
    with pytest.raises(ValueError, match=r"ratio=1.5"):
        ImportancePruner(1.5)
    with pytest.raises(TypeError, match="ratio must be a float"):
        ToMeCompressor(True)
    with pytest.raises(ValueError, match=r"grid=\(4, 3\) has 12 cells but tokens has 16"):
        ToMeCompressor(0.5)(tokens, (4, 3))
    with pytest.raises(TypeError, match="grid must be a pair"):
        ToMeCompressor(0.5)(tokens, 16)
    with pytest.raises(ValueError, match="ImportancePruner needs importance="):
        ImportancePruner(0.5)(tokens, (4, 4))
    with pytest.raises(ValueError, match=r"importance must have shape \(2, 16\)"):
        ImportancePruner(0.5)(tokens, (4, 4), importance=torch.rand(2, 15, device=DEVICE))
    with pytest.warns(UserWarning, match="ignores importance"):
        ToMeCompressor(0.5, backend="reference")(tokens, (4, 4), importance=torch.rand(2, 16, device=DEVICE))
    with pytest.warns(UserWarning, match="ignores metric"):
        ImportancePruner(0.5)(tokens, (4, 4), importance=torch.rand(2, 16, device=DEVICE), metric=tokens)
    assert "ratio=0.75" in repr(ToMeCompressor(0.75)) and "ratio=0.5" in repr(ImportancePruner(0.5))


def test_importance_from_merged_attention_cls_row():
    # VisionZip-style: the ViT CLS row's attention (merged_attention's side-output) ranks the patches.
    tiles, heads, d, grid = 2, 2, 64, (4, 4)
    q, k, v = (torch.randn(tiles, 17, heads, d, device=DEVICE) for _ in range(3))
    _, importance = fk.merged_attention(q, k, v, importance_rows=[0], backend="reference")
    patches = torch.randn(tiles, 16, 8, device=DEVICE)
    out = ImportancePruner(0.75)(patches, grid, importance=importance[:, 1:])
    keep = importance[:, 1:].topk(4, dim=1).indices.sort(1).values
    assert torch.equal(out.tokens, patches.gather(1, keep[..., None].expand(-1, -1, 8)))


# --- the registry -----------------------------------------------------------------------------

from fcot.compress import COMPRESSORS, Compressor, build_compressor, register_compressor, window_merge  # noqa: E402


@pytest.mark.parametrize("name", ["none", "avg", "dwconv", "conv", "tome", "prune"])
@pytest.mark.parametrize("ratio", [0.5, 0.75])
def test_registered_compressors_counts(name, ratio):
    if name == "none":
        ratio = 0.0
    tiles, width = 3, 8
    tokens = torch.randn(tiles, 256, width, device=DEVICE)
    comp = build_compressor(name, ratio, width=width, backend="reference").to(DEVICE)
    out = comp(tokens, (16, 16))
    expected = {0.0: 256, 0.5: 128, 0.75: 64}[ratio]
    assert comp.tokens_out(256) == expected
    assert out.tokens.shape == (tiles, expected, width) and out.sizes.shape == (tiles, expected)
    kept = out.source >= 0
    counts = torch.zeros(tiles, expected, device=DEVICE).scatter_add_(1, out.source.clamp_min(0), kept.float())
    assert torch.equal(counts, out.sizes), "sizes must count the inputs behind each output"
    _check_order(out.source, expected)
    if comp.merge_mode is not None:
        # Learnable merges start equal to avg.
        avg = build_compressor("avg" if name != "none" else "none", ratio)(tokens, (16, 16)).tokens
        torch.testing.assert_close(out.tokens, avg, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("merge,mode", [(2, "avg"), (4, "avg"), (2, "dwconv"), (4, "conv")])
def test_window_merge_matches_compress_project_windows(merge, mode):
    # The standalone window merge uses the same windows as the fused op (shuffled input, scale 1).
    tiles, grid, width, hidden = 2, (4, 6), 8, 16
    comp = build_compressor({"avg": "avg", "dwconv": "dwconv", "conv": "conv"}[mode], {2: 0.5, 4: 0.75}[merge], width=width)
    with torch.no_grad():
        for p in comp.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(tiles, grid[0] * grid[1], width)
    ln_w, ln_b = torch.randn(width), torch.randn(width)
    w1, b1, w2, b2 = torch.randn(hidden, width), torch.randn(hidden), torch.randn(hidden, hidden), torch.randn(hidden)
    proj = dict(ln_weight=ln_w, ln_bias=ln_b, w1=w1, b1=b1, w2=w2, b2=b2, backend="reference")
    fused = fk.compress_project(x, grid=grid, scale=1.0, merge=merge, mode=mode, merge_weight=comp.merge_weight,
                                merge_bias=comp.merge_bias, **proj)
    merged = window_merge(x, grid, merge, mode, comp.merge_weight, comp.merge_bias)
    staged = fk.compress_project(merged, grid=(1, merged.shape[1]), scale=1.0, merge=1, **proj)
    torch.testing.assert_close(staged, fused, atol=1e-5, rtol=1e-5)


def test_register_a_compressor_and_bad_names():
    @register_compressor("first_half_test")
    class FirstHalf(Compressor):
        ratios = (0.5,)

        def forward(self, tokens, grid, *, importance=None):
            n = self.tokens_out(tokens.shape[1])
            src = torch.arange(tokens.shape[1]).masked_fill(torch.arange(tokens.shape[1]) >= n, -1)
            return Compressed(tokens[:, :n], torch.ones(tokens.shape[0], n), src.expand(tokens.shape[0], -1))

    try:
        assert COMPRESSORS["first_half_test"] is FirstHalf and FirstHalf.name == "first_half_test"
        out = build_compressor("first_half_test", 0.5)(torch.randn(2, 16, 3), (4, 4))
        assert out.tokens.shape == (2, 8, 3)
        with pytest.raises(ValueError, match=r"does not support ratio=0.75; supported: \[0.5\]"):
            build_compressor("first_half_test", 0.75)
        with pytest.raises(ValueError, match="already registered"):
            register_compressor("first_half_test")(type("Other", (Compressor,), {}))
    finally:
        COMPRESSORS.pop("first_half_test")
    with pytest.raises(ValueError, match=r"compressor='nope' is not registered; registered compressors: \['avg', 'conv', 'dwconv', 'none', 'prune', 'tome'\]"):
        build_compressor("nope", 0.5)
    with pytest.raises(TypeError, match="needs a Compressor subclass"):
        register_compressor("x")(int)
    with pytest.raises(ValueError, match="learnable and needs width="):
        build_compressor("conv", 0.5)
    with pytest.raises(ValueError, match=r"merges 2x2 windows, which do not divide the 3x4 grid"):
        build_compressor("avg", 0.75)(torch.randn(1, 12, 2), (3, 4))
