"""Benchmark harness shared by every ``bench/bench_<op>.py``.

An op's benchmark module defines ``SHAPES`` (named shapes from :mod:`bench.models`),
``PROVIDERS`` and ``setup(shape, provider, mode, dtype, device) -> Case``. The harness times each
case (median, p20, p80), records peak memory, converts bytes/FLOPs into GB/s and TFLOP/s, and
relates them to the device-copy bandwidth and bf16 matmul rate measured in the same run.

On a GPU timing uses ``triton.testing.do_bench`` (CUDA events, L2 flushed between runs); on
a CPU it uses ``time.perf_counter`` and every row is labelled ``cpu``.

Every row carries a ``status``: ``ok`` (timed), ``skipped`` (the provider cannot run this case,
with the reason), ``missing`` (a peer library that is not importable: reported, never dropped),
``cut`` (the case ran past its share of the run's time and was interrupted: ``run_case``'s
``limit``) or ``error`` (the case raised; the message is kept and ``fcot bench`` exits non-zero). Every timed
row states its fraction of the relevant ceiling (``frac_ceiling``, by the roofline: the time the
bytes take at the copy bandwidth or the FLOPs at the matmul rate, whichever is longer, over the
measured time) and which ceiling that is (``bound``). Model-level cases that state neither bytes
nor FLOPs get their FLOPs counted by ``torch.utils.flop_counter`` on the first provider of the
shape (the reference, so fused kernels that the counter cannot see are credited the same work).
"""

from __future__ import annotations

import csv
import json
import os
import platform
import signal
import statistics
import threading
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
"""Committed runs: ``bench/results/<device>/<date>-<short commit>/``."""

MODES = ("forward", "backward", "full")
"""forward: the op alone; backward: the backward of a precomputed forward; full: both."""

BASE_PROVIDERS = ("eager", "compile", "compile-max", "triton", "cuda")
"""eager: the PyTorch reference; compile: torch.compile of it (default mode); compile-max: the
same in mode ``max-autotune-no-cudagraphs``; triton / cuda: fcot kernels."""
REFERENCE_PROVIDERS = ("eager", "compile", "compile-max")
"""The providers that run the PyTorch reference (as written or compiled)."""


class Skip(Exception):
    """Raised by a setup function when a provider cannot run a case (the reason is recorded)."""


class Missing(Skip):
    """Raised when a peer library is not importable: the row is kept with status ``missing``."""


class Cut(BaseException):
    """Raised inside a case that ran past its time share (a BaseException, so that libraries'
    ``except Exception`` blocks, torch.compile's included, do not swallow it)."""


STATUSES = ("ok", "skipped", "missing", "cut", "error")


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
    frac_ceiling: float | None = None
    """Roofline time (bytes at the copy bandwidth or FLOPs at the matmul rate, the longer) / median."""
    bound: str = ""
    """Which ceiling ``frac_ceiling`` is relative to: ``memory`` or ``compute``."""
    status: str = "ok"
    """ok | skipped | missing | cut | error."""
    note: str = ""
    env: dict = field(default_factory=dict)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], device: torch.device, *, warmup: int = 3, reps: int = 20,
            quick: bool = False) -> tuple[float, float, float]:
    """(median, p20, p80) in milliseconds; ``quick`` times fewer runs (smoke runs)."""
    if device.type == "cuda":
        import triton.testing

        q = triton.testing.do_bench(fn, warmup=5 if quick else 25, rep=20 if quick else 100, quantiles=[0.5, 0.2, 0.8])
        return float(q[0]), float(q[1]), float(q[2])
    if quick:
        warmup, reps = 1, 5
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


