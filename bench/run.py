"""Run benchmark modules and write CSV/JSON: ``python -m bench.run --help``."""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

import torch

from . import harness

OPS = {
    op: f"bench.bench_{op}"
    for op in ("apply_fcot", "compress_project", "distill_step", "fused_linear_distill", "merged_attention", "shuffle_merge_norm", "tome_merge")
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    p.add_argument("--op", action="append", choices=sorted(OPS), help="op to benchmark (repeatable; default all)")
    p.add_argument("--out", type=Path, default=Path("bench/results/latest"), help="folder for bench.csv / bench.json (all ops)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default bf16 on a GPU, fp32 on a CPU")
    p.add_argument("--shapes", choices=["cpu", "target", "all"], help="default: all on a GPU, cpu on a CPU")
    p.add_argument("--provider", action="append", help="restrict providers (repeatable)")
    p.add_argument("--mode", action="append", choices=harness.MODES, help="restrict modes (repeatable)")
    args = p.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    which = args.shapes or ("all" if device.type == "cuda" else "cpu")
    ceilings = {"copy_gbps": harness.copy_bandwidth_gbps(device), "matmul_tflops": harness.matmul_tflops(device)}
    print(f"device {device} ({harness.environment(device)['device_name']}): copy {ceilings['copy_gbps']:.1f} GB/s, "
          f"matmul {ceilings['matmul_tflops']:.1f} TFLOP/s")
    all_rows = []
    for op in args.op or sorted(OPS):
        module = importlib.import_module(OPS[op])
        shapes = {"cpu": module.CPU_SHAPES, "target": module.TARGET_SHAPES, "all": list(module.SHAPES)}[which]
        rows = harness.run_cases(op, module, device=device, dtype=dtype, shapes=shapes,
                                 providers=args.provider, modes=args.mode, ceilings=ceilings)
        print(f"\n== {op} ({dtype}, {device.type})")
        print(harness.format_table(rows), flush=True)
        all_rows += rows
        harness.write_results(all_rows, args.out, "bench")  # rewritten after each op: partial runs keep data
    print(f"\nwrote {args.out / 'bench.csv'} and {args.out / 'bench.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
