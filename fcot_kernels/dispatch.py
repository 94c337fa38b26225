"""Backend selection shared by every public op.

Each op takes ``backend=None | "auto" | "reference" | "triton" | "cuda"``. ``None`` means the
process-wide choice: the innermost :func:`use_backend` block, else the ``FCOT_BACKEND``
environment variable, else ``"auto"``. ``"auto"`` picks the CUDA C++ kernel when the extension
is built, the tensors are on a GPU and the op has one; else Triton when the tensors are on a
GPU; else the PyTorch reference. An explicitly requested backend that cannot run raises
:class:`BackendUnavailableError` with the reason: nothing falls back silently.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import json
import logging
import os
import warnings
from pathlib import Path
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from . import cuda as _cuda

log = logging.getLogger("fcot_kernels")

BACKENDS = ("reference", "triton", "cuda")
CHOICES = ("auto", *BACKENDS)

_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("fcot_backend", default=None)
_logged: set[tuple[str, str]] = set()


TABLE_PATH = Path(__file__).with_name("dispatch_table.json")
DEFAULT_ORDER: dict[str, tuple[str, ...]] = {
    "tome_match": ("triton", "cuda"),  # Triton: wgmma + cp.async; CUDA: fp32 FMA (see docs/kernels.md)
}
"""Kernel backends in order of preference where nothing is measured; ops not named: CUDA, Triton."""
_FALLBACK_ORDER = ("cuda", "triton")


def preferred_order(op: str, device_name: str, table: dict | None = None) -> tuple[str, ...]:
    """The kernel backends for ``op`` on ``device_name``, fastest first: the measured order in
    the dispatch table when it has one for this op and device, else ``DEFAULT_ORDER``."""
    table = _load_table() if table is None else table
    entry = table.get("measured", {}).get(op, {}).get(device_name)
    if entry:
        return tuple(entry["order"])
    return DEFAULT_ORDER.get(op, _FALLBACK_ORDER)


@functools.lru_cache(maxsize=1)
def _load_table() -> dict:
    if not TABLE_PATH.exists():
        return {}
    return json.loads(TABLE_PATH.read_text())


@functools.lru_cache(maxsize=None)
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def measured_table(rows: list[dict], table: dict | None = None) -> dict:
    """The dispatch table with ``rows`` (benchmark results: ``op``, ``shape``, ``mode``,
    ``provider``, ``median_ms``, ``env.device_name``) folded in: per op and device, the kernel
    backends ordered by their total median time over the (shape, mode) cases that every one of
    them ran. The ``tome_merge`` benchmark times match + merge and orders both ops."""
    table = json.loads(json.dumps(table if table is not None else _load_table()))  # deep copy
    measured = table.setdefault("measured", {})
    groups: dict[tuple[str, str], dict[str, dict[tuple[str, str], float]]] = {}
    for r in rows:
        if r.get("provider") not in BACKENDS[1:] or r.get("median_ms") is None:
            continue
        device = (r.get("env") or {}).get("device_name") or r.get("device")
        groups.setdefault((r["op"], device), {}).setdefault(r["provider"], {})[(r["shape"], r["mode"])] = r["median_ms"]
    for (op, device), by_backend in groups.items():
        if len(by_backend) < 2:
            continue
        common = set.intersection(*(set(cases) for cases in by_backend.values()))
        if not common:
            continue
        total = {b: sum(cases[c] for c in common) for b, cases in by_backend.items()}
        entry = {"order": sorted(total, key=total.get), "total_median_ms": {b: round(t, 4) for b, t in total.items()},
                 "cases": sorted(f"{s}/{m}" for s, m in common)}
        for name in ("tome_match", "tome_merge") if op == "tome_merge" else (op,):
            measured.setdefault(name, {})[device] = entry
    return table


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run these inputs on this machine."""


@dataclass(frozen=True)
class BackendStatus:
    name: str
    available: bool
    """Whether the backend can run at all in this process (on some device)."""
    reason: str
    """Why (not): what was found or what is missing."""


def _check_name(name: object, source: str) -> str:
    if name not in CHOICES:
        raise ValueError(f"{source}={name!r} is not a backend; expected one of {CHOICES}")
    return name  # type: ignore[return-value]


def current_backend() -> str:
    """The process-wide backend choice (what ``backend=None`` means right now)."""
    override = _override.get()
    if override is not None:
        return override
    return _check_name(os.environ.get("FCOT_BACKEND", "auto"), "FCOT_BACKEND")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the ops in this block with ``backend=name`` unless a call names its own."""
    token = _override.set(_check_name(name, "use_backend(name)"))
    try:
        yield
    finally:
        _override.reset(token)


def triton_interpreter() -> bool:
    """Whether Triton kernels run under the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


