"""``fcot bench report [DIR ...]``: PNG plots of benchmark runs and the generated
``docs/performance.md``.

Each DIR is a folder ``fcot bench`` wrote (``bench.json``); without one, the newest committed run
of every device under ``bench/results/`` is taken. For every run and op it renders
``DIR/plots/<op>.png``: the speed-up of each provider over eager, over torch.compile and (fcot
kernels) over the fastest peer, per shape and mode; the fraction of the relevant ceiling; the peak
device memory. It then writes ``docs/performance.md`` from those runs alone (no typed numbers):
the targets the issues set (:mod:`bench.targets`) with the measured ratio, met or not, device and
commit, evaluated on the newest GPU run; each run's provenance and ceilings; per op a table of
the fcot kernel beside eager, compile and the peers. ``--check`` only compares the file with what
the committed runs generate (CI runs it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from . import targets as targets_mod
from .harness import RESULTS, STATUSES

REPO = RESULTS.parent.parent
DOCS = REPO / "docs" / "performance.md"

FCOT = ("triton", "cuda", "fused")
"""The fcot implementations of an op (the kernels; ``fused`` for the model-level benchmarks)."""
FCOT_VARIANTS = ("tr_nobias", "tr_imp")
EAGER = ("eager", "reference")
"""What "eager" means per op: the PyTorch reference as written (``reference`` where a model-level
benchmark has no ``eager`` row for the case)."""
COMPILED = ("compile", "compile-max")
PEERS = ("sdpa_fa", "sdpa_cudnn", "sdpa_eff", "sdpa_mask", "flashattn", "liger", "tome")


@dataclass
class Run:
    path: Path
    rows: list[dict]
    env: dict = field(default_factory=dict)

    @property
    def device(self) -> str:
        return self.rows[0].get("device", "?") if self.rows else "?"

    @property
    def label(self) -> str:
        return f"{self.env.get('device_name', '?')}, commit {self.env.get('commit', '?')[:7]}"


def load(path: Path) -> Run:
    file = path / "bench.json"
    if not file.is_file():
        raise SystemExit(f"fcot bench report: {path} has no bench.json (expected a folder written by fcot bench)")
    rows = json.loads(file.read_text())
    if not isinstance(rows, list) or not rows:
        raise SystemExit(f"fcot bench report: {file} holds no benchmark rows")
    return Run(path, rows, rows[0].get("env") or {})


def committed_runs(root: Path = RESULTS) -> list[Path]:
    """The newest run (by the time its rows record) of every device folder under ``root``."""
    newest = []
    for device in sorted(p for p in root.glob("*") if p.is_dir()):
        runs = [p.parent for p in device.glob("*/bench.json")]
        if runs:
            newest.append(max(runs, key=lambda p: (load(p).env.get("time", ""), p.name)))
    return newest


# -- the numbers of one (op, shape, mode) group -------------------------------------------------

def _groups(rows: list[dict], op: str) -> dict[tuple[str, str], dict[str, dict]]:
    groups: dict[tuple[str, str], dict[str, dict]] = {}
    for r in rows:
        if r["op"] == op:
            groups.setdefault((r["shape"], r["mode"]), {})[r["provider"]] = r
    return groups


def _ms(row: dict | None) -> float | None:
    return row.get("median_ms") if row else None


def _fastest(group: dict[str, dict], providers) -> tuple[str, dict] | None:
    timed = [(p, r) for p, r in group.items() if p in providers and _ms(r) is not None]
    return min(timed, key=lambda pr: _ms(pr[1])) if timed else None


def _eager(group: dict[str, dict]) -> tuple[str, dict] | None:
    return next(((p, group[p]) for p in EAGER if _ms(group.get(p)) is not None), None)


def speedups(group: dict[str, dict]) -> dict[str, dict[str, float]]:
    """baseline -> provider -> base time / provider time, for eager, compile and the best peer."""
    out: dict[str, dict[str, float]] = {"eager": {}, "compile": {}, "peer": {}}
    bases = {"eager": _eager(group), "compile": (("compile", group["compile"]) if _ms(group.get("compile")) else None),
             "peer": _fastest(group, PEERS)}
    for name, base in bases.items():
        if base is None:
            continue
        for p, r in group.items():
            if p == base[0] or _ms(r) is None or (name == "peer" and p not in FCOT + FCOT_VARIANTS):
                continue
            if name == "eager" and p in EAGER:
                continue
            out[name][p] = _ms(base[1]) / _ms(r)
    return out


# -- plots ---------------------------------------------------------------------------------------

def plot_op(run: Run, op: str, path: Path) -> Path:
    """One PNG per op: speed-up over eager / compile / best peer, fraction of ceiling, peak memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    groups = _groups(run.rows, op)
    labels = [f"{shape} [{mode}]" for shape, mode in groups]
    providers = sorted({p for g in groups.values() for p, r in g.items() if _ms(r) is not None})
    colors = {p: plt.cm.tab10(i % 10) for i, p in enumerate(providers)}
    height = max(3.0, 0.32 * len(labels) * max(1, min(len(providers), 4)) + 1.5)
    fig, axes = plt.subplots(1, 5, figsize=(26, height), sharey=True)
    ys = range(len(labels))
    bar_h = 0.8 / max(1, len(providers))

    def bars(ax, values: list[dict[str, float]], title: str, xlabel: str, log: bool, line: float | None, empty: str):
        drawn = False
        for k, p in enumerate(providers):
            xs = [v.get(p) for v in values]
            pts = [(y + k * bar_h - 0.4 + bar_h / 2, x) for y, x in zip(ys, xs) if x]
            if pts:
                ax.barh([y for y, _ in pts], [x for _, x in pts], height=bar_h, color=colors[p], label=p)
                drawn = True
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel)
        if log and drawn:
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        if line is not None and drawn:
            ax.axvline(line, color="k", lw=0.8, ls="--")
        if not drawn:
            ax.text(0.5, 0.5, empty, ha="center", va="center", transform=ax.transAxes, fontsize=9)
            ax.set_xticks([])
        ax.grid(axis="x", alpha=0.3)

    sp = [speedups(g) for g in groups.values()]
    bars(axes[0], [s["eager"] for s in sp], "speed-up over eager", "x (log)", True, 1.0, "no eager row timed")
    bars(axes[1], [s["compile"] for s in sp], "speed-up over torch.compile", "x (log)", True, 1.0,
         "no torch.compile row timed")
    bars(axes[2], [s["peer"] for s in sp], "fcot speed-up over the fastest peer", "x (log)", True, 1.0,
         "no fcot kernel and peer\ntimed side by side")
    frac = [{p: 100 * r["frac_ceiling"] for p, r in g.items() if r.get("frac_ceiling")} for g in groups.values()]
    bars(axes[3], frac, "fraction of the ceiling (roofline)", "% of copy BW or matmul rate", False, 100.0,
         "no row states bytes/FLOPs")
    mem = [{p: r["peak_mem_mb"] for p, r in g.items() if r.get("peak_mem_mb")} for g in groups.values()]
    bars(axes[4], mem, "peak device memory", "MB", False, None,
         f"peak device memory is measured\non a GPU only (this run: {run.device})")
    axes[0].set_yticks(list(ys), labels, fontsize=8)
    axes[0].invert_yaxis()
    handles = {h.get_label(): h for ax in axes for h in ax.get_legend_handles_labels()[0]}
    fig.suptitle(f"{op} ({run.label}; {run.rows[0].get('dtype')})", fontsize=11)
    fig.tight_layout()
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="upper center", ncol=min(len(handles), 10), fontsize=8,
                   bbox_to_anchor=(0.5, 0.0))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return path


