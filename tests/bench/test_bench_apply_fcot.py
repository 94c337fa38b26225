"""The apply_fcot benchmark's CPU smoke size runs (what CI runs), each provider's case computes
the right shapes, and the patched cases agree with the unpatched model where they must."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers.models.internvl.modeling_internvl")

from bench import bench_apply_fcot as bench  # noqa: E402
from bench.harness import Skip, run_cases  # noqa: E402

CPU = torch.device("cpu")


def _outputs(shape_name, provider):
    case = bench.setup(bench.SHAPES[shape_name], provider, "forward", torch.float32, CPU)
    out = case.fn()
    return case, (out.logits if hasattr(out, "logits") else out)


def test_smoke_shapes_run_with_expected_outputs():
    for name in bench.CPU_SHAPES:
        shape = bench.SHAPES[name]
        ran = 0
        for provider in bench.PROVIDERS:
            try:
                case, out = _outputs(name, provider)
            except Skip:
                continue
            ran += 1
            per_tile = {None: 256, 0.5: 128, 0.75: 64}[shape["ratio"]]
            if shape["part"] == "prefill":
                assert out.shape == (shape["batch"], 1, bench.SMOKE["llm"][5])
                assert case.tokens == shape["batch"] * (shape["tiles"] * per_tile + shape["text"])
            else:
                assert out.shape == (shape["batch"] * shape["tiles"], per_tile, bench.SMOKE["llm"][0])
            assert torch.isfinite(out).all()
        assert ran == (1 if shape["compressor"] == "unpatched" else 2), name


def test_none_matches_unpatched_and_fused_matches_reference():
    _, unpatched = _outputs("smoke/b1/unpatched/prefill", "eager")
    _, none = _outputs("smoke/b1/none/prefill", "reference")
    torch.testing.assert_close(none, unpatched, atol=1e-4, rtol=1e-4)
    _, fused = _outputs("smoke/b2/avg@0.75/image", "fused")
    _, reference = _outputs("smoke/b2/avg@0.75/image", "reference")
    torch.testing.assert_close(fused, reference, atol=1e-4, rtol=1e-4)


def test_harness_rows_report_tokens_per_second():
    rows = run_cases(bench.OP, bench, device=CPU, dtype=torch.float32, shapes=["smoke/b2/conv@0.5/prefill"],
                     providers=["reference", "eager"], modes=["forward", "backward"],
                     ceilings={"copy_gbps": 1.0, "matmul_tflops": 1.0})
    timed = [r for r in rows if r.median_ms is not None]
    assert len(timed) == 1 and timed[0].provider == "reference" and timed[0].tokens_per_s > 0
    assert {r.note for r in rows if r.median_ms is None} == {
        "skipped: the unpatched model runs as the eager provider", "skipped: inference benchmark: prefill only",
    }
