"""``python -m bench`` (also ``fcot bench``): every kernel benchmark and the end-to-end ones in one
run, written with their provenance; ``python -m bench report`` turns committed runs into plots and
``docs/performance.md``.

One run measures the two ceilings (device copy bandwidth, bf16 matmul rate; fp32 on a CPU) first,
then times every (op, shape, provider, mode) case with a progress bar and writes ``bench.csv``
and ``bench.json`` after every case (a cut run keeps all it measured) into
``bench/results/<device>/<date>-<short commit>/`` or ``--out``. Order: the fcot kernels, eager
and the peers of every op first, then the torch.compile providers (``compile``, ``compile-max``:
their compilation is the slowest part of a run), so a run cut short still has every
fcot-vs-eager/peer number. ``--time-budget`` ends the run (cases left are rows that say so) and
``--case-timeout`` caps each case (a case past its share is interrupted: a ``cut`` row). Every row
carries the device name, clocks, driver, torch/triton/transformers versions, the commit
(``-dirty`` in the folder name when tracked files differ from it) and its fraction of the
relevant ceiling. A provider that cannot run a case is a row with its reason; a peer that is not
installed is ``missing``. ``--merge`` adds the rows to an existing ``bench.json`` (replacing
those of the same cases): bench/gpu_suite.sh times the CUDA extension's cases that way once it
has built.

Shapes: ``target`` (the issues' performance-target shapes, the default on a GPU), ``all`` (every
model shape), ``cpu`` (small shapes, the only ones a CPU run takes). ``--quick`` is the smoke run:
CPU shapes, fewer timed runs, ``compile-max`` excluded (its autotuning takes minutes).
``--rehearse`` times the rehearsal op alone (bench/rehearsal.py; bench/gpu_suite.sh --rehearse).
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

from . import harness, targets
from .harness import RESULTS

OPS = {
    op: f"bench.bench_{op}"
    for op in ("shuffle_merge_norm", "compress_project", "merged_attention", "tome_merge", "fused_linear_distill",
               "apply_fcot", "distill_step")
}
"""Kernel benchmarks, then the end-to-end ones (apply_fcot: image path and prefill at each ratio;
distill_step: a stage-1 training step), in the order a run takes them (a time budget cuts the last)."""
REHEARSAL_OP = {"rehearsal": "bench.rehearsal"}
"""The op of ``--rehearse`` (not part of a real run)."""
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
QUICK_EXCLUDED = ("compile-max",)
LATE_PROVIDERS = ("compile", "compile-max")
"""Timed after every other case of every op."""


def device_slug(name: str) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3``; ``cpu (x86_64)`` -> ``cpu-x86_64``."""
    return re.sub(r"[^a-z0-9_]+", "-", name.lower()).strip("-") or "unknown"


def default_out(env: dict) -> Path:
    """``bench/results/<device>/<date>-<short commit>[-dirty]/``."""
    commit = env["commit"][:7] + ("-dirty" if env.get("dirty") else "")
    return RESULTS / device_slug(env["device_name"]) / f"{time.strftime('%Y-%m-%d')}-{commit}"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Subcommands: python -m bench report [DIR ...] renders the plots and docs/performance.md "
               "(python -m bench report --help); python -m bench dispatch DIR folds a GPU run's backend timings "
               "into fcot_kernels/dispatch_table.json. `fcot bench ...` runs the same commands.")
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
    p.add_argument("--case-timeout", type=float, metavar="SECONDS",
                   help="interrupt a case that runs longer than this (a 'cut' row); with --time-budget a case is "
                        "also cut at the budget's end")
    p.add_argument("--merge", action="store_true",
                   help="add the rows to --out's existing bench.json, replacing those of the same cases")
    p.add_argument("--rehearse", action="store_true",
                   help="time the rehearsal op only (bench/rehearsal.py: a slow case to cut, a late compile "
                        "provider); what bench/gpu_suite.sh --rehearse runs on a CPU")
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


