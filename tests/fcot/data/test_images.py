"""fcot.data.images: the decoded-pixel cap and errors that name the file (issue 21); the training
data set skips and counts images over the cap."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fcot.data.images import (DEFAULT_MAX_PIXELS, ImageDecodeError, ImageTooLargeError, check_image, load_image,
                              max_pixels_setting)


def _png(path: Path, size: tuple[int, int]) -> Path:
    pixels = torch.randint(0, 256, (size[1], size[0], 3), dtype=torch.uint8).numpy()
    Image.fromarray(pixels).save(path)
    return path


def _bomb(path: Path, width: int, height: int) -> Path:
    """A valid PNG header of ``width x height`` grey pixels and a tiny body: enough for the header
    check (the decode would need width*height bytes), written without allocating the image."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")

    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def test_cap_refuses_before_decoding(tmp_path, monkeypatch):
    bomb = _bomb(tmp_path / "bomb.png", 10000, 10000)
    assert bomb.stat().st_size < 1000
    with pytest.raises(ImageTooLargeError, match=rf"{bomb}: 10000 x 10000 = 100,000,000 pixels is over the cap of "
                                                 rf"{DEFAULT_MAX_PIXELS:,}: downscale .*FCOT_MAX_IMAGE_PIXELS"):
        load_image(bomb)
    with pytest.raises(ImageTooLargeError, match="over the cap of 1,000"):
        check_image(_png(tmp_path / "s.png", (50, 30)), max_pixels=1000)
    assert check_image(tmp_path / "s.png", max_pixels=1500) == (50, 30)
    monkeypatch.setenv("FCOT_MAX_IMAGE_PIXELS", "1000")
    assert max_pixels_setting() == 1000
    with pytest.raises(ImageTooLargeError):
        load_image(tmp_path / "s.png")
    monkeypatch.setenv("FCOT_MAX_IMAGE_PIXELS", "0")
    assert max_pixels_setting() is None and load_image(tmp_path / "s.png").size == (50, 30)
    monkeypatch.setenv("FCOT_MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(ValueError, match="FCOT_MAX_IMAGE_PIXELS='lots': expected a whole number"):
        max_pixels_setting()
    with pytest.raises(ValueError, match="max_pixels=-1: expected an int >= 0"):
        max_pixels_setting(-1)


def test_unreadable_images_name_the_file(tmp_path):
    good = _png(tmp_path / "g.png", (40, 20))
    im = load_image(good)
    assert im.mode == "RGB" and im.size == (40, 20)
    with Image.open(good) as ref:
        assert (np.asarray(im) == np.asarray(ref.convert("RGB"))).all()
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageDecodeError, match=rf"{empty}: the image file is empty \(0 bytes\)"):
        load_image(empty)
    truncated = tmp_path / "t.png"
    truncated.write_bytes(good.read_bytes()[:200])
    assert check_image(truncated) == (40, 20)  # the header is intact
    with pytest.raises(ImageDecodeError, match=rf"{truncated}: the image data is truncated or corrupt"):
        load_image(truncated)
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(ImageDecodeError, match=rf"{text}: not a readable image"):
        check_image(text)
    with pytest.raises(ImageDecodeError, match="no such image file"):
        load_image(tmp_path / "missing.png")
    assert isinstance(ImageDecodeError("x", "y"), ValueError)


def test_training_skips_and_counts_images_over_the_cap(tmp_path):
    pytest.importorskip("transformers")
    from fcot.data.records import ConversationDataset
    from fcot.models import make_tiler
    from tests.fcot.tiny import tiny_tokenizer

    _png(tmp_path / "ok.png", (64, 64))
    _bomb(tmp_path / "bomb.png", 10000, 10000)
    conv = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "Seven."}]
    with open(tmp_path / "d.jsonl", "w") as fh:
        for img in ("ok.png", "bomb.png"):
            fh.write(json.dumps({"image": img, "conversations": conv}) + "\n")
    ds = ConversationDataset(tmp_path / "d.jsonl", tiny_tokenizer(), make_tiler("internvl"), tokens_per_tile=4)
    assert len(ds) == 1 and ds.summary().skipped == {"image_too_large": 1}
    assert "bomb.png: 10000 x 10000" in ds.summary().examples["image_too_large"][0]
    # a cap set on the data set: the same record is now usable
    assert len(ConversationDataset(tmp_path / "d.jsonl", tiny_tokenizer(), make_tiler("internvl"), tokens_per_tile=4,
                                   max_pixels=0)) == 2
    # met at load time (the header scan was skipped): skipped, counted, the next record takes its place
    lazy = ConversationDataset(tmp_path / "d.jsonl", tiny_tokenizer(), make_tiler("internvl"), tokens_per_tile=4,
                               scan_images=False)
    items = [lazy[i] for i in range(len(lazy))]
    assert all(item["pixel_values"].shape[0] >= 1 for item in items)
    assert lazy.summary().skipped.get("image_too_large") == 1
