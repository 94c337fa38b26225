"""Every Triton kernel of fcot_kernels compiles for sm_90 (H100) at the launchers' real-shape
configurations, and fits in an H100 SM's shared memory.

The other tests run the kernels under the Triton interpreter on machines without a GPU, which
never compiles them; this catches kernels that would not build on a GPU. The compile runs in a
subprocess (``tests/compile_triton_sm90.py``) because the interpreter the tests use replaces
``triton.jit``. Register spills are printed by the script as warnings, not failures.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("compile_triton_sm90.py")


def _sm90_ptxas() -> str | None:
    """Triton's bundled ptxas for sm_90 (``ptxas-blackwell`` in Triton >= 3.5, ``ptxas`` before)."""
    spec = importlib.util.find_spec("triton")
    if spec is None or not spec.origin:
        return None
    bin_dir = Path(spec.origin).parent / "backends" / "nvidia" / "bin"
    for name in ("ptxas-blackwell", "ptxas"):
        if (bin_dir / name).exists() and (bin_dir / "cuobjdump").exists():
            return str(bin_dir / name)
    return None


@pytest.mark.skipif(_sm90_ptxas() is None,
                    reason="Triton's bundled ptxas/cuobjdump (triton/backends/nvidia/bin) are missing: cannot compile for sm_90")
def test_every_triton_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = str(SCRIPT.parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    listed = subprocess.run([sys.executable, str(SCRIPT), "--list"], capture_output=True, text=True, env=env, timeout=120)
    assert listed.returncode == 0, listed.stdout + listed.stderr
    kernels = {line.split(" [")[0].split()[-1] for line in listed.stdout.splitlines()}
    assert kernels == {
        "_merge_ln_fwd_kernel", "_merge_ln_bwd_kernel", "_gemm_kernel", "_fld_kernel",
        "_tome_match_kernel", "_tome_merge_kernel", "_tome_unmerge_kernel",
        "_fwd_kernel", "_bwd_delta_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel", "_importance_kernel",
    }, listed.stdout
    done = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env, timeout=900)
    report = done.stdout + done.stderr
    assert done.returncode == 0, report
    configs = len(listed.stdout.splitlines())
    compiled = [ln for ln in done.stdout.splitlines() if ln.startswith(("ok ", "WARN "))]
    assert len(compiled) == configs, report