def target_cases() -> set[tuple[str, str, str, str]]:
    """(op, shape, provider, mode) of every case a target in bench/targets.py reads."""
    out = set()
    for t in targets.TARGETS:
        out |= {(t.op, t.shape, p, t.mode) for p in t.fcot}
        if t.base:
            out.add((t.op, t.base_shape or t.shape, t.base, t.mode))
    return out


def plan(modules: dict, which: str, providers, modes) -> list[tuple[str, str, str, str]]:
    """(op, shape, provider, mode) in the order a run times them, so that a run cut short has the
    target numbers first: the cases the targets read, then the other cases, then the late
    providers' (torch.compile) target cases, then their other cases; the table order within each."""
    cases = [(op, shape, provider, mode)
             for op, module in modules.items() for shape in _shapes(module, which)
             for provider in ([p for p in providers if p in module.PROVIDERS] if providers else module.PROVIDERS)
             for mode in _modes(module, modes)]
    wanted = target_cases()

    def rank(case):
        late = LATE_PROVIDERS.index(case[2]) + 1 if case[2] in LATE_PROVIDERS else 0
        return (late, case not in wanted)
    return sorted(cases, key=rank)  # stable: the table order within each rank


def _canonical(modules: dict):
    """Sort key putting rows in the (op, shape, provider, mode) order of the modules' tables,
    whatever order they were timed (or merged) in."""
    order = list(modules)

    def key(row: harness.Row):
        module = modules.get(row.op)
        if module is None:
            return (len(order), row.op, 0, 0, 0)
        index = lambda seq, v: list(seq).index(v) if v in seq else len(seq)  # noqa: E731
        return (order.index(row.op), row.op, index(module.SHAPES, row.shape), index(module.PROVIDERS, row.provider),
                index(harness.MODES, row.mode))
    return key


def _load_rows(path: Path) -> list[harness.Row]:
    """The rows of an existing bench.json (for --merge)."""
    if not path.is_file():
        return []
    return [harness.Row(**r) for r in json.loads(path.read_text())]


