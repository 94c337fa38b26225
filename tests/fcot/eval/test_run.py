"""fcot eval end to end on a tiny random InternVL saved to disk: loading, training-free
compression, batched generate vs one-at-a-time, scoring, the JSON written, bad input."""

from __future__ import annotations

import json

import pytest
import torch

from fcot import demo
from fcot.cli import main
from fcot.data.tiling import internvl_image_processor
from fcot.eval.answer import extract_answer
from fcot.eval.run import EvalSetError, EvalSkips, evaluate, load_eval_set, score_predictions


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import transformers

    root = tmp_path_factory.mktemp("eval")
    torch.manual_seed(0)
    model = transformers.InternVLForConditionalGeneration(demo.build_config()).eval()
    model.save_pretrained(root / "teacher")
    demo.build_tokenizer().save_pretrained(root / "teacher")
    internvl_image_processor(64, max_tiles=1).save_pretrained(root / "teacher")
    jsonl = demo.make_task(root / "data", 5, seed=1, cols=2)
    return root, jsonl


def _png(path, size=(8, 8)):
    from PIL import Image

    Image.new("RGB", size, (10, 20, 30)).save(path)
    return path


def test_load_eval_set_answers_and_ids(tmp_path):
    _png(tmp_path / "a.png")
    rec = {"id": "r", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nq1"}, {"from": "gpt", "value": "x"},
                                                          {"from": "human", "value": "q2"}, {"from": "gpt", "value": "y"}],
           "answers": ["x", ["y", "Y2"]]}
    (tmp_path / "s.jsonl").write_text(json.dumps(rec) + "\n")
    qs = load_eval_set(tmp_path / "s.jsonl")
    assert [q.qid for q in qs] == ["r#0", "r#1"]
    assert qs[1].answers == ["y", "Y2"] and qs[1].question == "<image>\nq2" and qs[0].images == [tmp_path / "a.png"]
    means, rows = score_predictions(qs, {"r#0": "x", "r#1": "because.\nAnswer: y2"})
    assert means["exact_match"] == 1.0 and rows[1]["raw"] == "because.\nAnswer: y2" and rows[1]["extracted"]
    with pytest.raises(EvalSetError, match="unknown question ids"):
        score_predictions(qs, {"r#0": "x", "r#1": "y", "r#7": "z"})
    with pytest.raises(EvalSetError, match="no prediction"):
        score_predictions(qs, {"r#0": "x"})
    rec["answers"] = ["x", ""]
    (tmp_path / "s.jsonl").write_text(json.dumps(rec) + "\n")
    skips = EvalSkips("s")
    assert [q.qid for q in load_eval_set(tmp_path / "s.jsonl", skips=skips)] == ["r#0"]
    assert skips.skipped == {"no_answer": 1} and "has no reference answer" in skips.examples["no_answer"][0]


