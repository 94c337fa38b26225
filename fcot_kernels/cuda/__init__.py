"""The one place that loads the compiled extension ``fcot_kernels._C``.

Importing this package never fails: when the extension is missing (no nvcc at install time,
a failed build) :func:`load` raises with the reason, and :func:`status` reports it."""

from __future__ import annotations

import importlib

_module = None
_error: str | None = None
_tried = False


def _try_load() -> None:
    global _module, _error, _tried
    if _tried:
        return
    _tried = True
    try:
        _module = importlib.import_module("fcot_kernels._C")
    except ImportError as err:  # not built, or built for another Python
        _error = f"the extension fcot_kernels._C is not built ({err}); reinstall with nvcc on PATH"


def status() -> tuple[bool, str]:
    """(built, reason): whether ``fcot_kernels._C`` imports, and why not."""
    _try_load()
    if _module is None:
        return False, str(_error)
    return True, f"built for sm_{_module.CUDA_ARCHS.replace(',', ', sm_')}"


def load():
    """The extension module; raises ``RuntimeError`` with the reason when it is not built."""
    _try_load()
    if _module is None:
        raise RuntimeError(str(_error))
    return _module


def dtype_code(dtype) -> int:
    import torch

    return {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}[dtype]


def stream_handle(device) -> int:
    """Raw ``cudaStream_t`` of the current torch stream on ``device``."""
    import torch

    return torch.cuda.current_stream(device).cuda_stream
