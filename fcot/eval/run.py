"""``fcot eval``: answer the questions of a JSONL set with ``generate`` and score them.

The set is in :mod:`fcot.data.records`' format. Every ``human``/``gpt`` pair of a record is one
question; its reference answers are the record's ``answers`` (one entry per pair: a string or a
list of strings, e.g. TextVQA's ten) when present, else the ``gpt`` text. Question ids are
``<record id>#<pair index>`` (the record's ``id`` or ``line<N>``). Each question is asked on
its own with the record's image(s), in the model's chat template, and answered greedily.

Models (transformers-native InternVL, ``model_type="internvl"``):

- a folder with an ``fcot`` section in its config (saved from a patched model):
  :func:`fcot.load_compressed`; role ``student``;
- a plain InternVL folder: ``from_pretrained``; role ``teacher``; with ``compressors`` it is
  also evaluated after :func:`fcot.apply_fcot` with each compressor and ratio (training-free,
  role ``training-free``), reverted in between.

Per model it reports each metric's mean, visual tokens per image (tokens per tile x tiles),
prefill latency (median of batch-1 forwards over the first ``latency_samples`` questions) and
peak memory: ``torch.cuda.max_memory_allocated`` on a GPU; on CPU the process's peak resident
set size (``ru_maxrss``), which includes everything loaded before and only grows, as the JSON's
``memory_kind`` says.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from fcot.eval.metrics import METRICS, score

IMAGE = "<image>"


class EvalSetError(ValueError):
    """The eval set cannot be scored (no answers, malformed records)."""


@dataclass
class Question:
    qid: str
    images: list[Path]
    question: str
    answers: list[str]


def load_eval_set(jsonl: str | os.PathLike, image_root: str | os.PathLike | None = None) -> list[Question]:
    """Questions with their reference answers from a records JSONL (see the module docstring)."""
    path = Path(jsonl)
    if not path.is_file():
        raise FileNotFoundError(f"eval set {str(path)!r}: no such file")
    root = Path(image_root) if image_root is not None else path.parent
    out: list[Question] = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path.name}:{n}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise EvalSetError(f"{where}: not JSON ({e})") from None
            convs = rec.get("conversations") if isinstance(rec, dict) else None
            if not isinstance(convs, list):
                raise EvalSetError(f"{where}: expected an object with 'conversations' (fcot.data.records format)")
            turns = [(t.get("from"), t.get("value")) for t in convs if isinstance(t, dict) and t.get("from") != "system"]
            humans = [v for r, v in turns if r in ("human", "user")]
            gpts = [v for r, v in turns if r in ("gpt", "assistant")]
            raw = rec.get("image")
            images = [raw] if isinstance(raw, str) else list(raw or [])
            answers = rec.get("answers")
            if answers is not None and (not isinstance(answers, list) or len(answers) != len(humans)):
                raise EvalSetError(f"{where}: 'answers' must be a list with one entry per question ({len(humans)})")
            rid = str(rec.get("id", f"line{n}"))
            for k, q in enumerate(humans):
                refs = answers[k] if answers is not None else (gpts[k] if k < len(gpts) else None)
                refs = [refs] if isinstance(refs, str) else refs
                if not refs or not all(isinstance(r, str) for r in refs) or not any(r.strip() for r in refs):
                    raise EvalSetError(f"{where}: question {k} ({q!r}) has no reference answer: give each question a "
                                       "'gpt' turn or an 'answers' entry")
                if not isinstance(q, str):
                    raise EvalSetError(f"{where}: question {k} is not a string")
                q = q.replace(IMAGE, "").strip()
                if images:
                    q = "\n".join([IMAGE] * len(images) + [q])
                out.append(Question(f"{rid}#{k}", [root / p for p in images], q, list(refs)))
    if not out:
        raise EvalSetError(f"eval set {str(path)!r} holds no questions with answers")
    return out


def score_predictions(questions: Sequence[Question], predictions: dict[str, str],
                      metrics: Sequence[str] = tuple(METRICS)) -> tuple[dict[str, float], list[dict]]:
    """Mean of each metric, and per-question rows; every question needs a prediction and every
    prediction a question."""
    known = {q.qid for q in questions}
    unknown = sorted(set(predictions) - known)
    if unknown:
        raise EvalSetError(f"{len(unknown)} predictions for unknown question ids (e.g. {unknown[:3]}); ids are "
                           "'<record id>#<question index>' of the eval set")
    missing = [q.qid for q in questions if q.qid not in predictions]
    if missing:
        raise EvalSetError(f"{len(missing)} questions have no prediction (e.g. {missing[:3]})")
    rows = []
    for q in questions:
        p = predictions[q.qid]
        rows.append({"id": q.qid, "prediction": p, "answers": q.answers, **{m: score(m, p, q.answers) for m in metrics}})
    return {m: sum(r[m] for r in rows) / len(rows) for m in metrics}, rows


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    """Peak memory and what it measures (see the module docstring)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_memory_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (rss / 2**20 if sys.platform == "darwin" else rss / 2**10), "process_peak_rss"


