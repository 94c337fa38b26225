"""The compiled-code performance gate: every Triton kernel of fcot_kernels compiles for sm_90
(H100) at the launchers' real-shape configurations, fits in an H100 SM's shared memory, and,
like the CUDA C++ kernels' sm_90 SASS, passes the performance rules (no spills, 16-byte accesses,
async-fed wgmma GEMM loops, the occupancy the launcher assumes) or names why not in the script's
ALLOW table; docs/kernels.md's generated tables are the ones the script prints.

It runs twice: under the Triton this environment has (CI installs the newest) and under the
GPU machine's Triton (3.6, ``../shared/GPU.md``), installed side by side into an ignored folder
(``make triton-gpu``: ``.venv/triton-gpu``, or ``FCOT_GPU_TRITON=<folder>``), because the two
compile the same kernels differently (3.6 could not see the gathered GEMM operand's alignment).
Without that folder the second run is skipped, unless ``FCOT_REQUIRE_GPU_TRITON=1`` (CI) makes
that a failure.

The other tests run the kernels under the Triton interpreter on machines without a GPU, which
never compiles them. The compile runs in a subprocess (``tests/compile_triton_sm90.py``) because
the interpreter the tests use replaces ``triton.jit``.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("compile_triton_sm90.py")
ROOT = SCRIPT.parent.parent
GPU_TRITON = "3.6"  # the GPU machine's (../shared/GPU.md)


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


def _gpu_triton_dir() -> Path | None:
    folder = Path(os.environ.get("FCOT_GPU_TRITON", ROOT / ".venv" / "triton-gpu"))
    return folder if (folder / "triton" / "__init__.py").exists() else None


def _env(extra_path: Path | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(str(p) for p in (extra_path, env.get("PYTHONPATH")) if p)
    return env


def _probe(env: dict) -> tuple[str, bool]:
    """(Triton version, whether its bundled ptxas + cuobjdump for sm_90 exist) in that environment."""
    code = ("import triton, pathlib; b = pathlib.Path(triton.__file__).parent / 'backends' / 'nvidia' / 'bin'; "
            "print(triton.__version__, any((b / n).exists() for n in ('ptxas-blackwell', 'ptxas')) "
            "and (b / 'cuobjdump').exists())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    version, tools = out.stdout.split()
    return version, tools == "True"


def _gate(env: dict, version: str, *, cuda: bool) -> None:
    listed = subprocess.run([sys.executable, str(SCRIPT), "--list"], capture_output=True, text=True, env=env, timeout=120)
    assert listed.returncode == 0, listed.stdout + listed.stderr
    kernels = {line.split(" [")[0].split()[-1] for line in listed.stdout.splitlines()}
    assert kernels == {
        "_merge_ln_fwd_kernel", "_merge_ln_bwd_kernel", "_gemm_kernel", "_fld_kernel",
        "_tome_rows_kernel", "_tome_match_kernel", "_tome_merge_kernel", "_tome_unmerge_kernel",
        "_fwd_kernel", "_bwd_delta_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel", "_importance_kernel",
    }, listed.stdout
    # The table depends on the compiler: compare it only with the Triton it was generated with.
    docs = (ROOT / "docs" / "kernels.md").read_text()
    same_triton = f"(Triton {version}, sm_90;" in docs
    cmd = [sys.executable, str(SCRIPT)] + (["--check-docs"] if same_triton else []) + ([] if cuda else ["--no-cuda"])
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    report = done.stdout + done.stderr
    assert done.returncode == 0, report
    assert f"(Triton {version}, sm_90;" in done.stdout, report
    configs = len(listed.stdout.splitlines())
    lines = done.stdout.splitlines()
    triton_rows = [ln for ln in lines if ln.startswith(("ok ", "ALLOW ")) and " cuda " not in ln]
    assert len(triton_rows) == configs, report
    assert not [ln for ln in lines if ln.startswith("FAIL")], report
    # The rules can fail: the gate reads every rule's inputs from the compiled code.
    assert any("vec 16B" in ln for ln in triton_rows) and any("mma wgmma" in ln for ln in triton_rows), report
    # The properties issue 18 fixed, read from this compiler's output (a regression fails here
    # even if someone adds an ALLOW entry for it).
    conv = [ln for ln in triton_rows if "_gemm_kernel [conv" in ln and "unaligned" not in ln and "fp32]" not in ln]
    assert conv and all("narrow 0" in ln and "spill 0/0" in ln and " async 24 " in ln for ln in conv), report
    assert all(int(ln.split("blocks/SM ")[1].split(">=")[0]) >= 2 for ln in conv), report
    dkdv = [ln for ln in triton_rows if "_bwd_dkdv_kernel [d=128" in ln and "fp32]" not in ln]
    assert dkdv and all("mma wgmma " in ln and "spill 0/0" in ln for ln in dkdv), report
    assert all(int(ln.split("wgmma-n ")[1].split()[0]) >= 32 for ln in dkdv), report
    dq = [ln for ln in triton_rows if "_bwd_dq_kernel [d=128" in ln and "fp32]" not in ln]
    assert dq and all(int(ln.split("wgmma-n ")[1].split()[0]) >= 64 for ln in dq), report  # wide tiles (were n = 16/32)
    smn = [ln for ln in triton_rows if "shuffle_merge_norm _merge_ln_bwd_kernel [avg C=1024" in ln]
    assert smn and all(" prefetch " in ln and "spill 0/0" in ln for ln in smn), report
    match = [ln for ln in triton_rows if "_tome_match_kernel [native_dot=1 128x128" in ln]
    assert match and all("mma wgmma " in ln and "spill 0/0" in ln for ln in match), report


@pytest.mark.slow
@pytest.mark.skipif(_sm90_ptxas() is None,
                    reason="Triton's bundled ptxas/cuobjdump (triton/backends/nvidia/bin) are missing: cannot compile for sm_90")
def test_every_triton_kernel_compiles_for_sm90():
    env = _env(ROOT)
    _gate(env, _probe(env)[0], cuda=True)


@pytest.mark.slow
def test_every_triton_kernel_compiles_for_sm90_under_the_gpu_machines_triton():
    folder = _gpu_triton_dir()
    if folder is None:
        msg = (f"Triton {GPU_TRITON} (the GPU machine's) is not installed side by side: run `make triton-gpu` "
               "or set FCOT_GPU_TRITON to a folder holding it")
        if os.environ.get("FCOT_REQUIRE_GPU_TRITON") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    env = _env(folder)
    env["PYTHONPATH"] = os.pathsep.join((str(folder), str(ROOT)))
    version, tools = _probe(env)
    assert version.startswith(GPU_TRITON + "."), f"{folder} holds Triton {version}, not {GPU_TRITON}"
    assert tools, f"{folder}: Triton {version} has no bundled ptxas/cuobjdump"
    # The CUDA C++ part does not depend on Triton: checked once, by the test above.
    _gate(env, version, cuda=False)


_PARSE = """
import json, runpy, sys
gate = runpy.run_path(sys.argv[1], run_name="gate")
parse = gate["csrc_launch_config"]
for folder in sys.argv[2:]:
    parse.__globals__["CSRC"] = folder
    try:
        print(json.dumps(parse()))
    except gate["CsrcParseError"] as err:
        print("ERROR", err)
