"""The stage-1 step benchmark's CPU smoke size runs every part for both providers, and its
step really trains (the loss goes down on the fixed batch, only V_c and A_s change)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers.models.internvl.modeling_internvl")

from bench import bench_distill_step as bench  # noqa: E402
from bench.harness import run_cases  # noqa: E402

CPU = torch.device("cpu")


def test_smoke_parts_run_for_both_providers():
    for name in bench.CPU_SHAPES:
        for provider in bench.PROVIDERS:
            case = bench.setup(bench.SHAPES[name], provider, "full", torch.float32, CPU)
            case.fn()
            part = bench.SHAPES[name]["part"]
            assert (case.tokens > 0) == (part != "optimizer"), name
    # forward/backward modes are skipped with a reason (the harness records it)
    rows = run_cases(bench.OP, bench, device=CPU, dtype=torch.float32, shapes=bench.CPU_SHAPES[:1], providers=["fused"],
                     modes=["forward", "backward"], ceilings={"copy_gbps": 1.0, "matmul_tflops": 1.0})
    assert all("mode full only" in r.note for r in rows) and len(rows) == 2


def test_step_lowers_the_loss_and_touches_only_the_student_projector():
    shape = bench.SHAPES[bench.CPU_SHAPES[0]]
    case = bench.setup(shape, "fused", "full", torch.float32, CPU)
    st = next(iter(bench._CACHE.values()))
    frozen = {n: p.detach().clone() for n, p in st.module.named_parameters() if not p.requires_grad}
    losses = [case.fn().item() for _ in range(4)]
    assert losses[-1] < losses[0], losses
    assert all(torch.equal(p, frozen[n]) for n, p in st.module.named_parameters() if n in frozen)
