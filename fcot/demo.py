"""``fcot demo``: the FCoT-VL method end to end on a tiny InternVL, offline, on CPU, in minutes.

1. **Task.** 64x64 px "documents" with two digits printed side by side in PIL's built-in
   font; the question "what is the number", the answer both digits. One 64 px tile is 8x8 ViT
   patches -> 16 visual tokens after InternVL's pixel shuffle (8 per digit); 8 at ratio 0.5,
   4 at 0.75. (Four digits per page, 4 tokens each, would make 0.75 lose text, but the tiny
   teacher's loss stayed at chance for 400 steps there: too slow for a minutes-long demo.)
2. **Teacher.** A transformers-native ``InternVLForConditionalGeneration`` built from a config,
   with a word-level tokenizer built in code, trained as a whole (HF ``Trainer``) on the task
   until it reads.
3. **Training-free compression.** ``avg``, ``tome`` and ``prune`` at ratios 0.5 and 0.75
   (:func:`fcot.apply_fcot` on the teacher), evaluated with ``fcot eval``'s code.
4. **FCoT-VL.** Stage-1 self-distillation of a ``conv`` student at 0.5 and 0.75, stage-2
   post-training, and a merge of two post-trained checkpoints.
5. **Prefill at real widths.** :func:`prefill_comparison`: an InternVL2-1B-shaped random-weight
   model (a 448 px tile, one ViT and one LLM layer of InternVL2-1B's widths), uncompressed and
   at 0.5 / 0.75, timed in interleaved rounds (median, p20, p80), next to the FLOP-ideal
   speed-up: where compression shows what it is for. The tiny model's own latency column is
   per-call overhead (16 visual tokens, 0.7M parameters) and says nothing about speed.
6. **Report.** ``fcot report`` on the run folder: plots and ``report.md``.

Everything is seeded (``--seed``); ``--quick`` runs the same chain with a handful of steps
and questions (seconds; the test suite runs it), so its accuracies mean nothing.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>", "<|im_start|>", "<|im_end|>"]
WORDS = ["user", "assistant", "system", "what", "is", "the", "number"] + [str(d) for d in range(10)]
VOCAB = SPECIALS + WORDS
GRID = 4          # the page is GRID * CELL = 64 px: one tile
CELL = 16
PATCH = 8         # ViT patch: 8x8 patches per tile, 4x4 = 16 visual tokens after the pixel shuffle


CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<IMG_CONTEXT>\n{% else %}{{ c['text'] }}"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% endif %}"
)
"""The demo model's chat template: ChatML with InternVL's image placeholder, as the native ``-hf``
checkpoints carry one, so ``fcot eval`` prompts the demo's models through their own template."""


