"""Benchmark harness shared by every ``bench/bench_<op>.py``.

An op's benchmark module defines ``SHAPES`` (named shapes from :mod:`bench.models`),
``PROVIDERS`` and ``setup(shape, provider, mode, dtype, device) -> Case``. The harness times each
case (median, p20, p80), records peak memory, converts bytes/FLOPs into GB/s and TFLOP/s, and
relates them to the device-copy bandwidth and bf16 matmul rate measured in the same run.

On a GPU timing uses ``triton.testing.do_bench`` (CUDA events, L2 flushed between runs); on
a CPU it uses ``time.perf_counter`` and every row is labelled ``cpu``.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

MODES = ("forward", "backward", "full")
"""forward: the op alone; backward: the backward of a precomputed forward; full: both."""

BASE_PROVIDERS = ("eager", "compile", "triton", "cuda")
"""eager: the PyTorch reference; compile: torch.compile of it; triton / cuda: fcot kernels."""


class Skip(Exception):
    """Raised by a setup function when a provider cannot run a case (the reason is recorded)."""


@dataclass
class Case:
    fn: Callable[[], object]
    """The timed call."""
    bytes: float = 0.0
    """Bytes the op must move at least (each input read once, each output written once)."""
    flops: float = 0.0
    tokens: float = 0.0
    """Tokens processed per call (model-level benchmarks): reported as tokens/s."""


@dataclass
class Row:
    op: str
    shape: str
    provider: str
    mode: str
    dtype: str
    device: str
    median_ms: float | None = None
    p20_ms: float | None = None
    p80_ms: float | None = None
    peak_mem_mb: float | None = None
    gbps: float | None = None
    tflops: float | None = None
    frac_copy_bw: float | None = None
    frac_matmul: float | None = None
    tokens_per_s: float | None = None
    note: str = ""
    env: dict = field(default_factory=dict)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], device: torch.device, *, warmup: int = 3, reps: int = 20) -> tuple[float, float, float]:
    """(median, p20, p80) in milliseconds."""
    if device.type == "cuda":
        import triton.testing

        q = triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
        return float(q[0]), float(q[1]), float(q[2])
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    qs = statistics.quantiles(samples, n=10) if len(samples) > 1 else samples * 9
    return statistics.median(samples), qs[1], qs[7]


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak device memory allocated during one call, above what was allocated before it."""
    if device.type != "cuda":
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    _sync(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def copy_bandwidth_gbps(device: torch.device) -> float:
    """Device-to-device copy rate, counting bytes read + written (the ceiling for memory-bound ops)."""
    n = (1 << 28) if device.type == "cuda" else (1 << 24)  # 1 GiB of fp32 on a GPU, 64 MiB on a CPU
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    ms, _, _ = time_fn(lambda: dst.copy_(src), device)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


def matmul_tflops(device: torch.device) -> float:
    """Dense matmul rate: bf16 8192^3 on a GPU, fp32 1024^3 on a CPU."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms, _, _ = time_fn(lambda: a @ b, device)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def git_commit() -> str:
    if os.environ.get("FCOT_GIT_COMMIT"):
        return os.environ["FCOT_GIT_COMMIT"]
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], stderr=subprocess.DEVNULL, text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment(device: torch.device) -> dict:
    import triton

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})"
    return {
        "device_name": name,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "commit": git_commit(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def run_cases(
    op: str,
    module,
    *,
    device: torch.device,
    dtype: torch.dtype,
    shapes: list[str] | None = None,
    providers: list[str] | None = None,
    modes: list[str] | None = None,
    ceilings: dict | None = None,
) -> list[Row]:
    """Time every (shape, provider, mode) of a benchmark module; unrunnable cases get a note."""
    ceilings = ceilings or {"copy_gbps": copy_bandwidth_gbps(device), "matmul_tflops": matmul_tflops(device)}
    env = {**environment(device), **{k: round(v, 2) for k, v in ceilings.items()}}
    rows = []
    for shape in shapes or list(module.SHAPES):
        for provider in providers or list(module.PROVIDERS):
            for mode in modes or list(MODES):
                row = Row(op, shape, provider, mode, str(dtype).replace("torch.", ""), device.type, env=env)
                try:
                    case = module.setup(module.SHAPES[shape], provider, mode, dtype, device)
                    row.median_ms, row.p20_ms, row.p80_ms = time_fn(case.fn, device)
                    row.peak_mem_mb = peak_memory_mb(case.fn, device)
                except Skip as why:
                    row.note = f"skipped: {why}"
                    rows.append(row)
                    continue
                seconds = row.median_ms * 1e-3
                if case.bytes:
                    row.gbps = case.bytes / seconds / 1e9
                    row.frac_copy_bw = row.gbps / ceilings["copy_gbps"]
                if case.tokens:
                    row.tokens_per_s = case.tokens / seconds
                if case.flops:
                    row.tflops = case.flops / seconds / 1e12
                    row.frac_matmul = row.tflops / ceilings["matmul_tflops"]
                rows.append(row)
                del case
    return rows


def write_results(rows: list[Row], out_dir: Path, stem: str) -> tuple[Path, Path]:
    """``<stem>.csv`` (one row per case, env flattened) and ``<stem>.json``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = out_dir / f"{stem}.csv", out_dir / f"{stem}.json"
    flat = [{**{k: v for k, v in asdict(r).items() if k != "env"}, **r.env} for r in rows]
    if flat:
        with csv_path.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(flat[0]))
            writer.writeheader()
            writer.writerows(flat)
    json_path.write_text(json.dumps([asdict(r) for r in rows], indent=1))
    return csv_path, json_path