def _git_dirty() -> bool | None:
    """Whether tracked files differ from the commit (None where there is no git checkout)."""
    try:
        out = subprocess.check_output(["git", "status", "--porcelain", "--untracked-files=no"],
                                      stderr=subprocess.DEVNULL, text=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return bool(out.strip())


def _nvidia_smi(index: int) -> dict:
    """Clocks, driver and power limit of GPU ``index`` from nvidia-smi ({} where it cannot run)."""
    fields = ("driver_version", "clocks.sm", "clocks.mem", "clocks.max.sm", "clocks.max.mem", "power.limit", "pstate")
    try:
        out = subprocess.check_output(
            ["nvidia-smi", f"--id={index}", f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits"],
            stderr=subprocess.DEVNULL, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return {}
    values = [v.strip() for v in out.strip().splitlines()[0].split(",")] if out.strip() else []
    names = ("driver", "sm_clock_mhz", "mem_clock_mhz", "max_sm_clock_mhz", "max_mem_clock_mhz", "power_limit_w", "pstate")
    return dict(zip(names, values))


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_mhz() -> str:
    try:
        mhz = [float(line.split(":", 1)[1]) for line in Path("/proc/cpuinfo").read_text().splitlines()
               if line.startswith("cpu MHz")]
    except (OSError, ValueError):
        return ""
    return f"{statistics.median(mhz):.0f}" if mhz else ""


def environment(device: torch.device) -> dict:
    """Provenance of a run: device name, clocks, driver, library versions, commit, time."""
    import triton

    try:
        import transformers
        tf_version = transformers.__version__
    except ImportError:
        tf_version = "not installed"
    env = {"device_type": device.type}
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        env.update(device_name=props.name, sm_count=props.multi_processor_count,
                   memory_gb=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda, **_nvidia_smi(index))
    else:
        env.update(device_name=f"cpu ({_cpu_model()})", cpu_count=os.cpu_count(), cpu_mhz=_cpu_mhz(),
                   torch_threads=torch.get_num_threads())
    env.update(
        torch=torch.__version__, triton=triton.__version__, transformers=tf_version,
        python=platform.python_version(), commit=git_commit(), dirty=_git_dirty(),
        time=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
    return env


def _count_flops(fn: Callable[[], object]) -> float:
    """FLOPs of one call, as ``torch.utils.flop_counter`` sees them (0 where it fails)."""
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with FlopCounterMode(display=False) as counter:
            fn()
    except Exception:  # noqa: BLE001 - a case the counter cannot trace just states no FLOPs
        return 0.0
    return float(counter.get_total_flops())


def _roofline(row: Row, case: Case, ceilings: dict) -> None:
    """Fill GB/s, TFLOP/s, tokens/s and the fractions of the ceilings from the median time."""
    seconds = row.median_ms * 1e-3
    t_mem = t_math = 0.0
    if case.bytes:
        row.gbps = case.bytes / seconds / 1e9
        row.frac_copy_bw = row.gbps / ceilings["copy_gbps"]
        t_mem = case.bytes / (ceilings["copy_gbps"] * 1e9)
    if case.flops:
        row.tflops = case.flops / seconds / 1e12
        row.frac_matmul = row.tflops / ceilings["matmul_tflops"]
        t_math = case.flops / (ceilings["matmul_tflops"] * 1e12)
    if case.tokens:
        row.tokens_per_s = case.tokens / seconds
    if t_mem or t_math:
        row.bound = "memory" if t_mem >= t_math else "compute"
        row.frac_ceiling = max(t_mem, t_math) / seconds


class _time_limit:
    """``with _time_limit(seconds):`` raises :class:`Cut` in the block once ``seconds`` pass
    (SIGALRM: it interrupts Python code, torch.compile and the timing loops, not one long C call,
    which is cut when it returns). No limit off the main thread or where there is no SIGALRM."""

    def __init__(self, seconds: float | None):
        self.seconds = seconds
        self.armed = (seconds is not None and hasattr(signal, "setitimer")
                      and threading.current_thread() is threading.main_thread())

    def _fire(self, signum, frame):
        raise Cut()

    def __enter__(self):
        if self.armed:
            if self.seconds <= 0:
                raise Cut()
            self.previous = signal.signal(signal.SIGALRM, self._fire)
            signal.setitimer(signal.ITIMER_REAL, self.seconds)
        return self

    def __exit__(self, *exc):
        if self.armed:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self.previous)
        return False


def run_case(op: str, module, shape: str, provider: str, mode: str, *, device: torch.device, dtype: torch.dtype,
             ceilings: dict, env: dict, quick: bool = False, excluded: tuple[str, ...] = (),
             deadline: float | None = None, limit: float | None = None, counted: dict | None = None) -> Row:
    """Time one (shape, provider, mode) case of a benchmark module into a row. A case that cannot
    run is a row with its reason (skipped / missing / error); ``excluded`` providers are rows that
    say so, and so is a case that starts after ``time.monotonic()`` passed ``deadline``. A case
    still running after ``limit`` seconds (or at the deadline, whichever comes first) is
    interrupted: a ``cut`` row. ``counted`` caches the FLOPs counted per (shape, mode) on the
    first provider that reaches it, for cases that state neither bytes nor FLOPs."""
    row = Row(op, shape, provider, mode, str(dtype).replace("torch.", ""), device.type, env=env)
    counted = {} if counted is None else counted
    share = limit
    if deadline is not None:
        left = deadline - time.monotonic()
        share = left if share is None else min(share, left)
    start = time.monotonic()
    try:
        if provider in excluded:
            raise Skip(f"provider {provider} excluded from this run (--exclude-provider)")
        if deadline is not None and time.monotonic() > deadline:
            raise Skip("the run's time budget ran out before this case (--time-budget)")
        with _time_limit(share):
            case = module.setup(module.SHAPES[shape], provider, mode, dtype, device)
            if not (case.bytes or case.flops):
                if (shape, mode) not in counted:  # once per shape and mode, on its first provider
                    counted[(shape, mode)] = _count_flops(case.fn)
                case.flops = counted[(shape, mode)]
            row.median_ms, row.p20_ms, row.p80_ms = time_fn(case.fn, device, quick=quick)
            row.peak_mem_mb = peak_memory_mb(case.fn, device)
    except Cut:
        row.status = "cut"
        row.note = f"cut: still running after its {share:.3g} s share of the run ({time.monotonic() - start:.0f} s)"
        row.median_ms = row.p20_ms = row.p80_ms = row.peak_mem_mb = None
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
    except Missing as why:
        row.status, row.note = "missing", f"missing: {why}"
    except Skip as why:
        row.status, row.note = "skipped", f"skipped: {why}"
    except Exception as err:  # noqa: BLE001 - recorded on the row; the run goes on and fails at the end
        row.status, row.note = "error", f"error: {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
        row.median_ms = row.p20_ms = row.p80_ms = row.peak_mem_mb = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    else:
        _roofline(row, case, ceilings)
        del case
    return row


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
    env: dict | None = None,
    quick: bool = False,
    excluded: tuple[str, ...] = (),
    progress: Callable[[Row], None] | None = None,
    deadline: float | None = None,
    limit: float | None = None,
) -> list[Row]:
    """Every (shape, provider, mode) of a benchmark module through :func:`run_case`, in that order;
    ``progress`` is called with each finished row (``fcot bench`` writes its files there)."""
    ceilings = ceilings or {"copy_gbps": copy_bandwidth_gbps(device), "matmul_tflops": matmul_tflops(device)}
    env = {**(env or environment(device)), **{k: round(v, 2) for k, v in ceilings.items()}}
    rows, counted = [], {}
    for shape in shapes or list(module.SHAPES):
        for provider in providers or list(module.PROVIDERS):
            for mode in modes or list(MODES):
                row = run_case(op, module, shape, provider, mode, device=device, dtype=dtype, ceilings=ceilings,
                               env=env, quick=quick, excluded=excluded, deadline=deadline, limit=limit,
                               counted=counted)
                rows.append(row)
                if progress:
                    progress(row)
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
    """The terminal table of ``fcot bench``: %ceil is the fraction of the row's ceiling, followed by
    m (memory-bound: copy bandwidth) or c (compute-bound: matmul rate)."""
    width = max([28, *(len(r.shape) + 2 for r in rows)])
    head = (f"{'shape':<{width}}{'provider':<12}{'mode':<10}{'median ms':>11}{'p20':>9}{'p80':>9}{'GB/s':>9}"
            f"{'TFLOP/s':>9}{'%ceil':>8}{'peak MB':>9}{'tok/s':>10}  note")
    lines = [head]
    for r in rows:
        def f(v, fmt):
            return format(v, fmt) if v is not None else "-".rjust(int(fmt.split(".")[0]))
        ceil = f"{100 * r.frac_ceiling:6.1f} {r.bound[:1]}" if r.frac_ceiling is not None else "-".rjust(8)
        lines.append(
            f"{r.shape:<{width}}{r.provider:<12}{r.mode:<10}{f(r.median_ms, '11.3f')}{f(r.p20_ms, '9.3f')}{f(r.p80_ms, '9.3f')}"
            f"{f(r.gbps, '9.1f')}{f(r.tflops, '9.2f')}{ceil:>8}{f(r.peak_mem_mb, '9.1f')}{f(r.tokens_per_s, '10.0f')}  {r.note}"
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
    """The reference as given (eager) or wrapped in torch.compile: default mode (``compile``) or
    ``max-autotune-no-cudagraphs`` (``compile-max``)."""
    if provider == "compile":
        return torch.compile(fn, dynamic=False)
    if provider == "compile-max":
        return torch.compile(fn, dynamic=False, mode="max-autotune-no-cudagraphs")
    if provider != "eager":
        raise ValueError(f"provider {provider!r} is not one of {REFERENCE_PROVIDERS}")
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