def build_tokenizer():
    """A word-level tokenizer over :data:`VOCAB` (whitespace split, ``<...>`` tokens split out)
    with InternVL's image tokens and :data:`CHAT_TEMPLATE`, as a transformers
    ``PreTrainedTokenizerFast``."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"<[^>]+>"), behavior="isolated"),
                                                 pre_tokenizers.WhitespaceSplit()])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        padding_side="left", additional_special_tokens=SPECIALS[4:],
        model_input_names=["input_ids", "attention_mask"], chat_template=CHAT_TEMPLATE,
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
        tie_word_embeddings=False,  # transformers 5 reads the top-level flag (default True), not text_config's
    )


def _glyphs(width: int, height: int) -> dict[str, Any]:
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=int(min(width * 1.4, height) * 0.85))
    out = {}
    for d in "0123456789":
        im = Image.new("L", (width, height), 255)
        left, top, right, bottom = font.getbbox(d)
        ImageDraw.Draw(im).text(((width - right - left) // 2, (height - bottom - top) // 2), d, font=font, fill=0)
        out[d] = im
    return out


def held_out(digits: list[str]) -> bool:
    """Whether a digit sequence belongs to the held-out split: ``sum(w_k d_k) % 5 == 0`` with
    weights 1, 2, 3, 4, 1, ... So a fifth of the numbers are never trained on, yet every digit
    appears at every position in both splits (fixing the others, 2 of its 10 values are held out)."""
    return sum((k % 4 + 1) * int(d) for k, d in enumerate(digits)) % 5 == 0


def make_task(out: str | os.PathLike, n: int, *, seed: int, rows: int = 1, cols: int = 4, split: str = "train",
              progress: bool = False) -> Path:
    """Write ``n`` pages of ``rows x cols`` printed digits to ``out/images`` and their records
    (fcot.data.records format; the question "what is the number", the answer the digits in
    reading order, space-separated) to ``out/data.jsonl``; returns the JSONL path. ``split``
    "train" draws only numbers outside :func:`held_out`, "test" only held-out ones, so a test
    page is never a training page: the model has to read each digit."""
    from PIL import Image
    from tqdm import tqdm

    if split not in ("train", "test"):
        raise ValueError(f"split={split!r}: expected 'train' or 'test'")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    size = GRID * CELL
    glyphs = _glyphs(size // cols, size // rows)
    rng = random.Random(f"fcot-demo/{seed}")
    with open(out / "data.jsonl", "w", encoding="utf-8") as fh:
        for i in tqdm(range(n), desc=f"pages {out.name}", unit="page", disable=not progress, leave=False):
            while True:
                digits = [rng.choice("0123456789") for _ in range(rows * cols)]
                if held_out(digits) == (split == "test"):
                    break
            page = Image.new("L", (size, size), 255)
            for k, d in enumerate(digits):
                page.paste(glyphs[d], ((k % cols) * (size // cols), (k // cols) * (size // rows)))
            name = f"images/{i:05d}.png"
            page.save(out / name)
            conv = [{"from": "human", "value": "<image>\nwhat is the number"}, {"from": "gpt", "value": " ".join(digits)}]
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


@dataclass(frozen=True)
class Plan:
    """Sizes of one demo run (``--quick`` shrinks every stage to a few steps)."""

    cols: int = 2
    """Digits printed side by side on a page (the answer reads them all)."""
    train_pages: int = 2000
    test_pages: int = 100
    teacher_steps: int = 400
    teacher_lr: float = 1e-3
    distill_steps: int = 600
    posttrain_steps: int = 300
    distill_lr: float = 3e-3
    """Stage 1 trains only the compressor and projector: a higher rate than the whole model's."""
    stage_lr: float = 1e-3
    batch_size: int = 16
    latency_samples: int = 8


QUICK = Plan(train_pages=16, test_pages=6, teacher_steps=3, distill_steps=2, posttrain_steps=2, batch_size=4,
             latency_samples=1)
QUICK_PREFILL = dict(repeats=1, shapes=dict(vit=dict(hidden=128, heads=2, intermediate=256, layers=24, image=64, patch=8),
                                            llm=dict(hidden=128, heads=2, kv_heads=1, intermediate=256, layers=24, vocab=512)),
                     vocab=512, text_tokens=8)
"""``--quick``: the same comparison on a toy shape (the chain and the report section, not a measurement)."""


def save_bundle(model, tokenizer, image_processor, out: Path) -> Path:
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    image_processor.save_pretrained(out)
    return out