GPU_CONFIGS_ENV = "FCOT_GPU_CONFIGS"
_warned_gpu_configs = False


def forced_gpu_configs() -> bool:
    """Whether ``FCOT_GPU_CONFIGS=1`` asks the Triton launchers for the launch configurations
    (block sizes, programs per SM) they pick on a GPU, while the kernels run under the
    interpreter: the tests then execute the code paths a GPU will run (multi-block causal
    bounds, multi-step K loops, 16-byte-aligned gathers) on small shapes. On a GPU without the
    interpreter the launchers use those configurations anyway, so the flag warns there."""
    global _warned_gpu_configs
    if os.environ.get(GPU_CONFIGS_ENV, "0") != "1":
        return False
    if not triton_interpreter() and not _warned_gpu_configs and not torch.compiler.is_compiling():
        _warned_gpu_configs = True
        warnings.warn(f"{GPU_CONFIGS_ENV}=1 has no effect without TRITON_INTERPRET=1: compiled Triton kernels "
                      "already use the GPU launch configurations", stacklevel=3)
    return True


def _triton_status() -> tuple[bool, str]:
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed"
    if torch.cuda.is_available():
        return True, f"GPU {torch.cuda.get_device_name()}" + (" (interpreter on)" if triton_interpreter() else "")
    if triton_interpreter():
        return True, "no GPU; CPU tensors run under the Triton interpreter (TRITON_INTERPRET=1)"
    return False, "no GPU, and TRITON_INTERPRET=1 was not set before triton was imported"


def _cuda_status() -> tuple[bool, str]:
    built, reason = _cuda.status()
    if not built:
        return False, reason
    if not torch.cuda.is_available():
        return False, f"extension {reason}, but torch sees no CUDA device"
    return True, f"extension {reason}; GPU {torch.cuda.get_device_name()}"


def backends() -> dict[str, BackendStatus]:
    """What each backend can do here and why not: extension built? GPU? interpreter?"""
    found = {"reference": (True, "pure PyTorch; runs on any device"), "triton": _triton_status(), "cuda": _cuda_status()}
    return {name: BackendStatus(name, *found[name]) for name in BACKENDS}


def resolve(op: str, backend: str | None, x: torch.Tensor, *, has_cuda: bool, cuda_unfit: str | None = None) -> str:
    """The backend that runs ``op`` on tensors living on ``x.device``.

    ``has_cuda``: the op has a CUDA C++ kernel. ``cuda_unfit``: why that kernel cannot take
    these particular inputs (then ``auto`` skips it and an explicit ``"cuda"`` raises this reason).
    """
    name = current_backend() if backend is None else _check_name(backend, "backend")
    if cuda_unfit is not None:
        if name == "cuda":
            raise BackendUnavailableError(f"{op}: backend='cuda' cannot run these inputs: {cuda_unfit}")
        has_cuda = False
    on_gpu = x.device.type == "cuda"
    if name == "auto":
        name = "reference"
        if on_gpu:
            runnable = {"cuda": has_cuda and _cuda.status()[0], "triton": importlib.util.find_spec("triton") is not None}
            order = preferred_order(op, _device_name(x.device.index if x.device.index is not None else torch.cuda.current_device()))
            name = next((b for b in order if runnable.get(b)), "reference")
    elif name == "triton":
        if importlib.util.find_spec("triton") is None:
            raise BackendUnavailableError(f"{op}: backend='triton' requested but triton is not installed")
        if not on_gpu and not (x.device.type == "cpu" and triton_interpreter()):
            raise BackendUnavailableError(
                f"{op}: backend='triton' with tensors on {x.device} needs a CUDA device, or CPU tensors "
                "with TRITON_INTERPRET=1 set before triton is imported"
            )
    elif name == "cuda":
        if not has_cuda:
            raise BackendUnavailableError(f"{op}: has no CUDA C++ kernel; use backend='triton' or 'auto'")
        built, reason = _cuda.status()
        if not built:
            raise BackendUnavailableError(f"{op}: backend='cuda' requested but {reason}")
        if not on_gpu:
            raise BackendUnavailableError(f"{op}: backend='cuda' needs CUDA tensors, got tensors on {x.device}")
    # Dynamo cannot trace a Logger call (a graph break): log from eager calls only.
    if not torch.compiler.is_compiling() and (op, name) not in _logged:
        _logged.add((op, name))
        log.debug("%s runs on backend %r (device %s)", op, name, x.device)
    return name
