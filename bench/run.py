"""``fcot bench``: every kernel benchmark and the end-to-end ones in one run, written with their
provenance; ``fcot bench report`` turns committed runs into plots and ``docs/performance.md``.

One run measures the two ceilings (device copy bandwidth, bf16 matmul rate; fp32 on a CPU) first,
then times every (op, shape, provider, mode) case with a progress bar, and writes ``bench.csv`` and
``bench.json`` (rewritten after each op, so a cut run keeps what it measured) into
``bench/results/<device>/<date>-<short commit>/`` or ``--out``. Every row carries the device name,
clocks, driver, torch/triton/transformers versions, the commit (``-dirty`` in the folder name
when tracked files differ from it) and its fraction of the relevant ceiling. A provider that
cannot run a case is a row with its reason; a peer that is not installed is ``missing``.

Shapes: ``target`` (the issues' performance-target shapes, the default on a GPU), ``all`` (every
model shape), ``cpu`` (small shapes, the only ones a CPU run takes). ``--quick`` is the smoke run:
CPU shapes, fewer timed runs, ``compile-max`` excluded (its autotuning takes minutes).

``python -m bench.run`` is the same command.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from . import harness

OPS = {
    op: f"bench.bench_{op}"
    for op in ("shuffle_merge_norm", "compress_project", "merged_attention", "tome_merge", "fused_linear_distill",
               "apply_fcot", "distill_step")
}
"""Kernel benchmarks, then the end-to-end ones (apply_fcot: image path and prefill at each ratio;
distill_step: a stage-1 training step), in the order a run takes them (a time budget cuts the last)."""
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
RESULTS = Path(__file__).resolve().parent / "results"
QUICK_EXCLUDED = ("compile-max",)


def device_slug(name: str) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3``; ``cpu (x86_64)`` -> ``cpu-x86_64``."""
    return re.sub(r"[^a-z0-9_]+", "-", name.lower()).strip("-") or "unknown"


def default_out(env: dict) -> Path:
    """``bench/results/<device>/<date>-<short commit>[-dirty]/``."""
    commit = env["commit"][:7] + ("-dirty" if env.get("dirty") else "")
    return RESULTS / device_slug(env["device_name"]) / f"{time.strftime('%Y-%m-%d')}-{commit}"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fcot bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Subcommand: fcot bench report [DIR ...] renders the plots and docs/performance.md "
               "(fcot bench report --help).")
    p.add_argument("--op", action="append", choices=list(OPS), help="op to benchmark (repeatable; default all, in this order)")
    p.add_argument("--quick", action="store_true", help="smoke run: CPU shapes, fewer timed runs, compile-max excluded")
    p.add_argument("--out", type=Path, help="results folder (default bench/results/<device>/<date>-<short commit>/)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default bf16 on a GPU, fp32 on a CPU")
    p.add_argument("--shapes", choices=["cpu", "target", "all"],
                   help="default: target on a GPU, cpu on a CPU and with --quick")
    p.add_argument("--provider", action="append", help="restrict providers (repeatable)")
    p.add_argument("--exclude-provider", action="append", default=None,
                   help="providers to report as excluded instead of timing (repeatable; --quick excludes compile-max)")
    p.add_argument("--mode", action="append", choices=harness.MODES, help="restrict modes (repeatable)")
    p.add_argument("--dispatch-table", type=Path, default=None,
                   help="on a GPU, fold the backend timings into this dispatch table (default: the package's "
                        "fcot_kernels/dispatch_table.json); 'none' to skip")
    p.add_argument("--time-budget", type=float, metavar="SECONDS",
                   help="stop timing after this many seconds: the cases left are rows that say so (a GPU lease)")
    p.add_argument("--report", action="store_true",
                   help="then render the plots and docs/performance.md (fcot bench report; a run outside "
                        "bench/results/ gets its performance.md in its own folder)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs)")
    return p


