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
