"""The compiled-code performance gate: every Triton kernel of fcot_kernels compiles for sm_90
(H100) at the launchers' real-shape configurations, fits in an H100 SM's shared memory, and,
like the CUDA C++ kernels' sm_90 SASS, passes the performance rules (no spills, 16-byte accesses,
async-fed wgmma GEMM loops, the occupancy the launcher assumes) or names why not in the script's
ALLOW table; docs/kernels.md's generated table is the one the script prints.

The other tests run the kernels under the Triton interpreter on machines without a GPU, which
never compiles them. The compile runs in a subprocess (``tests/compile_triton_sm90.py``) because
the interpreter the tests use replaces ``triton.jit``.
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


@pytest.mark.slow
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
    import triton

    docs = (SCRIPT.parent.parent / "docs" / "kernels.md").read_text()
    # The table depends on the compiler: compare it only with the Triton it was generated with.
    same_triton = f"(Triton {triton.__version__}, sm_90;" in docs
    cmd = [sys.executable, str(SCRIPT)] + (["--check-docs"] if same_triton else [])
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    report = done.stdout + done.stderr
    assert done.returncode == 0, report
    configs = len(listed.stdout.splitlines())
    lines = done.stdout.splitlines()
    triton_rows = [ln for ln in lines if ln.startswith(("ok ", "ALLOW ")) and " cuda " not in ln]
    assert len(triton_rows) == configs, report
    assert not [ln for ln in lines if ln.startswith("FAIL")], report
    # The rules can fail: the gate reads every rule's inputs from the compiled code.
    assert any("vec 16B" in ln for ln in triton_rows) and any("mma wgmma" in ln for ln in triton_rows), report