def _shapes(module, which: str) -> list[str]:
    return list(module.SHAPES) if which == "all" else getattr(module, {"cpu": "CPU_SHAPES", "target": "TARGET_SHAPES"}[which])


def _modes(module, modes):
    """The modes a run times: those asked for, else the module's (model-level benchmarks have one)."""
    return modes or list(getattr(module, "RUN_MODES", harness.MODES))


def _cases(module, shapes, providers, modes) -> int:
    return len(shapes) * len(providers or module.PROVIDERS) * len(_modes(module, modes))


def run(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    deadline = time.monotonic() + args.time_budget if args.time_budget else None  # counts the ceilings too
    from tqdm.auto import tqdm

    device = harness.default_device()
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    which = args.shapes or ("target" if device.type == "cuda" and not args.quick else "cpu")
    if device.type != "cuda" and which != "cpu":
        raise SystemExit(f"fcot bench: --shapes {which} needs a GPU (this machine has none); a CPU run takes --shapes cpu")
    excluded = tuple(args.exclude_provider or (QUICK_EXCLUDED if args.quick else ()))
    env = harness.environment(device)
    out = args.out or default_out(env)
    ceilings = {"copy_gbps": harness.copy_bandwidth_gbps(device), "matmul_tflops": harness.matmul_tflops(device)}
    print(f"{env['device_name']}: copy {ceilings['copy_gbps']:.1f} GB/s, "
          f"{'bf16' if device.type == 'cuda' else 'fp32'} matmul {ceilings['matmul_tflops']:.2f} TFLOP/s; "
          f"commit {env['commit'][:12]}{' (dirty)' if env.get('dirty') else ''}; writing {out}", flush=True)
    modules = {op: importlib.import_module(OPS[op]) for op in sorted(args.op or OPS, key=list(OPS).index)}
    total = sum(_cases(m, _shapes(m, which), args.provider, args.mode) for m in modules.values())
    bar = tqdm(total=total, unit="case", disable=args.no_progress, dynamic_ncols=True)

    def progress(row: harness.Row) -> None:
        bar.set_postfix_str(f"{row.op} {row.shape} {row.provider} {row.mode}", refresh=False)
        bar.update()

    all_rows: list[harness.Row] = []
    for op, module in modules.items():
        rows = harness.run_cases(op, module, device=device, dtype=dtype, shapes=_shapes(module, which),
                                 providers=args.provider, modes=_modes(module, args.mode), ceilings=ceilings, env=env,
                                 quick=args.quick, excluded=excluded, progress=progress, deadline=deadline)
        bar.write(f"\n== {op} ({str(dtype).replace('torch.', '')}, {device.type})\n{harness.format_table(rows)}")
        all_rows += rows
        harness.write_results(all_rows, out, "bench")  # rewritten after each op: partial runs keep data
    bar.close()
    counts = {s: sum(r.status == s for r in all_rows) for s in ("ok", "skipped", "missing", "error")}
    print(f"\n{len(all_rows)} cases: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    print(f"wrote {out / 'bench.csv'} and {out / 'bench.json'}; plots and docs: fcot bench report {out}")
    if device.type == "cuda" and str(args.dispatch_table).lower() != "none":
        from fcot_kernels import dispatch

        path = args.dispatch_table or dispatch.TABLE_PATH
        table = dispatch.measured_table([asdict(r) for r in all_rows],
                                        json.loads(path.read_text()) if path.exists() else {})
        path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
        print(f"wrote the measured backend order into {path}")
    if args.report:
        from . import report

        inside = RESULTS in out.resolve().parents
        report.main([] if inside else [str(out), "--docs", str(out / "performance.md")])
    if counts["error"]:
        for r in all_rows:
            if r.status == "error":
                print(f"ERROR {r.op} {r.shape} {r.provider} {r.mode}: {r.note}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["report"]:
        from . import report

        return report.main(argv[1:])
    return run(argv)


if __name__ == "__main__":
    raise SystemExit(main())
