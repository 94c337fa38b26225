"""fcot.data.records: parsing, placeholder expansion, label masking, bad records, collation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from fcot.data.records import IGNORE_INDEX, ConversationCollator, ConversationDataset, NoUsableRecordsError
from fcot.data.tiling import num_tiles
from fcot.models import make_tiler
from tests.fcot.tiny import tiny_tokenizer

pytest.importorskip("transformers")


def _png(path: Path, size: tuple[int, int], seed: int = 0) -> str:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8).numpy()
    Image.fromarray(pixels).save(path)
    return path.name


def _write(path: Path, records: list) -> Path:
    with open(path, "w", encoding="utf-8") as fh:
        for r in records:
            fh.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def _conv(*values: str) -> list[dict]:
    return [{"from": ("human", "gpt")[k % 2], "value": v} for k, v in enumerate(values)]


@pytest.fixture
def tok():
    return tiny_tokenizer()


@pytest.mark.parametrize("family", ["internvl", "internvl_chat"])
@pytest.mark.parametrize("tokens_per_tile", [256, 128, 64])
def test_expansion_and_masking(tmp_path, tok, family, tokens_per_tile):
    size = (1000, 300)  # 3x1 grid + thumbnail at max_tiles=12
    img = _png(tmp_path / "a.png", size)
    jsonl = _write(tmp_path / "d.jsonl", [{"image": img, "conversations": _conv("<image>\nWhat?", "Forty two.",
                                                                                  "And next?", "Seven.")}])
    ds = ConversationDataset(jsonl, tok, make_tiler(family), tokens_per_tile=tokens_per_tile)
    item = ds[0]
    tiles = num_tiles(*size, max_tiles=12)
    assert tiles == 4 and item["num_tiles"] == tiles and item["pixel_values"].shape == (tiles, 3, 448, 448)
    ids, labels = item["input_ids"], item["labels"]
    ctx = tok.convert_tokens_to_ids("<IMG_CONTEXT>")
    assert int((ids == ctx).sum()) == tokens_per_tile * tiles
    # One contiguous image block: <img> context... </img>
    start = int((ids == tok.convert_tokens_to_ids("<img>")).nonzero())
    end = int((ids == tok.convert_tokens_to_ids("</img>")).nonzero())
    assert end - start - 1 == tokens_per_tile * tiles and bool((ids[start + 1:end] == ctx).all())
    # The supervised tokens are exactly the answers with their end-of-turn token.
    supervised = tok.decode(ids[labels != IGNORE_INDEX])
    assert supervised == "Forty two.<|im_end|>Seven.<|im_end|>"
    assert bool((labels[labels != IGNORE_INDEX] == ids[labels != IGNORE_INDEX]).all())
    text = tok.decode(ids[(ids != ctx)])
    assert text.startswith("<s><|im_start|>user\n<img></img>\nWhat?<|im_end|>\n<|im_start|>assistant\nForty two.")
    assert ds.summary().usable == 1 and not ds.summary().skipped


def test_multi_image_system_turn_and_text_only(tmp_path, tok):
    a, b = _png(tmp_path / "a.png", (448, 448)), _png(tmp_path / "b.png", (900, 450), seed=1)
    records = [
        {"image": [a, b], "conversations": [{"from": "system", "value": "Be brief."}] +
         _conv("Image-1: <image>\nImage-2: <image>\nSame?", "No.")},
        {"conversations": _conv("Hello", "Hi.")},
        {"image": a, "conversations": _conv("No placeholder here", "Fine.")},  # gets <image>\n prepended
    ]
    ds = ConversationDataset(_write(tmp_path / "d.jsonl", records), tok, make_tiler("internvl_chat"),
                             tokens_per_tile=64, max_tiles=4, template="chatml")
    multi = ds[0]
    # Two images share max_tiles: each gets at most 4 // 2 = 2 grid tiles (2x1 -> 2 + thumbnail).
    assert multi["num_tiles"] == 1 + 3
    ctx = tok.convert_tokens_to_ids("<IMG_CONTEXT>")
    assert int((multi["input_ids"] == ctx).sum()) == 64 * 4
    assert tok.decode(multi["input_ids"]).startswith("<s><|im_start|>system\nBe brief.<|im_end|>\n")
    text_only = ds[1]
    assert text_only["num_tiles"] == 0 and text_only["pixel_values"].shape == (0, 3, 448, 448)
    prepended = tok.decode(ds[2]["input_ids"][ds[2]["input_ids"] != ctx])
    assert "<|im_start|>user\n<img></img>\nNo placeholder here" in prepended


def test_bad_records_are_counted_and_skipped(tmp_path, tok):
    good = _png(tmp_path / "good.png", (300, 300))
    (tmp_path / "corrupt.png").write_bytes(b"not a png at all")
    # A PNG whose header reads fine but whose pixel data is cut off: fails only when decoded.
    full = tmp_path / "full.png"
    _png(full, (200, 200), seed=3)
    (tmp_path / "truncated.png").write_bytes(full.read_bytes()[:300])
    records = [
        {"image": good, "conversations": _conv("<image>\nQ", "A")},                  # ok
        "{not json",                                                                   # invalid_json
        [1, 2],                                                                        # not_an_object
        {"image": good},                                                               # bad_conversations
        {"image": good, "conversations": _conv("<image>\nQ")},                        # bad_conversations (no answer)
        {"image": good, "conversations": [{"from": "gpt", "value": "A"}, {"from": "human", "value": "Q"}]},
        {"image": 7, "conversations": _conv("Q", "A")},                               # bad_image_field
        {"image": [good, good], "conversations": _conv("<image>\nQ", "A")},           # placeholder_mismatch
        {"image": "nowhere.png", "conversations": _conv("<image>\nQ", "A")},          # missing_image
        {"image": "corrupt.png", "conversations": _conv("<image>\nQ", "A")},          # unreadable_image
        {"image": good, "conversations": _conv("<image>\nQ", "")},                    # no_answer_tokens? no: end token
        {"image": good, "conversations": _conv("<image>\n" + "x" * 400, "A")},        # too_long
        {"image": "truncated.png", "conversations": _conv("<image>\nQ", "B")},        # corrupt_image, at load
        {"image": good, "conversations": _conv("<image>\nQ2", "C")},                  # ok
    ]
    jsonl = _write(tmp_path / "d.jsonl", records)
    with open(jsonl, "ab") as fh:
        fh.write(b"\xff\xfe bad utf-8\n")                                           # invalid_json
    ds = ConversationDataset(jsonl, tok, make_tiler("internvl_chat"), tokens_per_tile=4, max_length=300,
                             skip_log_dir=tmp_path / "skips")
    s = ds.summary()
    assert s.lines == 15
    assert dict(s.skipped) == {"invalid_json": 2, "not_an_object": 1, "bad_conversations": 3, "bad_image_field": 1,
                               "placeholder_mismatch": 1, "missing_image": 1, "unreadable_image": 1, "too_long": 1}
    assert len(ds) == s.usable == 4
    assert "nowhere.png does not exist" in s.examples["missing_image"][0]
    # A whole epoch runs; the truncated image is met, counted once, and the next record stands in.
    answers = [tok.decode(ds[i]["labels"][ds[i]["labels"] != IGNORE_INDEX]) for i in range(len(ds))]
    assert answers == ["A<|im_end|>", "<|im_end|>", "C<|im_end|>", "C<|im_end|>"]
    for i in range(len(ds)):  # a second epoch does not count it again
        ds[i]
    s = ds.summary()
    assert s.skipped["corrupt_image"] == 1 and s.usable == 3 and "truncated.png" in s.examples["corrupt_image"][0]
    assert "corrupt_image=1" in str(s) and s.as_dict()["skipped"]["corrupt_image"] == 1
    # Another process (a DataLoader worker) sees the same failure through the shared log: counted once.
    other = ConversationDataset(jsonl, tok, make_tiler("internvl_chat"), tokens_per_tile=4, max_length=300,
                                skip_log_dir=tmp_path / "skips")
    assert other.summary().skipped["corrupt_image"] == 1


def test_no_usable_record_is_an_error(tmp_path, tok):
    jsonl = _write(tmp_path / "d.jsonl", ["{oops", {"image": "missing.png", "conversations": _conv("<image>\nQ", "A")}])
    with pytest.raises(NoUsableRecordsError, match=r"no usable record: .*0 usable of 2 records.*invalid_json=1.*missing_image=1"):
        ConversationDataset(jsonl, tok, make_tiler("internvl_chat"))
    with pytest.raises(FileNotFoundError, match="jsonl='.*absent.jsonl'"):
        ConversationDataset(tmp_path / "absent.jsonl", tok)


def test_bad_arguments(tmp_path, tok):
    jsonl = _write(tmp_path / "d.jsonl", [{"conversations": _conv("Q", "A")}])
    with pytest.raises(ValueError, match="tokens_per_tile=0"):
        ConversationDataset(jsonl, tok, tokens_per_tile=0)
    with pytest.raises(ValueError, match="max_tiles=0"):
        ConversationDataset(jsonl, tok, max_tiles=0)
    with pytest.raises(ValueError, match="template='llama'"):
        ConversationDataset(jsonl, tok, template="llama")
    with pytest.raises(ValueError, match="tokenizer has no '<img>' token"):
        ConversationDataset(jsonl, tiny_tokenizer(image_tokens=False))
    with pytest.raises(ValueError, match="family='qwen'"):
        make_tiler("qwen")
    from fcot.data.tiling import internvl_image_processor

    with pytest.raises(ValueError, match="tile_size=224 but image_processor tiles at 448px"):
        make_tiler("internvl", internvl_image_processor(448), tile_size=224)
    with pytest.raises(ValueError, match="image_processor is for family='internvl'"):
        make_tiler("internvl_chat", internvl_image_processor(448))
    assert make_tiler("internvl", tile_size=224).tile_size == make_tiler("internvl_chat", tile_size=224).tile_size == 224


def test_collator_pads_and_stacks(tmp_path, tok):
    a, b = _png(tmp_path / "a.png", (900, 450)), _png(tmp_path / "b.png", (300, 300), seed=2)
    records = [{"image": a, "conversations": _conv("<image>\nQ", "A long answer")},
               {"conversations": _conv("text only", "B")},
               {"image": b, "conversations": _conv("<image>\nQ", "C")}]
    ds = ConversationDataset(_write(tmp_path / "d.jsonl", records), tok, make_tiler("internvl"), tokens_per_tile=8)
    items = [ds[i] for i in range(3)]
    batch = ConversationCollator(pad_token_id=tok.pad_token_id, pad_to_multiple_of=16)([*items])
    length = max(i["input_ids"].numel() for i in items)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["input_ids"].shape[1] == -(-length // 16) * 16
    assert batch["num_tiles"].tolist() == [3, 0, 1]
    torch.testing.assert_close(batch["pixel_values"], torch.cat([items[0]["pixel_values"], items[2]["pixel_values"]]))
    for row, item in enumerate(items):
        n = item["input_ids"].numel()
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
        assert bool((batch["input_ids"][row, n:] == tok.pad_token_id).all())
        assert bool((batch["labels"][row, n:] == IGNORE_INDEX).all())
        assert torch.equal(batch["labels"][row, :n], item["labels"])
    text_batch = ConversationCollator(pad_token_id=tok.pad_token_id)([items[1]])
    assert "pixel_values" not in text_batch
    with pytest.raises(TypeError, match="pad_token_id=None"):
        ConversationCollator(pad_token_id=None)


def test_dataloader_workers_share_the_skip_count(tmp_path, tok):
    img = _png(tmp_path / "a.png", (448, 900))
    full = tmp_path / "full.png"
    _png(full, (300, 300), seed=4)
    (tmp_path / "cut.png").write_bytes(full.read_bytes()[:200])
    records = [{"image": img, "conversations": _conv("<image>\nQ", f"A{k}")} for k in range(5)]
    records[2]["image"] = "cut.png"
    ds = ConversationDataset(_write(tmp_path / "d.jsonl", records), tok, make_tiler("internvl_chat"), tokens_per_tile=4,
                             skip_log_dir=tmp_path / "run")
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=ConversationCollator(tok.pad_token_id),
                                         num_workers=2)
    for _ in range(2):  # two epochs: fresh workers meet the bad image again; it is still one bad record
        batches = list(loader)
        assert [b["num_tiles"].tolist() for b in batches] == [[3, 3], [3, 3], [3]]
    s = ds.summary()  # the main process never decoded the image itself
    assert s.skipped == {"corrupt_image": 1} and s.usable == 4 and "cut.png" in s.examples["corrupt_image"][0]


def test_custom_template_and_no_answer_tokens(tmp_path, tok):
    from fcot.data.records import ChatTemplate

    records = [{"conversations": _conv("Q", "")}, {"conversations": _conv("Q", "A")}]
    plain = ChatTemplate(system="{content}|", user="U:{content}|", assistant="{content}")
    ds = ConversationDataset(_write(tmp_path / "d.jsonl", records), tok, template=plain, add_bos=False,
                             system_message="S")
    assert dict(ds.summary().skipped) == {"no_answer_tokens": 1}
    assert tok.decode(ds[0]["input_ids"]) == "S|U:Q|A"
    phi3 = ConversationDataset(_write(tmp_path / "e.jsonl", records[1:]), tok, template="phi3")
    item = phi3[0]
    assert tok.decode(item["input_ids"]) == "<s><|user|>\nQ<|end|>\n<|assistant|>\nA<|end|>\n"
    assert tok.decode(item["labels"][item["labels"] != IGNORE_INDEX]) == "A<|end|>"


def test_hf_trainer_consumes_the_dataset(tmp_path, tok):
    from transformers import Trainer, TrainingArguments

    img = _png(tmp_path / "a.png", (900, 448))
    records = [{"image": img, "conversations": _conv("<image>\nQ", f"answer {k}")} for k in range(4)]
    ds = ConversationDataset(_write(tmp_path / "d.jsonl", records), tok, make_tiler("internvl_chat"), tokens_per_tile=2)

    class Toy(torch.nn.Module):
        """Reads every batch field the collator emits; the loss is CE on the supervised tokens."""

        def __init__(self, vocab: int):
            super().__init__()
            self.embed, self.pix, self.head = torch.nn.Embedding(vocab, 8), torch.nn.Linear(3, 8), torch.nn.Linear(8, vocab)
            self.seen_tiles = []

        def forward(self, input_ids, attention_mask, labels, num_tiles, pixel_values=None):
            self.seen_tiles.append(num_tiles.tolist())
            assert pixel_values.shape[0] == int(num_tiles.sum())
            h = self.embed(input_ids) + self.pix(pixel_values.mean((2, 3))).mean(0)
            logits = self.head(h * attention_mask[..., None])
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)
            return {"loss": loss, "logits": logits}

    model = Toy(len(tok))
    args = TrainingArguments(output_dir=str(tmp_path / "run"), per_device_train_batch_size=2, max_steps=2, report_to=[],
                             use_cpu=True, save_strategy="no", logging_steps=1, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=ConversationCollator(tok.pad_token_id))
    trainer.train()
    assert trainer.state.global_step == 2 and model.seen_tiles == [[3, 3], [3, 3]]
    assert all("loss" in entry for entry in trainer.state.log_history[:2])
