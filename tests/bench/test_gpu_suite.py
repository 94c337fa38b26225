"""``bash bench/gpu_suite.sh --rehearse OUT``: the GPU evidence run's orchestration on this CPU
machine (stages in order, stage timeouts, the build failing/timing out, a benchmark case cut past
its share, the per-test limit, the curated test selection, the files written, the exit status),
and the stage budgets' worst case against the 7 minutes the issue allows."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SUITE = REPO / "bench" / "gpu_suite.sh"
FILES = {"system.txt", "stages.txt", "build.log", "tests.log", "sanitizer.log", "bench.log", "bench.csv", "bench.json"}
ORDER = ["setup", "bench", "build", "tests", "bench-cuda", "tests-cuda", "memcheck", "racecheck", "total"]

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="the suite is a bash script run under coreutils' timeout")


def _start(out: Path, **env) -> subprocess.Popen:
    full = {**os.environ, "PYTHON": sys.executable, **env}
    full.pop("FCOT_REQUIRE_CUDA", None)  # the rehearsal sets it per stage, as on the GPU machine
    return subprocess.Popen(["bash", str(SUITE), "--rehearse", str(out)], cwd=REPO, env=full, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def rehearsals(tmp_path_factory) -> dict[str, tuple[int, str, Path]]:
    """Two rehearsals side by side (each mostly waits on its timeouts): a good run, and the bad day
    where the build outlasts its budget and one GPU test hangs."""
    root = tmp_path_factory.mktemp("suite")
    procs = {"ok": _start(root / "ok", FCOT_REHEARSE_BUILD="ok"),
             "timeout": _start(root / "timeout", FCOT_REHEARSE_BUILD="timeout", FCOT_REHEARSE_SLOW_TEST="1")}
    out = {}
    for name, proc in procs.items():
        log, _ = proc.communicate(timeout=900)
        out[name] = (proc.returncode, log, root / name)
    return out


def _stages(out: Path) -> dict[str, str]:
    lines = (out / "stages.txt").read_text().splitlines()
    names = [line.split()[0] for line in lines]
    assert names == ORDER, lines
    return {line.split()[0]: line for line in lines}


def _common(out: Path) -> None:
    assert {p.name for p in out.iterdir()} == FILES and all(p.is_file() for p in out.iterdir())
    rows = {r["provider"]: r for r in json.loads((out / "bench.json").read_text())}
    assert set(rows) == {"eager", "compile", "triton", "cuda", "slow"}
    assert rows["eager"]["status"] == rows["compile"]["status"] == "ok"
    assert rows["slow"]["status"] == "cut" and rows["slow"]["note"].startswith("cut: still running after its 3 s share")
    # The CUDA pass ran after the build and replaced the first pass's 'excluded' row.
    assert rows["cuda"]["status"] == "skipped" and "excluded" not in rows["cuda"]["note"], rows["cuda"]
    assert rows["eager"]["env"]["commit"] and rows["eager"]["device"] == "cpu"
    # Rows are written as their cases end, torch.compile's after every other case.
    timed = re.findall(r"^\s*(ok|skipped|cut|error|missing) rehearsal \S+ (\S+) forward", (out / "bench.log").read_text(),
                       re.M)
    assert [p for _, p in timed] == ["eager", "triton", "cuda", "slow", "compile", "cuda"], timed
    tests = (out / "tests.log").read_text()
    assert "test_not_curated" not in tests and "deselected" in tests
    assert "commit:" in (out / "system.txt").read_text()


def test_rehearsal_on_a_bad_day_keeps_the_benchmarks_and_fails(rehearsals):
    rc, log, out = rehearsals["timeout"]
    assert rc == 1, log
    stages = _stages(out)
    assert "exit 124 (timed out)" in stages["build"]
    assert "TIMED OUT after 3s" in (out / "build.log").read_text()
    assert "exit 0" in stages["bench"] and "exit 1" in stages["tests"]
    assert "skipped: the CUDA extension did not build" in stages["memcheck"] and "skipped" in stages["racecheck"]
    assert "test ran past its 3 s limit" in (out / "tests.log").read_text()
    assert (out / "sanitizer.log").read_text() == ""
    _common(out)


def test_rehearsal_of_a_good_run_passes_every_stage(rehearsals):
    rc, log, out = rehearsals["ok"]
    assert rc == 0, log
    stages = _stages(out)
    assert all(re.search(r"\bexit 0$", stages[name]) for name in ORDER), stages
    sanitizer = (out / "sanitizer.log").read_text()
    assert "--tool memcheck" in sanitizer and "--tool racecheck" in sanitizer
    _common(out)


def test_stage_budgets_fit_seven_minutes():
    text = SUITE.read_text()
    b: dict[str, int] = {}
    for name, value in re.findall(r"\b(B_[A-Z_]+|KILL)=(\d+)", text):
        b.setdefault(name, int(value))  # the GPU budgets come first; --rehearse's replace them later
    budgets = b
    worst = (b["B_SETUP"] + b["B_BENCH"] + max(b["B_BUILD"], b["B_TESTS"]) + b["B_BENCH_CUDA"] + b["B_TESTS_CUDA"]
             + b["B_MEMCHECK"] + b["B_RACECHECK"] + 7 * b["KILL"] + 6)
    assert worst <= 420, budgets
    header = text.split("set -uo pipefail")[0]
    assert f"setup {b['B_SETUP']} + bench {b['B_BENCH']} + max(build {b['B_BUILD']}, tests {b['B_TESTS']})" in header
    assert "<= 420 s = 7 minutes" in header
