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
    assert main(["report", str(tmp_path)]) == 0
    assert str(tmp_path / "report" / "report.md") in capsys.readouterr().out
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| s | student | conv | 0.5 | 8 | 87.5 |" in md
    assert "| teacher | 3 | 3.0000 | 1.0000 |" in md  # stage from the folder name, first and last loss
    for png in ("loss.png", "accuracy_vs_tokens.png", "latency.png"):
        assert (tmp_path / "report" / png).read_bytes()[:4] == b"\x89PNG"


def test_report_empty_dir(tmp_path, capsys):
    with pytest.raises(ReportError, match="holds no runs"):
        write_report(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["report", str(tmp_path / "missing")])
    assert e.value.code == 2 and "is not a folder" in capsys.readouterr().err
