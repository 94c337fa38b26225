"""Compile the merged_attention Triton kernels for sm_90 (H100) on a machine without a GPU.

Run as a script (the test suite calls it in a subprocess, because the interpreter that the
tests use replaces ``triton.jit``): ``python tests/fcot_kernels/ops/compile_merged_attention_sm90.py``.
Prints one line per kernel with its shared memory, registers and stack (spills) and exits 1 if
a kernel fails to compile or needs more shared memory than an H100 SM offers.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fcot_kernels._attention import AttnGeometry  # noqa: E402
from fcot_kernels.triton import merged_attention as M  # noqa: E402

H100_SMEM = 227 * 1024
KERNELS = {
    "fwd": (M._fwd_kernel, "fwd", {}),
    "dkdv": (M._bwd_dkdv_kernel, "dkdv", {"BIAS_GRAD": True}),
    "dq": (M._bwd_dq_kernel, "dq", {}),
    "importance": (M._importance_kernel, "importance", {"BLOCK_R": 16}),
}


def _signature(kernel, ptr_type: str, consts: dict) -> dict:
    sig = {}
    for name in kernel.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in ("cu_q_ptr", "cu_k_ptr", "rows_ptr"):
            sig[name] = "*i32"
        elif name in ("q_ptr", "k_ptr", "v_ptr", "out_ptr", "do_ptr", "dq_ptr", "dk_ptr", "dv_ptr"):
            sig[name] = ptr_type
        elif name.endswith("_ptr"):
            sig[name] = "*fp32"
        elif name in ("qk_scale", "scale", "inv_count"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def _stack(cubin: bytes) -> str:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return "?"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
        fh.write(cubin)
        fh.flush()
        out = subprocess.run([tool, "-res-usage", fh.name], capture_output=True, text=True).stdout
    return " ".join(next((ln.split()[:2] for ln in out.splitlines() if "REG:" in ln), ["?"]))


def main() -> int:
    failed = 0
    # (dtype, pointer type, head dim, batched causal with bias, or varlen without bias / causal)
    variants = [(torch.bfloat16, "*bf16", d, False) for d in (64, 96, 128)]
    variants += [(torch.bfloat16, "*bf16", 128, True), (torch.float32, "*fp32", 128, False)]
    for dtype, ptr, head_dim, varlen in variants:
        geom = AttnGeometry(1, 32, 8, head_dim, 8192, 8192, varlen, 8192, 8192)
        for name, (kernel, kind, extra) in KERNELS.items():
            cfg = M._config(kind, geom, dtype)
            opts = {"num_warps": cfg.pop("num_warps"), "num_stages": cfg.pop("num_stages")}
            flags = dict(HAS_BIAS=not varlen, CAUSAL=not varlen, VARLEN=varlen,
                         PRECISION=M._precision(torch.empty(0, dtype=dtype)), BLOCK_D=M._block_d(head_dim))
            if "BIAS_GRAD" in extra:
                extra = {**extra, "BIAS_GRAD": not varlen}
            consts = dict(**flags, **extra, **cfg)
            try:
                compiled = triton.compile(ASTSource(kernel, _signature(kernel, ptr, consts), constexprs=consts),
                                          target=GPUTarget("cuda", 90, 32), options=opts)
            except Exception as err:  # report every kernel, then fail
                print(f"{dtype} d={head_dim} varlen={varlen} {name}: FAILED {type(err).__name__}: {err}")
                failed += 1
                continue
            smem = compiled.metadata.shared
            ok = smem <= H100_SMEM
            failed += not ok
            usage = _stack(compiled.asm["cubin"])
            print(f"{dtype} d={head_dim} varlen={varlen} {name}: shared {smem / 1024:.0f} KiB, {usage}"
                  + ("" if ok else " EXCEEDS H100 shared memory"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
