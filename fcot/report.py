"""``fcot report RUN_DIR``: plots and a markdown summary from a run folder's JSON files only.

Reads, under ``RUN_DIR``:

- ``eval.json`` files (written by ``fcot eval`` / ``fcot demo``; the first one found at the
  top, else all below): one entry per model with role, compressor, ratio, visual tokens per
  image, metrics, prefill latency and peak memory;
- ``metrics.jsonl`` files anywhere below (one per training stage; the trainers' log): lines
  with ``step`` and ``loss``, and the loss's parts where the stage logs them (stage 1: ``kl``,
  ``ce``, ``agreement``; other keys ignored); the stage is the line's ``stage`` or the file's
  folder name; a torn last line (an interrupted write) is dropped with a warning;
- ``prefill.json`` at the top (written by ``fcot demo``): the real-width prefill comparison,
  measured latency against the FLOP-ideal speed-up, shown as its own table.

Writes ``RUN_DIR/report/``: ``loss.png`` (loss per stage, with KL, CE and teacher-student
agreement beside it where logged), ``accuracy_vs_tokens.png``
(accuracy against visual tokens per image, one series per compressor, the teacher as a
horizontal line), ``latency.png`` (prefill latency per model) and ``report.md`` with the
table. Nothing is typed by hand; a folder with neither file is an error.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

from fcot.eval.metrics import METRICS
from fcot.train.checkpoint import read_metrics

CURVES = ("loss", "kl", "ce", "agreement")
"""The per-step series a stage may log; ``loss`` is always there, the others where the stage has them."""


class ReportError(ValueError):
    """RUN_DIR holds nothing to report."""


def _eval_files(run: Path) -> list[Path]:
    top = run / "eval.json"
    return [top] if top.is_file() else sorted(run.rglob("eval.json"))


def load_run(run: str | os.PathLike) -> tuple[list[dict[str, Any]], dict[str, dict[str, list[tuple[int, float]]]]]:
    """(models from the eval JSONs, {stage: {series: [(step, value), ...]}}) with series from
    :data:`CURVES` (``loss`` in every stage)."""
    run = Path(run)
    if not run.is_dir():
        raise ReportError(f"RUN_DIR {str(run)!r} is not a folder")
    models: list[dict[str, Any]] = []
    for f in _eval_files(run):
        data = json.loads(f.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or not isinstance(data.get("models"), list):
            raise ReportError(f"{f}: expected an object with a 'models' list (written by fcot eval)")
        models += data["models"]
    curves: dict[str, dict[str, list[tuple[int, float]]]] = defaultdict(lambda: defaultdict(list))
    for f in sorted(run.rglob("metrics.jsonl")):
        for entry in read_metrics(f.parent):
            if "loss" in entry and "step" in entry:
                stage = str(entry.get("stage") or f.parent.name)
                for key in CURVES:
                    if key in entry:
                        curves[stage][key].append((int(entry["step"]), float(entry[key])))
    if not models and not curves:
        raise ReportError(f"RUN_DIR {str(run)!r} holds no runs: no eval.json (fcot eval --out) and no metrics.jsonl "
                          "(training logs) below it")
    return models, {stage: dict(series) for stage, series in curves.items()}


def _plot_loss(curves, path: Path) -> None:
    """One row per stage: the loss, then each logged part (KL, CE, agreement) on its own axes."""
    import matplotlib.pyplot as plt

    stages = list(curves)
    cols = max(len(series) for series in curves.values())
    fig, axes = plt.subplots(len(stages), cols, figsize=(4 * cols, 3.2 * len(stages)), squeeze=False)
    for row, stage in zip(axes, stages):
        names = [k for k in CURVES if k in curves[stage]]
        for ax, name in zip(row, names):
            steps, values = zip(*sorted(curves[stage][name]))
            ax.plot(steps, values, marker="." if len(steps) < 30 else None)
            ax.set_title(f"{stage}: {name}")
            ax.set_xlabel("step")
            ax.set_ylabel(name)
            ax.grid(alpha=0.3)
        for ax in row[len(names):]:
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_accuracy(models, metric: str, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    # Training-free compressors as one line each over their ratios; trained models as labelled points.
    series: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for m in models:
        if m["role"] == "training-free":
            series[f"{m['compressor']} (training-free)"].append((m["visual_tokens_per_image"], 100 * m["metrics"][metric]))
    for label, points in sorted(series.items()):
        xs, ys = zip(*sorted(points))
        ax.plot(xs, ys, marker="o", linestyle="--", alpha=0.8, label=label)
    students = [m for m in models if m["role"] not in ("teacher", "training-free")]
    if students:
        ax.scatter([m["visual_tokens_per_image"] for m in students], [100 * m["metrics"][metric] for m in students],
                   marker="*", s=120, color="tab:red", zorder=3, label="trained students")
        seen: dict[float, int] = defaultdict(int)
        for m in students:  # labels of points at the same token count stacked, not overprinted
            x = m["visual_tokens_per_image"]
            ax.annotate(m["name"], (x, 100 * m["metrics"][metric]), fontsize=6, xytext=(5, -10 * seen[x]),
                        textcoords="offset points")
            seen[x] += 1
    for m in models:
        if m["role"] == "teacher":
            ax.axhline(100 * m["metrics"][metric], color="black", linestyle="--", linewidth=1,
                       label=f"{m['name']} ({m['visual_tokens_per_image']:.0f} tokens)")
    ax.set_xlabel("visual tokens per image")
    ax.set_ylim(-3, 103)
    ax.set_ylabel(f"{metric} (%)")
    ax.set_title("accuracy vs visual tokens")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_latency(models, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5, 0.6 * len(models) + 2), 3.5))
    ax.bar(range(len(models)), [m["prefill_ms"] for m in models])
    ax.set_xticks(range(len(models)), [m["name"] for m in models], rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("prefill latency (ms, batch 1, median)")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown_table(models) -> str:
    metrics = [m for m in METRICS if all(m in x["metrics"] for x in models)]
    head = "| model | role | compressor | ratio | visual tokens / image | " + " | ".join(metrics) + \
        " | prefill ms | peak memory MB |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for m in models:
        lines.append(f"| {m['name']} | {m['role']} | {m['compressor']} | {m['ratio']:g} | {m['visual_tokens_per_image']:.0f} | " +
                     " | ".join(f"{100 * m['metrics'][k]:.1f}" for k in metrics) +
                     f" | {_latency(m)} | {m['peak_memory_mb']:.0f} ({m['memory_kind']}) |")
    return "\n".join(lines)


def _latency(m: dict) -> str:
    """Median prefill ms, with its p20-p80 spread when the run recorded one."""
    if m.get("prefill_ms_p80"):
        return f"{m['prefill_ms']:.2f} ({m['prefill_ms_p20']:.2f}-{m['prefill_ms_p80']:.2f})"
    return f"{m['prefill_ms']:.2f}"


def prefill_section(prefill: dict) -> list[str]:
    """The demo's real-width prefill comparison (``prefill.json``): measured against FLOP-ideal."""
    def ms(d):
        return f"{d['median']:.0f} ({d['p20']:.0f}-{d['p80']:.0f})"

    lines = ["## Prefill at real widths", "",
             f"{prefill['model']}; {prefill['tiles']} tile(s) + {prefill['text_tokens']} text tokens, batch 1, "
             f"{prefill['threads']} threads (1-min load average {prefill.get('load_average_1min')} at the end: other "
             f"processes on the machine show up in the spread); {prefill['repeats']} {prefill['order']}; "
             "ms as median (p20-p80). "
             "Speed-up = uncompressed median / this median; FLOP-ideal = uncompressed FLOPs / these FLOPs "
             "(dense matmuls + attention products). The ViT runs on every tile whatever the ratio, so the whole "
             "prefill gains less than the LLM.", "",
             "| setting | visual tokens / tile | LLM tokens | prefill ms | speed-up | FLOP-ideal | LLM ms | LLM speed-up "
             "| LLM FLOP-ideal | FLOP-ideal, all 24+24 layers |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in prefill["rows"]:
        lines.append(f"| {r['setting']} | {r['tokens_per_tile']} | {r['llm_tokens']} | {ms(r['total_ms'])} | "
                     f"{r['speedup_total']:.2f}x | {r['ideal_total']:.2f}x | {ms(r['llm_ms'])} | {r['speedup_llm']:.2f}x | "
                     f"{r['ideal_llm']:.2f}x | {r['ideal_total_24_layers']:.2f}x |")
    return lines + [""]


def write_report(run: str | os.PathLike, metric: str = "exact_match") -> Path:
    """Write the plots and ``report.md`` under ``RUN_DIR/report``; returns the markdown path."""
    import matplotlib

    matplotlib.use("Agg")
    if metric not in METRICS:
        raise ValueError(f"metric={metric!r}: expected one of {sorted(METRICS)}")
    run = Path(run)
    models, curves = load_run(run)
    out = run / "report"
    out.mkdir(parents=True, exist_ok=True)
    parts = [f"# fcot report: {run.name}", ""]
    summary = run / "summary.json"
    if summary.is_file():
        info = json.loads(summary.read_text(encoding="utf-8"))
        parts += [f"- {k}: {v}" for k, v in info.items()] + [""]
    if models:
        _plot_accuracy(models, metric, out / "accuracy_vs_tokens.png")
        _plot_latency(models, out / "latency.png")
        parts += ["## Accuracy (%), visual tokens, latency, memory", "", markdown_table(models), "",
                  f"![accuracy vs visual tokens](accuracy_vs_tokens.png)", "", "![prefill latency](latency.png)", ""]
    prefill_path = run / "prefill.json"
    if prefill_path.is_file():
        parts += prefill_section(json.loads(prefill_path.read_text(encoding="utf-8")))
    if curves:
        _plot_loss(curves, out / "loss.png")
        parts += ["## Training loss", "", "| stage | series | steps | first | last |", "|---|---|---|---|---|"]
        for stage, series in curves.items():
            for name in (k for k in CURVES if k in series):
                pts = sorted(series[name])
                parts.append(f"| {stage} | {name} | {pts[-1][0]} | {pts[0][1]:.4f} | {pts[-1][1]:.4f} |")
        parts += ["", "![loss](loss.png)", ""]
    md = out / "report.md"
    md.write_text("\n".join(parts), encoding="utf-8")
    return md