# -- markdown ------------------------------------------------------------------------------------

def _f(v: float | None, fmt: str, none: str = "-") -> str:
    return none if v is None else format(v, fmt)


def _rel(path: Path, start: Path) -> str:
    return Path(os.path.relpath(path.resolve(), start.resolve())).as_posix()


def newest_gpu(runs: list[Run]) -> Run | None:
    """The run the targets are evaluated on."""
    return max((r for r in runs if r.device == "cuda"), key=lambda r: r.env.get("time", ""), default=None)


def targets_table(runs: list[Run]) -> list[str]:
    newest = newest_gpu(runs)
    lines = []
    if newest is None:
        lines.append("**No GPU run is committed**, so no target is measured yet: every row below says so. "
                     "`bash bench/gpu_suite.sh OUT COMMIT` on a GPU, then `fcot bench report` fills them in.")
    else:
        lines.append(f"Evaluated on the newest GPU run, `{_rel(newest.path, REPO)}` ({newest.label}).")
    lines += ["", "ideal: where arithmetic bounds a target, the best ratio the model's shapes allow, and the target "
              "is a fraction of it (docs/perf-notes.md): FLOP-ideal, the speed-up if time followed matmul FLOPs "
              "(bench/models.py `ideal_prefill_speedup`); roofline-ideal, matmuls at the measured matmul rate and "
              "the other passes at the copy bandwidth (`ideal_compress_project_speedup`).",
              "", "| issue | target | case | required | ideal | measured | measured / ideal | met | device | commit |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    rows = newest.rows if newest else []
    for t in targets_mod.TARGETS:
        o = targets_mod.evaluate(t, rows)
        case = f"`{t.op}` {t.shape} [{t.mode}]"
        if o.value is None:
            measured, met = f"not measured: {o.why}", "-"
        else:
            pct = t.metric.startswith("frac")
            measured = f"{100 * o.value:.1f} %" if pct else f"{o.value:.2f}x"
            measured += f" ({o.fcot_provider})"
            met = "yes" if o.met else "**no**"
        ideal = f"{t.ideal:.2f}x" if t.ideal else "-"
        of_ideal = f"{o.value / t.ideal:.2f}" if t.ideal and o.value is not None else "-"
        lines.append(f"| {t.source} | {t.what} | {case} | {t.statement} | {ideal} | {measured} | {of_ideal} | {met} | "
                     f"{o.device or '-'} | {o.commit or '-'} |")
    return lines


def provenance(run: Run) -> list[str]:
    env = dict(run.env)
    keys = [k for k in env if k not in ("copy_gbps", "matmul_tflops")]
    matmul = "bf16 8192^3" if run.device == "cuda" else "fp32 1024^3"
    lines = ["| field | value |", "|---|---|"]
    lines += [f"| {k} | {env[k]} |" for k in keys]
    lines.append(f"| copy bandwidth (read + write), same run | {_f(env.get('copy_gbps'), '.1f')} GB/s |")
    lines.append(f"| matmul rate ({matmul}), same run | {_f(env.get('matmul_tflops'), '.2f')} TFLOP/s |")
    counts = {s: sum(r.get("status", "ok") == s for r in run.rows) for s in STATUSES}
    lines.append(f"| cases | {len(run.rows)}: " + ", ".join(f"{n} {s}" for s, n in counts.items()) + " |")
    return lines


def op_table(run: Run, op: str) -> list[str]:
    lines = ["| shape | mode | fcot ms | eager ms | compile ms | compile-max ms | fastest peer ms | "
             "vs eager | vs compile | vs peer | % ceiling | peak MB |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (shape, mode), g in _groups(run.rows, op).items():
        best, eager, peer = _fastest(g, FCOT), _eager(g), _fastest(g, PEERS)
        if not any(_ms(r) is not None for r in g.values()):
            continue
        sp = speedups(g)
        ratio = {name: sp[name].get(best[0]) if best else None for name in sp}
        vs = {name: "-" if v is None else f"{v:.2f}x" for name, v in ratio.items()}
        shown = best or eager  # the fcot kernel's ceiling fraction and memory, else eager's (named)
        row = shown[1] if shown else {}
        ceil = (f"{100 * row['frac_ceiling']:.1f} ({row['bound']}{'' if best else ', ' + shown[0]})"
                if row.get("frac_ceiling") else "-")
        lines.append(
            f"| {shape} | {mode} | {_f(_ms(best[1]), '.3f') + f' ({best[0]})' if best else 'not timed'} | "
            f"{_f(_ms(eager[1]), '.3f') + ('' if eager[0] == 'eager' else f' ({eager[0]})') if eager else '-'} | "
            f"{_f(_ms(g.get('compile')), '.3f')} | {_f(_ms(g.get('compile-max')), '.3f')} | "
            f"{_f(_ms(peer[1]), '.3f') + f' ({peer[0]})' if peer else '-'} | {vs['eager']} | {vs['compile']} | "
            f"{vs['peer']} | {ceil} | {_f(row.get('peak_mem_mb'), '.1f')} |")
    notes = sorted({f"{r['provider']}: {r['note']}" for r in run.rows
                    if r["op"] == op and r.get("status") in ("missing", "cut", "error")})
    if notes:
        lines += ["", "Missing peers, cut cases and errors: " + "; ".join(f"`{n}`" for n in notes) + "."]
    return lines


def render(runs: list[Run], docs: Path) -> str:
    """The whole of docs/performance.md for ``runs``."""
    cmd = "fcot bench report" + "".join(f" {_rel(r.path, REPO)}" for r in runs)
    out = [
        "# Performance report", "",
        f"<!-- generated by `{cmd}` from the committed runs; edit bench/report.py or bench/targets.py, "
        "not this file (CI runs `fcot bench report --check`) -->", "",
        "Every number here comes from a committed `bench.json` written by `fcot bench` (`make bench`); "
        "`fcot bench report` regenerates this page and the plots. fcot ms is the fastest fcot "
        "implementation (Triton or CUDA kernel; `fused` for the model-level benchmarks); eager is the "
        "PyTorch reference (`reference`: the unfused fcot path where the model-level benchmark has no eager "
        "row); the speed-ups divide the baseline's median by fcot's. % ceiling is the roofline fraction: "
        "the time the case's bytes take at the copy bandwidth, or its FLOPs at the matmul rate (whichever "
        "is longer; `memory` or `compute` says which), over the measured time. Both ceilings are measured "
        "in the same run. CPU runs time the PyTorch providers only (Triton under the interpreter is not "
        "timed) and their numbers are CPU numbers.", "",
        "## Targets", "", *targets_table(runs), "", "## Runs", "",
    ]
    for run in runs:
        out += [f"### {run.env.get('device_name', '?')}: `{_rel(run.path, REPO)}`", "", *provenance(run), ""]
        if run.device != "cuda":
            out += ["A CPU run: the Triton and CUDA kernels are not timed, and `fused` runs fcot_kernels' default "
                    "backend on a CPU, which is the PyTorch reference, so fused vs reference differ by noise only. "
                    "Peak device memory is measured on a GPU only.", ""]
        for op in sorted({r["op"] for r in run.rows}):
            out += [f"#### {op}", "", *op_table(run, op), "",
                    f"![{op}]({_rel(run.path / 'plots' / f'{op}.png', docs.parent)})", ""]
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fcot bench report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dirs", nargs="*", type=Path, metavar="DIR",
                   help="run folders written by fcot bench (default: the newest committed run of each device "
                        "under bench/results/)")
    p.add_argument("--docs", type=Path, default=DOCS, help=f"the markdown to write (default {_rel(DOCS, Path.cwd())})")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if --docs differs from what the runs generate")
    p.add_argument("--no-plots", action="store_true", help="markdown only")
    args = p.parse_args(argv)
    dirs = args.dirs or committed_runs()
    if not dirs:
        raise SystemExit(f"fcot bench report: no runs given and none committed under {RESULTS}")
    runs = [load(d) for d in dirs]
    text = render(runs, args.docs)
    if args.check:
        current = args.docs.read_text() if args.docs.is_file() else ""
        if current != text:
            print(f"{args.docs} is not what the runs generate; run: fcot bench report "
                  + " ".join(_rel(r.path, Path.cwd()) for r in runs), file=sys.stderr)
            return 1
        print(f"{args.docs} matches {len(runs)} run(s)")
        return 0
    if not args.no_plots:
        for run in runs:
            for op in sorted({r["op"] for r in run.rows}):
                plot_op(run, op, run.path / "plots" / f"{op}.png")
    args.docs.parent.mkdir(parents=True, exist_ok=True)
    args.docs.write_text(text)
    print(f"wrote {args.docs}" + ("" if args.no_plots else " and the plots under each run's plots/"))
    gpu = newest_gpu(runs)
    for o in (targets_mod.evaluate(t, gpu.rows if gpu else []) for t in targets_mod.TARGETS):
        state = "not measured" if o.met is None else ("met" if o.met else "MISSED")
        print(f"  {state:>12}  {o.target.source:<22} {o.target.what} {o.target.statement}"
              + (f": {o.value:.3g}" if o.value is not None else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
