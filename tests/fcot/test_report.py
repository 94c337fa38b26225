"""fcot report: plots and markdown from a run folder's JSON files; an empty folder is an error."""

from __future__ import annotations

import json

import pytest

from fcot.cli import main
from fcot.report import ReportError, write_report


def _model(name, role, comp, ratio, tokens, em):
    return {"name": name, "role": role, "compressor": comp, "ratio": ratio, "tokens_per_tile": tokens,
            "visual_tokens_per_image": tokens, "metrics": {"exact_match": em, "anls": em, "relaxed_accuracy": em,
                                                           "vqa_accuracy": em},
            "prefill_ms": 1.5, "peak_memory_mb": 100.0, "memory_kind": "process_peak_rss", "n_questions": 4}


def test_report_from_json(tmp_path, capsys):
    models = [_model("teacher", "teacher", "none", 0.0, 16, 0.9), _model("t+avg@0.5", "training-free", "avg", 0.5, 8, 0.5),
              _model("t+avg@0.75", "training-free", "avg", 0.75, 4, 0.3), _model("s", "student", "conv", 0.5, 8, 0.875)]
    (tmp_path / "eval.json").write_text(json.dumps({"eval_set": "x", "models": models}))
    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher" / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 3.0 / s}) + "\n" for s in (1, 2, 3)))
    # stage 1 logs the loss's parts; its last line is torn (an interrupted write) and is dropped
    (tmp_path / "stage1").mkdir()
    lines = [json.dumps({"step": s, "loss": 2.0 / s, "kl": 1.0 / s, "ce": 4.0 / s, "agreement": 0.25 * s}) for s in (1, 2)]
    (tmp_path / "stage1" / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 3, "lo')
    assert main(["report", str(tmp_path)]) == 0
    assert str(tmp_path / "report" / "report.md") in capsys.readouterr().out
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| s | student | conv | 0.5 | 8 | 87.5 |" in md
    assert "| teacher | loss | 3 | 3.0000 | 1.0000 |" in md  # stage from the folder name, first and last loss
    assert "| teacher | kl |" not in md  # a stage shows only the series it logged
    for row in ("| stage1 | loss | 2 | 2.0000 | 1.0000 |", "| stage1 | kl | 2 | 1.0000 | 0.5000 |",
                "| stage1 | ce | 2 | 4.0000 | 2.0000 |", "| stage1 | agreement | 2 | 0.2500 | 0.5000 |"):
        assert row in md
    for png in ("loss.png", "accuracy_vs_tokens.png", "latency.png"):
        assert (tmp_path / "report" / png).read_bytes()[:4] == b"\x89PNG"


def test_report_empty_dir(tmp_path, capsys):
    with pytest.raises(ReportError, match="holds no runs"):
        write_report(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["report", str(tmp_path / "missing")])
    assert e.value.code == 2 and "is not a folder" in capsys.readouterr().err