def test_bad_records_skipped_and_counted(tmp_path):
    """Every kind of bad record is left out, counted by reason with file:line, before any model."""
    good = _png(tmp_path / "good.png")
    (tmp_path / "empty.png").write_bytes(b"")
    data = (tmp_path / "good.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    _png(tmp_path / "big.png", (300, 300))
    (tmp_path / "text.png").write_text("not an image")

    def rec(i, image="good.png"):
        return json.dumps({"id": f"r{i}", "image": image,
                           "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]})

    lines = [rec(0), "{not json", rec(2, "empty.png"), rec(3, "cut.png"), rec(4, "big.png"), rec(5, "missing.png"),
             rec(6, "text.png"), json.dumps({"id": "r7"}), json.dumps([1, 2]), "", rec(10)]
    (tmp_path / "s.jsonl").write_text("\n".join(lines) + "\n")
    skips = EvalSkips("s")
    qs = load_eval_set(tmp_path / "s.jsonl", max_pixels=200 * 200, skips=skips)
    assert [q.qid for q in qs] == ["r0#0", "r10#0"] and qs[0].images == [good]
    assert skips.skipped == {"bad_json": 1, "image_empty": 1, "corrupt_image": 2, "image_too_large": 1,
                             "image_missing": 1, "bad_schema": 2}
    assert skips.examples["bad_json"][0].startswith("s.jsonl:2:") and "s.jsonl:4:" in skips.examples["corrupt_image"][0]
    assert str(tmp_path / "cut.png") in skips.examples["corrupt_image"][0]
    assert skips.records == 10 and skips.questions == 2 and "skipped 8" in str(skips)
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(EvalSetError, match="no usable questions.*bad_json=1"):
        load_eval_set(tmp_path / "bad.jsonl")


def test_answer_extraction():
    assert extract_answer("The total is 4 + 5.\nAnswer: 9") == ("9", True)
    assert extract_answer("answer: 1\nreconsider... ANSWER :  2 ") == ("2", True)
    assert extract_answer("just 42") == ("just 42", False)
    assert extract_answer("Answer: 7", None) == ("Answer: 7", False)
    assert extract_answer("Final: 3 | rest", r"Final: (\d+)") == ("3", True)
    assert extract_answer("<a>x</a><a>y</a>", r"<a>(?P<answer>.*?)</a>") == ("y", True)
    with pytest.raises(ValueError, match="has 2 capturing groups"):
        extract_answer("x", r"(a)(b)")
    with pytest.raises(ValueError, match="not a regular expression"):
        extract_answer("x", r"(")


def test_evaluate_teacher_and_training_free(setup, tmp_path):
    root, jsonl = setup
    results = evaluate([str(root / "teacher")], jsonl, compressors=["avg"], ratios=[0.5, 0.75], out=tmp_path,
                       batch_size=4, max_new_tokens=3, max_tiles=1, progress=False, latency_samples=1)
    assert [(r.role, r.tokens_per_tile, r.visual_tokens_per_image) for r in results] == \
        [("teacher", 16, 16), ("training-free", 8, 8), ("training-free", 4, 4)]
    data = json.loads((tmp_path / "eval.json").read_text())
    assert [m["name"] for m in data["models"]] == ["teacher", "teacher+avg@0.5", "teacher+avg@0.75"]
    assert data["models"][1]["compressor"] == "avg" and data["models"][1]["ratio"] == 0.5
    rows = [json.loads(x) for x in (tmp_path / "predictions" / "teacher.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and data["models"][0]["n_questions"] == 5
    # the means are the rows' means, and the batched answers equal one-question-at-a-time answers
    assert data["models"][0]["metrics"]["anls"] == pytest.approx(sum(r["anls"] for r in rows) / 5)
    single = evaluate([str(root / "teacher")], jsonl, batch_size=1, max_new_tokens=3, max_tiles=1, progress=False,
                      latency_samples=1)
    assert [r["prediction"] for r in single[0].predictions] == [r["prediction"] for r in rows]
    assert results[0].prefill_ms > 0 and results[0].peak_memory_mb > 0


def test_cli_eval_bad_input(setup, tmp_path, capsys):
    root, jsonl = setup
    with pytest.raises(SystemExit) as e:
        main(["eval", str(root / "data"), "--eval-set", str(jsonl), "--quiet"])
    assert e.value.code == 2 and "has no config.json" in capsys.readouterr().err
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(SystemExit):
        main(["eval", str(tmp_path / "m"), "--eval-set", str(jsonl), "--quiet"])
    assert "is a 'llama' model" in capsys.readouterr().err
    (tmp_path / "p.jsonl").write_text(json.dumps({"id": "nope#0", "prediction": "1"}) + "\n")
    with pytest.raises(SystemExit):
        main(["eval", "--predictions", str(tmp_path / "p.jsonl"), "--eval-set", str(jsonl)])
    assert "unknown question ids" in capsys.readouterr().err


def test_cli_eval_ratio_without_compressor_warns(setup, capsys):
    root, jsonl = setup
    with pytest.warns(UserWarning, match="--ratio has no effect without --compressor"):
        assert main(["eval", str(root / "teacher"), "--eval-set", str(jsonl), "--ratio", "0.75", "--quiet",
                     "--max-tiles", "1", "--max-new-tokens", "3", "--limit", "2"]) == 0
    out = capsys.readouterr().out
    assert "teacher" in out and "tok/img" in out


def test_cli_scores_predictions_with_options(tmp_path, capsys):
    """--predictions with --answer-pattern and --metric-option: the scorer's conventions from the command line."""
    _png(tmp_path / "a.png")
    rec = {"id": "r", "image": "a.png", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "ab"}]}
    (tmp_path / "s.jsonl").write_text(json.dumps(rec) + "\n")
    (tmp_path / "p.jsonl").write_text(json.dumps({"id": "r#0", "prediction": "thinking...\nAnswer: ac"}) + "\n")
    args = ["eval", "--predictions", str(tmp_path / "p.jsonl"), "--eval-set", str(tmp_path / "s.jsonl")]
    assert main(args) == 0
    assert "anls=50.00%" in capsys.readouterr().out                       # RRC: NL = 0.5 keeps 0.5
    assert main(args + ["--metric-option", "anls.convention=paper"]) == 0
    assert "anls=0.00%" in capsys.readouterr().out
    assert main(args + ["--answer-pattern", "none"]) == 0                 # the raw text scored
    assert "exact_match=0.00%" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(args + ["--metric-option", "anls.tolerance=0.1"])
    assert "has no option" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(args + ["--metric-option", "anls"])
    assert "METRIC.KEY=VALUE" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(args + ["--answer-pattern", "(a)(b)"])
    assert "capturing groups" in capsys.readouterr().err


def test_everything_checked_before_the_first_model_loads(setup, tmp_path, monkeypatch):
    root, jsonl = setup
    import fcot.eval.run as run

    loads = []
    monkeypatch.setattr(run, "load_model", lambda *a, **k: loads.append(a) or (_ for _ in ()).throw(AssertionError("loaded")))
    teacher = str(root / "teacher")
    bad = [
        (dict(models=[teacher, str(tmp_path / "nope")]), "does not exist"),
        (dict(models=[teacher], compressors=["avg"], ratios=[0.3]), "does not support ratio=0.3"),
        (dict(models=[teacher], batch_size=0), "batch_size=0"),
        (dict(models=[teacher], names=["a", "b"]), "2 names for 1 models"),
        (dict(models=[teacher, teacher], names=["a", "a"]), "each model needs its own name"),
        (dict(models=[teacher], answer_pattern="("), "not a regular expression"),
        (dict(models=[teacher], metric_options={"vqa_accuracy": {"convention": "x"}}), "convention='x'"),
        (dict(models=[teacher], max_pixels=-1), "max_pixels=-1"),
        (dict(models=[teacher], device="nonsense"), "device='nonsense'"),
    ]
    for kwargs, match in bad:
        models = kwargs.pop("models")
        with pytest.raises(ValueError, match=match):
            evaluate(models, jsonl, out=tmp_path / "out", progress=False, **kwargs)
    assert not loads and not (tmp_path / "out" / "eval.json").exists()


def test_results_written_as_each_model_finishes(setup, tmp_path, monkeypatch):
    root, jsonl = setup
    import fcot.eval.run as run

    real = run.evaluate_model
    calls = []

    def second_fails(*a, **k):
        calls.append(k["name"])
        if len(calls) == 2:
            raise RuntimeError("the machine went away")
        return real(*a, **k)

    monkeypatch.setattr(run, "evaluate_model", second_fails)
    with pytest.raises(RuntimeError, match="went away"):
        evaluate([str(root / "teacher")], jsonl, compressors=["avg"], ratios=[0.5], out=tmp_path, batch_size=5,
                 max_new_tokens=2, max_tiles=1, progress=False, latency_samples=1)
    data = json.loads((tmp_path / "eval.json").read_text())
    assert data["complete"] is False and [m["name"] for m in data["models"]] == ["teacher"]
    assert (tmp_path / "predictions" / "teacher.jsonl").is_file() and data["skipped"]["questions"] == 5