"""


def test_the_gate_reads_the_cuda_launch_configuration_from_csrc(tmp_path):
    import json

    # Copies of csrc/ with one header changed, and with a launch bound the parser cannot read.
    changed, broken = tmp_path / "changed", tmp_path / "broken"
    for folder in (changed, broken):
        folder.mkdir()
        for f in (ROOT / "csrc").iterdir():
            (folder / f.name).write_text(f.read_text())
    header = next(p for p in changed.glob("*.cuh") if "kTomeThreads = 256" in p.read_text())
    header.write_text(header.read_text().replace("kTomeThreads = 256", "kTomeThreads = 128"))
    for p in broken.iterdir():
        p.write_text(re.sub(r"__launch_bounds__(\([^\n]*\)\s*smn_bwd_kernel)", r"__nothing__\1", p.read_text()))
    done = subprocess.run([sys.executable, "-c", _PARSE, str(SCRIPT), str(ROOT / "csrc"), str(changed), str(broken)],
                          capture_output=True, text=True, env=_env(ROOT), timeout=300)
    assert done.returncode == 0, done.stderr
    now, after_change, after_break = done.stdout.strip().splitlines()
    cfg = json.loads(now)
    # What csrc/ declares today (shuffle_merge_norm.cuh's launch bounds, tome_match.cuh's threads,
    # the row/merge thread clamps); the gate computes each kernel's launch from these.
    assert cfg["smn_max_threads"] == 512 and cfg["smn_max_items"] == 32 and cfg["smn_min_threads"] == 64
    assert cfg["smn_bwd_bounds"] == {"2": [512, 2], "4": [512, 1]}
    assert cfg["tome_match_threads"] == 256 and cfg["merge_threads"] == [128, 512]
    # A changed header changes what the gate assumes (not a hand-kept copy), and one the parser
    # cannot read fails loudly, naming what is missing.
    assert json.loads(after_change)["tome_match_threads"] == 128
    assert after_break.startswith("ERROR") and "smn_bwd_kernel" in after_break, after_break