class Answerer:
    """Builds prompts (chat template + image blocks) and answers questions with batched ``generate``."""

    def __init__(self, model, tokenizer, tiler, *, max_tiles: int = 12, template: str = "chatml",
                 max_new_tokens: int = 16):
        from fcot.data.records import ConversationTokenizer

        self.model, self.tokenizer, self.tiler, self.max_tiles = model, tokenizer, tiler, max_tiles
        self.tokens_per_tile = int(model.config.image_seq_length)
        self.encoder = ConversationTokenizer(tokenizer, tokens_per_tile=self.tokens_per_tile, template=template)
        self.max_new_tokens = max_new_tokens
        end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.stop = [t for t in {end, tokenizer.eos_token_id} if t is not None and t != tokenizer.unk_token_id]
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop[0]
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype

    def encode(self, q: Question) -> tuple[list[int], torch.Tensor | None, int]:
        from PIL import Image

        pixels = []
        per_image = max(1, self.max_tiles // max(1, len(q.images)))
        for path in q.images:
            with Image.open(path) as im:
                pixels.append(self.tiler(im.convert("RGB"), per_image))
        tiles = [p.shape[0] for p in pixels]
        ids, _ = self.encoder([("human", q.question)], tiles)
        return ids, (torch.cat(pixels) if pixels else None), sum(tiles)

    def batch(self, encoded: Sequence[tuple[list[int], torch.Tensor | None, int]]) -> dict[str, torch.Tensor]:
        length = max(len(ids) for ids, _, _ in encoded)
        input_ids = torch.full((len(encoded), length), self.pad, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for b, (ids, _, _) in enumerate(encoded):  # left padding: generation continues every row at the end
            input_ids[b, length - len(ids):] = torch.tensor(ids)
            mask[b, length - len(ids):] = 1
        inputs = {"input_ids": input_ids.to(self.device), "attention_mask": mask.to(self.device)}
        pixels = [p for _, p, _ in encoded if p is not None]
        if pixels:
            inputs["pixel_values"] = torch.cat(pixels).to(self.device, self.dtype)
        return inputs

    @torch.no_grad()
    def prefill_ms(self, encoded) -> float:
        inputs = self.batch([encoded])
        self.model(**inputs, use_cache=True)  # warm-up
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        self.model(**inputs, use_cache=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) * 1e3

    @torch.no_grad()
    def generate(self, encoded) -> list[str]:
        inputs = self.batch(encoded)
        out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False,
                                  eos_token_id=self.stop, pad_token_id=self.pad)
        new = out[:, inputs["input_ids"].shape[1]:]
        texts = []
        for row in new.tolist():
            cut = next((i for i, t in enumerate(row) if t in self.stop), len(row))
            texts.append(self.tokenizer.decode(row[:cut], skip_special_tokens=True).strip())
        return texts


@dataclass
class ModelResult:
    """One evaluated model: what the table, the JSON and ``fcot report`` show."""

    name: str
    role: str  # teacher | training-free | student
    compressor: str
    ratio: float
    tokens_per_tile: int
    visual_tokens_per_image: float
    metrics: dict[str, float]
    prefill_ms: float
    peak_memory_mb: float
    memory_kind: str
    n_questions: int
    path: str = ""
    predictions: list[dict] = field(default_factory=list, repr=False)


def evaluate_model(model, tokenizer, tiler, questions: Sequence[Question], *, name: str, role: str,
                   batch_size: int = 16, max_new_tokens: int = 16, max_tiles: int = 12, latency_samples: int = 8,
                   metrics: Sequence[str] = tuple(METRICS), progress: bool = True, path: str = "") -> ModelResult:
    """Answer and score ``questions`` with one (possibly fcot-patched) model."""
    from tqdm import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: expected >= 1")
    model.eval()
    ans = Answerer(model, tokenizer, tiler, max_tiles=max_tiles, max_new_tokens=max_new_tokens)
    encoded = [ans.encode(q) for q in questions]
    device = ans.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    predictions: dict[str, str] = {}
    bar = tqdm(total=len(questions), desc=f"eval {name}", unit="q", disable=not progress, leave=False)
    for start in range(0, len(questions), batch_size):
        chunk = encoded[start:start + batch_size]
        for q, text in zip(questions[start:start + batch_size], ans.generate(chunk)):
            predictions[q.qid] = text
        bar.update(len(chunk))
    bar.close()
    latency = statistics.median(ans.prefill_ms(e) for e in encoded[:max(1, latency_samples)])
    means, rows = score_predictions(questions, predictions, metrics)
    mem, kind = peak_memory_mb(device)
    section = getattr(model.config, "fcot", None) or {}
    return ModelResult(
        name=name, role=role, compressor=section.get("compressor", "none"), ratio=float(section.get("ratio", 0.0)),
        tokens_per_tile=ans.tokens_per_tile, visual_tokens_per_image=ans.tokens_per_tile * sum(e[2] for e in encoded) / len(encoded),
        metrics=means, prefill_ms=latency, peak_memory_mb=mem, memory_kind=kind, n_questions=len(questions), path=path,
        predictions=rows,
    )


def load_model(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32, device: str = "cpu",
               trust_remote_code: bool = False):
    """(model, tokenizer, tiler, role) for a model folder of any registered family
    (:func:`fcot.models.get_family`); a clear error for anything else."""
    from fcot.models import FAMILIES, FcotError, get_family

    p = Path(path)
    if not (p / "config.json").is_file():
        what = "does not exist" if not p.exists() else ("is a file" if p.is_file() else
                                                       f"has no config.json (it holds {sorted(x.name for x in p.iterdir())[:6]})")
        raise ValueError(f"model {str(p)!r} {what}: expected a model folder written by save_pretrained")
    config = json.loads((p / "config.json").read_text())
    try:
        family = get_family(config)
    except FcotError:
        raise ValueError(f"model {str(p)!r} is a {config.get('model_type')!r} model ({config.get('architectures')}): "
                         f"fcot eval takes InternVL folders (model_type one of {sorted(FAMILIES)})") from None
    loaded = family.load(str(p), dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    tiler = family.tiler(config, loaded.image_processor)
    return loaded.model, loaded.tokenizer, tiler, "student" if loaded.compressed else "teacher"


def evaluate_training_free(model: Any, tokenizer: Any, tiler: Any, questions: list, compressors: Iterable[str],
                           ratios: Iterable[float], *, prefix: str = "", **kwargs: Any) -> list:
    """:func:`evaluate_model` on ``model`` compressed training-free by every compressor at every
    ratio (``apply_fcot``, then ``revert_fcot`` even on error); results named
    ``{prefix}{compressor}@{ratio}``."""
    import fcot

    results = []
    for comp in compressors:
        for ratio in ratios:
            fcot.apply_fcot(model, compressor=comp, ratio=ratio)
            try:
                results.append(evaluate_model(model, tokenizer, tiler, questions, name=f"{prefix}{comp}@{ratio:g}",
                                              role="training-free", **kwargs))
            finally:
                fcot.revert_fcot(model)
    return results

def evaluate(models: Sequence[str], eval_set: str | os.PathLike, *, compressors: Sequence[str] = (),
             ratios: Sequence[float] = (0.5,), names: Sequence[str] | None = None, limit: int | None = None,
             out: str | os.PathLike | None = None, device: str = "cpu", **kwargs: Any) -> list[ModelResult]:
    """Evaluate model folders (and, for uncompressed ones, each training-free compressor x ratio)."""
    import fcot

    questions = load_eval_set(eval_set)[:limit]
    if names is not None and len(names) != len(models):
        raise ValueError(f"{len(names)} names for {len(models)} models: give one --name per model")
    results = []
    for k, path in enumerate(models):
        model, tokenizer, tiler, role = load_model(path, device=device)
        name = names[k] if names is not None else Path(path).name
        if compressors and role == "student":
            raise ValueError(f"model {path!r} is already compressed ({model.config.fcot['compressor']}): --compressor "
                             "applies to uncompressed models only")
        results.append(evaluate_model(model, tokenizer, tiler, questions, name=name, role=role, path=str(path), **kwargs))
        results += evaluate_training_free(model, tokenizer, tiler, questions, compressors, ratios, prefix=f"{name}+",
                                          path=str(path), **kwargs)
    if out is not None:
        write_results(out, results, eval_set=str(eval_set))
    return results


def write_results(out: str | os.PathLike, results: Sequence[ModelResult], *, eval_set: str, extra: dict | None = None) -> Path:
    """``out/eval.json`` (summary per model) and ``out/predictions/<name>.jsonl``."""
    out = Path(out)
    (out / "predictions").mkdir(parents=True, exist_ok=True)
    models = []
    for r in results:
        d = asdict(r)
        rows = d.pop("predictions")
        safe = "".join(c if c.isalnum() or c in "-_.@+" else "_" for c in r.name)
        with open(out / "predictions" / f"{safe}.jsonl", "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row) + "\n")
        models.append(d)
    payload = {"eval_set": eval_set, "models": models, **(extra or {})}
    path = out / "eval.json"
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return path


def format_table(results: Sequence[ModelResult | dict], metrics: Sequence[str] = tuple(METRICS)) -> str:
    """The terminal table: one row per model."""
    rows = [asdict(r) if isinstance(r, ModelResult) else r for r in results]
    short = {"exact_match": "EM", "anls": "ANLS", "relaxed_accuracy": "relaxed", "vqa_accuracy": "VQA acc"}
    head = f"{'model':<24}{'role':<14}{'tok/img':>8}" + "".join(f"{short.get(m, m):>9}" for m in metrics) + \
        f"{'prefill ms':>11}{'peak MB':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['name'][:23]:<24}{r['role']:<14}{r['visual_tokens_per_image']:>8.0f}" +
                     "".join(f"{100 * r['metrics'][m]:>8.1f}%" for m in metrics) +
                     f"{r['prefill_ms']:>11.2f}{r['peak_memory_mb']:>9.0f}")
    return "\n".join(lines)
