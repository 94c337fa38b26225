"""fcot demo --quick: the whole chain (teacher, training-free compressors, distill, posttrain,
merge, eval, report) in a few steps, so CI proves it runs end to end."""

from __future__ import annotations

import json

import pytest

from fcot.cli import main


@pytest.mark.slow
def test_demo_quick(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--quiet", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = out / "report" / "report.md"
    assert printed.strip().splitlines()[-1].endswith(f"report: {report} (plots next to it)")
    models = json.loads((out / "eval.json").read_text())["models"]
    got = [(m["name"], m["role"], m["compressor"], m["visual_tokens_per_image"]) for m in models]
    assert got == [("teacher", "teacher", "none", 16),
                   ("avg@0.5", "training-free", "avg", 8), ("avg@0.75", "training-free", "avg", 4),
                   ("tome@0.5", "training-free", "tome", 8), ("tome@0.75", "training-free", "tome", 4),
                   ("prune@0.5", "training-free", "prune", 8), ("prune@0.75", "training-free", "prune", 4),
                   ("conv@0.5 distilled", "student", "conv", 8), ("conv@0.75 distilled", "student", "conv", 4),
                   ("conv@0.5 posttrained", "student", "conv", 8), ("conv@0.5 merged", "student", "conv", 8),
                   ("conv@0.75 posttrained", "student", "conv", 4)]
    # every stage logged its loss, and the report was drawn from those files
    for stage in ("teacher", "distill-0.5", "distill-0.75", "posttrain-0.5-a", "posttrain-0.5-b", "posttrain-0.75"):
        assert any("loss" in json.loads(x) for x in (out / stage / "metrics.jsonl").read_text().splitlines()), stage
    for png in ("loss.png", "accuracy_vs_tokens.png", "latency.png"):
        assert (out / "report" / png).stat().st_size > 1000
    assert "| conv@0.5 merged | student | conv | 0.5 | 8 |" in report.read_text()
    with pytest.raises(SystemExit) as e:  # an existing run folder is not overwritten silently
        main(["demo", "--quick", "--quiet", "--out", str(out)])
    assert e.value.code == 2 and "--overwrite" in capsys.readouterr().err


def test_task_splits_share_no_number(tmp_path):
    from fcot.demo import held_out, make_task

    numbers = {}
    for split, n in (("train", 120), ("test", 30)):
        jsonl = make_task(tmp_path / split, n, seed=3, cols=2, split=split)
        numbers[split] = {json.loads(x)["conversations"][1]["value"] for x in jsonl.read_text().splitlines()}
    assert numbers["train"] and numbers["test"] and not numbers["train"] & numbers["test"]
    assert all(held_out(v.split()) for v in numbers["test"])
    # every digit appears at both positions in the training split
    assert all({v.split()[k] for v in numbers["train"]} == set("0123456789") for k in (0, 1))
    with pytest.raises(ValueError, match="split='dev'"):
        make_task(tmp_path / "x", 1, seed=0, split="dev")