def format_table(rows: list[Row]) -> str:
    width = max([28, *(len(r.shape) + 2 for r in rows)])
    head = f"{'shape':<{width}}{'provider':<10}{'mode':<10}{'median ms':>11}{'p20':>9}{'p80':>9}{'GB/s':>9}{'%copy':>7}{'TFLOP/s':>9}{'peak MB':>9}{'tok/s':>10}  note"
    lines = [head]
    for r in rows:
        def f(v, fmt):
            return format(v, fmt) if v is not None else "-".rjust(int(fmt.split(".")[0]))
        lines.append(
            f"{r.shape:<{width}}{r.provider:<10}{r.mode:<10}{f(r.median_ms, '11.3f')}{f(r.p20_ms, '9.3f')}{f(r.p80_ms, '9.3f')}"
            f"{f(r.gbps, '9.1f')}{f(r.frac_copy_bw and 100 * r.frac_copy_bw, '7.1f')}{f(r.tflops, '9.1f')}{f(r.peak_mem_mb, '9.1f')}{f(r.tokens_per_s, '10.0f')}  {r.note}"
        )
    return "\n".join(lines)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def bench_shapes(gpu: list[str], cpu: list[str]) -> list[str]:
    """The shapes a pytest-benchmark suite takes: ``gpu`` on a GPU machine, else ``cpu``."""
    return gpu if torch.cuda.is_available() else cpu


def run_pytest_benchmark(benchmark, module, shape: str, provider: str, mode: str) -> None:
    """Body of every ``bench_<op>`` pytest-benchmark function: set up the module's case (bf16 on
    a GPU, fp32 on a CPU) and time it, skipping with the setup's reason when it cannot run."""
    import pytest

    device = default_device()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        case = module.setup(module.SHAPES[shape], provider, mode, dtype, device)
    except Skip as why:
        pytest.skip(str(why))
    benchmark.extra_info.update(device=device.type, bytes=case.bytes, flops=case.flops)
    benchmark(lambda: (case.fn(), _sync(device)))


def eager_and_compiled(fn: Callable, provider: str) -> Callable:
    """The reference as given (eager) or wrapped in torch.compile (default mode)."""
    if provider == "compile":
        return torch.compile(fn, dynamic=False)
    return fn


def make_mode_fn(forward: Callable[[], torch.Tensor], mode: str, params: list[torch.Tensor]) -> Callable[[], object]:
    """Wrap a forward closure into the timed callable of ``mode``; backward reuses one forward graph."""
    if mode == "forward":
        def run():
            with torch.no_grad():
                return forward()
        return run
    if mode == "full":
        def run():
            out = forward()
            out.backward(grad)
            for p in params:
                p.grad = None
        grad = torch.randn_like(forward())
        return run
    out = forward()
    grad = torch.randn_like(out)

    def run():
        torch.autograd.grad(out, params, grad, retain_graph=True)
    return run
