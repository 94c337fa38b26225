"""Build script: the Python packages plus the CUDA C++ extension ``fcot_kernels._C``.

The extension is built with CMake + ninja + pybind11 + nvcc (``CMakeLists.txt``). It does not
link libtorch, so it builds against a CPU-only torch and loads under any torch version.

Environment:
  FCOT_REQUIRE_CUDA=1      a missing nvcc or any compile error fails the install (CI sets it).
  FCOT_SKIP_CUDA=1         do not build the extension at all.
  FCOT_CUDA_ARCHS="90"     CMAKE_CUDA_ARCHITECTURES (default sm_90 only: the project's target
                           GPUs are H100/H200 and CI compiles the extension on 2 cores every run;
                           a second architecture doubles that. "80;90" adds A100 code).
  CUDA_HOME / CUDACXX      where nvcc lives, when it is not on PATH.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _find_nvcc() -> str | None:
    if os.environ.get("CUDACXX"):
        return os.environ["CUDACXX"]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def run(self) -> None:
        # Drop the CUDA extension when it is not built, so that setuptools does not look for
        # (or try to copy) a shared object that does not exist. Build into build_lib, as
        # setuptools' own run() does; it copies into the source tree afterwards when inplace.
        inplace, self.inplace = self.inplace, 0
        self.extensions = [
            ext for ext in self.extensions if not isinstance(ext, CMakeExtension) or self._try_cmake(ext)
        ]
        self.inplace = inplace
        super().run()

    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):  # CMake targets were built in run()
            super().build_extension(ext)

    def _try_cmake(self, ext: Extension) -> bool:
        required = _truthy("FCOT_REQUIRE_CUDA")
        if _truthy("FCOT_SKIP_CUDA"):
            if required:
                raise RuntimeError("FCOT_SKIP_CUDA=1 and FCOT_REQUIRE_CUDA=1 contradict each other")
            print("fcot-vl: FCOT_SKIP_CUDA=1, building without the CUDA extension fcot_kernels._C")
            return False
        nvcc = _find_nvcc()
        if nvcc is None:
            msg = "nvcc not found (set CUDA_HOME or CUDACXX)"
            if required:
                raise RuntimeError(f"fcot-vl: FCOT_REQUIRE_CUDA=1 but {msg}")
            print(f"fcot-vl: {msg}; building without the CUDA extension fcot_kernels._C")
            return False
        try:
            self._cmake_build(ext, nvcc)
        except (subprocess.CalledProcessError, OSError) as err:
            if required:
                raise RuntimeError(f"fcot-vl: building fcot_kernels._C failed: {err}") from err
            print(f"fcot-vl: building fcot_kernels._C failed ({err}); continuing without it")
            return False
        return True

    def _cmake_build(self, ext: Extension, nvcc: str) -> None:
        import pybind11

        out = Path(self.get_ext_fullpath(ext.name)).resolve()
        build_temp = Path(self.build_temp).resolve() / "cmake"
        build_temp.mkdir(parents=True, exist_ok=True)
        cfg = [
            f"-S{ROOT}",
            f"-B{build_temp}",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DCMAKE_CUDA_COMPILER={nvcc}",
            f"-DCMAKE_CUDA_ARCHITECTURES={os.environ.get('FCOT_CUDA_ARCHS', '90')}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out.parent}",
            f"-DPYTHON_MODULE_EXTENSION={''.join(out.suffixes)}",
        ]
        if shutil.which("ninja"):
            cfg.append("-GNinja")
        cmake = shutil.which("cmake") or "cmake"
        subprocess.check_call([cmake, *cfg])
        jobs = str(os.cpu_count() or 2)
        subprocess.check_call([cmake, "--build", str(build_temp), "--parallel", jobs])
        if not out.exists():
            raise OSError(f"CMake finished but {out} was not produced")


setup(ext_modules=[CMakeExtension("fcot_kernels._C")], cmdclass={"build_ext": CMakeBuild})
