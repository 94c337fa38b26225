"""fcot.cli: the data synth and merge subcommands, end to end through main()."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from fcot.cli import main


def test_data_synth(tmp_path, capsys):
    out = tmp_path / "synth"
    args = ["data", "synth", "--out", str(out), "--n", "3", "--seed", "4", "--preset", "sparse", "--font-size", "20",
            "--kinds", "table", "receipt", "--cot", "--quiet"]
    assert main(args) == 0
    assert "wrote 3 records" in capsys.readouterr().out
    summary = json.loads((out / "synth.json").read_text())
    assert summary["config"]["font_size"] == 20 and summary["config"]["width"] == 448  # flag over preset
    assert set(summary["kinds"]) <= {"table", "receipt"}
    assert len((out / "data.jsonl").read_text().splitlines()) == 3
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2 and "already exists: pass --overwrite" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["data", "synth", "--out", str(tmp_path / "x"), "--n", "0"])
    assert "n=0: expected an int >= 1" in capsys.readouterr().err


def test_merge(tmp_path, capsys):
    tensors = [{"w": torch.randn(3, 4, dtype=torch.float32)} for _ in range(2)]
    for k, t in enumerate(tensors):
        (tmp_path / f"c{k}").mkdir()
        save_file(t, tmp_path / f"c{k}" / "model.safetensors")
    assert main(["merge", str(tmp_path / "m"), str(tmp_path / "c0"), str(tmp_path / "c1"), "--weights", "1", "3"]) == 0
    torch.testing.assert_close(load_file(tmp_path / "m" / "model.safetensors")["w"], 0.25 * tensors[0]["w"] + 0.75 * tensors[1]["w"])
    with pytest.raises(SystemExit) as e:
        main(["merge", str(tmp_path / "m2"), str(tmp_path / "c0"), str(tmp_path / "c1"), "--weights", "1"])
    assert e.value.code == 2 and "1 weights for 2 checkpoints" in capsys.readouterr().err


# ----------------------------------------------------------------------------- faults (issue 21): one line, rc 2


def _run(args, capsys):
    try:
        rc = main(args)
    except SystemExit as e:
        rc = e.code
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _one_error_line(err: str, command: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith(f"fcot {command}: error: ")]
    assert len(lines) == 1 and err.rstrip().endswith(lines[0]) and "Traceback" not in err, err
    return lines[0]


def _two_checkpoints(tmp_path):
    for k in range(2):
        (tmp_path / f"c{k}").mkdir()
        save_file({"w": torch.randn(3, 4)}, tmp_path / f"c{k}" / "model.safetensors")
    return [str(tmp_path / "c0"), str(tmp_path / "c1")]


def test_merge_truncated_input_one_line_and_debug_traceback(tmp_path, capsys, monkeypatch):
    ckpts = _two_checkpoints(tmp_path)
    shard = tmp_path / "c1" / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-7])
    rc, _, err = _run(["merge", str(tmp_path / "m"), *ckpts], capsys)
    line = _one_error_line(err, "merge")
    assert rc == 2 and str(shard) in line and "truncated" in line and "copy or save it again" in line
    for args, env in ((["merge", str(tmp_path / "m"), *ckpts, "--debug"], None), (["--debug", "merge", str(tmp_path / "m"), *ckpts], None),
                      (["merge", str(tmp_path / "m"), *ckpts], "1")):
        if env:
            monkeypatch.setenv("FCOT_DEBUG", env)
        rc, _, err = _run(args, capsys)
        assert rc == 2 and "Traceback (most recent call last)" in err and str(shard) in err.splitlines()[-1]
    assert not (tmp_path / "m").exists()


def test_merge_overflowing_weights_and_disk_full(tmp_path, capsys, monkeypatch):
    import errno

    import fcot.train.merge as merge

    ckpts = _two_checkpoints(tmp_path)
    rc, out, _ = _run(["merge", str(tmp_path / "m"), *ckpts, "--weights", "1e308", "1e308"], capsys)
    a, b = (load_file(f"{c}/model.safetensors")["w"] for c in ckpts)
    assert rc == 0 and torch.allclose(load_file(tmp_path / "m" / "model.safetensors")["w"], (a + b) / 2)

    def full(tensors, filename, metadata=None):
        open(filename, "wb").write(b"\0" * 8)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(merge, "save_file", full)
    rc, _, err = _run(["merge", str(tmp_path / "m2"), *ckpts], capsys)
    line = _one_error_line(err, "merge")
    assert rc == 2 and "no space left on device: writing the merge m2 in" in line and "needs about" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c0", "c1", "m"]


def test_eval_on_a_truncated_model_names_the_file_before_running(tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    save_file({"w": torch.randn(64, 64)}, model / "model.safetensors")
    (model / "config.json").write_text("{}")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    rc, _, err = _run(["eval", str(model), "--eval-set", str(tmp_path / "never-read.jsonl")], capsys)
    line = _one_error_line(err, "eval")
    assert rc == 2 and f"{weights} is damaged (1000 bytes" in line and "truncated" in line


@pytest.fixture(scope="module")
def eval_setup(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    from fcot import demo
    from fcot.data.tiling import internvl_image_processor

    root = tmp_path_factory.mktemp("eval")
    torch.manual_seed(0)
    transformers.InternVLForConditionalGeneration(demo.build_config()).eval().save_pretrained(root / "teacher")
    demo.build_tokenizer().save_pretrained(root / "teacher")
    internvl_image_processor(64, max_tiles=1).save_pretrained(root / "teacher")
    return root


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_eval_set_with_a_damaged_png(eval_setup, tmp_path, capsys, damage):
    """No traceback: either one line naming the image (rc 2), or the record skipped and counted, naming it (rc 0)."""
    from fcot import demo

    jsonl = demo.make_task(tmp_path / "data", 2, seed=1, cols=2)
    image = tmp_path / "data" / "images" / "00001.png"
    image.write_bytes(image.read_bytes()[:120] if damage == "truncated" else b"")
    rc, out, err = _run(["eval", str(eval_setup / "teacher"), "--eval-set", str(jsonl), "--max-new-tokens", "2",
                         "--max-tiles", "1", "--quiet"], capsys)
    assert "Traceback" not in err
    if rc == 2:
        assert str(image) in _one_error_line(err, "eval")
    else:
        assert rc == 0 and str(image) in out + err


def test_error_line_for_errors_without_a_file_name(tmp_path):
    import errno

    from safetensors import SafetensorError

    from fcot.cli import error_line

    assert error_line(ValueError("x.yaml: bad\n  option")) == "x.yaml: bad option"
    assert error_line(RuntimeError("boom")) == "RuntimeError: boom (run with --debug, or FCOT_DEBUG=1, for the traceback)"
    assert error_line(RuntimeError("boom"), debug=True) == "RuntimeError: boom"
    full = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "f"))
    assert error_line(full) == f"[Errno 28] No space left on device: '{tmp_path / 'f'}'"
    assert error_line(SafetensorError("Error while deserializing header: header too small")).startswith(
        "a safetensors file is damaged (Error while deserializing header: header too small)")
    # raised in fcot code that was reading a file: the line names it
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"")

    # a reader whose frame belongs to an fcot module (only fcot's frames are searched)
    namespace = {"SafetensorError": SafetensorError, "__name__": "fcot.some_reader"}
    exec("def _reader(path):\n    raise SafetensorError('Error while deserializing header: header too small')\n", namespace)
    with pytest.raises(SafetensorError) as e:
        namespace["_reader"](str(weights))
    assert error_line(e.value).startswith(f"{weights} is damaged (Error while deserializing header")
