"""The op ``python -m bench --rehearse`` times: what bench/gpu_suite.sh --rehearse needs to show on a
CPU that the run's orchestration holds (every row written as its case ends, a case past its
share cut and recorded, the torch.compile providers timed after the others, the CUDA cases merged
in by a second pass). Not a benchmark: it is never part of a real run.

Providers: ``eager`` (a small add), ``triton``/``cuda`` (skipped without a GPU, as the real
kernels' are), ``slow`` (sleeps far past any case share: cut), ``compile`` (a plain call standing
in for torch.compile, so that the late ordering shows without a compile's minutes).
"""

from __future__ import annotations

import time

import torch

from .harness import Case, Skip

OP = "rehearsal"
PROVIDERS = ("eager", "compile", "triton", "cuda", "slow")
SHAPES = {"tiny/n64": {"n": 64}}
CPU_SHAPES = TARGET_SHAPES = list(SHAPES)
RUN_MODES = ("forward",)
SLOW_SECONDS = 600.0
"""How long the ``slow`` provider's call sleeps: longer than any case share."""


def setup(shape: dict, provider: str, mode: str, dtype: torch.dtype, device: torch.device) -> Case:
    n = shape["n"]
    a = torch.randn(n, n, device=device, dtype=dtype)
    if provider in ("triton", "cuda") and device.type != "cuda":
        raise Skip("no GPU (interpreter timings mean nothing)")
    if provider == "slow":
        return Case(fn=lambda: time.sleep(SLOW_SECONDS), bytes=a.numel() * a.element_size())
    return Case(fn=lambda: a + a, bytes=3 * a.numel() * a.element_size())
