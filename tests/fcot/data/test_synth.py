"""fcot.data.synth: deterministic synthetic documents that load as conversation records."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from fcot.data.synth import KINDS, PRESETS, SynthConfig, make_record, load_font, synthesize


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_bytes(tmp_path):
    cfg = SynthConfig(n=8, seed=5, width=320, height=240, font_size=11, cot=True)
    synthesize(tmp_path / "a", cfg)
    synthesize(tmp_path / "b", cfg)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    # A shorter run is a prefix of the longer one; another seed draws other pages.
    synthesize(tmp_path / "short", SynthConfig(n=3, seed=5, width=320, height=240, font_size=11, cot=True))
    long_lines = (tmp_path / "a" / "data.jsonl").read_text().splitlines()
    assert (tmp_path / "short" / "data.jsonl").read_text().splitlines() == long_lines[:3]
    synthesize(tmp_path / "c", SynthConfig(n=8, seed=6, width=320, height=240, font_size=11, cot=True))
    assert (tmp_path / "c" / "data.jsonl").read_text() != (tmp_path / "a" / "data.jsonl").read_text()


def test_records_and_summary(tmp_path):
    cfg = SynthConfig(n=12, seed=1, width=448, height=448, font_size=12, qa_per_image=3, cot=True)
    summary = synthesize(tmp_path / "out", cfg)
    records = [json.loads(line) for line in (tmp_path / "out" / "data.jsonl").read_text().splitlines()]
    assert len(records) == 12 and set(summary["kinds"]) <= set(KINDS) and sum(summary["kinds"].values()) == 12
    for r in records:
        conv = r["conversations"]
        assert [t["from"] for t in conv] == ["human", "gpt"] * 3
        assert conv[0]["value"].startswith("<image>\n") and "<image>" not in conv[2]["value"]
        for turn, answer in zip(conv[1::2], r["meta"]["answers"]):
            rationale, final = turn["value"].rsplit("\nAnswer: ", 1)
            assert final == answer and rationale
        assert (tmp_path / "out" / r["image"]).is_file() and r["meta"]["tiles"] == 1
    assert json.loads((tmp_path / "out" / "synth.json").read_text()) == summary
    per_token = summary["chars_per_visual_token"]
    assert per_token["64"] == pytest.approx(4 * per_token["256"], rel=1e-2)
    with pytest.raises(FileExistsError, match="--overwrite"):
        synthesize(tmp_path / "out", cfg)
    synthesize(tmp_path / "out", SynthConfig(n=2, seed=1, width=200, height=200), overwrite=True)
    assert len((tmp_path / "out" / "data.jsonl").read_text().splitlines()) == 2
    assert sorted(p.name for p in (tmp_path / "out" / "images").iterdir()) == ["000000.png", "000001.png"]


def test_dense_preset_carries_more_text_per_token_than_sparse():
    font_dense, font_sparse = load_font(PRESETS["dense"]["font_size"]), load_font(PRESETS["sparse"]["font_size"])
    dense = SynthConfig(n=1, seed=0, kinds=("grid",), **PRESETS["dense"])
    sparse = SynthConfig(n=1, seed=0, kinds=("grid",), **PRESETS["sparse"])
    page_d, rec_d = make_record(dense, 0, font_dense)
    page_s, rec_s = make_record(sparse, 0, font_sparse)
    # At 75 % compression (64 tokens per tile) a dense grid page has over 10 characters per token.
    assert page_d.chars / (rec_d["meta"]["tiles"] * 64) > 10
    assert page_s.chars / (rec_s["meta"]["tiles"] * 64) < 2


def test_synth_output_loads_as_a_dataset(tmp_path):
    from fcot.data.records import ConversationDataset
    from fcot.models import make_tiler
    from tests.fcot.tiny import tiny_tokenizer

    synthesize(tmp_path / "out", SynthConfig(n=4, seed=2, width=600, height=300, font_size=9))
    ds = ConversationDataset(tmp_path / "out" / "data.jsonl", tiny_tokenizer(), make_tiler("internvl_chat"),
                             tokens_per_tile=2)
    assert len(ds) == 4 and not ds.summary().skipped
    assert ds[0]["pixel_values"].shape == (3, 3, 448, 448)  # 2x1 grid + thumbnail


@pytest.mark.parametrize("bad, match", [({"n": 0}, "n=0"), ({"density": 0}, "density=0"), ({"width": 10}, "width=10"),
                                        ({"kinds": ("poster",)}, r"kinds=\['poster'\]"), ({"font_size": 2}, "font_size=2")])
def test_bad_config(bad, match):
    with pytest.raises(ValueError, match=match):
        SynthConfig(**{"n": 1, **bad})
