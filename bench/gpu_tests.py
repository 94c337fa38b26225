"""pytest plugin of bench/gpu_suite.sh: the curated, bounded GPU test subset (``-p bench.gpu_tests``).

Of the kernel tests (tests/fcot_kernels) it keeps, per op, the reference comparisons that carry
the GPU launch configurations: every bf16 case, the first fp32 case, and the cases without a
dtype parameter (small lists: layouts, head dims); and the real-model-shape tests once each.
``FCOT_GPU_TESTS=kernels`` keeps the cases that need no CUDA extension (run while it builds),
``FCOT_GPU_TESTS=cuda`` the ``backend="cuda"`` cases and the extension's own tests (run once it
is built). ``FCOT_GPU_TEST_TIMEOUT`` (seconds, default 60) caps each test: through pytest-timeout
when it is installed, else by SIGALRM here (a test past it fails with a message saying so).
"""

from __future__ import annotations

import os
import signal
import threading

import pytest

CURATED = {
    "test_shuffle_merge_norm.py": ("test_forward_and_grads_match_reference", "test_non_contiguous_input",
                                   "test_bf16_activations_with_fp32_parameters"),
    "test_compress_project.py": ("test_matches_reference", "test_real_model_widths"),
    "test_merged_attention.py": ("test_batched_matches_reference", "test_varlen_matches_reference",
                                 "test_low_precision", "test_head_dims", "test_real_model_heads"),
    "test_tome_merge.py": ("test_merge_vs_reference", "test_match_exact", "test_gradient_vs_reference",
                           "test_real_shapes_gpu"),
    "test_fused_linear_distill.py": ("test_matches_reference", "test_real_vocab_sizes"),
    "test_extension.py": None,  # all of it, in the cuda part
}
"""File name -> the test functions kept (None: every test of the file)."""


def _dtype(item):
    import torch

    params = getattr(getattr(item, "callspec", None), "params", {})
    found = [v for v in params.values() if isinstance(v, torch.dtype)]
    return found[0] if found else None


def _is_cuda(item) -> bool:
    params = getattr(getattr(item, "callspec", None), "params", {})
    return params.get("backend") == "cuda" or item.path.name == "test_extension.py"


def select(items) -> list:
    """The curated subset of ``items`` for FCOT_GPU_TESTS (kernels | cuda | all)."""
    import torch

    part = os.environ.get("FCOT_GPU_TESTS", "all")
    if part not in ("kernels", "cuda", "all"):
        raise pytest.UsageError(f"FCOT_GPU_TESTS={part!r}: expected kernels, cuda or all")
    kept, fp32_seen = [], set()
    for item in items:
        names = CURATED.get(item.path.name, ())
        func = item.originalname if hasattr(item, "originalname") else item.name.split("[")[0]
        if names is not None and func not in names:
            continue
        if part != "all" and _is_cuda(item) != (part == "cuda"):
            continue
        dtype = _dtype(item)
        if dtype is not None and dtype != torch.bfloat16 and not func.startswith("test_real"):
            key = (item.path.name, func, bool(_is_cuda(item)))
            if dtype != torch.float32 or key in fp32_seen:
                continue
            fp32_seen.add(key)
        kept.append(item)
    return kept


def pytest_collection_modifyitems(config, items):
    kept = select(items)
    dropped = [i for i in items if i not in set(kept)]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    items[:] = kept


def _timeout() -> float:
    return float(os.environ.get("FCOT_GPU_TEST_TIMEOUT", "60"))


def pytest_configure(config):
    if config.pluginmanager.hasplugin("timeout"):
        if not config.getoption("timeout", None):
            config.option.timeout = _timeout()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    """Fallback per-test limit where pytest-timeout is not installed."""
    if item.config.pluginmanager.hasplugin("timeout") or threading.current_thread() is not threading.main_thread():
        yield
        return
    limit = _timeout()

    def fire(signum, frame):
        pytest.fail(f"test ran past its {limit:.0f} s limit (FCOT_GPU_TEST_TIMEOUT)", pytrace=False)

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
