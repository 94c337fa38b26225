"""Output allocation and the device guard for every kernel launcher.

Launchers allocate through :func:`empty` so that tests can poison outputs (NaN for floats, a
sentinel for integers) and prove that a kernel writes every element it returns."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

_poison = False


@contextlib.contextmanager
def poison_outputs(enabled: bool = True) -> Iterator[None]:
    """Fill every kernel output with NaN (floats) or -1 (integers) before the kernel runs."""
    global _poison
    previous, _poison = _poison, enabled
    try:
        yield
    finally:
        _poison = previous


def device_guard(t: torch.Tensor):
    """Make ``t``'s GPU current while a kernel launches: Triton and the extension both launch on
    the current device and stream, which need not be the device of the inputs."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def empty(shape: tuple[int, ...] | list[int], *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype, device=device)
    if _poison:
        out.fill_(float("nan") if out.is_floating_point() else -1)
    return out
