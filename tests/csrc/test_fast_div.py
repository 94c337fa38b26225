"""csrc/common.cuh's multiply-shift division (``FastDiv``), which replaced the runtime divides in
shuffle_merge_norm's address math, against C++ ``/``: compiled with nvcc as a host program (the
device version is the same arithmetic through ``__umulhi``), so it runs without a GPU."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[2] / "csrc"
NVCC = os.environ.get("CUDACXX") or shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"

PROGRAM = r"""
#include <cstdio>
#include <random>
#include <string>
#include "common.cuh"

int main(int argc, char** argv) {
  std::mt19937_64 gen(std::stoull(argv[1]));
  long checked = 0, bad = 0;
  auto check = [&](const fcot::FastDiv& f, int64_t d, int n) {
    ++checked;
    if (fcot::fast_div(f, n) != n / d) {
      if (++bad < 5) std::printf("d=%lld n=%d: %d != %lld\n", (long long)d, n, fcot::fast_div(f, n), (long long)(n / d));
    }
  };
  // Every divisor the kernels meet in practice (channels, grid widths, tokens per tile, r), with
  // the dividends around each multiple, the largest one and random ones.
  for (int64_t d = 1; d <= 20000; ++d) {
    const fcot::FastDiv f = fcot::make_fast_div(d);
    for (int k = 0; k < 64; ++k) {
      const int64_t m = static_cast<int64_t>(gen() % ((int64_t{1} << 31) / d));
      for (int64_t n : {m * d - 1, m * d, m * d + 1, m * d + d - 1}) {
        if (n >= 0 && n < (int64_t{1} << 31)) check(f, d, static_cast<int>(n));
      }
      check(f, d, static_cast<int>(gen() % (uint64_t{1} << 31)));
    }
    check(f, d, 2147483647);
    check(f, d, 0);
  }
  for (int k = 0; k < 200000; ++k) {  // large divisors
    const int64_t d = 1 + static_cast<int64_t>(gen() % ((uint64_t{1} << 31) - 1));
    const fcot::FastDiv f = fcot::make_fast_div(d);
    check(f, d, static_cast<int>(gen() % (uint64_t{1} << 31)));
    check(f, d, 2147483647);
    check(f, d, static_cast<int>(d - 1));
    if (d < 2147483647) check(f, d, static_cast<int>(d));
  }
  for (int64_t d : {int64_t{0}, int64_t{-3}, int64_t{1} << 31}) {
    try {
      fcot::make_fast_div(d);
      ++bad;
      std::printf("make_fast_div(%lld) did not throw\n", (long long)d);
    } catch (const std::invalid_argument&) {
    }
  }
  std::printf("checked %ld, mismatches %ld\n", checked, bad);
  return bad != 0;
}
"""


@pytest.mark.skipif(not Path(NVCC).exists(), reason="nvcc not found (CI builds the extension with it)")
def test_fast_div_equals_integer_division(tmp_path):
    src = tmp_path / "fast_div_check.cu"
    src.write_text(PROGRAM)
    exe = tmp_path / "fast_div_check"
    subprocess.run([NVCC, "-std=c++17", "-O2", f"-I{CSRC}", "-o", str(exe), str(src)], check=True, capture_output=True,
                   timeout=300)
    seed = os.environ.get("FCOT_TEST_SEED", "0")
    done = subprocess.run([str(exe), seed], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "mismatches 0" in done.stdout and int(done.stdout.split()[1].rstrip(",")) > 5_000_000
