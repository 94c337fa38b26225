"""``fcot bench`` end to end on the CPU (the quick path, then the report), the harness's row
statuses and roofline, the target evaluation on synthetic GPU rows, and that the committed
``docs/performance.md`` is what the committed runs generate."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
import sys
import time
import types

import pytest
import torch

pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from bench import harness, report, run, targets  # noqa: E402

CPU = torch.device("cpu")
CEILINGS = {"copy_gbps": 100.0, "matmul_tflops": 1.0}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> Path:
    """One quick CPU run of a kernel op, a model-level op and an op with a peer (liger)."""
    out = tmp_path_factory.mktemp("bench") / "run"
    rc = run.main(["--quick", "--no-progress", "--op", "shuffle_merge_norm", "--op", "apply_fcot",
                   "--op", "fused_linear_distill", "--out", str(out)])
    assert rc == 0
    return out


def test_quick_run_rows_carry_provenance_ceilings_and_statuses(quick_run):
    rows = json.loads((quick_run / "bench.json").read_text())
    assert {r["op"] for r in rows} == {"shuffle_merge_norm", "apply_fcot", "fused_linear_distill"}
    for r in rows:
        env = r["env"]
        for key in ("device_name", "commit", "torch", "triton", "transformers", "python", "cpu_count", "time"):
            assert env.get(key) not in (None, ""), (key, env)
        assert env["device_name"].startswith("cpu") and r["device"] == "cpu"
        assert env["copy_gbps"] > 0 and env["matmul_tflops"] > 0
        assert r["status"] in harness.STATUSES
        assert r["status"] != "error", r
        if r["status"] == "ok":
            assert 0 < r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
            assert r["frac_ceiling"] > 0 and r["bound"] in ("memory", "compute"), r
        else:
            assert r["median_ms"] is None and r["note"].startswith(r["status"]), r
    by = {(r["op"], r["provider"]) for r in rows if r["status"] == "ok"}
    assert {("shuffle_merge_norm", "eager"), ("shuffle_merge_norm", "compile"), ("apply_fcot", "fused"),
            ("apply_fcot", "reference"), ("fused_linear_distill", "eager")} <= by
    # compile-max is excluded by --quick and says so; Triton is never timed under the interpreter.
    assert {r["note"] for r in rows if r["provider"] == "compile-max"} == {
        "skipped: provider compile-max excluded from this run (--exclude-provider)"}
    assert all(r["status"] == "skipped" for r in rows if r["provider"] in ("triton", "cuda"))
    # Model-level benchmarks time only their mode; their FLOPs come from the flop counter.
    assert {r["mode"] for r in rows if r["op"] == "apply_fcot"} == {"forward"}
    assert all(r["tflops"] > 0 for r in rows if r["op"] == "apply_fcot" and r["status"] == "ok")
    liger = [r for r in rows if r["provider"] == "liger"]
    try:
        import liger_kernel.transformers  # noqa: F401
    except ImportError:
        assert liger and all(r["status"] == "missing" and "liger_kernel" in r["note"] for r in liger)
    csv_head = (quick_run / "bench.csv").read_text().splitlines()[0].split(",")
    assert {"status", "frac_ceiling", "bound", "device_name", "commit", "transformers", "copy_gbps"} <= set(csv_head)


def test_report_renders_plots_and_markdown_from_the_run(quick_run, tmp_path):
    docs = tmp_path / "performance.md"
    assert report.main([str(quick_run), "--docs", str(docs)]) == 0
    for op in ("shuffle_merge_norm", "apply_fcot", "fused_linear_distill"):
        png = quick_run / "plots" / f"{op}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    text = docs.read_text()
    assert "**No GPU run is committed**" in text
    assert text.count("not measured: no GPU run") == len(targets.TARGETS)
    rows = json.loads((quick_run / "bench.json").read_text())
    eager = next(r for r in rows if r["op"] == "shuffle_merge_norm" and r["provider"] == "eager" and r["mode"] == "forward")
    assert f"| {eager['shape']} | forward | not timed | {eager['median_ms']:.3f} |" in text
    assert "liger" in text  # the missing peer is named, not dropped
    assert report.main([str(quick_run), "--docs", str(docs), "--check"]) == 0
    docs.write_text(text.replace("cpu", "gpu", 1))
    assert report.main([str(quick_run), "--docs", str(docs), "--check"]) == 1


def test_committed_performance_doc_is_generated_from_committed_runs():
    assert report.committed_runs(), "no run committed under bench/results/"
    assert report.main(["--check"]) == 0, "docs/performance.md is stale: run `fcot bench report`"


def test_cli_runs_bench_as_a_module_without_importing_it(capfd):
    """``fcot bench`` is a thin entry: it runs ``python -m bench`` (bench imports fcot, never the
    other way round)."""
    import subprocess

    from fcot import cli

    assert cli.main(["bench", "report", "--help"]) == 0
    assert "docs/performance.md" in capfd.readouterr().out
    assert cli.main(["bench", "--help"]) == 0
    assert "--quick" in capfd.readouterr().out
    code = ("import sys, fcot.cli, fcot; print(sorted(m for m in sys.modules if m == 'bench' or m.startswith('bench.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_bench_modules_import_downward_only():
    """No circles: report and run do not import each other both ways; harness imports no bench module."""
    import ast

    root = Path(run.__file__).parent
    imports = {}
    for path in root.glob("*.py"):
        tree = ast.parse(path.read_text())
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                names |= {node.module} if node.module else {a.name for a in node.names}
        imports[path.stem] = names
    assert imports["harness"] <= {None}, imports["harness"]
    for a, deps in imports.items():
        for b in deps:
            assert a not in imports.get(b, set()), f"bench.{a} and bench.{b} import each other"
    assert "run" not in imports["report"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_cpu_run_refuses_gpu_shapes():
    with pytest.raises(SystemExit, match="needs a GPU"):
        run.main(["--shapes", "target", "--op", "tome_merge"])


class _Fake:
    """A benchmark module whose providers fail in every way a real one can."""
    SHAPES = {"s": {"n": 8}}
    PROVIDERS = ("eager", "peer", "broken", "counted")

    @staticmethod
    def setup(shape, provider, mode, dtype, device):
        n = shape["n"]
        a = torch.randn(n, n)
        if provider == "peer":
            raise harness.Missing("peerlib is not importable")
        if provider == "broken":
            raise RuntimeError("kernel exploded\nsecond line")
        if provider == "counted":
            return harness.Case(fn=lambda: a @ a)  # no bytes/FLOPs stated: the counter fills them in
        return harness.Case(fn=lambda: a + a, bytes=3 * a.numel() * 4)


def test_harness_statuses_exclusion_and_flop_counting():
    seen = []
    rows = harness.run_cases("fake", _Fake, device=CPU, dtype=torch.float32, modes=["forward"], ceilings=CEILINGS,
                             env={"device_name": "cpu (test)"}, quick=True, excluded=("eager",), progress=seen.append)
    assert len(seen) == len(rows) == 4
    status = {r.provider: (r.status, r.note) for r in rows}
    assert status["eager"] == ("skipped", "skipped: provider eager excluded from this run (--exclude-provider)")
    assert status["peer"] == ("missing", "missing: peerlib is not importable")
    assert status["broken"] == ("error", "error: RuntimeError: kernel exploded")
    counted = next(r for r in rows if r.provider == "counted")
    assert counted.status == "ok" and counted.bound == "compute"
    assert math.isclose(counted.tflops * 1e12 * counted.median_ms * 1e-3, 2 * 8**3, rel_tol=1e-6)
    assert rows[0].env == {"device_name": "cpu (test)", **CEILINGS}


def test_cases_past_the_time_budget_are_rows_that_say_so():
    rows = harness.run_cases("fake", _Fake, device=CPU, dtype=torch.float32, providers=["eager", "counted"],
                             modes=["forward"], ceilings=CEILINGS, env={}, quick=True, deadline=time.monotonic() - 1)
    assert [(r.status, r.note) for r in rows] == [
        ("skipped", "skipped: the run's time budget ran out before this case (--time-budget)")] * 2


def test_a_case_past_its_share_is_cut_and_the_run_goes_on():
    class Slow(_Fake):
        PROVIDERS = ("slow", "eager")

        @staticmethod
        def setup(shape, provider, mode, dtype, device):
            if provider == "slow":
                return harness.Case(fn=lambda: time.sleep(30), bytes=1.0)
            return _Fake.setup(shape, provider, mode, dtype, device)

    start = time.monotonic()
    rows = harness.run_cases("fake", Slow, device=CPU, dtype=torch.float32, modes=["forward"], ceilings=CEILINGS,
                             env={}, quick=True, limit=0.5)
    assert time.monotonic() - start < 10
    assert rows[0].status == "cut" and rows[0].note.startswith("cut: still running after its 0.5 s share")
    assert rows[0].median_ms is None and rows[1].status == "ok"


def test_plan_times_target_cases_first_and_torch_compile_last():
    import importlib

    modules = {op: importlib.import_module(run.OPS[op]) for op in ("shuffle_merge_norm", "apply_fcot")}
    cases = run.plan(modules, "cpu", None, None)
    providers = [c[2] for c in cases]
    first_late = min(i for i, p in enumerate(providers) if p in run.LATE_PROVIDERS)
    assert all(p in run.LATE_PROVIDERS for p in providers[first_late:])
    assert providers[first_late:] == sorted(providers[first_late:], key=run.LATE_PROVIDERS.index)
    assert len(cases) == len(set(cases)) == sum(len(m.CPU_SHAPES) * len(m.PROVIDERS) * len(run._modes(m, None))
                                               for m in modules.values())
    gpu = run.plan(modules, "target", None, None)
    wanted = run.target_cases()
    flags = [c in wanted for c in gpu if c[2] not in run.LATE_PROVIDERS]
    assert any(flags) and flags == sorted(flags, reverse=True)  # the targets' cases before the others


def test_merge_replaces_the_rows_of_the_same_cases(tmp_path, monkeypatch):
    fake = types.ModuleType("fcot_fake_bench2")
    fake.SHAPES, fake.PROVIDERS, fake.CPU_SHAPES = _Fake.SHAPES, ("eager", "counted"), ["s"]
    fake.setup = _Fake.setup
    monkeypatch.setitem(sys.modules, fake.__name__, fake)
    monkeypatch.setitem(run.OPS, "fake", fake.__name__)
    monkeypatch.setattr(harness, "copy_bandwidth_gbps", lambda device: 100.0)
    monkeypatch.setattr(harness, "matmul_tflops", lambda device: 1.0)
    common = ["--op", "fake", "--quick", "--no-progress", "--mode", "forward", "--out", str(tmp_path)]
    assert run.main([*common, "--exclude-provider", "counted"]) == 0
    assert run.main([*common, "--provider", "counted", "--merge"]) == 0
    rows = json.loads((tmp_path / "bench.json").read_text())
    assert [(r["provider"], r["status"]) for r in rows] == [("eager", "ok"), ("counted", "ok")]


def test_roofline_picks_the_binding_ceiling():
    row = harness.Row("op", "s", "p", "forward", "float32", "cpu", median_ms=20.0)
    harness._roofline(row, harness.Case(fn=None, bytes=1e9, flops=4e9), CEILINGS)  # 10 ms of bytes, 4 ms of FLOPs
    assert row.bound == "memory" and math.isclose(row.frac_ceiling, 0.5) and math.isclose(row.frac_copy_bw, 0.5)
    row = harness.Row("op", "s", "p", "forward", "float32", "cpu", median_ms=20.0)
    harness._roofline(row, harness.Case(fn=None, bytes=1e8, flops=1.5e10), CEILINGS)  # 1 ms of bytes, 15 ms of FLOPs
    assert row.bound == "compute" and math.isclose(row.frac_ceiling, 0.75)


def test_run_fails_when_a_case_errors(tmp_path, monkeypatch):
    fake = types.ModuleType("fcot_fake_bench")
    fake.SHAPES, fake.PROVIDERS, fake.setup, fake.CPU_SHAPES = _Fake.SHAPES, _Fake.PROVIDERS, _Fake.setup, ["s"]
    monkeypatch.setitem(sys.modules, fake.__name__, fake)
    monkeypatch.setitem(run.OPS, "fake", fake.__name__)
    monkeypatch.setattr(harness, "copy_bandwidth_gbps", lambda device: 100.0)
    monkeypatch.setattr(harness, "matmul_tflops", lambda device: 1.0)
    assert run.main(["--op", "fake", "--quick", "--no-progress", "--out", str(tmp_path)]) == 1
    rows = json.loads((tmp_path / "bench.json").read_text())
    assert len(rows) == 12 and [r["status"] for r in rows].count("error") == 3  # broken, in each of the three modes


def test_default_out_names_device_date_and_commit():
    env = {"device_name": "NVIDIA H100 80GB HBM3", "commit": "0123456789abcdef", "dirty": False}
    out = run.default_out(env)
    assert out.parent == run.RESULTS / "nvidia-h100-80gb-hbm3" and out.name.endswith("-0123456")
    assert run.default_out({**env, "dirty": True}).name.endswith("-0123456-dirty")
    assert run.device_slug("cpu (Intel(R) Xeon(R) Processor)") == "cpu-intel-r-xeon-r-processor"


def _gpu_row(op, shape, provider, mode, ms, mem=None, dtype="bfloat16", **extra):
    row = harness.Row(op, shape, provider, mode, dtype, "cuda", median_ms=ms, peak_mem_mb=mem,
                      env={"device_name": "NVIDIA H100 80GB HBM3", "commit": "abcdef0123"}, **extra)
    if ms is None:
        row.status, row.note = "skipped", "skipped: out of memory"
    return asdict(row)


def test_targets_are_evaluated_from_gpu_rows():
    by_what = {(t.shape, t.mode, t.metric, t.base): t for t in targets.TARGETS}
    smn = targets.SMN_300M
    rows = [
        _gpu_row("shuffle_merge_norm", smn, "triton", "forward", 1.0, frac_copy_bw=0.85),
        _gpu_row("shuffle_merge_norm", smn, "cuda", "forward", 0.8, frac_copy_bw=0.9),
        _gpu_row("shuffle_merge_norm", smn, "eager", "forward", 2.0),
        _gpu_row("shuffle_merge_norm", smn, "compile", "forward", None),
        _gpu_row("apply_fcot", targets.APPLY.format("unpatched", "prefill"), "eager", "forward", 10.0),
        _gpu_row("apply_fcot", targets.APPLY.format("conv@0.5", "prefill"), "fused", "forward", 5.0),
        _gpu_row("distill_step", targets.STEP, "fused", "full", 3.0, mem=60.0),
        _gpu_row("distill_step", targets.STEP, "reference", "full", 3.0, mem=100.0),
    ]
    o = targets.evaluate(by_what[(smn, "forward", "frac_copy", None)], rows)
    assert o.met is True and o.value == 0.9 and o.fcot_provider == "cuda" and o.commit == "abcdef0"
    o = targets.evaluate(by_what[(smn, "forward", "speedup", "eager")], rows)
    assert o.met is False and math.isclose(o.value, 2.5)  # 2.0 / 0.8 < 3
    o = targets.evaluate(by_what[(smn, "forward", "speedup", "compile")], rows)
    assert o.met is None and "out of memory" in o.why
    o = targets.evaluate(by_what[(targets.APPLY.format("conv@0.5", "prefill"), "forward", "speedup", "eager")], rows)
    assert o.met is True and math.isclose(o.value, 2.0)  # the base row is the unpatched model's shape
    o = targets.evaluate(by_what[(targets.STEP, "full", "mem_ratio", "reference")], rows)
    assert o.met is True and math.isclose(o.value, 0.6)
    o = targets.evaluate(by_what[(targets.STEP, "full", "speedup", "reference")], rows)
    assert o.met is False and math.isclose(o.value, 1.0)
    o = targets.evaluate(by_what[(targets.ATTN, "forward", "time_ratio", "sdpa_fa")], rows)
    assert o.met is None and "not in this run" in o.why
    fp32 = [{**r, "dtype": "float32"} for r in rows]
    assert "target is bf16" in targets.evaluate(by_what[(smn, "forward", "frac_copy", None)], fp32).why
    cpu = [{**r, "device": "cpu"} for r in rows]
    assert targets.evaluate(targets.TARGETS[0], cpu).why.startswith("no GPU run")


def test_targets_name_real_benchmark_cases():
    import importlib

    for t in targets.TARGETS:
        module = importlib.import_module(run.OPS[t.op])
        assert t.shape in module.TARGET_SHAPES, t
        assert (t.base_shape or t.shape) in module.TARGET_SHAPES, t
        assert set(t.fcot) <= set(module.PROVIDERS) and (t.base is None or t.base in module.PROVIDERS), t
        assert t.mode in getattr(module, "RUN_MODES", harness.MODES), t
    assert len({(t.op, t.shape, t.mode, t.metric, t.base) for t in targets.TARGETS}) == len(targets.TARGETS)


def test_report_speedups_compare_with_each_baseline():
    g = {p: {"median_ms": ms} for p, ms in
         {"eager": 4.0, "compile": 2.0, "triton": 1.0, "sdpa_mask": 3.0, "sdpa_fa": 0.5}.items()}
    sp = report.speedups(g)
    assert sp["eager"] == {"compile": 2.0, "triton": 4.0, "sdpa_mask": 4 / 3, "sdpa_fa": 8.0}
    assert sp["compile"]["triton"] == 2.0 and "compile" not in sp["compile"]
    assert sp["peer"] == {"triton": 0.5}  # against the fastest peer, fcot providers only
    assert report._fastest(g, report.FCOT) == ("triton", g["triton"])
    assert report.speedups({"eager": {"median_ms": None}, "triton": {"median_ms": 1.0}}) == {
        "eager": {}, "compile": {}, "peer": {}}


def test_report_refuses_a_folder_without_results(tmp_path):
    with pytest.raises(SystemExit, match="no bench.json"):
        report.main([str(tmp_path)])
    (tmp_path / "bench.json").write_text("[]")
    with pytest.raises(SystemExit, match="no benchmark rows"):
        report.main([str(tmp_path)])



def test_liger_peer_computes_the_same_loss_as_fcot():
    """The Liger-Kernel peer is compared on the same loss: its fused linear JSD equals fcot's
    reference JSD (beta 0.5, no CE). Runs where liger-kernel is installed (under the Triton
    interpreter on a CPU)."""
    pytest.importorskip("liger_kernel.transformers")
    from bench.bench_fused_linear_distill import LOSSES, _liger
    from fcot_kernels.reference import fused_linear_distill_ref

    device = harness.default_device()
    gen = torch.Generator().manual_seed(0)
    xs, xt = torch.randn(8, 16, generator=gen).to(device), torch.randn(8, 16, generator=gen).to(device)
    w = (torch.randn(40, 16, generator=gen) / 4).to(device)
    labels = torch.randint(0, 40, (8,), generator=gen).to(device)
    loss = LOSSES["jsd"]
    liger = _liger()(jsd_beta=loss["beta"], temperature=loss["temperature"])(xs, w, xt, w, labels)
    torch.testing.assert_close(liger, fused_linear_distill_ref(xs, xt, w, labels=labels, **loss), rtol=1e-5, atol=1e-6)


def test_dispatch_folds_a_gpu_run_and_refuses_a_cpu_one(tmp_path):
    gpu = tmp_path / "gpu"
    gpu.mkdir()
    rows = [_gpu_row("shuffle_merge_norm", targets.SMN_300M, p, "forward", ms) for p, ms in (("triton", 2.0), ("cuda", 1.0))]
    (gpu / "bench.json").write_text(json.dumps(rows))
    table = tmp_path / "table.json"
    assert run.main(["dispatch", str(gpu), "--table", str(table)]) == 0
    entry = json.loads(table.read_text())["measured"]["shuffle_merge_norm"]["NVIDIA H100 80GB HBM3"]
    assert entry["order"] == ["cuda", "triton"]
    cpu = tmp_path / "cpu"
    cpu.mkdir()
    (cpu / "bench.json").write_text(json.dumps([{**r, "device": "cpu"} for r in rows]))
    with pytest.raises(SystemExit, match="not a GPU run"):
        run.main(["dispatch", str(cpu), "--table", str(table)])