def train_teacher(model, tokenizer, tiler, jsonl: Path, out: Path, plan: Plan, *, seed: int, progress: bool) -> None:
    """Supervised training of the whole tiny model with HF Trainer; logs to ``out/metrics.jsonl``
    (the trainers' format, :func:`fcot.train.engine.metrics_callback_class`)."""
    from transformers import Trainer, TrainingArguments

    from fcot.data.records import ConversationCollator, ConversationDataset
    from fcot.train.engine import metrics_callback_class

    out.mkdir(parents=True, exist_ok=True)
    # Decoded and tiled once: the image processor costs more than the tiny model's step.
    data = ConversationDataset(jsonl, tokenizer, tiler, max_tiles=1, tokens_per_tile=model.config.image_seq_length)
    data = [data[i] for i in range(len(data))]
    steps = plan.teacher_steps
    args = TrainingArguments(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=plan.batch_size, learning_rate=plan.teacher_lr,
        lr_scheduler_type="cosine", warmup_steps=max(1, steps // 20), weight_decay=0.0, logging_steps=max(1, steps // 60),
        save_strategy="no", report_to=[], seed=seed, data_seed=seed, dataloader_num_workers=0, use_cpu=True,
        disable_tqdm=not progress, remove_unused_columns=False,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[metrics_callback_class()()],
                      data_collator=_DropNumTiles(ConversationCollator(tokenizer.pad_token_id)))
    trainer.train()
    model.eval()


def _stage(stage: str, teacher: Path, out: Path, jsonl: Path, ratio: float, steps: int, plan: Plan, seed: int,
           progress: bool, extra: dict | None = None):
    from fcot.train.config import build_config

    lr = plan.distill_lr if stage == "distill" else plan.stage_lr
    raw = {"common": {"model": str(teacher), "compressor": "conv", "ratio": ratio, "output_dir": str(out), "seed": seed,
                      "overwrite": True},
           "data": {"jsonl": [str(jsonl)], "max_tiles": 1},
           "training": {"max_steps": steps, "per_device_train_batch_size": plan.batch_size, "learning_rate": lr,
                        "lr_scheduler_type": "cosine", "warmup_steps": max(1, steps // 20), "logging_steps": max(1, steps // 40),
                        "save_strategy": "no", "use_cpu": True, "disable_tqdm": not progress},
           **(extra or {})}
    cfg = build_config(stage, raw)
    if stage == "distill":
        from fcot.train.distill import run_distill

        run_distill(cfg)
    else:
        from fcot.train.posttrain import run_posttrain

        run_posttrain(cfg)
    return out


def run_demo(out: str | os.PathLike = "runs/demo", *, quick: bool = False, seed: int = 0, overwrite: bool = False,
             progress: bool = True) -> int:
    """Run the whole demo into ``out``; prints the table and the report's path. Returns 0."""
    import transformers

    from fcot.data.tiling import HFTiler, internvl_image_processor
    from fcot.eval.run import evaluate_model, evaluate_training_free, format_table, load_eval_set, load_model, write_results
    from fcot.report import write_report
    from fcot.train.merge import merge_checkpoints

    plan = QUICK if quick else Plan()
    run = Path(out)
    if run.exists():
        if not overwrite:
            raise FileExistsError(f"out={str(run)!r} already exists: pass --overwrite to replace it")
        shutil.rmtree(run)
    run.mkdir(parents=True)
    t0 = time.perf_counter()
    transformers.set_seed(seed)
    transformers.logging.set_verbosity_error()
    steps_total = 7
    say = (lambda k, msg: print(f"[{k}/{steps_total}] {msg}", flush=True))

    say(1, f"task: {plan.train_pages} training pages, {plan.test_pages} test pages of numbers never trained on "
           f"({run / 'data'})")
    train = make_task(run / "data" / "train", plan.train_pages, seed=seed, cols=plan.cols, progress=progress)
    test = make_task(run / "data" / "test", plan.test_pages, seed=seed + 1_000_000, cols=plan.cols, split="test",
                     progress=progress)
    questions = load_eval_set(test)

    say(2, f"teacher: tiny InternVL trained as a whole for {plan.teacher_steps} steps")
    tokenizer, image_processor = build_tokenizer(), internvl_image_processor(GRID * CELL, max_tiles=1)
    tiler = HFTiler(image_processor)
    model = transformers.InternVLForConditionalGeneration(build_config())
    train_teacher(model, tokenizer, tiler, train, run / "teacher", plan, seed=seed, progress=progress)
    teacher_dir = save_bundle(model, tokenizer, image_processor, run / "teacher")

    kw = dict(max_tiles=1, max_new_tokens=plan.cols + 2, latency_samples=plan.latency_samples, batch_size=32, progress=progress)
    results = [evaluate_model(model, tokenizer, tiler, questions, name="teacher", role="teacher", path=str(teacher_dir), **kw)]
    print(f"    teacher exact match on held-out pages: {100 * results[0].metrics['exact_match']:.1f}%", flush=True)

    say(3, "training-free compression of the teacher: avg, tome, prune at ratio 0.5 and 0.75")
    results += evaluate_training_free(model, tokenizer, tiler, questions, ("avg", "tome", "prune"), (0.5, 0.75),
                                      path=str(teacher_dir), **kw)
    del model

    say(4, f"stage 1: self-distillation of a conv student at 0.5 and 0.75 ({plan.distill_steps} steps each)")
    distilled = {r: _stage("distill", teacher_dir, run / f"distill-{r:g}", train, r, plan.distill_steps, plan, seed, progress)
                 for r in (0.5, 0.75)}

    say(5, f"stage 2: post-training ({plan.posttrain_steps} steps; two runs at 0.5, merged) ")
    post = {}
    for name, r, s in (("posttrain-0.5-a", 0.5, seed), ("posttrain-0.5-b", 0.5, seed + 1), ("posttrain-0.75", 0.75, seed)):
        post[name] = _stage("posttrain", distilled[r], run / name, train, r, plan.posttrain_steps, plan, s, progress)
    merged = merge_checkpoints(run / "merged-0.5", [post["posttrain-0.5-a"], post["posttrain-0.5-b"]], None)
    (Path(merged) / "metrics.jsonl").unlink(missing_ok=True)  # the first run's training log, copied by the merge

    say(6, "evaluating the students")
    for name, path in (("conv@0.5 distilled", distilled[0.5]), ("conv@0.75 distilled", distilled[0.75]),
                       ("conv@0.5 posttrained", post["posttrain-0.5-a"]), ("conv@0.5 merged", Path(merged)),
                       ("conv@0.75 posttrained", post["posttrain-0.75"])):
        student, tok, til, role = load_model(path)
        results.append(evaluate_model(student, tok, til, questions, name=name, role=role, path=str(path), **kw))
        del student

    say(7, "prefill at real widths: an InternVL2-1B-shaped random-weight model, uncompressed vs avg@0.5/0.75 "
           "(interleaved rounds, median and spread, next to the FLOP-ideal speed-up)")
    prefill = prefill_comparison(**(QUICK_PREFILL if quick else {}), seed=seed)
    (run / "prefill.json").write_text(json.dumps(prefill, indent=2) + "\n", encoding="utf-8")

    wall = time.perf_counter() - t0
    write_results(run, results, eval_set=str(test))
    (run / "summary.json").write_text(json.dumps({
        "demo": "quick" if quick else "full", "seed": seed, "held-out questions": len(questions),
        "torch threads": torch.get_num_threads(), "wall time (s, before the report)": round(wall, 1),
        "task": f"read the {plan.cols} printed digits of a 64x64 page (one tile, 16 visual tokens uncompressed)",
    }, indent=2) + "\n", encoding="utf-8")
    report = write_report(run)
    print()
    print(format_table(results))
    print(f"\nfcot demo finished in {wall / 60:.1f} min; report: {report} (plots next to it)")
    return 0


# ---------------------------------------------------------------------------------------------
# Prefill at real widths
# ---------------------------------------------------------------------------------------------

INTERNVL2_1B = dict(
    vit=dict(hidden=1024, heads=16, intermediate=4096, layers=24, image=448, patch=14),
    llm=dict(hidden=896, heads=14, kv_heads=2, intermediate=4864, layers=24, vocab=151655),
)
"""InternVL2-1B's shapes: InternViT-300M-448px and Qwen2-0.5B (``/work/shared/MODELS.md``)."""


def prefill_flops(*, vit: dict, llm: dict, tiles: int, tokens_per_tile: int, text_tokens: int) -> dict[str, float]:
    """FLOPs (2 per multiply-add) of one batch-1 prefill: the ViT over ``tiles`` tiles (CLS +
    patches), the projector, and the LLM over ``text_tokens + tiles * tokens_per_tile`` tokens
    with only the last position's logits (what ``generate`` computes). ``vit``/``llm`` count the
    dense matmuls (patch embedding, projections, MLPs, LM head); ``attention`` the QK^T and PV
    products of both, over all key positions (the CPU kernels do not skip the masked half).
    Norms, activations and softmax are left out."""
    n = (vit["image"] // vit["patch"]) ** 2 + 1
    c, f = vit["hidden"], vit["intermediate"]
    vit_dense = vit["layers"] * 2 * n * (4 * c * c + 2 * c * f) + 2 * (n - 1) * 3 * vit["patch"] ** 2 * c
    vit_attention = vit["layers"] * 2 * 2 * n * n * c
    projector = 2 * tiles * tokens_per_tile * (c * 4 * llm["hidden"] + llm["hidden"] ** 2)
    length = text_tokens + tiles * tokens_per_tile
    h, kv = llm["hidden"], llm["hidden"] // llm["heads"] * llm["kv_heads"]
    llm_dense = llm["layers"] * 2 * length * (2 * h * h + 2 * h * kv + 3 * h * llm["intermediate"]) + 2 * h * llm["vocab"]
    llm_attention = llm["layers"] * 2 * 2 * length * length * h
    return {"vit": tiles * vit_dense, "projector": projector, "llm": llm_dense,
            "attention": tiles * vit_attention + llm_attention, "llm_attention": llm_attention}


def _total(flops: dict[str, float]) -> float:
    return flops["vit"] + flops["projector"] + flops["llm"] + flops["attention"]


def _llm(flops: dict[str, float]) -> float:
    return flops["llm"] + flops["llm_attention"]


def _spread(times: list[float]) -> dict[str, float]:
    qs = statistics.quantiles(times, n=5) if len(times) > 1 else [times[0]] * 4
    return {"median": statistics.median(times), "p20": qs[0], "p80": qs[3], "n": len(times)}


def prefill_comparison(*, vit_layers: int = 1, llm_layers: int = 1, tiles: int = 1, text_tokens: int = 40,
                       repeats: int = 5, settings=(("none", 0.5), ("avg", 0.5), ("avg", 0.75)), vocab: int = 8192,
                       seed: int = 0, shapes: dict | None = None) -> dict[str, Any]:
    """Prefill latency of an InternVL2-1B-shaped random-weight model (transformers-native InternVL,
    ``vit_layers`` / ``llm_layers`` of its 24 + 24, 448 px tiles) uncompressed and compressed,
    next to the FLOP-ideal speed-up. Settings are measured in interleaved rounds (each round
    applies every setting once, in order, then reverts it), after one warm-up round, so load on
    the machine hits all settings alike; each is reported as median, p20 and p80. Two timings per
    setting: the whole prefill (ViT, compressor + projector, LLM) and the LLM alone on the
    merged embeddings (what compression shortens). The vocabulary is ``vocab`` (only the last
    position's logits are computed, as ``generate`` does, so it barely counts). The ViT and
    LLM keep InternVL2-1B's 1:1 layer ratio by default, so the whole-prefill ratio is the full
    model's; ``gflops_24_layers`` / ``ideal_total_24_layers`` give the full 24+24 model's FLOPs.
    ``shapes`` replaces :data:`INTERNVL2_1B` (the tests use a toy one)."""
    import transformers

    import fcot

    shapes_in = shapes or INTERNVL2_1B
    v, t = shapes_in["vit"], shapes_in["llm"]
    config = transformers.InternVLConfig(
        vision_config=dict(hidden_size=v["hidden"], num_attention_heads=v["heads"], intermediate_size=v["intermediate"],
                           num_hidden_layers=vit_layers, image_size=[v["image"]] * 2, patch_size=[v["patch"]] * 2,
                           use_qk_norm=False),
        text_config=dict(model_type="qwen2", hidden_size=t["hidden"], num_attention_heads=t["heads"],
                         num_key_value_heads=t["kv_heads"], intermediate_size=t["intermediate"],
                         num_hidden_layers=llm_layers, vocab_size=vocab, max_position_embeddings=8192,
                         tie_word_embeddings=True),
        image_token_id=vocab - 1, downsample_ratio=0.5, image_seq_length=(v["image"] // v["patch"]) ** 2 // 4,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = transformers.InternVLForConditionalGeneration(config).eval()
        pixels = torch.randn(tiles, 3, v["image"], v["image"])
        text = torch.randint(0, vocab - 2, (text_tokens,))

    def inputs(per_tile: int) -> dict[str, torch.Tensor]:
        ids = torch.cat([text[:4], torch.full((tiles * per_tile,), vocab - 1), text[4:]])[None]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}

    def run(name: str, ratio: float) -> tuple[float, float, int]:
        if name != "none":
            fcot.apply_fcot(model, compressor=name, ratio=ratio, fused=False)
        try:
            per_tile = int(model.config.image_seq_length)
            batch = inputs(per_tile)
            with torch.no_grad():
                t0 = time.perf_counter()
                model(**batch, logits_to_keep=1)
                total = time.perf_counter() - t0
                embeds = model.get_input_embeddings()(batch["input_ids"])
                t0 = time.perf_counter()
                model.model.language_model(inputs_embeds=embeds, attention_mask=batch["attention_mask"])
                llm = time.perf_counter() - t0
        finally:
            if name != "none":
                fcot.revert_fcot(model)
        return total * 1e3, llm * 1e3, per_tile

    times: dict[str, dict[str, list[float]]] = {f"{n}@{r:g}" if n != "none" else "none": {"total": [], "llm": []}
                                                for n, r in settings}
    per_tile_of: dict[str, int] = {}
    for rnd in range(repeats + 1):  # round 0 warms up every setting
        for name, ratio in settings:
            key = f"{name}@{ratio:g}" if name != "none" else "none"
            total, llm, per_tile = run(name, ratio)
            per_tile_of[key] = per_tile
            if rnd:
                times[key]["total"].append(total)
                times[key]["llm"].append(llm)
    base_key = "none"
    measured = dict(vit={**v, "layers": vit_layers}, llm={**t, "layers": llm_layers, "vocab": vocab})
    rows = []
    for key, tt in times.items():
        flops = prefill_flops(**measured, tiles=tiles, tokens_per_tile=per_tile_of[key], text_tokens=text_tokens)
        full = prefill_flops(**shapes_in, tiles=tiles, tokens_per_tile=per_tile_of[key], text_tokens=text_tokens)
        rows.append({"setting": key, "tokens_per_tile": per_tile_of[key], "llm_tokens": text_tokens + tiles * per_tile_of[key],
                     "total_ms": _spread(tt["total"]), "llm_ms": _spread(tt["llm"]),
                     "gflops": {k: x / 1e9 for k, x in flops.items()}, "gflops_24_layers": {k: x / 1e9 for k, x in full.items()}})
    base = next(r for r in rows if r["setting"] == base_key)
    for r in rows:
        r["speedup_total"] = base["total_ms"]["median"] / r["total_ms"]["median"]
        r["speedup_llm"] = base["llm_ms"]["median"] / r["llm_ms"]["median"]
        r["ideal_total"] = _total(base["gflops"]) / _total(r["gflops"])
        r["ideal_llm"] = _llm(base["gflops"]) / _llm(r["gflops"])
        r["ideal_total_24_layers"] = _total(base["gflops_24_layers"]) / _total(r["gflops_24_layers"])
    name = "InternVL2-1B-shaped" if shapes is None else "toy-shaped"
    return {"model": f"{name}, random weights, {vit_layers}+{llm_layers} of {v['layers']}+{t['layers']} layers, vocab {vocab}, "
                     f"{v['image']} px tiles",
            "tiles": tiles, "text_tokens": text_tokens, "repeats": repeats, "threads": torch.get_num_threads(),
            "order": "interleaved rounds after a warm-up round", "rows": rows,
            "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None}