def run(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    deadline = time.monotonic() + args.time_budget if args.time_budget else None  # counts the ceilings too
    from tqdm.auto import tqdm

    device = harness.default_device()
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    which = args.shapes or ("target" if device.type == "cuda" and not args.quick and not args.rehearse else "cpu")
    if device.type != "cuda" and which != "cpu":
        raise SystemExit(f"fcot bench: --shapes {which} needs a GPU (this machine has none); a CPU run takes --shapes cpu")
    excluded = tuple(args.exclude_provider or (QUICK_EXCLUDED if args.quick else ()))
    env = harness.environment(device)
    out = args.out or default_out(env)
    ceilings = {"copy_gbps": harness.copy_bandwidth_gbps(device), "matmul_tflops": harness.matmul_tflops(device)}
    env = {**env, **{k: round(v, 2) for k, v in ceilings.items()}}
    print(f"{env['device_name']}: copy {ceilings['copy_gbps']:.1f} GB/s, "
          f"{'bf16' if device.type == 'cuda' else 'fp32'} matmul {ceilings['matmul_tflops']:.2f} TFLOP/s; "
          f"commit {env['commit'][:12]}{' (dirty)' if env.get('dirty') else ''}; writing {out}", flush=True)
    names = {**OPS, **REHEARSAL_OP}
    chosen = ["rehearsal"] if args.rehearse else sorted(args.op or OPS, key=list(names).index)
    modules = {op: importlib.import_module(names[op]) for op in chosen}
    cases = plan(modules, which, args.provider, args.mode)
    bar = tqdm(total=len(cases), unit="case", disable=args.no_progress, dynamic_ncols=True)
    kept = _load_rows(out / "bench.json") if args.merge else []
    if kept:  # the merged file is sorted by every op it holds
        for op in dict.fromkeys(r.op for r in kept):
            if op not in modules and op in names:
                modules[op] = importlib.import_module(names[op])
    key = _canonical(modules)
    done: dict[tuple, harness.Row] = {(r.op, r.shape, r.provider, r.mode): r for r in kept}
    counted: dict[str, dict] = {}
    new_rows: list[harness.Row] = []
    for op, shape, provider, mode in cases:
        row = harness.run_case(op, modules[op], shape, provider, mode, device=device, dtype=dtype, ceilings=ceilings,
                               env=env, quick=args.quick, excluded=excluded, deadline=deadline,
                               limit=args.case_timeout, counted=counted.setdefault(op, {}))
        new_rows.append(row)
        done[(op, shape, provider, mode)] = row
        harness.write_results(sorted(done.values(), key=key), out, "bench")  # every case: a cut run keeps its rows
        bar.set_postfix_str(f"{op} {shape} {provider} {mode}", refresh=False)
        bar.update()
        if args.no_progress:
            print(f"{row.status:>7} {op} {shape} {provider} {mode}"
                  + (f" {row.median_ms:.3f} ms" if row.median_ms is not None else f" ({row.note})"), flush=True)
    bar.close()
    for op in modules:
        rows = sorted((r for r in new_rows if r.op == op), key=key)
        if rows:
            print(f"\n== {op} ({str(dtype).replace('torch.', '')}, {device.type})\n{harness.format_table(rows)}")
    counts = {s: sum(r.status == s for r in new_rows) for s in harness.STATUSES}
    print(f"\n{len(new_rows)} cases: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    print(f"wrote {out / 'bench.csv'} and {out / 'bench.json'}; plots and docs: python -m bench report {out}")
    if device.type == "cuda" and str(args.dispatch_table).lower() != "none" and not args.rehearse:
        from fcot_kernels import dispatch

        path = args.dispatch_table or dispatch.TABLE_PATH
        table = dispatch.measured_table([asdict(r) for r in done.values()],
                                        json.loads(path.read_text()) if path.exists() else {})
        path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
        print(f"wrote the measured backend order into {path}")
    if args.report:
        from . import report

        inside = RESULTS in out.resolve().parents
        report.main([] if inside else [str(out), "--docs", str(out / "performance.md")])
    if counts["error"]:
        for r in new_rows:
            if r.status == "error":
                print(f"ERROR {r.op} {r.shape} {r.provider} {r.mode}: {r.note}", file=sys.stderr)
        return 1
    return 0


def fold_dispatch(argv: list[str]) -> int:
    """``python -m bench dispatch DIR [--table PATH]``: fold the GPU backend timings of a run folder
    (its bench.json, e.g. what bench/gpu_suite.sh brought back) into the dispatch table."""
    from fcot_kernels import dispatch

    p = argparse.ArgumentParser(prog="python -m bench dispatch", description=fold_dispatch.__doc__)
    p.add_argument("run_dir", type=Path, help="a folder with the bench.json of a GPU run")
    p.add_argument("--table", type=Path, default=dispatch.TABLE_PATH, help="the table to update (default: the package's)")
    args = p.parse_args(argv)
    rows = json.loads((args.run_dir / "bench.json").read_text()) if (args.run_dir / "bench.json").is_file() else None
    if not rows:
        raise SystemExit(f"python -m bench dispatch: {args.run_dir} has no benchmark rows (bench.json)")
    if not any(r.get("device") == "cuda" for r in rows):
        raise SystemExit(f"python -m bench dispatch: {args.run_dir} is not a GPU run: CPU timings do not order backends")
    old = json.loads(args.table.read_text()) if args.table.exists() else {}
    args.table.write_text(json.dumps(dispatch.measured_table(rows, old), indent=1, sort_keys=True) + "\n")
    print(f"wrote the measured backend order of {args.run_dir} into {args.table}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m bench [options]`` runs the benchmarks; ``python -m bench report ...`` the report;
    ``python -m bench dispatch DIR`` folds a GPU run's backend timings into the dispatch table."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["dispatch"]:
        return fold_dispatch(argv[1:])
    if argv[:1] == ["report"]:
        from . import report

        return report.main(argv[1:])
    return run(argv)


if __name__ == "__main__":
    raise SystemExit(main())
