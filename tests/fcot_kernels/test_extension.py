"""The compiled extension fcot_kernels._C: built when required, and its argument checks."""

from __future__ import annotations

import os

import pytest

from fcot_kernels import cuda as ext

REQUIRED = os.environ.get("FCOT_REQUIRE_CUDA", "") == "1"


@pytest.mark.skipif(not REQUIRED, reason="FCOT_REQUIRE_CUDA=1 not set: the build may legitimately skip the extension")
def test_extension_was_built_when_required():
    built, reason = ext.status()
    assert built, reason
    mod = ext.load()
    assert "90" in mod.CUDA_ARCHS.split(",")  # setup.py builds sm_90 by default (FCOT_CUDA_ARCHS adds others)


def _module():
    built, reason = ext.status()
    if not built:
        pytest.skip(f"extension not built: {reason}")
    return ext.load()


def _smn_args(**change):
    args = dict(dtype=0, tiles=2, grid_h=8, grid_w=8, channels=16, r=2, merge=2, stride_t=1024,
                stride_n=16, x=1 << 20, weight=1 << 20, bias=1 << 20, out=1 << 20, mean=1 << 20,
                rstd=1 << 20, eps=1e-5, stream=0)
    args.update(change)
    return args


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(dtype=7), "dtype code 7"),
        (dict(grid_h=7), r"grid \(7, 8\) is not divisible by the shuffle factor r=2"),
        (dict(merge=3), "merge=3 is not 1, 2 or 4"),
        (dict(grid_w=6), r"shuffled grid \(4, 3\) is not divisible by the merge window \(1, 2\)"),
        (dict(tiles=0), "sizes must be positive"),
        (dict(x=0), "x is a null pointer"),
        (dict(eps=0.0), "eps=0 must be > 0"),
        (dict(eps=1e-50), "must be > 0 in fp32"),
        (dict(channels=1 << 62), "exceed the kernel's limits"),
        (dict(tiles=1 << 30), r"exceed the kernel's 2\^31 - 1 row limit"),
    ],
)
def test_bindings_validate_before_touching_the_gpu(change, match):
    # Validation runs before any CUDA call, so it is testable on a machine without a GPU.
    mod = _module()
    with pytest.raises(ValueError, match=match):
        mod.shuffle_merge_norm_fwd(**_smn_args(**change))
