"""``fcot demo``: the FCoT-VL method end to end on a tiny InternVL, offline, on CPU, in minutes.

1. **Task.** 64x64 px "documents": a 4x4 grid of digits printed with PIL's built-in font;
   questions "what is in row R column C" (answers one digit). One 64 px tile is 8x8 ViT patches
   -> 16 visual tokens after InternVL's pixel shuffle, one per printed digit; at 50 %
   compression two digits share a token, at 75 % four do: text-rich in miniature.
2. **Teacher.** A transformers-native ``InternVLForConditionalGeneration`` built from a config,
   with a word-level tokenizer built in code, trained as a whole (HF ``Trainer``) on the task
   until it reads.
3. **Training-free compression.** ``avg``, ``tome`` and ``prune`` at ratios 0.5 and 0.75
   (:func:`fcot.apply_fcot` on the teacher), evaluated with ``fcot eval``'s code.
4. **FCoT-VL.** Stage-1 self-distillation of a ``conv`` student at 0.5 and 0.75, stage-2
   post-training, and a merge of two post-trained checkpoints.
5. **Report.** ``fcot report`` on the run folder: plots and ``report.md``.

Everything is seeded (``--seed``); ``--quick`` runs the same chain with a handful of steps
and questions (seconds; the test suite runs it), so its accuracies mean nothing.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>", "<|im_start|>", "<|im_end|>"]
WORDS = ["user", "assistant", "system", "what", "is", "in", "row", "column"] + [str(d) for d in range(10)]
VOCAB = SPECIALS + WORDS
GRID = 4          # digits per side of the page
CELL = 16         # pixels per cell; the page is GRID * CELL = 64 px, one tile
PATCH = 8


def build_tokenizer():
    """A word-level tokenizer over :data:`VOCAB` (whitespace split, ``<...>`` tokens split out)
    with InternVL's image tokens, as a transformers ``PreTrainedTokenizerFast``."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"<[^>]+>"), behavior="isolated"),
                                                 pre_tokenizers.WhitespaceSplit()])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        padding_side="left", additional_special_tokens=SPECIALS[4:],
        model_input_names=["input_ids", "attention_mask"],
    )


def build_config():
    """The tiny InternVL config: a 2-layer ViT (64 px tiles, 8 px patches) and a 2-layer Qwen2 LLM."""
    import transformers

    size = GRID * CELL
    return transformers.InternVLConfig(
        vision_config=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                           image_size=[size, size], patch_size=[PATCH, PATCH], use_qk_norm=False),
        text_config=dict(model_type="qwen2", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, vocab_size=len(VOCAB),
                         max_position_embeddings=512, tie_word_embeddings=False),
        image_token_id=VOCAB.index("<IMG_CONTEXT>"), downsample_ratio=0.5, projector_hidden_act="gelu",
        image_seq_length=(size // PATCH) ** 2 // 4,
    )


def _glyphs(cell: int) -> dict[str, Any]:
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=int(cell * 0.85))
    out = {}
    for d in "0123456789":
        im = Image.new("L", (cell, cell), 255)
        left, top, right, bottom = font.getbbox(d)
        ImageDraw.Draw(im).text(((cell - right - left) // 2, (cell - bottom - top) // 2), d, font=font, fill=0)
        out[d] = im
    return out


def make_task(out: str | os.PathLike, n: int, *, seed: int, grid: int = GRID, questions: int = 4) -> Path:
    """Write ``n`` pages to ``out/images`` and their records (fcot.data.records format, one
    question per human turn) to ``out/data.jsonl``; returns the JSONL path."""
    from PIL import Image

    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    cell = GRID * CELL // grid
    glyphs = _glyphs(cell)
    rng = random.Random(f"fcot-demo/{seed}")
    with open(out / "data.jsonl", "w", encoding="utf-8") as fh:
        for i in range(n):
            digits = [[rng.choice("0123456789") for _ in range(grid)] for _ in range(grid)]
            page = Image.new("L", (GRID * CELL, GRID * CELL), 255)
            for r in range(grid):
                for c in range(grid):
                    page.paste(glyphs[digits[r][c]], (c * cell, r * cell))
            name = f"images/{i:05d}.png"
            page.save(out / name)
            cells = rng.sample([(r, c) for r in range(grid) for c in range(grid)], min(questions, grid * grid))
            conv = []
            for k, (r, c) in enumerate(cells):
                conv.append({"from": "human", "value": ("<image>\n" if k == 0 else "") + f"what is in row {r + 1} column {c + 1}"})
                conv.append({"from": "gpt", "value": digits[r][c]})
            fh.write(json.dumps({"id": f"demo-{seed}-{i:05d}", "image": name, "conversations": conv}) + "\n")
    return out / "data.jsonl"


class _DropNumTiles:
    """ConversationCollator's ``num_tiles`` is bookkeeping, not a model input."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, features):
        batch = self.collator(features)
        batch.pop("num_tiles")
        return batch


def train_teacher(model, tokenizer, tiler, jsonl: Path, out: Path, *, steps: int, batch_size: int, lr: float,
                  seed: int, progress: bool) -> Path:
    """Supervised training of the whole tiny model with HF Trainer; logs to ``out/metrics.jsonl``."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from fcot.data.records import ConversationCollator, ConversationDataset

    # Decoded and tiled once: the image processor costs more than the tiny model's step.
    data = ConversationDataset(jsonl, tokenizer, tiler, max_tiles=1, tokens_per_tile=model.config.image_seq_length)
    data = [data[i] for i in range(len(data))]
    log = out / "metrics.jsonl"

    class _Log(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                with open(log, "a", encoding="utf-8") as fh:
                    fh.write(json.dumps({"stage": "teacher", "step": state.global_step, "loss": logs["loss"],
                                         "learning_rate": logs.get("learning_rate")}) + "\n")

    args = TrainingArguments(
        output_dir=str(out / "trainer"), max_steps=steps, per_device_train_batch_size=batch_size, learning_rate=lr,
        lr_scheduler_type="cosine", warmup_steps=max(1, steps // 20), weight_decay=0.0, logging_steps=max(1, steps // 50),
        save_strategy="no", report_to=[], seed=seed, data_seed=seed, dataloader_num_workers=0, use_cpu=True,
        disable_tqdm=not progress, remove_unused_columns=False,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data,
                      data_collator=_DropNumTiles(ConversationCollator(tokenizer.pad_token_id)), callbacks=[_Log()])
    trainer.train()
    model.eval()
    return log
